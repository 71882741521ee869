"""Pool maintenance: mark-and-sweep garbage collection, scrub and consistency check."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from storage.blockmap import iter_map, meta_hashes
from storage.chunks import ZERO_HASH, chunk_hash
from storage.engine import Pool
from storage.errors import CorruptionError, InvalidArgument, ObjectNotFound
from storage.log import CHUNK_HEAD, HEADER, LogPosition, index_name, now, parse_segment


@dataclass
class GcReport:
    """What a collection did."""

    live_chunks: int
    deleted_segments: int
    rewritten_chunks: int
    bytes_before: int
    bytes_after: int


def collect_garbage(pool: Pool, grace_seconds: float = 3600.0, rewrite_below: float = 0.5) -> GcReport:
    """Mark every chunk reachable from a head or snapshot, then sweep segments.

    A segment younger than ``grace_seconds`` is never touched. Chunks referenced while
    the sweep runs (dedup hits and new writes, recorded by the chunk store) count as
    live. A segment with no live chunk is deleted; one whose live payload is below
    ``rewrite_below`` of its size has its live chunks copied to the log head first.
    """
    if pool.readonly:
        raise InvalidArgument("cannot collect garbage on a read-only pool")
    pool.chunks.touched = set()
    try:
        pool.log.rotate()
        live = pool.live_hashes()
        pool.log.commit(sync=True)
        segments = pool.log.segments()
        before = sum(pool.backend.size(s) for s in segments)
        # Replay positions must stay readable (volumes checkpointed above point at the head).
        keep = pool.log.open_segments()
        for name in pool.list_volumes():
            raw = pool.backend.get_pointer(f"vol/{name}")
            pos = LogPosition.from_json(json.loads(raw)["log"]) if raw else None
            if pos is not None:
                keep.update(s for s in segments if parse_segment(s)[0] == pos.writer and parse_segment(s)[1] >= pos.seq)
        by_segment: dict[str, list[bytes]] = {}
        for h, loc in pool.log.index.items():
            by_segment.setdefault(loc.segment, []).append(h)
        deadline = now() - grace_seconds
        rewritten = deleted = 0
        for seg, mtime in segments.items():
            if seg in keep or mtime > deadline:
                continue
            hashes = by_segment.get(seg, [])
            live_here = [h for h in hashes if h in live or h in pool.chunks.touched]
            live_bytes = sum(pool.log.index[h].length for h in live_here)
            size = pool.backend.size(seg)
            if live_here and live_bytes >= size * rewrite_below:
                continue
            for h in live_here:
                loc, payload = pool.log.read_payload(h)
                del pool.log.index[h]
                pool.log.stage_chunk(h, loc.flags, loc.raw_length, payload)
                rewritten += 1
            pool.log.commit(sync=True)
            for h in hashes:
                if h not in live_here:
                    pool.log.index.pop(h, None)
            pool.backend.delete(index_name(seg))
            pool.backend.delete(seg)
            deleted += 1
        pool.log.commit(sync=True)
        after = sum(pool.backend.size(s) for s in pool.backend.list("seg/"))
        return GcReport(len(live), deleted, rewritten, before, after)
    finally:
        pool.chunks.touched = None


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


def scrub(pool: Pool) -> ScrubReport:
    """Re-read every indexed chunk from the backend and check its BLAKE3 hash.

    Each bad chunk is reported with the volumes (and snapshots) and byte offsets it
    affects; a bad block-map shard affects its whole volume (offset None).
    """
    checked = 0
    bad: dict[bytes, BadChunk] = {}
    by_segment: dict[str, list[bytes]] = {}
    for h, loc in pool.log.index.items():
        by_segment.setdefault(loc.segment, []).append(h)
    for seg, hashes in by_segment.items():
        try:
            data = pool.backend.get(seg)
        except ObjectNotFound:
            data = b""
        for h in hashes:
            loc = pool.log.index[h]
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
    """Every head and snapshot resolves to indexed, framed chunks. Returns the problems found."""
    problems: list[str] = []
    sizes: dict[str, int] = {}
    for name in pool.list_volumes():
        # Journal records past the last checkpoint must point at stored chunks too.
        raw = pool.backend.get_pointer(f"vol/{name}")
        start = LogPosition.from_json(json.loads(raw)["log"]) if raw else None
        if start is None or raw is None:
            continue
        vol_id = bytes.fromhex(json.loads(raw)["id"])
        for _blk, h in pool.log.replay(vol_id, start):
            if h != ZERO_HASH and h not in pool.log.index:
                problems.append(f"{name}: journaled chunk {h.hex()} missing from the index")
    for vol, snap, root, _size in pool.versions():
        label = f"{vol}@{snap}" if snap else vol
        try:
            metas = meta_hashes(root, pool.chunks.get)
            data = [h for _b, h in iter_map(root, pool.chunks.get)]
        except Exception as exc:
            problems.append(f"{label}: block map unreadable: {exc}")
            continue
        for h in metas + data:
            loc = pool.log.index.get(h)
            if loc is None:
                problems.append(f"{label}: chunk {h.hex()} missing from the index")
                continue
            if loc.segment not in sizes:
                try:
                    sizes[loc.segment] = pool.backend.size(loc.segment)
                except ObjectNotFound:
                    sizes[loc.segment] = -1
            if loc.offset + loc.length > sizes[loc.segment] and h not in pool.log.pending_chunks:
                problems.append(f"{label}: chunk {h.hex()} past the end of {loc.segment}")
            if loc.offset < HEADER.size + CHUNK_HEAD.size:
                problems.append(f"{label}: chunk {h.hex()} has a bad offset")
    return problems
