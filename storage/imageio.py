"""Disk images in and out of volumes with QEMU's own tools (qemu-img): probe an upload
(format, virtual size, corruption check) and copy it into a volume's NBD export."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.errors import BackendError, InvalidArgument

FORMATS = ("raw", "qcow2")
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def probe(path: str | Path, declared: str | None = None) -> dict[str, Any]:
    """Format and virtual size of an image file; ``InvalidArgument`` if it is not a
    sound raw or qcow2 image (qcow2 files are also checked for corruption)."""
    if declared is not None and declared not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}, not {declared!r}")
    out = subprocess.run(["qemu-img", "info", "--output=json", *(["-f", declared] if declared else []), str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise InvalidArgument(f"not a readable disk image: {reason.replace(str(path), 'the upload')}")
    info = json.loads(out.stdout)
    fmt = info.get("format")
    if fmt not in FORMATS:
        raise InvalidArgument(f"image format {fmt!r} is not supported: upload raw or qcow2")
    if info.get("backing-filename"):
        raise InvalidArgument("the image has a backing file: flatten it first (qemu-img convert)")
    size = int(info.get("virtual-size", 0))
    if size <= 0:
        raise InvalidArgument("the image is empty (virtual size 0)")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True)
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise InvalidArgument(f"the qcow2 image is corrupt: {check.stdout.strip() or check.stderr.strip()}")
    return {"format": fmt, "virtual_size": size}


def copy_into(path: str | Path, fmt: str, target_uri: str,
              progress: Callable[[float], None] | None = None) -> None:
    """Write an image into an existing volume (its NBD or RBD URI), reporting percent done."""
    proc = subprocess.Popen(["qemu-img", "convert", "-p", "-n", "-f", fmt, "-O", "raw", "-W", "-m", "8",
                             str(path), target_uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    while chunk := os.read(proc.stdout.fileno(), 4096):
        buf = (buf + chunk)[-256:]
        found = _PROGRESS.findall(buf)
        if found and progress is not None:
            progress(float(found[-1]))
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise BackendError(f"qemu-img convert failed: {err}")
