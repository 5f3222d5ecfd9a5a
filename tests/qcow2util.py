"""Helpers shared by the qcow2 tests (test_qcow2_*.py): qemu-img wrappers,
an in-memory model of what a drive must contain, and a random workload
that writes, punches holes, zeroes and grows a mounted drive while
keeping the model in step.  The oracles stay outside the project:
qemu-img check, qemu-img compare and qemu-img convert.
"""

import contextlib
import json
import os
import random
import signal
import struct
import subprocess

from conftest import run as conftest_run
from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    SANITIZER_MARKS,
    KiB,
    MiB,
    Mount,
    assert_same_bytes,
    daemon_env,
    drop_caches,
    fallocate,
    is_mounted,
    require_tool,
    unmount,
    wait_until_answers,
    write_config,
)


def run(*args, check=True, timeout=120, cwd=None):
    """conftest.run, with a working directory."""
    if cwd is None:
        return conftest_run(*args, check=check, timeout=timeout)
    require_tool(args[0])
    proc = subprocess.run([str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(map(str, args))}: {proc.stdout}{proc.stderr}")
    return proc


def qemu_img(*args, check=True, cwd=None):
    """qemu-img ARGS, run in CWD: QEMU 7.2 resolves a relative data_file
    name against its working directory (imgfs against the image's)."""
    return run("qemu-img", *args, check=check, cwd=cwd)


def create_qcow2(path, size, opts=None, backing=None, backing_fmt=None):
    """qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] PATH SIZE."""
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", str(backing)]
        if backing_fmt:
            args += ["-F", backing_fmt]
    qemu_img(*args, str(path), str(size))
    return path


def qemu_io(path, *commands, fmt="qcow2"):
    args = []
    for c in commands:
        args += ["-c", c]
    return run("qemu-io", "-f", fmt, *args, str(path),
               cwd=os.path.dirname(os.path.abspath(path)))


def info(path):
    """qemu-img info --output=json, as a dict."""
    return json.loads(qemu_img("info", "-U", "--output=json",
                               str(path)).stdout)


def check(path):
    """qemu-img check: the JSON report; fail on errors or corruption."""
    proc = qemu_img("check", "--output=json", str(path), check=False,
                    cwd=os.path.dirname(os.path.abspath(path)))
    # 0: clean; 3: leaks only; anything else: errors or corruption
    assert proc.returncode in (0, 3), (
        f"qemu-img check {path} exited {proc.returncode}:\n"
        f"{proc.stdout}{proc.stderr}")
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def to_raw(path, out, fmt="qcow2"):
    """qemu-img convert -O raw: what QEMU says the image contains."""
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out),
             cwd=os.path.dirname(os.path.abspath(path)))
    return out


def compare(raw, image, fmt="qcow2"):
    """qemu-img compare: RAW (expected bytes) against IMAGE."""
    proc = qemu_img("compare", "-U", "-f", "raw", "-F", fmt, str(raw),
                    str(image), check=False,
                    cwd=os.path.dirname(os.path.abspath(image)))
    assert proc.returncode == 0, (
        f"qemu-img compare {raw} {image}: {proc.stdout}{proc.stderr}")


