"""Raw images through imgfs: the exposed file is the image, byte for byte.

The oracles are cmp, `qemu-img compare`, qemu-io and the image file itself
read after the daemon has gone.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    KiB,
    MiB,
    assert_same_bytes,
    create_image,
    drop_caches,
    fallocate,
    fill,
    loop_device,
    qemu_io,
    random_image,
    read_at,
    run,
    sha256,
    write_at,
)

SIZE = 64 * MiB


def patterned_image(path, size=SIZE):
    """A sparse raw image with a few distinct qemu-io patterns in it."""
    create_image(path, size)
    fill(path, 0xAB, 0, MiB)
    fill(path, 0x11, 3 * MiB + 512, 700 * KiB)
    fill(path, 0xC3, size - 2 * MiB, 2 * MiB)
    return path


def raw_drive(image, **keys):
    return {"disk0": {"file": image, "format": "raw", **keys}}


def assert_same_content(exposed, image):
    """cmp and qemu-img compare agree that EXPOSED equals IMAGE."""
    run("cmp", exposed, image)
    # -U: imgfs may hold a lock on the image, as QEMU would
    run("qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", "raw",
        exposed, image)


def test_content_equals_image(imgfs, tmp_path):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image))
    assert os.stat(mount.drive()).st_size == SIZE
    assert stat.S_ISREG(os.stat(mount.drive()).st_mode)
    assert_same_content(mount.drive(), image)


def test_multiple_drives(imgfs, tmp_path):
    sizes = {"a": 4 * MiB, "b": 16 * MiB, "c": 1 * MiB}
    drives = {}
    for name, size in sizes.items():
        image = random_image(tmp_path / f"{name}.img", size)
        drives[name] = {"file": image, "format": "raw"}
    mount = imgfs(drives)
    assert sorted(os.listdir(mount.path)) == sorted(sizes)
    for name, size in sizes.items():
        assert os.stat(mount.drive(name)).st_size == size
        assert sha256(mount.drive(name)) == sha256(drives[name]["file"])


def test_relative_image_path(imgfs, tmp_path):
    """`file` relative to the config's directory, format probed."""
    (tmp_path / "images").mkdir()
    image = patterned_image(tmp_path / "images" / "disk0.img")
    mount = imgfs({"disk0": {"file": "images/disk0.img"}})
    assert_same_content(mount.drive(), image)


@pytest.mark.parametrize(
    "cache", ["writeback", "none", "writethrough", "directsync", "unsafe"]
)
def test_writes_land_in_image(imgfs, tmp_path, cache):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image, cache=cache))
    writes = [
        (0, b"\x01" * 4096),
        (5 * MiB + 17, os.urandom(100_000)),  # unaligned both ends
        (SIZE - 1000, b"\x7f" * 1000),  # the very end
    ]
    for offset, data in writes:
        write_at(mount.drive(), offset, data)
    drop_caches()
    for offset, data in writes:
        assert read_at(mount.drive(), offset, len(data)) == data
    assert mount.unmount() == 0
    for offset, data in writes:
        assert read_at(image, offset, len(data)) == data
    qemu_io(
        image,
        "read -P 0x1 0 4096",
        f"read -P 0x7f {SIZE - 1000} 1000",
        f"read -P 0x11 {3 * MiB + 512} {700 * KiB}",  # untouched
    )


@pytest.mark.parametrize("value", ["on", "true", "yes"])
def test_read_only_drive(imgfs, tmp_path, value):
    image = patterned_image(tmp_path / "disk0.img")
    before = sha256(image)
    mtime = os.stat(image).st_mtime_ns
    mount = imgfs(raw_drive(image, **{"read-only": value}))
    assert stat.S_IMODE(os.stat(mount.drive()).st_mode) == 0o444
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as err:
            os.open(mount.drive(), flags)
        assert err.value.errno == errno.EROFS
    assert sha256(mount.drive()) == before
    assert mount.unmount() == 0
    assert sha256(image) == before
    assert os.stat(image).st_mtime_ns == mtime


