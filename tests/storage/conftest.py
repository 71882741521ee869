"""Storage fixtures: one throwaway Ceph cluster per session (always torn down), backends."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.backends import ObjectBackend, open_backend
from storage.backends.rados_cluster import CephCluster, start_cluster


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """1 mon, 1 mgr, 3 OSDs on sparse files; a start failure fails the tests that need it."""
    missing = [b for b in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Ceph is not installed ({', '.join(missing)} missing): apt-get install ceph-mon ceph-mgr ceph-osd")
    base = Path(tempfile.mkdtemp(prefix="cairn-test-ceph-"))
    cluster = start_cluster(base / "cluster", osd_size=6 << 30)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["local", "rados"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty backend of each kind (rados: a new namespace in the session cluster)."""
    if request.param == "local":
        return f"local://{tmp_path / 'pool'}"
    cluster: CephCluster = request.getfixturevalue("ceph")
    return cluster.backend_url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def backend(backend_url: str) -> Iterator[ObjectBackend]:
    """An opened backend, closed after the test."""
    b = open_backend(backend_url)
    try:
        yield b
    finally:
        b.close()
