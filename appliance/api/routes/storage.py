"""Storage pools, volumes and snapshots. Every write to a volume is a task on the
pool's node (202 + Location); reads come from the database."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.routes.scoped import ProjectQuery, add_scoped_routes
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import (
    Limit,
    Metrics,
    MetricsRange,
    Name,
    ResourceList,
    ResourcePublic,
    SnapshotCreate,
    StoragePoolCreate,
    VolumeClone,
    VolumeCreate,
    VolumeResize,
    VolumeRollback,
)
from appliance.services import history, pools, volumes

router = APIRouter(tags=["storage"])


@router.get("/pools", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_pools(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None) -> dict[str, Any]:
    """Storage pools with their backend and stats (logical / stored bytes, dedup and
    compression ratios), as last reported by the node that serves each."""
    items, nxt = pools.list_(session, caller, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/pools/{name}", response_model=ResourcePublic, openapi_extra=access("authenticated"))
def get_pool(name: Name, session: DbSession, caller: Caller) -> dict[str, Any]:
    return pools.get(session, caller, name)


@router.get("/pools/{name}/metrics", response_model=Metrics, openapi_extra=access("authenticated"))
def pool_metrics(name: Name, session: DbSession, caller: Caller, settings: AppSettings,
                 range: MetricsRange = "hour") -> dict[str, Any]:
    """History of the pool's space: logical vs stored bytes, dedup and compression ratios."""
    return history.pool(session, caller, settings, name, range)


@router.post("/pools", status_code=201, response_model=ResourcePublic, openapi_extra=access("cluster:admin"))
def create_pool(body: StoragePoolCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """A pool on a local directory or in a Ceph pool, written by ``node``'s storage daemon."""
    return pools.create(session, caller, body.name, body.node, body.backend, body.url, body.chunk_size,
                        body.replication, settings.storage_nbd_port)


@router.delete("/pools/{name}", status_code=204, openapi_extra=access("cluster:admin"))
def delete_pool(name: Name, session: DbSession, caller: Caller) -> Response:
    pools.delete(session, caller, name)
    return Response(status_code=204)


@router.post("/volumes", status_code=202, openapi_extra=access("project:write"))
def create_volume(body: VolumeCreate, session: DbSession, caller: Caller) -> JSONResponse:
    """An empty volume (``size``), or an O(1) clone of ``source`` (an image, or a
    volume's snapshot). The task's result has ``export``, the volume's NBD URI."""
    source = body.source.model_dump(exclude_none=True) if body.source else None
    _, task = volumes.create(session, caller, body.project, body.name, body.size, body.pool, body.storage_class,
                             source, body.labels)
    return accepted(task)


add_scoped_routes(router, "/volumes", volumes.volumes)


@router.delete("/volumes/{name}", status_code=202, openapi_extra=access("project:write"))
def delete_volume(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> JSONResponse:
    """Refused (409) while a VM or container uses it or it holds an image."""
    return accepted(volumes.delete(session, caller, project, name))


@router.post("/volumes/{name}/resize", status_code=202, openapi_extra=access("project:write"))
def resize_volume(name: Name, body: VolumeResize, session: DbSession, caller: Caller,
                  project: ProjectQuery = "default") -> JSONResponse:
    """Grow, or shrink with ``force``."""
    return accepted(volumes.resize(session, caller, project, name, body.size, body.force))


@router.post("/volumes/{name}/rollback", status_code=202, openapi_extra=access("project:write"))
def rollback_volume(name: Name, body: VolumeRollback, session: DbSession, caller: Caller,
                    project: ProjectQuery = "default") -> JSONResponse:
    """Make the volume's content the snapshot's again (O(1)); refused while a running
    instance uses it."""
    return accepted(volumes.rollback(session, caller, project, name, body.snapshot))


@router.post("/volumes/{name}/clone", status_code=202, openapi_extra=access("project:write"))
def clone_volume(name: Name, body: VolumeClone, session: DbSession, caller: Caller,
                 project: ProjectQuery = "default") -> JSONResponse:
    """A new volume from a snapshot of this one (O(1)); the two diverge independently."""
    _, task = volumes.clone(session, caller, project, name, body.snapshot, body.name, body.size)
    return accepted(task)


@router.get("/volumes/{name}/snapshots", openapi_extra=access("project:read"))
def list_snapshots(name: Name, session: DbSession, caller: Caller,
                   project: ProjectQuery = "default") -> dict[str, Any]:
    return {"items": volumes.snapshot_list(session, caller, project, name)}


@router.post("/volumes/{name}/snapshots", status_code=202, openapi_extra=access("project:write"))
def create_snapshot(name: Name, body: SnapshotCreate, session: DbSession, caller: Caller,
                    project: ProjectQuery = "default") -> JSONResponse:
    """O(1) whatever the volume's size."""
    return accepted(volumes.snapshot_create(session, caller, project, name, body.name))


@router.delete("/volumes/{name}/snapshots/{snapshot}", status_code=202, openapi_extra=access("project:write"))
def delete_snapshot(name: Name, snapshot: Name, session: DbSession, caller: Caller,
                    project: Annotated[str, Query(min_length=1, max_length=63)] = "default") -> JSONResponse:
    return accepted(volumes.snapshot_delete(session, caller, project, name, snapshot))
