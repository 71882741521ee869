"""Client of ``cairn-storaged``'s control socket (see storage/daemon.py).

Errors come back as the library's own exceptions (``NotFound``, ``AlreadyExists``,
``InvalidArgument``, ``ConflictError``, ...), so callers handle a remote pool exactly
like a local one. Each call is one short-lived connection: safe from any thread.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from storage import errors

_ERRORS: dict[str, type[errors.StorageError]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, errors.StorageError)
}


class StorageClient:
    def __init__(self, socket_path: str | Path, timeout: float = 600.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        """Run one operation in the daemon; returns its result or raises its error."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        raise errors.BackendError("the storage daemon closed the connection")
                    buf += chunk
        except OSError as exc:
            raise errors.BackendError(f"storage daemon at {self.socket_path} is not answering: {exc}") from exc
        reply = json.loads(buf)
        if reply.get("ok"):
            return reply.get("result")
        raise _ERRORS.get(reply.get("error", ""), errors.StorageError)(reply.get("message", "storage error"))

    def ready(self) -> bool:
        try:
            self.call("pools")
            return True
        except errors.StorageError:
            return False
