"""The VM / container flow with the compute library's fake drivers (unit-level for
the hypervisor, real for everything else: database, scheduler, tasks, agent):
create → schedule → define → start, lifecycle actions, crash observation, delete."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.agent import Agent
from appliance.agent.instances import InstanceReconciler, domain_name
from appliance.db.engine import session_scope
from appliance.db.models import Claim, Event, Instance, Project, Task
from appliance.errors import InvalidInput, NotFound
from appliance.services import auth, images, instances
from appliance.tasks import runner
from compute.fake import FakeDriver, fake_container_driver, fake_vm_driver
from compute.spec import PowerState

from .conftest import Api

pytestmark = pytest.mark.functional


class Cluster:
    def __init__(self, api: Api, tmp: Path) -> None:
        self.api = api
        self.url = api.settings.resolved_database_url
        self.settings = api.settings
        self.settings.heartbeat_interval = 0.1
        self.vm: FakeDriver[Any] = fake_vm_driver(cpus=8, memory_mib=16384)
        self.ct: FakeDriver[Any] = fake_container_driver(cpus=8, memory_mib=16384)
        self.agent = Agent(self.settings)
        self.agent.register_reconciler("instances", InstanceReconciler(self.settings, {"vm": self.vm,
                                                                                       "container": self.ct}),
                                       kinds=("vm", "container"))
        self.thread = threading.Thread(target=self.agent.serve, daemon=True)
        kernel = tmp / "vmlinuz"
        kernel.write_bytes(b"kernel")
        archive = tmp / "busybox.tar"
        archive.write_bytes(b"oci")
        with session_scope(self.url) as session:
            project = session.query(Project).filter_by(name="default").one()
            images.record(session, project.id, "tiny", {"kind": "vm", "format": "kernel", "kernel": str(kernel)})
            images.record(session, project.id, "busybox", {"kind": "container", "format": "oci",
                                                           "archive": str(archive), "command": ["/bin/sh"]})

    def admin(self, session: Any) -> Any:
        return auth.principal_for(session, auth._user(session, "admin"), "token")

    def run(self, fn: Any, *args: Any) -> dict[str, Any]:
        """Call a service that records a task, then run that task like a worker would."""
        with session_scope(self.url) as session:
            task = fn(session, self.admin(session), *args)
        runner.run_task(task["id"])
        with session_scope(self.url) as session:
            row = session.get(Task, task["id"])
            assert row is not None
            return {"state": row.state, "error": row.error, "result": row.result, "id": row.id}

    def instance(self, kind: str, name: str) -> Instance:
        with session_scope(self.url) as session:
            row = session.query(Instance).filter_by(kind=kind, name=name).one()
            session.expunge(row)
            return row


@pytest.fixture
def cluster(api_sqlite: Api, tmp_path: Path, sent: list[Any], monkeypatch: Any) -> Iterator[Cluster]:
    monkeypatch.setattr("appliance.tasks.runner.get_settings", lambda: api_sqlite.settings)
    monkeypatch.setattr("appliance.tasks.instances.get_settings", lambda: api_sqlite.settings)
    api_sqlite.settings.instance_start_timeout = 20
    c = Cluster(api_sqlite, tmp_path)
    c.agent.run_once()  # registers node-a
    c.thread.start()
    yield c
    c.agent.stop()
    c.thread.join(10)


VM = {"cpu": 1, "memory": "256MiB", "image": "tiny"}


def test_vm_create_schedules_defines_and_starts(cluster: Cluster) -> None:
    task = cluster.run(instances.create, "vm", "default", "web", VM)
    assert task["state"] == "succeeded", task["error"]
    row = cluster.instance("vm", "web")
    assert (row.vm_state, row.task_state, row.power_state) == ("active", None, "running")
    name = domain_name(row)
    assert cluster.vm.power_state(name) is PowerState.RUNNING
    assert b"CAIRN-MARKER" in cluster.vm.console_log(name)
    with session_scope(cluster.url) as session:
        claim = session.query(Claim).filter_by(workload_id=row.id).one()
        assert claim.memory_bytes == 256 << 20
    with session_scope(cluster.url) as session:
        progress = [e.object["progress"]["message"] for e in session.query(Event).filter_by(kind="task")]
    steps = [m.split(":")[0] for m in progress]
    for step in ("schedule", "volumes", "ports", "define", "start"):
        assert step in steps, steps


def test_lifecycle_actions_reach_the_driver(cluster: Cluster) -> None:
    assert cluster.run(instances.create, "vm", "default", "app", VM)["state"] == "succeeded"
    name = domain_name(cluster.instance("vm", "app"))
    for verb, power, vm_state in [("stop", PowerState.SHUTDOWN, "stopped"), ("start", PowerState.RUNNING, "active"),
                                  ("pause", PowerState.PAUSED, "paused"), ("resume", PowerState.RUNNING, "active")]:
        task = cluster.run(instances.action, "vm", "default", "app", verb)
        assert task["state"] == "succeeded", (verb, task["error"])
        assert cluster.vm.power_state(name) is power
        assert cluster.instance("vm", "app").vm_state == vm_state
    boots = cluster.vm._instances[name].boots
    assert cluster.run(instances.action, "vm", "default", "app", "reboot")["state"] == "succeeded"
    assert cluster.vm._instances[name].boots == boots + 1


def test_a_guest_that_dies_by_itself_is_seen_within_seconds(cluster: Cluster) -> None:
    assert cluster.run(instances.create, "vm", "default", "fragile", VM)["state"] == "succeeded"
    name = domain_name(cluster.instance("vm", "fragile"))
    cluster.vm._instances[name].state = PowerState.CRASHED  # the guest crashed under us
    started = time.monotonic()
    while not cluster.instance("vm", "fragile").status.get("unexpected_stops"):
        assert time.monotonic() - started < 5, "the crash was not reported within 5 s"
        time.sleep(0.05)
    status = cluster.instance("vm", "fragile").status
    assert status["last_unexpected_stop"]["state"] == "crashed"
    # desired state is running: the agent started it again
    assert cluster.vm._instances[name].boots >= 2


def test_containers_use_the_same_flow(cluster: Cluster) -> None:
    spec = {"cpu": 0.5, "memory": "64MiB", "image": "busybox", "command": ["sleep", "1000"]}
    task = cluster.run(instances.create, "container", "default", "worker", spec)
    assert task["state"] == "succeeded", task["error"]
    name = domain_name(cluster.instance("container", "worker"))
    assert cluster.ct.power_state(name) is PowerState.RUNNING
    assert cluster.ct._instances[name].spec.command == ("sleep", "1000")


def test_no_room_fails_the_task_with_the_schedulers_reasons(cluster: Cluster) -> None:
    big = {"cpu": 1, "memory": "14GiB", "image": "tiny"}  # the node has 24 GiB less a reserve
    assert cluster.run(instances.create, "vm", "default", "a", big)["state"] == "succeeded"
    failed = cluster.run(instances.create, "vm", "default", "b", big)
    assert failed["state"] == "failed" and "short of memory" in failed["error"]
    row = cluster.instance("vm", "b")
    assert row.vm_state == "error" and row.task_state is None


def test_missing_or_wrong_image_is_refused_before_any_task(cluster: Cluster) -> None:
    with session_scope(cluster.url) as session, pytest.raises(NotFound, match="no image 'nope'"):
        instances.create(session, cluster.admin(session), "vm", "default", "ghost", {**VM, "image": "nope"})
    with session_scope(cluster.url) as session, pytest.raises(InvalidInput, match="is a container image"):
        instances.create(session, cluster.admin(session), "vm", "default", "ghost", {**VM, "image": "busybox"})


def test_delete_removes_it_everywhere_and_frees_the_claim(cluster: Cluster) -> None:
    assert cluster.run(instances.create, "vm", "default", "tmp", VM)["state"] == "succeeded"
    row = cluster.instance("vm", "tmp")
    name = domain_name(row)
    assert cluster.run(instances.delete, "vm", "default", "tmp")["state"] == "succeeded"
    assert name not in cluster.vm.list_instances()
    with session_scope(cluster.url) as session:
        assert session.get(Instance, row.id) is None
        assert session.query(Claim).filter_by(workload_id=row.id).count() == 0


def test_user_data_reaches_the_guest_as_a_nocloud_seed(cluster: Cluster) -> None:
    from compute.cloudinit import read_seed_iso

    spec = {**VM, "user_data": "#cloud-config\nhostname: seeded\n"}
    assert cluster.run(instances.create, "vm", "default", "seeded", spec)["state"] == "succeeded"
    vm_spec = cluster.vm._instances[domain_name(cluster.instance("vm", "seeded"))].spec
    cdrom = next(d for d in vm_spec.disks if d.device == "cdrom")
    files = read_seed_iso(Path(cdrom.source.path).read_bytes())
    assert "hostname: seeded" in files["user-data"]
    assert cluster.instance("vm", "seeded").id in files["meta-data"]


def test_orphans_are_removed_but_hand_made_instances_are_left_alone(cluster: Cluster, tmp_path: Path) -> None:
    from compute.spec import Consoles, VmSpec

    for name in ("cairn-ghost-0123abcd", "handmade-0123abcd"):
        cluster.vm.define(VmSpec(name=name, vcpus=1, memory_mib=64,
                                 consoles=Consoles(serial_log=str(tmp_path / f"{name}.log"))))
    deadline = time.monotonic() + 5
    while "cairn-ghost-0123abcd" in cluster.vm.list_instances():
        assert time.monotonic() < deadline, "the orphan was not removed"
        time.sleep(0.05)
    assert "handmade-0123abcd" in cluster.vm.list_instances()


def test_a_crash_looping_instance_is_restarted_with_backoff(cluster: Cluster) -> None:
    assert cluster.run(instances.create, "vm", "default", "loopy", VM)["state"] == "succeeded"
    name = domain_name(cluster.instance("vm", "loopy"))
    boots = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # it dies again as soon as it comes up
        if cluster.vm._instances[name].state is PowerState.RUNNING:
            boots.append(time.monotonic())
            cluster.vm._instances[name].state = PowerState.CRASHED
        time.sleep(0.02)
    # 1 s, 2 s, 4 s … between restarts: a handful in 6 s, not one per agent pass (0.1 s)
    assert 2 <= len(boots) <= 5, boots
    assert boots[-1] - boots[-2] >= 1.0
