#!/usr/bin/python3
"""Benchmark: an RBD image through imgfs, beside rbd-fuse and `rbd bench`,
all against one throwaway Ceph cluster.  A benchmark, not a test: it prints
figures and asserts nothing about time.

    sudo /usr/bin/python3 tests/bench/bench_rbd.py [--runtime S] [--rounds N]

The cluster is tests/ceph/micro_ceph.py's (one ceph-mon, one ceph-osd on
memstore, 127.0.0.1): its figures measure the clients, not disks.  Each
target gets its own image of the same size, fully written first:

    imgfs     `imgfs mount -f`, file = rbd:rbd/img-imgfs, format = raw,
              cache = none: librbd's cache off (rbd_cache = false)
    rbd-fuse  Debian's rbd-fuse -f -r img-fuse, with a ceph.conf that also
              turns rbd_cache off (the matching configuration)
    rbd-bench `rbd bench` on img-bench: librbd's own asynchronous loop with
              no file system in between, the ceiling for any client

fio runs libaio with O_DIRECT on the exposed files (time based); rbd bench
runs a fixed amount of I/O with as many requests in flight as fio's
iodepth.  The page cache is dropped before every job, the targets take
turns within each round, and the table quotes the median of the rounds and
the ratios imgfs/rbd-fuse and imgfs/rbd-bench.  These machines are shared
and have two cores, which the OSD, the client and fio share: compare within
one run only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "ceph"))
import micro_ceph  # noqa: E402

MiB = 1024 * 1024

# (label, fio rw, block size, iodepth, unit, rbd bench --io-type/pattern,
#  rbd bench --io-total)
JOBS = [
    ("4k randwrite QD32", "randwrite", "4k", 32, "IOPS", ("write", "rand"),
     "256M"),
    ("4k randread QD32", "randread", "4k", 32, "IOPS", ("read", "rand"),
     "256M"),
    ("4M write QD16", "write", "4M", 16, "MiB/s", ("write", "seq"), "4G"),
    ("4M read QD16", "read", "4M", 16, "MiB/s", ("read", "seq"), "4G"),
]
TARGETS = ["imgfs", "rbd-fuse", "rbd-bench"]
IMAGES = {"imgfs": "img-imgfs", "rbd-fuse": "img-fuse",
          "rbd-bench": "img-bench"}


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


def fio(filename, size, runtime, rw, bs, iodepth):
    cmd = ["fio", "--name=bench", f"--filename={filename}",
           "--ioengine=libaio", "--direct=1", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={iodepth}", f"--size={size}", "--time_based=1",
           f"--runtime={runtime}", "--norandommap=1", "--randrepeat=0",
           "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio: {proc.stderr.strip()}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    return job["read"] if "read" in rw else job["write"]


def fio_figure(side, unit):
    return side["iops"] if unit == "IOPS" else side["bw_bytes"] / MiB


def rbd_bench(cluster, image, io_type, pattern, bs, iodepth, total):
    """`rbd bench`; returns (ops/s, bytes/s) from its summary line."""
    out = cluster.rbd("bench", "--io-type", io_type, "--io-pattern", pattern,
                      "--io-size", bs.upper(), "--io-threads", str(iodepth),
                      "--io-total", total, "rbd/" + image,
                      timeout=600).decode()
    m = re.search(r"elapsed:\s*\S+\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)",
                  out)
    if not m:
        raise RuntimeError("rbd bench: no summary in " + out[-300:])
    ops_per_s = float(m.group(2))
    return ops_per_s, ops_per_s * parse_size(bs)


def parse_size(text):
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    text = text.lower().rstrip("b")
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


class Daemon:
    """A FUSE daemon in the foreground; stop() takes it down."""

    def __init__(self, name, cmd, target, mountpoint, logfile):
        self.name = name
        self.target = target
        self.mountpoint = mountpoint
        with open(logfile, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while not is_mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = Path(logfile).read_text(errors="replace").strip()
                raise RuntimeError(f"{name} did not mount: {text[-500:]}")
            time.sleep(0.05)
        os.stat(target)

    def stop(self):
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                           capture_output=True)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                           capture_output=True)


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
        description="imgfs vs rbd-fuse vs rbd bench on one Ceph cluster")
    parser.add_argument("--runtime", type=int, default=10,
                        help="seconds per fio job (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the matrix (default 3)")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="size of each image in MiB (default 1024)")
    parser.add_argument("--imgfs", type=Path, default=Path(
        os.environ.get("IMGFS_BIN", ROOT / "build" / "imgfs")))
    args = parser.parse_args()

    if os.geteuid() != 0:
        sys.exit("bench_rbd: needs root to drop the page cache")
    missing = micro_ceph.missing_tools() + [
        t for t in ("fio", "fusermount3", "rbd-fuse")
        if shutil.which(t) is None]
    if missing:
        sys.exit("bench_rbd: missing " + ", ".join(missing))

    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="imgfs-bench-rbd."))
    cluster = micro_ceph.MicroCeph(
        directory=str(work / "ceph"), osd_bytes=len(IMAGES) * size + 2048 * MiB,
        extra_conf="rbd default features = layering\n")
    daemons, paths, unavailable = [], {}, {}
    results = {label: {t: [] for t in TARGETS} for label, *_ in JOBS}
    try:
        log(f"bench_rbd: starting a Ceph cluster in {cluster.dir}")
        os.makedirs(cluster.dir)
        cluster.start()
        images = IMAGES
        for t, image in images.items():
            cluster.rbd("create", "--size", f"{args.size_mib}M",
                        "--image-feature", "layering", "rbd/" + image)
            # Fully written, so reads fetch data, not holes.
            rbd_bench(cluster, image, "write", "seq", "4M", 16,
                      f"{args.size_mib}M")
        log(f"bench_rbd: {len(images)} images of {args.size_mib} MiB "
            "written")

        mnt = work / "imgfs-mnt"
        mnt.mkdir()
        config = work / "imgfs.ini"
        config.write_text(f"[disk0]\nfile = {cluster.uri('rbd/img-imgfs')}\n"
                          "format = raw\ncache = none\n")
        try:
            d = Daemon("imgfs", [str(args.imgfs), "mount", "-f", str(config),
                                 str(mnt)], mnt / "disk0", mnt,
                       work / "imgfs.log")
            daemons.append(d)
            paths["imgfs"] = d.target
        except (RuntimeError, OSError) as e:
            unavailable["imgfs"] = str(e)

        fuse_conf = work / "rbd-fuse.conf"
        fuse_conf.write_text(Path(cluster.conf).read_text() +
                             "rbd cache = false\n")
        fmnt = work / "rbd-fuse-mnt"
        fmnt.mkdir()
        try:
            d = Daemon("rbd-fuse", ["rbd-fuse", "-f", "-c", str(fuse_conf),
                                    "-p", "rbd", "-r", "img-fuse",
                                    str(fmnt)], fmnt / "img-fuse", fmnt,
                       work / "rbd-fuse.log")
            daemons.append(d)
            paths["rbd-fuse"] = d.target
        except (RuntimeError, OSError) as e:
            unavailable["rbd-fuse"] = str(e)
        running = [t for t in TARGETS if t in paths or t == "rbd-bench"]

        for rnd in range(args.rounds):
            order = running[rnd % len(running):] + running[:rnd % len(running)]
            for label, rw, bs, iodepth, unit, (io_type, pat), total in JOBS:
                for t in order:
                    drop_caches()
                    try:
                        if t == "rbd-bench":
                            ops, bps = rbd_bench(cluster, images[t], io_type,
                                                 pat, bs, iodepth, total)
                            value = ops if unit == "IOPS" else bps / MiB
                        else:
                            side = fio(paths[t], size, args.runtime, rw, bs,
                                       iodepth)
                            value = fio_figure(side, unit)
                    except (RuntimeError, subprocess.TimeoutExpired,
                            micro_ceph.CephError) as e:
                        log(f"  {t}: {label}: {e}")
                        value = None
                    results[label][t].append(value)
                    log(f"  round {rnd + 1} {label:<19}{t:<10} "
                        f"{fmt(value, unit)} {unit}")
    finally:
        for d in daemons:
            d.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nCeph {micro_ceph_version()} single-node cluster (memstore, "
          f"127.0.0.1); images of {args.size_mib} MiB, fully written; "
          f"median of {args.rounds} round(s)")
    print(f"fio libaio direct=1 on the exposed file, time based "
          f"{args.runtime} s per job; page cache dropped before each job")
    print("imgfs:     cache = none (librbd cache off; imgfs has no O_DIRECT "
          f"to use on RBD), {args.imgfs}")
    print("rbd-fuse:  rbd-fuse -f, ceph.conf with rbd cache = false")
    print("rbd-bench: rbd bench, --io-threads = fio's iodepth, "
          "--io-total as listed")
    for t, why in unavailable.items():
        print(f"{t}: n/a: {why}")
    print()
    head = f"{'job':<19}{'unit':<7}" + "".join(f"{t:>11}" for t in TARGETS)
    head += f"{'imgfs/rbd-fuse':>16}{'imgfs/rbd-bench':>17}"
    print(head)
    print("-" * len(head))
    for label, *_, unit, _, _ in JOBS:
        med = {t: median(results[label][t]) for t in TARGETS}
        row = f"{label:<19}{unit:<7}"
        row += "".join(f"{fmt(med[t], unit):>11}" for t in TARGETS)
        row += f"{ratio(med['imgfs'], med['rbd-fuse']):>16}"
        row += f"{ratio(med['imgfs'], med['rbd-bench']):>17}"
        print(row)
    if args.rounds > 1:
        print("\nevery round:")
        for label, *_, unit, _, _ in JOBS:
            for t in TARGETS:
                values = " ".join(fmt(v, unit) for v in results[label][t])
                print(f"  {label:<19}{t:<10}{values}")


def micro_ceph_version():
    out = subprocess.run(["ceph-osd", "--version"], capture_output=True,
                         text=True).stdout.split()
    return out[2] if len(out) > 2 else "?"


if __name__ == "__main__":
    main()
