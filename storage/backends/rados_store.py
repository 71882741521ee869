"""The ``rados`` backend: objects in a Ceph pool (one of the two modules allowed to import rados)."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import rados

from storage.backends.base import ObjectBackend
from storage.errors import BackendError, ObjectNotFound

_KEY = "v"
log = logging.getLogger("cairn.rados")


def _error(what: str, name: str, rv: int) -> Exception:
    if rv == -errno.ENOENT:
        return ObjectNotFound(name)
    return BackendError(f"{what} {name}: {errno.errorcode.get(-rv, rv)}")


def _report(cb: Callable[..., None], *args: object) -> None:
    try:
        cb(*args)
    except Exception:  # a callback runs on a librados thread: nobody else would see it
        log.exception("aio completion callback failed")


class RadosBackend(ObjectBackend):
    """Objects in namespace ``<ns>``, pointers as omap values in namespace ``<ns>.ptr``.

    Appends are acknowledged by RADOS only once every replica has them, so :meth:`sync`
    has nothing left to do. ``aio_*`` variants report through a callback run on a
    librados thread (used by the log's pipelined commits and the NBD server's reads).
    """

    appends_durable = True

    def __init__(self, conf: str, pool: str, namespace: str = "cairn", op_timeout: float = 30.0) -> None:
        self.url = f"rados://{pool}/{namespace}?conf={conf}"
        self._cluster = rados.Rados(conffile=conf, name="client.admin")
        self._cluster.conf_set("rados_osd_op_timeout", str(int(op_timeout)))
        try:
            self._cluster.connect(timeout=30)
            self._io = self._cluster.open_ioctx(pool)
            self._ptr = self._cluster.open_ioctx(pool)
        except rados.Error as exc:
            self._cluster.shutdown()
            raise BackendError(f"cannot open rados pool {pool!r} with {conf}: {exc}") from exc
        self._io.set_namespace(namespace)
        self._ptr.set_namespace(namespace + ".ptr")

    def put(self, name: str, data: bytes) -> None:
        """write_full is atomic in RADOS."""
        try:
            self._io.write_full(name, bytes(data))
        except rados.Error as exc:
            raise BackendError(f"put {name}: {exc}") from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read the object (a stat first when the length is not known)."""
        try:
            if length is None:
                length = max(self._io.stat(name)[0] - offset, 0)
                if length == 0:
                    return b""
            data: bytes = self._io.read(name, length, offset)
            return data
        except rados.ObjectNotFound:
            raise ObjectNotFound(name) from None
        except rados.Error as exc:
            raise BackendError(f"get {name}: {exc}") from exc

    def append(self, name: str, data: bytes) -> None:
        """RADOS append: durable on all replicas when it returns."""
        try:
            self._io.append(name, bytes(data))
        except rados.Error as exc:
            raise BackendError(f"append {name}: {exc}") from exc

    def sync(self, name: str) -> None:
        """Nothing to do: appends are already replicated when acknowledged."""

    def aio_append(self, name: str, data: bytes, cb: Callable[[BaseException | None], None]) -> None:
        """Queue an append; ``cb(None)`` once every replica has it, ``cb(error)`` otherwise.
        Appends to one object land in the order they were queued."""

        def done(comp: Any) -> None:
            rv = comp.get_return_value()
            _report(cb, None if rv >= 0 else _error("append", name, rv))

        self._io.aio_append(name, bytes(data), oncomplete=done)

    def aio_put(self, name: str, data: bytes, cb: Callable[[BaseException | None], None]) -> None:
        """Queue an atomic write_full."""

        def done(comp: Any) -> None:
            rv = comp.get_return_value()
            _report(cb, None if rv >= 0 else _error("put", name, rv))

        self._io.aio_write_full(name, bytes(data), oncomplete=done)

    def aio_read(self, name: str, offset: int, length: int,
                 cb: Callable[[bytes | None, BaseException | None], None]) -> None:
        """Queue a range read; ``cb(data, None)`` (shorter at the object's end) or ``cb(None, error)``."""

        def done(comp: Any, data: bytes | None) -> None:
            rv = comp.get_return_value()
            if rv < 0:
                _report(cb, None, _error("get", name, rv))
            else:
                _report(cb, data if data is not None else b"", None)

        self._io.aio_read(name, length, offset, oncomplete=done)

    def size(self, name: str) -> int:
        """stat the object."""
        try:
            size: int = self._io.stat(name)[0]
            return size
        except rados.ObjectNotFound:
            raise ObjectNotFound(name) from None
        except rados.Error as exc:
            raise BackendError(f"stat {name}: {exc}") from exc

    def mtime(self, name: str) -> float:
        """stat the object."""
        try:
            return float(time.mktime(self._io.stat(name)[1]))
        except rados.ObjectNotFound:
            raise ObjectNotFound(name) from None

    def delete(self, name: str) -> None:
        """remove_object, ignoring absent objects."""
        try:
            self._io.remove_object(name)
        except rados.ObjectNotFound:
            pass
        except rados.Error as exc:
            raise BackendError(f"delete {name}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        """List the namespace (RADOS has no prefix listing: filter client side)."""
        try:
            for obj in self._io.list_objects():
                key: str = obj.key
                if key.startswith(prefix):
                    yield key
        except rados.Error as exc:
            raise BackendError(f"list: {exc}") from exc

    def get_pointer(self, name: str) -> bytes | None:
        """Read the omap value of the pointer object."""
        try:
            with rados.ReadOpCtx() as op:
                it, _ret = self._ptr.get_omap_vals_by_keys(op, (_KEY,))
                self._ptr.operate_read_op(op, name)
                values: dict[str, Any] = dict(it)
        except rados.ObjectNotFound:
            return None
        except rados.Error as exc:
            raise BackendError(f"get pointer {name}: {exc}") from exc
        raw = values.get(_KEY)
        return None if raw is None else bytes.fromhex(bytes(raw).decode())

    def cas_pointer(self, name: str, expected: bytes | None, new: bytes | None) -> bool:
        """One RADOS write op: exclusive create or omap_cmp, then set (or remove).

        Values are hex-encoded because the binding's omap_cmp takes text.
        """
        try:
            with rados.WriteOpCtx() as op:
                if expected is None:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                else:
                    op.omap_cmp(_KEY, expected.hex(), rados.LIBRADOS_CMPXATTR_OP_EQ)
                if new is None:
                    op.remove()
                else:
                    self._ptr.set_omap(op, (_KEY,), (new.hex().encode(),))
                self._ptr.operate_write_op(op, name)
            return True
        except (rados.ObjectExists, rados.ObjectNotFound):
            return False
        except rados.Error as exc:
            if getattr(exc, "errno", None) in (errno.ECANCELED, errno.EEXIST, errno.ENOENT) or "-125" in str(exc):
                return False
            raise BackendError(f"cas pointer {name}: {exc}") from exc

    def list_pointers(self, prefix: str = "") -> Iterator[str]:
        """List the pointer namespace."""
        for obj in self._ptr.list_objects():
            key: str = obj.key
            if key.startswith(prefix):
                yield key

    def close(self) -> None:
        """Close the I/O contexts and the cluster handle."""
        self._io.close()
        self._ptr.close()
        self._cluster.shutdown()
