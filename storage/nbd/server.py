"""``cairn-nbd``: an asyncio NBD server exporting the volumes of a dedup pool.

Fixed newstyle handshake (OPT_GO / INFO / LIST / EXPORT_NAME), simple replies, READ /
WRITE / FLUSH / TRIM / WRITE_ZEROES / CACHE with FUA, block-size info, any number of
connections per export (one :class:`~storage.engine.Volume` object is shared, so they
see each other's writes), unix socket and TCP.

Group commit: writes are staged in the engine as requests arrive and all writes staged
during one event-loop pass are journaled together; only then are they acknowledged.
Up to ``MAX_GROUPS`` group commits are in flight at once (the log keeps their journal
records in order and completes them in order). FLUSH and FUA additionally sync.

Reads never block the event loop: what a request lacks in memory is read with the
backend's asynchronous reads (librados aio), neighbouring chunks of a segment in one
read, a small read of an uncompressed chunk as just its bytes, and a sequential read
with read-ahead to the end of the chunk's 4 MiB segment region (chunks of a sequential
write are laid out contiguously there). Concurrent requests wait for a read already
in flight instead of issuing their own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from storage.chunks import RAW, ChunkCodec
from storage.engine import CHECKPOINT_BYTES, Pool, Volume, open_pool
from storage.errors import CorruptionError, InvalidArgument, StorageError
from storage.log import CHUNK_HEAD, CHUNK_RECORDS, HEADER, MAP_RECORDS, Location
from storage.nbd import protocol as p

log = logging.getLogger("cairn.nbd")
MAX_GROUPS = 16  # group commits in flight
GROUP_BYTES = 2 << 20  # with two groups in flight, a new one waits until it has this much
READAHEAD = (4 << 20) + (256 << 10)  # a sequential read fetches a whole 4 MiB segment region (+ record headers)
AHEAD = 32 << 20  # a sequential reader gets this much of the volume read ahead of it
SMALL_READ = 16 << 10  # up to this, a read of an uncompressed chunk fetches just its bytes
_REC_OVERHEAD = HEADER.size + CHUNK_HEAD.size


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the kernel at once.

    The data path allocates and frees megabyte buffers all the time; by default glibc
    serves them with fresh mmap()s (or trims the heap after them), so every buffer costs
    a page fault per 4 KiB: ~1.4 ms per MiB on a VM, more than hashing it. Process-wide,
    done once by the NBD server; RSS stays bounded by the high-water mark plus 64 MiB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 16 << 20)
    libc.mallopt(m_top_pad, 8 << 20)


class Disconnect(Exception):
    """The client ended the session (or broke the protocol)."""


class NbdServer:
    """Serves a pool's volumes (all of them, or the ``exports`` listed) over NBD."""

    def __init__(self, pool: Pool, exports: list[str] | None = None, read_only: bool = False) -> None:
        tune_malloc()
        self.pool = pool
        self.exports = exports
        self.read_only = read_only
        self._waiting: list[tuple[Any, bytes]] = []
        self._sync = False
        self._scheduled = False
        self._servers: list[asyncio.Server] = []
        self.connections = 0
        # Segment ranges being read: (start, end, future) per segment.
        self._reading: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._last_end: dict[str, int] = {}
        self._ahead: dict[str, int] = {}  # volume read-ahead issued up to here
        self._background: set[asyncio.Task[None]] = set()
        self._codec = ChunkCodec()
        self._completed: collections.deque[tuple[Any, bytes | None, BaseException | None]] = collections.deque()
        self._wake_pending = False
        self._reads_in_flight = 0

    # ----------------------------------------------------------------- lifecycle
    async def listen_unix(self, path: str) -> None:
        """Accept connections on a unix socket (replacing a stale socket file)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._servers.append(await asyncio.start_unix_server(self._client, path=path, limit=1 << 20))

    async def listen_tcp(self, host: str, port: int) -> None:
        """Accept connections on TCP."""
        self._servers.append(await asyncio.start_server(self._client, host, port, limit=1 << 20))

    async def close(self) -> None:
        """Stop listening, journal what is staged, checkpoint the volumes."""
        for s in self._servers:
            s.close()
        for t in list(self._background):
            t.cancel()
        # Backend reads still in flight must land before the backend goes away.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while self._reads_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.pool.log.commit(sync=True)
        self.pool.close()

    def export_names(self) -> list[str]:
        """Names offered to clients."""
        return self.exports if self.exports is not None else self.pool.list_volumes()

    # ----------------------------------------------------------------- group commit
    def _defer_reply(self, writer: Any, reply: bytes, sync: bool) -> None:
        self._waiting.append((writer, reply))
        self._sync |= sync
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        """Start a group commit with everything staged; its replies go out when it lands.
        Meanwhile new writes are staged for the next one."""
        self._scheduled = False
        if not self._waiting and not self.pool.log.pending_size:
            return
        in_flight = self.pool.log.groups_in_flight
        if in_flight >= MAX_GROUPS:
            return  # _committed schedules us again
        if in_flight >= 2 and not self._sync and self.pool.log.pending_size < GROUP_BYTES:
            return  # let the group grow until one lands (fewer, larger RADOS ops)
        waiting, self._waiting = self._waiting, []
        sync, self._sync = self._sync, False
        future = asyncio.wrap_future(self.pool.log.commit_async(sync=sync))
        future.add_done_callback(lambda f: self._committed(f, waiting))

    def _committed(self, future: asyncio.Future[None], waiting: list[tuple[Any, bytes]]) -> None:
        error = 0
        exc = future.exception()
        if exc is not None:
            log.error("journal commit failed: %s", exc)
            error = p.EIO
        for writer, reply in waiting:
            if writer.is_closing():
                continue
            if error:
                magic, _err, handle = p.REPLY.unpack(reply)
                reply = p.REPLY.pack(magic, error, handle)
            writer.write(reply)
        if not error:
            try:
                for vol in self.pool.open_volumes():
                    if vol._since_checkpoint > CHECKPOINT_BYTES:
                        vol.checkpoint()
            except StorageError:
                log.exception("checkpoint failed")
        if self._waiting or self.pool.log.pending_size:
            self._schedule()

    # ----------------------------------------------------------------- handshake
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handed_over = False
        try:
            vol = await self._handshake(reader, writer)
            if vol is not None:
                handed_over = True
                await self._transmission(vol, reader, writer)
        except (Disconnect, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("NBD session failed")
        finally:
            self.connections -= 1
            writer.close()
            if not handed_over:  # else the stream protocol is gone and would never report closing
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    def _flags(self) -> int:
        flags = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
                 | p.TF_CAN_MULTI_CONN | p.TF_SEND_CACHE)
        return flags | (p.TF_READ_ONLY if self.read_only else 0)

    def _resolve(self, name: str) -> Volume | None:
        names = self.export_names()
        if name == "" and len(names) == 1:
            name = names[0]
        if name not in names:
            return None
        try:
            return self.pool.open_volume(name)
        except StorageError:
            return None

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Volume | None:
        writer.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await reader.readexactly(4))

        def reply(opt: int, rtype: int, data: bytes = b"") -> None:
            writer.write(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

        while True:
            magic, opt, length = p.OPTION.unpack(await reader.readexactly(16))
            if magic != p.IHAVEOPT or length > 65536:
                raise Disconnect("bad option")
            data = await reader.readexactly(length) if length else b""
            if opt == p.OPT_EXPORT_NAME:
                vol = self._resolve(data.decode(errors="replace"))
                if vol is None:
                    raise Disconnect("unknown export")
                zeroes = b"" if cflags & p.CLIENT_NO_ZEROES else bytes(124)
                writer.write(struct.pack(">QH", vol.size, self._flags()) + zeroes)
                return vol
            if opt == p.OPT_ABORT:
                reply(opt, p.REP_ACK)
                await writer.drain()
                return None
            if opt == p.OPT_LIST:
                for name in self.export_names():
                    raw = name.encode()
                    reply(opt, p.REP_SERVER, struct.pack(">I", len(raw)) + raw)
                reply(opt, p.REP_ACK)
            elif opt in (p.OPT_INFO, p.OPT_GO):
                if len(data) < 6:
                    reply(opt, p.REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack_from(">I", data, 0)
                name = data[4 : 4 + nlen].decode(errors="replace")
                (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
                requests = struct.unpack_from(f">{nreq}H", data, 6 + nlen)
                vol = self._resolve(name)
                if vol is None:
                    reply(opt, p.REP_ERR_UNKNOWN, f"no export {name!r}".encode())
                    continue
                reply(opt, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, vol.size, self._flags()))
                reply(opt, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, vol.block, p.MAX_REQUEST))
                if p.INFO_NAME in requests:
                    reply(opt, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + vol.name.encode())
                if p.INFO_DESCRIPTION in requests:
                    reply(opt, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION) + b"cairn dedup volume")
                reply(opt, p.REP_ACK)
                if opt == p.OPT_GO:
                    return vol
            else:
                reply(opt, p.REP_ERR_UNSUP)

    # ----------------------------------------------------------------- backend reads
    def _aio_read(self, seg: str, offset: int, length: int) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            # Completions are handed over in batches: one loop wake-up for all of those
            # that arrive while the loop is busy.
            self._completed.append((fut, data, exc))
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self._settle_completed)

        self._reads_in_flight += 1
        self.pool.log.read_async(seg, offset, length, done)
        return fut

    def _aio_read_cb(self, seg: str, offset: int, length: int,
                     cb: Callable[[bytes | None, BaseException | None], None]) -> None:
        """Like :meth:`_aio_read`, calling ``cb(data, exc)`` on the loop instead."""
        loop = asyncio.get_running_loop()

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            self._completed.append((cb, data, exc))
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self._settle_completed)

        self._reads_in_flight += 1
        self.pool.log.read_async(seg, offset, length, done)

    def _settle_completed(self) -> None:
        self._wake_pending = False
        completed = self._completed
        while completed:
            fut, data, exc = completed.popleft()
            self._reads_in_flight -= 1
            if not isinstance(fut, asyncio.Future):
                try:
                    fut(data, exc)
                except Exception:
                    log.exception("read completion failed")
                continue
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(data or b"")

    def _read_ahead(self, vol: Volume, start: int) -> None:
        """After a sequential read ending at ``start``, bring the next ``AHEAD`` bytes of
        the volume into the cache in the background (each range is looked at once)."""
        done_until = self._ahead.get(vol.name, 0)
        if done_until > start + AHEAD // 2:
            return  # far enough ahead already
        if done_until < start or done_until > start + AHEAD:
            done_until = start  # a new sequential run
        end = min(vol.size, start + AHEAD)
        if end <= done_until:
            return
        self._ahead[vol.name] = end
        needs = vol.read_needs(done_until, end - done_until)
        if needs:
            task = asyncio.get_running_loop().create_task(self._fetch(needs, {}, True))
            self._background.add(task)
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("read-ahead failed: %s", task.exception())

    def _being_read(self, loc: Location) -> asyncio.Future[None] | None:
        for start, end, fut in self._reading.get(loc.segment, ()):
            if start <= loc.offset and loc.offset + loc.length <= end:
                return fut
        return None

    async def _fetch(self, needs: list[tuple[bytes, int, int]], extra: dict[bytes, tuple[int, bytes]],
                     sequential: bool) -> None:
        """Bring what ``needs`` lists into the chunk cache (whole chunks) or ``extra``
        (small ranges of uncompressed chunks), with as few backend reads as possible."""
        index = self.pool.log.index
        waits: list[asyncio.Future[Any]] = []
        whole: dict[str, list[tuple[Location, bytes]]] = {}
        seen: set[bytes] = set()
        for h, start, n in needs:
            loc = index.get(h)
            if loc is None or h in seen:
                continue  # the read itself reports a missing chunk
            seen.add(h)
            fut = self._being_read(loc)
            if fut is not None:
                waits.append(fut)
            elif 0 <= n <= SMALL_READ and loc.flags == RAW and not sequential:
                waits.append(asyncio.ensure_future(self._fetch_range(h, loc, start, n, extra)))
            else:
                whole.setdefault(loc.segment, []).append((loc, h))
        for seg, items in whole.items():
            items.sort(key=lambda m: m[0].offset)
            i = 0
            while i < len(items):
                first = items[i][0]
                end = first.offset + first.length
                j = i + 1
                while (j < len(items) and 0 <= items[j][0].offset - end < 65536
                       and items[j][0].offset + items[j][0].length - first.offset < (8 << 20)):
                    end = max(end, items[j][0].offset + items[j][0].length)
                    j += 1
                start = first.offset - _REC_OVERHEAD
                stop = max(end, start + READAHEAD) if sequential else end
                # Registered now, before any other request runs: they wait for this read.
                entry = (start, stop, asyncio.get_running_loop().create_future())
                self._reading.setdefault(seg, []).append(entry)
                waits.append(asyncio.ensure_future(self._fetch_run(seg, entry, end, items[i:j])))
                i = j
        if waits:
            await asyncio.gather(*waits)

    async def _fetch_range(self, h: bytes, loc: Location, start: int, n: int,
                           extra: dict[bytes, tuple[int, bytes]]) -> None:
        data = await self._aio_read(loc.segment, loc.offset + start, n)
        if len(data) == n:
            extra[h] = (start, data)

    async def _fetch_run(self, seg: str, entry: tuple[int, int, asyncio.Future[None]], end: int,
                         items: list[tuple[Location, bytes]]) -> None:
        """Read ``[start, stop)`` of a segment (``entry``, registered in ``_reading``): the
        chunks in ``items`` (ending at ``end``), then, as read-ahead, the records after them."""
        start, stop, marker = entry
        try:
            blob = await self._aio_read(seg, start, stop - start)
        finally:
            ranges = self._reading[seg]
            ranges.remove(entry)
            if not ranges:
                del self._reading[seg]
            marker.set_result(None)
        chunks = self.pool.chunks
        view = memoryview(blob)
        for loc, h in items:
            at = loc.offset - start
            if at + loc.length > len(blob):
                raise CorruptionError(f"chunk {h.hex()} truncated in {seg}")
            chunks.remember(h, self._decoded(view, at, at + loc.length, loc.flags, loc.raw_length))
        if stop > end:
            self._readahead(seg, start, view, end - start)

    def _decoded(self, view: memoryview, at: int, end: int, flags: int, raw_length: int) -> bytes:
        """A chunk's bytes out of a segment read. An uncompressed data block is kept as a
        view into the read buffer (no copy; the views of one read are cached and evicted
        together); anything else (patches, map shards) as its own bytes."""
        if flags == RAW and raw_length == self.pool.chunk_size and end - at == raw_length:
            return view[at:end]  # type: ignore[return-value]
        return self._codec.decode(flags, bytes(view[at:end]), raw_length)

    def _readahead(self, seg: str, start: int, view: memoryview, pos: int) -> None:
        """Cache the chunk records of ``view`` (segment bytes from ``start``) from ``pos``
        on, trusting only those the index places exactly there."""
        index = self.pool.log.index
        chunks = self.pool.chunks
        size = len(view)
        while pos + _REC_OVERHEAD <= size:
            length, _crc, rtype = HEADER.unpack_from(view, pos)
            body = pos + HEADER.size
            if body + length > size:
                return
            if rtype in CHUNK_RECORDS:
                h, flags, raw = CHUNK_HEAD.unpack_from(view, body)
                at = body + CHUNK_HEAD.size
                loc = index.get(h)
                if (loc is not None and loc.segment == seg and loc.offset == start + at
                        and loc.length == body + length - at and not chunks.has(h)):
                    chunks.remember(h, self._decoded(view, at, body + length, flags, raw))
            elif rtype not in MAP_RECORDS:
                return
            pos = body + length

    # ----------------------------------------------------------------- transmission
    async def _read(self, vol: Volume, writer: Any, handle: int, offset: int, length: int,
                    slots: asyncio.Semaphore, sequential: bool) -> None:
        try:
            extra: dict[bytes, tuple[int, bytes]] = {}
            for _ in range(4):
                needs = vol.read_needs(offset, length, extra)
                if not needs:
                    break
                await self._fetch(needs, extra, sequential)
            writer.send_read(handle, offset, length, extra)
        except InvalidArgument:
            writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
        except StorageError:
            log.exception("read failed")
            writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))

    async def _write(self, vol: Volume, writer: Any, handle: int, offset: int, length: int,
                     data: bytes | memoryview | None, fua: bool, slots: asyncio.Semaphore) -> None:
        try:
            for _ in range(3):
                needs = vol.write_needs(offset, length)
                if not needs:
                    break
                await self._fetch(needs, {}, False)
        except StorageError:
            pass  # the write itself reports it
        self._finish(writer, handle, self._mutate(vol, offset, length, data), fua)

    async def _transmission(self, vol: Volume, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests until the client disconnects: the transport is handed to a
        :class:`_Requests` protocol (requests parsed straight out of the receive buffer,
        large write payloads received in place, cached reads answered without a task)."""
        transport: Any = writer.transport
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)  # requests the client pipelined after OPT_GO
        buffered.clear()
        proto = _Requests(self, vol, transport)
        transport.set_protocol(proto)
        transport.resume_reading()
        if leftover:
            proto.feed(leftover)
        await proto.done

    def _mutate(self, vol: Volume, offset: int, length: int, data: bytes | memoryview | None) -> int:
        """Stage a write (``data``) or a zeroing (``None``); return an NBD errno."""
        if self.read_only:
            return p.EPERM
        if offset + length > vol.size:
            return p.ENOSPC
        try:
            if data is None:
                vol.write_zeroes(offset, length)
            else:
                vol.write(offset, data)
        except InvalidArgument:
            return p.EINVAL
        except StorageError:
            log.exception("write failed")
            return p.EIO
        return 0

    def _finish(self, writer: Any, handle: int, err: int, fua: bool) -> None:
        reply = p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, handle)
        if err:
            writer.write(reply)
        else:
            self._defer_reply(writer, reply, fua)


