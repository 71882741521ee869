"""Websocket consoles: a VM's serial port (for xterm.js) and VNC (for noVNC), a
container's output stream. Authenticated like every route (bearer token, or the
console's session cookie from the same origin); opening one needs operator rights
in the instance's project, and those are checked again every few seconds while it
is open (services.streams): a revoked token, a disabled or deleted user or lost
rights close it (1008, with the reason)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect, WebSocketException, status

from appliance.api import vnc_ticket
from appliance.api.deps import SESSION_COOKIE, AppSettings, Caller, access
from appliance.api.routes.scoped import ProjectQuery
from appliance.api.schemas import Name
from appliance.errors import CairnError, Conflict, PermissionDenied, TooManyRequests
from appliance.services import audit, consoles, streams
from appliance.services.principal import Principal

router = APIRouter(tags=["consoles"])
CHUNK = 65536


class Console:
    """One open console: who opened it, with what, and what it reaches."""

    def __init__(self, websocket: WebSocket, kind: str, project: str, name: str, want: str) -> None:
        self.websocket = websocket
        self.url = websocket.app.state.settings.resolved_database_url
        self.kind, self.project, self.name, self.want = kind, project, name, want
        self.creds = streams.Credentials(websocket.headers.get("authorization", ""),
                                         websocket.cookies.get(SESSION_COOKIE))

    async def open(self) -> tuple[Principal, str, str | None]:
        """Who may open it, its socket and the node it is on; both outcomes go to the audit log."""
        origin = self.websocket.headers.get("origin")
        host = self.websocket.headers.get("host", "")
        principal = None
        try:
            principal = await anyio.to_thread.run_sync(streams.authenticate, self.url, self.creds)
            if "authorization" not in self.websocket.headers and origin and origin.split("://", 1)[-1] != host:
                raise PermissionDenied("cross-origin console connections are refused")
            path, node = await anyio.to_thread.run_sync(consoles.target, self.url, principal, self.kind,
                                                        self.project, self.name, self.want)
        except CairnError as exc:
            await self.audit(principal, exc.status, exc.detail)
            raise WebSocketException(status.WS_1008_POLICY_VIOLATION, reason=str(exc.detail)[:120])
        await self.audit(principal, 101, f"{self.want} console opened")
        return principal, path, node

    async def audit(self, principal: Principal | None, code: int, detail: str) -> None:
        client = self.websocket.client
        entry = audit.Entry(method="GET", path=self.websocket.url.path, action=f"WEBSOCKET {self.want} console",
                            status=code, user=principal.user_name if principal else None,
                            via=principal.via if principal else None, source=client.host if client else None,
                            object_kind=self.kind, object_name=self.name, project=self.project, detail=detail)
        await anyio.to_thread.run_sync(audit.append, self.url, entry)

    async def watch(self, principal: Principal) -> str:
        """Returns (the reason) once the caller may no longer use this console."""
        every = self.websocket.app.state.settings.stream_recheck_seconds
        while True:
            await asyncio.sleep(every)
            try:
                principal = await anyio.to_thread.run_sync(consoles.recheck, self.url, self.creds, principal,
                                                           self.kind, self.project, self.name, self.want)
            except CairnError as exc:
                return str(exc.detail)


async def _serve(console: Console, subprotocol: str | None = None) -> None:
    principal, path, node = await console.open()
    try:
        slot = console.websocket.app.state.streams.acquire(principal)
    except TooManyRequests as exc:
        raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, reason=exc.detail[:120])
    settings = console.websocket.app.state.settings
    try:
        if node and node != settings.node_name and settings.cluster is not None:
            await _relay(console, principal, node, subprotocol)  # on another node: through its API
        else:
            await _pump(console, principal, path, subprotocol)
    finally:
        slot.release()


async def _relay(console: Console, principal: Principal, node: str, subprotocol: str | None) -> None:
    """The console of an instance on another node: the same route on that node's API, over
    mutual TLS (this node's certificate) with the caller's own credentials, which that
    node checks again. Bytes flow both ways unchanged."""
    import ssl

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    websocket = console.websocket
    settings = websocket.app.state.settings
    address = next((m.address for m in settings.cluster.members if m.name == node), None)
    if address is None:
        raise WebSocketException(status.WS_1011_INTERNAL_ERROR, reason=f"node {node} is not a cluster member")
    ctx = ssl.create_default_context(cafile=str(settings.pki_dir / "ca.crt"))
    ctx.load_cert_chain(settings.pki_dir / "server.crt", settings.pki_dir / "server.key")
    headers = {k: v for k, v in websocket.headers.items() if k in ("authorization", "cookie")}
    query = f"?{websocket.url.query}" if websocket.url.query else ""
    uri = f"wss://{address}:{settings.api_port}{websocket.url.path}{query}"
    try:
        upstream = await connect(uri, ssl=ctx, additional_headers=headers, open_timeout=10, max_size=None,
                                 subprotocols=[subprotocol] if subprotocol else None)  # type: ignore[list-item]
    except Exception as exc:
        raise WebSocketException(status.WS_1011_INTERNAL_ERROR, reason=f"console on {node} unavailable: {exc}"[:120])
    await websocket.accept(subprotocol=subprotocol)
    closing: list[tuple[int, str]] = [(status.WS_1000_NORMAL_CLOSURE, "")]

    async def to_client() -> None:
        try:
            async for data in upstream:
                await websocket.send_bytes(data if isinstance(data, bytes) else data.encode())
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code != 1000:
                closing.append((exc.rcvd.code, exc.rcvd.reason))

    async def to_node() -> None:
        async for data in _from_client(websocket):
            await upstream.send(data)

    await _pump_both(console, principal, closing, to_client, to_node, upstream.close)


async def _pump(console: Console, principal: Principal, path: str, subprotocol: str | None) -> None:
    websocket = console.websocket
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise WebSocketException(status.WS_1011_INTERNAL_ERROR, reason=f"console unavailable: {exc}"[:120])
    await websocket.accept(subprotocol=subprotocol)
    closing: list[tuple[int, str]] = [(status.WS_1000_NORMAL_CLOSURE, "")]

    async def to_client() -> None:
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(data)

    async def to_console() -> None:
        async for data in _from_client(websocket):
            writer.write(data)
            await writer.drain()

    async def close() -> None:
        writer.close()

    await _pump_both(console, principal, closing, to_client, to_console, close)


async def _from_client(websocket: WebSocket) -> AsyncIterator[bytes]:
    """The bytes the browser sends (binary or text frames) until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        yield message.get("bytes") or (message.get("text") or "").encode()


async def _pump_both(console: Console, principal: Principal, closing: list[tuple[int, str]],
                     to_client: Callable[[], Coroutine[Any, Any, None]],
                     to_peer: Callable[[], Coroutine[Any, Any, None]],
                     close_peer: Callable[[], Awaitable[None]]) -> None:
    """Run both directions and the re-authorization watch until one ends; then close the
    peer and the browser's websocket with the last reason recorded in ``closing``."""
    async def watch() -> None:
        reason = await console.watch(principal)
        closing.append((status.WS_1008_POLICY_VIOLATION, reason[:120]))

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(to_peer()), asyncio.create_task(watch())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except WebSocketDisconnect:
        pass
    finally:
        for t in tasks:
            t.cancel()
        await close_peer()
        with contextlib.suppress(Exception):
            await console.websocket.close(code=closing[-1][0], reason=closing[-1][1])


@router.websocket("/vms/{name}/console/{console}")
async def vm_console(websocket: WebSocket, name: str, console: Literal["serial", "vnc"],
                     project: str = "default") -> None:
    """``serial``: the guest's serial port as bytes (xterm.js); ``vnc``: RFB (noVNC,
    subprotocol ``binary``)."""
    want = "serial-unix" if console == "serial" else "vnc-unix"
    offered = websocket.headers.get("sec-websocket-protocol", "")
    await _serve(Console(websocket, "vm", project, name, want), "binary" if "binary" in offered else None)


@router.websocket("/containers/{name}/console/tty")
async def container_tty(websocket: WebSocket, name: str, project: str = "default") -> None:
    """The interactive terminal of a container created with ``tty: true`` (xterm.js)."""
    await _serve(Console(websocket, "container", project, name, "serial-unix"))


@router.post("/vms/{name}/console/vv", openapi_extra=access("project:write"),
             responses={200: {"content": {"application/x-virt-viewer": {}}}})
async def vm_console_vv(name: Name, request: Request, caller: Caller, settings: AppSettings,
                        project: ProjectQuery = "default") -> Response:
    """A ``.vv`` file for remote-viewer: the VM's screen on a fresh port of this node with a
    one-time ticket (RFB VNC authentication), usable once within a minute."""
    url = settings.resolved_database_url
    path, node = await anyio.to_thread.run_sync(consoles.vnc_target, url, caller, project, name)
    if node and node != settings.node_name:
        raise Conflict(f"VM '{name}' runs on node {node}: download its .vv from that node's console")
    host = request.url.hostname or "127.0.0.1"
    ticket = await vnc_ticket.open_ticket(path, settings.api_host, who=caller.user_name or "")
    body = vnc_ticket.vv_file(ticket, f"[{host}]" if ":" in host else host, f"VM {name} ({project}) - Cairn")
    return Response(body, media_type="application/x-virt-viewer",
                    headers={"Content-Disposition": f'attachment; filename="{name}.vv"', "Cache-Control": "no-store"})
