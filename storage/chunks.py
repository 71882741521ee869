"""Chunk encoding: BLAKE3 identity, zstd compression kept only when it pays.

Compression sampling: the first 4 KiB are compressed first; a block whose sample does
not shrink by at least 12.5 % is stored raw without compressing the rest (random or
already-compressed data costs one small compress call instead of a full one).
"""

from __future__ import annotations

import struct

import blake3
import zstandard

ZERO_HASH = bytes(32)
RAW = 0
ZSTD = 1
_SAMPLE = 4096


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's identity: its BLAKE3 digest (32 bytes)."""
    digest: bytes = blake3.blake3(data).digest()
    return digest


class ChunkCodec:
    """Compress and decompress chunk payloads (one zstd context per codec: not thread-safe)."""

    def __init__(self, level: int = 1) -> None:
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def encode(self, data: bytes | bytearray | memoryview, keep: bool = False) -> tuple[int, bytes]:
        """Return (flags, payload): zstd when it saves at least 1/8, raw otherwise (a copy
        of ``data``, or with ``keep`` ``data`` itself: the caller never changes it)."""
        n = len(data)
        raw = data if keep else None
        if n > _SAMPLE * 2:
            sample = self._c.compress(data[:_SAMPLE])
            if len(sample) > _SAMPLE - (_SAMPLE >> 3):
                return RAW, bytes(data) if raw is None else raw  # type: ignore[return-value]  # read-only use
        packed: bytes = self._c.compress(data)
        if len(packed) <= n - (n >> 3):
            return ZSTD, packed
        return RAW, bytes(data) if raw is None else raw  # type: ignore[return-value]

    def decode(self, flags: int, payload: bytes, raw_length: int) -> bytes:
        """Inverse of :meth:`encode`."""
        if flags == ZSTD:
            out: bytes = self._d.decompress(payload, max_output_size=raw_length)
            return out
        return payload


# ---------------------------------------------------------------- sub-block patches
#
# A small write does not rewrite its whole block: the block-map entry points at a
# *patch* chunk instead, which names a base chunk (a full block, or the zero hash) and
# lists the byte ranges written over it. A patch is an ordinary content-addressed chunk
# whose length is never the pool's chunk size (full blocks always are), which is how
# readers tell the two apart; so a guest can never write a block that dedups with one.
PATCH_MAGIC = b"CAIRNPT1"
PATCH_HEAD = struct.Struct(">8s32sI")  # magic, base hash, extent count
PATCH_EXTENT = struct.Struct(">II")  # offset in block, length

Extents = list[tuple[int, bytes]]


def encode_patch(base: bytes, extents: Extents, chunk_size: int) -> bytes:
    """Serialize a patch (extents sorted, non-overlapping)."""
    parts = [PATCH_HEAD.pack(PATCH_MAGIC, base, len(extents))]
    parts += [PATCH_EXTENT.pack(o, len(d)) for o, d in extents]
    parts += [d for _o, d in extents]
    blob = b"".join(parts)
    return blob + b"\0" if len(blob) == chunk_size else blob


def decode_patch(blob: bytes | memoryview) -> tuple[bytes, Extents]:
    """Inverse of :func:`encode_patch`: (base hash, extents)."""
    magic, base, count = PATCH_HEAD.unpack_from(blob, 0)
    if magic != PATCH_MAGIC:
        raise ValueError("not a patch chunk")
    at = PATCH_HEAD.size + count * PATCH_EXTENT.size
    out: Extents = []
    for i in range(count):
        off, n = PATCH_EXTENT.unpack_from(blob, PATCH_HEAD.size + i * PATCH_EXTENT.size)
        out.append((off, bytes(blob[at : at + n])))
        at += n
    return bytes(base), out


def merge_extents(extents: Extents, off: int, data: bytes) -> Extents:
    """Extents with ``data`` written at ``off`` over them (sorted, adjacent ones joined)."""
    end = off + len(data)
    out: Extents = []
    for eo, ed in extents:
        ee = eo + len(ed)
        if ee <= off or eo >= end:
            out.append((eo, ed))
            continue
        if eo < off:
            out.append((eo, ed[: off - eo]))
        if ee > end:
            out.append((end, ed[end - eo :]))
    out.append((off, bytes(data)))
    out.sort(key=lambda e: e[0])
    merged: Extents = []
    for eo, ed in out:
        if merged and merged[-1][0] + len(merged[-1][1]) == eo:
            merged[-1] = (merged[-1][0], merged[-1][1] + ed)
        else:
            merged.append((eo, ed))
    return merged


def covered(extents: Extents, start: int, end: int) -> bool:
    """Whether the extents cover ``[start, end)`` completely."""
    pos = start
    for eo, ed in extents:
        if eo > pos:
            break
        pos = max(pos, eo + len(ed))
        if pos >= end:
            return True
    return pos >= end


def overlay(buf: bytearray, buf_start: int, extents: Extents) -> None:
    """Write the extents that fall into ``buf`` (holding block bytes from ``buf_start``)."""
    buf_end = buf_start + len(buf)
    for eo, ed in extents:
        s, e = max(eo, buf_start), min(eo + len(ed), buf_end)
        if s < e:
            buf[s - buf_start : e - buf_start] = ed[s - eo : e - eo]
