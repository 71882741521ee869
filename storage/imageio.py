"""Disk images in and out of volumes with QEMU's own tools (qemu-img): probe an upload
(format, virtual size, corruption check) and copy it into a volume's NBD export.

An upload is hostile until proven otherwise, and qemu-img runs as root: a qcow2 header
may name a backing file, an external data file or a ``json:``/protocol filename, and
qemu-img would then read a host file (or open a network connection) and copy what it
finds into the tenant's volume. So, before qemu-img sees a file:

* its format is read from its first bytes here, never probed by qemu-img (which would
  follow a VMDK descriptor's extents), and qemu-img always gets it explicitly, through
  ``--image-opts`` with the ``file`` protocol (a path is never parsed as a protocol);
* a qcow2 header is parsed here and refused when it has a backing file, an external
  data file (feature bit or header extension) or encryption;
* every qemu-img run on an upload has an address-space and CPU-time limit (``prlimit``)
  and a wall-clock timeout (OpenStack's limits for untrusted images: 1 GiB, 30 s).

``copy_into`` checks the header again right before converting.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.errors import BackendError, InvalidArgument

FORMATS = ("raw", "qcow2")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")

QCOW2_MAGIC = b"QFI\xfb"
# formats qemu-img knows that Cairn does not take: refused when the upload does not say "raw"
_OTHER_MAGIC = {b"KDMV": "vmdk", b"# Disk DescriptorFile": "vmdk", b"vhdxfile": "vhdx", b"conectix": "vpc",
                b"QED\x00": "qed", b"LUKS\xba\xbe": "luks", b"QEVM": "parallels", b"WithoutFreeSpace": "parallels",
                b"OOOM": "qcow (v1)", b"CLOOP": "cloop"}
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_EXT_END = 0

# Limits for qemu-img on an upload: address space, CPU seconds and wall seconds for
# inspecting it, plus per-GiB allowances for copying it (scaled by its virtual size).
ADDRESS_SPACE_BYTES = 1 << 30
INSPECT_CPU_SECONDS = 30
INSPECT_WALL_SECONDS = 60
COPY_CPU_SECONDS_PER_GIB = 30
COPY_WALL_SECONDS_PER_GIB = 120


def _read_header(path: Path, size: int = 64 << 10) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(size)
    except OSError as e:
        raise InvalidArgument(f"cannot read the upload: {e.strerror}") from None


def sniff_format(path: str | Path, declared: str | None = None) -> str:
    """The upload's format from its first bytes (``declared`` "raw" takes any bytes as
    they are); ``InvalidArgument`` for a format Cairn does not take."""
    if declared is not None and declared not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}, not {declared!r}")
    head = _read_header(Path(path), 512)
    if declared == "raw":
        return "raw"
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if declared == "qcow2":
        raise InvalidArgument("the upload is not a qcow2 image (no qcow2 header)")
    other = next((name for magic, name in _OTHER_MAGIC.items() if head.startswith(magic)), None)
    if head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        other = "vdi"
    if other:
        raise InvalidArgument(f"image format {other!r} is not supported: upload raw or qcow2 "
                              "(or declare it raw to store the bytes as they are)")
    return "raw"


def check_qcow2_header(path: str | Path) -> None:
    """Refuse a qcow2 image that would make qemu-img open anything but the upload itself:
    a backing file (any filename, ``json:`` and protocols included), an external data
    file, or an encrypted image (Cairn has no key to give)."""
    head = _read_header(Path(path))
    if len(head) < 72 or not head.startswith(QCOW2_MAGIC):
        raise InvalidArgument("the qcow2 header is truncated or missing")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    crypt_method = struct.unpack_from(">I", head, 32)[0]
    if version not in (2, 3):
        raise InvalidArgument(f"qcow2 version {version} is not supported")
    if backing_offset or backing_size:
        raise InvalidArgument("the image has a backing file: flatten it first (qemu-img convert), "
                              "images that refer to other files are refused")
    if crypt_method:
        raise InvalidArgument("the image is encrypted: upload it decrypted")
    ext_offset = 72
    if version == 3:
        if len(head) < 104:
            raise InvalidArgument("the qcow2 header is truncated")
        incompatible = struct.unpack_from(">Q", head, 72)[0]
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise InvalidArgument("the image keeps its data in an external data file: images that refer to "
                                  "other files are refused (convert it to a self-contained qcow2 or raw)")
        ext_offset = struct.unpack_from(">I", head, 100)[0]
    while ext_offset + 8 <= len(head):  # header extensions: type, length, data padded to 8
        ext_type, ext_len = struct.unpack_from(">II", head, ext_offset)
        if ext_type == _QCOW2_EXT_END:
            return
        if ext_type == _QCOW2_EXT_DATA_FILE:
            raise InvalidArgument("the image names an external data file: images that refer to other files "
                                  "are refused (convert it to a self-contained qcow2 or raw)")
        ext_offset += 8 + (ext_len + 7) // 8 * 8
    raise InvalidArgument("the qcow2 header extensions do not end where they should")


def _image_opts(path: Path, fmt: str) -> str:
    """``--image-opts`` for a local file: the path is only ever a file name."""
    return f"driver={fmt},file.driver=file,file.filename={str(path).replace(',', ',,')}"


def _limited(argv: list[str], cpu_seconds: int) -> list[str]:
    return ["prlimit", f"--as={ADDRESS_SPACE_BYTES}", f"--cpu={cpu_seconds}", "--", *argv]


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(_limited(argv, INSPECT_CPU_SECONDS), capture_output=True, text=True,
                              timeout=INSPECT_WALL_SECONDS)
    except subprocess.TimeoutExpired:
        raise InvalidArgument(f"{what} took longer than {INSPECT_WALL_SECONDS} s: the image was refused") from None


def _killed(returncode: int) -> bool:
    return returncode < 0 or returncode in (128 + 9, 128 + 24, 134)  # SIGKILL, SIGXCPU, abort (out of memory)


def probe(path: str | Path, declared: str | None = None) -> dict[str, Any]:
    """Format and virtual size of an image file; ``InvalidArgument`` if it is not a
    sound, self-contained raw or qcow2 image (qcow2 files are also checked for corruption)."""
    path = Path(path)
    fmt = sniff_format(path, declared)
    if fmt == "qcow2":
        check_qcow2_header(path)
    out = _run(["qemu-img", "info", "--output=json", "--image-opts", _image_opts(path, fmt)], "reading the image")
    if out.returncode != 0:
        if _killed(out.returncode):
            raise InvalidArgument("reading the image exceeded its memory or CPU limit: the image was refused")
        reason = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise InvalidArgument(f"not a readable disk image: {reason.replace(str(path), 'the upload')}")
    info = json.loads(out.stdout)
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("backing-filename") or info.get("full-backing-filename") or data.get("data-file"):
        raise InvalidArgument("the image refers to other files: images that refer to other files are refused")
    size = int(info.get("virtual-size", 0))
    if size <= 0:
        raise InvalidArgument("the image is empty (virtual size 0)")
    if fmt == "qcow2":
        check = _run(["qemu-img", "check", "--image-opts", _image_opts(path, fmt)], "checking the image")
        if _killed(check.returncode):
            raise InvalidArgument("checking the image exceeded its memory or CPU limit: the image was refused")
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise InvalidArgument(f"the qcow2 image is corrupt: {check.stdout.strip() or check.stderr.strip()}")
    return {"format": fmt, "virtual_size": size}


def copy_into(path: str | Path, fmt: str, target_uri: str,
              progress: Callable[[float], None] | None = None, virtual_size: int = 0) -> None:
    """Write an image into an existing volume (its NBD or RBD URI), reporting percent done.

    The header is checked again first; qemu-img runs under limits scaled by
    ``virtual_size`` (bytes; 0 = the file's size)."""
    path = Path(path)
    if sniff_format(path, fmt) != fmt:
        raise InvalidArgument(f"the upload is no longer a {fmt} image")
    if fmt == "qcow2":
        check_qcow2_header(path)
    gib = max(1, -(-(virtual_size or path.stat().st_size) // (1 << 30)))
    argv = _limited(["qemu-img", "convert", "-p", "-n", "--image-opts", "-O", "raw", "-W", "-m", "8",
                     _image_opts(path, fmt), target_uri], INSPECT_CPU_SECONDS + COPY_CPU_SECONDS_PER_GIB * gib)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    wall = INSPECT_WALL_SECONDS + COPY_WALL_SECONDS_PER_GIB * gib
    timer = _Deadline(proc, wall)
    buf = b""
    try:
        while chunk := os.read(proc.stdout.fileno(), 4096):
            buf = (buf + chunk)[-256:]
            found = _PROGRESS.findall(buf)
            if found and progress is not None:
                progress(float(found[-1]))
        err = proc.stderr.read().decode(errors="replace").strip()
        code = proc.wait()
    finally:
        timer.cancel()
    if timer.fired:
        raise BackendError(f"qemu-img convert took longer than {wall} s and was stopped")
    if code != 0:
        if _killed(code):
            raise BackendError(f"qemu-img convert exceeded its memory or CPU limit (exit {code}): {err}")
        raise BackendError(f"qemu-img convert failed: {err}")


class _Deadline:
    """Kill a process still running after ``seconds``."""

    def __init__(self, proc: subprocess.Popen[bytes], seconds: float) -> None:
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        if self._proc.poll() is None:
            self.fired = True
            self._proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()
