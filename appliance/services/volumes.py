"""Volumes and their snapshots (DESIGN.md, Storage). The API validates and claims the
volume's ``task_state`` (compare-and-swap, like instances); the work runs as a task in
a node's storage daemon: the volume's owner (``status.owner``, the node whose daemon
holds its lock, reported by that node's agent) when it has one, else the pool's node.
The engine names a volume by its row id, so project-scoped names never collide in a
shared pool."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from appliance.db.models import Image, Instance, Node, Project, StoragePool, Volume, VolumeSnapshot
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import events, pools, quotas, tasks
from appliance.services.auth import project_by_name
from appliance.services.principal import Principal
from appliance.services.resources import iso, rowcount
from appliance.services.scoped import ScopedKind
from appliance.services.units import parse_size

CLASSES = ("dedup", "rbd")
MAX_SIZE = 64 << 40


def _extra(row: Volume) -> dict[str, Any]:
    return {"size_bytes": row.size, "class": row.storage_class, "task_state": row.task_state,
            "owner": (row.status or {}).get("owner")}  # the node holding its lock, or null


volumes: ScopedKind[Volume] = ScopedKind(Volume, "volume", "`cairn get volumes` lists them", _extra)


def pool_of(session: Session, vol: Volume) -> StoragePool:
    pool = session.get(StoragePool, vol.pool_id)
    assert pool is not None  # RESTRICT foreign key
    return pool


def queue_of(session: Session, pool: StoragePool) -> str:
    node = session.get(Node, pool.node_id) if pool.node_id else None
    if node is None:
        raise Conflict(f"storage pool '{pool.name}' has no node serving it: assign it to a node first")
    if node.phase != "Ready" and (pool.spec or {}).get("backend") == "rados":
        # Every node writes a Ceph pool: any Ready one will do while its home node is down.
        other = session.scalar(select(Node.name).where(Node.phase == "Ready").order_by(Node.name))
        if other is not None:
            return f"node.{other}"
    if node.phase != "Ready":
        raise Conflict(f"node '{node.name}' that serves storage pool '{pool.name}' is {node.phase}: "
                       "wait for it to come back")
    return f"node.{node.name}"


def live_owner(session: Session, vol: Volume) -> tuple[str, str] | None:
    """(owner node, its phase) when a node's storage daemon holds the volume's lock."""
    owner = (vol.status or {}).get("owner")
    if not owner:
        return None
    node = session.scalar(select(Node).where(Node.name == owner))
    return owner, node.phase if node is not None else "gone"


def queue_for(session: Session, vol: Volume) -> str:
    """Where a volume's task runs: its owner's node while that node is Ready (only the
    owner may move its head), else the pool's node."""
    owned = live_owner(session, vol)
    if owned is not None and owned[1] == "Ready":
        return f"node.{owned[0]}"
    return queue_of(session, pool_of(session, vol))


def owner_conflict(session: Session, vol: Volume) -> str | None:
    """Why another instance may not attach ``vol`` now (None if it may): its lock is
    held by a node, alive or not yet fenced."""
    owned = live_owner(session, vol)
    if owned is None:
        return None
    node, phase = owned
    users = users_of(session, vol, running_only=True)
    where = f" (attached to {', '.join(users[:3])} there)" if users else ""
    if phase == "Ready":
        return (f"volume '{vol.name}' is owned by node '{node}'{where}: one node writes a volume at a time; "
                "stop or migrate that instance first")
    return (f"volume '{vol.name}' is still owned by node '{node}', which is {phase}: it must be fenced "
            "(its storage client blocklisted) before another node takes the volume over")


def _size(value: int | str) -> int:
    size = parse_size(value)
    if size <= 0 or size > MAX_SIZE:
        raise InvalidInput(f"size must be between 1 byte and 64 TiB, not {value!r}")
    return size


