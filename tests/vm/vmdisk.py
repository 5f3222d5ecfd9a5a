"""Boot a small Linux guest with a raw disk file as its virtio disk.

This is the host side of the VM test.  build_initramfs() packs busybox-static,
the virtio and loop modules of the installed Debian kernel and ./init into
an initramfs.  run() prepares the disk (region A random, region B zero),
boots qemu-system-x86_64 (TCG; KVM is not assumed) with the disk as
`-drive file=DISK,format=raw,if=virtio,cache=...,aio=...`, and checks what
the guest did:

    A [0, 16M)     the guest's O_DIRECT read hashes to what the host wrote
    B [16M, 20M)   the nonce pattern the guest wrote is in the disk
    C [32M, end)   the guest's ext2 passes e2fsck -f -n and debugfs reads
                   back its files

It is used by tests/test_vm.py and can be run by hand:

    python3 tests/vm/vmdisk.py [--cache none --aio io_uring] DISK

which overwrites DISK (at least 48 MiB) and exits non-zero on a failure.
"""

import argparse
import gzip
import hashlib
import lzma
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024

READ_MB = 16  # region A
WRITE_OFF_MB, WRITE_MB = 16, 4  # region B
FS_OFF_MB = 32  # region C, to the end of the disk
MIN_SIZE = 48 * MiB

# Loaded in the guest in dependency order (virtio_blk is a module in
# Debian's kernels; ext4, which also mounts ext2, is built in).
MODULES = ["virtio_pci", "virtio_blk", "loop"]

QBOOT = Path("/usr/share/qemu/qboot.rom")


class SetupError(Exception):
    """The VM test cannot run here (no kernel, no busybox-static, ...)."""


# -- the initramfs -------------------------------------------------------


def find_kernel():
    """(path, version) of the newest /boot/vmlinuz-VERSION with modules."""
    found = []
    for path in Path("/boot").glob("vmlinuz-*"):
        version = path.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / version / "modules.dep").exists():
            found.append((path, version))
    if not found:
        raise SetupError("no /boot/vmlinuz-* with modules in /lib/modules "
                         "(apt-get install linux-image-cloud-amd64)")

    def version_key(item):
        return [int(n) for n in re.findall(r"\d+", item[1])]

    return max(found, key=version_key)


def modinfo(version, field_name, module):
    proc = subprocess.run(
        ["modinfo", "-k", version, "-F", field_name, module],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SetupError(f"modinfo {module} ({version}): "
                         f"{proc.stderr.strip()}")
    return proc.stdout.strip()


def module_load_order(version, modules):
    """MODULES and what they depend on, each after its dependencies.

    Modules built into the kernel are left out.
    """
    order = []

    def visit(module):
        if module in order:
            return
        filename = modinfo(version, "filename", module)
        if filename.startswith("(builtin)"):
            return
        depends = modinfo(version, "depends", module)
        for dep in filter(None, depends.split(",")):
            visit(dep)
        order.append(module)

    for module in modules:
        visit(module)
    return order


def unpack_module(src, dest):
    """Copy a kernel module, decompressing .ko.xz/.ko.gz/.ko.zst."""
    src = str(src)
    if src.endswith(".ko"):
        shutil.copyfile(src, dest)
    elif src.endswith(".ko.xz"):
        dest.write_bytes(lzma.decompress(Path(src).read_bytes()))
    elif src.endswith(".ko.gz"):
        dest.write_bytes(gzip.decompress(Path(src).read_bytes()))
    elif src.endswith(".ko.zst"):
        subprocess.run(["zstd", "-q", "-d", "-f", "-o", str(dest), src],
                       check=True)
    else:
        raise SetupError(f"unknown module file type: {src}")


def find_busybox():
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path):
            proc = subprocess.run(["ldd", path], capture_output=True,
                                  text=True)
            if "not a dynamic executable" in proc.stdout + proc.stderr:
                return path
            raise SetupError(f"{path} is dynamically linked "
                             "(apt-get install busybox-static)")
    raise SetupError("no busybox (apt-get install busybox-static)")


def build_initramfs(out, version):
    """Write a gzip'ed newc initramfs for kernel VERSION to OUT."""
    if shutil.which("cpio") is None:
        raise SetupError("no cpio (apt-get install cpio)")
    busybox = find_busybox()
    order = module_load_order(version, MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(busybox, root / "bin" / "busybox")
        os.chmod(root / "bin" / "busybox", 0o755)
        shutil.copyfile(HERE / "init", root / "init")
        os.chmod(root / "init", 0o755)
        for module in order:
            src = modinfo(version, "filename", module)
            unpack_module(src, root / "lib" / "modules" / f"{module}.ko")
        (root / "lib" / "modules" / "load-order").write_text(
            "".join(f"{m}\n" for m in order)
        )
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            input="\n".join(names).encode() + b"\n",
            cwd=root, capture_output=True, check=True,
        )
    Path(out).write_bytes(gzip.compress(cpio.stdout, compresslevel=1))
    return Path(out)


# -- booting and checking ------------------------------------------------


@dataclass
class Boot:
    """One boot: what the guest was asked, what it reported, the log."""

    cache: str
    aio: str
    nonce: str
    host_a: str  # sha256 of region A as the host wrote it
    seconds: float = 0.0
    returncode: int = None
    results: dict = field(default_factory=dict)
    log: str = ""

    def failure(self):
        """Why the guest did not finish, or None if it did."""
        if "FAIL" in self.results:
            return f"guest failed: {self.results['FAIL']}"
        if "DONE" not in self.results:
            if self.returncode is None:
                how = f"killed after a timeout of {self.seconds:.0f} s"
            else:
                how = f"qemu exit code {self.returncode}"
            tail = "\n".join(self.log.splitlines()[-20:])
            return f"guest did not finish ({how}); console:\n{tail}"
        return None


