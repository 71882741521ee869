"""Storage pools: where volumes live (DESIGN.md, Storage). A pool is written by one
node's storage daemon (``cairn-storaged``); its agent attaches it and reports stats.
The first node to reconcile creates the ``default`` dedup pool on its data disk (the
embedded appliance's storage); ``cairn up --ceph`` adds a replicated ``ceph`` pool, and
admins add more with ``POST /api/v1/pools``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.db.models import Node, StoragePool, Volume
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, statuses
from appliance.services.principal import Principal
from appliance.services.resources import keyset, page, public

BACKENDS = ("local", "rados")


def pool_public(session: Session, row: StoragePool) -> dict[str, Any]:
    node = session.get(Node, row.node_id) if row.node_id else None
    return public(row, None, node=node.name if node else None)


def _emit(session: Session, row: StoragePool, verb: str) -> dict[str, Any]:
    session.flush()
    data = pool_public(session, row)
    events.record(session, "storage-pool", verb, data, None)
    return data


def row(session: Session, name: str) -> StoragePool:
    pool = session.scalar(select(StoragePool).where(StoragePool.name == name))
    if pool is None:
        raise NotFound(f"there is no storage pool '{name}': `cairn get pools` lists them")
    return pool


def get(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    return pool_public(session, row(session, name))


def list_(session: Session, principal: Principal, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]],
                                                                                          str | None]:
    rows = list(session.scalars(keyset(select(StoragePool), (StoragePool.name, StoragePool.id), cursor, limit)))
    rows, nxt = page(rows, limit, lambda r: (r.name, r.id))
    return [pool_public(session, r) for r in rows], nxt


def _free_port(session: Session, node_id: str, base: int) -> int | None:
    if not base:
        return None
    used = {int((p.spec or {}).get("nbd_port") or 0) for p in session.scalars(
        select(StoragePool).where(StoragePool.node_id == node_id))}
    port = base
    while port in used:
        port += 1
    return port


def create(session: Session, principal: Principal | None, name: str, node: str, backend: str,
           url: str, chunk_size: int = 65536, replication: int = 1, nbd_port_base: int = 10809) -> dict[str, Any]:
    """A pool served by ``node``. ``local``: ``url`` is a directory; ``rados``: a
    ``rados://<pool>/<namespace>?conf=...`` URL of a Ceph pool."""
    if principal is not None:
        principal.require_cluster("admin")
    if backend not in BACKENDS:
        raise InvalidInput(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if chunk_size < 4096 or chunk_size > (1 << 22) or chunk_size & (chunk_size - 1):
        raise InvalidInput(f"chunk_size must be a power of two from 4096 to 4194304, not {chunk_size}")
    if backend == "local":
        if not Path(url).is_absolute():
            raise InvalidInput(f"a local pool needs an absolute directory path, not {url!r}")
        url = f"local://{url}"
    elif not url.startswith("rados://") or "conf=" not in url:
        raise InvalidInput("a rados pool needs a URL like rados://<ceph pool>/<namespace>?conf=/etc/ceph/ceph.conf")
    host = session.scalar(select(Node).where(Node.name == node))
    if host is None:
        raise NotFound(f"there is no node named '{node}': `cairn get nodes` lists them")
    if session.scalar(select(StoragePool.id).where(StoragePool.name == name)):
        raise Conflict(f"a storage pool named '{name}' already exists: pick another name")
    spec = {"backend": backend, "url": url, "chunk_size": chunk_size, "replication": replication,
            "nbd_port": _free_port(session, host.id, nbd_port_base)}
    pool = StoragePool(name=name, node_id=host.id, spec=spec, status={"phase": "Pending"})
    session.add(pool)
    return _emit(session, pool, "created")


def delete(session: Session, principal: Principal, name: str) -> None:
    principal.require_cluster("admin")
    pool = row(session, name)
    used = session.scalar(select(func.count()).select_from(Volume).where(Volume.pool_id == pool.id))
    if used:
        raise Conflict(f"storage pool '{name}' still holds {used} volume(s): delete them first")
    data = pool_public(session, pool)
    session.delete(pool)
    events.record(session, "storage-pool", "deleted", data, None)


def set_status(session: Session, pool: StoragePool, **status: Any) -> bool:
    """Agent reports (phase, stats); an event only when something changed."""
    return statuses.write(session, pool, status, emit=_emit)


def node_pools(session: Session, node: str) -> list[StoragePool]:
    host = session.scalar(select(Node).where(Node.name == node))
    if host is None:
        return []
    return list(session.scalars(select(StoragePool).where(StoragePool.node_id == host.id)))


def space_all(session: Session) -> list[tuple[str, dict[str, Any]]]:
    """Every pool's name and space figures as its node last reported them (``/metrics``):
    logical / stored bytes, dedup and compression ratios, capacity when known."""
    out = []
    for name, status in session.execute(select(StoragePool.name, StoragePool.status)):
        stats = dict((status or {}).get("stats") or {})
        capacity = (status or {}).get("capacity") or {}
        if capacity.get("total_bytes") is not None:
            stats["capacity_bytes"] = capacity["total_bytes"]
            stats["free_bytes"] = capacity.get("free_bytes")
        out.append((name, stats))
    return out
