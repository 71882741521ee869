"""Images that VMs and containers boot from."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from appliance.api.deps import AppSettings, Caller, DbSession, StreamingCaller, access
from appliance.api.routes.scoped import ProjectQuery, add_scoped_routes
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import ImportTestGuest, Name
from appliance.errors import InvalidInput, PayloadTooLarge
from appliance.services import images

router = APIRouter(tags=["images"])


@router.post("/images/import-test-guest", status_code=202, openapi_extra=access("project:write"))
def import_test_guest(session: DbSession, caller: Caller, settings: AppSettings,
                      body: ImportTestGuest | None = None) -> JSONResponse:
    """Make the tiny test guest ('tiny-guest', a VM image) and 'busybox' (a container
    image) available, built from this node's Debian packages: no download needed."""
    project = (body or ImportTestGuest()).project
    return accepted(images.import_test_guest(session, caller, project, settings.node_name))


UPLOAD_DOC = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.put("/images/{name}/upload", status_code=202, openapi_extra={**access("project:write"), **UPLOAD_DOC})
async def upload_image(name: Name, request: Request, caller: StreamingCaller, settings: AppSettings,
                       project: ProjectQuery = "default",
                       format: Annotated[Literal["raw", "qcow2"] | None, Query(description="default: detect")] = None,
                       pool: Annotated[Name | None, Query(description="default: 'default'")] = None,
                       storage_class: Annotated[Literal["dedup", "rbd"], Query(
                           alias="class", description="class of the image's volume (and of the VMs' root "
                           "volumes cloned from it); rbd needs a Ceph pool")] = "dedup") -> JSONResponse:
    """Upload a raw or qcow2 disk image (the request body, streamed to disk). A file
    that is not a sound image is refused (422) and nothing is kept; otherwise the
    import task copies it into a volume and snapshots it, and new VMs clone it in O(1)."""
    db = settings.resolved_database_url
    await run_in_threadpool(images.upload_check, db, caller, project, name, pool, storage_class)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = settings.uploads_dir / f"{uuid.uuid4().hex}.upload"
    size = 0
    try:
        with path.open("wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(f"images are limited to {settings.max_upload_bytes} bytes")
                await run_in_threadpool(f.write, chunk)
        if size == 0:
            raise InvalidInput("the request body is empty: send the image file as application/octet-stream")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return accepted(await run_in_threadpool(images.upload_finish, db, caller, project, name, path, format, pool,
                                            storage_class))


# after /images/import-test-guest, so that path is not read as an image name
add_scoped_routes(router, "/images", images.images, delete=images.delete)
