"""Security groups: golden rulesets and real TCP connections through the nftables rules."""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import CommandFailed, InvalidSpec
from network.model import HostNames, NetworkAttachment, Port, SecurityGroup, SecurityGroupRule
from network.netlink import run_in_netns, socket_in_netns
from network.reconcile import reconcile
from network.secgroups import apply_ruleset, assign_zones, build_ruleset, link_local, rule_counters
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


@pytest.mark.functional
def test_a_guest_injects_no_frame_by_sending_vxlan_to_its_node(lab: Lab) -> None:
    """The attack: a guest sends VXLAN (UDP 4789) to its own node, through its gateway and
    to the node's underlay address, carrying a frame for its own network (posing as a port
    of another node) and for another tenant's network on the same node. Decapsulated, it
    would inject frames into any network of its node. All are dropped; the same frames from
    a member node arrive (so they are sound)."""
    guest = Port("g", "02:00:00:00:09:63", ("10.63.0.10",), ("open",), "tp963-1")
    peer = Port("p", "02:00:00:00:09:64", ("10.63.0.20",), ("open",), "tp963-2")
    victim = Port("v", "02:00:00:00:09:65", ("10.64.0.10",), ("open",), "tp964-1")
    other = Port("o", "02:00:00:00:09:66", ("10.64.0.20",), ("open",), "tp964-2")
    nets = [VirtualNetwork(963, {"n1": [guest], "n2": [peer]}, {"n1": ["10.63.0.1/24"]}),
            VirtualNetwork(964, {"n1": [victim], "n2": [other]}, {"n1": ["10.64.0.1/24"]})]
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2)}
    ep = lab.endpoint(1, "vg", guest, "10.63.0.10/24", gw="10.63.0.1")
    lab.endpoint(2, "vp", peer, "10.63.0.20/24")
    vic = lab.endpoint(1, "vv", victim, "10.64.0.10/24", gw="10.64.0.1")
    lab.endpoint(2, "vo", other, "10.64.0.20/24")
    groups = {"open": SecurityGroup("open", (SecurityGroupRule("ingress"), SecurityGroupRule("egress")))}
    for n in (1, 2):
        state = node_state(f"n{n}", nodes, nets)
        assert reconcile(lab.node(n), state).ok
        apply_ruleset(lab.node(n), build_ruleset(state.networks, groups, {}))
    assert wait_ping(ep, "10.63.0.20") and wait_ping(vic, "10.64.0.20")
    frames = {  # (VNI, frame's destination port, its forged sender) -> the socket it would reach
        "into another tenant's network": (964, victim, other, vic),
        "into its own network as another node's port": (963, guest, peer, ep),
    }
    receivers = {}
    try:
        for what, (_, dst, _, ns) in frames.items():
            receivers[what] = socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
            receivers[what].bind((dst.ips[0], 9960))
        sender = socket_in_netns(ep, socket.AF_INET, socket.SOCK_DGRAM)
        injected = []
        for what, (vni, dst, src, _) in frames.items():
            for node_address in ("10.63.0.1", lab.vtep(1)):
                sender.sendto(vxlan_packet(vni, dst.mac, src.mac, src.ips[0], dst.ips[0], 9960, b"forged"),
                              (node_address, 4789))
                if udp_received(receivers[what]) is not None:
                    injected.append(f"{what} (sent to {node_address})")
        sender.close()
        assert injected == [], f"a guest injected frames through its node's VXLAN port: {injected}"
        member = socket_in_netns(lab.node(2), socket.AF_INET, socket.SOCK_DGRAM)
        for what, (vni, dst, src, _) in frames.items():
            member.sendto(vxlan_packet(vni, dst.mac, src.mac, src.ips[0], dst.ips[0], 9960, b"member"),
                          (lab.vtep(1), 4789))
            assert udp_received(receivers[what], 3) == b"member", what
        member.close()
    finally:
        for sock in receivers.values():
            sock.close()


OPEN = SecurityGroup("open", tuple(SecurityGroupRule(d, ethertype=e) for d in ("ingress", "egress")
                                   for e in ("ipv4", "ipv6")))
