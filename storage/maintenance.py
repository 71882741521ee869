"""Pool maintenance: garbage collection, scrub and consistency check, cluster-wide.

Any writer may run them; one at a time per pool (a lease in the backend, renewed while
it runs). Garbage collection sees every writer's work through the backend only: the
volume heads and snapshots, the journals their owners wrote since (read from the
owners' journal segments), and every writer's index objects. The hard part is a chunk
nobody references that a writer is about to deduplicate against, on another node:

1. **mark** everything reachable; pick *candidate* segments: sealed (an index object
   says the writer will not append to them), older than the grace period, not holding
   a journal that a volume still replays; a chunk also stored in a kept segment counts
   there (this is how copies that different writers stored at the same time merge);
2. **condemn** the candidates with little live data: publish them in the pool's GC state
   (a new epoch) and wait until every registered writer *acknowledged* the epoch. A
   writer acknowledges once its writes staged before it saw the list have landed, and
   from then on stores a fresh copy instead of deduplicating against a condemned
   segment. A writer that does not acknowledge in time (a dead node not yet fenced)
   stops the collection before anything is deleted;
3. **mark again**: every reference made before the acknowledgements is now in a head
   or a journal; copy the live chunks of condemned segments that have no copy in a kept
   sealed segment, seal the copies, publish the new state (writers drop the condemned
   segments from their indexes and re-read the indexes that hold the copies), delete.

A reader that still had a location in a deleted segment gets "not found", catches up
with the GC state and reads again (``SegmentLog.on_missing``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from storage import cluster
from storage.blockmap import iter_map, meta_hashes
from storage.chunks import ZERO_HASH, chunk_hash
from storage.engine import Pool
from storage.errors import Busy, CorruptionError, InvalidArgument, ObjectNotFound
from storage.log import CHUNK_HEAD, HEADER, LogPosition, index_name, index_object, now, parse_segment

LEASE = "lease/maintenance"
LEASE_SECONDS = 60.0
ACK_TIMEOUT = 60.0
Progress = Callable[[float, str], None]


@dataclass
class GcReport:
    """What a collection did."""

    live_chunks: int
    deleted_segments: int
    rewritten_chunks: int
    bytes_before: int
    bytes_after: int
    condemned: int = 0
    epoch: int = 0
    waiting_for: list[str] = field(default_factory=list)  # writers that did not acknowledge (nothing deleted)


class _Lease:
    def __init__(self, pool: Pool, what: str) -> None:
        self.pool = pool
        self.cookie = pool.cookie or ""
        self.what = what
        self.renewed = 0.0

    def renew(self, force: bool = False) -> None:
        """Renew (at most every few seconds unless ``force``); ``Busy`` if it was lost."""
        if not force and time.monotonic() - self.renewed < LEASE_SECONDS / 6:
            return
        node = self.pool.me.node if self.pool.me else "?"
        if not self.pool.backend.lease(LEASE, self.cookie, LEASE_SECONDS, f"{self.what} by node {node}"):
            raise Busy("another writer is running garbage collection or scrub on this pool: try again later")
        self.renewed = time.monotonic()


@contextlib.contextmanager
def maintenance_lease(pool: Pool, what: str) -> Iterator[_Lease]:
    """Hold the pool's maintenance lease (``Busy`` if another writer has it)."""
    if pool.readonly:
        raise InvalidArgument(f"cannot run {what} on a read-only pool")
    lease = _Lease(pool, what)
    lease.renew(force=True)
    try:
        yield lease
    finally:
        pool.backend.release_lease(LEASE, lease.cookie)


def _read_index(pool: Pool, seg: str) -> list[tuple[bytes, int, int]]:
    """(hash, offset, length) of a sealed segment's chunks, from its index object."""
    try:
        data = pool.backend.get(index_name(seg))
    except ObjectNotFound:
        return []
    return [(h, poff, plen) for h, poff, plen, _flags, _raw in index_object(data).entries]


def _replayed(pool: Pool, segments: dict[str, float]) -> set[str]:
    """Journal segments a volume still replays from (never collected)."""
    keep: set[str] = set()
    positions: list[LogPosition] = []
    for name in pool.list_volumes():
        raw = pool.backend.get_pointer(f"vol/{name}")
        if raw is not None:
            pos = LogPosition.from_json(json.loads(raw)["log"])
            if pos is not None and not pos.settled:
                positions.append(pos)
    for seg in segments:
        writer, seq = parse_segment(seg)
        if any(p.writer == writer and seq >= p.seq for p in positions):
            keep.add(seg)
    return keep


