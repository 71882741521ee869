"""The agent's network reconciler: turns the database's networks, subnets and the
ports of instances placed on this node into bridges + VXLAN devices (head-end
replication to the other member nodes), and runs DHCP/DNS (dnsmasq, fixed leases)
on the network's home node, with the ``network`` library."""

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
from appliance.db.models import Instance, Network, Node, Subnet
from appliance.db.models import Port as PortRow
from appliance.db.models import SecurityGroup as SecurityGroupRow
from appliance.settings import Settings
from network.desired import NodeUnderlay, VirtualNetwork, node_state
from network.dhcp import DhcpConfig, DhcpHost, DhcpSubnet, DnsmasqSupervisor, build_dnsmasq_config
from network.model import Port, SecurityGroup, SecurityGroupRule, bridge_name
from network.reconcile import reconcile
from network.secgroups import apply_ruleset, build_ruleset

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
        virtual = []
        home: dict[str, str] = {}
        for net_id, per_node in by_net.items():
            net = networks.get(net_id)
            if net is None:
                continue
            home[net_id] = min(n for n in per_node if n)  # DHCP and the gateway address live here
            gateways = [f"{s.spec['gateway']}/{ipaddress.ip_network(s.cidr).prefixlen}"
                        for s in subnets if s.network_id == net_id and s.spec.get("ip_version") == 4]
            virtual.append(VirtualNetwork(vni=net.vni, ports=per_node,
                                          gateways={home[net_id]: tuple(gateways)}))
        desired = node_state(me, underlays, virtual)
        result = reconcile(self.netns, desired, self.state_dir)
        if result.error:
            report.errors.append(f"network: {result.error}")
        report.actions.extend(f"network: {c}" for c in result.changed)
        self._firewall(desired, group_rows, group_ids, members, report)
        self._dhcp(me, home, networks, subnets, hosts, desired.overlay_mtu, report)

    def _firewall(self, desired: Any, group_rows: list[SecurityGroupRow], group_ids: dict[tuple[str, str], str],
                  members: dict[str, list[str]], report: Any) -> None:
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
        text = build_ruleset(desired.networks, groups, {k: tuple(v) for k, v in members.items()})
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
            cfg = DhcpConfig(network_id=f"vni{net.vni}", interface=bridge_name(net.vni), subnets=subs,
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
