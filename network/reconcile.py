"""One reconcile pass for a node's overlay: apply -> check -> roll back on failure -> persist.

VDSM's setupNetworks is the model: a failed change leaves the node as it was (the
objects this pass created are removed and the last persisted good state is applied
again), and only a verified state is written down as the new good one. Running the
pass twice changes nothing the second time; anything deleted by hand (a bridge, a
forwarding entry) is put back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from network.errors import ApplyFailed
from network.model import (
    ZERO_MAC,
    HostNames,
    NetworkAttachment,
    NodeNetworkState,
    Port,
    RemotePort,
    Report,
)
from network.netlink import LinkInfo, NodeLinks, node_links

STATE_FILE = "network-applied.json"


def state_to_json(state: NodeNetworkState) -> str:
    """Serialise a desired state (stable, human-readable)."""
    return json.dumps(asdict(state), indent=1, sort_keys=True)


def state_from_json(text: str) -> NodeNetworkState:
    """Inverse of :func:`state_to_json`."""
    raw: dict[str, Any] = json.loads(text)
    nets = tuple(
        NetworkAttachment(
            vni=n["vni"],
            ports=tuple(Port(**{**p, "ips": tuple(p["ips"]), "security_groups": tuple(p["security_groups"])})
                        for p in n["ports"]),
            remote_vteps=tuple(n["remote_vteps"]),
            remote_ports=tuple(RemotePort(**r) for r in n["remote_ports"]),
            gateway=tuple(n["gateway"]),
        )
        for n in raw["networks"]
    )
    return NodeNetworkState(raw["underlay_ifname"], raw["underlay_ip"], raw["underlay_mtu"], nets)


def load_applied(state_dir: str | os.PathLike[str] | None) -> NodeNetworkState | None:
    """The last state a pass applied and verified on this node, if any."""
    if state_dir is None:
        return None
    path = Path(state_dir) / STATE_FILE
    return state_from_json(path.read_text()) if path.exists() else None


def _persist(state_dir: str | os.PathLike[str], state: NodeNetworkState) -> None:
    path = Path(state_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state_to_json(state))
    os.replace(tmp, path)  # atomic: a reader sees the old or the new state, never half


def _managed(link: LinkInfo, names: HostNames) -> bool:
    """A bridge or VXLAN device of this stack (other stacks' are never touched)."""
    return link.kind in ("bridge", "vxlan") and names.owns(link.name)


def _desired_fdb(net: NetworkAttachment) -> set[tuple[str, str]]:
    want = {(ZERO_MAC, v) for v in net.remote_vteps}
    want |= {(r.mac, r.vtep) for r in net.remote_ports}
    return want


class _Pass:
    """The actions of one pass, remembering what it created for a rollback."""

    def __init__(self, nl: NodeLinks, report: Report, names: HostNames) -> None:
        self.nl = nl
        self.report = report
        self.names = names
        self.created: list[str] = []

    def apply(self, desired: NodeNetworkState) -> None:
        nl, mtu = self.nl, desired.overlay_mtu
        links = nl.links()
        underlay = links.get(desired.underlay_ifname)
        if underlay is None:
            raise ApplyFailed(f"underlay interface {desired.underlay_ifname!r} is missing")
        names = self.names
        wanted = {names.bridge(n.vni) for n in desired.networks} | {names.vxlan(n.vni) for n in desired.networks}
        stale = [link for link in links.values() if _managed(link, names) and link.name not in wanted]
        for link in stale:  # networks this node no longer hosts
            nl.delete(link.index)
            self.report.changed.append(f"removed {link.name}")
        if stale:
            links = nl.links()
        fdb = nl.all_fdb_entries()
        for net in desired.networks:
            self._network(net, desired, underlay, links, fdb, mtu)

    def _network(
        self,
        net: NetworkAttachment,
        desired: NodeNetworkState,
        underlay: LinkInfo,
        links: dict[str, LinkInfo],
        fdb: dict[int, set[tuple[str, str]]],
        mtu: int,
    ) -> None:
        nl, changed = self.nl, self.report.changed
        brn, vxn = self.names.bridge(net.vni), self.names.vxlan(net.vni)
        br = links.get(brn)
        if br is None or br.kind != "bridge":
            if br is not None:
                nl.delete(br.index)
            nl.add_bridge(brn, mtu)
            self.created.append(brn)
            changed.append(f"created bridge {brn}")
            br = nl.link(brn)
            assert br is not None
        if br.mtu != mtu:
            nl.set_link(br.index, mtu=mtu)
            changed.append(f"mtu {brn}")
        vx = links.get(vxn)
        ok_vx = (
            vx is not None
            and vx.kind == "vxlan"
            and vx.vxlan_id == net.vni
            and vx.vxlan_local == desired.underlay_ip
            and vx.vxlan_learning == 0
        )
        if not ok_vx:
            if vx is not None:
                nl.delete(vx.index)
            nl.add_vxlan(vxn, net.vni, desired.underlay_ip, underlay.index, mtu)
            self.created.append(vxn)
            changed.append(f"created vxlan {vxn} vni {net.vni}")
            vx = nl.link(vxn)
        assert vx is not None
        if vx.master != br.index or not vx.up or vx.mtu != mtu:
            nl.set_link(vx.index, master=br.index, mtu=mtu, state="up")
            changed.append(f"enslaved {vxn}")
        if not br.up:
            nl.set_link(br.index, state="up")
            changed.append(f"up {brn}")
        want, have = _desired_fdb(net), (fdb.get(vx.index, set()) if ok_vx else set())
        # A unicast MAC has one remote: one that moved (a live migration) loses its old
        # remote first (the kernel ignores an append to an existing unicast entry). The
        # flood list (the all-zero MAC) gains its new members before it loses old ones.
        gone = sorted(have - want, key=lambda e: e[0] == ZERO_MAC)
        for mac, dst in [e for e in gone if e[0] != ZERO_MAC]:
            nl.fdb_del(vx.index, mac, dst)
            changed.append(f"fdb {vxn} removed {mac} -> {dst}")
        for mac, dst in sorted(want - have):
            nl.fdb_add(vx.index, mac, dst)
            changed.append(f"fdb {vxn} {mac} -> {dst}")
        for mac, dst in [e for e in gone if e[0] == ZERO_MAC]:
            nl.fdb_del(vx.index, mac, dst)
            changed.append(f"fdb {vxn} removed {mac} -> {dst}")
        have_addr, want_addr = nl.addresses(br.index), set(net.gateway)
        for cidr in sorted(want_addr - have_addr):
            nl.addr_add(br.index, cidr)
            changed.append(f"address {cidr} on {brn}")
        for cidr in sorted(have_addr - want_addr):
            nl.addr_del(br.index, cidr)
            changed.append(f"address {cidr} removed from {brn}")
        port_names = set()
        for port in net.ports:
            port_names.add(port.host_ifname)
            link = links.get(port.host_ifname)
            if link is None:
                self.report.pending.append(f"port {port.id}: interface {port.host_ifname} not present yet")
                continue
            if link.master != br.index or link.mtu != mtu or not link.up:
                nl.set_link(link.index, master=br.index, mtu=mtu, state="up")
                changed.append(f"port {port.host_ifname} -> {brn}")
        for link in links.values():  # interfaces of deleted ports: let go of them
            if link.master == br.index and link.master != 0 and link.name not in port_names and link.name != vxn:
                nl.set_link(link.index, master=0)
                changed.append(f"released {link.name} from {brn}")

    def rollback(self) -> None:
        links = self.nl.links()
        for name in reversed(self.created):
            if name in links:
                self.nl.delete(links[name].index)


def check(nl: NodeLinks, desired: NodeNetworkState, names: HostNames | None = None) -> list[str]:
    """Differences between the kernel and ``desired`` (empty = converged)."""
    names = names or HostNames()
    problems: list[str] = []
    links = nl.links()
    fdb = nl.all_fdb_entries()
    mtu = desired.overlay_mtu
    for net in desired.networks:
        br, vx = links.get(names.bridge(net.vni)), links.get(names.vxlan(net.vni))
        if br is None or not br.up or br.mtu != mtu:
            problems.append(f"bridge {names.bridge(net.vni)} missing, down or wrong MTU")
            continue
        if vx is None or vx.master != br.index or not vx.up or vx.vxlan_id != net.vni:
            problems.append(f"vxlan {names.vxlan(net.vni)} missing or not in its bridge")
            continue
        have, want = fdb.get(vx.index, set()), _desired_fdb(net)
        if have != want:
            problems.append(f"fdb of {vx.name} differs: missing {sorted(want - have)}, extra {sorted(have - want)}")
        if nl.addresses(br.index) != set(net.gateway):
            problems.append(f"addresses of {br.name} differ")
        for port in net.ports:
            link = links.get(port.host_ifname)
            if link is not None and link.master != br.index:
                problems.append(f"port {port.host_ifname} not in {br.name}")
    return problems


def reconcile(
    netns: str | None, desired: NodeNetworkState, state_dir: str | os.PathLike[str] | None = None,
    names: HostNames | None = None,
) -> Report:
    """Make the node's bridges, VXLAN devices, forwarding entries and ports match ``desired``.

    Only objects named by ``names`` (this stack's) are created or removed; other stacks
    sharing the namespace keep theirs.

    On failure the objects created by this pass are removed, the last persisted good
    state (if any) is applied again, and the report carries the error; on success the
    desired state is persisted under ``state_dir`` as the new good state.
    """
    t0 = time.monotonic()
    report = Report()
    names = names or HostNames()
    with node_links(netns) as nl:
        one = _Pass(nl, report, names)
        try:
            one.apply(desired)
            problems = check(nl, desired, names)
            if problems:
                raise ApplyFailed("; ".join(problems))
        except Exception as e:  # any failure: restore, then say why
            report.error = f"{type(e).__name__}: {e}"
            one.rollback()
            previous = load_applied(state_dir)
            if previous is not None:
                _Pass(nl, Report(), names).apply(previous)
            report.rolled_back = True
            report.seconds = time.monotonic() - t0
            return report
    if state_dir is not None:
        _persist(state_dir, desired)
    report.seconds = time.monotonic() - t0
    return report