def _wait_for_acks(pool: Pool, epoch: int, timeout: float, lease: _Lease) -> list[str]:
    """Writers that have not acknowledged ``epoch`` when ``timeout`` runs out ([] = all did)."""
    deadline = time.monotonic() + timeout
    while True:
        pool.reap_dead_writers()
        pending = [w for w, _raw in cluster.writers(pool.backend)
                   if pool.me is not None and w.writer != pool.me.writer and w.acked < epoch]
        if not pending:
            return []
        if time.monotonic() > deadline:
            return [f"{w.writer} (node {w.node}, client {w.addr})" for w in pending]
        lease.renew()
        time.sleep(0.1)


def collect_garbage(pool: Pool, grace_seconds: float = 3600.0, rewrite_below: float = 0.5,
                    ack_timeout: float = ACK_TIMEOUT, progress: Progress | None = None) -> GcReport:
    """Collect unreachable chunks and merge copies (see the module docstring).

    A segment younger than ``grace_seconds`` is never touched; one whose live payload is
    below ``rewrite_below`` of its size has its live chunks copied, then is deleted.
    """
    say = progress or (lambda _pct, _msg: None)
    with maintenance_lease(pool, "garbage collection") as lease:
        backend = pool.backend
        state, raw = cluster.read_gc_state(backend)
        pool.apply_state(state)
        say(5, "sealing and indexing every writer's segments")
        pool.log.rotate()
        pool.log.refresh(tails=True)
        pool.reap_dead_writers()
        say(15, "marking live chunks (heads, snapshots, journals)")
        live = pool.live_hashes(list(pool.walk(refresh=True)))
        segments = pool.log.segments()
        before = sum(backend.size(s) for s in segments)
        indexes = {"seg/" + i[4:] for i in backend.list("idx/")}
        keep = _replayed(pool, segments)
        deadline = now() - grace_seconds
        carried = {s for s in state.condemned if s in segments}
        candidates = {s for s, mtime in segments.items()
                      if s in indexes and s not in keep and mtime <= deadline} | carried
        say(30, f"weighing {len(candidates)} candidate segments")
        sealed_entries = {s: _read_index(pool, s) for s in indexes if s in segments}
        safe = {h for s, ents in sealed_entries.items() if s not in candidates for h, _o, _n in ents}
        raw_live: dict[str, int] = {}
        for s in candidates:
            raw_live[s] = sum(n for h, _o, n in sealed_entries.get(s, []) if h in live and h not in safe)
        home: dict[bytes, str] = {}
        for s in sorted(candidates, key=lambda x: (-raw_live[x], x)):
            for h, _o, _n in sealed_entries.get(s, []):
                if h in live and h not in safe:
                    home.setdefault(h, s)
        live_bytes = dict.fromkeys(candidates, 0)
        for s in candidates:
            live_bytes[s] = sum(n for h, _o, n in sealed_entries.get(s, []) if home.get(h) == s)
        sizes = {s: backend.size(s) for s in candidates}
        condemned = {s for s in candidates if live_bytes[s] < sizes[s] * rewrite_below} | carried
        report = GcReport(len(live), 0, 0, before, before, len(condemned), state.epoch)
        if not condemned:
            return report

        say(45, f"condemning {len(condemned)} segments; waiting for every writer to acknowledge")
        state = cluster.GcState(state.epoch + 1, sorted(condemned), [], pool.cookie or "")
        raw = cluster.write_gc_state(backend, state, raw)
        pool.apply_state(state)
        pool.flush()
        pool.acknowledge(state.epoch)
        report.epoch = state.epoch
        report.waiting_for = _wait_for_acks(pool, state.epoch, ack_timeout, lease)
        if report.waiting_for:
            return report  # condemned stays published: the next run carries it on

        say(60, "marking again, copying live chunks out of condemned segments")
        lease.renew(force=True)
        live = pool.live_hashes(list(pool.walk(refresh=True)))
        safe = {h for s, ents in sealed_entries.items() if s not in condemned for h, _o, _n in ents}
        sealed_before = len(pool.log.own_sealed)
        reload: set[str] = set()
        copied: set[bytes] = set()
        for s in sorted(condemned):
            for h, off, length in sealed_entries.get(s) or []:
                if h not in live or h in copied:
                    continue
                if h in safe:
                    reload.update(x for x, ents in sealed_entries.items()
                                  if x not in condemned and any(e[0] == h for e in ents))
                    continue
                loc = pool.log.index.get(h)
                payload = backend.get(s, off, length)
                flags = loc.flags if loc is not None else 0
                raw_len = loc.raw_length if loc is not None else length
                pool.log.stage_chunk(h, flags, raw_len, payload)
                copied.add(h)
                if pool.log.pending_size > (16 << 20):
                    pool.log.commit()
                lease.renew()
        pool.log.rotate()
        pool.log.drain()  # the copies' index objects are stored before anyone is told to read them
        reload.update(pool.log.own_sealed[sealed_before:])

        say(85, f"deleting {len(condemned)} segments")
        lease.renew(force=True)
        state = cluster.GcState(state.epoch + 1, [], sorted(reload), pool.cookie or "")
        cluster.write_gc_state(backend, state, raw)
        pool.apply_state(state)
        pool.acknowledge(state.epoch)
        for s in condemned:
            backend.delete(index_name(s))
            backend.delete(s)
        report.deleted_segments = len(condemned)
        report.rewritten_chunks = len(copied)
        report.epoch = state.epoch
        report.bytes_after = sum(backend.size(s) for s in backend.list("seg/"))
        say(100, "done")
        return report


