"""The agent's network reconciler: turns its node's desired-state document (networks
with every node's ports, security groups, routers placed here; see
:mod:`appliance.services.desired_state`, which also places routers and homes networks)
into bridges + VXLAN devices (head-end replication to the other member nodes), DHCP/DNS
(dnsmasq, fixed leases) for the networks homed here, and routing (gateway addresses,
egress NAT, port forwards, floating IPs), with the ``network`` library.

With a cached document (database away) it re-applies what it last applied: guests
restarted meanwhile find their bridges; router reports wait for the database."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from appliance.db.engine import session_scope
from appliance.db.models import Router
from appliance.services import routers as router_service
from appliance.services.desired_state import NetworkDoc, NetworkState, NodeDocument, RouterDoc
from appliance.services.desired_state import port_ifname as port_ifname
from appliance.settings import Settings
from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.dhcp import DhcpConfig, DhcpHost, DhcpSubnet, DnsmasqSupervisor, build_dnsmasq_config
from network.model import HostNames, NodeNetworkState, Port, SecurityGroup, SecurityGroupRule
from network.reconcile import reconcile
from network.router import FloatingIp as FloatingIpSpec
from network.router import PortForward, RouterSpec, SourceNat, reconcile_router
from network.secgroups import apply_ruleset, assign_zones, build_ruleset

log = logging.getLogger("cairn.agent.network")


def _kill_stale(pid_file: Path) -> None:
    """A dnsmasq left by a previous agent (killed with -9) still holds the bridge's DHCP port."""
    try:
        pid = int(pid_file.read_text().strip())
        if b"dnsmasq" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.02)
    except (OSError, ValueError):
        pass