ETH_P_ALL = 3


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv6_frame(src_mac: str, dst_mac: str, src: str, dst: str, next_header: int, body: bytes) -> bytes:
    """An IPv6 frame; ``body`` is a UDP or ICMPv6 message whose checksum is filled in
    (conntrack marks a bad one invalid, and invalid packets are dropped anyway)."""
    addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    at = 6 if next_header == 17 else 2
    pseudo = addrs + struct.pack("!IxxxB", len(body), next_header)
    body = body[:at] + struct.pack("!H", checksum(pseudo + body[:at] + b"\0\0" + body[at + 2:])) + body[at + 2:]
    header = struct.pack("!IHBB", 6 << 28, len(body), next_header, 255) + addrs
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x86\xdd" + header + body


def arrives(sender: str, victim: str, frame: bytes, needle: bytes) -> bool:
    """Send ``frame`` from the sender namespace's eth0; True when the victim's eth0 sees
    a frame holding ``needle``."""
    sniff = socket_in_netns(victim, socket.AF_PACKET, socket.SOCK_RAW)
    send = socket_in_netns(sender, socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sniff.bind(("eth0", ETH_P_ALL))
        sniff.settimeout(0.05)
        send.bind(("eth0", 0))
        send.send(frame)
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline:
            try:
                if needle in sniff.recv(65535):
                    return True
            except TimeoutError:
                continue
        return False
    finally:
        sniff.close()
        send.close()


@pytest.mark.functional
def test_port_security_stops_each_spoof_from_a_guest(lab: Lab) -> None:
    """Attacks from a guest namespace on its own network: a link-local source not its
    own, a router advertisement, a neighbour advertisement for another port's address,
    ARP from a port without IPv4, and IP inside a VLAN tag. All dropped; the same frames
    with the guest's own addresses pass (so the frames themselves are sound)."""
    attacker = Port("a", "02:00:00:00:09:71", ("10.97.0.10", "fd00:97::10"), ("open",), "tp971-1")
    victim = Port("v", "02:00:00:00:09:72", ("10.97.0.20", "fd00:97::20"), ("open",), "tp971-2")
    v6only = Port("b", "02:00:00:00:09:73", ("fd00:97::30",), ("open",), "tp971-3")
    net = VirtualNetwork(971, {"n1": [attacker, victim, v6only]})
    state = node_state("n1", {"n1": NodeUnderlay("ul0", lab.vtep(1))}, [net])
    eps = {p.id: lab.endpoint(1, f"sp{p.id}", p) for p in (attacker, victim, v6only)}
    assert reconcile(lab.node(1), state).ok
    apply_ruleset(lab.node(1), build_ruleset(state.networks, {"open": OPEN}, {}))
    a, v = eps[attacker.id], eps[victim.id]
    own_ll = link_local(attacker.mac)
    allnodes = "33:33:00:00:00:01"

    def udp6(src: str, marker: bytes) -> bytes:
        return ipv6_frame(attacker.mac, allnodes, src, "ff02::1", 17, struct.pack("!HHHH", 9, 9, 8 + 8, 0) + marker)

    assert arrives(a, v, udp6(own_ll, b"ll-own!!"), b"ll-own!!")
    leaks = []
    if arrives(a, v, udp6("fe80::dead", b"ll-fake!"), b"ll-fake!"):
        leaks.append("a forged link-local source")
    ra = ipv6_frame(attacker.mac, allnodes, own_ll, "ff02::1", 58, bytes([134, 0, 0, 0, 64, 0, 7, 8]) + b"\0" * 8
                    + b"ra-forged")
    if arrives(a, v, ra, b"ra-forged"):
        leaks.append("a router advertisement")

    def na(target: str) -> bytes:
        body = bytes([136, 0, 0, 0, 0x20, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, target)
        return ipv6_frame(attacker.mac, allnodes, own_ll, "ff02::1", 58, body + bytes([2, 1]) + mac_bytes(attacker.mac))

    assert arrives(a, v, na("fd00:97::10"), socket.inet_pton(socket.AF_INET6, "fd00:97::10"))
    stolen = socket.inet_pton(socket.AF_INET6, "fd00:97::20")
    if arrives(a, v, na("fd00:97::20"), stolen):
        leaks.append("a neighbour advertisement for the victim's address")
    arp = (b"\xff" * 6 + mac_bytes(v6only.mac) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
           + mac_bytes(v6only.mac) + socket.inet_aton("10.97.0.20") + b"\xff" * 6 + socket.inet_aton("10.97.0.20"))
    if arrives(eps[v6only.id], v, arp, socket.inet_aton("10.97.0.20") + b"\xff" * 6):
        leaks.append("ARP from a port without IPv4")
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 6, 0, 0, 64, 17, 0, socket.inet_aton("10.97.0.99"),
                        socket.inet_aton("10.97.0.20")) + struct.pack("!HHHH", 9, 9, 14, 0) + b"vlan!!"
    ends = mac_bytes(victim.mac) + mac_bytes(attacker.mac)
    for tags, what in ((b"\x81\x00\x00\x05", "a VLAN tag"), (b"\x88\xa8\x00\x05\x81\x00\x00\x06", "two VLAN tags")):
        if arrives(a, v, ends + tags + b"\x08\x00" + inner, b"vlan!!"):
            leaks.append(f"IPv4 inside {what}")
    assert leaks == [], f"these spoofs reached the victim: {leaks}"


@pytest.mark.functional
def test_networks_whose_vnis_lie_65535_apart_never_share_conntrack_state(lab: Lab) -> None:
    """Two tenants, same CIDR, VNIs 65535 apart on one node. Tenant A's flow between
    .2:5000 and .3:5000 must not let tenant B's packet with the same addresses and ports
    past B's default-deny (it would if both networks shared a conntrack zone)."""
    closed = SecurityGroup("closed", (SecurityGroupRule("egress"),))
    ports = {}
    for tenant in ("a", "b"):
        group = "open" if tenant == "a" else "closed"
        ports[tenant] = (Port(f"{tenant}c", f"02:00:00:00:1{tenant == 'b':d}:02", ("10.98.0.2",), ("open",),
                              f"tz{tenant}-c"),
                         Port(f"{tenant}s", f"02:00:00:00:1{tenant == 'b':d}:03", ("10.98.0.3",), (group,),
                              f"tz{tenant}-s"))
    nets = [VirtualNetwork(vni, {"n2": list(ports[t])}) for vni, t in ((1971, "a"), (1971 + 65535, "b"))]
    state = node_state("n2", {"n2": NodeUnderlay("ul0", lab.vtep(2))}, nets)
    eps = {p.id: lab.endpoint(2, f"z{p.id}", p, "10.98.0.2/24" if p.id.endswith("c") else "10.98.0.3/24")
           for t in ports for p in ports[t]}
    assert reconcile(lab.node(2), state).ok
    apply_ruleset(lab.node(2), build_ruleset(state.networks, {"open": OPEN, "closed": closed}, {}))
    socks = {}
    try:
        for name, ip in (("ac", "10.98.0.2"), ("as", "10.98.0.3"), ("bc", "10.98.0.2"), ("bs", "10.98.0.3")):
            socks[name] = socket_in_netns(eps[name], socket.AF_INET, socket.SOCK_DGRAM)
            socks[name].bind((ip, 5000))
        socks["ac"].sendto(b"hello a", ("10.98.0.3", 5000))
        assert udp_received(socks["as"], 3) == b"hello a"
        socks["as"].sendto(b"reply a", ("10.98.0.2", 5000))  # the flow is established in A's zone
        assert udp_received(socks["ac"], 3) == b"reply a"
        socks["bc"].sendto(b"sneak b", ("10.98.0.3", 5000))
        assert udp_received(socks["bs"], 1) is None, "tenant B's packet rode tenant A's conntrack entry"
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.unit
def test_conntrack_zones_are_unique_shared_by_routers_and_stable() -> None:
    assert assign_zones([1, 65536, 131071]) == {1: 2, 65536: 3, 131071: 4}  # all prefer zone 2
    routed = {5: 6, 7: 6}  # a router's two networks share a zone
    assert assign_zones([5, 7, 65540], routed) == {5: 6, 7: 6, 65540: 7}
    before = assign_zones([2, 65537])  # zone 3 and the next free one
    assert assign_zones([1, 2, 65537], previous=before) == {**before, 1: 2}  # a newcomer moves nobody
    assert assign_zones([65535, 130], previous={65535: 65535, 130: 131}) == {65535: 65535, 130: 131}
    taken = {v: v % 65535 + 1 for v in range(65535)}
    with pytest.raises(InvalidSpec, match="no zone left"):
        assign_zones([*taken, 70000], previous=taken)  # more networks than zones on one node
