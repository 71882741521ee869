"""Content-addressed chunks over the segment log, with a decoded-chunk LRU cache.

A chunk is stored once per pool: :meth:`ChunkStore.put` stages it only when the index
has no copy, or only a copy in a segment that garbage collection condemned (another
writer may be deleting it: see storage/maintenance.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from storage.chunks import RAW, ZERO_HASH, ChunkCodec, Extents, chunk_hash, decode_patch, encode_patch
from storage.errors import CorruptionError, ObjectNotFound
from storage.log import Location, SegmentLog

CACHE_BYTES = 160 << 20
PATCH_CACHE = 32768  # decoded patches kept (besides their bytes in the chunk cache)


class ChunkStore:
    """Content-addressed chunks over the log, with a decoded-chunk LRU cache."""

    def __init__(self, log: SegmentLog, chunk_size: int) -> None:
        self.log = log
        self.chunk_size = chunk_size
        self.codec = ChunkCodec()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._patches: OrderedDict[bytes, tuple[bytes, Extents]] = OrderedDict()
        self._local = threading.local()

    def _stored(self, h: bytes) -> bool:
        """Whether a usable copy exists (not only one that GC may be deleting)."""
        loc = self.log.index.get(h)
        return loc is not None and (not self.log.condemned or loc.segment not in self.log.condemned)

    def put(self, data: bytes | bytearray | memoryview, owned: bool = False) -> bytes:
        """Store a chunk once; return its hash. With ``owned`` the caller hands ``data``
        over (it is never changed afterwards): it is staged and cached as it is, not
        copied."""
        h = chunk_hash(data)
        if not self._stored(h):
            flags, payload = self.codec.encode(data, keep=owned)
            self.log.stage_chunk(h, flags, len(data), payload)
            # An uncompressed payload is already a copy of the bytes: cache that one.
            self._remember(h, payload if flags == RAW else bytes(data))
        elif h not in self._cache:
            self._remember(h, data if owned else bytes(data))  # type: ignore[arg-type]  # read-only use
        return h

    def put_patch(self, base: bytes, extents: Extents) -> bytes:
        """Store a patch chunk (kept raw: it is small and mostly fresh data)."""
        blob = encode_patch(base, extents, self.chunk_size)
        h = chunk_hash(blob)
        if not self._stored(h):
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

    def cached_block(self, h: bytes) -> bytes | None:
        """A full data block's bytes if they are in the cache (patches never have the
        chunk size, so this needs no index lookup), else None."""
        data = self._cache.get(h)
        return data if data is not None and len(data) == self.chunk_size else None

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

    def peek(self, h: bytes) -> bytes:
        """The chunk's bytes without touching the cache (safe from a worker thread)."""
        data = self._cache.get(h)
        if data is not None:
            return bytes(data)
        loc = self.log.index.get(h)
        if loc is None:
            raise CorruptionError(f"chunk {h.hex()} is not in the index")
        got = self.fetch([(loc, h)])
        if not got:
            raise CorruptionError(f"chunk {h.hex()} vanished from {loc.segment}")
        return got[0][1]

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
            try:
                blob = self.log.backend.get(first.segment, first.offset, end - first.offset)
            except ObjectNotFound:  # collected meanwhile: get() catches up with GC
                i = j
                continue
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
