"""Malformed qcow2 images, hand-made from qemu-img images by patching
bytes.  Each must give a clear error: either the daemon refuses to mount
and names the drive and the problem, or reads of the damaged range fail
with EIO and the log names the image, the offset and the reason -- while
another drive of the same mount keeps working.  Never a crash.
"""

import errno
import json
import os
import random
import struct
import subprocess

import pytest

from conftest import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, IMGFS_BIN,
                      SANITIZER_MARKS, MiB, drop_caches, error_lines,
                      fallocate, read_at, write_config)
from qcow2util import create_qcow2, header_fields, patch, qemu_img, qemu_io

SIZE = 8 * MiB


def good_image(path):
    """A valid image with known data: 0x5a in its first 1 MiB."""
    create_qcow2(path, SIZE)
    qemu_io(path, "write -P 0x5a 0 1M")
    return path


def data_image(path, opts=None):
    """An image with data in its first 2 MiB (several L2 entries)."""
    create_qcow2(path, SIZE, opts)
    qemu_io(path, "write -P 0x11 0 2M", f"write -P 0x22 {SIZE - MiB} 1M")
    return path


def l1_entry(path, index=0):
    h = header_fields(path)
    with open(path, "rb") as f:
        f.seek(h["l1_offset"] + 8 * index)
        return struct.unpack(">Q", f.read(8))[0]


def set_l1_entry(path, value, index=0):
    h = header_fields(path)
    patch(path, h["l1_offset"] + 8 * index, struct.pack(">Q", value))


def l2_entry_offset(path, index):
    """Where L2 entry INDEX (of the first L2 table) lives in the file."""
    return (l1_entry(path) & 0x00FFFFFFFFFFFE00) + 8 * index


