"""vmdk driver: every common subformat, read and write, checked against
qemu-img/qemu-io (the oracle), plus hand-written descriptors (mixed
extents with RDONLY/NOACCESS/ZERO, a delta disk), a hand-made COWD
(VMDK3) extent, malformed images made by patching qemu-img's output,
imgfs info, and fio async O_DIRECT verify.

The COWD images are written by make_cowd() below, in this layout (all
little-endian, offsets in 512-byte sectors):
  sector 0    header: "COWD", version 1, flags 3, capacity, grain size,
              grain directory sector (4), directory entries, next free
              sector
  sector 4    grain directory: one 32-bit sector offset per grain table
  then        grain tables of 4096 32-bit entries (32 sectors each),
              0 = grain not present
  then        the grains, in the order they were written
"""
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import mounts_under
from qcow2util import killable_mount, sigkill

ROOT = Path(__file__).resolve().parent.parent
IMGFS = os.environ.get("IMGFS_BIN") or str(ROOT / "build" / "imgfs")
MiB = 1 << 20
GiB = 1 << 30
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer",
                   "UndefinedBehaviorSanitizer", "runtime error:")


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True,
                          capture_output=True, text=True, **kw)


def qemu_io(img, *cmds, fmt="vmdk"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, img)


def to_raw(img, out):
    run("qemu-img", "convert", "-O", "raw", img, out)
    return Path(out).read_bytes()


def qemu_check(img):
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


def imgfs_info(img):
    r = run(IMGFS, "info", "--json", img)
    return json.loads(r.stdout)


_mount_ids = itertools.count()


@contextmanager
def mounted(imgfs, image, extra=None):
    """Mount @image as drive 'd' with the conftest `imgfs` fixture (which
    checks the daemon's exit and sanitizer reports); unmount at the end
    of the block.  Yields .path (the drive's file) and .logtext()."""
    keys = {"file": str(image)}
    keys.update(extra or {})
    m = imgfs({"d": keys}, name="mnt%d" % next(_mount_ids))
    yield SimpleNamespace(path=m.drive("d"), logtext=m.stderr)
    assert m.unmount() == 0, m.stderr()


