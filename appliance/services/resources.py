"""Shared resource-model mechanics: public JSON shape, conditions, generations, cursors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_

from appliance.db.models import ResourceMixin
from appliance.errors import InvalidInput, StaleGeneration


def rowcount(result: Any) -> int:
    """Rows touched by an UPDATE / DELETE (typed access to CursorResult.rowcount)."""
    return int(getattr(result, "rowcount", 0) or 0)


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z") if dt else None


def public(row: ResourceMixin, project: str | None = None, **status_extra: Any) -> dict[str, Any]:
    """The resource model's JSON shape for any row."""
    return {
        "id": row.id,
        "name": row.name,
        "project": project,
        "spec": row.spec or {},
        "status": {**(row.status or {}), **status_extra},
        "generation": row.generation,
        "observed_generation": row.observed_generation,
        "conditions": row.conditions or [],
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def set_condition(row: ResourceMixin, type_: str, status: bool, reason: str, message: str) -> bool:
    """Set one condition; returns True when it changed (transition time only moves then)."""
    now = iso(datetime.now(UTC))
    value = "True" if status else "False"
    conditions = [dict(c) for c in (row.conditions or [])]
    for cond in conditions:
        if cond["type"] == type_:
            if cond["status"] == value and cond["reason"] == reason:
                return False
            cond.update(status=value, reason=reason, message=message, last_transition_time=now)
            break
    else:
        conditions.append(
            {"type": type_, "status": value, "reason": reason, "message": message,
             "last_transition_time": now}
        )
    row.conditions = conditions
    return True


def check_generation(row: ResourceMixin, if_match: str | None) -> None:
    """If-Match carries the generation the caller last saw; a stale one is a 409."""
    if if_match is None:
        return
    wanted = if_match.strip().strip('"').removeprefix("W/").strip('"')
    if not wanted.isdigit():
        raise InvalidInput(f"If-Match must be a generation number, got {if_match!r}")
    if int(wanted) != row.generation:
        raise StaleGeneration(
            f"{row.name} is at generation {row.generation}, not {wanted}: re-read it and retry"
        )


def encode_cursor(*values: Any) -> str:
    raw = json.dumps(list(values), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, json.JSONDecodeError):
        raise InvalidInput("cursor is not one this server issued: pass next_cursor unchanged")
    if not isinstance(values, list) or len(values) != arity:
        raise InvalidInput("cursor is not one this server issued: pass next_cursor unchanged")
    return values


def keyset(
    query: Any, columns: tuple[Any, ...], cursor: str | None, limit: int, descending: bool = False
) -> Any:
    """Keyset pagination over ``columns`` (last one unique); fetch limit+1 to know if more follow."""
    if cursor:
        values = decode_cursor(cursor, len(columns))
        values = [
            datetime.fromisoformat(v) if isinstance(v, str) and _looks_like_time(col) else v
            for v, col in zip(values, columns, strict=True)
        ]
        query = query.where(_expand(columns, values, descending))
    order = [c.desc() for c in columns] if descending else list(columns)
    return query.order_by(*order).limit(limit + 1)


def _looks_like_time(col: Any) -> bool:
    return str(getattr(col, "key", "")).endswith("_at")


def _expand(columns: tuple[Any, ...], values: list[Any], descending: bool) -> Any:
    clauses = []
    for i in range(len(columns)):
        eq = [columns[j] == values[j] for j in range(i)]
        cmp = columns[i] < values[i] if descending else columns[i] > values[i]
        clauses.append(and_(*eq, cmp))
    return or_(*clauses)


def page(rows: list[Any], limit: int, key: Any) -> tuple[list[Any], str | None]:
    """Cut the limit+1 rows to a page and make the cursor for the next one."""
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        return rows, encode_cursor(*[iso(v) if isinstance(v, datetime) else v for v in key(last)])
    return rows, None
