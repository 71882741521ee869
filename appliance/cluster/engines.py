"""The cluster engines of one node, as pure builders from the node's ClusterConfig to the
command lines and configuration files of etcd, Patroni (PostgreSQL) and Redis +
Sentinel (Debian 12's packages). Timing is tuned for three nodes sharing two cores
(``../shared/probes/cluster``: election timeout 2 s, Patroni ttl 10 / loop_wait 2 /
retry_timeout 4, ``wal_retrieve_retry_interval`` 1 s)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.cluster.config import (
    ETCD_CLIENT_PORT,
    PATRONI_PORT,
    PG_PORT,
    REDIS_MASTER_NAME,
    REDIS_PORT,
    SENTINEL_PORT,
    ClusterConfig,
)
from appliance.cluster.etcd import client_url, peer_url

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_ROOT = Path("/var/lib/postgresql/cairn")  # owned by postgres; a lab node bind-mounts its own here


@dataclass(frozen=True)
class NodePaths:
    """Where a node keeps each engine's state (``data_dir/cluster`` and PG_ROOT)."""

    cluster_dir: Path
    pki_dir: Path
    pg_root: Path = PG_ROOT

    @property
    def etcd_data(self) -> Path:
        return self.cluster_dir / "etcd"

    @property
    def redis_dir(self) -> Path:
        return self.cluster_dir / "redis"

    @property
    def sentinel_dir(self) -> Path:
        return self.cluster_dir / "sentinel"

    @property
    def patroni_yml(self) -> Path:
        return self.pg_root / "patroni.yml"

    @property
    def pg_data(self) -> Path:
        return self.pg_root / "data"

    @property
    def pg_run(self) -> Path:
        return self.pg_root / "run"

    @property
    def pg_tls(self) -> Path:
        """Copies of the node's certificate and key the postgres user can read (Patroni → etcd)."""
        return self.pg_root / "tls"


def etcd_argv(cfg: ClusterConfig, paths: NodePaths) -> list[str]:
    pki = paths.pki_dir
    tls = [f"--cert-file={pki / 'server.crt'}", f"--key-file={pki / 'server.key'}",
           f"--trusted-ca-file={pki / 'ca.crt'}", "--client-cert-auth",
           f"--peer-cert-file={pki / 'server.crt'}", f"--peer-key-file={pki / 'server.key'}",
           f"--peer-trusted-ca-file={pki / 'ca.crt'}", "--peer-client-cert-auth"]
    return [
        "etcd", f"--name={cfg.node}", f"--data-dir={paths.etcd_data}",
        f"--listen-peer-urls={peer_url(cfg.address)}",
        f"--initial-advertise-peer-urls={peer_url(cfg.address)}",
        f"--listen-client-urls={client_url(cfg.address)},https://127.0.0.1:{ETCD_CLIENT_PORT}",
        f"--advertise-client-urls={client_url(cfg.address)}",
        f"--initial-cluster={cfg.etcd_initial_cluster}",
        f"--initial-cluster-state={cfg.etcd_state}",
        f"--initial-cluster-token=cairn-{cfg.cluster_id}",
        # the timing profile's (fast: 200 / 2000 ms; two shared cores: a 100 ms heartbeat
        # misses under load and flaps leadership)
        f"--heartbeat-interval={cfg.etcd_heartbeat_ms}", f"--election-timeout={cfg.etcd_election_ms}",
        # a member back from a partition asks before it calls an election (etcd 3.4's default
        # is off): its term, raised alone, would otherwise depose the leader, and the few
        # seconds without one cost the database primary its lock (a failover at every heal)
        "--pre-vote=true",
        "--snapshot-count=10000", "--auto-compaction-mode=revision", "--auto-compaction-retention=1000",
        "--quota-backend-bytes=1073741824", "--logger=zap", "--log-level=warn",
        *tls,
    ]


