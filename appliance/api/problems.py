"""RFC 9457 problem+json for every error, with a message a person can act on."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import CairnError

log = logging.getLogger("cairn.api")
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, slug: str, **extra: Any) -> JSONResponse:
    body = {"type": f"https://cairn.dev/problems/{slug}", "title": title, "status": status,
            "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] or ["body"]
    return ".".join(parts)


def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return problem(400, "Malformed JSON",
                           f"the request body is not valid JSON ({ctx.get('error', 'parse error')})",
                           "malformed-json")
    messages = []
    for err in errors:
        where = _loc(tuple(err.get("loc", ())))
        if err.get("type") == "extra_forbidden":
            messages.append(f"{where}: unknown field, remove it")
        else:
            messages.append(f"{where}: {err.get('msg')}")
    return problem(422, "Invalid input", "; ".join(messages), "invalid-input",
                   errors=[{"loc": list(map(str, e.get("loc", ()))), "msg": e.get("msg"),
                            "type": e.get("type")} for e in errors])


def _cairn(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CairnError)
    response = problem(exc.status, exc.title, exc.detail, exc.type_slug)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="cairn"'
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    titles = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such API path: see /api/v1/openapi.json"
    if exc.status_code == 405:
        detail = "this path does not accept that method: see /api/v1/openapi.json"
    return problem(exc.status_code, titles.get(exc.status_code, "Error"), detail,
                   f"http-{exc.status_code}", )


def _integrity(_: Request, exc: Exception) -> JSONResponse:
    log.info("integrity conflict", extra={"error": str(exc)[:300]})
    return problem(409, "Conflict", "the change collides with another one made at the same time "
                   "(a name, address or identifier is already taken): re-read and retry", "conflict")


def _database_down(request: Request, exc: Exception) -> JSONResponse:
    """The database cannot be reached (a cluster's primary failing over, or down): nothing
    was written; the client may retry."""
    log.warning("database unavailable", extra={"path": request.url.path, "error": str(exc).splitlines()[0][:300]})
    response = problem(503, "Service unavailable",
                       "the database is not reachable right now (in a cluster: its primary is failing over, "
                       "which takes a few seconds); nothing was changed, retry", "database-unavailable")
    response.headers["Retry-After"] = "2"
    return response


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem(500, "Internal error",
                   "the server failed unexpectedly; the error is in the API log", "internal")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(CairnError, _cairn)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(IntegrityError, _integrity)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
