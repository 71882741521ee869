"""Chunk encoding: BLAKE3 identity, zstd compression kept only when it pays.

Compression sampling: the first 8 KiB are compressed first; a block whose sample does
not shrink by at least 12.5 % is stored raw without compressing the rest (random or
already-compressed data costs one small compress call instead of a full one).
"""

from __future__ import annotations

import blake3
import zstandard

ZERO_HASH = bytes(32)
RAW = 0
ZSTD = 1
_SAMPLE = 8192


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's identity: its BLAKE3 digest (32 bytes)."""
    digest: bytes = blake3.blake3(data).digest()
    return digest


class ChunkCodec:
    """Compress and decompress chunk payloads (one zstd context per codec: not thread-safe)."""

    def __init__(self, level: int = 1) -> None:
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Return (flags, payload): zstd when it saves at least 1/8, raw otherwise."""
        n = len(data)
        if n > _SAMPLE * 2:
            sample = self._c.compress(data[:_SAMPLE])
            if len(sample) > _SAMPLE - (_SAMPLE >> 3):
                return RAW, bytes(data)
        packed: bytes = self._c.compress(data)
        if len(packed) <= n - (n >> 3):
            return ZSTD, packed
        return RAW, bytes(data)

    def decode(self, flags: int, payload: bytes, raw_length: int) -> bytes:
        """Inverse of :meth:`encode`."""
        if flags == ZSTD:
            out: bytes = self._d.decompress(payload, max_output_size=raw_length)
            return out
        return payload
