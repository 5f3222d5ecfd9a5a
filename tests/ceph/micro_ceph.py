"""A throwaway single-node Ceph cluster for the rbd tests and benchmarks.

One ceph-mon and one ceph-osd on 127.0.0.1 (memstore: the data lives in
the OSD's memory), cephx, pools of size 1, an ``rbd`` pool initialised.
Everything lives in one directory; the daemons are started by us, recorded
by pid and stopped by those pids only.  There is no ceph-mgr, so commands
that need one (``ceph -s``, ``ceph pg stat``) hang: every CLI call here goes
through ``MicroCeph.run()``, which bounds it with a timeout.

Starting takes a few seconds.  ``paxos propose interval`` is lowered, or
every map change (pool creation, OSD boot) waits a full second.  Ports are
picked free at start, so several clusters (other test sessions on a shared
machine) can run side by side.

Usage from Python::

    with MicroCeph() as c:       # start(); purge() on exit
        c.rbd("create", "--size", "64M", "--image-feature", "layering",
              "rbd/img")
        c.uri("rbd/img")         # "rbd:rbd/img:conf=/tmp/.../ceph.conf"

and from a shell, for trying things by hand::

    python3 tests/ceph/micro_ceph.py start /tmp/mc   # prints the conf path
    python3 tests/ceph/micro_ceph.py purge /tmp/mc
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

# Packages CI installs for this: ceph-mon ceph-osd ceph-common (and
# librbd-dev rbd-fuse qemu-block-extra for the driver, its tests and
# benchmarks).
TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "monmaptool",
         "ceph-authtool")

CLI_TIMEOUT = 60


class CephError(RuntimeError):
    pass


def missing_tools():
    """The Ceph programs that are not installed."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MicroCeph:
    """A single-node cluster in ``directory`` (a new temporary one if None)."""

    def __init__(self, directory=None, pool="rbd", osd_bytes=4 << 30,
                 extra_conf="", osd_shards=1, osd_threads=2):
        self.owns_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="imgfs-ceph-")
        self.pool = pool
        self.osd_bytes = osd_bytes
        self.extra_conf = extra_conf
        # OSD op queue: shards x threads per shard (small for tests)
        self.osd_shards = osd_shards
        self.osd_threads = osd_threads
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.keyring = os.path.join(self.dir, "keyring")
        self.run_dir = os.path.join(self.dir, "run")
        self.log_dir = os.path.join(self.dir, "log")
        self.procs = {}  # name -> Popen
        self.start_seconds = None

    # ---- CLI ------------------------------------------------------------

    def run(self, *args, timeout=CLI_TIMEOUT, check=True, input=None):
        """Run a Ceph CLI (ceph, rbd, rados, ...) against this cluster,
        bounded by ``timeout``; returns stdout (bytes)."""
        cmd = [args[0], "--conf", self.conf] + list(args[1:])
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout,
                               input=input)
        except subprocess.TimeoutExpired:
            raise CephError("%s: no answer within %ss" % (" ".join(cmd),
                                                          timeout))
        if check and p.returncode != 0:
            raise CephError("%s failed (%d): %s" % (
                " ".join(cmd), p.returncode,
                p.stderr.decode(errors="replace").strip()))
        return p.stdout

    def ceph(self, *args, **kw):
        return self.run("ceph", "--connect-timeout", "30", *args, **kw)

    def rbd(self, *args, **kw):
        return self.run("rbd", *args, **kw)

    def uri(self, spec, **settings):
        """QEMU's short form for image ``spec`` ("pool/image[@snap]")."""
        extra = "".join(":%s=%s" % kv for kv in settings.items())
        return "rbd:%s:conf=%s%s" % (spec, self.conf, extra)

    # ---- daemons ---------------------------------------------------------

    def _spawn(self, name, *args):
        log = open(os.path.join(self.log_dir, name + ".stdout"), "ab")
        p = subprocess.Popen(list(args) + ["--conf", self.conf, "-f"],
                             stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def _write_conf(self, fsid, mon_addrs):
        d = self.dir
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon host = {mon_addrs}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {self.keyring}
run dir = {self.run_dir}
admin socket = {self.run_dir}/$cluster-$name.$pid.asok
log file = {self.log_dir}/$name.log
pid file =
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon max pg per osd = 1000
client mount timeout = 30
rados mon op timeout = 60
rados osd op timeout = 60
debug ms = 0/0
{self.extra_conf}
[mon]
mon data = {d}/mon
paxos propose interval = 0.1
mon mgr mkfs grace = 31536000
mon cluster log file = {self.log_dir}/mon-cluster.log
[osd]
osd data = {d}/osd
osd objectstore = memstore
memstore device bytes = {self.osd_bytes}
# Objects as pages, not one growing bufferlist: small writes into big
# objects otherwise cost the OSD hundreds of microseconds each.
memstore page set = true
osd crush initial weight = 1
osd class load list = *
osd class default list = *
osd op num shards = {self.osd_shards}
osd op num threads per shard = {self.osd_threads}
[client]
log file = /dev/null
admin socket =
""")

    def _authtool(self, *args):
        subprocess.run(["ceph-authtool", self.keyring] + list(args),
                       check=True, stdout=subprocess.DEVNULL, timeout=30)

    def _alive(self, name):
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def start(self):
        """Create and start the cluster; returns self once a write to the
        pool has gone through."""
        missing = missing_tools()
        if missing:
            raise CephError("missing: %s (apt-get install ceph-mon ceph-osd "
                            "ceph-common)" % " ".join(missing))
        t0 = time.monotonic()
        for sub in ("run", "log", "mon", "osd", "crash"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        osd_uuid = str(uuid.uuid4())
        v2, v1 = _free_port(), _free_port()
        mon_addrs = "[v2:127.0.0.1:%d,v1:127.0.0.1:%d]" % (v2, v1)
        self._write_conf(fsid, mon_addrs)

        subprocess.run(["ceph-authtool", "--create-keyring", self.keyring,
                        "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
                       check=True, stdout=subprocess.DEVNULL, timeout=30)
        self._authtool("--gen-key", "-n", "client.admin", "--cap", "mon",
                       "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
                       "allow *")
        self._authtool("--gen-key", "-n", "osd.0", "--cap", "mon",
                       "allow profile osd", "--cap", "osd", "allow *")
        os.chmod(self.keyring, 0o644)
        monmap = os.path.join(self.dir, "monmap")
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv",
                        "a", mon_addrs, monmap], check=True,
                       stdout=subprocess.DEVNULL, timeout=30)
        mkfs_log = open(os.path.join(self.log_dir, "mkfs.log"), "ab")
        try:
            subprocess.run(["ceph-mon", "--conf", self.conf, "-i", "a",
                            "--mkfs", "--monmap", monmap, "--keyring",
                            self.keyring], check=True, stdout=mkfs_log,
                           stderr=mkfs_log, timeout=60)
            self._spawn("mon.a", "ceph-mon", "-i", "a")
            self.ceph("mon", "stat")
            osd_id = self.ceph("osd", "new", osd_uuid).decode().strip()
            if osd_id != "0":
                raise CephError("ceph osd new gave id %r" % osd_id)
            subprocess.run(["ceph-osd", "--conf", self.conf, "-i", "0",
                            "--mkfs", "--osd-uuid", osd_uuid], check=True,
                           stdout=mkfs_log, stderr=mkfs_log, timeout=60)
        finally:
            mkfs_log.close()
        self._spawn("osd.0", "ceph-osd", "-i", "0")

        deadline = time.monotonic() + 60
        while b"\nosd.0 up" not in b"\n" + self.ceph("osd", "dump"):
            if not self._alive("osd.0"):
                raise CephError("ceph-osd exited, see %s" % self.log_dir)
            if time.monotonic() > deadline:
                raise CephError("osd.0 not up after 60s")
            time.sleep(0.1)
        self.ceph("osd", "pool", "create", self.pool, "8", "8", "replicated")
        self.rbd("pool", "init", self.pool, timeout=120)
        # A real round trip proves the placement groups are active.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.run("rados", "-p", self.pool, "put", "micro-ceph-probe",
                         self.conf, timeout=10)
                break
            except CephError:
                if time.monotonic() > deadline:
                    raise CephError("pool %s never became writable" %
                                    self.pool)
                time.sleep(0.2)
        self.run("rados", "-p", self.pool, "rm", "micro-ceph-probe")
        self.start_seconds = time.monotonic() - t0
        return self

    def pids(self):
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def kill(self):
        """The cluster vanishes: SIGKILL every daemon (data is lost)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs.values():
            p.wait()

    def stop(self):
        """SIGTERM the OSD, then the mon (an OSD without its mon waits);
        SIGKILL what is still there after 5 s."""
        for name in ("osd.0", "mon.a"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def purge(self):
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.purge()
            raise

    def __exit__(self, *exc):
        self.purge()


def _main(argv):
    """start DIR (prints the conf path, leaves the daemons running) or
    purge DIR (stops the daemons recorded there and removes DIR)."""
    if len(argv) != 3 or argv[1] not in ("start", "purge"):
        print("usage: micro_ceph.py start|purge DIR", file=sys.stderr)
        return 2
    directory = os.path.abspath(argv[2])
    pidfile = os.path.join(directory, "pids")
    if argv[1] == "start":
        os.makedirs(directory, exist_ok=True)
        c = MicroCeph(directory)
        c.start()
        with open(pidfile, "w") as f:
            for name, pid in c.pids().items():
                f.write("%s %d\n" % (name, pid))
        print("micro-ceph: ready after %.1fs" % c.start_seconds,
              file=sys.stderr)
        print(c.conf)
        return 0
    conf = os.path.join(directory, "ceph.conf")
    if os.path.exists(pidfile):
        for line in open(pidfile):
            name, pid = line.split()
            try:
                cmdline = open("/proc/%s/cmdline" % pid, "rb").read()
            except OSError:
                continue
            # Only our daemons: guards against a recycled pid.
            if conf.encode() in cmdline:
                os.kill(int(pid), signal.SIGKILL)
    if os.path.exists(os.path.join(directory, "ceph.conf")):
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
