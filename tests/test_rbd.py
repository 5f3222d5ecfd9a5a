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
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from ceph_fixture import ceph_cluster, lost_ceph_cluster  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMGFS = os.environ.get("IMGFS", os.path.join(ROOT, "build", "imgfs"))

MiB = 1 << 20
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:")


def imgfs_has(kind, name):
    out = subprocess.run([IMGFS, "formats"], stdout=subprocess.PIPE,
                         check=True, text=True).stdout
    section = None
    for line in out.splitlines():
        if line.endswith(":"):
            section = line[:-1]
        elif section == kind and line.split()[0] == name:
            return True
    return False


@pytest.fixture(scope="module", autouse=True)
def _rbd_built():
    if not os.path.exists(IMGFS):
        pytest.fail("%s not built (meson setup build && ninja -C build)" %
                    IMGFS)
    if not imgfs_has("protocols", "rbd"):
        pytest.skip("imgfs was built without rbd (librbd-dev missing)")


def write_config(path, drives, iothreads=None):
    lines = []
    if iothreads:
        lines += ["[imgfs]", "iothreads = %d" % iothreads, ""]
    for name, keys in drives.items():
        lines.append("[%s]" % name)
        lines += ["%s = %s" % kv for kv in keys.items()]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


class Imgfs:
    """``imgfs mount -f`` of a config in its own directory; always torn
    down (fusermount3 -u -z, then SIGTERM, then SIGKILL)."""

    def __init__(self, workdir, drives, name="m"):
        self.dir = os.path.join(str(workdir), name)
        os.makedirs(self.dir, exist_ok=True)
        self.mnt = os.path.join(self.dir, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.config = os.path.join(self.dir, "config.ini")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.drives = drives
        self.proc = None
        write_config(self.config, drives)

    def path(self, drive):
        return os.path.join(self.mnt, drive)

    def start(self, timeout=120):
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([IMGFS, "mount", "-f", self.config,
                                      self.mnt], stdout=self.stderr,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError("imgfs exited (%d): %s" %
                                     (self.proc.returncode, self.log()))
            if time.monotonic() > deadline:
                raise AssertionError("imgfs did not mount within %ds" %
                                     timeout)
            time.sleep(0.02)
        return self

    def log(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def crash(self):
        """kill -9: the daemon dies holding whatever it held."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.mnt],
                       stderr=subprocess.DEVNULL)

    def stop(self, timeout=60):
        """Unmount and wait for a clean exit; returns the seconds taken."""
        if self.proc is None:
            return 0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", self.mnt],
                           stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                raise AssertionError("imgfs did not exit within %ds of the "
                                     "unmount: %s" % (timeout, self.log()))
        self.stderr.close()
        log = self.log()
        for mark in SANITIZER_MARKS:
            assert mark not in log, log
        return time.monotonic() - t0

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def mount_error(workdir, drives, timeout=120):
    """Mount a config that must fail; returns (seconds, stderr lines)."""
    m = Imgfs(workdir, drives, name="bad")
    t0 = time.monotonic()
    p = subprocess.run([IMGFS, "mount", "-f", m.config, m.mnt],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    elapsed = time.monotonic() - t0
    out = p.stdout.decode(errors="replace")
    assert p.returncode != 0, "imgfs mounted a bad config: " + out
    assert not os.path.ismount(m.mnt)
    for mark in SANITIZER_MARKS:
        assert mark not in out, out
    # Sanitizer builds announce themselves with "==PID==WARNING: ...".
    return elapsed, [l for l in out.splitlines()
                     if l.strip() and not l.startswith("==")]


def rbd_drive(cluster, spec, **keys):
    d = {"file": cluster.uri(spec), "format": "raw"}
    d.update(keys)
    return d


def create_image(cluster, name, size, features="layering"):
    cluster.rbd("create", "--size", "%dB" % size, "--image-feature",
                features, "rbd/" + name)


def export(cluster, spec):
    return cluster.rbd("export", "--no-progress", spec, "-")


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [uri], check=True, stdout=subprocess.DEVNULL,
                   timeout=120)


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def pread_direct(path, offset, length):
    """An O_DIRECT read; the page cache cannot answer it."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def pwrite_direct(path, offset, data):
    import mmap

    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        return os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------


def test_mount_equals_rbd_export(ceph_cluster, tmp_path):
    c = ceph_cluster
    size = 20 * MiB + 3 * 1024 + 512  # not a whole number of objects
    create_image(c, "exp", size)
    qemu_io(c.uri("rbd/exp"), "write -P 0x11 0 64k",
            "write -P 0x22 4190000 10000",  # across an object boundary
            "write -P 0x33 12M 1M", "write -P 0x44 %d 3k" % (size - 3072))
    with Imgfs(tmp_path, {"d": rbd_drive(c, "rbd/exp")}) as m:
        assert os.path.getsize(m.path("d")) == size
        with open(m.path("d"), "rb") as f:
            data = f.read()
    assert data == export(c, "rbd/exp")


def test_rbd_keys_and_namespace(ceph_cluster, tmp_path):
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
    with Imgfs(tmp_path, drives) as m:
        for d in drives:
            with open(m.path(d), "rb") as f:
                assert f.read() == expected, d
    out = subprocess.run([IMGFS, "info", "--json", "--format", "rbd",
                          c.uri("rbd/ns1/img")], stdout=subprocess.PIPE,
                         check=True, timeout=60).stdout
    info = json.loads(out)
    assert info["virtual-size"] == 8 * MiB
    assert info["format-specific"]["pool"] == "rbd"
    assert info["format-specific"]["namespace"] == "ns1"
    assert info["format-specific"]["image-name"] == "img"


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_writes_seen_by_rbd_and_qemu(ceph_cluster, tmp_path, cache):
    c = ceph_cluster
    name = "wr-" + cache
    size = 16 * MiB
    create_image(c, name, size)
    ref = bytearray(size)
    writes = [(0, 4096), (4097, 1000), (4 * MiB - 100, 200),
              (5 * MiB, MiB), (size - 777, 777)]
    with Imgfs(tmp_path, {"d": rbd_drive(c, "rbd/" + name, cache=cache)}) \
            as m:
        fd = os.open(m.path("d"), os.O_RDWR)
        try:
            for i, (off, n) in enumerate(writes):
                data = pattern(n, i)
                assert os.pwrite(fd, data, off) == n
                ref[off:off + n] = data
            # Deallocate part of the 1 MiB write, zero another part.
            subprocess.run(["fallocate", "--punch-hole", "--offset",
                            str(5 * MiB), "--length", str(256 * 1024),
                            m.path("d")], check=True)
            ref[5 * MiB:5 * MiB + 256 * 1024] = bytes(256 * 1024)
            subprocess.run(["fallocate", "--zero-range", "--keep-size",
                            "--offset", str(5 * MiB + 512 * 1024),
                            "--length", str(4096), m.path("d")], check=True)
            ref[5 * MiB + 512 * 1024:5 * MiB + 512 * 1024 + 4096] = \
                bytes(4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert pread_direct(m.path("d"), 4 * MiB - 4096, 8192) == \
            bytes(ref[4 * MiB - 4096:4 * MiB + 4096])
    assert export(c, "rbd/" + name) == bytes(ref)
    refpath = tmp_path / "ref.raw"
    refpath.write_bytes(bytes(ref))
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                        str(refpath), c.uri("rbd/" + name)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=120)
    assert p.returncode == 0, p.stdout


def fio(*args, timeout=600):
    p = subprocess.run(["fio", "--output-format=json"] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr.decode() + p.stdout.decode()[-2000:]
    job = json.loads(p.stdout)["jobs"][0]
    assert job["error"] == 0, job
    return job


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_fio_verify_iodepth32(ceph_cluster, tmp_path, cache):
    """Async O_DIRECT random writes at iodepth 32, verified by fio, then
    verified again after a remount: the data is in the cluster."""
    c = ceph_cluster
    name = "fio-" + cache
    create_image(c, name, 32 * MiB)
    drives = {"d": rbd_drive(c, "rbd/" + name, cache=cache)}
    common = ["--name=v", "--ioengine=libaio", "--direct=1", "--iodepth=32",
              "--rw=randwrite", "--bsrange=4k-64k", "--size=32M",
              "--verify=crc32c", "--verify_fatal=1", "--randseed=42"]
    with Imgfs(tmp_path, drives, name="first") as m:
        fio("--filename=" + m.path("d"), "--do_verify=1", *common)
    with Imgfs(tmp_path, drives, name="again") as m:
        fio("--filename=" + m.path("d"), "--verify_only", *common)


def test_qcow2_in_rbd(ceph_cluster, tmp_path):
    """format = qcow2 over the rbd protocol: a qcow2 file stored in an RBD
    image, which must grow as clusters are allocated."""
    if not imgfs_has("formats", "qcow2"):
        pytest.skip("this imgfs has no qcow2 driver yet ('imgfs formats' "
                    "does not list it); the test runs once it is merged")
    c = ceph_cluster
    local = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(local),
                    "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M",
                    "-c", "write -P 0x62 30M 64k", str(local)], check=True,
                   stdout=subprocess.DEVNULL)
    c.rbd("import", "--no-progress", "--image-feature", "layering",
          str(local), "rbd/q2")
    before = json.loads(c.rbd("info", "--format", "json", "rbd/q2"))["size"]
    uri = c.uri("rbd/q2")
    drive = {"file": uri, "format": "qcow2"}
    with Imgfs(tmp_path, {"q": drive}) as m:
        assert os.path.getsize(m.path("q")) == 64 * MiB
        expect = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O",
                                 "raw", uri, "/dev/stdout"],
                                stdout=subprocess.PIPE, check=True).stdout
        with open(m.path("q"), "rb") as f:
            assert f.read() == expect
        data = pattern(3 * MiB, 7)
        with open(m.path("q"), "r+b") as f:
            f.seek(40 * MiB)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    after = json.loads(c.rbd("info", "--format", "json", "rbd/q2"))["size"]
    assert after > before  # the RBD image grew under the qcow2
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", uri],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.returncode == 0, p.stdout
    subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                    "write -P 0x00 40M 3M", str(local)], check=True,
                   stdout=subprocess.DEVNULL)
    refpath = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    str(local), str(refpath)], check=True)
    with open(refpath, "r+b") as f:
        f.seek(40 * MiB)
        f.write(data)
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                        uri, str(refpath)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert p.returncode == 0, p.stdout


