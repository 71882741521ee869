"""Server-sent events: every resource change, resumable with Last-Event-ID. The caller
is checked again every few seconds (services.streams): a revoked token, a disabled or
deleted user, or lost rights end the stream with an ``event: closed`` saying why."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from appliance.api.deps import SESSION_COOKIE, Caller, DbSession, access
from appliance.errors import CairnError
from appliance.services import events, streams
from appliance.services.principal import Principal

router = APIRouter(tags=["events"])
POLL_SECONDS = 0.3
KEEPALIVE_SECONDS = 15.0


def credentials(request: Request) -> streams.Credentials:
    return streams.Credentials(request.headers.get("authorization", ""), request.cookies.get(SESSION_COOKIE))


@router.get("/events", openapi_extra=access("authenticated"),
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_events(
    request: Request, session: DbSession, caller: Caller,
    last_event_id: Annotated[str | None, Header()] = None,
    since: Annotated[int | None, Query(ge=0, description="resume after this seq")] = None,
    max_seconds: Annotated[float | None, Query(gt=0, le=86400,
                                               description="end the stream after this long")] = None,
) -> StreamingResponse:
    """`text/event-stream`: `id` = seq, `event` = kind, `data` = the change as JSON.
    One user holds at most ``max_streams_per_user`` streams at once (429 beyond)."""
    url = request.app.state.settings.resolved_database_url
    start = since
    if start is None and last_event_id and last_event_id.isdigit():
        start = int(last_event_id)
    if start is None:
        start = events.latest_seq(session)
    slot = request.app.state.streams.acquire(caller)
    return SlotResponse(slot, _generate(request, url, caller, credentials(request), start, max_seconds),
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class SlotResponse(StreamingResponse):
    """A stream that gives its caller's slot back however it ends (finished,
    client gone, cancelled)."""

    def __init__(self, slot: streams.Slot, content: AsyncIterator[str], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _generate(request: Request, url: str, principal: Principal, creds: streams.Credentials, after: int,
                    max_seconds: float | None) -> AsyncIterator[str]:
    settings = request.app.state.settings
    deadline = time.monotonic() + max_seconds if max_seconds else None
    last_sent = checked = time.monotonic()
    yield ": connected\n\n"
    while deadline is None or time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        if time.monotonic() - checked >= settings.stream_recheck_seconds:
            checked = time.monotonic()
            try:
                principal = await anyio.to_thread.run_sync(streams.recheck, url, creds, principal)
            except CairnError as exc:
                yield f"event: closed\ndata: {json.dumps({'reason': exc.detail})}\n\n"
                return
        batch, after = await anyio.to_thread.run_sync(events.poll, url, principal, after)
        for event in batch:
            yield f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
