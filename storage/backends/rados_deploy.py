"""Ceph on the nodes of a Cairn cluster: one monitor on each of the first three nodes,
a manager on every node (one active, the others standby), one bluestore OSD per data
disk, CRUSH failure domain = host.

This is the multi-host sibling of :mod:`storage.backends.rados_cluster` (a throwaway
single-host cluster for tests and ``cairn up --ceph``). Each node runs its own daemons
(:class:`NodeDaemons`) from one ``ceph.conf``; a monitor that is not yet in the monitor
map joins the quorum by itself when it starts (Ceph's manual "add a monitor" procedure).
Everything talks to the monitors over one librados handle (a ``ceph`` CLI call costs
~0.5 s here, PLATFORM.md)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rados

from storage.errors import ClusterError

MON_V2, MON_V1 = 3300, 6789


@dataclass(frozen=True)
class CephNode:
    """What one node needs to know to run its Ceph daemons."""

    fsid: str
    name: str  # the node name: mon/mgr id and CRUSH host
    address: str
    mons: tuple[tuple[str, str], ...]  # (name, address) of every monitor, this node's included if it is one
    conf: Path  # /etc/ceph/ceph.conf on a node
    data: Path  # mon / mgr / osd folders, logs, sockets
    osd_size: int = 8 << 30
    osd_memory_mib: int = 128

    @property
    def admin_keyring(self) -> Path:
        return self.conf.parent / "ceph.client.admin.keyring"


def mon_addr(address: str) -> str:
    return f"[v2:{address}:{MON_V2},v1:{address}:{MON_V1}]"


def build_conf(node: CephNode) -> str:
    """The node's ceph.conf (pure): every monitor in ``mon_host``, its own paths, small
    memory targets for shared machines, fast failure detection (PLATFORM.md)."""
    d = node.data
    mon_host = ",".join(mon_addr(a) for _, a in node.mons)
    return f"""[global]
fsid = {node.fsid}
mon_host = {mon_host}
public_addr = {node.address}
cluster_addr = {node.address}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {d}/run
crash_dir = {d}/crash
osd_crush_chooseleaf_type = 1
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1
mon_osd_down_out_interval = 120
# a dead or cut-off node's OSD is marked down 8 s after its last heartbeat. The mons judge
# by this grace too, so it is global (set for the OSDs only, the mons kept their 20 s: a
# cut-off node's OSD went down 23-25 s after the cut, and the HA fence waited for it), and
# not stretched by the OSD's history of going down (mon_osd_adjust_heartbeat_grace)
osd_heartbeat_interval = 1
osd_heartbeat_grace = 8
mon_osd_adjust_heartbeat_grace = false
mgr_initial_modules = iostat
ms_bind_ipv4 = true

[mon]
mon_data = {d}/mon/ceph-$id
keyring = {d}/mon/ceph-$id/keyring
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok
mon_cluster_log_file = {d}/log/cluster.log
mon_memory_target = 268435456
paxos_propose_interval = 0.1

[mgr]
mgr_data = {d}/mgr/ceph-$id
keyring = {d}/mgr/ceph-$id/keyring
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok

[osd]
osd_data = {d}/osd/ceph-$id
keyring = {d}/osd/ceph-$id/keyring
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {node.osd_size}
bluestore_cache_autotune = false
bluestore_cache_size = {node.osd_memory_mib << 20}
crush_location = root=default host={node.name}

