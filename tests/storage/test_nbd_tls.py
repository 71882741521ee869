"""NBD over TCP is served with TLS only (issue 11): the attacks of a client on the
network, and QEMU's own TLS client (tls-creds-x509) with the appliance's certificates."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.pki import nbd_client_tls, nbd_server_tls
from storage.nbd import protocol as p
from tests.storage.conftest import NbdDaemon

pytestmark = pytest.mark.functional
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_export(nbd_daemons: Callable[..., NbdDaemon], tmp_path: Path) -> tuple[int, Path]:
    """A cairn-nbd TCP listener with the node's NBD server certificate; returns its port
    and a client directory of the same cluster."""
    pki = tmp_path / "pki"
    port = free_port()
    nbd_daemons(create=["t:8MiB"], listen=f"127.0.0.1:{port}", tls_dir=nbd_server_tls(pki, ["127.0.0.1"]))
    return port, nbd_client_tls(pki, tmp_path / "client", "node-a")


def qemu_tls(tool: str, client: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``tool`` (qemu-img / qemu-io) on the export over TLS, as QEMU's NBD client does."""
    return subprocess.run([tool, *args, "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={client}",
                           "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=t,tls-creds=tls0"],
                          capture_output=True, text=True, timeout=60)


def handshake(sock: socket.socket) -> None:
    magic, opt, flags = p.SERVER_GREETING.unpack(sock.recv(18, socket.MSG_WAITALL))
    assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT) and flags & p.FLAG_FIXED_NEWSTYLE
    sock.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES))


def option(sock: socket.socket | ssl.SSLSocket, opt: int, data: bytes = b"") -> tuple[int, bytes]:
    sock.sendall(p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)
    head = sock.recv(20, socket.MSG_WAITALL) if not isinstance(sock, ssl.SSLSocket) else _recv(sock, 20)
    if len(head) < 20:
        raise ConnectionError("closed")
    _magic, _opt, rtype, length = p.OPTION_REPLY.unpack(head)
    return rtype, _recv(sock, length)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            break
        buf += got
    return buf


def go(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def test_a_plaintext_client_gets_nothing_from_a_tcp_export(tls_export: tuple[int, Path]) -> None:
    """The attack: a client on the network (a guest that reached the storage network, a
    neighbour) opens the TCP export without TLS. Every option but STARTTLS is refused
    with TLS_REQD, EXPORT_NAME closes the connection, and QEMU's plaintext client fails."""
    port, _ = tls_export
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        handshake(s)
        for opt, data in ((p.OPT_LIST, b""), (p.OPT_GO, go("t")), (p.OPT_INFO, go("t"))):
            rtype, body = option(s, opt, data)
            assert rtype == p.REP_ERR_TLS_REQD, (opt, hex(rtype), body)
        s.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 1) + b"t")
        assert _recv(s, 10) == b""  # closed: no size, no data
    r = subprocess.run(["qemu-img", "info", f"nbd://127.0.0.1:{port}/t"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "TLS" in r.stderr, r


def test_tls_without_a_certificate_of_the_nbd_ca_is_refused(tls_export: tuple[int, Path], tmp_path: Path) -> None:
    """The attack: upgrade to TLS with no client certificate, or with one of another
    cluster's NBD CA: the TLS handshake fails, nothing is served."""
    port, client = tls_export
    other = nbd_client_tls(tmp_path / "other-pki", tmp_path / "other-client", "intruder")
    (other / "ca-cert.pem").write_bytes((client / "ca-cert.pem").read_bytes())  # trusts the real server
    r = qemu_tls("qemu-img", other, port, "info")
    assert r.returncode != 0 and "virtual size" not in r.stdout, r
    ctx = ssl.create_default_context(cafile=str(client / "ca-cert.pem"))  # no certificate of its own
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        handshake(s)
        assert option(s, p.OPT_STARTTLS)[0] == p.REP_ACK
        with pytest.raises((ssl.SSLError, ConnectionError)), ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            option(t, p.OPT_GO, go("t"))


def test_qemu_reads_and_writes_the_export_over_tls(tls_export: tuple[int, Path]) -> None:
    """QEMU's client with the node's client directory: STARTTLS, then the export; large
    reads (sent scatter-gather on plaintext sockets) come back intact through TLS."""
    port, client = tls_export
    info = qemu_tls("qemu-img", client, port, "info", "--output=json")
    assert info.returncode == 0 and json.loads(info.stdout)["virtual-size"] == 8 * MiB, info
    io = qemu_tls("qemu-io", client, port, "-c", "write -P 0x5a 1M 3M", "-c", "read -P 0x5a 1M 3M",
                  "-c", "read -P 0 0 1M")
    assert io.returncode == 0 and "fail" not in io.stdout.lower() and io.stdout.count("read ") == 2, io


def test_a_containers_volume_export_reaches_the_tcp_export_over_tls(tls_export: tuple[int, Path],
                                                                       tmp_path: Path) -> None:
    """Containers' volumes go through qemu-storage-daemon (compute/block_volumes.py): with
    ``nbds://…?tls-certificates=`` it upgrades to TLS and serves the volume as a file; the
    plaintext ``nbd://`` of the same export is refused."""
    from compute.block_volumes import FileExport
    from compute.errors import HypervisorError
    from compute.spec import NbdSource

    port, client = tls_export
    assert qemu_tls("qemu-io", client, port, "-c", "write -P 0x33 0 64k").returncode == 0
    with FileExport(NbdSource(f"nbds://127.0.0.1:{port}/t?tls-certificates={client}"), tmp_path / "t.img") as exp:
        assert exp.path.read_bytes()[: 64 << 10] == b"\x33" * (64 << 10)
    with pytest.raises(HypervisorError, match=r"(?i)tls"):
        FileExport(NbdSource(f"nbd://127.0.0.1:{port}/t"), tmp_path / "plain.img").start(timeout=10)