def _task(session: Session, principal: Principal, vol: Volume, name: str, params: dict[str, Any],
          queue: str) -> dict[str, Any]:
    return tasks.create(session, name, {"volume_id": vol.id, **params}, queue=queue, principal=principal,
                        project_id=vol.project_id, resource=("volume", vol.id, vol.name), max_attempts=1)


def _claim(session: Session, vol: Volume, task_state: str, detached: bool = False) -> None:
    """Compare-and-swap on task_state: one operation at a time on a volume (and, with
    ``detached``, only while no instance holds it)."""
    query = update(Volume).where(Volume.id == vol.id, Volume.task_state.is_(None))
    if detached:
        query = query.where(Volume.instance_id.is_(None))
    done = session.execute(query.values(task_state=task_state).execution_options(synchronize_session=False))
    session.refresh(vol)
    if not rowcount(done):
        if vol.task_state is None and vol.instance_id is not None:
            raise Conflict(f"volume '{vol.name}' is used by {', '.join(users_of(session, vol))}: "
                           "delete or detach it first")
        raise Conflict(f"volume '{vol.name}' is busy ({vol.task_state}): wait for that task to end")
    if (vol.status or {}).get("phase") not in ("Available", "Error") and task_state != "deleting":
        raise Conflict(f"volume '{vol.name}' is {(vol.status or {}).get('phase')}: wait until it is Available")


def snapshot_row(session: Session, vol: Volume, snap: str) -> VolumeSnapshot:
    row = session.scalar(select(VolumeSnapshot).where(VolumeSnapshot.volume_id == vol.id,
                                                      VolumeSnapshot.name == snap))
    if row is None:
        raise NotFound(f"volume '{vol.name}' has no snapshot '{snap}': `cairn snapshot list {vol.name}` lists them")
    return row


def _source(session: Session, principal: Principal, project: str, source: dict[str, Any]) -> dict[str, Any]:
    """Validate a create source: ``{"volume", "snapshot"}`` or ``{"image"}``."""
    if source.get("image"):
        proj = project_by_name(session, principal, project)
        image = session.scalar(select(Image).where(Image.project_id == proj.id, Image.name == source["image"]))
        if image is None:
            raise NotFound(f"there is no image '{source['image']}' in project '{project}': "
                           "`cairn get images` lists them")
        if not (image.spec or {}).get("volume_id") or (image.status or {}).get("phase") != "Available":
            raise InvalidInput(f"image '{image.name}' is not a disk image that is Available: "
                               "upload one with `cairn image upload`")
        src = session.get(Volume, image.spec["volume_id"])
        if src is None:
            raise NotFound(f"image '{image.name}' lost its volume: upload it again")
        return {"volume": src, "snapshot": image.spec.get("snapshot", "base")}
    if source.get("volume") and source.get("snapshot"):
        src, _ = volumes.row(session, principal, project, source["volume"])
        snapshot_row(session, src, source["snapshot"])
        return {"volume": src, "snapshot": source["snapshot"]}
    raise InvalidInput("source needs either 'image' or both 'volume' and 'snapshot'")