def test_snapshot_read_only(ceph_cluster, tmp_path):
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
    with Imgfs(tmp_path, drives) as m:
        for d in ("s1", "s1keys"):
            with open(m.path(d), "rb") as f:
                assert f.read() == old
            assert not os.stat(m.path(d)).st_mode & 0o222
            with pytest.raises(OSError) as e:
                fd = os.open(m.path(d), os.O_WRONLY)
                try:
                    os.pwrite(fd, b"x", 0)
                finally:
                    os.close(fd)
            assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        with open(m.path("head"), "rb") as f:
            assert f.read() == export(c, "rbd/snap")
    assert export(c, "rbd/snap@s1") == old
    # A snapshot opened for writing: a clear error, nothing mounted.
    _, lines = mount_error(tmp_path, {"snapw": rbd_drive(c, "rbd/snap@s1")})
    assert len(lines) == 1, lines
    assert "drive 'snapw'" in lines[0]
    assert "snapshots are read-only" in lines[0]
    assert "read-only = on" in lines[0]


def rbd_size(cluster, spec):
    return json.loads(cluster.rbd("info", "--format", "json", spec))["size"]


def test_resize(ceph_cluster, tmp_path):
    c = ceph_cluster
    create_image(c, "rsz", 8 * MiB)
    qemu_io(c.uri("rbd/rsz"), "write -P 0x77 7M 1M")
    with Imgfs(tmp_path, {"d": rbd_drive(c, "rbd/rsz")}) as m:
        os.truncate(m.path("d"), 40 * MiB + 4096)
        assert os.path.getsize(m.path("d")) == 40 * MiB + 4096
        assert rbd_size(c, "rbd/rsz") == 40 * MiB + 4096
        with open(m.path("d"), "r+b") as f:
            f.seek(40 * MiB)
            f.write(b"\x88" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(m.path("d"), 24 * MiB)
        assert os.path.getsize(m.path("d")) == 24 * MiB
        assert rbd_size(c, "rbd/rsz") == 24 * MiB
        os.truncate(m.path("d"), 40 * MiB + 4096)
        assert rbd_size(c, "rbd/rsz") == 40 * MiB + 4096
    data = export(c, "rbd/rsz")
    assert data[7 * MiB:8 * MiB] == b"\x77" * MiB
    assert data[8 * MiB:] == bytes(len(data) - 8 * MiB)  # shrunk away


def test_seek_data_hole(ceph_cluster, tmp_path):
    """SEEK_DATA/SEEK_HOLE agree with rbd diff --whole-object."""
    c = ceph_cluster
    create_image(c, "sparse", 64 * MiB)
    qemu_io(c.uri("rbd/sparse"), "write -P 1 %d 4096" % (12 * MiB + 100),
            "write -P 2 40M 5M", "write -P 3 63M 1M")
    extents = json.loads(c.rbd("diff", "--whole-object", "--format", "json",
                               "rbd/sparse"))
    data = sorted((e["offset"], e["offset"] + e["length"]) for e in extents
                  if e["exists"] == "true" or e["exists"] is True)
    merged = []
    for s, e in data:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    assert merged == [[12 * MiB, 16 * MiB], [40 * MiB, 48 * MiB],
                      [60 * MiB, 64 * MiB]]
    with Imgfs(tmp_path, {"d": rbd_drive(c, "rbd/sparse",
                                         **{"read-only": "on"})}) as m:
        fd = os.open(m.path("d"), os.O_RDONLY)
        try:
            pos = 0
            found = []
            while True:
                try:
                    s = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    assert e.errno == errno.ENXIO
                    break
                e = os.lseek(fd, s, os.SEEK_HOLE)
                found.append([s, e])
                pos = e
                if pos >= 64 * MiB:
                    break
        finally:
            os.close(fd)
    assert found == merged


def test_config_errors(ceph_cluster, tmp_path):
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
        ({"file": str(local), "rbd.pool": "rbd"},
         ["key 'rbd.pool' does not apply"]),
        ({"rbd.image": "nosuchimage", "rbd.conf": c.conf},
         ["image 'nosuchimage' does not exist in pool 'rbd'"]),
        ({"rbd.image": "cfg", "rbd.pool": "nosuchpool", "rbd.conf": c.conf},
         ["pool 'nosuchpool' does not exist"]),
        ({"rbd.image": "cfg", "rbd.conf": str(tmp_path / "none.conf")},
         ["rbd.conf", "none.conf"]),
        ({"rbd.image": "cfg", "rbd.conf": c.conf, "rbd.user": "nobody"},
         ["client.nobody", "rbd.user"]),
        ({"file": "rbd:justapool"}, ["expected rbd:POOL/IMAGE"]),
    ]
    for keys, expect in cases:
        _, lines = mount_error(tmp_path, {"bad": keys})
        assert len(lines) == 1, (keys, lines)
        assert "drive 'bad'" in lines[0], (keys, lines)
        for e in expect:
            assert e in lines[0], (keys, lines)


