"""Router: egress NAT from virtual networks through a node's uplink, and ingress by
port forwards and floating IPs. A pure nftables builder plus an atomic apply.

The router lives in the namespace where the network's gateway address sits on its
bridge (the node namespace, or a dedicated router namespace the caller chose).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from network.errors import CommandFailed, InvalidSpec
from network.model import check_ifname
from network.netlink import node_links, run_in_netns, write_sysctl

TABLE = "cairn_nat"


@dataclass(frozen=True)
class PortForward:
    """External ``uplink address:external_port`` goes to ``internal_ip:internal_port``."""

    protocol: str  # tcp or udp
    external_ip: str
    external_port: int
    internal_ip: str
    internal_port: int


@dataclass(frozen=True)
class FloatingIp:
    """All traffic to ``external_ip`` goes to ``internal_ip``, and its egress leaves as ``external_ip``."""

    external_ip: str
    internal_ip: str


@dataclass(frozen=True)
class RouterSpec:
    """What one node routes: internal subnets masqueraded behind ``uplink``, plus ingress."""

    uplink: str
    subnets: tuple[str, ...]
    port_forwards: tuple[PortForward, ...] = ()
    floating_ips: tuple[FloatingIp, ...] = ()


def build_router_ruleset(spec: RouterSpec) -> str:
    """nftables script (one transaction) for ``spec``."""
    check_ifname(spec.uplink)
    for cidr in spec.subnets:
        try:
            if ipaddress.ip_network(cidr, strict=True).version != 4:
                raise InvalidSpec(f"NAT is for IPv4 subnets (IPv6 is routed): {cidr}")
        except ValueError as e:
            raise InvalidSpec(f"invalid subnet {cidr!r}: {e}")
    up = f'"{spec.uplink}"'
    lines = [
        "# cairn router (generated; replaced as a whole in one transaction)",
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    ]
    for pf in sorted(spec.port_forwards, key=lambda p: (p.external_ip, p.protocol, p.external_port)):
        if pf.protocol not in ("tcp", "udp"):
            raise InvalidSpec(f"port forwards are tcp or udp, not {pf.protocol!r}")
        lines.append(
            f"\t\tiifname {up} ip daddr {pf.external_ip} {pf.protocol} dport {pf.external_port} "
            f"dnat to {pf.internal_ip}:{pf.internal_port}"
        )
    for fip in sorted(spec.floating_ips, key=lambda f: f.external_ip):
        lines.append(f"\t\tip daddr {fip.external_ip} dnat to {fip.internal_ip}")
    lines += [
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
    ]
    for fip in sorted(spec.floating_ips, key=lambda f: f.external_ip):
        lines.append(f"\t\toifname {up} ip saddr {fip.internal_ip} snat to {fip.external_ip}")
    for cidr in sorted(spec.subnets):
        lines.append(f"\t\toifname {up} ip saddr {cidr} masquerade")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def apply_router(netns: str | None, spec: RouterSpec, uplink_prefixlen: int = 32) -> None:
    """Turn on forwarding, put floating IPs on the uplink and load the NAT rules atomically."""
    write_sysctl(netns, "net.ipv4.ip_forward", "1")
    with node_links(netns) as nl:
        idx = nl.index(spec.uplink)
        have = {a.split("/")[0] for a in nl.addresses(idx)}
        for fip in spec.floating_ips:
            if fip.external_ip not in have:
                nl.addr_add(idx, f"{fip.external_ip}/{uplink_prefixlen}")
    r = run_in_netns(netns, ["nft", "-f", "-"], input=build_router_ruleset(spec), timeout=30)
    if r.returncode:
        raise CommandFailed(f"nft rejected the router rules (nothing changed): {r.stderr.strip()[-800:]}")
