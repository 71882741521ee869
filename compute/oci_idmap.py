"""User namespaces for containers: one unprivileged 65,536-id range per container, and
idmapped mounts so the shared image layers look root-owned inside it.

A container's uid/gid 0..65535 is host id ``base``..``base + 65535``: root in the
container is an unprivileged, otherwise unused id on the host. Ranges are handed out
from one host-wide registry (``/var/lib/cairn-idmap`` by default: every stack on the
host shares the host's ids, and a range must survive reboots because the container's
own files carry it). A claim is a file ``slot-<n>`` naming its container directory as
``<host name>:<path>``; claims whose directory is gone are stale and taken again. The
host name scopes the path: lab nodes share the host's kernel and registry but each sees
its own ``/var/lib/cairn`` (a mount namespace of its own, a host name of its own), so a
claim of another node is never judged stale by a path it cannot see. Claims happen
under an ``flock`` on the registry.

The image layers stay owned by host root and are shared by every container: each
container sees them through idmapped bind mounts (``mount_setattr(MOUNT_ATTR_IDMAP)``,
kernel 5.12+; util-linux 2.38 has no ``X-mount.idmap``), which become the overlay's
lower layers.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
from pathlib import Path

from compute.errors import HypervisorError

ID_BASE = 1 << 24  # below: the host's own users and the usual /etc/subuid ranges
ID_SIZE = 65536
SLOTS = (2**32 - 1 - ID_BASE) // ID_SIZE
DEFAULT_REGISTRY = Path("/var/lib/cairn-idmap")

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # x86_64
_OPEN_TREE_CLONE, _AT_RECURSIVE, _AT_EMPTY_PATH = 1, 0x8000, 0x1000
_MOUNT_ATTR_IDMAP, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 0x00100000, 0x4, -100
_libc = ctypes.CDLL(None, use_errno=True)


class IdRanges:
    """The host-wide registry of containers' id ranges. ``scope`` names the mount
    namespace the claims' paths live in (default: this host name, see above)."""

    def __init__(self, registry: Path = DEFAULT_REGISTRY, scope: str | None = None) -> None:
        self.registry = Path(registry)
        self.scope = scope or socket.gethostname()

    def _slot_file(self, slot: int) -> Path:
        return self.registry / f"slot-{slot}"

    def _key(self, owner: Path) -> str:
        return f"{self.scope}:{owner.resolve()}"

    def first_slot(self, owner: Path) -> int:
        """Where the search for ``owner``'s slot starts (spread, so claims rarely queue)."""
        return int.from_bytes(hashlib.sha256(self._key(owner).encode()).digest()[:4], "big") % SLOTS

    def _free(self, holder: str, key: str) -> bool:
        """May a slot held by ``holder`` go to ``key``? Its own, or a stale claim of this scope."""
        scope, _, path = holder.partition(":") if not holder.startswith("/") else (self.scope, "", holder)
        return holder == key or (scope == self.scope and not Path(path).exists())

    def claim(self, owner: Path) -> int:
        """The first id of a range for ``owner`` (a container directory), claimed for it."""
        key = self._key(owner)
        self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = self.first_slot(owner)
        with open(self.registry / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for i in range(SLOTS):
                slot = (start + i) % SLOTS
                path = self._slot_file(slot)
                try:
                    holder = path.read_text().strip()
                except FileNotFoundError:
                    holder = ""
                if not holder or self._free(holder, key):
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(f"{key}\n")
                    os.replace(tmp, path)
                    return ID_BASE + slot * ID_SIZE
        raise HypervisorError("every container id range of this host is taken")

    def holds(self, owner: Path, base: int) -> bool:
        """Is ``base`` the first id of a range claimed for ``owner`` (a claim of this scope
        made before claims named their scope counts)?"""
        if base < ID_BASE or (base - ID_BASE) % ID_SIZE or (base - ID_BASE) // ID_SIZE >= SLOTS:
            return False
        try:
            holder = self._slot_file((base - ID_BASE) // ID_SIZE).read_text().strip()
        except FileNotFoundError:
            return False
        return holder in (self._key(owner), str(owner.resolve()))

    def release(self, owner: Path, base: int) -> None:
        """Give a range back (only while ``owner`` still holds it)."""
        path = self._slot_file((base - ID_BASE) // ID_SIZE)
        with open(self.registry / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if path.read_text().strip() == self._key(owner):
                    path.unlink()
            except FileNotFoundError:
                pass


def _userns_fd(base: int, size: int) -> int:
    """A user namespace mapping 0..size-1 to base.. (held by a short-lived helper)."""
    helper = subprocess.Popen(["unshare", "--user", "--", "/bin/sh", "-c", "echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert helper.stdout is not None
        if helper.stdout.readline().strip() != b"ready":
            raise HypervisorError("could not create a user namespace for an idmapped mount")
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{helper.pid}/{name}").write_text(f"0 {base} {size}\n")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise HypervisorError(f"{what}: {os.strerror(err)}")
    return result


def idmapped_bind(source: Path, target: Path, base: int, size: int = ID_SIZE) -> None:
    """Bind-mount ``source`` on ``target`` with host ids 0..size-1 shown as base..: files
    owned by host root look owned by the container's root through ``target``."""
    userns = _userns_fd(base, size)
    try:
        tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(),
                                    _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE), f"open_tree {source}")
        try:
            attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns))
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, attr, 32),
                   f"idmapping {source}")
            _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, str(target).encode(),
                                 _MOVE_MOUNT_F_EMPTY_PATH), f"mounting {target}")
        finally:
            os.close(tree)
    finally:
        os.close(userns)
