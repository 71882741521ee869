"""Derive each node's desired state from a cluster-wide view (what the control plane knows)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from network.model import NetworkAttachment, NodeNetworkState, Port, RemotePort


@dataclass(frozen=True)
class VirtualNetwork:
    """A network cluster-wide: VNI, its ports per node name, addresses of node bridges."""

    vni: int
    ports: Mapping[str, Sequence[Port]]
    gateways: Mapping[str, Sequence[str]] | None = None  # node -> ("10.0.0.1/24",)
    # nodes that carry the network with no port of their own yet (a live migration's target:
    # the guest's tap needs the bridge before its QEMU starts there)
    carriers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class NodeUnderlay:
    """A node's underlay NIC and address."""

    ifname: str
    ip: str
    mtu: int = 1500


def node_state(node: str, nodes: Mapping[str, NodeUnderlay], networks: Sequence[VirtualNetwork]) -> NodeNetworkState:
    """Desired state of ``node``: every network with a port (or gateway) there, with
    head-end replication to the other member nodes and unicast entries for their ports."""
    me = nodes[node]
    attachments = []
    for net in networks:
        gws = tuple((net.gateways or {}).get(node, ()))
        local = tuple(net.ports.get(node, ()))
        if not local and not gws and node not in net.carriers:
            continue
        members = sorted(
            n for n in nodes
            if n != node and (net.ports.get(n) or (net.gateways or {}).get(n) or n in net.carriers)
        )
        remote = tuple(
            RemotePort(p.mac, nodes[n].ip) for n in members for p in net.ports.get(n, ())
        )
        attachments.append(
            NetworkAttachment(
                vni=net.vni,
                ports=local,
                remote_vteps=tuple(nodes[n].ip for n in members),
                remote_ports=remote,
                gateway=gws,
            )
        )
    return NodeNetworkState(me.ifname, me.ip, me.mtu, tuple(attachments))
