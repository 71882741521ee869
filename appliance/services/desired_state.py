"""The desired-state document of one node (DESIGN.md, Node interface): everything that
node's agent needs to make its hypervisor, network and storage daemon match the
cluster, resolved into plain values, in one typed, versioned document.

``build(session, node)`` reads the tables once, in one transaction (a consistent view),
and ``assemble(rows, node)`` is the pure part that turns those rows into the document.
The agent caches the last document on local disk, so while the database is unreachable
(a failover) it keeps its guests running and restarts a crashed one from it.

The document holds VNIs, not bridge names: how a VNI is named on a host is the node's
own business (its stack tag). Versioning: ``schema_version`` is the document format (an
agent ignores a cached document of a format it does not know); ``revision`` is a hash
of the content, so a reader can tell whether anything changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

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
from network.secgroups import zone_for

SCHEMA_VERSION = 1
# task states during which a task, not the agent, acts on the instance's domain
HANDS_OFF = ("migrating", "restoring")
RULE_FIELDS = ("direction", "protocol", "port_min", "port_max", "remote_cidr", "remote_group", "ethertype")


def domain_name(instance_id: str, name: str) -> str:
    """An instance's name on its node: readable, unique across projects, and marked as
    Cairn's (only such names are ever removed as orphans)."""
    return f"cairn-{name[:48]}-{instance_id[:8]}"


def port_ifname(kind: str, port_id: str) -> str:
    """Host-side interface of a port: a VM's tap or a container's veth end."""
    return ("tp" if kind == "vm" else "ve") + port_id.replace("-", "")[:10]


class Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- instances --------------------------------------------------------------------------------

class ImageRef(Doc):
    name: str
    format: str  # kernel (direct boot) | disk | oci
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    archive: str | None = None
    command: list[str] | None = None
    # path -> SHA-256 of files shared through the cluster's image store (appliance.imagefiles)
    blobs: dict[str, str] = Field(default_factory=dict)


class Disk(Doc):
    volume: str
    export: str
    exports: dict[str, Any] = Field(default_factory=dict)
    # containers: where the volume is mounted, the filesystem a blank one gets, read-only
    path: str | None = None
    fs: str = "ext4"
    readonly: bool = False


class Address(Doc):
    address: str
    prefix: int = 32
    gateway: str | None = None


class Nic(Doc):
    port_id: str
    mac: str
    vni: int
    mtu: int | None = None
    ips: list[Address] = Field(default_factory=list)


class Observed(Doc):
    """What the node last reported (the agent compares with it)."""

    power_state: str = "nostate"
    reboots_done: int = 0
    pinned_cpus: list[int] = Field(default_factory=list)


class InstanceDoc(Doc):
    id: str
    name: str
    kind: Literal["vm", "container"]
    project_id: str
    domain: str
    generation: int
    power: str  # pending | running | stopped | paused | deleted
    migrating: bool = False  # a task acts on it (a migration, a restore of its memory), not the agent
    ha: bool = False  # restarted elsewhere if this node dies; started only while the node holds its lease
    kernel_args: str = ""  # added to a kernel image's command line
    cpu: float
    memory_bytes: int
    qos_class: str = "burstable"
    isolation: str = "container"
    tty: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    command: list[str] | None = None
    user_data: str | None = None
    stop_timeout: float = 30
    reboots: int = 0
    image: ImageRef | None = None  # None: the image is gone
    disks: list[Disk] = Field(default_factory=list)
    nics: list[Nic] = Field(default_factory=list)
    numa_cell: int | None = None
    observed: Observed = Field(default_factory=Observed)


# --- network ----------------------------------------------------------------------------------

class Underlay(Doc):
    node: str
    ifname: str
    ip: str
    mtu: int = 1500


class PortDoc(Doc):
    id: str
    node: str  # "" when its instance's node is gone
    mac: str
    ips: list[str]
    host_ifname: str
    name: str
    security_groups: list[str] = Field(default_factory=list)  # group ids


class DhcpSubnetDoc(Doc):
    cidr: str
    gateway: str | None = None


class DhcpHostDoc(Doc):
    mac: str
    ips: list[str]
    name: str


class Dhcp(Doc):
    """DHCP/DNS of a network homed on this node."""

    subnets: list[DhcpSubnetDoc]
    hosts: list[DhcpHostDoc]