[client]
keyring = {node.admin_keyring}
objecter_timeout = 2
objecter_tick_interval = 1
"""


def _run(*argv: str, timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def new_fsid() -> str:
    return str(uuid.uuid4())


def write_conf(node: CephNode) -> None:
    node.conf.parent.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "log", "crash", "mon", "mgr", "osd"):
        (node.data / sub).mkdir(parents=True, exist_ok=True)
    tmp = node.conf.with_suffix(".tmp")
    tmp.write_text(build_conf(node))
    tmp.replace(node.conf)


def bootstrap_first_mon(node: CephNode) -> None:
    """The first node: admin and monitor keys, a one-monitor map, mon mkfs (idempotent)."""
    mon_dir = node.data / "mon" / f"ceph-{node.name}"
    if (mon_dir / "store.db").exists():
        return
    write_conf(node)
    tool = "ceph-authtool"
    admin, monkey = node.admin_keyring, node.data / "mon.keyring"
    if not admin.exists():
        _run(tool, "--create-keyring", str(admin), "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
             "--cap", "osd", "allow *", "--cap", "mds", "allow *", "--cap", "mgr", "allow *")
        os.chmod(admin, 0o600)
    _run(tool, "--create-keyring", str(monkey), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
    _run(tool, str(monkey), "--import-keyring", str(admin))
    monmap = node.data / "monmap"
    _run("monmaptool", "--create", "--clobber", "--fsid", node.fsid, "--addv", node.name, mon_addr(node.address),
         str(monmap))
    _mkfs_mon(node, monmap, monkey)


def join_mon(node: CephNode, monmap: bytes, mon_keyring: str) -> None:
    """A joining monitor: mkfs from the cluster's current map and monitor key (idempotent);
    started with its address, it asks the quorum to add it."""
    mon_dir = node.data / "mon" / f"ceph-{node.name}"
    if (mon_dir / "store.db").exists():
        return
    write_conf(node)
    (node.data / "monmap").write_bytes(monmap)
    keyring = node.data / "mon.keyring"
    keyring.write_text(mon_keyring)
    os.chmod(keyring, 0o600)
    _mkfs_mon(node, node.data / "monmap", keyring)


def _mkfs_mon(node: CephNode, monmap: Path, keyring: Path) -> None:
    _run("ceph-mon", "-c", str(node.conf), "--mkfs", "-i", node.name, "--monmap", str(monmap),
         "--keyring", str(keyring))


def osds_at(dump: dict[str, Any], address: str) -> list[int]:
    """The OSDs of an ``osd dump`` whose public address is on the host ``address``."""
    out = []
    for osd in dump.get("osds", []):
        addrs = [a.get("addr", "") for a in (osd.get("public_addrs") or {}).get("addrvec", [])]
        addrs.append(str(osd.get("public_addr", "")))
        if any(a.rsplit(":", 1)[0].removeprefix("v2:").removeprefix("v1:") == address for a in addrs if a):
            out.append(int(osd["osd"]))
    return sorted(out)


class Admin:
    """Monitor commands over one librados handle (the node's admin key)."""

    def __init__(self, conf: Path, timeout: float = 20) -> None:
        self.client = rados.Rados(conffile=str(conf), name="client.admin",
                                  conf={"rados_mon_op_timeout": str(int(timeout))})
        self.client.connect(timeout=int(timeout))

    def close(self) -> None:
        self.client.shutdown()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mon(self, prefix: str, inbuf: bytes = b"", **args: Any) -> Any:
        cmd = {"prefix": prefix, "format": "json", **args}
        r, out, err = self.client.mon_command(json.dumps(cmd), inbuf, timeout=20)
        if r != 0:
            raise ClusterError(f"ceph {prefix} failed ({r}): {err}")
        return json.loads(out) if out.strip() else None

    def mon_raw(self, prefix: str, **args: Any) -> bytes:
        r, out, err = self.client.mon_command(json.dumps({"prefix": prefix, **args}), b"", timeout=20)
        if r != 0:
            raise ClusterError(f"ceph {prefix} failed ({r}): {err}")
        return bytes(out)

    # -- what a joining node is handed
    def monmap(self) -> bytes:
        return self.mon_raw("mon getmap")

    def keyring(self, entity: str) -> str:
        return self.mon_raw("auth get", entity=entity).decode()

    # -- daemons' keys and OSDs
    def mgr_keyring(self, name: str) -> str:
        return self.mon_raw("auth get-or-create", entity=f"mgr.{name}",
                            caps=["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"]).decode()

    def new_osd(self, osd_uuid: str, secret: str) -> int:
        out = self.mon("osd new", inbuf=json.dumps({"cephx_secret": secret}).encode(), uuid=osd_uuid)
        return int(out["osdid"])

    def ensure_pool(self, pool: str, pg_num: int = 32) -> None:
        if pool in [p["poolname"] for p in self.mon("osd lspools")]:
            return
        self.mon("osd pool create", pool=pool, pg_num=pg_num, pgp_num=pg_num, pool_type="replicated",
                 autoscale_mode="off", size=1)
        self.mon("osd pool application enable", pool=pool, app="rbd")
        self.mon("osd set-require-min-compat-client", version="mimic", yes_i_really_mean_it=True)

    def osd_hosts(self) -> dict[str, list[int]]:
        """CRUSH hosts and the OSDs under each."""
        tree = self.mon("osd tree")
        nodes = {n["id"]: n for n in tree["nodes"]}
        return {n["name"]: sorted(c for c in n.get("children", []) if nodes.get(c, {}).get("type") == "osd")
                for n in tree["nodes"] if n["type"] == "host"}

    def replicate_by_hosts(self, pool: str) -> tuple[int, int]:
        """Grow the pool's replication with the number of hosts that have OSDs: size 1, 2,
        then 3 with min_size 2 (failure domain host). Never shrinks it (``cluster remove``
        does that explicitly). Returns (size, min_size)."""
        hosts = sum(1 for osds in self.osd_hosts().values() if osds)
        want = max(1, min(3, hosts))
        current = int(self.mon("osd pool get", pool=pool, var="size")["size"])
        if want > current:
            self.mon("osd pool set", pool=pool, var="size", val=str(want))
        size = max(want, current)
        min_size = 2 if size >= 3 else 1
        if int(self.mon("osd pool get", pool=pool, var="min_size")["min_size"]) != min_size:
            self.mon("osd pool set", pool=pool, var="min_size", val=str(min_size))
        # new pools (and the TOO_FEW_OSDS check) follow the cluster's current replication
        self.mon("config set", who="global", name="osd_pool_default_size", value=str(size))
        self.mon("config set", who="global", name="osd_pool_default_min_size", value=str(min_size))
        return size, min_size

    def set_pool_size(self, pool: str, size: int) -> None:
        self.mon("osd pool set", pool=pool, var="min_size", val=str(2 if size >= 3 else 1))
        self.mon("osd pool set", pool=pool, var="size", val=str(size))

    def health(self) -> dict[str, Any]:
        return self.mon("health")  # type: ignore[no-any-return]

    def quorum(self) -> dict[str, Any]:
        return self.mon("quorum_status")  # type: ignore[no-any-return]

    def mon_names(self) -> list[tuple[str, str]]:
        """(name, address) of every monitor in the map."""
        dump = self.mon("mon dump")
        out = []
        for m in dump["mons"]:
            addr = m.get("public_addr") or m.get("addr") or ""
            out.append((m["name"], addr.split(":")[0]))
        return out

    def remove_mon(self, name: str) -> None:
        self.mon("mon remove", name=name)

    def remove_host(self, host: str) -> None:
        """Take a departed node's OSDs out of the cluster for good (purge) and its host bucket."""
        for osd in self.osd_hosts().get(host, []):
            self.mon("osd down", ids=[str(osd)])
            self.mon("osd purge-actual", id=osd, yes_i_really_mean_it=True)
        try:
            self.mon("osd crush remove", name=host)
        except ClusterError:
            pass

    def blocklist_add(self, addr: str, seconds: int = 3600) -> None:
        self.mon("osd blocklist", blocklistop="add", addr=addr, expire=float(seconds))

    def blocklist_remove(self, addr: str) -> None:
        """Lift one client's entry (``ip:port/nonce``); an entry already gone is fine."""
        try:
            self.mon("osd blocklist", blocklistop="rm", addr=addr)
        except ClusterError as exc:
            if "isn't blocklisted" not in str(exc) and "not blocklisted" not in str(exc):
                raise

    def osds_at(self, address: str) -> list[int]:
        """The OSDs whose public address is on the host ``address`` (up or not)."""
        return osds_at(self.mon("osd dump"), address)

    def mark_down(self, ids: list[int]) -> None:
        """Mark OSDs down now rather than after the heartbeat grace: a fenced node's
        OSDs are dead (its watchdog reset it), and I/O to the placement groups they led
        waits until the monitors mark them down."""
        if ids:
            self.mon("osd down", ids=[str(i) for i in ids])

    def blocklist_range(self, cidr: str, seconds: int) -> None:
        """Blocklist every client of an address range (a fenced host: ``<ip>/32``)."""
        self.mon("osd blocklist", range="range", blocklistop="add", addr=cidr, expire=float(seconds))

    def blocklist_range_remove(self, cidr: str) -> None:
        try:
            self.mon("osd blocklist", range="range", blocklistop="rm", addr=cidr)
        except ClusterError as exc:
            if "isn't blocklisted" not in str(exc) and "not blocklisted" not in str(exc):
                raise

    def blocklist(self) -> list[str]:
        """Blocklisted client addresses and ranges (``1.2.3.4:0/32`` for a range)."""
        raw = self.mon_raw("osd blocklist ls", format="json").decode()
        # Pacific prints two JSON arrays back to back: single addresses, then ranges
        decoder, at, found = json.JSONDecoder(), 0, []
        while at < len(raw.strip()):
            part, at = decoder.raw_decode(raw, at)
            found += [str(e.get("addr") or e.get("range")) if isinstance(e, dict) else str(e) for e in part]
        return found


@dataclass
class NodeDaemons:
    """This node's ceph-mon (if it is one), ceph-mgr and ceph-osd processes, as children
    that the caller waits on (a supervisor restarts the lot when one dies)."""

    node: CephNode
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, key: str, *argv: str) -> None:
        log = open(self.node.data / "log" / f"{key}.stdout", "ab")  # noqa: SIM115 - the child owns it
        self.procs[key] = subprocess.Popen([*argv, "-f", "-c", str(self.node.conf)], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def start_mon(self) -> None:
        self._spawn(f"mon.{self.node.name}", "ceph-mon", "-i", self.node.name, "--public-addr", self.node.address)

    def start_mgr(self, admin: Admin) -> None:
        d = self.node.data / "mgr" / f"ceph-{self.node.name}"
        if not (d / "keyring").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "keyring").write_text(admin.mgr_keyring(self.node.name))
            os.chmod(d / "keyring", 0o600)
        self._spawn(f"mgr.{self.node.name}", "ceph-mgr", "-i", self.node.name)

    def ensure_osds(self, admin: Admin, osds: list[str]) -> list[int]:
        """Create this node's OSDs, one per entry of ``osds``, and start every OSD this node
        has. An entry is a block device (bluestore on the whole device, through the OSD's
        ``block`` link; give a stable name such as ``/dev/disk/by-id/…``) or ``file:<bytes>``
        (a sparse file of ``osd_size`` in the node's data folder). Each OSD keeps its entry
        in ``spec``, so a restart makes none twice (one made before that is a file)."""
        root = self.node.data / "osd"
        have: list[int] = []
        missing = ["file" if o.startswith("file:") else o for o in osds]
        for d in sorted(root.glob("ceph-*")):
            if (d / "ready").exists():
                have.append(int(d.name.split("-", 1)[1]))
                spec = (d / "spec").read_text().strip() if (d / "spec").exists() else "file"
                if spec in missing:
                    missing.remove(spec)
        for spec in missing:
            if spec != "file" and not (os.path.exists(spec) and stat.S_ISBLK(os.stat(spec).st_mode)):
                raise ClusterError(f"OSD device {spec} is not a block device on this node")
            osd_uuid = str(uuid.uuid4())
            secret = _run("ceph-authtool", "--gen-print-key").strip()
            osd_id = admin.new_osd(osd_uuid, secret)
            d = root / f"ceph-{osd_id}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "keyring").write_text(f"[osd.{osd_id}]\n\tkey = {secret}\n")
            os.chmod(d / "keyring", 0o600)
            if spec != "file":
                (d / "block").unlink(missing_ok=True)
                (d / "block").symlink_to(spec)
            _run("ceph-osd", "-c", str(self.node.conf), "-i", str(osd_id), "--mkfs", "--osd-uuid", osd_uuid,
                 timeout=300)
            (d / "spec").write_text(spec + "\n")
            have.append(osd_id)
        for osd_id in have:  # those not running (a second ceph-osd of one id would be orphaned here)
            running = self.procs.get(f"osd.{osd_id}")
            if running is None or running.poll() is not None:
                self._spawn(f"osd.{osd_id}", "ceph-osd", "-i", str(osd_id))
        return have

    def exited(self) -> list[str]:
        return [k for k, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace: float = 10) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def wait_quorum(conf: Path, timeout: float = 60) -> Admin:
    """Connect once the monitors have a quorum (an Admin the caller closes)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            return Admin(conf, timeout=5)
        except (rados.Error, ClusterError) as exc:
            last = str(exc)
            time.sleep(0.5)
    raise ClusterError(f"the Ceph monitors have no quorum after {timeout:g} s: {last}")
