"""The console with 1000 VMs and 1000 containers in the database (issue 16 item 6): how
long until the dashboard, the VM list and a name filter on it are usable, in a real
browser (Debian's Chromium through Playwright) against a real cairn-api (uvicorn, SQLite,
Redis for the live feed). The baseline, measured in the same run, is the same pages of an
appliance with no instances; the target is under 1 s each.

    .venv/bin/python bench/console_scale.py [--rounds 5] [--instances 1000]

Prints the median per page and case and the ratio to the baseline; writes
bench/results/console_scale.json."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.db.engine import session_scope  # noqa: E402
from appliance.db.models import Instance, Node, Project  # noqa: E402
from appliance.processes import prepare  # noqa: E402
from appliance.services import nodes  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from tests.e2e.browser import launch, sign_in  # noqa: E402
from tests.services import free_port, redis_server  # noqa: E402

INVENTORY: dict[str, Any] = {
    "cpu_model": "AMD EPYC 9654", "cores": 96, "threads": 192, "numa_nodes": 4, "memory_bytes": 768 << 30,
    "disks": [], "nics": [], "virt_type": "kvm", "kernel": "6.1.0",
}
TARGET_S = 1.0


class Console:
    def __init__(self, url: str, password: str) -> None:
        self.url, self.password = url, password


def seed(url: str, instances: int) -> None:
    """Ten nodes and ``instances`` VMs and as many containers spread over them (rows as the
    scheduler and the agents leave them: placed, active, running)."""
    with session_scope(url) as session:
        names = [f"node-{i:02d}" for i in range(10)]
        for name in names:
            nodes.register(session, name, INVENTORY, {"cpu": 192, "memory_bytes": 760 << 30})
    if not instances:
        return
    with session_scope(url) as session:
        project = session.query(Project).filter_by(name="default").one()
        node_ids = [n.id for n in session.query(Node).all()]
        for kind, image in (("vm", "tiny-guest"), ("container", "busybox")):
            for i in range(instances):
                session.add(Instance(
                    name=f"{kind}-{i:04d}", kind=kind, project_id=project.id, node_id=node_ids[i % len(node_ids)],
                    vm_state="active" if i % 10 else "stopped", power_state="running" if i % 10 else "shutdown",
                    spec={"image": image, "cpu": 1, "memory_bytes": 256 << 20, "networks": [],
                          "initial_power": "running"},
                    status={"node": f"node-{i % len(node_ids):02d}", "vm_state": "active", "power_state": "running",
                            "ports": []}))


def start(stack: ExitStack, tmp: Path, label: str, instances: int) -> Console:
    data = tmp / label
    url = f"sqlite:///{data / 'cairn.db'}"
    settings = Settings(data_dir=data, database_url=url, node_name="node-00")
    password = prepare(settings)
    assert password
    seed(url, instances)
    redis_url = stack.enter_context(redis_server())
    port = free_port()
    env = {**os.environ, "CAIRN_DATA_DIR": str(data), "CAIRN_DATABASE_URL": url, "CAIRN_REDIS_URL": redis_url,
           "CAIRN_NODE_NAME": "node-00", "CAIRN_NODE_GRACE_SECONDS": "86400", "CAIRN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.processes", "api", "--host", "127.0.0.1", "--port",
                             str(port), "--insecure-http"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait(10)))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                return Console(base, password)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the API of case {label} did not start")


def timed(page: Page, go: Callable[[], None], ready: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    go()
    ready()
    return time.perf_counter() - t0


def measure(page: Page, console: Console, instances: int, rounds: int) -> dict[str, float]:
    sign_in(page, console)
    total = str(instances)
    # one name out of the middle of the list: the filter must go to the server to find it
    wanted = f"vm-{instances // 2:04d}" if instances else "vm-none"

    def dashboard_ready() -> None:
        expect(page.get_by_test_id("workloads").locator("dd").first).to_have_text(total)
        expect(page.get_by_test_id("nodes-ready")).to_contain_text("node")

    def list_ready() -> None:
        if instances:
            expect(page.get_by_role("row").filter(has_text="vm-0000")).to_have_count(1)
        else:
            expect(page.get_by_text("No VMs yet.")).to_be_visible()

    def filter_ready() -> None:
        if instances:
            expect(page.get_by_role("row").filter(has_text=wanted)).to_have_count(1)
            expect(page.get_by_role("row").filter(has_text=re.compile(r"vm-0000"))).to_have_count(0)
        else:
            expect(page.get_by_text("No VMs match.")).to_be_visible()

    samples: dict[str, list[float]] = {"dashboard": [], "vm_list": [], "vm_filter": []}
    for _ in range(rounds + 1):  # the first round warms caches and is dropped
        d = timed(page, lambda: page.goto(console.url + "/"), dashboard_ready)
        v = timed(page, lambda: page.get_by_role("navigation", name="Main").get_by_role(
            "link", name="VMs", exact=True).click(), list_ready)
        f = timed(page, lambda: page.get_by_role("searchbox", name="Find VMs by name").fill(wanted), filter_ready)
        for key, value in (("dashboard", d), ("vm_list", v), ("vm_filter", f)):
            samples[key].append(value)
    return {k: round(statistics.median(v[1:]), 3) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=1000)
    args = parser.parse_args()
    assert (ROOT / "webui" / "dist" / "index.html").is_file(), "build the console first (./bootstrap.sh install)"
    results: dict[str, Any] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="cairn-bench-console-") as tmp_dir:
        tmp = Path(tmp_dir)
        cases = {"baseline (no instances)": start(stack, tmp, "empty", 0),
                 f"{args.instances} VMs + {args.instances} containers": start(stack, tmp, "full", args.instances)}
        with sync_playwright() as pw:
            context = launch(pw, tmp / "chromium-profile")
            try:
                for (label, console), count in zip(cases.items(), (0, args.instances), strict=True):
                    page = context.new_page()
                    results[label] = measure(page, console, count, args.rounds)
                    page.close()
                    context.clear_cookies()
            finally:
                context.close()
    base, full = results.values()
    report = {"cases": results, "ratio_to_baseline": {k: round(full[k] / max(base[k], 1e-3), 2) for k in full},
              "target_s": TARGET_S, "under_target": all(v < TARGET_S for v in full.values()),
              "rounds": args.rounds, "instances_per_kind": args.instances}
    print(f"{'page':<12} " + " ".join(f"{label:>34}" for label in results) + f" {'ratio':>7}")
    for key in full:
        print(f"{key:<12} " + " ".join(f"{r[key]:>33.3f}s" for r in results.values())
              + f" {report['ratio_to_baseline'][key]:>6.2f}x")
    print(f"all under {TARGET_S} s: {report['under_target']}")
    out = ROOT / "bench" / "results" / "console_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