def mount_fails(imgfs_bin, tmp_path, drives):
    """Run `imgfs mount -f` on DRIVES; it must refuse.  Its stderr."""
    config = write_config(tmp_path / "bad.ini", drives)
    mnt = tmp_path / "mnt-refused"
    mnt.mkdir()
    proc = subprocess.run([str(imgfs_bin), "mount", "-f", str(config),
                           str(mnt)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0, "imgfs mounted a broken image"
    assert not any(m in proc.stderr for m in SANITIZER_MARKS), proc.stderr
    return proc.stderr


def both(tmp_path, bad):
    return {"good": {"file": good_image(tmp_path / "good.qcow2"),
                     "format": "qcow2"},
            "bad": {"file": bad, "format": "qcow2"}}


def assert_eio(path, offset, length):
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        with pytest.raises(OSError) as e:
            f.read(length)
    assert e.value.errno == errno.EIO


def assert_good_works(mount):
    assert read_at(mount.drive("good"), 0, MiB) == b"\x5a" * MiB
    with open(mount.drive("good"), "r+b") as f:
        f.write(b"\x01" * 4096)
    assert read_at(mount.drive("good"), 0, 4096) == b"\x01" * 4096


# -- refused at mount ----------------------------------------------------


def bad_magic(path):
    patch(path, 0, b"QFI\x00")
    return "not a qcow2 image"


def huge_l1(path):
    patch(path, 36, struct.pack(">I", 0x40000000))
    return "L1 table is too large"


def l1_past_end(path):
    patch(path, 40, struct.pack(">Q", 1 << 40))
    return "L1 table at offset 0x10000000000 is past the end of the file"


def l1_misaligned(path):
    h = header_fields(path)
    patch(path, 40, struct.pack(">Q", h["l1_offset"] + 512))
    return "is not aligned to a cluster"


def reftable_past_end(path):
    patch(path, 48, struct.pack(">Q", 1 << 40))
    return "refcount table at offset 0x10000000000 is past the end"


def reftable_misaligned(path):
    h = header_fields(path)
    patch(path, 48, struct.pack(">Q", h["reftable_offset"] + 4096))
    return "refcount table at offset"


def refblock_past_end(path):
    h = header_fields(path)
    patch(path, h["reftable_offset"], struct.pack(">Q", 1 << 40))
    return "refcount block 0 at offset 0x10000000000 is past the end"


def refblock_misaligned(path):
    h = header_fields(path)
    with open(path, "rb") as f:
        f.seek(h["reftable_offset"])
        rb = struct.unpack(">Q", f.read(8))[0]
    patch(path, h["reftable_offset"], struct.pack(">Q", rb + 4096))
    return "is not aligned to a cluster"


def unknown_incompatible_named(path):
    """Incompatible bit 20, named in a feature table we add."""
    h = header_fields(path)
    patch(path, 72, struct.pack(">Q", h["incompatible"] | (1 << 20)))
    # replace the header extensions with a feature table and the end mark
    table = struct.pack(">BB46s", 0, 20, b"imaginary feature")
    ext = struct.pack(">II", 0x6803F857, len(table)) + table
    patch(path, h["header_length"], ext + b"\0" * 8)
    return "'imaginary feature' (incompatible bit 20)"


def unknown_incompatible_bit(path):
    h = header_fields(path)
    patch(path, 72, struct.pack(">Q", h["incompatible"] | (1 << 33)))
    return "incompatible bit 33"


REFUSED = {
    "bad-magic": bad_magic,
    "huge-l1-size": huge_l1,
    "l1-past-end": l1_past_end,
    "l1-misaligned": l1_misaligned,
    "reftable-past-end": reftable_past_end,
    "reftable-misaligned": reftable_misaligned,
    "refblock-past-end": refblock_past_end,
    "refblock-misaligned": refblock_misaligned,
    "unknown-incompatible-named": unknown_incompatible_named,
    "unknown-incompatible-bit": unknown_incompatible_bit,
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_mount(imgfs_bin, tmp_path, case):
    bad = data_image(tmp_path / "bad.qcow2")
    reason = REFUSED[case](bad)
    stderr = mount_fails(imgfs_bin, tmp_path, both(tmp_path, bad))
    assert "drive 'bad'" in stderr, stderr
    assert reason in stderr, stderr


def test_backing_loop_refused(imgfs_bin, tmp_path):
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    create_qcow2(b, SIZE)
    create_qcow2(a, SIZE, backing="b.qcow2", backing_fmt="qcow2")
    # b's backing file becomes a: a loop (qemu-img rebase -u is unsafe
    # mode: it only rewrites the header)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
             str(b))
    stderr = mount_fails(imgfs_bin, tmp_path, both(tmp_path, a))
    assert "drive 'bad'" in stderr, stderr
    assert "backing chain loop" in stderr, stderr


def test_backing_chain_depth(imgfs, imgfs_bin, tmp_path):
    """A chain of 64 images opens; one more is refused (loop guard)."""
    prev = tmp_path / "c0.qcow2"
    create_qcow2(prev, SIZE)
    qemu_io(prev, "write -P 0x7e 0 64k")
    for i in range(1, 64):
        img = tmp_path / f"c{i}.qcow2"
        create_qcow2(img, SIZE, backing=prev.name, backing_fmt="qcow2")
        prev = img
    mount = imgfs({"disk0": {"file": prev, "format": "qcow2"}})
    assert read_at(mount.drive(), 0, 4096) == b"\x7e" * 4096
    assert mount.unmount() == 0
    top = tmp_path / "c64.qcow2"
    create_qcow2(top, SIZE, backing=prev.name, backing_fmt="qcow2")
    stderr = mount_fails(imgfs_bin, tmp_path, both(tmp_path, top))
    assert "longer than 64 images" in stderr, stderr


def test_backing_offset_wrap_refused(imgfs_bin, tmp_path):
    """A backing file name offset near 2^64: offset + size wraps past
    zero.  The image is refused with one clear line, by the mount and by
    `imgfs info`, instead of reading the name from outside the header."""
    base = create_qcow2(tmp_path / "base.qcow2", SIZE)
    bad = create_qcow2(tmp_path / "bad.qcow2", SIZE, backing=base.name,
                       backing_fmt="qcow2")
    patch(bad, 8, struct.pack(">QI", 2**64 - 16, 32))
    assert_refused(imgfs_bin, tmp_path, bad,
                   "invalid backing file name (offset 0xfffffffffffffff0, "
                   "32 bytes)")


def test_self_backing_refused(imgfs_bin, tmp_path):
    a = create_qcow2(tmp_path / "a.qcow2", SIZE)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
             str(a))
    stderr = mount_fails(imgfs_bin, tmp_path, both(tmp_path, a))
    assert "backing chain loop" in stderr, stderr


# -- EIO on the damaged range ---------------------------------------------


def l2_past_end(path):
    set_l1_entry(path, (1 << 40) | (1 << 63))
    return 0, "L2 table offset 0x10000000000 is past the end of the file"


def l2_misaligned(path):
    set_l1_entry(path, (l1_entry(path) + 512) | (1 << 63))
    return 0, "is not aligned to a cluster"


def l2_over_reftable(path):
    h = header_fields(path)
    set_l1_entry(path, h["reftable_offset"] | (1 << 63))
    return 0, "overlaps the refcount table"


def data_cluster_misaligned(path):
    at = l2_entry_offset(path, 3)
    with open(path, "rb") as f:
        f.seek(at)
        entry = struct.unpack(">Q", f.read(8))[0]
    patch(path, at, struct.pack(">Q", entry + 4096))
    return 3 * 65536, "is not aligned"


def data_cluster_past_end(path):
    patch(path, l2_entry_offset(path, 2),
          struct.pack(">Q", (1 << 63) | (1 << 44)))
    return 2 * 65536, "past the end of the file"


def data_cluster_over_l1(path):
    """A data cluster that is the L1 table: not served as guest data."""
    patch(path, l2_entry_offset(path, 2),
          struct.pack(">Q", header_fields(path)["l1_offset"]))
    return 2 * 65536, "overlaps the L1 table"


def compressed_past_end(path):
    """A compressed cluster whose data offset lies past the file's end."""
    at = l2_entry_offset(path, 1)
    with open(path, "rb") as f:
        f.seek(at)
        entry = struct.unpack(">Q", f.read(8))[0]
    assert entry & (1 << 62), "qemu-img did not compress cluster 1"
    x = 62 - (16 - 8)  # 64 KiB clusters
    sectors = entry & ~((1 << x) - 1)
    patch(path, at, struct.pack(">Q", sectors | (1 << 40)))
    return 65536, "compressed cluster"


def compressed_garbage(path):
    """A compressed cluster whose data does not inflate."""
    at = l2_entry_offset(path, 1)
    with open(path, "rb") as f:
        f.seek(at)
        entry = struct.unpack(">Q", f.read(8))[0]
    x = 62 - (16 - 8)
    patch(path, entry & ((1 << x) - 1), b"\xff" * 64)
    return 65536, "does not decompress"


# (damage, how the image is made): damage to the first L2 table needs
# small clusters, so that the end of the drive has a table of its own.
EIO = {
    "l2-past-end": (l2_past_end, "4k"),
    "l2-misaligned": (l2_misaligned, "4k"),
    "l2-overlaps-reftable": (l2_over_reftable, "4k"),
    "data-cluster-misaligned": (data_cluster_misaligned, None),
    "data-cluster-past-end": (data_cluster_past_end, None),
    "data-cluster-over-l1": (data_cluster_over_l1, None),
    "compressed-past-end": (compressed_past_end, "compress"),
    "compressed-garbage": (compressed_garbage, "compress"),
}


@pytest.mark.parametrize("case", list(EIO))
def test_eio_on_damaged_range(imgfs, tmp_path, case):
    damage, kind = EIO[case]
    if kind == "compress":
        src = data_image(tmp_path / "src.qcow2")
        bad = tmp_path / "bad.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", str(src), str(bad))
    elif kind == "4k":
        bad = data_image(tmp_path / "bad.qcow2", "cluster_size=4096")
    else:
        bad = data_image(tmp_path / "bad.qcow2")
    offset, reason = damage(bad)
    before = bad.read_bytes()
    mount = imgfs(both(tmp_path, bad))

    assert_eio(mount.drive("bad"), offset, 65536)
    assert_eio(mount.drive("bad"), offset, 65536)  # and again
    assert_good_works(mount)
    # an undamaged part of the broken drive still reads
    assert read_at(mount.drive("bad"), SIZE - MiB, 4096) == b"\x22" * 4096
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert "corrupt image at offset 0x" in log, log
    assert reason in log, log
    assert mount.unmount() == 0
    # reads never write: the broken image is untouched
    assert bad.read_bytes() == before


