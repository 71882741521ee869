"""Per-project quotas (DESIGN.md: hard multi-tenancy), enforced in the transaction that
creates the resource.

:func:`charge` locks the project's row first (``SELECT … FOR NO KEY UPDATE`` on
PostgreSQL; SQLite's write transactions are serial already), then counts what the
project holds from the rows themselves and refuses what would go over. Every create
that charges a quota takes that lock, so concurrent creates in one project run their
check-and-insert one at a time and can never exceed a limit together; counting rows
(not a counter) means nothing drifts when a resource goes away by any path.

Limits live in the project's ``spec.quota`` (absent or null: unlimited); only a
cluster admin changes them. Independently of quotas, no project may hold more than
``external_project_share`` of the external address pool (routers + floating IPs),
so one tenant can never drain it for the others."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.db.models import FloatingIp, Instance, Network, Project, Router, Task, Volume, VolumeSnapshot
from appliance.errors import Conflict, PermissionDenied
from appliance.services.principal import Principal
from appliance.settings import Settings

KEYS = ("instances", "cpu", "memory_bytes", "volume_bytes", "snapshots", "networks", "floating_ips", "routers")
UNITS = {"instances": "instances", "cpu": "vCPUs", "memory_bytes": "bytes of memory",
         "volume_bytes": "bytes of volumes", "snapshots": "snapshots", "networks": "networks",
         "floating_ips": "floating IPs", "routers": "routers"}
FLAGS = {"memory_bytes": "memory", "volume_bytes": "volume-bytes", "floating_ips": "floating-ips"}


class QuotaExceeded(PermissionDenied):
    title = "Quota exceeded"
    type_slug = "quota-exceeded"


def limits(project: Project) -> dict[str, int | None]:
    quota = (project.spec or {}).get("quota") or {}
    return {key: quota.get(key) for key in KEYS}


def usage(session: Session, project_id: str, keys: tuple[str, ...] = KEYS) -> dict[str, float]:
    """What the project holds now, counted from its rows."""
    def count(model: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(model).where(model.project_id == project_id))
                   or 0)

    used: dict[str, float] = {}
    if {"instances", "cpu", "memory_bytes"} & set(keys):
        specs = list(session.scalars(select(Instance.spec).where(Instance.project_id == project_id)))
        used["instances"] = len(specs)
        used["cpu"] = sum(float((s or {}).get("cpu", 0)) for s in specs)
        used["memory_bytes"] = sum(int((s or {}).get("memory_bytes", 0)) for s in specs)
    if "volume_bytes" in keys:
        used["volume_bytes"] = int(session.scalar(select(func.coalesce(func.sum(Volume.size), 0))
                                                  .where(Volume.project_id == project_id)) or 0)
    if "snapshots" in keys:
        taken = session.scalar(select(func.count()).select_from(VolumeSnapshot)
                               .join(Volume, Volume.id == VolumeSnapshot.volume_id)
                               .where(Volume.project_id == project_id)) or 0
        coming = session.scalar(select(func.count()).select_from(Task).where(
            Task.project_id == project_id, Task.name == "volume.snapshot",
            Task.state.in_(("pending", "running")))) or 0
        used["snapshots"] = int(taken) + int(coming)
    for key, model in (("networks", Network), ("floating_ips", FloatingIp), ("routers", Router)):
        if key in keys:
            used[key] = count(model)
    return used


def _lock(session: Session, project_id: str) -> Project:
    project = session.scalar(select(Project).where(Project.id == project_id)
                             .with_for_update(key_share=True))
    if project is None:
        raise Conflict("the project was deleted meanwhile")
    return project


def charge(session: Session, project_id: str, settings: Settings | None = None, *,
           external_addresses: int = 0, **asks: float) -> None:
    """Refuse (403 quota-exceeded) when adding ``asks`` (e.g. ``instances=1, cpu=2``)
    to what the project holds would pass one of its limits. Call it in the creating
    transaction, before the insert: the project row stays locked until it commits."""
    project = _lock(session, project_id)
    limit = limits(project)
    checked = tuple(k for k, v in asks.items() if v and limit.get(k) is not None)
    if checked:
        used = usage(session, project_id, checked)
        for key in checked:
            cap = limit[key]
            assert cap is not None
            if used[key] + asks[key] > cap:
                raise QuotaExceeded(
                    f"project '{project.name}' would hold {_n(used[key] + asks[key])} {UNITS[key]}, over its "
                    f"quota of {_n(cap)} ({_n(used[key])} in use): delete some, or ask a cluster admin to "
                    f"raise it (`cairn project quota set {project.name} --{FLAGS.get(key, key)} N`)")
    if external_addresses and settings is not None:
        _external_share(session, project, settings, external_addresses)


def _external_share(session: Session, project: Project, settings: Settings, asked: int) -> None:
    bounds = settings.external_pool_bounds
    if bounds is None or settings.external_project_share >= 1:
        return  # no external network, or one project may take it all
    size = int(ipaddress.IPv4Address(bounds[1])) - int(ipaddress.IPv4Address(bounds[0])) + 1
    cap = max(1, math.floor(size * settings.external_project_share))
    held = int(session.scalar(select(func.count()).select_from(Router).where(
        Router.project_id == project.id, Router.external_address.is_not(None))) or 0)
    held += int(session.scalar(select(func.count()).select_from(FloatingIp)
                               .where(FloatingIp.project_id == project.id)) or 0)
    if held + asked > cap:
        raise QuotaExceeded(
            f"project '{project.name}' holds {held} of the {size} external addresses and may hold at most "
            f"{cap} (CAIRN_EXTERNAL_PROJECT_SHARE={settings.external_project_share:g}), so other projects "
            "keep some: delete a floating IP or a router, or create the router with external: false")


def _n(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


# --- reading and setting ---------------------------------------------------------------------

def show(session: Session, principal: Principal, name: str) -> dict[str, Any]:
    """Limits and usage of one project (its members may read them)."""
    from appliance.services.auth import project_by_name

    project = project_by_name(session, principal, name)
    used = usage(session, project.id)
    return {"project": project.name, "limits": limits(project),
            "usage": {k: int(v) if float(v).is_integer() else v for k, v in used.items()}}


def set_limits(session: Session, principal: Principal, name: str, quota: dict[str, int | None]) -> dict[str, Any]:
    """Replace a project's limits (cluster admins only; a limit under the current usage
    stops new creates, it removes nothing)."""
    from appliance.services import events
    from appliance.services.auth import project_by_name, project_public

    principal.require_cluster("admin")
    project = project_by_name(session, principal, name)
    wanted = {k: quota.get(k) for k in KEYS}
    if wanted != limits(project):
        project.spec = {**(project.spec or {}), "quota": wanted}
        project.generation += 1
        events.record(session, "project", "updated", project_public(project), project.id)
    return show(session, principal, name)
