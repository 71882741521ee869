"""Images that VMs and containers boot from."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.routes.scoped import add_scoped_routes
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import ImportTestGuest
from appliance.services import images

router = APIRouter(tags=["images"])


@router.post("/images/import-test-guest", status_code=202, openapi_extra=access("project:write"))
def import_test_guest(session: DbSession, caller: Caller, settings: AppSettings,
                      body: ImportTestGuest | None = None) -> JSONResponse:
    """Make the tiny test guest ('tiny-guest', a VM image) and 'busybox' (a container
    image) available, built from this node's Debian packages: no download needed."""
    project = (body or ImportTestGuest()).project
    return accepted(images.import_test_guest(session, caller, project, settings.node_name))


# after /images/import-test-guest, so that path is not read as an image name
add_scoped_routes(router, "/images", images.images, delete=images.delete)
