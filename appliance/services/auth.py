"""Users, projects, role bindings, API tokens and console sessions.

Passwords and token secrets are argon2 hashes. Tokens look like
``cairn_<token id>_<secret>``: the id finds the row in one indexed lookup; a
successful argon2 check is remembered in-process so only the first request
with a token pays for it (revocation still takes effect at once: the row is
read on every request)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.db.models import ApiToken, LoginSession, Project, RoleBinding, User
from appliance.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from appliance.services import events
from appliance.services.principal import ROLES, Principal
from appliance.services.resources import iso, keyset, page, public, rowcount

_hasher = PasswordHasher()
_verified: dict[str, float] = {}
_verified_lock = threading.Lock()
_VERIFIED_TTL = 300.0
DEFAULT_PROJECT = "default"


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(stored: str | None, secret: str) -> bool:
    if not stored:
        return False
    try:
        return _hasher.verify(stored, secret)
    except (VerificationError, InvalidHashError):
        return False


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# --- principals -------------------------------------------------------------------------

def principal_for(session: Session, user: User, via: str) -> Principal:
    rows = session.execute(
        select(Project.id, Project.name, RoleBinding.role)
        .join(RoleBinding, RoleBinding.project_id == Project.id)
        .where(RoleBinding.user_id == user.id)
    )
    projects = {pid: (pname, role) for pid, pname, role in rows}
    return Principal(user.id, user.name, user.cluster_role, projects, via)


def authenticate_token(session: Session, token: str) -> Principal:
    parts = token.split("_")
    if len(parts) != 3 or parts[0] != "cairn":
        raise Unauthenticated("the bearer token is malformed: expected cairn_<id>_<secret>")
    token_id, secret = parts[1], parts[2]
    row = session.get(ApiToken, _uuid_from_hex(token_id))
    if row is None:
        raise Unauthenticated("the bearer token is unknown or was revoked: create a new one")
    now = datetime.now(UTC)
    if row.expires_at and row.expires_at < now:
        raise Unauthenticated(f"the bearer token '{row.name}' expired at {iso(row.expires_at)}")
    key = _sha(token)
    with _verified_lock:
        fresh = _verified.get(key, 0.0) > time.monotonic()
    if not fresh:
        if not verify_secret(row.secret_hash, secret):
            raise Unauthenticated("the bearer token is unknown or was revoked: create a new one")
        with _verified_lock:
            if len(_verified) > 10000:
                _verified.clear()
            _verified[key] = time.monotonic() + _VERIFIED_TTL
    user = session.get(User, row.user_id)
    if user is None or not user.active:
        raise Unauthenticated("the token's user is disabled")
    return principal_for(session, user, "token")


def _uuid_from_hex(value: str) -> str:
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        return ""
    return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"


def session_hash(sid: str) -> str:
    return _sha(sid)


def open_session(session: Session, username: str, hours: float) -> tuple[str, str, Principal]:
    """A console session for a user whose password was checked (services.logins);
    returns (session id for the cookie, CSRF token, principal)."""
    user = _user(session, username)
    sid = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    session.add(
        LoginSession(id_hash=_sha(sid), user_id=user.id, csrf_token=csrf,
                     expires_at=datetime.now(UTC) + timedelta(hours=hours))
    )
    session.execute(delete(LoginSession).where(LoginSession.expires_at < datetime.now(UTC)))
    return sid, csrf, principal_for(session, user, "session")


def authenticate_session(session: Session, sid: str) -> tuple[Principal, str]:
    row = session.get(LoginSession, _sha(sid))
    if row is None or row.expires_at < datetime.now(UTC):
        raise Unauthenticated("your console session expired: log in again")
    user = session.get(User, row.user_id)
    if user is None or not user.active:
        raise Unauthenticated("your user is disabled")
    return principal_for(session, user, "session"), row.csrf_token


def logout(session: Session, sid: str) -> None:
    session.execute(delete(LoginSession).where(LoginSession.id_hash == _sha(sid)))


# --- bootstrap ----------------------------------------------------------------------------

def bootstrap(session: Session, admin_name: str = "admin") -> str | None:
    """Create the default project and the first admin. Returns the admin's new
    password, or None when the cluster already has users (idempotent)."""
    project = session.scalar(select(Project).where(Project.name == DEFAULT_PROJECT))
    if project is None:
        project = Project(name=DEFAULT_PROJECT, spec={"description": "Default project"})
        session.add(project)
        session.flush()
    if session.scalar(select(func.count()).select_from(User)):
        return None
    password = secrets.token_urlsafe(18)
    admin = User(name=admin_name, password_hash=hash_secret(password), cluster_role="admin",
                 spec={"display_name": "Administrator"})
    session.add(admin)
    session.flush()
    session.add(RoleBinding(user_id=admin.id, project_id=project.id, role="admin"))
    return password


# --- users --------------------------------------------------------------------------------

def user_public(session: Session, user: User) -> dict[str, Any]:
    roles = [
        {"project": name, "role": role}
        for name, role in session.execute(
            select(Project.name, RoleBinding.role)
            .join(RoleBinding, RoleBinding.project_id == Project.id)
            .where(RoleBinding.user_id == user.id)
            .order_by(Project.name)
        )
    ]
    return public(user, None, cluster_role=user.cluster_role, roles=roles, active=user.active)


def me(session: Session, principal: Principal) -> dict[str, Any]:
    user = session.get(User, principal.user_id)
    assert user is not None
    data = user_public(session, user)
    return {"name": user.name, "cluster_role": user.cluster_role, "roles": data["status"]["roles"]}


def create_user(session: Session, principal: Principal, name: str, password: str,
                cluster_role: str | None, spec: dict[str, Any]) -> dict[str, Any]:
    principal.require_cluster("admin")
    if cluster_role is not None and cluster_role not in ROLES:
        raise InvalidInput(f"cluster_role must be one of {', '.join(ROLES)}")
    if session.scalar(select(User).where(User.name == name)):
        raise Conflict(f"a user named '{name}' already exists: pick another name")
    user = User(name=name, password_hash=hash_secret(password), cluster_role=cluster_role, spec=spec)
    session.add(user)
    _flush_unique(session, f"a user named '{name}' already exists: pick another name")
    data = user_public(session, user)
    events.record(session, "user", "created", data, None)
    return data


def get_user_row(session: Session, name: str) -> User:
    return _user(session, name)


def _user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"there is no user named '{name}'")
    return user


def get_user(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    if name != principal.user_name:
        principal.require_cluster("read")
    return user_public(session, _user(session, name))


def list_users(session: Session, principal: Principal, limit: int, cursor: str | None
               ) -> tuple[list[dict[str, Any]], str | None]:
    principal.require_cluster("read")
    rows = list(session.scalars(keyset(select(User), (User.name,), cursor, limit)))
    rows, nxt = page(rows, limit, lambda u: (u.name,))
    return [user_public(session, u) for u in rows], nxt


def delete_user(session: Session, principal: Principal, name: str) -> None:
    principal.require_cluster("admin")
    user = _user(session, name)
    if user.id == principal.user_id:
        raise Conflict("you cannot delete yourself: log in as another admin first")
    data = user_public(session, user)
    session.delete(user)
    events.record(session, "user", "deleted", data, None)


# --- projects ------------------------------------------------------------------------------

def project_public(project: Project) -> dict[str, Any]:
    return public(project, project.name)


def _project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"there is no project named '{name}'")
    return project


def project_by_name(session: Session, principal: Principal, name: str, action: str = "read") -> Project:
    """Resolve a project the principal may act in (others look like they do not exist)."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None or not principal.can_project(project.id, "read"):
        raise NotFound(f"there is no project named '{name}' that you can see")
    principal.require_project(project.id, action, name)  # type: ignore[arg-type]
    return project


