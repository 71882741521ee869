"""The FastAPI application: /api/v1 routes, problem+json, metrics, the console."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response

from appliance.api import headers, metrics, problems
from appliance.api.audit import AuditMiddleware
from appliance.api.routes import (
    audit,
    auth,
    cluster,
    consoles,
    events,
    groups,
    images,
    instances,
    networks,
    nodes,
    projects,
    storage,
    tasks,
    tokens,
    users,
)
from appliance.api.schemas import Problem
from appliance.controller import ControllerThread
from appliance.services.streams import StreamLimiter
from appliance.settings import Settings, get_settings
from appliance.version import __version__

API_PREFIX = "/api/v1"
ERRORS = {code: {"model": Problem, "content": {"application/problem+json": {}}}
          for code in (400, 401, 403, 404, 409, 413, 422, 429)}


def create_app(settings: Settings | None = None, *, controller: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = ControllerThread(settings) if controller else None
        if thread:
            thread.start()
        yield
        if thread:
            thread.stop()

    app = FastAPI(
        title="Cairn API", version=__version__, lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json", docs_url=None, redoc_url=None,
        description="Cairn hyperconverged appliance. Long writes answer 202 with a Location "
                    "to /api/v1/tasks/{id}; errors are application/problem+json.",
    )
    app.state.settings = settings
    app.state.streams = StreamLimiter(settings)
    registry, latency = metrics.make_registry(settings.resolved_database_url)
    app.state.registry = registry
    problems.install(app)
    api = APIRouter(prefix=API_PREFIX, responses=ERRORS)  # type: ignore[arg-type]
    routers = (audit, auth, cluster, consoles, events, groups, images, instances, networks, nodes, projects, storage,
               tasks, tokens, users)
    for module in routers:
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(cluster.root_router)
    headers.install_docs(app, f"{API_PREFIX}/docs", f"{API_PREFIX}/openapi.json")
    _mount_console(app, settings.webui_dir)
    app.add_middleware(metrics.BodyLimitMiddleware, limit=settings.max_body_bytes,
                       streaming=rf"{API_PREFIX}/images/[a-z0-9-]+/upload")
    app.add_middleware(AuditMiddleware, url=settings.resolved_database_url, prefix=API_PREFIX, uploads="/upload")
    app.add_middleware(metrics.LatencyMiddleware, histogram=latency)
    app.add_middleware(headers.SecurityHeadersMiddleware)
    return app


def _mount_console(app: FastAPI, dist: Path) -> None:
    """Serve the built console; unknown non-API paths get index.html (client routing)."""

    @app.get("/{path:path}", include_in_schema=False)
    def console(path: str) -> Response:
        if path.startswith("api/"):
            from appliance.errors import NotFound

            raise NotFound("no such API path: see /api/v1/openapi.json")
        candidate = (dist / path).resolve()
        if path and candidate.is_file() and dist.resolve() in candidate.parents:
            return FileResponse(candidate)
        index = dist / "index.html"
        if index.is_file():
            return FileResponse(index, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(
            "<!doctype html><title>Cairn</title><h1>Cairn</h1><p>The console is not built: run "
            "<code>./bootstrap.sh up</code>. The API is at <a href='/api/v1/docs'>/api/v1/docs</a>.</p>"
        )
