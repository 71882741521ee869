"""The pool's log: chunks and block-map updates appended to large segment objects.

RADOS costs about a millisecond per operation, so chunks are not one object each:
every write batch becomes one append to the current segment (``seg/<writer>/<seq>``).
The segment *is* the journal: a write is acknowledged once its records are appended,
and a restart replays the block-map records written after a volume's last checkpoint.
A sealed segment gets an index object (``idx/<writer>/<seq>``: hash -> location) so
opening a pool reads small indexes instead of whole segments.

Record framing: ``>IIB`` body length, CRC32 of type+body, type; then the body. A torn
or corrupt tail ends a segment scan.
"""

from __future__ import annotations

import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from storage.backends.base import ObjectBackend
from storage.errors import CorruptionError, ObjectNotFound

HEADER = struct.Struct(">IIB")
CHUNK_HEAD = struct.Struct(">32sBI")  # hash, flags, raw length
MAP_HEAD = struct.Struct(">16sI")  # volume id, entry count
MAP_ENTRY = struct.Struct(">Q32s")  # block number, chunk hash (zero hash = hole)
IDX_HEAD = struct.Struct(">Q")  # segment length the index covers
IDX_ENTRY = struct.Struct(">32sIIBI")  # hash, payload offset, payload length, flags, raw length
REC_CHUNK = 1
REC_MAP = 2
SEGMENT_TARGET = 4 << 20
DATA_STREAMS = 4
SMALL_BATCH = 1 << 20


@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk's payload lives."""

    segment: str
    offset: int
    length: int
    flags: int
    raw_length: int


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A point in one writer's log: records at or after it are not in a volume's root."""

    writer: str
    seq: int
    offset: int

    def to_json(self) -> list[object]:
        """JSON form kept in volume pointers."""
        return [self.writer, self.seq, self.offset]

    @classmethod
    def from_json(cls, value: list[object] | None) -> LogPosition | None:
        """Inverse of :meth:`to_json`."""
        if not value:
            return None
        return cls(str(value[0]), int(str(value[1])), int(str(value[2])))


def segment_name(writer: str, seq: int) -> str:
    """Object name of a segment."""
    return f"seg/{writer}/{seq:08d}"


def index_name(segment: str) -> str:
    """Object name of a segment's index."""
    return "idx/" + segment[4:]


def parse_segment(name: str) -> tuple[str, int]:
    """(writer, seq) of a segment name."""
    _, writer, seq = name.split("/")
    return writer, int(seq)


def frame(rtype: int, *parts: bytes | memoryview) -> bytes:
    """One framed record."""
    crc = zlib.crc32(bytes([rtype]))
    length = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
        length += len(p)
    return b"".join((HEADER.pack(length, crc, rtype), *parts))


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded record: its type, body, and where the body starts in the segment."""

    rtype: int
    body: memoryview
    body_offset: int
    end: int


def scan(data: bytes, start: int = 0) -> Iterator[Record]:
    """Yield the intact records of segment bytes from ``start``; stop at a torn or bad one."""
    view = memoryview(data)
    pos, end = start, len(data)
    while pos + HEADER.size <= end:
        length, crc, rtype = HEADER.unpack_from(view, pos)
        body_at = pos + HEADER.size
        if body_at + length > end:
            return
        body = view[body_at : body_at + length]
        if zlib.crc32(body, zlib.crc32(bytes([rtype]))) != crc:
            return
        yield Record(rtype, body, body_at, body_at + length)
        pos = body_at + length


def map_entries(body: memoryview) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Decode a block-map record: (volume id, [(block, hash)])."""
    vol_id, count = MAP_HEAD.unpack_from(body, 0)
    out = [MAP_ENTRY.unpack_from(body, MAP_HEAD.size + i * MAP_ENTRY.size) for i in range(count)]
    return vol_id, out


@dataclass
class _Stream:
    """One append stream: ``seg/<name>/<seq>`` segments and what is staged for them."""

    name: str
    seq: int = 0
    seg_size: int = 0
    pending: list[bytes] = field(default_factory=list)
    pending_size: int = 0

    @property
    def segment(self) -> str:
        return segment_name(self.name, self.seq)


