"""Drives that never write their image: snapshot = on, auto-read-only.

snapshot = on sends writes to a temporary qcow2 overlay in $TMPDIR that
is unlinked at once: the image keeps its checksum and mtime, the writes
are visible through the mount while it lasts, and nothing is left in
$TMPDIR.  auto-read-only opens an image that cannot be written (here: on
a read-only bind mount, since root ignores file permissions) read-only
and says so.
"""

import errno
import os
import stat
import subprocess

import pytest

from conftest import (
    MiB,
    create_image,
    drive_status,
    error_lines,
    fill,
    is_mounted,
    qemu_io,
    read_at,
    require_format,
    require_root,
    run,
    run_fio,
    sha256,
    unmount,
    write_at,
)

SIZE = 16 * MiB


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch):
    """$TMPDIR for the daemon: an empty directory of its own."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def patterned(path, fmt="raw"):
    run("qemu-img", "create", "-q", "-f", fmt, path, str(SIZE))
    qemu_io(path, "write -P 0xab 0 4M", "write -P 0x11 12M 4M", fmt=fmt)
    return path


def deleted_files_in(pid, directory):
    """Files of DIRECTORY that process PID holds open though unlinked."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(str(directory) + "/") and \
                target.endswith(" (deleted)"):
            found.append(target)
    return found


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_snapshot_leaves_image_unchanged(imgfs, tmp_path, private_tmpdir,
                                         fmt):
    require_format("qcow2")
    image = patterned(tmp_path / f"disk0.{fmt}", fmt)
    before = sha256(image)
    mtime = os.stat(image).st_mtime_ns
    mount = imgfs({"disk0": {"file": image, "format": fmt,
                             "snapshot": "on"}})
    assert stat.S_IMODE(os.stat(mount.drive()).st_mode) & stat.S_IWUSR

    status = drive_status(mount)
    assert status["options"]["snapshot"] is True
    chain = status["chain"]
    assert [n["format"] for n in chain] == ["qcow2", fmt], chain
    assert chain[1]["filename"] == str(image)
    assert chain[1]["read-only"] is True

    # writes land in the overlay: visible through the mount ...
    data = os.urandom(3 * MiB)
    write_at(mount.drive(), 2 * MiB + 512, data)
    assert read_at(mount.drive(), 2 * MiB + 512, len(data)) == data
    assert read_at(mount.drive(), 0, MiB) == b"\xab" * MiB
    assert read_at(mount.drive(), 12 * MiB, MiB) == b"\x11" * MiB
    # ... and not in the image
    assert sha256(image) == before
    # the overlay is already unlinked: nothing to see in $TMPDIR
    assert os.listdir(private_tmpdir) == []
    assert deleted_files_in(mount.pid, private_tmpdir), (
        "no unlinked overlay open in $TMPDIR")
    # the image is opened read-only under the overlay: another writer
    # is refused, as QEMU refuses a second writer
    proc = run("qemu-io", "-f", fmt, "-c", "write 0 512", image,
               check=False)
    assert proc.returncode != 0, "qemu-io wrote the image under a snapshot"
    assert "lock" in proc.stdout + proc.stderr

    assert mount.unmount() == 0
    assert sha256(image) == before
    assert os.stat(image).st_mtime_ns == mtime
    assert os.listdir(private_tmpdir) == []
    if fmt == "qcow2":
        run("qemu-img", "check", "-q", image)


def test_snapshot_discarded_at_unmount(imgfs, tmp_path, private_tmpdir):
    require_format("qcow2")
    image = patterned(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "snapshot": "on"}})
    write_at(mount.drive(), 0, b"\xee" * MiB)
    assert mount.unmount() == 0
    again = imgfs({"disk0": {"file": image, "format": "raw"}}, name="again")
    assert read_at(again.drive(), 0, MiB) == b"\xab" * MiB


def test_snapshot_fio_verify(imgfs, tmp_path, private_tmpdir):
    """Concurrent writes into the overlay read back right."""
    require_format("qcow2")
    image = create_image(tmp_path / "disk0.img", SIZE)
    fill(image, 0x77, 0, SIZE)
    before = sha256(image)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "snapshot": "on"}})
    jobs = run_fio(mount.drive(), name="snap", rw="randwrite",
                   bsrange="4k-64k", size="4M", numjobs=2,
                   offset_increment="8M", ioengine="io_uring", direct=1,
                   iodepth=16, verify="crc32c", verify_fatal=1, do_verify=1)
    assert sum(j["read"]["io_bytes"] for j in jobs) == 8 * MiB
    assert mount.unmount() == 0
    assert sha256(image) == before


# -- auto-read-only --------------------------------------------------------


@pytest.fixture
def ro_dir(tmp_path):
    """A directory with an image, and a read-only bind mount of it."""
    require_root("bind mounts")
    src = tmp_path / "rw"
    src.mkdir()
    patterned(src / "disk0.img")
    dst = tmp_path / "ro"
    dst.mkdir()
    run("mount", "--bind", src, dst)
    try:
        run("mount", "-o", "remount,bind,ro", dst)
    except BaseException:
        subprocess.run(["umount", str(dst)], capture_output=True)
        raise
    yield dst
    if subprocess.run(["umount", str(dst)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)


def test_auto_read_only_falls_back(ro_dir, imgfs):
    image = ro_dir / "disk0.img"
    before = sha256(image)
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "auto-read-only": "on"}})
    warnings = [line for line in error_lines(mount.stderr())
                if "auto-read-only" in line]
    assert len(warnings) == 1, mount.stderr()
    assert "disk0" in warnings[0]
    assert stat.S_IMODE(os.stat(mount.drive()).st_mode) == 0o444
    assert drive_status(mount)["options"]["read-only"] is True
    with pytest.raises(OSError) as err:
        os.open(mount.drive(), os.O_RDWR)
    assert err.value.errno == errno.EROFS
    assert sha256(mount.drive()) == before


def test_without_auto_read_only_mount_fails(ro_dir, imgfs_bin, tmp_path):
    image = ro_dir / "disk0.img"
    config = tmp_path / "c.ini"
    config.write_text(f"[disk0]\nfile = {image}\nformat = raw\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([str(imgfs_bin), "mount", str(config), str(mnt)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    if is_mounted(mnt):
        unmount(mnt, lazy=True)
        pytest.fail("mounted a read-write drive on a read-only file system")
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "drive 'disk0'" in lines[0]
    assert "Read-only file system" in lines[0]


def test_auto_read_only_keeps_writable_image_writable(imgfs, tmp_path):
    image = patterned(tmp_path / "disk0.img")
    mount = imgfs({"disk0": {"file": image, "format": "raw",
                             "auto-read-only": "on"}})
    assert "auto-read-only" not in mount.stderr()
    assert stat.S_IMODE(os.stat(mount.drive()).st_mode) & stat.S_IWUSR
    write_at(mount.drive(), 0, b"new")
    assert mount.unmount() == 0
    assert read_at(image, 0, 3) == b"new"
