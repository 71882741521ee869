"""The rbd storage class against the session Ceph cluster."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.backends.rados_rbd import RbdVolumes
from storage.errors import AlreadyExists, InvalidArgument, NotFound
from tests.storage.conftest import run_tool

pytestmark = pytest.mark.functional
MiB = 1 << 20


@pytest.fixture
def rbd_volumes(ceph: CephCluster) -> Iterator[RbdVolumes]:
    vols = RbdVolumes(str(ceph.conf), ceph.pool)
    try:
        yield vols
    finally:
        vols.close()


def test_rbd_snapshot_clone_rollback_keep_copy_on_write_semantics(rbd_volumes: RbdVolumes) -> None:
    name = f"img-{uuid.uuid4().hex[:8]}"
    rbd_volumes.create(name, 8 * MiB)
    with pytest.raises(AlreadyExists):
        rbd_volumes.create(name, MiB)
    v1 = os.urandom(MiB)
    rbd_volumes.write(name, 0, v1)
    rbd_volumes.snapshot(name, "s1")
    rbd_volumes.write(name, 0, b"x" * 100)
    assert rbd_volumes.read(name, 0, MiB, snapshot="s1") == v1
    rbd_volumes.clone(name, "s1", name + "-c")
    rbd_volumes.write(name + "-c", 0, b"clone")
    assert rbd_volumes.read(name + "-c", 0, 5) == b"clone"
    assert rbd_volumes.read(name, 0, 100) == b"x" * 100
    rbd_volumes.rollback(name, "s1")
    assert rbd_volumes.read(name, 0, MiB) == v1
    assert [s["name"] for s in rbd_volumes.list_snapshots(name)] == ["s1"]
    with pytest.raises(InvalidArgument):
        rbd_volumes.resize(name, MiB)
    rbd_volumes.resize(name, 16 * MiB)
    assert rbd_volumes.info(name)["size"] == 16 * MiB
    rbd_volumes.delete(name + "-c")
    rbd_volumes.delete(name)
    with pytest.raises(NotFound):
        rbd_volumes.info(name)


def test_qemu_img_opens_an_rbd_volume_by_its_uri(rbd_volumes: RbdVolumes) -> None:
    name = f"q-{uuid.uuid4().hex[:8]}"
    rbd_volumes.create(name, 4 * MiB)
    try:
        info = json.loads(run_tool("qemu-img", "info", "--output=json", rbd_volumes.qemu_uri(name)))
        assert info["virtual-size"] == 4 * MiB
    finally:
        rbd_volumes.delete(name)
