"""werror and rerror: report, ignore, enospc and stop.

Two sources of real errors:
- a small tmpfs that runs full under a sparse raw image (ENOSPC), the
  case `werror = stop` exists for: fio's writes wait while the drive is
  stopped, the operator frees space and runs `imgfs resume`, and fio's
  verify passes;
- qemu-storage-daemon exporting an image through QEMU's blkdebug driver
  over FUSE, which fails one chosen read or write once with a chosen
  errno (EIO, ENOSPC); imgfs uses the exported file as its image.
"""

import errno
import mmap
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import (
    KiB,
    MiB,
    create_image,
    drive_status,
    fill,
    imgfs_run,
    read_at,
    require_root,
    run,
    run_fio,
    start_fio,
    fio_wait,
    unmount,
    wait_for,
)

STOP_TIMEOUT = 60  # for a loaded machine; a stop normally takes ms


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs, unmounted at teardown (after imgfs: request it
    before the imgfs fixture)."""
    require_root("mount a tmpfs")
    path = tmp_path / "small"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", path)
    yield path
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        unmount(path, lazy=True)
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_fs(directory, leave=0):
    """Fill the file system of DIRECTORY with a file, leaving LEAVE bytes."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        chunk = bytes(MiB)
        while size > 0:
            try:
                f.write(chunk[:min(size, MiB)])
                f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            size -= MiB
    return filler


class Background:
    """Run FN in a thread; the result (or exception) when it ends."""

    def __init__(self, fn):
        self.result = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,),
                                       daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:
            self.error = e

    def running(self):
        return self.thread.is_alive()

    def join(self, timeout=STOP_TIMEOUT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "request still held"
        if self.error:
            raise self.error
        return self.result


def aligned(data):
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def direct_write(path, offset, data):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        return os.pwrite(fd, aligned(data), offset)
    finally:
        os.close(fd)


def direct_read(path, offset, length):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(bytes(length))
        n = os.preadv(fd, [buf], offset)
        return buf[:n]
    finally:
        os.close(fd)


def wait_stopped(mount, name="disk0", fio=None):
    """Wait until drive NAME is stopped; its status.  Fail at once if FIO
    (the program whose writes should be held) ends meanwhile."""
    def stopped():
        if fio is not None and fio.poll() is not None:
            pytest.fail(f"fio ended (exit {fio.returncode}) instead of "
                        f"waiting:\n{fio.stdout.read()}\n{fio.stderr.read()}",
                        pytrace=False)
        status = drive_status(mount, name)
        return status if status["state"] == "stopped" else None

    return wait_for(stopped, STOP_TIMEOUT, f"drive {name} to stop")


def resume(mount, *drive):
    proc = imgfs_run("resume", mount.path, *drive)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- a file system running full -------------------------------------------


def test_stop_holds_fio_until_resume(small_fs, imgfs, tmp_path):
    """The issue's scenario: fio writes to a drive whose host file system
    runs full; the drive stops, fio waits; space is freed; resume; fio
    finishes and its verify passes, in the mount and in the image."""
    image = create_image(small_fs / "disk0.img", 128 * MiB)
    filler = fill_fs(small_fs, leave=24 * MiB)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "werror": "stop"}})
    workload = dict(name="fill", rw="write", bs="256k", size="40M",
                    verify="crc32c", verify_fatal=1)
    fio = start_fio(mount.drive(), ioengine="io_uring", direct=1, iodepth=8,
                    do_verify=1, **workload)
    try:
        status = wait_stopped(mount, fio=fio)
        assert "No space left on device" in status["stop-reason"]
        assert status["stop-reason"].startswith("write error")
        human = imgfs_run("status", mount.path).stdout
        assert "stopped" in human and "No space left on device" in human
        # held, not failed: fio is still waiting for its writes
        time.sleep(1)
        assert fio.poll() is None, "fio ended while the drive was stopped"
        assert drive_status(mount)["state"] == "stopped"
        filler.unlink()
    except BaseException:
        if filler.exists():
            filler.unlink()
        imgfs_run("resume", mount.path)
        fio.kill()
        fio.communicate()
        raise
    out = resume(mount, "disk0")
    assert "resumed: disk0" in out
    jobs = fio_wait(fio)
    assert jobs[0]["write"]["io_bytes"] == 40 * MiB
    assert jobs[0]["read"]["io_bytes"] == 40 * MiB  # verified
    status = drive_status(mount)
    assert status["state"] == "running"
    assert "stop-reason" not in status
    assert status["stats"]["write"]["failed"] == 0
    assert mount.unmount() == 0
    run_fio(image, verify_only=1, ioengine="psync", **workload)


