"""Users (cluster admins manage them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from appliance.api.deps import Caller, DbSession, access
from appliance.api.schemas import Limit, Name, ResourceList, ResourcePublic, UserCreate, UserUpdate
from appliance.services import auth, logins

router = APIRouter(prefix="/users", tags=["users"])


@router.get("", response_model=ResourceList, openapi_extra=access("cluster:read"))
def list_users(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None) -> dict[str, Any]:
    items, nxt = auth.list_users(session, caller, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.post("", status_code=201, response_model=ResourcePublic, openapi_extra=access("cluster:admin"))
def create_user(body: UserCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.create_user(session, caller, body.name, body.password, body.cluster_role,
                            body.spec.model_dump())


@router.get("/{name}", response_model=ResourcePublic, openapi_extra=access("self"))
def get_user(name: Name, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.get_user(session, caller, name)


@router.patch("/{name}", response_model=ResourcePublic, openapi_extra=access("cluster:admin"))
def update_user(name: Name, body: UserUpdate, session: DbSession, caller: Caller) -> dict[str, Any]:
    """Disable / enable a user, reset their password, change their cluster role."""
    return logins.update_user(session, caller, name, body.active, body.password, body.cluster_role,
                              "cluster_role" in body.model_fields_set)


@router.delete("/{name}", status_code=204, openapi_extra=access("cluster:admin"))
def delete_user(name: Name, session: DbSession, caller: Caller) -> Response:
    auth.delete_user(session, caller, name)
    return Response(status_code=204)


