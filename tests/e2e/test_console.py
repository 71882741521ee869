"""The web console in a real browser (Debian's Chromium, driven by Playwright) against
the real appliance processes: API (serving webui/dist), node agent, worker and Redis.

Screenshots go to ``$CAIRN_E2E_SHOTS`` (default: ``tests/artifacts/``, ignored by git,
beside the lab's console screenshots); the path is printed.
VMs and containers in the console are in ``test_instances.py``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, expect

from appliance.settings import Settings
from network.model import HostNames
from tests.e2e.browser import launch, sign_in
from tests.services import free_port, redis_server

CAIRN = [sys.executable, "-m", "appliance.cli.main"]

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "webui" / "dist"


@dataclass
class Appliance:
    url: str
    password: str
    node: str
    logs: Path
    api: httpx.Client  # logged in as admin, for checking what the console shows

    def log_tail(self) -> str:
        out = []
        for log in sorted(self.logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)


def _wait_for(predicate: Callable[[], Any], seconds: float, what: str, logs: Path) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n{tails}")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    assert (DIST / "index.html").is_file(), (
        f"the console is not built ({DIST}/index.html is missing): run ./bootstrap.sh install "
        "(or `npm ci && npm run build` in webui/)"
    )
    data = tmp_path_factory.mktemp("appliance")
    logs = data / "log"
    logs.mkdir()
    port = free_port()
    node = "e2e-node"
    procs: list[subprocess.Popen[bytes]] = []
    with redis_server() as redis_url:
        # No compute drivers: the console needs a node's inventory and heartbeats, not libvirt or crun.
        env = {**os.environ, "CAIRN_DATA_DIR": str(data), "CAIRN_REDIS_URL": redis_url, "CAIRN_NODE_NAME": node,
               "CAIRN_WORKER_CONCURRENCY": "2", "CAIRN_VM_DRIVER": "none", "CAIRN_CONTAINER_DRIVER": "none"}

        def start(*argv: str) -> None:
            log = (logs / f"{argv[0]}.log").open("wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "appliance.processes", *argv], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        try:
            start("api", "--host", "127.0.0.1", "--port", str(port), "--insecure-http")
            url = f"http://127.0.0.1:{port}"
            _wait_for(lambda: httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200, 60, "the API", logs)
            start("agent")
            start("worker")
            password = (data / "secrets" / "admin-password").read_text().strip()
            with httpx.Client(base_url=f"{url}/api/v1", timeout=10) as api:
                r = api.post("/auth/login", json={"username": "admin", "password": password})
                assert r.status_code == 200, r.text
                # The session cookie is Secure: httpx will not send it over http, so use the header form.
                api.headers["Cookie"] = f"cairn_session={r.cookies['cairn_session']}"
                api.headers["X-CSRF-Token"] = r.json()["csrf_token"]

                def node_ready() -> bool:
                    items = api.get("/nodes").json()["items"]
                    return any(n["name"] == node and n["status"].get("phase") == "Ready" for n in items)

                _wait_for(node_ready, 60, f"node {node} to register and turn Ready", logs)
                yield Appliance(url, password, node, logs, api)
        finally:
            _stop(procs)
            # what the agent made on the host (its stack's nftables tables, bridges) goes with it
            subprocess.run([*CAIRN, "down", "--output", "json"], env=env, capture_output=True, timeout=120,
                           check=False)
            names = HostNames(Settings(data_dir=data).stack_tag)
            tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
            assert names.sg_table not in tables.split(), f"`cairn down` left {names.sg_table}: {tables}"


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield context
    finally:
        context.close()


def test_wrong_password_shows_the_apis_problem_detail(browser: BrowserContext, page: Page,
                                                      appliance: Appliance, shots: Path) -> None:
    browser.clear_cookies()
    detail = httpx.post(f"{appliance.url}/api/v1/auth/login",
                        json={"username": "admin", "password": "not-the-password"}).json()["detail"]
    page.goto(appliance.url + "/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Sign-in failed")
    expect(alert).to_contain_text(detail)
    expect(page.get_by_role("navigation", name="Main")).to_have_count(0)
    page.screenshot(path=shots / "login-wrong-password.png")


def test_login_shows_the_dashboard_with_the_node_count(browser: BrowserContext, page: Page,
                                                        appliance: Appliance, shots: Path) -> None:
    browser.clear_cookies()
    sign_in(page, appliance)
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()
    status = appliance.api.get("/cluster/status").json()
    assert status["nodes"] == {**status["nodes"], "total": 1, "ready": 1}
    expect(page.get_by_test_id("nodes-ready")).to_have_text(re.compile(r"1\s*of\s*1\s*node ready"))
    expect(page.get_by_role("img", name="ready: 1 of 1")).to_be_visible()
    expect(page.get_by_role("img", name=re.compile(r"^Memory: "))).to_be_visible()
    expect(page.get_by_role("link", name=re.compile(appliance.node))).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("Live")  # the SSE stream is connected
    page.screenshot(path=shots / "dashboard.png", full_page=True)


def test_nodes_page_lists_the_node_and_its_detail_shows_the_inventory(page: Page, appliance: Appliance,
                                                                      shots: Path) -> None:
    sign_in(page, appliance)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Nodes").click()
    expect(page.get_by_role("heading", name="Nodes", level=1)).to_be_visible()
    row = page.get_by_role("row").filter(has_text=appliance.node)
    expect(row).to_contain_text("Ready")
    row.get_by_role("link", name=appliance.node).click()
    expect(page).to_have_url(f"{appliance.url}/nodes/{appliance.node}")
    inventory = appliance.api.get(f"/nodes/{appliance.node}").json()["status"]["inventory"]
    expect(page.get_by_role("heading", name=appliance.node, level=1)).to_be_visible()
    expect(page.locator(".kv")).to_contain_text(inventory["cpu_model"])
    expect(page.locator(".kv")).to_contain_text(inventory["kernel"])
    disks = page.get_by_role("region", name="Disks")
    for disk in inventory["disks"]:
        expect(disks).to_contain_text(disk["name"])
    nics = page.get_by_role("region", name="Network interfaces")
    for nic in inventory["nics"]:
        expect(nics).to_contain_text(nic["name"])
    page.screenshot(path=shots / "node-detail.png", full_page=True)


def test_benchmark_progress_is_live_on_the_node_and_tasks_pages(page: Page, appliance: Appliance,
                                                                shots: Path) -> None:
    sign_in(page, appliance, f"/nodes/{appliance.node}")
    page.get_by_role("button", name="Run benchmark").click()
    bar = page.get_by_role("progressbar", name="Benchmark progress")
    expect(bar).to_be_visible()
    # Progress arrives over server-sent events while the task runs on the worker.
    expect(bar).not_to_have_attribute("aria-valuenow", "0", timeout=30_000)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Tasks").click()
    expect(page.get_by_role("heading", name="Tasks", level=1)).to_be_visible()
    row = page.get_by_role("row").filter(has_text="node.benchmark")
    expect(row).to_have_count(1)
    task_bar = row.get_by_role("progressbar")
    expect(task_bar).to_be_visible()
    if "running" in row.inner_text():
        page.screenshot(path=shots / "tasks-running.png")
    expect(row).to_contain_text("succeeded", timeout=60_000)
    expect(task_bar).to_have_attribute("aria-valuenow", "100")
    page.screenshot(path=shots / "tasks.png")
    tasks = appliance.api.get("/tasks").json()["items"]
    assert [t["state"] for t in tasks if t["name"] == "node.benchmark"] == ["succeeded"]


def test_events_feed_and_users_page(page: Page, appliance: Appliance, shots: Path) -> None:
    sign_in(page, appliance, "/events")
    expect(page.get_by_role("heading", name="Events", level=1)).to_be_visible()
    expect(page.get_by_role("status")).to_have_text("Live")
    # A change made now (a node relabel through the API) shows up in the feed without a reload.
    node = appliance.api.get(f"/nodes/{appliance.node}").json()
    r = appliance.api.patch(f"/nodes/{appliance.node}", json={"spec": {"labels": {"e2e": "yes"}}},
                            headers={"If-Match": str(node["generation"])})
    assert r.status_code == 200, r.text
    expect(page.locator(".feed-item").filter(has_text=appliance.node).first).to_contain_text("updated")
    page.screenshot(path=shots / "events.png")
    page.get_by_role("link", name="Users & projects").click()
    expect(page.get_by_role("region", name="Users")).to_contain_text("admin")
    expect(page.get_by_role("region", name="Projects")).to_contain_text("default")


def test_menus_show_only_what_the_api_offers(page: Page, appliance: Appliance) -> None:
    sign_in(page, appliance)
    paths = appliance.api.get("/openapi.json").json()["paths"]
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Tasks")).to_be_visible()
    for path, title in (("/api/v1/vms", "VMs"), ("/api/v1/networks", "Networks"), ("/api/v1/volumes", "Volumes")):
        expect(nav.get_by_role("link", name=title, exact=True)).to_have_count(1 if path in paths else 0)


def test_unknown_page_and_sign_out(page: Page, appliance: Appliance) -> None:
    sign_in(page, appliance, "/no-such-page")
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Password")).to_be_visible()
    assert appliance.api.get("/auth/me").status_code == 200  # only the browser's session ended


def test_a_project_viewer_gets_no_cluster_pages_and_sees_the_refusal(browser: BrowserContext, page: Page,
                                                                      appliance: Appliance, shots: Path) -> None:
    password = "viewer-password-e2e"
    r = appliance.api.post("/users", json={"name": "e2e-viewer", "password": password})
    assert r.status_code in (200, 201), r.text
    r = appliance.api.put("/projects/default/members/e2e-viewer", json={"role": "viewer"})
    assert r.status_code == 200, r.text
    browser.clear_cookies()
    try:
        page.goto(appliance.url + "/")
        page.get_by_label("User name").fill("e2e-viewer")
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        nav = page.get_by_role("navigation", name="Main")
        expect(nav.get_by_role("link", name="Tasks")).to_be_visible()
        expect(nav.get_by_role("link", name="Nodes")).to_have_count(0)
        expect(page.get_by_test_id("nodes-ready")).to_have_text(re.compile(r"1\s*of\s*1\s*node ready"))
        expect(page.get_by_role("alert")).to_have_count(0)
        # A typed-in URL the API refuses shows the API's reason, not a blank page.
        page.goto(appliance.url + "/nodes")
        expect(page.get_by_role("alert")).to_contain_text("403")
        page.screenshot(path=shots / "viewer-refused.png")
        # A viewer sees no button it cannot use: no create, upload or allocate on any page.
        for path, heading in (("/vms", "VMs"), ("/containers", "Containers"), ("/volumes", "Volumes"),
                              ("/images", "Images"), ("/routers", "Routers"), ("/floating-ips", "Floating IPs")):
            page.goto(appliance.url + path)
            expect(page.get_by_role("heading", name=heading, level=1)).to_be_visible()
            expect(page.get_by_role("alert")).to_have_count(0)
            expect(page.locator("main button.primary, main button.danger, .page-header button")).to_have_count(0)
        page.screenshot(path=shots / "viewer-floating-ips.png")  # the last page of the loop
    finally:
        browser.clear_cookies()


def test_an_injected_inline_script_does_not_run(page: Page, appliance: Appliance) -> None:
    """The attack a Content-Security-Policy stops: markup that reaches the page (say, a
    name rendered as HTML) carrying an inline script or an event handler. Chromium must
    refuse both and report the violations."""
    sign_in(page, appliance)
    page.evaluate("""() => {
        window.__violations = [];
        document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));
        const s = document.createElement('script');
        s.textContent = 'window.__pwned = 1';
        document.body.appendChild(s);
        const div = document.createElement('div');
        div.innerHTML = '<img src="data:," onerror="window.__pwned2 = 1">';
        document.body.appendChild(div);
    }""")
    page.wait_for_function("() => window.__violations.length >= 2")
    assert page.evaluate("() => [window.__pwned, window.__pwned2]") == [None, None]
    assert all(v.startswith("script-src") for v in page.evaluate("() => window.__violations"))
