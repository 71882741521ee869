"""The change log behind /api/v1/events. Services record an event in the same
transaction as the change, so a committed change always has its event."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from appliance.db.models import Event
from appliance.services import redact
from appliance.services.principal import Principal
from appliance.services.resources import iso, rowcount


def record(session: Session, kind: str, verb: str, obj: dict[str, Any], project_id: str | None) -> None:
    session.add(
        Event(kind=kind, verb=verb, object_id=obj["id"], name=obj.get("name") or "",
              project_id=project_id, object=obj)
    )


def public(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "verb": event.verb,
        "id": event.object_id,
        "name": event.name,
        "project": event.object.get("project"),
        "time": iso(event.created_at),
        "object": event.object,
    }


def latest_seq(session: Session) -> int:
    return session.scalar(select(Event.seq).order_by(Event.seq.desc()).limit(1)) or 0


def since(
    session: Session, principal: Principal, after: int, limit: int = 500
) -> tuple[list[dict[str, Any]], int]:
    """Events after ``after`` that the principal may see, and the last seq scanned."""
    query = select(Event).where(Event.seq > after).order_by(Event.seq).limit(limit)
    visible = principal.readable_project_ids()
    out = []
    last = after
    for event in session.scalars(query):
        last = event.seq
        if event.project_id is None:
            if not principal.can_cluster("read") and event.kind not in ("project",):
                continue
        elif visible is not None and event.project_id not in visible:
            continue
        data = public(event)
        if not redact.may_see(principal, event.project_id):
            data["object"] = redact.event_object(event.kind, data["object"])
        out.append(data)
    return out, last


def prune(session: Session, keep: int = 20000) -> int:
    """Drop all but the newest ``keep`` events."""
    cutoff = latest_seq(session) - keep
    if cutoff <= 0:
        return 0
    return rowcount(session.execute(delete(Event).where(Event.seq <= cutoff)))


def poll(url: str, principal: Principal, after: int) -> tuple[list[dict[str, Any]], int]:
    """One short transaction of ``since`` (the SSE stream calls it from a thread)."""
    from appliance.db.engine import session_scope

    with session_scope(url, readonly=True) as session:
        return since(session, principal, after)


def kinds_since(session: Session, after: int) -> tuple[set[str], int]:
    """The kinds changed after ``after`` and the newest seq (for agents' wake-ups)."""
    rows = session.execute(select(Event.seq, Event.kind).where(Event.seq > after).order_by(Event.seq)).all()
    return {kind for _, kind in rows}, (rows[-1][0] if rows else after)
