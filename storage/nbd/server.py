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
import contextlib
import ctypes
import logging
import os
import signal
import struct
import sys
from typing import Any

from storage.chunks import RAW, ChunkCodec
from storage.engine import CHECKPOINT_BYTES, Pool, Volume, open_pool
from storage.errors import CorruptionError, InvalidArgument, StorageError
from storage.log import CHUNK_HEAD, CHUNK_RECORDS, HEADER, MAP_RECORDS, Location
from storage.nbd import protocol as p

log = logging.getLogger("cairn.nbd")
MAX_GROUPS = 4  # group commits in flight
READAHEAD = (4 << 20) + (256 << 10)  # a sequential read fetches a whole 4 MiB segment region (+ record headers)
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
    libc.mallopt(m_trim_threshold, 64 << 20)
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
        self._waiting: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._sync = False
        self._scheduled = False
        self._servers: list[asyncio.Server] = []
        self.connections = 0
        # Segment ranges being read: (start, end, future) per segment.
        self._reading: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._last_end: dict[str, int] = {}
        self._codec = ChunkCodec()

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
        self.pool.log.commit(sync=True)
        self.pool.close()

    def export_names(self) -> list[str]:
        """Names offered to clients."""
        return self.exports if self.exports is not None else self.pool.list_volumes()

    # ----------------------------------------------------------------- group commit
    def _defer_reply(self, writer: asyncio.StreamWriter, reply: bytes, sync: bool) -> None:
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
        if self.pool.log.groups_in_flight >= MAX_GROUPS:
            return  # _committed schedules us again
        waiting, self._waiting = self._waiting, []
        sync, self._sync = self._sync, False
        future = asyncio.wrap_future(self.pool.log.commit_async(sync=sync))
        future.add_done_callback(lambda f: self._committed(f, waiting))

    def _committed(self, future: asyncio.Future[None], waiting: list[tuple[asyncio.StreamWriter, bytes]]) -> None:
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
                for vol in list(self.pool._open.values()):
                    if vol._since_checkpoint > CHECKPOINT_BYTES:
                        vol.checkpoint()
            except StorageError:
                log.exception("checkpoint failed")
        if self._waiting or self.pool.log.pending_size:
            self._schedule()

    # ----------------------------------------------------------------- handshake
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            vol = await self._handshake(reader, writer)
            if vol is not None:
                await self._transmission(vol, reader, writer)
        except (Disconnect, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("NBD session failed")
        finally:
            self.connections -= 1
            writer.close()
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

        def settle(data: bytes | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(data or b"")

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            loop.call_soon_threadsafe(settle, data, exc)

        self.pool.log.read_async(seg, offset, length, done)
        return fut

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
                waits.append(self._fetch_range(h, loc, start, n, extra))
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
        codec = self._codec
        view = memoryview(blob)
        for loc, h in items:
            at = loc.offset - start
            if at + loc.length > len(blob):
                raise CorruptionError(f"chunk {h.hex()} truncated in {seg}")
            chunks.remember(h, codec.decode(loc.flags, bytes(view[at : at + loc.length]), loc.raw_length))
        if stop > end:
            self._readahead(seg, start, view, end - start)

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
                    chunks.remember(h, self._codec.decode(flags, bytes(view[at : body + length]), raw))
            elif rtype not in MAP_RECORDS:
                return
            pos = body + length

    # ----------------------------------------------------------------- transmission
    async def _read(self, vol: Volume, writer: asyncio.StreamWriter, handle: int, offset: int, length: int,
                    slots: asyncio.Semaphore) -> None:
        try:
            if length > p.MAX_REQUEST or offset < 0 or offset + length > vol.size:
                raise InvalidArgument("read out of range")
            sequential = length >= (128 << 10) or self._last_end.get(vol.name) == offset
            self._last_end[vol.name] = offset + length
            extra: dict[bytes, tuple[int, bytes]] = {}
            for _ in range(4):
                needs = vol.read_needs(offset, length, extra)
                if not needs:
                    break
                await self._fetch(needs, extra, sequential)
            out = vol.read_into(offset, length, extra)
            header = p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle)
            if length < 65536:
                writer.write(header + out)
            else:
                writer.write(header)
                writer.write(out)
        except InvalidArgument:
            writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
        except StorageError:
            log.exception("read failed")
            writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))
        finally:
            slots.release()

    async def _write(self, vol: Volume, writer: asyncio.StreamWriter, handle: int, offset: int, length: int,
                     data: bytes | None, fua: bool, slots: asyncio.Semaphore) -> None:
        try:
            try:
                for _ in range(3):
                    needs = vol.write_needs(offset, length)
                    if not needs:
                        break
                    await self._fetch(needs, {}, False)
            except StorageError:
                pass  # the write itself reports it
            self._finish(writer, handle, self._mutate(vol, offset, length, data), fua)
        finally:
            slots.release()

    async def _transmission(self, vol: Volume, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending_reads = 0
        slots = asyncio.Semaphore(64)
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        while True:
            magic, flags, cmd, handle, offset, length = p.REQUEST.unpack(await reader.readexactly(28))
            if magic != p.REQUEST_MAGIC:
                raise Disconnect("bad request magic")
            fua = bool(flags & p.CMD_FLAG_FUA)
            if cmd == p.CMD_WRITE:
                if length > p.MAX_REQUEST:
                    raise Disconnect("write too large")
                data = await reader.readexactly(length)
                await slots.acquire()
                if vol.write_needs(offset, length):
                    spawn(self._write(vol, writer, handle, offset, length, data, fua, slots))
                else:
                    slots.release()
                    self._finish(writer, handle, self._mutate(vol, offset, length, data), fua)
            elif cmd == p.CMD_READ:
                await slots.acquire()
                spawn(self._read(vol, writer, handle, offset, length, slots))
                pending_reads += length
                if pending_reads > (8 << 20):
                    pending_reads = 0
                    await writer.drain()
            elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                await slots.acquire()
                spawn(self._write(vol, writer, handle, offset, length, None, fua, slots))
            elif cmd == p.CMD_FLUSH:
                # Writes still fetching their old block were not acknowledged yet, but wait
                # for them anyway so FLUSH covers everything sent before it.
                if tasks:
                    await asyncio.gather(*list(tasks))
                self._defer_reply(writer, p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), True)
            elif cmd == p.CMD_CACHE:
                writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
            elif cmd == p.CMD_DISC:
                if tasks:
                    await asyncio.gather(*list(tasks))
                self._schedule()
                return
            else:
                writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
            if self.pool.log.pending_size > (4 << 20):
                self._schedule()

    def _mutate(self, vol: Volume, offset: int, length: int, data: bytes | None) -> int:
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

    def _finish(self, writer: asyncio.StreamWriter, handle: int, err: int, fua: bool) -> None:
        reply = p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, handle)
        if err:
            writer.write(reply)
        else:
            self._defer_reply(writer, reply, fua)


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
