"""Secrets and long-lived streams (issue 11, items 10 and 8) through the in-process API:
viewers see no container env, cloud-init user_data, exec command or output (in the
resources, the tasks and the event stream); the event stream and console websockets
close within seconds when their caller's token is revoked, the user is removed from
the project or deleted, and one user holds a bounded number of them.
test_live_stack repeats the stream attacks over HTTPS against the running appliance."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from starlette.websockets import WebSocketDisconnect

from appliance.db.engine import session_scope
from appliance.db.models import Instance, Project
from appliance.services import tasks

from .conftest import Api

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def world(module_api_sqlite: Api) -> Iterator[Api]:
    s = module_api_sqlite.settings
    s.stream_recheck_seconds, s.max_streams_per_user = 0.5, 3
    yield module_api_sqlite


# --- item 10: secrets --------------------------------------------------------------------

def test_viewers_see_no_env_user_data_or_exec_output(world: Api) -> None:
    api = world
    url = api.settings.resolved_database_url
    viewer = api.headers_for("vic", project="default", role="viewer")
    operator = api.headers_for("opal", project="default", role="operator")
    with session_scope(url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        session.add(Instance(name="ct-secret", kind="container", project_id=project.id, vm_state="active",
                             spec={"cpu": 1, "memory_bytes": 1 << 26, "image": "x", "env": {"DB_PASSWORD": "hunter2"}}))
        session.add(Instance(name="vm-secret", kind="vm", project_id=project.id, vm_state="active",
                             spec={"cpu": 1, "memory_bytes": 1 << 26, "image": "x",
                                   "user_data": "#cloud-config\npassword: hunter2\n"}))
        task = tasks.create(session, "container.exec", {"instance_id": "x", "command": ["sh", "-c", "echo hunter2"]},
                            queue="node.n1", principal=None, project_id=project.id)
        session.flush()
        tasks.claim(session, task["id"], "w")
        tasks.finish(session, task["id"], "succeeded", result={"returncode": 0, "stdout": "hunter2\n", "stderr": ""})
    seen = [api.client.get("/api/v1/containers/ct-secret", headers=viewer).text,
            api.client.get("/api/v1/vms/vm-secret", headers=viewer).text,
            api.client.get("/api/v1/containers", headers=viewer).text,
            api.client.get("/api/v1/vms", headers=viewer).text,
            api.client.get(f"/api/v1/tasks/{task['id']}", headers=viewer).text,
            api.client.get("/api/v1/tasks", headers=viewer).text,
            api.client.get("/api/v1/events", params={"since": 0, "max_seconds": 0.5}, headers=viewer).text]
    for body in seen:
        assert "hunter2" not in body, body[:300]
    assert "DB_PASSWORD" in seen[0] and "(hidden" in seen[0]  # the shape stays
    assert "hunter2" in api.client.get("/api/v1/containers/ct-secret", headers=operator).text
    assert "hunter2" in api.client.get(f"/api/v1/tasks/{task['id']}", headers=operator).text


# --- item 8: streams ---------------------------------------------------------------------

def sse_reason(api: Api, headers: dict[str, str], act: Any, seconds: float = 10) -> str:
    """Open the event stream, ``act()`` once it flows; the ``closed`` reason it ends with."""
    with api.client.stream("GET", "/api/v1/events", params={"max_seconds": seconds}, headers=headers) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == ": connected"
        act()
        started = time.monotonic()
        for line in lines:
            if line.startswith("data: ") and "reason" in line:
                assert time.monotonic() - started < 3, "closed too late"
                return str(json.loads(line[6:])["reason"])
    raise AssertionError("the stream was never closed")


def test_event_streams_close_when_the_callers_rights_go(world: Api) -> None:
    api = world
    eve = api.headers_for("eve", project="default", role="viewer")
    assert "removed from project 'default'" in sse_reason(
        api, eve, lambda: api.client.delete("/api/v1/projects/default/members/eve", headers=api.admin))
    token = api.client.post("/api/v1/tokens", json={"name": "sse"}, headers=api.admin).json()["token"]
    mine = {"Authorization": f"Bearer {token}"}
    assert "revoked" in sse_reason(api, mine, lambda: api.client.delete("/api/v1/tokens/sse", headers=mine))
    gone = api.headers_for("gone", project="default", role="viewer")
    assert "unknown or was revoked" in sse_reason(
        api, gone, lambda: api.client.delete("/api/v1/users/gone", headers=api.admin))


def test_a_user_holds_a_bounded_number_of_streams(world: Api) -> None:
    api = world
    greedy = api.headers_for("greedy", project="default", role="viewer")
    limiter = api.client.app.state.streams  # type: ignore[attr-defined]
    short = {"max_seconds": 2}
    with api.client.stream("GET", "/api/v1/events", params=short, headers=greedy) as a, \
            api.client.stream("GET", "/api/v1/events", params=short, headers=greedy) as b, \
            api.client.stream("GET", "/api/v1/events", params=short, headers=greedy) as c:
        assert {a.status_code, b.status_code, c.status_code} == {200}
        r = api.client.get("/api/v1/events", params={"max_seconds": 1}, headers=greedy)
        assert r.status_code == 429 and "already holds 3" in r.json()["detail"]
        assert api.client.get("/api/v1/events", params={"max_seconds": 0.3}, headers=api.admin).status_code == 200
    deadline = time.monotonic() + 5
    while limiter.count(_user_id(api, "greedy")):  # ended streams give their slots back
        assert time.monotonic() < deadline, "ended streams still hold their slots"
        time.sleep(0.05)
    assert api.client.get("/api/v1/events", params={"max_seconds": 0.3}, headers=greedy).status_code == 200


def _user_id(api: Api, name: str) -> str:
    from appliance.db.models import User

    with session_scope(api.settings.resolved_database_url, readonly=True) as session:
        return str(session.scalar(select(User.id).where(User.name == name)))


class EchoConsole:
    """A unix socket standing in for a guest's serial port (echoes what it gets)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    @staticmethod
    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass  # the API hung up mid-echo (a console it closed)


