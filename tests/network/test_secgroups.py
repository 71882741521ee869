"""Security groups: golden rulesets and real TCP connections through the nftables rules."""

from __future__ import annotations

import re
import socket
import struct

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import CommandFailed, InvalidSpec
from network.model import HostNames, NetworkAttachment, Port, SecurityGroup, SecurityGroupRule
from network.netlink import run_in_netns, socket_in_netns
from network.reconcile import reconcile
from network.secgroups import apply_ruleset, build_ruleset, rule_counters
from tests.network.golden import assert_golden
from tests.network.lab import Lab, listen, tcp_exchange, wait_ping

ANY_OUT = SecurityGroup("any-out", (SecurityGroupRule("egress"), SecurityGroupRule("egress", ethertype="ipv6")))


def ssh_only(remote_group: str | None = None) -> SecurityGroup:
    return SecurityGroup("ssh", (SecurityGroupRule("ingress", "tcp", 22, 22, remote_group=remote_group),))


@pytest.mark.unit
def test_ruleset_matches_golden_file() -> None:
    web = Port("web", "02:00:00:00:07:01", ("10.70.0.10", "fd00:70::10"), ("ssh", "web", "any-out"), "tp700-1")
    db = Port("db", "02:00:00:00:07:02", ("10.70.0.20",), ("db",), "tp700-2")
    groups = {
        "ssh": ssh_only(),
        "web": SecurityGroup("web", (
            SecurityGroupRule("ingress", "tcp", 80, 443, remote_cidr="0.0.0.0/0"),
            SecurityGroupRule("ingress", "icmp"),
            SecurityGroupRule("ingress", "tcp", 80, 80, remote_cidr="fd00::/8"),
        )),
        "db": SecurityGroup("db", (
            SecurityGroupRule("ingress", "tcp", 5432, 5432, remote_group="web"),
            SecurityGroupRule("egress", "udp", 53, 53, remote_cidr="10.70.0.1/32"),
        )),
        "any-out": ANY_OUT,
    }
    net = NetworkAttachment(700, (web, db), remote_vteps=("192.0.2.2",), gateway=("10.70.0.1/24",))
    text = build_ruleset([net], groups, {"web": ["10.70.0.10", "fd00:70::10"]})
    assert_golden("nft_two_ports.nft", text)


@pytest.mark.unit
def test_ruleset_rejects_unknown_group_and_bad_rules() -> None:
    p = Port("x", "02:00:00:00:07:03", ("10.0.0.3",), ("nope",), "tpx")
    with pytest.raises(InvalidSpec):
        build_ruleset([NetworkAttachment(7, (p,))], {}, {})
    with pytest.raises(InvalidSpec):
        SecurityGroupRule("ingress", "icmp", 1, 2)
    with pytest.raises(InvalidSpec):
        SecurityGroupRule("ingress", "tcp", 90, 80)


@pytest.mark.functional
def test_security_group_allows_tcp_22_not_80_both_directions_and_rule_changes_apply(lab: Lab) -> None:
    cli = Port("cli", "02:00:00:00:06:01", ("10.80.0.1",), ("client", "any-out"), "tp600-1")
    srv = Port("srv", "02:00:00:00:06:02", ("10.80.0.2",), ("ssh", "any-out"), "tp600-2")
    other = Port("oth", "02:00:00:00:06:03", ("10.80.0.3",), ("any-out",), "tp600-3")
    net = VirtualNetwork(600, {"n1": [cli], "n2": [srv], "n3": [other]})
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    eps = {
        "cli": lab.endpoint(1, "sgc", cli, "10.80.0.1/24"),
        "srv": lab.endpoint(2, "sgs", srv, "10.80.0.2/24"),
        "oth": lab.endpoint(3, "sgo", other, "10.80.0.3/24"),
    }
    states = {n: node_state(f"n{n}", nodes, [net]) for n in (1, 2, 3)}
    for n, st in states.items():
        assert reconcile(lab.node(n), st).ok
    assert wait_ping(eps["cli"], "10.80.0.2")  # no firewall yet: plain reachability

    groups = {"ssh": ssh_only(remote_group="client"), "any-out": ANY_OUT,
              "client": SecurityGroup("client")}
    members = {"client": ["10.80.0.1"]}

    def firewall(g: dict[str, SecurityGroup]) -> None:
        for n, st in states.items():
            apply_ruleset(lab.node(n), build_ruleset(st.networks, g, members))

    firewall(groups)
    servers = {(ns, p): listen(eps[ns], f"10.80.0.{i}", p) for ns, i in (("srv", 2), ("cli", 1))
               for p in (22, 80)}
    try:
        assert tcp_exchange(eps["cli"], servers["srv", 22], "10.80.0.2", 22) == "ok"  # allowed, reply passes
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 80) == "timeout"  # not allowed: dropped
        assert tcp_exchange(eps["oth"], None, "10.80.0.2", 22) == "timeout"  # not in the remote group
        # the other direction: srv may send anything, but cli denies inbound by default
        assert tcp_exchange(eps["srv"], None, "10.80.0.1", 22) == "timeout"
        assert tcp_exchange(eps["srv"], None, "10.80.0.1", 80) == "timeout"
        assert "default deny inbound" in rule_counters(lab.node(2))
        # the nodes' own VXLAN packets (in on node 2, out on node 1) skip conntrack
        assert _notracked(lab.node(2), "zones") > 0 and _notracked(lab.node(1), "vxlan_out") > 0

        # change: srv now allows 80 from anywhere and no longer 22
        groups["ssh"] = SecurityGroup("ssh", (SecurityGroupRule("ingress", "tcp", 80, 80),))
        firewall(groups)
        res = tcp_exchange(eps["oth"], servers["srv", 80], "10.80.0.2", 80)
        assert res == "ok", rule_counters(lab.node(2)) + rule_counters(lab.node(3))
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 22) == "timeout"

        # egress rules bind too: without an egress rule cli cannot even start a connection
        no_out = {**groups, "any-out": SecurityGroup("any-out")}
        firewall(no_out)
        assert tcp_exchange(eps["cli"], None, "10.80.0.2", 80) == "timeout"
    finally:
        for s in servers.values():
            s.close()


