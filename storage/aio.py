"""Asynchronous backend operations for the log and the NBD server (see :class:`AsyncIO`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from storage.backends.base import ObjectBackend

Callback = Callable[[BaseException | None], None]
ReadCallback = Callable[[bytes | None, BaseException | None], None]


class AsyncIO:
    """Backend operations that report completion through a callback (from any thread).

    With a backend that has librados-style ``aio_*`` methods, operations go straight to
    it (no thread per operation, any number in flight; appends to one object land in
    submission order). Otherwise one ordered worker thread runs them (local directories),
    and reads go to a small pool of reader threads.
    """

    def __init__(self, backend: ObjectBackend) -> None:
        self.backend = backend
        self.native = all(hasattr(backend, m) for m in ("aio_append", "aio_put", "aio_read"))
        # RADOS acknowledges an append once every replica has it: nothing left to sync.
        self.durable = bool(getattr(backend, "appends_durable", False))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-io")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="log-read")
        self._unsynced: set[str] = set()

    def _run(self, cb: Callback, fn: Callable[[], None]) -> None:
        def task() -> None:
            try:
                fn()
            except BaseException as exc:  # reported through the callback
                cb(exc)
                return
            cb(None)

        self._worker.submit(task)

    def append(self, name: str, data: bytes, cb: Callback) -> None:
        """Append; ``cb`` once it is in the backend (durable for RADOS)."""
        if self.native:
            try:
                self.backend.aio_append(name, data, cb)  # type: ignore[attr-defined]
            except BaseException as exc:
                cb(exc)
            return

        def run() -> None:
            self.backend.append(name, data)
            self._unsynced.add(name)

        self._run(cb, run)

    def sync(self, cb: Callback) -> None:
        """Make every append submitted so far durable."""
        if self.durable:
            cb(None)
            return

        def run() -> None:
            names, self._unsynced = self._unsynced, set()
            for n in names:
                self.backend.sync(n)

        self._run(cb, run)

    def put_index(self, segment: str, data: bytes, cb: Callback) -> None:
        """Store a segment's index once the segment's appends are durable."""
        if self.native:
            try:
                self.backend.aio_put("idx/" + segment[4:], data, cb)  # type: ignore[attr-defined]
            except BaseException as exc:
                cb(exc)
            return

        def run() -> None:
            if not self.durable:
                self.backend.sync(segment)
                self._unsynced.discard(segment)
            self.backend.put("idx/" + segment[4:], data)

        self._run(cb, run)

    def read(self, name: str, offset: int, length: int, cb: ReadCallback) -> None:
        """Read a range (shorter at the end of the object); ``cb(data, None)`` or ``cb(None, exc)``."""
        if self.native:
            try:
                self.backend.aio_read(name, offset, length, cb)  # type: ignore[attr-defined]
            except BaseException as exc:
                cb(None, exc)
            return

        def task() -> None:
            try:
                data = self.backend.get(name, offset, length)
            except BaseException as exc:
                cb(None, exc)
                return
            cb(data, None)

        self._readers.submit(task)

    def close(self) -> None:
        """Finish queued operations and stop the threads."""
        self._worker.shutdown(wait=True)
        self._readers.shutdown(wait=True)
