"""Placement with reservation claims. The scheduler picks from a snapshot; the claim
is a conditional UPDATE on the node row (``claimed + request <= capacity``), so two
concurrent placements can never overcommit a node, on SQLite or PostgreSQL. A lost
race just moves on to the next candidate."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from appliance.db.models import Claim, Node
from appliance.scheduler.placement import HostState, NoValidHost, NumaCell, Placement, Request, Scheduler, Strategy
from appliance.services.resources import rowcount

MAX_RACES = 20

# Every node carries this label with its own name (Kubernetes has kubernetes.io/hostname).
HOSTNAME_LABEL = "cairn.dev/hostname"


def host_states(session: Session) -> list[HostState]:
    """The scheduler's view of every node: capacity, claims, NUMA cells, groups."""
    per_cell: dict[tuple[str, int], tuple[int, int]] = {}
    groups: dict[str, Counter[str]] = {}
    for claim in session.scalars(select(Claim)):
        if claim.numa_cell is not None:
            cpus, mem = per_cell.get((claim.node_id, claim.numa_cell), (0, 0))
            per_cell[(claim.node_id, claim.numa_cell)] = (cpus + claim.cpus_pinned, mem + claim.memory_bytes)
        if claim.group_name:
            groups.setdefault(claim.node_id, Counter())[claim.group_name] += 1
    hosts = []
    for node in session.scalars(select(Node)):
        inventory = (node.status or {}).get("inventory", {})
        threads = int(inventory.get("threads", 0))
        cells = max(1, int(inventory.get("numa_nodes", 1)))
        numa = []
        for i in range(cells):
            used_cpus, used_mem = per_cell.get((node.id, i), (0, 0))
            numa.append(NumaCell(threads // cells, node.memory_capacity // cells, used_cpus, used_mem))
        host = HostState(
            name=node.name, cpus=threads, memory_bytes=node.memory_capacity,
            cpu_used=node.cpu_claimed, memory_used=node.memory_claimed,
            ready=node.phase == "Ready", schedulable=bool((node.spec or {}).get("schedulable", True)),
            # every node also carries its own name, so a selector can pin a workload to it
            labels={**(node.spec or {}).get("labels", {}), HOSTNAME_LABEL: node.name}, numa=numa,
            groups=groups.get(node.id, Counter()),
        )
        hosts.append(host)
    return hosts


def claim(session: Session, kind: str, workload_id: str, request: Request, *,
          strategy: Strategy = "spread", cpu_ratio: float = 4.0, only: str | None = None) -> Placement:
    """Choose a node (``only`` that one, for a migration) and reserve the request on it,
    in the caller's transaction."""
    def states() -> list[HostState]:
        return [h for h in host_states(session) if only is None or h.name == only]

    scheduler = Scheduler(states(), strategy, cpu_ratio)
    for _ in range(MAX_RACES):
        choice = scheduler.select(request)
        node = session.scalar(select(Node).where(Node.name == choice.host))
        if node is None:
            scheduler.hosts[choice.host].ready = False
            scheduler = Scheduler(list(scheduler.hosts.values()), strategy, cpu_ratio)
            continue
        won = rowcount(session.execute(
            update(Node)
            .where(Node.id == node.id, Node.phase == "Ready",
                   Node.cpu_claimed + choice.cpu_units <= Node.cpu_capacity,
                   Node.memory_claimed + choice.memory_bytes <= Node.memory_capacity)
            .values(cpu_claimed=Node.cpu_claimed + choice.cpu_units,
                    memory_claimed=Node.memory_claimed + choice.memory_bytes)
            .execution_options(synchronize_session=False)
        ))
        if won and _group_ok(session, node.id, request) and _numa_ok(session, node.id, choice, request):
            session.add(Claim(node_id=node.id, workload_kind=kind, workload_id=workload_id,
                              cpu_units=choice.cpu_units, memory_bytes=choice.memory_bytes,
                              numa_cell=choice.numa_cell, group_name=request.group,
                              cpus_pinned=int(-(-request.cpus // 1)) if choice.numa_cell is not None else 0))
            session.flush()
            return choice
        if won:  # capacity was there but a concurrent placement took the group / NUMA slot
            _undo(session, node.id, choice)
        # Someone else got there first: refresh our view and try the next candidate.
        scheduler = Scheduler(states(), strategy, cpu_ratio)
    raise NoValidHost(request, {"placement races lost (the cluster is very busy)": MAX_RACES},
                      len(scheduler.hosts))


def _undo(session: Session, node_id: str, choice: Placement) -> None:
    session.execute(
        update(Node).where(Node.id == node_id)
        .values(cpu_claimed=Node.cpu_claimed - choice.cpu_units,
                memory_claimed=Node.memory_claimed - choice.memory_bytes)
        .execution_options(synchronize_session=False)
    )


def _group_ok(session: Session, node_id: str, request: Request) -> bool:
    """Re-check anti-affinity after the node row is locked by our UPDATE."""
    if not request.group or request.group_policy != "anti-affinity":
        return True
    present = session.scalar(select(func.count()).select_from(Claim).where(
        Claim.node_id == node_id, Claim.group_name == request.group))
    return not present


def _numa_ok(session: Session, node_id: str, choice: Placement, request: Request) -> bool:
    if choice.numa_cell is None:
        return True
    node = session.get(Node, node_id)
    assert node is not None
    inventory = (node.status or {}).get("inventory", {})
    cells = max(1, int(inventory.get("numa_nodes", 1)))
    cell_cpus = int(inventory.get("threads", 0)) // cells
    pinned = session.scalar(select(func.coalesce(func.sum(Claim.cpus_pinned), 0)).where(
        Claim.node_id == node_id, Claim.numa_cell == choice.numa_cell)) or 0
    return int(pinned) + int(-(-request.cpus // 1)) <= cell_cpus


def release(session: Session, workload_id: str) -> bool:
    """Give a workload's reservation back (on delete, or before re-placing it)."""
    row = session.scalar(select(Claim).where(Claim.workload_id == workload_id))
    if row is None:
        return False
    session.execute(
        update(Node).where(Node.id == row.node_id)
        .values(cpu_claimed=Node.cpu_claimed - row.cpu_units,
                memory_claimed=Node.memory_claimed - row.memory_bytes)
        .execution_options(synchronize_session=False)
    )
    session.delete(row)
    return True
