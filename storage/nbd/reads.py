"""The NBD server's backend reads: asynchronous, merged, deduplicated, read ahead.

What a request lacks in memory is read with the backend's asynchronous reads (librados
aio, completions handed to the event loop in batches): neighbouring chunks of a segment
in one read of at most ``PIECE``, a small read of an uncompressed chunk as just its
bytes. A sequential reader gets a read-ahead window of the volume that grows with its
run (up to ``AHEAD``; chunks of a sequential write lie contiguously in their segment, so
that is a few large reads). Concurrent requests wait for a read already in flight
instead of issuing their own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.aio import ReadCallback
from storage.chunks import RAW, ChunkCodec
from storage.engine import Pool, Volume
from storage.errors import CorruptionError
from storage.log import Location

if TYPE_CHECKING:
    from storage.nbd.connection import ReplyBatch

log = logging.getLogger("cairn.nbd")
AHEAD = 32 << 20  # the most a sequential reader gets read ahead of it
MIN_AHEAD = 256 << 10  # its first read-ahead window
PIECE = 1 << 20  # backend reads of neighbouring chunks stop at this size
LARGE_READ = 128 << 10  # a request this large fetches whole chunks
SMALL_READ = 16 << 10  # up to this, a read of an uncompressed chunk fetches just its bytes


@dataclass
class _Run:
    """A volume's sequential reader: where its next request would start, how much it
    read in a row, and how far ahead of it reads were issued."""

    next: int
    length: int
    ahead: int


class ReadPath:
    """Backend reads of one pool for the NBD server (all on the event loop's thread)."""

    def __init__(self, pool: Pool, replies: ReplyBatch | None = None) -> None:
        self.pool = pool
        self.replies = replies  # replies sent by completions go out together
        self._loop: asyncio.AbstractEventLoop | None = None
        # Segment ranges being read: (start, end, future) per segment.
        self._reading: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._runs: dict[str, _Run] = {}  # volume -> its sequential reader
        self.background: set[asyncio.Task[None]] = set()
        self._codec = ChunkCodec()
        self._completed: collections.deque[tuple[ReadCallback, bytes | None, BaseException | None]] = (
            collections.deque())
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
        self._runs.pop(volume, None)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() makes a getpid() system call each time
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def read_cb(self, seg: str, offset: int, length: int, cb: ReadCallback) -> None:
        """Read a range of a segment (librados aio); ``cb(data, exc)`` runs on the loop."""
        loop = self._get_loop()

        def done(data: bytes | None, exc: BaseException | None) -> None:  # on a backend thread
            # Completions are handed over in batches: one loop wake-up for all of those
            # that arrive while the loop is busy.
            self._completed.append((cb, data, exc))
            if not self._wake_pending:
                self._wake_pending = True
                loop.call_soon_threadsafe(self.settle_completed)

        self.in_flight += 1
        self.pool.log.read_async(seg, offset, length, done)

    def settle_completed(self) -> None:
        self._wake_pending = False
        gathering = self.replies is not None and self.replies.begin()
        try:
            self._settle()
        finally:
            if gathering:
                assert self.replies is not None
                self.replies.end()

    def _settle(self) -> None:
        completed = self._completed
        while completed:
            cb, data, exc = completed.popleft()
            self.in_flight -= 1
            try:
                cb(data, exc)
            except Exception:
                log.exception("read completion failed")

    def note_read(self, vol: Volume, offset: int, length: int) -> bool:
        """Follow a volume's sequential reader (call for every read request) and keep
        its read-ahead going. Returns whether the request continues a sequential run
        (or is large): then it fetches whole chunks.

        The window grows with the run like the kernel's (four times what the run read
        so far, from ``MIN_AHEAD`` up to ``AHEAD``), so a single read, or a short file,
        costs no read-ahead, and it is refilled a quarter at a time in backend reads of
        at most ``PIECE``: many short reads in flight, spread over the placement groups,
        rather than a few long ones whose first byte comes only with their last.
        """
        end = offset + length
        run = self._runs.get(vol.name)
        if run is None:
            self._runs[vol.name] = _Run(end, length, end)
            return length >= LARGE_READ
        if offset != run.next:  # a new run (a random read, most often)
            run.next = run.ahead = end
            run.length = length
            return length >= LARGE_READ
        run.next = end
        run.length += length
        window = min(AHEAD, max(MIN_AHEAD, 4 * run.length))
        ahead = max(run.ahead, end)
        stop = min(vol.size, end + window)
        if stop - ahead >= window // 4 or (stop == vol.size and stop > ahead):
            run.ahead = stop
            task = self._get_loop().create_task(self._read_ahead(vol, ahead, stop))
            self.background.add(task)
            task.add_done_callback(self._background_done)
        else:
            run.ahead = ahead
        return True

    async def _read_ahead(self, vol: Volume, start: int, stop: int) -> None:
        # A patch not in memory hides its base: a second round fetches those.
        for _ in range(2):
            needs = vol.read_needs(start, stop - start)
            if not needs:
                return
            await self.fetch(needs, {}, True)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("read-ahead failed: %s", task.exception())

    def being_read(self, loc: Location) -> asyncio.Future[None] | None:
        for start, end, fut in self._reading.get(loc.segment, ()):
            if start <= loc.offset and loc.offset + loc.length <= end:
                return fut
        return None

    def fetch(self, needs: list[tuple[bytes, int, int]], extra: dict[bytes, tuple[int, bytes]],
              whole: bool) -> asyncio.Future[Any]:
        """Bring what ``needs`` lists into the chunk cache (whole chunks) or ``extra``
        (small ranges of uncompressed chunks, unless ``whole``), with as few backend reads
        as possible: neighbours in a segment in one read of at most ``PIECE``. The reads
        are registered at once, so requests that come later wait for them instead of
        reading again. Returns what to await."""
        index = self.pool.log.index
        waits: list[asyncio.Future[Any]] = []
        runs: dict[str, list[tuple[Location, bytes]]] = {}
        seen: set[bytes] = set()
        for h, start, n in needs:
            loc = index.get(h)
            if loc is None or h in seen:
                continue  # the read itself reports a missing chunk
            seen.add(h)
            fut = self.being_read(loc)
            if fut is not None:
                waits.append(fut)
            elif 0 <= n <= SMALL_READ and loc.flags == RAW and not whole:
                waits.append(self._fetch_range(h, loc, start, n, extra))
            else:
                runs.setdefault(loc.segment, []).append((loc, h))
        loop = self._get_loop()
        for seg, items in runs.items():
            items.sort(key=lambda m: m[0].offset)
            i = 0
            while i < len(items):
                first = items[i][0]
                end = first.offset + first.length
                j = i + 1
                while (j < len(items) and 0 <= items[j][0].offset - end < 65536
                       and items[j][0].offset + items[j][0].length - first.offset <= PIECE):
                    end = max(end, items[j][0].offset + items[j][0].length)
                    j += 1
                entry = (first.offset, end, loop.create_future())
                self._reading.setdefault(seg, []).append(entry)
                waits.append(self._fetch_run(seg, entry, items[i:j]))
                i = j
        return asyncio.gather(*waits)

    def _fetch_range(self, h: bytes, loc: Location, start: int, n: int,
                     extra: dict[bytes, tuple[int, bytes]]) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self._get_loop().create_future()

        def landed(data: bytes | None, exc: BaseException | None) -> None:
            if exc is not None:
                done.set_exception(exc)
                return
            if data is not None and len(data) == n:
                extra[h] = (start, data)
            done.set_result(None)

        self.read_cb(loc.segment, loc.offset + start, n, landed)
        return done

    def _fetch_run(self, seg: str, entry: tuple[int, int, asyncio.Future[None]],
                   items: list[tuple[Location, bytes]]) -> asyncio.Future[None]:
        """Read ``[start, stop)`` of a segment (``entry``, registered in ``_reading``):
        the chunks in ``items``."""
        start, stop, marker = entry
        done: asyncio.Future[None] = self._get_loop().create_future()

        def landed(blob: bytes | None, exc: BaseException | None) -> None:
            ranges = self._reading[seg]
            ranges.remove(entry)
            if not ranges:
                del self._reading[seg]
            marker.set_result(None)
            try:
                if exc is not None:
                    raise exc
                assert blob is not None
                chunks = self.pool.chunks
                view = memoryview(blob)
                for loc, h in items:
                    at = loc.offset - start
                    if at + loc.length > len(blob):
                        raise CorruptionError(f"chunk {h.hex()} truncated in {seg}")
                    chunks.remember(h, self._decoded(view, at, at + loc.length, loc.flags, loc.raw_length))
            except BaseException as error:  # handed to the waiting request
                done.set_exception(error)
                return
            done.set_result(None)

        self.read_cb(seg, start, stop - start, landed)
        return done

    def _decoded(self, view: memoryview, at: int, end: int, flags: int, raw_length: int) -> bytes:
        """A chunk's bytes out of a segment read. An uncompressed data block is kept as a
        view into the read buffer (no copy; the views of one read are cached and evicted
        together); anything else (patches, map shards) as its own bytes."""
        if flags == RAW and raw_length == self.pool.chunk_size and end - at == raw_length:
            return view[at:end]  # type: ignore[return-value]
        return self._codec.decode(flags, bytes(view[at:end]), raw_length)
