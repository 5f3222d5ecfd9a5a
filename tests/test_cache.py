"""Cache modes and aio modes: what reaches the disk, and how.

strace, attached to the running daemon, is the oracle for flushes: with
aio = threads every fdatasync and every pwritev2 (with or without
RWF_DSYNC) is a system call of some imgfs thread.  The image file's open
flags (/proc/PID/fdinfo) say whether it was opened with O_DIRECT.  The aio
modes are told apart by the system calls that carry the writes (pwritev2,
io_submit, io_uring_enter) and each is checked end to end by fio --verify.
"""

import mmap
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import (
    KiB,
    MiB,
    create_image,
    drive_status,
    read_at,
    require_tool,
    run_fio,
    wait_for,
)

SIZE = 16 * MiB
O_DIRECT = 0o40000

# cache keys -> (image opened O_DIRECT, writes carry RWF_DSYNC,
#                fdatasync calls per fsync after a write)
CACHE_CASES = {
    "writeback": ({"cache": "writeback"}, False, False, 1),
    "none": ({"cache": "none"}, True, False, 1),
    "writethrough": ({"cache": "writethrough"}, False, True, 1),
    "directsync": ({"cache": "directsync"}, True, True, 1),
    "unsafe": ({"cache": "unsafe"}, False, False, 0),
    "default": ({}, False, False, 1),
    "cache.direct=on": ({"cache.direct": "on"}, True, False, 1),
    "cache.no-flush=on": ({"cache.no-flush": "on"}, False, False, 0),
    "write-cache=off": ({"write-cache": "off"}, False, True, 1),
    # the finer keys override what the mode says
    "none+write-cache=off": ({"cache": "none", "write-cache": "off"},
                             True, True, 1),
    "unsafe+cache.no-flush=off": ({"cache": "unsafe",
                                   "cache.no-flush": "off"},
                                  False, False, 1),
    "directsync+cache.direct=off": ({"cache": "directsync",
                                     "cache.direct": "off"},
                                    False, True, 1),
}


def image_fd(pid, image):
    """The daemon's file descriptor number for IMAGE."""
    target = os.path.realpath(image)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return int(fd)
        except FileNotFoundError:
            continue
    pytest.fail(f"imgfs (pid {pid}) has no open file descriptor for {image}",
                pytrace=False)


def open_flags(pid, fd):
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


class Strace:
    """strace -f attached to a running daemon, writing to a log file."""

    def __init__(self, pid, syscalls, log):
        self.pid = pid
        self.log = log
        strace = require_tool("strace")
        self.proc = subprocess.Popen(
            [strace, "-f", "-s", "0", "-e", f"trace={','.join(syscalls)}",
             "-o", str(log), "-p", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Attached once every thread of the daemon has strace as tracer.
        wait_for(self._attached, 30, "strace to attach to every imgfs thread")

    def _attached(self):
        if self.proc.poll() is not None:
            pytest.fail(f"strace exited: {self.proc.stderr.read()}",
                        pytrace=False)
        tasks = os.listdir(f"/proc/{self.pid}/task")
        for tid in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    tracer = re.search(r"TracerPid:\s*(\d+)", f.read())
            except FileNotFoundError:
                continue
            if int(tracer.group(1)) != self.proc.pid:
                return False
        return True

    def stop(self):
        """Detach; return the calls as (name, argument text) pairs."""
        # the last replies may still be on their way from worker threads
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        calls = []
        for line in self.log.read_text().splitlines():
            m = re.match(r"\d+\s+(\w+)\((.*)", line)
            if m and "resumed>" not in line:
                calls.append((m.group(1), m.group(2)))
        return calls


def aligned(data):
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def count(calls, name, contains=None):
    return sum(1 for n, args in calls
               if n == name and (contains is None or contains in args))


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_flushes_per_cache_mode(imgfs, tmp_path, case):
    keys, direct, dsync, per_fsync = CACHE_CASES[case]
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "aio": "threads", **keys}})
    flags = open_flags(mount.pid, image_fd(mount.pid, image))
    assert bool(flags & O_DIRECT) == direct, (
        f"image opened with flags {flags:#o}: O_DIRECT expected {direct}")
    cache = drive_status(mount)["options"]["cache"]
    assert cache["direct"] == direct
    assert cache["writeback"] == (not dsync)
    assert cache["no-flush"] == (per_fsync == 0)

    blocks = {i * 256 * KiB: os.urandom(4 * KiB) for i in range(9)}
    chunks = list(blocks.items())
    trace = Strace(mount.pid, ["fdatasync", "fsync", "pwritev2", "pwritev",
                               "pwrite64", "sync_file_range"],
                   tmp_path / "strace.log")
    # writes, then close: close (FUSE flush) must not flush the disk
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    for offset, data in chunks[:3]:
        assert os.pwrite(fd, aligned(data), offset) == len(data)
    os.close(fd)
    # three rounds of writes, each followed by fsync
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    for r in range(3):
        for offset, data in chunks[3 + 2 * r:5 + 2 * r]:
            assert os.pwrite(fd, aligned(data), offset) == len(data)
        os.fsync(fd)
    os.close(fd)
    calls = trace.stop()
    n_writes = len(chunks)

    writes = count(calls, "pwritev2") + count(calls, "pwritev") \
        + count(calls, "pwrite64")
    assert writes >= n_writes, (
        f"strace saw {writes} writes of {n_writes}: not attached?")
    assert count(calls, "fsync") == 0
    dsync_writes = count(calls, "pwritev2", "RWF_DSYNC")
    fdatasyncs = count(calls, "fdatasync")
    if dsync:
        # durable when acknowledged: each write is RWF_DSYNC (not a plain
        # write plus an fdatasync of the whole file); fsync may still
        # flush, once per call at most
        assert dsync_writes >= n_writes, (
            f"{case}: only {dsync_writes} of {n_writes} writes were "
            f"RWF_DSYNC ({fdatasyncs} fdatasync calls)")
        assert fdatasyncs <= 3, f"{case}: {fdatasyncs} fdatasync calls"
    else:
        assert dsync_writes == 0, f"{case}: {dsync_writes} RWF_DSYNC writes"
        assert fdatasyncs == 3 * per_fsync, (
            f"{case}: 3 fsync calls after writes (and one close) made "
            f"{fdatasyncs} fdatasync calls, want {3 * per_fsync}")

    assert mount.unmount() == 0
    for offset, data in chunks:
        assert read_at(image, offset, len(data)) == data


