"""GET /api/v1/nodes latency with 1000 nodes in the table, against a real cairn-api
(uvicorn, TLS, token auth) on SQLite and on PostgreSQL, with /api/v1/health
(no auth, one trivial query) measured in the same run as the baseline.

    .venv/bin/python bench/api_latency.py [--requests 500]

Prints median / p99 per case and the ratio to the baseline; writes
bench/results/api_latency.json."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import pki  # noqa: E402
from appliance.db.engine import session_scope  # noqa: E402
from appliance.processes import prepare  # noqa: E402
from appliance.services import auth, nodes  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from tests.services import create_pg_database, free_port, postgres_server  # noqa: E402

INVENTORY: dict[str, Any] = {
    "cpu_model": "AMD EPYC 9654", "cores": 96, "threads": 192, "numa_nodes": 4, "memory_bytes": 768 << 30,
    "disks": [{"name": f"nvme{i}n1", "size_bytes": 7680 << 30, "model": "NVMe", "rotational": False}
              for i in range(4)],
    "nics": [{"name": f"ens{i}", "mac": f"02:00:00:00:00:0{i}", "mtu": 9000, "speed_mbps": 100000,
              "addresses": []} for i in range(2)],
    "virt_type": "kvm", "kernel": "6.1.0",
}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def measure(client: httpx.Client, path: str, n: int) -> dict[str, float]:
    for _ in range(20):  # warm-up
        client.get(path).raise_for_status()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(path).raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(samples), 2), "p99_ms": round(percentile(samples, 99), 2)}


def run_case(label: str, url: str, tmp: Path, n: int) -> dict[str, Any]:
    settings = Settings(data_dir=tmp / label, database_url=url, node_name="bench")
    prepare(settings)
    with session_scope(url) as session:
        for i in range(1000):
            nodes.register(session, f"node-{i:04d}", INVENTORY, {"cpu": 192, "memory_bytes": 760 << 30})
        admin = auth.principal_for(session, auth._user(session, "admin"), "token")
        token = auth.create_token(session, admin, "bench", None)["token"]
    ca, _, _ = pki.ensure(settings.pki_dir)
    port = free_port()
    env = {**os.environ, "CAIRN_DATA_DIR": str(settings.data_dir), "CAIRN_DATABASE_URL": url,
           "CAIRN_API_PORT": str(port), "CAIRN_API_HOST": "127.0.0.1", "CAIRN_NODE_NAME": "bench",
           "CAIRN_NODE_GRACE_SECONDS": "86400", "CAIRN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.processes", "api"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=str(ca),
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get("/api/v1/health").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        result = {
            "baseline_health": measure(client, "/api/v1/health", n),
            "nodes_page_100": measure(client, "/api/v1/nodes", n),
            "nodes_all_1000": measure(client, "/api/v1/nodes?limit=1000", max(50, n // 10)),
        }
        total = len(client.get("/api/v1/nodes?limit=1000").json()["items"])
        assert total == 1000, total
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    base = result["baseline_health"]["median_ms"]
    for key in ("nodes_page_100", "nodes_all_1000"):
        result[key]["ratio_to_health"] = round(result[key]["median_ms"] / base, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp, ExitStack() as stack:
        results["sqlite"] = run_case("sqlite", f"sqlite:///{tmp}/cairn.db", Path(tmp), args.requests)
        server = stack.enter_context(postgres_server())
        results["postgresql"] = run_case("postgresql", create_pg_database(server, "bench"), Path(tmp),
                                         args.requests)
    for db, res in results.items():
        for case, fig in res.items():
            extra = f"  ratio vs health {fig['ratio_to_health']}" if "ratio_to_health" in fig else ""
            print(f"{db:10s} {case:16s} median {fig['median_ms']:7.2f} ms  p99 {fig['p99_ms']:7.2f} ms{extra}")
    out = ROOT / "bench" / "results" / "api_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
