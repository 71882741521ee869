"""The dedup engine: pools of volumes over an object backend.

Public entry point for the control plane: :func:`open_pool`. A pool keeps one
:class:`~storage.log.SegmentLog` (chunks + block-map journal) and a pointer per volume
(``vol/<name>``: JSON with size, root hash, snapshots and the log position from which
a restart replays). Pointers only change by compare-and-swap.

One process owns a volume's writes at a time (the NBD daemon serving it); snapshot,
clone and rollback on an open volume go through that process's :class:`Pool`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from storage.backends import ObjectBackend, open_backend
from storage.blockmap import BlockMap, iter_map, meta_hashes
from storage.chunks import (
    RAW,
    ZERO_HASH,
    ChunkCodec,
    Extents,
    chunk_hash,
    covered,
    decode_patch,
    encode_patch,
    merge_extents,
)
from storage.errors import AlreadyExists, ConflictError, InvalidArgument, NotFound
from storage.log import Location, LogPosition, SegmentLog

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Replay after a crash reads the journal written since the last checkpoint: large
# writes leave only map records there (their chunks go to data segments), small ones
# their patches. A checkpoint waits for the journal, so not too often either.
CHECKPOINT_BYTES = 256 << 20
CACHE_BYTES = 160 << 20
MAX_EXTENTS = 32  # a patch with more extents (or covering half its block) is folded
PATCH_CACHE = 32768  # decoded patches kept (besides their bytes in the chunk cache)
INFLIGHT_LIMIT = 64 << 20  # bytes handed to the backend and not landed: then wait


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(f"bad {what} name {name!r}: letters, digits, '.', '_', '-' (max 128)")


@dataclass
class VolumeRecord:
    """The persisted head of a volume (the value of its pointer)."""

    id: str
    size: int
    root: str
    log: list[object] | None
    snapshots: dict[str, dict[str, Any]]
    created: float

    def encode(self) -> bytes:
        """Canonical JSON bytes."""
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> VolumeRecord:
        """Inverse of :meth:`encode`."""
        return cls(**json.loads(raw))


class ChunkStore:
    """Content-addressed chunks over the log, with a decoded-chunk LRU cache."""

    def __init__(self, log: SegmentLog, chunk_size: int) -> None:
        self.log = log
        self.chunk_size = chunk_size
        self.codec = ChunkCodec()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._patches: OrderedDict[bytes, tuple[bytes, Extents]] = OrderedDict()
        self.touched: set[bytes] | None = None  # filled while a GC sweep is running
        self._local = threading.local()

    def put(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store a chunk once; return its hash."""
        h = chunk_hash(data)
        if self.touched is not None:
            self.touched.add(h)
        if h not in self.log.index:
            flags, payload = self.codec.encode(data)
            self.log.stage_chunk(h, flags, len(data), payload)
            # An uncompressed payload is already a copy of the bytes: cache that one.
            self._remember(h, payload if flags == RAW else bytes(data))
        elif h not in self._cache:
            self._remember(h, bytes(data))
        return h

    def put_patch(self, base: bytes, extents: Extents) -> bytes:
        """Store a patch chunk (kept raw: it is small and mostly fresh data)."""
        blob = encode_patch(base, extents, self.chunk_size)
        h = chunk_hash(blob)
        if self.touched is not None:
            self.touched.add(h)
            self.touched.add(base)
        if h not in self.log.index:
            self.log.stage_chunk(h, RAW, len(blob), blob)
        self._remember(h, blob)
        self._remember_patch(h, (base, extents))
        return h

    def patch(self, h: bytes) -> tuple[bytes, Extents]:
        """A patch's (base, extents), decoded once (reads it if it is not in memory)."""
        p = self._patches.get(h)
        if p is None:
            p = decode_patch(self.get(h))
            self._remember_patch(h, p)
        return p

    def cached_patch(self, h: bytes) -> tuple[bytes, Extents] | None:
        """A patch's (base, extents) if it is in memory, else None."""
        p = self._patches.get(h)
        if p is None:
            blob = self.cached(h)
            if blob is None:
                return None
            p = decode_patch(blob)
            self._remember_patch(h, p)
        return p

    def _remember_patch(self, h: bytes, p: tuple[bytes, Extents]) -> None:
        self._patches[h] = p
        if len(self._patches) > PATCH_CACHE:
            self._patches.popitem(last=False)

    def is_patch(self, h: bytes) -> bool:
        """Whether a block-map entry names a patch rather than a full block."""
        if h == ZERO_HASH:
            return False
        loc = self.log.index.get(h)
        return loc is not None and loc.raw_length != self.chunk_size

    def cached(self, h: bytes) -> bytes | None:
        """The chunk's bytes if they are in memory (cache, staged or in flight), else None
        (a data block may come as a read-only view rather than ``bytes``)."""
        data = self._cache.get(h)
        if data is not None:
            return data
        payload = self.log.pending_chunks.get(h)
        if payload is None:
            payload = self.log.inflight.get(h)
            if payload is None:
                return None
        loc = self.log.index.get(h)
        if loc is None:
            return None
        data = self.codec.decode(loc.flags, payload, loc.raw_length)
        self._remember(h, data)
        return data

    def get(self, h: bytes) -> bytes:
        """The chunk's bytes (verified against its hash when read from the backend)."""
        data = self._cache.get(h)
        if data is not None:
            self._cache.move_to_end(h)
            if type(data) is not bytes:  # a view into a segment read (see NbdServer._decoded)
                data = self._cache[h] = bytes(data)
            return data
        loc, payload = self.log.read_payload(h)
        data = self.codec.decode(loc.flags, payload, loc.raw_length)
        self._remember(h, data)
        return data

    def missing(self, hashes: list[bytes]) -> list[tuple[Location, bytes]]:
        """Locations of the chunks that are neither cached nor staged (need a backend read)."""
        out = []
        seen: set[bytes] = set()
        for h in hashes:
            if (h == ZERO_HASH or h in seen or h in self._cache or h in self.log.pending_chunks
                    or h in self.log.inflight):
                continue
            loc = self.log.index.get(h)
            if loc is not None:
                seen.add(h)
                out.append((loc, h))
        return out

    def fetch(self, misses: list[tuple[Location, bytes]]) -> list[tuple[bytes, bytes]]:
        """Read and decode chunks, one backend read per run of neighbours in a segment
        (a RADOS op costs ~1 ms whatever its size). Thread-safe: the NBD server runs it in
        worker threads so the event loop keeps serving while RADOS answers."""
        codec = getattr(self._local, "codec", None)
        if codec is None:
            codec = self._local.codec = ChunkCodec()
        misses = sorted(misses, key=lambda m: (m[0].segment, m[0].offset))
        out: list[tuple[bytes, bytes]] = []
        i = 0
        while i < len(misses):
            first = misses[i][0]
            j = i + 1
            end = first.offset + first.length
            while (j < len(misses) and misses[j][0].segment == first.segment
                   and 0 <= misses[j][0].offset - end < 65536
                   and misses[j][0].offset + misses[j][0].length - first.offset < (8 << 20)):
                end = max(end, misses[j][0].offset + misses[j][0].length)
                j += 1
            blob = self.log.backend.get(first.segment, first.offset, end - first.offset)
            for loc, h in misses[i:j]:
                payload = blob[loc.offset - first.offset : loc.offset - first.offset + loc.length]
                out.append((h, codec.decode(loc.flags, payload, loc.raw_length)))
            i = j
        return out

    def remember(self, h: bytes, data: bytes) -> None:
        """Put one fetched chunk in the cache."""
        self._remember(h, data)

    def has(self, h: bytes) -> bool:
        """Whether the chunk is in the cache."""
        return h in self._cache

    def remember_many(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Put fetched chunks in the cache."""
        for h, data in pairs:
            self._remember(h, data)

    def get_many(self, hashes: list[bytes]) -> dict[bytes, bytes]:
        """Several chunks at once (cache, then merged backend reads)."""
        fetched = self.fetch(self.missing(hashes))
        self.remember_many(fetched)
        out = dict(fetched)
        for h in hashes:
            if h not in out and h != ZERO_HASH:
                out[h] = self.get(h)
        return out

    def _remember(self, h: bytes, data: bytes) -> None:
        if h in self._cache:
            return
        self._cache[h] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)

    def forget(self) -> None:
        """Drop the cache (used by scrub, which must read the backend)."""
        self._cache.clear()
        self._patches.clear()
        self._cache_bytes = 0


class Volume:
    """An open dedup volume: read / write any range; durable after :meth:`flush`."""

    def __init__(self, pool: Pool, name: str, record: VolumeRecord, raw: bytes) -> None:
        self.pool = pool
        self.name = name
        self.record = record
        self._raw = raw
        self.id = uuid.UUID(record.id).bytes
        self.block = pool.chunk_size
        self.map = BlockMap(bytes.fromhex(record.root), self._nblocks(record.size), pool.chunks.get)
        self._zero = bytes(self.block)
        self._since_checkpoint = 0
        self._stream_key = int.from_bytes(self.id[:4], "big")
        self._last_patch = self._last_base = ZERO_HASH
        start = LogPosition.from_json(record.log)
        if start is not None:
            for blk, h in pool.log.replay(self.id, start):
                if blk < self.map.nblocks:
                    self.map.set(blk, h)
        if not pool.readonly:
            # From now on this process journals the volume: replay must start here.
            self.checkpoint()

    def _nblocks(self, size: int) -> int:
        return (size + self.block - 1) // self.block

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.record.size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.record.size:
            raise InvalidArgument(f"range {offset}+{length} outside volume {self.name!r} of {self.record.size} bytes")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of ``[offset, offset+length)``; holes read as zeros."""
        self._check_range(offset, length)
        hashes = [self.map.get(b) for b in range(offset // self.block, (offset + length - 1) // self.block + 1)]
        if len(hashes) > 1:
            self.pool.chunks.get_many([h for h in hashes if h != ZERO_HASH])
        return bytes(self.read_into(offset, length))

    def read_into(self, offset: int, length: int,
                  extra: dict[bytes, tuple[int, bytes]] | None = None, prefix: int = 0) -> bytearray:
        """The bytes of a range in a new buffer, after ``prefix`` free bytes (room for a
        reply header). Chunks come from the cache, else from ``extra`` (hash -> (start,
        bytes) ranges of raw chunks the caller fetched), else from the backend (blocking:
        the NBD server fetches :meth:`read_needs` first)."""
        out = bytearray(prefix + length)
        view = memoryview(out)[prefix:]
        bs = self.block
        blk, boff = divmod(offset, bs)
        pos = 0
        while pos < length:
            n = min(bs - boff, length - pos)
            h = self.map.get(blk)
            if h != ZERO_HASH:
                self._fill(view[pos : pos + n], h, boff, extra)
            pos += n
            blk += 1
            boff = 0
        return out

    def read_views(self, offset: int, length: int,
                   extra: dict[bytes, tuple[int, bytes]] | None = None) -> list[bytes | bytearray | memoryview]:
        """The bytes of a range as a list of buffers, without copying cached blocks (for
        a scatter-gather send). Like :meth:`read_into` otherwise."""
        out: list[bytes | bytearray | memoryview] = []
        chunks = self.pool.chunks
        bs = self.block
        blk, boff = divmod(offset, bs)
        pos = 0
        while pos < length:
            n = min(bs - boff, length - pos)
            h = self.map.get(blk)
            data = None if h == ZERO_HASH or chunks.is_patch(h) else chunks.cached(h)
            if h == ZERO_HASH:
                out.append(memoryview(self._zero)[:n])
            elif data is not None:
                out.append(memoryview(data)[boff : boff + n])
            else:
                buf = bytearray(n)
                self._fill(memoryview(buf), h, boff, extra)
                out.append(buf)
            pos += n
            blk += 1
            boff = 0
        return out

    def _fill(self, dest: memoryview, h: bytes, boff: int, extra: dict[bytes, tuple[int, bytes]] | None) -> None:
        """Copy bytes ``[boff, boff+len(dest))`` of block content ``h`` into ``dest``
        (which holds zeros)."""
        chunks = self.pool.chunks
        n = len(dest)
        if chunks.is_patch(h):
            base, extents = chunks.patch(h)
            if base != ZERO_HASH and not covered(extents, boff, boff + n):
                self._fill(dest, base, boff, extra)
            end = boff + n
            for eo, ed in extents:
                s, e = max(eo, boff), min(eo + len(ed), end)
                if s < e:
                    dest[s - boff : e - boff] = ed[s - eo : e - eo]
            return
        data = chunks.cached(h)
        if data is None and extra is not None and h in extra:
            start, part = extra[h]
            if start <= boff and boff + n <= start + len(part):
                dest[:] = memoryview(part)[boff - start : boff - start + n]
                return
        if data is None:
            data = chunks.get(h)
        dest[:] = memoryview(data)[boff : boff + n]

    def read_needs(self, offset: int, length: int,
                   extra: dict[bytes, tuple[int, bytes]] | None = None) -> list[tuple[bytes, int, int]]:
        """What a read of the range still lacks in memory: (hash, start, length) ranges of
        stored chunks; length -1 means the whole chunk (a patch). A patch not in memory
        hides its base: ask again once it is there."""
        if length <= 0 or offset < 0 or offset + length > self.record.size:
            return []
        needs: list[tuple[bytes, int, int]] = []
        bs = self.block
        blk, boff = divmod(offset, bs)
        pos = 0
        while pos < length:
            n = min(bs - boff, length - pos)
            h = self.map.get(blk)
            if h != ZERO_HASH:
                self._needs(h, boff, n, extra, needs)
            pos += n
            blk += 1
            boff = 0
        return needs

    def _needs(self, h: bytes, boff: int, n: int, extra: dict[bytes, tuple[int, bytes]] | None,
               needs: list[tuple[bytes, int, int]]) -> None:
        chunks = self.pool.chunks
        if chunks.is_patch(h):
            cp = chunks.cached_patch(h)
            if cp is None:
                needs.append((h, 0, -1))
                return
            base, extents = cp
            if base != ZERO_HASH and not covered(extents, boff, boff + n):
                self._needs(base, boff, n, extra, needs)
            return
        if chunks.cached(h) is not None:
            return
        if extra is not None and h in extra:
            start, part = extra[h]
            if start <= boff and boff + n <= start + len(part):
                return
        needs.append((h, boff, n))

    def write_needs(self, offset: int, length: int) -> list[tuple[bytes, int, int]]:
        """Chunks a write would read (a patch it extends, a base it folds into) that are
        not in memory, as :meth:`read_needs` lists them. Whole blocks need nothing."""
        if length <= 0 or offset < 0 or offset + length > self.record.size:
            return []
        bs = self.block
        first, last = offset // bs, (offset + length - 1) // bs
        needs: list[tuple[bytes, int, int]] = []
        chunks = self.pool.chunks
        for blk in {first, last}:
            s = max(offset, blk * bs) - blk * bs
            n = min(offset + length, (blk + 1) * bs) - blk * bs - s
            if n == bs:
                continue
            cur = self.map.get(blk)
            base, grown, count = cur, n, 1
            if chunks.is_patch(cur):
                cp = chunks.cached_patch(cur)
                if cp is None:
                    needs.append((cur, 0, -1))
                    continue
                base, extents = cp
                grown += sum(len(d) for _o, d in extents)
                count += len(extents)
            if (grown >= bs // 2 or count > MAX_EXTENTS) and base != ZERO_HASH and chunks.cached(base) is None:
                needs.append((base, 0, bs))
        return needs

    def blocks_needed(self, offset: int, length: int, partial_only: bool) -> list[bytes]:
        """Hashes a read (or, with ``partial_only``, a write) will use that are not in memory."""
        needs = self.write_needs(offset, length) if partial_only else self.read_needs(offset, length)
        return [h for h, _s, _n in needs]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Stage a write (read-modify-write for partial blocks). Call :meth:`commit` to journal it."""
        self._check_range(offset, len(data))
        view = memoryview(data)
        step = 4 << 20
        for at in range(0, len(data), step):
            self._apply(offset + at, view[at : at + step], min(step, len(data) - at))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: whole blocks become holes and store nothing."""
        self._check_range(offset, length)
        self._apply(offset, None, length)

    discard = write_zeroes

    def _apply(self, offset: int, view: memoryview | None, length: int) -> None:
        blk, boff = divmod(offset, self.block)
        entries: list[tuple[int, bytes, bytes]] = []
        log = self.pool.log
        log.sticky = log.pick_stream(self._stream_key + (offset >> 22), length)
        try:
            self._apply_blocks(blk, boff, view, length, entries)
        finally:
            log.sticky = None
        if entries:
            log.stage_map(self.id, entries)
            self._since_checkpoint += length
        if log.pending_size > (16 << 20):
            # Bound memory and RADOS op size (osd_max_write_size is 90 MiB).
            log.commit_async()
            if log.inflight_bytes > INFLIGHT_LIMIT:
                log.commit()

    def _apply_blocks(self, blk: int, boff: int, view: memoryview | None, length: int,
                      entries: list[tuple[int, bytes, bytes]]) -> None:
        bs = self.block
        pos = 0
        chunks = self.pool.chunks
        while pos < length:
            n = min(bs - boff, length - pos)
            if n == bs:
                piece = None if view is None else view[pos : pos + n]
                h = ZERO_HASH if piece is None or piece == self._zero else chunks.put(piece)
            else:
                h = self._write_partial(blk, boff, self._zero[:n] if view is None else bytes(view[pos : pos + n]))
            if self.map.get(blk) != h:
                self.map.set(blk, h)
                entries.append((blk, h, self._last_base if h == self._last_patch else ZERO_HASH))
            pos += n
            blk += 1
            boff = 0

    def _write_partial(self, blk: int, boff: int, piece: bytes) -> bytes:
        """New content hash of a block after writing ``piece`` at ``boff``: a patch over
        the block's content (no read of the old block), or a full block when the
        patches cover it, or when they cover half of it and its base is at hand."""
        chunks = self.pool.chunks
        bs = self.block
        cur = self.map.get(blk)
        extents: Extents
        if chunks.is_patch(cur):
            base, extents = chunks.patch(cur)
        else:
            base, extents = cur, []
        extents = merge_extents(extents, boff, piece)
        total = sum(len(d) for _o, d in extents)
        if total >= bs:
            full = extents[0][1]
            return ZERO_HASH if full == self._zero else chunks.put(full)
        if base == ZERO_HASH and all(d.count(0) == len(d) for _o, d in extents):
            return ZERO_HASH
        if total >= bs // 2 or len(extents) > MAX_EXTENTS:
            buf = bytearray(self._zero if base == ZERO_HASH else chunks.get(base))
            for eo, ed in extents:
                buf[eo : eo + len(ed)] = ed
            return ZERO_HASH if buf == self._zero else chunks.put(buf)
        h = chunks.put_patch(base, extents)
        self._last_patch, self._last_base = h, base  # journaled with the map entry
        return h

    def commit(self, sync: bool = False) -> None:
        """Journal everything staged (one backend append); ``sync`` also makes it durable."""
        self.pool.log.commit(sync=sync)
        if self._since_checkpoint > CHECKPOINT_BYTES:
            self.checkpoint()

    def flush(self) -> None:
        """Make every write so far durable."""
        self.commit(sync=True)

    def checkpoint(self) -> None:
        """Store the block map, then move the pointer's root and replay position forward."""
        self.pool.log.commit()
        root = self.map.commit(self.pool.store_meta)
        self.pool.log.commit(sync=True)
        new = VolumeRecord(**{**self.record.__dict__})
        new.root = root.hex()
        new.log = self.pool.log.position().to_json()
        self._swap(new)
        self._since_checkpoint = 0

    def _swap(self, new: VolumeRecord) -> None:
        raw = new.encode()
        if not self.pool.backend.cas_pointer(f"vol/{self.name}", self._raw, raw):
            raise ConflictError(f"volume {self.name!r} was changed by another process")
        self._raw = raw
        self.record = new

    def resize(self, size: int, force: bool = False) -> None:
        """Grow (new space reads as zeros) or, with ``force``, shrink."""
        if size < 0:
            raise InvalidArgument("size must be positive")
        if size < self.record.size and not force:
            raise InvalidArgument(f"shrinking {self.name!r} from {self.record.size} to {size} loses data: use force")
        if size < self.record.size and size % self.block:
            tail = size % self.block
            self._apply(size, None, min(self.block - tail, self.record.size - size))
        self.map.resize(self._nblocks(size))
        self.record.size = size
        self.checkpoint()

    def set_root(self, root: bytes, size: int) -> None:
        """Replace the head by another version (rollback)."""
        self.pool.log.commit()
        self.map = BlockMap(root, self._nblocks(size), self.pool.chunks.get)
        new = VolumeRecord(**{**self.record.__dict__})
        new.root, new.size = root.hex(), size
        new.log = self.pool.log.position().to_json()
        self._swap(new)

    def close(self) -> None:
        """Checkpoint and forget."""
        self.checkpoint()
        self.pool._open.pop(self.name, None)


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


class Pool:
    """A dedup pool: volumes, snapshots, clones, stats, GC and scrub (see storage/README.md)."""

    def __init__(self, backend: ObjectBackend, chunk_size: int = 65536, readonly: bool = False) -> None:
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
        self.log = SegmentLog(backend, readonly=readonly)
        self.chunks = ChunkStore(self.log, self.chunk_size)
        self._open: dict[str, Volume] = {}

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

    def volume_info(self, name: str) -> dict[str, Any]:
        """Size, snapshots and creation time of a volume."""
        vol = self._open.get(name)
        rec = vol.record if vol else self._record(name)[0]
        return {"name": name, "size": rec.size, "snapshots": sorted(rec.snapshots), "created": rec.created}

    # ------------------------------------------------------------ volumes
    def create_volume(self, name: str, size: int) -> None:
        """Create an empty (all-hole) volume; stores nothing but its pointer."""
        _check_name(name, "volume")
        if size <= 0:
            raise InvalidArgument("size must be positive")
        rec = VolumeRecord(uuid.uuid4().hex, size, ZERO_HASH.hex(), None, {}, time.time())
        if not self.backend.cas_pointer(f"vol/{name}", None, rec.encode()):
            raise AlreadyExists(f"volume {name!r} already exists")

    def open_volume(self, name: str) -> Volume:
        """The open volume (replaying its journal on first open)."""
        vol = self._open.get(name)
        if vol is None:
            rec, raw = self._record(name)
            vol = Volume(self, name, rec, raw)
            self._open[name] = vol
        return vol

    def _head(self, name: str) -> Volume:
        vol = self.open_volume(name)
        vol.checkpoint()
        return vol

    def resize(self, name: str, size: int, force: bool = False) -> None:
        """Resize a volume (shrinking needs ``force``)."""
        self.open_volume(name).resize(size, force)

    def delete_volume(self, name: str) -> None:
        """Delete a volume and its snapshots (space returns at the next GC)."""
        vol = self._open.pop(name, None)
        raw = vol._raw if vol else self._record(name)[1]
        if not self.backend.cas_pointer(f"vol/{name}", raw, None):
            raise ConflictError(f"volume {name!r} changed while deleting it")

    def snapshot(self, name: str, snap: str) -> None:
        """Keep the current root under ``snap``: O(1) whatever the size."""
        _check_name(snap, "snapshot")
        vol = self._head(name)
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

    def _snap(self, name: str, snap: str) -> tuple[Volume | None, VolumeRecord, dict[str, Any]]:
        vol = self._open.get(name)
        rec = vol.record if vol else self._record(name)[0]
        if snap not in rec.snapshots:
            raise NotFound(f"snapshot {name}@{snap} does not exist")
        return vol, rec, rec.snapshots[snap]

    def delete_snapshot(self, name: str, snap: str) -> None:
        """Forget a snapshot (its chunks go at the next GC unless still shared)."""
        vol = self.open_volume(name)
        self._snap(name, snap)
        new = VolumeRecord(**{**vol.record.__dict__})
        new.snapshots = {k: v for k, v in vol.record.snapshots.items() if k != snap}
        vol._swap(new)

    def rollback(self, name: str, snap: str) -> None:
        """Make the volume's head the snapshot's root again: O(1)."""
        _, _, s = self._snap(name, snap)
        self.open_volume(name).set_root(bytes.fromhex(s["root"]), int(s["size"]))

    def clone(self, name: str, snap: str, new_name: str) -> None:
        """A new volume on a snapshot's root: O(1); the two diverge independently."""
        _check_name(new_name, "volume")
        _, _, s = self._snap(name, snap)
        rec = VolumeRecord(uuid.uuid4().hex, int(s["size"]), s["root"], None, {}, time.time())
        if not self.backend.cas_pointer(f"vol/{new_name}", None, rec.encode()):
            raise AlreadyExists(f"volume {new_name!r} already exists")

    def flush(self) -> None:
        """Journal and sync everything staged in this pool."""
        self.log.commit(sync=True)

    def close(self) -> None:
        """Checkpoint open volumes, release the backend."""
        if not self.readonly:
            for vol in list(self._open.values()):
                vol.close()
            self.log.commit(sync=True)
        self.log.close()
        self.backend.close()

    # ------------------------------------------------------------ walking
    def versions(self) -> Iterator[tuple[str, str | None, bytes, int]]:
        """(volume, snapshot or None, root, size) of every head and snapshot (checkpointed)."""
        for name in self.list_volumes():
            vol = self._open.get(name)
            if vol is not None and not self.readonly:
                vol.checkpoint()
            rec = vol.record if vol else self._record(name)[0]
            if vol is None and rec.log and not self.readonly:
                # Journal records after the checkpoint are not in the root yet: settle them.
                vol = self.open_volume(name)
                vol.checkpoint()
                rec = vol.record
                vol.close()
            yield name, None, bytes.fromhex(rec.root), rec.size
            for snap, s in rec.snapshots.items():
                yield name, snap, bytes.fromhex(s["root"]), int(s["size"])

    def _space(self, roots: list[bytes]) -> SpaceStats:
        unique: set[bytes] = set()
        logical = 0
        for root in roots:
            for _blk, h in iter_map(root, self.chunks.get):
                logical += self.chunk_size
                unique.add(h)
                if self.chunks.is_patch(h):
                    unique.add(self.chunks.patch(h)[0])
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
        vol = self._head(name)
        return self._space([bytes.fromhex(vol.record.root)])

    def stats(self) -> dict[str, Any]:
        """Pool totals over every volume head and snapshot, plus bytes held in the backend."""
        versions = list(self.versions())
        space = self._space([root for _v, _s, root, _size in versions])
        backend_bytes = sum(self.backend.size(s) for s in self.backend.list("seg/"))
        return {**space.as_dict(), "volumes": len(self.list_volumes()), "backend_bytes": backend_bytes,
                "chunk_size": self.chunk_size}

    def live_hashes(self) -> set[bytes]:
        """Every chunk and map shard reachable from a head or snapshot."""
        live: set[bytes] = set()
        for _v, _s, root, _size in self.versions():
            live.update(meta_hashes(root, self.chunks.get))
            for _b, h in iter_map(root, self.chunks.get):
                live.add(h)
                if self.chunks.is_patch(h):
                    live.add(self.chunks.patch(h)[0])  # a patch keeps its base alive
        return live


def open_pool(backend_url: str, chunk_size: int = 65536, readonly: bool = False) -> Pool:
    """Open (creating if needed) the dedup pool stored at ``backend_url``.

    ``local:///srv/cairn/pool`` or ``rados://<pool>/<namespace>?conf=/path/ceph.conf``.
    The chunk size only applies when the pool is created.
    """
    backend = open_backend(backend_url)
    try:
        return Pool(backend, chunk_size=chunk_size, readonly=readonly)
    except BaseException:
        backend.close()
        raise
