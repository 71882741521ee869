"""The host side of the agent inside an ``isolation: vm`` container's microVM.

The guest agent (``compute/guest_agent.c``, PID 1 of the microVM) runs the
container's processes; the host reaches it over one virtio-serial port whose host
end is a unix socket QEMU listens on (this kernel has no vhost-vsock). QEMU takes
one client on that socket, so one :class:`AgentLink` per running container holds
it and multiplexes:

- the container's main process (stream 1): its output goes to ``console.log`` and,
  with a terminal, to every client of ``tty.sock`` (raw bytes in and out: the same
  ``serial-unix`` shape as a VM's serial port, so one websocket bridge serves both);
- exec sessions: each client of ``exec.sock`` speaks the same framing with stream 0;
  the link gives it a stream of its own and relays (:func:`run_process` is a client).

Frames (both ways): ``0xCA 0x1F | type | stream (u32 BE) | length (u32 BE) | payload``.
Whatever the guest sends is untrusted: frames are bounded and a bad header only
makes the reader hunt for the next magic. The host repeats HELLO with a fresh nonce
until READY echoes it, so a connection picks up cleanly whatever bytes an earlier
one left in flight (the node agent may restart at any time; the guest keeps running).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from compute.driver import ExecResult
from compute.errors import HypervisorError

log = logging.getLogger(__name__)
PORT_NAME = "org.cairn.agent.0"
MAGIC = b"\xca\x1f"
HEADER = struct.Struct(">2sBII")
MAX_PAYLOAD = 1 << 20
CLIENT_BUFFER = 16 << 20  # an exec client that stops reading is dropped past this
TTY_BUFFER = 1 << 20
HELLO_EVERY = 0.5
MAIN = 1


class T(IntEnum):
    """Frame types (the same numbers as in guest_agent.c)."""

    HELLO = 1
    READY = 2
    CONFIG = 3
    EXEC = 4
    STDIN = 5
    EOF = 6
    RESIZE = 7
    SIGNAL = 8
    CLOSE = 9
    STARTED = 20
    STDOUT = 21
    STDERR = 22
    EXIT = 23
    ERROR = 24


def frame(kind: T, stream: int, payload: bytes = b"") -> bytes:
    """One frame on the wire."""
    return HEADER.pack(MAGIC, kind, stream, len(payload)) + payload


def process_payload(argv: Iterable[str], env: dict[str, str], cwd: str = "/", tty: bool = False,
                    extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """The NUL-terminated ``key=value`` strings of a CONFIG or EXEC frame."""
    items = [("cwd", cwd), ("tty", "1" if tty else "0")]
    items += [("env", f"{k}={v}") for k, v in env.items()]
    items += [("arg", a) for a in argv]
    items += list(extra)
    for key, value in items:
        if "\0" in value:
            raise HypervisorError(f"{key} {value!r} contains a NUL byte")
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)


def _number(payload: bytes) -> int:
    """A decimal number the guest sent (-1 when it is not one)."""
    try:
        return int(payload[:20])
    except ValueError:
        return -1


class FrameReader:
    """Splits a byte stream into frames; hunts for the magic after anything malformed."""

    def __init__(self, limit: int = MAX_PAYLOAD) -> None:
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= HEADER.size:
            magic, kind, stream, length = HEADER.unpack_from(self.buf)
            if magic != MAGIC or kind not in T._value2member_map_ or length > self.limit:
                at = self.buf.find(MAGIC, 1)
                del self.buf[:at if at > 0 else max(1, len(self.buf) - 1)]
                continue
            if len(self.buf) < HEADER.size + length:
                break
            out.append((kind, stream, bytes(self.buf[HEADER.size:HEADER.size + length])))
            del self.buf[:HEADER.size + length]
        return out


class _Peer:
    """One socket the link serves, with what is waiting to be written to it."""

    def __init__(self, sock: socket.socket, role: str) -> None:
        self.sock, self.role = sock, role
        self.out = bytearray()
        self.reader = FrameReader()
        self.stream = 0
        self.closing = False  # close once ``out`` is written
        self.events = 0  # what the selector watches for it now


class AgentLink(threading.Thread):
    """Holds the connection to one microVM's agent and serves ``exec.sock`` / ``tty.sock``.

    ``config`` is the CONFIG payload (the main process, mounts, limits): sent whenever
    the guest says its main process has not started (a fresh boot)."""

    def __init__(self, qemu_socket: Path, exec_socket: Path, log_path: Path, config: bytes,
                 tty_socket: Path | None = None) -> None:
        super().__init__(daemon=True, name=f"agent-link-{log_path.parent.name}")
        self.qemu_socket, self.exec_socket, self.tty_socket = qemu_socket, exec_socket, tty_socket
        self.log_path, self.config = log_path, config
        self.ready = threading.Event()  # the guest answered our HELLO
        self.main_started = threading.Event()  # the main process runs (or failed: main_error)
        self.done = threading.Event()  # the link ended (the VM went away, or stop())
        self.main_pid: int | None = None
        self.main_error: str | None = None
        self.main_exit: int | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._pending = bytearray()  # frames other threads queue for the guest
        self._servers: list[socket.socket] = []

    # -- called from other threads -------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue bytes for the guest (thread-safe)."""
        with self._lock:
            self._pending += data
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def signal_main(self, signum: int) -> None:
        """Send a signal to the container's main process."""
        self.send(frame(T.SIGNAL, MAIN, str(signum).encode()))

    def stop(self) -> None:
        """End the link (the guest keeps running; a new link can take over)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the loop ------------------------------------------------------------------------------------------------
    def _serve(self, path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(16)
        server.setblocking(False)
        self._servers.append(server)
        return server

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("agent link %s failed", self.qemu_socket)
        finally:
            for server in self._servers:
                server.close()
            for path in (self.exec_socket, self.tty_socket):
                if path is not None:
                    path.unlink(missing_ok=True)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.main_started.set()
            self.done.set()

    def _run(self) -> None:
        guest_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            guest_sock.connect(str(self.qemu_socket))
        except OSError as exc:
            guest_sock.close()
            log.info("agent link: %s not reachable: %s", self.qemu_socket, exc)
            return
        guest_sock.setblocking(False)
        guest = _Peer(guest_sock, "guest")
        peers: dict[socket.socket, _Peer] = {guest_sock: guest}
        streams: dict[int, _Peer] = {}
        next_stream = 2
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        nonce = b""
        hello_at = 0.0
        with open(self.log_path, "ab", buffering=0) as logf:
            while not self._stopping:
                now = time.monotonic()
                if not self.ready.is_set() and now - hello_at >= HELLO_EVERY:
                    nonce, hello_at = secrets.token_hex(8).encode(), now
                    guest.out += frame(T.HELLO, 0, nonce)
                with self._lock:
                    guest.out += self._pending
                    self._pending.clear()
                for p in list(peers.values()):
                    want = selectors.EVENT_READ if not p.closing else 0
                    if p.role != "guest" and len(guest.out) > CLIENT_BUFFER:
                        want = 0  # let the guest catch up before reading more input
                    if p.out:
                        want |= selectors.EVENT_WRITE
                    if not want and p.closing:
                        self._drop(sel, peers, streams, p)
                    elif want != p.events:
                        if not p.events:
                            sel.register(p.sock, want, p)
                        elif want:
                            sel.modify(p.sock, want, p)
                        else:
                            sel.unregister(p.sock)
                        p.events = want
                for key, events in sel.select(HELLO_EVERY if not self.ready.is_set() else None):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        continue
                    if isinstance(key.data, socket.socket):  # a listening socket
                        conn, _ = key.data.accept()
                        conn.setblocking(False)
                        role = "tty" if self.tty_socket and key.data.getsockname() == str(self.tty_socket) \
                            else "exec"
                        peers[conn] = _Peer(conn, role)
                        continue
                    p = key.data
                    if p.sock not in peers:
                        continue
                    if events & selectors.EVENT_WRITE and p.out:
                        try:
                            sent = p.sock.send(p.out)
                            del p.out[:sent]
                        except BlockingIOError:
                            pass
                        except OSError:
                            if p is guest:
                                return
                            self._drop(sel, peers, streams, p)
                            continue
                    if not events & selectors.EVENT_READ:
                        continue
                    try:
                        data = p.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if p is guest:
                        if not data:
                            return  # QEMU closed it: the VM is off
                        for kind, stream, payload in guest.reader.feed(data):
                            if not self.ready.is_set():
                                if kind == T.READY and payload.startswith(nonce):
                                    self._ready(guest, payload)
                                    self._open_servers(sel)
                                continue
                            if kind == T.READY:
                                self._ready(guest, payload)
                            elif stream == MAIN:
                                self._main(kind, payload, logf, peers)
                            elif stream in streams:
                                client = streams[stream]
                                client.out += frame(T(kind), 0, payload)
                                if kind in (T.EXIT, T.ERROR):
                                    client.closing = True
                                    streams.pop(stream, None)
                                elif len(client.out) > CLIENT_BUFFER:
                                    guest.out += frame(T.CLOSE, stream)
                                    self._drop(sel, peers, streams, client)
                        continue
                    if not data:
                        if p.stream:
                            guest.out += frame(T.CLOSE, p.stream)
                        self._drop(sel, peers, streams, p)
                        continue
                    if p.role == "tty":
                        guest.out += frame(T.STDIN, MAIN, data)
                        continue
                    for kind, _stream, payload in p.reader.feed(data):
                        if kind == T.EXEC and not p.stream:
                            p.stream, next_stream = next_stream, next_stream + 1
                            streams[p.stream] = p
                            guest.out += frame(T.EXEC, p.stream, payload)
                        elif p.stream and kind in (T.STDIN, T.EOF, T.RESIZE, T.SIGNAL):
                            guest.out += frame(T(kind), p.stream, payload)

    def _drop(self, sel: selectors.BaseSelector, peers: dict[socket.socket, _Peer], streams: dict[int, _Peer],
              p: _Peer) -> None:
        if p.events:
            sel.unregister(p.sock)
        peers.pop(p.sock, None)
        if streams.get(p.stream) is p:
            streams.pop(p.stream)
        p.sock.close()

    def _open_servers(self, sel: selectors.BaseSelector) -> None:
        for path in (self.exec_socket, self.tty_socket):
            if path is not None:
                server = self._serve(path)
                sel.register(server, selectors.EVENT_READ, server)

    def _ready(self, guest: _Peer, payload: bytes) -> None:
        if b"started=0" in payload:  # a fresh boot: give it the container to run
            self.main_pid = self.main_error = self.main_exit = None
            self.main_started.clear()
            guest.out += frame(T.CONFIG, MAIN, self.config)
        else:
            self.main_started.set()
        self.ready.set()

    def _main(self, kind: int, payload: bytes, logf: BinaryIO, peers: dict[socket.socket, _Peer]) -> None:
        if kind in (T.STDOUT, T.STDERR):
            logf.write(payload)
            for p in list(peers.values()):
                if p.role == "tty":
                    p.out += payload
                    if len(p.out) > TTY_BUFFER:
                        p.out.clear()
                        p.closing = True  # a client that stopped reading
        elif kind == T.STARTED:
            self.main_pid = _number(payload)
            self.main_started.set()
        elif kind == T.ERROR:
            self.main_error = payload.decode(errors="replace")[:1000]
            self.main_started.set()
        elif kind == T.EXIT:
            self.main_exit = _number(payload)


def run_process(exec_socket: Path, payload: bytes, stdin: bytes = b"", timeout: float = 60.0,
                limit: int = CLIENT_BUFFER) -> ExecResult:
    """Run one process through a link's ``exec.sock``; its exit status and output."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(exec_socket))
    except OSError as exc:
        raise HypervisorError(f"the container's agent is not reachable ({exc}): is it running?") from exc
    out, err = bytearray(), bytearray()
    reader = FrameReader(MAX_PAYLOAD + 64)
    with sock:
        sock.sendall(frame(T.EXEC, 0, payload) + (frame(T.STDIN, 0, stdin) if stdin else b"") + frame(T.EOF, 0))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HypervisorError(f"exec timed out after {timeout:g} s (the process was killed)")
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise HypervisorError("the container stopped while the process ran")
            for kind, _stream, chunk in reader.feed(data):
                if kind == T.STDOUT:
                    out += chunk
                    del out[:-limit or None]
                elif kind == T.STDERR:
                    err += chunk
                    del err[:-limit or None]
                elif kind == T.EXIT:
                    return ExecResult(returncode=_number(chunk), stdout=bytes(out), stderr=bytes(err))
                elif kind == T.ERROR:
                    raise HypervisorError(f"exec failed in the guest: {chunk.decode(errors='replace')}")
