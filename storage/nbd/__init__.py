"""NBD export of dedup volumes (``cairn-nbd``)."""

from __future__ import annotations

from urllib.parse import quote


def export_uri(export: str, socket: str | None = None, host: str | None = None, port: int = 10809) -> str:
    """The NBD URI of an export: a unix socket's (as qemu-img and libnbd accept it), or a
    TCP port's, which is served over TLS only (``nbds://``, libnbd's spelling)."""
    if socket is not None:
        return f"nbd+unix:///{quote(export)}?socket={socket}"
    return f"nbds://{host or '127.0.0.1'}:{port}/{quote(export)}"


__all__ = ["export_uri"]
