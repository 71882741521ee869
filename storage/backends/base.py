"""The object backend interface the engine talks to.

Objects are immutable-or-appended byte strings under ``/``-separated names. Pointers are
a separate, tiny namespace of named values that only change through an atomic
compare-and-swap: they hold the volume heads, everything else is content addressed.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator


class ObjectBackend(abc.ABC):
    """put/get/delete/list/exists plus append (the log) and pointer compare-and-swap."""

    url: str

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` durably and atomically (all or nothing)."""

    @abc.abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes (a range when ``length`` is given); ObjectNotFound if absent."""

    @abc.abstractmethod
    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to the object (created if absent). Durable once :meth:`sync` returns."""

    @abc.abstractmethod
    def sync(self, name: str) -> None:
        """Make every append to ``name`` durable."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Return the object's length in bytes; ObjectNotFound if absent."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; removing an absent object is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the names of objects starting with ``prefix`` (any order)."""

    def exists(self, name: str) -> bool:
        """Whether an object with this name exists."""
        try:
            self.size(name)
        except Exception as exc:  # ObjectNotFound; kept generic so subclasses may raise it directly
            from storage.errors import ObjectNotFound

            if isinstance(exc, ObjectNotFound):
                return False
            raise
        return True

    @abc.abstractmethod
    def get_pointer(self, name: str) -> bytes | None:
        """Return the pointer's current value, or None if it was never set (or was removed)."""

    @abc.abstractmethod
    def cas_pointer(self, name: str, expected: bytes | None, new: bytes | None) -> bool:
        """Atomically set the pointer to ``new`` if it is ``expected`` now.

        ``expected=None`` means "must not exist"; ``new=None`` removes it. Returns whether
        the swap happened.
        """

    @abc.abstractmethod
    def list_pointers(self, prefix: str = "") -> Iterator[str]:
        """Yield the names of existing pointers starting with ``prefix``."""

    @abc.abstractmethod
    def mtime(self, name: str) -> float:
        """Return the object's last modification time (UNIX seconds); ObjectNotFound if absent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and descriptors."""
