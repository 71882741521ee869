"""Networks, subnets, ports and security groups (project-scoped)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from appliance.api.deps import AppSettings, Caller, DbSession, IfMatch, access
from appliance.api.schemas import (
    Limit,
    Name,
    NetworkCreate,
    PortCreate,
    Reservation,
    ResourceList,
    ResourcePublic,
    RuleCreate,
    SecurityGroupCreate,
    SubnetCreate,
)
from appliance.services import networks as svc

router = APIRouter(tags=["networks"])
ProjectQuery = Annotated[str, Query(min_length=1, max_length=63, description="project name")]
ProjectFilter = Annotated[str | None, Query(max_length=63, description="only this project")]


def _listing(kind: Any, session: Any, caller: Any, project: str | None, limit: int,
             cursor: str | None) -> dict[str, Any]:
    items, nxt = kind.list_(session, caller, project, limit, cursor)
    return {"items": items, "next_cursor": nxt}


@router.get("/networks", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_networks(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                  project: ProjectFilter = None) -> dict[str, Any]:
    return _listing(svc.networks, session, caller, project, limit, cursor)


@router.post("/networks", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_network(body: NetworkCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """A VXLAN segment; with spec.cidr its first subnet too."""
    return svc.create_network(session, caller, settings, body.project, body.name, body.spec.model_dump())


@router.get("/networks/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_network(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return svc.get_network(session, caller, project, name)


@router.delete("/networks/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_network(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    svc.delete_network(session, caller, project, name)
    return Response(status_code=204)


@router.get("/subnets", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_subnets(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                 project: ProjectFilter = None) -> dict[str, Any]:
    return _listing(svc.subnets, session, caller, project, limit, cursor)


@router.post("/subnets", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_subnet(body: SubnetCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return svc.create_subnet(session, caller, body.project, body.name, body.spec.model_dump())


@router.get("/subnets/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_subnet(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return svc.subnets.get(session, caller, project, name)


@router.delete("/subnets/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_subnet(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    svc.delete_subnet(session, caller, project, name)
    return Response(status_code=204)


@router.post("/subnets/{name}/reservations", status_code=201, openapi_extra=access("project:write"))
def reserve_address(name: Name, body: Reservation, session: DbSession, caller: Caller,
                    project: ProjectQuery = "default") -> dict[str, Any]:
    """Keep an address out of automatic allocation."""
    return svc.reserve(session, caller, project, name, body.address)


@router.get("/ports", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_ports(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
               project: ProjectFilter = None) -> dict[str, Any]:
    return _listing(svc.ports, session, caller, project, limit, cursor)


@router.post("/ports", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_port(body: PortCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    """MAC + an address from each subnet (or spec.fixed_ips) + security groups."""
    return svc.create_port(session, caller, body.project, body.name, body.spec.model_dump())


@router.get("/ports/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_port(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return svc.ports.get(session, caller, project, name)


@router.delete("/ports/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_port(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    svc.delete_port(session, caller, project, name)
    return Response(status_code=204)


@router.get("/security-groups", response_model=ResourceList, openapi_extra=access("authenticated"))
def list_secgroups(session: DbSession, caller: Caller, limit: Limit = 100, cursor: str | None = None,
                   project: ProjectFilter = None) -> dict[str, Any]:
    return _listing(svc.secgroups, session, caller, project, limit, cursor)


@router.post("/security-groups", status_code=201, response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def create_secgroup(body: SecurityGroupCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return svc.create_secgroup(session, caller, body.project, body.name, body.spec.description)


@router.get("/security-groups/{name}", response_model=ResourcePublic, openapi_extra=access("project:read"))
def get_secgroup(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return svc.secgroups.get(session, caller, project, name)


@router.delete("/security-groups/{name}", status_code=204, openapi_extra=access("project:write"))
def delete_secgroup(name: Name, session: DbSession, caller: Caller, project: ProjectQuery = "default") -> Response:
    svc.delete_secgroup(session, caller, project, name)
    return Response(status_code=204)


@router.post("/security-groups/{name}/rules", status_code=201, response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def add_rule(name: Name, body: RuleCreate, session: DbSession, caller: Caller, if_match: IfMatch = None,
             project: ProjectQuery = "default") -> dict[str, Any]:
    """Add a rule; default deny inbound, stateful (replies to allowed traffic pass)."""
    return svc.add_rule(session, caller, project, name, body.model_dump(exclude_none=True), if_match)


@router.delete("/security-groups/{name}/rules/{rule_id}", response_model=ResourcePublic,
               openapi_extra=access("project:write"))
def remove_rule(name: Name, rule_id: str, session: DbSession,
                caller: Caller, project: ProjectQuery = "default") -> dict[str, Any]:
    return svc.remove_rule(session, caller, project, name, rule_id)
