"""Throttling: the rate fio measures on a throttled drive is its limit.

Every rate is measured by fio over at least 5 seconds (time_based) with
async O_DIRECT I/O queued deeper than the limit needs, and must be within
10% of the limit.  Several drives are measured in the same window, each
with its own fio job, so the window is shared and the suite stays short.
An unthrottled drive on the same event loop runs at full speed meanwhile:
a throttled drive waits in its event loop, it never blocks the thread.
"""

import pytest

from conftest import (
    MiB,
    create_image,
    drive_status,
    fio_report,
    run,
)

RUNTIME = 6  # seconds of each measuring window
TOLERANCE = 0.10
SIZE = 64 * MiB


def images(tmp_path, names):
    return {n: create_image(tmp_path / f"{n}.img", SIZE) for n in names}


def measure(jobs, runtime=RUNTIME, extra=()):
    """Run fio JOBS ({job name: (file, {option: value})}) side by side for
    RUNTIME s; return {job name: fio's job report}."""
    args = ["fio", "--output-format=json", "--time_based=1",
            f"--runtime={runtime}", "--ioengine=io_uring", "--direct=1",
            "--iodepth=8", "--norandommap=1", *extra]
    for name, (filename, options) in jobs.items():
        args += [f"--name={name}", f"--filename={filename}"]
        args += [f"--{k}={v}" for k, v in options.items()]
    proc = run(*args, check=False, timeout=runtime + 120)
    assert proc.returncode == 0, f"fio failed:\n{proc.stdout}\n{proc.stderr}"
    report = {job["jobname"]: job for job in fio_report(proc.stdout)["jobs"]}
    for name, job in report.items():
        assert job["error"] == 0, f"fio job {name}: error {job['error']}"
    return report


def iops(job, direction):
    d = job[direction]
    return d["total_ios"] / (d["runtime"] / 1000)


def bps(job, direction):
    d = job[direction]
    return d["io_bytes"] / (d["runtime"] / 1000)


def within(measured, limit, what):
    """'' if MEASURED is within 10% of LIMIT, else a description."""
    if abs(measured - limit) <= TOLERANCE * limit:
        return ""
    return (f"{what}: measured {measured:.1f}/s, limit {limit}/s "
            f"({(measured / limit - 1) * 100:+.1f}%)")


def check(problems):
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_limits(imgfs, tmp_path):
    imgs = images(tmp_path, ["iops", "bpsread", "iosize", "write", "free"])
    drives = {
        "iops": {"throttling.iops-total": 200},
        "bpsread": {"throttling.bps-read": 2 * MiB},
        # a 16 KiB request counts as four 4 KiB ones
        "iosize": {"throttling.iops-total": 400,
                   "throttling.iops-size": "4K"},
        "write": {"throttling.iops-write": 100},
        "free": {},
    }
    mount = imgfs({n: {"file": imgs[n], "format": "raw", **keys}
                   for n, keys in drives.items()},
                  settings={"iothreads": 1})
    throttling = drive_status(mount, "iosize")["options"]["throttling"]
    assert throttling == {"iops-total": 400, "iops-size": 4096}
    rand4k = {"rw": "randread", "bs": "4k"}
    report = measure({
        "iops": (mount.drive("iops"), rand4k),
        "bpsread": (mount.drive("bpsread"), {"rw": "read", "bs": "64k"}),
        "iosize": (mount.drive("iosize"), {"rw": "randread", "bs": "16k"}),
        "write-w": (mount.drive("write"), {"rw": "randwrite", "bs": "4k"}),
        "write-r": (mount.drive("write"), rand4k),
        "free": (mount.drive("free"), rand4k),
    })
    check([
        within(iops(report["iops"], "read"), 200, "iops-total=200"),
        within(bps(report["bpsread"], "read"), 2 * MiB, "bps-read=2M"),
        within(iops(report["iosize"], "read"), 100,
               "iops-total=400 with iops-size=4K, 16K reads"),
        within(iops(report["write-w"], "write"), 100, "iops-write=100"),
    ])
    # not limited: reads of a drive with a write limit, and a drive
    # without limits on the same event loop
    assert iops(report["write-r"], "read") > 300, (
        "reads of a drive limited by iops-write=100 are slow too: "
        f"{iops(report['write-r'], 'read'):.0f}/s")
    assert iops(report["free"], "read") > 400, (
        "an unthrottled drive on the same iothread runs at only "
        f"{iops(report['free'], 'read'):.0f}/s: is the thread blocked?")


@pytest.mark.parametrize("limits_on", ["both", "first"])
def test_group_caps_the_sum(imgfs, tmp_path, limits_on):
    imgs = images(tmp_path, ["a", "b", "alone"])
    limit = {"throttling.iops-total": 300}
    drives = {
        "a": {"throttling.group": "g", **limit},
        "b": {"throttling.group": "g",
              **(limit if limits_on == "both" else {})},
        "alone": dict(limit),
    }
    mount = imgfs({n: {"file": imgs[n], "format": "raw", **keys}
                   for n, keys in drives.items()})
    job = {"rw": "randread", "bs": "4k"}
    report = measure({n: (mount.drive(n), job) for n in drives})
    a, b = iops(report["a"], "read"), iops(report["b"], "read")
    check([
        within(a + b, 300, f"group g (a {a:.0f}/s + b {b:.0f}/s)"),
        within(iops(report["alone"], "read"), 300,
               "the same limit without a group"),
    ])
    # shared between the drives (QEMU serves a group's members in turn),
    # not left to whichever drive's event loop wakes first
    assert min(a, b) >= 0.2 * (a + b), (
        f"group g: a got {a:.0f}/s, b {b:.0f}/s of {a + b:.0f}/s")


def test_burst(imgfs, tmp_path):
    """iops-total-max allows `max` per second for `max-length` seconds,
    then the drive falls back to its average limit."""
    image = create_image(tmp_path / "disk0.img", SIZE)
    avg, peak, length = 100, 400, 2
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "throttling.iops-total": avg,
                             "throttling.iops-total-max": peak,
                             "throttling.iops-total-max-length": length}})
    log = tmp_path / "burst"
    runtime = length + 1 + 6
    measure({"burst": (mount.drive(), {"rw": "randread", "bs": "4k"})},
            runtime=runtime,
            extra=[f"--write_iops_log={log}", "--log_avg_msec=1000"])
    samples = []  # (end of the second in ms, iops in that second)
    for line in (tmp_path / "burst_iops.1.log").read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        samples.append((int(fields[0]), int(fields[1])))
    first = [v for t, v in samples if t <= length * 1000 + 200]
    steady = [v for t, v in samples if t > (length + 1) * 1000 + 200]
    assert first and len(steady) >= 5, samples
    burst_rate = sum(first) / len(first)
    assert 2.5 * avg < burst_rate <= peak * (1 + TOLERANCE), (
        f"first {length} s: {burst_rate:.0f}/s, want a burst near {peak}/s "
        f"(samples {samples})")
    check([within(sum(steady) / len(steady), avg,
                  f"after the burst ({len(steady)} s)")])
