"""The ``rados`` backend: objects in a Ceph pool (one of the two modules allowed to import rados)."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import rados

from storage.backends.base import ObjectBackend
from storage.errors import BackendError, LockLost, ObjectNotFound

_KEY = "v"
_OWNER = "owner"
_LOCK = "cairn"  # the lock name on a volume head (RBD: "rbd_lock")
_LEASE = "lease"
_EXCLUSIVE = 1
_MAY_RENEW = 1
_ENTITY_CLIENT = 8
log = logging.getLogger("cairn.rados")


# ---------------------------------------------------------------- cls_lock requests
# The Python binding has no list/break/assert for advisory locks, but it runs object
# class methods inside a write op: these build the requests of Ceph's ``lock`` class
# (src/cls/lock/cls_lock_ops.h: ENCODE_START(1, 1) = version, compat, length).


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def _versioned(payload: bytes) -> bytes:
    return struct.pack("<BBI", 1, 1, len(payload)) + payload


def _lock_op(name: str, cookie: str, description: str, seconds: float = 0.0, flags: int = 0) -> bytes:
    secs = int(seconds)
    return _versioned(_s(name) + struct.pack("<B", _EXCLUSIVE) + _s(cookie) + _s("") + _s(description)
                      + struct.pack("<IIB", secs, int((seconds - secs) * 1e9), flags))


def _unlock_op(name: str, cookie: str) -> bytes:
    return _versioned(_s(name) + _s(cookie))


def _assert_op(name: str, cookie: str) -> bytes:
    return _versioned(_s(name) + struct.pack("<B", _EXCLUSIVE) + _s(cookie) + _s(""))


def _break_op(name: str, client: str, cookie: str) -> bytes:
    kind, _, num = client.partition(".")
    if kind != "client" or not num.isdigit():
        raise BackendError(f"not a RADOS client name: {client!r}")
    return _versioned(_s(name) + struct.pack("<Bq", _ENTITY_CLIENT, int(num)) + _s(cookie))


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return abs(code)
    for known in (errno.ECANCELED, errno.EBUSY, errno.ENOENT, errno.EEXIST):
        if f"-{known}" in str(exc) or f"errno {known}]" in str(exc):
            return known
    return None


def _error(what: str, name: str, rv: int) -> Exception:
    if rv == -errno.ENOENT:
        return ObjectNotFound(name)
    return BackendError(f"{what} {name}: {errno.errorcode.get(-rv, rv)}")


# librados runs completion callbacks on its own threads, which have no Python thread
# state: the binding's ``with gil`` (PyGILState_Ensure) creates one for every callback
# and destroys it afterwards, with the GIL held: a data-stack mmap + munmap (TLB
# shootdown IPIs), gettid and the state's set-up each time, ~12 µs of CPU per
# completion measured here, while the event loop waits for the GIL. A second, never
# released PyGILState_Ensure (documented C API) keeps the thread's state for the
# thread's life: later callbacks only take the GIL.
_ADOPTED: set[int] = set()
_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.restype = ctypes.c_int
_gil_ensure.argtypes = []


def _adopt_thread() -> None:
    ident = threading.get_ident()
    if ident not in _ADOPTED:
        _gil_ensure()
        _ADOPTED.add(ident)


def client_threads(cpus: int) -> dict[str, str]:
    """librados thread counts for this process. Completions: one thread (every callback
    needs the GIL, so a second one only contends for it). Messenger threads: one per
    two CPUs, at most librados' default three: on a small node each extra thread is
    context switches per operation, not parallelism (a 4 KiB read measured 33 µs of
    client CPU with one messenger and one completion thread, 45 µs with 3 and 2, on 2 CPUs)."""
    return {"librados_thread_count": "1", "ms_async_op_threads": str(max(1, min(3, cpus // 2)))}


def _report(cb: Callable[..., None], *args: object) -> None:
    try:
        _adopt_thread()
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
        for key, value in client_threads(os.cpu_count() or 1).items():
            self._cluster.conf_set(key, value)
        try:
            self._cluster.connect(timeout=30)
            self._io = self._cluster.open_ioctx(pool)
            self._ptr = self._cluster.open_ioctx(pool)
        except rados.Error as exc:
            self._cluster.shutdown()
            raise BackendError(f"cannot open rados pool {pool!r} with {conf}: {exc}") from exc
        self._io.set_namespace(namespace)
        self._ptr.set_namespace(namespace + ".ptr")
        self.closed = False

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

    def _omap_value(self, name: str, key: str) -> bytes | None:
        """One omap value of a pointer object (hex-encoded there), None if absent."""
        try:
            with rados.ReadOpCtx() as op:
                it, _ret = self._ptr.get_omap_vals_by_keys(op, (key,))
                self._ptr.operate_read_op(op, name)
                values: dict[str, Any] = dict(it)
        except rados.ObjectNotFound:
            return None
        except rados.Error as exc:
            raise BackendError(f"read {key} of pointer {name}: {exc}") from exc
        raw = values.get(key)
        return None if raw is None else bytes.fromhex(bytes(raw).decode())

    def get_pointer(self, name: str) -> bytes | None:
        """Read the omap value of the pointer object."""
        return self._omap_value(name, _KEY)

    def cas_pointer(self, name: str, expected: bytes | None, new: bytes | None, cookie: str | None = None) -> bool:
        """One RADOS write op: [assert our lock], exclusive create or omap_cmp, then set
        (or remove). Values are hex-encoded because the binding's omap_cmp takes text.
        """
        try:
            with rados.WriteOpCtx() as op:
                if cookie is not None:
                    op.execute("lock", "assert_locked", _assert_op(_LOCK, cookie))
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
        except rados.ObjectBusy:
            raise LockLost(f"lock on {name} is no longer held by this writer") from None
        except (rados.ObjectExists, rados.ObjectNotFound):
            return False
        except rados.Error as exc:
            if _errno(exc) in (errno.ECANCELED, errno.EEXIST, errno.ENOENT):
                return False
            raise BackendError(f"cas pointer {name}: {exc}") from exc

    # ------------------------------------------------------------------ locks
    def client_identity(self) -> tuple[str, str]:
        """``client.<global id>`` and the address the OSDs see (what a blocklist takes)."""
        addrs = str(self._cluster.get_addrs()).strip("[]").split(",")[0]
        for prefix in ("v1:", "v2:", "any:"):
            addrs = addrs.removeprefix(prefix)
        return f"client.{self._cluster.get_instance_id()}", addrs

    def lock_pointer(self, name: str, cookie: str, owner: bytes, expected: bytes) -> bytes | None:
        """One write op: the pointer is still ``expected``, cls_lock exclusive lock (renewed
        if ours), owner record as an omap value next to the pointer's."""
        description = json.loads(owner).get("node", "") if owner.startswith(b"{") else ""
        try:
            with rados.WriteOpCtx() as op:
                op.omap_cmp(_KEY, expected.hex(), rados.LIBRADOS_CMPXATTR_OP_EQ)
                op.execute("lock", "lock", _lock_op(_LOCK, cookie, f"cairn node {description}", flags=_MAY_RENEW))
                self._ptr.set_omap(op, (_OWNER,), (owner.hex().encode(),))
                self._ptr.operate_write_op(op, name)
            return None
        except rados.ObjectBusy:
            return self.pointer_owner(name) or b""
        except rados.ObjectNotFound:
            raise ObjectNotFound(name) from None
        except rados.Error as exc:
            if _errno(exc) in (errno.ECANCELED, errno.ENOENT):
                raise ObjectNotFound(name) from None
            raise BackendError(f"lock {name}: {exc}") from exc

    def unlock_pointer(self, name: str, cookie: str) -> None:
        """cls_lock unlock and the owner record go together; a lock we no longer hold
        (broken, or the pointer deleted) is left as it is."""
        try:
            with rados.WriteOpCtx() as op:
                op.execute("lock", "unlock", _unlock_op(_LOCK, cookie))
                self._ptr.remove_omap_keys(op, (_OWNER,))
                self._ptr.operate_write_op(op, name)
        except rados.ObjectNotFound:
            pass
        except rados.Error as exc:
            if _errno(exc) not in (errno.ENOENT, errno.EBUSY):
                raise BackendError(f"unlock {name}: {exc}") from exc

    def pointer_owner(self, name: str) -> bytes | None:
        """The owner omap value of the pointer object."""
        return self._omap_value(name, _OWNER)

    def break_pointer_lock(self, name: str, owner: bytes, client: str, cookie: str) -> bool:
        """One write op: the owner record is still ``owner``, break that client's lock,
        drop the record."""
        try:
            with rados.WriteOpCtx() as op:
                op.omap_cmp(_OWNER, owner.hex(), rados.LIBRADOS_CMPXATTR_OP_EQ)
                op.execute("lock", "break_lock", _break_op(_LOCK, client, cookie))
                self._ptr.remove_omap_keys(op, (_OWNER,))
                self._ptr.operate_write_op(op, name)
            return True
        except rados.ObjectNotFound:
            return False
        except rados.Error as exc:
            if _errno(exc) in (errno.ECANCELED, errno.ENOENT, errno.EBUSY):
                return False
            raise BackendError(f"break lock {name}: {exc}") from exc

    def blocklist(self, addr: str, seconds: float) -> bool:
        """``osd blocklist add`` through the monitor command API, then wait for the new
        OSD map so our next operations carry it (OSDs that see it refuse the client)."""
        cmd = {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr, "expire": float(seconds)}
        r, _out, err = self._cluster.mon_command(json.dumps(cmd), b"", timeout=30)
        if r != 0:
            raise BackendError(f"osd blocklist add {addr}: {err or errno.errorcode.get(-r, r)}")
        self._cluster.wait_for_latest_osdmap()
        return True

    def lease(self, name: str, cookie: str, seconds: float, description: str = "") -> bool:
        """A cls_lock lock with a duration on the pointer object (renewed if ours)."""
        try:
            with rados.WriteOpCtx() as op:
                op.execute("lock", "lock", _lock_op(_LEASE, cookie, description, seconds, _MAY_RENEW))
                self._ptr.operate_write_op(op, name)
            return True
        except rados.ObjectBusy:
            return False
        except rados.Error as exc:
            if _errno(exc) in (errno.EBUSY, errno.EEXIST):
                return False
            raise BackendError(f"lease {name}: {exc}") from exc

    def release_lease(self, name: str, cookie: str) -> None:
        """cls_lock unlock of the lease (already expired or taken: nothing to do)."""
        try:
            with rados.WriteOpCtx() as op:
                op.execute("lock", "unlock", _unlock_op(_LEASE, cookie))
                self._ptr.operate_write_op(op, name)
        except rados.Error as exc:
            if _errno(exc) not in (errno.ENOENT, errno.EBUSY):
                raise BackendError(f"release lease {name}: {exc}") from exc

    def list_pointers(self, prefix: str = "") -> Iterator[str]:
        """List the pointer namespace."""
        for obj in self._ptr.list_objects():
            key: str = obj.key
            if key.startswith(prefix):
                yield key

    def close(self) -> None:
        """Close the I/O contexts and the cluster handle."""
        self.closed = True
        self._io.close()
        self._ptr.close()
        self._cluster.shutdown()
