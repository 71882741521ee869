"""``cairn-nbd``: an asyncio NBD server exporting the volumes of a dedup pool.

Fixed newstyle handshake (OPT_GO / INFO / LIST / EXPORT_NAME), simple replies, READ /
WRITE / FLUSH / TRIM / WRITE_ZEROES / CACHE with FUA, block-size info, any number of
connections per export (one :class:`~storage.engine.Volume` object is shared, so they
see each other's writes), unix socket and TCP. Connections: storage/nbd/connection.py;
backend reads: storage/nbd/reads.py.

Ownership: the server holds a volume's lock while a connection uses it (or a control
request took it) and gives it back, checkpointed, when the last one closes, or when
another writer asks for it and its connections are idle (they stay open and ask for it
back with their next request): storage/nbd/handover.py. That is how a live migration's
destination takes the volume over at the switchover while the source QEMU still holds
its connection.

Group commit: writes are staged in the engine as requests arrive and all writes staged
during one event-loop pass are journaled together; only then are they acknowledged.
Up to ``MAX_GROUPS`` group commits are in flight at once (the log keeps their journal
records in order and completes them in order). FLUSH and FUA additionally sync.

Every second the server does the pool's cluster duties (storage/cluster.py): follow and
acknowledge the garbage-collection state, heartbeat, learn other writers' chunks,
checkpoint volumes idle with unsaved writes. If the cluster fenced this writer, every
connection is closed (``fenced`` says why).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import ssl
import struct
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from storage import cluster
from storage.engine import CHECKPOINT_BYTES, Pool, Volume, open_pool
from storage.errors import BackendError, ConflictError, InvalidArgument, ObjectNotFound, OwnedElsewhere, StorageError
from storage.nbd import protocol as p
from storage.nbd.connection import Connection, ReplyBatch
from storage.nbd.handover import Handover
from storage.nbd.reads import ReadPath
from storage.nbd.tls import server_context

log = logging.getLogger("cairn.nbd")
MAX_GROUPS = 16  # group commits in flight
GROUP_BYTES = 2 << 20  # with two groups in flight, a new one waits until it has this much
MAINTAIN_EVERY = 1.0  # seconds between rounds of cluster duties
REFRESH_EVERY = 5.0  # seconds between looks at other writers' new index objects
CHECKPOINT_AFTER = 30.0  # seconds a volume may keep unsaved writes (bounds a takeover's replay)
IDLE_SEAL = 30.0  # seconds without writes before this writer seals its segments (GC may then merge copies)


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


T = TypeVar("T")


class Disconnect(Exception):
    """The client ended the session (or broke the protocol)."""


class NbdServer:
    """Serves a pool's volumes (all of them, or the ``exports`` listed) over NBD."""

    def __init__(self, pool: Pool, exports: list[str] | None = None, read_only: bool = False) -> None:
        tune_malloc()
        self.pool = pool
        self.exports = exports
        self.read_only = read_only
        self.replies = ReplyBatch()
        self.reads = ReadPath(pool, self.replies)
        self._waiting: list[tuple[Any, bytes]] = []
        self._sync = False
        self._scheduled = False
        self._servers: list[asyncio.Server] = []
        self._maintainer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.connections = 0
        self.users: dict[str, set[Connection]] = {}  # export -> its connections (holding its lock or not)
        self.held: set[str] = set()  # volumes taken by a control request (kept while idle)
        self.fenced = ""  # why the cluster fenced this writer ("" while serving)
        # exports a non-root client uid of the unix socket may open (an unprivileged QEMU:
        # its VM's disks); root, and TCP clients (TLS certificates), are not limited
        self.grants: dict[int, set[str]] = {}
        self._touched: dict[str, float] = {}  # volume -> when its last unsaved write came
        self.last_write = time.monotonic()
        # Backend calls of the cluster duties and the handover run here, so that close()
        # can wait for one still running before the pool's connection goes away (a
        # librados call cut off by the shutdown of its client never returns).
        self._duties = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbd-duties")
        self.handover = Handover(self)

    # ----------------------------------------------------------------- lifecycle
    async def listen_unix(self, path: str) -> None:
        """Accept connections on a unix socket (replacing a stale socket file)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(lambda: Connection(self), path=path))
        self._start_maintaining()

    async def listen_tcp(self, host: str, port: int, tls: ssl.SSLContext) -> None:
        """Accept connections on TCP, served only after the client upgraded to TLS
        (``NBD_OPT_STARTTLS``) with a certificate ``tls`` accepts (storage/nbd/tls.py):
        an NBD export on a network is never plaintext."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: Connection(self, tls), host, port))
        self._start_maintaining()

    def _start_maintaining(self) -> None:
        if self._maintainer is None and not self.pool.readonly:
            self._maintainer = asyncio.get_running_loop().create_task(self._maintain())
            self._watcher = asyncio.get_running_loop().create_task(self.handover.watch())

    async def close(self) -> None:
        """Stop listening, journal what is staged, checkpoint and release the volumes."""
        for s in self._servers:
            s.close()
        for task in (self._maintainer, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        # A cancelled duty's backend call may still be running: let it end.
        await asyncio.get_running_loop().run_in_executor(None, partial(self._duties.shutdown, cancel_futures=True))
        await self.reads.drain()
        if not self.fenced:
            with contextlib.suppress(StorageError):
                self.pool.log.commit(sync=True)
        self.pool.close(abandon=bool(self.fenced))

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread of the server's duties (see ``close``)."""
        try:
            future = self._duties.submit(fn, *args)
        except RuntimeError:  # shut down
            raise StorageError("the NBD server is shutting down") from None
        return await asyncio.wrap_future(future)

    def export_names(self, uid: int | None = None) -> list[str]:
        """Names offered to clients (to a non-root unix client: only those granted to it)."""
        names = self.exports if self.exports is not None else self.pool.list_volumes()
        if uid:
            allowed = self.grants.get(uid, set())
            return [n for n in names if n in allowed]
        return names

    # ----------------------------------------------------------------- ownership
    def take(self, name: str, takeover: bool = False) -> Volume:
        """Hold a volume (its lock) until :meth:`release`, whether or not it is used."""
        vol = self.pool.open_volume(name, takeover=takeover)
        self.held.add(name)
        return vol

    def release(self, name: str, force: bool = False) -> int:
        """Give a volume's lock back (checkpointed). With connections still using it:
        ``ConflictError``, or with ``force`` they are closed first. Returns how many.
        (Connections to a volume another writer holds now hold nothing here.)"""
        self.held.discard(name)
        users = self.users.get(name, set())
        if users and not force:
            if name not in {v.name for v in self.pool.open_volumes()}:
                return 0
            raise ConflictError(f"volume {name!r} is in use by {len(users)} NBD connection(s): "
                                "stop its user first (or force)")
        for conn in list(users):
            conn.transport.close()
        self.users.pop(name, None)
        self.forget(name)
        self.handover.forget(name)
        self.pool.release(name)
        return len(users)

    async def acquire(self, name: str) -> Volume:
        """The volume, once its lock is ours: asks its holder for it and waits (up to
        ``STANDBY_WAIT``) while another live writer holds it (storage/nbd/handover.py)."""
        return await self.handover.acquire(name)

    def forget(self, name: str) -> None:
        """Drop what this server keeps about a volume it no longer holds."""
        self._touched.pop(name, None)
        self.reads.forget(name)

    def _unuse(self, conn: Connection) -> None:
        users = self.users.get(conn.name)
        if users is None or conn not in users:
            return
        users.discard(conn)
        if not users and conn.name not in self.held:
            del self.users[conn.name]
            self.handover.forget(conn.name)
            self.forget(conn.name)
            try:
                if conn.name in {v.name for v in self.pool.open_volumes()}:
                    self.pool.release(conn.name)
                    log.info("volume %s: released (its last connection closed)", conn.name)
            except StorageError as exc:
                log.warning("releasing volume %s: %s", conn.name, exc)

    # ----------------------------------------------------------------- cluster duties
    async def _maintain(self) -> None:
        pool = self.pool
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            try:
                state, _raw = await self.offload(cluster.read_gc_state, pool.backend)
                pool.apply_state(state)
                epoch = pool.pending_ack
                if epoch is not None:
                    # Writes staged before we saw the condemned list land first.
                    await asyncio.wrap_future(pool.log.commit_async(sync=True))
                    await self.offload(pool.acknowledge, epoch)
                elif pool.heartbeat_due:
                    await self.offload(pool.acknowledge)
                if loop.time() - refreshed > REFRESH_EVERY:
                    found = await self.offload(pool.log.fetch_indexes)
                    pool.log.apply_indexes(found)
                    refreshed = loop.time()
                self._checkpoint_idle()
                if time.monotonic() - self.last_write > IDLE_SEAL and pool.log.unsealed:
                    self.seal()
            except asyncio.CancelledError:
                raise
            except BackendError as exc:
                if "fenced" in str(exc) or "shutdown" in str(exc).lower():
                    self._fence(str(exc))
                    return
                log.warning("cluster duties: %s", exc)
            except Exception:
                log.exception("cluster duties failed")

    def seal(self) -> None:
        """Checkpoint the open volumes and give this writer's segments their index
        objects: final, so garbage collection may merge the copies other writers made."""
        self.pool.checkpoint_all()
        self.pool.log.rotate()

    def _checkpoint_idle(self) -> None:
        now = time.monotonic()
        for vol in self.pool.open_volumes():
            if not vol.dirty:
                self._touched.pop(vol.name, None)
                vol.follow()
                continue
            since = self._touched.setdefault(vol.name, now)
            if now - since > CHECKPOINT_AFTER:
                vol.checkpoint()
                self._touched.pop(vol.name, None)

    def _fence(self, reason: str) -> None:
        """The cluster refused this writer: stop serving (another node took over)."""
        log.error("this writer was fenced (%s): closing every NBD connection", reason)
        self.fenced = reason
        for users in self.users.values():
            for conn in list(users):
                conn.transport.close()
        self.users.clear()
        for vol in self.pool.open_volumes():
            vol.released = True

    # ----------------------------------------------------------------- group commit
    def defer_reply(self, conn: Any, reply: bytes, sync: bool) -> None:
        """Send ``reply`` once everything staged so far landed (synced with ``sync``)."""
        conn.deferred += 1
        self._waiting.append((conn, reply))
        self._sync |= sync
        self.schedule()

    def schedule(self) -> None:
        """Start a group commit at the end of this event-loop pass."""
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
        gathering = self.replies.begin()
        try:
            self._acknowledge(future, waiting)
        finally:
            if gathering:
                self.replies.end()

    def _acknowledge(self, future: asyncio.Future[None], waiting: list[tuple[Any, bytes]]) -> None:
        error = 0
        exc = future.exception()
        if exc is not None:
            log.error("journal commit failed: %s", exc)
            error = p.EIO
        for writer, reply in waiting:
            writer.deferred -= 1
            if writer.is_closing():
                continue
            if error:
                magic, _err, handle = p.REPLY.unpack(reply)
                reply = p.REPLY.pack(magic, error, handle)
            writer.write(reply)
        if not error:
            try:
                for vol in self.pool.open_volumes():
                    if vol.unsaved > CHECKPOINT_BYTES:
                        vol.checkpoint()
            except StorageError:
                log.exception("checkpoint failed")
        # After a failure the log is stopped (until the pool is attached again): only
        # writes still waiting need another round (their EIO), not what is staged.
        if self._waiting or (not error and self.pool.log.pending_size):
            self.schedule()

    # ----------------------------------------------------------------- handshake
    async def session(self, conn: Connection) -> None:
        """Handshake, then serve until the client goes (run per connection)."""
        self.connections += 1
        try:
            chosen = await self._handshake(conn)
            if chosen is not None:
                vol, name = chosen
                conn.begin(vol, name)
                await conn.done
        except (Disconnect, ConnectionError):
            pass
        except Exception:
            log.exception("NBD session failed")
        finally:
            self.connections -= 1
            conn.transport.close()
            self._unuse(conn)

    def _flags(self) -> int:
        flags = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
                 | p.TF_CAN_MULTI_CONN | p.TF_SEND_CACHE)
        return flags | (p.TF_READ_ONLY if self.read_only else 0)

    def _name(self, name: str, uid: int | None) -> str | None:
        if self.fenced:
            return None
        names = self.export_names(uid)
        if name == "" and len(names) == 1:
            name = names[0]
        return name if name in names else None

    def _size(self, name: str) -> int | None:
        try:
            return int(self.pool.volume_info(name)["size"])
        except StorageError:
            return None

    def _open(self, conn: Connection, name: str) -> Volume | None:
        """The volume for a connection that chose it; None while another writer holds
        its lock (the connection asks for it with its first request: :meth:`acquire`)."""
        self.users.setdefault(name, set()).add(conn)
        try:
            return self.pool.open_volume(name)
        except OwnedElsewhere as exc:
            log.info("export %s: held elsewhere until a request needs it (%s)", name, exc)
            return None

    async def _handshake(self, conn: Connection) -> tuple[Volume | None, str] | None:
        conn.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await conn.readexactly(4))

        def reply(opt: int, rtype: int, data: bytes = b"") -> None:
            conn.write(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

        while True:
            magic, opt, length = p.OPTION.unpack(await conn.readexactly(16))
            if magic != p.IHAVEOPT or length > 65536:
                raise Disconnect("bad option")
            data = await conn.readexactly(length) if length else b""
            if conn.tls is not None and not conn.encrypted:
                # before TLS: nothing but STARTTLS (or ABORT); EXPORT_NAME has no error reply
                if opt == p.OPT_STARTTLS and not data:
                    reply(opt, p.REP_ACK)
                    await conn.start_tls()
                    continue
                if opt == p.OPT_EXPORT_NAME:
                    raise Disconnect("EXPORT_NAME before TLS")
                if opt != p.OPT_ABORT:
                    reply(opt, p.REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
                    continue
            elif opt == p.OPT_STARTTLS:
                reply(opt, p.REP_ERR_INVALID if conn.encrypted else p.REP_ERR_POLICY)
                continue
            if opt == p.OPT_EXPORT_NAME:
                name = self._name(data.decode(errors="replace"), conn.peer_uid)
                size = None if name is None else self._size(name)
                if name is None or size is None:
                    raise Disconnect("unknown export")
                zeroes = b"" if cflags & p.CLIENT_NO_ZEROES else bytes(124)
                conn.write(struct.pack(">QH", size, self._flags()) + zeroes)
                return self._open(conn, name), name
            if opt == p.OPT_ABORT:
                reply(opt, p.REP_ACK)
                return None
            if opt == p.OPT_LIST:
                for export in self.export_names(conn.peer_uid):
                    raw = export.encode()
                    reply(opt, p.REP_SERVER, struct.pack(">I", len(raw)) + raw)
                reply(opt, p.REP_ACK)
            elif opt in (p.OPT_INFO, p.OPT_GO):
                if len(data) < 6:
                    reply(opt, p.REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack_from(">I", data, 0)
                asked = data[4 : 4 + nlen].decode(errors="replace")
                (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
                requests = struct.unpack_from(f">{nreq}H", data, 6 + nlen)
                name = self._name(asked, conn.peer_uid)
                size = None if name is None else self._size(name)
                if name is None or size is None:
                    reply(opt, p.REP_ERR_UNKNOWN, f"no export {asked!r}".encode())
                    continue
                reply(opt, p.REP_INFO, struct.pack(">HQH", p.INFO_EXPORT, size, self._flags()))
                reply(opt, p.REP_INFO, struct.pack(">HIII", p.INFO_BLOCK_SIZE, 1, self.pool.chunk_size,
                                                   p.MAX_REQUEST))
                if p.INFO_NAME in requests:
                    reply(opt, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + name.encode())
                if p.INFO_DESCRIPTION in requests:
                    reply(opt, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION) + b"cairn dedup volume")
                reply(opt, p.REP_ACK)
                if opt == p.OPT_GO:
                    return self._open(conn, name), name
            else:
                reply(opt, p.REP_ERR_UNSUP)

    # ----------------------------------------------------------------- transmission
    async def read_task(self, vol: Volume, conn: Connection, handle: int, offset: int, length: int,
                        sequential: bool) -> None:
        """A read whose chunks are not all in memory: fetch them, then reply."""
        extra: dict[bytes, tuple[int, bytes]] = {}
        for attempt in range(2):
            try:
                for _ in range(4):
                    needs = vol.read_needs(offset, length, extra)
                    if not needs:
                        break
                    await self.reads.fetch(needs, extra, sequential)
                conn.send_read(handle, offset, length, extra)
                return
            except ObjectNotFound:
                if attempt:
                    log.exception("read failed")
                    conn.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))
                    return
                self.pool.catch_up()  # a segment was collected: learn where its chunks went
                extra.clear()
            except InvalidArgument:
                conn.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EINVAL, handle))
                return
            except StorageError:
                log.exception("read failed")
                conn.write(p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, p.EIO, handle))
                return

    async def write_task(self, vol: Volume, conn: Connection, handle: int, offset: int, length: int,
                         data: bytes | memoryview | None, fua: bool) -> None:
        """A write that extends a patch (or folds one) not in memory: fetch it, then stage."""
        try:
            for _ in range(3):
                needs = vol.write_needs(offset, length)
                if not needs:
                    break
                await self.reads.fetch(needs, {}, False)
        except StorageError:
            pass  # the write itself reports it
        self.finish(conn, handle, self.mutate(vol, offset, length, data), fua)

    def mutate(self, vol: Volume, offset: int, length: int, data: bytes | memoryview | None) -> int:
        """Stage a write (``data``) or a zeroing (``None``); return an NBD errno."""
        if self.read_only:
            return p.EPERM
        if offset + length > vol.size:
            return p.ENOSPC
        self.last_write = time.monotonic()
        try:
            if data is None:
                vol.write_zeroes(offset, length)
            else:
                vol.write(offset, data, owned=True)  # a request's own buffer, never reused
        except InvalidArgument:
            return p.EINVAL
        except StorageError:
            log.exception("write failed")
            return p.EIO
        return 0

    def finish(self, conn: Any, handle: int, err: int, fua: bool) -> None:
        """Reply to a write: an error at once, success once it landed."""
        reply = p.REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, handle)
        if err:
            conn.write(reply)
        else:
            self.defer_reply(conn, reply, fua)


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
    pool = open_pool(url, chunk_size=args.chunk_size, node=args.node)
    for spec in args.create or []:
        name, _, size = spec.partition(":")
        if name not in pool.list_volumes():
            pool.create_volume(name, parse_size(size))
    server = NbdServer(pool, exports=args.export or None, read_only=args.read_only)
    if args.socket:
        await server.listen_unix(args.socket)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        await server.listen_tcp(host or "127.0.0.1", int(port), server_context(Path(args.tls_dir)))
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
    ap.add_argument("--listen", help="TCP host:port (with --tls-dir: TCP is served over TLS only)")
    ap.add_argument("--tls-dir", help="ca-cert.pem, server-cert.pem, server-key.pem (QEMU's tls-creds-x509 layout)")
    ap.add_argument("--export", action="append", help="export only this volume (repeatable)")
    ap.add_argument("--create", action="append", metavar="NAME:SIZE", help="create the volume if missing")
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--ready-file", help="written with our PID once listening")
    ap.add_argument("--node", help="node name in this writer's registration and locks (default: host name)")
    args = ap.parse_args(argv)
    if not args.socket and not args.listen:
        ap.error("give --socket and/or --listen")
    if args.listen and not args.tls_dir:
        ap.error("--listen needs --tls-dir: NBD over TCP is served with TLS only")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()

