"""Who may open which console: resolves the caller and the instance's console socket."""

from __future__ import annotations

from appliance.db.engine import session_scope
from appliance.errors import Conflict
from appliance.services import instances, streams
from appliance.services.principal import Principal


def socket_path(url: str, principal: Principal, kind: str, project: str, name: str, want: str) -> str:
    """The node-local socket of console ``want`` (operator rights in the project needed)."""
    return target(url, principal, kind, project, name, want)[0]


def target(url: str, principal: Principal, kind: str, project: str, name: str, want: str) -> tuple[str, str | None]:
    """The console's socket and the node it is on (its path is local to that node)."""
    with session_scope(url, readonly=True) as session:
        row, _ = instances.KINDS[kind].row(session, principal, project, name, "write")
        consoles = (row.status or {}).get("consoles", [])
        node = (row.status or {}).get("node")
    for c in consoles:
        if c["kind"] == want and c.get("path"):
            return str(c["path"]), node
    raise Conflict(f"{kind} '{name}' has no {want} console (is it running?)")


def recheck(url: str, creds: streams.Credentials, before: Principal, kind: str, project: str, name: str,
            want: str) -> Principal:
    """Still allowed? (the caller's credentials and rights, and the console itself)"""
    now = streams.recheck(url, creds, before)
    target(url, now, kind, project, name, want)
    return now


def vnc_target(url: str, principal: Principal, project: str, name: str) -> tuple[str, str | None]:
    """A VM's VNC socket (operator rights in the project needed) and the node it runs on."""
    path = socket_path(url, principal, "vm", project, name, "vnc-unix")
    with session_scope(url, readonly=True) as session:
        data = instances.KINDS["vm"].get(session, principal, project, name)
    return path, data["status"].get("node")
