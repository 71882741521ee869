"""A tiny blocking NBD client for the crash test (one request in flight)."""

from __future__ import annotations

import socket
import struct

from storage.nbd import protocol as p


class NbdClientError(Exception):
    """The server replied with an error or went away."""


class NbdClient:
    """Fixed-newstyle client: OPT_GO, then READ / WRITE (optionally FUA) / FLUSH."""

    def __init__(self, path: str, export: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        magic, opt, flags = p.SERVER_GREETING.unpack(self._recv(18))
        assert magic == p.NBDMAGIC and opt == p.IHAVEOPT and flags & p.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", p.CLIENT_NO_ZEROES | 1))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, len(data)) + data)
        while True:
            _m, _o, rtype, length = p.OPTION_REPLY.unpack(self._recv(20))
            body = self._recv(length)
            if rtype == p.REP_ACK:
                break
            if rtype & 0x80000000:
                raise NbdClientError(f"export {export!r} refused: {body!r}")
            if rtype == p.REP_INFO and struct.unpack_from(">H", body)[0] == p.INFO_EXPORT:
                self.size = struct.unpack_from(">Q", body, 2)[0]
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise NbdClientError("connection closed")
            buf += got
        return bytes(buf)

    def _request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        self.handle += 1
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, self.handle, offset, length) + payload)
        magic, err, handle = p.REPLY.unpack(self._recv(16))
        if magic != p.SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdClientError("bad reply")
        if err:
            raise NbdClientError(f"error {err}")
        return self._recv(length) if cmd == p.CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        """READ."""
        return self._request(p.CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """WRITE (acknowledged = journaled; durable when FUA)."""
        self._request(p.CMD_WRITE, offset, len(data), data, p.CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        """FLUSH: every acknowledged write is durable afterwards."""
        self._request(p.CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
