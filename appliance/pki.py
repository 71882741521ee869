"""The appliance's own CA and the API's TLS certificate, made at first start."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _local_names() -> tuple[list[str], list[str]]:
    host = socket.gethostname()
    names = sorted({"localhost", host, host.split(".")[0]})
    ips = {"127.0.0.1", "::1"}
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                ips.add(a.address.split("%")[0])
    return names, sorted(ips)


def ensure(pki_dir: Path) -> tuple[Path, Path, Path]:
    """Create (once) a CA and a server certificate for every local name and address.
    Returns (ca.crt, server.crt, server.key)."""
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_crt, ca_key = pki_dir / "ca.crt", pki_dir / "ca.key"
    srv_crt, srv_key = pki_dir / "server.crt", pki_dir / "server.key"
    now = dt.datetime.now(dt.UTC)
    if not ca_crt.exists() or not ca_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Cairn CA {socket.gethostname()}")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_key(ca_key, key)
        ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        srv_crt.unlink(missing_ok=True)
    if not srv_crt.exists() or not srv_key.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        assert isinstance(ca_private, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        names, ips = _local_names()
        san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage(_NODE_USAGE), critical=False)
            .sign(ca_private, hashes.SHA256())
        )
        _write_key(srv_key, key)
        srv_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_crt, srv_crt, srv_key


# A node's certificate serves its API, etcd and Patroni and authenticates it to its peers.
_NODE_USAGE = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def fingerprint(ca_pem: bytes) -> str:
    """SHA-256 of a CA certificate (DER), hex: what a join token carries."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def node_csr(pki_dir: Path) -> bytes:
    """A fresh key for this node (kept in ``server.key``) and a CSR for it, PEM."""
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki_dir / "server.key", key)
    names, _ = _local_names()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_node_csr(pki_dir: Path, csr_pem: bytes, name: str, addresses: list[str], days: int = 825) -> bytes:
    """Sign a joining node's CSR with the cluster CA: its certificate names the node and
    its addresses (and localhost), for both server and client authentication."""
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the certificate request's signature is not valid")
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    ca_private = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_private, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted({name, "localhost"})]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted({*addresses, "127.0.0.1", "::1"})]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(csr.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage(_NODE_USAGE), critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def install_cluster_pki(pki_dir: Path, ca_crt: bytes, ca_key: bytes, node_crt: bytes) -> None:
    """A joining node takes the cluster CA and its signed certificate (its key is already
    in ``server.key`` from :func:`node_csr`)."""
    pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (pki_dir / "ca.crt").write_bytes(ca_crt)
    fd = os.open(pki_dir / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca_key)
    (pki_dir / "server.crt").write_bytes(node_crt)


# --------------------------------------------------------------------------- NBD over TCP
# NBD certificates have a CA of their own: a QEMU process holds its node's NBD client key,
# and a certificate of the cluster CA would let whoever takes over a QEMU talk to etcd,
# Patroni or the API as a node. The NBD CA's key is derived from the cluster CA's, so every
# member computes the same CA with nothing more to distribute; its subject names the
# cluster CA it comes from.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _nbd_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_crt, _, _ = ensure(pki_dir)
    cluster_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    assert isinstance(cluster_key, ec.EllipticCurvePrivateKey)
    secret = cluster_key.private_numbers().private_value.to_bytes(66, "big")
    derived = HKDF(hashes.SHA256(), 48, salt=None, info=b"cairn nbd ca").derive(secret)
    key = ec.derive_private_key(int.from_bytes(derived, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())
    cluster = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Cairn NBD CA {fingerprint(ca_crt.read_bytes())[:16]}")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(int.from_bytes(derived[:16], "big") >> 1)
        .not_valid_before(cluster.not_valid_before_utc).not_valid_after(cluster.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _nbd_leaf(pki_dir: Path, out: Path, role: str, cn: str, san: list[x509.GeneralName]) -> Path:
    """(Re)issue ``<role>-cert.pem`` / ``<role>-key.pem`` and ``ca-cert.pem`` in ``out``
    (QEMU's tls-creds-x509 layout), each replaced atomically."""
    ca_cert, ca_key = _nbd_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomically(out / f"{role}-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write_atomically(out / f"{role}-cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomically(out / "ca-cert.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def nbd_server_tls(pki_dir: Path, addresses: list[str]) -> Path:
    """The storage daemon's NBD TLS directory (``pki_dir/nbd``, root only): a server
    certificate for this node's names and ``addresses``, re-issued at every call."""
    names, ips = _local_names()
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted({*ips, *addresses})]
    return _nbd_leaf(pki_dir, pki_dir / "nbd", "server", f"nbd {names[0]}", san)


def nbd_client_tls(pki_dir: Path, out: Path, node: str) -> Path:
    """This node's NBD client directory for QEMU (``out``): a client certificate only
    NBD servers of this cluster accept, re-issued at every call."""
    return _nbd_leaf(pki_dir, out, "client", f"nbd client {node}", [])
