"""The command line: --help, --version, bad usage and FUSE options (-o)."""

import errno
import os
import re
import subprocess

import pytest

from conftest import (
    MiB,
    create_image,
    error_lines,
    fill,
    is_mounted,
    require_root,
    sha256,
    unmount,
)


def imgfs_cmd(imgfs_bin, *args):
    return subprocess.run(
        [str(imgfs_bin), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_help(imgfs_bin):
    proc = imgfs_cmd(imgfs_bin, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "mount" in proc.stdout
    assert "CONFIG" in proc.stdout.upper()


def test_version(imgfs_bin):
    proc = imgfs_cmd(imgfs_bin, "--version")
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    assert re.fullmatch(r"imgfs \d+\.\d+\S*", first), first
    # the built-in formats and protocols follow the version line
    built_in = " ".join(rest)
    assert re.search(r"\braw\b", built_in), proc.stdout
    assert re.search(r"\bfile\b", built_in), proc.stdout


def test_no_args_prints_usage(imgfs_bin):
    proc = imgfs_cmd(imgfs_bin)
    assert proc.returncode != 0
    assert "mount" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["--no-such-option"],
        ["mount"],
        ["mount", "only-a-config.ini"],
        ["mount", "a.ini", "mnt", "extra"],
    ],
    ids=["unknown-command", "unknown-option", "mount-no-args",
         "mount-one-arg", "mount-three-args"],
)
def test_bad_usage_fails(imgfs_bin, args):
    proc = imgfs_cmd(imgfs_bin, *args)
    assert proc.returncode != 0
    assert error_lines(proc.stderr)[0].startswith("imgfs: "), proc.stderr


def test_fuse_option_ro(imgfs, tmp_path):
    """-o ro is handed to FUSE: the kernel refuses every write."""
    image = create_image(tmp_path / "disk0.img", 16 * MiB)
    fill(image, 0x5A, 0, 16 * MiB)
    before = sha256(image)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}},
                  fuse_options="ro")
    assert os.statvfs(mount.path).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as err:
        os.open(mount.drive(), os.O_WRONLY)
    assert err.value.errno == errno.EROFS
    assert sha256(mount.drive()) == before
    assert mount.unmount() == 0
    assert not is_mounted(mount.path)
    assert sha256(image) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["mount", "-x", "c.ini", "mnt"], "mount: unknown option '-x'"),
        (["mount", "-fx", "c.ini", "mnt"], "mount: unknown option '-x'"),
        (["mount", "--bogus", "c.ini", "mnt"],
         "mount: unknown option '--bogus'"),
        (["mount", "--bogus=1", "c.ini", "mnt"],
         "mount: unknown option '--bogus'"),
        (["mount", "--foreground=1", "c.ini", "mnt"],
         "mount: option '--foreground' takes no argument"),
        (["mount", "-o"],
         "mount: option '-o' needs an argument"),
        (["info", "-x", "disk.img"], "info: unknown option '-x'"),
        (["info", "--format"],
         "info: option '--format' needs an argument"),
    ],
    ids=["mount-short", "mount-cluster", "mount-long", "mount-long-value",
         "mount-no-argument-allowed", "mount-no-argument", "info-short",
         "info-no-argument"],
)
def test_unknown_option_one_line(imgfs_bin, args, message):
    """getopt's own two lines ("invalid option -- 'x'", then "Try ...")
    become one, in imgfs's form."""
    proc = imgfs_cmd(imgfs_bin, *args)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"imgfs: {message} (try 'imgfs --help')"
    ], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "option, says",
    [
        ("bogus_opt", "-o: unknown option(s): `-o bogus_opt'"),
        ("max_read=abc", "-o: invalid parameter in option `max_read=abc'"),
        # libfuse accepts it, the kernel refuses it for a non-block mount
        ("blksize=4096", "cannot mount on '{mnt}': fuse: mount failed: "
                         "Invalid argument"),
    ],
    ids=["unknown", "bad-value", "kernel-refuses"],
)
def test_bad_fuse_option_one_line(imgfs_bin, tmp_path, option, says):
    """libfuse's complaint and imgfs's error come as one line."""
    if option.startswith("blksize"):
        # as a user, fusermount3 mounts and prints its own message
        require_root("mount(2) without fusermount3")
    image = create_image(tmp_path / "disk0.img", MiB)
    config = tmp_path / "c.ini"
    config.write_text(f"[disk0]\nfile = {image}\nformat = raw\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = imgfs_cmd(imgfs_bin, "mount", "-o", option, config, mnt)
    mounted = is_mounted(mnt)
    if mounted:
        unmount(mnt, lazy=True)
    assert proc.returncode != 0
    assert not mounted
    assert error_lines(proc.stderr) == [
        "imgfs: " + says.format(mnt=os.path.realpath(mnt))
    ], proc.stderr
    assert os.listdir(mnt) == []
