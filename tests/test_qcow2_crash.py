"""Crash safety: imgfs is killed with SIGKILL at random moments while
writer threads do random writes, hole punches and fsyncs on a qcow2
drive, many times over on the same image (64 KiB, 4 KiB and, with
O_DIRECT, 512-byte clusters).  After every kill

  - `qemu-img check` finds no corruption (leaked clusters are allowed:
    a crash may leave some), and
  - every block whose fsync had returned reads back (as what was written
    then, or as something written after it), from qemu-img's raw
    conversion of the image.

Each block written carries its index and a generation number, and the
rest of its bytes follow from those, so any block read back tells which
write it came from.
"""

import hashlib
import os
import random
import struct
import threading
import time

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MiB,
    fallocate,
)
from qcow2util import check, create_qcow2, killable_mount, sigkill, to_raw

SIZE = 64 * MiB
BLOCK = 4096
SECTOR = 512
THREADS = 4
ROUNDS = 20
ZERO = b"\0" * BLOCK


def block_bytes(index, gen):
    head = struct.pack("<QQ", index, gen)
    body = hashlib.sha256(head).digest() * (BLOCK // 32)
    return head + body[:BLOCK - len(head)]


class Writer(threading.Thread):
    """Writes and punches blocks [first, first + count) of the drive;
    records every operation, and which of them an fsync acknowledged."""

    def __init__(self, drive, first, count, seed, history):
        super().__init__(daemon=True)
        self.drive = drive
        self.first = first
        self.count = count
        self.rng = random.Random(seed)
        self.history = history  # block -> [(gen, data or None=zero)]
        self.acked = {}         # block -> index into history[block]
        self.pending = {}

    def op(self, fd):
        n = self.rng.choice([1, 1, 2, 4, 16, 33])
        start = self.first + self.rng.randrange(self.count - n + 1)
        punch = self.rng.random() < 0.12
        for b in range(start, start + n):
            gen = len(self.history.setdefault(b, [])) + 1
            self.history[b].append((gen, None if punch else
                                    block_bytes(b, gen)))
            self.pending[b] = len(self.history[b]) - 1
        if punch:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      start * BLOCK, n * BLOCK)
        else:
            data = b"".join(self.history[b][-1][1]
                            for b in range(start, start + n))
            os.pwrite(fd, data, start * BLOCK)

    def run(self):
        try:
            fd = os.open(self.drive, os.O_RDWR)
        except OSError:
            return
        try:
            while True:
                for _ in range(self.rng.randint(1, 12)):
                    self.op(fd)
                os.fsync(fd)
                self.acked.update(self.pending)
                self.pending = {}
        except OSError:
            pass  # the daemon is gone
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def verify(raw, history, acked):
    """Every sector of an acknowledged block holds what the acknowledged
    operation put there, or what a later one did.  (Sectors, not blocks:
    an operation the crash interrupted may have reached only some of a
    block's sectors -- with 512-byte clusters a block spans eight -- as
    on any disk.)"""
    with open(raw, "rb") as f:
        data = f.read()
    bad = []
    for b, ops in history.items():
        got = data[b * BLOCK:(b + 1) * BLOCK]
        low = acked.get(b, -1)
        allowed = [ZERO if d is None else d for _, d in ops[max(low, 0):]]
        if low < 0:
            allowed.append(ZERO)
        if got in allowed:
            continue
        for sec in range(0, BLOCK, SECTOR):
            if not any(got[sec:sec + SECTOR] == a[sec:sec + SECTOR]
                       for a in allowed):
                bad.append(b)
                break
    assert not bad, (f"{len(bad)} acknowledged blocks lost, e.g. block "
                     f"{bad[0]} (acked op {acked.get(bad[0])} of "
                     f"{len(history[bad[0]])})")


@pytest.mark.slow
@pytest.mark.parametrize("opts,cache", [
    ("cluster_size=65536", "writeback"),
    ("cluster_size=4096,refcount_bits=1", "writeback"),
    ("cluster_size=512,extended_l2=off", "none"),
])
def test_sigkill_during_writes(imgfs_bin, tmp_path, opts, cache):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, opts)
    rng = random.Random(opts)
    history = {}
    acked = {}
    blocks = SIZE // BLOCK
    per = blocks // THREADS
    for rnd in range(ROUNDS):
        drives = {"disk0": {"file": image, "format": "qcow2",
                            "cache": cache}}
        with killable_mount(imgfs_bin, tmp_path, drives,
                            name=f"round{rnd}") as mount:
            writers = [Writer(mount.drive(), t * per, per,
                              rng.random(), history)
                       for t in range(THREADS)]
            for w in writers:
                w.start()
            time.sleep(rng.uniform(0.05, 0.8))
            sigkill(mount)
            for w in writers:
                w.join(30)
                assert not w.is_alive(), "writer stuck after the kill"
                acked.update(w.acked)
        check(image)  # no corruption; leaks allowed
        raw = to_raw(image, tmp_path / "after.raw")
        verify(raw, history, acked)
        raw.unlink()
    assert len(acked) > 100, "the workload acknowledged too little to test"
