"""IP address management: subnet validation and address allocation. Addresses are
rows with a unique (subnet, address) constraint, so concurrent allocations can
never hand out one address twice: a loser rolls back to its savepoint and takes
the next free one."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.db.models import IpAllocation, Subnet
from appliance.errors import Conflict, InvalidInput

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_cidr(cidr: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(cidr, strict=False)
            raise InvalidInput(f"'{cidr}' has host bits set: did you mean {fixed}?")
        except ValueError:
            raise InvalidInput(f"'{cidr}' is not a CIDR like 10.20.0.0/24 or fd00::/64 ({exc})")


def parse_address(value: str, net: IPNetwork, what: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidInput(f"{what} '{value}' is not an IP address")
    if addr not in net:
        raise InvalidInput(f"{what} {addr} is outside the subnet {net}")
    if net.version == 4 and net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
        raise InvalidInput(f"{what} {addr} is the network or broadcast address of {net}")
    return addr


def validate_subnet(cidr: str, gateway: str | None, pools: list[dict[str, str]],
                    others: list[str]) -> dict[str, Any]:
    """Check a subnet spec; returns it normalised (gateway and pools filled in)."""
    net = parse_cidr(cidr)
    if (net.version == 4 and net.prefixlen > 30) or (net.version == 6 and net.prefixlen > 126):
        raise InvalidInput(f"{net} is too small: use at most /30 for IPv4 or /126 for IPv6")
    for other in others:
        onet = ipaddress.ip_network(other)
        if onet.version == net.version and net.overlaps(onet):
            raise Conflict(f"{net} overlaps the network's existing subnet {onet}: pick a disjoint range")
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    gw = int(parse_address(gateway, net, "gateway")) if gateway else first
    ranges: list[tuple[int, int]] = []
    default = [{"start": str(ipaddress.ip_address(gw + 1 if gw == first else first)),
                "end": str(ipaddress.ip_address(last))}]
    for pool in pools or default:
        start = int(parse_address(pool["start"], net, "allocation pool start"))
        end = int(parse_address(pool["end"], net, "allocation pool end"))
        label = f"{pool['start']}-{pool['end']}"
        if start > end:
            raise InvalidInput(f"allocation pool {label} ends before it starts")
        if start <= gw <= end:
            raise InvalidInput(f"allocation pool {label} contains the gateway {ipaddress.ip_address(gw)}")
        for s, e in ranges:
            if start <= e and s <= end:
                raise InvalidInput(f"allocation pool {label} overlaps another pool")
        ranges.append((start, end))
    show = ipaddress.ip_address
    return {"cidr": str(net), "ip_version": net.version, "gateway": str(show(gw)),
            "allocation_pools": [{"start": str(show(s)), "end": str(show(e))} for s, e in ranges]}


def _candidates(spec: dict[str, Any]) -> Iterator[IPAddress]:
    for pool in spec["allocation_pools"]:
        start = ipaddress.ip_address(pool["start"])
        for n in range(int(start), int(ipaddress.ip_address(pool["end"])) + 1):
            yield ipaddress.ip_address(n) if start.version == 4 else ipaddress.IPv6Address(n)


def _insert(session: Session, subnet: Subnet, address: str, port_id: str | None, purpose: str) -> bool:
    try:
        with session.begin_nested():
            session.add(IpAllocation(subnet_id=subnet.id, port_id=port_id, address=address, purpose=purpose))
        return True
    except IntegrityError:
        return False


def allocate(session: Session, subnet: Subnet, port_id: str | None, address: str | None = None,
             purpose: str = "port") -> str:
    """Give ``port_id`` an address of ``subnet``: the one asked for, or the first free."""
    net = ipaddress.ip_network(subnet.cidr)
    if address is not None:
        wanted = str(parse_address(address, net, "address"))
        if not _insert(session, subnet, wanted, port_id, purpose):
            raise Conflict(f"{wanted} is already in use in subnet {subnet.name} ({net})")
        return wanted
    used = set(session.scalars(select(IpAllocation.address).where(IpAllocation.subnet_id == subnet.id)))
    for addr in _candidates(subnet.spec):
        text = str(addr)
        if text in used:
            continue
        if _insert(session, subnet, text, port_id, purpose):
            return text
        used.add(text)  # a concurrent allocation took it: try the next
    raise Conflict(f"subnet {subnet.name} ({net}) has no free address left in its allocation pools")
