#!/usr/bin/python3
"""Benchmark: 4k random reads at iodepth 32 on a fully allocated
monolithicSparse VMDK, through imgfs, vmdkmount (libvmdk-utils) and
qemu-storage-daemon's FUSE export, side by side in one run.  A benchmark,
not a test: it prints figures and asserts nothing about time.

    sudo /usr/bin/python3 tests/bench/bench_vmdk.py [--size-mib N]
        [--runtime S] [--rounds N] [--iothreads N]

Targets (all read the same image file, one at a time):

    imgfs      `imgfs mount -f`, cache = none: the image is opened with
               O_DIRECT; read-only = on
    imgfs-wb   the same with cache = writeback: the image is read through
               the host page cache, as vmdkmount reads it
    vmdkmount  `vmdkmount IMAGE DIR`, file DIR/vmdk1 (read only; libvmdk
               reads through the page cache, which is dropped before
               every job)
    qsd        qemu-storage-daemon: file node cache.direct=on,aio=native,
               vmdk node, FUSE export (its best configuration)

fio: libaio, O_DIRECT on the exposed file, 4k randread, iodepth 32, time
based.  The page cache is dropped before every job (needs root), targets
alternate within each round, and the table gives the median of the
rounds, every round's figure and the ratios.  These 2-core machines are
shared: compare within one run only.

The image is 4 GiB by default: a peer that reads the image through the
host page cache (vmdkmount) pulls a small image entirely into memory
within a few seconds of a run and then measures memory, not the image
(with --size-mib 512 vmdkmount reaches ~30k IOPS here; with 4096 it
stays cold, ~4k, as a real multi-GiB disk would).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMGFS = os.environ.get("IMGFS_BIN") or str(ROOT / "build" / "imgfs")
TARGETS = ["imgfs", "imgfs-wb", "vmdkmount", "qsd"]


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


def wait_for(pred, proc, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


def fio(filename, size, runtime):
    cmd = ["fio", "--name=bench", f"--filename={filename}",
           "--ioengine=libaio", "--direct=1", "--rw=randread", "--bs=4k",
           "--iodepth=32", f"--size={size}", "--time_based=1",
           f"--runtime={runtime}", "--norandommap=1", "--randrepeat=0",
           "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio: {proc.stderr.strip()}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return report["jobs"][0]["read"]["iops"]


class Target:
    def __init__(self, name, work, image, iothreads):
        self.name = name
        self.work = work
        self.image = image
        self.iothreads = iothreads
        self.proc = None
        self.mnt = work / f"mnt-{name}"

    def start(self):
        if self.name.startswith("imgfs"):
            cache = "none" if self.name == "imgfs" else "writeback"
            self.mnt.mkdir(exist_ok=True)
            cfg = self.work / "imgfs.ini"
            cfg.write_text(f"[imgfs]\niothreads = {self.iothreads}\n"
                           f"[vmdk]\nfile = {self.image}\nformat = vmdk\n"
                           f"cache = {cache}\nread-only = on\n")
            self.proc = subprocess.Popen([IMGFS, "mount", "-f", str(cfg),
                                          str(self.mnt)],
                                         stderr=subprocess.DEVNULL)
            self.file = self.mnt / "vmdk"
            wait_for(lambda: is_mounted(self.mnt) and self.file.exists(),
                     self.proc, "imgfs")
        elif self.name == "vmdkmount":
            self.mnt.mkdir(exist_ok=True)
            self.proc = subprocess.Popen(["vmdkmount", "-v", str(self.image),
                                          str(self.mnt)],
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self.file = self.mnt / "vmdk1"
            wait_for(lambda: is_mounted(self.mnt) and self.file.exists(),
                     self.proc, "vmdkmount")
        else:
            self.file = self.work / "qsd-export"
            self.file.touch()
            self.proc = subprocess.Popen([
                "qemu-storage-daemon", "--blockdev",
                f"driver=file,node-name=f0,filename={self.image},"
                "cache.direct=on,aio=native,read-only=on",
                "--blockdev", "driver=vmdk,node-name=v0,file=f0,read-only=on",
                "--export", f"type=fuse,id=e0,node-name=v0,"
                f"mountpoint={self.file},writable=off"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: is_mounted(self.file), self.proc, "qsd")

    def stop(self):
        where = self.file if self.name == "qsd" else self.mnt
        subprocess.run(["fusermount3", "-u", "-z", str(where)],
                       capture_output=True)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=4096)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iothreads", type=int, default=1)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (drop_caches, FUSE mounts)")

    with tempfile.TemporaryDirectory(prefix="bench-vmdk-",
                                     dir=args.dir) as td:
        work = Path(td)
        image = work / "full.vmdk"
        size = args.size_mib * 1024 * 1024
        log(f"creating a fully allocated {args.size_mib} MiB "
            "monolithicSparse image")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                        "subformat=monolithicSparse", str(image), str(size)],
                       check=True)
        chunk = 256 * 1024 * 1024
        cmds = []
        for off in range(0, size, chunk):
            cmds += ["-c", f"write -P 0x5a {off} {min(chunk, size - off)}"]
        subprocess.run(["qemu-io", "-f", "vmdk"] + cmds + [str(image)],
                       check=True, stdout=subprocess.DEVNULL)
        results = {t: [] for t in TARGETS}
        for rnd in range(args.rounds):
            for name in TARGETS:
                t = Target(name, work, image, args.iothreads)
                t.start()
                try:
                    drop_caches()
                    iops = fio(t.file, size, args.runtime)
                finally:
                    t.stop()
                results[name].append(iops)
                log(f"round {rnd + 1} {name}: {iops:.0f} IOPS")

    med = {t: statistics.median(v) for t, v in results.items()}
    print()
    print(f"4k randread QD32, O_DIRECT on the exposed file, "
          f"{args.size_mib} MiB fully allocated monolithicSparse, "
          f"{args.rounds} rounds x {args.runtime}s; imgfs opened the image "
          f"with O_DIRECT (cache = none, iothreads = {args.iothreads}); "
          "qsd cache.direct=on,aio=native")
    print(f"{'target':<10} {'median IOPS':>12}   rounds")
    for t in TARGETS:
        rounds = " ".join(f"{v:.0f}" for v in results[t])
        print(f"{t:<10} {med[t]:>12.0f}   {rounds}")
    for mine, peer, goal in (("imgfs", "vmdkmount", 3.0),
                             ("imgfs-wb", "vmdkmount", 3.0),
                             ("imgfs", "qsd", 1.5)):
        ratio = med[mine] / med[peer] if med[peer] else float("inf")
        print(f"{mine} / {peer}: {ratio:.2f}x (target >= {goal}x)")


if __name__ == "__main__":
    main()