def create(session: Session, principal: Principal, project: str, name: str, size: int | str | None = None,
           pool: str | None = None, storage_class: str = "dedup", source: dict[str, Any] | None = None,
           labels: dict[str, str] | None = None) -> tuple[Volume, dict[str, Any]]:
    """An empty volume, or an O(1) clone of a snapshot or of an image."""
    if storage_class not in CLASSES:
        raise InvalidInput(f"class must be one of {', '.join(CLASSES)}, not {storage_class!r}")
    src = _source(session, principal, project, source) if source else None
    if src is not None:
        parent: Volume = src["volume"]
        if pool is not None and pool != pool_of(session, parent).name:
            raise InvalidInput(f"a clone lives in its source's pool '{pool_of(session, parent).name}', "
                               f"not in '{pool}'")
        prow = pool_of(session, parent)
        storage_class = parent.storage_class
        base = snapshot_row(session, parent, src["snapshot"]).size
        want = _size(size) if size is not None else base
        if want < base:
            raise InvalidInput(f"a clone cannot be smaller than its source ({base} bytes); leave size out "
                               "or grow it")
    else:
        if size is None:
            raise InvalidInput("size is required for an empty volume (e.g. 10GiB)")
        want = _size(size)
        prow = pools.row(session, pool or "default")
    if storage_class == "rbd" and prow.spec.get("backend") != "rados":
        raise InvalidInput(f"class 'rbd' needs a Ceph pool; '{prow.name}' is {prow.spec.get('backend')}")
    queue = queue_of(session, prow)
    quotas.charge(session, project_by_name(session, principal, project, "write").id, volume_bytes=want)
    spec: dict[str, Any] = {"pool": prow.name, "class": storage_class, "size_bytes": want, "labels": labels or {}}
    if src is not None:
        spec["source"] = {"volume": src["volume"].name, "volume_id": src["volume"].id, "snapshot": src["snapshot"]}
    vol = volumes.create(session, principal, project, name, spec, {"phase": "Creating"}, pool_id=prow.id,
                         storage_class=storage_class, size=want, task_state="creating")
    task = _task(session, principal, vol, "volume.create", {}, queue)
    return vol, task


def _volume(session: Session, principal: Principal, project: str, name: str) -> tuple[Volume, Project]:
    return volumes.row(session, principal, project, name, "write")


def users_of(session: Session, vol: Volume, running_only: bool = False) -> list[str]:
    """The instance this volume is attached to (only if powered on, with ``running_only``)."""
    if vol.instance_id is None:
        return []
    row = session.get(Instance, vol.instance_id)
    if row is None or (running_only and row.power_state not in ("running", "paused", "pending")):
        return []
    return [f"{row.kind} '{row.name}'"]


def attach(session: Session, vol: Volume, instance: Instance) -> None:
    """Give ``vol`` to ``instance``: a compare-and-swap on the volume row, in the
    transaction that creates the instance, so of two VMs created at once with the same
    volume exactly one gets it (the other's transaction gets a 409 and rolls back)."""
    won = rowcount(session.execute(
        update(Volume).where(Volume.id == vol.id, Volume.instance_id.is_(None), Volume.task_state.is_(None))
        .values(instance_id=instance.id).execution_options(synchronize_session=False)))
    session.refresh(vol)
    if not won:
        if vol.task_state:
            raise Conflict(f"volume '{vol.name}' is busy ({vol.task_state}): it must be Available")
        raise Conflict(f"volume '{vol.name}' is already attached to {', '.join(users_of(session, vol))}")


def detach_all(session: Session, instance_id: str) -> None:
    """Release every volume an instance holds (when it is deleted)."""
    session.execute(update(Volume).where(Volume.instance_id == instance_id).values(instance_id=None)
                    .execution_options(synchronize_session=False))


def resize(session: Session, principal: Principal, project: str, name: str, size: int | str,
           force: bool = False) -> dict[str, Any]:
    vol, _ = _volume(session, principal, project, name)
    want = _size(size)
    if want < vol.size and not force:
        raise InvalidInput(f"shrinking volume '{name}' from {vol.size} to {want} bytes loses the data past "
                           "the new end: pass force to do it anyway")
    if want == vol.size:
        raise InvalidInput(f"volume '{name}' already has {want} bytes")
    quotas.charge(session, vol.project_id, volume_bytes=max(0, want - vol.size))
    _claim(session, vol, "resizing")
    vol.spec = {**(vol.spec or {}), "size_bytes": want}
    vol.generation += 1
    return _task(session, principal, vol, "volume.resize", {"size": want, "force": force},
                 queue_for(session, vol))


