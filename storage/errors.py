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
