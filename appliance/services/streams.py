"""Long-lived streams — the event stream (SSE) and the console websockets — hold their
caller's rights for as long as they run, so they are checked again every
``stream_recheck_seconds``: a revoked token, an ended session, a disabled or deleted
user, or rights that shrank (removed from a project, a lower role) close the stream.
Each API process also caps how many streams one user holds at once
(``max_streams_per_user``), so one account cannot tie up the API's connections."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from appliance.db.engine import session_scope
from appliance.errors import TooManyRequests, Unauthenticated
from appliance.services import auth
from appliance.services.principal import RANK, Principal
from appliance.settings import Settings


@dataclass(frozen=True)
class Credentials:
    """What a stream was opened with: ``Authorization`` header, or the console's session cookie."""

    authorization: str = ""
    session_id: str | None = None


def authenticate(url: str, creds: Credentials) -> Principal:
    """Check the credentials now (a short read-only transaction)."""
    with session_scope(url, readonly=True) as session:
        scheme, _, token = creds.authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return auth.authenticate_token(session, token.strip())
        if not creds.session_id:
            raise Unauthenticated("log in first: send a bearer token or the console's session cookie")
        principal, _ = auth.authenticate_session(session, creds.session_id)
        return principal


def narrowed(before: Principal, now: Principal) -> str | None:
    """Why ``now`` may see less than ``before`` could (None when it may see as much)."""
    def rank(role: str | None) -> int:
        return RANK.get(role or "", 0)

    if rank(now.cluster_role) < rank(before.cluster_role):
        return f"user '{now.user_name}' lost the cluster role '{before.cluster_role}'"
    for pid, (name, role) in before.projects.items():
        if rank(now.cluster_role) >= rank(role):
            continue  # the cluster role still covers it
        if pid not in now.projects:
            return f"user '{now.user_name}' was removed from project '{name}'"
        if rank(now.projects[pid][1]) < rank(role):
            return f"user '{now.user_name}' no longer has the role '{role}' in project '{name}'"
    return None


def recheck(url: str, creds: Credentials, before: Principal) -> Principal:
    """The caller as of now; raises Unauthenticated when the stream must close."""
    now = authenticate(url, creds)
    why = narrowed(before, now)
    if why:
        raise Unauthenticated(f"{why}: the stream is closed")
    return now


class StreamLimiter:
    """Counts the open streams of each user in this API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # max_streams_per_user, read at each acquire
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, principal: Principal) -> Slot:
        """A slot for one more stream, or 429; the stream releases it when it ends."""
        with self._lock:
            held = self._open.get(principal.user_id, 0)
            if held >= self.settings.max_streams_per_user:
                raise TooManyRequests(f"user '{principal.user_name}' already holds {held} event or console streams "
                                      f"(the most one user may hold at once): close one first", 5.0)
            self._open[principal.user_id] = held + 1
        return Slot(self, principal.user_id)

    def count(self, user_id: str) -> int:
        with self._lock:
            return self._open.get(user_id, 0)

    def _release(self, user_id: str) -> None:
        with self._lock:
            left = self._open.get(user_id, 0) - 1
            if left > 0:
                self._open[user_id] = left
            else:
                self._open.pop(user_id, None)


class Slot:
    def __init__(self, limiter: StreamLimiter, user_id: str) -> None:
        self.limiter = limiter
        self.user_id = user_id
        self.released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self.released:
                return
            self.released = True
        self.limiter._release(self.user_id)
