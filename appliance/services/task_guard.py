"""The one guard every task kind goes through when it ends without succeeding.

A task claims its resource (``task_state``, a compare-and-swap) and may take more on
the way: a placement claim, ports, a migration's reservation on the target, a paused
guest. However the task ends — cancelled while pending (the API), cancelled or
failing while running (the worker's runner), or lost with its worker (the reaper) —
``tasks`` calls :func:`released` in the transaction that ends it, so what the task
held is given back and the resource can be used and deleted again. Handlers
do not clean up after themselves; they only do the work."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.db.models import Image, Instance, Project, Task, Volume

log = logging.getLogger("cairn.tasks.guard")


def released(session: Session, task: Task, state: str) -> None:
    """Put right what ``task`` held; ``state`` is how it ended (failed / cancelled).
    Never raises: a guard that fails is logged, and the task still ends."""
    if state == "succeeded":
        return
    reason = task.error or f"its task was {state}"
    try:
        with session.begin_nested():
            if task.resource_kind in ("vm", "container") and task.name.startswith(("instance.", "vm.")):
                _instance(session, task, reason)
            elif task.name in VOLUME_STATES:
                _volume(session, task, reason)
            if task.name == "image.import":
                _image(session, str(task.params.get("image_id")), reason)
    except Exception:
        log.exception("releasing what a task held failed", extra={"task_id": task.id, "task": task.name})


# The task_state each task kind sets on its resource: the guard clears only its own.
INSTANCE_STATES = {"instance.create": ("scheduling", "spawning"), "instance.delete": ("deleting",),
                   "instance.migrate": ("migrating",), "instance.failover": ("failing-over",),
                   "vm.snapshot": ("snapshotting",),
                   "vm.snapshot_delete": ("snapshotting",), "vm.restore": ("restoring",)}
VOLUME_STATES = {"volume.create": "creating", "volume.resize": "resizing", "volume.delete": "deleting",
                 "volume.snapshot": "snapshotting", "volume.snapshot_delete": "snapshotting",
                 "volume.rollback": "rolling_back", "image.import": "importing"}


def _project(session: Session, project_id: str) -> str:
    return session.scalar(select(Project.name).where(Project.id == project_id)) or ""


def _instance(session: Session, task: Task, reason: str) -> None:
    from appliance.services import instances, placement

    row = session.get(Instance, task.resource_id)
    if row is None or task.name in ("vm.clone",):  # a clone holds nothing of its source
        return
    own = INSTANCE_STATES.get(task.name, ())
    if task.name == "instance.action":
        own = (instances.ACTIONS[str(task.params.get("action"))][0],)
    status: dict[str, Any] = {}
    columns: dict[str, Any] = {}
    if task.name == "instance.create" and row.vm_state == "building":
        # Its node reservation and ports go back, and it leaves the node: the agent
        # there removes whatever it had defined already.
        instances.release_placement(session, row, _project(session, row.project_id))
        columns.update(vm_state="error", node_id=None, power_state="nostate")
        status.update(error=reason, ports=[], node=None, consoles=[])
    elif task.name == "instance.migrate":
        placement.release(session, f"migrating-{row.id}"[:36])
        status["migration"] = {"error": reason}
    elif task.name == "instance.action":
        status["error"] = reason
    elif task.name == "instance.failover":  # its node is gone: nowhere to run it now
        columns["vm_state"] = "error"
        status["error"] = f"restarting it after its node was lost failed: {reason}"

    def settle(locked: Instance) -> None:  # on the row as it is now, under its lock
        if locked.task_state in own:
            locked.task_state = None
        if task.name == "vm.snapshot" and (locked.spec or {}).get("power") == "paused" \
                and locked.vm_state == "active":  # it was paused only for the snapshot
            locked.spec = {**locked.spec, "power": "running"}
            locked.generation += 1

    instances.KINDS[row.kind].write_status(session, row, status, columns=columns, change=settle)


def _volume(session: Session, task: Task, reason: str) -> None:
    from appliance.services import volumes

    vol = session.get(Volume, str(task.params.get("volume_id")))
    if vol is None:
        return
    creating = task.name in ("volume.create", "image.import")  # nothing usable was made

    def settle(locked: Volume) -> None:  # only its own busy flag, seen under the lock
        if locked.task_state == VOLUME_STATES[task.name]:
            locked.task_state = None
            if creating:
                locked.status = {**(locked.status or {}), "phase": "Error", "message": reason}

    volumes.volumes.write_status(session, vol, change=settle)


def _image(session: Session, image_id: str, reason: str) -> None:
    from appliance.services import images

    img = session.get(Image, image_id)
    if img is not None:
        images.images.write_status(session, img, {"phase": "Error", "message": reason})
