"""qcow2 format features, each checked against what QEMU says afterwards:
feature bits (unknown compatible bits ignored, unknown autoclear bits
cleared before the first write), unknown header extensions kept intact,
the repair of an image left dirty by a crash with lazy refcounts (and no
write at all on a read-only open), internal snapshots kept intact, write
zeroes as zero clusters, overwrites in place, and resize (grow; shrink
only when the tail is unused).
"""

import errno
import json
import os
import signal
import struct

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    KiB,
    MiB,
    fallocate,
    random_image,
    read_at,
    sha256,
)
from qcow2util import (
    Model,
    assert_drive_matches,
    check,
    compare,
    create_qcow2,
    header_fields,
    info,
    killable_mount,
    patch,
    qemu_img,
    qemu_io,
    random_workload,
    sigkill,
)

SIZE = 16 * MiB
DIRTY = 1
LAZY = 1


def drive(image, **keys):
    return {"disk0": {"file": image, "format": "qcow2", **keys}}


def qemu_map(image):
    return json.loads(qemu_img("map", "-U", "--output=json",
                               str(image)).stdout)


def map_at(image, offset):
    """The qemu-img map extent holding guest OFFSET."""
    for ext in qemu_map(image):
        if ext["start"] <= offset < ext["start"] + ext["length"]:
            return ext
    raise AssertionError(f"no map extent at {offset}")


def write_through(mount, offset, data):
    fd = os.open(mount.drive(), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- feature bits and header extensions ----------------------------------


def test_unknown_compatible_bit_ignored_and_kept(imgfs, tmp_path):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE)
    h = header_fields(image)
    patch(image, 80, struct.pack(">Q", h["compatible"] | (1 << 17)))
    mount = imgfs(drive(image))
    write_through(mount, 0, b"\x42" * 65536)
    assert mount.unmount() == 0
    assert header_fields(image)["compatible"] == h["compatible"] | (1 << 17)
    check(image)
    qemu_io(image, "read -P 0x42 0 64k")


def test_unknown_autoclear_bits_cleared_on_write(imgfs, tmp_path):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE)
    patch(image, 88, struct.pack(">Q", (1 << 9) | (1 << 40)))
    before = image.read_bytes()

    mount = imgfs(drive(image, **{"read-only": True}))
    assert read_at(mount.drive(), 0, 4096) == bytes(4096)
    assert mount.unmount() == 0
    assert image.read_bytes() == before, "a read-only open wrote"

    mount = imgfs(drive(image), name="rw")
    write_through(mount, 65536, b"\x17" * 4096)
    assert mount.unmount() == 0
    assert header_fields(image)["autoclear"] == 0
    check(image)
    qemu_io(image, "read -P 0x17 64k 4k")


def test_unknown_header_extension_kept_intact(imgfs, tmp_path):
    """An extension imgfs does not know, and the backing file name stored
    behind the extensions, survive writes, growth of the L1 table and a
    resize byte for byte."""
    base = random_image(tmp_path / "base.raw", SIZE)
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, "cluster_size=4096",
                         backing="base.raw", backing_fmt="raw")
    h = header_fields(image)
    with open(image, "rb") as f:
        cluster0 = f.read(4096)
    # put our extension first: type, length, 13 bytes of payload, padding
    payload = b"imgfs-unknown"
    ext = struct.pack(">II", 0x1234ABCD, len(payload)) + payload + b"\0" * 3
    hl = h["header_length"]
    rest = cluster0[hl:]
    backing_off, backing_len = struct.unpack(">QI", cluster0[8:20])
    new = cluster0[:hl] + ext + rest
    new = new[:4096]
    patch(image, 0, new)
    patch(image, 8, struct.pack(">Q", backing_off + len(ext)))
    assert info(image)["backing-filename"] == "base.raw"
    area = lambda: image.read_bytes()[hl:backing_off + len(ext) +
                                      backing_len]
    before = area()

    model = Model.from_image(image, tmp_path)
    mount = imgfs(drive(image))
    # 4 KiB clusters: 2 MiB per L1 entry, so growing by 64 MiB grows L1
    random_workload(mount.drive(), model, seed=7, ops=20)
    os.truncate(mount.drive(), SIZE + 64 * MiB)
    model.resize(SIZE + 64 * MiB)
    write_through(mount, SIZE + 60 * MiB, b"\x99" * 8192)
    model.write(SIZE + 60 * MiB, b"\x99" * 8192)
    assert mount.unmount() == 0

    assert area() == before, "header extensions or backing name changed"
    assert header_fields(image)["l1_size"] > h["l1_size"]
    check(image)
    compare(model.save(tmp_path / "expected.raw"), image)
    assert sha256(base) == sha256(tmp_path / "base.raw")


