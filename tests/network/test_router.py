"""Router: egress NAT to a stand-in external network, port forward and floating IP inwards."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import InvalidSpec
from network.model import Port, SecurityGroup, SecurityGroupRule
from network.netlink import node_links, read_sysctl, run_in_netns, socket_in_netns
from network.reconcile import reconcile
from network.router import (
    FloatingIp,
    PortForward,
    RouterSpec,
    SourceNat,
    apply_router,
    build_router_ruleset,
    reconcile_router,
    router_table,
)
from network.secgroups import apply_ruleset, build_ruleset, zone_for
from tests.network.golden import assert_golden
from tests.network.lab import Lab, listen, tcp_exchange, wait_ping


@pytest.mark.unit
def test_router_ruleset_matches_golden_file() -> None:
    spec = RouterSpec(
        "up0", ("10.90.0.0/24",),
        (PortForward("tcp", "203.0.113.1", 2222, "10.90.0.5", 22),),
        (FloatingIp("203.0.113.50", "10.90.0.6"),),
    )
    assert_golden("nft_router.nft", build_router_ruleset(spec))
    with pytest.raises(InvalidSpec):
        build_router_ruleset(RouterSpec("up0", ("fd00::/64",)))


@pytest.mark.functional
def test_egress_nat_reaches_external_and_port_forward_and_floating_ip_reach_endpoints(lab: Lab) -> None:
    ext = lab.make_ns("ext")
    with node_links(lab.node(1)) as nl:  # node 1's uplink to the stand-in outside world
        nl.add_veth("up0", "eth0", 1500, peer_ns=ext)
        i = nl.index("up0")
        nl.addr_add(i, "203.0.113.1/24")
        nl.set_link(i, state="up")
    with node_links(ext) as nl:
        i = nl.index("eth0")
        nl.addr_add(i, "203.0.113.2/24")
        nl.set_link(i, state="up")
    vm = Port("vm", "02:00:00:00:09:05", ("10.90.0.5",), host_ifname="tp900-5")
    vm6 = Port("vm6", "02:00:00:00:09:06", ("10.90.0.6",), host_ifname="tp900-6")
    ep = lab.endpoint(2, "rt5", vm, "10.90.0.5/24", gw="10.90.0.1")
    ep6 = lab.endpoint(2, "rt6", vm6, "10.90.0.6/24", gw="10.90.0.1")
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    net = VirtualNetwork(900, {"n2": [vm, vm6]}, gateways={"n1": ["10.90.0.1/24"]})
    for n in (1, 2):
        assert reconcile(lab.node(n), node_state(f"n{n}", nodes, [net])).ok
    apply_router(lab.node(1), RouterSpec(
        "up0", ("10.90.0.0/24",),
        (PortForward("tcp", "203.0.113.1", 2222, "10.90.0.5", 22),),
        (FloatingIp("203.0.113.50", "10.90.0.6"),),
    ), uplink_prefixlen=24)
    assert wait_ping(ep, "10.90.0.1")

    outside = listen(ext, "203.0.113.2", 8080)
    inside = listen(ep, "10.90.0.5", 22)
    inside6 = listen(ep6, "10.90.0.6", 80)
    try:
        # egress: the endpoint reaches the outside, which sees node 1's uplink address
        assert tcp_exchange(ep, outside, "203.0.113.2", 8080) == "ok"
        for src, seen_as in ((ep, "203.0.113.1"), (ep6, "203.0.113.50")):  # masquerade / floating IP
            assert tcp_exchange(src, None, "203.0.113.2", 8080) == "connected"
            conn, peer = outside.accept()
            conn.close()
            assert peer[0] == seen_as
        # ingress: a port forward and a floating IP reach the endpoints
        assert tcp_exchange(ext, inside, "203.0.113.1", 2222) == "ok"
        assert tcp_exchange(ext, inside6, "203.0.113.50", 80) == "ok"
    finally:
        for s in (outside, inside, inside6):
            s.close()


def udp_reaches(src: str, dst: str, ip: str, port: int = 5000) -> bool:
    """Send one datagram from namespace ``src`` to ``ip:port``; True when ``dst`` got it."""
    rx = socket_in_netns(dst, type_=socket.SOCK_DGRAM)
    tx = socket_in_netns(src, type_=socket.SOCK_DGRAM)
    try:
        rx.bind((ip, port))
        rx.settimeout(1)
        for _ in range(2):
            tx.sendto(b"hello", (ip, port))
        return rx.recv(16) == b"hello"
    except TimeoutError:
        return False
    finally:
        rx.close()
        tx.close()


def full_spec() -> RouterSpec:
    """Two routers' worth of rules on one node: SNAT to their own addresses, zones, isolation."""
    return RouterSpec(
        "up0",
        port_forwards=(PortForward("tcp", "203.0.113.10", 2222, "10.91.0.5", 22),
                       PortForward("udp", "203.0.113.10", 5353, "10.91.0.5", 53)),
        floating_ips=(FloatingIp("203.0.113.50", "10.92.0.6"),),
        snat=(SourceNat("10.91.0.0/24", "203.0.113.10"), SourceNat("10.92.0.0/24", "203.0.113.11")),
        zones=(("203.0.113.10", 910), ("203.0.113.11", 920), ("203.0.113.50", 920)),
        routed=(("cbr910",), ("cbr920", "cbr921")),
        isolated=("cbr910", "cbr920", "cbr921", "cbr930"),
    )