class _Requests(asyncio.BufferedProtocol):
    """The transmission phase of one NBD connection.

    Requests are parsed out of one receive buffer; a large write payload is received
    straight into its own buffer (no copy through a stream). Requests whose data is in
    memory are served at once; the others (a read missing chunks, a write extending an
    uncached patch) run as tasks, at most ``MAX_TASKS`` (then reading pauses), and so does
    FLUSH (it waits for the writes before it). Replies larger than the socket takes at
    once pause reading too, so a slow reader cannot make us buffer without bound.
    """

    MAX_TASKS = 64
    SMALL_PAYLOAD = 256 << 10  # larger write payloads get their own buffer

    def __init__(self, server: NbdServer, vol: Volume, transport: Any) -> None:
        self.server = server
        self.vol = vol
        self.transport: Any = transport
        self.transport.set_write_buffer_limits(high=8 << 20)
        sock = transport.get_extra_info("socket")
        self.sock: socket.socket | None = None
        if sock is not None:
            # Our own handle on the connection for scatter-gather sends (same open file).
            with contextlib.suppress(OSError):
                self.sock = socket.socket(fileno=os.dup(sock.fileno()))
                self.sock.setblocking(False)
            # A whole 1 MiB reply (or write) fits in the socket at once: no partial send
            # whose rest the transport would copy and send again later.
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self.buf = bytearray(1 << 20)
        self.start = self.end = 0
        self.payload: bytearray | None = None
        self.payload_got = 0
        self.payload_req: tuple[int, int, int, int] | None = None  # flags, handle, offset, length
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(1 << 30)  # the task count is bounded by pausing instead
        self.paused_for_tasks = self.paused_for_writes = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ replies
    def write(self, data: bytes | bytearray) -> None:
        self.transport.write(data)

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def send_read(self, handle: int, offset: int, length: int, extra: dict[bytes, tuple[int, bytes]] | None) -> None:
        """Reply to a read. A large one goes out with one scatter-gather ``sendmsg`` of
        the cached blocks themselves when nothing is queued before it (what the socket
        does not take is queued on the transport, in order)."""
        transport = self.transport
        if transport.is_closing():
            return
        if length < 65536 or self.sock is None or transport.get_write_buffer_size():
            out = self.vol.read_into(offset, length, extra, 16)
            p.REPLY.pack_into(out, 0, p.SIMPLE_REPLY_MAGIC, 0, handle)
            transport.write(out)
            return
        parts = [p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), *self.vol.read_views(offset, length, extra)]
        try:
            sent = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            transport.close()
            return
        if sent < 16 + length:
            rest = bytearray()
            for part in parts:
                n = len(part)
                if sent >= n:
                    sent -= n
                    continue
                rest += memoryview(part)[sent:]
                sent = 0
            transport.write(rest)

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
        self._process()

    def feed(self, data: bytes) -> None:
        """Bytes received before the protocol took over."""
        while data:
            view = self.get_buffer(len(data))
            n = min(len(view), len(data))
            view[:n] = data[:n]
            data = data[n:]
            self.buffer_updated(n)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.paused_for_writes = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_for_writes = False
        if not self.paused_for_tasks and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ requests
    def _process(self) -> None:
        buf = self.buf
        while self.payload is None and self.end - self.start >= 28 and not self.transport.is_closing():
            magic, flags, cmd, handle, offset, length = p.REQUEST.unpack_from(buf, self.start)
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
        fua = bool(flags & p.CMD_FLAG_FUA)
        if vol.write_needs(offset, length):
            self._spawn(server._write(vol, self.transport, handle, offset, length, data, fua, self.slots))
        else:
            server._finish(self.transport, handle, server._mutate(vol, offset, length, data), fua)
        if server.pool.log.pending_size > (4 << 20):
            server._schedule()

    def _request(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        server, vol, transport = self.server, self.vol, self.transport
        if cmd == p.CMD_READ:
            if offset >= 0 and offset + length <= vol.size and length <= p.MAX_REQUEST:
                sequential = length >= (128 << 10) or server._last_end.get(vol.name) == offset
                server._last_end[vol.name] = offset + length
                if sequential:
                    server._read_ahead(vol, offset + length)
                needs = vol.read_needs(offset, length)
                if not needs:
                    try:
                        self.send_read(handle, offset, length, None)
                    except StorageError:
                        log.exception("read failed")
                        transport.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))
                    return
                if len(needs) == 1 and not sequential and self._direct_read(handle, offset, length, needs[0]):
                    return
                self._spawn(server._read(vol, self, handle, offset, length, self.slots, sequential))
            else:
                transport.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
        elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            fua = bool(flags & p.CMD_FLAG_FUA)
            if vol.write_needs(offset, length):
                self._spawn(server._write(vol, transport, handle, offset, length, None, fua, self.slots))
            else:
                server._finish(transport, handle, server._mutate(vol, offset, length, None), fua)
        elif cmd == p.CMD_FLUSH:
            self._spawn(self._flush(handle))
        elif cmd == p.CMD_CACHE:
            transport.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
        elif cmd == p.CMD_DISC:
            self._spawn(self._disconnect())
        else:
            transport.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))

    def _direct_read(self, handle: int, offset: int, length: int, need: tuple[bytes, int, int]) -> bool:
        """A small random read lacking one range of one uncompressed chunk (the common
        cache miss): one backend read and a callback, no task. False if it is not that."""
        h, start, n = need
        loc = self.server.pool.log.index.get(h)
        if loc is None or loc.flags != RAW or not 0 <= n <= SMALL_READ or self.server._being_read(loc):
            return False

        def landed(data: bytes | None, exc: BaseException | None) -> None:
            if exc is not None or data is None or len(data) != n:
                self._spawn(self.server._read(self.vol, self, handle, offset, length, self.slots, False))
                return
            extra = {h: (start, data)}
            if self.vol.read_needs(offset, length, extra):  # the map changed meanwhile
                self._spawn(self.server._read(self.vol, self, handle, offset, length, self.slots, False))
                return
            try:
                self.send_read(handle, offset, length, extra)
            except StorageError:
                log.exception("read failed")
                self.transport.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))

        self.server._aio_read_cb(loc.segment, loc.offset + start, n, landed)
        return True

    async def _flush(self, handle: int) -> None:
        # Writes still fetching what they extend were not acknowledged yet, but wait for
        # them anyway so FLUSH covers everything sent before it.
        others = [t for t in self.tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self.server._defer_reply(self.transport, p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), True)

    async def _disconnect(self) -> None:
        others = [t for t in self.tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        self.server._schedule()
        self._close()

    def _close(self) -> None:
        self.transport.close()


def parse_size(text: str) -> int:
    """``10GiB``, ``512M``, ``4096`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


async def serve(args: argparse.Namespace) -> None:
    """Open the pool, create requested volumes, listen until SIGTERM/SIGINT."""
    url = args.backend or f"local://{os.path.abspath(args.pool_dir)}"
    pool = open_pool(url, chunk_size=args.chunk_size)
    for spec in args.create or []:
        name, _, size = spec.partition(":")
        if name not in pool.list_volumes():
            pool.create_volume(name, parse_size(size))
    server = NbdServer(pool, exports=args.export or None, read_only=args.read_only)
    if args.socket:
        await server.listen_unix(args.socket)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        await server.listen_tcp(host or "127.0.0.1", int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(str(os.getpid()))
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cairn-nbd``."""
    ap = argparse.ArgumentParser(prog="cairn-nbd", description="Serve Cairn dedup volumes over NBD.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool-dir", help="local pool directory")
    src.add_argument("--backend", help="backend URL (local:///dir or rados://pool/ns?conf=...)")
    ap.add_argument("--socket", help="unix socket path")
    ap.add_argument("--listen", help="TCP host:port")
    ap.add_argument("--export", action="append", help="export only this volume (repeatable)")
    ap.add_argument("--create", action="append", metavar="NAME:SIZE", help="create the volume if missing")
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--ready-file", help="written with our PID once listening")
    args = ap.parse_args(argv)
    if not args.socket and not args.listen:
        ap.error("give --socket and/or --listen")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

