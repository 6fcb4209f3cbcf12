"""Fixtures any test can use."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from ceph_cluster import CephCluster, start


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """One single-node Ceph cluster per test session (~5 s to start), pool ``rbd``.

    Tests create their own images (``ceph.create_image(name, size)``) so they
    never share one; ``ceph.conf`` is the config path, ``ceph.export`` reads an
    image back with ``rbd export``.
    """
    if shutil.which("ceph-osd") is None:
        assert not os.environ.get("CI"), "ceph must be installed on the CI machine"
        pytest.skip("ceph-mon/ceph-osd not installed (scripts/install-deps.sh)")
    cluster = start()
    try:
        yield cluster
    finally:
        cluster.stop()
