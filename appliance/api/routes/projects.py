"""Projects (tenants) and their members."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from appliance.api.deps import Caller, DbSession, IfMatch, access
from appliance.api.schemas import (
    Limit,
    Member,
    MemberSet,
    Name,
    ProjectCreate,
    ProjectUpdate,
    Quota,
    QuotaUsage,
    ResourceList,
    ResourcePublic,
)
from appliance.services import auth, quotas

router = APIRouter(prefix="/projects", tags=["projects"])


@router.get("", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_projects(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None) -> dict[str, Any]:
    """The projects you can see (all of them for cluster viewers and above)."""
    items, nxt = auth.list_projects(session, caller, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.post("", status_code=201, response_model=ResourcePublic, openapi_extra=access("cluster:admin"))
def create_project(body: ProjectCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.create_project(session, caller, body.name, body.spec.model_dump())


@router.get("/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_project(name: Name, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.get_project(session, caller, name)


@router.patch("/{name}", response_model=ResourcePublic, openapi_extra=access("project:admin"))
def update_project(name: Name, body: ProjectUpdate, session: DbSession, caller: Caller,
                   if_match: IfMatch = None) -> dict[str, Any]:
    return auth.update_project(session, caller, name, body.spec.model_dump(), if_match)


@router.delete("/{name}", status_code=204, openapi_extra=access("cluster:admin"))
def delete_project(name: Name, session: DbSession, caller: Caller) -> Response:
    auth.delete_project(session, caller, name)
    return Response(status_code=204)


@router.get("/{name}/quota", response_model=QuotaUsage, openapi_extra=access("project:read"))
def get_quota(name: Name, session: DbSession, caller: Caller) -> dict[str, Any]:
    """The project's limits (null: unlimited) and what it uses now."""
    return quotas.show(session, caller, name)


@router.put("/{name}/quota", response_model=QuotaUsage, openapi_extra=access("cluster:admin"))
def set_quota(name: Name, body: Quota, session: DbSession, caller: Caller) -> dict[str, Any]:
    """Replace the project's limits (absent keys: unlimited). Enforced when a resource is
    created, in the same transaction; lowering a limit removes nothing."""
    return quotas.set_limits(session, caller, name, body.model_dump())


@router.get("/{name}/members", response_model=list[Member], openapi_extra=access("project:read"))
def list_members(name: Name, session: DbSession, caller: Caller) -> list[dict[str, Any]]:
    return auth.list_members(session, caller, name)


@router.put("/{name}/members/{user}", response_model=Member, openapi_extra=access("project:admin"))
def set_member(name: Name, user: Name, body: MemberSet, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.set_member(session, caller, name, user, body.role)


@router.delete("/{name}/members/{user}", status_code=204, openapi_extra=access("project:admin"))
def remove_member(name: Name, user: Name, session: DbSession, caller: Caller) -> Response:
    auth.remove_member(session, caller, name, user)
    return Response(status_code=204)
