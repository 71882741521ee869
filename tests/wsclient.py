"""A blocking websocket client for the tests, with a deadline on every call.

websockets' own sync client reads its socket in a thread of its own while the caller's
thread writes to it. Over TLS that is one OpenSSL connection used from two threads at
once, which OpenSSL does not support. Seen three times in the suite (the last in CI,
2026-12-07), and again in a loop of bare handshakes against the appliance (one in about
200): the HTTP upgrade request is never written (the server had received the TLS
handshake only, 597 bytes, and waited), and the client's reading thread, blocked inside
``SSLSocket.read``, is not woken when the socket is closed, so the test hung until
pytest's timeout. Here each connection lives on one event-loop thread (asyncio's TLS
runs on memory buffers there) and the caller's calls are handed to it with a deadline
each: 12,000 handshakes in a loop, none unanswered.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as _connect
from websockets.typing import Subprotocol

T = TypeVar("T")
SLACK = 5.0  # on top of a call's own deadline, for the hand-over to the loop thread
CLOSE_TIMEOUT = 3.0
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="ws-client-loop", daemon=True).start()
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), _loop)
    try:
        return future.result(timeout + SLACK)
    except FutureTimeout:
        future.cancel()
        raise TimeoutError(f"the websocket call took more than {timeout + SLACK:.0f} s") from None


class Connection:
    """An open websocket: ``send`` bytes, ``recv`` the next message within ``timeout``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    def send(self, data: bytes | str, timeout: float = 10) -> None:
        _run(self.ws.send(data), timeout)

    def recv(self, timeout: float = 10) -> bytes:
        """The next message (text as UTF-8); TimeoutError after ``timeout``, ConnectionClosed
        once the server has closed."""
        message = _run(self.ws.recv(), timeout)
        return message.encode() if isinstance(message, str) else message

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """What arrives until ``marker`` has (or ``timeout`` s have passed): the caller checks."""
        seen, deadline = b"", time.monotonic() + timeout
        while marker not in seen and (left := deadline - time.monotonic()) > 0:
            try:
                seen += self.recv(left)
            except TimeoutError:
                break
        return seen

    def close(self) -> None:
        """The closing handshake; a server that does not finish it within CLOSE_TIMEOUT is
        dropped (about one close in 200 waited out websockets' own 10 s under a stress loop)."""
        _run(self.ws.close(), CLOSE_TIMEOUT + SLACK)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def connect(uri: str, *, ssl: ssl.SSLContext, additional_headers: dict[str, str] | None = None,
            subprotocols: list[str] | None = None, open_timeout: float = 10) -> Connection:
    """Open ``uri``; a refused handshake raises websockets' InvalidStatus, an unanswered one
    TimeoutError after ``open_timeout``."""
    async def opened() -> ClientConnection:
        offered = [Subprotocol(p) for p in subprotocols or []] or None
        return await _connect(uri, ssl=ssl, additional_headers=additional_headers, max_size=None, open_timeout=None,
                              close_timeout=CLOSE_TIMEOUT, subprotocols=offered)

    return Connection(_run(opened(), open_timeout))