def _notracked(ns: str, chain: str) -> int:
    """Packets the "overlay underlay" notrack rule of ``chain`` has matched."""
    text = run_in_netns(ns, ["nft", "list", "chain", "inet", HostNames().sg_table, chain]).stdout
    line = next(ln for ln in text.splitlines() if "notrack" in ln)
    return int(line.split("packets ")[1].split()[0])


@pytest.mark.functional
def test_a_rejected_ruleset_leaves_the_previous_one_in_place(lab: Lab) -> None:
    st = lab.state(3, (NetworkAttachment(610, ()),))
    apply_ruleset(lab.node(3), build_ruleset(st.networks, {}, {}))
    before = _rules(lab.node(3))
    with pytest.raises(CommandFailed):
        apply_ruleset(lab.node(3), build_ruleset(st.networks, {}, {}).replace("policy accept;", "policy bogus;", 1))
    assert _rules(lab.node(3)) == before


def _rules(ns: str) -> str:
    """The live table without counter values (stray overlay packets move those)."""
    return re.sub(r"packets \d+ bytes \d+", "", rule_counters(ns))


def vxlan_packet(vni: int, dst_mac: str, src_mac: str, src: str, dst: str, dport: int, payload: bytes) -> bytes:
    """A VXLAN datagram carrying one Ethernet frame with a UDP datagram inside."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    words = sum(struct.unpack("!10H", header))
    words = (words & 0xFFFF) + (words >> 16)
    header = header[:10] + struct.pack("!H", ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF) + header[12:]
    frame = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    return struct.pack("!II", 0x08000000, vni << 8) + frame + header + udp


def udp_received(receiver: socket.socket, seconds: float = 1.0) -> bytes | None:
    receiver.settimeout(seconds)
    try:
        return receiver.recv(2048)
    except TimeoutError:
        return None


@pytest.mark.functional
def test_guests_reach_no_node_service_and_vxlan_is_taken_only_from_member_nodes(lab: Lab) -> None:
    """Attacks: a guest connects to services on its node (through its gateway address and
    the node's underlay address); a node that is no member of a network injects a frame
    into it by sending VXLAN to a member. Both fail; DHCP/DNS and a member's VXLAN pass."""
    guest = Port("g", "02:00:00:00:09:61", ("10.96.0.10",), ("open",), "tp961-1")
    peer = Port("h", "02:00:00:00:09:62", ("10.96.0.20",), ("open",), "tp961-2")
    net = VirtualNetwork(961, {"n1": [guest], "n2": [peer]}, {"n1": ["10.96.0.1/24"]})
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    ep = lab.endpoint(1, "hg", guest, "10.96.0.10/24", gw="10.96.0.1")
    lab.endpoint(2, "hh", peer, "10.96.0.20/24")
    groups = {"open": SecurityGroup("open", (SecurityGroupRule("ingress"), SecurityGroupRule("egress")))}
    for n in (1, 2):
        state = node_state(f"n{n}", nodes, [net])
        assert reconcile(lab.node(n), state).ok
        apply_ruleset(lab.node(n), build_ruleset(state.networks, groups, {}))
    assert wait_ping(ep, "10.96.0.20") and wait_ping(ep, "10.96.0.1")  # the overlay, and ping to the gateway
    service = listen(lab.node(1), "0.0.0.0", 7443)  # stands in for the API, Redis, PostgreSQL, NBD
    dns = socket_in_netns(lab.node(1), socket.AF_INET, socket.SOCK_DGRAM)
    inner = socket_in_netns(ep, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for address in ("10.96.0.1", lab.vtep(1)):
            assert tcp_exchange(ep, None, address, 7443) == "refused", address
        dns.bind(("10.96.0.1", 53))
        sender = socket_in_netns(ep, socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(b"query", ("10.96.0.1", 53))
        sender.close()
        assert udp_received(dns) == b"query"  # DNS to the gateway still works
        inner.bind(("10.96.0.10", 9961))
        for node, payload in ((2, b"from a member"), (3, b"from a stranger")):
            vx = socket_in_netns(lab.node(node), socket.AF_INET, socket.SOCK_DGRAM)
            vx.sendto(vxlan_packet(961, guest.mac, peer.mac, "10.96.0.20", "10.96.0.10", 9961, payload),
                      (lab.vtep(1), 4789))
            vx.close()
        assert udp_received(inner) == b"from a member"
        assert udp_received(inner) is None, "a node outside the network injected a frame into it"
    finally:
        for sock in (service, dns, inner):
            sock.close()
