"""Networks, subnets, ports, security groups, routers and floating IPs (project-scoped)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.api.deps import AppSettings, Caller, DbSession, IfMatch, access
from appliance.api.routes.scoped import ProjectQuery, add_scoped_routes
from appliance.api.schemas import (
    FloatingIpAssociate,
    FloatingIpCreate,
    Name,
    NetworkCreate,
    PortCreate,
    PortForwardCreate,
    Reservation,
    ResourcePublic,
    RouterCreate,
    RouterInterfaceRef,
    RuleCreate,
    SecurityGroupCreate,
    SubnetCreate,
)
from appliance.services import networks as svc
from appliance.services import routers as rsvc

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
def create_subnet(body: SubnetCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    return svc.create_subnet(session, caller, body.project, body.name, body.spec.model_dump(), settings)


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


# --- routers and floating IPs: the specific routes first, so the auth walk reaches them
# before it deletes its router ------------------------------------------------------------

@router.post("/routers", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_router(body: RouterCreate, session: DbSession, caller: Caller, settings: AppSettings) -> dict[str, Any]:
    """Gateway of its networks' subnets; with spec.external (default) an address of the
    external pool that their egress leaves as."""
    return rsvc.create_router(session, caller, settings, body.project, body.name, body.spec.model_dump())


@router.post("/routers/{name}/port-forwards", status_code=201, response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def add_port_forward(name: Name, body: PortForwardCreate, session: DbSession, caller: Caller,
                     project: ProjectQuery = "default") -> dict[str, Any]:
    """external_port of the router's external address → a port (or address) of its networks."""
    forward = body.model_dump()
    forward["internal_port"] = forward["internal_port"] or forward["external_port"]
    return rsvc.add_port_forward(session, caller, project, name, forward)


@router.delete("/routers/{name}/port-forwards/{forward_id}", response_model=ResourcePublic,
               openapi_extra=access("project:write"))
def remove_port_forward(name: Name, forward_id: str, session: DbSession, caller: Caller,
                        project: ProjectQuery = "default") -> dict[str, Any]:
    return rsvc.remove_port_forward(session, caller, project, name, forward_id)


@router.post("/routers/{name}/add-interface", response_model=ResourcePublic, openapi_extra=access("project:write"))
def add_interface(name: Name, body: RouterInterfaceRef, session: DbSession, caller: Caller, settings: AppSettings,
                  project: ProjectQuery = "default") -> dict[str, Any]:
    """Attach a subnet, or every IPv4 subnet of a network (no two routed subnets overlap)."""
    return rsvc.add_interface(session, caller, settings, project, name, body.network, body.subnet)


@router.post("/routers/{name}/remove-interface", response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def remove_interface(name: Name, body: RouterInterfaceRef, session: DbSession, caller: Caller,
                     project: ProjectQuery = "default") -> dict[str, Any]:
    return rsvc.remove_interface(session, caller, project, name, body.network, body.subnet)


add_scoped_routes(router, "/routers", rsvc.routers, get=rsvc.get_router, delete=rsvc.delete_router)


@router.post("/floating-ips", status_code=201, response_model=ResourcePublic, openapi_extra=access("project:write"))
def create_floating_ip(body: FloatingIpCreate, session: DbSession, caller: Caller,
                       settings: AppSettings) -> dict[str, Any]:
    """An address of the external pool; with spec.port associated at once."""
    return rsvc.create_floating_ip(session, caller, settings, body.project, body.name, body.spec.model_dump())


@router.post("/floating-ips/{name}/associate", response_model=ResourcePublic, openapi_extra=access("project:write"))
def associate_floating_ip(name: Name, body: FloatingIpAssociate, session: DbSession, caller: Caller,
                          project: ProjectQuery = "default") -> dict[str, Any]:
    """Reach the port through this address (its network needs a router with an external address)."""
    return rsvc.associate(session, caller, project, name, body.port)


@router.post("/floating-ips/{name}/disassociate", response_model=ResourcePublic,
             openapi_extra=access("project:write"))
def disassociate_floating_ip(name: Name, session: DbSession, caller: Caller,
                             project: ProjectQuery = "default") -> dict[str, Any]:
    return rsvc.disassociate(session, caller, project, name)


add_scoped_routes(router, "/floating-ips", rsvc.floating_ips, delete=rsvc.delete_floating_ip)
