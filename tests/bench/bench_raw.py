#!/usr/bin/python3
"""Benchmark: a raw image through imgfs, beside the plain file and
qemu-storage-daemon's FUSE export.  A benchmark, not a test: it prints
figures and asserts nothing about time.

    sudo /usr/bin/python3 tests/bench/bench_raw.py [--runtime S] [--rounds N]

One fio matrix (libaio, O_DIRECT, time based) runs on three targets, each
with its own fully allocated copy of the same raw image:

    plain  the image file itself: the ceiling
    imgfs  `imgfs mount -f` with cache = none (image opened with O_DIRECT)
    qsd    qemu-storage-daemon, file node cache.direct=on,aio=native, raw
           node, FUSE export on a regular file (its best configuration)

The page cache is dropped before every job (so this needs root), the
targets take turns within each round, and the table quotes the median of
the rounds per cell, every round's figure, and the ratios imgfs/qsd and
imgfs/plain.  These machines are shared and small: a figure can move by
half between runs, so compare within one run only.

Most of that movement is the host's: while it runs other guests on this
one's CPUs ("steal" in /proc/stat), every target loses, and the ones that
keep both CPUs busy lose most.  So a job during which the host took more
than --max-steal % of the CPU time is run again (at most --retries times),
the attempt with the least steal is kept, and a figure kept above the
limit is marked with * in the per-round listing.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

# (label, fio rw, block size, iodepth, unit)
JOBS = [
    ("4k randread QD1", "randread", "4k", 1, "IOPS"),
    ("4k randread QD32", "randread", "4k", 32, "IOPS"),
    ("4k randwrite QD1", "randwrite", "4k", 1, "IOPS"),
    ("4k randwrite QD32", "randwrite", "4k", 32, "IOPS"),
    ("1M read QD4", "read", "1M", 4, "MiB/s"),
    ("1M write QD4", "write", "1M", 4, "MiB/s"),
]
TARGETS = ["plain", "imgfs", "qsd"]
# with --fuse-uring both: imgfs on the /dev/fuse transport as well
DEVFUSE = "imgfs-dev"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(path):
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def cpu_times():
    """(stolen, total) CPU time of all CPUs so far, in ticks: stolen is
    time a virtual machine's CPUs were ready but the host ran something
    else (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def fio(filename, size, runtime, rw, bs, iodepth, name="bench"):
    """Run one fio job; return its JSON report's first job."""
    cmd = ["fio", f"--name={name}", f"--filename={filename}",
           "--ioengine=libaio", "--direct=1", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--time_based=1",
           f"--runtime={runtime}", "--norandommap=1", "--randrepeat=0",
           "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio: {proc.stderr.strip()}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return report["jobs"][0]


def figure(job, rw, unit):
    """IOPS or MiB/s of a fio job for the direction of RW."""
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"] if unit == "IOPS" else side["bw_bytes"] / MiB


def make_image(path, size):
    """A raw image of SIZE bytes, every block written (fully allocated)."""
    with open(path, "wb") as f:
        f.truncate(size)
    cmd = ["fio", "--name=prefill", f"--filename={path}", "--rw=write",
           "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=8",
           f"--size={size}", "--output-format=json"]
    subprocess.run(cmd, capture_output=True, check=True)


class Daemon:
    """A FUSE daemon serving one target file; stop() takes it down."""

    def __init__(self, name, cmd, target, mountpoint, logfile):
        self.name = name
        self.target = target
        self.mountpoint = mountpoint
        self.logfile = logfile
        with open(logfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while not is_mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                first = Path(logfile).read_text(errors="replace").strip()
                first = first.splitlines()[0] if first else "no message"
                raise RuntimeError(f"{name} did not mount: {first}")
            time.sleep(0.05)
        os.stat(target)  # answers

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True)


def start_imgfs(binary, image, work, name, fuse_uring):
    mnt = work / f"{name}-mnt"
    mnt.mkdir()
    config = work / f"{name}.ini"
    config.write_text(f"[imgfs]\nfuse-uring = {fuse_uring}\n\n"
                      f"[disk0]\nfile = {image}\nformat = raw\n"
                      "cache = none\n")
    cmd = [str(binary), "mount", "-f", str(config), str(mnt)]
    return Daemon(name, cmd, mnt / "disk0", mnt, work / f"{name}.log")


def start_qsd(image, work):
    mnt = work / "qsd-export"
    mnt.touch()  # the FUSE export mounts on a regular file
    cmd = ["qemu-storage-daemon",
           "--blockdev", f"driver=file,node-name=f0,filename={image},"
                         "cache.direct=on,aio=native",
           "--blockdev", "driver=raw,node-name=r0,file=f0",
           "--export", f"type=fuse,id=e0,node-name=r0,mountpoint={mnt},"
                       "writable=on"]
    return Daemon("qsd", cmd, mnt, mnt, work / "qsd.log")


def run_job(path, size, runtime, rw, bs, iodepth, unit, what, max_steal,
            retries):
    """Run one fio job, again (up to @retries times) while the host steals
    more than @max_steal % of the CPU time.  Returns the figure of the
    attempt with the least steal, that steal, and the attempts made."""
    best = None
    for attempt in range(1 + retries):
        drop_caches()
        before = cpu_times()
        try:
            value = figure(fio(path, size, runtime, rw, bs, iodepth), rw, unit)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"  {what}: {e}")
            value = None
        after = cpu_times()
        stolen = 100 * (after[0] - before[0]) / max(1, after[1] - before[1])
        again = stolen > max_steal and attempt < retries
        log(f"  {what}{fmt(value, unit)} {unit}   (host steal "
            f"{stolen:.0f}%{': again' if again else ''})")
        if best is None or stolen < best[1]:
            best = (value, stolen)
        if not again:
            break
    return best[0], best[1], attempt + 1


def fmt(value, unit):
    if value is None:
        return "n/a"
    return f"{value:.0f}" if unit == "IOPS" else f"{value:.1f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def print_table(jobs, results, targets, rounds, marked):
    head = f"{'job':<19}{'unit':<7}" + "".join(f"{t:>11}" for t in targets)
    head += f"{'imgfs/qsd':>11}{'imgfs/plain':>13}"
    if DEVFUSE in targets:
        head += f"{'dev/qsd':>9}"
    print(head)
    print("-" * len(head))
    for label, _, _, _, unit in jobs:
        med = {}
        for t in targets:
            values = [v for v in results[label][t] if v is not None]
            med[t] = statistics.median(values) if values else None
        row = f"{label:<19}{unit:<7}"
        row += "".join(f"{fmt(med[t], unit):>11}" for t in targets)
        row += f"{ratio(med.get('imgfs'), med.get('qsd')):>11}"
        row += f"{ratio(med.get('imgfs'), med.get('plain')):>13}"
        if DEVFUSE in targets:
            row += f"{ratio(med.get(DEVFUSE), med.get('qsd')):>9}"
        print(row)
    if rounds > 1:
        print("\nevery round:")
        for label, _, _, _, unit in jobs:
            for t in targets:
                values = " ".join(
                    fmt(v, unit) + ("*" if (label, t, i) in marked else "")
                    for i, v in enumerate(results[label][t]))
                print(f"  {label:<19}{t:<10}{values}")


def main():
    parser = argparse.ArgumentParser(
        description="fio on the plain image, imgfs and qemu-storage-daemon")
    parser.add_argument("--runtime", type=int, default=10,
                        help="seconds per fio job (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the matrix (default 3)")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="image size in MiB (default 1024)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory on a disk file system "
                             "(default: a new one under /var/tmp)")
    parser.add_argument("--imgfs", type=Path, default=Path(
        os.environ.get("IMGFS_BIN", ROOT / "build" / "imgfs")))
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the jobs whose label contains TEXT, "
                             "e.g. QD1")
    parser.add_argument("--fuse-uring", choices=["on", "off", "both"],
                        default="on",
                        help="imgfs's transport ([imgfs] fuse-uring; on "
                             "switches the fuse module's enable_uring on); "
                             f"both: on as imgfs, off as {DEVFUSE} "
                             "(default on)")
    parser.add_argument("--max-steal", type=float, default=5, metavar="PCT",
                        help="run a job again while the host steals more "
                             "than PCT %% of the CPU time (default 5)")
    parser.add_argument("--retries", type=int, default=2,
                        help="at most this many runs more per job for "
                             "--max-steal (default 2)")
    args = parser.parse_args()
    targets = list(TARGETS)
    if args.fuse_uring == "both":
        targets.insert(2, DEVFUSE)
    jobs = [j for j in JOBS if args.only is None or args.only in j[0]]
    if not jobs:
        sys.exit(f"bench_raw: no job matches --only {args.only!r}")

    if os.geteuid() != 0:
        sys.exit("bench_raw: needs root to drop the page cache")
    for tool in ("fio", "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_raw: {tool} is not installed")

    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="imgfs-bench.",
                                 dir=args.dir or "/var/tmp"))
    daemons, unavailable, paths = [], {}, {"plain": None}
    try:
        log(f"bench_raw: preparing {len(targets)} images of "
            f"{args.size_mib} MiB in {work}")
        images = {t: work / f"{t}.img" for t in targets}
        for image in images.values():
            make_image(image, size)
        paths["plain"] = images["plain"]

        transports = {"imgfs": "off" if args.fuse_uring == "off" else "on"}
        if DEVFUSE in targets:
            transports[DEVFUSE] = "off"
        for name, fuse_uring in transports.items():
            if not os.access(args.imgfs, os.X_OK):
                unavailable[name] = f"{args.imgfs} not found (set IMGFS_BIN)"
                continue
            try:
                d = start_imgfs(args.imgfs, images[name], work, name,
                                fuse_uring)
                daemons.append(d)
                paths[name] = d.target
            except RuntimeError as e:
                unavailable[name] = str(e)
        if shutil.which("qemu-storage-daemon") is None:
            unavailable["qsd"] = "qemu-storage-daemon is not installed"
        else:
            try:
                d = start_qsd(images["qsd"], work)
                daemons.append(d)
                paths["qsd"] = d.target
            except RuntimeError as e:
                unavailable["qsd"] = str(e)

        running = [t for t in targets if t in paths]
        results = {label: {t: [] for t in targets} for label, *_ in jobs}
        steal = []  # % of CPU time the host took, per kept job
        rerun = 0  # jobs run again for steal
        marked = set()  # (label, target, round) kept with steal anyway
        total = len(jobs) * len(running) * args.rounds * args.runtime
        log(f"bench_raw: {len(jobs)} jobs x {len(running)} targets x "
            f"{args.rounds} rounds x {args.runtime} s = about "
            f"{total / 60:.1f} min")
        for rnd in range(args.rounds):
            order = running[rnd % len(running):] + running[:rnd % len(running)]
            for label, rw, bs, iodepth, unit in jobs:
                for t in order:
                    value, stolen, tries = run_job(
                        paths[t], size, args.runtime, rw, bs, iodepth, unit,
                        f"round {rnd + 1} {label:<19}{t:<10}",
                        args.max_steal, args.retries)
                    steal.append(stolen)
                    rerun += tries - 1
                    results[label][t].append(value)
                    if stolen > args.max_steal:
                        marked.add((label, t, rnd))
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nraw image {args.size_mib} MiB, fully allocated; fio libaio "
          f"direct=1, time based {args.runtime} s per job; page cache "
          f"dropped before each job; median of {args.rounds} round(s)")
    print("plain: the image file itself")
    transport = ("/dev/fuse" if args.fuse_uring == "off"
                 else "FUSE over io_uring")
    print("imgfs: cache = none (imgfs opens the image with O_DIRECT), "
          f"{transport}, {args.imgfs}")
    if DEVFUSE in targets:
        print(f"{DEVFUSE}: the same with fuse-uring = off (/dev/fuse)")
    print("qsd:   qemu-storage-daemon file node cache.direct=on,aio=native, "
          "raw node, FUSE export")
    for t, why in unavailable.items():
        print(f"{t}: n/a: {why}")
    if steal and max(steal) > 0:
        # on a shared virtual machine, figures from jobs whose CPUs were
        # taken by the host are not comparable with the others
        print(f"host steal (CPU time the host took from this VM) per job: "
              f"median {statistics.median(steal):.0f}%, "
              f"max {max(steal):.0f}%; {rerun} job(s) run again for steal "
              f"above {args.max_steal:g}%"
              + (f", {len(marked)} kept above it (* below)" if marked
                 else ""))
    print()
    print_table(jobs, results, targets, args.rounds, marked)


if __name__ == "__main__":
    main()