def test_unreachable_cluster_open_fails(ceph_cluster, tmp_path):
    """No monitor answers: the mount fails after rbd.timeout, naming the
    drive, instead of hanging."""
    c = ceph_cluster
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:%d\nkeyring = %s\n"
                    "auth client required = cephx\n" % (port, c.keyring))
    elapsed, lines = mount_error(tmp_path, {"far": {
        "rbd.image": "cfg", "rbd.conf": str(conf), "rbd.timeout": "3"}},
        timeout=60)
    print("\nunreachable cluster: mount failed after %.1f s "
          "(rbd.timeout = 3)" % elapsed)
    assert len(lines) == 1, lines
    assert "drive 'far'" in lines[0]
    assert "cannot connect to the Ceph cluster" in lines[0]
    assert "no answer from the cluster within 3 s" in lines[0]


def test_cluster_lost_mid_run(lost_ceph_cluster, tmp_path):
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
                       **{"rbd.timeout": str(timeout)}),
        "wb": rbd_drive(c, "rbd/lost", cache="writeback",
                        **{"rbd.timeout": str(timeout),
                           "read-only": "on"}),
        "local": {"file": str(local), "format": "raw"},
    }
    m = Imgfs(tmp_path, drives).start()
    try:
        assert pread_direct(m.path("r"), 0, 4096) == b"\x42" * 4096
        c.kill()

        def timed(fn, *args):
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                fn(*args)
            return e.value.errno, time.monotonic() - t0

        results = {}

        def run():
            results["read"] = timed(pread_direct, m.path("r"), 8 * MiB, 4096)
            results["write"] = timed(pwrite_direct, m.path("r"), 4 * MiB,
                                     b"\x99" * 4096)
            results["cached read"] = timed(pread_direct, m.path("wb"),
                                           12 * MiB, 65536)

        # A watchdog, not a timing assertion: without the timeout the
        # requests would never come back.
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout * 3 * 10)
        assert not t.is_alive(), "I/O to the lost cluster still hangs"
        for what, (err, secs) in results.items():
            print("\nlost cluster: %s failed with %s after %.1f s "
                  "(rbd.timeout = %d)" % (what, errno.errorcode[err], secs,
                                          timeout))
            assert err == errno.EIO, what
        assert m.alive()
        # The other drive and the daemon are fine.
        assert pread_direct(m.path("local"), 0, 4096) == b"\x17" * 4096
        pwrite_direct(m.path("local"), 4096, b"\x18" * 4096)
        assert sorted(os.listdir(m.mnt)) == ["local", "r", "wb"]
        assert "no answer from the cluster within 5 s" in m.log()
    finally:
        secs = m.stop(timeout=120)
        print("\nlost cluster: unmount took %.1f s" % secs)
    assert local.read_bytes()[4096:8192] == b"\x18" * 4096


