"""Concurrent I/O on qcow2 drives, checked by fio's own verification.

Four fio jobs write separate regions of one qcow2 drive with async
O_DIRECT at iodepth 32 and random block sizes, so many allocating (on a
sparse image) or in-place (on a fully allocated one) writes are in flight
in imgfs at once, many of them to the same L2 tables.  fio reads every
block back and checks its crc32c.  After the unmount `qemu-img check`
must be clean, and fio checks the image again, this time converted to raw
by qemu-img (--verify_only, same seed, so the same blocks).
"""

import pytest

from conftest import MiB, drop_caches
from qcow2util import check, create_qcow2, to_raw
from test_fio import bytes_done, fio

JOBS = 4
REGION = 16 * MiB


@pytest.mark.parametrize("ioengine", ["io_uring", "libaio"])
@pytest.mark.parametrize("image_kind", ["sparse", "allocated",
                                        "sparse-4k-clusters"])
def test_qcow2_fio_verify(imgfs, tmp_path, image_kind, ioengine):
    opts = {"sparse": None,
            "allocated": "preallocation=full",
            "sparse-4k-clusters": "cluster_size=4096"}[image_kind]
    image = create_qcow2(tmp_path / "disk0.qcow2", JOBS * REGION, opts)
    mount = imgfs({"disk0": {"file": image, "format": "qcow2",
                             "cache": "none"}})
    workload = dict(name=f"qcow2-{image_kind}", rw="randwrite",
                    bsrange="4k-256k", numjobs=JOBS, size=REGION,
                    offset_increment=REGION, verify="crc32c",
                    verify_fatal=1)
    jobs = fio(mount.drive(), do_verify=1, ioengine=ioengine, direct=1,
               iodepth=32, **workload)
    written = bytes_done(jobs, "write")
    assert written == JOBS * REGION
    assert bytes_done(jobs, "read") == written

    drop_caches()
    assert mount.unmount() == 0
    report = check(image)
    assert report.get("leaks", 0) == 0, report
    raw = to_raw(image, tmp_path / "disk0.raw")
    jobs = fio(raw, verify_only=1, ioengine="psync", direct=0, **workload)
    assert bytes_done(jobs, "read") == written


def test_concurrent_writes_to_one_cluster(imgfs, tmp_path):
    """32 writes in flight into the same few fresh clusters: each cluster
    is allocated once (the others wait for it), no write is lost."""
    image = create_qcow2(tmp_path / "disk0.qcow2", 64 * MiB)
    mount = imgfs({"disk0": {"file": image, "format": "qcow2",
                             "cache": "none"}})
    workload = dict(name="one-cluster", rw="write", bs="4k", size="1M",
                    offset="8M", verify="crc32c", verify_fatal=1)
    jobs = fio(mount.drive(), do_verify=1, ioengine="libaio", direct=1,
               iodepth=32, **workload)
    assert bytes_done(jobs, "write") == MiB
    assert mount.unmount() == 0
    report = check(image)
    assert report.get("leaks", 0) == 0, report
    # 16 data clusters of 64 KiB, each allocated once: after the header,
    # refcount table and block, L1 and L2 tables nothing else in the file
    assert report["allocated-clusters"] == 16, report
    assert report["image-end-offset"] == (5 + 16) * 65536, report
    raw = to_raw(image, tmp_path / "disk0.raw")
    jobs = fio(raw, verify_only=1, ioengine="psync", direct=0, **workload)
    assert bytes_done(jobs, "read") == MiB
