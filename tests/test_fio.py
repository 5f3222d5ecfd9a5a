"""Concurrent I/O checked by fio's own verification (crc32c headers).

Four jobs write separate 16 MiB regions of one drive, with async O_DIRECT
at iodepth 32, so many requests are in flight in imgfs at once.  fio reads
every block back and checks it; after the unmount, fio checks the image
file itself with --verify_only (same seed, so the same blocks).
"""

import json

import pytest

from conftest import MiB, create_image, drop_caches, run, sha256

JOBS = 4
REGION = 16 * MiB


def fio(filename, **options):
    """Run fio on FILENAME with --OPTION=VALUE; fail on any error."""
    args = ["fio", "--output-format=json", "--verify_state_save=0",
            f"--filename={filename}"]
    args += [f"--{key}={value}" for key, value in options.items()]
    proc = run(*args, check=False, timeout=300)
    assert proc.returncode == 0, f"fio failed:\n{proc.stderr}"
    # fio may print warnings before the JSON document
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']}: {job['error']}"
    return report["jobs"]


def bytes_done(jobs, direction):
    return sum(job[direction]["io_bytes"] for job in jobs)


def write_and_verify(imgfs, tmp_path, workload, settings=None, **io):
    """WORKLOAD through imgfs with IO options, then verify the image.

    Returns how many bytes fio wrote.
    """
    image = create_image(tmp_path / "disk0.img", JOBS * REGION)
    mount = imgfs({"disk0": {"file": image, "format": "raw"}}, settings)
    workload = dict(
        workload,
        numjobs=JOBS,
        size=REGION,
        offset_increment=REGION,
        verify="crc32c",
        verify_fatal=1,
    )
    jobs = fio(mount.drive(), do_verify=1, **workload, **io)
    written = bytes_done(jobs, "write")
    # random unaligned block sizes may leave a region's last bytes unwritten
    assert written > 0.9 * JOBS * REGION
    assert bytes_done(jobs, "read") == written  # the verify pass

    drop_caches()
    mounted = sha256(mount.drive())
    assert mount.unmount() == 0
    assert sha256(image) == mounted

    jobs = fio(image, verify_only=1, ioengine="psync", direct=0, **workload)
    assert bytes_done(jobs, "read") == written
    return written


# How requests travel between the kernel and imgfs ([imgfs] fuse-uring)
TRANSPORTS = {"io_uring": "on", "dev-fuse": "off"}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("rw", ["randwrite", "write"])
@pytest.mark.parametrize("ioengine", ["io_uring", "libaio"])
def test_async_direct_verify(imgfs, tmp_path, ioengine, rw, transport):
    workload = dict(name=f"{rw}-{ioengine}", rw=rw, bsrange="4k-256k")
    written = write_and_verify(imgfs, tmp_path, workload,
                               settings={"fuse-uring": TRANSPORTS[transport]},
                               ioengine=ioengine, direct=1, iodepth=32)
    assert written == JOBS * REGION


@pytest.mark.parametrize("iothreads", [1, 4])
def test_iothreads_verify(imgfs, tmp_path, iothreads):
    workload = dict(name=f"iothreads-{iothreads}", rw="randwrite",
                    bsrange="4k-256k")
    written = write_and_verify(imgfs, tmp_path, workload,
                               settings={"iothreads": iothreads},
                               ioengine="io_uring", direct=1, iodepth=32)
    assert written == JOBS * REGION


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_buffered_unaligned_verify(imgfs, tmp_path, transport):
    workload = dict(name="buffered", rw="randwrite", bsrange="1k-67k",
                    bs_unaligned=1)
    write_and_verify(imgfs, tmp_path, workload,
                     settings={"fuse-uring": TRANSPORTS[transport]},
                     ioengine="psync", direct=0)
