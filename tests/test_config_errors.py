"""Every bad input makes `imgfs mount` fail with one line on stderr.

The line starts with "imgfs: " and names what is wrong (the drive, the key,
the file).  Nothing may be mounted: the mount point stays as it was.  The
daemonizing form (no -f) is used, as a user would run it: its parent must
report the error and exit non-zero.

test_semicolon_comments mounts: that ';' lines are read as comments only
a working mount shows.
"""

import os
import stat
import subprocess

import pytest

from conftest import (
    Mount,
    MiB,
    daemon_env,
    error_lines,
    is_mounted,
    read_at,
    unmount,
    wait_until_answers,
    write_at,
)


@pytest.fixture
def setup(tmp_path):
    """An image, an empty mount point, and a writer for the config text."""
    images = tmp_path / "images"
    images.mkdir()
    with open(images / "disk0.img", "wb") as f:
        f.truncate(MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "config.ini"

    def write(text):
        config.write_text(text)
        return config

    return write, mnt


def mount_fails(imgfs_bin, config, mnt):
    """Run `imgfs mount CONFIG MNT`; return its one-line error message."""
    proc = subprocess.run(
        [str(imgfs_bin), "mount", str(config), str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    mounted = is_mounted(mnt)
    if mounted:
        unmount(mnt, lazy=True)
    assert proc.returncode != 0, "imgfs mount succeeded on a bad input"
    assert not mounted, "imgfs failed but left a mount behind"
    assert not os.path.ismount(mnt)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"want one error line, got:\n{proc.stderr}"
    assert lines[0].startswith("imgfs: "), lines[0]
    return lines[0]


DISK0 = "[disk0]\nfile = images/disk0.img\n"


def test_unknown_key(imgfs_bin, setup):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write(DISK0 + "colour = blue\n"), mnt)
    assert "unknown key 'colour'" in msg
    assert "drive 'disk0'" in msg
    assert os.listdir(mnt) == []


def test_unknown_global_key(imgfs_bin, setup):
    write, mnt = setup
    text = "[imgfs]\ncolour = blue\n\n" + DISK0
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "unknown key 'colour'" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("read-only", "maybe"),
        ("cache", "sometimes"),
        ("raw.size", "12Q"),
        ("raw.offset", "-1"),
    ],
)
def test_bad_value(imgfs_bin, setup, key, value):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write(DISK0 + f"{key} = {value}\n"), mnt)
    assert f"key '{key}'" in msg
    assert "invalid" in msg
    assert "drive 'disk0'" in msg
    assert os.listdir(mnt) == []


def test_bad_global_value(imgfs_bin, setup):
    write, mnt = setup
    text = "[imgfs]\niothreads = lots\n\n" + DISK0
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "key 'iothreads'" in msg
    assert "invalid" in msg
    assert os.listdir(mnt) == []


def test_missing_image_file(imgfs_bin, setup):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write("[disk0]\nfile = images/nothere.img\n"),
                      mnt)
    assert "images/nothere.img" in msg
    assert "No such file or directory" in msg
    assert "drive 'disk0'" in msg
    assert os.listdir(mnt) == []


def test_missing_file_key(imgfs_bin, setup):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write("[disk0]\nformat = raw\n"), mnt)
    assert "drive 'disk0'" in msg
    assert "'file'" in msg
    assert os.listdir(mnt) == []


def test_unknown_format(imgfs_bin, setup):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write(DISK0 + "format = nosuchformat\n"), mnt)
    assert "drive 'disk0'" in msg
    assert "nosuchformat" in msg
    assert os.listdir(mnt) == []


def test_slice_beyond_end_of_image(imgfs_bin, setup):
    write, mnt = setup
    text = DISK0 + "format = raw\nraw.offset = 512K\nraw.size = 1M\n"
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "drive 'disk0'" in msg
    assert os.listdir(mnt) == []


def test_duplicate_drive(imgfs_bin, setup):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write(DISK0 + "\n" + DISK0), mnt)
    assert "duplicate drive 'disk0'" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("name", ["sub/disk", ".hidden", ".."])
def test_invalid_drive_name(imgfs_bin, setup, name):
    write, mnt = setup
    text = f"[{name}]\nfile = images/disk0.img\n"
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "invalid drive name" in msg
    assert name in msg
    assert os.listdir(mnt) == []


