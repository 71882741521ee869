"""Routers and floating IPs (the control-plane side of DESIGN.md's "a router/NAT gives
a network egress through the node's uplink; a floating IP or port forward gives
ingress"). A router holds subnets (their gateway address lives on the router's node),
an external address from CAIRN_EXTERNAL_POOL that its networks' egress leaves as, and
port forwards on that address; a floating IP is another address of the pool that
reaches one port. The agent on the router's node turns them into nftables rules
with ``network.router``.

Routers share the node's routing table (per-router namespaces are not built), so no
two routed subnets may overlap, whichever project they are in."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.db.models import ExternalAddress, FloatingIp, Port, Router, RouterInterface, Subnet
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import networks, quotas
from appliance.services.auth import project_by_name
from appliance.services.principal import Principal
from appliance.services.resources import set_condition
from appliance.services.scoped import ScopedKind
from appliance.settings import Settings

routers: ScopedKind[Router] = ScopedKind(Router, "router", "`cairn get routers` lists them",
                                         lambda r: {"external_address": r.external_address})
floating_ips: ScopedKind[FloatingIp] = ScopedKind(
    FloatingIp, "floating-ip", "`cairn get floating-ips` lists them",
    lambda f: {"address": f.address, "associated": f.port_id is not None,
               "fixed_address": f.fixed_address if f.port_id else None,
               "router": (f.status or {}).get("router") if f.port_id else None})


# --- the external pool ------------------------------------------------------------------------

def _pool(settings: Settings) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    try:
        bounds = settings.external_pool_bounds
    except ValueError as exc:
        raise Conflict(f"the external network settings are invalid ({exc}): fix CAIRN_EXTERNAL_CIDR / "
                       "CAIRN_EXTERNAL_POOL")
    if bounds is None:
        raise Conflict("no external network is configured: set CAIRN_EXTERNAL_CIDR (and CAIRN_EXTERNAL_POOL) "
                       "for the API and the agents, or create the router with external: false")
    first, last = ipaddress.IPv4Address(bounds[0]), ipaddress.IPv4Address(bounds[1])
    if first > last:
        raise Conflict(f"CAIRN_EXTERNAL_POOL {first}-{last} ends before it starts")
    return first, last


def _allocate_external(session: Session, settings: Settings, *, router_id: str | None = None,
                       floating_ip_id: str | None = None) -> ExternalAddress:
    """The first free address of the pool; the unique constraint settles races (a loser
    takes the next one)."""
    first, last = _pool(settings)
    used = set(session.scalars(select(ExternalAddress.address)))
    for n in range(int(first), int(last) + 1):
        text = str(ipaddress.IPv4Address(n))
        if text in used:
            continue
        row = ExternalAddress(address=text, router_id=router_id, floating_ip_id=floating_ip_id)
        try:
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            used.add(text)
    raise Conflict(f"the external pool {first}-{last} is exhausted ({len(used)} addresses in use): "
                   "delete floating IPs or routers, or widen CAIRN_EXTERNAL_POOL")


# --- routers ---------------------------------------------------------------------------------

def router_public(row: Router, project: str) -> dict[str, Any]:
    return routers.public(row, project)


def _router_subnets(session: Session, router_id: str) -> list[Subnet]:
    return list(session.scalars(select(Subnet).join(RouterInterface, RouterInterface.subnet_id == Subnet.id)
                                .where(RouterInterface.router_id == router_id).order_by(Subnet.name)))


def _subnets_for(session: Session, principal: Principal, project: str, network: str | None,
                 subnet: str | None) -> list[Subnet]:
    """The IPv4 subnets a request names: one subnet, or every IPv4 subnet of a network."""
    if bool(network) == bool(subnet):
        raise InvalidInput("name either a network or a subnet")
    if subnet:
        row, _ = networks.subnets.row(session, principal, project, subnet)
        if ipaddress.ip_network(row.cidr).version != 4:
            raise InvalidInput(f"subnet '{subnet}' is IPv6: routers route IPv4 subnets (with NAT)")
        return [row]
    net, _ = networks.networks.row(session, principal, project, network or "")
    subs = [s for s in session.scalars(select(Subnet).where(Subnet.network_id == net.id).order_by(Subnet.name))
            if ipaddress.ip_network(s.cidr).version == 4]
    if not subs:
        raise InvalidInput(f"network '{network}' has no IPv4 subnet to route: add one first "
                           "(`cairn network subnet-add`)")
    return subs


def _attach(session: Session, settings: Settings, router: Router, subnet: Subnet, network: str) -> dict[str, Any]:
    owner = session.scalar(select(Router).join(RouterInterface, RouterInterface.router_id == Router.id)
                           .where(RouterInterface.subnet_id == subnet.id))
    if owner is not None:
        where = "this router" if owner.id == router.id else f"router '{owner.name}'"
        raise Conflict(f"subnet '{subnet.name}' is already attached to {where}: a subnet has one router")
    net = ipaddress.ip_network(subnet.cidr)
    if settings.external_cidr:
        try:
            external = ipaddress.ip_network(settings.external_cidr, strict=False)
        except ValueError as exc:
            raise Conflict(f"CAIRN_EXTERNAL_CIDR is invalid ({exc}): fix the API's settings")
        if net.overlaps(external):
            raise Conflict(f"{net} overlaps the external network {external}: pick another range")
    routed = session.execute(select(Subnet, RouterInterface.router_id)
                             .join(RouterInterface, RouterInterface.subnet_id == Subnet.id)).all()
    for other, router_id in routed:
        if net.overlaps(ipaddress.ip_network(other.cidr)):
            if router_id == router.id:
                raise Conflict(f"{net} overlaps {other.cidr} (subnet '{other.name}'), already attached to this "
                               "router: a router cannot tell them apart")
            if other.project_id == router.project_id:
                raise Conflict(f"{net} overlaps {other.cidr} (subnet '{other.name}'), which another router "
                               "routes: routers share the node's routing table, pick a disjoint range")
            raise Conflict(f"{net} overlaps a subnet that another project already routes: routers share "
                           "the node's routing table, pick a disjoint range")
    session.add(RouterInterface(router_id=router.id, subnet_id=subnet.id))
    session.flush()  # a concurrent attach of the same subnet raises IntegrityError: 409
    return {"network": network, "subnet": subnet.name, "cidr": subnet.cidr, "gateway": subnet.spec["gateway"]}


def _network_name(subnet: Subnet) -> str:
    return str(subnet.spec.get("network") or "")


def create_router(session: Session, principal: Principal, settings: Settings, project: str, name: str,
                  spec: dict[str, Any]) -> dict[str, Any]:
    """A router with its external address (unless ``external`` is false) and the
    subnets of ``networks`` / ``subnets`` attached."""
    wanted: list[Subnet] = []
    for net in spec.get("networks") or []:
        wanted += _subnets_for(session, principal, project, net, None)
    for sub in spec.get("subnets") or []:
        wanted += _subnets_for(session, principal, project, None, sub)
    external = spec.get("external", True)
    quotas.charge(session, project_by_name(session, principal, project, "write").id, settings, routers=1,
                  external_addresses=1 if external else 0)
    row = routers.create(session, principal, project, name,
                         {"external": external, "description": spec.get("description", ""),
                          "interfaces": [], "port_forwards": []},
                         {"phase": "Pending"})
    if external:
        row.external_address = _allocate_external(session, settings, router_id=row.id).address
    interfaces = [_attach(session, settings, row, s, _network_name(s))
                  for s in {s.id: s for s in wanted}.values()]
    row.spec = {**row.spec, "interfaces": interfaces}
    routers.emit(session, row, project, "updated")
    return router_public(row, project)


def get_router(session: Session, principal: Principal, project: str, name: str) -> dict[str, Any]:
    row, proj = routers.row(session, principal, project, name)
    return router_public(row, proj.name)


def delete_router(session: Session, principal: Principal, project: str, name: str) -> None:
    row, _ = routers.row(session, principal, project, name, "write")
    fips = list(session.scalars(select(FloatingIp.name).where(FloatingIp.router_id == row.id,
                                                              FloatingIp.port_id.is_not(None))))
    if fips:
        raise Conflict(f"router '{name}' still carries floating IP(s) {', '.join(sorted(fips)[:5])}: "
                       "disassociate them first (`cairn floating-ip disassociate`)")
    routers.delete(session, principal, project, name)


def add_interface(session: Session, principal: Principal, settings: Settings, project: str, name: str,
                  network: str | None, subnet: str | None) -> dict[str, Any]:
    row, _ = routers.row(session, principal, project, name, "write")
    added = [_attach(session, settings, row, s, _network_name(s))
             for s in _subnets_for(session, principal, project, network, subnet)]
    updated, _ = routers.update_spec(session, principal, project, name,
                                     {"interfaces": [*row.spec.get("interfaces", []), *added]}, None)
    return router_public(updated, project)


def remove_interface(session: Session, principal: Principal, project: str, name: str,
                     network: str | None, subnet: str | None) -> dict[str, Any]:
    row, _ = routers.row(session, principal, project, name, "write")
    attached = {s.id: s for s in _router_subnets(session, row.id)}
    gone = [s for s in _subnets_for(session, principal, project, network, subnet) if s.id in attached]
    if not gone:
        raise NotFound(f"router '{name}' has no interface on {network or subnet}: "
                       f"`cairn router get {name}` lists its interfaces")
    nets = [ipaddress.ip_network(s.cidr) for s in gone]
    used = [f"port forward {pf['id']} ({pf['internal_address']})" for pf in row.spec.get("port_forwards", [])
            if any(ipaddress.ip_address(pf["internal_address"]) in n for n in nets)]
    used += [f"floating IP '{f.name}' ({f.fixed_address})" for f in session.scalars(
        select(FloatingIp).where(FloatingIp.router_id == row.id, FloatingIp.port_id.is_not(None)))
        if f.fixed_address and any(ipaddress.ip_address(f.fixed_address) in n for n in nets)]
    if used:
        raise Conflict(f"{', '.join(used[:5])} still reach {network or subnet} through router '{name}': "
                       "remove them first")
    for s in gone:
        iface = session.scalar(select(RouterInterface).where(RouterInterface.subnet_id == s.id))
        session.delete(iface)
    names = {s.name for s in gone}
    updated, _ = routers.update_spec(
        session, principal, project, name,
        {"interfaces": [i for i in row.spec.get("interfaces", []) if i["subnet"] not in names]}, None)
    return router_public(updated, project)


def _port_v4(session: Session, port: Port, subnets: list[Subnet]) -> str | None:
    """The port's IPv4 address inside one of ``subnets``."""
    nets = [ipaddress.ip_network(s.cidr) for s in subnets]
    for ip in (port.status or {}).get("ips", []):
        addr = ipaddress.ip_address(ip["address"])
        if addr.version == 4 and any(addr in n for n in nets):
            return str(addr)
    return None


