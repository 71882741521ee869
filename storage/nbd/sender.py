"""A connection's replies sent with scatter-gather ``sendmsg`` straight from the buffers
they live in (cached chunks, read buffers): nothing is copied into a transport buffer.

asyncio's transports copy what the socket does not take at once into a bytearray (and
a large reply whose first part went out is copied again); a sequential reader whose
client falls behind made every 1 MiB reply cost two extra copies. Here what the socket
does not take waits as views, in order, until it is writable, and reading pauses while
more than ``HIGH`` bytes wait (the buffers stay alive as long as their views do).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
from collections.abc import Callable, Sequence

Buffer = bytes | bytearray | memoryview
MAX_PARTS = 1024  # IOV_MAX


class Sender:
    """Ordered, whole messages on one (non-blocking) stream socket, sent without copies.

    Every write of the connection must come through here once it is in use, so that a
    message is never interleaved with another one's rest.
    """

    HIGH = 16 << 20
    LOW = 4 << 20

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, pause: Callable[[], None],
                 resume: Callable[[], None], fail: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        self._pause, self._resume, self._fail = pause, resume, fail
        self.queue: collections.deque[memoryview] = collections.deque()
        self.queued = 0
        self.paused = False
        self.watching = False  # waiting for the socket to be writable
        self._then: Callable[[], None] | None = None
        self.closed = False

    def send(self, parts: Sequence[Buffer]) -> None:
        """Send the messages in ``parts`` (in order) after what is already waiting."""
        if self.closed:
            return
        if self.queue:
            self._queue(parts, 0)
            return
        start = 0
        while start < len(parts):
            chunk = parts[start : start + MAX_PARTS]
            try:
                sent = self.sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                self._fail()
                return
            if sent < sum(len(p) for p in chunk):
                self._queue(parts[start:], sent)
                self.watching = True
                self.loop.add_writer(self.sock.fileno(), self._drain)
                return
            start += MAX_PARTS

    def _queue(self, parts: Sequence[Buffer], skip: int) -> None:
        """Keep ``parts`` (without their first ``skip`` bytes, already sent) as views."""
        for part in parts:
            n = len(part)
            if skip >= n:
                skip -= n
                continue
            view = memoryview(part)[skip:] if skip else memoryview(part)
            skip = 0
            self.queue.append(view)
            self.queued += len(view)
        if self.queued > self.HIGH and not self.paused:
            self.paused = True
            self._pause()

    def _drain(self) -> None:
        """The socket is writable: send what waits."""
        queue = self.queue
        while queue:
            parts = list(itertools.islice(queue, MAX_PARTS))
            total = sum(len(p) for p in parts)
            try:
                sent = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                self._fail()
                return
            self.queued -= sent
            left = sent
            while left:
                head = queue[0]
                if left >= len(head):
                    left -= len(head)
                    queue.popleft()
                else:
                    queue[0] = head[left:]
                    left = 0
            if self.paused and self.queued <= self.LOW:
                self.paused = False
                self._resume()
            if sent < total:
                return  # the socket is full again
        self.watching = False
        self.loop.remove_writer(self.sock.fileno())
        then, self._then = self._then, None
        if then is not None:
            then()

    def then(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once everything waiting went out (at once if nothing waits)."""
        if self.queue and not self.closed:
            self._then = cb
        else:
            cb()

    def close(self) -> None:
        """Drop what waits and stop watching the socket (the connection is gone)."""
        if self.closed:
            return
        self.closed = True
        if self.watching:
            self.watching = False
            self.loop.remove_writer(self.sock.fileno())
        self.queue.clear()
        self.queued = 0
