"""qcow2 interoperability with QEMU, across the format's variants.

Every case builds its image with qemu-img and qemu-io, mounts it, and
checks that

  1. the exposed file equals `qemu-img convert -O raw` byte for byte;
  2. after random writes (aligned and unaligned), hole punches, zero
     ranges and a resize by truncate through imgfs, the drive reads back
     what was written, `qemu-img check` finds no error and no leak, and
     `qemu-img compare` agrees with the expected bytes.

The matrix: cluster sizes 512 B, 4 KiB, 64 KiB, 2 MiB; compat 0.10 and
1.1; refcount_bits 1, 2, 4, 8, 16, 32, 64; extended L2 entries; zlib and zstd
compressed images; lazy refcounts; preallocation metadata and full;
backing chains of three levels mixing raw and qcow2; external data files
(also raw).  Some cases open the image with O_DIRECT (cache = none), and
one runs with a tiny L2 cache so tables are evicted all the time.
"""

import zlib

import pytest

from conftest import MiB, random_image, sha256
from qcow2util import (
    Model,
    assert_drive_matches,
    check,
    compare,
    create_qcow2,
    qemu_img,
    qemu_io,
    random_workload,
    run,
    to_raw,
)

SIZE = 24 * MiB

# What qemu-io puts in a fresh image: data at cluster boundaries and off
# them, zeroed and discarded ranges, something near the end.
POPULATE = [
    "write -P 0x11 0 1M",
    "write -P 0x22 1234567 100000",
    "write -z 3M 1M",
    "write -P 0x33 5M 3M",
    "discard 6M 512k",
    "write -P 0x44 10M 4k",
    "write -P 0x55 12345 777",
    f"write -P 0x66 {SIZE - MiB} 1M",
]


def plain(opts, cache=None, keys=None):
    def build(tmp_path):
        image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, opts)
        qemu_io(image, *POPULATE)
        return image, {}
    return dict(build=build, cache=cache, keys=keys or {})


def compressed(ctype, cluster_size="64k"):
    def build(tmp_path):
        src = tmp_path / "src.raw"
        qemu_img("create", "-q", "-f", "raw", str(src), str(SIZE))
        qemu_io(src, "write -P 0x5a 0 2M", "write -P 0x00 2M 1M",
                "write -P 0x3c 7M 300k", fmt="raw")
        with open(src, "r+b") as f:  # text compresses, random does not
            f.seek(4 * MiB)
            f.write(b"imgfs qcow2 compressed cluster test\n" * 40000)
            f.seek(9 * MiB)
            f.write(random_image(tmp_path / "rnd", MiB).read_bytes())
        image = tmp_path / "disk0.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type={ctype},cluster_size={cluster_size}",
                 str(src), str(image))
        qemu_io(image, "write -P 0x77 4100k 8k")  # over compressed data
        return image, {}
    return dict(build=build, cache=None, keys={})


def chain(top_opts="", mid_opts="", cache=None):
    """base.raw (16 MiB) <- mid.qcow2 (20 MiB) <- disk0.qcow2 (24 MiB):
    relative backing names, shorter backing files read as zeros past
    their end."""
    def build(tmp_path):
        base = random_image(tmp_path / "base.raw", 16 * MiB)
        mid = tmp_path / "mid.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                 *(["-o", mid_opts] if mid_opts else []), str(mid),
                 str(20 * MiB))
        qemu_io(mid, "write -P 0x21 1M 2M", "write -z 4M 64k",
                "write -P 0x23 15M 2M")
        top = tmp_path / "disk0.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
                 "qcow2", *(["-o", top_opts] if top_opts else []), str(top),
                 str(SIZE))
        qemu_io(top, "write -P 0x31 2M 64k", "write -P 0x32 5000 3000",
                "write -z 8M 128k")
        return top, {"base": sha256(base), "mid": sha256(mid)}
    return dict(build=build, cache=cache, keys={})


