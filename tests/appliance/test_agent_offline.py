"""The node agent while its database is away (a PostgreSQL failover): a real crun
container placed on the node crashes while PostgreSQL is stopped, and the agent, even a
freshly restarted one, restarts it from the desired-state document it cached; nothing
is removed on the strength of a cached document; once the database is back the crash
is reported."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from appliance.agent.agent import Agent
from appliance.agent.drivers import DriverSet
from appliance.agent.instances import InstanceReconciler
from appliance.db.engine import session_scope
from appliance.db.models import Instance, Node, Project
from appliance.processes import prepare
from appliance.services import images
from appliance.settings import Settings
from compute.spec import ContainerSpec, PowerState
from compute.testguest import ensure_test_guest
from tests.services import Postgres, create_pg_database, postgres

pytestmark = pytest.mark.functional
LOOP = ["/bin/sh", "-c", "while true; do sleep 3600; done"]


@pytest.fixture
def database() -> Iterator[Postgres]:
    with postgres(durable=True) as server:  # a failover loses no commit (Patroni's synchronous mode)
        yield server


def _agent(settings: Settings) -> Agent:
    agent = Agent(settings)
    agent.register_reconciler("instances", InstanceReconciler(settings, DriverSet(settings)), kinds=("container",))
    return agent


def _driver(agent: Agent) -> Any:
    reconciler = agent.reconcilers[0][1]
    assert isinstance(reconciler, InstanceReconciler)
    return reconciler.drivers["container"]


def _crash(driver: Any, name: str) -> int:
    pid = int(driver.pid(name))
    os.kill(pid, signal.SIGKILL)  # the guest dies by itself
    deadline = time.monotonic() + 10
    while driver.power_state(name) is PowerState.RUNNING:
        assert time.monotonic() < deadline, "the killed container still runs"
        time.sleep(0.05)
    return pid


def _instance(url: str, iid: str) -> Instance:
    with session_scope(url, readonly=True) as session:
        row = session.get(Instance, iid)
        assert row is not None
        session.expunge(row)
        return row


def test_agent_restarts_a_crashed_container_from_its_cached_document_while_the_database_is_down(
        database: Postgres, tmp_path: Path) -> None:
    url = create_pg_database(database.url, "cairn_offline")
    settings = Settings(data_dir=tmp_path / "node", database_url=url, node_name="offline-a", vm_driver="none",
                        container_driver="crun", heartbeat_interval=0.2)
    prepare(settings)
    guest = ensure_test_guest()
    agent = _agent(settings)
    agent.run_once()  # registers the node
    with session_scope(url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        node_id = session.scalar(select(Node.id).where(Node.name == "offline-a"))
        assert project is not None and node_id is not None
        images.record(session, project.id, "busybox", {"kind": "container", "format": "oci",
                                                       "archive": guest.oci_archive, "command": LOOP})
        row = Instance(name="keeper", project_id=project.id, kind="container", node_id=node_id, vm_state="active",
                       power_state="nostate", spec={"power": "running", "cpu": 0.1, "memory_bytes": 32 << 20,
                                                    "image": "busybox"}, status={})
        session.add(row)
        session.flush()
        iid = row.id
    driver = None
    try:
        assert agent.run_once().errors == []  # defines and starts it
        agent.run_once()  # reports it running, and caches the document that says so
        driver = _driver(agent)
        name = agent.document.instances[0].domain if agent.document else ""
        assert driver.power_state(name) is PowerState.RUNNING
        assert _instance(url, iid).power_state == "running"
        cache = settings.desired_state_file
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and "keeper" in cache.read_text()
        # a container that looks like Cairn's but is in no document: kept while the document is a cached one
        ghost = "cairn-ghost-0badc0de"
        driver.define(ContainerSpec(name=ghost, image=guest.oci_archive, command=tuple(LOOP), vcpus=0.1,
                                    memory_mib=16))

        database.stop()  # the primary crashes: nothing answers on the database's address
        first = _crash(driver, name)
        report = agent.run_once()
        assert any(e.startswith("heartbeat:") for e in report.errors), report.errors
        assert any(e.startswith("desired state from the database:") for e in report.errors), report.errors
        assert not agent.document_fresh
        assert driver.power_state(name) is PowerState.RUNNING and driver.pid(name) != first

        # the agent itself restarts (a new process) while the database is still away
        restarted = _agent(settings)
        second = _crash(_driver(agent), name)
        report = restarted.run_once()
        assert restarted.document is not None and not restarted.document_fresh
        driver = _driver(restarted)
        assert driver.power_state(name) is PowerState.RUNNING and driver.pid(name) != second, report.errors
        assert ghost in driver.list_instances()  # absent from a cached document is not a reason to remove

        database.start()
        deadline = time.monotonic() + 30  # the pool notices the new server on its next checkout
        while (report := restarted.run_once()).errors and time.monotonic() < deadline:
            time.sleep(0.2)
        assert report.errors == []
        assert restarted.document_fresh
        seen = _instance(url, iid)
        assert seen.power_state == "running" and seen.status["unexpected_stops"] == 1  # the crash seen offline
        assert ghost not in driver.list_instances()  # a fresh document: the orphan goes
    finally:
        if driver is not None:
            for leftover in driver.list_instances():
                driver.delete(leftover)


def test_a_cached_document_of_another_format_or_node_is_ignored(tmp_path: Path) -> None:
    from appliance.agent.document import DocumentCache
    from appliance.services.desired_state import NodeDocument

    cache = DocumentCache(tmp_path / "agent" / "desired-state.json", "n1")
    assert cache.load() is None
    doc = NodeDocument(node="n1", node_id="id-1").stamped()
    cache.save(doc)
    assert cache.load() == doc
    assert [p.name for p in cache.path.parent.iterdir()] == ["desired-state.json"]  # no temporary left
    assert DocumentCache(cache.path, "n2").load() is None
    cache.path.write_text(doc.model_dump_json().replace('"schema_version":1', '"schema_version":99'))
    assert cache.load() is None
    cache.path.write_text('{"node": "n1", "trunc')
    assert cache.load() is None
