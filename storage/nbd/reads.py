"""The NBD server's backend reads: asynchronous, merged, deduplicated, read ahead.

What a request lacks in memory is read with the backend's asynchronous reads (librados
aio), neighbouring chunks of a segment in one read, a small read of an uncompressed
chunk as just its bytes, and a sequential read with read-ahead to the end of the
chunk's 4 MiB segment region (chunks of a sequential write are laid out contiguously
there) plus ``AHEAD`` bytes of the volume. Concurrent requests wait for a read already
in flight instead of issuing their own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from storage.chunks import RAW, ChunkCodec
from storage.engine import Pool, Volume
from storage.errors import CorruptionError
from storage.log import CHUNK_HEAD, CHUNK_RECORDS, HEADER, MAP_RECORDS, Location

log = logging.getLogger("cairn.nbd")
READAHEAD = (4 << 20) + (256 << 10)  # a sequential read fetches a whole 4 MiB segment region (+ record headers)
AHEAD = 32 << 20  # a sequential reader gets this much of the volume read ahead of it
SMALL_READ = 16 << 10  # up to this, a read of an uncompressed chunk fetches just its bytes
_REC_OVERHEAD = HEADER.size + CHUNK_HEAD.size


class ReadPath:
    """Backend reads of one pool for the NBD server (all on the event loop's thread)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # Segment ranges being read: (start, end, future) per segment.
        self._reading: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._ahead: dict[str, int] = {}  # volume read-ahead issued up to here
        self.background: set[asyncio.Task[None]] = set()
        self._codec = ChunkCodec()
        self._completed: collections.deque[tuple[Any, bytes | None, BaseException | None]] = collections.deque()
        self._wake_pending = False
        self.in_flight = 0

    async def drain(self, timeout: float = 60.0) -> None:
        """Cancel read-ahead; wait for backend reads in flight (they must land before the
        backend goes away)."""
        for t in list(self.background):
            t.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def forget(self, volume: str) -> None:
        """A volume this server no longer holds: its read-ahead starts afresh."""
        self._ahead.pop(volume, None)

    def _aio_read(self, seg: str, offset: int, length: int) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            # Completions are handed over in batches: one loop wake-up for all of those
            # that arrive while the loop is busy.
            self._completed.append((fut, data, exc))
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self.settle_completed)

        self.in_flight += 1
        self.pool.log.read_async(seg, offset, length, done)
        return fut

    def read_cb(self, seg: str, offset: int, length: int,
                     cb: Callable[[bytes | None, BaseException | None], None]) -> None:
        """Like :meth:`_aio_read`, calling ``cb(data, exc)`` on the loop instead."""
        loop = asyncio.get_running_loop()

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            self._completed.append((cb, data, exc))
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self.settle_completed)

        self.in_flight += 1
        self.pool.log.read_async(seg, offset, length, done)

    def settle_completed(self) -> None:
        self._wake_pending = False
        completed = self._completed
        while completed:
            fut, data, exc = completed.popleft()
            self.in_flight -= 1
            if not isinstance(fut, asyncio.Future):
                try:
                    fut(data, exc)
                except Exception:
                    log.exception("read completion failed")
                continue
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(data or b"")

    def read_ahead(self, vol: Volume, start: int) -> None:
        """After a sequential read ending at ``start``, bring the next ``AHEAD`` bytes of
        the volume into the cache in the background (each range is looked at once)."""
        done_until = self._ahead.get(vol.name, 0)
        if done_until > start + AHEAD // 2:
            return  # far enough ahead already
        if done_until < start or done_until > start + AHEAD:
            done_until = start  # a new sequential run
        end = min(vol.size, start + AHEAD)
        if end <= done_until:
            return
        self._ahead[vol.name] = end
        needs = vol.read_needs(done_until, end - done_until)
        if needs:
            task = asyncio.get_running_loop().create_task(self.fetch(needs, {}, True))
            self.background.add(task)
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("read-ahead failed: %s", task.exception())

    def being_read(self, loc: Location) -> asyncio.Future[None] | None:
        for start, end, fut in self._reading.get(loc.segment, ()):
            if start <= loc.offset and loc.offset + loc.length <= end:
                return fut
        return None

    async def fetch(self, needs: list[tuple[bytes, int, int]], extra: dict[bytes, tuple[int, bytes]],
                     sequential: bool) -> None:
        """Bring what ``needs`` lists into the chunk cache (whole chunks) or ``extra``
        (small ranges of uncompressed chunks), with as few backend reads as possible."""
        index = self.pool.log.index
        waits: list[asyncio.Future[Any]] = []
        whole: dict[str, list[tuple[Location, bytes]]] = {}
        seen: set[bytes] = set()
        for h, start, n in needs:
            loc = index.get(h)
            if loc is None or h in seen:
                continue  # the read itself reports a missing chunk
            seen.add(h)
            fut = self.being_read(loc)
            if fut is not None:
                waits.append(fut)
            elif 0 <= n <= SMALL_READ and loc.flags == RAW and not sequential:
                waits.append(asyncio.ensure_future(self._fetch_range(h, loc, start, n, extra)))
            else:
                whole.setdefault(loc.segment, []).append((loc, h))
        for seg, items in whole.items():
            items.sort(key=lambda m: m[0].offset)
            i = 0
            while i < len(items):
                first = items[i][0]
                end = first.offset + first.length
                j = i + 1
                while (j < len(items) and 0 <= items[j][0].offset - end < 65536
                       and items[j][0].offset + items[j][0].length - first.offset < (8 << 20)):
                    end = max(end, items[j][0].offset + items[j][0].length)
                    j += 1
                start = first.offset - _REC_OVERHEAD
                stop = max(end, start + READAHEAD) if sequential else end
                # Registered now, before any other request runs: they wait for this read.
                entry = (start, stop, asyncio.get_running_loop().create_future())
                self._reading.setdefault(seg, []).append(entry)
                waits.append(asyncio.ensure_future(self._fetch_run(seg, entry, end, items[i:j])))
                i = j
        if waits:
            await asyncio.gather(*waits)

    async def _fetch_range(self, h: bytes, loc: Location, start: int, n: int,
                           extra: dict[bytes, tuple[int, bytes]]) -> None:
        data = await self._aio_read(loc.segment, loc.offset + start, n)
        if len(data) == n:
            extra[h] = (start, data)

    async def _fetch_run(self, seg: str, entry: tuple[int, int, asyncio.Future[None]], end: int,
                         items: list[tuple[Location, bytes]]) -> None:
        """Read ``[start, stop)`` of a segment (``entry``, registered in ``_reading``): the
        chunks in ``items`` (ending at ``end``), then, as read-ahead, the records after them."""
        start, stop, marker = entry
        try:
            blob = await self._aio_read(seg, start, stop - start)
        finally:
            ranges = self._reading[seg]
            ranges.remove(entry)
            if not ranges:
                del self._reading[seg]
            marker.set_result(None)
        chunks = self.pool.chunks
        view = memoryview(blob)
        for loc, h in items:
            at = loc.offset - start
            if at + loc.length > len(blob):
                raise CorruptionError(f"chunk {h.hex()} truncated in {seg}")
            chunks.remember(h, self._decoded(view, at, at + loc.length, loc.flags, loc.raw_length))
        if stop > end:
            self._readahead(seg, start, view, end - start)

    def _decoded(self, view: memoryview, at: int, end: int, flags: int, raw_length: int) -> bytes:
        """A chunk's bytes out of a segment read. An uncompressed data block is kept as a
        view into the read buffer (no copy; the views of one read are cached and evicted
        together); anything else (patches, map shards) as its own bytes."""
        if flags == RAW and raw_length == self.pool.chunk_size and end - at == raw_length:
            return view[at:end]  # type: ignore[return-value]
        return self._codec.decode(flags, bytes(view[at:end]), raw_length)

    def _readahead(self, seg: str, start: int, view: memoryview, pos: int) -> None:
        """Cache the chunk records of ``view`` (segment bytes from ``start``) from ``pos``
        on, trusting only those the index places exactly there."""
        index = self.pool.log.index
        chunks = self.pool.chunks
        size = len(view)
        while pos + _REC_OVERHEAD <= size:
            length, _crc, rtype = HEADER.unpack_from(view, pos)
            body = pos + HEADER.size
            if body + length > size:
                return
            if rtype in CHUNK_RECORDS:
                h, flags, raw = CHUNK_HEAD.unpack_from(view, body)
                at = body + CHUNK_HEAD.size
                loc = index.get(h)
                if (loc is not None and loc.segment == seg and loc.offset == start + at
                        and loc.length == body + length - at and not chunks.has(h)):
                    chunks.remember(h, self._decoded(view, at, body + length, flags, raw))
            elif rtype not in MAP_RECORDS:
                return
            pos = body + length
