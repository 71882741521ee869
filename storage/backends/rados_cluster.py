"""A throwaway Ceph cluster fully in userspace: 1 mon, 1 mgr, N bluestore OSDs on sparse files.

Everything (conf, keyrings, data, logs, sockets, pid files) lives under one folder; the
daemons run in the foreground as children of this process and are stopped by PID. A
random 127.0.0.x address and random ports let several clusters run side by side.
Used by the test suite and by ``cairn up --ceph``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import rados

from storage.errors import ClusterError

_CONF = """[global]
fsid = {fsid}
mon_host = [v2:{ip}:{v2},v1:{ip}:{v1}]
public_addr = {ip}
cluster_addr = {ip}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {d}/run
crash_dir = {d}/crash
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_delete = true
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mgr_initial_modules = iostat
mgr_stats_period = 1
mgr_tick_period = 1
ms_bind_port_min = {port_min}
ms_bind_port_max = {port_max}

[mon]
mon_data = {d}/mon/$id
keyring = {d}/mon/$id/keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok
mon_cluster_log_file = {d}/log/cluster.log
mon_memory_target = 268435456
paxos_propose_interval = 0.1

[mgr]
mgr_data = {d}/mgr/$id
keyring = {d}/mgr/$id/keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok

[osd]
osd_data = {d}/osd/$id
keyring = {d}/osd/$id/keyring
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {osd_size}
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
osd_heartbeat_interval = 1

