"""Request and response schemas, one family per resource (FooCreate / FooUpdate / FooPublic).
Requests forbid unknown fields so typos are reported instead of ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
    Field(description="lower-case letters, digits and '-', 1–63 characters, starting and ending "
                      "with a letter or digit (a DNS label)"),
]
Role = Literal["viewer", "operator", "admin"]
Limit = Annotated[int, Field(ge=1, le=1000)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- generic shapes -----------------------------------------------------------------------

class Condition(Open):
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str | None = None


class ResourcePublic(Open):
    id: str
    name: str
    project: str | None
    spec: dict[str, Any]
    status: dict[str, Any]
    generation: int
    observed_generation: int
    conditions: list[Condition]
    created_at: str | None
    updated_at: str | None


class ResourceList(Open):
    items: list[ResourcePublic]
    next_cursor: str | None


class Problem(Open):
    type: str
    title: str
    status: int
    detail: str


# --- auth ---------------------------------------------------------------------------------

class LoginRequest(Strict):
    username: Annotated[str, Field(min_length=1, max_length=63)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class RoleRef(Open):
    project: str
    role: str


class Me(Open):
    name: str
    cluster_role: str | None
    roles: list[RoleRef]


class LoginResponse(Open):
    user: Me
    csrf_token: str


class UserSpec(Strict):
    display_name: Annotated[str, Field(max_length=200)] = ""
    email: Annotated[str, Field(max_length=254)] = ""


class UserCreate(Strict):
    name: Name
    password: Annotated[str, Field(min_length=12, max_length=1024,
                                   description="at least 12 characters")]
    cluster_role: Role | None = None
    spec: UserSpec = UserSpec()


Limit0 = Annotated[int, Field(ge=0, le=1 << 62)]


class PasswordChange(Strict):
    current_password: Annotated[str, Field(min_length=1, max_length=1024)]
    new_password: Annotated[str, Field(min_length=12, max_length=1024, description="at least 12 characters")]


class UserUpdate(Strict):
    active: bool | None = Field(None, description="false: disable (tokens and sessions stop working at once)")
    password: Annotated[str, Field(min_length=12, max_length=1024,
                                   description="reset it (ends the user's console sessions)")] | None = None
    cluster_role: Role | None = Field(None, description="send null to remove the cluster role")


class Quota(Strict):
    """A project's limits; null (or absent) = unlimited. Only cluster admins set them."""
    instances: Limit0 | None = None
    cpu: Limit0 | None = Field(None, description="vCPUs of all its VMs and containers")
    memory_bytes: Limit0 | None = None
    volume_bytes: Limit0 | None = Field(None, description="sizes of all its volumes (root and image volumes too)")
    snapshots: Limit0 | None = None
    networks: Limit0 | None = None
    floating_ips: Limit0 | None = None
    routers: Limit0 | None = None


class QuotaUsage(Open):
    project: str
    limits: dict[str, int | None]
    usage: dict[str, float]


class ProjectSpec(Strict):
    description: Annotated[str, Field(max_length=1000)] = ""
    quota: Quota = Quota()


class ProjectCreate(Strict):
    name: Name
    spec: ProjectSpec = ProjectSpec()


class ProjectSpecPatch(Strict):
    description: Annotated[str, Field(max_length=1000)] = ""
    quota: Quota | None = Field(None, description="null: unchanged; changing it needs a cluster admin "
                                                  "(or PUT /projects/{name}/quota)")


class ProjectUpdate(Strict):
    spec: ProjectSpecPatch


class MemberSet(Strict):
    role: Role


class Member(Open):
    project: str
    user: str
    role: str


class TokenCreate(Strict):
    name: Name
    expires_days: Annotated[float, Field(gt=0, le=3650)] | None = None


class TokenCreated(ResourcePublic):
    token: str = Field(description="shown only once: store it now")


class TokenList(Open):
    items: list[ResourcePublic]


# --- nodes and tasks ------------------------------------------------------------------------

LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._/-]+$")]
LabelValue = Annotated[str, StringConstraints(max_length=63)]


class NodeSpecPatch(Strict):
    schedulable: bool | None = None
    labels: dict[LabelKey, LabelValue] | None = None


class NodeUpdate(Strict):
    spec: NodeSpecPatch


class BenchmarkRequest(Strict):
    seconds: Annotated[float, Field(ge=0.5, le=600)] = 6.0


class Progress(Open):
    percent: float
    message: str


class TaskPublic(Open):
    id: str
    name: str
    project: str | None
    state: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    error: str | None
    result: dict[str, Any] | None
    resource: dict[str, Any] | None
    attempts: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class TaskList(Open):
    items: list[TaskPublic]
    next_cursor: str | None


class MemberVersion(Open):
    name: str
    code: str | None = Field(description="the member's Cairn release (None: recorded before 0.1.0 kept it)")
    schema_: str = Field(alias="schema", description="the newest schema revision the member's code carries")


class Versions(Open):
    database_schema: str | None
    compatible_with: str | None = Field(description="the oldest code schema that can run on the database")
    members: list[MemberVersion]


class AuditObject(Open):
    kind: str | None
    name: str | None
    project: str | None


class AuditRecord(Open):
    seq: int
    time: str | None
    user: str | None
    via: str | None
    source: str | None
    method: str
    path: str
    action: str
    object: AuditObject
    status: int
    outcome: Literal["ok", "denied", "refused", "failed"]
    detail: str | None


class AuditList(Open):
    items: list[AuditRecord]
    next_cursor: str | None
    retention_days: float


class ClusterStatus(Open):
    version: str
    node: str
    nodes: dict[str, int]
    tasks: dict[str, int]
    instances: dict[str, dict[str, int]] = Field(default_factory=dict,
                                                 description="VMs and containers you can see: total and per vm_state")
    versions: Versions


class Health(Open):
    status: str
    version: str


class ClusterMember(Open):
    name: str
    address: str
    roles: list[str]
    ready: bool


class ClusterView(Open):
    mode: Literal["embedded", "cluster"]
    members: list[ClusterMember]
    quorum: bool
    database: dict[str, Any]
    ceph: dict[str, Any]


class JoinTokenCreate(Strict):
    ttl_seconds: int = Field(900, ge=1, le=86400, description="how long the token is valid (it is single-use)")


class JoinToken(Open):
    token: str
    id: str
    expires_at: str
    ca_fingerprint: str


class JoinRequest(Strict):
    token: str = Field(min_length=8, max_length=256, description="from `cairn cluster token create`")
    name: Name
    address: str = Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$", description="the node's cluster-network IPv4 address")
    csr: str = Field(min_length=100, max_length=8192, description="PEM certificate request for the node's key")
    osds: list[str] = Field(default_factory=list, max_length=64,
                            description="data disks that become OSDs (block devices, or file:<bytes>)")


# --- project-scoped resources ---------------------------------------------------------------

ProjectName = Annotated[str, Field(min_length=1, max_length=63, description="the project it lives in")]


class PlacementGroupSpec(Strict):
    policy: Literal["affinity", "anti-affinity"]


class PlacementGroupCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: PlacementGroupSpec


# --- networks -------------------------------------------------------------------------------

class NetworkSpec(Strict):
    cidr: Annotated[str, Field(max_length=64, description="also create a first subnet")] | None = None
    mtu: Annotated[int, Field(ge=576, le=9000)] | None = None
    description: Annotated[str, Field(max_length=1000)] = ""


class NetworkCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: NetworkSpec = NetworkSpec()


class Pool(Strict):
    start: Annotated[str, Field(max_length=64)]
    end: Annotated[str, Field(max_length=64)]


class SubnetSpec(Strict):
    network: Name
    cidr: Annotated[str, Field(max_length=64)]
    gateway: Annotated[str, Field(max_length=64)] | None = None
    allocation_pools: Annotated[list[Pool], Field(max_length=16)] = []
    dns_nameservers: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=8)] = []


class SubnetCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: SubnetSpec


class Reservation(Strict):
    address: Annotated[str, Field(max_length=64)]


MacAddress = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]


class PortSpec(Strict):
    network: Name
    mac: MacAddress | None = None
    fixed_ips: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=8)] = []
    security_groups: Annotated[list[Name], Field(max_length=16)] = []


class PortCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: PortSpec


class SecurityGroupSpec(Strict):
    description: Annotated[str, Field(max_length=1000)] = ""


class SecurityGroupCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: SecurityGroupSpec = SecurityGroupSpec()


PortNumber = Annotated[int, Field(ge=1, le=65535)]


class RuleCreate(Strict):
    direction: Literal["ingress", "egress"] = "ingress"
    protocol: Literal["tcp", "udp", "icmp", "icmpv6", "any"] = "tcp"
    port_min: PortNumber | None = None
    port_max: PortNumber | None = None
    remote_cidr: Annotated[str, Field(max_length=64)] | None = None
    remote_group: Name | None = None
    ethertype: Literal["ipv4", "ipv6"] = "ipv4"


# --- routers and floating IPs ------------------------------------------------------------------

class RouterSpecIn(Strict):
    external: bool = Field(True, description="take an address of the external pool: egress NAT, port "
                                             "forwards and floating IPs through the node's external interface")
    networks: Annotated[list[Name], Field(max_length=16, description="attach their IPv4 subnets")] = []
    subnets: Annotated[list[Name], Field(max_length=16)] = []
    description: Annotated[str, Field(max_length=1000)] = ""


class RouterCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: RouterSpecIn = RouterSpecIn()


class RouterInterfaceRef(Strict):
    network: Name | None = Field(None, description="every IPv4 subnet of this network")
    subnet: Name | None = None


class PortForwardCreate(Strict):
    protocol: Literal["tcp", "udp"] = "tcp"
    external_port: PortNumber = Field(description="on the router's external address")
    internal_port: PortNumber | None = Field(None, description="default: external_port")
    port: Name | None = Field(None, description="the target port (its address in the router's networks)")
    internal_address: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="or the target address, in one of the router's subnets")


class FloatingIpSpecIn(Strict):
    port: Name | None = Field(None, description="associate at once with this port")
    description: Annotated[str, Field(max_length=1000)] = ""


class FloatingIpCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: FloatingIpSpecIn = FloatingIpSpecIn()


class FloatingIpAssociate(Strict):
    port: Name


# --- images and instances ---------------------------------------------------------------------

class ImportTestGuest(Strict):
    project: ProjectName = "default"


Size = Annotated[int | Annotated[str, Field(max_length=32)], Field(description="bytes, or e.g. 256MiB / 1GiB")]
QosClass = Literal["guaranteed", "burstable", "best-effort"]


class InstanceSpecIn(Strict):
    cpu: Annotated[float, Field(gt=0, le=256)]
    memory: Size
    image: Name
    qos_class: QosClass = "burstable"
    networks: Annotated[list[Name], Field(max_length=8)] = []
    security_groups: Annotated[list[Name], Field(max_length=16)] = []
    placement_group: Name | None = None
    node_selector: dict[LabelKey, LabelValue] = {}
    user_data: Annotated[str, Field(max_length=65536)] | None = None
    kernel_args: Annotated[str, Field(max_length=1024, pattern=r"^[ -~]*$",
                                      description="VMs of a kernel image: added to its kernel command line")] = ""
    ha: bool = False
    power: Literal["running", "stopped"] = "running"
    volumes: Annotated[list[Name], Field(max_length=16, description="existing volumes to attach, in order")] = []
    root_size: Size | None = Field(None, description="disk images: grow the root volume cloned from the image")


class VmCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: InstanceSpecIn


class ContainerVolume(Strict):
    volume: Name = Field(description="an existing volume (dedup or rbd)")
    path: Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$", max_length=200)] = Field(
        description="where it is mounted in the container (absolute, not /)")
    fs: Literal["ext4", "xfs"] = Field("ext4", description="the filesystem a blank volume gets on first use "
                                                          "(xfs needs at least 300 MiB)")
    readonly: bool = False


