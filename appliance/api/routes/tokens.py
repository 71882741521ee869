"""Your API tokens. The secret is returned once, at creation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from appliance.api.deps import Caller, DbSession, access
from appliance.api.schemas import Name, TokenCreate, TokenCreated, TokenList
from appliance.services import auth

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.get("", response_model=TokenList, openapi_extra=access("authenticated"))
def list_tokens(session: DbSession, caller: Caller) -> dict[str, Any]:
    return {"items": auth.list_tokens(session, caller)}


@router.post("", status_code=201, response_model=TokenCreated, openapi_extra=access("authenticated"))
def create_token(body: TokenCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.create_token(session, caller, body.name, body.expires_days)


@router.delete("/{name}", status_code=204, openapi_extra=access("authenticated"))
def delete_token(name: Name, session: DbSession, caller: Caller) -> Response:
    auth.delete_token(session, caller, name)
    return Response(status_code=204)
