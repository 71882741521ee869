"""Nodes: inventory, readiness, cordon (spec.schedulable), benchmark, removal."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from appliance.api.deps import AppSettings, Caller, DbSession, IfMatch, access
from appliance.api.routes.tasks import accepted
from appliance.api.schemas import (
    BenchmarkRequest,
    Limit,
    Metrics,
    MetricsRange,
    Name,
    NodeUpdate,
    ResourceList,
    ResourcePublic,
)
from appliance.services import history, maintenance, nodes

router = APIRouter(prefix="/nodes", tags=["nodes"])


@router.get("", response_model=ResourceList, openapi_extra=access("cluster:read"))
def list_nodes(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
               phase: Literal["Ready", "NotReady", "Fenced", "Maintenance"] | None = None) -> dict[str, Any]:
    items, nxt = nodes.list_(session, caller, limit, cursor, phase)
    return {"items": items, "next_cursor": nxt}


@router.get("/{name}", response_model=ResourcePublic, openapi_extra=access("cluster:read"))
def get_node(name: Name, session: DbSession, caller: Caller, response: Response) -> dict[str, Any]:
    node = nodes.get(session, caller, name)
    response.headers["ETag"] = f'"{node["generation"]}"'
    return node


@router.patch("/{name}", response_model=ResourcePublic, openapi_extra=access("cluster:write"))
def update_node(name: Name, body: NodeUpdate, session: DbSession, caller: Caller,
                if_match: IfMatch = None) -> dict[str, Any]:
    """Cordon / uncordon (spec.schedulable) and labels. Send If-Match: <generation>."""
    return nodes.update_spec(session, caller, name, body.spec.model_dump(exclude_none=True), if_match)


@router.delete("/{name}", status_code=204, openapi_extra=access("cluster:admin"))
def delete_node(name: Name, session: DbSession, caller: Caller) -> Response:
    """Remove a NotReady node from the cluster."""
    nodes.delete(session, caller, name)
    return Response(status_code=204)


@router.post("/{name}/benchmark", status_code=202, openapi_extra=access("cluster:write"))
def benchmark_node(name: Name, session: DbSession, caller: Caller,
                   body: BenchmarkRequest | None = None) -> JSONResponse:
    """pveperf-style benchmark (CPU, fsyncs/s, write rate) as a task with progress."""
    return accepted(nodes.benchmark(session, caller, name, (body or BenchmarkRequest()).seconds))


@router.post("/{name}/drain", status_code=202, openapi_extra=access("cluster:write"))
def drain_node(name: Name, session: DbSession, caller: Caller) -> JSONResponse:
    """Maintenance: VMs live-migrate and containers restart elsewhere, then the node takes
    no new work. Refused (nothing changed) when the other nodes lack the room."""
    return accepted(maintenance.drain(session, caller, name))


@router.post("/{name}/undrain", response_model=ResourcePublic, openapi_extra=access("cluster:write"))
def undrain_node(name: Name, session: DbSession, caller: Caller) -> dict[str, Any]:
    """End maintenance: the node takes work again."""
    return maintenance.undrain(session, caller, name)


@router.post("/{name}/inventory", status_code=202, openapi_extra=access("cluster:write"))
def refresh_inventory(name: Name, session: DbSession, caller: Caller) -> JSONResponse:
    """Re-read the node's hardware inventory."""
    return accepted(nodes.refresh_inventory(session, caller, name))


@router.get("/{name}/metrics", response_model=Metrics, openapi_extra=access("cluster:read"))
def node_metrics(name: Name, session: DbSession, caller: Caller, settings: AppSettings,
                 range: MetricsRange = "hour") -> dict[str, Any]:
    """History of the node: CPU (percent of its CPUs), memory, network in/out, disk
    read/write bytes and operations per second, over the last hour, day or week. Any
    member answers for every node."""
    return history.node(session, caller, settings, name, range)
