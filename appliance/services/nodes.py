"""Nodes: registration with inventory, heartbeats, Ready/NotReady, cordon via spec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.migrate import code_schema
from appliance.db.models import Node
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, statuses
from appliance.services.principal import Principal
from appliance.services.resources import check_generation, iso, keyset, page, public, set_condition
from appliance.version import __version__

PHASES = ("Ready", "NotReady", "Fenced", "Maintenance")
# Phases the node's own agent does not end: the HA manager lifts Fenced (after a reboot),
# an administrator ends Maintenance (undrain).
HELD = ("Fenced", "Maintenance")


def node_public(node: Node) -> dict[str, Any]:
    claimed = {"cpu": round(node.cpu_claimed or 0.0, 3), "memory_bytes": node.memory_claimed or 0}
    return public(node, None, phase=node.phase, last_heartbeat=iso(node.heartbeat_at), claimed=claimed,
                  version={"code": node.code_version, "schema": node.schema_version})


def _emit(session: Session, node: Node, verb: str) -> None:
    session.flush()
    events.record(session, "node", verb, node_public(node), None)


def register(session: Session, name: str, inventory: dict[str, Any], allocatable: dict[str, Any]) -> bool:
    """Create or refresh a node from its agent; the node turns Ready. Returns True if new."""
    node = session.scalar(select(Node).where(Node.name == name))
    created = node is None
    if node is None:
        node = Node(name=name, spec={"schedulable": True, "labels": {}})
        session.add(node)

    def ready(row: Node) -> None:
        row.cpu_capacity = float(allocatable["cpu"]) * float(allocatable.get("cpu_ratio", 4.0))
        row.memory_capacity = int(allocatable["memory_bytes"])
        row.heartbeat_at = datetime.now(UTC)
        row.observed_generation = row.generation
        row.code_version, row.schema_version = __version__, code_schema()
        if row.phase not in HELD:
            row.phase = "Ready"
            set_condition(row, "Ready", True, "AgentRegistered", "the node agent registered and heartbeats")

    statuses.write(session, node, {"inventory": inventory, "allocatable": allocatable}, change=ready,
                   emit=_emit, verb="created" if created else "updated")
    return created


def heartbeat(session: Session, name: str) -> bool:
    """Record a heartbeat; returns False when the node is unknown (the agent re-registers)."""
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        return False
    statuses.lock(session, node)  # mark_lost may be turning it NotReady right now
    node.heartbeat_at = datetime.now(UTC)
    if node.phase not in ("Ready", *HELD):
        def resumed(row: Node) -> None:
            row.phase = "Ready"
            set_condition(row, "Ready", True, "HeartbeatResumed", "the node agent heartbeats again")

        statuses.write(session, node, change=resumed, emit=_emit)
    return True


def update_status(session: Session, name: str, **status: Any) -> None:
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        raise NotFound(f"there is no node named '{name}'")
    statuses.write(session, node, status, emit=_emit)


def mark_lost(session: Session, grace_seconds: float) -> list[str]:
    """Nodes silent for longer than the grace period turn NotReady."""
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    lost = []
    def silent(row: Node) -> None:
        if row.phase == "Ready" and row.heartbeat_at is not None and row.heartbeat_at < cutoff:  # still, locked
            row.phase = "NotReady"
            set_condition(row, "Ready", False, "HeartbeatTimeout",
                          f"no heartbeat since {iso(row.heartbeat_at)} (grace {grace_seconds:g} s)")

    for node in session.scalars(select(Node).where(Node.phase == "Ready", Node.heartbeat_at < cutoff)
                                .order_by(Node.id)):
        if statuses.write(session, node, change=silent, emit=_emit):
            lost.append(node.name)
    return lost


def _node(session: Session, name: str) -> Node:
    node = session.scalar(select(Node).where(Node.name == name))
    if node is None:
        raise NotFound(f"there is no node named '{name}': `cairn get nodes` lists them")
    return node


def get(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    principal.require_cluster("read")
    return node_public(_node(session, name))


def list_(session: Session, principal: Principal, limit: int, cursor: str | None,
          phase: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    principal.require_cluster("read")
    query = select(Node)
    if phase is not None:
        if phase not in PHASES:
            raise InvalidInput(f"phase must be one of {', '.join(PHASES)}")
        query = query.where(Node.phase == phase)
    rows = list(session.scalars(keyset(query, (Node.name,), cursor, limit)))
    rows, nxt = page(rows, limit, lambda n: (n.name,))
    return [node_public(n) for n in rows], nxt


def update_spec(session: Session, principal: Principal, name: str, changes: dict[str, Any],
                if_match: str | None) -> dict[str, Any]:
    """Change schedulable / labels; If-Match guards against lost updates."""
    principal.require_cluster("write")
    node = _node(session, name)
    check_generation(node, if_match)
    spec = {**(node.spec or {}), **changes}
    if spec != node.spec:
        node.spec = spec
        node.generation += 1
        _emit(session, node, "updated")
    return node_public(node)


def delete(session: Session, principal: Principal, name: str) -> None:
    principal.require_cluster("admin")
    node = _node(session, name)
    if node.phase == "Ready":
        raise Conflict(f"node '{name}' is Ready: stop its agent (or wait for NotReady) before removing it")
    data = node_public(node)
    session.delete(node)
    events.record(session, "node", "deleted", data, None)


def counts(session: Session) -> dict[str, int]:
    from sqlalchemy import func

    found = dict(session.execute(select(Node.phase, func.count()).group_by(Node.phase)).all())
    ready = int(found.get("Ready", 0))
    return {"total": int(sum(found.values())), "ready": ready, "not_ready": int(found.get("NotReady", 0))}


def heartbeat_ages(session: Session) -> list[tuple[str, str, float]]:
    """(name, phase, seconds since last heartbeat) for every node, for /metrics."""
    now = datetime.now(UTC)
    return [
        (name, phase, (now - hb).total_seconds() if hb else float("inf"))
        for name, phase, hb in session.execute(select(Node.name, Node.phase, Node.heartbeat_at))
    ]


def benchmark(session: Session, principal: Principal, name: str, seconds: float) -> dict[str, Any]:
    """Queue a benchmark on the node's own queue."""
    from appliance.services import tasks

    principal.require_cluster("write")
    node = _node(session, name)
    return tasks.create(session, "node.benchmark", {"node": name, "seconds": seconds},
                        queue=f"node.{name}", principal=principal, resource=("node", node.id, name),
                        max_attempts=1)


def refresh_inventory(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    from appliance.services import tasks

    principal.require_cluster("write")
    node = _node(session, name)
    return tasks.create(session, "node.inventory", {"node": name}, queue=f"node.{name}",
                        principal=principal, resource=("node", node.id, name))
