"""Placement groups (affinity / anti-affinity) for the scheduler."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from appliance.api.deps import Caller, DbSession, access
from appliance.api.schemas import Limit, Name, PlacementGroupCreate, ResourceList, ResourcePublic
from appliance.services import groups

router = APIRouter(prefix="/placement-groups", tags=["placement-groups"])
ProjectQuery = Annotated[str, Query(min_length=1, max_length=63, description="project name")]


@router.get("", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_groups(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                project: Annotated[str | None, Query(max_length=63)] = None) -> dict[str, Any]:
    """One project's groups, or those of every project you can see."""
    items, nxt = groups.groups.list_(session, caller, project, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.post("", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_group(body: PlacementGroupCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return groups.create(session, caller, body.project, body.name, body.spec.policy)


@router.get("/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_group(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return groups.groups.get(session, caller, project, name)


@router.delete("/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_group(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    groups.delete(session, caller, project, name)
    return Response(status_code=204)
