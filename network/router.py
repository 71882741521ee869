"""Router: egress NAT from virtual networks through a node's uplink, and ingress by
port forwards and floating IPs. A pure nftables builder, an atomic apply, and a
reconcile pass (observe -> act only where the node differs -> persist).

The router lives in the namespace where the network's gateway address sits on its
bridge (the node namespace, or a dedicated router namespace the caller chose). All
routers of one namespace share one table: the caller merges them into one spec.

Conntrack zones: the security groups put each network's bridge in its own zone, so a
routed flow's replies from the uplink must be looked up in that zone too, or NAT never
sees them. ``zones`` maps each external address to the zone of the networks behind it
(all networks of one router share one zone, so traffic routed between them matches).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from network.errors import CommandFailed, InvalidSpec
from network.model import HostNames, check_ifname
from network.netlink import node_links, read_sysctl, run_in_netns, write_sysctl

STATE_FILE = "router-applied.json"
FORWARD_KEY = "net.ipv4.ip_forward"


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
class SourceNat:
    """Egress of ``cidr`` leaves the uplink as ``external_ip`` (a router's own external address)."""

    cidr: str
    external_ip: str


@dataclass(frozen=True)
class RouterSpec:
    """What one node routes.

    ``subnets`` are masqueraded behind the uplink's primary address, ``snat`` subnets
    leave as a router's own address. ``zones`` pairs external addresses with the
    conntrack zone of the networks behind them. ``routed`` lists each router's
    bridges (they route to each other and out of the uplink); when ``isolated`` names
    the node's bridges, nothing else is forwarded in or out of them (turning
    forwarding on must not route between unrelated networks). ``uplink`` "" = no
    external side: the routers only route between their own networks."""

    uplink: str
    subnets: tuple[str, ...] = ()
    port_forwards: tuple[PortForward, ...] = ()
    floating_ips: tuple[FloatingIp, ...] = ()
    snat: tuple[SourceNat, ...] = ()
    zones: tuple[tuple[str, int], ...] = ()
    routed: tuple[tuple[str, ...], ...] = ()
    isolated: tuple[str, ...] = ()

    def external_ips(self) -> set[str]:
        """Addresses the uplink must carry for this spec."""
        return ({s.external_ip for s in self.snat} | {f.external_ip for f in self.floating_ips}
                | {p.external_ip for p in self.port_forwards})


def _v4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidSpec(f"{what} is not an IPv4 address: {value!r}")


def _v4_net(cidr: str) -> str:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise InvalidSpec(f"invalid subnet {cidr!r}: {e}")
    if net.version != 4:
        raise InvalidSpec(f"NAT is for IPv4 subnets (IPv6 is routed): {cidr}")
    return str(net)


def _check(spec: RouterSpec) -> None:
    if spec.uplink:
        check_ifname(spec.uplink)
    elif spec.subnets or spec.snat or spec.port_forwards or spec.floating_ips or spec.zones:
        raise InvalidSpec("NAT, port forwards and floating IPs need an uplink interface")
    for cidr in spec.subnets:
        _v4_net(cidr)
    for s in spec.snat:
        _v4_net(s.cidr)
        _v4(s.external_ip, "SNAT address")
    for pf in spec.port_forwards:
        if pf.protocol not in ("tcp", "udp"):
            raise InvalidSpec(f"port forwards are tcp or udp, not {pf.protocol!r}")
        for port in (pf.external_port, pf.internal_port):
            if not 1 <= port <= 65535:
                raise InvalidSpec(f"port {port} is outside 1..65535")
        _v4(pf.external_ip, "port forward address")
        _v4(pf.internal_ip, "port forward target")
    for fip in spec.floating_ips:
        _v4(fip.external_ip, "floating IP")
        _v4(fip.internal_ip, "floating IP target")
    for ip, zone in spec.zones:
        _v4(ip, "zone address")
        if not 1 <= zone <= 65535:
            raise InvalidSpec(f"conntrack zone {zone} is outside 1..65535")
    for name in (*spec.isolated, *(n for group in spec.routed for n in group)):
        check_ifname(name)


def _names(names: Iterable[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _forward_chain(spec: RouterSpec) -> list[str]:
    up = f'"{spec.uplink}"'
    bridges = sorted({*spec.isolated, *(n for group in spec.routed for n in group)})
    outside = (spec.uplink,) if spec.uplink else ()
    pairs = sorted({(a, b) for group in spec.routed for a in group for b in (*group, *outside) if a != b})
    routed = sorted({n for group in spec.routed for n in group})
    out = [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        # br_netfilter reports the bridge as both interfaces of a bridged frame
        "\t\tiifname . oifname { " + ", ".join(f'"{b}" . "{b}"' for b in bridges)
        + ' } accept comment "bridged, not routed"',
        "\t\tct state established,related accept",
    ]
    if pairs:
        out.append("\t\tiifname . oifname { " + ", ".join(f'"{a}" . "{b}"' for a, b in pairs)
                   + ' } accept comment "a router\'s networks: out and to each other"')
    if routed and spec.uplink:
        out.append(f"\t\tiifname {up} oifname {{ {_names(routed)} }} ct status dnat accept "
                   'comment "port forwards and floating IPs"')
    out.append(f'\t\tiifname {{ {_names(bridges)} }} counter drop comment "not routed by a router"')
    out.append(f'\t\toifname {{ {_names(bridges)} }} counter drop comment "not routed by a router"')
    out.append("\t}")
    return out


def build_router_ruleset(spec: RouterSpec, names: HostNames | None = None) -> str:
    """nftables script (one transaction) for ``spec``, in this stack's table (``names``)."""
    _check(spec)
    up = f'"{spec.uplink}"'
    table = (names or HostNames()).nat_table
    lines = [
        "# cairn router (generated; replaced as a whole in one transaction)",
        f"table ip {table}",
        f"delete table ip {table}",
        f"table ip {table} {{",
    ]
    if spec.zones:
        zones = ", ".join(f"{ip} : {zone}" for ip, zone in sorted(spec.zones))
        lines += [
            "\tchain zones {",
            "\t\ttype filter hook prerouting priority raw; policy accept;",
            f"\t\tiifname {up} ct zone set ip daddr map {{ {zones} }}",
            "\t}",
        ]
    lines += [
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
    ]
    for pf in sorted(spec.port_forwards, key=lambda p: (p.external_ip, p.protocol, p.external_port)):
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
    for s in sorted(spec.snat, key=lambda s: s.cidr):
        lines.append(f"\t\toifname {up} ip saddr {s.cidr} snat to {s.external_ip}")
    for cidr in sorted(spec.subnets):
        lines.append(f"\t\toifname {up} ip saddr {cidr} masquerade")
    lines.append("\t}")
    if spec.isolated or spec.routed:
        lines += _forward_chain(spec)
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_router(netns: str | None, spec: RouterSpec, uplink_prefixlen: int = 32,
                 names: HostNames | None = None) -> None:
    """Turn on forwarding, put floating IPs on the uplink and load the NAT rules atomically."""
    write_sysctl(netns, FORWARD_KEY, "1")
    with node_links(netns) as nl:
        idx = nl.index(spec.uplink)
        have = {a.split("/")[0] for a in nl.addresses(idx)}
        for ip in sorted(spec.external_ips()):
            if ip not in have:
                nl.addr_add(idx, f"{ip}/{uplink_prefixlen}")
    _load(netns, build_router_ruleset(spec, names))


def _load(netns: str | None, script: str) -> None:
    r = run_in_netns(netns, ["nft", "-f", "-"], input=script, timeout=30)
    if r.returncode:
        raise CommandFailed(f"nft rejected the router rules (nothing changed): {r.stderr.strip()[-800:]}")


def router_table(netns: str | None, names: HostNames | None = None) -> str | None:
    """The live router table as nft lists it, or None when there is none."""
    r = run_in_netns(netns, ["nft", "list", "table", "ip", (names or HostNames()).nat_table], timeout=30)
    return r.stdout if r.returncode == 0 else None


def _other_routers(netns: str | None, names: HostNames) -> list[str]:
    """Router tables of other stacks sharing the namespace (they need forwarding too)."""
    r = run_in_netns(netns, ["nft", "list", "tables", "ip"], timeout=30)
    tables = [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("table ip ")]
    return [t for t in tables if t.startswith("cairn_nat") and t != names.nat_table]


# ------------------------------------------------------------------ reconcile

@dataclass
class RouterState:
    """What the last pass applied (persisted): the script, the table as nft listed it
    right after, the uplink, and the forwarding setting found before the first router."""

    script: str = ""
    listing: str = ""
    uplink: str = ""
    forward_before: str | None = None
    addresses: list[str] = field(default_factory=list)


def _load_state(state_dir: Path) -> RouterState | None:
    try:
        raw: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return RouterState(**raw)


def _save_state(state_dir: Path, state: RouterState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    os.replace(tmp, state_dir / STATE_FILE)


def _in_pool(ip: str, pool: tuple[str, str] | None) -> bool:
    if pool is None:
        return False
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return ipaddress.IPv4Address(pool[0]) <= addr <= ipaddress.IPv4Address(pool[1])


def _sync_addresses(netns: str | None, uplink: str, wanted: set[str], prefixlen: int,
                    pool: tuple[str, str] | None, managed: Iterable[str]) -> list[str]:
    """Put ``wanted`` on the uplink; remove addresses of ours (in ``pool`` or listed
    in ``managed``) that are no longer wanted."""
    changed = []
    with node_links(netns) as nl:
        link = nl.link(uplink)
        if link is None:
            raise CommandFailed(f"the uplink interface {uplink!r} does not exist on this node")
        have = {a.split("/")[0]: a for a in nl.addresses(link.index) if ":" not in a}
        ours = set(managed)
        for ip, cidr in sorted(have.items()):
            if ip not in wanted and (ip in ours or _in_pool(ip, pool)):
                nl.addr_del(link.index, cidr)  # gone already if it went with its subnet's primary
                changed.append(f"removed {cidr} from {uplink}")
        # removing a primary address takes the secondaries of its subnet along: look again
        have = {a.split("/")[0]: a for a in nl.addresses(link.index) if ":" not in a}
        for ip in sorted(wanted - set(have)):
            nl.addr_add(link.index, f"{ip}/{prefixlen}")
            changed.append(f"added {ip}/{prefixlen} to {uplink}")
    return changed


def reconcile_router(netns: str | None, spec: RouterSpec | None, state_dir: str | os.PathLike[str], *,
                     prefixlen: int = 32, pool: tuple[str, str] | None = None,
                     names: HostNames | None = None) -> list[str]:
    """One pass: make the node route as ``spec`` says (None: no router here).

    Turns forwarding on (and back to what it was once the last router is gone), keeps
    the external addresses on the uplink (removing ours that are no longer wanted: in
    ``pool``, or added by an earlier pass), and reloads the table when it is missing,
    edited by hand or out of date. A node that never had a router is not touched at
    all; only this stack's table (``names``) is ever loaded or removed, and forwarding
    stays on while another stack's router shares the namespace. Returns what changed;
    raises CommandFailed (nothing half-applied in nftables)."""
    names = names or HostNames()
    sdir = Path(state_dir)
    state = _load_state(sdir)
    if spec is None:
        if state is None:
            return []
        return _remove(netns, sdir, state, pool, names)
    state = state or RouterState()
    changed: list[str] = []
    script = build_router_ruleset(spec, names)  # invalid specs fail before anything is touched
    if state.uplink and state.uplink != spec.uplink:
        changed += _sync_addresses(netns, state.uplink, set(), prefixlen, pool, state.addresses)
    current = read_sysctl(netns, FORWARD_KEY)
    if current != "1":
        if state.forward_before is None:
            state.forward_before = current
        write_sysctl(netns, FORWARD_KEY, "1")
        changed.append("forwarding turned on")
    wanted = spec.external_ips()
    if spec.uplink:
        changed += _sync_addresses(netns, spec.uplink, wanted, prefixlen, pool, state.addresses)
    state.uplink, state.addresses = spec.uplink, sorted(wanted)
    if script != state.script or router_table(netns, names) != state.listing:
        _load(netns, script)
        state.script, state.listing = script, router_table(netns, names) or ""
        changed.append("router rules loaded")
    _save_state(sdir, state)
    return changed


def _remove(netns: str | None, sdir: Path, state: RouterState, pool: tuple[str, str] | None,
            names: HostNames) -> list[str]:
    changed: list[str] = []
    if router_table(netns, names) is not None:
        r = run_in_netns(netns, ["nft", "delete", "table", "ip", names.nat_table], timeout=30)
        if r.returncode:
            raise CommandFailed(f"could not remove the router table: {r.stderr.strip()}")
        changed.append("router rules removed")
    if state.uplink:
        try:
            changed += _sync_addresses(netns, state.uplink, set(), 32, pool, state.addresses)
        except CommandFailed:
            pass  # the uplink is gone, and its addresses with it
    if state.forward_before is not None and state.forward_before != "1":
        others = _other_routers(netns, names)
        if others:
            changed.append(f"forwarding left on for {', '.join(others)}")
        else:
            write_sysctl(netns, FORWARD_KEY, state.forward_before)
            changed.append(f"forwarding restored to {state.forward_before}")
    (sdir / STATE_FILE).unlink(missing_ok=True)
    return changed
