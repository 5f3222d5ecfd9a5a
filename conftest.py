"""Shared pytest fixtures for the imgfs test suite.

The `imgfs` fixture writes a config, starts `imgfs mount -f CONFIG MNT`,
waits until the mount answers and always takes it down again (fusermount3
-u -z, then terminate, then kill).  Teardown fails the test when the daemon
died on its own, exited non-zero after the unmount, or printed a sanitizer
report.  The helpers below make images with qemu-img and qemu-io, hash files
and drop the page cache, so that tests compare imgfs against what tools from
outside the project say.

A test that needs a missing tool skips with the reason; with CI=true it
fails instead, because CI installs everything.
"""

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
IMGFS_BIN = Path(os.environ.get("IMGFS_BIN", ROOT / "build" / "imgfs"))

KiB = 1024
MiB = 1024 * KiB

# What AddressSanitizer, LeakSanitizer and UBSan print when they find a bug.
SANITIZER_MARKS = (
    "AddressSanitizer",
    "LeakSanitizer",
    "UndefinedBehaviorSanitizer",
    "runtime error:",
)

# ASan's note on the first swapcontext(): every sanitizer build with
# ucontext coroutines prints it, whatever the code does.  Not an error line.
SANITIZER_NOTE = re.compile(
    r"==\d+==WARNING: ASan doesn't fully support makecontext/swapcontext"
)

MOUNT_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0

# The throwaway Ceph cluster of the rbd tests (ceph_cluster fixture).
pytest_plugins = ["tests.ceph_fixture"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "vm: boots a QEMU (TCG) guest, 5-20 s per boot"
    )
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds"
    )
    # Root's tools (losetup, sfdisk, mkfs.ext4, ...) live in sbin, which
    # is not always on the PATH of the user running pytest.
    path = os.environ.get("PATH", "").split(os.pathsep)
    for sbin in ("/usr/sbin", "/sbin"):
        if sbin not in path:
            path.append(sbin)
    os.environ["PATH"] = os.pathsep.join(path)
    # Mounts with the default [imgfs] fuse-uring = auto take io_uring when
    # the fuse module allows it: allow it, so the whole suite runs over
    # the transport users get when they switch it on (tests of the
    # /dev/fuse transport say fuse-uring = off).
    if os.geteuid() == 0 and os.path.exists(FUSE_URING_PARAM):
        set_fuse_uring_param(True)


FUSE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def fuse_uring_param():
    """The fuse module's enable_uring parameter (None: no such kernel)."""
    try:
        with open(FUSE_URING_PARAM) as f:
            return f.read().strip() in ("Y", "1")
    except FileNotFoundError:
        return None


def set_fuse_uring_param(on):
    with open(FUSE_URING_PARAM, "w") as f:
        f.write("Y\n" if on else "N\n")


# -- skipping, or failing in CI ------------------------------------------


def in_ci():
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason):
    """Skip the test because REASON; in CI (CI=true) fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: nothing may skip)", pytrace=False)
    pytest.skip(reason)


def require_tool(name):
    """Return the path of the program NAME, or skip (fail in CI)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
    return path


def require_root(why):
    if os.geteuid() != 0:
        unavailable(f"needs root: {why}")


# -- running programs ----------------------------------------------------


def run(*args, check=True, timeout=120, text=True, input=None):
    """Run a program; on failure (CHECK) fail the test with its output.

    A program that is not installed skips the test (fails it in CI).
    """
    cmd = [str(a) for a in args]
    if "/" not in cmd[0]:
        require_tool(cmd[0])
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=text,
        input=input,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if not text:
            out = out.decode(errors="replace")
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{out.strip()}",
            pytrace=False,
        )
    return proc


def error_lines(stderr):
    """The lines of STDERR, without sanitizer runtime notes."""
    return [line for line in stderr.splitlines()
            if not SANITIZER_NOTE.match(line)]


# -- images --------------------------------------------------------------


def create_image(path, size, fmt="raw"):
    """Create an empty (sparse) image of SIZE bytes with qemu-img."""
    run("qemu-img", "create", "-q", "-f", fmt, path, str(size))
    return Path(path)


def qemu_io(path, *commands, fmt="raw"):
    """Run qemu-io commands, e.g. 'write -P 0xab 0 1M', on an image."""
    args = []
    for command in commands:
        args += ["-c", command]
    return run("qemu-io", "-f", fmt, *args, path)


def fill(path, pattern, offset, length, fmt="raw"):
    """Write LENGTH bytes of PATTERN at OFFSET of an image with qemu-io."""
    qemu_io(path, f"write -P {pattern:#x} {offset} {length}", fmt=fmt)


def random_image(path, size):
    """Create a raw image of SIZE bytes full of random data."""
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 4 * MiB)
            f.write(os.urandom(chunk))
            left -= chunk
    return Path(path)