def test_crashed_client_lock(ceph_cluster, tmp_path):
    """An image whose exclusive lock a crashed imgfs still holds: a new
    imgfs writes to it once librbd has blocklisted the dead client."""
    c = ceph_cluster
    create_image(c, "locked", 8 * MiB, features="layering,exclusive-lock")
    drives = {"d": rbd_drive(c, "rbd/locked", cache="none")}
    first = Imgfs(tmp_path, drives, name="first").start()
    try:
        pwrite_direct(first.path("d"), 0, b"\x01" * 4096)
        lockers = c.rbd("lock", "ls", "--format", "json", "rbd/locked")
        assert json.loads(lockers), "the first client holds no lock"
    finally:
        first.crash()
    with Imgfs(tmp_path, drives, name="second") as m:
        t0 = time.monotonic()
        pwrite_direct(m.path("d"), 4096, b"\x02" * 4096)
        waited = time.monotonic() - t0
        print("\ncrashed client: the new writer waited %.1f s for the "
              "lock (librbd blocklists the dead client once its watch "
              "expires)" % waited)
    data = export(c, "rbd/locked")
    assert data[:8192] == b"\x01" * 4096 + b"\x02" * 4096
    blocklist = c.ceph("osd", "blocklist", "ls").decode()
    assert "127.0.0.1" in blocklist, blocklist
