"""TLS for NBD over TCP (``NBD_OPT_STARTTLS``): a TCP listener serves nothing before
the client has upgraded the connection and shown a certificate of the listener's CA.

Certificates come in the directory layout QEMU's ``tls-creds-x509`` object reads, so one
directory serves QEMU, qemu-img, qemu-nbd and this server alike:

* a server's: ``ca-cert.pem`` (the CA its clients' certificates must chain to),
  ``server-cert.pem``, ``server-key.pem``;
* a client's: ``ca-cert.pem`` (the CA the server's certificate must chain to),
  ``client-cert.pem``, ``client-key.pem``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from storage.errors import InvalidArgument

SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def _context(purpose: int, cert_dir: Path, role: str) -> ssl.SSLContext:
    cert_dir = Path(cert_dir)
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_dir / f"{role}-cert.pem", cert_dir / f"{role}-key.pem")
        ctx.load_verify_locations(cert_dir / "ca-cert.pem")
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"NBD TLS directory {cert_dir}: {exc} (it needs ca-cert.pem, {role}-cert.pem and "
                              f"{role}-key.pem)") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cert_dir: Path) -> ssl.SSLContext:
    """The context of a TCP listener: its certificate, and clients must show one of its CA."""
    return _context(ssl.PROTOCOL_TLS_SERVER, cert_dir, "server")


def client_context(cert_dir: Path, check_hostname: bool = True) -> ssl.SSLContext:
    """A client's context (what QEMU does with a client directory): its certificate, and the
    server's must be of its CA and name the address connected to."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cert_dir, "client")
    ctx.check_hostname = check_hostname
    return ctx
