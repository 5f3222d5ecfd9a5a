"""The rbd protocol driver against a real Ceph cluster.

Oracles are Ceph's and QEMU's own tools: ``rbd export`` and ``rbd diff``
of the image, ``qemu-img compare/check/convert`` with ``rbd:`` names
(qemu-block-extra), and fio's verify.  The cluster is the session's
throwaway one (ceph_fixture.py); the test that kills its cluster gets a
private one.

Times worth knowing (how long an I/O to a vanished cluster takes to fail,
how long a crashed client's lock holds up a new writer) are printed, not
asserted: run with -s to see them.
"""

import errno
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MiB,
    SANITIZER_MARKS,
    assert_same_bytes,
    call_with_timeout,
    daemon_env,
    error_lines,
    fallocate,
    is_mounted,
    run,
    unmount,
    write_config,
)


def imgfs_has(imgfs_bin, kind, name):
    """Does `imgfs formats` list NAME under "formats:" or "protocols:"?"""
    out = run(imgfs_bin, "formats").stdout
    section = None
    for line in out.splitlines():
        if line.endswith(":"):
            section = line[:-1]
        elif section == kind and line.split()[0] == name:
            return True
    return False


@pytest.fixture(autouse=True)
def _rbd_built(imgfs_bin):
    if not imgfs_has(imgfs_bin, "protocols", "rbd"):
        pytest.skip("imgfs was built without rbd (librbd-dev was missing)")


