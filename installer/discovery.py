"""Where the answer comes from, first found wins:

1. a URL on the kernel command line: ``cairn.answer=https://host/answer.toml``, with
   ``cairn.answer_fp=<SHA-256 of the server's certificate>`` to pin a self-signed one
   (without it the system's CAs must trust the server); the live system brings up DHCP
   on every NIC to fetch it;
2. a volume labelled ``CAIRN-ANS`` (FAT, ISO 9660 or ext4: a USB stick, a virtual CD)
   with ``answer.toml`` at its root;
3. ``cairn/answer.toml`` baked into the ISO by ``cairn-installer prepare-iso``.

None found: the installer asks on the console (``installer.interactive``).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import shlex
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from installer.answer import normalize_fingerprint
from installer.errors import AnswerFetchError, AnswerNotFound
from installer.matching import ANSWER_LABEL
from installer.media import Medium

ANSWER_NAME = "answer.toml"
MAX_ANSWER_BYTES = 1 << 20
LIVE_NETWORK = Path("/run/systemd/network/90-cairn-live-dhcp.network")


@dataclass(frozen=True)
class FoundAnswer:
    text: str
    source: str  # for messages: "https://…", "CAIRN-ANS volume /dev/sr1", "the ISO"


def kernel_options(cmdline: str) -> dict[str, str]:
    """``cairn.*`` options of a kernel command line (flags map to "")."""
    out = {}
    for word in shlex.split(cmdline):
        key, _, value = word.partition("=")
        if key.startswith("cairn."):
            out[key.removeprefix("cairn.")] = value
    return out


def https_request(url: str, fingerprint: str | None = None, method: str = "GET", body: bytes | None = None,
                  headers: dict[str, str] | None = None, timeout: float = 15.0) -> tuple[int, bytes]:
    """One HTTPS request. With ``fingerprint`` the server's certificate must have that
    SHA-256 (checked before anything is sent); without it the system's CAs must trust it."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise AnswerFetchError(f"{url}: only https:// URLs are used (the answer holds credentials)")
    if fingerprint:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # trust comes from the pinned fingerprint below
        want: str | None = normalize_fingerprint(fingerprint)
    else:
        ctx, want = ssl.create_default_context(), None
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=ctx)
    try:
        conn.connect()
        if want is not None:
            assert conn.sock is not None
            der = conn.sock.getpeercert(binary_form=True)
            got = hashlib.sha256(der or b"").hexdigest()
            if got != want:
                raise AnswerFetchError(f"{url}: the server's certificate has SHA-256 {got}, not the pinned "
                                       f"{want}; refusing to talk to it")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read(MAX_ANSWER_BYTES + 1)
        return resp.status, data
    except (OSError, http.client.HTTPException) as exc:
        raise AnswerFetchError(f"{url}: {exc}")
    finally:
        conn.close()


