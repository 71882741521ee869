"""Task handlers for VM snapshots (see appliance/services/vm_snapshots.py). Each volume
operation is a volume task on its pool's node; these handlers sequence them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from appliance.db.engine import session_scope
from appliance.db.models import Project
from appliance.errors import CairnError, NotFound
from appliance.services import instances, volumes
from appliance.tasks.instances import SYSTEM, _load, _update, _wait_power, _wait_task
from appliance.tasks.runner import TaskContext, handler

# what a clone copies from its source's spec (the rest is per-instance state)
CLONED = ("cpu", "image", "qos_class", "networks", "security_groups", "placement_group", "node_selector",
          "user_data", "ha")


def _project(ctx: TaskContext, project_id: str) -> str:
    with session_scope(ctx.db_url, readonly=True) as session:
        project = session.get(Project, project_id)
        return project.name if project else ""


def _each_volume(ctx: TaskContext, project: str, disks: list[str], label: str, start: float, span: float,
                 op: Any, missing_ok: bool = False) -> None:
    """Run ``op(session, project, disk)`` (which records a volume task) for each disk, in
    turn, waiting for each task."""
    for i, disk in enumerate(disks):
        ctx.progress(start + span * i / max(1, len(disks)), f"{label} {disk}")
        try:
            with session_scope(ctx.db_url) as session:
                task = op(session, project, disk)
        except NotFound:
            if missing_ok:
                continue
            raise
        _wait_task(ctx, task["id"])


@handler("vm.snapshot")
def snapshot(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid, snap = params["instance_id"], params["snapshot"]
    row = _load(ctx, iid)
    disks = [d["volume"] for d in (row.status or {}).get("volumes", [])]
    project = _project(ctx, row.project_id)

    def run() -> dict[str, Any]:
        running = row.power_state == "running"
        if running:
            ctx.progress(5, "pausing the VM so that its disks agree")
            _update(ctx, iid, spec={"power": "paused"})
            _wait_power(ctx, iid, "paused", 10, "pause")
        try:
            _each_volume(ctx, project, disks, "snapshot", 20, 60,
                         lambda s, p, d: volumes.snapshot_create(s, SYSTEM, p, d, snap))
        finally:
            if running:
                ctx.progress(85, "resuming the VM")
                _update(ctx, iid, spec={"power": "running"})
                _wait_power(ctx, iid, "running", 90, "resume")
        taken = {"name": snap, "volumes": disks, "created_at": datetime.now(UTC).isoformat(),
                 "power_state": row.power_state}
        _update(ctx, iid, task_state=None, status=lambda now: {"snapshots": [*now.get("snapshots", []), taken]})
        return taken

    return run()  # ending any other way, services.task_guard frees the VM


@handler("vm.restore")
def restore(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid, snap = params["instance_id"], params["snapshot"]
    row = _load(ctx, iid)
    taken = next(s for s in row.status["snapshots"] if s["name"] == snap)
    project = _project(ctx, row.project_id)

    def run() -> dict[str, Any]:
        _each_volume(ctx, project, taken["volumes"], "rolling back", 10, 80,
                     lambda s, p, d: volumes.rollback(s, SYSTEM, p, d, snap))
        _update(ctx, iid, task_state=None)
        return {"snapshot": snap, "volumes": taken["volumes"]}

    return run()  # ending any other way, services.task_guard frees the VM


@handler("vm.snapshot_delete")
def snapshot_delete(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid, snap = params["instance_id"], params["snapshot"]
    row = _load(ctx, iid)
    taken = next(s for s in row.status["snapshots"] if s["name"] == snap)
    project = _project(ctx, row.project_id)

    def run() -> dict[str, Any]:
        _each_volume(ctx, project, taken["volumes"], "deleting snapshot of", 10, 80,
                     lambda s, p, d: volumes.snapshot_delete(s, SYSTEM, p, d, snap), missing_ok=True)
        _update(ctx, iid, task_state=None,
                status=lambda now: {"snapshots": [s for s in now.get("snapshots", []) if s["name"] != snap]})
        return {}

    return run()  # ending any other way, services.task_guard frees the VM


@handler("vm.clone")
def clone(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Clone each volume of the snapshot (O(1)), then create the new VM on them."""
    row = _load(ctx, params["instance_id"])
    snap, new = params["snapshot"], params["name"]
    project = _project(ctx, row.project_id)
    spec = row.spec or {}
    root = spec.get("root_volume")
    names = {d: (f"{new}-root" if d == root else f"{new}-{d}")[:63] for d in params["volumes"]}
    _each_volume(ctx, project, list(names), "cloning", 5, 40,
                 lambda s, p, d: volumes.create(s, SYSTEM, p, names[d], source={"volume": d, "snapshot": snap},
                                                labels={"cloned-from": f"{row.name}@{snap}"})[1])
    new_spec: dict[str, Any] = {k: spec[k] for k in CLONED if k in spec}
    new_spec.update(memory=int(spec["memory_bytes"]), volumes=list(names.values()))
    if root:
        new_spec["root_volume"] = names[root]
    ctx.progress(50, f"creating vm {new}")
    with session_scope(ctx.db_url) as session:
        task = instances.create(session, SYSTEM, "vm", project, new, new_spec)
    try:
        _wait_task(ctx, task["id"], timeout=900)
    except CairnError as exc:
        raise CairnError(f"the clone's volumes are ready but vm '{new}' did not start: {exc}") from exc
    return {"vm": new, "volumes": list(names.values())}
