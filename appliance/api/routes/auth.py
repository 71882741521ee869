"""Login / logout for the console, and who am I."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from appliance.api.deps import CSRF_COOKIE, SESSION_COOKIE, AppSettings, Caller, DbSession, access
from appliance.api.schemas import LoginRequest, LoginResponse, Me
from appliance.services import auth

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=LoginResponse, openapi_extra=access("public"))
def login(body: LoginRequest, response: Response, session: DbSession, settings: AppSettings) -> dict[str, Any]:
    """Password login; sets an HttpOnly session cookie and a CSRF cookie."""
    sid, csrf, principal = auth.login(session, body.username, body.password, settings.session_hours)
    max_age = int(settings.session_hours * 3600)
    response.set_cookie(SESSION_COOKIE, sid, max_age=max_age, httponly=True, secure=True,
                        samesite="strict", path="/")
    response.set_cookie(CSRF_COOKIE, csrf, max_age=max_age, httponly=False, secure=True,
                        samesite="strict", path="/")
    return {"user": auth.me(session, principal), "csrf_token": csrf}


@router.post("/logout", status_code=204, openapi_extra=access("authenticated"))
def logout(request: Request, response: Response, session: DbSession, caller: Caller) -> Response:
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        auth.logout(session, sid)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


@router.get("/me", response_model=Me, openapi_extra=access("authenticated"))
def me(session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.me(session, caller)
