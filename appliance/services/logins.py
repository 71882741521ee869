"""Password logins, throttled; password changes; disabling users.

Every attempt is counted *before* its password is checked, per user name (whether or
not such a user exists) and per source address, in a short transaction of its own:
parallel guesses cannot slip past the limit, and an unknown name is throttled exactly
like a known one. A name that reaches ``login_max_failures`` inside the window is
locked for ``login_lockout_seconds`` (a source address after
``login_max_failures_per_address``); a locked attempt gets 429 with Retry-After and no
password check. A success clears the name's count. The password of an unknown or
disabled user is checked against a dummy argon2 hash, so every refusal costs the same
time. API tokens are not throttled here: a locked-out admin's scripts keep working."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.db.engine import session_scope
from appliance.db.models import LoginSession, LoginThrottle, User
from appliance.errors import Conflict, InvalidInput, TooManyRequests, Unauthenticated
from appliance.services import auth, events
from appliance.services.principal import Principal
from appliance.settings import Settings

WRONG = "wrong user name or password"
_dummy: list[str] = []
_dummy_lock = threading.Lock()


def _dummy_hash() -> str:
    with _dummy_lock:
        if not _dummy:
            _dummy.append(auth.hash_secret(secrets.token_urlsafe(16)))
        return _dummy[0]


def _keys(settings: Settings, username: str, source: str) -> list[tuple[str, int]]:
    return [(f"user:{username.lower()}"[:128], settings.login_max_failures),
            (f"addr:{source}"[:128], settings.login_max_failures_per_address)]


def _count_attempt(session: Session, settings: Settings, key: str, limit: int, now: datetime) -> bool:
    """Count one attempt on ``key``; raises 429 if it is locked. Returns True when this
    attempt is the one that locked it."""
    for _ in range(3):
        row = session.get(LoginThrottle, key, with_for_update=True)
        if row is not None:
            break
        try:
            with session.begin_nested():
                session.add(LoginThrottle(key=key, failures=0, window_start=now))
        except IntegrityError:
            continue  # a concurrent attempt made it first
    else:
        raise Conflict("too many logins at once: retry")
    assert row is not None
    if row.locked_until is not None and row.locked_until > now:
        left = (row.locked_until - now).total_seconds()
        what = "this user name" if key.startswith("user:") else "your address"
        raise TooManyRequests(f"too many failed logins for {what}: try again in {int(left) + 1} s", left)
    if (now - row.window_start).total_seconds() > settings.login_window_seconds or row.locked_until:
        row.failures, row.window_start, row.locked_until = 0, now, None
    row.failures += 1
    if row.failures >= limit:
        row.locked_until = now + timedelta(seconds=settings.login_lockout_seconds)
        return True
    return False


def password_login(settings: Settings, username: str, password: str, source: str
                   ) -> tuple[str, str, Principal, dict[str, Any]]:
    """Check a password (throttled); returns (session id, CSRF token, principal, me)."""
    url = settings.resolved_database_url
    now = datetime.now(UTC)
    with session_scope(url) as session:  # count the attempt first, in its own transaction
        locked = [key for key, limit in _keys(settings, username, source)
                  if _count_attempt(session, settings, key, limit, now)]
    with session_scope(url, readonly=True) as session:
        user = session.scalar(select(User).where(User.name == username))
        usable = user is not None and user.active and bool(user.password_hash)
        stored = user.password_hash if usable and user is not None else _dummy_hash()
    if not (auth.verify_secret(stored, password) and usable):
        raise Unauthenticated(WRONG)
    with session_scope(url) as session:
        user_key, addr_key = (k for k, _ in _keys(settings, username, source))
        session.execute(delete(LoginThrottle).where(LoginThrottle.key == user_key))
        addr = session.get(LoginThrottle, addr_key, with_for_update=True)
        if addr is not None:  # this attempt was not a failure
            addr.failures = max(0, addr.failures - 1)
            if addr_key in locked:
                addr.locked_until = None
        sid, csrf, principal = auth.open_session(session, username, settings.session_hours)
        return sid, csrf, principal, auth.me(session, principal)


def change_password(settings: Settings, principal: Principal, current: str, new: str, source: str,
                    keep_session: str | None) -> None:
    """The caller changes their own password (the current one is checked, throttled
    like a login); their other console sessions are ended."""
    url = settings.resolved_database_url
    now = datetime.now(UTC)
    with session_scope(url) as session:
        for key, limit in _keys(settings, principal.user_name, source):
            _count_attempt(session, settings, key, limit, now)
    with session_scope(url, readonly=True) as session:
        user = session.get(User, principal.user_id)
        stored = user.password_hash if user is not None and user.password_hash else _dummy_hash()
    if not auth.verify_secret(stored, current):
        raise Unauthenticated("the current password is wrong")
    if new == current:
        raise InvalidInput("new_password: pick a password other than the current one")
    with session_scope(url) as session:
        user = session.get(User, principal.user_id)
        assert user is not None
        user.password_hash = auth.hash_secret(new)
        user.generation += 1
        session.execute(delete(LoginThrottle).where(LoginThrottle.key == _keys(settings, user.name, source)[0][0]))
        _end_sessions(session, user.id, keep_session)
        events.record(session, "user", "updated", auth.user_public(session, user), None)


def update_user(session: Session, principal: Principal, name: str, active: bool | None,
                password: str | None, cluster_role: str | None, set_role: bool) -> dict[str, Any]:
    """Cluster admins disable / enable a user, reset their password, change their
    cluster role. A disabled user's tokens and sessions stop working at once (and
    their event and console streams close within seconds)."""
    principal.require_cluster("admin")
    user = auth.get_user_row(session, name)
    if user.id == principal.user_id and (active is False or (set_role and cluster_role != "admin")):
        raise Conflict("you cannot disable yourself or drop your own admin role: ask another admin")
    if active is not None:
        user.active = active
        if not active:
            _end_sessions(session, user.id, None)
    if password is not None:
        user.password_hash = auth.hash_secret(password)
        _end_sessions(session, user.id, None)
    if set_role:
        user.cluster_role = cluster_role
    user.generation += 1
    data = auth.user_public(session, user)
    events.record(session, "user", "updated", data, None)
    return data


def _end_sessions(session: Session, user_id: str, keep: str | None) -> None:
    query = delete(LoginSession).where(LoginSession.user_id == user_id)
    if keep:
        query = query.where(LoginSession.id_hash != auth.session_hash(keep))
    session.execute(query)
