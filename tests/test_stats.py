"""Per-drive statistics in `imgfs status`: counts, bytes, latency,
failed and invalid requests, and the stats-intervals windows.

The requests are made with O_DIRECT, so each system call on the exposed
file is exactly one request of a known size, and the numbers a user reads
must be exactly those.
"""

import errno
import mmap
import os
import threading
import time

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    KiB,
    MiB,
    create_image,
    drive_status,
    fallocate,
    fill,
    imgfs_run,
)

SIZE = 16 * MiB


def aligned(n, byte=0):
    buf = mmap.mmap(-1, n)
    if byte:
        buf[:] = bytes([byte]) * n
    return buf


def histogram_total(kind):
    return sum(kind["histogram"].values())


def test_counts_bytes_and_latency(imgfs, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    fill(image, 0x3C, 0, SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}})
    fd = os.open(mount.drive(), os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(5):
            assert os.pwrite(fd, aligned(64 * KiB, 1 + i), i * MiB) == 64 * KiB
        os.fsync(fd)
        assert os.pwrite(fd, aligned(4 * KiB, 9), 8 * MiB) == 4 * KiB
        os.fsync(fd)
        for i in range(3):
            buf = aligned(128 * KiB)
            assert os.preadv(fd, [buf], 10 * MiB + i * MiB) == 128 * KiB
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 12 * MiB,
                  MiB)
    finally:
        os.close(fd)
    stats = drive_status(mount)["stats"]
    expected = {
        "write": (6, 5 * 64 * KiB + 4 * KiB),
        "read": (3, 3 * 128 * KiB),
        "flush": (2, 0),
        "discard": (1, MiB),
    }
    for kind, (ops, nbytes) in expected.items():
        s = stats[kind]
        assert (s["ops"], s["bytes"]) == (ops, nbytes), f"{kind}: {s}"
        assert s["failed"] == 0 and s["invalid"] == 0, f"{kind}: {s}"
        assert s["total-time-ns"] > 0, f"{kind}: {s}"
        assert histogram_total(s) == ops, f"{kind}: {s}"
    assert stats["idle-time-ns"] >= 0
    human = imgfs_run("status", mount.path).stdout
    assert "6 ops" in human and "3 ops" in human


def test_interval_windows(imgfs, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "stats-intervals": "1,600"}})
    stop = threading.Event()
    done = []

    def writer():
        fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
        buf = aligned(4 * KiB, 7)
        try:
            while not stop.is_set():
                os.pwrite(fd, buf, (len(done) % 256) * 4 * KiB)
                done.append(1)
                time.sleep(0.01)
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(2.5)
        busy = drive_status(mount)["stats"]["intervals"]
    finally:
        stop.set()
        thread.join(30)
    assert [w["interval-seconds"] for w in busy] == [1, 600]
    second, long_window = busy
    # the last complete second saw writes, at that many per second
    assert second["complete"] is True
    assert second["write"]["ops"] > 0
    assert second["write"]["ops-per-second"] == pytest.approx(
        second["write"]["ops"], rel=0.01)
    assert second["write"]["bytes"] == 4 * KiB * second["write"]["ops"]
    # the 10-minute window is still filling: every write so far
    assert long_window["complete"] is False
    assert 0 < long_window["write"]["ops"] <= len(done)
    assert long_window["write"]["ops-per-second"] > 0
    assert long_window["write"]["max-latency-ns"] >= \
        long_window["write"]["avg-latency-ns"] >= \
        long_window["write"]["min-latency-ns"] > 0

    # idle for more than two whole seconds: the last second saw nothing,
    # the long window still counts everything
    time.sleep(2.5)
    second, long_window = drive_status(mount)["stats"]["intervals"]
    assert second["write"]["ops"] == 0
    assert long_window["write"]["ops"] == len(done)
    assert drive_status(mount)["stats"]["write"]["ops"] == len(done)


@pytest.mark.parametrize("account", ["on", "off"])
def test_invalid_requests(imgfs, tmp_path, account):
    """A write past the end of the drive is an invalid request."""
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "stats-account-invalid": account}})
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, aligned(4 * KiB, 1), 0) == 4 * KiB
        with pytest.raises(OSError) as err:
            os.pwrite(fd, aligned(4 * KiB, 1), SIZE)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    stats = drive_status(mount)["stats"]
    assert stats["account-invalid"] is (account == "on")
    write = stats["write"]
    assert write["ops"] == 1
    assert write["invalid"] == 1, f"write past the end not counted: {write}"
    assert write["failed"] == 0
    assert histogram_total(write) == 1 + (account == "on")


@pytest.mark.parametrize("account", ["on", "off"])
def test_failed_requests(qsd, imgfs, tmp_path, account):
    """A write that fails with EIO (QEMU's blkdebug, through
    qemu-storage-daemon) is a failed request."""
    base = create_image(tmp_path / "base.img", SIZE)
    export = tmp_path / "export.img"
    qsd([f"driver=file,node-name=file0,filename={base}",
         "driver=blkdebug,node-name=dbg0,image=file0,"
         "inject-error.0.event=write_aio,inject-error.0.errno=5,"
         "inject-error.0.once=on,inject-error.0.sector=2048",
         "driver=raw,node-name=raw0,file=dbg0"], export=export)
    mount = imgfs({"disk0": {"file": export, "format": "raw",
                             "cache": "none",
                             "stats-account-failed": account}})
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, aligned(4 * KiB, 1), MiB)
        assert err.value.errno == errno.EIO
        assert os.pwrite(fd, aligned(4 * KiB, 1), MiB) == 4 * KiB
        assert os.pwrite(fd, aligned(4 * KiB, 1), 0) == 4 * KiB
    finally:
        os.close(fd)
    stats = drive_status(mount)["stats"]
    assert stats["account-failed"] is (account == "on")
    write = stats["write"]
    assert (write["ops"], write["failed"], write["invalid"]) == (2, 1, 0)
    assert write["bytes"] == 8 * KiB
    assert histogram_total(write) == 2 + (account == "on")


def test_zero_range_is_a_write(imgfs, tmp_path):
    """fallocate(ZERO_RANGE) writes zeros: QEMU counts a write-zeroes
    request as a write; only punching a hole is a discard."""
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}})
    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE, MiB, MiB)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB,
                  2 * MiB)
    finally:
        os.close(fd)
    stats = drive_status(mount)["stats"]
    assert (stats["discard"]["ops"], stats["discard"]["bytes"]) == \
        (1, 2 * MiB), stats["discard"]
    assert (stats["write"]["ops"], stats["write"]["bytes"]) == \
        (1, MiB), stats["write"]