def data_file(raw):
    """The data in disk0.data, named relative to the image (qemu-img runs
    in tmp_path so that it creates the file there)."""
    def build(tmp_path):
        image = tmp_path / "disk0.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"data_file=disk0.data,data_file_raw={'on' if raw else 'off'}",
            "disk0.qcow2", str(SIZE), cwd=tmp_path)
        qemu_io(image, *POPULATE)
        return image, {}
    return dict(build=build, cache=None, keys={})


CASES = {
    "cluster-512": plain("cluster_size=512", cache="none"),
    "cluster-4k": plain("cluster_size=4096", cache="none"),
    "cluster-64k": plain("cluster_size=65536"),
    "cluster-2m": plain("cluster_size=2M"),
    "compat-0.10": plain("compat=0.10"),
    "compat-0.10-4k": plain("compat=0.10,cluster_size=4096", cache="none"),
    "refcount-1": plain("refcount_bits=1"),
    "refcount-2": plain("refcount_bits=2,cluster_size=4096"),
    "refcount-4": plain("refcount_bits=4,cluster_size=512"),
    "refcount-8": plain("refcount_bits=8,cluster_size=4096"),
    "refcount-32": plain("refcount_bits=32,cluster_size=4096"),
    "refcount-64": plain("refcount_bits=64,cluster_size=4096"),
    "extended-l2": plain("extended_l2=on", cache="none"),
    "extended-l2-2m": plain("extended_l2=on,cluster_size=2M"),
    "lazy-refcounts": plain("lazy_refcounts=on"),
    "prealloc-metadata": plain("preallocation=metadata"),
    "prealloc-full": plain("preallocation=full,cluster_size=4096"),
    "compressed-zlib": compressed("zlib"),
    "compressed-zstd": compressed("zstd"),
    "compressed-zstd-4k": compressed("zstd", "4k"),
    "chain-raw-qcow2-qcow2": chain(),
    "chain-extended-l2": chain(top_opts="extended_l2=on", cache="none"),
    "chain-compat-0.10": chain(top_opts="compat=0.10",
                               mid_opts="compat=0.10"),
    "data-file": data_file(raw=False),
    "data-file-raw": data_file(raw=True),
    "tiny-l2-cache": plain("cluster_size=4096",
                           keys={"qcow2.l2-cache-size": "8k",
                                 "qcow2.refcount-cache-size": "4k"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_qcow2_matches_qemu(imgfs, tmp_path, case):
    spec = CASES[case]
    image, backing_sums = spec["build"](tmp_path)
    keys = {"file": image, **spec["keys"]}
    if case != "cluster-64k":
        keys["format"] = "qcow2"  # else probed by its magic
    if spec["cache"]:
        keys["cache"] = spec["cache"]
    model = Model.from_image(image, tmp_path)
    mount = imgfs({"disk0": keys})

    # 1. what QEMU says the image holds
    assert_drive_matches(mount.drive(), model, f"{case}: mounted vs convert")

    # 2. changes through imgfs, checked by QEMU afterwards
    random_workload(mount.drive(), model, seed=zlib.crc32(case.encode()))
    assert_drive_matches(mount.drive(), model, f"{case}: after workload")
    assert mount.unmount() == 0

    report = check(image)
    assert report.get("leaks", 0) == 0, report
    compare(model.save(tmp_path / "expected.raw"), image)
    if case == "data-file-raw":
        # the data file alone is a consistent raw image
        raw = to_raw(tmp_path / "disk0.data", tmp_path / "data.raw",
                     fmt="raw")
        expected = bytes(model.data)
        got = raw.read_bytes()[:len(expected)]
        assert got == expected, "raw data file differs from the drive"
    for name, digest in backing_sums.items():
        path = tmp_path / (f"{name}.raw" if name == "base"
                           else f"{name}.qcow2")
        assert sha256(path) == digest, f"backing file {name} was modified"
