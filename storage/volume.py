"""An open dedup volume: block map + journal replay, reads, writes, checkpoints.

A volume is written by the one writer that holds its lock (see storage/cluster.py):
opening it replays the journal written since its last checkpoint (by whichever writer
that was), and every checkpoint moves its head pointer by a compare-and-swap that
asserts the lock, so a writer whose lock was broken after a fence cannot move it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from storage.blockmap import BlockMap
from storage.chunks import ZERO_HASH, Extents, covered, merge_extents
from storage.errors import ConflictError, InvalidArgument, LockLost
from storage.log import LogPosition

if TYPE_CHECKING:
    from storage.engine import Pool

# Replay after a crash reads the journal written since the last checkpoint (chunks and
# map records: the whole segments). A checkpoint waits for the journal, so not too often.
CHECKPOINT_BYTES = 256 << 20
# A clean volume's replay position follows the journal once it is this many segments
# behind: a takeover then skips what other volumes wrote, and GC may collect it.
FOLLOW_SEGMENTS = 8
MAX_EXTENTS = 32  # a patch with more extents (or covering half its block) is folded
INFLIGHT_LIMIT = 64 << 20  # bytes handed to the backend and not landed: then wait
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str) -> None:
    """``InvalidArgument`` unless ``name`` is a valid volume or snapshot name."""
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
        self._last_patch = self._last_base = ZERO_HASH
        self.released = False  # the lock went to another writer (or was given back)
        self.generation = 0  # bumped by every change of the block map (readers in flight check it)
        start = LogPosition.from_json(record.log)
        if start is not None and not start.settled:
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
        hashes = self._hashes(offset, length)
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
        boff = offset % bs
        pos = 0
        for h in self._hashes(offset, length):
            n = min(bs - boff, length - pos)
            if h != ZERO_HASH:
                self._fill(view[pos : pos + n], h, boff, extra)
            pos += n
            boff = 0
        return out

    def _hashes(self, offset: int, length: int) -> list[bytes]:
        """The block-map entries a range covers."""
        if length <= 0:
            return []
        first = offset // self.block
        return self.map.get_range(first, (offset + length - 1) // self.block - first + 1)

    def read_views(self, offset: int, length: int,
                   extra: dict[bytes, tuple[int, bytes]] | None = None) -> list[bytes | bytearray | memoryview]:
        """The bytes of a range as a list of buffers, without copying cached blocks (for
        a scatter-gather send). Like :meth:`read_into` otherwise."""
        out: list[bytes | bytearray | memoryview] = []
        chunks = self.pool.chunks
        bs = self.block
        boff = offset % bs
        pos = 0
        for h in self._hashes(offset, length):
            n = min(bs - boff, length - pos)
            data = None if h == ZERO_HASH else chunks.cached_block(h)
            if h == ZERO_HASH:
                out.append(memoryview(self._zero)[:n])
            elif data is not None:
                out.append(data if n == bs else memoryview(data)[boff : boff + n])
            else:
                buf = bytearray(n)
                self._fill(memoryview(buf), h, boff, extra)
                out.append(buf)
            pos += n
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
        cached_block = self.pool.chunks.cached_block
        bs = self.block
        boff = offset % bs
        pos = 0
        for h in self._hashes(offset, length):
            n = min(bs - boff, length - pos)
            if h != ZERO_HASH and cached_block(h) is None:
                self._needs(h, boff, n, extra, needs)
            pos += n
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

    def write(self, offset: int, data: bytes | bytearray | memoryview, owned: bool = False) -> None:
        """Stage a write (read-modify-write for partial blocks). Call :meth:`commit` to journal it.
        With ``owned`` the caller hands ``data`` over (never changes it afterwards): its
        blocks are staged and cached without a copy."""
        self._check_range(offset, len(data))
        view = memoryview(data)
        step = 4 << 20
        for at in range(0, len(data), step):
            self._apply(offset + at, view[at : at + step], min(step, len(data) - at), owned)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: whole blocks become holes and store nothing."""
        self._check_range(offset, length)
        self._apply(offset, None, length)

    discard = write_zeroes

    def _apply(self, offset: int, view: memoryview | None, length: int, owned: bool = False) -> None:
        if self.released:
            raise LockLost(f"volume {self.name!r} is no longer owned by this writer")
        blk, boff = divmod(offset, self.block)
        entries: list[tuple[int, bytes, bytes]] = []
        log = self.pool.log
        self.generation += 1
        self._apply_blocks(blk, boff, view, length, entries, owned)
        if entries:
            log.stage_map(self.id, entries)
            self._since_checkpoint += length
        if log.pending_size > (16 << 20):
            # Bound memory and RADOS op size (osd_max_write_size is 90 MiB).
            log.commit_async()
            if log.inflight_bytes > INFLIGHT_LIMIT:
                log.commit()

    def _apply_blocks(self, blk: int, boff: int, view: memoryview | None, length: int,
                      entries: list[tuple[int, bytes, bytes]], owned: bool) -> None:
        bs = self.block
        pos = 0
        chunks = self.pool.chunks
        while pos < length:
            n = min(bs - boff, length - pos)
            if n == bs:
                piece = None if view is None else view[pos : pos + n]
                h = ZERO_HASH if piece is None or piece == self._zero else chunks.put(piece, owned)
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

    def checkpoint(self, settled: bool = False) -> None:
        """Store the block map, then move the pointer's root and replay position forward
        (``settled``: this writer lets the volume go, nothing of it will follow)."""
        self.pool.log.commit()
        root = self.map.commit(self.pool.store_meta)
        self.pool.log.commit(sync=True)
        new = VolumeRecord(**{**self.record.__dict__})
        new.root = root.hex()
        new.log = replace(self.pool.log.position(), settled=settled).to_json()
        self._swap(new)
        self._since_checkpoint = 0

    def follow(self) -> None:
        """Move a clean volume's replay position to the journal's end once it lags
        ``FOLLOW_SEGMENTS`` behind. Nothing of the volume was journaled since its
        checkpoint, so any later position replays the same (nothing); only the pointer
        changes (no commit to wait for)."""
        if self.dirty or self.released:
            return
        pos = LogPosition.from_json(self.record.log)
        here = self.pool.log.position()
        if pos is not None and pos.writer == here.writer and here.seq - pos.seq < FOLLOW_SEGMENTS:
            return
        new = VolumeRecord(**{**self.record.__dict__})
        new.log = here.to_json()
        self._swap(new)

    def _swap(self, new: VolumeRecord) -> None:
        if self.released:
            raise LockLost(f"volume {self.name!r} is no longer owned by this writer")
        raw = new.encode()
        try:
            ok = self.pool.backend.cas_pointer(f"vol/{self.name}", self._raw, raw, cookie=self.pool.cookie)
        except LockLost:
            self.released = True
            raise
        if not ok:
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
        self.generation += 1
        self.map.resize(self._nblocks(size))
        self.record.size = size
        self.checkpoint()

    def set_root(self, root: bytes, size: int) -> None:
        """Replace the head by another version (rollback)."""
        self.pool.log.commit()
        self.generation += 1
        self.map = BlockMap(root, self._nblocks(size), self.pool.chunks.get)
        new = VolumeRecord(**{**self.record.__dict__})
        new.root, new.size = root.hex(), size
        new.log = self.pool.log.position().to_json()
        self._swap(new)

    @property
    def unsaved(self) -> int:
        """Bytes written since the last checkpoint (what a takeover would replay)."""
        return self._since_checkpoint

    @property
    def dirty(self) -> bool:
        """Whether writes happened since the last checkpoint."""
        return self._since_checkpoint > 0 or self.map.dirty

    def close(self) -> None:
        """Checkpoint, give the lock back and forget (see :meth:`Pool.release`)."""
        self.pool.release(self.name)