def add_port_forward(session: Session, principal: Principal, project: str, name: str,
                     forward: dict[str, Any]) -> dict[str, Any]:
    """``protocol`` ``external_port`` on the router's external address goes to
    ``internal_port`` of ``port`` (a port name) or ``internal_address``."""
    row, _ = routers.row(session, principal, project, name, "write")
    if not row.external_address:
        raise Conflict(f"router '{name}' has no external address (created with external: false): "
                       "port forwards need one")
    subnets = _router_subnets(session, row.id)
    if bool(forward.get("port")) == bool(forward.get("internal_address")):
        raise InvalidInput("name the target: either port or internal_address")
    if forward.get("port"):
        port, _ = networks.ports.row(session, principal, project, forward["port"])
        address = _port_v4(session, port, subnets)
        if address is None:
            raise InvalidInput(f"port '{port.name}' has no IPv4 address in the networks of router '{name}': "
                               "attach its network first (`cairn router add-network`)")
    else:
        try:
            addr = ipaddress.ip_address(forward["internal_address"])
        except ValueError:
            raise InvalidInput(f"internal_address '{forward['internal_address']}' is not an IP address")
        if not any(addr in ipaddress.ip_network(s.cidr) for s in subnets):
            routed = ", ".join(s.cidr for s in subnets) or "none"
            raise InvalidInput(f"{addr} is not in the networks of router '{name}' (routed: {routed})")
        address = str(addr)
    for pf in row.spec.get("port_forwards", []):
        if pf["protocol"] == forward["protocol"] and pf["external_port"] == forward["external_port"]:
            raise Conflict(f"{forward['protocol']} port {forward['external_port']} of {row.external_address} "
                           f"already forwards to {pf['internal_address']}:{pf['internal_port']} "
                           f"(forward {pf['id']})")
    entry = {"id": uuid.uuid4().hex[:8], "protocol": forward["protocol"],
             "external_port": forward["external_port"], "internal_address": address,
             "internal_port": forward["internal_port"], "port": forward.get("port")}
    updated, _ = routers.update_spec(session, principal, project, name,
                                     {"port_forwards": [*row.spec.get("port_forwards", []), entry]}, None)
    return router_public(updated, project)


