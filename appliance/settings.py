"""Settings for every Cairn process, from the environment (``CAIRN_*``) via pydantic-settings.

The embedded single-node appliance keeps everything under ``data_dir``; a real
cluster points ``database_url`` at PostgreSQL and ``redis_url`` at Redis Sentinel.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import string
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from appliance.cluster import config as cluster_config

DEFAULT_DATA_DIR = Path("/var/lib/cairn")
# A node's own settings file (written by the installer; a lab node has its own): the
# environment still wins over it.
ENV_FILE = Path("/etc/cairn/cairn.env")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAIRN_", extra="ignore", env_file=ENV_FILE)

    data_dir: Path = DEFAULT_DATA_DIR
    # The tag in the names of everything this stack makes in namespaces it shares with
    # other stacks on the host (bridges, VXLAN devices, nftables tables, container
    # netns and cgroups): 0-4 lower-case letters. Empty = derived from data_dir: none for
    # the installed node's /var/lib/cairn, four letters from a hash of any other.
    stack_id: str = ""
    database_url: str = ""  # default: SQLite in data_dir
    redis_url: str = ""  # default: the embedded redis-server's unix socket in data_dir
    node_name: str = Field(default_factory=lambda: socket.gethostname().split(".")[0])
    api_host: str = "0.0.0.0"
    api_port: int = 8443
    api_url: str = ""  # how local clients reach the API; default https://127.0.0.1:<port>
    # Seconds without a heartbeat before a node turns NotReady.
    node_grace_seconds: float = 10.0
    heartbeat_interval: float = 2.0
    # How long a starting API / worker waits for the other members before it may migrate
    # the schema (a rolling upgrade); 0 waits as long as it takes, like LXD.
    schema_wait_seconds: float = 0.0
    # Seconds without a task heartbeat before a running task is declared lost.
    task_grace_seconds: float = 15.0
    task_heartbeat_interval: float = 2.0
    controller_interval: float = 1.0
    max_body_bytes: int = 1 << 20
    session_hours: float = 12.0
    worker_concurrency: int = 4
    webui_dir: Path = Path(__file__).resolve().parent.parent / "webui" / "dist"
    log_level: str = "INFO"
    # Compute drivers the agent uses: "libvirt" + "crun" on real nodes, "fake" in unit tests.
    vm_driver: str = "libvirt"
    container_driver: str = "crun"
    libvirt_uri: str = "qemu:///system"
    virt_type: str = "auto"  # auto | kvm | qemu
    # Embedded libvirt: put QEMU in cgroups (cpu, memory, blkio). Off where nodes nest
    # (test stacks, lab nodes that are cgroups themselves: libvirt would move QEMU out).
    libvirt_cgroups: bool = False
    # Address other nodes' hypervisors reach this node's for live migration.
    migration_host: str = "127.0.0.1"
    instance_start_timeout: float = 300.0
    # Routers: the NIC facing the external network on nodes that may host a router
    # (empty = routers there only route between their own networks), the external
    # segment's CIDR (its prefix length goes on the addresses put on that NIC) and the
    # addresses routers and floating IPs take from it, "first-last" (default: the
    # CIDR's hosts but the first, usually the upstream gateway). Nothing else may use them.
    external_interface: str = ""
    external_cidr: str = ""
    external_pool: str = ""
    # VXLAN VNIs handed to virtual networks, "first-last" inclusive.
    vni_range: str = "4096-16777215"
    underlay_mtu: int = 1500
    # The NIC VXLAN runs over; empty = the interface of the default route.
    underlay_interface: str = ""
    # Storage: this node's storage daemon (cairn-storaged) and its NBD exports.
    storage_host: str = "127.0.0.1"  # address of the TCP NBD exports (the storage network in a cluster)
    # First TCP port of pools' NBD exports (cluster nodes whose VMs use another node's pool
    # set it, with storage_host on the storage network); 0 = unix sockets only, the
    # embedded default: unauthenticated NBD is not opened on any network by default.
    storage_nbd_port: int = 0
    storage_default_pool: str = "default"  # made on the first node that reconciles; "" = none
    ceph: bool = False  # run the embedded Ceph cluster (also turned on for good by `cairn up --ceph`)
    max_upload_bytes: int = 1 << 40  # image uploads stream to disk; everything else is small JSON
    # The most of the external pool one project may hold (routers + floating IPs), as a
    # fraction of the pool (at least one address): no project can drain it for the others.
    external_project_share: float = 0.5
    # Password logins: after this many failures within the window a user name is locked
    # for lockout_seconds; a source address gets as many times more before it is too.
    login_max_failures: int = 5
    login_max_failures_per_address: int = 20
    login_window_seconds: float = 900.0
    login_lockout_seconds: float = 300.0
    # Long-lived streams (events, consoles): how often their caller is checked again
    # (revoked token, disabled or deleted user, lost role), and how many one user may hold.
    stream_recheck_seconds: float = 2.0
    max_streams_per_user: int = 8
    audit_retention_days: float = 90.0
    # History graphs: the agent samples its node and instances every metrics_interval
    # seconds; every member's Prometheus (Debian's) scrapes every member's /metrics and
    # keeps metrics_retention of it. "none" runs no Prometheus (the graphs answer 503).
    metrics_store: Literal["prometheus", "none"] = "prometheus"
    metrics_interval: float = 10.0
    metrics_retention: str = "8d"
    prometheus_binary: str = "/usr/bin/prometheus"
    prometheus_port: int = 0  # on 127.0.0.1; 0 = a free port picked at start
    # HA: the node's etcd lease (its liveness as the cluster sees it) and the watchdog that
    # resets the node before that lease can expire elsewhere (armed only while it runs HA
    # workloads). watchdog_timeout must stay well under ha_lease_ttl.
    # An etcd leader election (2 s election timeout, longer on loaded shared cores) stalls
    # renewals for a few seconds: the watchdog must outlast that, and still reset the node
    # well before its lease (counted from the same renewal) can expire elsewhere.
    # 10 s: the watchdog (8 s after the last feed, which follows the last renewal) has
    # reset the node well before; the lease is the failover's largest share (HA bench).
    ha_lease_ttl: int = 10
    watchdog_device: Path = Path("/dev/watchdog")
    watchdog_timeout: int = 8
    # Changes when the node (re)boots; a lab node gets a new one from the lab at each start.
    boot_id: str = Field(default_factory=_boot_id)

    @property
    def cluster_file(self) -> Path:
        return self.data_dir / "cluster" / "cluster.json"

    @property
    def cluster(self) -> cluster_config.ClusterConfig | None:
        """This node's cluster configuration; None in the embedded single-node mode."""
        return cluster_config.load(self.cluster_file)

    @model_validator(mode="after")
    def _cluster_timing_floors(self) -> Settings:
        """A cluster's timing profile (``cairn cluster init --timing``) puts floors under the
        node's HA lease, watchdog and node grace: every member then waits as long as the
        profile says before it calls another dead."""
        cfg = cluster_config.load(self.cluster_file)
        if cfg is not None and cfg.timing != "fast":  # fast: the settings as they are
            self.ha_lease_ttl = max(self.ha_lease_ttl, cfg.ha_lease_ttl)
            self.watchdog_timeout = max(self.watchdog_timeout, cfg.watchdog_timeout)
            self.node_grace_seconds = max(self.node_grace_seconds, float(cfg.node_grace_seconds))
        return self

    @field_validator("stack_id")
    @classmethod
    def _check_stack_id(cls, value: str) -> str:
        if len(value) > 4 or not set(value) <= set(string.ascii_lowercase):
            raise ValueError("CAIRN_STACK_ID is 1-4 lower-case letters")
        return value

    @property
    def stack_tag(self) -> str:
        """This stack's tag (see ``stack_id``): two stacks on one host never share one
        unless told to (``cairn up`` refuses to start a second stack with a live tag)."""
        if self.stack_id:
            return self.stack_id
        data_dir = self.data_dir.resolve()
        if data_dir == DEFAULT_DATA_DIR:
            return ""
        n = int.from_bytes(hashlib.sha256(str(data_dir).encode()).digest()[:8], "big")
        letters = ""
        for _ in range(4):
            n, i = divmod(n, 26)
            letters += string.ascii_lowercase[i]
        return letters

    @property
    def host_prefix(self) -> str:
        """Prefix of this stack's container netns and cgroup names ("cairn" + tag)."""
        return f"cairn{self.stack_tag}"

    @property
    def vni_bounds(self) -> tuple[int, int]:
        first, _, last = self.vni_range.partition("-")
        return int(first), int(last or first)

    @property
    def external_pool_bounds(self) -> tuple[str, str] | None:
        """First and last address of the external pool, or None when no external network is set."""
        if not self.external_cidr:
            return None
        net = ipaddress.IPv4Network(self.external_cidr, strict=False)
        if self.external_pool:
            first, _, last = self.external_pool.partition("-")
            return str(ipaddress.IPv4Address(first.strip())), str(ipaddress.IPv4Address((last or first).strip()))
        if net.prefixlen > 29:
            raise ValueError(f"CAIRN_EXTERNAL_CIDR {net} is too small for a pool: set CAIRN_EXTERNAL_POOL")
        return str(net[2]), str(net[-2])

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        cluster = self.cluster
        if cluster is not None:
            return cluster_config.database_url(cluster)
        return f"sqlite:///{self.data_dir / 'cairn.db'}"

    @property
    def redis_socket(self) -> Path:
        return self.data_dir / "run" / "redis.sock"

    @property
    def resolved_redis_url(self) -> str:
        return self.redis_url or f"unix://{self.redis_socket}"

    @property
    def broker_url(self) -> str:
        cluster = self.cluster
        if cluster is not None and not self.redis_url:
            return cluster_config.broker_url(cluster)
        url = self.resolved_redis_url
        if url.startswith("unix://"):
            return "redis+socket://" + url[len("unix://"):]
        return url

    @property
    def broker_transport_options(self) -> dict[str, object]:
        cluster = self.cluster
        if cluster is not None and not self.redis_url:
            return cluster_config.broker_options(cluster)
        return {}

    @property
    def resolved_api_url(self) -> str:
        return self.api_url or f"https://127.0.0.1:{self.api_port}"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def nbd_client_dir(self) -> Path:
        """QEMU's certificate for ``nbds://`` disks (NBD over TCP with TLS): appliance/pki.py."""
        return self.data_dir / "nbd-client"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def storage_run_dir(self) -> Path:
        return self.run_dir / "storage"

    @property
    def storage_socket(self) -> Path:
        return self.storage_run_dir / "storage.sock"

    @property
    def ceph_dir(self) -> Path:
        return self.data_dir / "ceph"

    @property
    def ceph_enabled(self) -> bool:
        return self.ceph or (self.data_dir / "ceph.enabled").exists()

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def desired_state_file(self) -> Path:
        """The agent's copy of its node's last desired-state document."""
        return self.data_dir / "agent" / "desired-state.json"

    @property
    def metrics_file(self) -> Path:
        """The agent's latest samples (Prometheus text), which this node's /metrics serves."""
        return self.data_dir / "metrics" / "node.prom"

    @property
    def prometheus_dir(self) -> Path:
        return self.data_dir / "prometheus"

    @property
    def admin_password_file(self) -> Path:
        return self.secrets_dir / "admin-password"


@lru_cache
def get_settings() -> Settings:
    return Settings()
