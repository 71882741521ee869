"""Cluster-wide views: health (public), status, Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from appliance.api import metrics as api_metrics
from appliance.api.deps import AppSettings, Caller, DbSession, access, authenticate
from appliance.api.schemas import (
    ClusterStatus,
    ClusterView,
    Health,
    JoinRequest,
    JoinToken,
    JoinTokenCreate,
    Name,
)
from appliance.services import cluster
from appliance.timeseries import store
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


@router.get("/cluster", response_model=ClusterView, openapi_extra=access("cluster:read"))
def view(session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """Members and their roles (etcd leader, database primary, Redis master, Ceph monitors),
    quorum and Ceph health, asked of each engine."""
    return cluster.view(session, caller, settings)


@router.get("/cluster/ca", response_class=PlainTextResponse, openapi_extra=access("public"),
            responses={200: {"content": {"text/plain": {}}}})
def ca(settings: AppSettings) -> str:
    """The cluster CA certificate (PEM). A joining node checks it against its token's fingerprint."""
    return cluster.ca_pem(settings)


@router.post("/cluster/tokens", response_model=JoinToken, status_code=201, openapi_extra=access("cluster:admin"))
def create_token(body: JoinTokenCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """A short-lived, single-use join token carrying the CA fingerprint."""
    return cluster.create_join_token(session, caller, settings, body.ttl_seconds)


@router.get("/cluster/tokens", openapi_extra=access("cluster:admin"))
def list_tokens(session: DbSession, caller: Caller) -> list[dict[str, Any]]:
    """Join tokens (without their secrets): expiry, and which node used each."""
    return cluster.list_join_tokens(session, caller)


@router.post("/cluster/join", openapi_extra=access("public"))
def join(body: JoinRequest, session: DbSession, settings: AppSettings) -> dict[str, Any]:
    """A new node joins with a token: it gets its signed certificate, the cluster's keys and
    its place in etcd, PostgreSQL, Redis and Ceph. Refusals change nothing."""
    return cluster.join(session, settings, body.token, body.name, body.address, body.csr, body.osds)


@router.delete("/cluster/members/{name}", openapi_extra=access("cluster:admin"))
def remove_member(name: Name, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """Take a node that is down out of the cluster for good (etcd, Ceph monitor and OSDs,
    Redis Sentinel, the node list)."""
    return cluster.remove(session, caller, settings, name)


@root_router.get("/metrics", openapi_extra=access("cluster:read"),
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, session: DbSession, settings: AppSettings) -> Response:
    """Prometheus text format: request latency, task counts, node heartbeats, pools' space,
    and this node's and its instances' latest samples (what the graphs are made of). The
    members' Prometheus servers scrape it with the cluster's scrape token."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if not store.is_scrape_token(settings, request.headers.get("authorization")):
        authenticate(request, session).require_cluster("read")
    body = generate_latest(request.app.state.registry)
    body += api_metrics.agent_samples(settings.metrics_file, settings.metrics_interval)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
