"""Entry points of the per-node processes: cairn-api, cairn-worker, cairn-agent.
``python -m appliance.processes api|worker|agent`` does the same."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import logs
from appliance.settings import Settings, get_settings
from appliance.supervisor import PR_SET_PDEATHSIG, redis_config

if TYPE_CHECKING:
    from compute.libvirt_node import LibvirtNode

log = logging.getLogger("cairn")
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


PRIVATE_UMASK = 0o077  # what Cairn writes is root's alone: the database, keys, uploads, logs


def private_files() -> None:
    """Every Cairn process writes files 0600 and directories 0700 (also what SQLite,
    uploads and the key generator create later)."""
    os.umask(PRIVATE_UMASK)


def lock_down(settings: Settings) -> None:
    """The data directory and what holds secrets in it are the owner's only, also on a
    machine set up by an older version (0700 directories, 0600 database files)."""
    for d in (settings.data_dir, settings.log_dir, settings.run_dir, settings.secrets_dir, settings.uploads_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in (settings.data_dir, settings.secrets_dir, settings.uploads_dir, settings.pki_dir):
        if d.is_dir():
            # group x on the data directory is the mask of the ACL that lets the VM group
            # (unprivileged QEMU) search it for its own files: agent/vm_access.py
            d.chmod(0o700 | (d.stat().st_mode & 0o010 if d == settings.data_dir else 0))
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                path.chmod(0o600)
    for path in [*settings.secrets_dir.glob("*"), *settings.pki_dir.glob("*.key")]:
        path.chmod(0o600)


def prepare(settings: Settings) -> str | None:
    """Directories, database schema, the default project and first admin (idempotent).
    Returns the admin password when it was just created."""
    from appliance.db.engine import session_scope
    from appliance.db.migrate import ensure_schema
    from appliance.services import auth

    lock_down(settings)
    if settings.cluster is not None:
        from appliance.cluster.database import ensure_database

        ensure_database(settings)  # waits for the Patroni primary, makes the role and database once
    ensure_schema(settings.resolved_database_url, settings.node_name, wait_seconds=settings.schema_wait_seconds)
    lock_down(settings)  # the database file may be new
    with session_scope(settings.resolved_database_url) as session:
        password = auth.bootstrap(session)
    if password:
        write_secret(settings.admin_password_file, password)
    return password


def _install_dispatcher() -> None:
    from appliance.services import tasks
    from appliance.tasks.celery_app import enqueue

    tasks.set_dispatcher(enqueue)


def run_api(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cairn-api")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--insecure-http", action="store_true", help="serve plain HTTP (tests, behind a proxy)")
    args = parser.parse_args(argv)
    private_files()
    settings = get_settings()
    if args.host:
        settings.api_host = args.host
    if args.port:
        settings.api_port = args.port
    logs.setup("cairn-api", settings.log_level)
    prepare(settings)
    _install_dispatcher()
    import uvicorn

    from appliance import pki
    from appliance.api.app import create_app

    tls = {}
    if not args.insecure_http:
        _, crt, key = pki.ensure(settings.pki_dir)
        tls = {"ssl_certfile": str(crt), "ssl_keyfile": str(key)}
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None,
                access_log=False, timeout_graceful_shutdown=3, **tls)  # type: ignore[arg-type]


def run_worker(argv: list[str] | None = None) -> None:
    """The node's task worker: two Celery pools.

    Orchestration tasks (queue ``cluster``: create, snapshot, clone) wait for node tasks
    (queue ``node.<name>``: volume operations, exec, migrate, inventory), and node tasks
    never wait for others. Sharing one pool, a burst of orchestration tasks could take
    every thread and wait forever for node tasks queued behind them, so the node queue
    gets a pool of its own in a child process that this one restarts and takes down
    with it. ``--queues cluster|node`` runs one pool only."""
    parser = argparse.ArgumentParser(prog="cairn-worker")
    parser.add_argument("--queues", choices=("all", "cluster", "node"), default="all")
    args, rest = parser.parse_known_args(argv or [])
    private_files()
    settings = get_settings()
    logs.setup("cairn-worker", settings.log_level)
    from appliance.db.migrate import ensure_schema

    # Tasks use this release's schema: wait (or migrate) until the database has it.
    ensure_schema(settings.resolved_database_url, settings.node_name, wait_seconds=settings.schema_wait_seconds)
    _install_dispatcher()
    from appliance.tasks.celery_app import celery

    role = args.queues
    if role == "all":
        _NodePool(rest).start()
        role = "cluster"
    queue = "cluster" if role == "cluster" else f"node.{settings.node_name}"
    celery.worker_main([
        "worker", "-Q", queue, "-n", f"{role}@{settings.node_name}",
        "--pool", "threads", "-c", str(settings.worker_concurrency),
        "--without-gossip", "--without-mingle", "-l", settings.log_level, *rest,
    ])


def _killed_with_parent() -> None:
    """A worker killed with -9 loses its running tasks (the reaper fails or retries
    them): its node pool must not live on as an orphan finishing its own."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # between fork and exec: nothing to import here


