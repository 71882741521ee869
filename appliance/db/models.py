"""ORM models. Every managed object follows DESIGN.md's resource model:
id, name (unique per project), project, spec, status, generation,
observed_generation, conditions, created_at, updated_at."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ResourceMixin:
    """The columns every managed object has."""

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    observed_generation: Mapped[int] = mapped_column(Integer, default=0)
    conditions: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class ScopedMixin(ResourceMixin):
    """A resource that belongs to a project (name unique per project)."""

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)


class Project(ResourceMixin, Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("name", name="uq_projects_name"),)


class User(ResourceMixin, Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("name", name="uq_users_name"),)
    password_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Cluster-wide role (admin / operator / viewer) or None for project-only users.
    cluster_role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class RoleBinding(Base):
    """A user's role in one project."""

    __tablename__ = "role_bindings"
    __table_args__ = (UniqueConstraint("user_id", "project_id", name="uq_binding_user_project"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(ResourceMixin, Base):
    """An API token; the secret is shown once and stored as an argon2 hash."""

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_tokens_user_name"),)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LoginSession(Base):
    """A console session; the cookie holds a random id, the table only its SHA-256."""

    __tablename__ = "login_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Node(ResourceMixin, Base):
    """A cluster member. spec: schedulable, labels. status: phase, inventory, allocatable."""

    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("name", name="uq_nodes_name"),)
    phase: Mapped[str] = mapped_column(String(16), default="NotReady", index=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Sums of this node's claims, updated with conditional UPDATEs so that
    # concurrent placements can never overcommit it (see scheduler.claims).
    cpu_claimed: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    memory_claimed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cpu_capacity: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    memory_capacity: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # What this member runs (LXD-style): its release, and the newest schema revision its
    # code carries. Migrations wait until every member's code can run on their result.
    code_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    schema_version: Mapped[str | None] = mapped_column(String(32), nullable=True)


class SchemaState(Base):
    """One row: the schema revision the database is at and the oldest code schema that
    can run on it (members one release behind keep working on additive migrations)."""

    __tablename__ = "schema_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[str] = mapped_column(String(32))
    compatible_with: Mapped[str] = mapped_column(String(32))
    migrated_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    migrated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Claim(Base):
    """A workload's reservation on a node (Nova placement style)."""

    __tablename__ = "claims"
    __table_args__ = (UniqueConstraint("workload_id", name="uq_claims_workload"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    workload_kind: Mapped[str] = mapped_column(String(16))
    workload_id: Mapped[str] = mapped_column(String(36))
    cpu_units: Mapped[float] = mapped_column(Float)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    numa_cell: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cpus_pinned: Mapped[int] = mapped_column(Integer, default=0)
    group_name: Mapped[str | None] = mapped_column(String(63), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Task(Base):
    """A long operation. The row is the truth; Celery only carries the work."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_state_heartbeat", "state", "heartbeat_at"),
        Index("ix_tasks_created", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), index=True)
    project_id: Mapped[str | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True, index=True
    )
    queue: Mapped[str] = mapped_column(String(80), default="cluster")
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    resource_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resource_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    resource_name: Mapped[str | None] = mapped_column(String(63), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(63), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Event(Base):
    """An append-only change log; /api/v1/events streams it (resumable by seq)."""

    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    verb: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    object: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class PlacementGroup(ScopedMixin, Base):
    """Affinity / anti-affinity group for VMs and containers (Nova server groups)."""

    __tablename__ = "placement_groups"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_placement_groups_name"),)


class Network(ScopedMixin, Base):
    """A virtual L2 segment: one VXLAN VNI, a bridge on every node hosting a port."""

    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_networks_name"),
                      UniqueConstraint("vni", name="uq_networks_vni"))
    vni: Mapped[int] = mapped_column(Integer)


class Subnet(ScopedMixin, Base):
    __tablename__ = "subnets"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_subnets_name"),)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"), index=True)
    cidr: Mapped[str] = mapped_column(String(64))


class Port(ScopedMixin, Base):
    """A neutral attachment point: MAC + IPs + security groups; a VM tap or a container veth."""

    __tablename__ = "ports"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_ports_name"),
                      UniqueConstraint("mac", name="uq_ports_mac"))
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id", ondelete="RESTRICT"), index=True)
    mac: Mapped[str] = mapped_column(String(17))


class IpAllocation(Base):
    """One address in one subnet; the unique constraint is what makes concurrent
    allocations safe (a loser retries with the next free address)."""

    __tablename__ = "ip_allocations"
    __table_args__ = (UniqueConstraint("subnet_id", "address", name="uq_ip_allocations_address"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"), index=True)
    port_id: Mapped[str | None] = mapped_column(ForeignKey("ports.id", ondelete="CASCADE"), nullable=True,
                                                index=True)
    address: Mapped[str] = mapped_column(String(64))
    # "port" (allocated to a port), "reserved" (kept out of the pools), "gateway"
    purpose: Mapped[str] = mapped_column(String(16), default="port")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SecurityGroup(ScopedMixin, Base):
    """Per-port stateful firewall rules (spec.rules); default deny inbound."""

    __tablename__ = "security_groups"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_security_groups_name"),)


class Instance(ScopedMixin, Base):
    """A VM or a container: the same resource model, one scheduler, one agent.
    State follows Nova: ``vm_state`` (what it is), ``task_state`` (the operation
    claimed on it, compare-and-swap), ``power_state`` (observed on the node)."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("project_id", "kind", "name", name="uq_instances_name"),
                      Index("ix_instances_node", "node_id"))
    kind: Mapped[str] = mapped_column(String(16))  # vm | container
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True)
    vm_state: Mapped[str] = mapped_column(String(16), default="building")
    task_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    power_state: Mapped[str] = mapped_column(String(16), default="nostate")


class Image(ScopedMixin, Base):
    """A bootable image: a VM kernel + initramfs (direct boot), a VM disk (a volume),
    or an OCI image archive for containers. spec: kind, format, paths or volume."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_images_name"),)


class StoragePool(ResourceMixin, Base):
    """A dedup pool (DESIGN.md, Storage), written by one node's storage daemon.
    spec: backend (local | rados), url, chunk_size, replication, nbd_port.
    status: phase, stats (logical / stored bytes, dedup and compression ratios)."""

    __tablename__ = "storage_pools"
    __table_args__ = (UniqueConstraint("name", name="uq_storage_pools_name"),)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"), nullable=True)


class Volume(ScopedMixin, Base):
    """A block device in a pool: class ``dedup`` (our engine, served over NBD) or
    ``rbd`` (a native RBD image). ``task_state`` guards it like an instance's
    (compare-and-swap: one operation at a time). status: phase, export, snapshots."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_volumes_name"),)
    pool_id: Mapped[str] = mapped_column(ForeignKey("storage_pools.id", ondelete="RESTRICT"), index=True)
    storage_class: Mapped[str] = mapped_column(String(16), default="dedup")
    size: Mapped[int] = mapped_column(BigInteger)
    task_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The instance this volume is attached to: set with a compare-and-swap
    # (``instance_id IS NULL``) in the transaction that creates the instance, so two
    # VMs created at once can never both get it.
    instance_id: Mapped[str | None] = mapped_column(ForeignKey("instances.id", ondelete="SET NULL"),
                                                    nullable=True, index=True)


class VolumeSnapshot(Base):
    """A point-in-time copy of a volume (an O(1) root copy in the engine)."""

    __tablename__ = "volume_snapshots"
    __table_args__ = (UniqueConstraint("volume_id", "name", name="uq_volume_snapshots_name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    volume_id: Mapped[str] = mapped_column(ForeignKey("volumes.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Router(ScopedMixin, Base):
    """A project's router: the gateway of its subnets (on the networks' home node),
    egress NAT to its own ``external_address`` through the node's external interface,
    port forwards (spec.port_forwards) and the floating IPs associated through it."""

    __tablename__ = "routers"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_routers_name"),)
    external_address: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RouterInterface(Base):
    """A subnet attached to a router; a subnet has one router at most (its gateway lives there)."""

    __tablename__ = "router_interfaces"
    __table_args__ = (UniqueConstraint("subnet_id", name="uq_router_interfaces_subnet"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    router_id: Mapped[str] = mapped_column(ForeignKey("routers.id", ondelete="CASCADE"), index=True)
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FloatingIp(ScopedMixin, Base):
    """An address of the external range; associated, it reaches one port's
    ``fixed_address`` (DNAT) and that port's egress leaves as it (SNAT)."""

    __tablename__ = "floating_ips"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_floating_ips_name"),)
    address: Mapped[str] = mapped_column(String(64))
    port_id: Mapped[str | None] = mapped_column(ForeignKey("ports.id", ondelete="SET NULL"), nullable=True,
                                                index=True)
    router_id: Mapped[str | None] = mapped_column(ForeignKey("routers.id", ondelete="SET NULL"), nullable=True,
                                                  index=True)
    fixed_address: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ExternalAddress(Base):
    """One address of the external range (CAIRN_EXTERNAL_POOL) held by a router or a
    floating IP; the unique constraint keeps concurrent allocations apart."""

    __tablename__ = "external_addresses"
    __table_args__ = (UniqueConstraint("address", name="uq_external_addresses_address"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    address: Mapped[str] = mapped_column(String(64))
    router_id: Mapped[str | None] = mapped_column(ForeignKey("routers.id", ondelete="CASCADE"), nullable=True,
                                                  index=True)
    floating_ip_id: Mapped[str | None] = mapped_column(ForeignKey("floating_ips.id", ondelete="CASCADE"),
                                                       nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JoinToken(Base):
    """A short-lived, single-use secret that lets one new node join the cluster
    (only its SHA-256 is kept)."""

    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(63), nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(63), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LoginThrottle(Base):
    """Failed password logins per user name (``user:<name>``, known or not) and per
    source address (``addr:<ip>``) in the current window, and the lockout they earned.
    Kept in the database so every API process of a cluster sees the same counts."""

    __tablename__ = "login_throttles"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditRecord(Base):
    """One write to the API: who, from where, what, on which object, and the result.
    Append-only: rows are only inserted, and pruned by age (``audit_retention_days``);
    a trigger refuses UPDATE on both databases."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_time", "time", "seq"),)
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    user_name: Mapped[str | None] = mapped_column(String(63), nullable=True, index=True)
    via: Mapped[str | None] = mapped_column(String(16), nullable=True)  # token | session | password
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    action: Mapped[str] = mapped_column(String(128))
    object_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    object_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    project: Mapped[str | None] = mapped_column(String(63), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | denied | refused | failed
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
