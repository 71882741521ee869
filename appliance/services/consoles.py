"""Who may open which console: resolves the caller and the instance's console socket."""

from __future__ import annotations

from appliance.db.engine import session_scope
from appliance.errors import Unauthenticated
from appliance.services import auth, instances
from appliance.services.principal import Principal


def authenticate(url: str, authorization: str, session_id: str | None) -> Principal:
    """A bearer token, or the console's session cookie."""
    with session_scope(url, readonly=True) as session:
        if authorization.lower().startswith("bearer "):
            return auth.authenticate_token(session, authorization[7:].strip())
        if not session_id:
            raise Unauthenticated("log in first: send a bearer token or the console's session cookie")
        principal, _ = auth.authenticate_session(session, session_id)
        return principal


def socket_path(url: str, principal: Principal, kind: str, project: str, name: str, want: str) -> str:
    """The node-local socket of console ``want`` (operator rights in the project needed)."""
    from appliance.errors import Conflict

    with session_scope(url, readonly=True) as session:
        row, _ = instances.KINDS[kind].row(session, principal, project, name, "write")
        consoles = (row.status or {}).get("consoles", [])
    for c in consoles:
        if c["kind"] == want and c.get("path"):
            return str(c["path"])
    raise Conflict(f"{kind} '{name}' has no {want} console (is it running?)")
