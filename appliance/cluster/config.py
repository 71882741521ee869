"""A cluster node's own configuration: ``<data_dir>/cluster/cluster.json`` (0600).

Written by ``cairn cluster init`` / ``cairn cluster join``; the member list is kept
current by the agent (from etcd's membership), so every process of the node finds
the database, the broker and the monitors even after the node that bootstrapped the
cluster is gone. Its presence is what puts a node in cluster mode."""

from __future__ import annotations

import json
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

# Well-known ports on a node's cluster address (each lab node has its own network namespace).
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
PG_PORT = 5432
PATRONI_PORT = 8008
REDIS_PORT = 6379
SENTINEL_PORT = 26379
REDIS_MASTER_NAME = "cairn"
CEPH_POOL = "cairn"


def _secret() -> str:
    return secrets.token_urlsafe(24)


class Member(BaseModel):
    name: str
    address: str


class ClusterSecrets(BaseModel):
    """Passwords of the cluster's engines, shared by every member (handed over at join
    time over mutual TLS, kept 0600 on each node)."""

    pg_superuser: str = Field(default_factory=_secret)
    pg_replication: str = Field(default_factory=_secret)
    pg_rewind: str = Field(default_factory=_secret)
    pg_cairn: str = Field(default_factory=_secret)
    patroni_rest: str = Field(default_factory=_secret)
    redis: str = Field(default_factory=_secret)


Timing = Literal["fast", "relaxed"]
# The cluster's timing profile, chosen at `cairn cluster init --timing` and inherited by every
# joiner. "fast" is for dedicated hardware: a node loss fails over in about 20 s (HA bench).
# "relaxed" is for slow or oversubscribed machines (emulated nodes, a lab on a laptop): etcd's
# recommended 10x heartbeat/election ratio at 1 s, Patroni's own defaults scaled so that
# loop_wait + 2 x retry_timeout < ttl, and an HA lease of a minute. A node whose disk or CPU
# stalls for seconds then keeps its database role and its lease; failover takes about 1 min.
TIMING_PROFILES: dict[str, dict[str, int]] = {
    "fast": {"etcd_heartbeat_ms": 200, "etcd_election_ms": 2000, "patroni_ttl": 8, "patroni_loop_wait": 1,
             "patroni_retry_timeout": 3, "ha_lease_ttl": 10, "watchdog_timeout": 8, "node_grace_seconds": 10,
             "db_connect_timeout": 3},
    "relaxed": {"etcd_heartbeat_ms": 1000, "etcd_election_ms": 10000, "patroni_ttl": 60, "patroni_loop_wait": 10,
                "patroni_retry_timeout": 20, "ha_lease_ttl": 60, "watchdog_timeout": 45,
                "node_grace_seconds": 60, "db_connect_timeout": 20},
}


class ClusterConfig(BaseModel):
    version: int = 1
    name: str = "cairn"
    cluster_id: str = Field(default_factory=lambda: secrets.token_hex(8))
    node: str
    address: str
    network: str  # the cluster network's CIDR (peers' addresses are in it)
    bootstrap: Literal["init", "join"]
    members: list[Member]
    etcd_initial_cluster: str
    etcd_state: Literal["new", "existing"]
    secrets: ClusterSecrets = Field(default_factory=ClusterSecrets)
    redis_master: str  # the master when this node first started (later: whatever the sentinels say)
    ceph_fsid: str = ""
    ceph_mon: bool = False  # this node runs a Ceph monitor (the first three members do)
    ceph_mons: list[Member] = Field(default_factory=list)
    # OSD backing stores: block devices, or "file:<bytes>" for a sparse file (lab nodes).
    ceph_osds: list[str] = Field(default_factory=list)
    # Patroni's DCS timing: a dead primary's leader key expires after at most ttl, then a
    # replica promotes (loop_wait + 2 × retry_timeout must stay under ttl). etcd's leader is
    # kept off the primary's node, so a node loss costs about ttl (probes/cluster).
    patroni_ttl: int = TIMING_PROFILES["fast"]["patroni_ttl"]
    patroni_loop_wait: int = TIMING_PROFILES["fast"]["patroni_loop_wait"]
    patroni_retry_timeout: int = TIMING_PROFILES["fast"]["patroni_retry_timeout"]
    pg_shared_buffers: str = "32MB"
    # The rest of the timing profile (TIMING_PROFILES; the defaults are "fast"). The HA
    # lease, watchdog and node grace are floors under the node's own settings.
    timing: Timing = "fast"
    etcd_heartbeat_ms: int = TIMING_PROFILES["fast"]["etcd_heartbeat_ms"]
    etcd_election_ms: int = TIMING_PROFILES["fast"]["etcd_election_ms"]
    ha_lease_ttl: int = TIMING_PROFILES["fast"]["ha_lease_ttl"]
    watchdog_timeout: int = TIMING_PROFILES["fast"]["watchdog_timeout"]
    node_grace_seconds: int = TIMING_PROFILES["fast"]["node_grace_seconds"]
    # libpq's connect_timeout per member (TLS + SCRAM): an emulated node under load took
    # longer than 3 s to answer, so the API's start failed and systemd restarted it for ever
    db_connect_timeout: int = TIMING_PROFILES["fast"]["db_connect_timeout"]

    def timing_fields(self) -> dict[str, object]:
        """The profile's values as this cluster runs them (what a joiner inherits)."""
        return self.model_dump(include={"timing", *TIMING_PROFILES["fast"]})

    def member_addresses(self) -> list[str]:
        """Every member's address, this node's first (local first: it answers when we do)."""
        others = [m.address for m in self.members if m.address != self.address]
        return [self.address, *others]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=1))
        tmp.replace(path)
        _cached.cache_clear()


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int) -> ClusterConfig:
    return ClusterConfig.model_validate(json.loads(Path(path).read_text()))


def load(path: Path) -> ClusterConfig | None:
    """The node's cluster configuration, or None in single-node (embedded) mode. Cheap to
    call often: re-read only when the file changed."""
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return _cached(str(path), mtime)


def database_url(cfg: ClusterConfig) -> str:
    """A multi-host libpq URL that always lands on the read-write primary (Patroni)."""
    hosts = "&".join(f"host={a}:{PG_PORT}" for a in cfg.member_addresses())
    return (f"postgresql+psycopg://cairn:{cfg.secrets.pg_cairn}@/cairn?{hosts}"
            f"&target_session_attrs=read-write&connect_timeout={cfg.db_connect_timeout}")


def superuser_dsn(cfg: ClusterConfig, dbname: str = "postgres") -> str:
    hosts = ",".join(cfg.member_addresses())
    ports = ",".join(str(PG_PORT) for _ in cfg.member_addresses())
    return (f"host={hosts} port={ports} dbname={dbname} user=postgres password={cfg.secrets.pg_superuser} "
            f"target_session_attrs=read-write connect_timeout={cfg.db_connect_timeout}")


def broker_url(cfg: ClusterConfig) -> str:
    """Celery's broker through Redis Sentinel; the node's own sentinel first."""
    return ";".join(f"sentinel://:{cfg.secrets.redis}@{a}:{SENTINEL_PORT}" for a in cfg.member_addresses())


def broker_options(cfg: ClusterConfig) -> dict[str, object]:
    return {"master_name": REDIS_MASTER_NAME, "sentinel_kwargs": {"password": cfg.secrets.redis},
            "socket_timeout": 5, "socket_connect_timeout": 2}
