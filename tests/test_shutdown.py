"""How the daemon ends: by fusermount3 -u, SIGTERM or SIGINT.

Whatever ends it, every write that returned to its caller is in the image,
the daemon exits 0 promptly, and it does not spin on the dead connection.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    KiB,
    assert_same_bytes,
    MiB,
    create_image,
    daemon_env,
    is_mounted,
    read_at,
    run,
    sha256,
    stop_process,
    unmount,
    write_config,
)

SIZE = 64 * MiB


def raw_drive(image, **keys):
    return {"disk0": {"file": image, "format": "raw", **keys}}


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_unmount_keeps_every_write(imgfs, tmp_path, cache):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs(raw_drive(image, cache=cache))
    expected = bytearray(SIZE)
    fd = os.open(mount.drive(), os.O_WRONLY)
    try:
        for i in range(200):  # scattered, unaligned, never fsync'ed
            offset = (i * 331 * KiB + i * 7) % (SIZE - 64 * KiB)
            data = os.urandom(1 + i * 97 % (64 * KiB))
            assert os.pwrite(fd, data, offset) == len(data)
            expected[offset:offset + len(data)] = data
    finally:
        os.close(fd)
    assert mount.unmount() == 0
    assert not is_mounted(mount.path)
    assert_same_bytes(image.read_bytes(), expected, "image after unmount")


def test_unmount_ends_daemon_promptly(imgfs, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs(raw_drive(image))
    assert sha256(mount.drive()) == sha256(image)
    cpu_before = mount.cpu_seconds()
    start = time.monotonic()
    rc = mount.unmount(timeout=10, must_exit=False)
    if rc is None:
        busy = mount.cpu_seconds()
        time.sleep(1)
        busy = mount.cpu_seconds() - busy
        pytest.fail(f"imgfs still runs 10 s after fusermount3 -u, "
                    f"using {busy:.0%} of a CPU")
    assert rc == 0
    assert time.monotonic() - start < 5, "imgfs took long to exit"
    cpu_after = mount.rusage.ru_utime + mount.rusage.ru_stime
    assert cpu_after - cpu_before < 1.0, "imgfs burned CPU on its way out"


BLOCK = 64 * KiB

# Writes numbered 64 KiB blocks with O_DIRECT; prints a block's number to
# the record file only after its pwrite() returned.  Stops at the first
# error, which is expected once the daemon is gone.
WRITER = r"""
import mmap, os, sys
path, record, first, step, count = sys.argv[1:]
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 65536)
with open(record, "w", buffering=1) as log:
    for n in range(int(first), int(count), int(step)):
        buf[:] = b"imgfs%011d" % n * 4096
        os.pwrite(fd, buf, n * 65536)
        log.write(f"{n}\n")
"""


def block_data(n):
    return b"imgfs%011d" % n * (BLOCK // 16)


def recorded(records):
    blocks = []
    for record in records:
        lines = record.read_text().splitlines() if record.exists() else []
        blocks += [int(line) for line in lines]
    return blocks


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_with_writes_in_flight(imgfs, tmp_path, sig):
    size = 1024 * MiB  # sparse; more blocks than the writers reach
    image = create_image(tmp_path / "disk0.img", size)
    mount = imgfs(raw_drive(image))
    nwriters = 2
    records = [tmp_path / f"written{i}" for i in range(nwriters)]
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(mount.drive()),
                          str(record), str(i), str(nwriters),
                          str(size // BLOCK)],
                         stderr=subprocess.DEVNULL)
        for i, record in enumerate(records)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(recorded(records)) < 200:
            assert time.monotonic() < deadline, "writers make no progress"
            assert all(w.poll() is None for w in writers), "a writer ended"
            time.sleep(0.01)
        rc = mount.kill(sig)
        assert rc == 0, f"imgfs exit code after {sig.name}: {rc}"
        assert not is_mounted(mount.path), "imgfs left its mount behind"
        for writer in writers:
            writer.wait(10)
    finally:
        for writer in writers:
            stop_process(writer, signal.SIGKILL)

    blocks = recorded(records)
    print(f"{len(blocks)} blocks written before imgfs ended")
    assert len(blocks) >= 200
    assert len(blocks) < size // BLOCK, "writes did not overlap the signal"
    with open(image, "rb") as f:
        for n in blocks:
            f.seek(n * BLOCK)
            assert_same_bytes(f.read(BLOCK), block_data(n), f"block {n}")


def find_daemon(config):
    """PID of the imgfs process started with CONFIG, or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(config) in argv and argv[0].endswith(b"imgfs"):
            return int(entry)
    return None


def running(pid):
    """True while PID exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_daemonized_mount(imgfs_bin, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    config = write_config(tmp_path / "imgfs.ini", raw_drive(image))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = os.urandom(MiB)
    pid = None
    try:
        try:
            proc = subprocess.run(
                [str(imgfs_bin), "mount", str(config), str(mnt)],
                capture_output=True, text=True, timeout=30,
                stdin=subprocess.DEVNULL, env=daemon_env(),
            )
        except subprocess.TimeoutExpired:
            pytest.fail("imgfs mount did not return: does the daemon keep "
                        "the caller's stdout/stderr open?")
        assert proc.returncode == 0, proc.stderr
        # a mount that works is silent (progress goes to syslog); lines
        # of AddressSanitizer's own (==PID==WARNING...) aside
        said = [line for line in proc.stderr.splitlines()
                if not line.startswith("==")]
        assert said == []
        # the parent returns only once the mount is ready
        assert is_mounted(mnt)
        pid = find_daemon(config)
        assert pid is not None, "no imgfs daemon process found"
        assert os.listdir(mnt) == ["disk0"]
        fd = os.open(mnt / "disk0", os.O_WRONLY)
        try:
            os.pwrite(fd, data, 3 * MiB)
        finally:
            os.close(fd)
        run("fusermount3", "-u", mnt)
        assert wait_gone(pid, 10), "daemon still running after unmount"
    finally:
        if is_mounted(mnt):
            unmount(mnt, lazy=True)
        if pid is not None and not wait_gone(pid, 5):
            os.kill(pid, signal.SIGKILL)
    assert read_at(image, 3 * MiB, MiB) == data
