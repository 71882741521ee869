"""The cluster engines as supervised programs of a node (``python -m appliance.processes
etcd|patroni|redis|sentinel|ceph``). Each one prepares its files from the node's
ClusterConfig, then replaces itself with the engine (``exec``), so the supervisor
watches the real daemon; Ceph's daemons stay children of one small runner."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import signal
import sys
import time
from pathlib import Path

import redis

from appliance.cluster import engines
from appliance.cluster.config import (
    CEPH_POOL,
    REDIS_MASTER_NAME,
    SENTINEL_PORT,
    ClusterConfig,
)
from appliance.cluster.etcd import Etcd
from appliance.settings import Settings

log = logging.getLogger("cairn.cluster")


def node_paths(settings: Settings) -> engines.NodePaths:
    return engines.NodePaths(settings.data_dir / "cluster", settings.pki_dir)


def require_cluster(settings: Settings) -> ClusterConfig:
    cfg = settings.cluster
    if cfg is None:
        sys.exit(f"this node is not part of a cluster (no {settings.cluster_file})")
    return cfg


def _exec(argv: list[str], user: str | None = None, env: dict[str, str] | None = None) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if user is not None:
        pw = pwd.getpwnam(user)
        os.initgroups(user, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    exe = shutil.which(argv[0]) or argv[0]
    os.execve(exe, argv, env if env is not None else dict(os.environ))


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(user).gr_gid
    for p in [path, *path.rglob("*")]:
        os.lchown(p, pw.pw_uid, gid)


# ------------------------------------------------------------------ etcd
def run_etcd(settings: Settings) -> None:
    cfg = require_cluster(settings)
    paths = node_paths(settings)
    paths.etcd_data.mkdir(parents=True, exist_ok=True, mode=0o700)
    _exec(engines.etcd_argv(cfg, paths))


def wait_etcd(settings: Settings, timeout: float = 120) -> Etcd:
    """Block until this node's etcd member answers with a quorum behind it."""
    cfg = require_cluster(settings)
    client = Etcd([cfg.address], settings.pki_dir, timeout=2)
    deadline = time.monotonic() + timeout
    while not client.healthy():
        if time.monotonic() > deadline:
            sys.exit(f"etcd on {cfg.address} has no quorum after {timeout:g} s")
        time.sleep(0.5)
    return Etcd.for_node(cfg, settings.pki_dir)


# ------------------------------------------------------------------ Patroni / PostgreSQL
def run_patroni(settings: Settings) -> None:
    """Patroni as the postgres user, once etcd answers (Patroni itself retries an
    unreachable etcd only every 5 s at start)."""
    cfg = require_cluster(settings)
    paths = node_paths(settings)
    wait_etcd(settings)
    for d in (paths.pg_root, paths.pg_run, paths.pg_tls):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for src, dst in (("ca.crt", "ca.crt"), ("server.crt", "node.crt"), ("server.key", "node.key")):
        shutil.copyfile(settings.pki_dir / src, paths.pg_tls / dst)
        os.chmod(paths.pg_tls / dst, 0o600)
    fd = os.open(paths.patroni_yml, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(engines.patroni_config(cfg, paths))
    _chown_tree(paths.pg_root, "postgres")
    os.chmod(paths.pg_root, 0o700)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(paths.pg_root), "LANG": "C.UTF-8"}
    _exec(["patroni", str(paths.patroni_yml)], user="postgres", env=env)


# ------------------------------------------------------------------ Redis + Sentinel
def sentinel_says(cfg: ClusterConfig, address: str, *args: str) -> object:
    """One Sentinel command to the sentinel at ``address`` (None if it does not answer)."""
    try:
        s = redis.Redis(host=address, port=SENTINEL_PORT, password=cfg.secrets.redis, socket_timeout=2,
                        socket_connect_timeout=1, decode_responses=True)
        return s.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return None