def remove_port_forward(session: Session, principal: Principal, project: str, name: str,
                        forward_id: str) -> dict[str, Any]:
    row, _ = routers.row(session, principal, project, name, "write")
    kept = [pf for pf in row.spec.get("port_forwards", []) if pf["id"] != forward_id]
    if len(kept) == len(row.spec.get("port_forwards", [])):
        raise NotFound(f"router '{name}' has no port forward {forward_id}: `cairn router get {name}` lists them")
    updated, _ = routers.update_spec(session, principal, project, name, {"port_forwards": kept}, None)
    return router_public(updated, project)


def record_status(session: Session, row: Router, node: str | None, ready: bool, message: str) -> bool:
    """The agent of the router's node reports where it lives and whether it is applied;
    writes (and emits an event) only when something changed."""
    phase = "Active" if ready else ("Pending" if node is None else "Error")

    def observed(live: Router) -> None:
        set_condition(live, "Ready", ready, phase, message)
        if ready:
            live.observed_generation = live.generation

    return routers.write_status(session, row, {"node": node, "phase": phase}, change=observed)


# --- floating IPs ----------------------------------------------------------------------------

def create_floating_ip(session: Session, principal: Principal, settings: Settings, project: str, name: str,
                       spec: dict[str, Any]) -> dict[str, Any]:
    """An address from the external pool; with ``spec.port`` associated at once."""
    quotas.charge(session, project_by_name(session, principal, project, "write").id, settings, floating_ips=1,
                  external_addresses=1)
    allocation = _allocate_external(session, settings)
    row = floating_ips.create(session, principal, project, name, {"port": None,
                                                                  "description": spec.get("description", "")},
                              address=allocation.address)
    allocation.floating_ip_id = row.id
    if spec.get("port"):
        return associate(session, principal, project, name, spec["port"])
    return floating_ips.public(row, project)