def test_enospc_stops_on_full_fs(small_fs, imgfs):
    image = create_image(small_fs / "disk0.img", 128 * MiB)
    filler = fill_fs(small_fs)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "werror": "enospc"}})
    data = os.urandom(MiB)
    writer = Background(lambda: direct_write(mount.drive(), 5 * MiB, data))
    status = wait_stopped(mount)
    assert "No space left on device" in status["stop-reason"]
    assert writer.running()
    # resumed while the file system is still full: the retry fails and
    # the drive stops again, the write still held
    assert "resumed: disk0" in resume(mount)
    status = wait_stopped(mount)
    assert "No space left on device" in status["stop-reason"]
    assert writer.running()
    filler.unlink()
    assert "resumed: disk0" in resume(mount)  # all drives
    assert writer.join() == MiB
    assert drive_status(mount)["state"] == "running"
    assert mount.unmount() == 0
    assert read_at(image, 5 * MiB, MiB) == data


def test_report_on_full_fs(small_fs, imgfs):
    image = create_image(small_fs / "disk0.img", 128 * MiB)
    fill_fs(small_fs)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}})  # default
    with pytest.raises(OSError) as err:
        direct_write(mount.drive(), 5 * MiB, os.urandom(MiB))
    assert err.value.errno == errno.ENOSPC
    status = drive_status(mount)
    assert status["options"]["werror"] == "report"
    assert status["state"] == "running"
    assert status["stats"]["write"]["failed"] >= 1


def test_ignore_on_full_fs(small_fs, imgfs):
    image = create_image(small_fs / "disk0.img", 128 * MiB)
    fill_fs(small_fs)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "werror": "ignore"}})
    # the write "succeeds"; the data is lost, as QEMU's werror=ignore does
    assert direct_write(mount.drive(), 5 * MiB, os.urandom(MiB)) == MiB
    status = drive_status(mount)
    assert status["state"] == "running"
    assert mount.unmount() == 0
    assert read_at(image, 5 * MiB, MiB) == bytes(MiB)


# -- injected errors (qemu-storage-daemon + blkdebug) ---------------------


ERR_OFFSET = 1 * MiB  # the failing request covers this byte
IMAGE_SIZE = 8 * MiB


def blkdebug_export(qsd, tmp_path, iotype, errnum):
    """A FUSE file served by qemu-storage-daemon whose first read (or
    write) covering ERR_OFFSET fails once with ERRNUM."""
    base = create_image(tmp_path / "base.img", IMAGE_SIZE)
    fill(base, 0x5A, 0, IMAGE_SIZE)
    export = tmp_path / "export.img"
    event = {"read": "read_aio", "write": "write_aio"}[iotype]
    qsd([f"driver=file,node-name=file0,filename={base}",
         f"driver=blkdebug,node-name=dbg0,image=file0,"
         f"inject-error.0.event={event},inject-error.0.errno={errnum},"
         f"inject-error.0.once=on,inject-error.0.sector={ERR_OFFSET // 512}",
         "driver=raw,node-name=raw0,file=dbg0"],
        export=export)
    return base, export


def mount_export(imgfs, export, **keys):
    # cache = none: imgfs's request reaches qemu-storage-daemon as it is
    # (no page cache in between to retry a failed read by itself)
    return imgfs({"disk0": {"file": export, "format": "raw", "cache": "none",
                            **keys}})


def test_rerror_stop_and_resume(qsd, imgfs, tmp_path):
    _, export = blkdebug_export(qsd, tmp_path, "read", errno.EIO)
    mount = mount_export(imgfs, export, rerror="stop")
    reader = Background(lambda: direct_read(mount.drive(), ERR_OFFSET,
                                            64 * KiB))
    status = wait_stopped(mount)
    assert status["stop-reason"] == "read error: Input/output error"
    assert reader.running()
    assert "resumed: disk0" in resume(mount, "disk0")
    assert reader.join() == b"\x5a" * 64 * KiB
    status = drive_status(mount)
    assert status["state"] == "running"
    assert status["stats"]["read"]["failed"] == 0


def test_rerror_report(qsd, imgfs, tmp_path):
    _, export = blkdebug_export(qsd, tmp_path, "read", errno.EIO)
    mount = mount_export(imgfs, export)  # rerror = report by default
    with pytest.raises(OSError) as err:
        direct_read(mount.drive(), ERR_OFFSET, 64 * KiB)
    assert err.value.errno == errno.EIO
    status = drive_status(mount)
    assert status["options"]["rerror"] == "report"
    assert status["state"] == "running"
    assert status["stats"]["read"]["failed"] == 1
    # the error was a one-off: the same read works now
    assert direct_read(mount.drive(), ERR_OFFSET, 64 * KiB) == \
        b"\x5a" * 64 * KiB


def test_rerror_ignore(qsd, imgfs, tmp_path):
    """The failed read "succeeds".  What it returns must not be bytes of
    some other request: here another drive's data is read just before,
    on the same iothread, so a reused buffer would show it."""
    _, export = blkdebug_export(qsd, tmp_path, "read", errno.EIO)
    other = create_image(tmp_path / "other.img", IMAGE_SIZE)
    fill(other, 0xAA, 0, IMAGE_SIZE)
    mount = imgfs({"disk0": {"file": export, "format": "raw",
                             "cache": "none", "rerror": "ignore"},
                   "other": {"file": other, "format": "raw"}},
                  settings={"iothreads": 1})
    for i in range(8):
        assert direct_read(mount.drive("other"), i * MiB, 64 * KiB) == \
            b"\xaa" * 64 * KiB
    data = direct_read(mount.drive(), ERR_OFFSET, 64 * KiB)
    assert len(data) == 64 * KiB
    assert b"\xaa" not in data, (
        "an ignored read error returned another drive's data")
    assert data == bytes(64 * KiB), "an ignored read error reads as zeros"
    status = drive_status(mount)
    assert status["state"] == "running"
    assert status["options"]["rerror"] == "ignore"