def sentinel_master(cfg: ClusterConfig, address: str) -> str | None:
    """The Redis master the sentinel at ``address`` names."""
    found = sentinel_says(cfg, address, "get-master-addr-by-name", REDIS_MASTER_NAME)
    return str(found[0]) if isinstance(found, list | tuple) and found else None


def current_redis_master(cfg: ClusterConfig) -> str | None:
    """The master the other members' sentinels name (None if none answers: this node's own
    sentinel may remember a master that died with it)."""
    for address in cfg.member_addresses()[1:]:
        master = sentinel_master(cfg, address)
        if master:
            return master
    return None


def run_redis(settings: Settings) -> None:
    """redis-server; a node that comes back starts as a replica of the master the
    sentinels name (else it would serve empty as a second master for ~10 s: probes/cluster)."""
    cfg = require_cluster(settings)
    paths = node_paths(settings)
    paths.redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    last = paths.redis_dir / "master"
    master = current_redis_master(cfg)
    if master is None:
        master = last.read_text().strip() if last.exists() else cfg.redis_master
    last.write_text(master)
    conf = paths.redis_dir / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(engines.redis_config(cfg, paths, master))
    _exec(["redis-server", str(conf)])


def run_sentinel(settings: Settings) -> None:
    cfg = require_cluster(settings)
    paths = node_paths(settings)
    paths.sentinel_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = paths.sentinel_dir / "sentinel.conf"
    if not conf.exists():  # Sentinel rewrites its own file afterwards (current master, peers)
        master = current_redis_master(cfg) or cfg.redis_master
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(engines.sentinel_config(cfg, paths, master))
    _exec(["redis-sentinel", str(conf)])


# ------------------------------------------------------------------ Ceph
def ceph_node(settings: Settings, cfg: ClusterConfig) -> object:
    from storage.backends.rados_deploy import CephNode

    osd_size = next((int(o.split(":", 1)[1]) for o in cfg.ceph_osds if o.startswith("file:")), 8 << 30)
    return CephNode(fsid=cfg.ceph_fsid, name=cfg.node, address=cfg.address,
                    mons=tuple((m.name, m.address) for m in cfg.ceph_mons), conf=ceph_conf_path(),
                    data=settings.data_dir / "ceph", osd_size=osd_size)


def ceph_conf_path() -> Path:
    return Path(os.environ.get("CAIRN_CEPH_CONF", "/etc/ceph/ceph.conf"))


def run_ceph(settings: Settings) -> None:
    """This node's monitor (if it is one), manager and OSDs; exits when one of them does
    (the supervisor restarts the set). Writes ``ceph/ready`` once its OSDs run."""
    from storage.backends import rados_deploy as deploy

    cfg = require_cluster(settings)
    node = ceph_node(settings, cfg)
    assert isinstance(node, deploy.CephNode)
    ready = node.data / "ready"
    ready.unlink(missing_ok=True)
    deploy.write_conf(node)
    daemons = deploy.NodeDaemons(node)
    stop = {"now": False}

    def _term(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    try:
        if cfg.ceph_mon:
            if cfg.bootstrap == "init":
                deploy.bootstrap_first_mon(node)  # a joining monitor was made by `cluster join`
            daemons.start_mon()
        admin = deploy.wait_quorum(node.conf, timeout=120)
        try:
            daemons.start_mgr(admin)
            if cfg.bootstrap == "init":
                admin.ensure_pool(CEPH_POOL)
            daemons.ensure_osds(admin, cfg.ceph_osds)
            admin.replicate_by_hosts(CEPH_POOL)
        finally:
            admin.close()
        ready.write_text(str(node.conf))
        log.info("ceph daemons up", extra={"daemons": sorted(daemons.procs)})
        while not stop["now"] and not daemons.exited():
            time.sleep(0.5)
    finally:
        ready.unlink(missing_ok=True)
        gone = daemons.exited()
        daemons.stop()
    if not stop["now"]:
        sys.exit(f"ceph daemons exited: {', '.join(gone)}; the supervisor restarts them")