class NetworkReconciler:
    def __init__(self, settings: Settings, netns: str | None = None) -> None:
        self.settings = settings
        self.netns = netns
        self.state_dir = settings.data_dir / "network"
        self.names = HostNames(settings.stack_tag)
        try:
            saved = json.loads((self.state_dir / "zones.json").read_text())
            self.zones: dict[int, int] = {int(v): int(z) for v, z in saved.items()}
        except (OSError, ValueError):
            self.zones = {}
        self.dhcp: dict[int, DnsmasqSupervisor] = {}
        self.ruleset: str | None = None

    def __call__(self, agent: Any, report: Any) -> None:
        if agent.document is not None:
            self.reconcile(agent.document, report, fresh=agent.document_fresh)

    def reconcile(self, doc: NodeDocument, report: Any, fresh: bool = True) -> None:
        me = self.settings.node_name
        net = doc.network
        underlays = {u.node: NodeUnderlay(u.ifname, u.ip, u.mtu) for u in net.underlays}
        if me not in underlays:
            return  # registered before underlay reporting: the next registration fills it in
        virtual = [VirtualNetwork(vni=n.vni, ports=self._ports(n), gateways={n.home: tuple(n.gateways)},
                                  carriers=frozenset(n.carriers)) for n in net.networks]
        desired = node_state(me, underlays, virtual)
        self._assign_zones(desired, net)
        result = reconcile(self.netns, desired, self.state_dir, self.names)
        if result.error:
            report.errors.append(f"network: {result.error}")
        report.actions.extend(f"network: {c}" for c in result.changed)
        self._firewall(desired, net, report)
        self._dhcp(me, net.networks, desired.overlay_mtu, report)
        self._routers(net, desired, report, fresh)

    @staticmethod
    def _ports(network: NetworkDoc) -> dict[str, list[Port]]:
        per_node: dict[str, list[Port]] = defaultdict(list)
        for p in network.ports:
            per_node[p.node].append(Port(id=p.id, mac=p.mac, ips=tuple(p.ips), host_ifname=p.host_ifname,
                                         name=p.name, security_groups=tuple(p.security_groups)))
        return per_node

    def _routers(self, net: NetworkState, desired: NodeNetworkState, report: Any, fresh: bool) -> None:
        """All routers placed on this node as one ruleset (none: remove what an earlier pass made)."""
        here = {n.vni for n in desired.networks}
        uplink = self.settings.external_interface
        snat: list[SourceNat] = []
        forwards: list[PortForward] = []
        floating: list[FloatingIpSpec] = []
        ext_zones: list[tuple[str, int]] = []
        groups: list[tuple[str, ...]] = []
        problems: dict[str, str] = {}
        for router in net.routers:
            vnis = sorted({s.vni for s in router.subnets} & here)
            groups.append(tuple(self.names.bridge(v) for v in vnis))
            address = router.external_address
            if not address:
                continue
            if not uplink:
                problems[router.id] = (f"node {self.settings.node_name} has no external interface: set "
                                       "CAIRN_EXTERNAL_INTERFACE there for egress NAT, port forwards and floating IPs")
                continue
            zone = self.zones.get(vnis[0]) if vnis else None
            if zone is None:
                continue
            ext_zones.append((address, zone))
            snat += [SourceNat(s.cidr, address) for s in router.subnets if s.vni in here]
            forwards += [PortForward(pf.protocol, address, pf.external_port, pf.internal_address, pf.internal_port)
                         for pf in router.port_forwards]
            for fip in router.floating_ips:
                floating.append(FloatingIpSpec(fip.address, fip.fixed_address))
                ext_zones.append((fip.address, zone))
        spec = None
        if net.routers:
            spec = RouterSpec(uplink if (snat or forwards or floating) else "", snat=tuple(snat),
                              port_forwards=tuple(forwards), floating_ips=tuple(floating), zones=tuple(ext_zones),
                              routed=tuple(g for g in groups if g),
                              isolated=tuple(sorted(map(self.names.bridge, here))))
        error = None
        try:
            cidr = self.settings.external_cidr
            prefixlen = ipaddress.ip_network(cidr, strict=False).prefixlen if cidr else 32
            changed = reconcile_router(self.netns, spec, self.state_dir, prefixlen=prefixlen,
                                       pool=self.settings.external_pool_bounds, names=self.names)
            report.actions.extend(f"network: router: {c}" for c in changed)
        except Exception as exc:
            log.exception("router reconcile failed")
            error = f"routing on {self.settings.node_name} failed: {exc}"
            report.errors.append(f"network: {error}")
        if not fresh:
            return  # the database is away: report once it is back
        for router in net.routers:
            message = error or problems.get(router.id) or f"routing on {self.settings.node_name}"
            try:
                self._router_status(router, ready=error is None and router.id not in problems, message=message)
            except Exception as exc:  # the database went away during the pass
                report.errors.append(f"network: router {router.name}: reporting failed: {exc}")

    def _router_status(self, router: RouterDoc, ready: bool, message: str) -> None:
        """Record where the router lives and whether it is applied, only when that changed."""
        phase = "Active" if ready else "Error"
        seen = router.reported.observed_current or not ready
        if seen and (router.reported.node, router.reported.phase, router.reported.ready_reason) == (
                self.settings.node_name, phase, phase):
            return
        with session_scope(self.settings.resolved_database_url) as session:
            live = session.get(Router, router.id)
            if live is not None:
                router_service.record_status(session, live, self.settings.node_name, ready, message)

    def _assign_zones(self, desired: NodeNetworkState, net: NetworkState) -> None:
        """Conntrack zones of this node's networks: unique (VNIs 65535 apart would share
        one), a router's networks share theirs, and a network keeps its zone across passes
        and restarts (its flows live there)."""
        zones = assign_zones((n.vni for n in desired.networks), net.zones, self.zones)
        if zones != self.zones:
            self.zones = zones
            path = self.state_dir / "zones.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps({str(v): z for v, z in zones.items()}))
            os.replace(path.with_suffix(".tmp"), path)

    def _firewall(self, desired: NodeNetworkState, net: NetworkState, report: Any) -> None:
        """Security groups of this node's ports as one nftables transaction (only when it changed)."""
        groups = {g.id: SecurityGroup(g.id, tuple(SecurityGroupRule(**r.model_dump()) for r in g.rules))
                  for g in net.security_groups}
        members = {gid: tuple(ips) for gid, ips in net.group_members.items()}
        text = build_ruleset(desired.networks, groups, members, self.zones, self.names)
        if text == self.ruleset:
            return
        try:
            apply_ruleset(self.netns, text)
            self.ruleset = text
            report.actions.append("network: security groups applied")
        except Exception as exc:
            report.errors.append(f"network: security groups: {exc}")

    def _dhcp(self, me: str, networks: list[NetworkDoc], mtu: int, report: Any) -> None:
        wanted = set()
        for net in networks:
            if net.home != me or net.dhcp is None:
                continue
            wanted.add(net.vni)
            subs = tuple(DhcpSubnet(s.cidr, s.gateway) for s in net.dhcp.subnets)
            gateway = next((s.gateway for s in subs if s.gateway and ipaddress.ip_address(s.gateway).version == 4),
                           None)
            cfg = DhcpConfig(network_id=f"vni{net.vni}", interface=self.names.bridge(net.vni), subnets=subs,
                             hosts=tuple(DhcpHost(h.mac, tuple(h.ips), h.name) for h in net.dhcp.hosts), mtu=mtu,
                             dns_server=gateway, run_dir=str(self.settings.run_dir / "dnsmasq"))
            sup = self.dhcp.get(net.vni)
            if sup is None:
                _kill_stale(self.settings.run_dir / "dnsmasq" / f"vni{net.vni}.pid")
                sup = DnsmasqSupervisor(self.netns, self.state_dir / f"dnsmasq-{net.vni}.conf")
                self.dhcp[net.vni] = sup
            try:
                if sup.ensure(build_dnsmasq_config(cfg)):
                    report.actions.append(f"network: dnsmasq (re)started for vni {net.vni}")
            except Exception as exc:
                report.errors.append(f"network: dnsmasq for vni {net.vni}: {exc}")
        for vni in set(self.dhcp) - wanted:
            self.dhcp.pop(vni).stop()

    def stop(self) -> None:
        for sup in self.dhcp.values():
            sup.stop()
        self.dhcp.clear()
