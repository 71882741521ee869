"""Images that VMs and containers boot from."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import ImportTestGuest, Limit, Name, ResourceList, ResourcePublic
from appliance.services import images

router = APIRouter(prefix="/images", tags=["images"])
ProjectQuery = Annotated[str, Query(min_length=1, max_length=63, description="project name")]


@router.get("", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_images(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                project: Annotated[str | None, Query(max_length=63)] = None) -> dict[str, Any]:
    items, nxt = images.images.list_(session, caller, project, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.post("/import-test-guest", status_code=202, openapi_extra=access("project:write"))
def import_test_guest(session: DbSession, caller: Caller, settings: AppSettings,
                      body: ImportTestGuest | None = None) -> JSONResponse:
    """Make the tiny test guest ('tiny-guest', a VM image) and 'busybox' (a container
    image) available, built from this node's Debian packages: no download needed."""
    project = (body or ImportTestGuest()).project
    return accepted(images.import_test_guest(session, caller, project, settings.node_name))


@router.get("/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_image(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return images.images.get(session, caller, project, name)


@router.delete("/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_image(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    images.delete(session, caller, project, name)
    return Response(status_code=204)
