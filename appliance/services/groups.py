"""Placement groups: the scheduler keeps members of an anti-affinity group on
different nodes and members of an affinity group together."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.db.models import Claim, PlacementGroup
from appliance.errors import Conflict
from appliance.services.principal import Principal
from appliance.services.scoped import ScopedKind

groups: ScopedKind[PlacementGroup] = ScopedKind(PlacementGroup, "placement-group",
                                                "`cairn get placement-groups` lists them")


def group_key(project_id: str, name: str) -> str:
    """Claims carry this key: group names are only unique within a project."""
    return f"{project_id[:8]}/{name}"[:63]


def create(session: Session, principal: Principal, project: str, name: str, policy: str) -> dict[str, Any]:
    row = groups.create(session, principal, project, name, {"policy": policy})
    return groups.public(row, project)


def delete(session: Session, principal: Principal, project: str, name: str) -> None:
    row, _ = groups.row(session, principal, project, name, "write")
    members = session.scalar(select(func.count()).select_from(Claim).where(
        Claim.group_name == group_key(row.project_id, name)))
    if members:
        raise Conflict(f"placement group '{name}' still has {members} member(s): delete or move them first")
    groups.delete(session, principal, project, name)