def test_mount_point_not_empty(imgfs_bin, setup):
    write, mnt = setup
    (mnt / "keep").write_text("mine\n")
    msg = mount_fails(imgfs_bin, write(DISK0), mnt)
    assert "mount point" in msg
    assert "not an empty directory" in msg
    assert os.listdir(mnt) == ["keep"]
    assert (mnt / "keep").read_text() == "mine\n"


def test_mount_point_is_a_file(imgfs_bin, setup, tmp_path):
    write, _ = setup
    target = tmp_path / "file"
    target.write_text("mine\n")
    msg = mount_fails(imgfs_bin, write(DISK0), target)
    assert "mount point" in msg
    assert "not an empty directory" in msg
    assert target.read_text() == "mine\n"


def test_mount_point_missing(imgfs_bin, setup, tmp_path):
    write, _ = setup
    missing = tmp_path / "nowhere"
    msg = mount_fails(imgfs_bin, write(DISK0), missing)
    assert "mount point" in msg
    assert "No such file or directory" in msg
    assert not missing.exists()


def test_one_good_one_broken_drive(imgfs_bin, setup):
    write, mnt = setup
    text = DISK0 + "\n[disk1]\nfile = images/nothere.img\n"
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "drive 'disk1'" in msg
    assert os.listdir(mnt) == []


def test_config_missing(imgfs_bin, setup, tmp_path):
    _, mnt = setup
    config = tmp_path / "nothere.ini"
    msg = mount_fails(imgfs_bin, config, mnt)
    assert str(config) in msg
    assert "No such file or directory" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize(
    "text", ["", "[imgfs]\niothreads = 2\n"], ids=["empty", "settings-only"]
)
def test_no_drives(imgfs_bin, setup, text):
    write, mnt = setup
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "no drives" in msg
    assert os.listdir(mnt) == []


# -- drive options (issue 6): every bad value names the drive and the key --


