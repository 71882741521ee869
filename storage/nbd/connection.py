"""One NBD connection: handshake and transmission on one buffered protocol."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Any

from storage.chunks import RAW
from storage.engine import Volume
from storage.errors import StorageError
from storage.nbd import protocol as p
from storage.nbd.reads import SMALL_READ
from storage.nbd.sender import Sender

if TYPE_CHECKING:
    from storage.nbd.server import NbdServer

log = logging.getLogger("cairn.nbd")


class ReplyBatch:
    """Replies gathered during one pass over completions (a group commit, a batch of
    backend reads landing): each connection sends them with one write at the end
    instead of one system call per reply."""

    def __init__(self) -> None:
        self.active = False
        self.pending: list[Connection] = []

    def begin(self) -> bool:
        """Start gathering (False if a batch is already open: its owner ends it)."""
        if self.active:
            return False
        self.active = True
        return True

    def end(self) -> None:
        """Send what each connection gathered."""
        self.active = False
        pending, self.pending = self.pending, []
        for conn in pending:
            conn.write_gathered()


class Connection(asyncio.BufferedProtocol):
    """One NBD connection: the handshake, then the transmission phase.

    Bytes land in one receive buffer from the start (the handshake reads from it with
    :meth:`readexactly`; requests the client pipelined after OPT_GO stay there for the
    transmission phase). Requests are parsed out of that buffer; a large write payload
    is received straight into its own buffer (no copy through a stream). Requests whose
    data is in memory are served at once; the others (a read missing chunks, a write
    extending an uncached patch) run as tasks, at most ``MAX_TASKS`` (then reading
    pauses), and so does FLUSH (it waits for the writes before it). Replies larger than
    the socket takes at once pause reading too, so a slow reader cannot make us buffer
    without bound. A connection to a volume another writer holds (the destination of a
    live migration, or a connection whose volume was handed over) asks for the lock with
    its next request and waits for it (storage/nbd/handover.py); meanwhile it is idle.
    """

    MAX_TASKS = 64
    SMALL_PAYLOAD = 256 << 10  # larger write payloads get their own buffer

    def __init__(self, server: NbdServer, tls: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.tls = tls  # this listener serves only over TLS (NBD_OPT_STARTTLS first)
        self.peer_uid: int | None = None  # a unix socket's client uid (None: TCP)
        self.encrypted = False
        self.transport: Any = None
        self.sock: socket.socket | None = None
        self.sender: Sender | None = None  # replies go out through it once transmitting (not over TLS)
        self.vol: Volume | None = None
        self.name = ""  # the export, once chosen
        self.transmitting = False
        self.buf = bytearray(1 << 16)
        self.start = self.end = 0
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._acquiring: asyncio.Task[None] | None = None
        self.payload: bytearray | None = None
        self.payload_got = 0
        self.payload_req: tuple[int, int, int, int] | None = None  # flags, handle, offset, length
        self.tasks: set[asyncio.Task[None]] = set()
        self.out: list[bytes | bytearray] = []  # replies gathered while a ReplyBatch is active
        self.deferred = 0  # write / flush replies waiting for their group commit
        self.direct = 0  # direct reads in flight (:meth:`_direct_read`)
        self.last_request = 0.0  # time.monotonic() of the last request parsed
        self.paused_for_tasks = self.paused_for_writes = False
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        self.session: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:  # who connected (SO_PEERCRED)
            with contextlib.suppress(OSError):
                _pid, self.peer_uid, _gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                                 struct.calcsize("iII")))
        self.session = asyncio.get_running_loop().create_task(self.server.session(self))

    # ------------------------------------------------------------------ handshake
    async def readexactly(self, n: int) -> bytes:
        """The next ``n`` bytes of the handshake."""
        while self.end - self.start < n:
            if self.done.done():
                raise ConnectionError("the client closed the connection")
            self._want = n
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self.buf[self.start : self.start + n])
        self.start += n
        return data

    async def start_tls(self) -> None:
        """Upgrade the connection (after the server acknowledged NBD_OPT_STARTTLS): from
        now on the transport is the TLS one, and the client must have shown a certificate
        of the listener's CA."""
        assert self.tls is not None
        if self.end != self.start:  # the client sent more before our reply: not TLS
            raise ConnectionError("data before the TLS handshake")
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, self.tls, server_side=True,
                                              ssl_handshake_timeout=10)
        self.encrypted = True

    def begin(self, vol: Volume | None, name: str) -> None:
        """Enter the transmission phase on ``vol`` (None: wait for its lock first)."""
        self.name = name
        self.vol = vol
        self.transmitting = True
        self.transport.set_write_buffer_limits(high=8 << 20)
        # the raw socket of a TLS connection is never written to (the sends below bypass
        # the transport)
        sock = None if self.encrypted else self.transport.get_extra_info("socket")
        if sock is not None:
            # Our own handle on the connection for scatter-gather sends (same open file).
            with contextlib.suppress(OSError):
                self.sock = socket.socket(fileno=os.dup(sock.fileno()))
                self.sock.setblocking(False)
            # A whole 1 MiB reply (or write) fits in the socket at once.
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            if self.sock is not None and not self.transport.get_write_buffer_size():
                self.sender = Sender(asyncio.get_running_loop(), self.sock, self.pause_writing, self.resume_writing,
                                     self._close)
        if len(self.buf) < (1 << 20):
            rest = self.buf[self.start : self.end]
            self.buf = bytearray(1 << 20)
            self.buf[: len(rest)] = rest
            self.start, self.end = 0, len(rest)
        self._process()

    @property
    def busy(self) -> bool:
        """Whether a request is in flight, or received and not served yet."""
        return bool(self.tasks or self.deferred or self.direct or self.payload is not None
                    or self.end > self.start)

    def _acquire(self) -> None:
        """Pause until the server holds the volume's lock (once at a time)."""
        if self._acquiring is not None:
            return
        self.transport.pause_reading()

        async def wait() -> None:
            try:
                vol = await self.server.acquire(self.name)
                while vol.released:  # handed over again before we ran
                    vol = await self.server.acquire(self.name)
            except StorageError as exc:
                log.warning("export %s: %s", self.name, exc)
                self._close()
                return
            finally:
                self._acquiring = None
            self.vol = vol
            if not self.paused_for_tasks and not self.paused_for_writes and not self.transport.is_closing():
                self.transport.resume_reading()
            self._process()

        self._acquiring = asyncio.get_running_loop().create_task(wait())

    # ------------------------------------------------------------------ replies
    def write(self, data: bytes | bytearray) -> None:
        """Send bytes; while the server gathers the replies of a pass of completions
        (:class:`ReplyBatch`), they are kept and sent with one write at its end. (NBD
        replies may come in any order; each write holds whole replies.)"""
        batch = self.server.replies
        if batch.active:
            if not self.out:
                batch.pending.append(self)
            self.out.append(data)
        elif self.sender is not None:
            self.sender.send((data,))
        else:
            self.transport.write(data)

    def write_gathered(self) -> None:
        """Send the replies gathered during a batch, in one write."""
        out, self.out = self.out, []
        if not out or self.transport.is_closing():
            return
        if self.sender is not None:
            self.sender.send(out)
        else:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def send_read(self, handle: int, offset: int, length: int, extra: dict[bytes, tuple[int, bytes]] | None) -> None:
        """Reply to a read. A large one goes out with one scatter-gather ``sendmsg`` of
        the cached blocks themselves (storage/nbd/sender.py), a small one as a copy."""
        if self.transport.is_closing():
            return
        vol = self.vol
        assert vol is not None
        if length < 65536 or self.sender is None:
            out = vol.read_into(offset, length, extra, 16)
            p.REPLY.pack_into(out, 0, p.SIMPLE_REPLY_MAGIC, 0, handle)
            self.write(out)
            return
        self.sender.send([p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), *vol.read_views(offset, length, extra)])

    # ------------------------------------------------------------------ transport side
    def get_buffer(self, sizehint: int) -> memoryview:
        if self.payload is not None:
            return memoryview(self.payload)[self.payload_got :]
        if self.end == len(self.buf):
            if self.start:
                rest = self.end - self.start
                self.buf[:rest] = self.buf[self.start : self.end]
                self.start, self.end = 0, rest
            else:
                self.buf.extend(bytes(len(self.buf)))
        return memoryview(self.buf)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.payload is not None:
            self.payload_got += nbytes
            if self.payload_got < len(self.payload):
                return
            payload, self.payload = self.payload, None
            assert self.payload_req is not None
            flags, handle, offset, length = self.payload_req
            self.payload_req = None
            self._write_request(flags, handle, offset, length, memoryview(payload))
        else:
            self.end += nbytes
            if not self.transmitting:
                waiter = self._waiter
                if waiter is not None and not waiter.done() and self.end - self.start >= self._want:
                    waiter.set_result(None)
                return
        self._process()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if not self.done.done():
            self.done.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.paused_for_writes = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_for_writes = False
        if not self.paused_for_tasks and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ requests
    def _process(self) -> None:
        if not self.transmitting:
            return
        if self.vol is None:
            if self.end > self.start:  # a request to serve: now the volume is needed here
                self._acquire()
            return
        buf = self.buf
        while self.payload is None and self.end - self.start >= 28 and not self.transport.is_closing():
            magic, flags, cmd, handle, offset, length = p.REQUEST.unpack_from(buf, self.start)
            self.last_request = time.monotonic()
            if magic != p.REQUEST_MAGIC:
                self._close()
                return
            if cmd == p.CMD_WRITE:
                if length > p.MAX_REQUEST:
                    self._close()
                    return
                have = self.end - self.start - 28
                if have >= length:
                    data = memoryview(bytes(buf[self.start + 28 : self.start + 28 + length]))
                    self.start += 28 + length
                    self._write_request(flags, handle, offset, length, data)
                elif length > self.SMALL_PAYLOAD or self.start + 28 + length > len(buf):
                    self.payload = bytearray(length)
                    self.payload[:have] = buf[self.start + 28 : self.end]
                    self.payload_got = have
                    self.payload_req = (flags, handle, offset, length)
                    self.start = self.end = 0
                    return
                else:
                    return  # wait for the rest of a small payload
            else:
                self.start += 28
                self._request(cmd, flags, handle, offset, length)
        if self.start == self.end:
            self.start = self.end = 0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self.tasks) >= self.MAX_TASKS and not self.paused_for_tasks:
            self.paused_for_tasks = True
            self.transport.pause_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.paused_for_tasks and len(self.tasks) < self.MAX_TASKS // 2:
            self.paused_for_tasks = False
            if not self.paused_for_writes and not self.transport.is_closing():
                self.transport.resume_reading()

    def _write_request(self, flags: int, handle: int, offset: int, length: int, data: memoryview) -> None:
        server, vol = self.server, self.vol
        assert vol is not None
        fua = bool(flags & p.CMD_FLAG_FUA)
        if vol.write_needs(offset, length):
            self._spawn(server.write_task(vol, self, handle, offset, length, data, fua))
        else:
            server.finish(self, handle, server.mutate(vol, offset, length, data), fua)
        if server.pool.log.pending_size > (4 << 20):
            server.schedule()

    def _request(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        server, vol = self.server, self.vol
        assert vol is not None
        if cmd == p.CMD_READ:
            if offset >= 0 and offset + length <= vol.size and length <= p.MAX_REQUEST:
                sequential = server.reads.note_read(vol, offset, length)
                needs = vol.read_needs(offset, length)
                if not needs:
                    try:
                        self.send_read(handle, offset, length, None)
                    except StorageError:
                        log.exception("read failed")
                        self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))
                    return
                if len(needs) == 1 and not sequential and self._direct_read(handle, offset, length, needs[0]):
                    return
                self._spawn(server.read_task(vol, self, handle, offset, length, sequential))
            else:
                self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
        elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            fua = bool(flags & p.CMD_FLAG_FUA)
            if vol.write_needs(offset, length):
                self._spawn(server.write_task(vol, self, handle, offset, length, None, fua))
            else:
                server.finish(self, handle, server.mutate(vol, offset, length, None), fua)
        elif cmd == p.CMD_FLUSH:
            self._spawn(self._flush(handle))
        elif cmd == p.CMD_CACHE:
            self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
        elif cmd == p.CMD_DISC:
            self._spawn(self._disconnect())
        else:
            self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))

    def _direct_read(self, handle: int, offset: int, length: int, need: tuple[bytes, int, int]) -> bool:
        """A small random read lacking one range of one uncompressed chunk (the common
        cache miss): one backend read and a callback, no task. False if it is not that."""
        h, start, n = need
        vol = self.vol
        assert vol is not None
        loc = self.server.pool.log.index.get(h)
        if loc is None or loc.flags != RAW or not 0 <= n <= SMALL_READ or self.server.reads.being_read(loc):
            return False

        generation = vol.generation

        def landed(data: bytes | None, exc: BaseException | None) -> None:
            self.direct -= 1
            if exc is not None or data is None or len(data) != n:
                self._spawn(self.server.read_task(vol, self, handle, offset, length, False))
                return
            unchanged = vol.generation == generation and self.vol is vol and not vol.released
            if unchanged and n == length:  # the whole request was that range: reply with it
                if not self.transport.is_closing():
                    self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle) + data)
                return
            extra = {h: (start, data)}
            if not unchanged and vol.read_needs(offset, length, extra):  # the map changed meanwhile
                self._spawn(self.server.read_task(vol, self, handle, offset, length, False))
                return
            try:
                self.send_read(handle, offset, length, extra)
            except StorageError:
                log.exception("read failed")
                self.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))

        self.direct += 1
        self.server.reads.read_cb(loc.segment, loc.offset + start, n, landed)
        return True

    async def _flush(self, handle: int) -> None:
        # Writes still fetching what they extend were not acknowledged yet, but wait for
        # them anyway so FLUSH covers everything sent before it.
        others = [t for t in self.tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self.server.defer_reply(self, p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), True)

    async def _disconnect(self) -> None:
        others = [t for t in self.tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self.server.schedule()
        self._close()

    def _close(self) -> None:
        if self.sender is not None and self.sender.queue:
            self.sender.then(self.transport.close)  # the replies still waiting go first
        else:
            self.transport.close()