def sha256(path, offset=0, length=None):
    """Hex sha256 of LENGTH bytes of PATH at OFFSET (default: to the end)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            want = MiB if left is None else min(MiB, left)
            data = f.read(want)
            if not data:
                break
            digest.update(data)
            if left is not None:
                left -= len(data)
    if left:
        raise EOFError(f"{path}: {left} bytes short at end of file")
    return digest.hexdigest()


def assert_same_bytes(actual, expected, what):
    """Assert ACTUAL == EXPECTED; on a mismatch name the first bad offset.

    (pytest's own diff of megabytes of binary says little and takes long.)
    """
    if actual == expected:
        return
    n = min(len(actual), len(expected))
    first = 0
    while first < n and (actual[first:first + 4096]
                         == expected[first:first + 4096]):
        first += 4096
    while first < n and actual[first] == expected[first]:
        first += 1
    pytest.fail(
        f"{what}: differs first at byte {first} (lengths {len(actual)}, "
        f"{len(expected)})",
        pytrace=False,
    )


def read_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path, offset, data):
    """pwrite DATA at OFFSET of PATH and fsync (no O_CREAT, no O_TRUNC)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        written = os.pwrite(fd, data, offset)
        assert written == len(data), f"short write: {written} of {len(data)}"
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches():
    """Write back dirty pages and drop the page cache (needs root)."""
    require_root("drop the page cache")
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, offset, length):
    """fallocate(2) with MODE flags; raises OSError like os.* calls."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- mounts --------------------------------------------------------------


def is_mounted(path):
    """True if PATH is a mount point, read from /proc/self/mountinfo.

    Unlike os.path.ismount() this sends no request to the file system, so
    it cannot hang on a FUSE daemon that does not answer.
    """
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(directory):
    prefix = os.path.realpath(directory) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def unmount(path, lazy=False):
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def call_with_timeout(fn, timeout):
    """Call FN in a thread; return (True, result) or (False, None) on timeout.

    A request to a stuck FUSE daemon blocks the calling thread until the
    connection is aborted, so probes of a fresh mount run in a thread.
    """
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed back to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["result"]


def config_value(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def write_config(path, drives, settings=None):
    """Write an imgfs config: DRIVES maps a drive name to its keys."""
    lines = []
    if settings:
        lines.append("[imgfs]")
        lines += [f"{k} = {config_value(v)}" for k, v in settings.items()]
        lines.append("")
    for name, keys in drives.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {config_value(v)}" for k, v in keys.items()]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


class Mount:
    """A running `imgfs mount -f` and what it was started with."""

    def __init__(self, path, config, log, proc, drives):
        self.path = Path(path)
        self.config = Path(config)
        self.log = Path(log)
        self.proc = proc
        self.pid = proc.pid
        # drive name -> path of its image (or block device) on the host
        self.images = {}
        for name, keys in drives.items():
            if "file" not in keys:  # named by driver keys (rbd.image)
                continue
            image = Path(str(keys["file"]))
            if not image.is_absolute():
                image = self.config.parent / image
            self.images[name] = image
        self.rusage = None
        self.stopped_by_test = False

    def drive(self, name="disk0"):
        """Path of drive NAME under the mount point."""
        return self.path / name

    def stderr(self):
        return self.log.read_text(errors="replace")

    def returncode(self):
        """The daemon's exit code, or None while it runs (never blocks)."""
        if self.proc.returncode is None:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
        return self.proc.returncode

    def wait(self, timeout=EXIT_TIMEOUT):
        """Wait up to TIMEOUT s for the daemon to exit; its code or None."""
        deadline = time.monotonic() + timeout
        while self.returncode() is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return self.proc.returncode

    def cpu_seconds(self):
        """CPU time used so far by the running daemon (from /proc)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def unmount(self, timeout=EXIT_TIMEOUT, must_exit=True):
        """fusermount3 -u the mount; return the daemon's exit code.

        If the daemon still runs TIMEOUT s later, fail the test (MUST_EXIT)
        or return None.
        """
        self.stopped_by_test = True
        proc = unmount(self.path)
        assert proc.returncode == 0, f"fusermount3 -u: {proc.stderr.strip()}"
        if not must_exit:
            return self.wait(timeout)
        return self._exit_code(timeout, "fusermount3 -u")

    def kill(self, sig, timeout=EXIT_TIMEOUT):
        """Send SIG to the daemon; return its exit code."""
        self.stopped_by_test = True
        os.kill(self.pid, sig)
        return self._exit_code(timeout, signal.Signals(sig).name)

    def _exit_code(self, timeout, what):
        rc = self.wait(timeout)
        if rc is None:
            pytest.fail(f"imgfs still running {timeout:.0f} s after {what}",
                        pytrace=False)
        return rc

    def teardown(self):
        """Take the mount down whatever state it is in; list problems."""
        problems = []
        rc = self.returncode()
        if rc is not None and not self.stopped_by_test:
            problems.append(f"imgfs died during the test (exit code {rc})")
        if is_mounted(self.path):
            unmount(self.path, lazy=True)
        if rc is None:
            rc = self.wait()
            if rc is None:
                problems.append(f"imgfs still running {EXIT_TIMEOUT:.0f} s "
                                "after unmount: terminated")
                self.proc.terminate()
                if self.wait(5) is None:
                    self.proc.kill()
                    self.wait(5)
            elif rc != 0:
                problems.append(f"imgfs exited with code {rc} after unmount")
        elif self.stopped_by_test and rc != 0:
            problems.append(f"imgfs exited with code {rc}")
        log = self.stderr()
        if any(mark in log for mark in SANITIZER_MARKS):
            problems.append(
                f"sanitizer report in imgfs stderr:\n{log[-20000:]}"
            )
        elif problems and log.strip():
            problems.append(f"imgfs stderr:\n{log[-4000:]}")
        return problems


@pytest.fixture(scope="session")
def imgfs_bin():
    """Path of the imgfs binary (build/imgfs, or env IMGFS_BIN)."""
    if not os.access(IMGFS_BIN, os.X_OK):
        unavailable(
            f"{IMGFS_BIN} not built (meson setup build && meson compile "
            "-C build, or set IMGFS_BIN)"
        )
    return IMGFS_BIN


def daemon_env():
    env = dict(os.environ)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    return env


@pytest.fixture
def imgfs(tmp_path, imgfs_bin):
    """Factory: imgfs(drives, settings=None, fuse_options=None, name="mnt").

    DRIVES maps drive names to their config keys, e.g.
    {"disk0": {"file": image, "format": "raw"}}.  Writes NAME.ini, mounts
    it on tmp_path/NAME with `imgfs mount -f`, waits until the mount
    answers and returns a Mount.  Every mount is taken down at teardown.
    """
    require_tool("fusermount3")
    started = []

    def start(drives, settings=None, fuse_options=None, name="mnt"):
        config = write_config(tmp_path / f"{name}.ini", drives, settings)
        mnt = tmp_path / name
        mnt.mkdir()
        log = tmp_path / f"{name}.log"
        cmd = [str(imgfs_bin), "mount", "-f"]
        if fuse_options:
            cmd += ["-o", fuse_options]
        cmd += [str(config), str(mnt)]
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=daemon_env(),
                start_new_session=True,
            )
        mount = Mount(mnt, config, log, proc, drives)
        started.append(mount)
        wait_until_answers(mount, list(drives))
        return mount

    yield start

    problems = []
    for mount in reversed(started):
        problems += mount.teardown()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def wait_until_answers(mount, names):
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mount.path):
        rc = mount.returncode()
        if rc is not None:
            pytest.fail(
                f"imgfs exited with code {rc} before mounting:\n"
                f"{mount.stderr()}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"imgfs did not mount within {MOUNT_TIMEOUT:.0f} s:\n"
                f"{mount.stderr()}",
                pytrace=False,
            )
        time.sleep(0.02)
    left = max(1.0, deadline - time.monotonic())
    answered, entries = call_with_timeout(lambda: os.listdir(mount.path), left)
    if not answered:
        pytest.fail(f"{mount.path} is mounted but does not answer",
                    pytrace=False)
    assert os.path.ismount(mount.path)
    assert sorted(entries) == sorted(names), "drives listed under the mount"


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path):
    """Fail a test that leaves anything mounted under its tmp_path."""
    yield
    left = mounts_under(tmp_path)
    for point in left:
        unmount(point, lazy=True)
    if left:
        pytest.fail(f"mounts left behind: {left}", pytrace=False)


@contextmanager
def loop_device(path, offset=None):
    """Attach PATH to a free loop device (losetup -f --show); detach after."""
    require_root("losetup")
    require_tool("losetup")
    args = ["losetup", "-f", "--show"]
    if offset is not None:
        args += ["-o", str(offset)]
    device = run(*args, path).stdout.strip()
    try:
        yield device
    finally:
        run("losetup", "-d", device, check=False)


def stop_process(proc, sig=signal.SIGTERM, timeout=5):
    """End a helper process we started: SIG, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the control interface, fio, qemu-storage-daemon (drive options) -----


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll PREDICATE until it returns a true value; fail after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}",
                        pytrace=False)
        time.sleep(interval)