def test_a_console_closes_when_its_token_is_revoked(world: Api, tmp_path: Path) -> None:
    api = world
    console = EchoConsole(tmp_path / "serial.sock")
    with session_scope(api.settings.resolved_database_url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        session.add(Instance(name="ws-vm", kind="vm", project_id=project.id, vm_state="active",
                             spec={"cpu": 1, "memory_bytes": 1 << 26, "image": "x"},
                             status={"consoles": [{"kind": "serial-unix", "path": str(console.path)}]}))
    api.headers_for("oscar", project="default", role="operator")
    token = api.client.post("/api/v1/tokens", json={"name": "ws"},
                            headers=api.headers_for("oscar")).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    with api.client.websocket_connect("/api/v1/vms/ws-vm/console/serial", headers=headers) as ws:
        ws.send_bytes(b"ping")
        assert ws.receive_bytes() == b"ping"
        api.client.delete("/api/v1/tokens/ws", headers=headers)
        started = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                ws.receive_bytes()
        assert time.monotonic() - started < 3
    assert closed.value.code == 1008 and "revoked" in closed.value.reason
    console.server.close()
    opened = api.client.get("/api/v1/audit", params={"user": "oscar"}, headers=api.admin).json()["items"]
    assert any(a["action"] == "WEBSOCKET serial-unix console" and a["status"] == 101 and
               a["object"] == {"kind": "vm", "name": "ws-vm", "project": "default"} for a in opened)


@pytest.mark.parametrize(("user", "how", "reason"), [
    ("cora", "removed from the project", "was removed from project 'default'"),
    ("dell", "deleted", "unknown or was revoked"),
])
def test_a_console_closes_when_its_user_leaves_the_project_or_is_deleted(world: Api, tmp_path: Path, user: str,
                                                                         how: str, reason: str) -> None:
    api = world
    console = EchoConsole(tmp_path / "serial.sock")
    vm = f"ws-{user}"
    with session_scope(api.settings.resolved_database_url) as session:
        project = session.scalar(select(Project).where(Project.name == "default"))
        assert project is not None
        session.add(Instance(name=vm, kind="vm", project_id=project.id, vm_state="active",
                             spec={"cpu": 1, "memory_bytes": 1 << 26, "image": "x"},
                             status={"consoles": [{"kind": "serial-unix", "path": str(console.path)}]}))
    headers = api.headers_for(user, project="default", role="operator")
    try:
        with api.client.websocket_connect(f"/api/v1/vms/{vm}/console/serial", headers=headers) as ws:
            ws.send_bytes(b"ping")
            assert ws.receive_bytes() == b"ping"
            path = f"/api/v1/projects/default/members/{user}" if how != "deleted" else f"/api/v1/users/{user}"
            assert api.client.delete(path, headers=api.admin).status_code == 204
            started = time.monotonic()
            with pytest.raises(WebSocketDisconnect) as closed:
                while time.monotonic() - started < 5:
                    ws.send_bytes(b"still there?")  # the user types on
                    ws.receive_bytes()
            assert time.monotonic() - started < 3
        assert closed.value.code == 1008 and reason in closed.value.reason, closed.value.reason
    finally:
        console.server.close()
