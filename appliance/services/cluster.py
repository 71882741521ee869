"""Cluster-wide summaries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from appliance.db import migrate
from appliance.services import nodes, tasks
from appliance.services.principal import Principal
from appliance.version import __version__


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
        "versions": versions(session),
    }