def fetch_answer(url: str, fingerprint: str | None, attempts: int = 12, delay: float = 5.0) -> FoundAnswer:
    """GET the answer, retrying while the network comes up."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            status, data = https_request(url, fingerprint)
        except AnswerFetchError as exc:
            if "pinned" in exc.detail:
                raise  # a wrong certificate does not get better by waiting
            last = exc
        else:
            if status != 200:
                raise AnswerFetchError(f"{url}: HTTP {status}")
            if len(data) > MAX_ANSWER_BYTES:
                raise AnswerFetchError(f"{url}: larger than {MAX_ANSWER_BYTES} bytes; not an answer file")
            return FoundAnswer(data.decode("utf-8", "replace"), url)
        if i + 1 < attempts:
            time.sleep(delay)
    raise AnswerFetchError(f"could not fetch the answer after {attempts} attempts: {last}")


def bring_up_dhcp() -> None:
    """Live system only: DHCP on every Ethernet NIC (to fetch an answer or post a webhook)."""
    LIVE_NETWORK.parent.mkdir(parents=True, exist_ok=True)
    LIVE_NETWORK.write_text("[Match]\nType=ether\n\n[Network]\nDHCP=yes\n")
    subprocess.run(["systemctl", "restart", "systemd-networkd.service"], capture_output=True)
    subprocess.run(["/lib/systemd/systemd-networkd-wait-online", "--any", "--timeout=60"], capture_output=True)


def devices_labelled(label: str, sys_block: Path = Path("/sys/class/block"), attempts: int = 3,
                     delay: float = 2.0) -> list[str]:
    """Devices with this file system label: udev's by-label link, and a low-level probe of
    every disk, partition and CD (udev may not have looked at a CD's medium yet; floppy
    drives are skipped, an empty one takes seconds per attempt). A CD that is still
    spinning up gets a few tries."""
    for attempt in range(attempts):
        found = set()
        link = Path("/dev/disk/by-label") / label
        if link.exists():
            found.add(os.path.realpath(link))
        for dev in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
            if dev.name.startswith(("fd", "loop", "ram", "zram")):
                continue
            r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", f"/dev/{dev.name}"],
                               capture_output=True, text=True)
            if r.stdout.strip() == label:
                found.add(f"/dev/{dev.name}")
        if found or attempt + 1 == attempts:
            return sorted(found)
        time.sleep(delay)
    return []


def _fstype(device: str) -> str:
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], capture_output=True, text=True)
    return r.stdout.strip()


def read_volume_answer(device: str, fstype: str | None = None) -> str | None:
    """answer.toml from the root of a FAT / ISO 9660 / other volume, read without
    mounting where a library can (mtools, pycdlib); None when the file is not there."""
    kind = fstype or _fstype(device)
    if kind == "vfat":
        r = subprocess.run(["mtype", "-i", device, f"::/{ANSWER_NAME}"], capture_output=True,
                           env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
        return r.stdout.decode("utf-8", "replace") if r.returncode == 0 else None
    if kind == "iso9660":
        return _read_iso9660(device)
    with tempfile.TemporaryDirectory(prefix="cairn-ans.") as mnt:
        if subprocess.run(["mount", "-o", "ro", device, mnt], capture_output=True).returncode != 0:
            return None
        try:
            path = Path(mnt) / ANSWER_NAME
            return path.read_text(errors="replace") if path.is_file() else None
        finally:
            subprocess.run(["umount", mnt], capture_output=True)


def _read_iso9660(device: str) -> str | None:
    import pycdlib

    iso: Any = pycdlib.PyCdlib()
    try:
        iso.open(device)
    except Exception:
        return None
    try:
        for kind, path in (("rr_path", f"/{ANSWER_NAME}"), ("joliet_path", f"/{ANSWER_NAME}"),
                           ("iso_path", f"/{ANSWER_NAME.upper()};1")):
            out = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(out, **{kind: path})
            except Exception:
                continue
            return out.getvalue().decode("utf-8", "replace")
        return None
    finally:
        iso.close()


def find_answer(medium: Medium, cmdline: str, label_lookup: Any = devices_labelled,
                network_up: Any = bring_up_dhcp) -> FoundAnswer:
    """The answer, by the order in this module's docstring; AnswerNotFound when none."""
    opts = kernel_options(cmdline)
    if opts.get("answer"):
        network_up()
        return fetch_answer(opts["answer"], opts.get("answer_fp") or None)
    for device in label_lookup(ANSWER_LABEL):
        text = read_volume_answer(device)
        if text is not None:
            return FoundAnswer(text, f"{ANSWER_LABEL} volume {device}")
    if medium.baked_answer.is_file():
        return FoundAnswer(medium.baked_answer.read_text(errors="replace"), "the ISO (prepare-iso)")
    raise AnswerNotFound(f"no answer: no cairn.answer= URL on the kernel command line, no volume labelled "
                         f"{ANSWER_LABEL} with {ANSWER_NAME}, none baked into the ISO")