[client]
keyring = {d}/keyring
objecter_timeout = 2
objecter_tick_interval = 1
"""


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


@dataclass
class CephCluster:
    """A running throwaway cluster; ``conf`` is its ceph.conf, ``pool`` its replicated pool."""

    directory: Path
    ip: str
    pool: str
    conf: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def backend_url(self, namespace: str = "cairn") -> str:
        """The storage backend URL of a namespace in this cluster's pool."""
        return f"rados://{self.pool}/{namespace}?conf={self.conf}"

    def connect(self) -> rados.Rados:
        """A connected admin handle (caller shuts it down)."""
        c = rados.Rados(conffile=str(self.conf), name="client.admin")
        c.connect(timeout=30)
        return c

    def stop(self, remove: bool = True) -> None:
        """SIGKILL every daemon this object started (by PID), reap them, optionally delete state."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def stop_cluster_dir(directory: str | os.PathLike[str], remove: bool = True) -> int:
    """Stop a cluster started by another process: kill the PIDs in its pid files that are
    ceph daemons holding a file under ``directory`` (pid files outlive their process)."""
    d = Path(directory).resolve()
    killed = []
    for pidfile in (d / "run").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            continue
        if comm not in ("ceph-mon", "ceph-mgr", "ceph-osd"):
            continue
        fds = Path(f"/proc/{pid}/fd")
        try:
            ours = any(str(os.readlink(fd)).startswith(str(d) + "/") for fd in fds.iterdir())
        except OSError:
            continue
        if ours:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 15
    while killed and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in killed):
        time.sleep(0.1)
    if remove:
        shutil.rmtree(d, ignore_errors=True)
    return len(killed)


def start_cluster(
    directory: str | os.PathLike[str],
    osds: int = 3,
    osd_size: int = 8 << 30,
    pool: str = "cairn",
    pg_num: int = 32,
    timeout: float = 120.0,
) -> CephCluster:
    """Start a cluster whose state lives under ``directory`` (must not exist) and wait for
    HEALTH_OK with every PG active+clean. On any failure the daemons started are killed."""
    d = Path(directory).resolve()
    if d.exists():
        raise ClusterError(f"{d} exists")
    for sub in ("run", "log", "crash", "mon/a", "mgr/x"):
        (d / sub).mkdir(parents=True)
    ip = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
    v2, v1 = _free_port(ip), _free_port(ip)
    port_min = random.randrange(10000, 60000, 100)
    conf = d / "ceph.conf"
    conf.write_text(
        _CONF.format(
            fsid=uuid.uuid4(), ip=ip, v2=v2, v1=v1, d=d, osd_size=osd_size, port_min=port_min, port_max=port_min + 99
        )
    )
    cluster = CephCluster(d, ip, pool, conf)
    try:
        _bootstrap(cluster, osds, pg_num, timeout)
    except BaseException:
        cluster.stop(remove=False)
        raise
    return cluster


def resume_cluster(directory: str | os.PathLike[str], pool: str = "cairn", timeout: float = 120.0) -> CephCluster:
    """Start again the daemons of a cluster made by :func:`start_cluster` (after a reboot or
    ``cairn down``): same conf, keys, monitor store and OSDs, so every object is still there.
    Leftover daemons of that folder are killed first. Waits for HEALTH_OK."""
    d = Path(directory).resolve()
    conf = d / "ceph.conf"
    if not conf.exists():
        raise ClusterError(f"no cluster in {d}: start one with start_cluster")
    stop_cluster_dir(d, remove=False)
    ip = next(line.split("=", 1)[1].strip() for line in conf.read_text().splitlines()
              if line.strip().startswith("public_addr"))
    cluster = CephCluster(d, ip, pool, conf)
    osds = sorted(int(p.name) for p in (d / "osd").iterdir() if p.name.isdigit())
    t0 = time.monotonic()
    try:
        _spawn(cluster, "mon.a", "ceph-mon", "-f", "-c", str(conf), "-i", "a")
        _spawn(cluster, "mgr.x", "ceph-mgr", "-f", "-c", str(conf), "-i", "x")
        for i in osds:
            _spawn(cluster, f"osd.{i}", "ceph-osd", "-f", "-c", str(conf), "-i", str(i))
        c = cluster.connect()
        try:
            while not _healthy(c):
                if time.monotonic() - t0 > timeout:
                    raise ClusterError(f"cluster in {d} not HEALTH_OK {timeout:.0f} s after a restart")
                for key, proc in cluster.procs.items():
                    if proc.poll() is not None:
                        raise ClusterError(f"{key} exited with {proc.returncode}; see {d}/log")
                time.sleep(0.3)
        finally:
            c.shutdown()
    except BaseException:
        cluster.stop(remove=False)
        raise
    return cluster


def _spawn(cluster: CephCluster, key: str, *argv: str) -> None:
    log = open(cluster.directory / "log" / f"{key}.stdout", "ab")  # noqa: SIM115 - owned by the child
    cluster.procs[key] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()


def _bootstrap(cluster: CephCluster, osds: int, pg_num: int, timeout: float) -> None:
    d, conf = cluster.directory, str(cluster.conf)
    t0 = time.monotonic()
    auth = "ceph-authtool"
    _run(auth, "--create-keyring", f"{d}/keyring", "--gen-key", "-n", "client.admin",
         "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *", "--cap", "mgr", "allow *")
    _run(auth, "--create-keyring", f"{d}/mgr/x/keyring", "--gen-key", "-n", "mgr.x",
         "--cap", "mon", "allow profile mgr", "--cap", "osd", "allow *", "--cap", "mds", "allow *")
    _run(auth, "--create-keyring", f"{d}/mon.keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
    _run(auth, f"{d}/mon.keyring", "--import-keyring", f"{d}/keyring")
    _run(auth, f"{d}/mon.keyring", "--import-keyring", f"{d}/mgr/x/keyring")
    uuids = [str(uuid.uuid4()) for _ in range(osds)]
    for i in range(osds):
        (d / "osd" / str(i)).mkdir(parents=True)
        _run(auth, "--create-keyring", f"{d}/osd/{i}/keyring", "--gen-key", "-n", f"osd.{i}",
             "--cap", "mon", "allow profile osd", "--cap", "mgr", "allow profile osd", "--cap", "osd", "allow *")
        _run(auth, f"{d}/mon.keyring", "--import-keyring", f"{d}/osd/{i}/keyring")
    _run("monmaptool", "--create", "--fsid", _fsid(cluster), "--addv", "a",
         f"[v2:{cluster.ip}:{_mon_port(cluster, 'v2')},v1:{cluster.ip}:{_mon_port(cluster, 'v1')}]", f"{d}/monmap")
    _run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", f"{d}/monmap", "--keyring", f"{d}/mon.keyring")
    _spawn(cluster, "mon.a", "ceph-mon", "-f", "-c", conf, "-i", "a")
    mkfs = [
        subprocess.Popen(["ceph-osd", "-c", conf, "-i", str(i), "--mkfs", "--osd-uuid", u],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, u in enumerate(uuids)
    ]
    c = cluster.connect()
    try:
        cmds: list[dict[str, object]] = [{"prefix": "osd new", "uuid": u, "id": i} for i, u in enumerate(uuids)]
        cmds += [
            {"prefix": "osd pool create", "pool": cluster.pool, "pg_num": pg_num, "pgp_num": pg_num,
             "pool_type": "replicated", "size": 3, "autoscale_mode": "off"},
            {"prefix": "osd pool set", "pool": cluster.pool, "var": "min_size", "val": "2"},
            {"prefix": "osd pool application enable", "pool": cluster.pool, "app": "rbd"},
            {"prefix": "osd set-require-min-compat-client", "version": "mimic", "yes_i_really_mean_it": True},
        ]
        for cmd in cmds:
            r, _out, err = c.mon_command(json.dumps(cmd), b"")
            if r != 0:
                raise ClusterError(f"mon command {cmd['prefix']} failed: {err}")
        _spawn(cluster, "mgr.x", "ceph-mgr", "-f", "-c", conf, "-i", "x")
        for i, p in enumerate(mkfs):
            if p.wait(timeout=120) != 0:
                raise ClusterError(f"osd.{i} mkfs failed")
        for i in range(osds):
            _spawn(cluster, f"osd.{i}", "ceph-osd", "-f", "-c", conf, "-i", str(i))
        while True:
            if time.monotonic() - t0 > timeout:
                raise ClusterError(f"cluster in {d} not HEALTH_OK after {timeout:.0f} s")
            for key, p in cluster.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{key} exited with {p.returncode}; see {d}/log")
            if _healthy(c):
                return
            time.sleep(0.3)
    finally:
        c.shutdown()


def _healthy(c: rados.Rados) -> bool:
    r, out, _ = c.mon_command(json.dumps({"prefix": "health", "format": "json"}), b"")
    if r != 0 or json.loads(out).get("status") != "HEALTH_OK":
        return False
    r, out, _ = c.mgr_command(json.dumps({"prefix": "pg stat", "format": "json"}), b"")
    if r != 0:
        return False
    summary = json.loads(out)
    summary = summary.get("pg_summary", summary)
    total = summary.get("num_pgs", 0)
    clean = sum(x["num"] for x in summary.get("num_pg_by_state", []) if x["name"] == "active+clean")
    return bool(total) and total == clean


def _fsid(cluster: CephCluster) -> str:
    for line in cluster.conf.read_text().splitlines():
        if line.startswith("fsid = "):
            return line.split("=", 1)[1].strip()
    raise ClusterError("no fsid in conf")


def _mon_port(cluster: CephCluster, kind: str) -> str:
    for line in cluster.conf.read_text().splitlines():
        if line.startswith("mon_host = "):
            part = next(p for p in line.split("[", 1)[1].rstrip("]").split(",") if p.startswith(kind))
            return part.rsplit(":", 1)[1]
    raise ClusterError("no mon_host in conf")