def mount_error(tmp, image, extra=None):
    """Mounting @image must fail; return imgfs's message."""
    tmp = Path(tmp)
    n = next(_mount_ids)
    mnt = tmp / ("bad%d" % n)
    mnt.mkdir()
    cfg = tmp / ("bad%d.ini" % n)
    lines = ["[d]", "file = %s" % image]
    lines += ["%s = %s" % kv for kv in (extra or {}).items()]
    cfg.write_text("\n".join(lines) + "\n")
    try:
        r = subprocess.run([IMGFS, "mount", "-f", str(cfg), str(mnt)],
                           capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        raise AssertionError("%s mounted, but it should not" % image)
    for mark in SANITIZER_MARKS:
        assert mark not in r.stderr, r.stderr
    assert r.returncode != 0, r.stderr
    return r.stderr


def read_all(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while True:
            b = os.read(fd, 4 * MiB)
            if not b:
                return bytes(out)
            out += b
    finally:
        os.close(fd)


def pread(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def random_writes(dev, expected, size, seed, count=40, lo=0):
    """Same random writes (aligned and not) to the mounted file and to
    the expected raw file."""
    rnd = random.Random(seed)
    fd = os.open(dev, os.O_RDWR)
    fe = os.open(expected, os.O_RDWR)
    try:
        for i in range(count):
            n = rnd.choice([512, 4096, 65536, 70000, 1234, 200 * 1024])
            off = rnd.randrange(lo, size - n)
            if i % 2:
                off &= ~511
            data = rnd.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            os.pwrite(fe, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(fe)


# ---- the subformats qemu-img makes ------------------------------------

SIZE = 24 * MiB
FILL = ["write -P 0xab 0 100k", "write -P 0xcd 3M 64k",
        "write -P 0x11 %d 192k" % (SIZE - 192 * 1024),
        "write -z 8M 64k", "write -P 0x5a 9000k 5k"]


def make_image(tmp, subformat, size=SIZE, fill=FILL):
    img = Path(tmp) / ("%s.vmdk" % subformat)
    if subformat == "streamOptimized":
        raw = Path(tmp) / "src.raw"
        run("qemu-img", "create", "-f", "raw", raw, size)
        qemu_io(raw, *fill, fmt="raw")
        run("qemu-img", "convert", "-O", "vmdk", "-o",
            "subformat=streamOptimized", raw, img)
        raw.unlink()
    else:
        run("qemu-img", "create", "-f", "vmdk", "-o",
            "subformat=%s" % subformat, img, size)
        qemu_io(img, *fill)
    return img


@pytest.mark.parametrize("subformat", [
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat", "streamOptimized"])
def test_subformat_read_write(imgfs, tmp_path, subformat):
    img = make_image(tmp_path, subformat)
    expected = tmp_path / "expected.raw"
    ref = to_raw(img, expected)
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        random_writes(m.path, expected, SIZE, seed=len(subformat))
        assert read_all(m.path) == expected.read_bytes()
    r = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw",
                        str(img), str(expected)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu_check(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["format"] == "vmdk" and info["virtual-size"] == SIZE
    # Mounted again, the writes are there.
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == expected.read_bytes()


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat"])
def test_two_gb_extents_boundary(imgfs, tmp_path, subformat):
    """A disk of more than 2 GiB: two extent files; requests across the
    boundary are split between them."""
    size = 2 * GiB + 8 * MiB
    b = 2 * GiB
    img = make_image(tmp_path, subformat, size,
                     ["write -P 0x21 %d 1M" % (b - 512 * 1024),
                      "write -P 0x22 0 64k"])
    ext = sorted(p.name for p in tmp_path.iterdir() if "-" in p.name)
    assert len(ext) == 2, ext
    expected = tmp_path / "expected.raw"
    to_raw(img, expected)
    with mounted(imgfs, img) as m:
        assert os.path.getsize(m.path) == size
        for off in (0, b - MiB, b + MiB):
            assert pread(m.path, off, 2 * MiB) == pread(expected, off, 2 * MiB)
        fd = os.open(m.path, os.O_RDWR)
        data = os.urandom(300 * 1024)
        os.pwrite(fd, data, b - 100 * 1024 - 7)
        os.close(fd)
        fe = os.open(expected, os.O_RDWR)
        os.pwrite(fe, data, b - 100 * 1024 - 7)
        os.close(fe)
        assert pread(m.path, b - MiB, 2 * MiB) == pread(expected, b - MiB,
                                                         2 * MiB)
    r = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw",
                        str(img), str(expected)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    qemu_check(img)


def test_stream_optimized_rewrite_appends(imgfs, tmp_path):
    """streamOptimized: overwriting grains that exist appends new
    compressed copies; the stream still ends in an end-of-stream
    marker and qemu-img reads the new data."""
    img = make_image(tmp_path, "streamOptimized")
    expected = tmp_path / "expected.raw"
    to_raw(img, expected)
    before = img.stat().st_size
    with mounted(imgfs, img) as m:
        fd = os.open(m.path, os.O_RDWR)
        fe = os.open(expected, os.O_RDWR)
        for off in (0, 4096, 3 * MiB + 100):  # grains that exist
            data = os.urandom(3000)
            os.pwrite(fd, data, off)
            os.pwrite(fe, data, off)
        os.close(fd)
        os.close(fe)
    assert img.stat().st_size > before
    assert img.read_bytes()[-512:] == bytes(512)
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img,
               expected).returncode == 0
    qemu_check(img)


def gd_at_end_stream(tmp, src):
    """Turn a qemu-img stream (directory after the header) into the
    layout VMware writes: header says "GD at end", the real header is
    the footer before the end-of-stream marker."""
    data = bytearray(Path(src).read_bytes())
    assert data[-512:] == bytes(512)
    header = bytes(data[:512])
    body = data[:-512]
    body[56:64] = struct.pack("<Q", 0xffffffffffffffff)
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    out = Path(tmp) / "gdatend.vmdk"
    out.write_bytes(bytes(body) + footer_marker + header + bytes(512))
    return out


def test_stream_gd_at_end_reads_and_refuses_writes(imgfs, tmp_path):
    img = gd_at_end_stream(tmp_path, make_image(tmp_path, "streamOptimized"))
    ref = to_raw(img, tmp_path / "expected.raw")
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        fd = os.open(m.path, os.O_RDWR | os.O_DIRECT)
        import mmap
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as ei:
            os.pwritev(fd, [buf], 0)
        os.close(fd)
        assert ei.value.errno == 30  # EROFS
        assert "footer" in m.logtext()


# ---- vmfs, vmfsSparse and COWD ------------------------------------------

def make_cowd(path, capacity, grain, grains):
    """A COWD (VMDK3) extent; @grains maps grain index -> bytes."""
    gtes = 4096
    n_gd = -(-capacity // (gtes * grain))
    gd_sector = 4
    gt_first = gd_sector + -(-n_gd * 4 // 512)
    gt_sectors = gtes * 4 // 512
    used_gts = sorted({g // gtes for g in grains})
    gt_at = {t: gt_first + i * gt_sectors for i, t in enumerate(used_gts)}
    next_sector = gt_first + len(used_gts) * gt_sectors
    tables = {t: [0] * gtes for t in used_gts}
    blobs = []
    for g in sorted(grains):
        tables[g // gtes][g % gtes] = next_sector
        blobs.append((next_sector, grains[g].ljust(grain * 512, b"\0")))
        next_sector += grain
    out = bytearray(next_sector * 512)
    out[0:32] = b"COWD" + struct.pack("<7I", 1, 3, capacity, grain,
                                      gd_sector, n_gd, next_sector)
    gd = [gt_at.get(t, 0) for t in range(n_gd)]
    out[gd_sector * 512:gd_sector * 512 + 4 * n_gd] = struct.pack(
        "<%dI" % n_gd, *gd)
    for t, tab in tables.items():
        o = gt_at[t] * 512
        out[o:o + 4 * gtes] = struct.pack("<%dI" % gtes, *tab)
    for s, b in blobs:
        out[s * 512:s * 512 + len(b)] = b
    Path(path).write_bytes(bytes(out))


def cowd_grains(seed, capacity, grain, count=12):
    rnd = random.Random(seed)
    n = capacity // grain
    return {g: rnd.randbytes(grain * 512)
            for g in rnd.sample(range(n), count)}


def test_cowd_standalone_read_only(imgfs, tmp_path):
    cap, grain = 16384, 1  # 8 MiB in 512-byte grains: 4 grain tables
    img = tmp_path / "redo.vmdk"
    grains = cowd_grains(1, cap, grain)
    grains[4095] = b"\x77" * 512  # last entry of the first table
    grains[4096] = b"\x88" * 512  # first entry of the second table
    make_cowd(img, cap, grain, grains)
    expected = bytearray(cap * 512)
    for g, b in grains.items():
        expected[g * grain * 512:(g + 1) * grain * 512] = b
    # (qemu-img cannot open a bare COWD file -- it looks for a CID in
    # it -- so the oracle is the construction; the vmfsSparse test below
    # has qemu-img read the same kind of extent through a descriptor.)
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == bytes(expected)
        fd = os.open(m.path, os.O_WRONLY)
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 512, 0)
        os.close(fd)
        assert ei.value.errno == 30  # EROFS
    info = imgfs_info(img)["format-specific"]
    assert info["create-type"] == "vmfsSparse"
    assert info["extent.0.kind"] == "COWD sparse"


def test_vmfs_and_vmfs_sparse_descriptors(imgfs, tmp_path):
    cap = 4096  # 2 MiB
    flat = tmp_path / "disk-flat.vmdk"
    run("qemu-img", "create", "-f", "raw", flat, cap * 512)
    qemu_io(flat, "write -P 0x42 4k 12k", "write -P 0x43 1M 1M", fmt="raw")
    (tmp_path / "vmfs.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=12345678\n'
        'parentCID=ffffffff\ncreateType="vmfs"\n\n'
        '# Extent description\nRW %d VMFS "disk-flat.vmdk"\n\n'
        'ddb.adapterType = "lsilogic"\n' % cap)
    grains = cowd_grains(2, cap, 1, count=40)  # 512-byte grains
    make_cowd(tmp_path / "disk-delta.vmdk", cap, 1, grains)
    (tmp_path / "vmfssparse.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=9abcdef0\n'
        'parentCID=ffffffff\ncreateType="vmfsSparse"\n\n'
        # (no blank line right before an extent line: qemu-img 7.2 then
        # reads the extent twice)
        '# Extent description\nRW %d VMFSSPARSE "disk-delta.vmdk"\n' % cap)
    for name in ("vmfs.vmdk", "vmfssparse.vmdk"):
        img = tmp_path / name
        ref = to_raw(img, tmp_path / "ref.raw")
        with mounted(imgfs, img) as m:
            assert read_all(m.path) == ref, name
    # vmfs is writable; vmfsSparse (COWD) is read only.
    img = tmp_path / "vmfs.vmdk"
    expected = tmp_path / "expected.raw"
    to_raw(img, expected)
    with mounted(imgfs, img) as m:
        random_writes(m.path, expected, cap * 512, seed=3, count=10)
    assert flat.read_bytes() == expected.read_bytes()


# ---- hand-written multi-extent layouts ----------------------------------

def test_mixed_rw_extents_match_qemu(imgfs, tmp_path):
    """FLAT at an offset, SPARSE, ZERO-free all-RW layout: qemu-img and
    imgfs agree byte for byte, before and after writes."""
    f1 = tmp_path / "a-flat.bin"
    run("qemu-img", "create", "-f", "raw", f1, 3 * MiB)
    qemu_io(f1, "write -P 0x61 0 3M", fmt="raw")
    sp = tmp_path / "b-sparse.vmdk"
    run("qemu-img", "create", "-f", "vmdk", sp, 4 * MiB)
    qemu_io(sp, "write -P 0x62 64k 200k", "write -P 0x63 3M 1M")
    (tmp_path / "mixed.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=0badcafe\n'
        'parentCID=ffffffff\ncreateType="monolithicFlat"\n'
        'RW 2048 FLAT "a-flat.bin" 2048\n'
        'RW 8192 SPARSE "b-sparse.vmdk"\n'
        'RW 1024 FLAT "a-flat.bin" 0\n')
    img = tmp_path / "mixed.vmdk"
    expected = tmp_path / "expected.raw"
    ref = to_raw(img, expected)
    assert len(ref) == 11264 * 512
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        random_writes(m.path, expected, len(ref), seed=9, count=30)
        assert read_all(m.path) == expected.read_bytes()
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img,
               expected).returncode == 0


def test_access_modes_rdonly_noaccess_zero(imgfs, tmp_path):
    """Each extent keeps its place; RDONLY refuses writes (EROFS),
    NOACCESS fails (EIO), ZERO reads zeros and refuses writes."""
    rw = tmp_path / "rw.bin"
    ro = tmp_path / "ro.bin"
    rw.write_bytes(b"\x01" * MiB)
    ro.write_bytes(b"\x02" * MiB)
    sp = tmp_path / "ro-sparse.vmdk"
    run("qemu-img", "create", "-f", "vmdk", sp, MiB)
    qemu_io(sp, "write -P 0x03 0 1M")
    (tmp_path / "layout.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=11111111\n'
        'parentCID=ffffffff\ncreateType="custom"\n'
        'RW 2048 FLAT "rw.bin" 0\n'
        'RDONLY 2048 FLAT "ro.bin" 0\n'
        'NOACCESS 2048 FLAT "missing.bin" 0\n'
        'RW 2048 ZERO\n'
        'RDONLY 2048 SPARSE "ro-sparse.vmdk"\n'
        'RW 2048 FLAT "rw.bin" 0\n')
    img = tmp_path / "layout.vmdk"
    ro_before = ro.read_bytes()
    sp_before = sp.read_bytes()
    with mounted(imgfs, img) as m:
        assert os.path.getsize(m.path) == 6 * MiB
        assert pread(m.path, 0, MiB) == b"\x01" * MiB
        assert pread(m.path, MiB, MiB) == b"\x02" * MiB
        assert pread(m.path, 3 * MiB, MiB) == bytes(MiB)
        assert pread(m.path, 4 * MiB, MiB) == b"\x03" * MiB
        assert pread(m.path, 5 * MiB, MiB) == b"\x01" * MiB
        fd = os.open(m.path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 2 * MiB + 4096)
            assert ei.value.errno == 5  # EIO
            for off in (MiB, 3 * MiB, 4 * MiB + 512):
                with pytest.raises(OSError) as ei:
                    os.pwrite(fd, b"z" * 4096, off)
                    os.fsync(fd)
                assert ei.value.errno == 30, off  # EROFS
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"z" * 4096, 2 * MiB)
                os.fsync(fd)
            assert ei.value.errno == 5
            # The RW extents around them take writes.
            assert os.pwrite(fd, b"\x09" * 4096, 8192) == 4096
            assert os.pwrite(fd, b"\x0a" * 4096, 5 * MiB + 4096) == 4096
            os.fsync(fd)
        finally:
            os.close(fd)
    data = rw.read_bytes()
    assert data[8192:12288] == b"\x09" * 4096
    assert data[4096:8192] == b"\x0a" * 4096
    assert ro.read_bytes() == ro_before
    assert sp.read_bytes() == sp_before
    info = imgfs_info(img)["format-specific"]
    assert info["extents"] == 6
    assert [info["extent.%d.access" % i] for i in range(6)] == [
        "RW", "RDONLY", "NOACCESS", "RW", "RDONLY", "RW"]
    assert info["extent.3.type"] == "ZERO"
    assert info["extent.4.kind"] == "sparse"


def test_delta_disk_with_parent(imgfs, tmp_path):
    base = tmp_path / "base.vmdk"
    run("qemu-img", "create", "-f", "vmdk", base, 8 * MiB)
    qemu_io(base, "write -P 0x41 0 4M", "write -P 0x42 6M 100k")
    child = tmp_path / "child.vmdk"
    run("qemu-img", "create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk",
        child, cwd=tmp_path)
    qemu_io(child, "write -P 0x51 1M 64k", "write -P 0x52 6M 5k")
    expected = tmp_path / "expected.raw"
    ref = to_raw(child, expected)
    with mounted(imgfs, child) as m:
        assert read_all(m.path) == ref
        random_writes(m.path, expected, 8 * MiB, seed=11, count=30)
        assert read_all(m.path) == expected.read_bytes()
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", child,
               expected).returncode == 0
    qemu_check(child)
    info = imgfs_info(child)
    spec = info["format-specific"]
    assert spec["parent-filename-hint"] == "base.vmdk"
    assert info["backing-image"]["filename"] == str(base)
    assert spec["parent-cid"] == info["backing-image"]["format-specific"][
        "cid"]
    # The parent changes (qemu-io gives it a new CID): the delta is stale.
    qemu_io(base, "write -P 0x43 0 4k")
    msg = mount_error(tmp_path, child)
    assert "child.vmdk" in msg and "base.vmdk" in msg and "CID" in msg


def test_hand_written_delta_descriptor(imgfs, tmp_path):
    """A descriptor file written by hand: two sparse extents, a parent in
    another directory named relative to the descriptor's directory."""
    (tmp_path / "base").mkdir()
    base = tmp_path / "base" / "parent.vmdk"
    run("qemu-img", "create", "-f", "vmdk", base, 4 * MiB)
    qemu_io(base, "write -P 0x71 0 4M")
    base_cid = imgfs_info(base)["format-specific"]["cid"]
    for name, cmd in (("delta-s001.vmdk", "write -P 0x72 64k 8k"),
                      ("delta-s002.vmdk", "write -P 0x73 512k 100k")):
        run("qemu-img", "create", "-f", "vmdk", tmp_path / name, 2 * MiB)
        qemu_io(tmp_path / name, cmd)
    img = tmp_path / "delta.vmdk"
    img.write_text(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n"
        "CID=fffffffe\nparentCID=%s\ncreateType=\"twoGbMaxExtentSparse\"\n"
        "parentFileNameHint=\"base/parent.vmdk\"\n"
        "# Extent description\n"
        "RW 4096 SPARSE \"delta-s001.vmdk\"\n"
        "RW 4096 SPARSE \"delta-s002.vmdk\"\n\n"
        "# The Disk Data Base\n#DDB\n"
        "ddb.adapterType = \"lsilogic\"\n" % base_cid)
    expected = tmp_path / "expected.raw"
    ref = to_raw(img, expected)
    assert ref[:64 * 1024] == b"\x71" * 65536
    assert ref[64 * 1024:72 * 1024] == b"\x72" * 8192
    assert ref[2 * MiB + 512 * 1024:2 * MiB + 612 * 1024] == b"\x73" * 102400
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        random_writes(m.path, expected, 4 * MiB, seed=12, count=20)
        assert read_all(m.path) == expected.read_bytes()
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", img,
               expected).returncode == 0
    info = imgfs_info(img)
    assert info["backing-image"]["filename"] == str(base)
    assert info["format-specific"]["extents"] == 2


def test_first_write_marks_unclean_and_changes_cid(imgfs, tmp_path):
    img = make_image(tmp_path, "monolithicSparse", 4 * MiB, ["write 0 4k"])
    cid0 = imgfs_info(img)["format-specific"]["cid"]
    with mounted(imgfs, img) as m:
        fd = os.open(m.path, os.O_RDWR)
        os.pwrite(fd, b"q" * 4096, 8192)
        os.fsync(fd)
        os.close(fd)
        assert img.read_bytes()[72] == 1  # unclean while mounted
    assert img.read_bytes()[72] == 0  # cleared at unmount
    cid1 = imgfs_info(img)["format-specific"]["cid"]
    assert cid1 != cid0
    qemu_check(img)


# ---- malformed images -----------------------------------------------------

def patch(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def sparse_with_data(tmp_path, name="bad.vmdk"):
    img = tmp_path / name
    run("qemu-img", "create", "-f", "vmdk", img, 4 * MiB)
    qemu_io(img, "write -P 0x31 0 128k", "write -P 0x32 2M 64k")
    return img


def gt_entry_offset(img, grain):
    d = Path(img).read_bytes()
    gd = struct.unpack_from("<Q", d, 56)[0] * 512
    gt = struct.unpack_from("<I", d, gd)[0] * 512
    return gt + 4 * grain


@pytest.mark.parametrize("what,off,data,msg", [
    ("grain size", 20, struct.pack("<Q", 100), "power of two"),
    ("gt size", 44, struct.pack("<I", 4096), "grain table entries"),
    ("newline bytes", 73, b"\n \n\n", "text-mode"),
    ("version", 4, struct.pack("<I", 7), "version 7"),
    ("gd outside", 56, struct.pack("<Q", 1 << 30), "outside the file"),
    ("compression", 77, struct.pack("<H", 9), "compression algorithm"),
])
def test_malformed_header_is_a_mount_error(tmp_path, what, off, data, msg):
    img = sparse_with_data(tmp_path)
    patch(img, off, data)
    err = mount_error(tmp_path, img)
    assert "drive 'd'" in err and str(img) in err and msg in err, err


def test_damaged_gd_uses_redundant_copy(imgfs, tmp_path):
    img = sparse_with_data(tmp_path)
    ref = to_raw(img, tmp_path / "ref.raw")
    d = img.read_bytes()
    gd = struct.unpack_from("<Q", d, 56)[0] * 512
    patch(img, gd, struct.pack("<I", 0x7fffffff))
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        assert "redundant grain directory" in m.logtext()
        fd = os.open(m.path, os.O_WRONLY)
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"w" * 512, 0)
        os.close(fd)
        assert ei.value.errno == 30  # not made worse
    # Both copies damaged: a clear error.
    rgd = struct.unpack_from("<Q", d, 48)[0] * 512
    patch(img, rgd, struct.pack("<I", 0x7fffffff))
    assert "points outside the file" in mount_error(tmp_path, img)


def test_zeroed_grain_entries(imgfs, tmp_path):
    img = sparse_with_data(tmp_path)
    patch(img, gt_entry_offset(img, 1), struct.pack("<I", 1))
    rgd_img = img.read_bytes()
    rgd = struct.unpack_from("<Q", rgd_img, 48)[0] * 512
    rgt = struct.unpack_from("<I", rgd_img, rgd)[0] * 512
    patch(img, rgt + 4, struct.pack("<I", 1))
    # Without the zeroed-grain flag, entry 1 is corruption: EIO + log.
    with mounted(imgfs, img) as m:
        assert pread(m.path, 0, 65536) == b"\x31" * 65536
        with pytest.raises(OSError) as ei:
            pread(m.path, 65536, 4096)
        assert ei.value.errno == 5
        assert "zeroed-grain" in m.logtext()
    # With the flag (bit 2), it reads zeros, as qemu-img says.
    flags = struct.unpack_from("<I", img.read_bytes(), 8)[0]
    patch(img, 8, struct.pack("<I", flags | 4))
    ref = to_raw(img, tmp_path / "ref.raw")
    assert ref[65536:131072] == bytes(65536)
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref


def test_corrupt_grain_pointers_give_eio(imgfs, tmp_path):
    img = sparse_with_data(tmp_path)
    patch(img, gt_entry_offset(img, 32), struct.pack("<I", 0x00ffffff))
    with mounted(imgfs, img) as m:
        assert pread(m.path, 0, 4096) == b"\x31" * 4096
        with pytest.raises(OSError) as ei:
            pread(m.path, 2 * MiB, 4096)
        assert ei.value.errno == 5
        assert "past the end of the file" in m.logtext()


@pytest.mark.parametrize("target", ["redundant gd", "grain table",
                                    "descriptor", "overhead"])
def test_grain_pointing_at_metadata_gives_eio(imgfs, tmp_path, target):
    """A grain table entry pointing into the extent's own metadata is
    corruption: reads and writes of that grain fail with EIO and one
    logged line, and nothing is written there (a write in place would
    zero the directories and tables: the whole disk lost)."""
    img = tmp_path / "meta.vmdk"
    run("qemu-img", "create", "-f", "vmdk", img, 16 * MiB)
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x22 8M 64k")
    ref = to_raw(img, tmp_path / "ref.raw")
    d = img.read_bytes()
    sector = {"redundant gd": struct.unpack_from("<Q", d, 48)[0],
              "grain table": gt_entry_offset(img, 0) // 512,
              # (its first sector, 1, would be a zeroed-grain entry)
              "descriptor": struct.unpack_from("<Q", d, 28)[0] + 1,
              # the padding before the first grain
              "overhead": struct.unpack_from("<Q", d, 64)[0] - 8}[target]
    assert 0 < sector < struct.unpack_from("<Q", d, 64)[0]  # overHead
    grain = 20  # not allocated: guest [1.25M, 1.3125M)
    patch(img, gt_entry_offset(img, grain), struct.pack("<I", sector))
    before = img.read_bytes()
    g0, g1 = grain * 65536, (grain + 1) * 65536
    with mounted(imgfs, img) as m:
        fd = os.open(m.path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, g0)
            assert ei.value.errno == 5
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, bytes(65536), g0)
                os.fsync(fd)
            assert ei.value.errno == 5
            # The rest of the disk is still there.
            assert os.pread(fd, g0, 0) == ref[:g0]
            assert os.pread(fd, 16 * MiB - g1, g1) == ref[g1:]
        finally:
            os.close(fd)
        log = [line for line in m.logtext().splitlines()
               if "overlaps" in line]
        assert log and "drive 'd'" in log[0] and str(img) in log[0], (
            m.logtext())
    after = img.read_bytes()
    # Only the descriptor's CID (the first write of the session changes
    # it) may differ: header, directories, tables and grains do not.
    desc = struct.unpack_from("<Q", d, 28)[0] * 512
    desc_end = desc + struct.unpack_from("<Q", d, 36)[0] * 512
    assert len(after) == len(before)
    assert after[:desc] == before[:desc]
    assert after[desc_end:] == before[desc_end:]
    # qemu-img still reads everything else as before.
    raw = to_raw(img, tmp_path / "after.raw")
    assert raw[:g0] == ref[:g0] and raw[g1:] == ref[g1:]


@pytest.mark.parametrize("subformat,write", [
    ("monolithicSparse", "whole grain"), ("monolithicSparse", "part"),
    ("streamOptimized", "part")])
def test_grain_pointing_past_eof_stays_eio_after_appends(imgfs, tmp_path,
                                                         subformat, write):
    """A grain table entry pointing past the end of the file is
    corruption even once this session has appended a grain there: it
    must not start reading that grain's data, and a write to it must not
    go over that grain."""
    img = make_image(tmp_path, subformat, 16 * MiB,
                     ["write -P 0x11 0 1M", "write -P 0x22 8M 64k"])
    ref = to_raw(img, tmp_path / "ref.raw")
    size = img.stat().st_size
    if subformat == "streamOptimized":
        # Appends replace the end-of-stream marker.
        assert img.read_bytes()[-512:] == bytes(512)
        at = size - 512
    else:
        at = (size + 4095) // 4096 * 4096  # grains are 4 KiB aligned
    bad, good = 100, 200  # neither allocated
    g_bad, g_good = bad * 65536, good * 65536
    patch(img, gt_entry_offset(img, bad), struct.pack("<I", at // 512))
    data = (bytes(range(256)) * 256 if write == "whole grain"
            else b"\x77" * 4096)
    with mounted(imgfs, img) as m:
        fd = os.open(m.path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, g_bad)
            assert ei.value.errno == 5
            # Appended where the bad entry points.
            os.pwrite(fd, data, g_good)
            os.fsync(fd)
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, g_bad)
            assert ei.value.errno == 5
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"\x99" * 65536, g_bad)
                os.fsync(fd)
            assert ei.value.errno == 5
            expected = data + bytes(65536 - len(data))
            assert os.pread(fd, 65536, g_good) == expected
            # Written again (a stream appends a new copy, and the old
            # one is not this grain's any more): still the same.
            os.pwrite(fd, b"\x78" * 512, g_good + 8192)
            os.fsync(fd)
            expected = expected[:8192] + b"\x78" * 512 + expected[8704:]
            assert os.pread(fd, 65536, g_good) == expected
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, g_bad)
            assert ei.value.errno == 5
            assert os.pread(fd, g_bad, 0) == ref[:g_bad]
        finally:
            os.close(fd)
        assert "past the end of the file" in m.logtext()
        assert "where grain %d has been written since" % good in (
            m.logtext())
    d = img.read_bytes()
    # The bad entry is as it was, and the grain is where it points.
    assert struct.unpack_from("<I", d, gt_entry_offset(img, bad))[0] == (
        at // 512)
    if subformat != "streamOptimized":
        assert struct.unpack_from("<I", d, gt_entry_offset(img, good))[0] == (
            at // 512)
        assert d[at:at + 65536] == expected
    qemu_io(img, "read -P 0x11 0 1M", "read -P 0x22 8M 64k")
    raw = to_raw(img, tmp_path / "after.raw")
    assert raw[g_good:g_good + 65536] == expected
    assert raw[:g_bad] == ref[:g_bad]
    assert raw[g_bad + 65536:g_good] == ref[g_bad + 65536:g_good]
    assert raw[g_good + 65536:] == ref[g_good + 65536:]


def test_corrupt_compressed_grain_gives_eio(imgfs, tmp_path):
    img = make_image(tmp_path, "streamOptimized", 4 * MiB,
                     ["write -P 0x44 0 64k", "write -P 0x45 1M 64k"])
    host = struct.unpack_from("<I", img.read_bytes(),
                              gt_entry_offset(img, 16))[0] * 512
    patch(img, host + 12, b"\xde\xad\xbe\xef" * 8)
    with mounted(imgfs, img) as m:
        assert pread(m.path, 0, 4096) == b"\x44" * 4096
        with pytest.raises(OSError) as ei:
            pread(m.path, MiB, 4096)
        assert ei.value.errno == 5
        assert "inflate" in m.logtext()


def test_stream_grain_marker_for_another_grain_gives_eio(imgfs, tmp_path):
    """A stream's grain marker names the grain it holds: an entry that
    points at another grain's marker gets EIO, not that grain's data."""
    img = make_image(tmp_path, "streamOptimized", 4 * MiB,
                     ["write -P 0x44 0 64k", "write -P 0x45 1M 64k"])
    host0 = struct.unpack_from("<I", img.read_bytes(),
                               gt_entry_offset(img, 0))[0]
    patch(img, gt_entry_offset(img, 16), struct.pack("<I", host0))
    with mounted(imgfs, img) as m:
        assert pread(m.path, 0, 4096) == b"\x44" * 4096
        with pytest.raises(OSError) as ei:
            pread(m.path, MiB, 4096)
        assert ei.value.errno == 5
        assert "is for sector 0, not for grain 16 (sector 2048)" in \
            m.logtext()


def test_unclean_shutdown_flag_is_reported(imgfs, tmp_path):
    img = sparse_with_data(tmp_path)
    ref = to_raw(img, tmp_path / "ref.raw")
    patch(img, 72, b"\x01")
    with mounted(imgfs, img) as m:
        assert read_all(m.path) == ref
        assert "unclean-shutdown" in m.logtext()
    assert imgfs_info(img)["format-specific"][
        "extent.0.unclean-shutdown"] is True


def test_descriptor_errors(tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(MiB))
    cases = [
        ('createType="seSparse"\nRW 2048 SESPARSE "f.bin"\n', "seSparse"),
        ('createType="custom"\nRW 2048 SESPARSE "f.bin"\n', "seSparse"),
        ('createType="custom"\nRW 4096 FLAT "f.bin" 0\n', "shorter than"),
        ('createType="custom"\nRW 2048 FLAT "nothere.bin" 0\n', "nothere"),
        ('createType="custom"\nRW abc FLAT "f.bin" 0\n', "extent line"),
        ('createType="custom"\nRW 2048 SPARSE "f.bin"\n', "not a sparse"),
        ('createType="custom"\nRW 2048 WEIRD "f.bin"\n', "WEIRD"),
        ('createType="monolithicSparse"\nparentCID=12345678\n'
         'RW 2048 FLAT "f.bin" 0\n', "parentFileNameHint"),
    ]
    for i, (body, msg) in enumerate(cases):
        img = tmp_path / ("d%d.vmdk" % i)
        img.write_text("# Disk DescriptorFile\nversion=1\nCID=1\n" + body)
        err = mount_error(tmp_path, img)
        assert msg in err and str(img) in err, (body, err)


def test_extents_adding_up_past_the_largest_disk(imgfs, tmp_path):
    """Each extent line is at most 2^47 sectors, but their sum is
    checked too: past the block layer's largest length (INT64_MAX
    rounded down to 1 GiB) the mount fails with one clear line and
    nothing is mounted; exactly that much mounts."""
    head = ("# Disk DescriptorFile\nversion=1\nCID=12345678\n"
            "parentCID=ffffffff\ncreateType=\"custom\"\n")
    big = "RW %d ZERO\n" % (1 << 47)
    largest = (2**63 - 1) // 2**30 * 2**30
    img = tmp_path / "huge.vmdk"
    img.write_text(head + big * 130)
    err = mount_error(tmp_path, img)
    lines = [line for line in err.splitlines()
             if line.startswith("imgfs:") and "io_uring" not in line]
    assert len(lines) == 1, err
    assert "drive 'd'" in lines[0] and str(img) in lines[0], err
    assert "extents add up to more than %d bytes" % largest in lines[0], err
    assert mounts_under(tmp_path) == [], err
    # The largest disk: 1 GiB short of 128 extents of 2^47 sectors.
    img = tmp_path / "largest.vmdk"
    img.write_text(head + big * 127 +
                   "RW %d ZERO\n" % ((1 << 47) - (1 << 21)))
    with mounted(imgfs, img) as m:
        assert os.path.getsize(m.path) == largest
        assert pread(m.path, largest - 512, 512) == bytes(512)


# ---- info, fio ---------------------------------------------------------------

def test_info_reports_subformat_and_extents(tmp_path):
    img = make_image(tmp_path, "twoGbMaxExtentSparse", 4 * MiB,
                     ["write 0 1M"])
    info = imgfs_info(img)
    spec = info["format-specific"]
    assert info["format"] == "vmdk" and info["virtual-size"] == 4 * MiB
    assert spec["create-type"] == "twoGbMaxExtentSparse"
    assert spec["extent.0.file"].endswith("twoGbMaxExtentSparse-s001.vmdk")
    assert spec["extent.0.grain-size"] == 65536
    assert spec["extent.0.redundant-gd"] is True
    assert spec["parent-cid"] == "ffffffff"
    ext = tmp_path / "twoGbMaxExtentSparse-s001.vmdk"
    assert info["actual-size"] >= os.stat(ext).st_blocks * 512
    so = make_image(tmp_path, "streamOptimized", 4 * MiB, ["write 0 1M"])
    spec = imgfs_info(so)["format-specific"]
    assert spec["create-type"] == "streamOptimized"
    assert spec["extent.0.compressed"] is True


@pytest.mark.parametrize("subformat", ["monolithicSparse",
                                       "streamOptimized"])
def test_fsynced_grains_survive_sigkill(imgfs_bin, tmp_path, subformat):
    """Grain tables are written back at flush: what an fsync acknowledged
    is in the image after the daemon is killed, and qemu-img agrees."""
    img = make_image(tmp_path, subformat, 8 * MiB, ["write -P 0x11 0 1M"])
    expect = bytearray(to_raw(img, tmp_path / "before.raw"))
    rng = random.Random(5)
    with killable_mount(imgfs_bin, tmp_path, {"d": {"file": str(img)}}) as m:
        fd = os.open(m.drive("d"), os.O_RDWR)
        for i in range(40):
            off = rng.randrange(0, 8 * MiB - 4096) // 512 * 512
            data = bytes([i + 1]) * 4096
            os.pwrite(fd, data, off)
            expect[off:off + 4096] = data
        os.fsync(fd)
        os.close(fd)
        sigkill(m)
    assert to_raw(img, tmp_path / "after.raw") == bytes(expect)
    if subformat == "monolithicSparse":
        qemu_check(img)


@pytest.mark.parametrize("subformat", ["monolithicSparse",
                                       "streamOptimized"])
def test_fio_verify_qd32(imgfs, tmp_path, subformat):
    """fio async O_DIRECT writes at iodepth 32 with crc32c verify: grains
    allocated (and, for streamOptimized, appended) concurrently."""
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    img = make_image(tmp_path, subformat, 64 * MiB, ["write -P 1 0 8M"])
    with mounted(imgfs, img, {"cache": "none"}) as m:
        for eng in ("io_uring", "libaio"):
            r = subprocess.run(
                ["fio", "--name=v-" + eng, "--filename=%s" % m.path,
                 "--ioengine=" + eng, "--iodepth=32", "--direct=1",
                 "--rw=randwrite", "--bsrange=4k-256k", "--offset=8M",
                 "--size=48M", "--randrepeat=0", "--verify=crc32c",
                 "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0", "--allow_file_create=0",
                 "--output-format=terse"], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
    qemu_check(img)
