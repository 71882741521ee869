"""A lost node is recorded once, however many HA managers see it: two managers overlap
when a slow fence outlasts the leader key's lease and another API takes the key. Before
the row lock, both queued a failover task for the same instance (seen in the HA bench:
one failed, one succeeded)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.models import Event, Instance, Node, Task
from appliance.services import ha, instances, nodes

from .test_instances_service import INV, admin, world  # noqa: F401 - the fixture


def lose_n2_with_an_ha_vm(url: str) -> ha.LostNode:
    with session_scope(url) as session:
        nodes.register(session, "n2", INV, allocatable(INV))
        instances.create(session, admin(session), "vm", "default", "web",
                         {"cpu": 1, "memory": "256MiB", "image": "tiny", "ha": True})
    with session_scope(url) as session:
        n2 = session.scalar(select(Node).where(Node.name == "n2"))
        row = session.scalar(select(Instance).where(Instance.name == "web"))
        assert n2 is not None and row is not None
        row.node_id, row.vm_state, row.task_state = n2.id, "active", None
        ha.observe(session, {"n1": {"boot_id": "b1", "address": "10.0.0.1"},
                             "n2": {"boot_id": "b2", "address": "10.0.0.2"}})
    with session_scope(url, readonly=True) as session:
        (item,) = ha.lost(session, {"n1": {"boot_id": "b1"}})  # n2's lease is gone
    assert item.name == "n2" and len(item.ha) == 1
    return item


@pytest.mark.functional
def test_two_managers_recording_one_loss_queue_one_failover(world: Any) -> None:  # noqa: F811
    _, url = world
    item = lose_n2_with_an_ha_vm(url)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def manager() -> None:
        try:
            start.wait()
            with session_scope(url) as session:
                results.append(ha.record_lost(session, item, True, {"blocklisted": "10.0.0.2/32"}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(len(r) for r in results) == [0, 1], results
    with session_scope(url, readonly=True) as session:
        failovers = session.scalars(select(Task).where(Task.name == "instance.failover")).all()
        assert len(failovers) == 1
        n2 = session.scalar(select(Node).where(Node.name == "n2"))
        assert n2 is not None and n2.phase == "Fenced"
        # and a later pass finds nothing left to do for this loss
        assert ha.lost(session, {"n1": {"boot_id": "b1"}}) == []
    with session_scope(url) as session:  # a manager that still had the old list records nothing
        assert ha.record_lost(session, item, True) == []


@pytest.mark.functional
def test_the_node_events_of_a_loss_carry_the_whole_node(world: Any) -> None:  # noqa: F811
    """The console merges every ``node`` event into its node rows: a fenced event that
    carried only a name and a reason left a row without a status, and the Cluster page
    stopped rendering (seen in Chromium on the lab: the failover never appeared)."""
    _, url = world
    item = lose_n2_with_an_ha_vm(url)
    with session_scope(url) as session:
        (task_id,) = ha.record_lost(session, item, True)
    with session_scope(url) as session:
        ha.unfenced(session, "n2")
    with session_scope(url, readonly=True) as session:
        facts = {e.verb: e.object for e in session.scalars(select(Event).where(Event.kind == "node"))
                 if e.verb in ("fenced", "unfenced")}
        public = set(nodes.node_public(session.scalars(select(Node).where(Node.name == "n2")).one()))
    assert public <= set(facts["fenced"]) and public <= set(facts["unfenced"]), facts
    assert facts["fenced"]["status"]["phase"] == "Fenced" and facts["fenced"]["failover_tasks"] == [task_id]
    assert "reason" in facts["fenced"] and facts["unfenced"]["status"]["phase"] == "NotReady"