class NetworkDoc(Doc):
    id: str
    vni: int
    home: str  # the node with its gateway address and DHCP (its router's node when routed)
    gateways: list[str] = Field(default_factory=list)  # "10.0.0.1/24" on the home node's bridge
    ports: list[PortDoc] = Field(default_factory=list)  # every node's ports
    dhcp: Dhcp | None = None  # only in the home node's document
    carriers: list[str] = Field(default_factory=list)  # this node, when a guest migrates here


class Rule(Doc):
    direction: str
    protocol: str = "any"
    port_min: int | None = None
    port_max: int | None = None
    remote_cidr: str | None = None
    remote_group: str | None = None  # a group id
    ethertype: str = "ipv4"


class Group(Doc):
    id: str
    rules: list[Rule] = Field(default_factory=list)


class RoutedSubnet(Doc):
    cidr: str
    vni: int


class Forward(Doc):
    protocol: str
    external_port: int
    internal_address: str
    internal_port: int


class FloatingAddress(Doc):
    address: str
    fixed_address: str


class RouterReport(Doc):
    """What was last reported for the router (so unchanged reports are not written)."""

    node: str | None = None
    phase: str | None = None
    ready_reason: str | None = None
    observed_current: bool = False


class RouterDoc(Doc):
    id: str
    name: str
    external_address: str | None = None
    subnets: list[RoutedSubnet] = Field(default_factory=list)
    port_forwards: list[Forward] = Field(default_factory=list)
    floating_ips: list[FloatingAddress] = Field(default_factory=list)
    reported: RouterReport = Field(default_factory=RouterReport)


class NetworkState(Doc):
    underlays: list[Underlay] = Field(default_factory=list)
    networks: list[NetworkDoc] = Field(default_factory=list)  # those with a port here or homed here
    security_groups: list[Group] = Field(default_factory=list)  # the groups of this node's ports
    group_members: dict[str, list[str]] = Field(default_factory=dict)  # remote groups' addresses
    zones: dict[int, int] = Field(default_factory=dict)  # VNI -> conntrack zone (routers share one)
    routers: list[RouterDoc] = Field(default_factory=list)  # routers placed on this node


# --- storage ----------------------------------------------------------------------------------

class PoolDoc(Doc):
    id: str
    name: str
    url: str
    chunk_size: int = 65536
    nbd_port: int | None = None
    phase: str | None = None
    message: str | None = None


class NodeDocument(Doc):
    schema_version: int = SCHEMA_VERSION
    node: str
    node_id: str
    revision: str = ""
    built_at: str = ""
    virt_type: str = "qemu"
    instances: list[InstanceDoc] = Field(default_factory=list)
    moving: list[str] = Field(default_factory=list)  # domains arriving here by live migration
    arriving: list[str] = Field(default_factory=list)  # ids of instances migrating to this node
    # the same instances as documents: the target stages their files (seed ISO, image
    # files) before the source's QEMU hands over
    incoming: list[InstanceDoc] = Field(default_factory=list)
    network: NetworkState = Field(default_factory=NetworkState)
    pools: list[PoolDoc] = Field(default_factory=list)

    def stamped(self, now: datetime | None = None) -> NodeDocument:
        """With ``revision`` (hash of the content) and ``built_at`` filled in."""
        body = self.model_dump(mode="json", exclude={"revision", "built_at"})
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        when = (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
        return self.model_copy(update={"revision": digest[:16], "built_at": when})


# --- building ---------------------------------------------------------------------------------

@dataclass
class ClusterRows:
    """The rows a document is assembled from (read in one transaction)."""

    nodes: list[Node]
    instances: list[Instance]  # every placed instance (ports of other nodes matter too)
    migrating: list[Instance] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    networks: list[Network] = field(default_factory=list)
    subnets: list[Subnet] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)
    groups: list[SecurityGroup] = field(default_factory=list)
    routers: list[Router] = field(default_factory=list)
    interfaces: list[RouterInterface] = field(default_factory=list)
    floating_ips: list[FloatingIp] = field(default_factory=list)
    pools: list[StoragePool] = field(default_factory=list)


