"""IP address management as pure functions.

The control plane stores allocations in its database with a unique constraint on
(subnet, address); these functions pick candidates and validate, and the database
settles races (a losing insert retries with the next candidate).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from network.errors import AddressConflict, AddressExhausted, InvalidSpec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Subnet:
    """A subnet of a virtual network: CIDR, gateway, allocation pools and reserved addresses.

    Pools default to every host address except the gateway; ``reserved`` addresses are
    never handed out by :func:`allocate` (but may be taken statically)."""

    cidr: str
    gateway: str | None = None
    pools: tuple[tuple[str, str], ...] = ()
    reserved: tuple[str, ...] = ()

    @property
    def network(self) -> IPNetwork:
        """The subnet as an ``ipaddress`` network."""
        return ipaddress.ip_network(self.cidr, strict=True)


def parse_subnet(cidr: str, gateway: str | None = "auto", pools: Sequence[tuple[str, str]] = (),
                 reserved: Sequence[str] = ()) -> Subnet:
    """Validate and normalise a subnet; ``gateway="auto"`` takes the first host address."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise InvalidSpec(f"invalid CIDR {cidr!r}: {e}")
    if net.num_addresses < 4:
        raise InvalidSpec(f"subnet {cidr} is too small (need at least a /{net.max_prefixlen - 2})")
    gw: str | None = None
    if gateway == "auto":
        gw = str(next(net.hosts()) if net.version == 4 else net.network_address + 1)
    elif gateway:
        gw = str(_inside(net, gateway, "gateway"))
    norm_pools = []
    for start, end in pools:
        a, b = _inside(net, start, "pool start"), _inside(net, end, "pool end")
        if int(a) > int(b):
            raise InvalidSpec(f"pool {start}-{end} ends before it starts")
        norm_pools.append((str(a), str(b)))
    res = tuple(str(_inside(net, r, "reserved address")) for r in reserved)
    return Subnet(str(net), gw, tuple(norm_pools), res)


def _inside(net: IPNetwork, address: str, what: str) -> IPAddress:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidSpec(f"{what} {address!r} is not an IP address")
    if ip not in net:
        raise AddressConflict(f"{what} {address} is outside subnet {net}")
    return ip


def overlapping(subnets: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of CIDRs that overlap (one network may not hold two of them)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in subnets]
    return [
        (str(a), str(b))
        for i, a in enumerate(nets)
        for b in nets[i + 1:]
        if a.version == b.version and a.overlaps(b)
    ]


def _candidates(subnet: Subnet) -> Iterator[IPAddress]:
    net = subnet.network
    if subnet.pools:
        for start, end in subnet.pools:
            lo, hi = int(ipaddress.ip_address(start)), int(ipaddress.ip_address(end))
            for i in range(lo, hi + 1):
                yield ipaddress.ip_address(i)
        return
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    for i in range(first, last + 1):
        yield ipaddress.ip_address(i)


def allocate(subnet: Subnet, used: Iterable[str]) -> str:
    """The lowest free address of the subnet's pools (not the gateway, not reserved, not used).

    Raises AddressExhausted when nothing is free."""
    taken = {ipaddress.ip_address(u) for u in used}
    taken |= {ipaddress.ip_address(r) for r in subnet.reserved}
    if subnet.gateway:
        taken.add(ipaddress.ip_address(subnet.gateway))
    for ip in _candidates(subnet):
        if ip not in taken:
            return str(ip)
    raise AddressExhausted(f"no free address left in {subnet.cidr}")


def claim_static(subnet: Subnet, address: str, used: Iterable[str]) -> str:
    """Validate a user-chosen address: inside the subnet, not network/broadcast/gateway, not used."""
    net = subnet.network
    ip = _inside(net, address, "address")
    if ip == net.network_address or (net.version == 4 and ip == net.broadcast_address):
        raise AddressConflict(f"{address} is the network or broadcast address of {net}")
    if subnet.gateway and ip == ipaddress.ip_address(subnet.gateway):
        raise AddressConflict(f"{address} is the gateway of {net}")
    if ip in {ipaddress.ip_address(u) for u in used}:
        raise AddressConflict(f"{address} is already in use in {net}")
    return str(ip)


def mac_for(seed: int) -> str:
    """A locally administered unicast MAC derived from a number (e.g. a port's serial)."""
    b = (seed & 0xFFFFFFFFFF).to_bytes(5, "big")
    return "fa:" + ":".join(f"{x:02x}" for x in b)