class SegmentLog:
    """The hash -> location index of a pool plus this process's append stream."""

    def __init__(self, backend: ObjectBackend, readonly: bool = False) -> None:
        self.backend = backend
        self.readonly = readonly
        self.index: dict[bytes, Location] = {}
        self.writer = uuid.uuid4().hex[:12]
        self.journal = _Stream(self.writer)
        self.data = [_Stream(f"{self.writer}.{k}") for k in range(DATA_STREAMS)]
        self.pending_chunks: dict[bytes, bytes] = {}
        # Chunks of one write request stay together (one read later), see Volume._apply.
        self.sticky: _Stream | None = None
        self.inflight: dict[bytes, bytes] = {}
        self.segment_entries: dict[str, list[bytes]] = {}
        # One writer thread: appends reach the backend in the order they were taken.
        self._appender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-append")
        self._data_pool = ThreadPoolExecutor(max_workers=DATA_STREAMS, thread_name_prefix="log-data")
        self.load_index()

    # ---------------------------------------------------------------- index
    def load_index(self) -> None:
        """Read every index object; scan the segment bytes that no index covers yet."""
        indexes = set(self.backend.list("idx/"))
        for seg in sorted(self.backend.list("seg/")):
            covered = 0
            idx = index_name(seg)
            if idx in indexes:
                covered = self._load_index_object(seg, self.backend.get(idx))
            size = self.backend.size(seg)
            if size > covered:
                self._scan_into_index(seg, covered)
                if not self.readonly:
                    self.write_index(seg, size)

    def _load_index_object(self, seg: str, data: bytes) -> int:
        (covered,) = IDX_HEAD.unpack_from(data, 0)
        for off in range(IDX_HEAD.size, len(data), IDX_ENTRY.size):
            h, poff, plen, flags, raw = IDX_ENTRY.unpack_from(data, off)
            self.index.setdefault(h, Location(seg, poff, plen, flags, raw))
        return int(covered)

    def _scan_into_index(self, seg: str, start: int) -> None:
        data = self.backend.get(seg)
        for rec in scan(data, start):
            if rec.rtype == REC_CHUNK:
                h, flags, raw = CHUNK_HEAD.unpack_from(rec.body, 0)
                at = rec.body_offset + CHUNK_HEAD.size
                self.index.setdefault(h, Location(seg, at, rec.end - at, flags, raw))

    def index_blob(self, seg: str, covered: int) -> bytes:
        """The index object of a segment (covering its first ``covered`` bytes)."""
        parts = [IDX_HEAD.pack(covered)]
        hashes = self.segment_entries.get(seg)
        if hashes is None:
            hashes = [h for h, loc in self.index.items() if loc.segment == seg]
        for h in hashes:
            loc = self.index.get(h)
            if loc is not None and loc.segment == seg:
                parts.append(IDX_ENTRY.pack(h, loc.offset, loc.length, loc.flags, loc.raw_length))
        return b"".join(parts)

    def write_index(self, seg: str, covered: int) -> None:
        """Persist the index entries of a segment."""
        self.backend.put(index_name(seg), self.index_blob(seg, covered))

    # ---------------------------------------------------------------- appends
    @property
    def segment(self) -> str:
        """Name of the journal segment this process appends block-map records to."""
        return self.journal.segment

    def open_segments(self) -> set[str]:
        """Segments this process is still appending to."""
        return {st.segment for st in (self.journal, *self.data)}

    @property
    def pending_size(self) -> int:
        """Bytes staged and not yet handed to the writer thread."""
        return self.journal.pending_size + sum(st.pending_size for st in self.data)

    def position(self) -> LogPosition:
        """Journal position just after everything staged so far."""
        j = self.journal
        return LogPosition(self.writer, j.seq, j.seg_size + j.pending_size)

    def pick_stream(self) -> _Stream:
        """The journal while the batch is small, else the least loaded data stream."""
        if self.journal.pending_size < SMALL_BATCH:
            return self.journal
        return min(self.data, key=lambda x: x.pending_size)

    def stage_chunk(self, h: bytes, flags: int, raw_length: int, payload: bytes) -> None:
        """Queue a chunk record; readable at once. Small batches stay on the journal stream
        (one append per commit); the rest of a large batch spreads over the data streams."""
        st = self.sticky or self.pick_stream()
        rec = frame(REC_CHUNK, CHUNK_HEAD.pack(h, flags, raw_length), payload)
        at = st.seg_size + st.pending_size + HEADER.size + CHUNK_HEAD.size
        seg = st.segment
        self.index[h] = Location(seg, at, len(payload), flags, raw_length)
        self.segment_entries.setdefault(seg, []).append(h)
        self.pending_chunks[h] = payload
        st.pending.append(rec)
        st.pending_size += len(rec)

    def stage_map(self, vol_id: bytes, entries: list[tuple[int, bytes]]) -> None:
        """Queue a block-map update record for a volume on the (ordered) journal stream."""
        body = [MAP_HEAD.pack(vol_id, len(entries))] + [MAP_ENTRY.pack(b, h) for b, h in entries]
        rec = frame(REC_MAP, *body)
        self.journal.pending.append(rec)
        self.journal.pending_size += len(rec)

    def _take(self, st: _Stream) -> tuple[str, bytes, bytes | None] | None:
        if not st.pending:
            return None
        seg = st.segment
        blob = b"".join(st.pending)
        st.seg_size += st.pending_size
        st.pending = []
        st.pending_size = 0
        index = None
        if st.seg_size >= SEGMENT_TARGET:
            index = self.index_blob(seg, st.seg_size)
            self.segment_entries.pop(seg, None)
            st.seq += 1
            st.seg_size = 0
        return seg, blob, index

    def commit_async(self, sync: bool = False) -> Future[None]:
        """Hand everything staged to the writer thread; the future completes when it is in
        the backend (and synced with ``sync``). Staging may go on meanwhile.

        Chunk records go to several data segments appended in parallel (different RADOS
        placement groups); the journal's block-map records are appended only after them,
        so a journaled block never points at a chunk that is not stored."""
        chunks = self.pending_chunks
        self.inflight.update(chunks)
        self.pending_chunks = {}
        data = [t for t in (self._take(st) for st in self.data) if t is not None]
        journal = self._take(self.journal)
        sync_segments = self.open_segments() if sync else set()
        return self._appender.submit(self._write_batch, data, journal, chunks, sync_segments)

    def _write_one(self, seg: str, blob: bytes, index: bytes | None, sync: bool) -> None:
        self.backend.append(seg, blob)
        if sync or index is not None:
            self.backend.sync(seg)
        if index is not None:
            self.backend.put(index_name(seg), index)

    def _write_batch(self, data: list[tuple[str, bytes, bytes | None]], journal: tuple[str, bytes, bytes | None] | None,
                     chunks: dict[bytes, bytes], sync_segments: set[str]) -> None:
        futures = [self._data_pool.submit(self._write_one, seg, blob, idx, seg in sync_segments or bool(sync_segments))
                   for seg, blob, idx in data]
        for f in futures:
            f.result()
        if journal is not None:
            self._write_one(*journal, bool(sync_segments))
        for seg in sync_segments:
            self.backend.sync(seg)
        for h in chunks:
            self.inflight.pop(h, None)

    def rotate(self) -> None:
        """Seal every open segment (with its index) and start new ones, so that GC may
        consider the old ones."""
        self.commit(sync=True)
        for st in (self.journal, *self.data):
            if st.seg_size:
                self.write_index(st.segment, st.seg_size)
                self.segment_entries.pop(st.segment, None)
                st.seq += 1
                st.seg_size = 0

    def commit(self, sync: bool = False) -> None:
        """Append everything staged and wait for it (after any append already in flight)."""
        self.commit_async(sync).result()

    def close(self) -> None:
        """Stop the writer thread (after pending appends)."""
        self._appender.shutdown(wait=True)
        self._data_pool.shutdown(wait=True)

    def read_payload(self, h: bytes) -> tuple[Location, bytes]:
        """The stored payload of a chunk (from the staging area or the backend)."""
        loc = self.index.get(h)
        if loc is None:
            raise CorruptionError(f"chunk {h.hex()} is not in the index")
        payload = self.pending_chunks.get(h)
        if payload is None:
            payload = self.inflight.get(h)
        if payload is None:
            payload = self.backend.get(loc.segment, loc.offset, loc.length)
            if len(payload) != loc.length:
                raise CorruptionError(f"chunk {h.hex()} truncated in {loc.segment}")
        return loc, payload

    def replay(self, vol_id: bytes, start: LogPosition) -> Iterator[tuple[int, bytes]]:
        """Block-map updates of one volume written at or after ``start`` (in log order)."""
        seq = start.seq
        offset = start.offset
        while True:
            seg = segment_name(start.writer, seq)
            try:
                data = self.backend.get(seg)
            except ObjectNotFound:
                return
            for rec in scan(data, offset):
                if rec.rtype == REC_MAP:
                    vid, entries = map_entries(rec.body)
                    if vid == vol_id:
                        yield from entries
            seq += 1
            offset = 0

    def segments(self) -> dict[str, float]:
        """Every segment with its modification time."""
        return {s: self.backend.mtime(s) for s in self.backend.list("seg/")}


def _nothing() -> None:
    return None


def now() -> float:
    """Wall clock (a function so the GC grace period is easy to reason about)."""
    return time.time()
