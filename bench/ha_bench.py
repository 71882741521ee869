"""HA figures on a fresh lab cluster, measured in one run:

- node death: an HA VM (the tiny guest) runs on a node; the node is killed (`cairn lab
  kill`: SIGKILL of its whole cgroup); seconds until the guest's boot marker appears in
  its serial log on another node — median and worst of ``--rounds``, with the timeline
  of one failover (lease expiry as seen by the HA manager, fence, placement, start);
- partition: the same with the node's cable cut (its own watchdog resets it);
- drain of a node running ``--vms`` VMs: total time and each VM's live-migration downtime.

    .venv/bin/python bench/ha_bench.py [--rounds 5] [--vms 4] [--phases kill,partition,drain]

Writes bench/ha_bench.result.json (after each phase, so a later failure keeps what was
measured); CAIRN_BENCH_KEEP_LAB=1 keeps the lab of a failed run for diagnosis. The lease
TTL and watchdog timeout are the shipped defaults (appliance/settings.py)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.lab import daemon, ops  # noqa: E402
from appliance.lab.host import LabError  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from compute.testguest import MARKER  # noqa: E402
from tests.lab_cluster import LabCluster  # noqa: E402

NODES = ("n1", "n2", "n3")


def victim_and_survivor(lab: LabCluster) -> tuple[str, str]:
    view = lab.view()
    busy = {view["database"]["primary"], view["etcd"]["leader"]}
    victim = next(n for n in reversed(NODES) if n not in busy)
    return victim, next(n for n in NODES if n != victim)


def marker_elsewhere(lab: LabCluster, domain: str, victim: str, since: float) -> bool:
    for node in lab.lab.nodes:
        if node.name == victim:
            continue
        log = node.data_dir / "instances" / domain / "serial.log"
        if log.exists() and log.stat().st_mtime >= since and MARKER in log.read_text(errors="replace"):
            return True
    return False


def timeline(lab: LabCluster, via: str, victim: str, vm: str, since: float) -> list[tuple[float, str]]:
    r = lab.cairn_rc(via, "events", "--since", "0", "--seconds", "3", "-o", "json")
    out = []
    for line in r.stdout.splitlines():
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        from datetime import datetime

        t = datetime.fromisoformat(ev["time"].replace("Z", "+00:00")).timestamp()
        if t < since:
            continue
        if ev["kind"] == "node" and ev["name"] == victim and ev["verb"] in ("fenced", "lost"):
            out.append((round(t - since, 2), f"node {victim} {ev['verb']} (lease expired; storage fenced)"))
        elif ev["kind"] == "task" and ev["object"].get("name") == "instance.failover" and \
                ev["object"].get("resource", {}).get("name") == vm:
            msg = ev["object"]["progress"]["message"]
            out.append((round(t - since, 2), f"failover task: {ev['object']['state']}: {msg}"))
    first: dict[str, float] = {}  # each step once, when it first happened
    for t, what in out:
        first.setdefault(what, t)
    return sorted((t, what) for what, t in first.items())


def failover_round(lab: LabCluster, i: int, how: str) -> dict[str, Any]:
    victim, via = victim_and_survivor(lab)
    name = f"bench-{how}-{i}"
    vm = lab.cairn(via, "vm", "create", name, "--image", "tiny-guest", "--memory", "128MiB", "--on", victim, "--ha",
                   timeout=600)
    domain = vm["status"]["domain"]
    deadline = time.monotonic() + 60
    while not daemon.call(lab.lab, {"op": "watchdogs"}).get(victim, {}).get("armed"):
        assert time.monotonic() < deadline, "watchdog never armed"
        time.sleep(0.5)
    t0 = time.time()
    (ops.kill if how == "kill" else ops.partition)(victim, lab.dir)
    while not marker_elsewhere(lab, domain, victim, t0):
        assert time.time() - t0 < 180, f"{name}: no guest marker on another node after 180 s"
        time.sleep(0.2)
    seconds = round(time.time() - t0, 2)
    events = timeline(lab, via, victim, name, t0)
    resets = [r for r in settle(lab, t0) if not r.startswith(f"{victim} ")]  # the victim's own reset is the plan
    lab.cairn_rc(via, "delete", "vm", name)
    return {"how": how, "victim": victim, "marker_seconds": seconds, "timeline": events,
            "other_watchdog_resets": resets}


def watchdog_resets(lab: LabCluster, since: float) -> list[str]:
    """The lab's watchdog firings since ``since`` ("<node> fired after 8 s unfed")."""
    log = lab.dir / "watchdog.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [ln.split(" ", 1)[1] for ln in lines if float(ln.split()[0]) >= since]


