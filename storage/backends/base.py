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
    def cas_pointer(self, name: str, expected: bytes | None, new: bytes | None, cookie: str | None = None) -> bool:
        """Atomically set the pointer to ``new`` if it is ``expected`` now.

        ``expected=None`` means "must not exist"; ``new=None`` removes it. Returns whether
        the swap happened. With ``cookie``, the swap also requires this client to hold the
        pointer's lock under that cookie (:meth:`lock_pointer`), else ``LockLost``.
        """

    # ------------------------------------------------------------------ locks
    # A pointer can carry one exclusive lock (RBD's exclusive-lock model): taken with a
    # cookie and an owner record (opaque bytes, readable by anyone), asserted by every
    # swap of the locked writer, broken by another client only after fencing the holder.

    @abc.abstractmethod
    def client_identity(self) -> tuple[str, str]:
        """(client name, address) of this connection: what a lock records and what
        :meth:`blocklist` takes to fence it."""

    @abc.abstractmethod
    def lock_pointer(self, name: str, cookie: str, owner: bytes, expected: bytes) -> bytes | None:
        """Lock the pointer (whose value must still be ``expected``) for this client and
        ``cookie``, storing ``owner`` with it. None on success (also when this client
        already holds it under ``cookie``), else the current holder's owner record.
        ``NotFound``-like ``ObjectNotFound`` if the pointer is gone or changed."""

    @abc.abstractmethod
    def unlock_pointer(self, name: str, cookie: str) -> None:
        """Release this client's lock (absent lock or pointer: nothing to do)."""

    @abc.abstractmethod
    def pointer_owner(self, name: str) -> bytes | None:
        """The owner record of the pointer's lock, or None if it is not locked."""

    @abc.abstractmethod
    def break_pointer_lock(self, name: str, owner: bytes, client: str, cookie: str) -> bool:
        """Remove another client's lock if its owner record is still ``owner``; whether it
        did. Fence (:meth:`blocklist`) the holder first, as RBD does."""

    @abc.abstractmethod
    def blocklist(self, addr: str, seconds: float) -> bool:
        """Make the cluster reject every operation of the client at ``addr`` for
        ``seconds``; False where the backend cannot fence (a local directory)."""

    @abc.abstractmethod
    def lease(self, name: str, cookie: str, seconds: float, description: str = "") -> bool:
        """Take or renew a lease (a lock that expires after ``seconds``) on the pointer
        object ``name``; False while another client holds it."""

    @abc.abstractmethod
    def release_lease(self, name: str, cookie: str) -> None:
        """Give a lease back (absent: nothing to do)."""

    @abc.abstractmethod
    def list_pointers(self, prefix: str = "") -> Iterator[str]:
        """Yield the names of existing pointers starting with ``prefix``."""

    @abc.abstractmethod
    def mtime(self, name: str) -> float:
        """Return the object's last modification time (UNIX seconds); ObjectNotFound if absent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and descriptors."""
