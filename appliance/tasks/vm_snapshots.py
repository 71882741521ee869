"""Task handlers for VM snapshots (see appliance/services/vm_snapshots.py). Each volume
operation is a volume task on its pool's node; these handlers sequence them. A snapshot
with memory also saves the VM's RAM and device state (libvirt's external memory
snapshot, taken while the VM is paused for the volumes): a ``vm_state.*`` task on the
VM's node writes it to ``<data dir>/vm-state/<vm id>/<snapshot>.mem`` and shares it
with the cluster's image store (appliance.imagefiles), so any node can resume it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import imagefiles
from appliance.db.engine import session_scope
from appliance.db.models import Node, Project, Task
from appliance.errors import CairnError, Conflict, NotFound
from appliance.services import instances, tasks, volumes
from appliance.settings import get_settings
from appliance.tasks.instances import SYSTEM, InstanceFailed, _load, _update, _wait_power, _wait_task
from appliance.tasks.runner import TaskContext, handler

if TYPE_CHECKING:
    from compute.libvirt_driver import LibvirtDriver

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


def _on_node(ctx: TaskContext, row: Any, name: str, params: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run task ``name`` on the VM's node and return its result."""
    with session_scope(ctx.db_url) as session:
        node = session.get(Node, row.node_id) if row.node_id else None
        if node is None or node.phase != "Ready":
            raise Conflict(f"vm '{row.name}' has no Ready node to act on its memory state")
        task = tasks.create(session, name, {"instance_id": row.id, "domain": (row.status or {}).get("domain"),
                                            **params},
                            queue=f"node.{node.name}", principal=SYSTEM, project_id=row.project_id,
                            resource=("vm", row.id, row.name), max_attempts=1)
    _wait_task(ctx, task["id"], timeout)
    with session_scope(ctx.db_url, readonly=True) as session:
        done = session.get(Task, task["id"])
        return dict(done.result or {}) if done is not None else {}


def _state_file(instance_id: str, snap: str) -> str:
    return str(get_settings().data_dir / "vm-state" / instance_id / f"{snap}.mem")


@contextlib.contextmanager
def _hypervisor() -> Iterator[LibvirtDriver]:
    """This node's libvirt, for one task (imported here: only agents' workers need it)."""
    from compute.libvirt_driver import LibvirtDriver

    settings = get_settings()
    driver = LibvirtDriver(settings.libvirt_uri, settings.virt_type)
    try:
        yield driver
    finally:
        driver.close()


@handler("vm_state.save")
def save_memory(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """On the VM's node: its memory into a file, shared with the cluster."""
    settings = get_settings()
    path = _state_file(params["instance_id"], params["snapshot"])
    ctx.progress(10, "writing the VM's memory")
    with _hypervisor() as driver:
        driver.snapshot_memory(params["domain"], path)
    ctx.progress(70, "sharing it with the cluster")
    digest = imagefiles.publish(settings, [path])[path]
    return {"path": path, "sha256": digest, "bytes": Path(path).stat().st_size, "node": settings.node_name}


@handler("vm_state.restore")
def restore_memory(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """On the VM's node: the VM resumes from its memory file (fetched from the cluster if
    it was taken elsewhere)."""
    settings = get_settings()
    path = params["memory"]["path"]
    ctx.progress(10, "fetching the memory state")
    imagefiles.ensure_local(settings, {path: params["memory"]["sha256"]})
    ctx.progress(40, "resuming the VM from it")
    with _hypervisor() as driver:
        driver.restore_state(params["domain"], path)
    return {"resumed": params["domain"]}


@handler("vm_state.forget")
def forget_memory(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """The memory file of a deleted snapshot goes, here and in the cluster's store."""
    Path(params["memory"]["path"]).unlink(missing_ok=True)
    imagefiles.forget(get_settings(), params["memory"]["sha256"])
    return {}


@handler("vm.snapshot")
def snapshot(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    iid, snap = params["instance_id"], params["snapshot"]
    row = _load(ctx, iid)
    disks = [d["volume"] for d in (row.status or {}).get("volumes", [])]
    project = _project(ctx, row.project_id)
    with_memory = bool(params.get("memory"))

    def run() -> dict[str, Any]:
        running = row.power_state == "running"
        memory = None
        if running:
            ctx.progress(5, "pausing the VM so that its disks agree" + (" with its memory" if with_memory else ""))
            _update(ctx, iid, spec={"power": "paused"})
            _wait_power(ctx, iid, "paused", 10, "pause")
        try:
            if with_memory:
                ctx.progress(12, "saving the VM's memory")
                memory = _on_node(ctx, row, "vm_state.save", {"snapshot": snap})
            _each_volume(ctx, project, disks, "snapshot", 20, 60,
                         lambda s, p, d: volumes.snapshot_create(s, SYSTEM, p, d, snap))
        finally:
            if running:
                ctx.progress(85, "resuming the VM")
                _update(ctx, iid, spec={"power": "running"})
                _wait_power(ctx, iid, "running", 90, "resume")
        taken = {"name": snap, "volumes": disks, "created_at": datetime.now(UTC).isoformat(),
                 "power_state": row.power_state, "memory": memory}
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
        memory = taken.get("memory")
        _each_volume(ctx, project, taken["volumes"], "rolling back", 10, 60 if memory else 80,
                     lambda s, p, d: volumes.rollback(s, SYSTEM, p, d, snap))
        if not memory:
            _update(ctx, iid, task_state=None)
            return {"snapshot": snap, "volumes": taken["volumes"]}
        # the agent keeps its hands off while task_state is "restoring" (desired_state.HANDS_OFF)
        ctx.progress(75, "resuming the VM from its memory")
        _on_node(ctx, row, "vm_state.restore", {"memory": memory})
        _update(ctx, iid, spec={"power": "running"}, vm_state="active", task_state=None)
        _wait_power(ctx, iid, "running", 90, "resume")
        return {"snapshot": snap, "volumes": taken["volumes"], "resumed": True}

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
        if taken.get("memory"):
            ctx.progress(90, "deleting its memory state")
            try:
                _on_node(ctx, row, "vm_state.forget", {"memory": taken["memory"]}, timeout=120)
            except (InstanceFailed, Conflict):
                pass  # the node is away: the file stays there (its copy in the cluster store too)
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