AIO_CASES = {
    # aio, cache: the system calls that must carry the writes, and those
    # that must not appear at all
    "threads": ("threads", "none", ["pwritev2"], ["io_submit"]),
    "threads-writeback": ("threads", "writeback", ["pwritev2"],
                          ["io_submit"]),
    "native": ("native", "none", ["io_submit"], ["pwritev2", "pwritev"]),
    "io_uring": ("io_uring", "none", ["io_uring_enter"],
                 ["pwritev2", "pwritev", "io_submit"]),
    "io_uring-writeback": ("io_uring", "writeback", ["io_uring_enter"],
                           ["pwritev2", "pwritev", "io_submit"]),
}


@pytest.mark.parametrize("case", list(AIO_CASES))
def test_aio_mode_does_the_io(imgfs, tmp_path, case):
    aio, cache, used, unused = AIO_CASES[case]
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw", "aio": aio,
                             "cache": cache}})
    assert drive_status(mount)["options"]["aio"] == aio
    trace = Strace(mount.pid, ["pwritev2", "pwritev", "pwrite64",
                               "io_submit", "io_uring_enter"],
                   tmp_path / "strace.log")
    data = {i * MiB: os.urandom(64 * KiB) for i in range(8)}
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    try:
        for offset, chunk in data.items():
            assert os.pwrite(fd, aligned(chunk), offset) == len(chunk)
    finally:
        os.close(fd)
    calls = trace.stop()
    for name in used:
        assert count(calls, name) >= (1 if name == "io_uring_enter" else 8), (
            f"aio={aio}: expected {name} calls, strace saw "
            f"{sorted(set(n for n, _ in calls))}")
    for name in unused:
        assert count(calls, name) == 0, (
            f"aio={aio}: {count(calls, name)} {name} calls")
    assert mount.unmount() == 0
    for offset, chunk in data.items():
        assert read_at(image, offset, len(chunk)) == chunk


