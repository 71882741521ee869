"""The audit log: every write to the API — who, from where, what, on which object,
and the result — appended in a transaction of its own (so refused and failed writes
are kept too), before the caller sees the answer. Rows are never changed (a trigger
refuses UPDATE on both databases) and only pruned by age (``audit_retention_days``).
Cluster admins read it (``GET /audit``, ``cairn audit list``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from appliance.db.engine import session_scope
from appliance.db.models import AuditRecord
from appliance.services.principal import Principal
from appliance.services.resources import iso, keyset, page, rowcount


@dataclass
class Entry:
    """What the API saw of one write."""

    method: str
    path: str
    action: str
    status: int
    user: str | None = None
    via: str | None = None
    source: str | None = None
    object_kind: str | None = None
    object_name: str | None = None
    project: str | None = None
    detail: str | None = None

    @property
    def outcome(self) -> str:
        if self.status < 400:
            return "ok"
        if self.status in (401, 403, 429):
            return "denied"
        return "refused" if self.status < 500 else "failed"


def append(url: str, entry: Entry) -> None:
    """Write one record in its own short transaction."""
    with session_scope(url) as session:
        session.add(AuditRecord(
            user_name=_cut(entry.user, 63), via=entry.via, source=_cut(entry.source, 64), method=entry.method[:8],
            path=entry.path[:512], action=entry.action[:128], object_kind=_cut(entry.object_kind, 32),
            object_name=_cut(entry.object_name, 128), project=_cut(entry.project, 63), status=entry.status,
            outcome=entry.outcome, detail=_cut(entry.detail, 2000)))


def _cut(value: str | None, size: int) -> str | None:
    return value[:size] if value is not None else None


def public(row: AuditRecord) -> dict[str, Any]:
    return {"seq": row.seq, "time": iso(row.time), "user": row.user_name, "via": row.via, "source": row.source,
            "method": row.method, "path": row.path, "action": row.action,
            "object": {"kind": row.object_kind, "name": row.object_name, "project": row.project},
            "status": row.status, "outcome": row.outcome, "detail": row.detail}


def list_(session: Session, principal: Principal, limit: int, cursor: str | None, user: str | None = None,
          outcome: str | None = None, since: datetime | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first (cluster admins only)."""
    principal.require_cluster("admin")
    query = select(AuditRecord)
    if user is not None:
        query = query.where(AuditRecord.user_name == user)
    if outcome is not None:
        query = query.where(AuditRecord.outcome == outcome)
    if since is not None:
        query = query.where(AuditRecord.time >= since)
    rows = list(session.scalars(keyset(query, (AuditRecord.seq,), cursor, limit, descending=True)))
    rows, nxt = page(rows, limit, lambda r: (r.seq,))
    return [public(r) for r in rows], nxt


def prune(session: Session, retention_days: float) -> int:
    """Drop records older than the retention period (the only deletion there is)."""
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    return rowcount(session.execute(delete(AuditRecord).where(AuditRecord.time < cutoff)))