def load(session: Session) -> ClusterRows:
    """Every table a node's document draws on, in the caller's transaction."""
    return ClusterRows(
        nodes=list(session.scalars(select(Node))),
        instances=list(session.scalars(select(Instance).where(Instance.node_id.is_not(None)))),
        migrating=list(session.scalars(select(Instance).where(Instance.task_state == "migrating"))),
        images=list(session.scalars(select(Image))),
        claims=list(session.scalars(select(Claim))),
        networks=list(session.scalars(select(Network))),
        subnets=list(session.scalars(select(Subnet))),
        ports=list(session.scalars(select(Port))),
        groups=list(session.scalars(select(SecurityGroup))),
        routers=list(session.scalars(select(Router))),
        interfaces=list(session.scalars(select(RouterInterface))),
        floating_ips=list(session.scalars(select(FloatingIp).where(FloatingIp.port_id.is_not(None),
                                                                     FloatingIp.router_id.is_not(None)))),
        pools=list(session.scalars(select(StoragePool))),
    )


def build(session: Session, node: str, now: datetime | None = None) -> NodeDocument:
    """The document of ``node`` as the database says now; NotFound for an unknown node."""
    return assemble(load(session), node, now)


def for_node(url: str, node: str) -> NodeDocument:
    """``build`` in a read-only transaction of its own."""
    from appliance.db.engine import session_scope

    with session_scope(url, readonly=True) as session:
        return build(session, node)


def assemble(rows: ClusterRows, node: str, now: datetime | None = None) -> NodeDocument:
    """Pure: the rows of the cluster -> the document of ``node``."""
    me = next((n for n in rows.nodes if n.name == node), None)
    if me is None:
        raise NotFound(f"there is no node named '{node}': its agent registers it")
    arriving = sorted(i.id for i in rows.migrating for c in rows.claims
                      if c.node_id == me.id and c.workload_id == f"migrating-{i.id}"[:36])
    images = {(i.project_id, i.name): i for i in rows.images}
    doc = NodeDocument(
        node=node, node_id=me.id,
        virt_type=str((me.status or {}).get("inventory", {}).get("virt_type", "qemu")),
        instances=_instances(rows, me),
        moving=sorted(domain_name(i.id, i.name) for i in rows.migrating),
        # a migration reserves room on its target under the id "migrating-<instance id>"
        arriving=arriving,
        incoming=[_instance(row, images, {}) for row in sorted(rows.migrating, key=lambda i: i.id)
                  if row.id in arriving],
        network=_network(rows, node, {p["network_id"] for i in rows.migrating if i.id in arriving
                                      for p in (i.status or {}).get("ports", [])}),
        # A Ceph pool is written by every node (each holds the locks of the volumes its
        # instances use: storage/README.md, "Several nodes"); a local one by its node only.
        pools=[_pool(p) for p in sorted(rows.pools, key=lambda p: p.name)
               if p.node_id == me.id or (p.spec or {}).get("backend") == "rados"],
    )
    return doc.stamped(now)


def _instances(rows: ClusterRows, me: Node) -> list[InstanceDoc]:
    images = {(i.project_id, i.name): i for i in rows.images}
    cells = {c.workload_id: c.numa_cell for c in rows.claims if c.node_id == me.id}
    return [_instance(row, images, cells)
            for row in sorted((i for i in rows.instances if i.node_id == me.id), key=lambda i: i.id)]


def _instance(row: Instance, images: dict[tuple[str, str], Image], cells: dict[str, int | None]) -> InstanceDoc:
    spec, status = row.spec or {}, row.status or {}
    image = images.get((row.project_id, spec.get("image", "")))
    mounts = {m["volume"]: {"path": m["path"], "fs": m.get("fs", "ext4"), "readonly": bool(m.get("readonly"))}
              for m in spec.get("mounts") or []}
    return InstanceDoc(
        id=row.id, name=row.name, kind=row.kind, project_id=row.project_id, domain=domain_name(row.id, row.name),
        generation=row.generation, power=spec.get("power", "running"), migrating=row.task_state in HANDS_OFF,
        ha=bool(spec.get("ha", False)), kernel_args=str(spec.get("kernel_args") or ""),
        cpu=float(spec.get("cpu", 1)), memory_bytes=int(spec.get("memory_bytes", 0)),
        qos_class=spec.get("qos_class", "burstable"), isolation=spec.get("isolation", "container"),
        tty=bool(spec.get("tty", False)), env={str(k): str(v) for k, v in (spec.get("env") or {}).items()},
        command=spec.get("command") or None, user_data=spec.get("user_data"),
        stop_timeout=float(spec.get("stop_timeout", 30)), reboots=int(spec.get("reboots", 0)),
        image=_image(image) if image is not None else None,
        disks=[Disk(volume=d["volume"], export=d["export"], exports=d.get("exports") or {},
                    **mounts.get(d["volume"], {})) for d in status.get("volumes", [])],
        nics=[Nic(port_id=p["id"], mac=p["mac"], vni=int(p["vni"]), mtu=p.get("mtu") or None,
                  ips=[Address(address=ip["address"], prefix=int(ip.get("prefix", 32)),
                               gateway=ip.get("gateway")) for ip in p.get("ips", [])])
              for p in status.get("ports", [])],
        numa_cell=cells.get(row.id),
        observed=Observed(power_state=row.power_state, reboots_done=int(status.get("reboots_done", 0)),
                          pinned_cpus=list(status.get("pinned_cpus", []))),
    )


