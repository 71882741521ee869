"""The installed appliance's systemd units (``appliance/systemd``).

On a node installed from the ISO systemd runs Cairn's processes, one unit each, all
grouped by ``cairn.target`` (elsewhere the embedded supervisor does this job). The
installer leaves ``cairn.target`` disabled: a fresh node starts nothing until its first
boot ran ``cairn up``, ``cairn cluster init`` or ``cairn cluster join``, which enable and
start it (a cluster starts on fresh nodes). A cluster engine's unit runs only where
``cluster.json`` exists, Ceph's also after ``cairn up --ceph``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

TARGET = "cairn.target"
# Named as the supervisor names its programs; in the supervisor's start order.
# Debian's libvirtd stands in for the supervisor's own ``libvirt`` program.
UNITS = {"etcd": "cairn-etcd.service", "redis": "cairn-redis.service", "sentinel": "cairn-sentinel.service",
         "patroni": "cairn-patroni.service", "ceph": "cairn-ceph.service", "libvirt": "libvirtd.service",
         "storage": "cairn-storage.service", "api": "cairn-api.service", "worker": "cairn-worker.service",
         "agent": "cairn-agent.service", "prometheus": "cairn-prometheus.service"}


class UnitError(Exception):
    """systemctl refused; the message carries its words."""


def _systemctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)


def installed() -> bool:
    """systemd is PID 1 here and Cairn's units are installed (a node installed from the ISO)."""
    if not Path("/run/systemd/system").is_dir():
        return False
    try:
        return _systemctl("show", "--property", "LoadState", "--value", TARGET, timeout=30).stdout.strip() == "loaded"
    except (OSError, subprocess.TimeoutExpired):
        return False


def active() -> bool:
    return _systemctl("is-active", "--quiet", TARGET, timeout=30).returncode == 0


def start() -> None:
    """Enable ``cairn.target`` (the node's services start at every boot from now on) and
    start whatever of it is not running."""
    r = _systemctl("enable", "--now", TARGET)
    if r.returncode != 0:
        raise UnitError(f"systemctl enable --now {TARGET} failed: {(r.stderr or r.stdout).strip()[-500:]}")


def stop() -> None:
    r = _systemctl("stop", TARGET)
    if r.returncode != 0:
        raise UnitError(f"systemctl stop {TARGET} failed: {(r.stderr or r.stdout).strip()[-500:]}")


def states() -> dict[str, dict[str, Any]]:
    """Each unit that runs on this node (or was meant to and failed): running, main PID,
    restarts. A unit whose condition left it out (a cluster engine on a single node) is
    not listed."""
    r = _systemctl("show", *UNITS.values(), "--property",
                   "Id,LoadState,ActiveState,SubState,MainPID,NRestarts,ConditionResult", timeout=30)
    names = {unit: name for name, unit in UNITS.items()}
    out: dict[str, dict[str, Any]] = {}
    for block in r.stdout.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("LoadState") != "loaded" or props.get("Id") not in names:
            continue
        if props.get("ConditionResult") != "yes" and props.get("ActiveState") == "inactive":
            continue
        pid = int(props.get("MainPID") or 0)
        out[names[props["Id"]]] = {"running": props.get("ActiveState") == "active", "pid": pid or None,
                                   "restarts": int(props.get("NRestarts") or 0),
                                   "state": f"{props.get('ActiveState')}/{props.get('SubState')}"}
    return {name: out[name] for name in UNITS if name in out}


def diagnostics(lines_per_unit: int = 8) -> list[str]:
    """The state of every unit, with the last log lines of those not running: for whoever
    reads the console of a node that did not come up."""
    lines = []
    for unit in [TARGET, *UNITS.values()]:
        state = _systemctl("is-active", unit, timeout=30).stdout.strip()
        lines.append(f"{unit}: {state}")
        if state not in ("active", "inactive"):
            log = subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-n", str(lines_per_unit), "-u", unit],
                                 capture_output=True, text=True, timeout=30).stdout
            lines += [f"  {line}" for line in log.splitlines()]
    return lines
