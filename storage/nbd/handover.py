"""Handing a volume over between writers while their clients stay connected: RBD's
cooperative exclusive lock, for the NBD server.

A live migration connects the destination QEMU to its node's storage daemon while the
source QEMU still holds its connection (and the volume's lock) on the source node; the
source QEMU is ended only after the destination finished. So the lock moves by request:

* **Requester**: a connection whose volume another live writer holds waits for it once
  it has a request to serve (an idle connection asks for nothing). While it waits, its
  server posts a lock request beside the volume's head (``lockreq/<volume>``, refreshed
  every ``REQUEST_REFRESH`` s) and tries the lock every ``RETRY`` s; a dead holder is
  taken over as always (storage/engine.py). It removes its request once it holds the
  lock, or gives up after ``STANDBY_WAIT`` s (then the connection is closed).
* **Holder**: every ``REQUEST_POLL`` s the server reads the requests of the volumes its
  connections use. For one from a live writer it lets the volume go as soon as those
  connections are idle (no request in flight or waiting to be parsed, none in the last
  ``QUIET`` s): checkpoint (every group commit in flight lands first), unlock. The
  connections stay open without their volume handle; their next request asks for the
  volume back the same way (a migration that failed and resumed on the source).

Nothing cached goes stale across a handover: the block map and the journal position
belong to the :class:`~storage.engine.Volume` object, which is dropped and opened again
from the head the other writer checkpointed; the chunk and read caches are keyed by
content hash. A request whose writer is dead, or that did not change for
``REQUEST_STALE`` s, is dropped; a holder lets go at most once per request value (the
requester's refresh renews it), so a stuck requester cannot make it give the volume up
again and again. Volumes held by a control request (``take``) are not given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from storage import cluster
from storage.engine import Volume
from storage.errors import ConflictError, OwnedElsewhere, StorageError

if TYPE_CHECKING:
    from storage.nbd.server import NbdServer

log = logging.getLogger("cairn.nbd")
STANDBY_WAIT = 60.0  # seconds a connection waits for a volume's lock held by another writer
REQUEST_POLL = 0.25  # seconds between the holder's looks at the requests for its volumes
QUIET = 0.1  # seconds without a request before a holder's connections count as idle
TICK = 0.02  # seconds between idleness checks while a volume is wanted elsewhere
RETRY = 0.05  # seconds between a requester's tries of the lock


class Handover:
    """Both sides of the cooperative lock for one :class:`~storage.nbd.server.NbdServer`."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.pool = server.pool
        self._acquiring: dict[str, asyncio.Task[Volume]] = {}
        self._seen: dict[str, tuple[bytes, float]] = {}  # volume -> request value, when first seen
        self._honored: dict[str, bytes] = {}  # volume -> the request we last let it go for
        self.wanted: dict[str, bytes] = {}  # volumes to let go once idle -> the request
        self.given = 0  # volumes let go on request (since start)

    # ----------------------------------------------------------------- requester
    async def acquire(self, name: str) -> Volume:
        """The volume, once its lock is ours: one waiter per volume, shared by the
        connections that need it."""
        task = self._acquiring.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._wait_for_lock(name))
            self._acquiring[name] = task
            task.add_done_callback(lambda t: self._waited(name, t))
        return await asyncio.shield(task)

    def _waited(self, name: str, task: asyncio.Task[Volume]) -> None:
        if self._acquiring.get(name) is task:
            del self._acquiring[name]
        if not task.cancelled():
            task.exception()  # retrieved: the connections that waited for it report it

    async def _wait_for_lock(self, name: str) -> Volume:
        pool = self.pool
        me = pool.me
        deadline = time.monotonic() + STANDBY_WAIT
        mine: bytes | None = None
        posted = 0.0
        try:
            while True:
                try:
                    vol = pool.open_volume(name)
                except OwnedElsewhere as exc:
                    if time.monotonic() > deadline:
                        raise
                    holder = str(exc.owner.get("writer") or "")
                else:
                    if self.server.users.get(name) or name in self.server.held:
                        return vol
                    pool.release(name)  # every connection that needed it went away meanwhile
                    raise ConflictError(f"volume {name!r}: no connection needs it any more")
                if me is not None and time.monotonic() - posted > cluster.REQUEST_REFRESH:
                    mine = await self.server.offload(cluster.request_lock, pool.backend, name, me, mine, holder)
                    posted = time.monotonic()
                await asyncio.sleep(RETRY)
        finally:
            if mine is not None:
                with contextlib.suppress(StorageError):
                    await self.server.offload(cluster.drop_lock_request, pool.backend, name, mine)

    # ----------------------------------------------------------------- holder
    async def watch(self) -> None:
        """Look for requests for the volumes our connections use; let them go when idle."""
        loop = asyncio.get_running_loop()
        looked = 0.0
        while not self.server.fenced:
            await asyncio.sleep(TICK if self.wanted else REQUEST_POLL)
            try:
                if loop.time() - looked >= REQUEST_POLL - TICK / 2:
                    looked = loop.time()
                    names = self._shared()
                    found = await self.server.offload(self._read, names) if names else {}
                    stale = self._judge(names, found)
                    if stale:
                        await self.server.offload(self._drop, stale)
                await self.let_go_idle()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:
                log.warning("lock requests: %s", exc)
            except Exception:
                log.exception("lock requests failed")

    def _shared(self) -> list[str]:
        """Volumes we hold for connections (not for a control request)."""
        users, held = self.server.users, self.server.held
        return [v.name for v in self.pool.open_volumes() if users.get(v.name) and v.name not in held]

    def _read(self, names: list[str]) -> dict[str, tuple[bytes, str]]:
        """(in a thread) The requests for ``names``: raw value and its writer's state
        (``self``, ``alive``, ``suspect``, ``dead``; ``bad``: unreadable)."""
        me = self.pool.me
        out: dict[str, tuple[bytes, str]] = {}
        for name in names:
            req, raw = cluster.lock_request(self.pool.backend, name)
            if raw is None:
                continue
            if req is None:
                out[name] = (raw, "bad")
            elif me is not None and req.who.writer == me.writer:
                out[name] = (raw, "self")
            else:
                out[name] = (raw, cluster.liveness(self.pool.backend, req.who).state)
        return out

    def _judge(self, names: list[str], found: dict[str, tuple[bytes, str]]) -> list[tuple[str, bytes]]:
        """Mark the volumes a live writer asks for; return the requests to drop."""
        now = time.monotonic()
        drop: list[tuple[str, bytes]] = []
        for name in names:
            if name not in found:
                self._seen.pop(name, None)
                self.wanted.pop(name, None)
                continue
            raw, state = found[name]
            seen = self._seen.get(name)
            if seen is None or seen[0] != raw:
                seen = self._seen[name] = (raw, now)
            if (state in ("dead", "bad") or now - seen[1] > cluster.REQUEST_STALE
                    or (state == "self" and name not in self._acquiring)):
                drop.append((name, raw))
                self.wanted.pop(name, None)
            elif state == "alive" and self._honored.get(name) != raw:
                self.wanted[name] = raw
            else:
                self.wanted.pop(name, None)
        return drop

    def _drop(self, stale: list[tuple[str, bytes]]) -> None:
        for name, raw in stale:
            log.info("volume %s: dropping a stale lock request", name)
            cluster.drop_lock_request(self.pool.backend, name, raw)

    def _idle(self, name: str) -> bool:
        now = time.monotonic()
        conns = self.server.users.get(name, set())
        return not any(c.busy or now - c.last_request < QUIET for c in conns)

    async def let_go_idle(self) -> None:
        """Give up every wanted volume whose connections are idle, once a last look
        shows its request still there and its writer alive."""
        for name, raw in list(self.wanted.items()):
            if name not in self._shared():
                del self.wanted[name]
                continue
            if not self._idle(name):
                continue
            again = (await self.server.offload(self._read, [name])).get(name)
            if self.wanted.get(name) != raw or again != (raw, "alive"):
                self.wanted.pop(name, None)  # withdrawn, changed or its writer died: judged anew
                continue
            if name in self._shared() and self._idle(name):
                del self.wanted[name]
                self._honored[name] = raw
                self.let_go(name)

    def let_go(self, name: str) -> None:
        """Checkpoint and unlock a volume, keeping its connections open without it (on
        the event loop: no request of theirs can start meanwhile). The checkpoint waits
        for every group commit in flight; if it fails the volume is kept (the requester
        asks again, or takes it over once this writer is dead: its journal replays)."""
        vol = next((v for v in self.pool.open_volumes() if v.name == name), None)
        if vol is None:
            return
        t0 = time.monotonic()
        try:
            vol.checkpoint(settled=True)
        except StorageError as exc:
            log.warning("volume %s: not handed over, its checkpoint failed: %s", name, exc)
            return
        for conn in self.server.users.get(name, set()):
            conn.vol = None
        self.server.forget(name)
        self.pool.release(name, checkpoint=False)
        self.given += 1
        log.info("volume %s: handed over on request (%.0f ms)", name, (time.monotonic() - t0) * 1000)

    def forget(self, name: str) -> None:
        """A volume none of our connections uses any more (stop asking for it)."""
        task = self._acquiring.get(name)
        if task is not None:
            task.cancel()
        self.wanted.pop(name, None)
        self._seen.pop(name, None)
        self._honored.pop(name, None)