@pytest.mark.unit
def test_router_ruleset_with_zones_snat_and_isolation_matches_golden_file() -> None:
    assert_golden("nft_router_full.nft", build_router_ruleset(full_spec()))
    assert full_spec().external_ips() == {"203.0.113.10", "203.0.113.11", "203.0.113.50"}
    inner = build_router_ruleset(RouterSpec("", routed=(("cbr1", "cbr2"),), isolated=("cbr1", "cbr2", "cbr3")))
    assert '"cbr1" . "cbr2", "cbr2" . "cbr1" } accept' in inner and "dnat" not in inner and "nat hook" in inner


@pytest.mark.unit
@pytest.mark.parametrize("bad", [
    RouterSpec("up0", port_forwards=(PortForward("tcp", "203.0.113.1", 0, "10.0.0.5", 22),)),
    RouterSpec("up0", port_forwards=(PortForward("tcp", "203.0.113.1", 80, "10.0.0.5", 65536),)),
    RouterSpec("up0", port_forwards=(PortForward("sctp", "203.0.113.1", 80, "10.0.0.5", 80),)),
    RouterSpec("up0", snat=(SourceNat("10.0.0.0/24", "fd00::1"),)),
    RouterSpec("up0", zones=(("203.0.113.1", 0),)),
    RouterSpec("up0", isolated=("a-name-longer-than-15",)),
    RouterSpec("", snat=(SourceNat("10.0.0.0/24", "203.0.113.1"),)),  # NAT needs an uplink
])
def test_bad_router_specs_are_refused_before_anything_is_touched(bad: RouterSpec, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        build_router_ruleset(bad)
    with pytest.raises(InvalidSpec):
        reconcile_router("cn-never-created", bad, tmp_path)
    assert not (tmp_path / "router-applied.json").exists()


@pytest.mark.functional
def test_reconciled_router_with_security_groups_nats_forwards_isolates_repairs_and_removes(
        lab: Lab, tmp_path: Path) -> None:
    """The router next to the security groups' conntrack zones (replies from the uplink
    must land in the network's zone), one pass at a time."""
    node, ext = lab.node(3), lab.make_ns("ext3")
    with node_links(node) as nl:  # the uplink carries only the router's own addresses
        nl.add_veth("up1", "eth0", 1500, peer_ns=ext)
        nl.set_link(nl.index("up1"), state="up")
    with node_links(ext) as nl:
        i = nl.index("eth0")
        nl.addr_add(i, "198.51.100.2/24")
        nl.set_link(i, state="up")
    forward_before = read_sysctl(node, "net.ipv4.ip_forward")
    vm = Port("vm91", "02:00:00:00:91:05", ("10.91.0.5",), ("g",), host_ifname="tp910-5")
    iso = Port("vm93", "02:00:00:00:93:07", ("10.93.0.7",), ("g",), host_ifname="tp930-7")
    ep = lab.endpoint(3, "rz5", vm, "10.91.0.5/24", gw="10.91.0.1")
    ep_iso = lab.endpoint(3, "rz7", iso, "10.93.0.7/24", gw="10.93.0.1")
    nodes = {f"n{n}": NodeUnderlay("ul0", lab.vtep(n)) for n in (1, 2, 3)}
    nets = [VirtualNetwork(910, {"n3": [vm]}, gateways={"n3": ["10.91.0.1/24"]}),
            VirtualNetwork(930, {"n3": [iso]}, gateways={"n3": ["10.93.0.1/24"]})]
    state = node_state("n3", nodes, nets)
    assert reconcile(node, state).ok
    group = SecurityGroup("g", (SecurityGroupRule("egress"), SecurityGroupRule("ingress", "tcp", 22, 22),
                                SecurityGroupRule("ingress", "udp", 5000, 5000)))
    apply_ruleset(node, build_ruleset(state.networks, {"g": group}, {}))
    spec = RouterSpec("up1", port_forwards=(PortForward("tcp", "198.51.100.10", 2222, "10.91.0.5", 22),),
                      snat=(SourceNat("10.91.0.0/24", "198.51.100.10"),),
                      zones=(("198.51.100.10", zone_for(910)),), routed=(("cbr910",),),
                      isolated=("cbr910", "cbr930"))
    pool = ("198.51.100.10", "198.51.100.99")
    changed = reconcile_router(node, spec, tmp_path, prefixlen=24, pool=pool)
    assert "router rules loaded" in changed and "added 198.51.100.10/24 to up1" in changed
    assert reconcile_router(node, spec, tmp_path, prefixlen=24, pool=pool) == []  # idempotent
    # the outside knows routes to both networks: only NAT may let anything through
    run_in_netns(ext, ["ip", "route", "add", "10.90.0.0/15", "via", "198.51.100.10"])
    run_in_netns(ext, ["ip", "route", "add", "10.93.0.0/24", "via", "198.51.100.10"])
    assert wait_ping(ep, "10.91.0.1")

    outside = listen(ext, "198.51.100.2", 8080)
    inside = listen(ep, "10.91.0.5", 22)
    hidden = listen(ep_iso, "10.93.0.7", 22)
    try:
        def works() -> None:
            assert tcp_exchange(ep, None, "198.51.100.2", 8080) == "connected"  # egress, SNAT
            conn, peer = outside.accept()
            conn.close()
            assert peer[0] == "198.51.100.10"
            assert tcp_exchange(ext, inside, "198.51.100.10", 2222) == "ok"  # port forward

        works()
        # not routed (UDP, which the groups allow and conntrack would not stop): a network
        # without a router, either way, and a router's network from outside without NAT
        assert udp_reaches(ep, ext, "198.51.100.2")  # the positive control
        assert not udp_reaches(ep_iso, ext, "198.51.100.2")
        assert not udp_reaches(ext, ep_iso, "10.93.0.7")
        assert not udp_reaches(ext, ep, "10.91.0.5")
        assert not udp_reaches(ep, ep_iso, "10.93.0.7")

        # drift: the table and the address removed by hand come back on the next pass
        run_in_netns(node, ["nft", "delete", "table", "ip", "cairn_nat"])
        with node_links(node) as nl:
            nl.addr_del(nl.index("up1"), "198.51.100.10/24")
            nl.addr_add(nl.index("up1"), "198.51.100.42/24")  # ours (in the pool) but not wanted
        assert set(reconcile_router(node, spec, tmp_path, prefixlen=24, pool=pool)) == {
            "router rules loaded", "added 198.51.100.10/24 to up1", "removed 198.51.100.42/24 from up1"}
        works()

        # gone: rules, addresses and forwarding as they were; a second pass does nothing
        assert "router rules removed" in reconcile_router(node, None, tmp_path, prefixlen=24, pool=pool)
        assert router_table(node) is None
        with node_links(node) as nl:
            assert not {a for a in nl.addresses(nl.index("up1")) if a.startswith("198.51.100.")}
        assert read_sysctl(node, "net.ipv4.ip_forward") == forward_before
        assert reconcile_router(node, None, tmp_path, prefixlen=24, pool=pool) == []
        assert tcp_exchange(ext, None, "198.51.100.10", 2222, timeout=1) != "connected"
    finally:
        for s in (outside, inside, hidden):
            s.close()
