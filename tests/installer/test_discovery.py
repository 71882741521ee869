"""Finding the answer: kernel command line, CAIRN-ANS volumes (FAT, ISO 9660), baked into
the ISO, an HTTPS URL pinned by certificate fingerprint; and the install webhook."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from installer.discovery import (
    fetch_answer,
    find_answer,
    https_request,
    kernel_options,
    read_volume_answer,
)
from installer.errors import AnswerFetchError, AnswerNotFound
from installer.media import Medium
from tests.installer.vm import fat_seed, iso_seed

pytestmark = pytest.mark.unit
ANSWER = 'hostname = "from-{where}"\n'


def test_kernel_options_are_the_cairn_ones() -> None:
    opts = kernel_options('BOOT_IMAGE=/live/vmlinuz boot=live quiet cairn.answer=https://h/a.toml '
                          'cairn.answer_fp=AB:CD cairn.interactive console=ttyS0')
    assert opts == {"answer": "https://h/a.toml", "answer_fp": "AB:CD", "interactive": ""}


@pytest.mark.parametrize("kind", ["fat", "iso9660"])
def test_an_answer_volume_is_read_without_mounting_it(tmp_path: Path, kind: str) -> None:
    text = ANSWER.format(where=kind)
    seed = fat_seed(tmp_path / "seed.img", text) if kind == "fat" else iso_seed(tmp_path / "seed.iso", text)
    assert read_volume_answer(str(seed), "vfat" if kind == "fat" else "iso9660") == text


def test_a_volume_without_answer_toml_gives_nothing(tmp_path: Path) -> None:
    seed = fat_seed(tmp_path / "seed.img", "x")
    import subprocess

    subprocess.run(["mdel", "-i", str(seed), "::/answer.toml"], check=True)
    assert read_volume_answer(str(seed), "vfat") is None


def _medium(tmp_path: Path, baked: str | None) -> Medium:
    root = tmp_path / "medium"
    (root / "cairn").mkdir(parents=True)
    if baked is not None:
        (root / "cairn" / "answer.toml").write_text(baked)
    return Medium(root)


def test_a_cairn_ans_volume_comes_before_the_baked_answer(tmp_path: Path) -> None:
    seed = fat_seed(tmp_path / "seed.img", ANSWER.format(where="volume"))
    labels: list[str] = []

    def lookup(label: str) -> list[str]:
        labels.append(label)
        return [str(seed)]

    found = find_answer(_medium(tmp_path, ANSWER.format(where="iso")), "boot=live", label_lookup=lookup)
    assert (found.text, found.source) == (ANSWER.format(where="volume"), f"CAIRN-ANS volume {seed}")
    assert labels == ["CAIRN-ANS"]
    found = find_answer(_medium(tmp_path / "2", ANSWER.format(where="iso")), "boot=live", label_lookup=lambda _: [])
    assert (found.text, found.source) == (ANSWER.format(where="iso"), "the ISO (prepare-iso)")
    with pytest.raises(AnswerNotFound, match=r"no answer: no cairn\.answer= URL"):
        find_answer(_medium(tmp_path / "3", None), "boot=live", label_lookup=lambda _: [])


# --- HTTPS with a pinned certificate --------------------------------------------------------

def _self_signed(tmp_path: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "answers.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "srv.crt", tmp_path / "srv.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    fp = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return crt, pem, ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()


@pytest.fixture
def answer_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An HTTPS server on loopback with a self-signed certificate; records every request."""
    crt, key, fp = _self_signed(tmp_path)
    seen: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(("GET", self.path, b""))
            body = ANSWER.format(where="url").encode()
            self.send_response(200 if self.path == "/answer.toml" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            seen.append(("POST", self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"https://127.0.0.1:{server.server_address[1]}", "fp": fp, "seen": seen}
    finally:
        server.shutdown()
        server.server_close()


def test_the_answer_url_is_fetched_when_the_fingerprint_matches(answer_server: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    url = answer_server["url"] + "/answer.toml"
    cmdline = f"boot=live cairn.answer={url} cairn.answer_fp=sha256:{answer_server['fp']}"
    ups: list[bool] = []
    found = find_answer(_medium(tmp_path, ANSWER.format(where="iso")), cmdline, label_lookup=lambda _: ["x"],
                        network_up=lambda: ups.append(True))
    assert (found.text, found.source) == (ANSWER.format(where="url"), url)
    assert ups == [True]  # the live system brought its network up first


def test_a_wrong_fingerprint_is_refused_before_anything_is_sent(answer_server: dict[str, Any]) -> None:
    wrong = "00" * 32
    with pytest.raises(AnswerFetchError, match="not the pinned"):
        fetch_answer(answer_server["url"] + "/answer.toml", wrong, attempts=3, delay=0)
    with pytest.raises(AnswerFetchError, match="not the pinned"):
        https_request(answer_server["url"] + "/hook", wrong, "POST", b'{"status": "ok"}')
    assert answer_server["seen"] == []


def test_an_unpinned_self_signed_server_is_not_trusted(answer_server: dict[str, Any]) -> None:
    with pytest.raises(AnswerFetchError, match="CERTIFICATE_VERIFY_FAILED"):
        https_request(answer_server["url"] + "/answer.toml")
    assert answer_server["seen"] == []


def test_plain_http_is_refused() -> None:
    with pytest.raises(AnswerFetchError, match="only https"):
        fetch_answer("http://127.0.0.1:9/answer.toml", None, attempts=1)


def test_a_missing_answer_is_an_http_error_not_an_answer(answer_server: dict[str, Any]) -> None:
    with pytest.raises(AnswerFetchError, match="HTTP 404"):
        fetch_answer(answer_server["url"] + "/nope", answer_server["fp"], attempts=1)


def test_the_webhook_posts_json(answer_server: dict[str, Any]) -> None:
    code, _ = https_request(answer_server["url"] + "/hook", answer_server["fp"], "POST",
                            json.dumps({"status": "ok"}).encode(), {"Content-Type": "application/json"})
    assert code == 204
    assert answer_server["seen"] == [("POST", "/hook", b'{"status": "ok"}')]
