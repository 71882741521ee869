"""Status writes (appliance/services/statuses.py): one function merges a patch into the
status a row holds *now*, under its row lock, and records one event per change. The
concurrency test runs on a real PostgreSQL, where a read-merge-write without a lock
loses updates (READ COMMITTED)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from appliance.agent.agent import PassReport
from appliance.agent.instances import InstanceReconciler
from appliance.db.engine import session_scope
from appliance.db.models import Event, Instance, Project
from appliance.processes import prepare
from appliance.services import instances
from appliance.settings import Settings
from appliance.tasks.instances import _update
from appliance.tasks.runner import TaskContext

from .conftest import make_settings

pytestmark = pytest.mark.functional


def _settings(tmp_path: Path, url: str) -> Settings:
    settings = make_settings(tmp_path, url)
    prepare(settings)
    return settings


def _instance(url: str, **columns: Any) -> str:
    with session_scope(url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        row = Instance(name="web", project_id=project.id, kind="vm", vm_state="active", power_state="running",
                       spec={"power": "running"}, status={"seed": True}, **columns)
        session.add(row)
        session.flush()
        return row.id


def _events(url: str, object_id: str) -> int:
    with session_scope(url, readonly=True) as session:
        return int(session.scalar(select(func.count()).select_from(Event).where(Event.object_id == object_id)) or 0)


def _row(url: str, iid: str) -> Instance:
    with session_scope(url, readonly=True) as session:
        row = session.get(Instance, iid)
        assert row is not None
        session.expunge(row)
        return row


def test_concurrent_task_and_agent_status_writers_lose_nothing_on_postgresql(tmp_path: Path, pg_server: str) -> None:
    """Task handlers each add their own status keys while the node agent reports a crash
    per round on the same row: every key and every crash count must survive."""
    from tests.services import create_pg_database

    url = create_pg_database(pg_server, "cairn_status_race")
    settings = _settings(tmp_path, url)
    iid = _instance(url)
    writers, rounds = 6, 15
    ctx = TaskContext("none", url, {})
    agent = InstanceReconciler(settings, {})
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def task_writer(n: int) -> None:
        try:
            start.wait()
            for i in range(rounds):
                _update(ctx, iid, status={f"w{n}-{i}": i})
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def agent_writer() -> None:
        try:
            start.wait()
            for i in range(rounds):
                agent.crashes[iid] = 1  # what converge() counts when the guest stopped by itself
                agent.report({iid: {"power_state": "running", "seen": i}}, PassReport())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=task_writer, args=(n,)) for n in range(writers - 1)]
    threads.append(threading.Thread(target=agent_writer))
    before = _events(url, iid)
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    status = _row(url, iid).status
    missing = [f"w{n}-{i}" for n in range(writers - 1) for i in range(rounds) if f"w{n}-{i}" not in status]
    assert missing == [], f"{len(missing)} status updates lost: {missing[:10]}"
    assert status["unexpected_stops"] == rounds  # every crash counted on the count the row held then
    assert status["seed"] is True and status["seen"] == rounds - 1
    # one event per change, each carrying the status as it was committed
    assert _events(url, iid) - before == (writers - 1) * rounds + rounds


def test_one_event_per_change_and_none_without_a_change(tmp_path: Path, db_url: str) -> None:
    settings = _settings(tmp_path, db_url)
    iid = _instance(db_url)
    kind = instances.KINDS["vm"]
    with session_scope(db_url) as session:
        row = session.get(Instance, iid)
        assert row is not None
        assert kind.write_status(session, row, {"a": 1}, columns={"power_state": "shutdown"})
        assert not kind.write_status(session, row, {"a": 1}, columns={"power_state": "shutdown"})
        assert kind.write_status(session, row, lambda now: {"a": now["a"] + 1})
    with session_scope(db_url, readonly=True) as session:
        events = list(session.scalars(select(Event).where(Event.object_id == iid).order_by(Event.seq)))
    assert [(e.object["status"].get("a"), e.object["status"]["power_state"]) for e in events] == [
        (1, "shutdown"), (2, "shutdown")]
    assert settings.node_name == "node-a"


def test_agent_reports_the_generation_it_acted_on_not_a_newer_one(tmp_path: Path, sqlite_url: str) -> None:
    """A reboot bumps the spec while a pass that read the older spec is reporting
    "running": the report must not claim the reboot was seen (the task would finish
    before the guest rebooted)."""
    settings = _settings(tmp_path, sqlite_url)
    iid = _instance(sqlite_url, generation=1, observed_generation=1)
    _update(TaskContext("none", sqlite_url, {}), iid, spec={"reboots": 1})  # generation 2
    InstanceReconciler(settings, {}).report({iid: {"power_state": "running", "generation": 1}}, PassReport())
    row = _row(sqlite_url, iid)
    assert (row.generation, row.observed_generation, row.power_state) == (2, 1, "running")
    InstanceReconciler(settings, {}).report({iid: {"power_state": "running", "generation": 2, "reboots_done": 1}},
                                            PassReport())
    row = _row(sqlite_url, iid)
    assert (row.observed_generation, row.status["reboots_done"]) == (2, 1)
