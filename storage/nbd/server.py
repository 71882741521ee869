"""``cairn-nbd``: an asyncio NBD server exporting the volumes of a dedup pool.

Fixed newstyle handshake (OPT_GO / INFO / LIST / EXPORT_NAME), simple replies, READ /
WRITE / FLUSH / TRIM / WRITE_ZEROES / CACHE with FUA, block-size info, any number of
connections per export (one :class:`~storage.engine.Volume` object is shared, so they
see each other's writes), unix socket and TCP.

Group commit: writes are staged in the engine as requests arrive and all writes staged
during one event-loop pass are journaled by a single backend append; only then are
they acknowledged. FLUSH and FUA additionally sync the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from storage.chunks import RAW, ZERO_HASH
from storage.engine import Pool, Volume, open_pool
from storage.errors import InvalidArgument, StorageError
from storage.nbd import protocol as p

log = logging.getLogger("cairn.nbd")


class Disconnect(Exception):
    """The client ended the session (or broke the protocol)."""


class NbdServer:
    """Serves a pool's volumes (all of them, or the ``exports`` listed) over NBD."""

    def __init__(self, pool: Pool, exports: list[str] | None = None, read_only: bool = False) -> None:
        self.pool = pool
        self.exports = exports
        self.read_only = read_only
        self._waiting: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._sync = False
        self._scheduled = False
        self._inflight = False
        self._servers: list[asyncio.Server] = []
        self.connections = 0
        # Backend reads run here so one slow RADOS read does not stall every other request.
        self._readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="nbd-read")

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
        self._readers.shutdown(wait=True)
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
        if not self._scheduled and not self._inflight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        """Start one journal append with everything staged; replies go out when it lands.
        While it is in flight, new writes keep being staged for the next one."""
        self._scheduled = False
        if self._inflight or (not self._waiting and not self.pool.log.pending_size):
            return
        waiting, self._waiting = self._waiting, []
        sync, self._sync = self._sync, False
        self._inflight = True
        future = asyncio.wrap_future(self.pool.log.commit_async(sync=sync))
        future.add_done_callback(lambda f: self._committed(f, waiting))

    def _committed(self, future: asyncio.Future[None], waiting: list[tuple[asyncio.StreamWriter, bytes]]) -> None:
        self._inflight = False
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
        try:
            for vol in list(self.pool._open.values()):
                if vol._since_checkpoint > (32 << 20):
                    vol.checkpoint()
        except StorageError:
            log.exception("checkpoint failed")
        if self._waiting:
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

    # ----------------------------------------------------------------- transmission
    async def _prefetch(self, vol: Volume, offset: int, length: int, partial_only: bool) -> None:
        """Bring the chunks a request needs into the cache without blocking the loop."""
        chunks = self.pool.chunks
        misses = chunks.missing(vol.blocks_needed(offset, length, partial_only))
        if misses:
            loop = asyncio.get_running_loop()
            chunks.remember_many(await loop.run_in_executor(self._readers, chunks.fetch, misses))

    async def _small_raw_read(self, vol: Volume, offset: int, length: int) -> bytes | None:
        """A small read inside one uncached, uncompressed chunk: fetch just those bytes
        (a 4 KiB random read need not move 64 KiB out of RADOS)."""
        bs = vol.block
        if length > 16384 or offset < 0 or offset + length > vol.size or offset // bs != (offset + length - 1) // bs:
            return None
        h = vol.map.get(offset // bs)
        chunks = self.pool.chunks
        if h == ZERO_HASH or not chunks.missing([h]):
            return None
        loc = self.pool.log.index[h]
        if loc.flags != RAW:
            return None
        at = loc.offset + offset % bs
        loop = asyncio.get_running_loop()
        data: bytes = await loop.run_in_executor(self._readers, self.pool.log.backend.get, loc.segment, at, length)
        return data if len(data) == length else None

    async def _read(self, vol: Volume, writer: asyncio.StreamWriter, handle: int, offset: int, length: int,
                    slots: asyncio.Semaphore) -> None:
        try:
            if length > p.MAX_REQUEST:
                raise InvalidArgument("read too large")
            out = await self._small_raw_read(vol, offset, length)
            if out is None:
                await self._prefetch(vol, offset, length, False)
                out = vol.read(offset, length)
            writer.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle) + out if length < 65536 else
                         p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle))
            if length >= 65536:
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
                await self._prefetch(vol, offset, length, True)
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
                if vol.blocks_needed(offset, length, True):
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
            if self.pool.log.pending_size > (16 << 20):
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
