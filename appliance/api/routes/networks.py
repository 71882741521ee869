"""Networks, subnets, ports and security groups (project-scoped)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.api.deps import AppSettings, Caller, DbSession, IfMatch, access
from appliance.api.routes.scoped import ProjectQuery, add_scoped_routes
from appliance.api.schemas import (
    Name,
    NetworkCreate,
    PortCreate,
    Reservation,
    ResourcePublic,
    RuleCreate,
    SecurityGroupCreate,
    SubnetCreate,
)
from appliance.services import networks as svc

router = APIRouter(tags=["networks"])
add_scoped_routes(router, "/networks", svc.networks, get=svc.get_network, delete=svc.delete_network)
add_scoped_routes(router, "/subnets", svc.subnets, delete=svc.delete_subnet)
add_scoped_routes(router, "/ports", svc.ports, delete=svc.delete_port)
add_scoped_routes(router, "/security-groups", svc.secgroups, delete=svc.delete_secgroup)


@router.post("/networks", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_network(body: NetworkCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """A VXLAN segment; with spec.cidr its first subnet too."""
    return svc.create_network(session, caller, settings, body.project, body.name, body.spec.model_dump())


@router.post("/subnets", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_subnet(body: SubnetCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return svc.create_subnet(session, caller, body.project, body.name, body.spec.model_dump())


@router.post("/subnets/{name}/reservations", status_code=201, openapi_extra=access("project:write"))
def reserve_address(name: Name, body: Reservation, session: DbSession, caller: Caller,
                    project: ProjectQuery = "default") -> dict[str, Any]:
    """Keep an address out of automatic allocation."""
    return svc.reserve(session, caller, project, name, body.address)


@router.post("/ports", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_port(body: PortCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    """MAC + an address from each subnet (or spec.fixed_ips) + security groups."""
    return svc.create_port(session, caller, body.project, body.name, body.spec.model_dump())


@router.post("/security-groups", status_code=201, response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def create_secgroup(body: SecurityGroupCreate, session: DbSession, caller: Caller) -> dict[str, Any]:
    return svc.create_secgroup(session, caller, body.project, body.name, body.spec.description)


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
