"""Node maintenance: drain (VMs live-migrate, containers restart elsewhere, the node turns
``Maintenance`` and takes no new work) and undrain.

A drain first plans every move with the scheduler inside a savepoint that is rolled
back: if any instance fits on no other node, the drain is refused with the reason and
nothing changes. Then the node is marked and a ``node.drain`` task moves the instances
one by one, with progress."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.models import Instance, Node
from appliance.errors import Conflict, NotFound
from appliance.scheduler.placement import NoValidHost
from appliance.services import instances, nodes, placement, statuses, tasks
from appliance.services.principal import Principal
from appliance.services.resources import set_condition


def _node(session: Session, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        raise NotFound(f"there is no node named '{name}': `cairn get nodes` lists them")
    return node


def movable(session: Session, node: Node) -> list[Instance]:
    return [i for i in session.scalars(select(Instance).where(Instance.node_id == node.id).order_by(Instance.name))
            if (i.spec or {}).get("power") != "deleted"]


def plan(session: Session, node: Node) -> dict[str, str]:
    """Where each instance of ``node`` would go (instance id -> node name), found by the
    scheduler with the node cordoned; raises Conflict naming what fits nowhere. Nothing of
    it stays (a savepoint rolled back)."""
    out: dict[str, str] = {}
    nested = session.begin_nested()
    try:
        node.spec = {**(node.spec or {}), "schedulable": False}
        session.flush()
        for inst in movable(session, node):
            placement.release(session, inst.id)
            req = instances.placement_request(session, inst, pinned=False)
            try:
                choice = placement.claim(session, inst.kind, inst.id, req)
            except NoValidHost as exc:
                raise Conflict(f"cannot drain {node.name}: {inst.kind} '{inst.name}' ({req.cpus:g} vCPU, "
                               f"{req.memory_bytes >> 20} MiB) fits on no other node ({exc}); nothing was changed")
            out[inst.id] = choice.host
    finally:
        nested.rollback()
    session.refresh(node)
    return out


def drain(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    principal.require_cluster("write")
    node = _node(session, name)
    if node.phase == "Maintenance":
        raise Conflict(f"node '{name}' is already in maintenance (`cairn node undrain {name}` ends it)")
    if node.phase != "Ready":
        raise Conflict(f"node '{name}' is {node.phase}: only a Ready node can be drained")
    busy = [i.name for i in movable(session, node) if i.task_state]
    if busy:
        raise Conflict(f"cannot drain {name}: {', '.join(busy)} busy with another task; retry when it ends")
    targets = plan(session, node)

    def enter(row: Node) -> None:
        row.spec = {**(row.spec or {}), "schedulable": False, "maintenance": True}
        row.generation += 1
        row.phase = "Maintenance"
        set_condition(row, "Ready", False, "Maintenance", "drained for maintenance")

    statuses.write(session, node, change=enter, emit=nodes._emit)
    return tasks.create(session, "node.drain", {"node": name, "plan": targets}, queue="cluster",
                        principal=principal, resource=("node", node.id, name), max_attempts=1)


def undrain(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    principal.require_cluster("write")
    node = _node(session, name)
    if node.phase != "Maintenance" and not (node.spec or {}).get("maintenance"):
        raise Conflict(f"node '{name}' is not in maintenance")

    def leave(row: Node) -> None:
        row.spec = {**(row.spec or {}), "schedulable": True, "maintenance": False}
        row.generation += 1
        row.phase = "NotReady"  # its next heartbeat makes it Ready
        set_condition(row, "Ready", False, "Undrained", "back from maintenance; waiting for a heartbeat")

    statuses.write(session, node, change=leave, emit=nodes._emit)
    return nodes.node_public(node)