@pytest.mark.parametrize("value", ["off", "false", "no"])
def test_read_write_drive(imgfs, tmp_path, value):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image, **{"read-only": value}))
    assert os.stat(mount.drive()).st_mode & stat.S_IWUSR
    write_at(mount.drive(), MiB, b"written")
    assert mount.unmount() == 0
    assert read_at(image, MiB, 7) == b"written"


# Other formats' magic at offset 0: a qcow2 v3 header start, a VMDK sparse
# extent.  A guest that writes this into a probed raw image would make the
# next open see a different format, so imgfs refuses such writes.
FOREIGN_MAGIC = [b"QFI\xfb\x00\x00\x00\x03", b"KDMV"]


@pytest.mark.parametrize("magic", FOREIGN_MAGIC, ids=["qcow2", "vmdk"])
def test_probed_raw_refuses_format_magic(imgfs, tmp_path, magic):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image}})  # format probed
    sector0 = read_at(image, 0, 512)
    fd = os.open(mount.drive(), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, magic, 0)
        assert err.value.errno == errno.EPERM
        # a whole first sector carrying the magic is refused too
        with pytest.raises(OSError) as err:
            os.pwrite(fd, magic + bytes(512 - len(magic)), 0)
        assert err.value.errno == errno.EPERM
        # ordinary writes, in sector 0 and beyond, still work
        mbr = bytes(510) + b"\x55\xaa"
        assert os.pwrite(fd, mbr, 0) == 512
        assert os.pwrite(fd, magic, MiB) == len(magic)
    finally:
        os.close(fd)
    assert mount.unmount() == 0
    assert read_at(image, 0, 512) == mbr != sector0
    assert read_at(image, MiB, len(magic)) == magic


@pytest.mark.parametrize("magic", FOREIGN_MAGIC, ids=["qcow2", "vmdk"])
def test_explicit_raw_accepts_format_magic(imgfs, tmp_path, magic):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image))
    write_at(mount.drive(), 0, magic)
    assert read_at(mount.drive(), 0, len(magic)) == magic
    assert mount.unmount() == 0
    assert read_at(image, 0, len(magic)) == magic


def test_slice(imgfs, tmp_path):
    """raw.offset/raw.size expose [1M, 17M) of a 64 MiB image."""
    image = random_image(tmp_path / "disk0.img", SIZE)
    outside = (sha256(image, 0, MiB), sha256(image, 17 * MiB))
    mount = imgfs(raw_drive(image, **{"raw.offset": "1M", "raw.size": "16M"}))
    assert os.stat(mount.drive()).st_size == 16 * MiB
    expected = tmp_path / "slice.img"
    run("dd", f"if={image}", f"of={expected}", "bs=1M", "skip=1", "count=16",
        "status=none")
    assert_same_content(mount.drive(), expected)

    # overwrite the whole slice: the bytes around it stay as they were
    data = os.urandom(16 * MiB)
    write_at(mount.drive(), 0, data)
    assert mount.unmount() == 0
    assert_same_bytes(read_at(image, MiB, 16 * MiB), data, "slice in image")
    assert (sha256(image, 0, MiB), sha256(image, 17 * MiB)) == outside
    assert os.stat(image).st_size == SIZE


@pytest.mark.parametrize(
    "mode",
    [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE],
    ids=["punch-hole", "zero-range"],
)
@pytest.mark.parametrize(
    "offset, length",
    [(MiB, 2 * MiB), (4000, 10_000)],
    ids=["aligned", "unaligned"],
)
def test_fallocate_reads_back_zeros(imgfs, tmp_path, mode, offset, length):
    image = create_image(tmp_path / "disk0.img", 8 * MiB)
    fill(image, 0xAB, 0, 8 * MiB)
    mount = imgfs(raw_drive(image))
    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        fallocate(fd, mode, offset, length)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    assert os.stat(mount.drive()).st_size == 8 * MiB
    assert read_at(mount.drive(), offset, length) == bytes(length)
    assert read_at(mount.drive(), offset - 1, 1) == b"\xab"
    assert read_at(mount.drive(), offset + length, 1) == b"\xab"
    assert mount.unmount() == 0
    qemu_io(
        image,
        f"read -P 0xab 0 {offset}",
        f"read -P 0 {offset} {length}",
        f"read -P 0xab {offset + length} {8 * MiB - offset - length}",
    )
    assert os.stat(image).st_size == 8 * MiB


