"""One scheduler for VMs and containers: filters, weights, reasons, and reservation
claims that never overcommit a node under concurrency (fake nodes, real databases)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.migrate import upgrade
from appliance.db.models import Claim, Node
from appliance.scheduler.placement import GIB, HostState, NoValidHost, NumaCell, Request, Scheduler
from appliance.services import nodes, placement


def host(name: str, cpus: int = 8, mem_gib: int = 16, **kw: Any) -> HostState:
    return HostState(name, cpus, mem_gib * GIB, **kw)


@pytest.mark.unit
def test_spread_prefers_the_emptiest_node_and_pack_the_fullest_that_fits() -> None:
    hosts = [host("a", mem_gib=16), host("b", mem_gib=32), host("c", mem_gib=8)]
    assert Scheduler(hosts, "spread").select(Request(1, 4 * GIB)).host == "b"
    assert Scheduler(hosts, "pack").select(Request(1, 4 * GIB)).host == "c"
    assert Scheduler(hosts, "pack").select(Request(1, 12 * GIB)).host == "a"


@pytest.mark.unit
def test_spread_places_evenly() -> None:
    s = Scheduler([host(n) for n in "abc"], "spread")
    placed = [s.place(Request(1, 2 * GIB)).host for _ in range(6)]
    assert sorted(placed) == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.unit
def test_filters_name_the_shortfall() -> None:
    hosts = [host("a", ready=False), host("b", schedulable=False), host("c", mem_gib=4), host("d", cpus=1)]
    with pytest.raises(NoValidHost) as err:
        Scheduler(hosts, cpu_ratio=1.0).select(Request(2, 8 * GIB))
    message = str(err.value)
    assert "1 node(s) NotReady" in message and "1 node(s) cordoned" in message
    assert "node(s) short of memory" in message and "2 CPU / 8.00 GiB" in message
    with pytest.raises(NoValidHost, match="short of CPU"):
        Scheduler([host("d", cpus=1)], cpu_ratio=1.0).select(Request(2, GIB))


@pytest.mark.unit
def test_guaranteed_workloads_need_one_numa_node_that_fits() -> None:
    two_cells = [NumaCell(4, 8 * GIB), NumaCell(4, 8 * GIB)]
    s = Scheduler([host("a", cpus=8, numa=two_cells)])
    p = s.place(Request(2, 6 * GIB, qos="guaranteed"))
    assert p.numa_cell == 0 and p.cpu_units == 8.0  # 2 dedicated threads at ratio 4
    assert s.place(Request(2, 6 * GIB, qos="guaranteed")).numa_cell == 1
    with pytest.raises(NoValidHost, match="NUMA"):
        s.select(Request(1, 4 * GIB, qos="guaranteed"))
    # a burstable one still fits in what is left of the node
    assert s.select(Request(1, 2 * GIB)).host == "a"


@pytest.mark.unit
def test_affinity_and_anti_affinity_groups() -> None:
    s = Scheduler([host(n) for n in "abc"])
    anti = [s.place(Request(1, GIB, group="db", group_policy="anti-affinity")).host for _ in range(3)]
    assert sorted(anti) == ["a", "b", "c"]
    with pytest.raises(NoValidHost, match="anti-affinity group 'db'"):
        s.select(Request(1, GIB, group="db", group_policy="anti-affinity"))
    first = s.place(Request(1, GIB, group="web", group_policy="affinity")).host
    assert {s.place(Request(1, GIB, group="web", group_policy="affinity")).host for _ in range(3)} == {first}


@pytest.mark.unit
def test_label_selector() -> None:
    s = Scheduler([host("a", labels={"gpu": "yes"}), host("b", mem_gib=64)])
    assert s.select(Request(1, GIB, node_selector=(("gpu", "yes"),))).host == "a"


INV: dict[str, Any] = {"cpu_model": "fake", "cores": 4, "threads": 4, "numa_nodes": 1,
                       "memory_bytes": 11 * GIB, "disks": [], "nics": [], "virt_type": "qemu"}


@pytest.fixture
def cluster(db_url: str) -> str:
    upgrade(db_url)
    with session_scope(db_url) as session:
        for name in ("n1", "n2", "n3"):
            nodes.register(session, name, INV, allocatable(INV, reserved_memory=GIB, cpu_ratio=4.0))
    return db_url


def _claim_many(url: str, n: int, request: Request) -> tuple[list[str], list[str]]:
    placed: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        try:
            with session_scope(url) as session:
                p = placement.claim(session, "vm", f"00000000-0000-0000-0000-{i:012d}", request)
            with lock:
                placed.append(p.host)
        except NoValidHost as exc:
            with lock:
                refused.append(str(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return placed, refused


@pytest.mark.functional
def test_100_concurrent_claims_never_overcommit(cluster: str) -> None:
    # each node: 10 GiB allocatable -> 10 workloads of 1 GiB; 30 fit in all
    placed, refused = _claim_many(cluster, 100, Request(1, GIB))
    assert len(placed) == 30 and len(refused) == 70
    assert all(placed.count(n) == 10 for n in ("n1", "n2", "n3"))
    with session_scope(cluster) as session:
        for node in session.scalars(select(Node)):
            claims = session.scalar(select(func.coalesce(func.sum(Claim.memory_bytes), 0))
                                    .where(Claim.node_id == node.id))
            assert node.memory_claimed == claims <= node.memory_capacity
    assert "short of memory" in refused[0]


@pytest.mark.functional
def test_concurrent_anti_affinity_claims_land_on_distinct_nodes(cluster: str) -> None:
    placed, refused = _claim_many(cluster, 12, Request(1, GIB, group="db", group_policy="anti-affinity"))
    assert sorted(placed) == ["n1", "n2", "n3"] and len(refused) == 9


@pytest.mark.functional
def test_release_gives_capacity_back(cluster: str) -> None:
    with session_scope(cluster) as session:
        placement.claim(session, "vm", "00000000-0000-0000-0000-000000000001", Request(2, 4 * GIB))
    with session_scope(cluster) as session:
        assert placement.release(session, "00000000-0000-0000-0000-000000000001")
        assert not placement.release(session, "00000000-0000-0000-0000-000000000001")
    with session_scope(cluster) as session:
        assert all(n.memory_claimed == 0 and n.cpu_claimed == 0 for n in session.scalars(select(Node)))




@pytest.mark.functional
def test_placement_groups_api_is_project_scoped(api: Any) -> None:
    body = {"name": "db", "project": "default", "spec": {"policy": "anti-affinity"}}
    r = api.client.post("/api/v1/placement-groups", json=body, headers=api.admin)
    assert r.status_code == 201 and r.json()["project"] == "default"
    assert api.client.post("/api/v1/placement-groups", json=body, headers=api.admin).status_code == 409
    bad = api.client.post("/api/v1/placement-groups", json={**body, "spec": {"policy": "near"}}, headers=api.admin)
    assert bad.status_code == 422 and "policy" in bad.json()["detail"]
    other = api.headers_for("eve", project="other", role="admin")
    assert api.client.get("/api/v1/placement-groups", headers=other).json()["items"] == []
    assert api.client.get("/api/v1/placement-groups/db", headers=other).status_code == 404
    listed = api.client.get("/api/v1/placement-groups", headers=api.admin).json()["items"]
    assert [g["name"] for g in listed] == ["db"]
    assert api.client.delete("/api/v1/placement-groups/db", headers=api.admin).status_code == 204
    assert api.client.get("/api/v1/placement-groups/db", headers=api.admin).status_code == 404