def _image(row: Image) -> ImageRef:
    spec = row.spec or {}
    return ImageRef(name=row.name, format=spec.get("format", "kernel"), kernel=spec.get("kernel"),
                    initrd=spec.get("initrd"), cmdline=spec.get("cmdline"), archive=spec.get("archive"),
                    command=spec.get("command"), blobs=spec.get("blobs", {}))


def _pool(row: StoragePool) -> PoolDoc:
    spec, status = row.spec or {}, row.status or {}
    return PoolDoc(id=row.id, name=row.name, url=spec["url"], chunk_size=int(spec.get("chunk_size", 65536)),
                   nbd_port=spec.get("nbd_port"), phase=status.get("phase"), message=status.get("message"))


def _network(rows: ClusterRows, me: str, arriving: set[str] | frozenset[str] = frozenset()) -> NetworkState:
    """The network reconciler's view: which networks this node carries and homes, the
    security groups of its ports, the routers placed on it. Every node derives the same
    placement (router -> lowest-named node hosting a port of its networks), so a router
    moves when its ports do. ``arriving``: networks of instances migrating here (their
    bridges must exist before the guest does)."""
    node_names = {n.id: n.name for n in rows.nodes}
    underlays = []
    for n in sorted(rows.nodes, key=lambda n: n.name):
        u = (n.status or {}).get("inventory", {}).get("underlay")
        if u:
            underlays.append(Underlay(node=n.name, ifname=u["ifname"], ip=u["ip"], mtu=int(u.get("mtu", 1500))))
    networks = {n.id: n for n in rows.networks}
    port_rows = {p.id: p for p in rows.ports}
    group_ids = {(g.project_id, g.name): g.id for g in rows.groups}
    ports: dict[str, list[PortDoc]] = defaultdict(list)  # network id -> ports (every node's)
    members: dict[str, list[str]] = defaultdict(list)
    for inst in sorted(rows.instances, key=lambda i: (i.name, i.id)):
        owner = node_names.get(inst.node_id or "", "")
        for p in (inst.status or {}).get("ports", []):
            ips = [ip["address"] for ip in p.get("ips", [])]
            row = port_rows.get(p["id"])
            names = (row.spec or {}).get("security_groups", []) if row else []
            gids = [group_ids[(inst.project_id, n)] for n in names if (inst.project_id, n) in group_ids]
            for gid in gids:
                members[gid].extend(ips)
            ports[p["network_id"]].append(PortDoc(id=p["id"], node=owner, mac=p["mac"], ips=ips,
                                                  host_ifname=port_ifname(inst.kind, p["id"]), name=inst.name,
                                                  security_groups=gids))
    subnets = {s.id: s for s in rows.subnets}
    routers = {r.id: r for r in rows.routers}
    routed: dict[str, list[Subnet]] = defaultdict(list)  # router id -> its subnets
    for iface in rows.interfaces:
        if iface.subnet_id in subnets and iface.router_id in routers:
            routed[iface.router_id].append(subnets[iface.subnet_id])
    placement = _place_routers(routed, ports)
    zones = _router_zones(routed, networks)
    docs = []
    for net_id, net_ports in ports.items():
        net = networks.get(net_id)
        nodes_here = {p.node for p in net_ports if p.node}
        if net is None or not nodes_here:
            continue
        home = next((n for rid, n in placement.items() if any(s.network_id == net_id for s in routed[rid])),
                    min(nodes_here))
        if me not in nodes_here and home != me and net_id not in arriving:
            continue  # nothing of it on this node
        net_subnets = sorted((s for s in rows.subnets if s.network_id == net_id), key=lambda s: s.name)
        gateways = [f"{s.spec['gateway']}/{ipaddress.ip_network(s.cidr).prefixlen}"
                    for s in net_subnets if s.spec.get("ip_version") == 4]
        dhcp = None
        if home == me:
            dhcp = Dhcp(subnets=[DhcpSubnetDoc(cidr=s.cidr, gateway=s.spec.get("gateway")) for s in net_subnets],
                        hosts=[DhcpHostDoc(mac=p.mac, ips=p.ips, name=p.name) for p in net_ports])
        docs.append(NetworkDoc(id=net_id, vni=net.vni, home=home, gateways=gateways, ports=net_ports, dhcp=dhcp,
                               carriers=[me] if net_id in arriving and me not in nodes_here else []))
    docs.sort(key=lambda n: n.vni)
    carried = {n.vni for n in docs}
    local = [p for n in docs for p in n.ports if p.node == me]
    used = {g for p in local for g in p.security_groups}
    groups = [_group(g, group_ids) for g in sorted(rows.groups, key=lambda g: g.id) if g.id in used]
    remote = {r.remote_group for g in groups for r in g.rules if r.remote_group}
    vni_zones = {networks[s.network_id].vni: zone for rid, zone in zones.items() for s in routed[rid]
                 if s.network_id in networks}
    mine = [_router(routers[rid], routed[rid], networks, rows.floating_ips, me)
            for rid, n in sorted(placement.items()) if n == me]
    return NetworkState(underlays=underlays, networks=docs, security_groups=groups,
                        group_members={g: sorted(members.get(g, [])) for g in sorted(remote)},
                        zones={v: z for v, z in sorted(vni_zones.items()) if v in carried}, routers=mine)


