"""The desired-state document builder (appliance/services/desired_state.py): a pure
function of the cluster's rows, checked on a small cluster of in-memory rows (no
database) and against golden files of its shape (``CAIRN_REGEN_GOLDEN=1`` rewrites
them when a change is intended; a change of shape is a new ``SCHEMA_VERSION``)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.db.models import (
    Claim,
    FloatingIp,
    Image,
    Instance,
    Network,
    Node,
    Port,
    Router,
    RouterInterface,
    SecurityGroup,
    StoragePool,
    Subnet,
)
from appliance.errors import NotFound
from appliance.services.desired_state import SCHEMA_VERSION, ClusterRows, NodeDocument, assemble
from network.secgroups import zone_for

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
P = "00000000-0000-4000-8000-00000000000p"


def _id(tag: str) -> str:
    return f"{tag:0>8}-0000-4000-8000-000000000000"


def _node(name: str, ip: str) -> Node:
    inventory = {"virt_type": "qemu", "underlay": {"ifname": "eth0", "ip": ip, "mtu": 1500}}
    return Node(id=_id(name), name=name, status={"inventory": inventory}, generation=1)


def _attached(port: str, mac: str, net: str, vni: int, address: str, gateway: str) -> dict[str, object]:
    return {"id": _id(port), "name": port, "mac": mac, "network": net, "network_id": _id(net), "vni": vni,
            "ips": [{"subnet": f"{net}-sub", "address": address, "prefix": 24, "gateway": gateway}]}


def cluster() -> ClusterRows:
    """n1 runs container ct (net-a); n2 runs VM web (net-a) and container bee (net-b);
    n3 runs nothing. Router r1 joins net-a and net-b, so it lives on n1 (the
    lowest-named node with a port of its networks) and both networks are homed there."""
    nodes = [_node("n1", "10.0.0.1"), _node("n2", "10.0.0.2"), _node("n3", "10.0.0.3")]
    networks = [Network(id=_id("net-a"), project_id=P, name="net-a", vni=100, spec={}),
                Network(id=_id("net-b"), project_id=P, name="net-b", vni=200, spec={})]
    subnets = [Subnet(id=_id("sub-a"), project_id=P, name="net-a-sub", network_id=_id("net-a"), cidr="10.1.0.0/24",
                      spec={"gateway": "10.1.0.1", "ip_version": 4}),
               Subnet(id=_id("sub-b"), project_id=P, name="net-b-sub", network_id=_id("net-b"), cidr="10.2.0.0/24",
                      spec={"gateway": "10.2.0.1", "ip_version": 4})]
    groups = [SecurityGroup(id=_id("sg-web"), project_id=P, name="web", spec={"rules": [
                  {"direction": "ingress", "protocol": "tcp", "port_min": 80, "port_max": 80},
                  {"direction": "ingress", "protocol": "any", "remote_group": "db"}]}),
              SecurityGroup(id=_id("sg-db"), project_id=P, name="db",
                            spec={"rules": [{"direction": "egress", "protocol": "any"}]})]
    ports = [Port(id=_id("p-web"), project_id=P, name="p-web", network_id=_id("net-a"), mac="52:54:00:00:00:01",
                  spec={"security_groups": ["web"]}),
             Port(id=_id("p-ct"), project_id=P, name="p-ct", network_id=_id("net-a"), mac="52:54:00:00:00:02",
                  spec={"security_groups": ["db"]}),
             Port(id=_id("p-bee"), project_id=P, name="p-bee", network_id=_id("net-b"), mac="52:54:00:00:00:03",
                  spec={"security_groups": ["db"]})]
    images = [Image(project_id=P, name="tiny", spec={"kind": "vm", "format": "kernel", "kernel": "/img/vmlinuz",
                                                     "initrd": "/img/initrd", "cmdline": "console=ttyS0"}),
              Image(project_id=P, name="busybox", spec={"kind": "container", "format": "oci",
                                                        "archive": "/img/busybox.tar", "command": ["/bin/sh"]})]
    web = Instance(id=_id("i-web"), project_id=P, name="web", kind="vm", node_id=_id("n2"), generation=3,
                   power_state="running", task_state=None,
                   spec={"power": "running", "cpu": 2, "memory_bytes": 512 << 20, "image": "tiny",
                         "qos_class": "guaranteed", "user_data": "#cloud-config\n{}\n", "reboots": 1},
                   status={"ports": [_attached("p-web", "52:54:00:00:00:01", "net-a", 100, "10.1.0.4", "10.1.0.1")],
                           "volumes": [{"volume": "web-root", "id": _id("v-root"),
                                        "export": "nbd+unix:///v?socket=/run/nbd.sock",
                                        "exports": {"tcp": "nbd://10.0.0.2:10809/v"}}],
                           "reboots_done": 1, "pinned_cpus": [2, 3]})
    ct = Instance(id=_id("i-ct"), project_id=P, name="ct", kind="container", node_id=_id("n1"), generation=1,
                  power_state="nostate", task_state=None,
                  spec={"power": "running", "cpu": 0.5, "memory_bytes": 64 << 20, "image": "busybox",
                        "env": {"A": "1"}, "command": ["sleep", "9"], "volumes": ["ct-data"],
                        "mounts": [{"volume": "ct-data", "path": "/var/lib/data", "fs": "xfs", "readonly": False}]},
                  status={"ports": [_attached("p-ct", "52:54:00:00:00:02", "net-a", 100, "10.1.0.5", "10.1.0.1")],
                          "volumes": [{"volume": "ct-data", "id": _id("v-ct"),
                                       "export": "nbd+unix:///c?socket=/run/nbd.sock", "exports": {}}]})
    bee = Instance(id=_id("i-bee"), project_id=P, name="bee", kind="container", node_id=_id("n2"), generation=1,
                   power_state="running", task_state="migrating",
                   spec={"power": "running", "cpu": 1, "memory_bytes": 64 << 20, "image": "gone"},
                   status={"ports": [_attached("p-bee", "52:54:00:00:00:03", "net-b", 200, "10.2.0.6",
                                               "10.2.0.1")]})
    router = Router(id=_id("r1"), project_id=P, name="r1", external_address="192.0.2.10", generation=2,
                    observed_generation=1, status={"node": "n1", "phase": "Active"},
                    conditions=[{"type": "Ready", "status": "True", "reason": "Active"}],
                    spec={"port_forwards": [{"protocol": "tcp", "external_port": 2222,
                                             "internal_address": "10.1.0.4", "internal_port": 22}]})
    return ClusterRows(
        nodes=nodes, instances=[web, ct, bee], migrating=[bee], images=images,
        claims=[Claim(workload_id=_id("i-web"), node_id=_id("n2"), numa_cell=0, workload_kind="vm",
                      cpu_units=2.0, memory_bytes=512 << 20)],
        networks=networks, subnets=subnets, ports=ports, groups=groups, routers=[router],
        interfaces=[RouterInterface(router_id=_id("r1"), subnet_id=_id("sub-a")),
                    RouterInterface(router_id=_id("r1"), subnet_id=_id("sub-b"))],
        floating_ips=[FloatingIp(project_id=P, name="ct-ip", address="192.0.2.11", port_id=_id("p-ct"),
                                 router_id=_id("r1"), fixed_address="10.1.0.5")],
        pools=[StoragePool(id=_id("pool"), name="default", node_id=_id("n1"),
                           spec={"url": "local:///srv/pool", "chunk_size": 65536, "nbd_port": 10809},
                           status={"phase": "Ready"})],
    )


@pytest.mark.parametrize("node", ["n1", "n2", "n3"])
def test_document_matches_its_golden_file(node: str) -> None:
    text = assemble(cluster(), node, NOW).model_dump_json(indent=1) + "\n"
    path = GOLDEN / f"desired_state_{node}.json"
    if os.environ.get("CAIRN_REGEN_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with CAIRN_REGEN_GOLDEN=1 once"
    assert text == path.read_text(), f"{path.name} differs (CAIRN_REGEN_GOLDEN=1 if intended)"
    assert NodeDocument.model_validate_json(text).schema_version == SCHEMA_VERSION  # it reads back


def test_instances_are_resolved_for_their_node_only() -> None:
    n2 = assemble(cluster(), "n2", NOW)
    assert [i.name for i in n2.instances] == ["bee", "web"]  # by id
    web = next(i for i in n2.instances if i.name == "web")
    assert web.image is not None and (web.image.kernel, web.image.initrd) == ("/img/vmlinuz", "/img/initrd")
    assert web.disks[0].exports == {"tcp": "nbd://10.0.0.2:10809/v"} and web.numa_cell == 0
    assert (web.nics[0].vni, web.nics[0].ips[0].prefix, web.observed.pinned_cpus) == (100, 24, [2, 3])
    bee = next(i for i in n2.instances if i.name == "bee")
    assert bee.image is None and bee.migrating  # a gone image is the agent's error to report
    assert n2.moving == [f"cairn-bee-{_id('i-bee')[:8]}"]
    assert assemble(cluster(), "n3", NOW).instances == []


def test_networks_routers_and_groups_follow_the_ports() -> None:
    n1, n2, n3 = (assemble(cluster(), n, NOW) for n in ("n1", "n2", "n3"))
    # the router lives with the lowest-named node that has a port; it homes both networks
    assert [r.name for r in n1.network.routers] == ["r1"] and n2.network.routers == []
    assert {n.vni: n.home for n in n1.network.networks} == {100: "n1", 200: "n1"}
    assert all(n.dhcp is not None for n in n1.network.networks)
    assert all(n.dhcp is None for n in n2.network.networks)
    assert n1.network.zones == n2.network.zones == {100: zone_for(100), 200: zone_for(100)}
    router = n1.network.routers[0]
    assert [(f.address, f.fixed_address) for f in router.floating_ips] == [("192.0.2.11", "10.1.0.5")]
    assert not router.reported.observed_current  # generation 2 not yet applied
    # every node's ports, for the remote forwarding entries
    assert {p.node for n in n2.network.networks for p in n.ports} == {"n1", "n2"}
    # groups of the node's own ports; members of the groups their rules name
    assert [g.id for g in n1.network.security_groups] == [_id("sg-db")] and n1.network.group_members == {}
    assert [g.id for g in n2.network.security_groups] == sorted([_id("sg-web"), _id("sg-db")])
    assert n2.network.group_members == {_id("sg-db"): ["10.1.0.5", "10.2.0.6"]}
    assert n3.network.networks == [] and n3.network.security_groups == []
    assert [u.node for u in n3.network.underlays] == ["n1", "n2", "n3"]


def test_revision_changes_with_the_content_only() -> None:
    rows = cluster()
    a = assemble(rows, "n1", NOW)
    assert assemble(rows, "n1", datetime(2027, 1, 1, tzinfo=UTC)).revision == a.revision
    rows.instances[1].spec = {**rows.instances[1].spec, "power": "stopped"}
    b = assemble(rows, "n1", NOW)
    assert b.revision != a.revision and json.loads(b.model_dump_json())["instances"][0]["power"] == "stopped"


def test_an_unknown_node_has_no_document() -> None:
    with pytest.raises(NotFound, match="no node named 'n9'"):
        assemble(cluster(), "n9", NOW)


def test_a_ceph_pool_is_in_every_nodes_document_a_local_one_in_its_nodes_only() -> None:
    rows = cluster()
    rows.pools.append(StoragePool(id=_id("ceph"), name="ceph", node_id=_id("n1"),
                                  spec={"backend": "rados", "url": "rados://cairn/cairn?conf=/etc/ceph/ceph.conf"},
                                  status={"phase": "Ready"}))
    assert [p.name for p in assemble(rows, "n1", NOW).pools] == ["ceph", "default"]
    for node in ("n2", "n3"):  # every node writes the Ceph pool (each owns its instances' volumes)
        assert [p.name for p in assemble(rows, node, NOW).pools] == ["ceph"]


def test_the_target_of_a_migration_gets_the_arriving_instance_as_a_document() -> None:
    rows = cluster()
    rows.claims.append(Claim(workload_id=f"migrating-{_id('i-bee')}"[:36], node_id=_id("n3"), numa_cell=None,
                             workload_kind="container", cpu_units=1.0, memory_bytes=64 << 20))
    n3 = assemble(rows, "n3", NOW)
    assert n3.arriving == [_id("i-bee")] and n3.instances == []  # not run here yet: staged only
    assert [(i.id, i.name, i.migrating, i.nics[0].vni) for i in n3.incoming] == [(_id("i-bee"), "bee", True, 200)]
    assert assemble(rows, "n1", NOW).incoming == [] and assemble(rows, "n2", NOW).incoming == []
    # its network's bridge is there before the guest arrives (no DHCP here: n1 homes net-b)
    assert [(n.vni, n.home, n.dhcp, n.carriers) for n in n3.network.networks] == [(200, "n1", None, ["n3"])]
    assert assemble(cluster(), "n3", NOW).network.networks == []