def test_o_direct_write_is_one_round_trip(imgfs, tmp_path):
    """A program writing with O_DIRECT (a VMM with cache=none) costs one
    FUSE request per write: the daemon answers it with one writev on
    /dev/fuse.  On the kernel's ordinary path every write is preceded by a
    GETXATTR of security.capability, which doubled the requests.  (The
    /dev/fuse transport: over io_uring there is no writev to count.)"""
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "cache": "none"}},
                  settings={"fuse-uring": "off"})
    data = {i * 256 * KiB: os.urandom(4 * KiB) for i in range(32)}
    trace = Strace(mount.pid, ["writev"], tmp_path / "strace.log")
    fd = os.open(mount.drive(), os.O_WRONLY | os.O_DIRECT)
    try:
        for offset, chunk in data.items():
            assert os.pwrite(fd, aligned(chunk), offset) == len(chunk)
    finally:
        os.close(fd)
    replies = count(trace.stop(), "writev")
    # 32 writes, plus open, flush, release and a few lookups/getattrs
    assert len(data) <= replies <= len(data) + 8, (
        f"{replies} FUSE replies for {len(data)} O_DIRECT writes")
    assert mount.unmount() == 0
    for offset, chunk in data.items():
        assert read_at(image, offset, len(chunk)) == chunk


def reads_per_thread(pid, log):
    """read() calls per daemon thread name in an Strace log."""
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            names[tid] = f.read().strip()
    counts = {}
    for line in log.read_text().splitlines():
        m = re.match(r"(\d+)\s+read\(", line)
        if m:
            name = names.get(m.group(1), m.group(1))
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_second_queue_sleeps_at_low_load_and_helps_under_load(imgfs,
                                                              tmp_path):
    """With two iothreads and one drive, one request at a time is served
    by the drive's own thread: the second FUSE queue stops reading
    /dev/fuse (every request used to wake it, and it took most of them
    and handed them over).  Under a backlog (fio at iodepth 32) it reads
    again.  (The /dev/fuse transport.)"""
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "cache": "none", "iothread": "0"}},
                  settings={"iothreads": "2", "fuse-uring": "off"})
    fd = os.open(mount.drive(), os.O_RDONLY | os.O_DIRECT)
    buf = aligned(bytes(4 * KiB))
    try:
        for i in range(200):  # settle: the idle queue parks
            os.preadv(fd, [buf], i * 4 * KiB)
        log = tmp_path / "quiet.log"
        trace = Strace(mount.pid, ["read"], log)
        for i in range(300):
            os.preadv(fd, [buf], i * 4 * KiB)
        trace.stop()
    finally:
        os.close(fd)
    quiet = reads_per_thread(mount.pid, log)
    assert quiet.get("imgfs-io0", 0) >= 300, quiet
    # parked, it reads nothing; a stray backlog (strace stopping the
    # threads) may wake it for one window of 32 wake-ups now and then.
    # Without parking it reads about twice per request (600 here).
    assert quiet.get("imgfs-io1", 0) < 100, (
        f"second queue kept reading /dev/fuse at iodepth 1: {quiet}")

    log = tmp_path / "busy.log"
    trace = Strace(mount.pid, ["read"], log)
    run_fio(mount.drive(), name="busy", ioengine="libaio", direct=1,
            rw="randread", bs="4k", iodepth=32, runtime=3, time_based=1,
            size=SIZE)
    trace.stop()
    busy = reads_per_thread(mount.pid, log)
    assert busy.get("imgfs-io1", 0) > 0, (
        f"second queue never read under iodepth 32: {busy}")
    assert mount.unmount() == 0


@pytest.mark.parametrize(
    "aio, cache",
    [("threads", "writeback"), ("io_uring", "none"), ("native", "none"),
     ("native", "directsync"), ("io_uring", "writethrough")],
)
def test_aio_mode_fio_verify(imgfs, tmp_path, aio, cache):
    image = create_image(tmp_path / "disk0.img", 32 * MiB)
    mount = imgfs({"disk0": {"file": image, "format": "raw", "aio": aio,
                             "cache": cache}})
    workload = dict(name=f"{aio}-{cache}", rw="randwrite", bsrange="4k-128k",
                    size="8M", numjobs=4, offset_increment="8M",
                    verify="crc32c", verify_fatal=1)
    jobs = run_fio(mount.drive(), ioengine="io_uring", direct=1, iodepth=16,
                   do_verify=1, **workload)
    written = sum(job["write"]["io_bytes"] for job in jobs)
    assert written == 32 * MiB
    assert sum(job["read"]["io_bytes"] for job in jobs) == written
    assert mount.unmount() == 0
    # the image itself holds what fio wrote
    jobs = run_fio(image, verify_only=1, ioengine="psync", direct=0,
                   **workload)
    assert sum(job["read"]["io_bytes"] for job in jobs) == written