def _group(row: SecurityGroup, group_ids: dict[tuple[str, str], str]) -> Group:
    rules = []
    for r in (row.spec or {}).get("rules", []):
        fields = {k: v for k, v in r.items() if k in RULE_FIELDS}
        if fields.get("remote_group"):
            fields["remote_group"] = group_ids.get((row.project_id, fields["remote_group"]))
        rules.append(Rule(**fields))
    return Group(id=row.id, rules=rules)


def _router(row: Router, subnets: list[Subnet], networks: dict[str, Network], fips: list[FloatingIp],
            me: str) -> RouterDoc:
    status = row.status or {}
    ready: dict[str, Any] = next((c for c in row.conditions or [] if c.get("type") == "Ready"), {})
    return RouterDoc(
        id=row.id, name=row.name, external_address=row.external_address,
        subnets=[RoutedSubnet(cidr=s.cidr, vni=networks[s.network_id].vni)
                 for s in sorted(subnets, key=lambda s: s.id) if s.network_id in networks],
        port_forwards=[Forward(protocol=pf["protocol"], external_port=int(pf["external_port"]),
                               internal_address=pf["internal_address"], internal_port=int(pf["internal_port"]))
                       for pf in (row.spec or {}).get("port_forwards", [])],
        floating_ips=[FloatingAddress(address=f.address, fixed_address=f.fixed_address)
                      for f in sorted(fips, key=lambda f: f.address) if f.router_id == row.id and f.fixed_address],
        reported=RouterReport(node=status.get("node"), phase=status.get("phase"), ready_reason=ready.get("reason"),
                              observed_current=row.observed_generation == row.generation),
    )


def _place_routers(routed: dict[str, list[Subnet]], ports: dict[str, list[PortDoc]]) -> dict[str, str]:
    """Router id -> its node: the lowest-named node hosting a port of its networks.
    Routers sharing a network share a node (the network has one gateway)."""
    placement: dict[str, str] = {}
    for rid in sorted(routed, key=lambda r: min(s.id for s in routed[r])):
        nodes = {p.node for s in routed[rid] for p in ports.get(s.network_id, []) if p.node}
        taken = {placement[o] for o in placement if {s.network_id for s in routed[o]}
                 & {s.network_id for s in routed[rid]}}
        if taken:
            placement[rid] = min(taken)
        elif nodes:
            placement[rid] = min(nodes)
    return placement


def _router_zones(routed: dict[str, list[Subnet]], networks: dict[str, Network]) -> dict[str, int]:
    """Router id -> the conntrack zone all its networks share (that of the lowest VNI
    among routers linked by a network), so replies routed between them or coming back
    from the uplink find their flow."""
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
