"""Routers end to end with real kernel objects: the agent's network reconciler, one
pass at a time, on two simulated nodes (network namespaces on a lab underlay), with
endpoint namespaces standing in for containers and a stand-in "external" namespace
on the router node's external interface. Every packet stays inside namespaces this
test makes; all of them (and the dnsmasq the reconciler starts) are removed after
it, also on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from appliance.agent.agent import PassReport
from appliance.agent.network import NetworkReconciler, port_ifname
from appliance.db.engine import session_scope
from appliance.db.models import Instance, Node, Project, Router
from appliance.processes import prepare
from appliance.services import auth, desired_state, networks, nodes, routers
from appliance.settings import Settings
from network.model import HostNames, Port
from network.netlink import node_links, read_sysctl, run_in_netns
from network.router import router_table
from tests.network.lab import Lab, listen, tcp_exchange, wait_ping

from .test_resources import INVENTORY

pytestmark = pytest.mark.functional
EXTERNAL = "198.51.100"  # TEST-NET-2, only ever inside the lab's namespaces


@dataclass
class World:
    lab: Lab
    url: str
    agents: dict[str, NetworkReconciler]  # node name -> its reconciler (in its namespace)
    ext: str  # the stand-in external network's namespace

    def admin(self, session: Any) -> Any:
        return auth.principal_for(session, auth._user(session, "admin"), "token")

    def settings(self, node: str) -> Settings:
        return self.agents[node].settings

    def run(self, *names: str) -> PassReport:
        """One pass of each named node's reconciler (all nodes by default); no errors allowed."""
        merged = PassReport()
        for name in names or tuple(self.agents):
            report = PassReport()
            self.agents[name].reconcile(desired_state.for_node(self.url, name), report)
            assert report.errors == [], f"{name}: {report.errors}"
            merged.actions += [f"{name}: {a}" for a in report.actions]
        return merged

    def place(self, node: str, port: dict[str, Any], ns_short: str) -> str:
        """A container placed on ``node`` with ``port`` (as the create task records it),
        and an endpoint namespace plugged in where its veth would be."""
        with session_scope(self.url) as session:
            project = session.scalar(select(Project).where(Project.name == "default"))
            node_id = session.scalar(select(Node.id).where(Node.name == node))
            assert project is not None
            subnet = networks.subnets.row(session, self.admin(session), "default",
                                          port["status"]["ips"][0]["subnet"])[0]
            gateway = subnet.spec["gateway"]
            ips = [{**ip, "prefix": 24, "gateway": gateway} for ip in port["status"]["ips"]]
            net = networks.networks.row(session, self.admin(session), "default", port["spec"]["network"])[0]
            attached = {"id": port["id"], "name": port["name"], "mac": port["status"]["mac"], "ips": ips,
                        "network": net.name, "network_id": net.id, "vni": net.vni}
            session.add(Instance(name=port["name"], project_id=project.id, kind="container", node_id=node_id,
                                 vm_state="active", power_state="running", spec={}, status={"ports": [attached]}))
        n = 1 if node == "rt-a" else 2
        address = port["status"]["ips"][0]["address"]
        lib_port = Port(port["id"], port["status"]["mac"], (address,),
                        host_ifname=port_ifname("container", port["id"]))
        return self.lab.endpoint(n, ns_short, lib_port, f"{address}/24", gw=gateway)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    url = f"sqlite:///{tmp_path / 'cairn.db'}"
    vnis = f"{20000 + os.getpid() % 5000 * 10}-{20009 + os.getpid() % 5000 * 10}"
    common = {"database_url": url, "vni_range": vnis, "external_interface": "up0",
              "external_cidr": f"{EXTERNAL}.0/24", "external_pool": f"{EXTERNAL}.10-{EXTERNAL}.20"}
    prepare(Settings(data_dir=tmp_path / "ctl", **common))
    lab = Lab(nodes=2)
    agents: dict[str, NetworkReconciler] = {}
    try:
        lab.up()
        ext = lab.make_ns("ext")
        with node_links(lab.node(1)) as nl:  # rt-a's external interface, nothing on it yet
            nl.add_veth("up0", "eth0", 1500, peer_ns=ext)
            nl.set_link(nl.index("up0"), state="up")
        with node_links(ext) as nl:
            i = nl.index("eth0")
            nl.addr_add(i, f"{EXTERNAL}.2/24")
            nl.set_link(i, state="up")
        with session_scope(url) as session:
            for n, name in ((1, "rt-a"), (2, "rt-b")):
                inventory = {**INVENTORY, "underlay": {"ifname": "ul0", "ip": lab.vtep(n), "mtu": 1500}}
                nodes.register(session, name, inventory, {"cpu": 16, "memory_bytes": 8 << 30})
        for n, name in ((1, "rt-a"), (2, "rt-b")):
            settings = Settings(data_dir=tmp_path / name, node_name=name, **common)
            agents[name] = NetworkReconciler(settings, netns=lab.node(n))
        yield World(lab, url, agents, ext)
    finally:
        for agent in agents.values():
            agent.stop()  # dnsmasq
        lab.close()  # namespaces, and with them the bridges, VXLAN devices and nft tables