def test_backing_format_from_extension_or_probed(imgfs, tmp_path):
    """Backing format from the header extension; without one it is
    probed (here the extension's type is made unknown)."""
    base = tmp_path / "base.qcow2"
    create_qcow2(base, SIZE)
    qemu_io(base, "write -P 0x61 0 1M")
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, backing="base.qcow2",
                         backing_fmt="qcow2")
    assert "backing file: base.qcow2 (format: qcow2)" in run_info(image)
    mount = imgfs(drive(image))
    assert read_at(mount.drive(), 0, 4096) == b"\x61" * 4096
    assert mount.unmount() == 0

    hl = header_fields(image)["header_length"]
    assert struct.unpack(">I", image.read_bytes()[hl:hl + 4])[0] == \
        0xE2792ACA
    patch(image, hl, struct.pack(">I", 0x0BADF00D))
    mount = imgfs(drive(image), name="probed")
    assert read_at(mount.drive(), 0, 4096) == b"\x61" * 4096
    assert mount.unmount() == 0


def run_info(image):
    from conftest import IMGFS_BIN, run
    return run(IMGFS_BIN, "info", image).stdout


# -- dirty images ----------------------------------------------------------


def dirty_lazy_image(tmp_path):
    """A lazy-refcounts image whose writer crashed (qemu-io abort):
    dirty bit set, refcounts missing."""
    image = create_qcow2(tmp_path / "disk0.qcow2", 64 * MiB,
                         "lazy_refcounts=on")
    qemu_io(image, "write -P 0x21 0 1M", "write -P 0x22 40M 2M")
    proc = qemu_io_abort(image, "write -P 0x12 3M 4M", "write -P 0x13 50M 1M")
    assert proc.returncode != 0
    h = header_fields(image)
    assert h["incompatible"] & DIRTY, "qemu-io abort left no dirty bit"
    report = json.loads(qemu_img("check", "--output=json", str(image),
                                 check=False).stdout)
    assert report.get("corruptions", 0) > 0, "expected broken refcounts"
    return image


def qemu_io_abort(image, *commands):
    import subprocess
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands + ("abort",):
        args += ["-c", c]
    return subprocess.run(args + [str(image)], capture_output=True)


def expected_dirty_content(tmp_path):
    model = Model(bytes(64 * MiB))
    model.write(0, b"\x21" * MiB)
    model.write(40 * MiB, b"\x22" * (2 * MiB))
    model.write(3 * MiB, b"\x12" * (4 * MiB))
    model.write(50 * MiB, b"\x13" * MiB)
    return model


def test_dirty_image_read_only_never_written(imgfs, tmp_path):
    image = dirty_lazy_image(tmp_path)
    before = image.read_bytes()
    mount = imgfs(drive(image, **{"read-only": True}))
    assert_drive_matches(mount.drive(), expected_dirty_content(tmp_path),
                         "dirty image, read-only")
    assert mount.unmount() == 0
    assert image.read_bytes() == before