def test_unmount_while_stopped(qsd, imgfs, tmp_path):
    """SIGTERM while a drive holds a request: the daemon still exits (the
    held request fails), it does not wait for a resume forever."""
    _, export = blkdebug_export(qsd, tmp_path, "write", errno.EIO)
    mount = mount_export(imgfs, export, werror="stop")
    writer = Background(lambda: direct_write(mount.drive(), ERR_OFFSET,
                                             os.urandom(4 * KiB)))
    wait_stopped(mount)
    mount.stopped_by_test = True
    os.kill(mount.pid, signal.SIGTERM)
    rc = mount.wait(30)
    if rc is None:
        # unblock the writer (and this test): end the daemon for good
        os.kill(mount.pid, signal.SIGKILL)
        mount.wait(30)
        writer.thread.join(30)
        pytest.fail("imgfs still running 30 s after SIGTERM with a held "
                    "request", pytrace=False)
    with pytest.raises(OSError):
        writer.join()


@pytest.mark.parametrize("policy, errnum", [("stop", errno.EIO),
                                            ("enospc", errno.ENOSPC)])
def test_werror_stop_and_resume(qsd, imgfs, tmp_path, policy, errnum):
    base, export = blkdebug_export(qsd, tmp_path, "write", errnum)
    mount = mount_export(imgfs, export, werror=policy)
    data = os.urandom(64 * KiB)
    writer = Background(lambda: direct_write(mount.drive(), ERR_OFFSET,
                                             data))
    status = wait_stopped(mount)
    assert status["stop-reason"] == f"write error: {os.strerror(errnum)}"
    assert writer.running()
    # later requests wait too, even reads elsewhere
    reader = Background(lambda: direct_read(mount.drive(), 0, 4 * KiB))
    time.sleep(0.5)
    assert reader.running(), "a read went through a stopped drive"
    assert "resumed: disk0" in resume(mount, "disk0")
    assert writer.join() == len(data)
    assert reader.join() == b"\x5a" * 4 * KiB
    assert drive_status(mount)["state"] == "running"
    assert mount.unmount() == 0
    assert read_at(base, ERR_OFFSET, len(data)) == data


@pytest.mark.parametrize("policy", ["enospc", "report"])
def test_werror_reports_eio(qsd, imgfs, tmp_path, policy):
    """enospc stops only on ENOSPC: an EIO is reported like werror=report."""
    base, export = blkdebug_export(qsd, tmp_path, "write", errno.EIO)
    mount = mount_export(imgfs, export, werror=policy)
    with pytest.raises(OSError) as err:
        direct_write(mount.drive(), ERR_OFFSET, os.urandom(64 * KiB))
    assert err.value.errno == errno.EIO
    status = drive_status(mount)
    assert status["state"] == "running"
    assert status["stats"]["write"]["failed"] == 1
    data = os.urandom(64 * KiB)
    assert direct_write(mount.drive(), ERR_OFFSET, data) == len(data)
    assert mount.unmount() == 0
    assert read_at(base, ERR_OFFSET, len(data)) == data


def test_werror_ignore_eio(qsd, imgfs, tmp_path):
    base, export = blkdebug_export(qsd, tmp_path, "write", errno.EIO)
    mount = mount_export(imgfs, export, werror="ignore")
    assert direct_write(mount.drive(), ERR_OFFSET,
                        os.urandom(64 * KiB)) == 64 * KiB
    assert drive_status(mount)["state"] == "running"
    assert mount.unmount() == 0
    assert read_at(base, ERR_OFFSET, 64 * KiB) == b"\x5a" * 64 * KiB


def test_stop_does_not_hold_other_drives(qsd, imgfs, tmp_path):
    """One stopped drive; another drive of the same mount (same iothread)
    keeps working."""
    _, export = blkdebug_export(qsd, tmp_path, "write", errno.EIO)
    other = create_image(tmp_path / "other.img", IMAGE_SIZE)
    mount = imgfs({"disk0": {"file": export, "format": "raw",
                             "cache": "none", "werror": "stop"},
                   "other": {"file": other, "format": "raw"}},
                  settings={"iothreads": 1})
    writer = Background(lambda: direct_write(mount.drive(), ERR_OFFSET,
                                             os.urandom(4 * KiB)))
    wait_stopped(mount)
    data = os.urandom(MiB)
    assert direct_write(mount.drive("other"), 0, data) == MiB
    assert direct_read(mount.drive("other"), 0, MiB) == data
    assert drive_status(mount, "other")["state"] == "running"
    assert "resumed: disk0" in resume(mount)
    assert writer.join() == 4 * KiB