def imgfs_run(*args, timeout=60):
    """Run `imgfs ARGS` (status, resume, reload, formats, ...); no check."""
    return subprocess.run(
        [str(IMGFS_BIN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


CONTROL_XATTR = "user.imgfs.control"


def control_socket(mount):
    """The control socket of MOUNT, once it is listening.

    With `imgfs mount -f` the mount point can appear a moment before the
    socket does (see test_control.py); wait for it here.
    """
    def listening():
        try:
            path = os.getxattr(mount.path, CONTROL_XATTR).decode()
        except OSError:
            return None
        return path if os.path.exists(path) else None

    return wait_for(listening, MOUNT_TIMEOUT, "the control socket")


def imgfs_status(mount):
    """`imgfs status --json MOUNT` as a dict; fail if it does not answer."""
    control_socket(mount)
    proc = imgfs_run("status", "--json", mount.path)
    assert proc.returncode == 0, f"imgfs status failed: {proc.stderr}"
    return json.loads(proc.stdout)


def drive_status(mount, name="disk0"):
    """One drive's entry of `imgfs status --json`."""
    drives = {d["name"]: d for d in imgfs_status(mount)["drives"]}
    assert name in drives, f"drive {name!r} not in status: {sorted(drives)}"
    return drives[name]


def require_format(name):
    """Skip (fail in CI) unless `imgfs formats` lists format NAME."""
    proc = imgfs_run("formats")
    listed = [line.split()[0] for line in proc.stdout.splitlines()
              if line.startswith("  ")]
    if name not in listed:
        unavailable(f"this imgfs build has no {name} driver "
                    f"(`imgfs formats` lists {', '.join(listed)})")


def fio_args(filename, **options):
    args = ["fio", "--output-format=json", "--verify_state_save=0"]
    if filename is not None:
        args.append(f"--filename={filename}")
    for key, value in options.items():
        args.append(f"--{key}={value}")
    return args


def fio_report(stdout):
    """fio's JSON report (fio may print warnings before it)."""
    return json.loads(stdout[stdout.index("{"):])


def run_fio(filename, timeout=300, **options):
    """Run fio --OPTION=VALUE on FILENAME; fail on any error; its jobs."""
    proc = run(*fio_args(filename, **options), check=False, timeout=timeout)
    assert proc.returncode == 0, f"fio failed:\n{proc.stdout}\n{proc.stderr}"
    jobs = fio_report(proc.stdout)["jobs"]
    for job in jobs:
        assert job["error"] == 0, f"fio job {job['jobname']}: {job['error']}"
    return jobs


def start_fio(filename, **options):
    """Start fio in the background; finish it with fio_wait()."""
    require_tool("fio")
    return subprocess.Popen(
        fio_args(filename, **options),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def fio_wait(proc, timeout=300):
    """Wait for a start_fio() run; fail on any error; its jobs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"fio still running after {timeout} s:\n{err}",
                    pytrace=False)
    assert proc.returncode == 0, f"fio failed:\n{out}\n{err}"
    jobs = fio_report(out)["jobs"]
    for job in jobs:
        assert job["error"] == 0, f"fio job {job['jobname']}: {job['error']}"
    return jobs


def ofd_locked(path):
    """True if some process holds an OFD lock on the file PATH."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return any(line.split()[1] == "OFDLCK" and dev in line.split()
                   for line in f)


class StorageDaemon:
    """A qemu-storage-daemon exporting one block node as a FUSE file."""

    def __init__(self, proc, export, log):
        self.proc = proc
        self.export = Path(export)
        self.log = Path(log)


@pytest.fixture
def qsd(tmp_path):
    """Factory: qsd(blockdevs, export=None, writable=True) -> StorageDaemon.

    BLOCKDEVS are --blockdev values; the last one is exported over FUSE
    on the regular file EXPORT (created) when EXPORT is given.  Waits until
    the export is mounted (or the image locked); stops the daemon at
    teardown.  Request this fixture before `imgfs`, so that imgfs goes
    first at teardown.
    """
    binary = require_tool("qemu-storage-daemon")
    started = []

    def start(blockdevs, export=None, writable=True, lock=None):
        args = [binary]
        for spec in blockdevs:
            args += ["--blockdev", spec]
        if export is not None:
            Path(export).touch()
            node = re.search(r"node-name=([^,]+)", blockdevs[-1]).group(1)
            args += ["--export",
                     f"type=fuse,id=exp0,node-name={node},mountpoint={export},"
                     f"writable={'on' if writable else 'off'}"]
        log = tmp_path / f"qsd{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out,
                                    start_new_session=True)
        daemon = StorageDaemon(proc, export or "", log)
        started.append(daemon)

        def ready():
            if proc.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited {proc.returncode}:"
                            f"\n{log.read_text()}", pytrace=False)
            if export is not None and not is_mounted(export):
                return False
            return lock is None or ofd_locked(lock)

        wait_for(ready, MOUNT_TIMEOUT, "qemu-storage-daemon to start")
        return daemon

    yield start

    for daemon in reversed(started):
        stop_process(daemon.proc, timeout=15)
        if daemon.export.name and is_mounted(daemon.export):
            unmount(daemon.export, lazy=True)
