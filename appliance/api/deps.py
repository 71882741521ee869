"""Request dependencies: the DB session (one transaction per request) and the caller.

Routes get a session only to hand it to services; they never query it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from appliance.db.engine import session_scope
from appliance.errors import PermissionDenied, Unauthenticated
from appliance.services import auth
from appliance.services.principal import Principal
from appliance.settings import Settings

SESSION_COOKIE = "cairn_session"
CSRF_COOKIE = "cairn_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_db(request: Request) -> Iterator[Session]:
    """One transaction per request; reads (GET/HEAD) never wait for SQLite's write lock."""
    url = request.app.state.settings.resolved_database_url
    with session_scope(url, readonly=request.method in SAFE_METHODS) as session:
        yield session


DbSession = Annotated[Session, Depends(get_db, scope="function")]
AppSettings = Annotated[Settings, Depends(get_settings_dep)]


def source_of(request: Request) -> str:
    """The caller's address as the API sees it (proxies' headers are not trusted)."""
    return request.client.host if request.client else "unknown"


def authenticate(request: Request, session: DbSession) -> Principal:
    """Bearer token (scripts, CLI) or session cookie + CSRF header (console). The
    caller is kept on the request for the audit log."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("use 'Authorization: Bearer cairn_<id>_<secret>'")
        principal = auth.authenticate_token(session, token.strip())
        request.state.principal = principal
        return principal
    sid = request.cookies.get(SESSION_COOKIE)
    if not sid:
        raise Unauthenticated("log in first: send a bearer token or the console's session cookie")
    principal, csrf = auth.authenticate_session(session, sid)
    request.state.principal = principal
    if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != csrf:
        raise PermissionDenied(f"missing or wrong {CSRF_HEADER} header (copy the {CSRF_COOKIE} cookie)")
    return principal


Caller = Annotated[Principal, Depends(authenticate)]


def authenticate_briefly(request: Request) -> Principal:
    """For routes that stream a large body: authenticate in a short transaction of
    its own instead of holding a request-long one (SQLite's write lock) open."""
    with session_scope(request.app.state.settings.resolved_database_url) as session:
        return authenticate(request, session)


StreamingCaller = Annotated[Principal, Depends(authenticate_briefly)]
IfMatch = Annotated[str | None, Header(description="The generation you last read; stale → 409")]


def access(rule: str) -> dict[str, Any]:
    """Declare who may call a route, in the OpenAPI document (``x-cairn-access``):
    public, authenticated, self, cluster:<read|write|admin>, project:<read|write|admin>.
    The auth walk test reads it for every route."""
    return {"x-cairn-access": rule}
