"""detect-zeroes and discard: what writing zeros and punching holes do to
the image's allocation.

The oracles are the host file system's own map of the image file (FIEMAP:
a hole, an unwritten extent that fallocate(ZERO_RANGE) leaves, or written
data) and, for qcow2, `qemu-img map --output=json` and `qemu-img check`.
Whatever the mode, the range reads back as zeros and the bytes around it
are untouched.
"""

import fcntl
import json
import mmap
import os
import struct

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KiB,
    MiB,
    create_image,
    drive_status,
    fallocate,
    fill,
    qemu_io,
    read_at,
    require_format,
    run,
)

SIZE = 8 * MiB
START, LENGTH = 2 * MiB, 2 * MiB  # the range zeroed or punched

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800


def fiemap(path, start, length):
    """The host extents of PATH in [start, start+length): (off, len, flags)."""
    count = 256
    header = struct.pack("=QQIIII", start, length, FIEMAP_FLAG_SYNC, 0,
                         count, 0)
    buf = bytearray(header + bytes(56 * count))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    finally:
        os.close(fd)
    mapped = struct.unpack_from("=I", buf, 20)[0]
    extents = []
    for i in range(mapped):
        logical, _, ext_len = struct.unpack_from("=QQQ", buf, 32 + 56 * i)
        flags = struct.unpack_from("=I", buf, 32 + 56 * i + 40)[0]
        lo, hi = max(logical, start), min(logical + ext_len, start + length)
        if lo < hi:
            extents.append((lo, hi - lo, flags))
    return extents


def allocation(path, start=START, length=LENGTH):
    """How [start, start+length) of PATH is stored on the host:
    "hole", "unwritten" (allocated, reads as zeros), "data", or "mixed"."""
    try:
        extents = fiemap(path, start, length)
    except OSError as e:
        pytest.skip(f"FIEMAP not supported here: {e}")
    covered = sum(n for _, n, _ in extents)
    if covered == 0:
        return "hole"
    if covered < length:
        return "mixed"
    if all(flags & FIEMAP_EXTENT_UNWRITTEN for _, _, flags in extents):
        return "unwritten"
    if not any(flags & FIEMAP_EXTENT_UNWRITTEN for _, _, flags in extents):
        return "data"
    return "mixed"


def allocated_image(path):
    """A raw image whose every byte is written (0xab): fully allocated."""
    create_image(path, SIZE)
    fill(path, 0xAB, 0, SIZE)
    assert allocation(path, 0, SIZE) == "data"
    return path


def write_zeros(path, offset, length, direct=True):
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, length)  # page aligned, all zeros
        assert os.pwrite(fd, buf, offset) == length
        os.fsync(fd)
    finally:
        os.close(fd)


def punch_hole(path, offset, length):
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                  length)
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_zeroed(image):
    """[START, START+LENGTH) of IMAGE is zeros, the rest still 0xab."""
    qemu_io(image,
            f"read -P 0xab 0 {START}",
            f"read -P 0 {START} {LENGTH}",
            f"read -P 0xab {START + LENGTH} {SIZE - START - LENGTH}")


# detect-zeroes, discard -> what a write of zeros leaves in a raw image
DETECT_CASES = [
    ("off", "unmap", "data"),
    ("on", "unmap", "unwritten"),
    ("unmap", "unmap", "hole"),
    ("unmap", "ignore", "unwritten"),
]


@pytest.mark.parametrize("detect, discard, expected", DETECT_CASES)
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_detect_zeroes_raw(imgfs, tmp_path, detect, discard, expected,
                           cache):
    image = allocated_image(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw", "cache": cache,
                             "detect-zeroes": detect, "discard": discard}})
    options = drive_status(mount)["options"]
    assert (options["detect-zeroes"], options["discard"]) == (detect, discard)
    write_zeros(mount.drive(), START, LENGTH, direct=(cache == "none"))
    assert read_at(mount.drive(), START, LENGTH) == bytes(LENGTH)
    assert mount.unmount() == 0
    assert allocation(image) == expected, (
        f"detect-zeroes={detect}, discard={discard}: the zeroed range is "
        f"{allocation(image)} in the image, want {expected}")
    assert allocation(image, 0, START) == "data"
    assert_zeroed(image)


def test_detect_zeroes_ignores_nonzero_writes(imgfs, tmp_path):
    """A write with a single non-zero byte is data, even with unmap."""
    image = allocated_image(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "detect-zeroes": "unmap"}})
    data = bytearray(LENGTH)
    data[LENGTH - 1] = 1
    fd = os.open(mount.drive(), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, START) == LENGTH
    finally:
        os.close(fd)
    assert mount.unmount() == 0
    # the kernel writes the range back in requests of at most 512 KiB
    # (imgfs's largest): the all-zero ones may be unmapped, the last one
    # holds the non-zero byte and must be written as data
    last = 512 * KiB
    assert allocation(image, START + LENGTH - last, last) == "data"
    assert read_at(image, START, LENGTH) == bytes(data)


