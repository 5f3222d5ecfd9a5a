"""Image locking, the way QEMU does it (OFD locks on bytes 100+ / 200+).

The peers are QEMU's own programs: qemu-storage-daemon and an interactive
qemu-io holding an image, qemu-io and qemu-img trying to use an image
imgfs holds, and a second imgfs.  No two writers ever share an image; a
read-only drive may share with writers only with force-share, as
`qemu-img -U` does; locking = off opts out.
"""

import os
import subprocess

import pytest

from conftest import (
    MiB,
    create_image,
    drive_status,
    error_lines,
    fill,
    imgfs_run,
    is_mounted,
    ofd_locked,
    read_at,
    require_tool,
    run,
    sha256,
    stop_process,
    unmount,
    wait_for,
    write_at,
    write_config,
)

SIZE = 8 * MiB


@pytest.fixture
def image(tmp_path):
    path = create_image(tmp_path / "disk0.img", SIZE)
    fill(path, 0x42, 0, SIZE)
    return path


@pytest.fixture
def qemu_io_holding():
    """Factory: an interactive qemu-io holding IMAGE open (read-write, or
    read-only with READ_ONLY) until the test ends."""
    require_tool("qemu-io")
    procs = []

    def start(image, read_only=False):
        args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
        proc = subprocess.Popen(args + [str(image)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        wait_for(lambda: ofd_locked(image) or proc.poll() is not None, 30,
                 "qemu-io to open and lock the image")
        assert proc.poll() is None, proc.stdout.read()
        return proc

    yield start
    for proc in procs:
        try:
            proc.stdin.close()
        except OSError:
            pass
        stop_process(proc)


def mount_fails(imgfs_bin, tmp_path, drives, name="second"):
    """`imgfs mount` of DRIVES must fail; return its one error line."""
    config = write_config(tmp_path / f"{name}.ini", drives)
    mnt = tmp_path / name
    mnt.mkdir()
    proc = subprocess.run([str(imgfs_bin), "mount", str(config), str(mnt)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    if is_mounted(mnt):
        unmount(mnt, lazy=True)
        pytest.fail("imgfs mounted an image that is in use")
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    return lines[0]


def raw(image, **keys):
    return {"disk0": {"file": image, "format": "raw", **keys}}


def test_refused_while_qemu_storage_daemon_holds_image(qsd, imgfs_bin,
                                                       tmp_path, image):
    qsd([f"driver=file,node-name=file0,filename={image}",
         "driver=raw,node-name=raw0,file=file0"],
        export=tmp_path / "export.img", lock=image)
    msg = mount_fails(imgfs_bin, tmp_path, raw(image))
    assert "is in use" in msg
    assert "drive 'disk0'" in msg
    assert str(image) in msg


@pytest.mark.parametrize("read_only", [False, True],
                         ids=["imgfs-rw", "imgfs-ro"])
def test_refused_while_qemu_io_writes_image(qemu_io_holding, imgfs_bin,
                                            tmp_path, image, read_only):
    """A writer holds the image: imgfs may neither write nor read it
    (QEMU does not share 'write' with a consistent reader)."""
    qemu_io_holding(image)
    msg = mount_fails(imgfs_bin, tmp_path,
                      raw(image, **{"read-only": read_only}))
    assert "is in use" in msg
    assert "drive 'disk0'" in msg


def test_read_only_shares_with_read_only(qemu_io_holding, imgfs, image):
    qemu_io_holding(image, read_only=True)
    mount = imgfs(raw(image, **{"read-only": "on"}))
    assert sha256(mount.drive()) == sha256(image)


def test_writer_allowed_beside_sharing_reader(qemu_io_holding, imgfs,
                                              image):
    """`qemu-io -r` reads without keeping writers out (QEMU locks only
    byte 100, 'consistent read'): imgfs may then write, as QEMU may."""
    qemu_io_holding(image, read_only=True)
    mount = imgfs(raw(image))
    write_at(mount.drive(), 0, b"written")
    assert read_at(image, 0, 7) == b"written"


def test_force_share_reads_image_in_use(qemu_io_holding, imgfs, image):
    qemu_io_holding(image)
    mount = imgfs(raw(image, **{"read-only": "on", "force-share": "on"}))
    assert drive_status(mount)["options"]["force-share"] is True
    assert read_at(mount.drive(), 0, MiB) == b"\x42" * MiB


def test_locking_off_opens_image_in_use(qemu_io_holding, imgfs, image):
    qemu_io_holding(image)
    mount = imgfs(raw(image, locking="off"))
    assert drive_status(mount)["options"]["locking"] == "off"
    assert read_at(mount.drive(), 0, MiB) == b"\x42" * MiB


@pytest.mark.parametrize("locking", ["auto", "on"])
def test_qemu_refused_while_imgfs_holds_image(imgfs, image, locking):
    mount = imgfs(raw(image, locking=locking))
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 0x99 0 512", image,
               check=False)
    assert proc.returncode != 0, "qemu-io wrote an image imgfs holds"
    out = proc.stdout + proc.stderr
    assert "Failed to get" in out and "lock" in out, out
    # qemu-img convert wants a consistent source: refused without -U
    # (force share), allowed with it
    copy = image.parent / "copy.img"
    proc = run("qemu-img", "convert", "-f", "raw", "-O", "raw", image, copy,
               check=False)
    assert proc.returncode != 0
    assert 'Failed to get shared "write" lock' in proc.stderr
    run("qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", image, copy)
    assert sha256(copy) == sha256(image)
    assert mount.unmount() == 0
    # released at unmount
    assert not ofd_locked(image)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x99 0 512", image)
    assert read_at(image, 0, 512) == b"\x99" * 512


def test_read_only_drive_lets_qemu_read(imgfs, image):
    mount = imgfs(raw(image, **{"read-only": "on"}))
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4096", image)
    proc = run("qemu-io", "-f", "raw", "-c", "write 0 512", image,
               check=False)
    assert proc.returncode != 0, "qemu-io wrote under a read-only imgfs"
    assert sha256(mount.drive()) == sha256(image)


def test_second_imgfs_refused(imgfs, imgfs_bin, tmp_path, image):
    first = imgfs(raw(image))
    write_at(first.drive(), 0, b"first")
    msg = mount_fails(imgfs_bin, tmp_path, raw(image))
    assert "is in use" in msg and "drive 'disk0'" in msg
    # the first mount is unharmed
    assert read_at(first.drive(), 0, 5) == b"first"


def test_two_read_only_drives_share_image(imgfs, image):
    """Read-only drives take shared locks: two of them on one image, and
    a read-only qemu-io as well."""
    mount = imgfs({"a": {"file": image, "format": "raw", "read-only": "on"},
                   "b": {"file": image, "format": "raw",
                         "read-only": "on"}})
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4096", image)
    assert sha256(mount.drive("a")) == sha256(mount.drive("b"))


def test_writer_and_reader_drives_on_one_image_refused(imgfs_bin, tmp_path,
                                                       image):
    """Two drives of one mount are two users of the image, as two -drive
    options of one QEMU are."""
    msg = mount_fails(imgfs_bin, tmp_path, {
        "a": {"file": image, "format": "raw"},
        "b": {"file": image, "format": "raw"},
    })
    assert "is in use" in msg and "drive 'b'" in msg


def test_reload_releases_and_takes_locks(imgfs, tmp_path, image):
    other = create_image(tmp_path / "other.img", SIZE)
    mount = imgfs(raw(image))
    # remove disk0, add "other": disk0's image is free for QEMU, other's
    # is not
    write_config(mount.config, {"other": {"file": other, "format": "raw"}})
    proc = imgfs_run("reload", mount.path)
    assert "removed: disk0" in proc.stdout
    assert not ofd_locked(image)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 512", image)
    proc = run("qemu-io", "-f", "raw", "-c", "write 0 512", other,
               check=False)
    assert proc.returncode != 0 and "lock" in proc.stdout + proc.stderr
    # a reload whose new drive's image is in use changes nothing
    holder = subprocess.Popen(["qemu-io", "-f", "raw", str(image)],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ofd_locked(image), 30, "qemu-io to lock the image")
        write_config(mount.config, {"disk0": {"file": image,
                                              "format": "raw"}})
        proc = imgfs_run("reload", mount.path)
        assert proc.returncode == 1
        assert "nothing changed" in proc.stderr
        assert "is in use" in proc.stderr
        assert os.listdir(mount.path) == ["other"]
        # "other" was closed for the attempt and reopened: still locked
        proc = run("qemu-io", "-f", "raw", "-c", "write 0 512", other,
                   check=False)
        assert proc.returncode != 0
    finally:
        holder.stdin.close()
        stop_process(holder)