def delete(session: Session, principal: Principal, project: str, name: str) -> dict[str, Any]:
    vol, _ = _volume(session, principal, project, name)
    users = users_of(session, vol)
    if users:
        raise Conflict(f"volume '{name}' is used by {', '.join(users[:5])}: delete or detach them first")
    image = session.scalar(select(Image.name).where(Image.spec["volume_id"].as_string() == vol.id))
    if image:
        raise Conflict(f"volume '{name}' holds image '{image}': delete the image instead")
    _claim(session, vol, "deleting", detached=True)
    return _task(session, principal, vol, "volume.delete", {}, queue_for(session, vol))


def snapshot_create(session: Session, principal: Principal, project: str, name: str,
                    snap: str) -> dict[str, Any]:
    vol, _ = _volume(session, principal, project, name)
    if session.scalar(select(VolumeSnapshot.id).where(VolumeSnapshot.volume_id == vol.id,
                                                      VolumeSnapshot.name == snap)):
        raise Conflict(f"volume '{name}' already has a snapshot '{snap}': pick another name")
    quotas.charge(session, vol.project_id, snapshots=1)
    _claim(session, vol, "snapshotting")
    return _task(session, principal, vol, "volume.snapshot", {"snapshot": snap},
                 queue_for(session, vol))


def snapshot_public(row: VolumeSnapshot, vol: Volume) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "volume": vol.name, "size_bytes": row.size,
            "created_at": iso(row.created_at)}


def snapshot_list(session: Session, principal: Principal, project: str, name: str) -> list[dict[str, Any]]:
    vol, _ = volumes.row(session, principal, project, name)
    rows = session.scalars(select(VolumeSnapshot).where(VolumeSnapshot.volume_id == vol.id)
                           .order_by(VolumeSnapshot.created_at, VolumeSnapshot.name))
    return [snapshot_public(r, vol) for r in rows]


def snapshot_delete(session: Session, principal: Principal, project: str, name: str, snap: str) -> dict[str, Any]:
    vol, _ = _volume(session, principal, project, name)
    snapshot_row(session, vol, snap)
    clones = [v.name for v in session.scalars(select(Volume).where(Volume.project_id == vol.project_id))
              if (v.spec or {}).get("source", {}).get("volume_id") == vol.id
              and v.spec["source"].get("snapshot") == snap and vol.storage_class == "rbd"]
    if clones:
        raise Conflict(f"rbd snapshot {name}@{snap} has clones ({', '.join(clones[:5])}): delete them first")
    _claim(session, vol, "snapshotting")
    return _task(session, principal, vol, "volume.snapshot_delete", {"snapshot": snap},
                 queue_for(session, vol))


def rollback(session: Session, principal: Principal, project: str, name: str, snap: str) -> dict[str, Any]:
    vol, _ = _volume(session, principal, project, name)
    snapshot_row(session, vol, snap)
    running = users_of(session, vol, running_only=True)
    if running:
        raise Conflict(f"volume '{name}' is in use by running {', '.join(running)}: stop it before rolling back")
    _claim(session, vol, "rolling_back")
    return _task(session, principal, vol, "volume.rollback", {"snapshot": snap},
                 queue_for(session, vol))


def clone(session: Session, principal: Principal, project: str, name: str, snap: str, new: str,
          size: int | str | None = None) -> tuple[Volume, dict[str, Any]]:
    return create(session, principal, project, new, size=size, source={"volume": name, "snapshot": snap})


def finish(session: Session, vol: Volume, verb: str = "updated", columns: dict[str, Any] | None = None,
           **status: Any) -> None:
    """Clear task_state, set ``columns`` and merge ``status`` (task handlers)."""
    volumes.write_status(session, vol, status, columns={**(columns or {}), "task_state": None}, verb=verb)


def record_snapshot(session: Session, vol: Volume, snap: str) -> None:
    session.add(VolumeSnapshot(volume_id=vol.id, name=snap, size=vol.size))
    session.flush()
    project = session.scalar(select(Project.name).where(Project.id == vol.project_id)) or ""
    events.record(session, "volume", "updated", volumes.public(vol, project), vol.project_id)