class ContainerSpecIn(InstanceSpecIn):
    volumes: Annotated[list[ContainerVolume], Field(
        max_length=16, description="volumes mounted as filesystems, e.g. {volume: data, path: /var/lib/data}",
    )] = []  # type: ignore[assignment]  # a container mounts each volume at a path
    command: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=256)] = []
    env: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=255)],
              Annotated[str, Field(max_length=65536)]] = {}
    tty: bool = False
    isolation: Literal["container", "vm"] = Field(
        "container", description="vm: run the container inside its own microVM (hard multi-tenancy)")


class ContainerCreate(Strict):
    name: Name
    project: ProjectName = "default"
    spec: ContainerSpecIn


class ExecRequest(Strict):
    command: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=256)]
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    tty: bool = Field(False, description="run it on a terminal (its output then all comes as stdout)")


class MigrateRequest(Strict):
    to: Name = Field(description="the target node")


# --- storage ------------------------------------------------------------------------------

class StoragePoolCreate(Strict):
    name: Name
    node: Name = Field(description="the node whose storage daemon writes the pool")
    backend: Literal["local", "rados"] = "local"
    url: Annotated[str, Field(min_length=1, max_length=1024,
                              description="local: an absolute directory; rados: rados://<pool>/<ns>?conf=...")]
    chunk_size: Annotated[int, Field(ge=4096, le=1 << 22, description="dedup block size, a power of two")] = 65536
    replication: Annotated[int, Field(ge=1, le=7)] = 1


class VolumeSource(Strict):
    image: Name | None = None
    volume: Name | None = None
    snapshot: Name | None = None


class VolumeCreate(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    project: ProjectName = "default"
    size: Size | None = Field(None, description="required unless cloning; a clone may be larger than its source")
    pool: Name | None = Field(None, description="default: 'default'; a clone stays in its source's pool")
    storage_class: Literal["dedup", "rbd"] = Field("dedup", alias="class")
    source: VolumeSource | None = None
    labels: dict[LabelKey, LabelValue] = {}


class VolumeResize(Strict):
    size: Size
    force: bool = Field(False, description="allow shrinking (loses the data past the new end)")


class SnapshotCreate(Strict):
    name: Name


class VmSnapshotCreate(Strict):
    name: Name
    memory_state: bool = Field(False, description="also keep the running VM's memory: a restore resumes it "
                                                  "where it was (Proxmox's 'include RAM')")


class VolumeRollback(Strict):
    snapshot: Name


class VmClone(Strict):
    snapshot: Name
    name: Name = Field(description="the new VM")


class VolumeClone(Strict):
    snapshot: Name
    name: Name = Field(description="the new volume")
    size: Size | None = None


# --- history graphs --------------------------------------------------------------------------

MetricsRange = Literal["hour", "day", "week"]


class Series(Open):
    name: str = Field(description="cpu, memory, memory_total, net_in, net_out, disk_read, disk_write, "
                                  "disk_read_iops, disk_write_iops; instances also memory_host; pools: "
                                  "logical_bytes, stored_bytes, dedup_ratio, compression_ratio. An "
                                  "instance's memory is what it uses inside (a VM's guest reports it "
                                  "through its virtio balloon driver: no points without one), memory_host "
                                  "what it holds on the host (a VM's QEMU process, which includes QEMU's "
                                  "own memory), memory_total what it was given")
    unit: str = Field(description="percent (of the node's CPUs, or of the instance's vCPUs), bytes, "
                                  "bytes/s, ops/s or ratio")
    label: str = Field("", description="what the series is, for people, where its name is not enough")
    points: list[tuple[float, float]] = Field(description="[unix time, value], oldest first; gaps where "
                                                          "nothing was sampled")


class Metrics(Open):
    range: MetricsRange
    start: float
    end: float
    step: int = Field(description="seconds between points")
    series: list[Series]
