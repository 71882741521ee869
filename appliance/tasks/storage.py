"""Task handlers for volumes, snapshots and image imports. They run on the pool's
node and ask its storage daemon (the pool's one writer) to do the work; the database
row changes only after the daemon said yes, and a failure leaves the volume as it was
(phase Error only when a create or import did not finish: services.task_guard does that
and frees the volume, however the task ended)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from appliance.db.engine import session_scope
from appliance.db.models import Image, Project, StoragePool, Volume, VolumeSnapshot
from appliance.services import events, volumes
from appliance.settings import get_settings
from appliance.tasks.runner import TaskContext, handler
from storage import imageio
from storage.control import StorageClient
from storage.errors import NotFound as StorageNotFound


def client() -> StorageClient:
    return StorageClient(get_settings().storage_socket)


def _load(ctx: TaskContext, volume_id: str) -> tuple[Volume, StoragePool]:
    with session_scope(ctx.db_url) as session:
        vol = session.get(Volume, volume_id)
        if vol is None:
            raise RuntimeError(f"volume {volume_id} no longer exists")
        pool = volumes.pool_of(session, vol)
        session.expunge(vol)
        session.expunge(pool)
        return vol, pool


def _call(pool: StoragePool, vol: Volume, op: str, **args: Any) -> Any:
    cls = {"class": "rbd"} if vol.storage_class == "rbd" else {}
    return client().call(op, pool=pool.name, volume=vol.id, **cls, **args)


def _finish(ctx: TaskContext, volume_id: str, **changes: Any) -> None:
    with session_scope(ctx.db_url) as session:
        vol = session.get(Volume, volume_id)
        if vol is None:
            return
        status = changes.pop("status", {})
        volumes.finish(session, vol, columns=changes, **status)


def _exports(pool: StoragePool, vol: Volume) -> dict[str, Any]:
    out = _call(pool, vol, "export")
    export = out.get("rbd") or out.get("unix")
    return {"export": export, "exports": out}


@handler("volume.create")
def create(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    source = (vol.spec or {}).get("source")
    if source:
        ctx.progress(20, f"cloning {source['volume']}@{source['snapshot']} (O(1))")
        parent, _ = _load(ctx, source["volume_id"])
        _call(pool, parent, "clone", snapshot=source["snapshot"], new=vol.id)
        info = _call(pool, vol, "info")
        if int(info["size"]) < vol.size:
            ctx.progress(60, f"growing to {vol.size} bytes")
            _call(pool, vol, "resize", size=vol.size)
    else:
        ctx.progress(30, f"creating {vol.size} bytes in pool {pool.name}")
        _call(pool, vol, "create", size=vol.size)
    ctx.progress(90, "exporting")
    status = {"phase": "Available", "message": "", **_exports(pool, vol)}
    _finish(ctx, vol.id, status=status)
    return status


@handler("volume.resize")
def resize(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    ctx.progress(30, f"resizing to {params['size']} bytes")
    _call(pool, vol, "resize", size=params["size"], force=bool(params.get("force")))
    _finish(ctx, vol.id, size=int(params["size"]))
    return {"size": params["size"]}


@handler("volume.delete")
def remove(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    ctx.progress(30, "deleting (space returns at the next garbage collection)")
    if vol.storage_class == "rbd":
        snaps = [s["name"] for s in _call(pool, vol, "snapshots")] if _exists(pool, vol) else []
        for snap in snaps:
            _call(pool, vol, "delete_snapshot", snapshot=snap)
    with contextlib.suppress(StorageNotFound):
        _call(pool, vol, "delete")
    with session_scope(ctx.db_url) as session:
        row = session.get(Volume, vol.id)
        if row is not None:
            project = session.scalar(select(Project.name).where(Project.id == row.project_id)) or ""
            data = volumes.volumes.public(row, project)
            session.execute(delete(VolumeSnapshot).where(VolumeSnapshot.volume_id == row.id))
            session.delete(row)
            events.record(session, "volume", "deleted", data, row.project_id)
    return {}


def _exists(pool: StoragePool, vol: Volume) -> bool:
    try:
        _call(pool, vol, "info")
        return True
    except StorageNotFound:
        return False


@handler("volume.snapshot")
def snapshot(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    ctx.progress(30, f"snapshot {params['snapshot']} (O(1))")
    _call(pool, vol, "snapshot", snapshot=params["snapshot"])
    with session_scope(ctx.db_url) as session:
        row = session.get(Volume, vol.id)
        if row is not None:
            volumes.record_snapshot(session, row, params["snapshot"])
            volumes.finish(session, row)
    return {"snapshot": params["snapshot"]}


@handler("volume.snapshot_delete")
def snapshot_delete(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    with contextlib.suppress(StorageNotFound):
        _call(pool, vol, "delete_snapshot", snapshot=params["snapshot"])
    with session_scope(ctx.db_url) as session:
        session.execute(delete(VolumeSnapshot).where(VolumeSnapshot.volume_id == vol.id,
                                                     VolumeSnapshot.name == params["snapshot"]))
        row = session.get(Volume, vol.id)
        if row is not None:
            volumes.finish(session, row)
    return {}


@handler("volume.rollback")
def rollback(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    vol, pool = _load(ctx, params["volume_id"])
    ctx.progress(30, f"rolling back to {params['snapshot']} (O(1))")
    _call(pool, vol, "rollback", snapshot=params["snapshot"])
    size = int(_call(pool, vol, "info")["size"])
    _finish(ctx, vol.id, size=size)
    return {"snapshot": params["snapshot"], "size": size}


@handler("image.import")
def import_image(ctx: TaskContext, params: dict[str, Any]) -> dict[str, Any]:
    """Copy an uploaded raw / qcow2 file into the image's volume, then snapshot it as
    ``base``: new VMs clone ``base`` in O(1)."""
    from appliance import imagefiles

    vol, pool = _load(ctx, params["volume_id"])
    upload = Path(params["path"])
    settings = get_settings()
    try:
        if params.get("sha256"):  # uploaded through another node's API
            ctx.progress(1, "fetching the upload from the cluster's image store")
            imagefiles.ensure_local(settings, {str(upload): params["sha256"]})
        ctx.progress(2, f"creating a {vol.size}-byte volume")
        with contextlib.suppress(Exception):
            _call(pool, vol, "delete")  # a retried import starts over
        _call(pool, vol, "create", size=vol.size)
        exports = _exports(pool, vol)
        target = exports["exports"].get("rbd") or exports["exports"]["unix"]
        imageio.copy_into(upload, params["format"], target,
                          lambda pct: ctx.progress(5 + pct * 0.9, f"copying: {pct:.0f} %"),
                          virtual_size=vol.size)
        ctx.progress(97, "snapshot 'base'")
        _call(pool, vol, "snapshot", snapshot="base")
    finally:  # a failure marks the image and its volume Error (services.task_guard)
        upload.unlink(missing_ok=True)
        if params.get("sha256"):
            imagefiles.discard(settings, params["sha256"])
    with session_scope(ctx.db_url) as session:
        row = session.get(Volume, vol.id)
        if row is not None:
            volumes.record_snapshot(session, row, "base")
            volumes.finish(session, row, phase="Available", message="", **exports)
    _image_status(ctx, params["image_id"], {"phase": "Available", "message": ""})
    return {"volume": vol.name, "size": vol.size}


def _image_status(ctx: TaskContext, image_id: str, status: dict[str, Any]) -> None:
    from appliance.services import images

    with session_scope(ctx.db_url) as session:
        img = session.get(Image, image_id)
        if img is not None:
            images.images.write_status(session, img, status)