def settle(lab: LabCluster, since: float, timeout: float = 600) -> list[str]:
    """Heal the lab and wait until it is healthy. A node whose watchdog fires meanwhile
    (its agent could not renew its lease for ``watchdog_timeout`` seconds while the victim
    rejoined: on this 2-core host every node shares the CPUs and the disk) is booted again,
    as a real watchdog reset would, and reported: the result keeps every firing."""
    deadline = time.monotonic() + timeout
    ops.heal(lab.dir)
    while time.monotonic() < deadline:
        if not all(n["running"] for n in ops.status(lab.dir)["nodes"]):
            print(f"a node was reset while the lab healed: {watchdog_resets(lab, since)}", file=sys.stderr)
            ops.heal(lab.dir)
        try:
            if ops.healthy(ops.cluster_view(lab.lab), len(NODES)):
                return watchdog_resets(lab, since)
        except LabError:
            pass
        time.sleep(2)
    raise LabError(f"the lab is not healthy {timeout:g} s after the heal: {ops.cluster_view(lab.lab)}")


def drain(lab: LabCluster, vms: int) -> dict[str, Any]:
    node, via = "n2", "n1"
    names = [f"bench-drain-{i}" for i in range(vms)]
    for name in names:
        lab.cairn(via, "vm", "create", name, "--image", "tiny-guest", "--memory", "128MiB", "--on", node, timeout=600)
    t0 = time.monotonic()
    task = lab.cairn(via, "node", "drain", node, timeout=1800)
    total = round(time.monotonic() - t0, 1)
    per = {n: lab.cairn(via, "get", "vm", n)["status"].get("migration", {}) for n in names}
    lab.cairn(via, "node", "undrain", node)
    for name in names:
        lab.cairn_rc(via, "delete", "vm", name)
    return {"node": node, "vms": vms, "state": task["state"], "total_seconds": total,
            "downtime_ms": {n: m.get("downtime_ms") for n, m in per.items()},
            "migration_seconds": {n: m.get("duration_s") for n, m in per.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--phases", default="kill,partition,drain",
                        help="which measurements, comma-separated, in this order (kill, partition, drain)")
    args = parser.parse_args()
    defaults = Settings()
    result: dict[str, Any] = {"lease_ttl": defaults.ha_lease_ttl, "watchdog_timeout": defaults.watchdog_timeout,
                              "machine_load_at_start": [round(x, 2) for x in os.getloadavg()]}
    d = Path(tempfile.mkdtemp(prefix="cairn-lab-habench-"))
    out = ROOT / "bench" / "ha_bench.result.json"
    failed = True
    try:
        ops.up(3, d, osd_size=4 << 30, timeout=900, progress=lambda m: print(f"==> {m}", file=sys.stderr))
        lab = LabCluster(d)
        lab.cairn("n1", "image", "import-test-guest", timeout=600)
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
        for how in [p for p in phases if p in ("kill", "partition")]:
            rounds: list[dict[str, Any]] = []
            result[how] = {"rounds": rounds}
            for i in range(args.rounds):
                rounds.append(failover_round(lab, i, how))
                out.write_text(json.dumps(result, indent=1) + "\n")  # each round survives a later failure
            secs = [r["marker_seconds"] for r in rounds]
            result[how] = {"median_seconds": round(statistics.median(secs), 2), "worst_seconds": max(secs),
                           "rounds": rounds}
            print(f"{how}: {result[how]['median_seconds']} s median, {result[how]['worst_seconds']} s worst",
                  file=sys.stderr)
            out.write_text(json.dumps(result, indent=1) + "\n")  # what is measured survives a later failure
        if "drain" in phases:
            result["drain"] = drain(lab, args.vms)
        result["machine_load_at_end"] = [round(x, 2) for x in os.getloadavg()]
        failed = False
    finally:
        if failed and os.environ.get("CAIRN_BENCH_KEEP_LAB") == "1":
            print(f"the lab stays for diagnosis: cairn lab down --dir {d}", file=sys.stderr)
        else:
            ops.down(d)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