def patroni_config(cfg: ClusterConfig, paths: NodePaths) -> str:
    s = cfg.secrets
    hba = ["local all all trust", "local replication all trust", "host all all 127.0.0.1/32 trust",
           "host replication replicator 127.0.0.1/32 trust",
           f"host replication replicator {cfg.network} scram-sha-256", f"host all all {cfg.network} scram-sha-256"]
    doc = {
        "scope": f"cairn-{cfg.cluster_id}",
        "namespace": "/cairn/patroni/",
        "name": cfg.node,
        # INFO: promotions, rewinds and reinitialisations are in the log (an installed node's
        # journal rotates it; about one line per loop_wait otherwise)
        "log": {"level": "INFO"},
        "restapi": {"listen": f"{cfg.address}:{PATRONI_PORT}", "connect_address": f"{cfg.address}:{PATRONI_PORT}",
                    "certfile": str(paths.pg_tls / "node.crt"), "keyfile": str(paths.pg_tls / "node.key"),
                    "authentication": {"username": "patroni", "password": s.patroni_rest}},
        "etcd3": {"hosts": [f"{a}:{ETCD_CLIENT_PORT}" for a in cfg.member_addresses()], "protocol": "https",
                  "cacert": str(paths.pg_tls / "ca.crt"), "cert": str(paths.pg_tls / "node.crt"),
                  "key": str(paths.pg_tls / "node.key")},
        "watchdog": {"mode": "off"},  # Cairn's own fencing watchdog covers the node (issue HA)
        "bootstrap": {
            "dcs": {
                "ttl": cfg.patroni_ttl, "loop_wait": cfg.patroni_loop_wait,
                "retry_timeout": cfg.patroni_retry_timeout, "maximum_lag_on_failover": 1048576,
                # Strict mode is turned on once three members exist (a lone primary would block).
                "synchronous_mode": True, "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True, "use_slots": True,
                    "parameters": {"wal_log_hints": "on", "max_wal_senders": 10, "max_replication_slots": 10,
                                   "wal_retrieve_retry_interval": "1s", "max_connections": 200,
                                   "shared_buffers": cfg.pg_shared_buffers, "wal_keep_size": "128MB"},
                },
            },
            "initdb": [{"encoding": "UTF8"}, "data-checksums"],
        },
        "postgresql": {
            "listen": f"127.0.0.1,{cfg.address}:{PG_PORT}",
            "connect_address": f"{cfg.address}:{PG_PORT}",
            "data_dir": str(paths.pg_data),
            "bin_dir": str(PG_BIN),
            "pgpass": str(paths.pg_root / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": s.pg_superuser},
                "replication": {"username": "replicator", "password": s.pg_replication},
                "rewind": {"username": "rewinder", "password": s.pg_rewind},
            },
            "parameters": {"unix_socket_directories": str(paths.pg_run)},
            "pg_hba": hba,
            # A replica whose pg_rewind failed (e.g. a second failover cut it off mid-copy,
            # which leaves the data directory unusable) or that cannot be rewound is rebuilt
            # from the primary instead of left "starting" for ever: a replica's data is a
            # copy, and under strict synchronous replication an acknowledged commit is on
            # the primary and its sync standby.
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def redis_config(cfg: ClusterConfig, paths: NodePaths, replica_of: str | None) -> str:
    """redis.conf: AOF on (a restart keeps acknowledged messages), password on both ends
    of replication; ``replica_of`` the current master unless this node is it."""
    lines = [
        f"bind {cfg.address} 127.0.0.1", f"port {REDIS_PORT}", "protected-mode no", f"dir {paths.redis_dir}",
        "appendonly yes", "appendfsync everysec", 'save ""', "daemonize no", "loglevel warning",
        f"requirepass {cfg.secrets.redis}", f"masterauth {cfg.secrets.redis}",
        "replica-serve-stale-data yes", "min-replicas-to-write 0",
    ]
    if replica_of and replica_of != cfg.address:
        lines.append(f"replicaof {replica_of} {REDIS_PORT}")
    return "\n".join(lines) + "\n"


def sentinel_config(cfg: ClusterConfig, paths: NodePaths, master: str) -> str:
    """sentinel.conf for a first start (Sentinel rewrites the file afterwards)."""
    pw = cfg.secrets.redis
    return "\n".join([
        f"bind {cfg.address} 127.0.0.1", f"port {SENTINEL_PORT}", "protected-mode no", f"dir {paths.sentinel_dir}",
        "daemonize no", "loglevel warning", f"requirepass {pw}", f"sentinel sentinel-pass {pw}",
        f"sentinel announce-ip {cfg.address}",
        f"sentinel monitor {REDIS_MASTER_NAME} {master} {REDIS_PORT} 2",
        f"sentinel auth-pass {REDIS_MASTER_NAME} {pw}",
        f"sentinel down-after-milliseconds {REDIS_MASTER_NAME} 3000",
        f"sentinel failover-timeout {REDIS_MASTER_NAME} 10000",
        f"sentinel parallel-syncs {REDIS_MASTER_NAME} 1",
    ]) + "\n"
