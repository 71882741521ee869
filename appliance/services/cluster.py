"""Cluster-wide summaries."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from appliance.services import nodes, tasks
from appliance.services.principal import Principal
from appliance.version import __version__


def ping(session: Session) -> None:
    session.execute(text("SELECT 1"))


def status(session: Session, principal: Principal, serving_node: str) -> dict[str, Any]:
    return {
        "version": __version__,
        "node": serving_node,
        "nodes": nodes.counts(session),
        "tasks": tasks.counts(session, principal),
    }
