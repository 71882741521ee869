"""The files instances boot from (kernels, initramfs, OCI archives), on every node.

An image is recorded with local paths (``/var/lib/cairn/images/…``, the same on every
node). In a cluster the node that imports an image also publishes each file into Ceph,
content-addressed (``rados://cairn/images``, 4 MiB objects plus a manifest), and the
image records each path's SHA-256; a node about to start an instance whose files it
does not have copies them from there and checks the hash. So an instance runs on any
node, and still after the importing node is gone. In the embedded single-node mode
there is nothing to share and both calls do (almost) nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from appliance.settings import Settings
from storage.backends import ObjectBackend, open_backend
from storage.errors import ObjectNotFound

log = logging.getLogger("cairn.images")
CHUNK = 4 << 20


class ImageFileMissing(Exception):
    """A file an image needs is neither on this node nor in the cluster's store."""


@lru_cache(maxsize=2)
def _store(url: str) -> ObjectBackend:
    return open_backend(url)


def store_url(settings: Settings) -> str | None:
    if settings.cluster is None:
        return None
    from appliance.cluster.config import CEPH_POOL
    from appliance.cluster.runtime import ceph_conf_path

    return f"rados://{CEPH_POOL}/images?conf={ceph_conf_path()}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def publish(settings: Settings, paths: list[str]) -> dict[str, str]:
    """Each path's SHA-256, after storing the file in the cluster (if there is one and it
    is not there yet)."""
    url = store_url(settings)
    blobs = {}
    for p in paths:
        path = Path(p)
        digest = sha256_of(path)
        blobs[p] = digest
        if url is None:
            continue
        store = _store(url)
        if store.exists(f"blob/{digest}"):
            continue
        size = path.stat().st_size
        with path.open("rb") as f:
            for i, block in enumerate(iter(lambda: f.read(CHUNK), b"")):
                store.put(f"blob/{digest}/{i}", block)
        store.put(f"blob/{digest}", json.dumps({"size": size, "chunks": -(-size // CHUNK)}).encode())
        log.info("image file published", extra={"path": p, "sha256": digest, "bytes": size})
    return blobs


def ensure_local(settings: Settings, blobs: dict[str, str]) -> None:
    """Make sure every file of an image is on this node (copied from the cluster's store
    and checked against its hash when missing or different)."""
    url = store_url(settings)
    for p, digest in blobs.items():
        path = Path(p)
        if path.exists() and (url is None or path.stat().st_size == _size(url, digest)):
            continue
        if url is None:
            raise ImageFileMissing(f"{p} is missing on this node")
        _fetch(_store(url), digest, path)


def forget(settings: Settings, digest: str) -> None:
    """Remove a file from the cluster's store (a VM's memory state when its snapshot goes;
    such files are unique to one snapshot, unlike image files that several images share)."""
    url = store_url(settings)
    if url is None:
        return
    store = _store(url)
    try:
        manifest = json.loads(store.get(f"blob/{digest}"))
    except ObjectNotFound:
        return
    store.delete(f"blob/{digest}")  # first: a half-deleted blob is then never read
    for i in range(int(manifest["chunks"])):
        store.delete(f"blob/{digest}/{i}")


def _size(url: str, digest: str) -> int:
    try:
        return int(json.loads(_store(url).get(f"blob/{digest}"))["size"])
    except ObjectNotFound:
        return -1


def _fetch(store: ObjectBackend, digest: str, path: Path) -> None:
    try:
        manifest = json.loads(store.get(f"blob/{digest}"))
    except ObjectNotFound:
        raise ImageFileMissing(f"{path} (sha256 {digest}) is not in the cluster's image store") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    with tmp.open("wb") as f:
        for i in range(int(manifest["chunks"])):
            block = store.get(f"blob/{digest}/{i}")
            h.update(block)
            f.write(block)
    if h.hexdigest() != digest:
        tmp.unlink(missing_ok=True)
        raise ImageFileMissing(f"{path}: the copy in the cluster's store does not match sha256 {digest}")
    tmp.replace(path)
    log.info("image file copied from the cluster", extra={"path": str(path), "sha256": digest})


def discard(settings: Settings, digest: str) -> None:
    """Remove a file from the cluster's store (an upload once imported)."""
    url = store_url(settings)
    if url is None:
        return
    store = _store(url)
    try:
        chunks = int(json.loads(store.get(f"blob/{digest}"))["chunks"])
    except ObjectNotFound:
        return
    store.delete(f"blob/{digest}")
    for i in range(chunks):
        store.delete(f"blob/{digest}/{i}")
