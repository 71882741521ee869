"""Records every write to the API in the audit log (services.audit).

An ASGI middleware: for each POST / PUT / PATCH / DELETE under /api/v1 it notes who
called (the principal ``deps.authenticate`` put on the request, or the user name a
login tried), from which address, the route, the object (from the path, or the name
and project of a create body), and the answer's status and problem detail. The
answer is held back until the record is committed, so a write the caller saw
answered is always in the log."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.services import audit

log = logging.getLogger("cairn.audit")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
API_PREFIX = "/api/v1"
CAPTURE = 65536  # request / answer bytes looked at for names and details (bodies are small JSON)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, url: str, prefix: str, uploads: str) -> None:
        self.app = app
        self.url = url
        self.prefix = prefix
        self.uploads = uploads  # streamed image uploads: their body is not looked at

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITES or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        capture = not scope["path"].endswith(self.uploads)
        start: Message | None = None
        recorded = False

        async def receive_and_keep() -> Message:
            message = await receive()
            if capture and message["type"] == "http.request" and len(body) < CAPTURE:
                body.extend(message.get("body", b"")[: CAPTURE - len(body)])
            return message

        async def record(status: int, answer: bytes) -> None:
            nonlocal recorded
            recorded = True
            entry = describe(scope, status, bytes(body), answer)
            try:
                await anyio.to_thread.run_sync(audit.append, self.url, entry)
            except Exception:
                log.exception("could not write the audit record", extra={"audit": entry.__dict__})

        async def send_after_record(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # held until the record is written
                return
            if not recorded and start is not None:
                await record(int(start["status"]), message.get("body", b"")[:CAPTURE])
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive_and_keep, send_after_record)
        except BaseException:
            if not recorded:
                await record(500, b"")
            raise


def describe(scope: Scope, status: int, request: bytes, answer: bytes) -> audit.Entry:
    state = scope.get("state") or {}
    principal = state.get("principal")
    route = scope.get("route")
    path: str = scope["path"]
    parts = [p for p in path.removeprefix(API_PREFIX).split("/") if p]
    query = parse_qs((scope.get("query_string") or b"").decode(errors="replace"))
    sent = _json(request)
    kind = name = None
    if parts:
        kind = parts[0][:-1] if parts[0].endswith("s") else parts[0]
        name = parts[1] if len(parts) > 1 else sent.get("name")
    project = (query.get("project") or [None])[0] or sent.get("project")
    if kind == "project":
        project = name
    got = _json(answer)
    if status >= 400:
        detail = got.get("detail")
    elif status == 202 and got.get("id"):
        detail = f"task {got['id']}"
    else:
        detail = None
    client = scope.get("client")
    template = getattr(route, "path", path)
    if not template.startswith(API_PREFIX):
        template = API_PREFIX + template
    return audit.Entry(
        method=scope["method"], path=path, action=f"{scope['method']} {template}",
        status=status, user=principal.user_name if principal else state.get("audit_user"),
        via=principal.via if principal else ("password" if state.get("audit_user") else None),
        source=client[0] if client else None, object_kind=kind, object_name=_text(name),
        project=_text(project), detail=_text(detail))


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
