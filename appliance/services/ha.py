"""High availability in the database: which nodes the cluster has lost, fencing records,
and what happens to the instances of a lost node (DESIGN.md, HA with fencing).

The HA manager (:mod:`appliance.hamanager`, one per cluster on an etcd leader key) calls
these with the set of nodes whose etcd lease is alive. A node is *lost* when its lease
is gone after it held one (its watchdog has reset it by then). A lost node that ran HA
instances is fenced (its storage first, by the manager) and recorded ``Fenced``; its HA
instances get a failover task each, the others turn ``error`` with the reason. A fenced
node is let back (``unfence``) only once it runs again with a new boot id."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.models import Instance, Node
from appliance.services import events, instances, nodes, statuses, tasks
from appliance.services.resources import set_condition

ACTIVE_POWER = ("running", "paused")


@dataclass
class LostNode:
    name: str
    address: str
    boot_id: str
    ha: list[str] = field(default_factory=list)  # instance ids to restart elsewhere
    other: list[str] = field(default_factory=list)  # instance ids that go to error


def _ha_state(node: Node) -> dict[str, Any]:
    return dict((node.status or {}).get("ha") or {})


def observe(session: Session, alive: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Record the boot id each live node holds its lease with; returns (name, address) of
    fenced nodes that came back rebooted (new boot id): the manager lifts their fence."""
    back = []
    for node in session.scalars(select(Node).where(Node.name.in_(list(alive))).order_by(Node.id)):
        boot_id = str(alive[node.name].get("boot_id", ""))
        ha = _ha_state(node)
        if node.phase == "Fenced":
            if boot_id and boot_id != ha.get("fenced_boot_id"):
                back.append((node.name, str(alive[node.name].get("address", ha.get("address", "")))))
            continue
        if ha.get("boot_id") != boot_id or "lost_boot_id" in ha:
            fresh = {"boot_id": boot_id, "address": str(alive[node.name].get("address", "")),
                     "alive_since": datetime.now(UTC).isoformat()}

            def seen(cur: dict[str, Any], fresh: dict[str, Any] = fresh) -> dict[str, Any]:
                old = {k: v for k, v in (cur.get("ha") or {}).items() if not k.startswith("lost_")}
                return {"ha": {**old, **fresh}}

            statuses.write(session, node, seen, emit=nodes._emit)
            if "lost_boot_id" in ha:
                _back_from_lost(session, node)
    return back


def _back_from_lost(session: Session, node: Node) -> None:
    """A lost node that was not fenced (no HA instances) is back without a reboot: its
    instances, put in error when it was lost, are what its agent reports again."""
    for row in session.scalars(select(Instance).where(Instance.node_id == node.id).order_by(Instance.id)):
        if (row.status or {}).get("lost_node") == node.name:
            instances.KINDS[row.kind].write_status(session, row, {"error": None, "lost_node": None},
                                                   columns={"vm_state": "active"})


def lost(session: Session, alive: dict[str, dict[str, Any]]) -> list[LostNode]:
    """Nodes that held a lease and lost it, not fenced or handled yet, with their instances."""
    out = []
    for node in session.scalars(select(Node).order_by(Node.name)):
        ha = _ha_state(node)
        if node.name in alive or not ha.get("boot_id") or node.phase == "Fenced" or ha.get("lost_boot_id") == ha[
                "boot_id"]:
            continue
        item = LostNode(node.name, str(ha.get("address", "")), str(ha["boot_id"]))
        for inst in session.scalars(select(Instance).where(Instance.node_id == node.id).order_by(Instance.id)):
            if (inst.spec or {}).get("power") == "deleted":
                continue
            (item.ha if (inst.spec or {}).get("ha") else item.other).append(inst.id)
        out.append(item)
    return out


def record_lost(session: Session, item: LostNode, fenced: bool, report: dict[str, Any] | None = None) -> list[str]:
    """The node is lost (and fenced if it ran HA instances): record it, put its non-HA
    instances in error, queue a failover task for each HA instance. Returns the task ids
    (none if this loss of the node is recorded already)."""
    # the row lock makes this once per loss even if two managers overlap (a leader change
    # in the middle of a slow fence): the second one finds the loss recorded and does nothing
    node = session.scalar(select(Node).where(Node.name == item.name).with_for_update())
    if node is None or _ha_state(node).get("lost_boot_id") == item.boot_id or node.phase == "Fenced":
        return []
    now = datetime.now(UTC).isoformat()

    def mark(row: Node) -> None:
        if fenced:
            row.phase = "Fenced"
            set_condition(row, "Ready", False, "Fenced", f"lease lost; storage fenced at {now}; "
                          "it rejoins after a reboot")
        elif row.phase == "Ready":
            row.phase = "NotReady"
            set_condition(row, "Ready", False, "LeaseLost", f"its cluster lease expired at {now}")

    statuses.write(session, node, lambda cur: {"ha": {
        **(cur.get("ha") or {}), "lost_boot_id": item.boot_id, "lost_at": now,
        **({"fenced_boot_id": item.boot_id, "fenced_at": now, "fence": report or {}} if fenced else {})}},
        change=mark, emit=nodes._emit)
    reason = f"node {item.name} was lost at {now} (its cluster lease expired)"
    for iid in item.other:
        row = session.get(Instance, iid)
        if row is not None:
            instances.KINDS[row.kind].write_status(session, row, {"error": reason, "lost_node": item.name},
                                                   columns={"vm_state": "error", "power_state": "nostate"})
    created = []
    for iid in item.ha:
        row = session.get(Instance, iid)
        if row is None:
            continue
        instances.KINDS[row.kind].write_status(session, row, {"failover": {"from": item.name, "at": now}},
                                               columns={"task_state": "failing-over"})
        task = tasks.create(session, "instance.failover", {"instance_id": iid, "from": item.name, "reason": reason},
                            queue="cluster", principal=None, project_id=row.project_id,
                            resource=(row.kind, row.id, row.name), max_attempts=3)
        created.append(task["id"])
    # a node event carries the whole node (lists in the console merge node events into their
    # rows), and what happened besides
    session.flush()
    events.record(session, "node", "fenced" if fenced else "lost",
                  {**nodes.node_public(node), "reason": reason, "ha_instances": len(item.ha),
                   "failover_tasks": created}, None)
    return created


def unfenced(session: Session, name: str) -> None:
    """The fenced node rebooted and its fence was lifted: it may be Ready again."""
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        return

    def back(row: Node) -> None:
        row.phase = "NotReady"  # its next heartbeat makes it Ready
        set_condition(row, "Ready", False, "Unfenced", "it rebooted; the fence was lifted")

    statuses.write(session, node, lambda cur: {"ha": {
        k: v for k, v in (cur.get("ha") or {}).items() if k not in ("fenced_boot_id", "fenced_at", "fence")}},
        change=back, emit=nodes._emit)
    session.flush()
    events.record(session, "node", "unfenced", nodes.node_public(node), None)