def test_dirty_image_repaired_on_writable_open(imgfs, tmp_path):
    image = dirty_lazy_image(tmp_path)
    model = expected_dirty_content(tmp_path)
    mount = imgfs(drive(image))
    assert "repairing refcounts" in mount.stderr()
    # repaired before anything was written: the header is clean already
    assert not header_fields(image)["incompatible"] & DIRTY
    report = json.loads(qemu_img("check", "-U", "--output=json", str(image),
                                 check=False).stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert_drive_matches(mount.drive(), model, "repaired image")
    random_workload(mount.drive(), model, seed=3, ops=30)
    assert mount.unmount() == 0
    assert not header_fields(image)["incompatible"] & DIRTY
    report = check(image)
    assert report.get("leaks", 0) == 0, report
    compare(model.save(tmp_path / "expected.raw"), image)


def test_lazy_refcounts_dirty_bit_after_kill(imgfs, imgfs_bin, tmp_path):
    """imgfs sets the dirty bit before its first metadata change with
    lazy refcounts, clears it on a clean close, and a killed imgfs
    leaves an image the next writable open repairs."""
    image = create_qcow2(tmp_path / "disk0.qcow2", 32 * MiB,
                         "lazy_refcounts=on")
    model = Model(bytes(32 * MiB))
    mount = imgfs(drive(image))
    random_workload(mount.drive(), model, seed=11, ops=40, grow=False)
    assert header_fields(image)["incompatible"] & DIRTY
    assert mount.unmount() == 0
    assert not header_fields(image)["incompatible"] & DIRTY
    check(image)

    with killable_mount(imgfs_bin, tmp_path, drive(image),
                        name="killed") as mount:
        random_workload(mount.drive(), model, seed=12, ops=40, grow=False)
        sigkill(mount)
    assert header_fields(image)["incompatible"] & DIRTY

    mount = imgfs(drive(image), name="repair")
    assert "repairing refcounts" in mount.stderr()
    assert_drive_matches(mount.drive(), model, "after kill and repair")
    assert mount.unmount() == 0
    report = check(image)
    assert report.get("leaks", 0) == 0, report
    compare(model.save(tmp_path / "expected.raw"), image)


# -- snapshots ---------------------------------------------------------------


def test_internal_snapshots_kept_intact(imgfs, tmp_path):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, "cluster_size=4096")
    qemu_io(image, "write -P 0x31 0 3M", "write -P 0x32 9M 1M")
    qemu_img("snapshot", "-c", "first", str(image))
    qemu_io(image, "write -P 0x33 1M 2M")
    qemu_img("snapshot", "-c", "second", str(image))
    first = to_raw_snapshot(image, "first", tmp_path)
    second = to_raw_snapshot(image, "second", tmp_path)

    model = Model.from_image(image, tmp_path)
    mount = imgfs(drive(image))
    random_workload(mount.drive(), model, seed=5, ops=40, grow=False)
    # shrinking would cut the snapshots' view: refused
    with pytest.raises(OSError) as e:
        os.truncate(mount.drive(), SIZE - MiB)
    assert e.value.errno == errno.EPERM
    assert "internal snapshots" in mount.stderr()
    assert mount.unmount() == 0

    report = check(image)
    assert report.get("leaks", 0) == 0, report
    compare(model.save(tmp_path / "expected.raw"), image)
    assert to_raw_snapshot(image, "first", tmp_path) == first
    assert to_raw_snapshot(image, "second", tmp_path) == second
    names = [s["name"] for s in info(image).get("snapshots", [])]
    assert names == ["first", "second"]


