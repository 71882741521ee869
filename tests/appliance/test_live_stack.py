"""The embedded appliance as a user runs it: `cairn up` starts redis-server,
cairn-api (https), a Celery worker and the agent under the supervisor; tasks run on
the real broker; kill -9 is healed; `cairn down` stops everything."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.db import migrate
from appliance.settings import Settings
from appliance.version import __version__
from network.model import HostNames
from tests.services import free_port, postgres, process_started, redis_server
from tests.wsclient import connect

pytestmark = pytest.mark.functional
CAIRN = [sys.executable, "-m", "appliance.cli.main"]


STACK_RECORDS = Path("/tmp/cairn-test-stacks")  # outside pytest's temp dirs, which it prunes


def sweep_stale_stacks() -> None:
    """Take down what the stacks of a killed test run left: their supervisor, containers
    and the containers' mounts (volume file exports, loop devices, idmapped binds). A
    stack is stale when the test process that started it is gone; a live one (another
    session's run) is never touched."""
    from compute.block_volumes import release_under
    from compute.host_mounts import unmount_under

    for record in sorted(STACK_RECORDS.glob("*.json")):
        try:
            owner = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if process_started(owner["pid"]) == owner["started"]:
            continue
        env = {**os.environ, **owner["env"]}
        subprocess.run([*CAIRN, "down", "--output", "json"], env=env, capture_output=True, timeout=120, check=False)
        data = Path(owner["env"]["CAIRN_DATA_DIR"])
        for mounts in Path("/run/cairn-containers").glob(f"{owner['host_prefix']}-*"):
            unmount_under(mounts)
        release_under(data)
        record.unlink(missing_ok=True)


class Stack:
    def __init__(self, root: Path, node: str = "live", vni_base: int = 10000, **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.node = f"{node}-{os.getpid()}"
        vnis = vni_base + os.getpid() % 5000 * 10
        self.env = {
            **os.environ,
            "CAIRN_DATA_DIR": str(root / "data"),
            "CAIRN_CONFIG": str(root / "cli.json"),
            "CAIRN_API_PORT": str(self.port),
            "CAIRN_API_HOST": "127.0.0.1",
            "CAIRN_NODE_NAME": self.node,
            "CAIRN_NODE_GRACE_SECONDS": "3",
            "CAIRN_TASK_GRACE_SECONDS": "4",
            "CAIRN_VNI_RANGE": f"{vnis}-{vnis + 9}",
            "CAIRN_STORAGE_NBD_PORT": str(free_port()),
            **env,
        }
        STACK_RECORDS.mkdir(exist_ok=True)
        self.record = STACK_RECORDS / f"{os.getpid()}-{root.name}-{time.monotonic_ns()}.json"
        self.record.write_text(json.dumps({
            "pid": os.getpid(), "started": process_started(os.getpid()),
            "host_prefix": Settings(data_dir=root / "data").host_prefix,
            "env": {k: v for k, v in self.env.items() if k.startswith("CAIRN_")}}))

    def cairn(self, *args: str, check: bool = True) -> Any:
        r = subprocess.run([*CAIRN, *args, "--output", "json"], env=self.env, capture_output=True,
                           text=True, timeout=180)
        if check and r.returncode:
            raise AssertionError(f"cairn {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    @property
    def cli(self) -> dict[str, str]:
        return json.loads((self.root / "cli.json").read_text())  # type: ignore[no-any-return]

    @property
    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cli["ca_file"])

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=self.tls,
                            headers={"Authorization": f"Bearer {self.cli['token']}"}, timeout=30)

    def services(self) -> dict[str, Any]:
        state = json.loads((self.root / "data" / "run" / "supervisor.json").read_text())
        return state["programs"]  # type: ignore[no-any-return]

    @property
    def names(self) -> HostNames:
        """The names of this stack's bridges and nftables tables on the host."""
        return HostNames(Settings(data_dir=self.root / "data").stack_tag)

    def supervisor_pid(self) -> int | None:
        try:
            return int((self.root / "data" / "run" / "supervisor.pid").read_text())
        except (OSError, ValueError):
            return None


def stop_stack(s: Stack) -> None:
    pid = s.supervisor_pid()
    s.cairn("down", check=False)  # also stops this node's VMs and containers
    if pid:  # belt and braces: never leave a supervisor behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    s.record.unlink(missing_ok=True)


def create_container(s: Stack, name: str, *options: str, command: tuple[str, ...] = ("sleep", "100000")) -> Any:
    r = subprocess.run([*CAIRN, "container", "create", name, "--image", "busybox", "--memory", "32MiB", *options,
                        "-o", "json", "--", *command], env=s.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def neighbour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second stack on this host all through the module, standing in for the appliance
    `./bootstrap.sh up` runs beside the suite: two of its containers share a network and
    one pings the other five times a second, whatever this module's stack does."""
    sweep_stale_stacks()
    n = Stack(tmp_path_factory.mktemp("neighbour"), node="nb", vni_base=30000, CAIRN_VM_DRIVER="none")
    try:
        assert n.cairn("up")["phase"] == "Ready"
        n.cairn("image", "import-test-guest")
        n.cairn("network", "create", "home", "--cidr", "10.78.0.0/24")
        peer = create_container(n, "peer", "--network", "home")["status"]["ports"][0]["ips"][0]["address"]
        create_container(n, "pinger", "--network", "home", command=("ping", "-i", "0.2", peer))
        wait_for(lambda: b" seq=" in console_of(n, "pinger"), 30, "the neighbour's first ping reply")
        yield n
    finally:
        stop_stack(n)


def console_of(s: Stack, container: str) -> bytes:
    return str(s.cairn("container", "console", container)["console"]).encode()


@pytest.fixture(scope="module", autouse=True)
def beside_a_neighbour(neighbour: Stack) -> Stack:
    """Every test of this module runs with the neighbour up (modules that borrow
    ``stack`` do not pay for one)."""
    return neighbour


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sweep_stale_stacks()
    # the API on every address, as an installed node's (test_guests_reach_no_node_service)
    s = Stack(tmp_path_factory.mktemp("stack"), CAIRN_API_HOST="0.0.0.0")
    try:
        info = s.cairn("up")
        assert info["phase"] == "Ready"
        yield s
    finally:
        stop_stack(s)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def wait_for(predicate: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_up_prints_console_and_password_file_and_is_idempotent(stack: Stack) -> None:
    info = stack.cairn("up")
    assert info["started"] is False
    assert info["console"].startswith("https://") and info["console"].endswith(f":{stack.port}/")
    pw = Path(info["password_file"])
    assert pw.stat().st_mode & 0o077 == 0 and len(pw.read_text().strip()) >= 16
    assert (stack.root / "cli.json").stat().st_mode & 0o077 == 0


def test_status_reports_the_node_ready(stack: Stack) -> None:
    status = stack.cairn("status")
    assert status["nodes"]["ready"] == 1
    head = migrate.code_schema()
    assert status["nodes_detail"] == [
        {"name": stack.node, "phase": "Ready", "version": {"code": __version__, "schema": head},
         "last_heartbeat": status["nodes_detail"][0]["last_heartbeat"]}
    ]
    assert status["versions"]["database_schema"] == head  # the member's versions, for rolling upgrades
    assert all(svc["running"] for svc in status["services"].values())
    nodes = stack.cairn("get", "nodes")
    assert [n["name"] for n in nodes] == [stack.node]
    assert nodes[0]["status"]["inventory"]["memory_bytes"] > 0


def test_password_login_over_https_and_token_lists_nodes(stack: Stack) -> None:
    password = (stack.root / "data" / "secrets" / "admin-password").read_text().strip()
    with httpx.Client(base_url=f"https://127.0.0.1:{stack.port}", verify=stack.tls) as c:
        r = c.post("/api/v1/auth/login", json={"username": "admin", "password": password})
        assert r.status_code == 200
        csrf = r.json()["csrf_token"]
        token = c.post("/api/v1/tokens", json={"name": "curl"}, headers={"X-CSRF-Token": csrf}).json()["token"]
    r = subprocess.run(["curl", "-sf", "--cacert", stack.cli["ca_file"], "-H", f"Authorization: Bearer {token}",
                        f"https://127.0.0.1:{stack.port}/api/v1/nodes"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [n["name"] for n in json.loads(r.stdout)["items"]] == [stack.node]


def test_cli_login_with_a_password_stores_a_working_token(stack: Stack, tmp_path: Path) -> None:
    password = (stack.root / "data" / "secrets" / "admin-password").read_text().strip()
    other = {**stack.env, "CAIRN_CONFIG": str(tmp_path / "other.json")}
    args = ["login", "--url", f"https://127.0.0.1:{stack.port}", "--username", "admin", "--password",
            password, "--ca-file", stack.cli["ca_file"], "--output", "json"]
    r = subprocess.run([*CAIRN, *args], env=other, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "other.json").stat().st_mode & 0o077 == 0
    r = subprocess.run([*CAIRN, "get", "nodes", "-o", "json"], env=other, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == stack.node
    bad = subprocess.run([*CAIRN, *args[:-4], "--password", "wrong", "--output", "json"], env=other,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "wrong user name or password" in bad.stderr


def test_task_reports_progress_and_task_wait_follows_it(stack: Stack) -> None:
    task = stack.cairn("node", "benchmark", stack.node, "--seconds", "3", "--no-wait")
    assert task["state"] in ("pending", "running")
    seen: set[float] = set()
    with stack.http() as c:
        def sample() -> bool:
            t = c.get(f"/api/v1/tasks/{task['id']}").json()
            seen.add(t["progress"]["percent"])
            return t["state"] in ("succeeded", "failed")

        wait_for(sample, 30, "the benchmark task")
    final = stack.cairn("task", "wait", task["id"])
    assert final["state"] == "succeeded"
    assert final["result"]["fsyncs_per_second"] > 0
    assert len({p for p in seen if 0 < p < 100}) >= 2, f"progress never moved: {sorted(seen)}"


def test_cancel_stops_a_running_task(stack: Stack) -> None:
    task = stack.cairn("node", "benchmark", stack.node, "--seconds", "60", "--no-wait")
    with stack.http() as c:
        wait_for(lambda: c.get(f"/api/v1/tasks/{task['id']}").json()["state"] == "running", 20, "running")
        assert c.post(f"/api/v1/tasks/{task['id']}/cancel").status_code == 202
        final = wait_for(lambda: (t := c.get(f"/api/v1/tasks/{task['id']}").json())["state"] in
                         ("cancelled", "failed", "succeeded") and t, 20, "cancellation")
    assert final["state"] == "cancelled"


def test_worker_killed_mid_task_is_restarted_and_the_task_never_stays_running(stack: Stack) -> None:
    task = stack.cairn("node", "benchmark", stack.node, "--seconds", "30", "--no-wait")
    with stack.http() as c:
        wait_for(lambda: c.get(f"/api/v1/tasks/{task['id']}").json()["state"]
                 == "running", 20, "task running")
        old = stack.services()["worker"]["pid"]
        pools = children(old)  # the node-queue pool, which runs this benchmark
        assert pools, "cairn-worker runs its node-queue pool as a child process"
        os.kill(old, signal.SIGKILL)
        new = wait_for(lambda: (p := stack.services()["worker"]["pid"]) and p != old and p, 10,
                       "the supervisor to restart the worker")
        assert pid_alive(new) and not pid_alive(old)
        wait_for(lambda: not any(pid_alive(p) for p in pools), 10, "the old node pool to die with its parent")
        final = wait_for(lambda: (t := c.get(f"/api/v1/tasks/{task['id']}").json())["state"] != "running"
                         and t, 30, "the reaper to end the lost task")
    # the benchmark allows one attempt: a lost worker fails it, with the reason
    assert final["state"] == "failed"
    assert "stopped answering" in final["error"]
    # and the restarted worker takes new work
    again = stack.cairn("node", "benchmark", stack.node, "--seconds", "1")
    assert again["state"] == "succeeded"


@pytest.mark.parametrize("program", ["api", "agent", "redis"])
def test_any_daemon_killed_with_sigkill_is_restarted_and_the_appliance_recovers(stack: Stack, program: str) -> None:
    old = stack.services()[program]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (p := stack.services()[program]["pid"]) and p != old, 15, f"{program} to be restarted")

    def healthy() -> bool:
        try:
            with stack.http() as c:
                node = c.get(f"/api/v1/nodes/{stack.node}").json()
                return bool(node["status"]["phase"] == "Ready")
        except httpx.HTTPError:
            return False

    wait_for(healthy, 30, "the appliance to answer again")
    # the restarted pieces still do work end to end (broker, worker, API)
    assert stack.cairn("node", "benchmark", stack.node, "--seconds", "0.5")["state"] == "succeeded"


def test_events_stream_every_change(stack: Stack) -> None:
    with stack.http() as c:
        task = c.post(f"/api/v1/nodes/{stack.node}/benchmark", json={"seconds": 1}).json()
        wait_for(lambda: c.get(f"/api/v1/tasks/{task['id']}").json()["state"] == "succeeded", 30, "task")
        with c.stream("GET", "/api/v1/events", params={"since": 0, "max_seconds": 2}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    mine = [e for e in events if e["kind"] == "task" and e["id"] == task["id"]]
    assert mine[0]["object"]["state"] == "pending"
    assert mine[-1]["object"]["state"] == "succeeded"
    assert any(e["kind"] == "node" and e["name"] == stack.node for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    with stack.http() as c, c.stream("GET", "/api/v1/events", params={"max_seconds": 1},
                                     headers={"Last-Event-ID": str(seqs[-1])}) as r:
        resumed = [json.loads(line[6:]) for line in "".join(r.iter_text()).splitlines()
                   if line.startswith("data: ")]
    assert all(e["seq"] > seqs[-1] for e in resumed)


def test_cli_events_and_project_scoped_kinds(stack: Stack) -> None:
    with stack.http() as c:
        c.post("/api/v1/placement-groups", json={"name": "db", "spec": {"policy": "anti-affinity"}})
    groups = stack.cairn("get", "placement-groups")
    assert [(g["project"], g["name"], g["spec"]["policy"]) for g in groups] == [("default", "db", "anti-affinity")]
    assert stack.cairn("get", "placement-group", "db", "--project", "default")["name"] == "db"
    r = subprocess.run([*CAIRN, "events", "--since", "0", "--seconds", "1", "-o", "json"], env=stack.env,
                       capture_output=True, text=True, timeout=60)
    kinds = {json.loads(line)["kind"] for line in r.stdout.splitlines()}
    assert {"node", "task", "placement-group"} <= kinds
    stack.cairn("delete", "placement-group", "db")
    assert stack.cairn("get", "placement-groups") == []


def test_network_cli_spellings(stack: Stack) -> None:
    net = stack.cairn("network", "create", "lab", "--cidr", "10.20.0.0/24")
    assert net["status"]["subnets"][0]["cidr"] == "10.20.0.0/24"
    assert stack.cairn("network", "get", "lab")["status"]["vni"] == net["status"]["vni"]
    group = stack.cairn("secgroup", "create", "ssh")
    assert group["name"] == "ssh"
    rule = stack.cairn("secgroup", "rule", "add", "ssh", "--proto", "tcp", "--port", "22", "--remote", "10.0.0.0/8")
    assert rule["spec"]["rules"][0] | {"id": "x"} == {"id": "x", "direction": "ingress", "protocol": "tcp",
                                                     "port_min": 22, "port_max": 22, "remote_cidr": "10.0.0.0/8",
                                                     "ethertype": "ipv4"}
    egress = stack.cairn("secgroup", "rule", "add", "ssh", "--proto", "udp", "--port", "53", "--egress")
    assert egress["spec"]["rules"][1]["direction"] == "egress"
    port = stack.cairn("port", "create", "lab", "vm1-eth0", "--secgroup", "ssh")
    assert port["status"]["ips"][0]["address"] == "10.20.0.2"
    r = subprocess.run([*CAIRN, "network", "delete", "lab", "-o", "json"], env=stack.env, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "still has 1 port" in r.stderr
    stack.cairn("port", "delete", "vm1-eth0")
    assert stack.cairn("network", "delete", "lab") == {"deleted": {"kind": "network", "name": "lab"}}


def test_a_tenant_subnet_on_the_nodes_own_network_is_refused(stack: Stack) -> None:
    """The attack: a tenant takes the node's underlay range (or link-local) for a network,
    so its gateway and DHCP would sit on the node's own network. 409 naming the clash."""
    inventory = stack.cairn("get", "node", stack.node)["status"]["inventory"]
    underlay = next(n for n in inventory["host_networks"] if n["role"] == "underlay" and ":" not in n["cidr"])
    for cidr, clash in ((underlay["cidr"], f"underlay network on {underlay['interface']}, {underlay['cidr']}"),
                        ("169.254.10.0/24", "link-local")):
        r = subprocess.run([*CAIRN, "network", "create", "mine", "--cidr", cidr, "-o", "json"], env=stack.env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and clash in " ".join(r.stderr.split()), (cidr, r.stderr, r.stdout)
    assert "mine" not in [n["name"] for n in stack.cairn("get", "networks")]


def test_vm_lifecycle_with_a_real_guest(stack: Stack) -> None:
    """create → marker on the serial console → stop → start → delete, with libvirt
    (TCG here) under the supervisor, through the CLI a user types."""
    assert stack.cairn("image", "import-test-guest") == {"vm": "tiny-guest", "container": "busybox"}
    vm = stack.cairn("vm", "create", "t1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB")
    assert (vm["status"]["vm_state"], vm["status"]["power_state"]) == ("active", "running")
    assert vm["status"]["node"] == stack.node

    def marker() -> bool:
        return "CAIRN-GUEST-UP" in stack.cairn("vm", "console", "t1")["console"]

    wait_for(marker, 60, "the guest's marker on the serial console")
    with stack.http() as c:  # two operations at once: one wins, the other gets 409
        first = c.post("/api/v1/vms/t1/stop", params={"timeout": 1})
        second = c.post("/api/v1/vms/t1/reboot")
        assert first.status_code == 202 and second.status_code == 409
        assert "busy (stopping)" in second.json()["detail"]
    stopped = stack.cairn("task", "wait", first.json()["id"])
    assert stopped["state"] == "succeeded"
    assert stack.cairn("vm", "get", "t1")["status"]["power_state"] == "shutdown"
    assert stack.cairn("vm", "start", "t1")["status"]["power_state"] == "running"
    assert stack.cairn("vm", "delete", "t1") == {"deleted": {"kind": "vm", "name": "t1"}}
    assert stack.cairn("get", "vms") == []


def test_websocket_consoles_serial_and_vnc_are_authenticated(stack: Stack) -> None:
    from websockets.exceptions import InvalidStatus

    stack.cairn("image", "import-test-guest")
    stack.cairn("vm", "create", "ws1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB")
    wait_for(lambda: "CAIRN-GUEST-UP" in stack.cairn("vm", "console", "ws1")["console"], 60, "boot")
    base = f"wss://127.0.0.1:{stack.port}/api/v1/vms/ws1/console"
    auth = {"Authorization": f"Bearer {stack.cli['token']}"}
    with connect(f"{base}/serial", additional_headers=auth, ssl=stack.tls, open_timeout=10) as ws:
        ws.send(b"\necho ws-$((20+22))\n")
        assert b"ws-42" in ws.read_until(b"ws-42", 30)
    with connect(f"{base}/vnc", additional_headers=auth, ssl=stack.tls, subprotocols=["binary"],
                 open_timeout=10) as ws:
        assert ws.recv(timeout=10).startswith(b"RFB 003.")
    with stack.http() as c:
        c.post("/api/v1/projects", json={"name": "other"})
        c.post("/api/v1/users", json={"name": "mallory", "password": "correct horse battery"})
        c.put("/api/v1/projects/other/members/mallory", json={"role": "admin"})
    with httpx.Client(base_url=f"https://127.0.0.1:{stack.port}", verify=stack.tls) as c:
        csrf = c.post("/api/v1/auth/login", json={"username": "mallory", "password": "correct horse battery"}
                      ).json()["csrf_token"]
        other = c.post("/api/v1/tokens", json={"name": "m"}, headers={"X-CSRF-Token": csrf}).json()["token"]
    for headers in ({}, {"Authorization": f"Bearer {other}"}):
        with pytest.raises(InvalidStatus):
            connect(f"{base}/serial", additional_headers=headers, ssl=stack.tls, open_timeout=10)
    stack.cairn("vm", "delete", "ws1")
    # a container's interactive terminal, through the same kind of bridge
    r = subprocess.run([*CAIRN, "container", "create", "sh1", "--image", "busybox", "--memory", "64MiB", "--tty",
                        "-o", "json", "--", "/bin/sh"], env=stack.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tty = f"wss://127.0.0.1:{stack.port}/api/v1/containers/sh1/console/tty"
    with connect(tty, additional_headers=auth, ssl=stack.tls, open_timeout=10) as ws:
        ws.send(b"echo tty-$((6*7))\n")
        assert b"tty-42" in ws.read_until(b"tty-42", 20)
    with pytest.raises(InvalidStatus):
        connect(tty, additional_headers={"Authorization": f"Bearer {other}"}, ssl=stack.tls, open_timeout=10)
    stack.cairn("container", "delete", "sh1")


def test_container_lifecycle_exec_and_console(stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    r = subprocess.run([*CAIRN, "container", "create", "c1", "--image", "busybox", "--memory", "64MiB", "-o", "json",
                        "--", "sh", "-c", "echo hello-from-c1; exec sleep 1000"], env=stack.env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ct = json.loads(r.stdout)
    assert (ct["status"]["vm_state"], ct["status"]["power_state"]) == ("active", "running")
    wait_for(lambda: "hello-from-c1" in stack.cairn("container", "console", "c1")["console"], 20, "output")
    r = subprocess.run([*CAIRN, "container", "exec", "c1", "--", "sh", "-c", "echo inside; exit 3"],
                       env=stack.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and r.stdout == "inside\n"
    r = subprocess.run([*CAIRN, "container", "exec", "c1", "-o", "json", "--", "hostname"], env=stack.env,
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout) == {"returncode": 0, "stdout": "c1\n", "stderr": ""}
    r = subprocess.run([*CAIRN, "container", "exec", "c1", "--tty", "-o", "json", "--", "sh", "-c", "tty; exit 4"],
                       env=stack.env, capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    assert out["returncode"] == 4 and out["stdout"].startswith("/dev/pts/"), out
    assert stack.cairn("container", "stop", "c1", "--timeout", "1")["status"]["power_state"] == "shutdown"
    assert stack.cairn("container", "delete", "c1") == {"deleted": {"kind": "container", "name": "c1"}}


def test_container_with_vm_isolation_execs_has_a_terminal_logs_and_restarts_in_its_own_microvm(
        stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    stack.cairn("network", "create", "isonet", "--cidr", "10.76.0.0/24")
    stack.cairn("secgroup", "create", "isowall")  # no ingress rule: closed
    create_container(stack, "isopeer", "--network", "isonet")  # in the default group
    r = subprocess.run([*CAIRN, "container", "create", "iso1", "--image", "busybox", "--memory", "64MiB",
                        "--isolation", "vm", "--tty", "--env", "WHO=tenant", "--network", "isonet",
                        "--secgroup", "isowall", "-o", "json", "--", "sh", "-c", "echo isolated-$(uname -r); exec sh"],
                       env=stack.env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["status"]["power_state"] == "running"
    iso_ip = created["status"]["ports"][0]["ips"][0]["address"]
    wait_for(lambda: "isolated-" in stack.cairn("container", "console", "iso1")["console"], 60, "output")
    text = stack.cairn("container", "console", "iso1")["console"]
    # its own kernel (the guest's), not the host's; its log is its own output, not the guest's console
    assert f"isolated-{os.uname().release}" not in text and "CAIRN-GUEST-UP" not in text
    r = subprocess.run([*CAIRN, "container", "exec", "iso1", "--", "sh", "-c", "echo $WHO; echo oops >&2; exit 3"],
                       env=stack.env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "tenant\n", "oops\n")
    r = subprocess.run([*CAIRN, "container", "exec", "iso1", "-t", "-o", "json", "--", "tty"], env=stack.env,
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["stdout"].startswith("/dev/pts/"), r.stdout
    # the terminal in the API (the web console's TTY tab uses the same websocket)
    auth = {"Authorization": f"Bearer {stack.cli['token']}"}
    tty = f"wss://127.0.0.1:{stack.port}/api/v1/containers/iso1/console/tty"
    with connect(tty, additional_headers=auth, ssl=stack.tls, open_timeout=10) as ws:
        ws.send(b"echo tty-$((6*7))\n")
        assert b"tty-42" in ws.read_until(b"tty-42", 30)
    assert "tty-42" in stack.cairn("container", "console", "iso1")["console"]
    # its port on the overlay, behind its security groups, like any container's
    code, out = in_container(stack, "iso1", "ip -4 -o addr show eth0")
    assert code == 0 and f" {iso_ip}/" in out, out
    assert in_container(stack, "isopeer", f"ping -c 2 -W 1 {iso_ip}")[0] != 0, "its closed port answered"
    stack.cairn("secgroup", "rule", "add", "isowall", "--proto", "icmp")
    wait_for(lambda: in_container(stack, "isopeer", f"ping -c 1 -W 1 {iso_ip}")[0] == 0, 20,
             "the new rule to open ICMP to the microVM")
    assert stack.cairn("container", "stop", "iso1", "--timeout", "1")["status"]["power_state"] == "shutdown"
    assert stack.cairn("container", "start", "iso1")["status"]["power_state"] == "running"
    r = subprocess.run([*CAIRN, "container", "exec", "iso1", "-o", "json", "--", "hostname"], env=stack.env,
                       capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout) == {"returncode": 0, "stdout": "iso1\n", "stderr": ""}
    stack.cairn("container", "delete", "iso1")
    stack.cairn("container", "delete", "isopeer")
    stack.cairn("network", "delete", "isonet")


def test_a_vm_and_a_container_on_one_virtual_network_ping_each_other(stack: Stack) -> None:
    stack.cairn("image", "import-test-guest")
    stack.cairn("network", "create", "lab2", "--cidr", "10.77.0.0/24")
    vm = stack.cairn("vm", "create", "v1", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                     "--network", "lab2")
    vm_ip = vm["status"]["ports"][0]["ips"][0]["address"]
    r = subprocess.run([*CAIRN, "container", "create", "c1", "--image", "busybox", "--memory", "64MiB",
                        "--network", "lab2", "-o", "json", "--", "sleep", "1000"], env=stack.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the guest takes its fixed lease from dnsmasq on the network's bridge
    wait_for(lambda: f"IP: eth0 {vm_ip}/24" in stack.cairn("vm", "console", "v1")["console"], 60, "the VM's lease")

    def ping() -> bool:
        r = subprocess.run([*CAIRN, "container", "exec", "c1", "-o", "json", "--", "ping", "-c", "2", "-W", "2",
                            vm_ip], env=stack.env, capture_output=True, text=True, timeout=60)
        return r.returncode == 0 and json.loads(r.stdout)["returncode"] == 0

    wait_for(ping, 30, "the container to ping the VM over the overlay")  # both in the "default" group
    # a port in a group without ingress rules is closed (default deny inbound)
    stack.cairn("secgroup", "create", "closed")
    r = subprocess.run([*CAIRN, "container", "create", "c2", "--image", "busybox", "--memory", "64MiB", "--network",
                        "lab2", "--secgroup", "closed", "-o", "json", "--", "sleep", "1000"], env=stack.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c2_ip = json.loads(r.stdout)["status"]["ports"][0]["ips"][0]["address"]
    r = subprocess.run([*CAIRN, "container", "exec", "c1", "-o", "json", "--", "ping", "-c", "2", "-W", "1", c2_ip],
                       env=stack.env, capture_output=True, text=True, timeout=60)
    assert json.loads(r.stdout)["returncode"] != 0, "the closed port answered"
    stack.cairn("secgroup", "rule", "add", "closed", "--proto", "icmp")
    wait_for(lambda: json.loads(subprocess.run(
        [*CAIRN, "container", "exec", "c1", "-o", "json", "--", "ping", "-c", "1", "-W", "1", c2_ip], env=stack.env,
        capture_output=True, text=True, timeout=60).stdout)["returncode"] == 0, 20, "the new rule to open ICMP")
    stack.cairn("container", "delete", "c2")
    vni = stack.cairn("network", "get", "lab2")["status"]["vni"]
    bridge = stack.names.bridge(vni)
    assert bridge in Path("/proc/net/dev").read_text()
    stack.cairn("vm", "delete", "v1")
    stack.cairn("container", "delete", "c1")
    stack.cairn("network", "delete", "lab2")
    wait_for(lambda: bridge not in Path("/proc/net/dev").read_text(), 15, "the agent to remove the bridge")


@dataclass
class Intruders:
    """A VM and a container on their own network, run by a tenant who tries to leave them."""

    vm: str
    container: str
    gateway: str
    vm_ip: str
    container_ip: str


@pytest.fixture(scope="module")
def intruders(stack: Stack) -> Iterator[Intruders]:
    stack.cairn("image", "import-test-guest")
    net = stack.cairn("network", "create", "wall", "--cidr", "10.79.0.0/24")
    vm = stack.cairn("vm", "create", "vprobe", "--image", "tiny-guest", "--cpu", "1", "--memory", "256MiB",
                     "--network", "wall")
    ct = create_container(stack, "probe", "--network", "wall")
    found = Intruders("vprobe", "probe", net["status"]["subnets"][0]["gateway"],
                      vm["status"]["ports"][0]["ips"][0]["address"], ct["status"]["ports"][0]["ips"][0]["address"])
    wait_for(lambda: f"IP: eth0 {found.vm_ip}/24" in stack.cairn("vm", "console", "vprobe")["console"], 60,
             "the probe VM's lease")
    yield found
    stack.cairn("vm", "delete", "vprobe", check=False)
    stack.cairn("container", "delete", "probe", check=False)
    stack.cairn("network", "delete", "wall", check=False)


def in_container(s: Stack, name: str, script: str) -> tuple[int, str]:
    r = subprocess.run([*CAIRN, "container", "exec", name, "-o", "json", "--", "sh", "-c", script], env=s.env,
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    return int(out["returncode"]), out["stdout"] + out["stderr"]


def in_vm(s: Stack, name: str, script: str, timeout: float = 60) -> str:
    """Run ``script`` in the guest's serial shell; returns what it printed."""
    tag = f"done-{time.monotonic_ns()}"
    with connect(f"wss://127.0.0.1:{s.port}/api/v1/vms/{name}/console/serial", ssl=s.tls, open_timeout=10,
                 additional_headers={"Authorization": f"Bearer {s.cli['token']}"}) as ws:
        ws.send(f"\n{script}; echo {tag[:5]}''{tag[5:]}\n".encode())
        seen = ws.read_until(tag.encode(), timeout)
    assert tag.encode() in seen, seen[-500:]
    return seen.decode(errors="replace")


@contextmanager
def node_services(tmp: Path, host_ip: str) -> Iterator[dict[str, int]]:
    """The programs an installed node runs besides the API: Redis, PostgreSQL and an NBD
    export over TLS (cairn's NBD server), listening on every address, as a cluster
    node's listen on its cluster and storage addresses. Yields name -> port."""
    from appliance.pki import nbd_server_tls

    with ExitStack() as running:
        redis = running.enter_context(redis_server("0.0.0.0"))
        pg = running.enter_context(postgres(listen="*"))
        port, ready = free_port(), tmp / "nbd-ready"
        nbd = subprocess.Popen(
            [sys.executable, "-m", "storage.nbd.server", "--pool-dir", str(tmp / "pool"), "--create", "t:1MiB",
             "--listen", f"0.0.0.0:{port}", "--tls-dir", str(nbd_server_tls(tmp / "pki", [host_ip])),
             "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running.callback(nbd.wait, 30)
        running.callback(nbd.terminate)
        wait_for(lambda: ready.exists() or nbd.poll() is not None, 30, "the NBD server")
        assert ready.exists(), "the NBD server did not start"
        yield {"Redis": int(redis.rsplit(":", 1)[1]), "PostgreSQL": pg.port, "NBD over TLS": port}


def probe_answers(text: str) -> dict[str, str]:
    """``address:port`` -> what nc printed, from the output of the probes' script."""
    parts = re.split(r"PR:(\S+?)\r?\n", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_guests_reach_no_node_service(stack: Stack, intruders: Intruders, neighbour: Stack, tmp_path: Path) -> None:
    """The attack: from inside a VM and a container, connect to the node's services, each
    the real program listening on every address as on an installed node: the API, Redis,
    PostgreSQL and NBD over TLS, through the gateway and through the node's own address.
    Each answers the host itself (so a refusal is the filter's), and both guests are
    refused. And the container's tenant sends the node VXLAN (UDP 4789) carrying a frame
    for its own network and for the neighbour stack's: the node decapsulates neither.
    DNS from the network's dnsmasq still answers."""
    from compute.oci_driver import OciDriver
    from tests.network.test_secgroups import vxlan_packet

    host_ip = subprocess.run(["ip", "-4", "-o", "route", "get", "192.0.2.1"], capture_output=True,
                             text=True).stdout.split(" src ")[1].split()[0]
    with node_services(tmp_path, host_ip) as ports:
        services = {"the API": stack.port, **ports}
        targets = [(name, address, port) for name, port in services.items()
                   for address in (intruders.gateway, host_ip)]
        for _, address, port in targets:
            socket.create_connection((address, port), timeout=5).close()  # it is there, for the host
        script = "; ".join(f"echo P''R:{address}:{port}; timeout 3 nc -w 2 {address} {port} </dev/null 2>&1"
                           for _, address, port in targets)  # connected: no refusal, killed at 3 s
        leaks = []
        for guest, out in (("container", in_container(stack, intruders.container, script)[1]),
                           ("VM", in_vm(stack, intruders.vm, script, timeout=120))):
            answers = probe_answers(out)
            assert len(answers) == len(targets), out[-1000:]
            leaks += [f"the {guest} reached {name} at {address}:{port}" for name, address, port in targets
                      if "Connection refused" not in answers[f"{address}:{port}"]]

    wall = stack.cairn("network", "get", "wall")["status"]["vni"]
    home = neighbour.cairn("network", "get", "home")["status"]["vni"]
    bridges = {stack.names.bridge(wall): wall, neighbour.names.bridge(home): home}
    forged = bytes.fromhex("02dead000b0b")  # the inner frames' source MAC
    datagrams = [vxlan_packet(vni, "ff:ff:ff:ff:ff:ff", forged.hex(":"), intruders.container_ip, "255.255.255.255",
                              9, b"forged-by-a-tenant").hex() for vni in bridges.values()]
    send = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for d in sys.argv[3:]:\n    for a in sys.argv[1:3]:\n        s.sendto(bytes.fromhex(d), (a, 4789))\n")
    domain = stack.cairn("container", "get", intruders.container)["status"]["domain"]
    pid = OciDriver(stack.root / "data" / "containers", host_prefix=Settings(data_dir=stack.root / "data").host_prefix
                    ).pid(domain)
    seen: dict[str, list[bytes]] = {bridge: [] for bridge in bridges}
    sniffers = {bridge: socket.socket(socket.AF_PACKET, socket.SOCK_RAW) for bridge in bridges}
    try:
        for bridge, sniff in sniffers.items():
            sniff.bind((bridge, 3))  # ETH_P_ALL
            sniff.settimeout(0.05)
        r = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", send, intruders.gateway,
                            host_ip, *datagrams], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr  # sent from the container's network namespace, as its tenant would
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for bridge, sniff in sniffers.items():
                try:
                    seen[bridge].append(sniff.recv(65535))
                except TimeoutError:
                    pass
    finally:
        for sniff in sniffers.values():
            sniff.close()
    assert any(b"forged-by-a-tenant" in f and f[6:12] != forged for f in seen[stack.names.bridge(wall)]), \
        "the sniffer on the container's bridge did not even see its datagrams"
    leaks += [f"the container's VXLAN reached VNI {vni} ({bridge})" for bridge, vni in bridges.items()
              if any(f[6:12] == forged for f in seen[bridge])]
    assert leaks == [], "\n".join(leaks)
    _, out = in_container(stack, intruders.container, f"nslookup -type=a {intruders.vm} {intruders.gateway}")
    assert f"Address: {intruders.vm_ip}" in out, out


ESCAPES = {  # what a tenant tries inside a container, and the shell to try it
    "a new user namespace": "unshare -U true",
    "a device node": "mknod /tmp/mem c 1 1",
    "a cgroup mount (for release_agent)": "mkdir -p /tmp/cg && mount -t cgroup -o rdma cgroup /tmp/cg",
    "writing a release_agent": "for f in /sys/fs/cgroup/release_agent /sys/fs/cgroup/*/release_agent "
                               "/tmp/cg/release_agent; do [ -e $f ] && echo /x > $f && exit 0; done; exit 1",
    "a tmpfs mount": "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
    "writing to /sys": "echo 1 > /sys/kernel/profiling",
    "reading /proc/kcore": "test -s /proc/kcore && head -c 1 /proc/kcore | wc -c | grep -q 1",
}


def test_a_container_cannot_leave_its_confinement(stack: Stack, intruders: Intruders) -> None:
    """The attacks of a tenant's root inside a container: a user namespace, a device
    node, the cgroup v1 release_agent escape, mounting, writing /sys, reading masked
    /proc files. All refused; the container's root is an unprivileged host id."""
    script = "; ".join(f"({cmd}) >/dev/null 2>&1 && echo 'ESCAPED: {what}'" for what, cmd in ESCAPES.items())
    _, out = in_container(stack, intruders.container,
                          script + "; cat /proc/self/uid_map; grep Seccomp: /proc/self/status")
    assert "ESCAPED" not in out, out
    inside, host, size = map(int, out.split("Seccomp:")[0].split()[-3:])
    assert (inside, size) == (0, 65536) and host >= 1 << 24, f"container root is host id {host}: {out}"
    assert "Seccomp:\t2" in out, out  # a filter is loaded
    # still a working container: it writes its own files and reaches its network
    code, out = in_container(stack, intruders.container, f"touch /etc/mine && ping -c 1 -W 2 {intruders.vm_ip}")
    assert code == 0, out


def qemu_of(domain_prefix: str) -> tuple[int, int, int]:
    """(pid, uid, gid) of the QEMU process whose guest name starts with ``domain_prefix``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and f"guest={domain_prefix}".encode() in cmdline:
            status = (proc / "status").read_text()
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            gid = int(next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1])
            return int(proc.name), uid, gid
    raise AssertionError(f"no QEMU runs {domain_prefix}")


def qemu_runs(domain_prefix: str) -> bool:
    try:
        qemu_of(domain_prefix)
    except (AssertionError, OSError):
        return False
    return True


def test_each_vm_runs_as_its_own_unprivileged_user(stack: Stack, intruders: Intruders) -> None:
    """The attack: whoever takes over a guest's QEMU (a device emulation bug) acts as its
    process. That is an unprivileged uid of its own, not root: it reads none of the
    node's secrets or database and nothing of another VM (files, volumes), and cannot
    signal it."""
    own = stack.cairn("volume", "create", "vp2-own", "--size", "1MiB")["status"]["export"]
    theirs = stack.cairn("volume", "create", "vp2-theirs", "--size", "1MiB")["status"]["export"]
    other = stack.cairn("vm", "create", "vprobe2", "--image", "tiny-guest", "--cpu", "1", "--memory", "128MiB",
                        "--volume", "vp2-own")
    try:
        _, uid, gid = qemu_of(f"cairn-vprobe-{intruders_id(stack, 'vprobe')}")
        pid2, uid2, gid2 = qemu_of(f"cairn-vprobe2-{other['id'][:8]}")
        assert uid >= 1 << 24 and uid2 >= 1 << 24 and uid != uid2 and gid == gid2 != 0, (uid, uid2, gid, gid2)
        data = Path(stack.env["CAIRN_DATA_DIR"])
        as_qemu = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        for secret in (Path("/etc/shadow"), data / "secrets" / "admin-password", data / "cairn.db",
                       data / "pki" / "ca.key", data / "nbd-client" / "client-key.pem",  # no nbds:// disk here
                       data / "instances" / f"cairn-vprobe2-{other['id'][:8]}" / "seed.iso"):
            r = subprocess.run([*as_qemu, "cat", str(secret)], capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (secret, r.returncode, r.stderr)
        # the storage daemon's socket serves a VM's QEMU its own volumes only
        as_qemu2 = ["setpriv", f"--reuid={uid2}", f"--regid={gid2}", "--clear-groups", "--"]
        r = subprocess.run([*as_qemu2, "qemu-img", "info", own], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for export, who in ((theirs, as_qemu2), (own, as_qemu)):
            r = subprocess.run([*who, "qemu-img", "info", export], capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "virtual size" not in r.stdout, f"{who[1]} opened {export}: {r.stdout}"
        r = subprocess.run([*as_qemu, "kill", "-0", str(pid2)], capture_output=True, text=True)
        assert r.returncode != 0, f"the VM's QEMU may signal another VM's: {r.stderr}"
        # the kernel both boot stays root's: QEMU reads it, no VM may change it for the other
        argv = Path(f"/proc/{pid2}/cmdline").read_bytes().split(b"\0")
        kernel = Path(argv[argv.index(b"-kernel") + 1].decode())
        assert kernel.stat().st_uid == 0
        r = subprocess.run([*as_qemu, "sh", "-c", f"head -c 4 {kernel} >/dev/null && : >> {kernel}"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    finally:
        stack.cairn("vm", "delete", "vprobe2", check=False)
        for vol in ("vp2-own", "vp2-theirs"):
            stack.cairn("volume", "delete", vol, check=False)


def test_each_vm_isolated_container_runs_its_qemu_as_an_unprivileged_user_of_its_own(
        stack: Stack, intruders: Intruders) -> None:
    """The attack: a tenant of an ``isolation: vm`` container runs its own kernel, so a
    device emulation bug hands it the microVM's QEMU. That process is an unprivileged uid
    of its own (no VM's, no other microVM's, no container's), it reads none of the node's
    secrets nor another container's environment or volume, plants no link where a root
    process opens its log or sockets, signals no other QEMU; the container still works,
    and its uid goes back to the host's registry when it is deleted."""
    from compute.oci_idmap import DEFAULT_REGISTRY, ID_BASE, ID_SIZE

    export = stack.cairn("volume", "create", "isodac-vol", "--size", "64MiB")["status"]["export"]
    domains = {}
    for name, options in (("isodac1", ("--env", "TOKEN=mine", "--volume", "isodac-vol:/srv/data")),
                          ("isodac2", ("--env", "TOKEN=theirs-s3cret"))):
        made = create_container(stack, name, "--isolation", "vm", *options,
                                command=("sh", "-c", "echo up-$((6*7)); exec sleep 100000"))
        assert made["status"]["power_state"] == "running", made["status"]
        domains[name] = f"cairn-{name}-{made['id'][:8]}"
    try:
        _, vm_uid, _ = qemu_of(f"cairn-vprobe-{intruders_id(stack, 'vprobe')}")
        _, uid1, gid1 = qemu_of(domains["isodac1"])
        pid2, uid2, gid2 = qemu_of(domains["isodac2"])
        assert uid1 >= ID_BASE and uid2 >= ID_BASE and len({uid1, uid2, vm_uid}) == 3 and gid1 == gid2 != 0, \
            (uid1, uid2, vm_uid, gid1, gid2)
        _, out = in_container(stack, intruders.container, "cat /proc/self/uid_map")
        assert int(out.split()[1]) not in (uid1, uid2), f"a container's ids hold a microVM's uid: {out}"
        # still a working container, its agent reached through the unprivileged QEMU
        code, out = in_container(stack, "isodac1", "echo $TOKEN $((6*7)); echo kept > /srv/data/f; sync; "
                                                   "cat /srv/data/f; ls /")
        assert code == 0 and out.startswith("mine 42\nkept\n") and "bin" in out.split(), out
        wait_for(lambda: "up-42" in stack.cairn("container", "console", "isodac1")["console"], 30, "its output")
        data = Path(stack.env["CAIRN_DATA_DIR"])
        theirs = data / "microvms" / "containers" / domains["isodac2"]
        assert (theirs / "process.json").exists() and (theirs / "config.bin").exists()
        def as_qemu(uid: int) -> list[str]:
            return ["setpriv", f"--reuid={uid}", f"--regid={gid1}", "--clear-groups", "--"]

        for uid in (uid1, vm_uid):  # neither another microVM's QEMU nor a plain VM's
            for secret in (Path("/etc/shadow"), data / "secrets" / "admin-password", data / "cairn.db",
                           data / "pki" / "ca.key", theirs / "process.json", theirs / "config.bin",
                           theirs / "rootfs" / "bin" / "sh"):
                r = subprocess.run([*as_qemu(uid), "cat", str(secret)], capture_output=True, text=True)
                assert r.returncode != 0 and "Permission denied" in r.stderr, (uid, secret, r.returncode, r.stderr)
        # the storage daemon's socket serves the microVM's QEMU its own volume, no other QEMU
        for uid, opens in ((uid1, True), (uid2, False), (vm_uid, False)):
            r = subprocess.run([*as_qemu(uid), "qemu-img", "info", export], capture_output=True, text=True, timeout=60)
            assert ("virtual size" in r.stdout) == opens, (uid, opens, r.stdout, r.stderr)
        # nor may it put a link where a root process (libvirt, virtlogd) opens its sockets and logs
        ours = data / "microvms" / "containers" / domains["isodac1"]
        for path in (ours / "serial.log", ours / "agent.sock", ours / "console.log"):
            r = subprocess.run([*as_qemu(uid1), "ln", "-sf", "/etc/shadow", str(path)], capture_output=True, text=True)
            assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r.stderr)
        r = subprocess.run([*as_qemu(uid1), "kill", "-0", str(pid2)], capture_output=True, text=True)
        assert r.returncode != 0, f"a microVM's QEMU may signal another's: {r.stderr}"
    finally:
        stack.cairn("container", "delete", "isodac1", check=False)
    # deleted: its QEMU is gone and its uid is no longer claimed in the host's registry
    wait_for(lambda: not qemu_runs(domains["isodac1"]), 30, "its QEMU to end")
    slot = DEFAULT_REGISTRY / f"slot-{(uid1 - ID_BASE) // ID_SIZE}"
    held = slot.read_text() if slot.exists() else ""
    assert domains["isodac1"] not in held, f"the deleted container still holds uid {uid1}: {held}"
    r = subprocess.run([*as_qemu(uid1), "qemu-img", "info", export], capture_output=True, text=True, timeout=60)
    assert "virtual size" not in r.stdout, f"uid {uid1} still opens the deleted container's volume"
    stack.cairn("container", "delete", "isodac2", check=False)
    stack.cairn("volume", "delete", "isodac-vol", check=False)


def test_a_vms_qemu_makes_no_root_process_write_through_a_link_in_its_directory(
        stack: Stack, tmp_path: Path) -> None:
    """The attack: a VM's QEMU owns its directory, and virtlogd, root, opens the serial log
    in it by its path at every start. QEMU replaces the log with a link to a host file (it
    could name /etc/passwd) and waits for the next start: the guest's console output would
    land in that file. The link is removed before the start; the host file is untouched."""
    stack.cairn("image", "import-test-guest")
    vm = stack.cairn("vm", "create", "vlink", "--image", "tiny-guest", "--cpu", "1", "--memory", "128MiB")
    domain = f"cairn-vlink-{vm['id'][:8]}"
    victim = tmp_path / "host-file"
    victim.write_text("root's own\n")
    victim.chmod(0o600)
    try:
        _, uid, gid = qemu_of(domain)
        serial = Path(stack.env["CAIRN_DATA_DIR"]) / "instances" / domain / "serial.log"
        r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", "sh", "-c",
                            f"rm -f {serial} && ln -s {victim} {serial}"], capture_output=True, text=True)
        assert r.returncode == 0 and serial.is_symlink(), r.stderr  # its own directory: it may
        stack.cairn("vm", "stop", "vlink")
        stack.cairn("vm", "start", "vlink")
        wait_for(lambda: "Linux version" in stack.cairn("vm", "console", "vlink")["console"], 60, "its boot")
        assert victim.read_text() == "root's own\n" and not serial.is_symlink()
    finally:
        stack.cairn("vm", "delete", "vlink", check=False)


def intruders_id(s: Stack, vm: str) -> str:
    return str(s.cairn("vm", "get", vm)["id"])[:8]


def test_vm_bad_input(stack: Stack) -> None:
    with stack.http() as c:
        big = c.post("/api/v1/vms", json={"name": "big", "spec": {"cpu": 1, "memory": "4TiB", "image": "tiny-guest"}})
        assert big.status_code == 422 and "largest node has" in big.json()["detail"]
        ghost = c.post("/api/v1/vms", json={"name": "g", "spec": {"cpu": 1, "memory": "1GiB", "image": "nope"}})
        assert ghost.status_code == 404 and "no image 'nope'" in ghost.json()["detail"]
        assert c.get("/api/v1/vms/big").status_code == 404


def test_metrics_in_prometheus_format(stack: Stack) -> None:
    with stack.http() as c:
        c.get("/api/v1/nodes")
        text = c.get("/metrics").text
        assert httpx.get(f"https://127.0.0.1:{stack.port}/metrics", verify=stack.tls).status_code == 401
    assert 'cairn_http_request_duration_seconds_bucket{le="0.005",method="GET"' in text
    assert f'cairn_node_ready{{node="{stack.node}"}} 1.0' in text
    assert 'cairn_tasks{state="succeeded"}' in text
    assert "cairn_node_heartbeat_age_seconds" in text


def test_logs_are_structured_json(stack: Stack) -> None:
    for name in ("api", "worker", "agent"):
        lines = (stack.root / "data" / "log" / f"{name}.log").read_text().splitlines()
        parsed = [json.loads(line) for line in lines if line.startswith("{")]
        assert parsed and all({"time", "level", "message"} <= set(p) for p in parsed), name


def test_data_dir_database_uploads_logs_and_keys_are_root_only(stack: Stack) -> None:
    data = stack.root / "data"
    private = [data, data / "secrets", data / "pki", data / "uploads", data / "log", data / "run"]
    files = [data / "cairn.db", data / "cairn.db-wal", data / "secrets" / "admin-password",
             data / "pki" / "ca.key", data / "pki" / "server.key", data / "log" / "api.log"]
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in private + files
             if p.stat().st_mode & 0o077 and not only_vm_group_search(p)}
    assert loose == {}, "readable by others"


def only_vm_group_search(path: Path) -> bool:
    """A directory whose only grant beyond root is search for one group (unprivileged
    QEMU's way to its own files: agent/vm_access.py)."""
    acl = subprocess.run(["getfacl", "-cpn", str(path)], capture_output=True, text=True, check=True).stdout.split()
    extra = [e for e in acl if e.startswith(("user:", "group:", "other:", "mask:")) and not e.startswith("user::")]
    named = [e for e in extra if e.startswith("group:") and not e.startswith("group::")]
    return (path.is_dir() and len(named) == 1 and named[0].endswith(":--x")
            and sorted(e for e in extra if e not in named) == ["group::---", "mask::--x", "other::---"])


def _user_token(stack: Stack, user: str, role: str) -> str:
    with stack.http() as c:
        assert c.post("/api/v1/users", json={"name": user, "password": "correct horse battery"}).status_code == 201
        assert c.put(f"/api/v1/projects/default/members/{user}", json={"role": role}).status_code == 200
    with httpx.Client(base_url=f"https://127.0.0.1:{stack.port}", verify=stack.tls) as c:
        csrf = c.post("/api/v1/auth/login", json={"username": user, "password": "correct horse battery"}
                      ).json()["csrf_token"]
        return str(c.post("/api/v1/tokens", json={"name": "t"}, headers={"X-CSRF-Token": csrf}).json()["token"])


def test_failed_logins_over_https_lock_known_and_unknown_names_alike(stack: Stack) -> None:
    _user_token(stack, "lock-me", "viewer")
    with httpx.Client(base_url=f"https://127.0.0.1:{stack.port}", verify=stack.tls) as c:
        for user in ("lock-me", "no-such-user"):
            codes = [c.post("/api/v1/auth/login", json={"username": user, "password": "guess guess guess"}
                            ).status_code for _ in range(5)]
            right = c.post("/api/v1/auth/login", json={"username": user, "password": "correct horse battery"})
            assert codes == [401] * 5 and right.status_code == 429, (user, codes)
            assert int(right.headers["retry-after"]) > 200 and "try again in" in right.json()["detail"]
    # the audit log has every attempt, with who and from where (cairn audit list)
    audit = stack.cairn("audit", "list", "--user", "no-such-user")
    assert [(a["action"], a["source"], a["outcome"]) for a in audit] == \
        [("POST /api/v1/auth/login", "127.0.0.1", "denied")] * 6


def test_the_event_stream_closes_when_its_token_is_revoked(stack: Stack) -> None:
    token = _user_token(stack, "sse-user", "viewer")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"https://127.0.0.1:{stack.port}", verify=stack.tls, headers=headers,
                      timeout=30) as c, c.stream("GET", "/api/v1/events", params={"max_seconds": 60}) as r:
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        assert httpx.delete(f"https://127.0.0.1:{stack.port}/api/v1/tokens/t", headers=headers,
                            verify=stack.tls).status_code == 204
        revoked = time.monotonic()
        rest = list(lines)  # the server ends the stream
    assert time.monotonic() - revoked < 5
    assert "event: closed" in rest and any("revoked" in line for line in rest)


def test_a_console_closes_when_its_user_is_disabled(stack: Stack) -> None:
    from websockets.exceptions import ConnectionClosed

    stack.cairn("image", "import-test-guest")
    r = subprocess.run([*CAIRN, "container", "create", "sh2", "--image", "busybox", "--memory", "64MiB", "--tty",
                        "-o", "json", "--", "/bin/sh"], env=stack.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    token = _user_token(stack, "tty-user", "operator")
    tty = f"wss://127.0.0.1:{stack.port}/api/v1/containers/sh2/console/tty"
    with connect(tty, additional_headers={"Authorization": f"Bearer {token}"}, ssl=stack.tls,
                 open_timeout=10) as ws:
        ws.send(b"echo still-$((40+2))\n")
        assert b"still-42" in ws.read_until(b"still-42", 20)
        stack.cairn("user", "disable", "tty-user")
        disabled = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert time.monotonic() - disabled < 5
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "disabled" in closed.value.rcvd.reason
    stack.cairn("container", "delete", "sh2")


def test_quotas_through_the_cli(stack: Stack) -> None:
    stack.cairn("project", "quota", "set", "default", "--networks", "0", "--memory", "1GiB")
    shown = stack.cairn("project", "quota", "show", "default")
    assert shown["limits"]["networks"] == 0 and shown["limits"]["memory_bytes"] == 1 << 30
    r = subprocess.run([*CAIRN, "network", "create", "over", "-o", "json"], env=stack.env, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "over its quota of 0" in " ".join(r.stderr.split())
    stack.cairn("project", "quota", "set", "default", "--networks", "unlimited", "--memory", "unlimited")
    assert stack.cairn("project", "quota", "show", "default")["limits"]["networks"] is None


def test_node_turns_not_ready_when_the_agent_stops_and_ready_when_it_returns(stack: Stack) -> None:
    agent = stack.services()["agent"]["pid"]
    os.kill(agent, signal.SIGSTOP)  # a hung agent: alive, silent
    try:
        with stack.http() as c:
            wait_for(lambda: c.get(f"/api/v1/nodes/{stack.node}").json()["status"]["phase"] == "NotReady",
                     15, "NotReady after the grace period")
            cond = c.get(f"/api/v1/nodes/{stack.node}").json()["conditions"][0]
            assert cond["reason"] == "HeartbeatTimeout"
    finally:
        os.kill(agent, signal.SIGCONT)
    with stack.http() as c:
        wait_for(lambda: c.get(f"/api/v1/nodes/{stack.node}").json()["status"]["phase"] == "Ready", 15, "Ready")


def test_down_stops_every_process_and_up_restarts(stack: Stack) -> None:
    pids = [p["pid"] for p in stack.services().values()]
    sup = stack.supervisor_pid()
    with stack.http() as c:
        c.post("/api/v1/images/import-test-guest")
    stack.cairn("image", "import-test-guest")
    stack.cairn("container", "create", "survivor", "--image", "busybox", "--memory", "64MiB")
    # the survivor and any earlier test's that still run (a failed one's record does not)
    running = sum(c["status"].get("power_state") == "running" for c in stack.cairn("get", "containers"))
    down = stack.cairn("down")
    assert down["stopped"] is True and down["containers_stopped"] == running
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if str(stack.root) in m]
    assert sup is not None and not pid_alive(sup)
    assert not any(pid_alive(p) for p in pids)
    assert stack.cairn("up")["phase"] == "Ready"
    # desired state survived: the agent brings the container back
    wait_for(lambda: stack.cairn("container", "get", "survivor")["status"]["power_state"] == "running", 30,
             "the container to be restarted after up")
    stack.cairn("container", "delete", "survivor")


def test_a_neighbour_stacks_guests_kept_their_network_throughout(stack: Stack, neighbour: Stack) -> None:
    """Two stacks on one host (the appliance and the suite's) never touch each other's
    bridges, VXLAN devices or nftables tables: the neighbour's ping never missed a reply
    while every test above made, changed and removed this stack's networks and rules."""
    text = console_of(neighbour, "pinger").decode(errors="replace")
    seqs = [int(m) for m in re.findall(r" seq=(\d+) ", text)]
    assert seqs, text[-500:]
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert not missing, f"the neighbour's guest lost {len(missing)} of {seqs[-1] + 1} pings: {missing[:20]}..."
    before = seqs[-1]
    wait_for(lambda: max(map(int, re.findall(r" seq=(\d+) ", console_of(neighbour, "pinger").decode()))) > before,
             10, "the neighbour's ping to go on")
    vni = neighbour.cairn("network", "get", "home")["status"]["vni"]
    mine, theirs = stack.names, neighbour.names
    assert mine != theirs and theirs.bridge(vni) in Path("/proc/net/dev").read_text()
    ports = [p["id"] for c in ("peer", "pinger")
             for p in neighbour.cairn("container", "get", c)["status"]["ports"]]
    table = subprocess.run(["nft", "list", "table", "inet", theirs.sg_table], capture_output=True, text=True).stdout
    assert all(f"egress_ve{p.replace('-', '')[:10]}" in table for p in ports), table[-800:]
