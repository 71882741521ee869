"""VMs and containers in the web console, in a real browser (Debian's Chromium through
Playwright) against the appliance as a user runs it: `cairn up` (supervisor, HTTPS,
Redis, API, worker, agent, this node's own libvirtd; guests under TCG where KVM is
missing) and `cairn down`.

A person's path: create from the dialog, watch the task's progress bar, see the guest
Running with its address, read the boot marker in the serial console (xterm.js), see the
screen in the VNC console (noVNC), paste into the serial console, Ctrl-Alt-Del from the VNC
console, a .vv file for remote-viewer (opened with vncsnapshot), the history graphs, type in
a container's terminal, stop / start, delete; upload an image, a router with a port
forward, floating IPs, storage pools, the node's graphs and the cluster page.
Whatever a failed test leaves behind is deleted through the API before `cairn down`.
Screenshots go to ``$CAIRN_E2E_SHOTS`` (see ``conftest.py``)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, Playwright, expect

from tests.e2e.browser import launch, sign_in
from tests.e2e.browser_netns import isolated_chromium
from tests.services import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "webui" / "dist"
CAIRN = [sys.executable, "-m", "appliance.cli.main"]
BOOT_MS = 120_000  # create + boot under TCG emulation: seconds here, more on a loaded machine
NETWORK, CIDR = "e2e-lab", "10.213.7.0/24"
VM, CONTAINER, VOLUME, CT_VOLUME = "e2e-vm", "e2e-sh", "e2e-data", "e2e-ctdata"
IMAGE, ROUTER, FIP = "e2e-upload", "e2e-gw", "e2e-fip"
# Routers get external addresses from TEST-NET-2; the stack has no external interface, so
# nothing reaches the host's network (the data path is tests/appliance/test_router_live.py).
EXTERNAL_CIDR, EXTERNAL_POOL = "198.51.100.0/24", "198.51.100.10-198.51.100.20"


@dataclass
class Stack:
    url: str
    password: str
    node: str
    env: dict[str, str]
    logs: Path  # the appliance's process logs (copied to pytest's temp dirs at the end)
    api: httpx.Client  # the CLI's admin token, for setup, checks and cleanup


def cairn(env: dict[str, str], *args: str) -> Any:
    r = subprocess.run([*CAIRN, *args, "--output", "json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"cairn {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}"
    return json.loads(r.stdout) if r.stdout.strip() else None


def wait_for(predicate: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def finish(api: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    task = wait_for(lambda: (t := api.get(f"/tasks/{task_id}").json())["state"] not in ("pending", "running") and t,
                    180, f"task {task_id}")
    assert task["state"] == "succeeded", task
    return task  # type: ignore[no-any-return]


def remove_leftovers(api: httpx.Client) -> None:
    """Delete every instance, volume and network (the agent removes domains, containers and
    bridges; the storage daemon the volumes' data)."""
    for fip in api.get("/floating-ips").json()["items"]:
        api.delete(f"/floating-ips/{fip['name']}", params={"project": fip["project"]})
    for router in api.get("/routers").json()["items"]:
        api.delete(f"/routers/{router['name']}", params={"project": router["project"]})
    for image in api.get("/images").json()["items"]:
        if image["name"] == IMAGE:
            api.delete(f"/images/{image['name']}", params={"project": image["project"]})
    for kind in ("vms", "containers"):
        for item in api.get(f"/{kind}", params={"limit": 500}).json()["items"]:
            api.delete(f"/{kind}/{item['name']}", params={"project": item["project"]})
    for kind in ("vms", "containers"):
        wait_for(lambda k=kind: not api.get(f"/{k}").json()["items"], 180, f"the {kind} to be deleted")
    for vol in api.get("/volumes").json()["items"]:
        api.delete(f"/volumes/{vol['name']}", params={"project": vol["project"]})
    wait_for(lambda: not api.get("/volumes").json()["items"], 120, "the volumes to be deleted")
    for net in api.get("/networks").json()["items"]:
        api.delete(f"/networks/{net['name']}", params={"project": net["project"]})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert (DIST / "index.html").is_file(), (
        f"the console is not built ({DIST}/index.html is missing): run ./bootstrap.sh install "
        "(or `npm ci && npm run build` in webui/)"
    )
    # Short: unix socket paths under the data dir (a container's console socket) must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="cairn-e2e-", dir="/tmp"))
    kept_logs = tmp_path_factory.mktemp("compute-appliance-logs")
    pid = os.getpid()
    env = {
        **os.environ,
        "CAIRN_DATA_DIR": str(root / "data"),
        "CAIRN_CONFIG": str(root / "cli.json"),
        "CAIRN_API_HOST": "127.0.0.1",
        "CAIRN_API_PORT": str(free_port()),
        "CAIRN_NODE_NAME": f"e2e-{pid}",
        # Bridges are named after VNIs: keep clear of other test appliances on this machine.
        "CAIRN_VNI_RANGE": f"{60000 + pid % 5000 * 10}-{60009 + pid % 5000 * 10}",
        "CAIRN_EXTERNAL_CIDR": EXTERNAL_CIDR,
        "CAIRN_EXTERNAL_POOL": EXTERNAL_POOL,
    }
    api: httpx.Client | None = None
    try:
        info = cairn(env, "up", "--timeout", "180")
        assert info["phase"] == "Ready", info
        cli = json.loads((root / "cli.json").read_text())
        api = httpx.Client(base_url=cli["url"] + "/api/v1", timeout=30,
                           verify=ssl.create_default_context(cafile=cli["ca_file"]),
                           headers={"Authorization": f"Bearer {cli['token']}"})
        finish(api, api.post("/images/import-test-guest"))
        r = api.post("/networks", json={"name": NETWORK, "spec": {"cidr": CIDR}})
        assert r.status_code == 201, r.text
        password = Path(info["password_file"]).read_text().strip()
        yield Stack(cli["url"], password, info["node"], env, Path(info["logs"]), api)
    finally:
        try:
            if api is not None:
                remove_leftovers(api)
        finally:
            if api is not None:
                api.close()
            supervisor = root / "data" / "run" / "supervisor.pid"
            subprocess.run([*CAIRN, "down", "--output", "json"], env=env, capture_output=True, timeout=120)
            try:  # belt and braces: never leave a supervisor behind
                os.kill(int(supervisor.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            if (root / "data" / "log").is_dir():
                shutil.copytree(root / "data" / "log", kept_logs, dirs_exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(playwright: Playwright, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    # Its own network namespace: guests' taps and veths coming and going abort Chromium's requests.
    with isolated_chromium(urlsplit(stack.url).port or 443) as chromium:
        # The appliance's certificate is signed by its own fresh CA, which this profile does not know.
        context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"), chromium, ignore_https_errors=True)
        try:
            yield context
        finally:
            context.close()


def open_kind(page: Page, stack: Stack, title: str) -> None:
    sign_in(page, stack)
    page.get_by_role("navigation", name="Main").get_by_role("link", name=title, exact=True).click()
    expect(page.get_by_role("heading", name=title, level=1)).to_be_visible()


def create_in_dialog(page: Page, one: str, fill: Callable[[Locator], None]) -> None:
    page.get_by_role("button", name=f"Create {one}").first.click()
    dialog = page.get_by_role("dialog", name=f"Create {one}")
    expect(dialog).to_be_visible()
    fill(dialog)
    dialog.get_by_role("button", name=f"Create {one}").click()
    expect(dialog).to_have_count(0)


def power_badge(page: Page) -> Locator:
    return page.locator(".page-header .badge").first


def task_card(page: Page) -> Locator:
    return page.get_by_role("region", name=re.compile(r"^instance\."))


def terminal_text(terminal: Locator) -> str:
    return terminal.locator(".xterm-rows").inner_text().replace("\xa0", " ")


def find_in_console(page: Page, console: Locator, text: str, seconds: float) -> None:
    """Wait for `text` in the terminal with the console's Find box, as a person would: xterm.js
    draws only the rows in view, and the guest keeps printing heartbeats after its marker."""
    terminal = console.get_by_test_id("terminal")
    find = console.get_by_role("searchbox", name="Find in the console")
    find.fill(text)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        find.press("Enter")  # from the newest line backwards; scrolls the match into view
        page.wait_for_timeout(300)
        if text in terminal_text(terminal):
            return
        page.wait_for_timeout(1000)  # not printed yet: the guest is still booting
    page.screenshot(path=Path(os.environ.get("CAIRN_E2E_SHOTS", "/tmp")) / "terminal-failed.png")
    raise AssertionError(f"{text!r} never showed in the terminal; it shows:\n{terminal_text(terminal)}")


def canvas_has_a_picture(page: Page) -> bool:
    """The noVNC canvas has a size and more than one colour (the guest's screen drew on it)."""
    return bool(page.evaluate("""() => {
        const c = document.querySelector('[data-testid="vnc-screen"] canvas');
        if (!c || !c.width || !c.height) return false;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 4; i < d.length; i += 4)
            if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
        return false;
    }"""))


def delete_from_detail(page: Page, stack: Stack, kind: str, one: str, many: str, name: str) -> None:
    page.get_by_role("group", name=f"{one} actions").get_by_role("button", name="Delete").click()
    confirm = page.get_by_role("dialog", name=f"Delete {one} {name}?")
    confirm.get_by_role("button", name="Delete").click()
    # Back on the list, which drops the row when the delete task has removed it.
    expect(page).to_have_url(f"{stack.url}/{kind}")
    wait_for(lambda: not stack.api.get(f"/{kind}").json()["items"], BOOT_MS / 1000, f"the {one} to be deleted")
    expect(page.get_by_text(f"No {many} yet.")).to_be_visible()
    expect(page.get_by_role("row").filter(has_text=name)).to_have_count(0)


def test_a_vm_created_in_the_dialog_boots_and_its_consoles_keys_vv_file_and_graphs_work(
        page: Page, stack: Stack, shots: Path, tmp_path: Path) -> None:
    open_kind(page, stack, "VMs")

    def fill(dialog: Locator) -> None:
        dialog.get_by_label("Name").fill(VM)
        expect(dialog.get_by_label("Image")).to_have_value("tiny-guest")
        dialog.get_by_label("vCPUs").fill("1")
        dialog.get_by_label("Memory", exact=True).fill("256")
        dialog.get_by_role("group", name="Networks").get_by_label(NETWORK).check()
        page.screenshot(path=shots / "vm-create-dialog.png")

    create_in_dialog(page, "VM", fill)
    # The detail page follows the create task: schedule → volumes → ports → define → start.
    expect(page).to_have_url(f"{stack.url}/vms/{VM}")
    expect(page.get_by_role("progressbar", name="Task progress")).to_be_visible()
    expect(task_card(page)).to_contain_text("succeeded", timeout=BOOT_MS)
    expect(power_badge(page)).to_have_text("running")
    vm = stack.api.get(f"/vms/{VM}").json()
    assert (vm["status"]["vm_state"], vm["status"]["power_state"]) == ("active", "running")
    address = vm["status"]["ports"][0]["ips"][0]["address"]
    assert address.startswith("10.213.7.")
    expect(page.get_by_role("region", name="Network interfaces")).to_contain_text(address)
    page.screenshot(path=shots / "vm-detail.png", full_page=True)

    page.get_by_role("navigation", name="Main").get_by_role("link", name="VMs", exact=True).click()
    row = page.get_by_role("row").filter(has_text=VM)
    for text in ("default", stack.node, "running", "active", "256 MiB", address, "tiny-guest"):
        expect(row).to_contain_text(text)
    page.screenshot(path=shots / "vms.png")

    # Serial console: the boot messages (the marker the tiny guest prints), live in xterm.js.
    row.get_by_role("link", name=VM).click()
    page.get_by_role("navigation", name="VM views").get_by_role("link", name="Serial console").click()
    console = page.get_by_role("region", name=f"Serial console of VM {VM}")
    expect(console.get_by_test_id("console-state")).to_have_text("Connected")
    marker = stack.api.get("/images/tiny-guest").json()["spec"]["marker"]
    find_in_console(page, console, marker, BOOT_MS / 1000)
    page.screenshot(path=shots / "vm-serial-console.png")
    paste_into_serial(page, console)
    page.screenshot(path=shots / "vm-serial-paste.png")

    # VNC console: noVNC finishes the RFB handshake and the guest's screen is drawn.
    page.get_by_role("navigation", name="VM views").get_by_role("link", name="VNC console").click()
    vnc = page.get_by_role("region", name=f"VNC console of VM {VM}")
    expect(vnc.get_by_test_id("console-state")).to_contain_text("Connected", timeout=30_000)
    wait_for(lambda: canvas_has_a_picture(page), 30, "the guest's screen on the noVNC canvas")
    page.screenshot(path=shots / "vm-vnc-console.png")
    vv_file_opens_the_screen_once(page, stack, vnc, VM, shots, tmp_path)
    ctrl_alt_del_reboots(page, stack, vnc, VM, shots)
    vm_history_has_samples(page, stack, VM, shots)

    # Lifecycle: power off and start again, each with its task's progress.
    page.get_by_role("navigation", name="VM views").get_by_role("link", name="Summary").click()
    actions = page.get_by_role("group", name="VM actions")
    actions.get_by_role("button", name="Stop").click()
    page.get_by_role("dialog", name=f"Stop VM {VM}").get_by_role("button", name="Power off").click()
    expect(task_card(page)).to_contain_text("instance.action")
    expect(power_badge(page)).to_have_text("shutdown", timeout=BOOT_MS)
    expect(actions.get_by_role("button", name="Start")).to_be_enabled()
    actions.get_by_role("button", name="Start").click()
    expect(power_badge(page)).to_have_text("running", timeout=BOOT_MS)
    expect(task_card(page)).to_contain_text("succeeded")
    page.screenshot(path=shots / "vm-restarted.png")

    delete_from_detail(page, stack, "vms", "VM", "VMs", VM)


def test_a_container_in_its_own_microvm_mounts_a_volume_and_answers_in_its_terminal(page: Page, stack: Stack,
                                                                                     shots: Path) -> None:
    finish(stack.api, stack.api.post("/volumes", json={"name": CT_VOLUME, "size": "64MiB"}))
    open_kind(page, stack, "Containers")

    def fill(dialog: Locator) -> None:
        dialog.get_by_label("Name").fill(CONTAINER)
        expect(dialog.get_by_label("Image")).to_have_value("busybox")
        dialog.get_by_label("Command").fill("sh")
        dialog.get_by_label("Interactive terminal (TTY)").check()
        expect(dialog.get_by_label("Isolation")).to_have_value("container")
        dialog.get_by_label("Isolation").select_option("vm")
        dialog.get_by_role("group", name="Volumes to mount").get_by_label(CT_VOLUME).check()
        dialog.get_by_label(f"Mount path of {CT_VOLUME}").fill("/data")
        expect(dialog.get_by_label(f"Filesystem of {CT_VOLUME}")).to_have_value("ext4")
        page.screenshot(path=shots / "container-create-dialog.png")

    create_in_dialog(page, "container", fill)
    expect(page).to_have_url(f"{stack.url}/containers/{CONTAINER}")
    expect(task_card(page)).to_contain_text("succeeded", timeout=BOOT_MS)
    expect(power_badge(page)).to_have_text("running")
    ct = stack.api.get(f"/containers/{CONTAINER}").json()
    assert (ct["spec"]["command"], ct["spec"]["tty"], ct["spec"]["isolation"]) == (["sh"], True, "vm")
    assert ct["spec"]["mounts"] == [{"volume": CT_VOLUME, "path": "/data", "fs": "ext4", "readonly": False}]
    volumes = page.get_by_role("region", name="Volumes")
    expect(volumes.get_by_role("row").filter(has_text=CT_VOLUME)).to_contain_text("/data")

    page.get_by_role("navigation", name="container views").get_by_role("link", name="Terminal").click()
    console = page.get_by_role("region", name=f"Terminal of container {CONTAINER}")
    expect(console.get_by_test_id("console-state")).to_have_text("Connected")
    terminal = console.get_by_test_id("terminal")
    terminal.click()
    page.keyboard.type("echo hi\n")
    # The shell echoes the command line; the output is a line of its own.
    rows = terminal.locator(".xterm-rows > div")
    expect(rows.filter(has_text=re.compile(r"^\s*hi\s*$"))).to_have_count(1, timeout=BOOT_MS)
    assert "echo hi" in terminal_text(terminal)
    # its own kernel's mount table: the volume, formatted on first use, at the path asked for
    page.keyboard.type("echo on-$(grep ' /data ' /proc/mounts | cut -d' ' -f3)\n")
    expect(rows.filter(has_text=re.compile(r"^\s*on-ext4\s*$"))).to_have_count(1)
    page.screenshot(path=shots / "container-terminal.png")

    page.get_by_role("navigation", name="container views").get_by_role("link", name="Summary").click()
    delete_from_detail(page, stack, "containers", "container", "containers", CONTAINER)
    wait_for(lambda: stack.api.get(f"/volumes/{CT_VOLUME}").json()["status"].get("owner") is None, 60,
             "the container's node to let go of its volume")
    assert stack.api.delete(f"/volumes/{CT_VOLUME}").status_code == 202
    wait_for(lambda: not stack.api.get("/volumes").json()["items"], 60, "the volume to be deleted")


def test_a_volume_created_in_the_dialog_takes_a_snapshot_and_is_deleted(page: Page, stack: Stack, shots: Path) -> None:
    open_kind(page, stack, "Volumes")
    page.get_by_role("button", name="Create volume").first.click()
    dialog = page.get_by_role("dialog", name="Create volume")
    dialog.get_by_label("Name").fill(VOLUME)
    dialog.get_by_label("Size", exact=True).fill("1")
    expect(dialog.get_by_label("Size unit")).to_have_value("GiB")
    expect(dialog.get_by_label("Class")).to_have_value("dedup")
    page.screenshot(path=shots / "volume-create-dialog.png")
    dialog.get_by_role("button", name="Create volume").click()
    expect(page).to_have_url(f"{stack.url}/volumes/{VOLUME}")
    card = page.get_by_role("region", name=re.compile(r"^volume\.create"))
    expect(card).to_contain_text("succeeded", timeout=60_000)
    # A bar that says 100 % is drawn full at once (it once lagged its label by an animation).
    bar = card.get_by_role("progressbar")
    expect(bar).to_have_attribute("aria-valuenow", "100")
    drawn = bar.evaluate("b => b.querySelector('.progress-fill').getBoundingClientRect().width"
                         " / b.getBoundingClientRect().width")
    assert drawn > 0.99, f"the bar says 100 % and is drawn {drawn:.0%} full"
    expect(page.locator(".page-header .badge").first).to_have_text("Available")
    volume = stack.api.get(f"/volumes/{VOLUME}").json()
    assert volume["status"]["size_bytes"] == 1 << 30
    expect(page.get_by_role("region", name="Volume", exact=True)).to_contain_text("1.0 GiB")

    actions = page.get_by_role("group", name="Volume actions")
    actions.get_by_role("button", name="Take snapshot").click()
    snap = page.get_by_role("dialog", name=f"Snapshot of {VOLUME}")
    snap.get_by_label("Snapshot name").fill("before")
    snap.get_by_role("button", name="Take snapshot").click()
    snapshots = page.get_by_role("region", name="Snapshots")
    expect(snapshots.get_by_role("row").filter(has_text="before")).to_have_count(1, timeout=60_000)
    assert [s["name"] for s in stack.api.get(f"/volumes/{VOLUME}/snapshots").json()["items"]] == ["before"]
    page.screenshot(path=shots / "volume-detail.png", full_page=True)

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Volumes", exact=True).click()
    row = page.get_by_role("row").filter(has_text=VOLUME)
    for text in ("default", "dedup", "1.0 GiB", "Available"):
        expect(row).to_contain_text(text)
    page.screenshot(path=shots / "volumes.png")
    row.get_by_role("link", name=VOLUME).click()
    actions.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog", name=f"Delete volume {VOLUME}?").get_by_role("button", name="Delete").click()
    expect(page).to_have_url(f"{stack.url}/volumes")
    wait_for(lambda: not stack.api.get("/volumes").json()["items"], 60, "the volume to be deleted")
    expect(page.get_by_text("No volumes yet.")).to_be_visible(timeout=30_000)  # the list follows the events


# --- issue 16: history graphs, console keys and paste, .vv files, storage and network pages ---

def vnc_password_file(password: str, path: Path) -> Path:
    """A vncpasswd file (the password DES-encrypted with VNC's fixed key), for vncsnapshot."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    fixed = bytes([23, 82, 107, 6, 35, 78, 88, 7])
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in fixed)  # VNC's DES takes each key byte bit-reversed
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    path.write_bytes(enc.update(password.encode()[:8].ljust(8, b"\0")) + enc.finalize())
    return path


def paste(page: Page, console: Locator, text: str) -> None:
    console.get_by_role("button", name="Paste…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Text").fill(text)
    dialog.get_by_role("button", name="Send").click()
    expect(dialog).to_have_count(0)


def graph_samples(page: Page, title: str) -> int:
    return int(page.get_by_test_id(f"graph-{title}").get_attribute("data-samples") or 0)


def wait_for_samples(page: Page, titles: tuple[str, ...], seconds: float, what: str) -> None:
    def sampled() -> bool:
        page.reload()
        expect(page.get_by_test_id(f"graph-{titles[0]}")).to_be_visible()
        return all(graph_samples(page, t) >= 2 for t in titles)

    wait_for(sampled, seconds, what)


def paste_into_serial(page: Page, serial: Locator) -> None:
    """Paste into the serial console: the guest's shell runs the pasted line (the echo of
    the typed line shows $((6*7)), only the shell's answer shows 42)."""
    paste(page, serial, "touch /tmp/first-boot && test -e /tmp/first-boot && echo pasted-$((6*7))\n")
    find_in_console(page, serial, "pasted-42", 30)


def vv_file_opens_the_screen_once(page: Page, stack: Stack, vnc: Locator, vm: str, shots: Path, tmp: Path) -> None:
    """The .vv file's fields, and its one-time ticket opens the VM's screen in another VNC
    client (vncsnapshot), once."""
    with page.expect_download() as download:
        vnc.get_by_role("button", name="Download .vv").click()
    assert download.value.suggested_filename == f"{vm}.vv"
    vv_path = tmp / "console.vv"
    download.value.save_as(vv_path)
    lines = vv_path.read_text().splitlines()
    assert lines[0] == "[virt-viewer]"
    vv = dict(line.split("=", 1) for line in lines[1:])
    assert vv["type"] == "vnc" and vv["delete-this-file"] == "1" and vm in vv["title"]
    assert vv["host"] == urlsplit(stack.url).hostname and 1024 <= int(vv["port"]) <= 65535
    assert len(vv["password"]) == 8, vv
    secret = vnc_password_file(vv["password"], tmp / "passwd")
    snap = tmp / "screen.jpg"
    viewer = subprocess.run(["vncsnapshot", "-passwd", str(secret), "-quiet", f"127.0.0.1::{vv['port']}", str(snap)],
                            capture_output=True, text=True, timeout=60)
    assert viewer.returncode == 0 and snap.stat().st_size > 1000, viewer.stderr
    picture = page.context.new_page()  # the snapshot, decoded by the browser and kept as a PNG
    picture.set_content(f'<img src="data:image/jpeg;base64,{base64.b64encode(snap.read_bytes()).decode()}">')
    assert picture.evaluate("() => document.images[0].decode().then(() => document.images[0].naturalWidth)") >= 640
    picture.locator("img").screenshot(path=shots / "vm-vv-vncsnapshot.png")
    picture.close()
    again = subprocess.run(["vncsnapshot", "-passwd", str(secret), "-quiet", f"127.0.0.1::{vv['port']}",
                            str(tmp / "again.jpg")], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0, "a .vv ticket opened the screen twice"


def ctrl_alt_del_reboots(page: Page, stack: Stack, vnc: Locator, vm: str, shots: Path) -> None:
    """Ctrl-Alt-Del from the VNC console reboots the guest (its RAM disk forgets /tmp)."""
    vnc.get_by_role("button", name="Ctrl-Alt-Del").click()
    page.get_by_role("navigation", name="VM views").get_by_role("link", name="Serial console").click()
    serial = page.get_by_role("region", name=f"Serial console of VM {vm}")
    expect(serial.get_by_test_id("console-state")).to_have_text("Connected")
    deadline = time.monotonic() + 90
    while True:  # asked again until the rebooted guest's shell answers
        serial.get_by_test_id("terminal").click()
        page.keyboard.type("test -e /tmp/first-boot || echo rebooted-$((6*7))\n")
        page.wait_for_timeout(4000)
        if "rebooted-42" in terminal_text(serial.get_by_test_id("terminal")):
            break
        assert time.monotonic() < deadline, "the guest never rebooted after Ctrl-Alt-Del"
    page.screenshot(path=shots / "vm-after-ctrl-alt-del.png")
    assert stack.api.get(f"/vms/{vm}").json()["status"]["power_state"] == "running"


def vm_history_has_samples(page: Page, stack: Stack, vm: str, shots: Path) -> None:
    """History graphs with real samples of the running VM: the agent samples every 10 s,
    the node's Prometheus scrapes them, the API reads them back, the page draws them.
    Memory is the guest's own figure (the tiny guest loads the virtio balloon driver, which
    reports it), less than it was given, apart from what QEMU holds on the host."""
    page.get_by_role("navigation", name="VM views").get_by_role("link", name="Summary").click()
    expect(page.get_by_role("region", name="History")).to_be_visible()
    wait_for_samples(page, ("CPU", "Memory", "Network", "Disk throughput"), 90, "the VM's graphs to show samples")
    expect(page.get_by_role("img", name=re.compile(r"^CPU: CPU \d"))).to_be_visible()
    # the page reads the series again every 15 s; the guest reports every 10 s once its driver is up
    memory = re.compile(r"^Memory: guest used \d.*, host resident \d.*, total 256 MiB$")
    expect(page.get_by_role("img", name=memory)).to_be_visible(timeout=60_000)
    page.screenshot(path=shots / "vm-history.png", full_page=True)
    metrics = stack.api.get(f"/vms/{vm}/metrics", params={"range": "hour"}).json()
    series = {s["name"]: s for s in metrics["series"]}
    assert {"cpu", "memory", "memory_host", "memory_total", "net_in", "net_out", "disk_read", "disk_write",
            "disk_read_iops", "disk_write_iops"} <= set(series)
    used, host, given = (series[n]["points"][-1][1] for n in ("memory", "memory_host", "memory_total"))
    assert all(series[n]["unit"] == "bytes" for n in ("memory", "memory_host", "memory_total"))
    assert 1 << 20 < used < given == 256 << 20 and host > 1 << 20, (used, host, given)
    assert series["cpu"]["unit"] == "percent" and all(0 <= v <= 100.5 for _, v in series["cpu"]["points"])
    latest = {row["name"]: row for row in _cli_rows(stack, "vm", "metrics", vm)}
    assert latest["memory"]["unit"] == "bytes" and latest["memory"]["value"] > 1 << 20
    assert latest["memory_host"]["value"] > 1 << 20 and "host" in latest["memory_host"]["label"]


def _cli_rows(stack: Stack, *args: str) -> list[dict[str, Any]]:
    """`cairn … metrics` as a person runs it (the table), and its JSON's latest values."""
    table = subprocess.run([*CAIRN, *args], env=stack.env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "SERIES" in table.stdout and "cpu" in table.stdout, table.stderr + table.stdout
    from appliance.cli.metrics import latest

    return latest(cairn(stack.env, *args))


def test_an_image_uploaded_in_the_dialog_shows_its_progress_and_is_deleted(page: Page, stack: Stack, shots: Path,
                                                                          tmp_path: Path) -> None:
    disk = tmp_path / "E2E Upload.raw"
    with disk.open("wb") as f:  # 48 MiB: distinct blocks (so the store has work) and a hole
        for _ in range(40):
            f.write(os.urandom(1 << 20))
        f.truncate(48 << 20)
    open_kind(page, stack, "Images")
    page.get_by_role("button", name="Upload image").click()
    dialog = page.get_by_role("dialog", name="Upload image")
    dialog.get_by_label("Disk image file (raw or qcow2)").set_input_files(disk)
    expect(dialog.get_by_label("Name")).to_have_value(IMAGE)  # made from the file's name
    # Every value the upload bar shows, as the browser draws it.
    page.evaluate("""() => {
        window.__upload = [];
        new MutationObserver(() => {
            const bar = document.querySelector('[role=progressbar][aria-label="Upload progress"]');
            if (bar) window.__upload.push(Number(bar.getAttribute('aria-valuenow')));
        }).observe(document.body, {subtree: true, childList: true, attributes: true,
                                   attributeFilter: ['aria-valuenow']});
    }""")
    dialog.get_by_role("button", name="Upload").click()
    expect(dialog.get_by_role("progressbar", name="Upload progress")).to_have_attribute("aria-valuenow", "100",
                                                                                       timeout=120_000)
    expect(dialog.get_by_text(re.compile(r"48(\.0)? MiB of 48(\.0)? MiB"))).to_be_visible()
    page.screenshot(path=shots / "image-upload.png")
    expect(dialog.get_by_role("progressbar", name="Import progress")).to_have_attribute("aria-valuenow", "100",
                                                                                       timeout=120_000)
    seen = page.evaluate("() => window.__upload")
    assert seen == sorted(seen) and seen[-1] == 100, seen
    dialog.get_by_role("button", name="Done").click()
    row = page.get_by_role("row").filter(has_text=IMAGE)
    for text in ("default", "disk", "raw", "48.0 MiB", "Available"):
        expect(row).to_contain_text(text)
    image = stack.api.get(f"/images/{IMAGE}").json()
    assert image["spec"]["virtual_size"] == 48 << 20, image
    page.screenshot(path=shots / "images.png")
    print(f"upload bar values seen: {seen}")

    row.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog", name=f"Delete image {IMAGE}?").get_by_role("button", name="Delete").click()
    expect(page.get_by_role("row").filter(has_text=IMAGE)).to_have_count(0, timeout=60_000)
    assert stack.api.get(f"/images/{IMAGE}").status_code == 404


def test_a_router_with_a_port_forward_and_a_floating_ip(page: Page, stack: Stack, shots: Path) -> None:
    open_kind(page, stack, "Routers")
    page.get_by_role("button", name="Create router").first.click()
    dialog = page.get_by_role("dialog", name="Create router")
    dialog.get_by_label("Name").fill(ROUTER)
    dialog.get_by_role("group", name="Networks to route").get_by_label(NETWORK).check()
    expect(dialog.get_by_label(re.compile(r"^External address"))).to_be_checked()
    dialog.get_by_role("button", name="Create router").click()
    expect(page).to_have_url(f"{stack.url}/routers/{ROUTER}")
    router = stack.api.get(f"/routers/{ROUTER}").json()
    outer = router["status"]["external_address"]
    assert outer.startswith("198.51.100."), router
    expect(page.get_by_role("region", name="Router")).to_contain_text(outer)
    expect(page.get_by_role("region", name="Networks")).to_contain_text(NETWORK)

    page.get_by_role("group", name="Router actions").get_by_role("button", name="Add port forward…").click()
    forward = page.get_by_role("dialog", name=f"Port forward on {ROUTER}")
    forward.get_by_label("External port").fill("2222")
    forward.get_by_label("or an address").fill("10.213.7.50")
    forward.get_by_label("Internal port").fill("22")
    forward.get_by_role("button", name="Add port forward").click()
    expect(forward).to_have_count(0)
    rows = page.get_by_role("region", name="Port forwards").get_by_role("row").filter(has_text="2222")
    expect(rows).to_contain_text("10.213.7.50")
    expect(rows).to_contain_text("22")
    forwards = stack.api.get(f"/routers/{ROUTER}").json()["spec"]["port_forwards"]
    assert [(f["protocol"], f["external_port"], f["internal_address"], f["internal_port"]) for f in forwards] == [
        ("tcp", 2222, "10.213.7.50", 22)], forwards
    page.screenshot(path=shots / "router-detail.png", full_page=True)

    open_kind(page, stack, "Floating IPs")
    page.get_by_role("button", name="Allocate floating IP").first.click()
    allocate = page.get_by_role("dialog", name="Allocate floating IP")
    allocate.get_by_label("Name").fill(FIP)
    allocate.get_by_role("button", name=re.compile("^Allocate")).click()
    expect(allocate).to_have_count(0)
    fip = stack.api.get(f"/floating-ips/{FIP}").json()
    row = page.get_by_role("row").filter(has_text=FIP)
    expect(row).to_contain_text(fip["status"]["address"])
    page.screenshot(path=shots / "floating-ips.png")
    row.get_by_role("button", name="Release").click()
    page.get_by_role("dialog", name=re.compile(f"{FIP}")).get_by_role("button", name=re.compile("Release")).click()
    expect(page.get_by_role("row").filter(has_text=FIP)).to_have_count(0)

    page.goto(f"{stack.url}/routers/{ROUTER}")
    page.get_by_role("group", name="Router actions").get_by_role("button", name="Delete").click()
    page.get_by_role("dialog", name=re.compile(f"Delete router {ROUTER}")).get_by_role("button", name="Delete").click()
    expect(page).to_have_url(f"{stack.url}/routers")
    wait_for(lambda: stack.api.get(f"/routers/{ROUTER}").status_code == 404, 60, "the router to be deleted")


def test_pools_dashboard_storage_and_cluster_pages(page: Page, stack: Stack, shots: Path) -> None:
    pool = stack.api.get("/pools/default").json()
    sign_in(page, stack)
    card = page.get_by_test_id("storage-card")
    expect(card.get_by_role("link", name="default")).to_be_visible()
    expect(card.get_by_role("img", name=re.compile(r"^Capacity of pool default: "))).to_be_visible()
    page.screenshot(path=shots / "dashboard-storage.png", full_page=True)

    open_kind(page, stack, "Storage pools")
    row = page.get_by_role("row").filter(has_text="default")
    expect(row).to_contain_text(pool["status"].get("phase", "Ready"))
    expect(row).to_contain_text(pool["spec"]["backend"])
    page.screenshot(path=shots / "pools.png")
    row.get_by_role("link", name="default").click()
    expect(page.get_by_role("heading", name="default", level=1)).to_be_visible()
    expect(page.get_by_role("region", name="Space")).to_contain_text("Dedup ratio")
    wait_for_samples(page, ("Space", "Ratios"), 60, "the pool's graphs to show samples")
    page.screenshot(path=shots / "pool-detail.png", full_page=True)
    assert {s["name"] for s in stack.api.get("/pools/default/metrics").json()["series"]} == {
        "logical_bytes", "stored_bytes", "dedup_ratio", "compression_ratio"}

    sign_in(page, stack, f"/nodes/{stack.node}")  # the node's graphs (sampled since the stack started)
    wait_for_samples(page, ("CPU", "Memory", "Network", "Disk IOPS"), 60, "the node's graphs to show samples")
    page.screenshot(path=shots / "node-history.png", full_page=True)
    node_rows = {row["name"]: row for row in _cli_rows(stack, "node", "metrics", stack.node)}
    assert node_rows["cpu"]["value"] is not None and node_rows["memory"]["value"] > 1 << 20

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Cluster").click()
    expect(page.get_by_role("heading", name="Cluster", level=1)).to_be_visible()
    health = page.get_by_test_id("cluster-health")
    expect(health).to_contain_text("Quorum")
    expect(health).to_contain_text("1 of 1 ready")
    members = page.get_by_role("region", name="Members")
    expect(members.get_by_role("row").filter(has_text=stack.node)).to_contain_text("Ready")
    expect(page.get_by_role("region", name="Failovers")).to_contain_text("No node was lost")
    page.screenshot(path=shots / "cluster.png", full_page=True)
