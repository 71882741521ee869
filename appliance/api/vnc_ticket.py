"""One-time VNC tickets for external viewers (remote-viewer opens a ``.vv`` file), the
Proxmox way: the API listens on a fresh TCP port for one connection, asks the viewer for
the ticket with RFB's VNC authentication, then joins it to the VM's VNC socket (QEMU on
a unix socket, no authentication of its own) and relays bytes both ways.

A ticket serves one connection: a wrong answer burns it, and it lapses unused after
``ttl`` seconds. VNC authentication only proves the viewer knows the ticket (DES, 8
characters); the ticket is random, short-lived and single-use, as Proxmox' are."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import string
import struct
import time
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

log = logging.getLogger("cairn.api.vnc")
VERSION = b"RFB 003.008\n"
NONE, VNC_AUTH = 1, 2
ALPHABET = string.ascii_letters + string.digits


def vnc_key(password: str) -> bytes:
    """RFB's DES key: the password's first 8 bytes, NUL-padded, each byte's bits reversed."""
    raw = password.encode()[:8].ljust(8, b"\0")
    return bytes(int(f"{b:08b}"[::-1], 2) for b in raw)


def vnc_response(challenge: bytes, password: str) -> bytes:
    """What a viewer answers to ``challenge`` (16 bytes) knowing ``password``."""
    key = vnc_key(password)
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # three equal keys: single DES
    return enc.update(challenge) + enc.finalize()


@dataclass(frozen=True)
class Ticket:
    port: int
    password: str
    expires_at: float


class HandshakeError(Exception):
    pass


async def _accept_viewer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str) -> None:
    """The server side of the RFB handshake up to ClientInit, with VNC authentication."""
    writer.write(VERSION)
    version = await reader.readexactly(12)
    if not version.startswith(b"RFB 003."):
        raise HandshakeError(f"not an RFB viewer: {version!r}")
    minor = int(version[8:11])
    challenge = secrets.token_bytes(16)
    if minor >= 7:
        writer.write(bytes([1, VNC_AUTH]))
        await writer.drain()
        if (await reader.readexactly(1))[0] != VNC_AUTH:
            raise HandshakeError("the viewer did not choose VNC authentication")
    else:  # RFB 3.3: the server decides
        writer.write(struct.pack(">I", VNC_AUTH))
    writer.write(challenge)
    await writer.drain()
    answer = await reader.readexactly(16)
    if not hmac.compare_digest(answer, vnc_response(challenge, password)):
        reason = b"wrong ticket"
        writer.write(struct.pack(">I", 1) + (struct.pack(">I", len(reason)) + reason if minor >= 8 else b""))
        await writer.drain()
        raise HandshakeError("wrong ticket")
    writer.write(struct.pack(">I", 0))
    await writer.drain()


async def _open_qemu(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The client side of the handshake with QEMU's VNC socket (security type None)."""
    reader, writer = await asyncio.open_unix_connection(path)
    await reader.readexactly(12)
    writer.write(VERSION)
    count = (await reader.readexactly(1))[0]
    if count == 0:
        size = struct.unpack(">I", await reader.readexactly(4))[0]
        raise HandshakeError(f"QEMU refused: {(await reader.readexactly(size)).decode(errors='replace')}")
    if NONE not in await reader.readexactly(count):
        raise HandshakeError("the VM's VNC server wants authentication of its own")
    writer.write(bytes([NONE]))
    if struct.unpack(">I", await reader.readexactly(4))[0] != 0:
        raise HandshakeError("QEMU's security handshake failed")
    return reader, writer


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def open_ticket(vnc_socket: str, host: str, ttl: float = 60.0, who: str = "") -> Ticket:
    """Listen on a fresh port of ``host`` for one viewer that knows the returned ticket."""
    password = "".join(secrets.choice(ALPHABET) for _ in range(8))
    used = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if used.is_set():
            writer.close()
            return
        used.set()
        server.close()  # one connection per ticket
        peer = writer.get_extra_info("peername")
        try:
            await asyncio.wait_for(_accept_viewer(reader, writer, password), 30)
            q_reader, q_writer = await _open_qemu(vnc_socket)
        except (HandshakeError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.warning("VNC ticket refused", extra={"peer": str(peer), "who": who, "error": str(exc)[:200]})
            writer.close()
            return
        log.info("VNC ticket used", extra={"peer": str(peer), "who": who})
        await asyncio.gather(_pipe(reader, q_writer), _pipe(q_reader, writer))

    server = await asyncio.start_server(serve, host=host, port=0)
    port = server.sockets[0].getsockname()[1]

    async def lapse() -> None:
        await asyncio.sleep(ttl)
        if not used.is_set():
            server.close()

    task = asyncio.get_running_loop().create_task(lapse())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return Ticket(port=port, password=password, expires_at=time.time() + ttl)


_pending: set[asyncio.Task[None]] = set()  # keeps the lapse timers referenced


def vv_file(ticket: Ticket, host: str, title: str) -> str:
    """A virt-viewer connection file (remote-viewer FILE.vv)."""
    lines = ["[virt-viewer]", "type=vnc", f"host={host}", f"port={ticket.port}", f"password={ticket.password}",
             f"title={title}", "delete-this-file=1", "toggle-fullscreen=shift+f11", "release-cursor=shift+f12",
             "secure-attention=ctrl+alt+end"]
    return "\n".join(lines) + "\n"
