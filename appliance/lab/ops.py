"""Lab operations behind ``cairn lab …``: up, status, kill, partition, heal, down, and
running a command inside a node (its network, mount and UTS namespaces and cgroup)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.lab import daemon, host
from appliance.lab.host import LabError
from appliance.lab.layout import NODE_MOUNTS, Lab, LabNode, lab_dir
from network.netlink import netns_list, netns_remove

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000
NODE_CLI_CONFIG = f"{NODE_MOUNTS['data']}/cli.json"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def daemon_alive(lab: Lab) -> bool:
    try:
        daemon.call(lab, {"op": "ping"}, timeout=3)
        return True
    except (OSError, RuntimeError, ValueError):
        return False


def boot_pid(lab: Lab, name: str) -> int | None:
    """The pid of the node's boot process if the node is running."""
    lab.node(name)
    try:
        info = daemon.call(lab, {"op": "nodes"}).get(name)
    except (OSError, RuntimeError):
        return None
    if not info or not info["running"]:
        return None
    return int(info["pid"])


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a command run inside a node: the host's CAIRN_* settings are not
    the node's (it has its own /etc/cairn/cairn.env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env["CAIRN_CONFIG"] = NODE_CLI_CONFIG
    env.update(extra or {})
    return env


def run_in_node(lab: Lab, name: str, argv: list[str], timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a program inside a running node (its namespaces and cgroup)."""
    pid = boot_pid(lab, name)
    if pid is None:
        raise LabError(f"node {name} is not running")
    cg = lab.node_cgroup(name)
    r = subprocess.run(["nsenter", f"--target={pid}", "--net", "--mount", "--uts", "--", *argv],
                       capture_output=True, text=True, timeout=timeout, env=node_env(),
                       preexec_fn=host.in_cgroup(cg))
    if check and r.returncode != 0:
        out = (r.stderr or r.stdout).strip()[-2000:]
        raise LabError(f"`{' '.join(argv)}` on {name} failed ({r.returncode}): {out}")
    return r


def cairn_in_node(lab: Lab, name: str, *args: str, timeout: float = 120) -> Any:
    """``cairn <args> --output json`` inside a node; the parsed JSON."""
    argv = list(args)
    cut = argv.index("--") if "--" in argv else len(argv)  # options go before a command's own arguments
    argv[cut:cut] = ["--output", "json"]
    r = run_in_node(lab, name, [sys.executable, "-m", "appliance.cli.main", *argv], timeout=timeout)
    return json.loads(r.stdout) if r.stdout.strip() else None


def _start(lab: Lab, name: str, **kw: Any) -> None:
    daemon.call(lab, {"op": "start", "node": name, **kw})


def _wait_node(lab: Lab, name: str, timeout: float) -> dict[str, Any]:
    """Wait for a started node's API, database and agent (``cairn up`` inside it)."""
    deadline = time.monotonic() + timeout
    booted = lab.node(name).path / "booted"
    while True:
        pid = boot_pid(lab, name)
        if pid is not None and booted.exists() and booted.read_text().split()[:1] == [str(pid)]:
            break  # formed or joined, and its supervisor runs
        if pid is None or time.monotonic() > deadline:
            raise LabError(f"node {name} did not boot: {_tail(lab.node(name).path / 'boot.log')}")
        time.sleep(0.2)
    try:
        info: dict[str, Any] = cairn_in_node(lab, name, "up", "--timeout",
                                             str(int(max(30, deadline - time.monotonic()))), timeout=timeout + 30)
        return info
    except LabError as exc:
        raise LabError(f"{exc}\n--- {name} boot.log ---\n{_tail(lab.node(name).path / 'boot.log')}")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def up(nodes: int = 3, directory: Path | None = None, osd_size: int = 8 << 30, timeout: float = 600,
       progress: Progress = _quiet) -> dict[str, Any]:
    """Build the lab and form its cluster: node 1 runs ``cluster init``, the others join."""
    d = directory or lab_dir()
    if (d / "lab.json").exists():
        existing = Lab.load(d)
        if daemon_alive(existing):
            raise LabError(f"a lab already runs in {d}: see `cairn lab status`, or `cairn lab down` first")
        down(d)
    if nodes < 1 or nodes > 9:
        raise LabError("a lab has 1 to 9 nodes")
    lab = Lab.new(d, host.cgroup2_root())
    lab.save()
    started = time.monotonic()
    try:
        progress("underlay switch and node namespaces")
        Path(lab.cgroup).mkdir(parents=True, exist_ok=True)
        lab.ctl_cgroup.mkdir(exist_ok=True)
        host.build_switch(lab)
        for _ in range(nodes):
            node = lab.add_node()
            host.plug_node(lab, node)
            _write_node_env(node)
        lab.save()
        _start_daemon(lab)
        osds = [f"file:{osd_size}"]
        first = lab.nodes[0]
        progress(f"{first.name}: cluster init (etcd, Patroni, Redis, Ceph, Cairn)")
        _start(lab, first.name, mode="init", osds=osds)
        _wait_node(lab, first.name, timeout)
        for node in lab.nodes[1:]:
            progress(f"{node.name}: cluster join")
            token = cairn_in_node(lab, first.name, "cluster", "token", "create")["token"]
            _start(lab, node.name, mode="join", member=first.address, token=token, osds=osds)
            _wait_node(lab, node.name, timeout)
        progress("waiting for quorum, the database's replicas and Ceph HEALTH_OK")
        view = wait_healthy(lab, timeout=timeout)
    except BaseException:
        (lab.path / "up.failed").write_text(time.ctime())
        raise
    return {"dir": str(lab.path), "seconds": round(time.monotonic() - started, 1),
            "nodes": [node_summary(lab, n) for n in lab.nodes], "cluster": view}


def add_node(directory: Path | None = None, join: bool = True, token: str | None = None,
             osd_size: int = 8 << 30, timeout: float = 600) -> dict[str, Any]:
    """Cable one more node into a running lab and (by default) join it to the cluster with
    a fresh token from the first running member (or the ``token`` given)."""
    lab = Lab.load(directory)
    node = lab.add_node()
    host.plug_node(lab, node)
    _write_node_env(node)
    lab.save()
    if not join:
        return node_summary(lab, node)
    member = next(n for n in lab.nodes if n is not node and boot_pid(lab, n.name) is not None)
    if token is None:
        token = cairn_in_node(lab, member.name, "cluster", "token", "create")["token"]
    _start(lab, node.name, mode="join", member=member.address, token=token, osds=[f"file:{osd_size}"])
    _wait_node(lab, node.name, timeout)
    return node_summary(lab, node)


def remove_node(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Take a node out of the lab (after ``cairn cluster remove`` took it out of the
    cluster): its processes, namespace, cgroup and folder."""
    lab = Lab.load(directory)
    node = lab.node(name)
    host.cg_remove_tree(lab.node_cgroup(name))
    gone = [ns for ns in (node.netns,) if ns in netns_list()]
    for ns in gone:
        netns_remove(ns)  # its cable goes with it
    shutil.rmtree(node.path, ignore_errors=True)
    lab.nodes = [n for n in lab.nodes if n.name != name]
    lab.save()
    return {"node": name, "removed": True}


def _write_node_env(node: LabNode) -> None:
    """The node's own settings file (a real node's installer writes /etc/cairn/cairn.env)."""
    etc = node.host_path("etc-cairn")
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "cairn.env").write_text(
        f"CAIRN_NODE_NAME={node.name}\nCAIRN_UNDERLAY_INTERFACE=eth0\nCAIRN_MIGRATION_HOST={node.address}\n"
        f"CAIRN_STORAGE_HOST={node.address}\nCAIRN_API_HOST=0.0.0.0\n"
        # no softdog here: the lab daemon emulates the watchdog behind a FIFO
        f"CAIRN_WATCHDOG_DEVICE={NODE_MOUNTS['data']}/watchdog\n")


def _start_daemon(lab: Lab) -> None:
    out = open(lab.path / "daemon.log", "ab")  # noqa: SIM115 - the child owns it
    cg = lab.ctl_cgroup
    subprocess.Popen([sys.executable, "-m", "appliance.lab.daemon", str(lab.path)], stdin=subprocess.DEVNULL,
                     stdout=out, stderr=subprocess.STDOUT, preexec_fn=host.in_cgroup(cg, new_session=True))
    out.close()
    deadline = time.monotonic() + 15
    while not daemon_alive(lab):
        if time.monotonic() > deadline:
            raise LabError(f"the lab daemon did not start: {_tail(lab.path / 'daemon.log')}")
        time.sleep(0.1)


def cluster_view(lab: Lab, via: str | None = None) -> dict[str, Any]:
    """``cairn cluster status`` as seen by one running node."""
    names = [via] if via else [n.name for n in lab.nodes]
    last: Exception | None = None
    for name in names:
        if boot_pid(lab, name) is None or not host.cable_connected(lab, lab.node(name)):
            continue
        try:
            return cairn_in_node(lab, name, "cluster", "status", timeout=60)  # type: ignore[no-any-return]
        except LabError as exc:
            last = exc
    raise LabError(f"no running node answered `cairn cluster status`: {last}")


# Ceph health checks that say nothing about the data and come from the lab being three
# nodes on one shared host: OSD heartbeat pings between node namespaces slower than 1 s
# while the host's cores are busy (Ceph averages them over minutes, so they outlast a
# partition by a while). Everything else (PGs, OSDs down, mons, clock skew) still counts.
LAB_TOLERATED_CHECKS = frozenset({"OSD_SLOW_PING_TIME_BACK", "OSD_SLOW_PING_TIME_FRONT"})


def ceph_healthy(ceph: dict[str, Any]) -> bool:
    health = ceph.get("health")
    return health == "HEALTH_OK" or (health == "HEALTH_WARN" and bool(ceph.get("checks"))
                                     and set(ceph["checks"]) <= LAB_TOLERATED_CHECKS)


DATABASE_UP = frozenset({"running", "streaming"})


def healthy(view: dict[str, Any], expect: int) -> bool:
    """Quorum of ``expect`` voters, every member ready, a database primary with a sync
    standby and every member's database up (a replica left down, e.g. after its timeline
    diverged, is not healthy), and Ceph healthy."""
    members = view.get("members", [])
    voters = [m for m in members if "etcd" in m["roles"] and "etcd-learner" not in m["roles"]]
    databases = [m.get("database") or {} for m in members]
    return bool(view.get("quorum") and len(voters) == expect and all(m["ready"] for m in members)
            and view.get("database", {}).get("primary") is not None
            and sum(1 for m in members if "database-sync-standby" in m["roles"]) >= (1 if expect > 1 else 0)
            and sum(1 for d in databases if d.get("state") in DATABASE_UP) == expect
            and ceph_healthy(view.get("ceph", {})))


def wait_healthy(lab: Lab, timeout: float = 300, expect: int | None = None) -> dict[str, Any]:
    expect = expect or len(lab.nodes)
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            view = cluster_view(lab)
            if healthy(view, expect):
                return view
        except LabError:
            pass
        time.sleep(2)
    raise LabError(f"the lab cluster is not healthy after {timeout:g} s: {json.dumps(view)[:3000]}"
                   + database_trouble(lab, view))


# Patroni's lines that repeat every loop (or every retry of a starting PostgreSQL) and
# would push what happened out of a failed run's report.
_NOISE = ("no action", "Lock owner", "rejecting connections", "the database system is starting up",
          "waiting for WAL to become available", "Still starting up", "restart in progress")
# What changed a member's database: shown from the whole log, whatever came after it.
_EVENTS = ("promot", "demot", "rewind", "reinitializ", "bootstrap", "starting as a secondary", "restart",
           "timeline", "could not", "FATAL", "ERROR:  replication slot", "started streaming")


def database_trouble(lab: Lab, view: dict[str, Any], lines: int = 25, members: tuple[str, ...] = ()) -> str:
    """What a failed run needs to say why a member's database is not up (the lab is gone
    afterwards): the recovery settings Patroni last wrote, the last events of Patroni's
    log (PostgreSQL's too) and its last lines, with the lines that repeat every loop
    counted instead of shown. Of every member not up with no lag, and of ``members``."""
    out = []
    for m in view.get("members", []):
        db = m.get("database") or {}
        if db.get("state") in DATABASE_UP and db.get("lag") in (0, None) and m["name"] not in members:
            continue
        node = lab.node(m["name"])
        log = node.data_dir / "log" / "patroni.log"
        try:
            text = log.read_text(errors="replace").splitlines()[-4000:]
        except OSError as exc:
            text = [str(exc)]
        try:
            conf = (node.host_path("pg") / "data" / "postgresql.conf").read_text(errors="replace").splitlines()
        except OSError as exc:
            conf = [str(exc)]
        recovery = ([c for c in conf if c.startswith(("primary_conninfo", "primary_slot_name"))]
                    or ["(no primary_conninfo)"])
        quiet = [x for x in text if not any(n in x for n in _NOISE)]
        events = [x for x in quiet if any(e in x for e in _EVENTS)]
        out.append(f"\n--- {m['name']} ({db.get('state')}, lag {db.get('lag')}): {log}\n"
                   + "\n".join(r[:200] for r in recovery)
                   + "\n- last events:\n" + "\n".join(x[:240] for x in events[-lines:])
                   + f"\n- last lines ({len(text) - len(quiet)} of the last {len(text)} repeat every loop):\n"
                   + "\n".join(x[:240] for x in quiet[-lines:]))
    return "".join(out)


def node_summary(lab: Lab, node: LabNode) -> dict[str, Any]:
    cg = lab.node_cgroup(node.name)
    running = host.cg_populated(cg)
    return {"name": node.name, "address": node.address, "api": node.api_url, "netns": node.netns,
            "running": running, "cable": "connected" if host.cable_connected(lab, node) else "cut",
            "cgroup": str(cg), "data_dir": str(node.data_dir),
            "cli": f"cairn --node {node.name} status", **(host.cg_usage(cg) if running else {})}


def status(directory: Path | None = None) -> dict[str, Any]:
    lab = Lab.load(directory)
    nodes = [node_summary(lab, n) for n in lab.nodes]
    return {"dir": lab.dir, "prefix": lab.prefix, "subnet": lab.subnet, "daemon": daemon_alive(lab),
            "nodes": nodes, "total": {"pss_mib": round(sum(n.get("pss_mib", 0) for n in nodes), 1),
                                      "processes": sum(n.get("processes", 0) for n in nodes)}}


def kill(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Crash a node: SIGKILL to every process of its cgroup at once (a power cut)."""
    lab = Lab.load(directory)
    lab.node(name)
    t0 = time.monotonic()
    host.cg_kill(lab.node_cgroup(name))
    return {"node": name, "killed": True, "seconds": round(time.monotonic() - t0, 3)}


def partition(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Cut the node's underlay cable; it keeps running, alone."""
    lab = Lab.load(directory)
    host.set_cable(lab, lab.node(name), False)
    return {"node": name, "cable": "cut"}


def heal(directory: Path | None = None, wait: bool = True, timeout: float = 300) -> dict[str, Any]:
    """Plug every cable back and boot every node that is down (a new boot id); with
    ``wait``, until each of them answers again."""
    lab = Lab.load(directory)
    restarted = []
    for node in lab.nodes:
        host.set_cable(lab, node, True)
        if not host.cg_populated(lab.node_cgroup(node.name)):
            _start(lab, node.name, mode="up")
            restarted.append(node.name)
    if wait:
        for name in restarted:
            _wait_node(lab, name, timeout)
    return {"reconnected": [n.name for n in lab.nodes], "restarted": restarted}


def restart(name: str, directory: Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """Shut a node down cleanly and boot it again (a reboot: new boot id, the code as it
    is checked out now)."""
    lab = Lab.load(directory)
    lab.node(name)
    t0 = time.monotonic()
    stopped = daemon.call(lab, {"op": "stop", "node": name}, timeout=120)
    _start(lab, name, mode="up")
    _wait_node(lab, name, timeout)
    return {"node": name, "forced": stopped.get("forced", False), "seconds": round(time.monotonic() - t0, 1)}


def upgrade(directory: Path | None = None, nodes: list[str] | None = None, timeout: float = 900,
            progress: Progress = _quiet) -> dict[str, Any]:
    """A rolling upgrade, node by node: drain (VMs live-migrate away), upgrade (here: a
    reboot onto the code checked out now), undrain, wait until Ready; the guests run
    throughout. Stops at the first node that fails, leaving it drained."""
    lab = Lab.load(directory)
    order = nodes or [n.name for n in lab.nodes]
    steps = []
    for name in order:
        via = next(n.name for n in lab.nodes if n.name != name and boot_pid(lab, n.name) is not None)
        t0 = time.monotonic()
        progress(f"{name}: drain (through {via})")
        task = cairn_in_node(lab, via, "node", "drain", name, timeout=timeout)
        if task.get("state") != "succeeded":
            raise LabError(f"draining {name} failed: {task.get('error')}")
        drained = time.monotonic() - t0
        phase = cairn_in_node(lab, via, "get", "node", name)["status"].get("phase")
        progress(f"{name}: upgrade (reboot onto the current code)")
        restart(name, directory, timeout)
        progress(f"{name}: undrain")
        cairn_in_node(lab, via, "node", "undrain", name)
        deadline = time.monotonic() + 120
        while cairn_in_node(lab, via, "get", "node", name)["status"].get("phase") != "Ready":
            if time.monotonic() > deadline:
                raise LabError(f"{name} is not Ready 120 s after its undrain")
            time.sleep(1)
        steps.append({"node": name, "drain_seconds": round(drained, 1), "phase_drained": phase,
                      "moved": task.get("result", {}).get("moved"),
                      "total_seconds": round(time.monotonic() - t0, 1)})
    return {"nodes": steps}


def down(directory: Path | None = None) -> dict[str, Any]:
    """Remove everything the lab made: its processes (cgroup), namespaces and folder. Works
    after a crash of the lab tool too (everything is named from the lab's prefix)."""
    d = directory or lab_dir()
    try:
        lab = Lab.load(d)
    except FileNotFoundError:
        return {"dir": str(d), "removed": False, "message": "no lab there"}
    host.cg_remove_tree(Path(lab.cgroup))
    gone = host.remove_namespaces(lab.prefix)
    shutil.rmtree(lab.path, ignore_errors=True)
    return {"dir": str(d), "removed": True, "namespaces": gone}


def enter(name: str, directory: Path | None = None) -> dict[str, str]:
    """Move this (single-threaded) process into a running node's network, mount and UTS
    namespaces, for ``cairn --node <name> …``; returns the environment to add."""
    lab = Lab.load(directory)
    pid = boot_pid(lab, name)
    if pid is None:
        raise LabError(f"lab node {name} is not running (`cairn lab status`; `cairn lab heal` boots it)")
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for ns, flag in (("net", CLONE_NEWNET), ("uts", CLONE_NEWUTS), ("mnt", CLONE_NEWNS)):
        fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, flag) != 0:
                err = ctypes.get_errno()
                raise LabError(f"cannot enter node {name}'s {ns} namespace: {os.strerror(err)}")
        finally:
            os.close(fd)
    return {"CAIRN_CONFIG": NODE_CLI_CONFIG}
