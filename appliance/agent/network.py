"""The agent's network reconciler: turns the database's networks, subnets and the
ports of instances placed on this node into bridges + VXLAN devices (head-end
replication to the other member nodes), runs DHCP/DNS (dnsmasq, fixed leases) on
the network's home node, and routes there (gateway addresses, egress NAT, port
forwards, floating IPs), with the ``network`` library.

A router lives on one node: the lowest-named node hosting a port of any of its
networks; that node is the home (gateway + dnsmasq) of all of them. Every agent
derives the same placement from the database, so a router moves when its ports do."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import select

from appliance.db.engine import session_scope
from appliance.db.models import FloatingIp, Instance, Network, Node, Router, RouterInterface, Subnet
from appliance.db.models import Port as PortRow
from appliance.db.models import SecurityGroup as SecurityGroupRow
from appliance.services import routers as router_service
from appliance.settings import Settings
from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.dhcp import DhcpConfig, DhcpHost, DhcpSubnet, DnsmasqSupervisor, build_dnsmasq_config
from network.model import HostNames, Port, SecurityGroup, SecurityGroupRule
from network.reconcile import reconcile
from network.router import FloatingIp as FloatingIpSpec
from network.router import PortForward, RouterSpec, SourceNat, reconcile_router
from network.secgroups import apply_ruleset, build_ruleset, zone_for

log = logging.getLogger("cairn.agent.network")
RULE_FIELDS = ("direction", "protocol", "port_min", "port_max", "remote_cidr", "remote_group", "ethertype")


def port_ifname(kind: str, port_id: str) -> str:
    """Host-side interface of a port: a VM's tap or a container's veth end."""
    return ("tp" if kind == "vm" else "ve") + port_id.replace("-", "")[:10]


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
        self.dhcp: dict[int, DnsmasqSupervisor] = {}
        self.ruleset: str | None = None

    def __call__(self, agent: Any, report: Any) -> None:
        me = self.settings.node_name
        with session_scope(self.settings.resolved_database_url, readonly=True) as session:
            nodes = {n.id: n for n in session.scalars(select(Node))}
            networks = {n.id: n for n in session.scalars(select(Network))}
            subnets = list(session.scalars(select(Subnet)))
            placed = [i for i in session.scalars(select(Instance).where(Instance.node_id.is_not(None)))
                      if (i.status or {}).get("ports")]
            port_rows = {p.id: p for p in session.scalars(select(PortRow))}
            group_rows = list(session.scalars(select(SecurityGroupRow)))
            router_rows = {r.id: r for r in session.scalars(select(Router))}
            interfaces = list(session.scalars(select(RouterInterface)))
            fips = list(session.scalars(select(FloatingIp).where(FloatingIp.port_id.is_not(None),
                                                                 FloatingIp.router_id.is_not(None))))
        underlays = {}
        for node in nodes.values():
            u = (node.status or {}).get("inventory", {}).get("underlay")
            if u:
                underlays[node.name] = NodeUnderlay(u["ifname"], u["ip"], int(u.get("mtu", 1500)))
        if me not in underlays:
            return  # registered before underlay reporting: the next registration fills it in
        group_ids = {(g.project_id, g.name): g.id for g in group_rows}
        by_net: dict[str, dict[str, list[Port]]] = defaultdict(lambda: defaultdict(list))
        hosts: dict[str, list[DhcpHost]] = defaultdict(list)
        members: dict[str, list[str]] = defaultdict(list)
        for inst in placed:
            owner = nodes.get(inst.node_id or "")
            for p in inst.status["ports"]:
                ips = tuple(ip["address"] for ip in p.get("ips", []))
                row = port_rows.get(p["id"])
                names = (row.spec or {}).get("security_groups", []) if row else []
                gids = tuple(group_ids[(inst.project_id, n)] for n in names if (inst.project_id, n) in group_ids)
                for gid in gids:
                    members[gid].extend(ips)
                by_net[p["network_id"]][owner.name if owner else ""].append(
                    Port(id=p["id"], mac=p["mac"], ips=ips, host_ifname=port_ifname(inst.kind, p["id"]),
                         name=inst.name, security_groups=gids))
                hosts[p["network_id"]].append(DhcpHost(p["mac"], ips, inst.name))
        subnet_rows = {s.id: s for s in subnets}
        routed: dict[str, list[Subnet]] = defaultdict(list)  # router id -> its subnets
        for iface in interfaces:
            if iface.subnet_id in subnet_rows and iface.router_id in router_rows:
                routed[iface.router_id].append(subnet_rows[iface.subnet_id])
        placement = self._place_routers(routed, by_net)
        virtual = []
        home: dict[str, str] = {}
        for net_id, per_node in by_net.items():
            net = networks.get(net_id)
            if net is None:
                continue
            # DHCP and the gateway address live here (on the router's node when routed)
            home[net_id] = next((node for rid, node in placement.items()
                                 if any(s.network_id == net_id for s in routed[rid])),
                                min(n for n in per_node if n))
            gateways = [f"{s.spec['gateway']}/{ipaddress.ip_network(s.cidr).prefixlen}"
                        for s in subnets if s.network_id == net_id and s.spec.get("ip_version") == 4]
            virtual.append(VirtualNetwork(vni=net.vni, ports=per_node,
                                          gateways={home[net_id]: tuple(gateways)}))
        desired = node_state(me, underlays, virtual)
        result = reconcile(self.netns, desired, self.state_dir, self.names)
        if result.error:
            report.errors.append(f"network: {result.error}")
        report.actions.extend(f"network: {c}" for c in result.changed)
        zones = {networks[s.network_id].vni: zone for rid, zone in self._router_zones(routed, networks).items()
                 for s in routed[rid]}
        self._firewall(desired, group_rows, group_ids, members, report, zones)
        self._dhcp(me, home, networks, subnets, hosts, desired.overlay_mtu, report)
        mine = {rid: router_rows[rid] for rid, node in placement.items() if node == me}
        self._routers(mine, routed, networks, fips, desired, zones, report)

    @staticmethod
    def _place_routers(routed: dict[str, list[Subnet]], by_net: dict[str, dict[str, list[Port]]]) -> dict[str, str]:
        """Router id -> its node: the lowest-named node hosting a port of its networks.
        Routers sharing a network share a node (the network has one gateway)."""
        placement: dict[str, str] = {}
        for rid in sorted(routed, key=lambda r: min(s.id for s in routed[r])):
            nodes = {n for s in routed[rid] for n in by_net.get(s.network_id, {}) if n}
            taken = {placement[o] for o in placement if {s.network_id for s in routed[o]}
                     & {s.network_id for s in routed[rid]}}
            if taken:
                placement[rid] = min(taken)
            elif nodes:
                placement[rid] = min(nodes)
        return placement

    @staticmethod
    def _router_zones(routed: dict[str, list[Subnet]], networks: dict[str, Network]) -> dict[str, int]:
        """Router id -> the conntrack zone all its networks share (that of the lowest VNI
        among routers linked by a network), so replies routed between them or coming
        back from the uplink find their flow."""
        nets = {rid: {s.network_id for s in subs if s.network_id in networks} for rid, subs in routed.items()}
        zones: dict[str, int] = {}
        for rid in nets:
            if rid in zones or not nets[rid]:
                continue
            group, todo = {rid}, [rid]
            while todo:  # routers that share a network share its gateway, hence one zone
                cur = todo.pop()
                for other in nets:
                    if other not in group and nets[other] & nets[cur]:
                        group.add(other)
                        todo.append(other)
            zone = zone_for(min(networks[n].vni for g in group for n in nets[g]))
            zones.update(dict.fromkeys(group, zone))
        return zones

    def _routers(self, mine: dict[str, Router], routed: dict[str, list[Subnet]], networks: dict[str, Network],
                 fips: list[FloatingIp], desired: Any, zones: dict[int, int], report: Any) -> None:
        """All routers placed on this node as one ruleset (none: remove what an earlier pass made)."""
        here = {n.vni for n in desired.networks}
        uplink = self.settings.external_interface
        snat: list[SourceNat] = []
        forwards: list[PortForward] = []
        floating: list[FloatingIpSpec] = []
        ext_zones: list[tuple[str, int]] = []
        groups: list[tuple[str, ...]] = []
        problems: dict[str, str] = {}
        for rid, row in mine.items():
            vnis = sorted({networks[s.network_id].vni for s in routed[rid] if s.network_id in networks} & here)
            groups.append(tuple(self.names.bridge(v) for v in vnis))
            address = row.external_address
            if not address:
                continue
            if not uplink:
                problems[rid] = (f"node {self.settings.node_name} has no external interface: set "
                                 "CAIRN_EXTERNAL_INTERFACE there for egress NAT, port forwards and floating IPs")
                continue
            zone = zones.get(vnis[0]) if vnis else None
            if zone is None:
                continue
            ext_zones.append((address, zone))
            snat += [SourceNat(s.cidr, address) for s in routed[rid]
                     if s.network_id in networks and networks[s.network_id].vni in here]
            forwards += [PortForward(pf["protocol"], address, int(pf["external_port"]), pf["internal_address"],
                                     int(pf["internal_port"])) for pf in (row.spec or {}).get("port_forwards", [])]
            for fip in fips:
                if fip.router_id == rid and fip.fixed_address:
                    floating.append(FloatingIpSpec(fip.address, fip.fixed_address))
                    ext_zones.append((fip.address, zone))
        spec = None
        if mine:
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
        for rid, row in mine.items():
            message = error or problems.get(rid) or f"routing on {self.settings.node_name}"
            self._router_status(row, ready=error is None and rid not in problems, message=message)

    def _router_status(self, row: Router, ready: bool, message: str) -> None:
        """Record where the router lives and whether it is applied, only when that changed."""
        status = row.status or {}
        phase = "Active" if ready else "Error"
        cond: dict[str, Any] = next((c for c in row.conditions or [] if c.get("type") == "Ready"), {})
        seen = row.observed_generation == row.generation or not ready
        if seen and (status.get("node"), status.get("phase"), cond.get("reason")) == (
                self.settings.node_name, phase, phase):
            return
        with session_scope(self.settings.resolved_database_url) as session:
            live = session.get(Router, row.id)
            if live is not None:
                router_service.record_status(session, live, self.settings.node_name, ready, message)

    def _firewall(self, desired: Any, group_rows: list[SecurityGroupRow], group_ids: dict[tuple[str, str], str],
                  members: dict[str, list[str]], report: Any, zones: dict[int, int] | None = None) -> None:
        """Security groups of this node's ports as one nftables transaction (only when it changed)."""
        groups = {}
        for g in group_rows:
            rules = []
            for r in (g.spec or {}).get("rules", []):
                fields = {k: v for k, v in r.items() if k in RULE_FIELDS}
                if fields.get("remote_group"):
                    fields["remote_group"] = group_ids.get((g.project_id, fields["remote_group"]))
                rules.append(SecurityGroupRule(**fields))
            groups[g.id] = SecurityGroup(g.id, tuple(rules))
        text = build_ruleset(desired.networks, groups, {k: tuple(v) for k, v in members.items()}, zones,
                             self.names)
        if text == self.ruleset:
            return
        try:
            apply_ruleset(self.netns, text)
            self.ruleset = text
            report.actions.append("network: security groups applied")
        except Exception as exc:
            report.errors.append(f"network: security groups: {exc}")

    def _dhcp(self, me: str, home: dict[str, str], networks: dict[str, Network], subnets: list[Subnet],
              hosts: dict[str, list[DhcpHost]], mtu: int, report: Any) -> None:
        wanted = set()
        for net_id, node in home.items():
            if node != me:
                continue
            net = networks[net_id]
            wanted.add(net.vni)
            subs = tuple(DhcpSubnet(s.cidr, s.spec.get("gateway")) for s in subnets if s.network_id == net_id)
            gateway = next((s.gateway for s in subs if s.gateway and ipaddress.ip_address(s.gateway).version == 4),
                           None)
            cfg = DhcpConfig(network_id=f"vni{net.vni}", interface=self.names.bridge(net.vni), subnets=subs,
                             hosts=tuple(hosts[net_id]), mtu=mtu, dns_server=gateway,
                             run_dir=str(self.settings.run_dir / "dnsmasq"))
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
