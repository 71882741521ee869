"""Virtual networks, subnets, ports and security groups (the control-plane side of
DESIGN.md's overlay). The agent turns them into bridges, VXLAN devices, dnsmasq
and nftables on each node with the ``network`` library."""

from __future__ import annotations

import ipaddress
import secrets
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.db.models import IpAllocation, Network, Node, Port, Router, RouterInterface, SecurityGroup, Subnet
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.services import ipam, quotas
from appliance.services.auth import project_by_name
from appliance.services.principal import Principal
from appliance.services.scoped import ScopedKind
from appliance.settings import Settings

networks: ScopedKind[Network] = ScopedKind(Network, "network", "`cairn get networks` lists them",
                                           lambda n: {"vni": n.vni})
subnets: ScopedKind[Subnet] = ScopedKind(Subnet, "subnet", "`cairn get subnets` lists them")
ports: ScopedKind[Port] = ScopedKind(Port, "port", "`cairn get ports` lists them", lambda p: {"mac": p.mac})
secgroups: ScopedKind[SecurityGroup] = ScopedKind(SecurityGroup, "security-group",
                                                  "`cairn get security-groups` lists them")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "any")


# --- networks ------------------------------------------------------------------------------

def _free_vni(session: Session, settings: Settings) -> int:
    first, last = settings.vni_bounds
    used = set(session.scalars(select(Network.vni).where(Network.vni >= first, Network.vni <= last)))
    for vni in range(first, last + 1):
        if vni not in used:
            return vni
    raise Conflict(f"the VNI pool {first}-{last} is exhausted ({len(used)} networks): delete unused "
                   "networks or widen CAIRN_VNI_RANGE")


def create_network(session: Session, principal: Principal, settings: Settings, project: str, name: str,
                   spec: dict[str, Any]) -> dict[str, Any]:
    """A network with its VNI; ``spec.cidr`` also creates its first subnet."""
    mtu = spec.get("mtu") or settings.underlay_mtu - 50
    if mtu > settings.underlay_mtu - 50:
        raise InvalidInput(f"mtu {mtu} does not fit VXLAN over the {settings.underlay_mtu}-byte underlay: "
                           f"use at most {settings.underlay_mtu - 50}")
    cidr = spec.get("cidr")
    quotas.charge(session, project_by_name(session, principal, project, "write").id, networks=1)
    for _ in range(5):
        vni = _free_vni(session, settings)
        try:
            with session.begin_nested():
                row = networks.create(session, principal, project, name,
                                      {**spec, "mtu": mtu}, {"phase": "Pending"}, vni=vni)
            break
        except IntegrityError:
            continue  # a concurrent create took this VNI
    else:
        raise Conflict("could not reserve a VNI under heavy concurrency: retry")
    if cidr:
        create_subnet(session, principal, project, f"{name}-{ipam.parse_cidr(cidr).version}",
                      {"network": name, "cidr": cidr}, settings)
    return network_public(session, row, project)


def network_public(session: Session, row: Network, project: str) -> dict[str, Any]:
    data = networks.public(row, project)
    subs = session.scalars(select(Subnet).where(Subnet.network_id == row.id).order_by(Subnet.name))
    data["status"]["subnets"] = [{"name": s.name, **s.spec} for s in subs]
    data["status"]["ports"] = session.scalar(select(func.count()).select_from(Port)
                                             .where(Port.network_id == row.id)) or 0
    return data


def get_network(session: Session, principal: Principal, project: str, name: str) -> dict[str, Any]:
    row, proj = networks.row(session, principal, project, name)
    return network_public(session, row, proj.name)


def delete_network(session: Session, principal: Principal, project: str, name: str) -> None:
    row, _ = networks.row(session, principal, project, name, "write")
    attached = session.scalar(select(func.count()).select_from(Port).where(Port.network_id == row.id))
    if attached:
        raise Conflict(f"network '{name}' still has {attached} port(s): delete them first "
                       f"(`cairn get ports --project {project}`)")
    _check_unrouted(session, list(session.scalars(select(Subnet.id).where(Subnet.network_id == row.id))),
                    f"network '{name}'")
    networks.delete(session, principal, project, name)


# --- subnets -------------------------------------------------------------------------------

# never for tenants: loopback, link-local, "this network", multicast and reserved ranges
RESERVED = {"127.0.0.0/8": "loopback", "169.254.0.0/16": "link-local", "0.0.0.0/8": "'this network'",
            "224.0.0.0/4": "multicast", "240.0.0.0/4": "reserved", "::1/128": "loopback",
            "fe80::/10": "link-local", "ff00::/8": "multicast", "::/128": "unspecified"}


