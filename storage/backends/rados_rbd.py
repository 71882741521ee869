"""The ``rbd`` storage class: volumes as native RBD images (python3-rbd).

For users who want raw speed over dedup: QEMU talks to librbd directly. Snapshots and
clones map to RBD's own (clones are copy-on-write children of a protected snapshot).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import rados
import rbd

from storage.errors import AlreadyExists, BackendError, InvalidArgument, NotFound

_FEATURES = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK | rbd.RBD_FEATURE_OBJECT_MAP | \
    rbd.RBD_FEATURE_FAST_DIFF | rbd.RBD_FEATURE_DEEP_FLATTEN


class RbdVolumes:
    """Create, resize, delete, snapshot, clone and roll back RBD images in one pool."""

    def __init__(self, conf: str, pool: str) -> None:
        self.conf = conf
        self.pool = pool
        self._cluster = rados.Rados(conffile=conf, name="client.admin")
        try:
            self._cluster.connect(timeout=30)
            self._io = self._cluster.open_ioctx(pool)
        except rados.Error as exc:
            self._cluster.shutdown()
            raise BackendError(f"cannot open rbd pool {pool!r}: {exc}") from exc
        self._rbd = rbd.RBD()

    @contextmanager
    def _image(self, name: str, snapshot: str | None = None) -> Iterator[rbd.Image]:
        try:
            img = rbd.Image(self._io, name, snapshot=snapshot)
        except rbd.ImageNotFound:
            raise NotFound(f"rbd image {name!r}" + (f"@{snapshot}" if snapshot else "") + " does not exist") from None
        try:
            yield img
        except rbd.ImageNotFound:
            raise NotFound(f"snapshot {name}@{snapshot} does not exist") from None
        except rbd.Error as exc:
            raise BackendError(f"rbd {name}: {exc}") from exc
        finally:
            img.close()

    def list_images(self) -> list[str]:
        """Image names in the pool."""
        names: list[str] = self._rbd.list(self._io)
        return sorted(names)

    def create(self, name: str, size: int) -> None:
        """Create an image (thin)."""
        try:
            self._rbd.create(self._io, name, size, old_format=False, features=_FEATURES)
        except rbd.ImageExists:
            raise AlreadyExists(f"rbd image {name!r} already exists") from None

    def resize(self, name: str, size: int, force: bool = False) -> None:
        """Grow, or shrink with ``force``."""
        with self._image(name) as img:
            if size < img.size() and not force:
                raise InvalidArgument(f"shrinking {name!r} loses data: use force")
            img.resize(size)

    def delete(self, name: str) -> None:
        """Remove an image and its (unprotected) snapshots."""
        with self._image(name) as img:
            for snap in list(img.list_snaps()):
                if img.is_protected_snap(snap["name"]):
                    img.unprotect_snap(snap["name"])
                img.remove_snap(snap["name"])
        try:
            self._rbd.remove(self._io, name)
        except rbd.ImageNotFound:
            raise NotFound(f"rbd image {name!r} does not exist") from None
        except rbd.Error as exc:
            raise BackendError(f"rbd remove {name}: {exc}") from exc

    def snapshot(self, name: str, snap: str) -> None:
        """Create an RBD snapshot."""
        with self._image(name) as img:
            if any(s["name"] == snap for s in img.list_snaps()):
                raise AlreadyExists(f"snapshot {name}@{snap} already exists")
            img.create_snap(snap)

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        """Snapshots of an image."""
        with self._image(name) as img:
            return [{"name": s["name"], "size": s["size"]} for s in img.list_snaps()]

    def delete_snapshot(self, name: str, snap: str) -> None:
        """Remove a snapshot (unprotecting it first; fails while clones depend on it)."""
        with self._image(name) as img:
            if img.is_protected_snap(snap):
                img.unprotect_snap(snap)
            img.remove_snap(snap)

    def rollback(self, name: str, snap: str) -> None:
        """Roll the image back to a snapshot."""
        with self._image(name) as img:
            img.rollback_to_snap(snap)

    def clone(self, name: str, snap: str, new: str) -> None:
        """Copy-on-write child of a (protected) snapshot."""
        with self._image(name) as img:
            if not img.is_protected_snap(snap):
                img.protect_snap(snap)
        try:
            self._rbd.clone(self._io, name, snap, self._io, new, features=_FEATURES)
        except rbd.ImageExists:
            raise AlreadyExists(f"rbd image {new!r} already exists") from None

    def write(self, name: str, offset: int, data: bytes) -> None:
        """Write bytes (used for image uploads and tests)."""
        with self._image(name) as img:
            img.write(data, offset)

    def read(self, name: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        """Read bytes from the head or a snapshot."""
        with self._image(name, snapshot) as img:
            data: bytes = img.read(offset, length)
            return data

    def info(self, name: str) -> dict[str, Any]:
        """Size and provisioned bytes."""
        with self._image(name) as img:
            return {"name": name, "size": img.size(), "class": "rbd"}

    def qemu_uri(self, name: str) -> str:
        """The file name QEMU's rbd driver accepts."""
        return f"rbd:{self.pool}/{name}:conf={self.conf}"

    def close(self) -> None:
        """Release the cluster handle."""
        self._io.close()
        self._cluster.shutdown()
