"""Nothing stuck (issue 11, items 11 and 12), on SQLite and PostgreSQL.

However a task ends — cancelled while pending, cancelled while running, its worker
killed with -9 (the reaper ends it), an unexpected exception — the instance is not
left busy, its placement claim and ports are given back, and it can be deleted with
nothing leaked. Volumes go through the same guard. Two VMs created at once with the
same volume never both get it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from appliance import controller
from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.models import Claim, Instance, IpAllocation, Node, Port, Project, StoragePool, Task, Volume
from appliance.services import images, nodes
from appliance.tasks import runner

from .conftest import Api

pytestmark = pytest.mark.functional
GIB = 1 << 30
INV: dict[str, Any] = {"cpu_model": "fake", "cores": 4, "threads": 4, "numa_nodes": 1, "memory_bytes": 9 * GIB,
                       "disks": [], "nics": [], "virt_type": "qemu"}
VM = {"name": "g1", "spec": {"cpu": 1, "memory": "256MiB", "image": "tiny", "networks": ["net"]}}


def make_world(api: Api) -> str:
    """A Ready node (no agent: nothing ever reports the guest running), an image, a network."""
    url = api.settings.resolved_database_url
    with session_scope(url) as session:
        nodes.register(session, "n1", INV, allocatable(INV))
        project = session.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        kernel = api.settings.data_dir / "vmlinuz"
        kernel.write_bytes(b"k")
        images.record(session, project.id, "tiny", {"kind": "vm", "format": "kernel", "kernel": str(kernel)})
        node = session.scalar(select(Node).where(Node.name == "n1"))
        assert node is not None  # a pool whose storage daemon is not running: volume tasks fail
        session.add(StoragePool(name="default", node_id=node.id, spec={"backend": "local", "url": "/nonexistent"},
                                status={"phase": "Ready"}))
    r = api.client.post("/api/v1/networks", json={"name": "net", "spec": {"cidr": "10.40.0.0/24"}},
                        headers=api.admin)
    assert r.status_code == 201, r.text
    return url


@pytest.fixture(scope="module")
def world(module_api: Api) -> Iterator[tuple[Api, str]]:
    patch = pytest.MonkeyPatch()
    # every task module this file runs asks its settings here: never the process default
    # (/var/lib/cairn), which would reach a running appliance's storage daemon
    for module in ("runner", "instances", "storage", "vm_snapshots"):
        patch.setattr(f"appliance.tasks.{module}.get_settings", lambda: module_api.settings)
    module_api.settings.task_heartbeat_interval = 0.3
    yield module_api, make_world(module_api)
    patch.undo()


def held(url: str) -> dict[str, Any]:
    """What placements and ports hold: all zero when nothing leaked."""
    with session_scope(url, readonly=True) as session:
        node = session.scalar(select(Node).where(Node.name == "n1"))
        assert node is not None
        return {"claims": session.scalar(select(func.count()).select_from(Claim)),
                "ports": session.scalar(select(func.count()).select_from(Port)),
                "addresses": session.scalar(select(func.count()).select_from(IpAllocation)
                                            .where(IpAllocation.purpose == "port")),
                "cpu": node.cpu_claimed, "memory": node.memory_claimed}


NOTHING = {"claims": 0, "ports": 0, "addresses": 0, "cpu": 0.0, "memory": 0}


def task_row(url: str, task_id: str) -> Task:
    with session_scope(url, readonly=True) as session:
        task = session.get(Task, task_id)
        assert task is not None
        session.expunge(task)
        return task


def wait_message(url: str, task_id: str, prefix: str, seconds: float = 30) -> None:
    """Until the task reports ``prefix`` (the create holds its claim and ports then)."""
    deadline = time.monotonic() + seconds
    while not task_row(url, task_id).message.startswith(prefix):
        assert time.monotonic() < deadline, f"task never reached '{prefix}': {task_row(url, task_id).message}"
        time.sleep(0.05)


def assert_deletable_and_nothing_leaked(api: Api, url: str) -> None:
    vm = api.client.get("/api/v1/vms/g1", headers=api.admin).json()
    assert vm["status"]["task_state"] is None and vm["status"]["vm_state"] == "error", vm["status"]
    assert held(url) == NOTHING
    r = api.client.delete("/api/v1/vms/g1", headers=api.admin)
    assert r.status_code == 202, r.text
    assert runner.run_task(r.json()["id"]) == "succeeded", task_row(url, r.json()["id"]).error
    assert api.client.get("/api/v1/vms/g1", headers=api.admin).status_code == 404
    assert held(url) == NOTHING
    with session_scope(url, readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_cancel_while_pending_frees_the_instance(world: tuple[Api, str]) -> None:
    api, url = world
    task = api.client.post("/api/v1/vms", json=VM, headers=api.admin).json()
    r = api.client.post(f"/api/v1/tasks/{task['id']}/cancel", headers=api.admin)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert runner.run_task(task["id"]) == "skipped"  # its message arrives late: it never runs
    assert_deletable_and_nothing_leaked(api, url)


def test_cancel_while_running_gives_back_claim_and_ports(world: tuple[Api, str]) -> None:
    api, url = world
    task = api.client.post("/api/v1/vms", json=VM, headers=api.admin).json()
    ended: list[str] = []
    worker = threading.Thread(target=lambda: ended.append(runner.run_task(task["id"])))
    worker.start()
    wait_message(url, task["id"], "start: waiting")
    assert held(url)["claims"] == 1 and held(url)["ports"] == 1
    assert api.client.post(f"/api/v1/tasks/{task['id']}/cancel", headers=api.admin).status_code == 202
    worker.join(20)
    assert ended == ["cancelled"]
    assert_deletable_and_nothing_leaked(api, url)


def test_an_unexpected_exception_gives_back_claim_and_ports(world: tuple[Api, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    api, url = world

    def broken(*_: Any, **__: Any) -> Any:
        raise ZeroDivisionError("a bug in the handler")

    monkeypatch.setattr("appliance.tasks.instances._wait_power", broken)
    task = api.client.post("/api/v1/vms", json=VM, headers=api.admin).json()
    assert runner.run_task(task["id"]) == "failed"
    assert "ZeroDivisionError" in (task_row(url, task["id"]).error or "")
    vm = api.client.get("/api/v1/vms/g1", headers=api.admin).json()
    assert "a bug in the handler" in vm["status"]["error"]
    assert_deletable_and_nothing_leaked(api, url)


def test_a_worker_killed_with_sigkill_is_reaped_and_the_instance_freed(world: tuple[Api, str]) -> None:
    api, url = world
    task = api.client.post("/api/v1/vms", json=VM, headers=api.admin).json()
    env = {**os.environ, "CAIRN_DATABASE_URL": url, "CAIRN_DATA_DIR": str(api.settings.data_dir),
           "CAIRN_TASK_HEARTBEAT_INTERVAL": "0.3", "CAIRN_NODE_NAME": "n1"}
    worker = subprocess.Popen([sys.executable, "-c", "import sys; from appliance.tasks.runner import run_task; "
                               "run_task(sys.argv[1])", task["id"]], env=env)
    try:
        wait_message(url, task["id"], "start: waiting")
        assert held(url)["claims"] == 1
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert task_row(url, task["id"]).state == "running"  # nobody ended it: the worker is gone
    time.sleep(1.2)
    api.settings.task_grace_seconds = 1.0
    api.settings.node_grace_seconds = 3600
    assert controller.run_once(api.settings)["tasks_reaped"] == [task["id"]]
    final = task_row(url, task["id"])
    assert final.state == "failed" and "stopped answering" in (final.error or "")
    assert_deletable_and_nothing_leaked(api, url)


def test_a_failed_volume_task_leaves_the_volume_usable(world: tuple[Api, str]) -> None:
    """Volumes and their snapshots share the guard: here the pool's storage daemon is
    not running, so every volume task fails; none leaves its volume busy."""
    api, url = world
    r = api.client.post("/api/v1/volumes", json={"name": "v1", "size": "1GiB"}, headers=api.admin)
    assert r.status_code == 202, r.text
    assert runner.run_task(r.json()["id"]) == "failed"
    vol = api.client.get("/api/v1/volumes/v1", headers=api.admin).json()
    assert vol["status"]["task_state"] is None and vol["status"]["phase"] == "Error"
    with session_scope(url) as session:  # as if it had been created: now snapshot it
        row = session.scalar(select(Volume).where(Volume.name == "v1"))
        assert row is not None
        row.status = {**row.status, "phase": "Available"}
    snap = api.client.post("/api/v1/volumes/v1/snapshots", json={"name": "s1"}, headers=api.admin)
    assert snap.status_code == 202, snap.text
    assert api.client.post(f"/api/v1/tasks/{snap.json()['id']}/cancel", headers=api.admin).status_code == 202
    assert api.client.get("/api/v1/volumes/v1", headers=api.admin).json()["status"]["task_state"] is None
    snap = api.client.post("/api/v1/volumes/v1/snapshots", json={"name": "s1"}, headers=api.admin)
    assert runner.run_task(snap.json()["id"]) == "failed"
    assert api.client.get("/api/v1/volumes/v1", headers=api.admin).json()["status"]["task_state"] is None
    assert api.client.delete("/api/v1/volumes/v1", headers=api.admin).status_code == 202


def test_two_vms_created_at_once_with_one_volume_never_both_get_it(world: tuple[Api, str]) -> None:
    api, url = world
    with session_scope(url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        pool = session.scalar(select(StoragePool).where(StoragePool.name == "default"))
        assert pool is not None and project is not None
        session.add(Volume(name="shared", project_id=project.id, pool_id=pool.id, size=GIB,
                           spec={"pool": "default", "class": "dedup", "size_bytes": GIB},
                           status={"phase": "Available", "export": "nbd+unix:///x?socket=/x"}))
    racers = 8
    barrier = threading.Barrier(racers)
    codes: list[int] = []

    def create(i: int) -> None:
        body = {"name": f"r{i}", "spec": {"cpu": 1, "memory": "64MiB", "image": "tiny", "volumes": ["shared"]}}
        barrier.wait()
        codes.append(api.client.post("/api/v1/vms", json=body, headers=api.admin).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [202] + [409] * (racers - 1), codes
    with session_scope(url, readonly=True) as session:
        instances = list(session.scalars(select(Instance)))
        vol = session.scalar(select(Volume).where(Volume.name == "shared"))
        assert vol is not None and len(instances) == 1 and vol.instance_id == instances[0].id
    # the volume cannot be deleted from under it, and a VM delete gives it back
    r = api.client.delete("/api/v1/volumes/shared", headers=api.admin)
    assert r.status_code == 409 and f"vm '{instances[0].name}'" in r.json()["detail"]