@pytest.mark.parametrize("discard, expected",
                         [("unmap", {"hole"}),
                          # zeroed in place: allocated either way
                          ("ignore", {"unwritten", "data"})])
def test_discard_raw(imgfs, tmp_path, discard, expected):
    image = allocated_image(tmp_path / "disk0.img")
    blocks = os.stat(image).st_blocks
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "discard": discard}})
    punch_hole(mount.drive(), START, LENGTH)
    assert read_at(mount.drive(), START, LENGTH) == bytes(LENGTH)
    assert mount.unmount() == 0
    assert allocation(image) in expected, (
        f"discard={discard}: the punched range is {allocation(image)} in the "
        f"image, want {expected}")
    freed = (blocks - os.stat(image).st_blocks) * 512
    if discard == "unmap":
        assert freed >= LENGTH
    else:
        assert freed == 0
    assert_zeroed(image)


def test_discard_default_is_unmap(imgfs, tmp_path):
    image = allocated_image(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw"}})
    assert drive_status(mount)["options"]["discard"] == "unmap"
    assert drive_status(mount)["options"]["detect-zeroes"] == "off"
    punch_hole(mount.drive(), START, LENGTH)
    assert mount.unmount() == 0
    assert allocation(image) == "hole"


def test_discard_unaligned_reads_zeros(imgfs, tmp_path):
    """An unaligned punch: the partial blocks are zeroed, not lost."""
    image = allocated_image(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "discard": "ignore"}})
    offset, length = START + 1000, 3 * 4 * KiB + 17
    punch_hole(mount.drive(), offset, length)
    assert mount.unmount() == 0
    qemu_io(image,
            f"read -P 0xab 0 {offset}",
            f"read -P 0 {offset} {length}",
            f"read -P 0xab {offset + length} {SIZE - offset - length}")


# -- qcow2: the image stays sparse, as `qemu-img map` shows ---------------


def qcow2_image(path):
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    qemu_io(path, f"write -P 0xab 0 {SIZE}", fmt="qcow2")
    return path


def qcow2_map(image, start=START, length=LENGTH):
    """`qemu-img map --output=json` entries overlapping the range."""
    out = run("qemu-img", "map", "--output=json", "-f", "qcow2",
              image).stdout
    end = start + length
    return [e for e in json.loads(out)
            if e["start"] < end and e["start"] + e["length"] > start]


def qcow2_zeroed(image):
    qemu_io(image,
            f"read -P 0xab 0 {START}",
            f"read -P 0 {START} {LENGTH}",
            f"read -P 0xab {START + LENGTH} {SIZE - START - LENGTH}",
            fmt="qcow2")
    run("qemu-img", "check", "-q", "-f", "qcow2", image)


@pytest.mark.parametrize("detect", ["off", "on", "unmap"])
def test_detect_zeroes_qcow2(imgfs, tmp_path, detect):
    require_format("qcow2")
    image = qcow2_image(tmp_path / "disk0.qcow2")
    mount = imgfs({"disk0": {"file": image, "format": "qcow2",
                             "detect-zeroes": detect}})
    write_zeros(mount.drive(), START, LENGTH)
    assert mount.unmount() == 0
    entries = qcow2_map(image)
    assert entries, "qemu-img map lists nothing for the range"
    if detect == "off":
        assert all(e["data"] and not e["zero"] for e in entries), entries
    else:
        assert all(e["zero"] and not e["data"] for e in entries), (
            f"detect-zeroes={detect}: qemu-img map shows {entries}")
    if detect == "unmap":
        # deallocated: no host cluster behind the range any more
        assert all("offset" not in e for e in entries), entries
    # the rest is still data
    assert all(e["data"] for e in qcow2_map(image, 0, START))
    qcow2_zeroed(image)


@pytest.mark.parametrize("discard", ["unmap", "ignore"])
def test_discard_qcow2(imgfs, tmp_path, discard):
    require_format("qcow2")
    image = qcow2_image(tmp_path / "disk0.qcow2")
    mount = imgfs({"disk0": {"file": image, "format": "qcow2",
                             "discard": discard}})
    punch_hole(mount.drive(), START, LENGTH)
    assert read_at(mount.drive(), START, LENGTH) == bytes(LENGTH)
    assert mount.unmount() == 0
    entries = qcow2_map(image)
    if discard == "unmap":
        assert all(e["zero"] and "offset" not in e for e in entries), (
            f"discard=unmap: qemu-img map shows {entries}")
    qcow2_zeroed(image)