class _NodePool:
    """The node-queue pool as a child process: restarted when it dies, stopped (SIGTERM:
    Celery's warm shutdown, then waited for) when this process exits normally, and
    killed by the kernel with this one otherwise."""

    def __init__(self, rest: list[str]) -> None:
        self.argv = [sys.executable, "-m", "appliance.processes", "worker", "--queues", "node", *rest]
        self.stopping = False
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import atexit
        import threading

        self.proc = self._spawn()
        atexit.register(self.stop)
        threading.Thread(target=self._watch, name="node-pool", daemon=True).start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv, preexec_fn=_killed_with_parent)
        log.info("node task pool started", extra={"pid": proc.pid})
        return proc

    def _watch(self) -> None:
        while not self.stopping:
            assert self.proc is not None
            code = self.proc.wait()
            if self.stopping:
                return
            log.error("node task pool exited; restarting", extra={"code": code})
            time.sleep(1)
            if not self.stopping:
                self.proc = self._spawn()

    def stop(self) -> None:
        self.stopping = True
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # Celery's warm shutdown: running tasks finish
            try:
                self.proc.wait(timeout=25)  # within systemd's TimeoutStopSec
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_agent(argv: list[str] | None = None) -> None:
    private_files()
    settings = get_settings()
    logs.setup("cairn-agent", settings.log_level)
    from appliance.agent.agent import Agent
    from appliance.agent.drivers import DriverSet
    from appliance.agent.instances import InstanceReconciler
    from appliance.agent.network import NetworkReconciler
    from appliance.agent.sampler import Sampler
    from appliance.agent.storage import StorageReconciler

    agent = Agent(settings)
    liveness = None
    if settings.cluster is not None:
        from appliance.agent.cluster import ClusterReconciler
        from appliance.agent.liveness import Liveness

        liveness = Liveness(settings)
        liveness.start()  # before anything else: the lease is the node's life in the cluster
        ClusterReconciler(settings).start(every=settings.heartbeat_interval)
    # Storage before instances: a VM's disks are NBD exports of this node's pools.
    agent.register_reconciler("storage", StorageReconciler(settings), kinds=("storage-pool", "vm"))
    net = NetworkReconciler(settings)
    # Networks first: a VM's tap needs its bridge before the VM starts.
    agent.register_reconciler("network", net, kinds=("network", "subnet", "port", "security-group", "vm",
                                                     "container", "router", "floating-ip"))
    instances = InstanceReconciler(settings, DriverSet(settings))
    instances.liveness = liveness
    agent.register_reconciler("instances", instances, kinds=("vm", "container"))
    sampler = Sampler(settings, lambda: agent.document, lambda: instances.drivers)
    sampler.start()
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.serve()
    finally:
        sampler.stop()
        net.stop()
        if liveness is not None:
            liveness.stop()


def run_storage(argv: list[str] | None = None) -> None:
    """This node's storage daemon: this node's writer of its pools (NBD + control socket);
    its volume locks name the node."""
    private_files()
    settings = get_settings()
    logs.setup("cairn-storage", settings.log_level)
    from storage.daemon import main as storaged

    tls: list[str] = []
    if settings.storage_nbd_port:  # NBD over TCP is served with TLS only
        from appliance.pki import nbd_server_tls

        tls = ["--tls-dir", str(nbd_server_tls(settings.pki_dir, [settings.storage_host]))]
    storaged(["--run-dir", str(settings.storage_run_dir), "--host", settings.storage_host,
              "--node", settings.node_name, *tls, *(argv or [])])


def run_redis(argv: list[str] | None = None) -> None:
    """The node's task broker. A cluster node's is the replicated engine (see
    appliance.cluster.runtime); else redis-server with the embedded configuration (a unix
    socket in run_dir, AOF on). Appliance mode runs it as ``cairn-redis.service``; the
    embedded supervisor starts the single node's redis-server itself with the same file."""
    settings = get_settings()
    if settings.cluster is not None:
        _engine("redis")(argv)
        return
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    os.execvp("redis-server", ["redis-server", str(redis_config(settings)), *(argv or [])])