def check_host_ranges(session: Session, cidr: str, settings: Settings | None = None) -> None:
    """Refuse a tenant subnet that overlaps what the nodes themselves use (their
    underlay, management, storage and external networks, as each node's agent reports
    them) or a range no tenant may have: its gateway and DHCP would sit on the node's
    own network, and the node would route its own traffic into the tenant's segment."""
    net = ipaddress.ip_network(cidr)
    for reserved, what in RESERVED.items():
        other = ipaddress.ip_network(reserved)
        if other.version == net.version and net.overlaps(other):
            raise Conflict(f"{net} overlaps the {what} range {other}: tenant subnets use private unicast "
                           "ranges (e.g. 10.x, 172.16-31.x, 192.168.x, fd00::/8)")
    clashes: list[tuple[str, str]] = []
    if settings is not None and settings.external_cidr:
        clashes.append((settings.external_cidr, "the external network (CAIRN_EXTERNAL_CIDR)"))
    for node_name, status in session.execute(select(Node.name, Node.status)):
        for entry in ((status or {}).get("inventory") or {}).get("host_networks") or []:
            where = f" on {entry['interface']}" if entry.get("interface") else ""
            clashes.append((entry["cidr"], f"node {node_name}'s {entry.get('role', 'host')} network{where}"))
    for other_cidr, what in clashes:
        other = ipaddress.ip_network(other_cidr, strict=False)
        if other.version == net.version and net.overlaps(other):
            raise Conflict(f"{net} overlaps {what}, {other}: pick a range no node uses")


