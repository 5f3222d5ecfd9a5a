"""The control interface: `imgfs status`, `imgfs resume`, `imgfs reload`
and SIGHUP, the control socket and its JSON lines, `format = help`.

A reload re-reads config.ini while the mount lives: it adds and removes
drives without disturbing the others (fio keeps writing and verifying on
one drive meanwhile), reopens changed drives no program has open, leaves
busy ones alone and says so, and changes nothing at all when the new
config is bad.
"""

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess

import pytest

from conftest import (
    CONTROL_XATTR,
    MiB,
    control_socket,
    create_image,
    daemon_env,
    drive_status,
    error_lines,
    fill,
    fio_wait,
    imgfs_run,
    imgfs_status,
    is_mounted,
    read_at,
    sha256,
    start_fio,
    unmount,
    wait_for,
    write_at,
    write_config,
)

SIZE = 16 * MiB


def make_images(tmp_path, *names, size=SIZE):
    images = {}
    for i, name in enumerate(names):
        images[name] = create_image(tmp_path / f"{name}.img", size)
        fill(images[name], 0x10 + i, 0, MiB)
    return images


def drives_of(images, **extra):
    return {name: {"file": path, "format": "raw", **extra.get(name, {})}
            for name, path in images.items()}


def reload(mount, drives, settings=None, expect_ok=True):
    """Rewrite MOUNT's config and run `imgfs reload`; its output lines."""
    write_config(mount.config, drives, settings)
    proc = imgfs_run("reload", mount.path)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()
    return proc


def listed(lines, label):
    """The names `imgfs reload` printed after LABEL."""
    for line in lines:
        if line.startswith(label + ":"):
            return sorted(line[len(label) + 1:].split())
    return []


def wait_closed(mount, name):
    """The program closed NAME: its release reached the daemon."""
    wait_for(lambda: drive_status(mount, name)["open-files"] == 0, 30,
             f"{name} to have no open files")


# -- status ----------------------------------------------------------------


