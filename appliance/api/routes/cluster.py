"""Cluster-wide views: health (public), status, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from appliance.api.deps import AppSettings, Caller, DbSession, access
from appliance.api.schemas import ClusterStatus, Health
from appliance.services import cluster
from appliance.version import __version__

router = APIRouter(tags=["cluster"])
root_router = APIRouter(tags=["cluster"])  # mounted at / (Prometheus convention)


@router.get("/health", response_model=Health, openapi_extra=access("public"))
def health(session: DbSession) -> dict[str, Any]:
    """Liveness + database reachability. No authentication."""
    cluster.ping(session)
    return {"status": "ok", "version": __version__}


@router.get("/cluster/status", response_model=ClusterStatus, openapi_extra=access("authenticated"))
def status(session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    return cluster.status(session, caller, settings.node_name)


@root_router.get("/metrics", openapi_extra=access("cluster:read"),
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, caller: Caller) -> Response:
    """Prometheus text format (request latency, task counts, node heartbeats)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    caller.require_cluster("read")
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
