"""Interactive TTY for containers: receive crun's pty master and relay it.

crun (``--console-socket``) sends the container's pty master over a unix socket
(SCM_RIGHTS). A :class:`TtyRelay` thread then copies the pty output to the
console log and to every client attached to a unix stream socket, and client
input to the pty: the same ``serial-unix`` shape a VM's serial console has, so
one websocket bridge serves both.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from pathlib import Path

from compute.errors import HypervisorError


def receive_pty_master(listener: socket.socket, timeout: float = 30.0) -> int:
    """Accept crun's connection on ``listener`` and return the pty master fd it sends."""
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        raise HypervisorError("crun did not send the container's terminal within the timeout")
    with conn:
        _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise HypervisorError("crun connected to the console socket without sending a terminal")
    return fds[0]


class TtyRelay(threading.Thread):
    """Relays a pty master to a log file and to clients of a unix socket at ``path``."""

    def __init__(self, master_fd: int, log_path: Path, path: Path) -> None:
        super().__init__(daemon=True, name=f"tty-relay-{path.parent.name}")
        self.master = master_fd
        self.log_path = log_path
        self.path = path
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.server.setblocking(False)
        self.clients: list[socket.socket] = []
        self._stop_r, self._stop_w = os.pipe()

    def stop(self) -> None:
        """Ask the relay to finish; it also ends by itself when the pty closes."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def _drop(self, sel: selectors.BaseSelector, client: socket.socket) -> None:
        sel.unregister(client)
        self.clients.remove(client)
        client.close()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.master, selectors.EVENT_READ, "pty")
        sel.register(self.server, selectors.EVENT_READ, "server")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        try:
            with open(self.log_path, "ab", buffering=0) as log:
                while True:
                    for key, _ in sel.select():
                        if key.data == "stop":
                            return
                        if key.data == "server":
                            client, _ = self.server.accept()
                            self.clients.append(client)
                            sel.register(client, selectors.EVENT_READ, "client")
                        elif key.data == "pty":
                            try:
                                data = os.read(self.master, 65536)
                            except OSError:  # EIO: every slave end closed, the process is gone
                                data = b""
                            if not data:
                                return
                            log.write(data)
                            for c in list(self.clients):
                                try:
                                    c.sendall(data)
                                except OSError:
                                    self._drop(sel, c)
                        else:
                            sock = key.fileobj
                            assert isinstance(sock, socket.socket)
                            if sock not in self.clients:
                                continue  # dropped earlier in this round
                            try:
                                data = sock.recv(65536)
                            except OSError:
                                data = b""
                            if data:
                                os.write(self.master, data)
                            else:
                                self._drop(sel, sock)
        finally:
            sel.close()
            for c in self.clients:
                c.close()
            self.server.close()
            self.path.unlink(missing_ok=True)
            for fd in (self.master, self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