def test_truncate_resizes_image(imgfs, tmp_path):
    image = patterned_image(tmp_path / "disk0.img")
    head = sha256(image, 0, 32 * MiB)
    mount = imgfs(raw_drive(image))
    os.truncate(mount.drive(), 80 * MiB)
    assert os.stat(mount.drive()).st_size == 80 * MiB
    assert os.stat(image).st_size == 80 * MiB
    assert read_at(mount.drive(), SIZE - MiB, MiB) == b"\xc3" * MiB
    assert read_at(mount.drive(), SIZE, 16 * MiB) == bytes(16 * MiB)

    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        os.ftruncate(fd, 32 * MiB)
    finally:
        os.close(fd)
    assert os.stat(mount.drive()).st_size == 32 * MiB
    assert os.stat(image).st_size == 32 * MiB
    assert sha256(mount.drive()) == head
    assert mount.unmount() == 0
    assert sha256(image) == head


def test_truncate_refused_on_slice(imgfs, tmp_path):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image, **{"raw.size": "16M"}))
    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 32 * MiB)
    finally:
        os.close(fd)
    assert err.value.errno in (errno.EPERM, errno.ENOTSUP)
    assert os.stat(mount.drive()).st_size == 16 * MiB
    assert mount.unmount() == 0
    assert os.stat(image).st_size == SIZE


def data_extents(path):
    """[(start, end)] of the data regions that lseek(SEEK_DATA) reports."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
        return extents
    finally:
        os.close(fd)


def test_seek_data_hole(imgfs, tmp_path):
    # Data at MiB boundaries, so any block-status granularity from 4 KiB
    # up to 1 MiB gives the same answer as the image file itself.
    image = create_image(tmp_path / "disk0.img", SIZE)
    fill(image, 0x01, 0, MiB)
    fill(image, 0x02, 20 * MiB, 3 * MiB)
    fill(image, 0x03, SIZE - MiB, MiB)
    expected = data_extents(image)
    assert expected == [(0, MiB), (20 * MiB, 23 * MiB), (SIZE - MiB, SIZE)]
    mount = imgfs(raw_drive(image))
    assert data_extents(mount.drive()) == expected


def test_statfs(imgfs, tmp_path):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image))
    st = os.statvfs(mount.path)
    assert st.f_bsize > 0
    assert st.f_namemax >= len("disk0")
    assert os.statvfs(mount.drive()).f_bsize == st.f_bsize


def aligned_buffer(data):
    """DATA in page-aligned memory, as O_DIRECT wants it."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def test_o_direct(imgfs, tmp_path):
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image))
    writes = [(0, 4 * KiB), (5 * MiB + 4 * KiB, 64 * KiB), (9 * MiB, MiB)]
    chunks = {off: os.urandom(n) for off, n in writes}
    fd = os.open(mount.drive(), os.O_RDWR | os.O_DIRECT)
    try:
        for offset, data in chunks.items():
            assert os.pwrite(fd, aligned_buffer(data), offset) == len(data)
        for offset, data in chunks.items():
            buf = aligned_buffer(bytes(len(data)))
            assert os.preadv(fd, [buf], offset) == len(data)
            assert buf[:] == data
        # untouched data read with O_DIRECT too
        buf = aligned_buffer(bytes(MiB))
        assert os.preadv(fd, [buf], SIZE - MiB) == MiB
        assert buf[:] == b"\xc3" * MiB
    finally:
        os.close(fd)
    assert mount.unmount() == 0
    for offset, data in chunks.items():
        assert read_at(image, offset, len(data)) == data


