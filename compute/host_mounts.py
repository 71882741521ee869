"""Mounts and loop devices of this host, found from the kernel's tables rather than by
``stat``: a FUSE mount whose daemon died answers every ``stat`` with ENOTCONN, so
``os.path.ismount`` calls it "not a mount" and ``losetup -j`` cannot name its file;
``/proc/self/mountinfo`` and ``/sys/block/loop*/loop/backing_file`` still can.

Used to take a container's mounts down after a crash (an agent killed mid-start, a
test run killed mid-test): whatever is mounted under its directories goes, latest
first, and the loop devices over its files are detached.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return field.encode().decode("unicode_escape")


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def _absolute(path: Path) -> str:
    return os.path.realpath(path)  # never strict: a dead FUSE mount cannot be stat'ed


def is_mountpoint(path: Path) -> bool:
    """True when something is mounted on ``path`` (``os.path.ismount`` misses bind mounts
    within one filesystem and dead FUSE mounts)."""
    return _absolute(path) in mount_points()


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, latest first (the order to unmount them in: an
    overlay goes before the layers it was mounted on, like ``umount -R``)."""
    top = _absolute(root)
    found = [m for m in mount_points() if m == top or m.startswith(top.rstrip("/") + "/")]
    return list(dict.fromkeys(reversed(found)))


def unmount(path: str | Path) -> bool:
    """Unmount ``path`` (every mount stacked on it); lazily when it is busy. True when done."""
    target = _absolute(Path(path))
    for _ in range(8):  # stacked mounts: one umount each
        if target not in mount_points():
            return True
        r = subprocess.run(["umount", target], capture_output=True, text=True)
        if r.returncode != 0:
            log.warning("%s busy at unmount (%s): detaching it lazily", target, r.stderr.strip())
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
    return target not in mount_points()


def unmount_under(root: Path) -> None:
    """Unmount everything at or below ``root``, latest first."""
    for mnt in mounts_under(root):
        unmount(mnt)


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices whose backing file is ``path`` or lies below it."""
    top = _absolute(path)
    out = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        backing = backing.removesuffix(" (deleted)")
        if backing == top or backing.startswith(top.rstrip("/") + "/"):
            out.append(f"/dev/{dev.name}")
    return out


def detach_loops(path: Path) -> None:
    """Detach the loop devices over ``path`` (or files below it); a mounted one is
    detached by the kernel once its last user goes (autoclear)."""
    for dev in loop_devices_of(path):
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