def create_subnet(session: Session, principal: Principal, project: str, name: str,
                  spec: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    net, _ = networks.row(session, principal, project, spec["network"], "write")
    others = list(session.scalars(select(Subnet.cidr).where(Subnet.network_id == net.id)))
    normal = ipam.validate_subnet(spec["cidr"], spec.get("gateway"), spec.get("allocation_pools") or [], others)
    check_host_ranges(session, normal["cidr"], settings)
    full = {"network": net.name, "dns_nameservers": spec.get("dns_nameservers") or [], **normal}
    row = subnets.create(session, principal, project, name, full, network_id=net.id, cidr=normal["cidr"])
    ipam.allocate(session, row, None, normal["gateway"], purpose="gateway")
    return subnets.public(row, project)


def delete_subnet(session: Session, principal: Principal, project: str, name: str) -> None:
    row, _ = subnets.row(session, principal, project, name, "write")
    used = session.scalar(select(func.count()).select_from(IpAllocation).where(
        IpAllocation.subnet_id == row.id, IpAllocation.port_id.is_not(None)))
    if used:
        raise Conflict(f"subnet '{name}' still has {used} address(es) on ports: delete the ports first")
    _check_unrouted(session, [row.id], f"subnet '{name}'")
    subnets.delete(session, principal, project, name)


def _check_unrouted(session: Session, subnet_ids: list[str], what: str) -> None:
    """Refuse to delete subnets (or their network) that a router still routes."""
    router = session.scalar(select(Router).join(RouterInterface, RouterInterface.router_id == Router.id)
                            .where(RouterInterface.subnet_id.in_(subnet_ids))) if subnet_ids else None
    if router is not None:
        raise Conflict(f"{what} is attached to router '{router.name}': detach it first "
                       f"(`cairn router remove-network {router.name} <network>`)")


def reserve(session: Session, principal: Principal, project: str, subnet: str, address: str) -> dict[str, Any]:
    """Keep an address out of automatic allocation (e.g. a physical appliance on the segment)."""
    row, _ = subnets.row(session, principal, project, subnet, "write")
    return {"subnet": subnet, "address": ipam.allocate(session, row, None, address, purpose="reserved")}


# --- ports ---------------------------------------------------------------------------------

def _mac(session: Session) -> str:
    while True:
        raw = bytearray(secrets.token_bytes(6))
        raw[0] = (raw[0] & 0xFC) | 0x02  # locally administered, unicast
        mac = ":".join(f"{b:02x}" for b in raw)
        if not session.scalar(select(Port.id).where(Port.mac == mac)):
            return mac


def create_port(session: Session, principal: Principal, project: str, name: str,
                spec: dict[str, Any]) -> dict[str, Any]:
    """A port on a network of the same project: MAC, an address per subnet (or the
    fixed ones asked for), security groups."""
    net, _ = networks.row(session, principal, project, spec["network"], "write")
    if not spec.get("security_groups"):
        # Like Neutron: the project's "default" group lets members reach each other.
        ensure_default_group(session, principal, project)
        spec = {**spec, "security_groups": [DEFAULT_GROUP]}
    for group in spec.get("security_groups", []):
        secgroups.row(session, principal, project, group)
    mac = (spec.get("mac") or _mac(session)).lower()
    if session.scalar(select(Port.id).where(Port.mac == mac)):
        raise Conflict(f"MAC {mac} is already used by another port")
    row = ports.create(session, principal, project, name, {**spec, "mac": mac}, {"phase": "Pending"},
                       network_id=net.id, mac=mac)
    subs = list(session.scalars(select(Subnet).where(Subnet.network_id == net.id).order_by(Subnet.name)))
    fixed = list(spec.get("fixed_ips") or [])
    ips: list[dict[str, str]] = []
    for address in fixed:
        owner = next((s for s in subs if ipaddress.ip_address(address) in ipaddress.ip_network(s.cidr)), None) \
            if _is_ip(address) else None
        if owner is None:
            raise InvalidInput(f"fixed IP {address} is not in any subnet of network '{net.name}'")
        ips.append({"subnet": owner.name, "address": ipam.allocate(session, owner, row.id, address)})
    if not fixed:
        for sub in subs:
            ips.append({"subnet": sub.name, "address": ipam.allocate(session, sub, row.id)})
    ports.write_status(session, row, {"phase": "Pending", "ips": ips, "mac": mac})
    return ports.public(row, project)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def delete_port(session: Session, principal: Principal, project: str, name: str) -> None:
    ports.delete(session, principal, project, name)


# --- security groups -----------------------------------------------------------------------

DEFAULT_GROUP = "default"


def ensure_default_group(session: Session, principal: Principal, project: str) -> None:
    """Each project's "default" group: all egress, ingress from the group's own members."""
    proj = project_by_name(session, principal, project)
    exists = session.scalar(select(SecurityGroup.id).where(SecurityGroup.project_id == proj.id,
                                                           SecurityGroup.name == DEFAULT_GROUP))
    if exists:
        return
    rules = [{"id": uuid.uuid4().hex[:8], "direction": d, "protocol": "any", "ethertype": e,
              **({"remote_group": DEFAULT_GROUP} if d == "ingress" else {})}
             for d in ("ingress", "egress") for e in ("ipv4", "ipv6")]
    try:
        with session.begin_nested():  # a concurrent first port of the project may make it first
            secgroups.create(session, principal, project, DEFAULT_GROUP,
                             {"description": "members reach each other; everything out", "rules": rules})
    except (Conflict, IntegrityError):
        pass  # it exists now: the other request's group is the same group

def create_secgroup(session: Session, principal: Principal, project: str, name: str,
                    description: str) -> dict[str, Any]:
    row = secgroups.create(session, principal, project, name, {"description": description, "rules": []})
    return secgroups.public(row, project)


def add_rule(session: Session, principal: Principal, project: str, group: str, rule: dict[str, Any],
             if_match: str | None) -> dict[str, Any]:
    """Append one rule (the whole group's ruleset is re-applied atomically on nodes)."""
    row, _ = secgroups.row(session, principal, project, group, "write")
    if rule.get("remote_group"):
        secgroups.row(session, principal, project, rule["remote_group"])
    if rule.get("remote_cidr"):
        try:
            rule["remote_cidr"] = str(ipaddress.ip_network(rule["remote_cidr"], strict=False))
        except ValueError:
            raise InvalidInput(f"remote_cidr {rule['remote_cidr']!r} is not a CIDR like 10.0.0.0/24 or 2001:db8::/64")
    lo, hi = rule.get("port_min"), rule.get("port_max")
    if (lo is not None or hi is not None) and rule["protocol"] not in ("tcp", "udp"):
        raise InvalidInput(f"ports only apply to tcp and udp, not {rule['protocol']}")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInput(f"port range {lo}-{hi} ends before it starts")
    rules = [*row.spec.get("rules", []), {"id": uuid.uuid4().hex[:8], **rule}]
    updated, _ = secgroups.update_spec(session, principal, project, group, {"rules": rules}, if_match)
    return secgroups.public(updated, project)


def remove_rule(session: Session, principal: Principal, project: str, group: str, rule_id: str) -> dict[str, Any]:
    row, _ = secgroups.row(session, principal, project, group, "write")
    rules = [r for r in row.spec.get("rules", []) if r["id"] != rule_id]
    if len(rules) == len(row.spec.get("rules", [])):
        raise NotFound(f"security group '{group}' has no rule {rule_id}")
    updated, _ = secgroups.update_spec(session, principal, project, group, {"rules": rules}, None)
    return secgroups.public(updated, project)


def delete_secgroup(session: Session, principal: Principal, project: str, name: str) -> None:
    _, proj = secgroups.row(session, principal, project, name, "write")
    users = [p.name for p in session.scalars(select(Port).where(Port.project_id == proj.id))
             if name in (p.spec or {}).get("security_groups", [])]
    if users:
        raise Conflict(f"security group '{name}' is used by port(s) {', '.join(users[:5])}: detach it first")
    secgroups.delete(session, principal, project, name)