def to_raw_snapshot(image, name, tmp_path):
    out = tmp_path / f"snap-{name}.raw"
    qemu_img("convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw",
             str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return sha256_bytes(data)


def sha256_bytes(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


# -- zero clusters, overwrites, resize --------------------------------------


def test_zero_writes_become_zero_clusters(imgfs, tmp_path):
    """On a v3 image punched or zeroed clusters hold no data: unallocated
    without a backing file, zero clusters over one (which must not show
    through)."""
    base = random_image(tmp_path / "base.raw", SIZE)
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, backing="base.raw",
                         backing_fmt="raw")
    qemu_io(image, "write -P 0x41 0 4M")
    lone = create_qcow2(tmp_path / "lone.qcow2", SIZE)
    qemu_io(lone, "write -P 0x41 0 4M")
    mount = imgfs({"disk0": {"file": image, "format": "qcow2"},
                   "lone": {"file": lone, "format": "qcow2"}})
    for name in ("disk0", "lone"):
        fd = os.open(mount.drive(name), os.O_RDWR)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 2 * MiB,
                  MiB)
        # over backing data only
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * MiB,
                  MiB)
        os.fsync(fd)
        os.close(fd)
        assert read_at(mount.drive(name), MiB, 2 * MiB) == bytes(2 * MiB)
        assert read_at(mount.drive(name), 8 * MiB, MiB) == bytes(MiB)
    assert mount.unmount() == 0
    for img in (image, lone):
        check(img)
        for off in (MiB, 2 * MiB, 8 * MiB):
            ext = map_at(img, off)
            assert ext["zero"] and not ext["data"], (img.name, off, ext)
            if img == image:
                assert ext["depth"] == 0, "zeros must hide the backing file"
    assert sha256(base) == sha256(tmp_path / "base.raw")


def test_overwrite_in_place_keeps_mapping(imgfs, tmp_path):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE)
    qemu_io(image, "write -P 0x51 0 4M")
    before = qemu_map(image)
    size = image.stat().st_size
    mount = imgfs(drive(image, cache="none"))
    for off in range(0, 4 * MiB, 100 * KiB):
        write_through(mount, off, b"\x52" * 4096)
    assert mount.unmount() == 0
    assert qemu_map(image) == before
    assert image.stat().st_size == size
    check(image)


def test_shrink_only_when_tail_unused(imgfs, tmp_path):
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE)
    qemu_io(image, "write -P 0x61 0 1M", "write -P 0x62 12M 64k")
    mount = imgfs(drive(image))
    with pytest.raises(OSError) as e:
        os.truncate(mount.drive(), 8 * MiB)
    assert e.value.errno == errno.EPERM
    assert "guest data at offset 12582912 would be lost" in mount.stderr()
    assert os.stat(mount.drive()).st_size == SIZE
    # free the tail, then it shrinks
    fd = os.open(mount.drive(), os.O_RDWR)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 12 * MiB,
              64 * KiB)
    os.close(fd)
    os.truncate(mount.drive(), 8 * MiB)
    assert os.stat(mount.drive()).st_size == 8 * MiB
    # growing again shows zeros, not the old data
    os.truncate(mount.drive(), SIZE)
    assert read_at(mount.drive(), 12 * MiB, 64 * KiB) == bytes(64 * KiB)
    assert mount.unmount() == 0
    assert info(image)["virtual-size"] == SIZE
    check(image)
    qemu_io(image, "read -P 0x61 0 1M", "read -P 0 12M 64k")


def test_grow_over_longer_backing_reads_zeros(imgfs, tmp_path):
    """Grown space must read as zeros even where a longer backing file
    has data (and the partial cluster at the old end, too)."""
    base = random_image(tmp_path / "base.raw", 2 * SIZE)
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE - 512,
                         backing="base.raw", backing_fmt="raw")
    mount = imgfs(drive(image))
    os.truncate(mount.drive(), SIZE + 4 * MiB)
    got = read_at(mount.drive(), SIZE - 512, 4 * MiB + 512)
    assert got == bytes(4 * MiB + 512)
    assert mount.unmount() == 0
    check(image)
    qemu_io(image, f"read -P 0 {SIZE - 512} {4 * MiB + 512}")
    assert sha256(base) == sha256(tmp_path / "base.raw")