def test_status(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0", "ro")
    mount = imgfs(drives_of(images, ro={"read-only": "on", "cache": "none"}),
                  settings={"iothreads": 2})
    fd = os.open(mount.drive("disk0"), os.O_RDONLY)
    try:
        status = imgfs_status(mount)
        assert status["mountpoint"] == str(mount.path)
        assert os.path.samefile(status["config"], mount.config)
        assert status["pid"] == mount.pid
        assert status["iothreads"] == 2
        drives = {d["name"]: d for d in status["drives"]}
        assert sorted(drives) == ["disk0", "ro"]
        d0, ro = drives["disk0"], drives["ro"]
        assert d0["state"] == ro["state"] == "running"
        assert d0["size"] == SIZE
        assert d0["chain"] == [{"filename": str(images["disk0"]),
                                "format": "raw", "virtual-size": SIZE,
                                "read-only": False}]
        assert d0["open-files"] == 1 and ro["open-files"] == 0
        assert d0["options"]["read-only"] is False
        assert ro["options"]["read-only"] is True
        assert ro["options"]["cache"]["direct"] is True
        assert ro["chain"][0]["read-only"] is True
        # the documented defaults
        o = d0["options"]
        assert (o["aio"], o["detect-zeroes"], o["discard"], o["werror"],
                o["rerror"], o["locking"]) == (
            "io_uring", "off", "unmap", "report", "report", "auto")
        assert o["cache"] == {"direct": False, "no-flush": False,
                              "writeback": True}
    finally:
        os.close(fd)

    proc = imgfs_run("status", mount.path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert str(mount.path) in text
    for name in ("disk0", "ro"):
        assert any(line.startswith(name) and "running" in line
                   for line in text.splitlines()), text
    assert str(images["ro"]) in text
    assert "read-only" in text and "cache.direct=on" in text


def test_global_defaults_and_overrides(imgfs, tmp_path):
    images = make_images(tmp_path, "a", "b")
    mount = imgfs(drives_of(images, b={"werror": "report",
                                       "detect-zeroes": "off"}),
                  settings={"cache": "none", "werror": "stop",
                            "detect-zeroes": "unmap", "aio": "threads"})
    a = drive_status(mount, "a")["options"]
    b = drive_status(mount, "b")["options"]
    assert (a["werror"], a["detect-zeroes"], a["aio"]) == \
        ("stop", "unmap", "threads")
    assert a["cache"]["direct"] is True
    assert (b["werror"], b["detect-zeroes"], b["aio"]) == \
        ("report", "off", "threads")
    assert b["cache"]["direct"] is True


def test_iothread_placement(imgfs, tmp_path):
    images = make_images(tmp_path, "a", "b", "c")
    mount = imgfs(drives_of(images, a={"iothread": 1}, b={"iothread": 1},
                            c={"iothread": 0}),
                  settings={"iothreads": 2})
    placed = {d["name"]: d["iothread"]
              for d in imgfs_status(mount)["drives"]}
    assert placed == {"a": "imgfs-io1", "b": "imgfs-io1", "c": "imgfs-io0"}
    names = set()
    for tid in os.listdir(f"/proc/{mount.pid}/task"):
        with open(f"/proc/{mount.pid}/task/{tid}/comm") as f:
            names.add(f.read().strip())
    assert {"imgfs-io0", "imgfs-io1"} <= names, names
    assert "imgfs-io2" not in names


# -- the socket -------------------------------------------------------------


def test_default_socket_and_xattr(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0")
    mount = imgfs(drives_of(images))
    path = control_socket(mount)
    assert os.getxattr(mount.path, CONTROL_XATTR).decode() == path
    if os.geteuid() == 0:
        digest = hashlib.sha256(str(mount.path).encode()).hexdigest()[:16]
        assert path == f"/run/imgfs/{digest}.sock"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert CONTROL_XATTR in os.listxattr(mount.path)
    assert mount.unmount() == 0
    assert not os.path.exists(path), "control socket left after unmount"


def test_configured_socket(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0")
    mount = imgfs(drives_of(images), settings={"control": "ctl/imgfs.sock"})
    path = tmp_path / "ctl" / "imgfs.sock"  # relative to the config
    assert control_socket(mount) == str(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert imgfs_status(mount)["drives"][0]["name"] == "disk0"
    assert mount.unmount() == 0
    assert not path.exists()


def test_json_lines_client(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0")
    mount = imgfs(drives_of(images))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(control_socket(mount))
    f = sock.makefile("rw")

    def ask(line):
        f.write(line + "\n")
        f.flush()
        return json.loads(f.readline())

    try:
        reply = ask('{"command": "status"}')
        assert reply["return"]["drives"][0]["name"] == "disk0"
        assert reply["return"]["pid"] == mount.pid
        assert "error" in ask('{"command": "selfdestruct"}')
        assert "error" in ask("this is not json")
        assert "error" in ask('{"no": "command"}')
        reply = ask('{"command": "resume", "drive": "nosuchdrive"}')
        assert "no such drive" in reply["error"]
        # a drive that is not a name is an error, not "every drive"
        reply = ask('{"command": "resume", "drive": 5}')
        assert "must be a drive's name" in reply["error"]
        # still answering on the same connection
        reply = ask('{"command": "resume"}')
        assert reply["return"]["resumed"] == []
    finally:
        sock.close()


def test_resume_and_status_errors(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0")
    mount = imgfs(drives_of(images))
    proc = imgfs_run("resume", mount.path)
    assert proc.returncode == 0
    assert "no drive was stopped" in proc.stdout
    proc = imgfs_run("resume", mount.path, "nosuchdrive")
    assert proc.returncode == 1
    assert "no such drive" in proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in ("status", "resume", "reload"):
        proc = imgfs_run(command, elsewhere)
        assert proc.returncode == 1, command
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and str(elsewhere) in lines[0], proc.stderr


def default_socket(mnt):
    digest = hashlib.sha256(str(os.path.realpath(mnt)).encode()).hexdigest()
    return f"/run/imgfs/{digest[:16]}.sock"


def test_socket_ready_when_mount_appears(imgfs_bin, tmp_path):
    """With -f, a program that waits for the mount point and then asks
    `imgfs status` must get an answer: the socket listens before the
    mount appears."""
    if os.geteuid() != 0:
        pytest.skip("the default socket path checked here is root's")
    images = make_images(tmp_path, "disk0")
    config = write_config(tmp_path / "c.ini", drives_of(images))
    for i in range(5):
        mnt = tmp_path / f"mnt{i}"
        mnt.mkdir()
        sock = default_socket(mnt)
        proc = subprocess.Popen([str(imgfs_bin), "mount", "-f", str(config),
                                 str(mnt)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=daemon_env())
        try:
            wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, 30,
                     "the mount", interval=0.0005)
            listening = os.path.exists(sock)
            status = imgfs_run("status", "--json", mnt)
        finally:
            unmount(mnt)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert listening, (
            f"mount {i}: the mount point appeared before the control "
            f"socket {sock} existed")
        assert status.returncode == 0, status.stderr


def test_daemon_form_answers_status_at_once(imgfs_bin, tmp_path):
    """`imgfs mount` (detaching) returns when status answers."""
    images = make_images(tmp_path, "disk0")
    config = write_config(tmp_path / "c.ini", drives_of(images))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([str(imgfs_bin), "mount", str(config), str(mnt)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    try:
        status = imgfs_run("status", "--json", mnt)
        assert status.returncode == 0, status.stderr
        pid = json.loads(status.stdout)["pid"]
    finally:
        unmount(mnt)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30,
             "the daemon to exit")


# -- reload ----------------------------------------------------------------


def test_reload_under_fio_load(imgfs, tmp_path):
    images = make_images(tmp_path, "busy", "old", "new1", "new2")
    drives = drives_of(images)
    mount = imgfs({n: drives[n] for n in ("busy", "old")})
    old_sum = sha256(mount.drive("old"))
    # about 6 s of writes, then their verification (the write rate keeps
    # fio going while we reload, however fast the machine)
    fio = start_fio(mount.drive("busy"), name="busy", rw="randwrite",
                    bs="16k", size="4M", numjobs=2, offset_increment="8M",
                    ioengine="io_uring", direct=1, iodepth=8,
                    rate_iops=",40", verify="crc32c", verify_fatal=1,
                    do_verify=1)
    try:
        wait_for(lambda: drive_status(mount, "busy")["stats"]["write"]["ops"]
                 > 0 or fio.poll() is not None, 60, "fio to start writing")

        out = reload(mount, {n: drives[n] for n in ("busy", "new1")})
        assert listed(out, "added") == ["new1"]
        assert listed(out, "removed") == ["old"]
        assert listed(out, "unchanged") == ["busy"]
        assert sorted(os.listdir(mount.path)) == ["busy", "new1"]
        assert not os.path.exists(mount.drive("old"))
        assert read_at(mount.drive("new1"), 0, MiB) == \
            read_at(images["new1"], 0, MiB)
        write_at(mount.drive("new1"), 2 * MiB, b"new1 data")

        # SIGHUP does the same
        write_config(mount.config,
                     {n: drives[n] for n in ("busy", "new2", "old")})
        os.kill(mount.pid, signal.SIGHUP)
        wait_for(lambda: sorted(os.listdir(mount.path)) ==
                 ["busy", "new2", "old"], 60, "SIGHUP to reload")
        assert sha256(mount.drive("old")) == old_sum
        assert fio.poll() is None, "fio ended before the reloads were done"
    finally:
        jobs = fio_wait(fio)
    assert sum(j["write"]["io_bytes"] for j in jobs) == 8 * MiB
    assert sum(j["read"]["io_bytes"] for j in jobs) == 8 * MiB
    busy = drive_status(mount, "busy")
    assert busy["state"] == "running"
    assert busy["stats"]["write"]["failed"] == 0
    assert busy["stats"]["read"]["failed"] == 0
    log = mount.stderr()
    assert "reload: 1 added, 1 removed, 0 reopened, 0 busy" in log, log
    assert "reload: 2 added, 1 removed, 0 reopened, 0 busy" in log, log
    assert mount.unmount() == 0
    assert read_at(images["new1"], 2 * MiB, 9) == b"new1 data"


def test_reload_reopens_changed_drive(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0", "other")
    drives = drives_of(images)
    mount = imgfs(drives)
    out = reload(mount, drives_of(images, disk0={"read-only": "on"}))
    assert listed(out, "reopened") == ["disk0"]
    assert listed(out, "unchanged") == ["other"]
    assert stat.S_IMODE(os.stat(mount.drive("disk0")).st_mode) == 0o444
    assert drive_status(mount, "disk0")["options"]["read-only"] is True
    with pytest.raises(OSError):
        os.open(mount.drive("disk0"), os.O_WRONLY)
    # and back
    out = reload(mount, drives)
    assert listed(out, "reopened") == ["disk0"]
    write_at(mount.drive("disk0"), 0, b"writable again")
    # nothing changed: nothing reopened
    out = reload(mount, drives)
    assert listed(out, "unchanged") == ["disk0", "other"]
    assert listed(out, "reopened") == []


def test_reload_leaves_busy_drive_alone(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0", "other")
    drives = drives_of(images)
    mount = imgfs(drives)
    fd = os.open(mount.drive("disk0"), os.O_RDWR)
    try:
        changed = drives_of(images, disk0={"cache": "none"})
        del changed["other"]  # removing "other" (not open) still happens
        out = reload(mount, changed)
        assert listed(out, "busy (open by a program, not changed)") == \
            ["disk0"]
        assert listed(out, "removed") == ["other"]
        assert drive_status(mount, "disk0")["options"]["cache"]["direct"] \
            is False
        # the program's file keeps working
        assert os.pwrite(fd, b"still here", 0) == 10
        # removing an open drive: busy too, it stays
        out = reload(mount, {"placeholder": {"file": images["other"],
                                             "format": "raw"}})
        assert listed(out, "busy (open by a program, not changed)") == \
            ["disk0"]
        assert "disk0" in os.listdir(mount.path)
        os.fsync(fd)
    finally:
        os.close(fd)
    wait_closed(mount, "disk0")
    out = reload(mount, changed)
    assert listed(out, "reopened") == ["disk0"]
    assert listed(out, "removed") == ["placeholder"]
    assert drive_status(mount, "disk0")["options"]["cache"]["direct"] is True
    assert read_at(mount.drive("disk0"), 0, 10) == b"still here"


@pytest.mark.parametrize("bad, words", [
    ({"cache": "bogus"}, ["drive 'new'", "'cache'"]),
    ({"file": "/nonexistent/new.img"}, ["drive 'new'",
                                        "No such file or directory"]),
])
def test_bad_reload_changes_nothing(imgfs, tmp_path, bad, words):
    images = make_images(tmp_path, "disk0", "other", "new")
    drives = drives_of(images)
    mount = imgfs({n: drives[n] for n in ("disk0", "other")})
    before = imgfs_status(mount)
    # the new config removes "other", changes "disk0" and adds a bad drive
    proc = reload(mount, {"disk0": {**drives["disk0"], "read-only": "on"},
                          "new": {**drives["new"], **bad}},
                  expect_ok=False)
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "reload: nothing changed" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(os.listdir(mount.path)) == ["disk0", "other"]
    after = imgfs_status(mount)
    assert [(d["name"], d["options"], d["chain"]) for d in after["drives"]] \
        == [(d["name"], d["options"], d["chain"]) for d in before["drives"]]
    # both drives still work
    write_at(mount.drive("disk0"), 0, b"fine")
    assert read_at(mount.drive("other"), 0, MiB) == \
        read_at(images["other"], 0, MiB)


def test_reload_cannot_change_iothreads(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0", "new")
    drives = drives_of(images)
    mount = imgfs({"disk0": drives["disk0"]}, settings={"iothreads": 1})
    proc = reload(mount, drives, settings={"iothreads": 2}, expect_ok=False)
    assert proc.returncode == 1
    assert "nothing changed" in proc.stderr and "iothreads" in proc.stderr
    assert os.listdir(mount.path) == ["disk0"]


def test_sighup_bad_config_logged(imgfs, tmp_path):
    images = make_images(tmp_path, "disk0")
    mount = imgfs(drives_of(images))
    mount.config.write_text("[disk0]\nfile = /nonexistent.img\ncolour = 3\n")
    os.kill(mount.pid, signal.SIGHUP)
    wait_for(lambda: "nothing changed" in mount.stderr(), 60,
             "the daemon to log the failed reload")
    line = [l for l in mount.stderr().splitlines()
            if "nothing changed" in l][0]
    assert "SIGHUP" in line and "'colour'" in line
    assert os.listdir(mount.path) == ["disk0"]
    assert mount.returncode() is None
    assert sha256(mount.drive()) == sha256(images["disk0"])


# -- format = help ---------------------------------------------------------


def test_formats(imgfs_bin, tmp_path):
    proc = imgfs_run("formats")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert "formats:" in lines and "protocols:" in lines
    formats = lines[lines.index("formats:") + 1:lines.index("protocols:")]
    protocols = lines[lines.index("protocols:") + 1:]
    assert "raw" in [l.split()[0] for l in formats]
    assert "file" in [l.split()[0] for l in protocols]

    image = create_image(tmp_path / "disk0.img", MiB)
    config = tmp_path / "c.ini"
    config.write_text(f"[disk0]\nfile = {image}\nformat = help\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = subprocess.run([str(imgfs_bin), "mount", str(config), str(mnt)],
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    mounted = is_mounted(mnt)
    if mounted:
        unmount(mnt, lazy=True)
    assert mount.returncode == 0, mount.stderr
    assert not mounted
    assert mount.stdout == proc.stdout


def test_control_socket_in_use(imgfs, imgfs_bin, tmp_path):
    """Two mounts configured with one socket path: the second fails with
    one line naming the socket, and leaves nothing mounted."""
    images = make_images(tmp_path, "a", "b")
    sock = tmp_path / "shared.sock"
    first = imgfs({"a": {"file": images["a"], "format": "raw"}},
                  settings={"control": sock})
    config = write_config(tmp_path / "second.ini",
                          {"b": {"file": images["b"], "format": "raw"}},
                          {"control": sock})
    mnt = tmp_path / "second"
    mnt.mkdir()
    proc = subprocess.run([str(imgfs_bin), "mount", str(config), str(mnt)],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    mounted = is_mounted(mnt)
    if mounted:
        unmount(mnt, lazy=True)
    assert proc.returncode != 0 and not mounted
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and str(sock) in lines[0], proc.stderr
    # the first mount still answers on its socket
    assert imgfs_status(first)["drives"][0]["name"] == "a"


def test_stale_socket_replaced(imgfs, tmp_path):
    """A socket file left by a daemon that died is taken over."""
    images = make_images(tmp_path, "disk0")
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # the file stays, nobody listens
    mount = imgfs(drives_of(images), settings={"control": sock})
    assert imgfs_status(mount)["pid"] == mount.pid
