"""The storage library's one exception hierarchy.

Every error the library raises on purpose derives from :class:`StorageError`, so the
control plane can map them to problem+json responses with one ``except`` clause.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""


class BackendError(StorageError):
    """The object backend failed (I/O error, cluster unreachable, ...)."""


class ObjectNotFound(StorageError):
    """A named object does not exist in the backend."""


class NotFound(StorageError):
    """A pool, volume or snapshot does not exist."""


class AlreadyExists(StorageError):
    """A volume or snapshot with that name already exists."""


class InvalidArgument(StorageError):
    """Bad input: offset out of range, shrinking without force, bad name..."""


class ConflictError(StorageError):
    """A concurrent change won a compare-and-swap; retry with fresh state."""


class CorruptionError(StorageError):
    """Stored data failed its hash or framing check."""


class ClusterError(StorageError):
    """The embedded Ceph cluster launcher could not start or stop a cluster."""


class OwnedElsewhere(ConflictError):
    """A volume is locked by another writer (node + RADOS client) that is alive, or not
    known to be dead: the message names it, ``owner`` has the lock record."""

    def __init__(self, message: str, owner: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.owner = owner or {}


class LockLost(ConflictError):
    """This writer no longer holds a lock it needs (broken by a takeover after a fence)."""


class Busy(ConflictError):
    """A cluster-wide job (garbage collection, scrub) is running elsewhere: try again later."""
