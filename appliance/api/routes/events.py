"""Server-sent events: every resource change, resumable with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from appliance.api.deps import Caller, DbSession, access
from appliance.services import events
from appliance.services.principal import Principal

router = APIRouter(tags=["events"])
POLL_SECONDS = 0.3
KEEPALIVE_SECONDS = 15.0


@router.get("/events", openapi_extra=access("authenticated"),
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_events(
    request: Request, session: DbSession, caller: Caller,
    last_event_id: Annotated[str | None, Header()] = None,
    since: Annotated[int | None, Query(ge=0, description="resume after this seq")] = None,
    max_seconds: Annotated[float | None, Query(gt=0, le=86400,
                                               description="end the stream after this long")] = None,
) -> StreamingResponse:
    """`text/event-stream`: `id` = seq, `event` = kind, `data` = the change as JSON."""
    url = request.app.state.settings.resolved_database_url
    start = since
    if start is None and last_event_id and last_event_id.isdigit():
        start = int(last_event_id)
    if start is None:
        start = events.latest_seq(session)
    return StreamingResponse(_generate(request, url, caller, start, max_seconds),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _generate(request: Request, url: str, principal: Principal, after: int,
                    max_seconds: float | None) -> AsyncIterator[str]:
    deadline = time.monotonic() + max_seconds if max_seconds else None
    last_sent = time.monotonic()
    yield ": connected\n\n"
    while deadline is None or time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        batch, after = await anyio.to_thread.run_sync(events.poll, url, principal, after)
        for event in batch:
            yield f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
