"""Object backends: ``local://<dir>`` and ``rados://<pool>/<namespace>?conf=<ceph.conf>``."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from storage.backends.base import ObjectBackend
from storage.errors import InvalidArgument


def open_backend(url: str) -> ObjectBackend:
    """Open the backend an URL names (``local:///srv/pool``, ``rados://rbd/ns?conf=/x/ceph.conf``)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "local", "file"):
        from storage.backends.local import LocalBackend

        path = parsed.path if parsed.scheme else url
        if parsed.netloc:
            path = parsed.netloc + path
        if not path:
            raise InvalidArgument(f"local backend needs a directory: {url!r}")
        return LocalBackend(path)
    if parsed.scheme == "rados":
        from storage.backends.rados_store import RadosBackend

        conf = parse_qs(parsed.query).get("conf", ["/etc/ceph/ceph.conf"])[0]
        namespace = parsed.path.strip("/") or "cairn"
        if not parsed.netloc:
            raise InvalidArgument(f"rados URL needs a pool: {url!r}")
        return RadosBackend(conf, parsed.netloc, namespace)
    raise InvalidArgument(f"unknown backend scheme in {url!r} (use local:// or rados://)")


__all__ = ["ObjectBackend", "open_backend"]