def header_fields(path):
    """The fixed qcow2 header fields we check in tests, read by hand."""
    with open(path, "rb") as f:
        hdr = f.read(104)
    (magic, version, backing_off, backing_size, cluster_bits, size,
     crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = struct.unpack(">IIQIIQIIQQIIQ", hdr[:72])
    fields = dict(magic=magic, version=version, cluster_bits=cluster_bits,
                  size=size, l1_size=l1_size, l1_offset=l1_off,
                  reftable_offset=rt_off, reftable_clusters=rt_clusters,
                  nb_snapshots=nb_snap)
    if version >= 3:
        incompat, compat, autoclear, order, hlen = struct.unpack(
            ">QQQII", hdr[72:104])
        fields.update(incompatible=incompat, compatible=compat,
                      autoclear=autoclear, refcount_order=order,
                      header_length=hlen)
    return fields


def patch(path, offset, data):
    """Overwrite bytes of an image file (to hand-make broken images)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class Model:
    """The bytes a drive must hold, kept in memory beside the drive."""

    def __init__(self, data):
        self.data = bytearray(data)

    @classmethod
    def from_image(cls, image, tmp_path, fmt="qcow2"):
        raw = to_raw(image, tmp_path / "initial.raw", fmt=fmt)
        model = cls(raw.read_bytes())
        raw.unlink()
        return model

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def zero(self, offset, length):
        end = min(offset + length, len(self.data))
        self.data[offset:end] = bytes(end - offset)

    def resize(self, size):
        if size > len(self.data):
            self.data += bytes(size - len(self.data))
        else:
            del self.data[size:]

    def save(self, path):
        path.write_bytes(self.data)
        return path


def random_workload(drive, model, seed, ops=60, max_len=300 * KiB,
                    grow=True, zero_ops=True):
    """Random writes (aligned and not, some spanning many clusters),
    hole punches and zero ranges on the mounted DRIVE, then a resize by
    truncate and writes past the old end; MODEL follows along."""
    rng = random.Random(seed)
    size = len(model.data)
    fd = os.open(drive, os.O_RDWR)
    try:
        for _ in range(ops):
            kind = rng.random()
            if kind < 0.15:
                length = rng.choice([4 * KiB, 64 * KiB, 2 * MiB + 4 * KiB])
            else:
                length = rng.randint(1, max_len)
            length = min(length, size)
            if rng.random() < 0.5:
                offset = rng.randrange(0, size - length + 1) // 4096 * 4096
            else:
                offset = rng.randrange(0, size - length + 1)
            if not zero_ops or kind < 0.75:
                data = rng.randbytes(length)
                assert os.pwrite(fd, data, offset) == length
                model.write(offset, data)
            elif kind < 0.88:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          offset, length)
                model.zero(offset, length)
            else:
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                          offset, length)
                model.zero(offset, length)
        if grow:
            new_size = size + 3 * MiB + 512
            os.ftruncate(fd, new_size)
            model.resize(new_size)
            for offset in (size - 1000, size + 65536 + 17, new_size - 4096):
                data = rng.randbytes(5000 if offset < new_size - 4096
                                     else 4096)
                assert os.pwrite(fd, data, offset) == len(data)
                model.write(offset, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_drive_matches(drive, model, what):
    """Read the whole mounted drive (page cache dropped) against MODEL."""
    drop_caches()
    with open(drive, "rb") as f:
        got = f.read()
    assert_same_bytes(got, bytes(model.data), what)


@contextlib.contextmanager
def killable_mount(imgfs_bin, tmp_path, drives, name="mnt"):
    """Like the imgfs fixture, for a daemon the test may SIGKILL: yields a
    conftest.Mount; afterwards the mount is taken down whatever happened,
    and a sanitizer report in the daemon's stderr fails the test."""
    config = write_config(tmp_path / f"{name}.ini", drives)
    mnt = tmp_path / name
    mnt.mkdir()
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(imgfs_bin), "mount", "-f", str(config), str(mnt)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            env=daemon_env(), start_new_session=True)
    mount = Mount(mnt, config, log, proc, drives)
    try:
        wait_until_answers(mount, list(drives))
        yield mount
    finally:
        if mount.returncode() is None:
            mount.proc.kill()
            mount.wait()
        if is_mounted(mnt):
            unmount(mnt, lazy=True)
        text = mount.stderr()
        assert not any(m in text for m in SANITIZER_MARKS), text[-20000:]


def sigkill(mount):
    """SIGKILL the daemon of MOUNT and clear its dead mount point."""
    mount.stopped_by_test = True
    os.kill(mount.pid, signal.SIGKILL)
    assert mount.wait() == -signal.SIGKILL
    unmount(mount.path, lazy=True)
