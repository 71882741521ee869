"""Websocket consoles: a VM's serial port (for xterm.js) and VNC (for noVNC), a
container's output stream. Authenticated like every route (bearer token, or the
console's session cookie from the same origin); opening one needs operator rights
in the instance's project."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect, WebSocketException, status

from appliance.api.deps import SESSION_COOKIE
from appliance.errors import CairnError, PermissionDenied
from appliance.services import consoles

router = APIRouter(tags=["consoles"])
CHUNK = 65536


async def _open(websocket: WebSocket, kind: str, project: str, name: str, want: str) -> str:
    url = websocket.app.state.settings.resolved_database_url
    origin = websocket.headers.get("origin")
    host = websocket.headers.get("host", "")
    try:
        principal = await anyio.to_thread.run_sync(consoles.authenticate, url,
                                                   websocket.headers.get("authorization", ""),
                                                   websocket.cookies.get(SESSION_COOKIE))
        if "authorization" not in websocket.headers and origin and origin.split("://", 1)[-1] != host:
            raise PermissionDenied("cross-origin console connections are refused")
        return await anyio.to_thread.run_sync(consoles.socket_path, url, principal, kind, project, name, want)
    except CairnError as exc:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, reason=str(exc.detail)[:120])


async def _pump(websocket: WebSocket, path: str, subprotocol: str | None) -> None:
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise WebSocketException(status.WS_1011_INTERNAL_ERROR, reason=f"console unavailable: {exc}"[:120])
    await websocket.accept(subprotocol=subprotocol)

    async def to_client() -> None:
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(data)

    async def to_console() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(to_console())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except WebSocketDisconnect:
        pass
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await websocket.close()


@router.websocket("/vms/{name}/console/{console}")
async def vm_console(websocket: WebSocket, name: str, console: Literal["serial", "vnc"],
                     project: str = "default") -> None:
    """``serial``: the guest's serial port as bytes (xterm.js); ``vnc``: RFB (noVNC,
    subprotocol ``binary``)."""
    want = "serial-unix" if console == "serial" else "vnc-unix"
    path = await _open(websocket, "vm", project, name, want)
    offered = websocket.headers.get("sec-websocket-protocol", "")
    await _pump(websocket, path, "binary" if "binary" in offered else None)


@router.websocket("/containers/{name}/console/tty")
async def container_tty(websocket: WebSocket, name: str, project: str = "default") -> None:
    """The interactive terminal of a container created with ``tty: true`` (xterm.js)."""
    path = await _open(websocket, "container", project, name, "serial-unix")
    await _pump(websocket, path, None)