def associate(session: Session, principal: Principal, project: str, name: str, port_name: str) -> dict[str, Any]:
    """Reach ``port_name`` through this floating IP (re-associating moves it)."""
    row, _ = floating_ips.row(session, principal, project, name, "write")
    port, _ = networks.ports.row(session, principal, project, port_name)
    taken = session.scalar(select(FloatingIp).where(FloatingIp.port_id == port.id, FloatingIp.id != row.id))
    if taken is not None:
        raise Conflict(f"port '{port_name}' already has floating IP '{taken.name}' ({taken.address}): "
                       "one per port")
    found = None
    for sub in session.scalars(select(Subnet).where(Subnet.network_id == port.network_id).order_by(Subnet.name)):
        router = session.scalar(select(Router).join(RouterInterface, RouterInterface.router_id == Router.id)
                                .where(RouterInterface.subnet_id == sub.id))
        address = _port_v4(session, port, [sub])
        if router is not None and router.external_address and address:
            found = (router, address)
            break
    if found is None:
        raise Conflict(f"port '{port_name}' is on no network that a router with an external address routes: "
                       "`cairn router create <router> --network <its network>` first")
    floating_ips.write_status(session, row, {"router": found[0].name},
                              columns={"port_id": port.id, "router_id": found[0].id, "fixed_address": found[1]},
                              change=lambda live: _respec(live, port=port.name))
    return floating_ips.public(row, project)


def disassociate(session: Session, principal: Principal, project: str, name: str) -> dict[str, Any]:
    row, _ = floating_ips.row(session, principal, project, name, "write")
    if row.port_id is not None or row.spec.get("port"):
        floating_ips.write_status(session, row, {"router": None},
                                  columns={"port_id": None, "router_id": None, "fixed_address": None},
                                  change=lambda live: _respec(live, port=None))
    return floating_ips.public(row, project)


def _respec(row: FloatingIp, **spec: Any) -> None:
    row.spec = {**row.spec, **spec}
    row.generation += 1


def delete_floating_ip(session: Session, principal: Principal, project: str, name: str) -> None:
    floating_ips.delete(session, principal, project, name)  # its external address goes with it
