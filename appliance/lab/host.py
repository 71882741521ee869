"""What a lab does to the host: network namespaces and veths (through the network
library), and a cgroup v2 folder per node (``cgroup.kill`` crashes a whole node,
``cgroup.freeze`` hangs it; PLATFORM.md: the v2 tree here has no controllers, so
memory is read from each process's ``smaps_rollup``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from appliance.lab.layout import Lab, LabNode
from network.netlink import netns_create, netns_list, netns_remove, node_links


class LabError(Exception):
    """A lab operation could not be done; the message says why."""


# ------------------------------------------------------------------ cgroups
def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise LabError("no cgroup2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def cg_procs(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def cg_populated(cg: Path) -> bool:
    try:
        return "populated 1" in (cg / "cgroup.events").read_text()
    except FileNotFoundError:
        return False


def cg_kill(cg: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process of ``cg`` at once and wait until it is empty."""
    if not cg.exists():
        return
    (cg / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + timeout
    while cg_populated(cg):
        if time.monotonic() > deadline:
            raise LabError(f"cgroup {cg} still has processes {timeout:g} s after cgroup.kill")
        time.sleep(0.02)


def cg_freeze(cg: Path, frozen: bool) -> None:
    (cg / "cgroup.freeze").write_text("1" if frozen else "0")


def cg_remove_tree(cg: Path) -> None:
    """Kill and remove a cgroup folder and every folder below it."""
    if not cg.exists():
        return
    for child in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        cg_kill(child)
        child.rmdir()
    cg_kill(cg)
    cg.rmdir()


def cg_usage(cg: Path) -> dict[str, float]:
    """Memory (PSS and RSS, MiB, summed over the cgroup's processes) and CPU seconds so far."""
    pss = rss = 0
    for pid in cg_procs(cg):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    cpu = 0
    try:
        for line in (cg / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                cpu = int(line.split()[1])
    except FileNotFoundError:
        pass
    return {"pss_mib": round(pss / 1024, 1), "rss_mib": round(rss / 1024, 1), "cpu_seconds": cpu / 1e6,
            "processes": len(cg_procs(cg))}


# ------------------------------------------------------------------ network
def build_switch(lab: Lab) -> None:
    """The underlay switch: bridge ``br0`` in the lab's own namespace (never the host's)."""
    ns = lab.switch_netns
    if ns not in netns_list():
        netns_create(ns)
    with node_links(ns) as nl:
        if nl.link("br0") is None:
            nl.add_bridge("br0", 1500)
        nl.set_link(nl.index("br0"), state="up")


def plug_node(lab: Lab, node: LabNode) -> None:
    """The node's namespace with ``eth0`` = its underlay address, cabled to the switch."""
    if node.netns not in netns_list():
        netns_create(node.netns)
    with node_links(lab.switch_netns) as sw:
        if sw.link(node.switch_port) is None:
            sw.add_veth(node.switch_port, "eth0", 1500, peer_ns=node.netns)
        sw.set_link(sw.index(node.switch_port), master=sw.index("br0"), state="up")
    prefix = lab.subnet.split("/")[1]
    with node_links(node.netns) as nn:
        i = nn.index("eth0")
        if f"{node.address}/{prefix}" not in nn.addresses(i):
            nn.addr_add(i, f"{node.address}/{prefix}")
        nn.set_link(i, state="up")


def set_cable(lab: Lab, node: LabNode, connected: bool) -> None:
    """Pull (or plug back) the node's underlay cable at the switch: a partition that
    leaves the node running and its own link up, as a failed switch port would."""
    with node_links(lab.switch_netns) as sw:
        sw.set_link(sw.index(node.switch_port), state="up" if connected else "down")


def cable_connected(lab: Lab, node: LabNode) -> bool:
    try:
        with node_links(lab.switch_netns) as sw:
            info = sw.link(node.switch_port)
    except Exception:
        return False
    return bool(info and info.up)


def remove_namespaces(prefix: str) -> list[str]:
    """Remove every network namespace named with the lab's prefix."""
    gone = []
    for ns in netns_list():
        if ns.startswith(prefix):
            netns_remove(ns)
            gone.append(ns)
    return gone


def join_cgroup(cg: Path) -> None:
    """Move the calling process into ``cg`` (for preexec_fn: children stay there)."""
    (cg / "cgroup.procs").write_text(str(os.getpid()))


def in_cgroup(cg: Path, new_session: bool = False) -> Callable[[], None]:
    """A preexec_fn: the child joins ``cg`` (and, if asked, a session of its own)."""
    def pre() -> None:
        join_cgroup(cg)
        if new_session:
            os.setsid()

    return pre
