"""The overlay with real kernel objects: three nodes as namespaces, VXLAN between them."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import InvalidSpec
from network.model import ZERO_MAC, HostNames, Port, bridge_name, vxlan_name
from network.netlink import node_links, run_in_netns, socket_in_netns
from network.reconcile import load_applied, reconcile
from network.secgroups import apply_ruleset, build_ruleset, remove_ruleset
from tests.network.lab import Lab, listen, ping, tcp_exchange, wait_ping

pytestmark = pytest.mark.functional


def underlays(lab: Lab) -> dict[str, NodeUnderlay]:
    return {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in range(1, lab.nodes + 1)}


def apply_all(lab: Lab, networks: list[VirtualNetwork], state_dir: object = None) -> None:
    nodes = underlays(lab)
    for n in range(1, lab.nodes + 1):
        report = reconcile(lab.node(n), node_state(f"n{n}", nodes, networks))
        assert report.ok, report.error


def port(i: int, vni: int, ip: str) -> Port:
    return Port(id=f"p{vni}-{i}", mac=f"02:00:00:{vni // 256:02x}:{vni % 256:02x}:{i:02x}", ips=(ip,),
                host_ifname=f"tp{vni}-{i}")


def test_endpoints_on_three_nodes_reach_each_other_by_ping_and_tcp(lab: Lab) -> None:
    ports = {f"n{n}": [port(n, 100, f"10.10.0.{n}")] for n in (1, 2, 3)}
    eps = {n: lab.endpoint(n, f"e100-{n}", ports[f"n{n}"][0], f"10.10.0.{n}/24") for n in (1, 2, 3)}
    apply_all(lab, [VirtualNetwork(100, ports)])
    assert wait_ping(eps[1], "10.10.0.2")
    assert ping(eps[1], "10.10.0.3") and ping(eps[3], "10.10.0.2")
    server = listen(eps[3], "10.10.0.3", 5000)
    try:
        assert tcp_exchange(eps[1], server, "10.10.0.3", 5000) == "ok"
    finally:
        server.close()
    with node_links(lab.node(1)) as nl:
        links = nl.links()
        assert links[bridge_name(100)].mtu == 1450 and links[vxlan_name(100)].mtu == 1450
        fdb = nl.fdb_entries(links[vxlan_name(100)].index)
    assert (ZERO_MAC, lab.vtep(2)) in fdb and (ZERO_MAC, lab.vtep(3)) in fdb
    assert (ports["n2"][0].mac, lab.vtep(2)) in fdb  # unicast entry per known remote MAC
    # a full 1450-byte IP packet with DF crosses the overlay; the endpoint cannot send more
    rx = socket_in_netns(eps[2], socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket_in_netns(eps[1], socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("10.10.0.2", 9999))
        rx.settimeout(3)
        tx.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO (DF)
        tx.sendto(b"x" * 1422, ("10.10.0.2", 9999))  # 1422 + 8 UDP + 20 IP = 1450
        assert len(rx.recv(65535)) == 1422
        with pytest.raises(OSError):
            tx.sendto(b"x" * 1423, ("10.10.0.2", 9999))
    finally:
        rx.close()
        tx.close()


def test_two_projects_with_the_same_cidr_never_see_each_others_packets(lab: Lab) -> None:
    a = {"n1": [port(1, 200, "10.30.0.1")], "n2": [port(2, 200, "10.30.0.2")]}
    b = {"n1": [port(1, 201, "10.30.0.1")], "n2": [port(2, 201, "10.30.0.2")]}
    a1 = lab.endpoint(1, "a1", a["n1"][0], "10.30.0.1/24")
    lab.endpoint(2, "a2", a["n2"][0], "10.30.0.2/24")
    b1 = lab.endpoint(1, "b1", b["n1"][0], "10.30.0.1/24")
    b2 = lab.endpoint(2, "b2", b["n2"][0], "10.30.0.2/24")
    with node_links(b2) as nl:
        nl.addr_add(nl.index("eth0"), "10.30.0.22/24")  # only project B has .22
    apply_all(lab, [VirtualNetwork(200, a), VirtualNetwork(201, b)])
    assert wait_ping(a1, "10.30.0.2") and wait_ping(b1, "10.30.0.22")
    a1_mac = a["n1"][0].mac
    # capture on node 2: B's port and B's VXLAN device, any frame from or to A's endpoint
    caps = [
        lab.popen(lab.node(2), ["tcpdump", "-i", dev, "-nn", "-e", "-l", "-U", "-Z", "root",
                                f"ether host {a1_mac}"])
        for dev in (b["n2"][0].host_ifname, vxlan_name(201))
    ]
    own = lab.popen(lab.node(2), ["tcpdump", "-i", vxlan_name(200), "-nn", "-e", "-l", "-U", "-Z", "root",
                                  f"ether host {a1_mac}"])
    time.sleep(1.5)  # tcpdump attaches
    assert ping(a1, "10.30.0.2", count=3)
    assert not ping(a1, "10.30.0.22", count=2)  # B's address does not exist for A
    time.sleep(0.5)
    seen = []
    for p in [*caps, own]:
        p.terminate()
        out, _ = p.communicate(timeout=5)
        seen.append([line for line in out.splitlines() if line.strip()])
    assert seen[0] == [] and seen[1] == [], f"project A's frames reached project B: {seen[:2]}"
    assert len(seen[2]) >= 6, "the capture saw A's own traffic on A's segment (the probe can fail)"
    with node_links(a1) as nl:
        assert nl.neighbours("eth0").get("10.30.0.2") == a["n2"][0].mac


def test_reconcile_is_idempotent_and_repairs_a_deleted_bridge_and_fdb_entry(lab: Lab, tmp_path: object) -> None:
    ports = {"n1": [port(1, 300, "10.40.0.1")], "n2": [port(2, 300, "10.40.0.2")]}
    e1 = lab.endpoint(1, "r1", ports["n1"][0], "10.40.0.1/24")
    lab.endpoint(2, "r2", ports["n2"][0], "10.40.0.2/24")
    nodes = underlays(lab)
    desired = node_state("n1", nodes, [VirtualNetwork(300, ports)])
    assert reconcile(lab.node(2), node_state("n2", nodes, [VirtualNetwork(300, ports)])).ok
    first = reconcile(lab.node(1), desired, tmp_path)  # type: ignore[arg-type]
    assert first.ok and first.changed
    second = reconcile(lab.node(1), desired, tmp_path)  # type: ignore[arg-type]
    assert second.ok and second.changed == []
    assert load_applied(tmp_path) == desired  # type: ignore[arg-type]
    assert wait_ping(e1, "10.40.0.2")
    with node_links(lab.node(1)) as nl:  # drift: someone deletes things by hand
        nl.delete(nl.index(bridge_name(300)))
        nl.fdb_del(nl.index(vxlan_name(300)), ZERO_MAC, lab.vtep(2))
    assert not ping(e1, "10.40.0.2", count=1)
    repaired = reconcile(lab.node(1), desired, tmp_path)  # type: ignore[arg-type]
    assert repaired.ok and any("created bridge" in c for c in repaired.changed)
    assert any(f"fdb {vxlan_name(300)} {ZERO_MAC}" in c for c in repaired.changed)
    assert wait_ping(e1, "10.40.0.2")


def test_a_port_that_moves_to_another_node_is_reached_there(lab: Lab) -> None:
    """A live migration: the guest's MAC leaves n2 for n3 (which carried the network
    before the guest arrived). n1's forwarding entry for that MAC must point at n3 now
    (an append left the old remote in place, and removing it dropped the MAC)."""
    moving = port(2, 500, "10.60.0.2")
    ports = {"n1": [port(1, 500, "10.60.0.1")], "n2": [moving]}
    e1 = lab.endpoint(1, "m1", ports["n1"][0], "10.60.0.1/24")
    e2 = lab.endpoint(2, "m2", moving, "10.60.0.2/24")
    apply_all(lab, [VirtualNetwork(500, ports, carriers=frozenset({"n3"}))])
    assert wait_ping(e1, "10.60.0.2")
    with node_links(e2) as nl:  # the guest is paused on n2 and resumes on n3
        nl.set_link(nl.index("eth0"), state="down")
    lab.endpoint(3, "m3", moving, "10.60.0.2/24")  # its tap: the same name on the new node
    apply_all(lab, [VirtualNetwork(500, {"n1": ports["n1"], "n3": [moving]})])
    with node_links(lab.node(1)) as nl:
        fdb = nl.fdb_entries(nl.index(vxlan_name(500)))
    assert (moving.mac, lab.vtep(3)) in fdb and (moving.mac, lab.vtep(2)) not in fdb, fdb
    assert wait_ping(e1, "10.60.0.2")


def test_a_failing_pass_rolls_back_to_the_last_good_state(lab: Lab, tmp_path: object) -> None:
    nodes = underlays(lab)
    good = node_state("n3", nodes, [VirtualNetwork(400, {"n3": [port(3, 400, "10.50.0.3")]})])
    assert reconcile(lab.node(3), good, tmp_path).ok  # type: ignore[arg-type]
    with node_links(lab.node(3)) as nl:  # a foreign VXLAN device already holds VNI 4242
        nl.add_vxlan("foreign", 4242, lab.vtep(3), nl.index("ul0"), 1450)
        before = set(nl.links())
    bad = node_state(
        "n3", nodes,
        [VirtualNetwork(401, {"n3": [port(3, 401, "10.51.0.3")]}), VirtualNetwork(4242, {"n3": []},
                                                                                    {"n3": ["10.52.0.1/24"]})],
    )
    report = reconcile(lab.node(3), bad, tmp_path)  # type: ignore[arg-type]
    assert not report.ok and report.rolled_back
    with node_links(lab.node(3)) as nl:
        after = set(nl.links())
        nl.delete(nl.index("foreign"))
    assert after == before  # cbr401/cvx401 created by the failed pass are gone again
    assert load_applied(tmp_path) == good  # type: ignore[arg-type]


def test_removed_port_is_released_and_removed_network_is_torn_down(lab: Lab) -> None:
    nodes = underlays(lab)
    keep, gone = port(1, 800, "10.81.0.1"), port(2, 800, "10.81.0.2")
    lab.endpoint(1, "k1", keep)
    lab.endpoint(1, "k2", gone)
    other = VirtualNetwork(801, {"n1": []}, {"n1": ["10.82.0.1/24"]})
    both = node_state("n1", nodes, [VirtualNetwork(800, {"n1": [keep, gone]}), other])
    assert reconcile(lab.node(1), both).ok
    one = node_state("n1", nodes, [VirtualNetwork(800, {"n1": [keep]})])
    report = reconcile(lab.node(1), one)
    assert report.ok
    with node_links(lab.node(1)) as nl:
        links = nl.links()
    assert bridge_name(801) not in links and vxlan_name(801) not in links
    assert links[gone.host_ifname].master == 0
    assert links[keep.host_ifname].master == links[bridge_name(800)].index


def test_stacks_sharing_a_namespace_never_touch_each_others_bridges_or_tables(lab: Lab, tmp_path: Path) -> None:
    """An appliance and the suite's stacks (or lab nodes) on one host: each reconciles,
    firewalls and tears down only what carries its own tag."""
    nodes = underlays(lab)
    a, b, plain = HostNames("ab"), HostNames("cd"), HostNames()
    pa, pb = port(1, 900, "10.90.0.1"), port(2, 901, "10.91.0.1")
    lab.endpoint(1, "sa", pa, "10.90.0.1/24")
    lab.endpoint(1, "sb", pb, "10.91.0.1/24")
    sa = node_state("n1", nodes, [VirtualNetwork(900, {"n1": [pa]})])
    sb = node_state("n1", nodes, [VirtualNetwork(901, {"n1": [pb]})])
    assert reconcile(lab.node(1), sa, tmp_path / "a", a).ok
    assert reconcile(lab.node(1), sb, tmp_path / "b", b).ok
    apply_ruleset(lab.node(1), build_ruleset(sa.networks, {}, {}, names=a))
    apply_ruleset(lab.node(1), build_ruleset(sb.networks, {}, {}, names=b))
    assert reconcile(lab.node(1), sa, tmp_path / "a", a).changed == []  # b's bridge is not a's to remove
    empty = node_state("n1", nodes, [])
    untagged = reconcile(lab.node(1), empty, tmp_path / "p", plain).changed  # nor an untagged stack's
    assert not [c for c in untagged if "ab9" in c or "cd9" in c], untagged
    assert reconcile(lab.node(1), empty, tmp_path / "a", a).ok  # a goes away
    assert remove_ruleset(lab.node(1), a)
    with node_links(lab.node(1)) as nl:
        links = nl.links()
    assert a.bridge(900) not in links and a.vxlan(900) not in links
    assert links[pb.host_ifname].master == links[b.bridge(901)].index and links[b.vxlan(901)].up
    tables = run_in_netns(lab.node(1), ["nft", "list", "tables"]).stdout
    assert "cairn_sg_ab" not in tables and f"table inet {b.sg_table}" in tables
    assert f"egress_{pb.host_ifname}" in run_in_netns(lab.node(1), ["nft", "list", "table", "inet", b.sg_table]).stdout
    assert remove_ruleset(lab.node(1), b) and reconcile(lab.node(1), empty, tmp_path / "b", b).ok


def test_a_stack_tag_names_everything_one_way() -> None:
    names = HostNames("zz")
    assert (names.bridge(16777215), names.vxlan(1)) == ("cbrzz16777215", "cvxzz1")
    assert len(names.bridge(16777215)) <= 15 and names.owns("cbrzz7") and not names.owns("cbr7")
    assert not HostNames().owns("cbrzz7") and HostNames().owns("cvx4096")
    assert (names.sg_table, names.nat_table, HostNames().sg_table) == ("cairn_sg_zz", "cairn_nat_zz", "cairn_sg")
    with pytest.raises(InvalidSpec):
        HostNames("a1")