@dataclass
class BadChunk:
    """A chunk whose stored bytes do not match its hash, and what it breaks."""

    hash: str
    segment: str
    affected: list[dict[str, object]] = field(default_factory=list)


@dataclass
class ScrubReport:
    """Result of a scrub."""

    chunks_checked: int
    bad: list[BadChunk]


def scrub(pool: Pool, progress: Progress | None = None) -> ScrubReport:
    """Re-read every indexed chunk (every writer's) from the backend and check its BLAKE3 hash.

    Each bad chunk is reported with the volumes (and snapshots) and byte offsets it
    affects; a bad block-map shard affects its whole volume (offset None). Holds the
    maintenance lease on a writable pool, so no collection deletes segments meanwhile.
    """
    if pool.readonly:
        return _scrub(pool, progress)
    with maintenance_lease(pool, "scrub") as lease:
        pool.log.refresh(tails=True)
        return _scrub(pool, progress, lease)


def _scrub(pool: Pool, progress: Progress | None, lease: _Lease | None = None) -> ScrubReport:
    checked = 0
    bad: dict[bytes, BadChunk] = {}
    by_segment: dict[str, list[bytes]] = {}
    for h, loc in list(pool.log.index.items()):
        if h not in pool.log.pending_chunks and h not in pool.log.inflight:
            by_segment.setdefault(loc.segment, []).append(h)
    for i, (seg, hashes) in enumerate(sorted(by_segment.items())):
        if progress is not None and i % 16 == 0:
            progress(100.0 * i / max(len(by_segment), 1), f"scrubbing segment {i + 1} of {len(by_segment)}")
        if lease is not None:
            lease.renew()
        try:
            data = pool.backend.get(seg)
        except ObjectNotFound:
            data = b""
        for h in hashes:
            found = pool.log.index.get(h)
            if found is None or found.segment != seg:
                continue
            loc = found
            checked += 1
            payload = data[loc.offset : loc.offset + loc.length]
            try:
                if len(payload) != loc.length:
                    raise CorruptionError("truncated")
                ok = chunk_hash(pool.chunks.codec.decode(loc.flags, payload, loc.raw_length)) == h
            except Exception:  # zstd raises its own errors on damaged frames
                ok = False
            if not ok:
                bad[h] = BadChunk(h.hex(), seg)
    if bad:
        pool.chunks.forget()
        for vol, snap, root, _size in pool.versions():
            try:
                metas = meta_hashes(root, pool.chunks.get)
            except Exception:
                metas = [root]
            for m in metas:
                if m in bad:
                    bad[m].affected.append({"volume": vol, "snapshot": snap, "offset": None})
            try:
                for blk, h in iter_map(root, pool.chunks.get):
                    if h in bad:
                        bad[h].affected.append({"volume": vol, "snapshot": snap, "offset": blk * pool.chunk_size})
            except Exception:
                continue
    return ScrubReport(checked, list(bad.values()))


def check_consistency(pool: Pool) -> list[str]:
    """Every head (with its journal) and snapshot resolves to indexed, framed chunks.
    Returns the problems found."""
    problems: list[str] = []
    sizes: dict[str, int] = {}
    for v in pool.walk(refresh=True):
        label = f"{v.volume}@{v.snapshot}" if v.snapshot else v.volume
        try:
            metas = meta_hashes(v.root, pool.chunks.get)
            data = [h for _b, h in iter_map(v.root, pool.chunks.get)]
        except Exception as exc:
            problems.append(f"{label}: block map unreadable: {exc}")
            continue
        journaled = {h for _b, h, _base in v.entries if h != ZERO_HASH and h in pool.log.index}
        for h in metas + data + sorted(journaled):
            loc = pool.log.index.get(h)
            if loc is None:
                problems.append(f"{label}: chunk {h.hex()} missing from the index")
                continue
            if loc.segment not in sizes:
                try:
                    sizes[loc.segment] = pool.backend.size(loc.segment)
                except ObjectNotFound:
                    sizes[loc.segment] = -1
            if (loc.offset + loc.length > sizes[loc.segment] and h not in pool.log.pending_chunks
                    and h not in pool.log.inflight):
                problems.append(f"{label}: chunk {h.hex()} past the end of {loc.segment}")
            if loc.offset < HEADER.size + CHUNK_HEAD.size:
                problems.append(f"{label}: chunk {h.hex()} has a bad offset")
    return problems