@pytest.mark.parametrize(
    "key, value",
    [
        ("cache.direct", "maybe"),
        ("cache.no-flush", "2"),
        ("write-cache", "perhaps"),
        ("aio", "posix"),
        ("detect-zeroes", "yes"),
        ("discard", "sometimes"),
        ("werror", "retry"),
        ("rerror", "enospc"),  # valid for werror only
        ("rerror", "stopp"),
        ("locking", "maybe"),
        ("force-share", "2"),
        ("auto-read-only", "sometimes"),
        ("snapshot", "perhaps"),
        ("throttling.iops-total", "fast"),
        ("throttling.iops-total", "-5"),
        ("throttling.bps-read", "1.5"),
        ("throttling.bps-write-max", "lots"),
        ("throttling.iops-write-max-length", "x"),
        ("throttling.iops-size", "12Q"),
        ("stats-intervals", "0"),
        ("stats-intervals", "60,abc"),
        ("stats-intervals", "60,,3600"),
        ("stats-account-invalid", "maybe"),
        ("stats-account-failed", "2"),
        ("iothread", "one"),
        ("iothread", "2"),  # [imgfs] iothreads = 2: 0 or 1
    ],
)
def test_bad_drive_option(imgfs_bin, setup, key, value):
    write, mnt = setup
    text = "[imgfs]\niothreads = 2\n\n" + DISK0 + f"{key} = {value}\n"
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert f"key '{key}'" in msg
    assert "invalid" in msg
    assert "drive 'disk0'" in msg
    assert value in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize(
    "keys, key",
    [
        # Linux AIO needs O_DIRECT
        ({"aio": "native"}, "aio"),
        ({"aio": "native", "cache": "writethrough"}, "aio"),
        ({"aio": "native", "cache": "none", "cache.direct": "off"}, "aio"),
        # force-share only for a read-only drive
        ({"force-share": "on"}, "force-share"),
        # a burst needs its average, and is not below it
        ({"throttling.iops-total-max": "100"}, "throttling.iops-total-max"),
        ({"throttling.bps-total": "1000", "throttling.bps-total-max": "10"},
         "throttling.bps-total-max"),
        ({"throttling.iops-read": "10",
          "throttling.iops-read-max": "20",
          "throttling.iops-read-max-length": "0"},
         "throttling.iops-read-max-length"),
        # a total limit and a read limit of the same kind
        ({"throttling.iops-total": "100", "throttling.iops-read": "50"},
         "throttling.iops-read"),
        ({"throttling.bps-total": "100", "throttling.bps-write": "50"},
         "throttling.bps-write"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_inconsistent_drive_options(imgfs_bin, setup, keys, key):
    write, mnt = setup
    text = DISK0 + "".join(f"{k} = {v}\n" for k, v in keys.items())
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert f"'{key}'" in msg
    assert "drive 'disk0'" in msg
    assert os.listdir(mnt) == []


def test_throttle_group_with_different_limits(imgfs_bin, setup):
    write, mnt = setup
    text = (DISK0 + "throttling.group = g\nthrottling.iops-total = 100\n\n"
            "[disk1]\nfile = images/disk0.img\nread-only = on\n"
            "force-share = on\n"
            "throttling.group = g\nthrottling.iops-total = 200\n")
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "'throttling.group'" in msg
    assert "drive 'disk1'" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("key, value", [("cache", "bogus"),
                                        ("werror", "retry"),
                                        ("throttling.iops-total", "fast"),
                                        ("fuse-uring", "sometimes")])
def test_bad_global_drive_default(imgfs_bin, setup, key, value):
    write, mnt = setup
    text = f"[imgfs]\n{key} = {value}\n\n" + DISK0
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "[imgfs]" in msg
    assert f"key '{key}'" in msg
    assert "invalid" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("key, value", [("file", "images/disk0.img"),
                                        ("format", "raw"),
                                        ("snapshot", "on"),
                                        ("iothread", "0")])
def test_per_drive_key_in_global_group(imgfs_bin, setup, key, value):
    write, mnt = setup
    text = f"[imgfs]\n{key} = {value}\n\n" + DISK0
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert f"'{key}'" in msg
    assert os.listdir(mnt) == []


@pytest.mark.parametrize("value", ["", "  "])
def test_bad_control_path(imgfs_bin, setup, value):
    write, mnt = setup
    text = f"[imgfs]\ncontrol = {value}\n\n" + DISK0
    msg = mount_fails(imgfs_bin, write(text), mnt)
    assert "key 'control'" in msg
    assert os.listdir(mnt) == []


# -- what GKeyFile would otherwise read differently from the scanner --


@pytest.mark.parametrize(
    "text, line, where",
    [
        (DISK0 + "read-only[de] = on\n", 3, "drive 'disk0'"),
        (DISK0 + "cache[C] = none\n", 3, "drive 'disk0'"),
        ("[imgfs]\ncache[de] = none\n\n" + DISK0, 2, "[imgfs]"),
    ],
    ids=["drive", "drive-C", "global"],
)
def test_locale_suffixed_key(imgfs_bin, setup, text, line, where):
    """GKeyFile reads `key[locale]` as a translation and drops those of
    other locales: such a key would be ignored without a word."""
    write, mnt = setup
    config = write(text)
    msg = mount_fails(imgfs_bin, config, mnt)
    key = text.splitlines()[line - 1].split("=")[0].strip()
    assert f"{config}:{line}: " in msg
    assert f"unknown key '{key}'" in msg
    assert where in msg
    assert os.listdir(mnt) == []


def test_semicolon_comment_keeps_line_numbers(imgfs_bin, setup):
    write, mnt = setup
    config = write("; the drives\n;\n" + DISK0 + "; colour\ncolour = blue\n")
    msg = mount_fails(imgfs_bin, config, mnt)
    assert f"{config}:6: drive 'disk0': unknown key 'colour'" in msg
    assert os.listdir(mnt) == []


@pytest.fixture
def mount_text(setup, tmp_path, imgfs_bin):
    """Factory: mount_text(TEXT, names) runs `imgfs mount -f` on a config
    written as TEXT (the imgfs fixture writes its own) and returns a Mount."""
    write, mnt = setup
    started = []

    def start(text, names):
        config = write(text)
        log = tmp_path / "mnt.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [str(imgfs_bin), "mount", "-f", str(config), str(mnt)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env=daemon_env(), start_new_session=True)
        mount = Mount(mnt, config, log, proc, {})
        started.append(mount)
        wait_until_answers(mount, names)
        return mount

    yield start
    problems = []
    for mount in started:
        problems += mount.teardown()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_semicolon_comments(mount_text):
    """';' starts a comment line, as '#' does (and as in most INI files):
    the commented-out key has no effect."""
    text = ("; imgfs drives\n"
            "[disk0]\n"
            "  ; indented\n"
            "file = images/disk0.img\n"
            ";read-only = on\n"
            "; format = qcow2\n"
            "# a '#' comment\n")
    mount = mount_text(text, ["disk0"])
    assert stat.S_IMODE(os.stat(mount.drive()).st_mode) == 0o644
    write_at(mount.drive(), 4096, b"written")
    assert read_at(mount.drive(), 4096, 7) == b"written"
    assert mount.unmount() == 0
