"""VM snapshots: one snapshot of every volume of a VM, taken together (the VM is paused
for the moment it takes, so its disks agree with each other), and with ``memory_state``
its RAM and device state too (Proxmox's "include RAM"); restore rolls them all back (VM
stopped) and, when the snapshot kept the memory, resumes the VM where it was; clone
makes a new VM on clones of the volumes (it boots afresh)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from appliance.errors import Conflict, NotFound
from appliance.services import tasks
from appliance.services.instances import KINDS, _claim
from appliance.services.principal import Principal


def _vm(session: Session, principal: Principal, project: str, name: str) -> Any:
    row, _ = KINDS["vm"].row(session, principal, project, name, "write")
    return row


def _snap(row: Any, snap: str) -> dict[str, Any]:
    for s in (row.status or {}).get("snapshots", []):
        if s["name"] == snap:
            return dict(s)
    raise NotFound(f"vm '{row.name}' has no snapshot '{snap}': `cairn vm snapshot list {row.name}` lists them")


def _task(session: Session, principal: Principal, row: Any, name: str, params: dict[str, Any]) -> dict[str, Any]:
    return tasks.create(session, name, {"instance_id": row.id, **params}, queue="cluster", principal=principal,
                        project_id=row.project_id, resource=("vm", row.id, row.name), max_attempts=1)


def create(session: Session, principal: Principal, project: str, name: str, snap: str,
           memory_state: bool = False) -> dict[str, Any]:
    row = _vm(session, principal, project, name)
    if memory_state and row.power_state not in ("running", "paused"):
        raise Conflict(f"vm '{name}' is {row.power_state}: only a running VM has memory to keep; start it, "
                       "or snapshot its volumes without memory_state")
    if not memory_state and not (row.status or {}).get("volumes"):
        raise Conflict(f"vm '{name}' has no volumes to snapshot: attach volumes or boot it from a disk image "
                       "(or keep its memory with memory_state)")
    if any(s["name"] == snap for s in (row.status or {}).get("snapshots", [])):
        raise Conflict(f"vm '{name}' already has a snapshot '{snap}': pick another name")
    _claim(session, row, "snapshotting", ("active", "stopped", "paused"))
    return _task(session, principal, row, "vm.snapshot", {"snapshot": snap, "memory": memory_state})


def list_(session: Session, principal: Principal, project: str, name: str) -> list[dict[str, Any]]:
    row, _ = KINDS["vm"].row(session, principal, project, name)
    return list((row.status or {}).get("snapshots", []))


def restore(session: Session, principal: Principal, project: str, name: str, snap: str) -> dict[str, Any]:
    row = _vm(session, principal, project, name)
    _snap(row, snap)
    if row.vm_state != "stopped":
        raise Conflict(f"vm '{name}' is {row.vm_state}: stop it before restoring a snapshot")
    _claim(session, row, "restoring", ("stopped",))
    return _task(session, principal, row, "vm.restore", {"snapshot": snap})


def delete(session: Session, principal: Principal, project: str, name: str, snap: str) -> dict[str, Any]:
    row = _vm(session, principal, project, name)
    _snap(row, snap)
    _claim(session, row, "snapshotting", None)
    return _task(session, principal, row, "vm.snapshot_delete", {"snapshot": snap})


def clone(session: Session, principal: Principal, project: str, name: str, snap: str, new: str) -> dict[str, Any]:
    """A new VM like this one, on O(1) clones of the snapshot's volumes."""
    row = _vm(session, principal, project, name)
    taken = _snap(row, snap)
    if KINDS["vm"].exists(session, principal, project, new):
        raise Conflict(f"a vm named '{new}' already exists in project '{project}': pick another name")
    return _task(session, principal, row, "vm.clone", {"snapshot": snap, "name": new, "volumes": taken["volumes"]})
