"""Per-project quotas (issue 11, item 6), on SQLite and PostgreSQL: enforced in the
transaction that creates the resource, so a burst of concurrent creates never ends
over a limit; only a cluster admin changes a quota; one project cannot drain the
external address pool."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.models import Node, Project, StoragePool, Volume, VolumeSnapshot
from appliance.services import images, nodes

from .conftest import Api

pytestmark = pytest.mark.functional
GIB = 1 << 30
INV: dict[str, Any] = {"cpu_model": "fake", "cores": 16, "threads": 16, "numa_nodes": 1, "memory_bytes": 64 * GIB,
                       "disks": [], "nics": [], "virt_type": "qemu"}
RACERS = 8


@pytest.fixture(scope="module")
def world(module_api: Api) -> Iterator[Api]:
    """Project 'q' (with a node, an image, a storage pool) and its project admin."""
    api = module_api
    url = api.settings.resolved_database_url
    api.settings.external_cidr = "198.51.100.0/24"
    api.settings.external_pool = "198.51.100.10-198.51.100.13"  # 4 addresses: a project may hold 2
    api.settings.external_project_share = 0.5
    assert api.client.post("/api/v1/projects", json={"name": "q"}, headers=api.admin).status_code == 201
    with session_scope(url) as session:
        nodes.register(session, "n1", INV, allocatable(INV))
        node = session.scalar(select(Node).where(Node.name == "n1"))
        project = session.scalar(select(Project).where(Project.name == "q"))
        assert node is not None and project is not None
        kernel = api.settings.data_dir / "vmlinuz"
        kernel.write_bytes(b"k")
        images.record(session, project.id, "tiny", {"kind": "vm", "format": "kernel", "kernel": str(kernel)})
        session.add(StoragePool(name="default", node_id=node.id, spec={"backend": "local", "url": "/x"},
                                status={"phase": "Ready"}))
    yield api


def race(count: int, request: Callable[[int], httpx.Response]) -> list[int]:
    """``count`` requests released at once; their status codes."""
    barrier = threading.Barrier(count)
    codes: list[int] = []

    def one(i: int) -> None:
        barrier.wait()
        r = request(i)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["type"].endswith("/quota-exceeded"), r.text
        codes.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sorted(codes)


def set_quota(api: Api, **limits: Any) -> dict[str, Any]:
    r = api.client.put("/api/v1/projects/q/quota", json=limits, headers=api.admin)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_only_a_cluster_admin_changes_a_quota(world: Api) -> None:
    api = world
    boss = api.headers_for("q-admin", project="q", role="admin")
    r = api.client.put("/api/v1/projects/q/quota", json={"instances": 1000}, headers=boss)
    assert r.status_code == 403 and "cluster role 'admin'" in r.json()["detail"]
    r = api.client.patch("/api/v1/projects/q", json={"spec": {"quota": {"instances": 1000}}}, headers=boss)
    assert r.status_code == 403 and "only a cluster admin changes the quota" in r.json()["detail"]
    set_quota(api, instances=5, networks=2)
    r = api.client.patch("/api/v1/projects/q", json={"spec": {"description": "mine"}}, headers=boss)
    assert r.status_code == 200 and r.json()["spec"]["quota"]["instances"] == 5  # left alone
    shown = api.client.get("/api/v1/projects/q/quota", headers=boss).json()
    assert shown["limits"]["instances"] == 5 and shown["limits"]["cpu"] is None
    assert shown["usage"]["instances"] == 0 and shown["usage"]["networks"] == 0
    set_quota(api)  # all unlimited again


def test_concurrent_creates_never_exceed_the_instance_cpu_and_memory_quotas(world: Api) -> None:
    api = world
    set_quota(api, instances=3)

    def vm(i: int) -> httpx.Response:
        body = {"name": f"vm{i}", "project": "q", "spec": {"cpu": 1, "memory": "64MiB", "image": "tiny"}}
        return api.client.post("/api/v1/vms", json=body, headers=api.admin)

    assert race(RACERS, vm) == [202] * 3 + [403] * (RACERS - 3)
    set_quota(api, cpu=4, memory_bytes=1 * GIB)
    r = api.client.post("/api/v1/vms", headers=api.admin, json={
        "name": "big", "project": "q", "spec": {"cpu": 2, "memory": "64MiB", "image": "tiny"}})
    assert r.status_code == 403 and "would hold 5 vCPUs, over its quota of 4 (3 in use)" in r.json()["detail"]
    r = api.client.post("/api/v1/vms", headers=api.admin, json={
        "name": "fat", "project": "q", "spec": {"cpu": 1, "memory": "1GiB", "image": "tiny"}})
    assert r.status_code == 403 and "bytes of memory" in r.json()["detail"]
    assert api.client.get("/api/v1/projects/q/quota", headers=api.admin).json()["usage"]["instances"] == 3
    set_quota(api)


def test_concurrent_creates_never_exceed_the_network_and_volume_quotas(world: Api) -> None:
    api = world
    set_quota(api, networks=2, volume_bytes=3 * GIB)

    def network(i: int) -> httpx.Response:
        return api.client.post("/api/v1/networks", json={"name": f"n{i}", "project": "q"}, headers=api.admin)

    def volume(i: int) -> httpx.Response:
        return api.client.post("/api/v1/volumes", json={"name": f"v{i}", "project": "q", "size": "1GiB"},
                               headers=api.admin)

    assert race(RACERS, network) == [201] * 2 + [403] * (RACERS - 2)
    assert race(RACERS, volume) == [202] * 3 + [403] * (RACERS - 3)
    usage = api.client.get("/api/v1/projects/q/quota", headers=api.admin).json()["usage"]
    assert usage["networks"] == 2 and usage["volume_bytes"] == 3 * GIB
    set_quota(api)


def test_concurrent_snapshots_never_exceed_the_snapshot_quota(world: Api) -> None:
    api = world
    url = api.settings.resolved_database_url
    with session_scope(url) as session:
        names = []
        for vol in session.scalars(select(Volume).where(Volume.name.like("v%"))):
            vol.task_state, vol.status = None, {**vol.status, "phase": "Available"}
            names.append(vol.name)
        first = session.scalar(select(Volume).where(Volume.name == names[0]))
        assert first is not None
        session.add(VolumeSnapshot(volume_id=first.id, name="old", size=GIB))  # one already taken
    set_quota(api, snapshots=2)

    def snapshot(i: int) -> httpx.Response:
        return api.client.post(f"/api/v1/volumes/{names[i % len(names)]}/snapshots", params={"project": "q"},
                               json={"name": f"s{i}"}, headers=api.admin)

    assert race(len(names), snapshot) == [202] + [403] * (len(names) - 1)
    set_quota(api)


def test_concurrent_router_and_floating_ip_creates_respect_quotas_and_the_pool_share(world: Api) -> None:
    api = world
    set_quota(api, routers=1, floating_ips=5)

    def router(i: int) -> httpx.Response:
        return api.client.post("/api/v1/routers", json={"name": f"r{i}", "project": "q"}, headers=api.admin)

    def fip(i: int) -> httpx.Response:
        return api.client.post("/api/v1/floating-ips", json={"name": f"f{i}", "project": "q"}, headers=api.admin)

    assert race(RACERS, router) == [201] + [403] * (RACERS - 1)
    # the quota allows 5 floating IPs, but a project may hold only 2 of the pool's 4 addresses
    assert race(RACERS, fip) == [201] + [403] * (RACERS - 1)
    r = fip(99)
    assert r.status_code == 403 and "holds 2 of the 4 external addresses and may hold at most 2" in r.json()["detail"]
    # so another project still gets addresses
    r = api.client.post("/api/v1/floating-ips", json={"name": "theirs"}, headers=api.admin)
    assert r.status_code == 201, r.text
    set_quota(api)