def test_qcow2_keys_checked(imgfs_bin, tmp_path):
    """qcow2.* keys are typed: a bad value, or a key for a drive that is
    not qcow2, stops the mount with a message naming the key."""
    import subprocess

    from conftest import write_config

    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE)
    raw = tmp_path / "disk1.raw"
    raw.write_bytes(bytes(MiB))
    cases = [
        ({"disk0": {"file": image, "qcow2.l2-cache-size": "lots"}},
         "qcow2.l2-cache-size"),
        ({"disk0": {"file": raw, "format": "raw",
                    "qcow2.l2-cache-size": "1M"}},
         "key 'qcow2.l2-cache-size' does not apply"),
    ]
    for i, (drives, message) in enumerate(cases):
        config = write_config(tmp_path / f"c{i}.ini", drives)
        mnt = tmp_path / f"m{i}"
        mnt.mkdir()
        proc = subprocess.run([str(imgfs_bin), "mount", "-f", str(config),
                               str(mnt)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr


def test_refcount_structure_grows(imgfs, tmp_path):
    """512-byte clusters with 64-bit refcounts: a refcount block covers
    32 KiB and the first refcount table 2 MiB, so a few MiB of writes make
    imgfs create refcount blocks and move to bigger refcount tables; and
    growing the drive to 1 GiB needs a 256 KiB L1 table, more contiguous
    clusters than fit between two refcount blocks.  QEMU must agree with
    the result."""
    image = create_qcow2(tmp_path / "disk0.qcow2", 64 * MiB,
                         "cluster_size=512,refcount_bits=64")
    before = header_fields(image)
    model = Model(bytes(64 * MiB))
    mount = imgfs(drive(image))
    fd = os.open(mount.drive(), os.O_RDWR)
    try:
        for i in range(4):
            data = os.urandom(MiB)
            offset = (i * 5 + 1) * MiB + i * 4096 + 512
            os.pwrite(fd, data, offset)
            model.write(offset, data)
        os.ftruncate(fd, 1024 * MiB)
        model.resize(1024 * MiB)
        data = os.urandom(100000)
        os.pwrite(fd, data, 900 * MiB + 1234)
        model.write(900 * MiB + 1234, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert_drive_matches(mount.drive(), model, "after growth")
    assert mount.unmount() == 0
    after = header_fields(image)
    assert after["reftable_clusters"] > before["reftable_clusters"]
    assert after["reftable_offset"] != before["reftable_offset"]
    assert after["l1_size"] == 32768
    report = check(image)
    assert report.get("leaks", 0) == 0, report
    compare(model.save(tmp_path / "expected.raw"), image)


def test_seek_data_and_holes(imgfs, tmp_path):
    """lseek(SEEK_DATA/SEEK_HOLE) on the drive follows the qcow2 mapping
    through the backing chain: zero clusters and unallocated space with
    nothing below are holes; backing data is data."""
    base = create_qcow2(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x71 6M 1M")
    image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, backing="base.qcow2",
                         backing_fmt="qcow2")
    qemu_io(image, "write -P 0x72 1M 1M", "write -z 6M 512k",
            "write -P 0x73 10M 64k")
    mount = imgfs(drive(image))
    fd = os.open(mount.drive(), os.O_RDONLY)
    try:
        seek = lambda off, how: os.lseek(fd, off, how)
        assert seek(0, os.SEEK_DATA) == 1 * MiB
        assert seek(1 * MiB, os.SEEK_HOLE) == 2 * MiB
        assert seek(2 * MiB, os.SEEK_DATA) == 6 * MiB + 512 * KiB  # backing
        assert seek(6 * MiB + 512 * KiB, os.SEEK_HOLE) == 7 * MiB
        assert seek(7 * MiB, os.SEEK_DATA) == 10 * MiB
        assert seek(10 * MiB, os.SEEK_HOLE) == 10 * MiB + 64 * KiB
        with pytest.raises(OSError) as e:
            seek(11 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert mount.unmount() == 0