def pattern(nonce, length):
    """The bytes the guest writes to region B (`yes "imgfs-vm NONCE"`)."""
    line = f"imgfs-vm {nonce}\n".encode()
    return (line * (length // len(line) + 1))[:length]


def read_region(disk, offset, length):
    with open(disk, "rb") as f:
        f.seek(offset)
        return f.read(length)


def prepare(disk):
    """Fill region A with random bytes and zero region B through DISK."""
    size = os.stat(disk).st_size
    if size < MIN_SIZE:
        raise SetupError(f"{disk}: {size} bytes, want at least {MIN_SIZE}")
    with open(disk, "r+b") as f:
        f.write(os.urandom(READ_MB * MiB))
        f.seek(WRITE_OFF_MB * MiB)
        f.write(bytes(WRITE_MB * MiB))
        f.flush()
        os.fsync(f.fileno())


def boot(disk, cache, aio, guest, nonce, host_a, timeout=180):
    """Boot GUEST on DISK; return a Boot with its VMDISK results."""
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=1",
        f"vmdisk.read={READ_MB}",
        f"vmdisk.write={WRITE_OFF_MB},{WRITE_MB}",
        f"vmdisk.fs={FS_OFF_MB}",
        f"vmdisk.nonce={nonce}",
    ])
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
           "-nographic", "-nodefaults", "-no-reboot",
           "-serial", "stdio", "-monitor", "none",
           "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs),
           "-append", append,
           "-drive",
           f"file={disk},format=raw,if=virtio,cache={cache},aio={aio}"]
    if QBOOT.exists():  # boots faster than SeaBIOS
        cmd[1:1] = ["-bios", str(QBOOT)]
    result = Boot(cache=cache, aio=aio, nonce=nonce, host_a=host_a)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
        result.returncode = proc.returncode
        output = proc.stdout
    except subprocess.TimeoutExpired as e:
        output = e.stdout or b""
    result.seconds = time.monotonic() - start
    result.log = output.decode(errors="replace").replace("\r", "")
    for line in result.log.splitlines():
        if line.startswith("VMDISK "):
            key, _, value = line[len("VMDISK "):].partition(" ")
            result.results.setdefault(key, value)
    return result


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def check(disk, boot_result, workdir):
    """Compare DISK and the guest's report with the truth; list failures.

    WORKDIR holds a copy of the file system region while it is checked.
    """
    failures = []
    nonce, host_a = boot_result.nonce, boot_result.host_a
    res = boot_result.results
    why = boot_result.failure()
    if why:
        failures.append(why)

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    want_b = sha256_hex(pattern(nonce, WRITE_MB * MiB))
    expect("A: guest's hash of the host's data", res.get("READ"), host_a)
    expect("A: host data unchanged",
           sha256_hex(read_region(disk, 0, READ_MB * MiB)), host_a)
    expect("B: guest's hash of its pattern", res.get("WRITE"), want_b)
    expect("B: pattern in the disk",
           sha256_hex(read_region(disk, WRITE_OFF_MB * MiB, WRITE_MB * MiB)),
           want_b)
    if res.get("FS") != "ok":
        failures.append("C: the guest did not finish its file system")
        return failures

    fs = Path(workdir) / "fs.img"
    with open(disk, "rb") as src, open(fs, "wb") as dst:
        src.seek(FS_OFF_MB * MiB)
        shutil.copyfileobj(src, dst, MiB)
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(fs)],
                          capture_output=True, text=True)
    if fsck.returncode != 0:
        failures.append(f"C: e2fsck -f -n: exit {fsck.returncode}\n"
                        f"{fsck.stdout}")

    def cat(name):
        return subprocess.run(["debugfs", "-R", f"cat {name}", str(fs)],
                              capture_output=True).stdout

    expect("C: /pattern", sha256_hex(cat("/pattern")), want_b)
    expect("C: /hello", cat("/hello"), f"hello {nonce}\n".encode())
    expect("C: /dir/f49", cat("/dir/f49"), b"49\n")
    fs.unlink()
    return failures


@dataclass
class Guest:
    """A kernel and the initramfs built for it."""

    kernel: Path
    initramfs: Path


def make_guest(workdir):
    """Find the kernel and build its initramfs into WORKDIR."""
    for tool in ("qemu-system-x86_64", "e2fsck", "debugfs"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} is not installed")
    kernel, version = find_kernel()
    initramfs = build_initramfs(Path(workdir) / "initramfs.cpio.gz", version)
    return Guest(kernel, initramfs)


def run(disk, cache, aio, guest, workdir, timeout=180):
    """Prepare DISK, boot GUEST on it, check; return (Boot, failures).

    DISK is overwritten.
    """
    nonce = secrets.token_hex(8)
    prepare(disk)
    host_a = sha256_hex(read_region(disk, 0, READ_MB * MiB))
    result = boot(disk, cache, aio, guest, nonce, host_a, timeout)
    return result, check(disk, result, workdir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("disk", help="raw disk file (overwritten, >= 48 MiB)")
    parser.add_argument("--cache", default="none")
    parser.add_argument("--aio", default="io_uring")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--log", help="write the serial console here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            guest = make_guest(workdir)
        except SetupError as e:
            print(f"vmdisk: {e}", file=sys.stderr)
            return 2
        result, failures = run(args.disk, args.cache, args.aio, guest,
                               workdir, timeout=args.timeout)
    if args.log:
        Path(args.log).write_text(result.log)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"vmdisk: cache={args.cache} aio={args.aio} "
          f"boot to power-off {result.seconds:.1f} s "
          f"(guest uptime {result.results.get('DONE', '?')} s): "
          f"{'FAILED' if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
