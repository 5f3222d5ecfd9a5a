"""A real VM on the exposed file: QEMU (TCG) boots a small Linux guest
with MNT/disk0 as its virtio disk, reads and writes it with O_DIRECT and
builds an ext2 on it (see tests/vm/vmdisk.py and tests/vm/init).  The host
checks the result through the mount and, after the unmount, in the image."""

import pytest

from conftest import MiB, create_image, require_tool, unavailable
from vm import vmdisk

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="session")
def guest(tmp_path_factory):
    """The guest kernel and its initramfs, built once per session."""
    require_tool("qemu-system-x86_64")
    try:
        return vmdisk.make_guest(tmp_path_factory.mktemp("vm-cache"))
    except vmdisk.SetupError as e:
        unavailable(str(e))


@pytest.mark.parametrize(
    "cache, aio", [("none", "io_uring"), ("writeback", "threads")]
)
def test_vm_disk(imgfs, tmp_path, guest, cache, aio):
    image = create_image(tmp_path / "disk0.img", 128 * MiB)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}})
    boot, failures = vmdisk.run(mount.drive(), cache, aio, guest, tmp_path)
    print(f"cache={cache} aio={aio}: boot to power-off {boot.seconds:.1f} s")
    assert failures == []
    assert mount.unmount() == 0

    # the image itself, read without imgfs
    assert vmdisk.check(image, boot, tmp_path) == []