def test_router_egress_port_forward_floating_ip_drift_and_removal(world: World) -> None:
    url = world.url
    settings = world.settings("rt-a")
    with session_scope(url) as session:
        admin = world.admin(session)
        networks.create_network(session, admin, settings, "default", "lab", {"cidr": "10.61.0.0/24"})
        networks.create_network(session, admin, settings, "default", "lab2", {"cidr": "10.62.0.0/24"})
        networks.create_secgroup(session, admin, "default", "web", "")
        for rule in ({"direction": "egress", "protocol": "any"},
                     {"direction": "ingress", "protocol": "tcp", "port_min": 22, "port_max": 80}):
            networks.add_rule(session, admin, "default", "web", rule, None)
        web = networks.create_port(session, admin, "default", "web", {"network": "lab", "security_groups": ["web"]})
        client = networks.create_port(session, admin, "default", "client",
                                      {"network": "lab", "security_groups": ["web"]})
        db = networks.create_port(session, admin, "default", "db", {"network": "lab2", "security_groups": ["web"]})
    ep_client = world.place("rt-a", client, "cl")  # rt-a hosts a port: the router lives there
    ep_web = world.place("rt-b", web, "wb")  # web is one VXLAN hop away from its router
    ep_db = world.place("rt-b", db, "db")  # on the router's other network
    web_ip, client_ip = (p["status"]["ips"][0]["address"] for p in (web, client))
    with session_scope(url) as session:
        admin = world.admin(session)
        router = routers.create_router(session, admin, settings, "default", "r1", {"networks": ["lab", "lab2"]})
        routers.add_port_forward(session, admin, "default", "r1", {"protocol": "tcp", "external_port": 2222,
                                                                   "port": "web", "internal_port": 22})
        fip = routers.create_floating_ip(session, admin, settings, "default", "client-ip", {"port": "client"})
    outer, fip_ip = router["status"]["external_address"], fip["status"]["address"]
    assert (outer, fip_ip) == (f"{EXTERNAL}.10", f"{EXTERNAL}.11")

    forward_before = read_sysctl(world.lab.node(1), "net.ipv4.ip_forward")
    actions = world.run("rt-b", "rt-a")
    assert "rt-a: network: router: router rules loaded" in actions.actions
    assert f"rt-a: network: router: added {outer}/24 to up0" in actions.actions
    assert not any("router" in a for a in actions.actions if a.startswith("rt-b"))  # no router there
    with session_scope(url) as session:
        row = session.scalar(select(Router).where(Router.name == "r1"))
        assert row is not None and row.status["node"] == "rt-a" and row.status["phase"] == "Active"
        assert row.observed_generation == row.generation
    assert wait_ping(ep_web, "10.61.0.1", 10)  # the gateway on rt-a's bridge, across VXLAN

    outside = listen(world.ext, f"{EXTERNAL}.2", 8080)
    ssh = listen(ep_web, web_ip, 22)
    http = listen(ep_client, client_ip, 80)
    try:
        def seen_as(src: str) -> str:
            assert tcp_exchange(src, None, f"{EXTERNAL}.2", 8080) == "connected"
            conn, peer = outside.accept()
            conn.close()
            return str(peer[0])

        def routes() -> None:
            assert seen_as(ep_web) == outer  # egress NAT to the router's own address
            assert seen_as(ep_client) == fip_ip  # a floating IP's port leaves as it
            assert tcp_exchange(ep_web, outside, f"{EXTERNAL}.2", 8080) == "ok"
            assert tcp_exchange(world.ext, ssh, outer, 2222) == "ok"  # port forward, across VXLAN
            assert tcp_exchange(world.ext, http, fip_ip, 80) == "ok"  # floating IP
            # between the router's networks, to a port on the router's node (one conntrack zone)
            assert tcp_exchange(ep_db, http, client_ip, 80) == "ok"

        routes()
        # a second pass changes nothing
        again = world.run()
        assert again.actions == []

        # drift: rules flushed and an address removed by hand come back on the next pass
        names = HostNames(settings.stack_tag)
        run_in_netns(world.lab.node(1), ["nft", "delete", "table", "ip", names.nat_table])
        with node_links(world.lab.node(1)) as nl:
            nl.addr_del(nl.index("up0"), f"{fip_ip}/24")
        assert tcp_exchange(world.ext, ssh, outer, 2222, timeout=1) != "ok"
        repaired = world.run("rt-a").actions
        assert "rt-a: network: router: router rules loaded" in repaired
        assert f"rt-a: network: router: added {fip_ip}/24 to up0" in repaired
        routes()

        # deleted: rules, external addresses and forwarding go with the router
        with session_scope(url) as session:
            admin = world.admin(session)
            routers.disassociate(session, admin, "default", "client-ip")
            routers.delete_floating_ip(session, admin, "default", "client-ip")
            routers.delete_router(session, admin, "default", "r1")
        gone = world.run("rt-a").actions
        assert "rt-a: network: router: router rules removed" in gone
        assert router_table(world.lab.node(1), names) is None
        with node_links(world.lab.node(1)) as nl:
            assert not [a for a in nl.addresses(nl.index("up0")) if a.startswith(EXTERNAL)]
        assert read_sysctl(world.lab.node(1), "net.ipv4.ip_forward") == forward_before
        assert tcp_exchange(ep_web, None, f"{EXTERNAL}.2", 8080, timeout=1) == "timeout"
        assert tcp_exchange(world.ext, None, outer, 2222, timeout=1) != "connected"
        world.run()  # lab2's gateway and DHCP go back to rt-b, where its only port is
        assert world.run().actions == []
    finally:
        for s in (outside, ssh, http):
            s.close()
