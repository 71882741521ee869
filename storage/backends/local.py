"""The ``local`` backend: a directory. Writes are fsync'ed and renamed into place."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.backends.base import ObjectBackend
from storage.errors import BackendError, InvalidArgument, LockLost, ObjectNotFound

_OBJ = "obj"
_PTR = "ptr"
_LOCKS = "locks"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(ObjectBackend):
    """Objects as files under ``<root>/obj``, pointers under ``<root>/ptr``, pointer locks
    and leases under ``<root>/locks`` (one node only: there is nothing to fence, so
    :meth:`blocklist` says False; a dead holder is recognised by its process id)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"local://{self.root}"
        for sub in (_OBJ, _PTR, _LOCKS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._append_fds: dict[str, int] = {}
        self._lock_path = self.root / "ptr.lock"
        self._client = f"local.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.closed = False

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _path(self, kind: str, name: str) -> Path:
        if not name or name.startswith("/") or ".." in name.split("/") or name.endswith(".tmp"):
            raise InvalidArgument(f"bad object name {name!r}")
        return self.root / kind / name

    def _atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        _fsync_dir(path.parent)

    def put(self, name: str, data: bytes) -> None:
        """Write to a temporary file, fsync it, rename it over the name, fsync the directory."""
        try:
            self._atomic_write(self._path(_OBJ, name), data)
        except OSError as exc:
            raise BackendError(f"put {name}: {exc}") from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read the whole object or a range of it."""
        try:
            with open(self._path(_OBJ, name), "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(name) from None
        except OSError as exc:
            raise BackendError(f"get {name}: {exc}") from exc

    def append(self, name: str, data: bytes) -> None:
        """Append through a cached O_APPEND descriptor (fdatasync happens in :meth:`sync`)."""
        fd = self._append_fds.get(name)
        try:
            if fd is None:
                path = self._path(_OBJ, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._append_fds[name] = fd
                _fsync_dir(path.parent)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise BackendError(f"append {name}: {exc}") from exc

    def sync(self, name: str) -> None:
        """fdatasync the object's append descriptor, if any."""
        fd = self._append_fds.get(name)
        if fd is not None:
            os.fdatasync(fd)

    def size(self, name: str) -> int:
        """Length of the file."""
        try:
            return self._path(_OBJ, name).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def mtime(self, name: str) -> float:
        """Modification time of the file."""
        try:
            return self._path(_OBJ, name).stat().st_mtime
        except FileNotFoundError:
            raise ObjectNotFound(name) from None

    def delete(self, name: str) -> None:
        """Unlink the file (absent is fine)."""
        fd = self._append_fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        try:
            self._path(_OBJ, name).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[str]:
        """Walk the object directory; temporary files are not objects."""
        base = self.root / _OBJ
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            for f in files:
                if f.endswith(".tmp"):
                    continue
                name = f if rel == "." else f"{rel}/{f}"
                if name.startswith(prefix):
                    yield name

    def get_pointer(self, name: str) -> bytes | None:
        """Read the pointer file."""
        try:
            return self._path(_PTR, name).read_bytes()
        except FileNotFoundError:
            return None

    def cas_pointer(self, name: str, expected: bytes | None, new: bytes | None, cookie: str | None = None) -> bool:
        """Compare and swap under an exclusive flock shared by every process using the directory."""
        path = self._path(_PTR, name)
        with self._exclusive():
            if self.get_pointer(name) != expected:
                return False
            if cookie is not None:
                held = self._lock_record(name)
                if held is None or (held["client"], held["cookie"]) != (self._client, cookie):
                    raise LockLost(f"lock on {name} is no longer held by this writer")
            if new is None:
                path.unlink(missing_ok=True)
                self._path(_LOCKS, name).unlink(missing_ok=True)
                _fsync_dir(path.parent)
            else:
                self._atomic_write(path, new)
            return True

    # ------------------------------------------------------------------ locks
    def _lock_record(self, name: str) -> dict[str, object] | None:
        try:
            rec: dict[str, object] = json.loads(self._path(_LOCKS, name).read_bytes())
        except FileNotFoundError:
            return None
        expires = rec.get("expires")
        if isinstance(expires, (int, float)) and expires < time.time():
            return None
        return rec

    def client_identity(self) -> tuple[str, str]:
        """A name per backend object (one "client" per open pool, like a RADOS handle)."""
        return self._client, f"local:{self._client}"

    def lock_pointer(self, name: str, cookie: str, owner: bytes, expected: bytes) -> bytes | None:
        """Take the lock file if free (or ours) and the pointer is still ``expected``."""
        with self._exclusive():
            if self.get_pointer(name) != expected:
                raise ObjectNotFound(f"pointer {name} is gone or changed")
            held = self._lock_record(name)
            if held is not None and (held["client"], held["cookie"]) != (self._client, cookie):
                return bytes.fromhex(str(held["owner"]))
            rec = {"client": self._client, "cookie": cookie, "owner": owner.hex(), "expires": None}
            self._atomic_write(self._path(_LOCKS, name), json.dumps(rec).encode())
            return None

    def unlock_pointer(self, name: str, cookie: str) -> None:
        """Remove our lock file."""
        with self._exclusive():
            held = self._lock_record(name)
            if held is not None and (held["client"], held["cookie"]) == (self._client, cookie):
                self._path(_LOCKS, name).unlink(missing_ok=True)

    def pointer_owner(self, name: str) -> bytes | None:
        """The owner record in the lock file."""
        held = self._lock_record(name)
        return None if held is None else bytes.fromhex(str(held["owner"]))

    def break_pointer_lock(self, name: str, owner: bytes, client: str, cookie: str) -> bool:
        """Remove the lock file if it still names that holder."""
        with self._exclusive():
            held = self._lock_record(name)
            if held is None or (held["client"], held["cookie"], held["owner"]) != (client, cookie, owner.hex()):
                return False
            self._path(_LOCKS, name).unlink(missing_ok=True)
            return True

    def blocklist(self, addr: str, seconds: float) -> bool:
        """A directory cannot refuse a process's writes: nothing to do (False)."""
        return False

    def lease(self, name: str, cookie: str, seconds: float, description: str = "") -> bool:
        """A lock file with an expiry time."""
        with self._exclusive():
            held = self._lock_record(name)
            if held is not None and (held["client"], held["cookie"]) != (self._client, cookie):
                return False
            rec = {"client": self._client, "cookie": cookie, "owner": description.encode().hex(),
                   "expires": time.time() + seconds}
            self._atomic_write(self._path(_LOCKS, name), json.dumps(rec).encode())
            return True

    def release_lease(self, name: str, cookie: str) -> None:
        """Remove our lease file."""
        self.unlock_pointer(name, cookie)

    def list_pointers(self, prefix: str = "") -> Iterator[str]:
        """Walk the pointer directory."""
        base = self.root / _PTR
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            for f in files:
                name = f if rel == "." else f"{rel}/{f}"
                if not f.endswith(".tmp") and name.startswith(prefix):
                    yield name

    def close(self) -> None:
        """Close cached append descriptors."""
        for fd in self._append_fds.values():
            os.close(fd)
        self._append_fds.clear()
        self.closed = True