def test_write_into_damaged_table_fails(imgfs, tmp_path):
    bad = data_image(tmp_path / "bad.qcow2")
    l2_past_end(bad)
    mount = imgfs(both(tmp_path, bad))
    fd = os.open(mount.drive("bad"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, 4096)
            os.fsync(fd)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert_good_works(mount)
    assert mount.unmount() == 0


def test_corrupt_bit_opens_read_only(imgfs, tmp_path):
    """An image marked corrupt is served read-only, and left as it is."""
    bad = data_image(tmp_path / "bad.qcow2")
    h = header_fields(bad)
    patch(bad, 72, struct.pack(">Q", h["incompatible"] | 2))
    before = bad.read_bytes()
    mount = imgfs(both(tmp_path, bad))
    assert read_at(mount.drive("bad"), 0, 4096) == b"\x11" * 4096
    fd = os.open(mount.drive("bad"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 4096, 0)
        assert e.value.errno == errno.EROFS
    finally:
        os.close(fd)
    assert "marked corrupt" in mount.stderr()
    assert_good_works(mount)
    assert mount.unmount() == 0
    assert bad.read_bytes() == before


def test_overlap_check_refuses_to_reuse_metadata(imgfs, tmp_path):
    """The refcount of an L2 table wrongly reads 0, so the allocator could
    hand its cluster out for data: the overlap check catches it, the write
    fails, the image is marked corrupt, and the table is left intact."""
    bad = data_image(tmp_path / "bad.qcow2", "cluster_size=4096")
    h = header_fields(bad)
    l2 = l1_entry(bad) & 0x00FFFFFFFFFFFE00
    with open(bad, "rb") as f:
        f.seek(h["reftable_offset"])
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2)
        table = f.read(4096)
    patch(bad, block + 2 * (l2 // 4096), struct.pack(">H", 0))
    mount = imgfs(both(tmp_path, bad))
    fd = os.open(mount.drive("bad"), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            # a fresh L2 table's worth away: needs new clusters
            os.pwrite(fd, b"y" * 4096, 4 * MiB)
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError):
            os.pwrite(fd, b"y" * 4096, 0)  # writes are refused now
    finally:
        os.close(fd)
    assert read_at(mount.drive("bad"), 0, 4096) == b"\x11" * 4096
    log = mount.stderr()
    assert "an L2 table has refcount 0" in log, log
    assert "marking the image corrupt" in log, log
    assert_good_works(mount)
    assert mount.unmount() == 0
    with open(bad, "rb") as f:
        f.seek(l2)
        assert f.read(4096) == table
    assert header_fields(bad)["incompatible"] & 2, "corrupt bit not set"


# -- writes through damaged L2 entries --------------------------------------
#
# A write must never go through an entry that names a host cluster it does
# not own: it fails with EIO and a log line, and the image is left as it
# was (or at least no worse by qemu-img check); other guest data is intact.


def assert_write_eio(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


def damage(path):
    """qemu-img check's counts of what is wrong with the image."""
    proc = qemu_img("check", "--output=json", str(path), check=False)
    report = json.loads(proc.stdout)
    return {k: report.get(k, 0)
            for k in ("corruptions", "leaks", "check-errors")}


def assert_no_worse(path, before):
    after = damage(path)
    assert all(after[k] <= before[k] for k in before), (before, after)


def test_zero_alloc_past_end_not_written(imgfs, tmp_path):
    """A preallocated-zero entry (ZERO + COPIED) whose host offset lies
    1 TiB past the end of the file: a write there must not go in place,
    which would grow the file to 1 TiB with a cluster no refcount
    covers."""
    bad = data_image(tmp_path / "bad.qcow2")
    cluster = 40  # unallocated until now
    patch(bad, l2_entry_offset(bad, cluster),
          struct.pack(">Q", (1 << 63) | (1 << 40) | 1))
    before = bad.read_bytes()
    checked = damage(bad)
    mount = imgfs(both(tmp_path, bad))

    assert_write_eio(mount.drive("bad"), cluster * 65536, b"\xee" * 4096)
    assert_good_works(mount)
    assert read_at(mount.drive("bad"), 0, 4096) == b"\x11" * 4096
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert "data cluster 0x10000000000 is past the end of the file" in log
    assert mount.unmount() == 0
    assert os.path.getsize(bad) == len(before)
    assert bad.read_bytes() == before
    assert_no_worse(bad, checked)


def test_bogus_entry_never_freed(imgfs, tmp_path):
    """A misaligned entry (no COPIED) in an unallocated-looking cluster
    names a cluster that guest cluster 1 owns.  Neither a write that
    covers it whole (after a cluster that needs allocating) nor a hole
    punched over it may free that cluster: the allocator would hand it out
    again and another write would overwrite guest cluster 1."""
    bad = data_image(tmp_path / "bad.qcow2")
    with open(bad, "rb") as f:
        f.seek(l2_entry_offset(bad, 1))
        host1 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    cluster = 40  # unallocated until now
    patch(bad, l2_entry_offset(bad, cluster), struct.pack(">Q", host1 + 512))
    checked = damage(bad)
    mount = imgfs(both(tmp_path, bad))
    drive = mount.drive("bad")

    assert_write_eio(drive, (cluster - 1) * 65536, b"\xaa" * 131072)
    fd = os.open(drive, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      cluster * 65536, 65536)
        assert e.value.errno == errno.EIO
        # new clusters: had cluster 1's been freed, one would be it
        for i in range(4):
            os.pwrite(fd, b"\xbb" * 65536, (60 + i) * 65536)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    assert read_at(drive, 65536, 65536) == b"\x11" * 65536
    assert read_at(drive, 60 * 65536, 65536) == b"\xbb" * 65536
    assert_good_works(mount)
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert f"cluster offset {host1 + 512:#x} is not aligned" in log, log
    assert mount.unmount() == 0
    out = qemu_io(bad, "read -P 0x11 64k 64k", f"read -P 0xbb {60 * 65536} 256k")
    assert "verification failed" not in out.stdout, out.stdout
    assert_no_worse(bad, checked)


def metadata_target(path, what):
    """(offset, name) of a metadata cluster of the image."""
    h = header_fields(path)
    if what == "l1":
        return h["l1_offset"], "the L1 table"
    if what == "refblock":
        with open(path, "rb") as f:
            f.seek(h["reftable_offset"])
            return struct.unpack(">Q", f.read(8))[0], "a refcount block"
    return l1_entry(path) & 0x00FFFFFFFFFFFE00, "an L2 table"


# (metadata the entry points at, guest cluster, entry flags): a COPIED
# data cluster is written in place; a COPIED preallocated-zero one keeps
# its host cluster through the allocating path.
OVER_METADATA = {
    "l1-in-place": ("l1", 3, 1 << 63),
    "refblock-in-place": ("refblock", 3, 1 << 63),
    "l2-zero-alloc": ("l2", 40, (1 << 63) | 1),
}


@pytest.mark.parametrize("case", list(OVER_METADATA))
def test_guest_write_never_overwrites_metadata(imgfs, tmp_path, case):
    """An L2 entry pointing at a metadata cluster: a guest write there is
    caught by the overlap check before any byte goes out -- EIO, the
    image is marked corrupt, the metadata and the other data stay."""
    what, cluster, flags = OVER_METADATA[case]
    bad = data_image(tmp_path / "bad.qcow2")
    target, name = metadata_target(bad, what)
    patch(bad, l2_entry_offset(bad, cluster), struct.pack(">Q", target | flags))
    with open(bad, "rb") as f:
        f.seek(target)
        meta = f.read(65536)
    checked = damage(bad)
    mount = imgfs(both(tmp_path, bad))
    drive = mount.drive("bad")

    assert_write_eio(drive, cluster * 65536, b"\x00" * 65536)
    fd = os.open(drive, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"y" * 4096, 0)  # writes are refused now
            os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    assert read_at(drive, 0, 4096) == b"\x11" * 4096
    assert read_at(drive, SIZE - MiB, MiB) == b"\x22" * MiB
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert f"refusing to write guest data over {name}" in log, log
    assert "marking the image corrupt" in log, log
    assert_good_works(mount)
    assert mount.unmount() == 0
    with open(bad, "rb") as f:
        f.seek(target)
        assert f.read(65536) == meta
    assert header_fields(bad)["incompatible"] & 2, "corrupt bit not set"
    assert_no_worse(bad, checked)


# -- compressed L2 entries naming bogus host ranges -------------------------
#
# A compressed entry names a byte range, not a cluster: its host clusters
# are shared with the neighbouring compressed clusters.  One that lies
# past the end of the file or inside metadata must not be read as guest
# data, and replacing it must never free those host clusters: they are
# someone else's (or do not exist).

CBITS = 62 - (16 - 8)  # where the sector count starts, 64 KiB clusters


def compressed_image(tmp_path):
    """A compressed copy of known data: guest clusters 0-31 half random
    (so each compresses to about half a cluster and the host clusters are
    shared), the last MiB 0x22.  (image, expected guest bytes)"""
    rng = random.Random(7)
    data = bytearray(SIZE)
    for c in range(32):
        data[c * 65536:c * 65536 + 32768] = rng.randbytes(32768)
    data[SIZE - MiB:] = b"\x22" * MiB
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    bad = tmp_path / "bad.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(bad))
    return bad, data


def compressed_entry(offset, sectors):
    """A compressed L2 entry: SECTORS 512-byte sectors from OFFSET."""
    return (1 << 62) | ((sectors - 1) << CBITS) | offset


def set_compressed(path, cluster, offset, sectors):
    at = l2_entry_offset(path, cluster)
    with open(path, "rb") as f:
        f.seek(at)
        old = struct.unpack(">Q", f.read(8))[0]
    assert old & (1 << 62), f"qemu-img did not compress cluster {cluster}"
    patch(path, at, struct.pack(">Q", compressed_entry(offset, sectors)))


def refcount(path, offset):
    """The refcount of the host cluster at OFFSET (64 KiB clusters,
    16-bit refcounts: qemu-img's defaults)."""
    h = header_fields(path)
    assert h["refcount_order"] == 4 and h["cluster_bits"] == 16
    index = offset >> 16
    with open(path, "rb") as f:
        f.seek(h["reftable_offset"] + 8 * (index >> 15))
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * (index & 0x7FFF))
        return struct.unpack(">H", f.read(2))[0]


def punch_eio(drive, offset, length):
    fd = os.open(drive, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                      length)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


def assert_guest_data(drive, data, skip, what):
    """Every guest cluster of DRIVE but those in SKIP holds DATA's bytes."""
    drop_caches()
    with open(drive, "rb") as f:
        for c in range(SIZE // 65536):
            if c in skip:
                continue
            f.seek(c * 65536)
            assert f.read(65536) == data[c * 65536:(c + 1) * 65536], (
                f"{what}: guest cluster {c}")


def past_end_far(path):
    return 1 << 40, 65


def past_end_straddling(path):
    """Starts inside the last cluster of the file (shared by the last
    compressed clusters) and runs into the cluster after the end."""
    last = (os.path.getsize(path) - 1) & ~0xFFFF
    return last + 4096, 128


@pytest.mark.parametrize("where", [past_end_far, past_end_straddling],
                         ids=["far", "straddling"])
def test_compressed_past_end(imgfs, tmp_path, where):
    """A compressed entry whose range runs past the end of the file: a
    read is EIO, and so are a full-cluster write and a hole punch over
    it, which would otherwise free host clusters that do not exist or
    belong to other compressed clusters.  The image is left as it was."""
    bad, data = compressed_image(tmp_path)
    offset, sectors = where(bad)
    for cluster in (1, 3):
        set_compressed(bad, cluster, offset, sectors)
    last = (os.path.getsize(bad) - 1) & ~0xFFFF
    last_refs = refcount(bad, last)
    before = bad.read_bytes()
    checked = damage(bad)
    mount = imgfs(both(tmp_path, bad))
    drive = mount.drive("bad")

    assert_eio(drive, 65536, 65536)
    assert_write_eio(drive, 65536, b"\xaa" * 65536)
    punch_eio(drive, 3 * 65536, 65536)
    # other clusters, compressed or not, still read
    assert_guest_data(drive, data, {1, 3}, "after the failed writes")
    assert_good_works(mount)
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert (f"compressed cluster at {offset:#x} lies past the end of the "
            "file") in log, log
    assert "not freeing its clusters" in log, log
    assert mount.unmount() == 0
    assert refcount(bad, last) == last_refs
    assert bad.read_bytes() == before
    assert_no_worse(bad, checked)


@pytest.mark.parametrize("what", ["l1", "refblock"])
def test_compressed_over_metadata(imgfs, tmp_path, what):
    """A compressed entry whose range lies in the L1 table or a refcount
    block: a read is EIO (never metadata served as guest data); a
    full-cluster write allocates a new cluster and succeeds, but leaves
    the metadata cluster's reference alone; a hole punch is EIO.  New
    clusters never land on the metadata, which stays intact."""
    bad, data = compressed_image(tmp_path)
    target, name = metadata_target(bad, what)
    for cluster in (1, 3, 5):
        set_compressed(bad, cluster, target + 1024, 2)
    refs = refcount(bad, target)
    with open(bad, "rb") as f:
        f.seek(target)
        meta = f.read(65536)
    checked = damage(bad)
    mount = imgfs(both(tmp_path, bad))
    drive = mount.drive("bad")

    assert_eio(drive, 65536, 65536)
    # written whole: nothing of the old cluster is read, a new one is
    # allocated and the old range is not freed
    fd = os.open(drive, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"\xaa" * 65536, 65536) == 65536
        os.fsync(fd)
    finally:
        os.close(fd)
    punch_eio(drive, 3 * 65536, 65536)
    fd = os.open(drive, os.O_WRONLY)
    try:
        # new clusters: had the metadata cluster been freed, one would be it
        for i in range(4):
            os.pwrite(fd, b"\xbb" * 65536, (60 + i) * 65536)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_at(drive, 65536, 65536) == b"\xaa" * 65536
    assert read_at(drive, 60 * 65536, 4 * 65536) == b"\xbb" * 4 * 65536
    data[65536:2 * 65536] = b"\xaa" * 65536
    data[60 * 65536:64 * 65536] = b"\xbb" * 4 * 65536
    assert_guest_data(drive, data, {3, 5}, "after the writes")
    assert_eio(drive, 5 * 65536, 65536)
    assert_good_works(mount)
    log = mount.stderr()
    assert "drive 'bad'" in log and "bad.qcow2" in log, log
    assert (f"compressed cluster at {target + 1024:#x} overlaps {name}"
            in log), log
    assert "not freeing its clusters" in log, log
    assert "marking the image corrupt" not in log, log
    assert mount.unmount() == 0
    assert refcount(bad, target) == refs
    if what == "l1":
        with open(bad, "rb") as f:
            f.seek(target)
            assert f.read(65536) == meta
    assert_no_worse(bad, checked)
    out = qemu_io(bad, "read -P 0xaa 64k 64k",
                  f"read -P 0xbb {60 * 65536} 256k")
    assert "verification failed" not in out.stdout, out.stdout


# -- header extensions and the snapshot table: offsets near 2^64 ------------


def assert_refused(imgfs_bin, tmp_path, bad, reason):
    """The mount and `imgfs info` both refuse BAD with one clear line
    naming it, at once and without a sanitizer report."""
    stderr = mount_fails(imgfs_bin, tmp_path, both(tmp_path, bad))
    assert "drive 'bad'" in stderr and reason in stderr, stderr
    proc = subprocess.run([str(IMGFS_BIN), "info", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert not any(m in proc.stderr for m in SANITIZER_MARKS), proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "bad.qcow2" in lines[0], proc.stderr
    assert reason in lines[0], proc.stderr


def bitmaps_extension(path):
    """Where the bitmaps header extension's data starts in the file."""
    h = header_fields(path)
    with open(path, "rb") as f:
        hdr = f.read(65536)
    pos = h["header_length"]
    while True:
        kind, length = struct.unpack(">II", hdr[pos:pos + 8])
        assert kind, "no bitmaps extension"
        if kind == 0x23852875:
            return pos + 8
        pos += 8 + (length + 7) // 8 * 8


# (directory offset, size): None keeps qemu-img's offset.  Before the
# fix, the huge size looped at open registering 2^46 clusters, and the
# wrapping offset was accepted.
BITMAP_DIR = {
    "huge-size": (None, 1 << 62),
    "offset-wraps": (2**64 - 65536, 131072),
    "past-end": (1 << 40, 65536),
}


def bitmap_image(path):
    """data_image() with a bitmap; and where its extension's data is."""
    img = data_image(path)
    qemu_img("bitmap", "--add", str(img), "bm0")
    return img, bitmaps_extension(img)


@pytest.mark.parametrize("case", list(BITMAP_DIR))
def test_bitmap_directory_refused(imgfs_bin, tmp_path, case):
    offset, size = BITMAP_DIR[case]
    bad, at = bitmap_image(tmp_path / "bad.qcow2")
    if offset is None:
        offset = struct.unpack(">Q", bad.read_bytes()[at + 16:at + 24])[0]
    patch(bad, at + 8, struct.pack(">QQ", size, offset))
    assert_refused(imgfs_bin, tmp_path, bad,
                   f"invalid bitmap directory (offset {offset:#x}, "
                   f"{size} bytes)")


def test_stale_bitmaps_extension_ignored(imgfs, tmp_path):
    """Without its autoclear bit the bitmaps extension is stale (written
    over by a program that does not keep bitmaps): ignored, as QEMU
    ignores it, however wrong its directory -- its clusters may hold
    guest data by now."""
    img, at = bitmap_image(tmp_path / "stale.qcow2")
    patch(img, at + 8, struct.pack(">QQ", 1 << 62, 2**64 - 65536))
    patch(img, 88, struct.pack(">Q", 0))  # autoclear: bitmaps not valid
    # QEMU accepts it too: the stale bitmaps' clusters are only leaks
    assert qemu_img("check", str(img), check=False).returncode in (0, 3)
    mount = imgfs({"d": {"file": img, "format": "qcow2"}})
    assert read_at(mount.drive("d"), 0, 4096) == b"\x11" * 4096
    fd = os.open(mount.drive("d"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x33" * 65536, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert mount.unmount() == 0
    assert qemu_img("check", str(img), check=False).returncode in (0, 3)
    out = qemu_io(img, f"read -P 0x33 {3 * MiB} 64k", "read -P 0x11 0 1M")
    assert "verification failed" not in out.stdout, out.stdout


# (L1 offset, entries) of a snapshot: the end wraps past 2^64 to a small
# number, or the offset is negative as an int64 -- both were accepted.
SNAPSHOT_L1 = {
    "end-wraps": (2**64 - 65536, 0x2001),
    "offset-negative": (1 << 63, 1),
}


@pytest.mark.parametrize("case", list(SNAPSHOT_L1))
def test_snapshot_l1_wrap_refused(imgfs_bin, tmp_path, case):
    offset, entries = SNAPSHOT_L1[case]
    bad = data_image(tmp_path / "bad.qcow2")
    qemu_img("snapshot", "-c", "snap1", str(bad))
    with open(bad, "rb") as f:
        f.seek(64)
        table = struct.unpack(">Q", f.read(8))[0]
    patch(bad, table, struct.pack(">QI", offset, entries))
    assert_refused(imgfs_bin, tmp_path, bad,
                   f"the L1 table of snapshot 'snap1' (offset {offset:#x}, "
                   f"{entries} entries) is invalid")


def test_snapshot_names_past_end_refused(imgfs_bin, tmp_path):
    """A snapshot whose id and name run past the end of the file: it was
    read as zeros, and the overlap map claimed the clusters after the end
    of the file, where the allocator appends."""
    bad = create_qcow2(tmp_path / "bad.qcow2", SIZE)
    qemu_img("snapshot", "-c", "snap1", str(bad))
    with open(bad, "rb") as f:
        f.seek(64)
        table = struct.unpack(">Q", f.read(8))[0]
    assert table + 65536 > os.path.getsize(bad)
    patch(bad, table + 12, struct.pack(">HH", 65535, 65535))
    assert_refused(imgfs_bin, tmp_path, bad,
                   "the snapshot table runs past the end of the file")
