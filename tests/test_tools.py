"""Standard tools on the exposed file: sfdisk, mkfs.ext4, e2fsck, debugfs,
and a loop device with a mounted ext4 on it."""

import json
import os

from conftest import (
    MiB,
    assert_same_bytes,
    create_image,
    loop_device,
    require_root,
    run,
)

SIZE = 128 * MiB


def raw_drive(image):
    return {"disk0": {"file": image, "format": "raw"}}


def partitions(path):
    """The partition table as `sfdisk --json` sees it, minus device names."""
    table = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]
    del table["device"]
    for part in table["partitions"]:
        del part["node"]
    return table


def test_sfdisk_gpt(imgfs, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs(raw_drive(image))
    script = (
        "label: gpt\n"
        "size=20MiB, type=linux, name=first\n"
        "type=linux, name=second\n"
    )
    run("sfdisk", "-q", mount.drive(), input=script)
    table = partitions(mount.drive())
    assert table["label"] == "gpt"
    assert [p["name"] for p in table["partitions"]] == ["first", "second"]
    first, second = table["partitions"]
    assert first["size"] * table["sectorsize"] == 20 * MiB
    assert second["start"] >= first["start"] + first["size"]
    assert mount.unmount() == 0
    assert partitions(image) == table


def debugfs_cat(fs, name):
    return run("debugfs", "-R", f"cat {name}", fs, text=False).stdout


def e2fsck_clean(fs):
    proc = run("e2fsck", "-f", "-n", fs, check=False)
    assert proc.returncode == 0, f"e2fsck -f -n {fs}:\n{proc.stdout}"


def test_mkfs_e2fsck_debugfs(imgfs, tmp_path):
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs(raw_drive(image))
    run("mkfs.ext4", "-q", "-F", mount.drive())
    e2fsck_clean(mount.drive())
    data = os.urandom(3 * MiB + 123)
    (tmp_path / "data").write_bytes(data)
    src = tmp_path / "data"
    run("debugfs", "-w", "-R", f"write {src} /data", mount.drive())
    assert debugfs_cat(mount.drive(), "/data") == data
    e2fsck_clean(mount.drive())
    assert mount.unmount() == 0
    e2fsck_clean(image)
    assert debugfs_cat(image, "/data") == data


def test_loop_mounted_ext4(imgfs, tmp_path):
    require_root("losetup and mount")
    image = create_image(tmp_path / "disk0.img", SIZE)
    mount = imgfs(raw_drive(image))
    run("mkfs.ext4", "-q", "-F", mount.drive())
    files = {f"/small/f{i}": f"file {i}\n".encode() for i in range(100)}
    files["/big"] = os.urandom(8 * MiB + 1)
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    with loop_device(mount.drive()) as device:
        run("mount", "-t", "ext4", device, fsdir)
        try:
            (fsdir / "small").mkdir()
            for name, data in files.items():
                (fsdir / name.lstrip("/")).write_bytes(data)
            os.sync()
        finally:
            run("umount", fsdir)
    e2fsck_clean(mount.drive())
    for name, data in files.items():
        assert_same_bytes(debugfs_cat(mount.drive(), name), data, name)
    assert mount.unmount() == 0
    e2fsck_clean(image)
    assert_same_bytes(debugfs_cat(image, "/big"), files["/big"], "/big")
