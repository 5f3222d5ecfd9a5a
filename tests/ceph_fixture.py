"""pytest fixtures for tests that need a real Ceph cluster.

``ceph_cluster`` (session scope) starts one throwaway single-node cluster
(tests/ceph/micro_ceph.py: ceph-mon + ceph-osd on 127.0.0.1, memstore,
cephx, pool size 1, an ``rbd`` pool) the first time a test asks for it,
and tears it down at the end of the session.  ``lost_ceph_cluster``
(function scope) is a second, private cluster for a test that kills it.

Loaded by the root conftest.py (pytest_plugins).  Without the Ceph
packages the tests skip and say which programs are missing; with CI=true
they fail instead: CI installs ceph-mon ceph-osd ceph-common.
"""

import os
import sys

import pytest

from conftest import unavailable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "ceph"))
import micro_ceph  # noqa: E402

# Test images are created with the layering feature only, so that a
# killed client leaves no exclusive lock behind (the lock test asks for
# one explicitly).
CLUSTER_CONF = "rbd default features = layering\n"


def _require_ceph():
    missing = micro_ceph.missing_tools()
    if missing:
        unavailable("Ceph is not installed (missing %s; apt-get install "
                    "ceph-mon ceph-osd ceph-common)" % ", ".join(missing))


@pytest.fixture(scope="session")
def ceph_cluster():
    _require_ceph()
    cluster = micro_ceph.MicroCeph(extra_conf=CLUSTER_CONF)
    with cluster:
        print("\nceph cluster in %s ready after %.1f s" %
              (cluster.dir, cluster.start_seconds))
        yield cluster


@pytest.fixture
def lost_ceph_cluster():
    """A private cluster that the test may kill (MicroCeph.kill())."""
    _require_ceph()
    cluster = micro_ceph.MicroCeph(extra_conf=CLUSTER_CONF)
    with cluster:
        yield cluster
