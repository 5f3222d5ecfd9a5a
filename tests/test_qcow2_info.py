"""`imgfs info` on qcow2 images, against `qemu-img info` of the same
image: format, virtual size, allocated bytes, cluster size, compat,
refcount bits, compression type, extended L2, lazy refcounts, corrupt
and dirty flags, external data file, snapshots, and the backing chain --
in the human output and in --json.
"""

import json
import struct

import pytest

from conftest import IMGFS_BIN, MiB, random_image, run
from qcow2util import create_qcow2, header_fields, patch, qemu_img, qemu_io

SIZE = 32 * MiB


def imgfs_info(image, json_output=True):
    args = [IMGFS_BIN, "info"] + (["--json"] if json_output else [])
    out = run(*args, image).stdout
    return json.loads(out) if json_output else out


def qemu_info(image, chain=False):
    args = ["info", "-U", "--output=json"]
    if chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*args, str(image),
                               cwd=image.parent).stdout)


def with_data(opts):
    def build(tmp_path):
        image = create_qcow2(tmp_path / "disk0.qcow2", SIZE, opts)
        qemu_io(image, "write -P 0x11 0 3M", "write -z 5M 1M")
        return image
    return build


def compressed(tmp_path):
    src = random_image(tmp_path / "src.raw", 4 * MiB)
    image = tmp_path / "disk0.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
             str(src), str(image))
    return image


def data_file(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=disk0.data,data_file_raw=on", "disk0.qcow2",
             str(SIZE), cwd=tmp_path)
    image = tmp_path / "disk0.qcow2"
    qemu_io(image, "write -P 0x22 1M 2M")
    return image


def snapshots(tmp_path):
    image = with_data("")(tmp_path)
    qemu_img("snapshot", "-c", "one", str(image))
    qemu_img("snapshot", "-c", "two", str(image))
    return image


def corrupt(tmp_path):
    image = with_data("")(tmp_path)
    h = header_fields(image)
    patch(image, 72, struct.pack(">Q", h["incompatible"] | 2))
    return image


def dirty(tmp_path):
    image = with_data("lazy_refcounts=on")(tmp_path)
    h = header_fields(image)
    patch(image, 72, struct.pack(">Q", h["incompatible"] | 1))
    return image


def chain(tmp_path):
    random_image(tmp_path / "base.raw", 8 * MiB)
    mid = create_qcow2(tmp_path / "mid.qcow2", 16 * MiB, "compat=0.10",
                       backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 0x33 0 1M")
    return create_qcow2(tmp_path / "disk0.qcow2", SIZE,
                        "cluster_size=4096,extended_l2=off",
                        backing="mid.qcow2", backing_fmt="qcow2")


IMAGES = {
    "v3": with_data(""),
    "v2": with_data("compat=0.10"),
    "c4k-refcount64": with_data("cluster_size=4096,refcount_bits=64"),
    "extended-l2-lazy": with_data("extended_l2=on,lazy_refcounts=on"),
    "compressed-zstd": compressed,
    "data-file-raw": data_file,
    "snapshots": snapshots,
    "corrupt": corrupt,
    "dirty": dirty,
    "chain": chain,
}

# format-specific keys both tools print, with the same names
SPECIFIC = ["compat", "compression-type", "lazy-refcounts", "refcount-bits",
            "corrupt", "extended-l2", "data-file", "data-file-raw"]


def human(value):
    return {True: "true", False: "false"}.get(value, str(value))


@pytest.mark.parametrize("case", list(IMAGES))
def test_info_matches_qemu_img(tmp_path, case):
    image = IMAGES[case](tmp_path)
    chain_q = qemu_info(image, chain=True)
    ours = imgfs_info(image)
    text = imgfs_info(image, json_output=False)

    node = ours
    for depth, q in enumerate(chain_q):
        assert node["filename"].endswith(q["filename"].split("/")[-1])
        assert node["format"] == q["format"]
        assert node["virtual-size"] == q["virtual-size"]
        assert node["actual-size"] == q["actual-size"]
        assert node.get("backing-filename") == q.get("backing-filename")
        assert (node.get("backing-filename-format")
                == q.get("backing-filename-format"))
        if q["format"] == "qcow2":
            spec = node["format-specific"]
            qspec = q["format-specific"]["data"]
            for key in SPECIFIC:
                if key in qspec:
                    assert spec[key] == qspec[key], (depth, key)
            assert spec["cluster-size"] == q["cluster-size"]
            assert spec["dirty-flag"] == q["dirty-flag"]
            assert spec["snapshots"] == len(q.get("snapshots", []))
            if depth == 0:
                for key in SPECIFIC:
                    if key in qspec:
                        assert f"{key}: {human(qspec[key])}" in text
                assert f"cluster-size: {q['cluster-size']}" in text
        node = node.get("backing-image")
    assert node is None, "imgfs shows a longer chain than qemu-img"
    assert f"({chain_q[0]['virtual-size']} bytes)" in text
    if case == "chain":
        assert "backing file: mid.qcow2 (format: qcow2)" in text
    if case == "data-file-raw":
        blocks = (tmp_path / "disk0.data").stat().st_blocks
        assert f"data-file-actual-size: {blocks * 512}" in text
    if case == "snapshots":
        assert "snapshot-names: one, two" in text
    if case == "corrupt":
        assert "features: corrupt bit" in text


def test_info_names_feature_bits(tmp_path):
    image = with_data("lazy_refcounts=on,extended_l2=on")(tmp_path)
    h = header_fields(image)
    patch(image, 80, struct.pack(">Q", h["compatible"] | (1 << 9)))
    out = imgfs_info(image)["format-specific"]["features"]
    assert out == ("extended L2 entries, lazy refcounts, compatible bit 9")