def run_ceph(argv: list[str] | None = None) -> None:
    """Ceph: this node's daemons in a cluster (see appliance.cluster.runtime), else the
    embedded Ceph (``cairn up --ceph``): 1 mon, 1 mgr, 3 bluestore OSDs on sparse files
    under data_dir/ceph, made once and restarted with their data afterwards. Writes
    ``ready`` once HEALTH_OK; the storage reconciler attaches the ``ceph`` pool then."""
    from storage.backends.rados_cluster import resume_cluster, start_cluster

    settings = get_settings()
    logs.setup("cairn-ceph", settings.log_level)
    if settings.cluster is not None:
        from appliance.cluster.runtime import run_ceph as run_cluster_ceph

        run_cluster_ceph(settings)
        return
    d = settings.ceph_dir
    ready = d / "ready"
    ready.unlink(missing_ok=True)
    cluster = resume_cluster(d) if (d / "ceph.conf").exists() else start_cluster(d)
    stop = {"now": False}

    def _term(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    ready.write_text(str(cluster.conf))
    log.info("ceph up", extra={"conf": str(cluster.conf)})
    while not stop["now"] and all(p.poll() is None for p in cluster.procs.values()):
        time.sleep(0.5)
    ready.unlink(missing_ok=True)
    cluster.stop(remove=False)
    if not stop["now"]:
        sys.exit("a ceph daemon exited; the supervisor restarts the cluster")


def run_prometheus(argv: list[str] | None = None) -> None:
    """This node's metrics store: Debian's Prometheus scraping every member's /metrics."""
    private_files()
    settings = get_settings()
    logs.setup("cairn-prometheus", settings.log_level)
    from appliance.timeseries.store import serve

    serve(settings)


def libvirt_node(settings: Settings) -> LibvirtNode:
    """The embedded node's own libvirtd (in a private mount namespace under data_dir)."""
    from compute.libvirt_node import LibvirtNode, TlsListen

    tls = None
    if settings.cluster is not None:  # peers migrate VMs to it: TLS with the node's certificate
        tls = TlsListen(settings.cluster.address, libvirt_pki(settings))
    return LibvirtNode(settings.data_dir / "libvirt", settings.node_name, tls, cgroups=settings.libvirt_cgroups,
                       nbd_tls_dir=settings.nbd_client_dir)


def libvirt_pki(settings: Settings) -> Path:
    """libvirt's view of the node's certificate (its file names), from the node's PKI."""
    import shutil

    d = settings.pki_dir / "libvirt"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for src, names in (("ca.crt", ("cacert.pem",)), ("server.crt", ("servercert.pem", "clientcert.pem")),
                       ("server.key", ("serverkey.pem", "clientkey.pem"))):
        for name in names:
            shutil.copyfile(settings.pki_dir / src, d / name)
            os.chmod(d / name, 0o600)
    return d


def run_libvirt(argv: list[str] | None = None) -> None:
    """Embedded mode: run this node's libvirtd + virtlogd in the foreground."""
    settings = get_settings()
    logs.setup("cairn-libvirt", settings.log_level)
    node = libvirt_node(settings)
    stop = {"now": False}

    def _term(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    node.start()
    log.info("libvirt node up", extra={"uri": node.uri})
    proc = node._proc
    while not stop["now"] and proc is not None and proc.poll() is None:
        time.sleep(0.2)
    node.stop()


def _engine(name: str) -> Callable[[list[str] | None], None]:
    """A cluster engine (etcd, patroni, redis, sentinel): prepared, then exec'd."""

    def run(argv: list[str] | None = None) -> None:
        from appliance.cluster import runtime

        settings = get_settings()
        logs.setup(f"cairn-{name}", settings.log_level)
        getattr(runtime, f"run_{name}")(settings)

    return run


def main() -> None:
    commands: dict[str, Callable[[list[str] | None], None]] = {
        "api": run_api, "worker": run_worker, "agent": run_agent, "libvirt": run_libvirt,
        "storage": run_storage, "ceph": run_ceph, "redis": run_redis, "prometheus": run_prometheus}
    commands.update({name: _engine(name) for name in ("etcd", "patroni", "sentinel")})
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m appliance.processes {{{'|'.join(commands)}}} [options]")
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
