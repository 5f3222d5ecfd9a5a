#!/usr/bin/python3
"""Benchmark: qcow2 images through imgfs, beside qemu-storage-daemon's
FUSE export of the same images, and beside imgfs serving the same data
as a raw image.  A benchmark, not a test: it prints figures and asserts
nothing about time.

    sudo /usr/bin/python3 tests/bench/bench_qcow2.py [--runtime S]
                                                     [--rounds N]

Targets (each its own copy of the image, so writes never interfere):

    imgfs      `imgfs mount -f`, format = qcow2, cache = none (the image
               is opened with O_DIRECT)
    qsd        qemu-storage-daemon: file node cache.direct=on,aio=native,
               qcow2 node, FUSE export on a regular file (its best setup)
    imgfs-raw  imgfs on the same data as a raw image, cache = none (the
               read jobs only: what qcow2's mapping costs)

Jobs (fio libaio, O_DIRECT on the exposed file, page cache dropped before
every job, targets taking turns, medians of the rounds):

    alloc 4k randwrite QD32  a fresh 64 GiB qcow2 for every run; random 4k
                             writes (256 MiB of them, so nearly every one
                             allocates a cluster)
    4k randread QD32         a fully allocated 1 GiB qcow2 (time based)
    4k randwrite QD32        the same, overwriting allocated clusters
    1M read QD4, 1M write QD4

then the time from starting `imgfs mount` (daemonizing: it returns once
the mount answers) to a ready mount of a fresh 1 TiB qcow2, beside the
time qemu-storage-daemon takes until its export is mounted; and imgfs's
memory (VmHWM) after random allocating writes over a whole fresh 1 TiB
image -- 2048 L2 tables, more than the cache holds -- with the default L2
cache (32 MiB) and with qcow2.l2-cache-size = 4M.
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
GiB = 1024 * MiB
TiB = 1024 * GiB

ALLOC_SIZE = 64 * GiB
ALLOC_IO = 256 * MiB
READ_SIZE = 1 * GiB

# (label, fio rw, block size, iodepth, unit, targets)
JOBS = [
    ("alloc 4k randwrite QD32", "randwrite", "4k", 32, "IOPS",
     ["imgfs", "qsd"]),
    ("4k randread QD32", "randread", "4k", 32, "IOPS",
     ["imgfs", "qsd", "imgfs-raw"]),
    ("4k randwrite QD32", "randwrite", "4k", 32, "IOPS",
     ["imgfs", "qsd", "imgfs-raw"]),
    ("1M read QD4", "read", "1M", 4, "MiB/s", ["imgfs", "qsd", "imgfs-raw"]),
    ("1M write QD4", "write", "1M", 4, "MiB/s", ["imgfs", "qsd", "imgfs-raw"]),
]
TARGETS = ["imgfs", "qsd", "imgfs-raw"]


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


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def fio(filename, size, rw, bs, iodepth, runtime=None, io_size=None):
    """Run one fio job; return its JSON report's first job."""
    cmd = ["fio", "--name=bench", f"--filename={filename}",
           "--ioengine=libaio", "--direct=1", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--norandommap=1",
           "--randrepeat=0", "--output-format=json"]
    if runtime:
        cmd += ["--time_based=1", f"--runtime={runtime}"]
    if io_size:
        cmd += [f"--io_size={io_size}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"fio: {proc.stderr.strip()}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return report["jobs"][0]


def figure(job, rw, unit):
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"] if unit == "IOPS" else side["bw_bytes"] / MiB


class Daemon:
    """A FUSE daemon serving one file; stop() takes it down."""

    def __init__(self, name, cmd, target, mountpoint, logfile):
        self.name = name
        self.target = target
        self.mountpoint = mountpoint
        with open(logfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not is_mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = Path(logfile).read_text(errors="replace").strip()
                raise RuntimeError(f"{name} did not mount: {text[:300]}")
            time.sleep(0.002)
        os.stat(target)

    def hwm_kib(self):
        """Peak resident memory (VmHWM) of the daemon, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True)


def imgfs_config(work, name, image, fmt, extra=""):
    config = work / f"{name}.ini"
    config.write_text(f"[disk0]\nfile = {image}\nformat = {fmt}\n"
                      f"cache = none\n{extra}")
    return config


def start_imgfs(binary, work, name, image, fmt, extra=""):
    mnt = work / f"{name}-mnt"
    mnt.mkdir(exist_ok=True)
    config = imgfs_config(work, name, image, fmt, extra)
    cmd = [str(binary), "mount", "-f", str(config), str(mnt)]
    return Daemon(name, cmd, mnt / "disk0", mnt, work / f"{name}.log")


def qsd_cmd(image, mnt):
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f0,filename={image},"
                          "cache.direct=on,aio=native",
            "--blockdev", "driver=qcow2,node-name=q0,file=f0",
            "--export", f"type=fuse,id=e0,node-name=q0,mountpoint={mnt},"
                        "writable=on"]


def start_qsd(work, name, image):
    mnt = work / f"{name}-export"
    mnt.touch()
    return Daemon(name, qsd_cmd(image, mnt), mnt, mnt, work / f"{name}.log")


def make_images(work):
    """The allocated 1 GiB image: random data, as raw and as qcow2 (two
    qcow2 copies, so imgfs's and qsd's writes stay apart)."""
    raw = work / "data.raw"
    sh("fio", "--name=prefill", f"--filename={raw}", "--rw=write",
       "--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=8",
       f"--size={READ_SIZE}", "--refill_buffers=1")
    images = {"imgfs-raw": raw}
    for t in ("imgfs", "qsd"):
        images[t] = work / f"{t}.qcow2"
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, images[t])
    return images


def fresh_qcow2(path, size):
    if path.exists():
        path.unlink()
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    return path


def run_alloc(args, work, t):
    """Allocating writes on a fresh image; the daemon serves it alone."""
    image = fresh_qcow2(work / f"alloc-{t}.qcow2", ALLOC_SIZE)
    if t == "imgfs":
        d = start_imgfs(args.imgfs, work, "alloc-imgfs", image, "qcow2")
    else:
        d = start_qsd(work, "alloc-qsd", image)
    try:
        drop_caches()
        job = fio(d.target, ALLOC_SIZE, "randwrite", "4k", 32,
                  io_size=ALLOC_IO)
        return figure(job, "randwrite", "IOPS")
    finally:
        d.stop()
        image.unlink()


def mount_time_imgfs(binary, work, image):
    """Seconds from starting `imgfs mount` (it returns once the mount is
    ready) until it returned and the drive answers."""
    mnt = work / "mt-mnt"
    mnt.mkdir(exist_ok=True)
    config = imgfs_config(work, "mt", image, "qcow2")
    drop_caches()
    t0 = time.monotonic()
    subprocess.run([str(binary), "mount", str(config), str(mnt)], check=True,
                   capture_output=True)
    os.stat(mnt / "disk0")
    elapsed = time.monotonic() - t0
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 10
    while is_mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the daemon closes the image after the unmount
    return elapsed


def mount_time_qsd(work, image):
    mnt = work / "mt-export"
    mnt.touch()
    drop_caches()
    t0 = time.monotonic()
    proc = subprocess.Popen(qsd_cmd(image, mnt), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not is_mounted(mnt):
        if proc.poll() is not None:
            return None
        time.sleep(0.0005)
    os.stat(mnt)
    elapsed = time.monotonic() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return elapsed


def memory_run(args, work, extra, fmt="qcow2"):
    """Allocating writes spread over a whole fresh 1 TiB image; imgfs's
    RSS after the mount and at its peak in MiB, and IOPS."""
    if fmt == "qcow2":
        image = fresh_qcow2(work / "mem.qcow2", TiB)
    else:
        image = work / "mem.raw"
        with open(image, "wb") as f:
            f.truncate(TiB)
    d = start_imgfs(args.imgfs, work, "mem", image, fmt, extra)
    try:
        base = d.hwm_kib()
        drop_caches()
        job = fio(d.target, TiB, "randwrite", "4k", 32, io_size=64 * MiB)
        return base / 1024, d.hwm_kib() / 1024, figure(job, "randwrite",
                                                       "IOPS")
    finally:
        d.stop()
        image.unlink()


def fmt(value, unit):
    if value is None:
        return "n/a"
    return f"{value:.0f}" if unit == "IOPS" else f"{value:.1f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(
        description="qcow2 through imgfs beside qemu-storage-daemon")
    parser.add_argument("--runtime", type=int, default=10,
                        help="seconds per time based fio job (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the matrix (default 3)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work directory on a disk file system "
                             "(default: a new one under /var/tmp)")
    parser.add_argument("--imgfs", type=Path, default=Path(
        os.environ.get("IMGFS_BIN", ROOT / "build" / "imgfs")))
    args = parser.parse_args()

    if os.geteuid() != 0:
        sys.exit("bench_qcow2: needs root to drop the page cache")
    for tool in ("fio", "fusermount3", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_qcow2: {tool} is not installed")
    if not os.access(args.imgfs, os.X_OK):
        sys.exit(f"bench_qcow2: {args.imgfs} not found (set IMGFS_BIN)")

    work = Path(tempfile.mkdtemp(prefix="imgfs-bench-qcow2.",
                                 dir=args.dir or "/var/tmp"))
    results = {label: {t: [] for t in TARGETS} for label, *_ in JOBS}
    mount_times = {"imgfs": [], "qsd": []}
    memory = []
    daemons = {}
    try:
        log(f"bench_qcow2: preparing images in {work}")
        images = make_images(work)
        for rnd in range(args.rounds):
            for label, rw, bs, iodepth, unit, targets in JOBS:
                shift = rnd % len(targets)
                order = targets[shift:] + targets[:shift]
                for t in order:
                    try:
                        if label.startswith("alloc"):
                            value = run_alloc(args, work, t)
                        else:
                            d = daemons.get(t)
                            if d is None:
                                if t == "qsd":
                                    d = start_qsd(work, t, images[t])
                                else:
                                    d = start_imgfs(
                                        args.imgfs, work, t, images[t],
                                        "raw" if t == "imgfs-raw"
                                        else "qcow2")
                                daemons[t] = d
                            drop_caches()
                            job = fio(d.target, READ_SIZE, rw, bs, iodepth,
                                      runtime=args.runtime)
                            value = figure(job, rw, unit)
                    except (RuntimeError, subprocess.SubprocessError) as e:
                        log(f"  {t}: {label}: {e}")
                        value = None
                    results[label][t].append(value)
                    log(f"  round {rnd + 1} {label:<25}{t:<10} "
                        f"{fmt(value, unit)} {unit}")
        rss_reads = {t: d.hwm_kib() / 1024 for t, d in daemons.items()
                     if t.startswith("imgfs")}
        for d in daemons.values():
            d.stop()
        daemons = {}

        log("bench_qcow2: mount times of a fresh 1 TiB qcow2")
        big = fresh_qcow2(work / "big.qcow2", TiB)
        for i in range(5 * args.rounds):
            mount_times["imgfs"].append(mount_time_imgfs(args.imgfs, work,
                                                         big))
            mount_times["qsd"].append(mount_time_qsd(work, big))
        log("bench_qcow2: memory with allocating writes over 1 TiB")
        for extra, what in (("", "qcow2, L2 cache default (32 MiB)"),
                            ("qcow2.l2-cache-size = 4M\n",
                             "qcow2, L2 cache 4 MiB"),
                            ("raw", "raw (no cache)")):
            if extra == "raw":
                memory.append((what,) + memory_run(args, work, "", "raw"))
            else:
                memory.append((what,) + memory_run(args, work, extra))
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nqcow2 (64 KiB clusters) through imgfs and qemu-storage-daemon "
          f"7.2; fio libaio direct=1; page cache dropped before each job; "
          f"median of {args.rounds} round(s)")
    print("imgfs:     format = qcow2, cache = none (image opened with "
          f"O_DIRECT), {args.imgfs}")
    print("qsd:       file node cache.direct=on,aio=native, qcow2 node, "
          "FUSE export")
    print("imgfs-raw: the same data as a raw image through imgfs, "
          "cache = none")
    print(f"alloc job: fresh {ALLOC_SIZE // GiB} GiB image per run, "
          f"{ALLOC_IO // MiB} MiB of random 4k writes; other jobs: a fully "
          f"allocated {READ_SIZE // GiB} GiB image, {args.runtime} s each\n")
    head = (f"{'job':<25}{'unit':<7}" + "".join(f"{t:>11}" for t in TARGETS)
            + f"{'imgfs/qsd':>11}{'qcow2/raw':>11}")
    print(head)
    print("-" * len(head))
    for label, _, _, _, unit, _ in JOBS:
        med = {t: median(results[label][t]) for t in TARGETS}
        row = f"{label:<25}{unit:<7}"
        row += "".join(f"{fmt(med[t], unit):>11}" for t in TARGETS)
        row += f"{ratio(med['imgfs'], med['qsd']):>11}"
        row += f"{ratio(med['imgfs'], med['imgfs-raw']):>11}"
        print(row)
    mi, mq = median(mount_times["imgfs"]), median(mount_times["qsd"])
    print(f"\nmount-to-ready, fresh 1 TiB qcow2 (median of "
          f"{len(mount_times['imgfs'])}): imgfs {mi * 1000:.1f} ms, "
          f"qsd {mq * 1000:.1f} ms" if mi and mq else "\nmount: n/a")
    if rss_reads:
        print("\nimgfs peak RSS after the jobs on the 1 GiB image: " +
              ", ".join(f"{t} {v:.1f} MiB" for t, v in rss_reads.items()) +
              " (qcow2 cache bounds: L2 128 KiB, refcount 256 KiB; the "
              "rest is mostly the FUSE layer's request buffers: 32 x 512 KiB "
              "per CPU, in huge pages)")
    raw_peak = memory[-1][2] if memory else None
    print("imgfs RSS, 64 MiB of random 4k writes over a fresh 1 TiB image "
          "(2048 L2 tables: more than any cache below holds):")
    for what, base, peak, iops in memory:
        extra = ""
        if raw_peak is not None and not what.startswith("raw"):
            extra = f", {peak - raw_peak:+.1f} MiB over raw"
        print(f"  {what:<34} {base:5.1f} MiB after mount, {peak:5.1f} MiB "
              f"peak{extra} ({iops:.0f} IOPS)")
    if args.rounds > 1:
        print("\nevery round:")
        for label, _, _, _, unit, targets in JOBS:
            for t in targets:
                values = " ".join(fmt(v, unit) for v in results[label][t])
                print(f"  {label:<25}{t:<10}{values}")


if __name__ == "__main__":
    main()