def test_block_device(imgfs, tmp_path):
    backing = random_image(tmp_path / "backing.img", SIZE)
    data = os.urandom(3 * MiB)
    with loop_device(backing) as device:
        mount = imgfs({"disk0": {"file": device, "format": "raw"}})
        assert os.stat(mount.drive()).st_size == SIZE
        assert_same_content(mount.drive(), backing)
        write_at(mount.drive(), 7 * MiB + 512, data)
        assert mount.unmount() == 0
    assert read_at(backing, 7 * MiB + 512, len(data)) == data


def test_size_not_multiple_of_512(imgfs, tmp_path):
    size = 1_000_000
    image = random_image(tmp_path / "odd.img", size)
    last = read_at(image, size - 100, 100)
    mount = imgfs(raw_drive(image))
    assert os.stat(mount.drive()).st_size == size
    run("cmp", mount.drive(), image)
    # a read across the end stops at the end
    assert read_at(mount.drive(), size - 100, 200) == last

    new = os.urandom(99) + b"\xee"
    write_at(mount.drive(), size - 100, new[:-1])
    write_at(mount.drive(), size - 1, new[-1:])  # the very last byte
    drop_caches()
    assert read_at(mount.drive(), size - 100, 100) == new
    assert os.stat(mount.drive()).st_size == size
    assert mount.unmount() == 0
    assert os.stat(image).st_size == size
    assert read_at(image, size - 100, 100) == new


def test_o_trunc_is_ignored(imgfs, tmp_path):
    """dd of=DRIVE without conv=notrunc opens with O_TRUNC: like a block
    device, the drive keeps its size and dd overwrites it in place."""
    size = 16 * MiB
    image = patterned_image(tmp_path / "disk0.img", size)
    backup = random_image(tmp_path / "backup.raw", size)
    mount = imgfs(raw_drive(image))
    run("dd", f"if={backup}", f"of={mount.drive()}", "bs=64k", "status=none")
    assert os.stat(mount.drive()).st_size == size
    run("cmp", backup, mount.drive())
    # an O_TRUNC open that writes nothing changes nothing either
    os.close(os.open(mount.drive(), os.O_WRONLY | os.O_TRUNC))
    assert os.stat(mount.drive()).st_size == size
    run("cmp", backup, mount.drive())
    assert mount.unmount() == 0
    assert os.stat(image).st_size == size
    run("cmp", backup, image)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.restype = ctypes.c_ssize_t


def listxattr_size(path):
    """listxattr(PATH, NULL, 0): the size of the name list (what cp -a and
    libattr ask first; os.listxattr passes a buffer straight away)."""
    n = _libc.listxattr(os.fsencode(path), None, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return n


@pytest.mark.parametrize("uring", ["off", "auto"], ids=["dev-fuse", "auto"])
def test_listxattr_of_drive(imgfs, tmp_path, uring):
    """A drive has no extended attributes: the size query answers 0, so
    `cp -a` copies the drive."""
    image = patterned_image(tmp_path / "disk0.img", 8 * MiB)
    mount = imgfs(raw_drive(image), settings={"fuse-uring": uring})
    assert listxattr_size(mount.drive()) == 0
    assert os.listxattr(mount.drive()) == []
    copy = tmp_path / "copy.img"
    run("cp", "-a", mount.drive(), copy)
    run("cmp", copy, image)


def test_truncate_to_same_size_on_slice(imgfs, tmp_path):
    """A drive that cannot be resized accepts a truncate to its own size,
    as a file does (a no-op), and refuses only a real change."""
    image = patterned_image(tmp_path / "disk0.img")
    mount = imgfs(raw_drive(image, **{"raw.size": "16M"}))
    before = sha256(mount.drive())
    run("truncate", "-s", str(16 * MiB), mount.drive())
    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        os.ftruncate(fd, 16 * MiB)
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 16 * MiB - 4096)
        assert err.value.errno in (errno.EPERM, errno.ENOTSUP)
    finally:
        os.close(fd)
    assert os.stat(mount.drive()).st_size == 16 * MiB
    assert sha256(mount.drive()) == before
    assert mount.unmount() == 0
    assert os.stat(image).st_size == SIZE
