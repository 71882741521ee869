"""A volume's block map as a tree of immutable, content-addressed shards.

Level 0: shards of ``SHARD_ENTRIES`` chunk hashes (32 bytes each; the zero hash is a
hole). Level 1: the root, the list of shard hashes. A version of a volume is one root
hash, so snapshot, clone and rollback copy 32 bytes whatever the volume's size. An
all-hole shard or root is the zero hash and is never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from storage.chunks import ZERO_HASH

SHARD_ENTRIES = 1024
_H = 32
_ZERO_SHARD = bytes(SHARD_ENTRIES * _H)

ReadMeta = Callable[[bytes], bytes]
WriteMeta = Callable[[bytes], bytes]


def shard_count(nblocks: int) -> int:
    """Shards needed for ``nblocks`` blocks."""
    return (nblocks + SHARD_ENTRIES - 1) // SHARD_ENTRIES


def root_shards(root: bytes, read_meta: ReadMeta) -> list[bytes]:
    """The shard hashes a root lists ([] for the zero root)."""
    if root == ZERO_HASH:
        return []
    data = read_meta(root)
    return [data[i : i + _H] for i in range(0, len(data), _H)]


def iter_map(root: bytes, read_meta: ReadMeta) -> Iterator[tuple[int, bytes]]:
    """(block, hash) of every non-hole entry under ``root``."""
    for s, sh in enumerate(root_shards(root, read_meta)):
        if sh == ZERO_HASH:
            continue
        data = read_meta(sh)
        base = s * SHARD_ENTRIES
        for i in range(0, len(data), _H):
            h = data[i : i + _H]
            if h != ZERO_HASH:
                yield base + i // _H, h


def meta_hashes(root: bytes, read_meta: ReadMeta) -> list[bytes]:
    """The stored metadata chunks (root and shards) of a map version."""
    if root == ZERO_HASH:
        return []
    return [root] + [s for s in root_shards(root, read_meta) if s != ZERO_HASH]


class BlockMap:
    """The mutable head of a volume: lazily loaded shards, dirty ones rewritten at commit."""

    def __init__(self, root: bytes, nblocks: int, read_meta: ReadMeta) -> None:
        self._read_meta = read_meta
        self.nblocks = nblocks
        self.shards = root_shards(root, read_meta)
        self.shards += [ZERO_HASH] * (shard_count(nblocks) - len(self.shards))
        self._loaded: dict[int, bytearray] = {}
        self._dirty: set[int] = set()
        self.root = root

    def _shard(self, s: int) -> bytearray:
        shard = self._loaded.get(s)
        if shard is None:
            h = self.shards[s]
            shard = bytearray(_ZERO_SHARD if h == ZERO_HASH else self._read_meta(h))
            if len(self._loaded) >= 512:
                # Bounded memory on huge volumes: drop clean shards (they reload from the store).
                for k in [k for k in self._loaded if k not in self._dirty]:
                    del self._loaded[k]
            self._loaded[s] = shard
        return shard

    def get(self, blk: int) -> bytes:
        """The chunk hash of a block (zero hash for a hole)."""
        s, i = divmod(blk, SHARD_ENTRIES)
        shard = self._loaded.get(s)
        if shard is None:
            if self.shards[s] == ZERO_HASH:
                return ZERO_HASH
            shard = self._shard(s)
        return bytes(shard[i * _H : (i + 1) * _H])

    def get_range(self, first: int, count: int) -> list[bytes]:
        """The chunk hashes of ``count`` blocks from ``first`` (one slice per shard)."""
        out: list[bytes] = []
        blk, end = first, first + count
        while blk < end:
            s, i = divmod(blk, SHARD_ENTRIES)
            take = min(end - blk, SHARD_ENTRIES - i)
            shard = self._loaded.get(s)
            if shard is None and self.shards[s] == ZERO_HASH:
                out += [ZERO_HASH] * take
            else:
                raw = bytes((shard if shard is not None else self._shard(s))[i * _H : (i + take) * _H])
                out += [raw[k : k + _H] for k in range(0, take * _H, _H)]
            blk += take
        return out

    def set(self, blk: int, h: bytes) -> None:
        """Point a block at a chunk (or the zero hash)."""
        s, i = divmod(blk, SHARD_ENTRIES)
        shard = self._shard(s)
        shard[i * _H : (i + 1) * _H] = h
        self._dirty.add(s)

    def resize(self, nblocks: int) -> None:
        """Grow with holes or shrink (dropping the blocks past the end)."""
        count = shard_count(nblocks)
        if nblocks < self.nblocks:
            for blk in range(nblocks, min(self.nblocks, count * SHARD_ENTRIES)):
                self.set(blk, ZERO_HASH)
            for s in range(count, len(self.shards)):
                self._loaded.pop(s, None)
                self._dirty.discard(s)
            del self.shards[count:]
        else:
            self.shards += [ZERO_HASH] * (count - len(self.shards))
        self.nblocks = nblocks
        self._dirty.add(-1)

    @property
    def dirty(self) -> bool:
        """Whether the head differs from ``root``."""
        return bool(self._dirty)

    def commit(self, write_meta: WriteMeta) -> bytes:
        """Store dirty shards and a new root; return the root hash."""
        if not self._dirty:
            return self.root
        for s in sorted(self._dirty):
            if s < 0:
                continue
            shard = self._loaded[s]
            self.shards[s] = ZERO_HASH if shard == _ZERO_SHARD else write_meta(bytes(shard))
        self._dirty.clear()
        # Loaded clean shards can be dropped: memory stays bounded by the working set.
        if len(self._loaded) > 256:
            self._loaded.clear()
        if all(h == ZERO_HASH for h in self.shards):
            self.root = ZERO_HASH
        else:
            self.root = write_meta(b"".join(self.shards))
        return self.root

    def iter_entries(self) -> Iterator[tuple[int, bytes]]:
        """(block, hash) of every non-hole block of the head."""
        for s in range(len(self.shards)):
            if self.shards[s] == ZERO_HASH and s not in self._loaded:
                continue
            shard = self._shard(s)
            base = s * SHARD_ENTRIES
            for i in range(SHARD_ENTRIES):
                h = bytes(shard[i * _H : (i + 1) * _H])
                if h != ZERO_HASH:
                    yield base + i, h