def mount_error(imgfs_bin, tmp_path, drives, timeout=120):
    """Mount a config that must fail; returns (seconds, error lines)."""
    config = write_config(tmp_path / "bad.ini", drives)
    mnt = tmp_path / "bad"
    mnt.mkdir(exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run([str(imgfs_bin), "mount", "-f", str(config),
                           str(mnt)], capture_output=True, text=True,
                          timeout=timeout, env=daemon_env())
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, "imgfs mounted a bad config"
    assert not is_mounted(mnt)
    for mark in SANITIZER_MARKS:
        assert mark not in proc.stderr, proc.stderr
    return elapsed, [line for line in error_lines(proc.stderr)
                     if line.strip()]


def rbd_drive(cluster, spec, **keys):
    return {"file": cluster.uri(spec), "format": "raw", **keys}


def create_image(cluster, name, size, features="layering"):
    cluster.rbd("create", "--size", "%dB" % size, "--image-feature",
                features, "rbd/" + name)


def export(cluster, spec):
    return cluster.rbd("export", "--no-progress", spec, "-")


def rbd_size(cluster, spec):
    return json.loads(cluster.rbd("info", "--format", "json", spec))["size"]


def qemu_io(uri, *cmds, fmt="raw"):
    args = []
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", "-f", fmt, *args, uri)


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def pread_direct(path, offset, length):
    """An O_DIRECT read: neither the page cache nor imgfs' caller can
    answer it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def pwrite_direct(path, offset, data):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        return os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------


def test_mount_equals_rbd_export(ceph_cluster, imgfs):
    c = ceph_cluster
    size = 20 * MiB + 3 * 1024 + 512  # not a whole number of objects
    create_image(c, "exp", size)
    qemu_io(c.uri("rbd/exp"), "write -P 0x11 0 64k",
            "write -P 0x22 4190000 10000",  # across an object boundary
            "write -P 0x33 12M 1M", "write -P 0x44 %d 3k" % (size - 3072))
    m = imgfs({"d": rbd_drive(c, "rbd/exp")})
    assert os.path.getsize(m.drive("d")) == size
    assert_same_bytes(m.drive("d").read_bytes(), export(c, "rbd/exp"),
                      "mounted rbd/exp vs rbd export")


def test_rbd_keys_and_namespace(ceph_cluster, imgfs, imgfs_bin):
    """The same image named by file = rbd:POOL/NS/IMAGE and by rbd.* keys
    only (no file): both show what rbd export shows."""
    c = ceph_cluster
    c.rbd("namespace", "create", "rbd/ns1")
    c.rbd("create", "--size", "8M", "--image-feature", "layering",
          "rbd/ns1/img")
    qemu_io(c.uri("rbd/ns1/img"), "write -P 0x5a 1M 2M")
    drives = {
        "short": rbd_drive(c, "rbd/ns1/img", **{"read-only": "on"}),
        "keys": {
            "rbd.pool": "rbd",
            "rbd.namespace": "ns1",
            "rbd.image": "img",
            "rbd.conf": c.conf,
            "rbd.user": "admin",
            "rbd.keyring": c.keyring,
            "rbd.timeout": "30",
            "rbd.option.rbd_cache_size": str(16 * MiB),
            "format": "raw",
            "read-only": "on",
        },
    }
    expected = export(c, "rbd/ns1/img")
    assert expected[MiB:3 * MiB] == b"\x5a" * (2 * MiB)
    m = imgfs(drives)
    for d in drives:
        assert_same_bytes(m.drive(d).read_bytes(), expected, d)
    info = json.loads(run(imgfs_bin, "info", "--json", "--format", "rbd",
                          c.uri("rbd/ns1/img")).stdout)
    assert info["virtual-size"] == 8 * MiB
    assert info["format-specific"]["pool"] == "rbd"
    assert info["format-specific"]["namespace"] == "ns1"
    assert info["format-specific"]["image-name"] == "img"


@pytest.mark.parametrize("cache",
                         ["writeback", "none", "writethrough", "unsafe"])
def test_writes_seen_by_rbd_and_qemu(ceph_cluster, imgfs, tmp_path, cache):
    """Writes through imgfs are in the cluster: at once with cache=none and
    writethrough, after fsync with writeback (librbd's cache flushed),
    after the unmount with unsafe (fsync ignored, close flushes)."""
    c = ceph_cluster
    name = "wr-" + cache
    size = 16 * MiB
    create_image(c, name, size)
    ref = bytearray(size)
    writes = [(0, 4096), (4097, 1000), (4 * MiB - 100, 200),
              (5 * MiB, MiB), (size - 777, 777)]
    keys = {"cache": cache}
    if cache in ("writeback", "unsafe"):
        # librbd's default policy (writearound) sends writes straight to
        # the OSDs; make its cache hold them, long enough that only a
        # flush can have written them when fsync returns.
        keys.update({"rbd.option.rbd_cache_policy": "writeback",
                     "rbd.option.rbd_cache_max_dirty_age": "60"})
    m = imgfs({"d": rbd_drive(c, "rbd/" + name, **keys)})
    fd = os.open(m.drive("d"), os.O_RDWR)
    try:
        for i, (off, n) in enumerate(writes):
            data = pattern(n, i)
            assert os.pwrite(fd, data, off) == n
            ref[off:off + n] = data
        # Deallocate part of the 1 MiB write, zero another part.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * MiB,
                  256 * 1024)
        ref[5 * MiB:5 * MiB + 256 * 1024] = bytes(256 * 1024)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  5 * MiB + 512 * 1024, 4096)
        ref[5 * MiB + 512 * 1024:5 * MiB + 516 * 1024] = bytes(4096)
        if cache in ("none", "writethrough"):
            assert_same_bytes(export(c, "rbd/" + name), bytes(ref),
                              "rbd export before fsync (cache=%s)" % cache)
        os.fsync(fd)
        if cache != "unsafe":
            assert_same_bytes(export(c, "rbd/" + name), bytes(ref),
                              "rbd export after fsync, still mounted")
    finally:
        os.close(fd)
    assert pread_direct(m.drive("d"), 4 * MiB - 4096, 8192) == \
        bytes(ref[4 * MiB - 4096:4 * MiB + 4096])
    assert m.unmount() == 0
    assert_same_bytes(export(c, "rbd/" + name), bytes(ref),
                      "rbd export after writes through imgfs")
    refpath = tmp_path / "ref.raw"
    refpath.write_bytes(bytes(ref))
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", refpath,
              c.uri("rbd/" + name)).stdout
    assert "Images are identical" in out


def fio(*args, timeout=600):
    proc = run("fio", "--output-format=json", *args, timeout=timeout)
    job = json.loads(proc.stdout)["jobs"][0]
    assert job["error"] == 0, job
    return job


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_fio_verify_iodepth32(ceph_cluster, imgfs, cache):
    """Async O_DIRECT random writes at iodepth 32, verified by fio, then
    verified again after a remount: the data is in the cluster."""
    c = ceph_cluster
    name = "fio-" + cache
    create_image(c, name, 32 * MiB)
    drives = {"d": rbd_drive(c, "rbd/" + name, cache=cache)}
    common = ["--name=v", "--ioengine=libaio", "--direct=1", "--iodepth=32",
              "--rw=randwrite", "--bsrange=4k-64k", "--size=32M",
              "--verify=crc32c", "--verify_fatal=1", "--randseed=42",
              "--verify_state_save=0"]
    m = imgfs(drives, name="first")
    fio("--filename=%s" % m.drive("d"), "--do_verify=1", *common)
    assert m.unmount() == 0
    m = imgfs(drives, name="again")
    fio("--filename=%s" % m.drive("d"), "--verify_only", *common)


def test_qcow2_in_rbd(ceph_cluster, imgfs, imgfs_bin, tmp_path):
    """format = qcow2 over the rbd protocol: a qcow2 file stored in an RBD
    image, which must grow as clusters are allocated."""
    if not imgfs_has(imgfs_bin, "formats", "qcow2"):
        pytest.skip("this imgfs has no qcow2 driver yet ('imgfs formats' "
                    "does not list it); the test runs once it is merged")
    c = ceph_cluster
    local = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", local, "64M")
    qemu_io(local, "write -P 0x61 0 1M", "write -P 0x62 30M 64k",
            fmt="qcow2")
    c.rbd("import", "--no-progress", "--image-feature", "layering",
          str(local), "rbd/q2")
    before = rbd_size(c, "rbd/q2")
    uri = c.uri("rbd/q2")
    m = imgfs({"q": {"file": uri, "format": "qcow2"}})
    assert os.path.getsize(m.drive("q")) == 64 * MiB
    # qemu-img cannot convert to /dev/stdout when it is a pipe: it tries
    # to resize its output
    converted = tmp_path / "converted.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", uri, converted)
    expect = converted.read_bytes()
    assert_same_bytes(m.drive("q").read_bytes(), expect,
                      "qcow2 in rbd vs qemu-img convert")
    data = pattern(3 * MiB, 7)
    fd = os.open(m.drive("q"), os.O_WRONLY)
    try:
        os.pwrite(fd, data, 40 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert m.unmount() == 0
    assert rbd_size(c, "rbd/q2") > before  # the RBD image grew
    run("qemu-img", "check", "-f", "qcow2", uri)
    refpath = tmp_path / "ref.raw"
    ref = bytearray(expect)
    ref[40 * MiB:43 * MiB] = data
    refpath.write_bytes(bytes(ref))
    out = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", uri,
              refpath).stdout
    assert "Images are identical" in out


def test_snapshot_read_only(ceph_cluster, imgfs, imgfs_bin, tmp_path):
    """A snapshot is exposed read-only; asking to write it is an error
    that says what to do."""
    c = ceph_cluster
    create_image(c, "snap", 8 * MiB)
    qemu_io(c.uri("rbd/snap"), "write -P 0x01 0 8M")
    c.rbd("snap", "create", "rbd/snap@s1")
    qemu_io(c.uri("rbd/snap"), "write -P 0x02 1M 1M")
    old = export(c, "rbd/snap@s1")
    assert old == b"\x01" * (8 * MiB)
    drives = {
        "s1": rbd_drive(c, "rbd/snap@s1", **{"read-only": "on"}),
        "s1keys": {"rbd.image": "snap", "rbd.snapshot": "s1",
                   "rbd.conf": c.conf, "read-only": "on"},
        "head": rbd_drive(c, "rbd/snap"),
    }
    m = imgfs(drives)
    for d in ("s1", "s1keys"):
        assert_same_bytes(m.drive(d).read_bytes(), old, d)
        assert not os.stat(m.drive(d)).st_mode & 0o222
        with pytest.raises(OSError) as e:
            fd = os.open(m.drive(d), os.O_WRONLY)
            try:
                os.pwrite(fd, b"x", 0)
            finally:
                os.close(fd)
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert_same_bytes(m.drive("head").read_bytes(), export(c, "rbd/snap"),
                      "head")
    assert m.unmount() == 0
    assert export(c, "rbd/snap@s1") == old
    # A snapshot opened for writing: a clear error, nothing mounted.
    _, lines = mount_error(imgfs_bin, tmp_path,
                           {"snapw": rbd_drive(c, "rbd/snap@s1")})
    assert len(lines) == 1, lines
    assert "drive 'snapw'" in lines[0]
    assert "snapshots are read-only" in lines[0]
    assert "read-only = on" in lines[0]
    # auto-read-only: mounted read-only, and the log says why.
    m = imgfs({"snapa": rbd_drive(c, "rbd/snap@s1",
                                  **{"auto-read-only": "on"})}, name="auto")
    assert not os.stat(m.drive("snapa")).st_mode & 0o222
    assert_same_bytes(m.drive("snapa").read_bytes(), old, "snapa")
    assert "snapshots are read-only" in m.stderr()
    assert "opened read-only (auto-read-only)" in m.stderr()


def test_resize(ceph_cluster, imgfs):
    c = ceph_cluster
    create_image(c, "rsz", 8 * MiB)
    qemu_io(c.uri("rbd/rsz"), "write -P 0x77 7M 1M")
    m = imgfs({"d": rbd_drive(c, "rbd/rsz")})
    d = m.drive("d")
    os.truncate(d, 40 * MiB + 4096)
    assert os.path.getsize(d) == 40 * MiB + 4096
    assert rbd_size(c, "rbd/rsz") == 40 * MiB + 4096
    pwrite_direct(d, 40 * MiB, b"\x88" * 4096)
    assert export(c, "rbd/rsz")[40 * MiB:] == b"\x88" * 4096
    os.truncate(d, 24 * MiB)
    assert os.path.getsize(d) == 24 * MiB
    assert rbd_size(c, "rbd/rsz") == 24 * MiB
    os.truncate(d, 40 * MiB + 4096)
    assert rbd_size(c, "rbd/rsz") == 40 * MiB + 4096
    assert m.unmount() == 0
    data = export(c, "rbd/rsz")
    assert data[7 * MiB:8 * MiB] == b"\x77" * MiB
    assert data[8 * MiB:] == bytes(len(data) - 8 * MiB)  # shrunk away


def test_seek_data_hole(ceph_cluster, imgfs):
    """SEEK_DATA/SEEK_HOLE agree with rbd diff --whole-object."""
    c = ceph_cluster
    create_image(c, "sparse", 64 * MiB)
    qemu_io(c.uri("rbd/sparse"), "write -P 1 %d 4096" % (12 * MiB + 100),
            "write -P 2 40M 5M", "write -P 3 63M 1M")
    extents = json.loads(c.rbd("diff", "--whole-object", "--format", "json",
                               "rbd/sparse"))
    merged = []
    for e in sorted(extents, key=lambda e: e["offset"]):
        start, end = e["offset"], e["offset"] + e["length"]
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    assert merged == [[12 * MiB, 16 * MiB], [40 * MiB, 48 * MiB],
                      [60 * MiB, 64 * MiB]]
    m = imgfs({"d": rbd_drive(c, "rbd/sparse", **{"read-only": "on"})})
    fd = os.open(m.drive("d"), os.O_RDONLY)
    found = []
    try:
        pos = 0
        while pos < 64 * MiB:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            found.append([start, pos])
    finally:
        os.close(fd)
    assert found == merged


def test_config_errors(ceph_cluster, imgfs_bin, tmp_path):
    """Bad rbd keys: one line naming the drive and the key, no mount."""
    c = ceph_cluster
    create_image(c, "cfg", MiB)
    local = tmp_path / "local.raw"
    local.write_bytes(bytes(MiB))
    uri = c.uri("rbd/cfg")
    cases = [
        ({"rbd.pol": "rbd", "rbd.image": "cfg"}, ["unknown key 'rbd.pol'"]),
        ({"file": uri, "rbd.timeout": "soon"},
         ["key 'rbd.timeout'", "invalid number 'soon'"]),
        ({"file": uri, "rbd.option.": "1"}, ["unknown key 'rbd.option.'"]),
        ({"file": uri, "rbd.option.no_such_ceph_setting": "1"},
         ["key 'rbd.option.no_such_ceph_setting'", "not a Ceph setting"]),
        ({"file": uri, "rbd.option.rbd_cache": "maybe"},
         ["key 'rbd.option.rbd_cache'", "invalid value 'maybe'"]),
        ({"file": uri, "rbd.image": "other"},
         ["key 'rbd.image' is 'other'", "'cfg'"]),
        ({"file": local, "rbd.pool": "rbd"},
         ["key 'rbd.pool' does not apply"]),
        ({"rbd.image": "nosuchimage", "rbd.conf": c.conf},
         ["image 'nosuchimage' does not exist in pool 'rbd'"]),
        ({"rbd.image": "cfg", "rbd.pool": "nosuchpool", "rbd.conf": c.conf},
         ["pool 'nosuchpool' does not exist"]),
        ({"rbd.image": "cfg", "rbd.conf": tmp_path / "none.conf"},
         ["rbd.conf", "none.conf"]),
        ({"rbd.image": "cfg", "rbd.conf": c.conf, "rbd.user": "nobody"},
         ["client.nobody", "rbd.user"]),
        ({"file": "rbd:justapool"}, ["expected rbd:POOL/IMAGE"]),
    ]
    for keys, expect in cases:
        _, lines = mount_error(imgfs_bin, tmp_path, {"bad": keys})
        assert len(lines) == 1, (keys, lines)
        assert lines[0].startswith("imgfs: "), lines
        assert "drive 'bad'" in lines[0], (keys, lines)
        for e in expect:
            assert e in lines[0], (keys, lines)


def test_unreachable_cluster_open_fails(ceph_cluster, imgfs_bin, tmp_path):
    """No monitor answers: the mount fails after rbd.timeout, naming the
    drive, instead of hanging."""
    c = ceph_cluster
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:%d\nkeyring = %s\n"
                    "auth client required = cephx\n" % (port, c.keyring))
    elapsed, lines = mount_error(imgfs_bin, tmp_path, {"far": {
        "rbd.image": "cfg", "rbd.conf": conf, "rbd.timeout": "3"}},
        timeout=60)
    print("\nunreachable cluster: mount failed after %.1f s "
          "(rbd.timeout = 3)" % elapsed)
    assert len(lines) == 1, lines
    assert "drive 'far'" in lines[0]
    assert "cannot connect to the Ceph cluster" in lines[0]
    assert "no answer from the cluster within 3 s" in lines[0]


def test_cluster_lost_mid_run(lost_ceph_cluster, imgfs, tmp_path):
    """The cluster vanishes under a mounted drive: its I/O fails with EIO
    after rbd.timeout, the daemon and the other drive keep working."""
    c = lost_ceph_cluster
    create_image(c, "lost", 16 * MiB)
    qemu_io(c.uri("rbd/lost"), "write -P 0x42 0 16M")
    local = tmp_path / "local.raw"
    local.write_bytes(b"\x17" * MiB)
    timeout = 5
    drives = {
        "r": rbd_drive(c, "rbd/lost", cache="none",
                       **{"rbd.timeout": timeout}),
        "wb": rbd_drive(c, "rbd/lost", cache="writeback",
                        **{"rbd.timeout": timeout, "read-only": "on"}),
        "local": {"file": local, "format": "raw"},
    }
    m = imgfs(drives)
    assert pread_direct(m.drive("r"), 0, 4096) == b"\x42" * 4096
    c.kill()

    def fails(fn, *args):
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            fn(*args)
        return e.value.errno, time.monotonic() - t0

    results = {}

    def lost_io():
        results["read"] = fails(pread_direct, m.drive("r"), 8 * MiB, 4096)
        results["write"] = fails(pwrite_direct, m.drive("r"), 4 * MiB,
                                 b"\x99" * 4096)
        results["read (librbd cache on)"] = fails(
            pread_direct, m.drive("wb"), 12 * MiB, 65536)

    # A watchdog, not a timing assertion: without the timeout these
    # requests would never come back.
    t = threading.Thread(target=lost_io, daemon=True)
    t.start()
    t.join(timeout * 3 * 10)
    assert not t.is_alive(), "I/O to the lost cluster still hangs"
    for what, (err, secs) in results.items():
        print("\nlost cluster: %s failed with %s after %.1f s "
              "(rbd.timeout = %d)" % (what, errno.errorcode[err], secs,
                                      timeout))
        assert err == errno.EIO, what
    assert m.returncode() is None, "imgfs died"
    # The other drive and the daemon are fine.
    assert pread_direct(m.drive("local"), 0, 4096) == b"\x17" * 4096
    pwrite_direct(m.drive("local"), 4096, b"\x18" * 4096)
    assert sorted(os.listdir(m.path)) == ["local", "r", "wb"]
    assert "no answer from the cluster within 5 s" in m.stderr()
    t0 = time.monotonic()
    assert m.unmount(timeout=120) == 0
    print("\nlost cluster: unmount took %.1f s" % (time.monotonic() - t0))
    assert local.read_bytes()[4096:8192] == b"\x18" * 4096


def test_crashed_client_lock(ceph_cluster, imgfs, imgfs_bin, tmp_path):
    """An image whose exclusive lock a crashed imgfs still holds: a new
    imgfs writes to it once librbd has blocklisted the dead client."""
    c = ceph_cluster
    create_image(c, "locked", 8 * MiB, features="layering,exclusive-lock")
    drives = {"d": rbd_drive(c, "rbd/locked", cache="none")}

    # The first client is started by hand: the imgfs fixture counts a
    # daemon killed with SIGKILL as a failure.
    config = write_config(tmp_path / "first.ini", drives)
    mnt = tmp_path / "first"
    mnt.mkdir()
    log = tmp_path / "first.log"
    with open(log, "wb") as err:
        first = subprocess.Popen([str(imgfs_bin), "mount", "-f",
                                  str(config), str(mnt)],
                                 stdin=subprocess.DEVNULL, stdout=err,
                                 stderr=err, env=daemon_env(),
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "first imgfs did not mount"
            time.sleep(0.02)
        pwrite_direct(mnt / "d", 0, b"\x01" * 4096)
        lockers = json.loads(c.rbd("lock", "ls", "--format", "json",
                                   "rbd/locked"))
        assert lockers, "the first client holds no lock"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        unmount(mnt, lazy=True)

    m = imgfs(drives, name="second")
    t0 = time.monotonic()
    # A watchdog, not a timing assertion: librbd's default watch timeout
    # is 30 s; a write still waiting after minutes is stuck for good.
    done, _ = call_with_timeout(
        lambda: pwrite_direct(m.drive("d"), 4096, b"\x02" * 4096), 300)
    assert done, "the new writer never got the lock"
    waited = time.monotonic() - t0
    print("\ncrashed client: the new writer waited %.1f s for the lock "
          "(librbd blocklists the dead client once its watch expires)" %
          waited)
    assert m.unmount() == 0
    assert export(c, "rbd/locked")[:8192] == b"\x01" * 4096 + b"\x02" * 4096
    blocklist = c.ceph("osd", "blocklist", "ls").decode()
    assert "127.0.0.1" in blocklist, blocklist
