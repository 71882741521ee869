"""Desired state: derived per node from the cluster view, stored and read back unchanged."""

from __future__ import annotations

import pytest

from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.errors import InvalidSpec
from network.model import ZERO_MAC, Port, RemotePort, SecurityGroupRule
from network.reconcile import state_from_json, state_to_json

pytestmark = pytest.mark.unit

NODES = {f"n{i}": NodeUnderlay("eth0", f"192.0.2.{i}", 9000) for i in (1, 2, 3)}


def p(i: int, sg: tuple[str, ...] = ()) -> Port:
    return Port(f"p{i}", f"02:00:00:00:00:{i:02x}", (f"10.0.0.{i}", f"fd00::{i}"), sg, f"tp{i}", f"vm{i}")


def test_node_state_lists_other_members_and_their_port_macs_only() -> None:
    nets = [VirtualNetwork(10, {"n1": [p(1)], "n2": [p(2), p(3)]}), VirtualNetwork(11, {"n3": [p(4)]})]
    s1 = node_state("n1", NODES, nets)
    assert [n.vni for n in s1.networks] == [10]  # n1 hosts nothing of network 11
    (att,) = s1.networks
    assert att.remote_vteps == ("192.0.2.2",)
    assert att.remote_ports == (RemotePort(p(2).mac, "192.0.2.2"), RemotePort(p(3).mac, "192.0.2.2"))
    assert s1.overlay_mtu == 8950
    assert node_state("n3", NODES, nets).networks[0].remote_vteps == ()


def test_a_migration_target_carries_the_network_before_it_has_a_port_there() -> None:
    """Without a port on n3 the network would be left out, and the arriving guest's QEMU
    fails on its missing bridge ("Cannot get interface MTU on cbr<vni>")."""
    net = VirtualNetwork(10, {"n1": [p(1)]}, carriers=frozenset({"n3"}))
    (att,) = node_state("n3", NODES, [net]).networks
    assert att.ports == () and att.remote_vteps == ("192.0.2.1",)
    assert att.remote_ports == (RemotePort(p(1).mac, "192.0.2.1"),)
    assert node_state("n2", NODES, [net]).networks == ()
    assert node_state("n1", NODES, [net]).networks[0].remote_vteps == ("192.0.2.3",)


def test_state_survives_a_json_round_trip() -> None:
    s = node_state("n2", NODES, [VirtualNetwork(10, {"n1": [p(1, ("a",))], "n2": [p(2, ("a", "b"))]},
                                                 gateways={"n2": ["10.0.0.254/24"]})])
    assert state_from_json(state_to_json(s)) == s


def test_bad_values_are_rejected_with_a_reason() -> None:
    with pytest.raises(InvalidSpec, match="MAC"):
        Port("x", "02:00:00:00:00", ())
    with pytest.raises(InvalidSpec, match="interface name"):
        Port("x", "02:00:00:00:00:01", (), (), "a-name-longer-than-15")
    with pytest.raises(InvalidSpec, match="CIDR"):
        SecurityGroupRule("ingress", remote_cidr="10.0.0.0/40")
    assert ZERO_MAC == "00:00:00:00:00:00"
