"""Plain values that describe a node's desired networking.

The control plane fills these from its database; the library never reads a
database. Every value is frozen and hashable so desired states compare cheaply.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from network.errors import InvalidSpec

VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
ZERO_MAC = "00:00:00:00:00:00"
BRIDGE_PREFIX = "cbr"  # every network bridge is named BRIDGE_PREFIX + VNI
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check_mac(mac: str) -> str:
    """Return ``mac`` lower-cased, or raise InvalidSpec."""
    low = mac.lower()
    if not _MAC.match(low):
        raise InvalidSpec(f"not a MAC address: {mac!r}")
    return low


def check_ifname(name: str) -> str:
    """Linux interface names are at most 15 bytes, without '/' or spaces."""
    if not name or len(name.encode()) > 15 or "/" in name or " " in name:
        raise InvalidSpec(f"not a valid interface name (1-15 chars, no '/' or space): {name!r}")
    return name


VXLAN_PREFIX = "cvx"
_TAG = re.compile(r"^[a-z]{0,4}$")


@dataclass(frozen=True)
class HostNames:
    """The names of everything one Cairn stack puts into a namespace it shares with
    others: bridges, VXLAN devices and nftables tables.

    Two stacks on one host (an installed appliance beside the test suite's stacks, or
    lab nodes) each get their own ``tag`` and only ever create, change or remove objects
    carrying it: a reconciler never mistakes another stack's bridge for a stale one of
    its own, and each stack's nftables tables are its own. ``tag`` is at most four
    lower-case letters (interface names are at most 15 bytes: ``cbr`` + tag + an 8-digit
    VNI) and never a digit, so ``cbr<tag><vni>`` parses one way only; "" keeps the plain
    names of an installed node (``cbr4096``, ``cairn_sg``)."""

    tag: str = ""

    def __post_init__(self) -> None:
        if not _TAG.match(self.tag):
            raise InvalidSpec(f"a stack tag is 0-4 lower-case letters, not {self.tag!r}")

    def bridge(self, vni: int) -> str:
        """Name of the bridge that carries network ``vni``."""
        return f"{BRIDGE_PREFIX}{self.tag}{vni}"

    def vxlan(self, vni: int) -> str:
        """Name of the VXLAN device of network ``vni``."""
        return f"{VXLAN_PREFIX}{self.tag}{vni}"

    def owns(self, ifname: str) -> bool:
        """True for a bridge or VXLAN device name this stack makes."""
        return re.fullmatch(rf"(?:{BRIDGE_PREFIX}|{VXLAN_PREFIX}){self.tag}[0-9]+", ifname) is not None

    def _table(self, base: str) -> str:
        return f"{base}_{self.tag}" if self.tag else base

    @property
    def sg_table(self) -> str:
        """The security groups' nftables tables (``bridge`` and ``inet`` families)."""
        return self._table("cairn_sg")

    @property
    def nat_table(self) -> str:
        """The routers' nftables table (``ip`` family)."""
        return self._table("cairn_nat")


def bridge_name(vni: int) -> str:
    """Name of the bridge that carries network ``vni`` on a node (untagged stack)."""
    return HostNames().bridge(vni)


def vxlan_name(vni: int) -> str:
    """Name of the VXLAN device of network ``vni`` on a node (untagged stack)."""
    return HostNames().vxlan(vni)


@dataclass(frozen=True)
class Port:
    """A VM tap or container veth on a virtual network: one neutral shape for both.

    ``host_ifname`` is the host-side interface the compute layer created (tap or
    veth end); the network library only enslaves it to the network's bridge.
    """

    id: str
    mac: str
    ips: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    host_ifname: str = ""
    name: str = ""  # DNS host name; empty = no DNS record

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))
        if self.host_ifname:
            check_ifname(self.host_ifname)
        for ip in self.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise InvalidSpec(f"port {self.id}: not an IP address: {ip!r}")


@dataclass(frozen=True)
class RemotePort:
    """A port of this network on another node: its MAC lives behind ``vtep``."""

    mac: str
    vtep: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))


@dataclass(frozen=True)
class NetworkAttachment:
    """One virtual network as present on one node.

    ``remote_vteps`` are the underlay addresses of the other member nodes (head-end
    replication: broadcast, unknown unicast and multicast go to each of them);
    ``remote_ports`` get unicast forwarding entries so known traffic goes to one node only.
    ``gateway`` ("10.0.0.1/24") puts an address on the node's bridge (router or DHCP side).
    """

    vni: int
    ports: tuple[Port, ...] = ()
    remote_vteps: tuple[str, ...] = ()
    remote_ports: tuple[RemotePort, ...] = ()
    gateway: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.vni < 2**24:
            raise InvalidSpec(f"VNI out of range 1..16777215: {self.vni}")
        for g in self.gateway:
            try:
                ipaddress.ip_interface(g)
            except ValueError:
                raise InvalidSpec(f"network {self.vni}: gateway is not address/prefix: {g!r}")


@dataclass(frozen=True)
class NodeNetworkState:
    """Desired networking of one node: its underlay NIC and the networks it hosts."""

    underlay_ifname: str
    underlay_ip: str
    underlay_mtu: int = 1500
    networks: tuple[NetworkAttachment, ...] = ()

    @property
    def overlay_mtu(self) -> int:
        """MTU of bridges, VXLAN devices and ports: underlay minus VXLAN overhead."""
        return self.underlay_mtu - VXLAN_OVERHEAD


Direction = Literal["ingress", "egress"]
Protocol = Literal["tcp", "udp", "icmp", "icmpv6", "any"]


@dataclass(frozen=True)
class SecurityGroupRule:
    """Allow traffic in one direction. Nothing is allowed in unless a rule says so.

    ``remote_cidr`` and ``remote_group`` are alternatives (none = anyone).
    ``ethertype`` is "ipv4" or "ipv6" (derived from ``remote_cidr`` when given).
    """

    direction: Direction
    protocol: Protocol = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None
    ethertype: Literal["ipv4", "ipv6"] = "ipv4"

    def __post_init__(self) -> None:
        if self.remote_cidr and self.remote_group:
            raise InvalidSpec("a rule has either a remote CIDR or a remote group, not both")
        if self.remote_cidr:
            try:
                net = ipaddress.ip_network(self.remote_cidr, strict=False)
            except ValueError:
                raise InvalidSpec(f"not a CIDR: {self.remote_cidr!r}")
            object.__setattr__(self, "ethertype", "ipv6" if net.version == 6 else "ipv4")
        if self.port_min is not None or self.port_max is not None:
            if self.protocol not in ("tcp", "udp"):
                raise InvalidSpec("port ranges only apply to tcp and udp")
            lo = self.port_min if self.port_min is not None else self.port_max
            hi = self.port_max if self.port_max is not None else self.port_min
            assert lo is not None and hi is not None
            if not 1 <= lo <= hi <= 65535:
                raise InvalidSpec(f"bad port range {lo}-{hi}")
            object.__setattr__(self, "port_min", lo)
            object.__setattr__(self, "port_max", hi)


@dataclass(frozen=True)
class SecurityGroup:
    """A named set of allow rules; ports carry group ids."""

    id: str
    rules: tuple[SecurityGroupRule, ...] = ()


@dataclass
class Report:
    """What one reconcile pass did."""

    changed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # e.g. a port whose interface is not there yet
    rolled_back: bool = False
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the desired state is applied and verified."""
        return self.error is None
