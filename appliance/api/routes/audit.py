"""The audit log: every write to the API (cluster admins)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.schemas import AuditList, Limit
from appliance.services import audit

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=AuditList, openapi_extra=access("cluster:admin"))
def list_audit(session: DbSession, caller: Caller, settings: AppSettings, limit: Limit = 100,
               cursor: str | None = None, user: Annotated[str | None, Query(max_length=63)] = None,
               outcome: Literal["ok", "denied", "refused", "failed"] | None = None,
               since: Annotated[datetime | None, Query(description="ISO 8601 time")] = None) -> dict[str, Any]:
    """Newest first: who (user, via token / session / password), from where (source
    address), what (method, path, route), on which object, and the result (status,
    outcome, problem detail or task id). Kept ``retention_days`` days."""
    items, nxt = audit.list_(session, caller, limit, cursor, user, outcome, since)
    return {"items": items, "next_cursor": nxt, "retention_days": settings.audit_retention_days}
