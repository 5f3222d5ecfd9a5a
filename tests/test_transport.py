"""How requests travel between the kernel and imgfs: FUSE over io_uring
([imgfs] fuse-uring = on, or auto with the fuse module's enable_uring
parameter on) or read()/writev() on /dev/fuse (fuse-uring = off).

The oracle for "which transport" is strace on the daemon: over io_uring
it makes no read() or writev() system call for a request; on /dev/fuse it
makes one writev() per reply.  The oracle for the data is the image file.
"""

import os

import pytest

from conftest import (
    KiB,
    MiB,
    create_image,
    fuse_uring_param,
    read_at,
    set_fuse_uring_param,
    wait_for,
)
from test_cache import Strace, aligned, count

SIZE = 64 * MiB


@pytest.fixture
def uring_param():
    """Restore the fuse module's enable_uring after the test."""
    before = fuse_uring_param()
    if before is None:
        pytest.fail("this kernel has no FUSE over io_uring "
                    "(/sys/module/fuse/parameters/enable_uring)")
    yield
    set_fuse_uring_param(before)


def write_read_back(mount, data):
    """O_DIRECT writes of DATA (chunks by offset), then reads checking
    them."""
    fd = os.open(mount.drive(), os.O_RDWR | os.O_DIRECT)
    try:
        for offset, chunk in data.items():
            assert os.pwrite(fd, aligned(chunk), offset) == len(chunk)
        for offset, chunk in data.items():
            buf = aligned(bytes(len(chunk)))
            assert os.preadv(fd, [buf], offset) == len(chunk)
            assert bytes(buf) == chunk, f"read back at {offset}"
    finally:
        os.close(fd)


def write_read_through(mount, tmp_path, nrequests):
    """NREQUESTS 4k O_DIRECT writes then reads of the same blocks under
    strace; returns (data by offset, the daemon's traced calls)."""
    data = {i * 97 * 4 * KiB: os.urandom(4 * KiB) for i in range(nrequests)}
    trace = Strace(mount.pid, ["read", "readv", "write", "writev"],
                   tmp_path / "strace.log")
    write_read_back(mount, data)
    return data, trace.stop()


def test_requests_travel_over_io_uring(imgfs, tmp_path, uring_param):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "cache": "none", "aio": "io_uring"}},
                  settings={"fuse-uring": "on"})
    wait_for(lambda: "FUSE over io_uring:" in mount.stderr(), 10,
             "the ring entries to be registered")
    # every iothread's ring has the request buffers registered, so image
    # reads and writes in them pin no pages; only up to 8 CPUs, as with
    # huge pages (README, FUSE over io_uring)
    rings = registered_buffers(mount.pid)
    expected = 1 if possible_cpus() <= 8 else 0
    assert rings and all(n == expected for n in rings), rings
    data, calls = write_read_through(mount, tmp_path, 64)
    # 128 requests, none of them read from or answered on /dev/fuse (the
    # image I/O goes through io_uring too)
    dev_fuse = [c for c in calls if c[0] in ("read", "readv", "writev")]
    assert len(dev_fuse) <= 4, f"/dev/fuse calls over io_uring: {dev_fuse}"
    assert mount.unmount() == 0
    for offset, chunk in data.items():
        assert read_at(image, offset, len(chunk)) == chunk


def possible_cpus():
    """The kernel's count of possible CPUs (its FUSE queues)."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = f.read().strip().replace(",", "-").split("-")[-1]
    return int(last) + 1


def registered_buffers(pid):
    """For each io_uring of process PID, how many buffers are registered
    with it (the UserBufs line of its fdinfo)."""
    counts = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[io_uring]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except FileNotFoundError:
            continue
        for line in info.splitlines():
            if line.startswith("UserBufs:"):
                counts.append(int(line.split()[1]))
    return counts


def test_fuse_uring_off_uses_dev_fuse(imgfs, tmp_path, uring_param):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "cache": "none", "aio": "io_uring"}},
                  settings={"fuse-uring": "off"})
    assert "FUSE over io_uring" not in mount.stderr()
    data, calls = write_read_through(mount, tmp_path, 64)
    assert count(calls, "writev") >= 128
    assert mount.unmount() == 0
    for offset, chunk in data.items():
        assert read_at(image, offset, len(chunk)) == chunk


def test_auto_follows_the_module_parameter(imgfs, tmp_path, uring_param):
    """auto takes io_uring only where the administrator allowed it, and
    never switches the parameter on itself; on switches it on."""
    image = create_image(tmp_path / "disk0.img", SIZE)
    set_fuse_uring_param(False)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}}, name="auto")
    assert "FUSE over io_uring" not in mount.stderr()
    assert fuse_uring_param() is False
    assert mount.unmount() == 0

    mount = imgfs({"disk0": {"file": image, "format": "raw"}},
                  settings={"fuse-uring": "on"}, name="on")
    assert fuse_uring_param() is True
    assert "switched on FUSE over io_uring" in mount.stderr()
    wait_for(lambda: "queues of" in mount.stderr(), 10,
             "the ring entries to be registered")
    assert mount.unmount() == 0


@pytest.mark.parametrize("transport", ["on", "off"])
def test_large_requests(imgfs, tmp_path, uring_param, transport):
    """1 MiB O_DIRECT transfers: the kernel sends them as requests that
    fill whole request buffers both ways, over io_uring (ring entries) and
    over /dev/fuse (the buffer pool)."""
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "cache": "none"}},
                  settings={"fuse-uring": transport})
    data = {i * MiB: os.urandom(MiB) for i in range(0, 32, 3)}
    write_read_back(mount, data)
    if thp_mode() != "never":
        # the request buffers are in huge pages: a large request is one
        # physical segment for the disk (README, FUSE over io_uring)
        assert anon_huge_kib(mount.pid) >= 2048
    assert mount.unmount() == 0
    for offset, chunk in data.items():
        assert read_at(image, offset, len(chunk)) == chunk


def thp_mode():
    """The transparent huge page mode: always, madvise or never."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read().split("[")[1].split("]")[0]


def anon_huge_kib(pid):
    """KiB of a process's memory in transparent huge pages."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0
