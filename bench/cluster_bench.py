"""The lab cluster's figures, measured in one run on this machine:

- bring-up: `cairn lab up --nodes 3` from nothing to a healthy cluster (quorum, database
  primary + synchronous standby, Ceph HEALTH_OK);
- idle cost: memory (PSS) and CPU of the three nodes over a quiet minute;
- API request latency through the database primary's node and through a replica's node
  (the same requests as bench/api_latency.py: GET /nodes with 1000 nodes in the table,
  and /health as the in-run baseline), ratio replica ÷ primary;
- API write unavailability when the database primary's node is killed (SIGKILL of its
  whole cgroup): a probe writes through a surviving node every 0.1 s; seconds from the
  kill to the first acknowledged write, median and worst of ``--rounds``; every
  acknowledged write is checked to be there afterwards.

    .venv/bin/python bench/cluster_bench.py [--rounds 5] [--requests 300]

Writes bench/cluster_bench.result.json."""

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

from appliance.lab import ops  # noqa: E402
from appliance.lab.layout import Lab  # noqa: E402
from tests.lab_cluster import LabCluster  # noqa: E402

LATENCY = r"""
import json, ssl, statistics, sys, time, httpx
from appliance.cli.client import load_config
cfg = load_config(); n = int(sys.argv[1])
c = httpx.Client(base_url=cfg["url"], verify=ssl.create_default_context(cafile=cfg["ca_file"]),
                 headers={"Authorization": "Bearer " + cfg["token"]}, timeout=30)
out = {}
for path in ("/api/v1/health", "/api/v1/nodes?limit=100"):
    for _ in range(20):
        c.get(path).raise_for_status()
    s = []
    for _ in range(n):
        t0 = time.perf_counter(); c.get(path).raise_for_status(); s.append((time.perf_counter() - t0) * 1000)
    s.sort()
    out[path] = {"median_ms": round(statistics.median(s), 2), "p99_ms": round(s[int(0.99 * (len(s) - 1))], 2)}
print(json.dumps(out))
"""

FAKE_NODES = r"""
from appliance.db.engine import session_scope
from appliance.services import nodes
from appliance.settings import get_settings
inv = {"cpu_model": "EPYC", "cores": 96, "threads": 192, "numa_nodes": 4, "memory_bytes": 768 << 30,
       "disks": [], "nics": [], "virt_type": "kvm", "kernel": "6.1.0"}
with session_scope(get_settings().resolved_database_url) as s:
    for i in range(1000):
        nodes.register(s, f"bench-{i:04d}", inv, {"cpu": 192, "memory_bytes": 700 << 30})
"""


def idle(lab: LabCluster, seconds: float = 60) -> dict[str, Any]:
    a = ops.status(lab.dir)["nodes"]
    time.sleep(seconds)
    b = ops.status(lab.dir)["nodes"]
    per = {n["name"]: {"cpu_percent_of_a_core": round((m["cpu_seconds"] - n["cpu_seconds"]) / seconds * 100, 1),
                       "pss_mib": m["pss_mib"]} for n, m in zip(a, b, strict=True)}
    return {"nodes": per, "cpu_percent_of_a_core": round(sum(v["cpu_percent_of_a_core"] for v in per.values()), 1),
            "pss_mib": round(sum(v["pss_mib"] for v in per.values()), 1)}


def latency(lab: LabCluster, requests: int) -> dict[str, Any]:
    view = lab.view()
    primary = view["database"]["primary"]
    replica = next(m["name"] for m in view["members"] if m["name"] != primary)
    r = lab.run(primary, [sys.executable, "-c", FAKE_NODES], timeout=600)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = {"primary_node": primary, "replica_node": replica}
    for role, node in (("via_primary", primary), ("via_replica", replica)):
        r = lab.run(node, [sys.executable, "-c", LATENCY, str(requests)], timeout=600)
        assert r.returncode == 0, r.stderr
        out[role] = json.loads(r.stdout)
    path = "/api/v1/nodes?limit=100"
    out["replica_over_primary_nodes_median"] = round(out["via_replica"][path]["median_ms"]
                                                     / out["via_primary"][path]["median_ms"], 2)
    return out


def failover_round(lab: LabCluster, i: int) -> dict[str, Any]:
    view = lab.view()
    primary = view["database"]["primary"]
    etcd_leader = view["etcd"]["leader"]
    survivor = next(m["name"] for m in view["members"] if m["name"] != primary)
    writer = lab.writer(survivor, f"bench{i}", interval=0.1, seconds=45)
    time.sleep(5)
    killed = time.time()
    ops.kill(primary, lab.dir)
    writes = lab.writes(writer)
    after = [w for w in writes if w["ok"] and w["wall"] > killed]
    acked = {w["name"] for w in writes if w["ok"]}
    names = {p["name"] for p in lab.cairn(survivor, "get", "projects")}
    lost = sorted(acked - names)
    ops.heal(lab.dir)
    lab.wait_healthy(timeout=300)
    return {"killed": primary, "etcd_leader_was": etcd_leader, "writer_on": survivor,
            "unavailable_seconds": round(after[0]["wall"] - killed, 2) if after else None,
            "acknowledged": len(acked), "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--keep", action="store_true", help="leave the lab running")
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="cairn-lab-bench-"))
    load = os.getloadavg()
    result: dict[str, Any] = {"machine_load_at_start": [round(x, 2) for x in load]}
    t0 = time.monotonic()
    try:
        ops.up(3, d, osd_size=4 << 30, timeout=900, progress=lambda m: print(f"==> {m}", file=sys.stderr))
        result["bring_up_seconds"] = round(time.monotonic() - t0, 1)
        print(f"bring-up: {result['bring_up_seconds']} s", file=sys.stderr)
        lab = LabCluster(d)
        time.sleep(20)
        result["idle"] = idle(lab)
        print(f"idle: {result['idle']}", file=sys.stderr)
        rounds = [failover_round(lab, i) for i in range(args.rounds)]
        times = [r["unavailable_seconds"] for r in rounds if r["unavailable_seconds"] is not None]
        result["failover"] = {"rounds": rounds, "median_seconds": round(statistics.median(times), 2) if times else None,
                              "worst_seconds": max(times) if times else None,
                              "lost_writes": sum(len(r["lost"]) for r in rounds)}
        print(f"failover: {result['failover']}", file=sys.stderr)
        result["latency"] = latency(lab, args.requests)
        result["machine_load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not args.keep:
            ops.down(d)
    out = ROOT / "bench" / "cluster_bench.result.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    lab_note = Lab.load(d).dir if args.keep else "removed"
    print(f"lab: {lab_note}", file=sys.stderr)


if __name__ == "__main__":
    main()
