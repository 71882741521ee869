"""VM / container bookkeeping before any hypervisor: sizes, the shortfall check,
and the task_state compare-and-swap that keeps two operations off one instance."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.models import Instance, Project
from appliance.errors import Conflict, InvalidInput
from appliance.services import auth, images, instances, nodes

from .conftest import Api

GIB = 1 << 30
INV: dict[str, Any] = {"cpu_model": "fake", "cores": 4, "threads": 4, "numa_nodes": 1, "memory_bytes": 9 * GIB,
                       "disks": [], "nics": [], "virt_type": "qemu"}


@pytest.mark.unit
@pytest.mark.parametrize(("text", "size"), [("256MiB", 256 << 20), ("1GiB", GIB), ("2G", 2 * GIB),
                                            ("512", 512), (1024, 1024), ("1.5GiB", 3 * GIB // 2)])
def test_parse_size(text: Any, size: int) -> None:
    assert instances.parse_size(text) == size


@pytest.mark.unit
def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(InvalidInput, match="must look like 256MiB"):
        instances.parse_size("lots")


@pytest.fixture
def world(api: Api, sent: list[Any]) -> tuple[Api, Any]:
    url = api.settings.resolved_database_url
    with session_scope(url) as session:
        nodes.register(session, "n1", INV, allocatable(INV))
        project = session.query(Project).filter_by(name="default").one()
        kernel = api.settings.data_dir / "vmlinuz"
        kernel.write_bytes(b"k")
        images.record(session, project.id, "tiny", {"kind": "vm", "format": "kernel", "kernel": str(kernel)})
        images.record(session, project.id, "busybox", {"kind": "container", "format": "oci", "archive": str(kernel)})
    return api, url


def admin(session: Any) -> Any:
    return auth.principal_for(session, auth._user(session, "admin"), "token")


@pytest.mark.functional
def test_more_than_any_node_has_is_refused_naming_the_shortfall(world: Any) -> None:
    _, url = world
    spec = {"cpu": 1, "memory": "64GiB", "image": "tiny"}
    with session_scope(url) as session, pytest.raises(InvalidInput, match=r"64\.00 GiB of memory but the largest"):
        instances.create(session, admin(session), "vm", "default", "big", spec)
    with session_scope(url) as session, pytest.raises(InvalidInput, match="16 CPUs but the largest node has 4"):
        instances.create(session, admin(session), "vm", "default", "big", {**spec, "cpu": 16, "memory": "1GiB"})
    with session_scope(url) as session, pytest.raises(InvalidInput, match="whole number of vCPUs"):
        instances.create(session, admin(session), "vm", "default", "big", {**spec, "cpu": 0.5, "memory": "1GiB"})


@pytest.mark.functional
def test_two_operations_on_one_instance_one_wins_the_other_gets_409(world: Any, sent: list[Any]) -> None:
    _, url = world
    with session_scope(url) as session:
        task = instances.create(session, admin(session), "vm", "default", "web",
                                {"cpu": 1, "memory": "256MiB", "image": "tiny"})
    assert task["name"] == "instance.create" and sent[-1][1] == "cluster"
    with session_scope(url) as session:
        row = session.get(Instance, task["resource"]["id"])
        assert row is not None and row.task_state == "scheduling"
        row.vm_state, row.task_state = "active", None
    with session_scope(url) as session:
        first = instances.action(session, admin(session), "vm", "default", "web", "stop")
    assert first["params"]["power"] == "stopped"
    with session_scope(url) as session, pytest.raises(Conflict, match="busy \\(stopping\\)"):
        instances.action(session, admin(session), "vm", "default", "web", "reboot")
    with session_scope(url) as session:
        row = session.get(Instance, task["resource"]["id"])
        assert row is not None
        row.vm_state, row.task_state = "stopped", None
    with session_scope(url) as session, pytest.raises(Conflict, match="is stopped: cannot paus"):
        instances.action(session, admin(session), "vm", "default", "web", "pause")
    with session_scope(url) as session, pytest.raises(Conflict, match="already exists"):
        instances.create(session, admin(session), "vm", "default", "web", {"cpu": 1, "memory": "1GiB",
                                                                           "image": "tiny"})
    # a container may share the VM's name: kinds are separate namespaces
    with session_scope(url) as session:
        instances.create(session, admin(session), "container", "default", "web",
                         {"cpu": 0.5, "memory": "64MiB", "image": "busybox"})


@pytest.mark.functional
def test_invalid_cloud_init_is_refused_before_anything_is_recorded(world: Any) -> None:
    _, url = world
    spec = {"cpu": 1, "memory": "256MiB", "image": "tiny", "user_data": "#cloud-config\nusers: [unclosed\n"}
    with session_scope(url) as session, pytest.raises(InvalidInput, match="user_data"):
        instances.create(session, admin(session), "vm", "default", "ci", spec)
    with session_scope(url) as session:
        assert session.query(Instance).count() == 0


@pytest.mark.functional
def test_a_volume_owned_by_a_node_is_refused_naming_it_and_its_tasks_go_there(world: Any) -> None:
    from appliance.db.models import Node
    from appliance.services import pools, volumes

    api, url = world
    with session_scope(url) as session:
        nodes.register(session, "n2", INV, allocatable(INV))
        pools.create(session, None, "default", "n2", "local", str(api.settings.data_dir / "pool"))
        pool = pools.row(session, "default")
        volumes.volumes.create(session, admin(session), "default", "shared",
                               {"pool": "default", "class": "dedup", "size_bytes": 1 << 20, "labels": {}},
                               {"phase": "Available", "owner": "n1"}, pool_id=pool.id, storage_class="dedup",
                               size=1 << 20)
    spec = {"cpu": 1, "memory": "64MiB", "image": "tiny", "volumes": ["shared"]}
    with session_scope(url) as session, pytest.raises(Conflict, match="owned by node 'n1'"):
        instances.create(session, admin(session), "vm", "default", "v2", spec)
    with session_scope(url) as session:
        vol = volumes.volumes.row(session, admin(session), "default", "shared")[0]
        assert volumes.queue_for(session, vol) == "node.n1"  # only the owner may move its head
        session.query(Node).filter_by(name="n1").one().phase = "NotReady"
    with session_scope(url) as session, pytest.raises(Conflict, match="n1', which is NotReady: it must be fenced"):
        instances.create(session, admin(session), "vm", "default", "v2", spec)
    with session_scope(url) as session:
        vol = volumes.volumes.row(session, admin(session), "default", "shared")[0]
        assert volumes.queue_for(session, vol) == "node.n2"  # the pool's node while the owner is down
        vol.status = {**vol.status, "owner": None}
    with session_scope(url) as session:
        instances.create(session, admin(session), "vm", "default", "v2", spec)  # free: accepted