def create_project(session: Session, principal: Principal, name: str, spec: dict[str, Any]
                   ) -> dict[str, Any]:
    principal.require_cluster("admin")
    if session.scalar(select(Project).where(Project.name == name)):
        raise Conflict(f"a project named '{name}' already exists: pick another name")
    project = Project(name=name, spec=spec)
    session.add(project)
    _flush_unique(session, f"a project named '{name}' already exists: pick another name")
    data = project_public(project)
    events.record(session, "project", "created", data, project.id)
    return data


def list_projects(session: Session, principal: Principal, limit: int, cursor: str | None
                  ) -> tuple[list[dict[str, Any]], str | None]:
    query = select(Project)
    visible = principal.readable_project_ids()
    if visible is not None:
        query = query.where(Project.id.in_(visible))
    rows = list(session.scalars(keyset(query, (Project.name,), cursor, limit)))
    rows, nxt = page(rows, limit, lambda p: (p.name,))
    return [project_public(p) for p in rows], nxt


def get_project(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    return project_public(project_by_name(session, principal, name))


def update_project(session: Session, principal: Principal, name: str, spec: dict[str, Any],
                   if_match: str | None) -> dict[str, Any]:
    from appliance.services.resources import check_generation

    project = project_by_name(session, principal, name, "admin")
    check_generation(project, if_match)
    spec = dict(spec)
    if spec.get("quota") is None:
        spec["quota"] = (project.spec or {}).get("quota") or {}
    elif spec["quota"] != (project.spec or {}).get("quota") and not principal.can_cluster("admin"):
        raise PermissionDenied(f"only a cluster admin changes the quota of project '{name}': leave quota out "
                               "to change the rest")
    if spec != project.spec:
        project.spec = spec
        project.generation += 1
    data = project_public(project)
    events.record(session, "project", "updated", data, project.id)
    return data


def delete_project(session: Session, principal: Principal, name: str) -> None:
    principal.require_cluster("admin")
    project = _project(session, name)
    if name == DEFAULT_PROJECT:
        raise Conflict("the default project cannot be deleted")
    data = project_public(project)
    session.delete(project)
    events.record(session, "project", "deleted", data, project.id)


def set_member(session: Session, principal: Principal, project_name: str, user_name: str, role: str
               ) -> dict[str, Any]:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    project = project_by_name(session, principal, project_name, "admin")
    user = _user(session, user_name)
    binding = session.scalar(
        select(RoleBinding).where(RoleBinding.user_id == user.id, RoleBinding.project_id == project.id)
    )
    if binding is None:
        session.add(RoleBinding(user_id=user.id, project_id=project.id, role=role))
    else:
        binding.role = role
    session.flush()
    data = user_public(session, user)
    events.record(session, "user", "updated", data, None)
    return {"project": project.name, "user": user.name, "role": role}


def remove_member(session: Session, principal: Principal, project_name: str, user_name: str) -> None:
    project = project_by_name(session, principal, project_name, "admin")
    user = _user(session, user_name)
    removed = rowcount(session.execute(
        delete(RoleBinding).where(RoleBinding.user_id == user.id, RoleBinding.project_id == project.id)
    ))
    if not removed:
        raise NotFound(f"user '{user_name}' is not a member of project '{project_name}'")


def list_members(session: Session, principal: Principal, project_name: str) -> list[dict[str, Any]]:
    project = project_by_name(session, principal, project_name)
    return [
        {"project": project.name, "user": name, "role": role}
        for name, role in session.execute(
            select(User.name, RoleBinding.role)
            .join(RoleBinding, RoleBinding.user_id == User.id)
            .where(RoleBinding.project_id == project.id)
            .order_by(User.name)
        )
    ]


# --- tokens ----------------------------------------------------------------------------------

def token_public(row: ApiToken) -> dict[str, Any]:
    return public(row, None, expires_at=iso(row.expires_at), last_used_at=iso(row.last_used_at))


def create_token(session: Session, principal: Principal, name: str, expires_days: float | None
                 ) -> dict[str, Any]:
    if session.scalar(select(ApiToken).where(ApiToken.user_id == principal.user_id, ApiToken.name == name)):
        raise Conflict(f"you already have a token named '{name}': pick another name or delete it")
    secret = secrets.token_urlsafe(32).replace("_", "x")
    row = ApiToken(name=name, user_id=principal.user_id, secret_hash=hash_secret(secret),
                   expires_at=datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None)
    session.add(row)
    _flush_unique(session, f"you already have a token named '{name}'")
    data = token_public(row)
    data["token"] = f"cairn_{row.id.replace('-', '')}_{secret}"
    return data


def list_tokens(session: Session, principal: Principal) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(ApiToken).where(ApiToken.user_id == principal.user_id).order_by(ApiToken.name)
    )
    return [token_public(r) for r in rows]


def delete_token(session: Session, principal: Principal, name: str) -> None:
    removed = rowcount(session.execute(
        delete(ApiToken).where(ApiToken.user_id == principal.user_id, ApiToken.name == name)
    ))
    if not removed:
        raise NotFound(f"you have no token named '{name}'")


def _flush_unique(session: Session, message: str) -> None:
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(message)
