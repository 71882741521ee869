"""Login / logout for the console, password change, and who am I."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request, Response

from appliance.api.deps import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    AppSettings,
    Caller,
    DbSession,
    StreamingCaller,
    access,
    source_of,
)
from appliance.api.schemas import LoginRequest, LoginResponse, Me, PasswordChange
from appliance.services import auth, logins

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=LoginResponse, openapi_extra=access("public"))
async def login(body: LoginRequest, request: Request, response: Response, settings: AppSettings) -> dict[str, Any]:
    """Password login; sets an HttpOnly session cookie and a CSRF cookie. Failed logins
    lock the user name (and, more of them, the source address) for a while: 429 with
    Retry-After."""
    request.state.audit_user = body.username
    sid, csrf, _, me = await anyio.to_thread.run_sync(logins.password_login, settings, body.username,
                                                       body.password, source_of(request))
    max_age = int(settings.session_hours * 3600)
    response.set_cookie(SESSION_COOKIE, sid, max_age=max_age, httponly=True, secure=True,
                        samesite="strict", path="/")
    response.set_cookie(CSRF_COOKIE, csrf, max_age=max_age, httponly=False, secure=True,
                        samesite="strict", path="/")
    return {"user": me, "csrf_token": csrf}


@router.post("/password", status_code=204, openapi_extra=access("authenticated"))
async def change_password(body: PasswordChange, request: Request, caller: StreamingCaller,
                          settings: AppSettings) -> Response:
    """Change your own password (the current one is checked); your other console
    sessions end. API tokens stay valid: revoke them with DELETE /tokens/{name}."""
    await anyio.to_thread.run_sync(logins.change_password, settings, caller, body.current_password,
                                   body.new_password, source_of(request), request.cookies.get(SESSION_COOKIE))
    return Response(status_code=204)


@router.post("/logout", status_code=204, openapi_extra=access("authenticated"))
def logout(request: Request, response: Response, session: DbSession, caller: Caller) -> Response:
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        auth.logout(session, sid)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    response.delete_cookie(CSRF_COOKIE, path="/", secure=True, samesite="strict")
    return response


@router.get("/me", response_model=Me, openapi_extra=access("authenticated"))
def me(session: DbSession, caller: Caller) -> dict[str, Any]:
    return auth.me(session, caller)
