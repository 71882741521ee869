"""The node agent's passes and the task machinery, one step at a time (cephadm-style:
tests drive single passes), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import controller
from appliance.agent.agent import Agent, PassReport
from appliance.agent.inventory import collect
from appliance.db.engine import session_scope
from appliance.db.models import Node, Task
from appliance.processes import prepare
from appliance.services import tasks
from appliance.tasks import runner

from .conftest import make_settings

pytestmark = pytest.mark.functional


@pytest.fixture
def settings(tmp_path: Path, db_url: str, sent: list[Any]):  # type: ignore[no-untyped-def]
    s = make_settings(tmp_path, db_url, node_grace_seconds=0.3, task_grace_seconds=0.3)
    prepare(s)
    return s


def node_row(settings: Any, name: str = "node-a") -> Node:
    with session_scope(settings.resolved_database_url) as session:
        from sqlalchemy import select

        node = session.scalar(select(Node).where(Node.name == name))
        assert node is not None
        return node


def test_inventory_describes_this_machine() -> None:
    inv = collect()
    assert inv["cores"] >= 1 and inv["threads"] >= inv["cores"]
    assert inv["memory_bytes"] > 1 << 28 and inv["numa_nodes"] >= 1
    assert inv["cpu_model"] and isinstance(inv["disks"], list) and isinstance(inv["nics"], list)
    expected = "qemu" if Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists() else "kvm"
    assert inv["virt_type"] == expected and inv["virt_reason"]


def test_first_pass_registers_the_node_with_inventory(settings: Any) -> None:
    report = Agent(settings).run_once()
    assert report.registered
    node = node_row(settings)
    assert node.phase == "Ready"
    assert set(node.status["inventory"]) >= {"cpu_model", "cores", "numa_nodes", "memory_bytes", "disks",
                                             "nics", "virt_type"}
    assert node.status["allocatable"]["cpu"] == node.status["inventory"]["threads"]


def test_silent_node_turns_not_ready_after_grace_and_recovers(settings: Any) -> None:
    agent = Agent(settings)
    agent.run_once()
    assert controller.run_once(settings)["nodes_not_ready"] == []
    time.sleep(0.5)
    assert controller.run_once(settings)["nodes_not_ready"] == ["node-a"]
    node = node_row(settings)
    assert node.phase == "NotReady" and node.conditions[0]["reason"] == "HeartbeatTimeout"
    agent.run_once()
    assert node_row(settings).phase == "Ready"


def test_a_failing_reconciler_does_not_stop_heartbeats(settings: Any) -> None:
    agent = Agent(settings)
    calls: list[str] = []

    def broken(_: Agent, report: PassReport) -> None:
        raise RuntimeError("disk on fire")

    def healthy(_: Agent, report: PassReport) -> None:
        calls.append("ran")
        report.actions.append("nothing to do")

    agent.register_reconciler("broken", broken)
    agent.register_reconciler("healthy", healthy)
    agent.run_once()
    before = node_row(settings).heartbeat_at
    time.sleep(0.05)
    report = agent.run_once()
    assert report.errors == ["broken: disk on fire"] and report.actions == ["nothing to do"]
    assert calls == ["ran", "ran"] and node_row(settings).heartbeat_at > before


def test_a_pass_longer_than_the_grace_keeps_the_serving_node_ready(settings: Any) -> None:
    """A guest given 30 s to shut down holds its pass that long; the node's heartbeat
    is not part of the pass under serve(), so the node stays schedulable meanwhile."""
    settings = settings.model_copy(update={"heartbeat_interval": 0.05})
    agent = Agent(settings)
    inside, release = threading.Event(), threading.Event()

    def slow(_: Agent, report: PassReport) -> None:
        inside.set()
        release.wait(10)

    agent.register_reconciler("slow", slow)
    server = threading.Thread(target=agent.serve, daemon=True)
    server.start()
    try:
        assert inside.wait(10)
        for _ in range(5):  # 5 × 0.3 s: far past the 0.3 s grace, inside one pass
            time.sleep(0.3)
            assert controller.run_once(settings)["nodes_not_ready"] == []
        assert node_row(settings).phase == "Ready"
    finally:
        agent.stop()
        release.set()
        server.join(10)
    assert not server.is_alive()


def test_agent_re_registers_a_deleted_node(settings: Any) -> None:
    agent = Agent(settings)
    agent.run_once()
    with session_scope(settings.resolved_database_url) as session:
        session.delete(session.get(Node, node_row(settings).id))
    assert agent.run_once().registered
    assert node_row(settings).phase == "Ready"


def _task(settings: Any, **kw: Any) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return str(tasks.create(session, kw.pop("name", "node.inventory"), {"node": "node-a"},
                                queue="node.node-a", principal=None, **kw)["id"])


def _age(settings: Any, task_id: str, seconds: float) -> None:
    with session_scope(settings.resolved_database_url) as session:
        task = session.get(Task, task_id)
        assert task is not None
        task.heartbeat_at = datetime.now(UTC) - timedelta(seconds=seconds)


def test_claim_is_a_compare_and_swap(settings: Any) -> None:
    tid = _task(settings)
    with session_scope(settings.resolved_database_url) as session:
        assert tasks.claim(session, tid, "w1") is not None
    with session_scope(settings.resolved_database_url) as session:
        assert tasks.claim(session, tid, "w2") is None


def test_lost_worker_task_is_retried_then_failed(settings: Any, sent: list[Any]) -> None:
    tid = _task(settings, max_attempts=2)
    url = settings.resolved_database_url
    for attempt in (1, 2):
        with session_scope(url) as session:
            assert tasks.claim(session, tid, "doomed-worker") is not None
        _age(settings, tid, 5)
        assert controller.run_once(settings)["tasks_reaped"] == [tid]
        with session_scope(url) as session:
            task = session.get(Task, tid)
            assert task is not None and task.attempts == attempt
            assert task.state == ("pending" if attempt == 1 else "failed")
            assert "stopped answering" in (task.error or "")
    assert [m[0] for m in sent].count(tid) == 2  # created + one retry


def test_transient_errors_retry_with_backoff(settings: Any, sent: list[Any], monkeypatch: Any) -> None:
    monkeypatch.setattr("appliance.tasks.runner.get_settings", lambda: settings)
    calls: list[int] = []

    def flaky(ctx: runner.TaskContext, params: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise runner.TransientError("the broker hiccuped")
        ctx.progress(50, "half way")
        return {"ok": True}

    monkeypatch.setitem(runner.HANDLERS, "test.flaky", flaky)
    tid = _task(settings, name="test.flaky")
    assert runner.run_task(tid) == "failed"
    assert sent[-1] == (tid, "node.node-a", 2.0)  # re-sent with backoff
    assert runner.run_task(tid) == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        task = session.get(Task, tid)
        assert task is not None and task.state == "succeeded" and task.result == {"ok": True}
        assert task.attempts == 2 and task.percent == 100


def test_cancel_of_a_pending_task_is_immediate(settings: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("appliance.tasks.runner.get_settings", lambda: settings)
    tid = _task(settings)
    with session_scope(settings.resolved_database_url) as session:
        from appliance.services.auth import _user, principal_for

        admin = principal_for(session, _user(session, "admin"), "token")
        assert tasks.cancel(session, admin, tid)["state"] == "cancelled"
    assert runner.run_task(tid) == "skipped"


def test_events_of_a_watched_kind_wake_the_loop(settings: Any) -> None:
    """cephadm-style serve(): a desired-state change wakes the agent before its timer."""
    import threading

    settings.heartbeat_interval = 30.0  # the timer alone would not run a second pass
    agent = Agent(settings)
    passes: list[float] = []
    agent.register_reconciler("counter", lambda a, r: passes.append(time.monotonic()), kinds=("project",))
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(passes) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(passes) == 1
        with session_scope(settings.resolved_database_url) as session:
            from appliance.services.auth import _user, create_project, principal_for

            create_project(session, principal_for(session, _user(session, "admin"), "token"), "wake-up", {})
        while len(passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(passes) == 2, "the project event did not wake the agent"
        assert passes[1] - passes[0] < 5
    finally:
        agent.stop()
        thread.join(10)
    assert not thread.is_alive()
