"""Security groups as nftables rulesets: a pure builder and an atomic apply.

Where the rules hook (see network/README.md for the reasoning): this kernel has no
bridge-family conntrack, so a stateful firewall between ports of one bridge uses
br_netfilter, which passes bridged IPv4/IPv6 frames through the ``inet`` hooks. In
``prerouting`` the input interface is the bridge port the frame came from (the VM's
egress), in ``postrouting`` the output interface is the port it goes to (the VM's
ingress): both can jump to per-port chains by interface name, and conntrack sees every
packet, so replies to allowed connections pass in both directions. Conntrack zones
(one per network) keep equal addresses of different projects' networks apart.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence

from network.errors import CommandFailed, InvalidSpec
from network.model import (
    BRIDGE_PREFIX,
    VXLAN_PORT,
    HostNames,
    NetworkAttachment,
    Port,
    SecurityGroup,
    SecurityGroupRule,
)
from network.netlink import run_in_netns, write_sysctl

_SAFE = re.compile(r"[^A-Za-z0-9_]")


ZONES = 65535  # conntrack zones are 16 bits; 0 is the default zone


def zone_for(vni: int) -> int:
    """The preferred conntrack zone of network ``vni`` (VNIs 65535 apart share it: the
    zone a network really gets comes from :func:`assign_zones`)."""
    return vni % ZONES + 1


def assign_zones(vnis: Iterable[int], shared: Mapping[int, int] | None = None,
                 previous: Mapping[int, int] | None = None) -> dict[int, int]:
    """A conntrack zone for each VNI of a node, never the same for two networks unless
    ``shared`` gives them the same one (a router's networks share a zone).

    Each group (the VNIs ``shared`` maps to one value, or a VNI alone) keeps its zone of
    ``previous`` while no other group holds it, else takes its preferred zone (``shared``
    or :func:`zone_for`), else the next free one: equal 5-tuples of two networks never
    meet in one conntrack entry, even when VNIs lie 65535 apart."""
    shared, previous = shared or {}, previous or {}
    groups: dict[tuple[str, int], list[int]] = {}
    for vni in sorted(set(vnis)):
        key = ("shared", shared[vni]) if vni in shared else ("alone", vni)
        groups.setdefault(key, []).append(vni)
    taken: set[int] = set()
    out: dict[int, int] = {}
    ordered = sorted(groups.values(), key=lambda g: (not any(v in previous for v in g), g[0]))
    for members in ordered:
        wanted = [previous[v] for v in members if v in previous]
        wanted.append(shared.get(members[0], zone_for(members[0])))
        zone = next((z for z in wanted if z not in taken), None)
        if zone is None:
            free = (z for z in ((w - 1) % ZONES + 1 for w in range(wanted[-1], wanted[-1] + ZONES)) if z not in taken)
            zone = next(free, None)
            if zone is None:
                raise InvalidSpec(f"more than {ZONES} networks on one node: conntrack has no zone left")
        taken.add(zone)
        out.update(dict.fromkeys(members, zone))
    return out


def _set_name(group_id: str, family: str) -> str:
    return f"g_{_SAFE.sub('_', group_id)}_{family}"


def _rule_text(rule: SecurityGroupRule, group_id: str) -> str:
    fam = "ip" if rule.ethertype == "ipv4" else "ip6"
    side = "saddr" if rule.direction == "ingress" else "daddr"
    parts: list[str] = []
    if rule.remote_cidr:
        parts.append(f"{fam} {side} {ipaddress.ip_network(rule.remote_cidr, strict=False)}")
    elif rule.remote_group:
        parts.append(f"{fam} {side} @{_set_name(rule.remote_group, 'v4' if fam == 'ip' else 'v6')}")
    else:
        parts.append(f"meta nfproto {rule.ethertype}")
    if rule.protocol in ("tcp", "udp"):
        if rule.port_min is not None:
            rng = str(rule.port_min) if rule.port_min == rule.port_max else f"{rule.port_min}-{rule.port_max}"
            parts.append(f"{rule.protocol} dport {rng}")
        else:
            parts.append(f"meta l4proto {rule.protocol}")
    elif rule.protocol == "icmp":
        parts.append("meta l4proto icmp")
    elif rule.protocol == "icmpv6":
        parts.append("meta l4proto ipv6-icmp")
    parts.append(f'counter accept comment "sg {_SAFE.sub("_", group_id)}"')
    return " ".join(parts)


def _port_chains(port: Port, groups: Mapping[str, SecurityGroup]) -> list[str]:
    rules: list[tuple[str, SecurityGroupRule]] = []
    for gid in port.security_groups:
        if gid not in groups:
            raise InvalidSpec(f"port {port.id}: unknown security group {gid!r}")
        rules.extend((gid, r) for r in groups[gid].rules)
    name = port.host_ifname
    out = [f"\tchain egress_{name} {{"]
    out.append("\t\tct state established,related accept")
    out.append("\t\tct state invalid counter drop")
    out.append("\t\tudp sport 68 udp dport 67 accept comment \"DHCP request\"")
    out.append("\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept")
    out.extend(f"\t\t{_rule_text(r, g)}" for g, r in rules if r.direction == "egress")
    out.append("\t\tcounter drop comment \"no egress rule allows it\"")
    out.append("\t}")
    out.append(f"\tchain ingress_{name} {{")
    out.append("\t\tct state established,related accept")
    out.append("\t\tct state invalid counter drop")
    out.append("\t\tudp sport 67 udp dport 68 accept comment \"DHCP reply\"")
    out.append("\t\ticmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept")
    out.extend(f"\t\t{_rule_text(r, g)}" for g, r in rules if r.direction == "ingress")
    out.append("\t\tcounter drop comment \"default deny inbound\"")
    out.append("\t}")
    return out


def link_local(mac: str) -> str:
    """The EUI-64 IPv6 link-local address a port's MAC gives it (Linux' default)."""
    octets = [int(b, 16) for b in mac.split(":")]
    octets[0] ^= 0x02
    return str(ipaddress.IPv6Address(bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, *octets[:3], 0xFF, 0xFE, *octets[3:]])))


def _spoof_chain(port: Port) -> list[str]:
    """What a port may send at all: its own MAC and addresses (its MAC's link-local for
    IPv6), untagged IPv4, IPv6 and ARP only, no router advertisements or redirects, and
    neighbour advertisements only for its own addresses."""
    v4 = sorted(ip for ip in port.ips if ipaddress.ip_address(ip).version == 4)
    v6 = sorted(ip for ip in port.ips if ipaddress.ip_address(ip).version == 6)
    own6 = [link_local(port.mac), *v6]
    out = [f"\tchain spoof_{port.host_ifname} {{"]
    out.append(f"\t\tether saddr != {port.mac} counter drop comment \"spoofed MAC\"")
    # VLAN-tagged (or any other) frames would carry IP past every check below
    out.append("\t\tether type != { ip, ip6, arp } counter drop comment \"not untagged IPv4, IPv6 or ARP\"")
    out.append("\t\tip saddr 0.0.0.0 udp sport 68 udp dport 67 return comment \"DHCP discover\"")
    if v4:
        out.append(f"\t\tip saddr != {{ {', '.join(v4)} }} counter drop comment \"spoofed IPv4\"")
        out.append(f"\t\tarp saddr ip != {{ {', '.join(v4)} }} counter drop comment \"spoofed ARP\"")
    else:
        out.append("\t\tether type { ip, arp } counter drop comment \"no IPv4 address: no IPv4, no ARP\"")
    out.append(f"\t\tarp saddr ether != {port.mac} counter drop comment \"spoofed ARP MAC\"")
    out.append("\t\ticmpv6 type { nd-router-advert, nd-redirect } counter drop comment \"a port is no router\"")
    out.append(f"\t\tip6 saddr != {{ {', '.join(['::', *own6])} }} counter drop comment \"spoofed IPv6\"")
    # the target address follows type, code, checksum and 4 reserved bytes
    targets = ", ".join(f"0x{int(ipaddress.IPv6Address(a)):032x}" for a in own6)
    out.append(f"\t\ticmpv6 type nd-neighbor-advert @th,64,128 != {{ {targets} }} counter drop "
               "comment \"neighbour advertisement for an address not its own\"")
    out.append("\t}")
    return out


def _host_chain(networks: Sequence[NetworkAttachment], names: HostNames) -> list[str]:
    """Guests never reach the node itself: of what a port sends to the host's own
    addresses (any of them, through its network's bridge) only DHCP, DNS and ping to its
    gateway address pass; the rest is rejected. VXLAN for this stack's networks is taken
    only from their member nodes' underlay addresses (a guest, or anyone else, could
    otherwise inject frames into any network by sending UDP 4789 to a node)."""
    nets = sorted(networks, key=lambda n: n.vni)
    if not nets:
        return []
    out: list[str] = []
    peers = {ver: sorted({v for n in nets for v in n.remote_vteps if ipaddress.ip_address(v).version == ver})
             for ver in (4, 6)}
    for ver, typ in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        out.append(f"\tset vxlan_peers{ver} {{")
        out.append(f"\t\ttype {typ}")
        if peers[ver]:
            out.append(f"\t\telements = {{ {', '.join(peers[ver])} }}")
        out.append("\t}")
    vnis = ", ".join(str(n.vni) for n in nets)
    bridges = ", ".join(f'"{names.bridge(n.vni)}"' for n in nets)
    gateways = [f'"{names.bridge(n.vni)}" . {ipaddress.ip_interface(g).ip}'
                for n in nets for g in n.gateway if ipaddress.ip_interface(g).version == 4]
    out += [
        "\tchain to_host {",
        "\t\ttype filter hook input priority filter; policy accept;",
        # the VNI is the 24 bits after the 8-byte UDP header and 4 bytes of VXLAN flags
        f"\t\tudp dport {VXLAN_PORT} @th,96,24 {{ {vnis} }} ip saddr != @vxlan_peers4 counter drop "
        'comment "VXLAN from a node that is no member"',
        f"\t\tudp dport {VXLAN_PORT} @th,96,24 {{ {vnis} }} ip6 saddr != @vxlan_peers6 counter drop "
        'comment "VXLAN from a node that is no member"',
        f"\t\tiifname != {{ {bridges} }} return",
        "\t\tct state established,related accept",
        '\t\tudp sport 68 udp dport 67 accept comment "DHCP"',
        '\t\tudp sport 546 udp dport 547 accept comment "DHCPv6"',
        "\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
    ]
    if gateways:
        pairs = ", ".join(gateways)
        out.append(f'\t\tiifname . ip daddr {{ {pairs} }} meta l4proto {{ tcp, udp }} th dport 53 accept comment "DNS"')
        out.append(f'\t\tiifname . ip daddr {{ {pairs} }} icmp type echo-request accept comment "ping the gateway"')
    out += [
        '\t\tmeta l4proto tcp counter reject with tcp reset comment "guests reach no node service"',
        '\t\tcounter reject with icmpx admin-prohibited comment "guests reach no node service"',
        "\t}",
    ]
    return out


def build_ruleset(
    networks: Sequence[NetworkAttachment],
    groups: Mapping[str, SecurityGroup],
    group_members: Mapping[str, Sequence[str]],
    zones: Mapping[int, int] | None = None,
    names: HostNames | None = None,
) -> str:
    """The whole nftables script for one node's ports (an ``nft -f`` transaction).

    ``networks`` are the node's attachments (only ports with a ``host_ifname`` get
    rules), ``groups`` every group those ports use, ``group_members`` the addresses of
    every port cluster-wide in each group referenced as a remote group, ``zones`` the
    conntrack zones of VNIs (:func:`assign_zones`' result; a router's networks share one),
    ``names`` this stack's bridge and table names (its tables only ever match its own
    bridges and ports, so other stacks' tables in the namespace keep working)."""
    names = names or HostNames()
    table = names.sg_table
    ports = sorted((p for n in networks for p in n.ports if p.host_ifname), key=lambda p: p.host_ifname)
    used_remote = sorted({
        r.remote_group for p in ports for g in p.security_groups if g in groups
        for r in groups[g].rules if r.remote_group
    })
    lines = [
        "# cairn security groups (generated; replaced as a whole in one transaction)",
        f"table bridge {table}",
        f"delete table bridge {table}",
        f"table inet {table}",
        f"delete table inet {table}",
        "",
        "# port security: a port sends only with its own MAC and addresses (stateless, bridge family)",
        f"table bridge {table} {{",
        "\tchain from_ports {",
        "\t\ttype filter hook prerouting priority filter; policy accept;",
    ]
    if ports:
        vmap = ", ".join(f'"{p.host_ifname}" : jump spoof_{p.host_ifname}' for p in ports)
        lines.append(f"\t\tiifname vmap {{ {vmap} }}")
    lines.append("\t}")
    for p in ports:
        lines.extend(_spoof_chain(p))
    lines += [
        "}",
        "",
        "# stateful groups: br_netfilter hands bridged IP traffic to these inet hooks",
        f"table inet {table} {{",
    ]
    for gid in used_remote:
        members = group_members.get(gid, ())
        for fam, typ, ver in (("v4", "ipv4_addr", 4), ("v6", "ipv6_addr", 6)):
            addrs = sorted(a for a in members if ipaddress.ip_address(a).version == ver)
            lines.append(f"\tset {_set_name(gid, fam)} {{")
            lines.append(f"\t\ttype {typ}")
            if addrs:
                lines.append(f"\t\telements = {{ {', '.join(addrs)} }}")
            lines.append("\t}")
    lines += _host_chain(networks, names)
    # in the inet prerouting hook br_netfilter reports the bridge as input interface
    zone = assign_zones((n.vni for n in networks), zones)
    zone_of = [f'"{names.bridge(n.vni)}" : {zone[n.vni]}'
               for n in sorted(networks, key=lambda n: n.vni)]
    lines.append("\tchain zones {")
    lines.append("\t\ttype filter hook prerouting priority raw; policy accept;")
    # the node's own VXLAN packets carry whole networks: no state to keep for them, and
    # tracking them would cost every overlay packet two more conntrack lookups
    lines.append(f'\t\tiifname != "{BRIDGE_PREFIX}*" udp dport {VXLAN_PORT} counter notrack comment "overlay underlay"')
    if zone_of:
        lines.append(f"\t\tct zone set iifname map {{ {', '.join(zone_of)} }}")
    lines.append("\t}")
    lines += [
        "\tchain vxlan_out {",
        "\t\ttype filter hook output priority raw; policy accept;",
        f'\t\tudp dport {VXLAN_PORT} counter notrack comment "overlay underlay"',
        "\t}",
    ]
    lines.append("\tchain from_ports {")
    lines.append("\t\ttype filter hook prerouting priority filter; policy accept;")
    if ports:
        # the input interface here is the bridge, so the port is known by its (anti-spoofed) MAC
        vmap = ", ".join(f"{p.mac} : jump egress_{p.host_ifname}" for p in ports)
        lines.append(f"\t\tether saddr vmap {{ {vmap} }}")
    lines.append("\t}")
    # ingress: br_netfilter reports the bridge as output interface too, so a port is
    # found by (its network's bridge, its address); the forward hook sees bridged
    # and routed traffic towards ports alike
    lines.append("\tchain to_ports {")
    lines.append("\t\ttype filter hook forward priority filter; policy accept;")
    for fam, ver in (("ip", 4), ("ip6", 6)):
        pairs = [
            f'"{names.bridge(n.vni)}" . {ip} : jump ingress_{p.host_ifname}'
            for n in sorted(networks, key=lambda n: n.vni)
            for p in sorted(n.ports, key=lambda p: p.host_ifname)
            if p.host_ifname
            for ip in sorted(p.ips)
            if ipaddress.ip_address(ip).version == ver
        ]
        if pairs:
            lines.append(f"\t\toifname . {fam} daddr vmap {{ {', '.join(pairs)} }}")
    lines.append("\t}")
    for p in ports:
        lines.extend(_port_chains(p, groups))
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_ruleset(netns: str | None, ruleset: str) -> None:
    """Load a ruleset from :func:`build_ruleset` in one nft transaction (all or nothing).

    Also turns on br_netfilter for the namespace so bridged frames reach the inet hooks."""
    for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        write_sysctl(netns, key, "1")
    r = run_in_netns(netns, ["nft", "-f", "-"], input=ruleset, timeout=30)
    if r.returncode:
        raise CommandFailed(f"nft rejected the ruleset (nothing changed): {r.stderr.strip()[-800:]}")


def remove_ruleset(netns: str | None, names: HostNames | None = None) -> bool:
    """Remove this stack's security group tables (a node taken down); True when there were any."""
    table = (names or HostNames()).sg_table
    r = run_in_netns(netns, ["nft", "list", "tables"], timeout=30)
    present = [line.split()[1] for line in r.stdout.splitlines()
               if line.split()[:1] == ["table"] and line.split()[-1] == table]
    if not present:
        return False
    script = "".join(f"delete table {family} {table}\n" for family in present)
    r = run_in_netns(netns, ["nft", "-f", "-"], input=script, timeout=30)
    if r.returncode:
        raise CommandFailed(f"could not remove the security group tables: {r.stderr.strip()}")
    return True


def rule_counters(netns: str | None, names: HostNames | None = None) -> str:
    """The live table as text (for diagnostics and tests)."""
    r = run_in_netns(netns, ["nft", "list", "table", "inet", (names or HostNames()).sg_table], timeout=30)
    if r.returncode:
        raise CommandFailed(r.stderr.strip())
    return r.stdout
