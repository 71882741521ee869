"""Live migration through the control plane between two libvirt "nodes" on this
machine (each libvirtd in its own mount namespace, each with its own agent), the
guest staying alive: its serial heartbeat goes on after the move."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.agent import Agent
from appliance.agent.instances import InstanceReconciler, domain_name
from appliance.db.engine import session_scope
from appliance.db.models import Claim, Instance, Node, Project, Task
from appliance.errors import Conflict
from appliance.processes import prepare
from appliance.services import auth, images, instances
from appliance.settings import Settings
from appliance.tasks import runner
from compute.libvirt_driver import LibvirtDriver
from compute.libvirt_node import LibvirtNode
from compute.testguest import ensure_test_guest

pytestmark = pytest.mark.functional


class Node2:
    def __init__(self, base: Path, name: str, url: str) -> None:
        self.libvirt = LibvirtNode(base / "libvirt", name)
        self.libvirt.start()
        self.settings = Settings(data_dir=base / name, database_url=url, node_name=name,
                                 libvirt_uri=self.libvirt.uri, migration_host="127.0.0.1",
                                 heartbeat_interval=0.2, instance_start_timeout=60)
        self.driver = LibvirtDriver(self.libvirt.uri, "auto", "127.0.0.1")
        self.agent = Agent(self.settings)
        self.agent.register_reconciler("instances", InstanceReconciler(self.settings, {"vm": self.driver}),
                                       kinds=("vm",))
        self.thread = threading.Thread(target=self.agent.serve, daemon=True)

    def stop(self) -> None:
        self.agent.stop()
        if self.thread.is_alive():
            self.thread.join(10)
        self.driver.close()
        self.libvirt.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node2, Node2, str]]:
    base = tmp_path_factory.mktemp("mig")
    url = f"sqlite:///{base / 'cairn.db'}"
    prepare(Settings(data_dir=base / "ctl", database_url=url))
    nodes: list[Node2] = []
    try:
        for name in ("mig-a", "mig-b"):
            nodes.append(Node2(base, name, url))
        guest = ensure_test_guest()
        with session_scope(url) as session:
            project = session.query(Project).filter_by(name="default").one()
            images.record(session, project.id, "tiny-guest", {"kind": "vm", "format": "kernel",
                                                             "kernel": guest.kernel, "initrd": guest.initrd})
        yield nodes[0], nodes[1], url
    finally:
        for n in nodes:
            n.stop()


def run(url: str, settings: Settings, monkeypatch: Any, fn: Any, *args: Any) -> dict[str, Any]:
    monkeypatch.setattr("appliance.tasks.runner.get_settings", lambda: settings)
    monkeypatch.setattr("appliance.tasks.instances.get_settings", lambda: settings)
    with session_scope(url) as session:
        admin = auth.principal_for(session, auth._user(session, "admin"), "token")
        task = fn(session, admin, *args)
    runner.run_task(task["id"])
    with session_scope(url) as session:
        row = session.get(Task, task["id"])
        assert row is not None
        return {"state": row.state, "error": row.error, "result": row.result}


def qemu_uid(domain: str) -> int:
    """The real uid of the QEMU process running ``domain``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" in cmdline and f"guest={domain},".encode() in cmdline:
            return int((proc / "status").read_text().split("Uid:")[1].split()[0])
    raise AssertionError(f"no QEMU process runs {domain}")


def heartbeats(log: Path) -> int:
    found = re.findall(rb"HB (\d+)", log.read_bytes()) if log.exists() else []
    return max((int(n) for n in found), default=0)


def test_live_migration_keeps_the_guest_running(pair: tuple[Node2, Node2, str], monkeypatch: Any) -> None:
    a, b, url = pair
    a.agent.run_once()  # only node a is registered: the VM lands there
    a.thread.start()
    created = run(url, a.settings, monkeypatch, instances.create, "vm", "default", "mover",
                  {"cpu": 1, "memory": "192MiB", "image": "tiny-guest"})
    assert created["state"] == "succeeded", created["error"]
    b.agent.run_once()
    b.thread.start()
    with session_scope(url) as session:
        row = session.query(Instance).filter_by(name="mover").one()
        name, log = domain_name(row), a.settings.instances_dir / domain_name(row) / "serial.log"
    deadline = time.monotonic() + 60
    while heartbeats(log) < 2:
        assert time.monotonic() < deadline, "the guest never booted"
        time.sleep(0.2)
    before = heartbeats(log)
    moved = run(url, a.settings, monkeypatch, instances.migrate, "vm", "default", "mover", "mig-b")
    assert moved["state"] == "succeeded", moved["error"]
    assert moved["result"]["mode"] == "live" and moved["result"]["duration_s"] > 0
    assert name in b.driver.list_instances() and name not in a.driver.list_instances()
    # on b its console files are in b's folder (b's data directory is elsewhere)
    log_b = b.settings.instances_dir / name / "serial.log"
    deadline = time.monotonic() + 30
    while heartbeats(log_b) < before + 3:  # the same guest keeps counting: it was never rebooted
        assert time.monotonic() < deadline, "the guest stopped after the migration"
        time.sleep(0.2)
    assert log.read_bytes().count(b"CAIRN-GUEST-UP") == 1 and b"CAIRN-GUEST-UP" not in log_b.read_bytes()
    # b runs it as an unprivileged uid of b's own, granted b's files (not a's uid, not root)
    qemu = qemu_uid(name)
    label = json.loads((b.settings.instances_dir / name / "dac.json").read_text())
    assert qemu == label["uid"] != 0 and moved["result"]["run_as"] == [label["uid"], label["gid"]]
    deadline = time.monotonic() + 10
    while (a.settings.instances_dir / name / "dac.json").exists():  # a gave its uid back
        assert time.monotonic() < deadline, "the old node kept the guest's uid"
        time.sleep(0.2)
    assert log.exists()  # its console history up to the move stays there for a while
    with session_scope(url) as session:
        row = session.query(Instance).filter_by(name="mover").one()
        node_b = session.query(Node).filter_by(name="mig-b").one()
        assert row.node_id == node_b.id and row.task_state is None and row.status["node"] == "mig-b"
        assert session.query(Claim).filter_by(workload_id=row.id, node_id=node_b.id).count() == 1
        assert session.query(Claim).count() == 1
    time.sleep(1)  # two more agent passes: nobody re-creates or removes it
    assert name in b.driver.list_instances() and name not in a.driver.list_instances()
    with session_scope(url) as session, pytest.raises(Conflict, match="already runs on 'mig-b'"):
        admin = auth.principal_for(session, auth._user(session, "admin"), "token")
        instances.migrate(session, admin, "vm", "default", "mover", "mig-b")
    assert run(url, a.settings, monkeypatch, instances.delete, "vm", "default", "mover")["state"] == "succeeded"
    assert name not in b.driver.list_instances()
