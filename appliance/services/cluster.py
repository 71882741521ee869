"""Cluster-wide summaries, join tokens and joins.

A join token is ``CJ1.<CA fingerprint>.<id>.<secret>``: the joining node checks the
member's CA against the fingerprint before it trusts anything it is told (mutual TLS
from then on), and the member checks the secret (SHA-256 kept, single use, short
lived). Every check runs before anything changes, so a refused join changes nothing."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from appliance import pki
from appliance.db import migrate
from appliance.db.models import JoinToken, Node
from appliance.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from appliance.services import events, instances, nodes, tasks
from appliance.services.principal import Principal
from appliance.services.resources import iso, rowcount
from appliance.settings import Settings
from appliance.version import __version__

TOKEN_PREFIX = "CJ1"
MAX_TTL_SECONDS = 24 * 3600


def ping(session: Session) -> None:
    session.execute(text("SELECT 1"))


def versions(session: Session) -> dict[str, Any]:
    """What each member runs and where the schema is (rolling upgrades): the database's
    revision, the oldest code schema that runs on it, and each member's release."""
    conn = session.connection()
    revision, compatible_with = migrate.database_state(conn)
    return {
        "database_schema": revision,
        "compatible_with": compatible_with,
        "members": [{"name": name, "code": code, "schema": schema} for name, code, schema in migrate.members(conn)],
    }


def status(session: Session, principal: Principal, serving_node: str) -> dict[str, Any]:
    return {
        "version": __version__,
        "node": serving_node,
        "nodes": nodes.counts(session),
        "tasks": tasks.counts(session, principal),
        "instances": instances.counts(session, principal),
        "versions": versions(session),
    }


def view(session: Session, principal: Principal, settings: Settings) -> dict[str, Any]:
    """The cluster as its engines see it, with each member's Ready flag from the database."""
    from appliance.cluster import status as cluster_status

    principal.require_cluster("read")
    ready = {n.name: n.phase == "Ready" for n in session.scalars(select(Node))}
    return cluster_status.collect(settings, ready)


def ca_pem(settings: Settings) -> str:
    try:
        return (settings.pki_dir / "ca.crt").read_text()
    except FileNotFoundError:
        raise NotFound("this node has no CA yet (it is made when the API first serves TLS)") from None


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_join_token(session: Session, principal: Principal, settings: Settings,
                      ttl_seconds: int = 900) -> dict[str, Any]:
    principal.require_cluster("admin")
    if settings.cluster is None:
        raise Conflict("this node is not part of a cluster: run `cairn cluster init` first")
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInput(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}")
    secret = secrets.token_urlsafe(24)
    row = JoinToken(secret_sha256=_sha(secret), expires_at=datetime.now(UTC) + timedelta(seconds=ttl_seconds),
                    created_by=principal.user_name)
    session.add(row)
    session.flush()
    fingerprint = pki.fingerprint((settings.pki_dir / "ca.crt").read_bytes())
    events.record(session, "join-token", "created", {"id": row.id, "expires_at": iso(row.expires_at)}, None)
    return {"token": f"{TOKEN_PREFIX}.{fingerprint}.{row.id}.{secret}", "id": row.id,
            "expires_at": iso(row.expires_at), "ca_fingerprint": fingerprint}


def list_join_tokens(session: Session, principal: Principal) -> list[dict[str, Any]]:
    """Every join token (never its secret): when it expires, whether and by whom it was used."""
    principal.require_cluster("admin")
    rows = session.scalars(select(JoinToken).order_by(JoinToken.created_at.desc()).limit(200))
    return [{"id": r.id, "created_at": iso(r.created_at), "created_by": r.created_by, "expires_at": iso(r.expires_at),
             "used_at": iso(r.used_at), "used_by": r.used_by} for r in rows]


def parse_token(token: str) -> tuple[str, str, str]:
    """(CA fingerprint, token id, secret) of a join token, or InvalidInput."""
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 64:
        raise InvalidInput("the join token is malformed: expected CJ1.<CA fingerprint>.<id>.<secret> "
                           "as printed by `cairn cluster token create`")
    return parts[1], parts[2], parts[3]


def _check_token(session: Session, token: str) -> JoinToken:
    _fp, token_id, secret = parse_token(token)
    row = session.get(JoinToken, token_id)
    if row is None or not hmac.compare_digest(row.secret_sha256, _sha(secret)):
        raise PermissionDenied("the join token is not valid for this cluster: create one with "
                               "`cairn cluster token create` on a member")
    if row.used_at is not None:
        raise PermissionDenied(f"the join token was already used (by node '{row.used_by}' at "
                               f"{iso(row.used_at)}): tokens are single-use, create a new one")
    if row.expires_at < datetime.now(UTC):
        raise PermissionDenied(f"the join token expired at {iso(row.expires_at)}: create a new one")
    return row


def join(session: Session, settings: Settings, token: str, name: str, address: str, csr_pem: str,
         osds: list[str]) -> dict[str, Any]:
    """Admit a node: check the token and the candidate, consume the token, then add the
    node to etcd and hand it the cluster's keys. A refusal changes nothing (the token stays
    unused); an engine failure rolls the token back too."""
    from appliance.cluster import membership

    row = _check_token(session, token)
    cfg = settings.cluster
    if session.scalar(select(Node.id).where(Node.name == name)) is not None:
        raise Conflict(f"node '{name}' is already a member of this cluster "
                       "(remove it first with `cairn cluster remove`)")
    now = datetime.now(UTC)
    used = rowcount(session.execute(
        update(JoinToken).where(JoinToken.id == row.id, JoinToken.used_at.is_(None))
        .values(used_at=now, used_by=name)))
    if not used:  # another join took it between our check and now
        raise PermissionDenied("the join token was already used: tokens are single-use, create a new one")
    events.record(session, "cluster", "updated",
                  {"id": cfg.cluster_id if cfg else "", "name": cfg.name if cfg else "", "joined": name,
                   "address": address}, None)
    session.flush()  # everything but the engines is done: only they can fail after this
    try:
        return membership.admit(settings, name, address, csr_pem.encode(), osds)
    except membership.JoinRefused as exc:
        raise Conflict(str(exc))
    except ValueError as exc:
        raise InvalidInput(str(exc))


def remove(session: Session, principal: Principal, settings: Settings, name: str) -> dict[str, Any]:
    """Take a node out of the cluster for good. It must be down first (powered off, or its
    agent stopped long enough to be NotReady), as Proxmox's ``pvecm delnode`` asks."""
    from appliance.cluster import membership

    principal.require_cluster("admin")
    node = session.scalar(select(Node).where(Node.name == name))
    if node is not None and node.phase == "Ready":
        raise Conflict(f"node '{name}' is Ready: shut it down (or stop its agent) before removing it")
    try:
        done = membership.evict(settings, name)
    except membership.JoinRefused as exc:
        raise Conflict(str(exc))
    if node is not None:
        nodes.delete(session, principal, name)
    events.record(session, "cluster", "updated",
                  {"id": settings.cluster.cluster_id if settings.cluster else "", "name": name, "removed": name},
                  None)
    return done
