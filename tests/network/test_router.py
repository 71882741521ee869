"""Router: egress NAT to a stand-in external network, port forward and floating IP inwards."""

from __future__ import annotations

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import InvalidSpec
from network.model import Port
from network.netlink import node_links
from network.reconcile import reconcile
from network.router import FloatingIp, PortForward, RouterSpec, apply_router, build_router_ruleset
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
