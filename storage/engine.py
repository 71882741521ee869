"""The dedup engine: pools of volumes over an object backend.

Public entry point for the control plane: :func:`open_pool`. A pool keeps one
:class:`~storage.log.SegmentLog` (chunks + block-map journal) and a pointer per volume
(``vol/<name>``: JSON with size, root hash, snapshots and the log position from which
a restart replays). Pointers only change by compare-and-swap.

Any number of writers (processes, on any node) may open a pool at once; each volume is
written by one of them at a time, the holder of its lock (storage/cluster.py): opening
a volume takes the lock, :meth:`Pool.release` gives it back, a dead owner is fenced and
its journal replayed (``takeover``). Identical chunks of different writers are stored
once when a writer already knows the other's chunk (its index is refreshed from the
other writers' index objects); copies written at the same moment are merged by garbage
collection (storage/maintenance.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from storage import cluster
from storage.backends import ObjectBackend, open_backend
from storage.blockmap import iter_map, meta_hashes
from storage.chunks import ZERO_HASH, decode_patch
from storage.chunkstore import CACHE_BYTES, ChunkStore
from storage.errors import (
    AlreadyExists,
    ConflictError,
    InvalidArgument,
    NotFound,
    ObjectNotFound,
    OwnedElsewhere,
    StorageError,
)
from storage.log import LogPosition, SegmentLog, parse_segment
from storage.volume import CHECKPOINT_BYTES, MAX_EXTENTS, Volume, VolumeRecord, check_name

__all__ = ["CACHE_BYTES", "CHECKPOINT_BYTES", "MAX_EXTENTS", "Pool", "SpaceStats", "Version", "Volume",
           "VolumeRecord", "open_pool"]


@dataclass
class SpaceStats:
    """Logical vs stored bytes of a volume or pool."""

    logical_bytes: int
    unique_bytes: int
    stored_bytes: int
    dedup_ratio: float
    compression_ratio: float
    chunks: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class Version:
    """A volume head or snapshot: its root, and (heads) the journal entries written
    since the root by its owner: (block, chunk, patch base)."""

    volume: str
    snapshot: str | None
    root: bytes
    size: int
    entries: list[tuple[int, bytes, bytes]]


class Pool:
    """A dedup pool: volumes, snapshots, clones, stats, GC and scrub (see storage/README.md)."""

    def __init__(self, backend: ObjectBackend, chunk_size: int = 65536, readonly: bool = False,
                 node: str | None = None) -> None:
        self.backend = backend
        raw = backend.get_pointer("pool")
        if raw is None:
            if readonly:
                raise NotFound(f"no pool at {backend.url}")
            if chunk_size < 4096 or chunk_size & (chunk_size - 1):
                raise InvalidArgument("chunk size must be a power of two >= 4096")
            backend.cas_pointer("pool", None, json.dumps({"chunk_size": chunk_size, "created": time.time()}).encode())
            raw = backend.get_pointer("pool")
            assert raw is not None
        self.chunk_size: int = json.loads(raw)["chunk_size"]
        self.readonly = readonly
        self.log = SegmentLog(backend, readonly=readonly, load=False)
        self.chunks = ChunkStore(self.log, self.chunk_size)
        self._open: dict[str, Volume] = {}
        self.me: cluster.WriterInfo | None = None
        self._registration = b""
        self.gc_epoch = 0
        self.closed = False
        if not readonly:
            # Registered before reading the GC state and the index: a collection that
            # starts from now on waits for this writer (see storage/maintenance.py).
            self.me = cluster.new_writer(backend, self.log.writer, node)
            self._registration = cluster.register(backend, self.me)
            self.apply_state(cluster.read_gc_state(backend)[0])
            self.log.on_missing = self.catch_up
        try:
            self.log.load_index()
            if not readonly:
                self.acknowledge(self.gc_epoch)  # nothing staged yet
                self.reap_dead_writers()
        except BaseException:
            if self.me is not None:
                cluster.deregister(backend, self.me.writer)
            raise

    @property
    def cookie(self) -> str | None:
        """The lock cookie of this writer (None for a read-only pool)."""
        return None if self.me is None else self.me.writer

    # ------------------------------------------------------------ cluster
    def reap_dead_writers(self) -> None:
        """Writers of this host whose process is gone: seal their segments (so they can be
        collected and need no scan at the next open) and drop their registration."""
        assert self.me is not None
        for info, _raw in cluster.writers(self.backend):
            if info.writer == self.me.writer or info.host != self.me.host:
                continue
            if cluster.liveness(self.backend, info).state != "dead":
                continue
            for seg in [s for s in self.log.covered if parse_segment(s)[0].split(".")[0] == info.writer]:
                if seg not in self.log.sealed:
                    self.log.seal(seg)
            cluster.deregister(self.backend, info.writer)

    def apply_state(self, state: cluster.GcState) -> None:
        """Take the cluster's garbage-collection state into account: no new dedup
        against condemned segments; forget the collected ones. A new epoch must then be
        acknowledged (:attr:`pending_ack`) once the writes staged before it landed."""
        new = frozenset(state.condemned)
        collected = set(self.log.condemned - new)
        self.log.condemned = new
        if collected:
            self.log.drop(collected)
            self.log.reload(state.reload)
        self.gc_epoch = max(self.gc_epoch, state.epoch)

    @property
    def pending_ack(self) -> int | None:
        """The GC epoch this writer has seen and not acknowledged yet (or None)."""
        if self.me is None or self.gc_epoch <= self.me.acked:
            return None
        return self.gc_epoch

    @property
    def heartbeat_due(self) -> bool:
        """Whether the registration's heartbeat should be refreshed."""
        return self.me is not None and time.time() - self.me.beat > cluster.HEARTBEAT

    def acknowledge(self, epoch: int | None = None) -> None:
        """Store the heartbeat (and ``epoch`` as acknowledged: everything staged before
        this writer saw it must have landed) in this writer's registration."""
        if self.me is None:
            return
        self.me.beat = time.time()
        if epoch is not None:
            self.me.acked = max(self.me.acked, epoch)
        self._registration = cluster.update_registration(self.backend, self.me, self._registration)

    def sync(self) -> None:
        """One round of cluster duties for a writer that is not inside ``cairn-nbd`` or
        ``cairn-storaged`` (they do it every second): follow the GC state, acknowledge
        it, heartbeat, learn other writers' new chunks."""
        if self.readonly:
            return
        self.apply_state(cluster.read_gc_state(self.backend)[0])
        epoch = self.pending_ack
        if epoch is not None:
            self.flush()
            self.acknowledge(epoch)
        elif self.heartbeat_due:
            self.acknowledge()
        self.log.refresh(tails=False)

    def catch_up(self) -> None:
        """A segment vanished under a read: GC collected it. Learn where its chunks went."""
        self.apply_state(cluster.read_gc_state(self.backend)[0])
        self.log.refresh(tails=False)

    def owner(self, name: str) -> dict[str, Any] | None:
        """Who holds a volume's lock: node, RADOS client and address, since when (or None)."""
        self._record(name)
        who = cluster.volume_owner(self.backend, name)
        if who is None:
            return None
        alive = cluster.liveness(self.backend, who)
        return {**who.public(), "alive": alive.state, "reason": alive.reason,
                "self": self.me is not None and who.writer == self.me.writer}

    def fence_node(self, node: str, blocklisted: Sequence[str] = ()) -> cluster.FenceReport:
        """Fence every writer of ``node`` and free its volumes (storage/cluster.py)."""
        return cluster.fence_node(self.backend, node, self.me, blocklisted=blocklisted)

    # ------------------------------------------------------------ pointers
    def _record(self, name: str) -> tuple[VolumeRecord, bytes]:
        raw = self.backend.get_pointer(f"vol/{name}")
        if raw is None:
            raise NotFound(f"volume {name!r} does not exist")
        return VolumeRecord.decode(raw), raw

    def store_meta(self, data: bytes) -> bytes:
        """Store a block-map shard or root as a chunk."""
        return self.chunks.put(data)

    def list_volumes(self) -> list[str]:
        """Names of the pool's volumes."""
        return sorted(p[4:] for p in self.backend.list_pointers("vol/"))

    def open_volumes(self) -> list[Volume]:
        """The volumes this writer has open (and owns)."""
        return list(self._open.values())

    def volume_info(self, name: str) -> dict[str, Any]:
        """Size, snapshots and creation time of a volume."""
        vol = self._open.get(name)
        rec = vol.record if vol else self._record(name)[0]
        return {"name": name, "size": rec.size, "snapshots": sorted(rec.snapshots), "created": rec.created}

    # ------------------------------------------------------------ volumes
    def create_volume(self, name: str, size: int) -> None:
        """Create an empty (all-hole) volume; stores nothing but its pointer."""
        check_name(name, "volume")
        if size <= 0:
            raise InvalidArgument("size must be positive")
        rec = VolumeRecord(uuid.uuid4().hex, size, ZERO_HASH.hex(), None, {}, time.time())
        if not self.backend.cas_pointer(f"vol/{name}", None, rec.encode()):
            raise AlreadyExists(f"volume {name!r} already exists")

    def _lock(self, name: str, raw: bytes, takeover: bool) -> None:
        """Take a volume's lock; fence and break a dead holder's (or, with ``takeover``, a
        suspect one's); ``OwnedElsewhere`` naming a live holder."""
        assert self.me is not None
        for _attempt in range(3):
            try:
                held = self.backend.lock_pointer(f"vol/{name}", self.me.writer, self.me.owner_record(), raw)
            except ObjectNotFound:  # its owner moved the head meanwhile (a checkpoint as it let go)
                raw = self._record(name)[1]
                continue
            if held is None:
                return
            if not held:
                raise OwnedElsewhere(f"volume {name!r} is locked by a client that is not a Cairn writer")
            who = cluster.WriterInfo.decode(held)
            state = cluster.liveness(self.backend, who)
            if state.state == "alive" or (state.state == "suspect" and not takeover):
                hint = "" if state.state == "alive" else ": fence that node to take it over"
                raise OwnedElsewhere(f"volume {name!r} is owned by node {who.node!r} (client {who.client} at "
                                     f"{who.addr}; {state.reason}){hint}", who.public())
            cluster.fence_writer(self.backend, who)
            cluster.break_volume_lock(self.backend, name, who)
        raise ConflictError(f"volume {name!r}: its lock keeps changing hands")

    def open_volume(self, name: str, takeover: bool = False) -> Volume:
        """The open volume: takes its lock (see :meth:`_lock`) and replays the journal
        written since its last checkpoint, by whichever writer wrote it."""
        vol = self._open.get(name)
        if vol is not None:
            return vol
        rec, raw = self._record(name)
        if not self.readonly:
            self._lock(name, raw, takeover)
            rec, raw = self._record(name)
            start = LogPosition.from_json(rec.log)
            if start is not None and start.writer != self.log.writer:
                # Another writer journaled it: its newest chunks are in no index object yet.
                self.log.refresh(tails=True)
        try:
            vol = Volume(self, name, rec, raw)
        except BaseException:
            if self.me is not None:
                self.backend.unlock_pointer(f"vol/{name}", self.me.writer)
            raise
        self._open[name] = vol
        return vol

    def release(self, name: str, checkpoint: bool = True) -> None:
        """Checkpoint an open volume and give its lock back (live migration's source does
        this; the destination's open then finds nothing to replay). ``checkpoint=False``:
        the caller just checkpointed it."""
        vol = self._open.pop(name, None)
        if vol is None:
            return
        try:
            if not self.readonly and not vol.released and checkpoint:
                vol.checkpoint(settled=True)
        finally:
            vol.released = True
            if self.me is not None:
                self.backend.unlock_pointer(f"vol/{name}", self.me.writer)

    @contextlib.contextmanager
    def _borrow(self, name: str) -> Iterator[Volume]:
        """The volume, opened for one operation if it was not open (then released)."""
        was_open = name in self._open
        vol = self.open_volume(name)
        try:
            yield vol
        finally:
            if not was_open and not self.readonly:
                self.release(name)

    def resize(self, name: str, size: int, force: bool = False) -> None:
        """Resize a volume (shrinking needs ``force``)."""
        with self._borrow(name) as vol:
            vol.resize(size, force)

    def delete_volume(self, name: str) -> None:
        """Delete a volume and its snapshots (space returns at the next GC)."""
        with self._borrow(name) as vol:
            if not self.backend.cas_pointer(f"vol/{name}", vol._raw, None, cookie=self.cookie):
                raise ConflictError(f"volume {name!r} changed while deleting it")
            vol.released = True
            self._open.pop(name, None)
        with contextlib.suppress(StorageError):  # a request for it (storage/nbd/handover.py)
            raw = self.backend.get_pointer(cluster.lock_request_name(name))
            if raw is not None:
                cluster.drop_lock_request(self.backend, name, raw)

    def snapshot(self, name: str, snap: str) -> None:
        """Keep the current root under ``snap``: O(1) whatever the size."""
        check_name(snap, "snapshot")
        with self._borrow(name) as vol:
            vol.checkpoint()
            if snap in vol.record.snapshots:
                raise AlreadyExists(f"snapshot {name}@{snap} already exists")
            new = VolumeRecord(**{**vol.record.__dict__})
            new.snapshots = {**vol.record.snapshots, snap: {"root": vol.record.root, "size": vol.record.size,
                                                             "created": time.time()}}
            vol._swap(new)

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        """Snapshots of a volume, oldest first."""
        vol = self._open.get(name)
        rec = vol.record if vol else self._record(name)[0]
        snaps = [{"name": k, "size": v["size"], "created": v["created"]} for k, v in rec.snapshots.items()]
        return sorted(snaps, key=lambda s: s["created"])

    def _snap(self, name: str, snap: str) -> dict[str, Any]:
        vol = self._open.get(name)
        rec = vol.record if vol else self._record(name)[0]
        if snap not in rec.snapshots:
            raise NotFound(f"snapshot {name}@{snap} does not exist")
        return rec.snapshots[snap]

    def delete_snapshot(self, name: str, snap: str) -> None:
        """Forget a snapshot (its chunks go at the next GC unless still shared)."""
        with self._borrow(name) as vol:
            self._snap(name, snap)
            new = VolumeRecord(**{**vol.record.__dict__})
            new.snapshots = {k: v for k, v in vol.record.snapshots.items() if k != snap}
            vol._swap(new)

    def rollback(self, name: str, snap: str) -> None:
        """Make the volume's head the snapshot's root again: O(1)."""
        with self._borrow(name) as vol:
            s = self._snap(name, snap)
            vol.set_root(bytes.fromhex(s["root"]), int(s["size"]))

    def clone(self, name: str, snap: str, new_name: str) -> None:
        """A new volume on a snapshot's root: O(1); the two diverge independently. Needs
        no lock: a snapshot never changes."""
        check_name(new_name, "volume")
        s = self._snap(name, snap)
        rec = VolumeRecord(uuid.uuid4().hex, int(s["size"]), s["root"], None, {}, time.time())
        if not self.backend.cas_pointer(f"vol/{new_name}", None, rec.encode()):
            raise AlreadyExists(f"volume {new_name!r} already exists")

    def flush(self) -> None:
        """Journal and sync everything staged in this pool."""
        self.log.commit(sync=True)

    def close(self, abandon: bool = False) -> None:
        """Checkpoint open volumes and release them, seal this writer's segments,
        deregister, release the backend (a second call does nothing). ``abandon``: the
        cluster fenced this writer, touch nothing (its locks were broken already)."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.readonly and not abandon:
                for name in list(self._open):
                    self.release(name)
                self.log.rotate()
                if self.me is not None:
                    cluster.deregister(self.backend, self.me.writer)
        finally:
            if self.me is not None:
                cluster.forget_process_writer(self.me.writer)
            for vol in self._open.values():
                vol.released = True
            self._open.clear()
            self.log.close()
            self.backend.close()

    # ------------------------------------------------------------ walking
    def walk(self, journals: bool = True, checkpoint: bool = True, refresh: bool = False) -> Iterator[Version]:
        """Every head and snapshot. Heads this writer owns are checkpointed first (unless
        not ``checkpoint``); with ``journals``, heads come with the journal entries their
        owners wrote since the root (what garbage collection must count as live). With
        ``refresh``, other writers' segments are scanned again once the heads are read:
        a head another node checkpointed a moment ago names map shards its owner appended
        before it moved the head, which an earlier look at their segments missed."""
        if checkpoint:
            self.checkpoint_all()
        heads: list[tuple[str, VolumeRecord]] = []
        for name in self.list_volumes():
            raw = self.backend.get_pointer(f"vol/{name}")
            if raw is not None:
                heads.append((name, VolumeRecord.decode(raw)))
        if refresh:
            self.log.refresh(tails=True)
        starts = {uuid.UUID(rec.id).bytes: pos for _n, rec in heads
                  if (pos := LogPosition.from_json(rec.log)) is not None and not pos.settled}
        entries = self.log.journal_entries(starts) if journals else {}
        for name, rec in heads:
            yield Version(name, None, bytes.fromhex(rec.root), rec.size, entries.get(uuid.UUID(rec.id).bytes, []))
            for snap, s in rec.snapshots.items():
                yield Version(name, snap, bytes.fromhex(s["root"]), int(s["size"]), [])

    def versions(self) -> Iterator[tuple[str, str | None, bytes, int]]:
        """(volume, snapshot or None, root, size) of every head and snapshot (roots only)."""
        for v in self.walk(journals=False):
            yield v.volume, v.snapshot, v.root, v.size

    def _space(self, versions: list[Version], read: Callable[[bytes], bytes] | None = None) -> SpaceStats:
        get = read or self.chunks.get
        unique: set[bytes] = set()
        logical = 0
        for v in versions:
            blocks: dict[int, bytes] = dict(iter_map(v.root, get))
            for blk, h, _base in v.entries:
                blocks[blk] = h
            for h in blocks.values():
                if h == ZERO_HASH:
                    continue
                logical += self.chunk_size
                unique.add(h)
                if self.chunks.is_patch(h):
                    unique.add(decode_patch(get(h))[0])
        unique.discard(ZERO_HASH)
        raw = stored = 0
        for h in unique:
            loc = self.log.index.get(h)
            if loc is not None:
                raw += loc.raw_length
                stored += loc.length
        return SpaceStats(logical, raw, stored, logical / raw if raw else 1.0, raw / stored if stored else 1.0,
                          len(unique))

    def volume_stats(self, name: str) -> SpaceStats:
        """Logical bytes written to the head, the unique and stored bytes they use, ratios."""
        vol = self._open.get(name)
        if vol is not None and not self.readonly:
            vol.checkpoint()
        rec = vol.record if vol is not None else self._record(name)[0]
        return self._space([Version(name, None, bytes.fromhex(rec.root), rec.size, [])])

    def checkpoint_all(self) -> None:
        """Checkpoint every open volume with unsaved writes."""
        if not self.readonly:
            for vol in list(self._open.values()):
                if vol.dirty and not vol.released:
                    vol.checkpoint()

    def stats(self, quiet: bool = False, versions: list[Version] | None = None) -> dict[str, Any]:
        """Pool totals over every volume head (as of its owner's last checkpoint) and
        snapshot, plus the bytes held in the backend. ``quiet``: change nothing in this
        pool object (no checkpoint, no index refresh, no cache fill), so it may run in a
        worker thread while the owner's thread serves I/O; give it the ``versions`` that
        thread read with ``walk(journals=False, checkpoint=False, refresh=True)`` (heads
        other nodes moved since the last index refresh name chunks it does not know)."""
        if not quiet:
            self.checkpoint_all()
        if versions is None:
            versions = list(self.walk(journals=False, checkpoint=False, refresh=not (quiet or self.readonly)))
        space = self._space(versions, self.chunks.peek if quiet else None)
        backend_bytes = sum(self.backend.size(s) for s in self.backend.list("seg/"))
        return {**space.as_dict(), "volumes": len(self.list_volumes()), "backend_bytes": backend_bytes,
                "chunk_size": self.chunk_size}

    def live_hashes(self, versions: list[Version] | None = None) -> set[bytes]:
        """Every chunk and map shard reachable from a head (with its journal) or snapshot."""
        live: set[bytes] = set()
        data: set[bytes] = set()
        for v in versions if versions is not None else self.walk():
            live.update(meta_hashes(v.root, self.chunks.get))
            data.update(h for _b, h in iter_map(v.root, self.chunks.get))
            for _b, h, base in v.entries:
                data.add(h)
                live.add(base)
        for h in data:
            if self.chunks.is_patch(h):
                live.add(self.chunks.patch(h)[0])  # a patch keeps its base alive
        live |= data
        live.discard(ZERO_HASH)
        return live


def open_pool(backend_url: str, chunk_size: int = 65536, readonly: bool = False, node: str | None = None) -> Pool:
    """Open (creating if needed) the dedup pool stored at ``backend_url``.

    ``local:///srv/cairn/pool`` or ``rados://<pool>/<namespace>?conf=/path/ceph.conf``.
    The chunk size only applies when the pool is created; ``node`` names this writer's
    node in its registration and its volume locks (default: the host name).
    """
    backend = open_backend(backend_url)
    try:
        return Pool(backend, chunk_size=chunk_size, readonly=readonly, node=node)
    except BaseException:
        backend.close()
        raise
