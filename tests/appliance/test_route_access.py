"""Walks EVERY operation in the OpenAPI document and proves that anonymous callers,
viewers and members of another project are refused where they must be.

Each route declares its rule in ``x-cairn-access`` (see appliance.api.deps.access);
a route without one fails this test, so new routes cannot skip the walk."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.db.engine import session_scope
from appliance.services import auth, groups, images, instances, networks, nodes, pools, routers, tasks, volumes

from .conftest import Api
from .test_resources import INVENTORY

pytestmark = pytest.mark.functional

# Routes that authenticate with a credential of their own, not a user's (a join token: a
# single-node walk has none to offer; tests/cluster exercises them for real).
OWN_CREDENTIALS = {("post", "/api/v1/cluster/join")}
BODIES: dict[tuple[str, str], Any] = {
    ("post", "/api/v1/auth/login"): {"username": "admin", "password": "filled in by call()"},
    ("post", "/api/v1/auth/password"): {"current_password": "filled in by call()", "new_password": "x" * 12},
    ("patch", "/api/v1/users/{name}"): {"active": True},
    ("put", "/api/v1/projects/{name}/quota"): {"instances": 100},
    ("post", "/api/v1/projects"): {"name": "walk-p"},
    ("patch", "/api/v1/projects/{name}"): {"spec": {"description": "walked"}},
    ("put", "/api/v1/projects/{name}/members/{user}"): {"role": "viewer"},
    ("post", "/api/v1/users"): {"name": "walk-u", "password": "long enough password"},
    ("post", "/api/v1/tokens"): {"name": "walk-t"},
    ("post", "/api/v1/cluster/tokens"): {"ttl_seconds": 60},
    ("post", "/api/v1/cluster/join"): {"token": "CJ1.walk.walk.walk", "name": "walk-n", "address": "10.0.0.9",
                                       "csr": "-----BEGIN CERTIFICATE REQUEST-----" + "A" * 80},
    ("patch", "/api/v1/nodes/{name}"): {"spec": {"schedulable": True}},
    ("post", "/api/v1/nodes/{name}/benchmark"): {"seconds": 1},
    ("post", "/api/v1/placement-groups"): {"name": "walk-g2", "spec": {"policy": "affinity"}},
    ("post", "/api/v1/networks"): {"name": "walk-n2", "spec": {"cidr": "10.99.0.0/24"}},
    ("post", "/api/v1/subnets"): {"name": "walk-sub2", "spec": {"network": "walk-n", "cidr": "10.98.0.0/24"}},
    ("post", "/api/v1/subnets/{name}/reservations"): {"address": "10.77.0.50"},
    ("post", "/api/v1/ports"): {"name": "walk-p2", "spec": {"network": "walk-n"}},
    ("post", "/api/v1/security-groups"): {"name": "walk-s2"},
    ("post", "/api/v1/security-groups/{name}/rules"): {"protocol": "tcp", "port_min": 22, "port_max": 22},
    ("post", "/api/v1/vms"): {"name": "walk-vm2", "spec": {"cpu": 1, "memory": "256MiB", "image": "walk-img"}},
    ("post", "/api/v1/containers/{name}/exec"): {"command": ["true"]},
    ("post", "/api/v1/vms/{name}/migrate"): {"to": "node-1"},
    ("post", "/api/v1/containers/{name}/migrate"): {"to": "node-1"},
    ("post", "/api/v1/containers"): {"name": "walk-ct2", "spec": {"cpu": 1, "memory": "64MiB", "image": "walk-oci"}},
    ("post", "/api/v1/pools"): {"name": "walk-pool2", "node": "node-1", "url": "/tmp/walk-pool2"},
    ("post", "/api/v1/volumes"): {"name": "walk-vol2", "size": "1GiB"},
    ("post", "/api/v1/volumes/{name}/resize"): {"size": "2GiB"},
    ("post", "/api/v1/volumes/{name}/rollback"): {"snapshot": "walk-snap"},
    ("post", "/api/v1/volumes/{name}/clone"): {"snapshot": "walk-snap", "name": "walk-vol3"},
    ("post", "/api/v1/volumes/{name}/snapshots"): {"name": "walk-snap2"},
    ("post", "/api/v1/vms/{name}/snapshots"): {"name": "walk-vsnap"},
    ("post", "/api/v1/vms/{name}/restore"): {"snapshot": "walk-snap"},
    ("post", "/api/v1/vms/{name}/clone"): {"snapshot": "walk-snap", "name": "walk-vm3"},
    # the upload's name exists: the walk is refused before any byte is read (409 for the admin)
    ("put", "/api/v1/images/{name}/upload"): {"not": "an image"},
    ("post", "/api/v1/routers"): {"name": "walk-r2"},
    ("post", "/api/v1/routers/{name}/port-forwards"): {"external_port": 2222, "internal_port": 22,
                                                       "internal_address": "10.77.0.9"},
    ("post", "/api/v1/routers/{name}/add-interface"): {"network": "walk-n"},
    ("post", "/api/v1/routers/{name}/remove-interface"): {"network": "walk-n"},
    ("post", "/api/v1/floating-ips"): {"name": "walk-f2"},
    ("post", "/api/v1/floating-ips/{name}/associate"): {"port": "walk-fp"},
}
QUERY: dict[str, dict[str, Any]] = {"/api/v1/events": {"max_seconds": 0.3}}
WRITES = ("write", "admin")


def operations(api: Api) -> list[tuple[str, str, dict[str, Any]]]:
    schema = api.client.get("/api/v1/openapi.json").json()
    return [(method, path, op) for path, item in schema["paths"].items() for method, op in item.items()]


def fill(path: str, task_id: str) -> str:
    parts = path.split("/")
    kind = parts[3] if len(parts) > 3 else ""
    name = {"nodes": "node-1", "projects": "default", "users": "admin", "tokens": "nope",
            "placement-groups": "walk-g", "networks": "walk-n", "subnets": "walk-n-4", "ports": "walk-p",
            "security-groups": "walk-s", "images": "walk-img", "vms": "walk-vm", "containers": "walk-ct",
            "volumes": "walk-vol", "pools": "default", "routers": "walk-r", "floating-ips": "walk-f",
            }.get(kind, "x")
    return (path.replace("{name}", name).replace("{user}", "viewer1").replace("{task_id}", task_id)
            .replace("{rule_id}", "norule").replace("{action}", "stop").replace("{snapshot}", "walk-snap"))


def call(api: Api, method: str, path: str, task_id: str, headers: dict[str, str]) -> int:
    body = BODIES.get((method, path))
    if path == "/api/v1/auth/login":
        body = {"username": "admin", "password": api.admin_password}
    if path == "/api/v1/auth/password":  # the caller's own (the walk's users share one password)
        own = api.admin_password if headers is api.admin else "correct horse battery"
        body = {"current_password": own, "new_password": own + "-walked"}
    r = api.client.request(method.upper(), fill(path, task_id), json=body, headers=headers,
                           params=QUERY.get(path))
    api.client.cookies.clear()  # a login must not make later calls authenticated
    return r.status_code


@pytest.fixture
def world(api: Api, sent: list[Any]) -> tuple[Api, str, dict[str, dict[str, str]]]:
    url = api.settings.resolved_database_url
    with session_scope(url) as session:
        nodes.register(session, "node-1", INVENTORY, {"cpu": 16, "memory_bytes": 8 << 30})
        admin = auth.principal_for(session, auth._user(session, "admin"), "token")
        default = auth._project(session, "default")
        groups.create(session, admin, "default", "walk-g", "anti-affinity")
        networks.create_network(session, admin, api.settings, "default", "walk-n", {"cidr": "10.77.0.0/24"})
        networks.create_secgroup(session, admin, "default", "walk-s", "")
        networks.create_port(session, admin, "default", "walk-p", {"network": "walk-n"})
        api.settings.external_cidr = "203.0.113.0/24"
        routers.create_router(session, admin, api.settings, "default", "walk-r", {"networks": ["walk-n"]})
        networks.create_port(session, admin, "default", "walk-fp", {"network": "walk-n"})
        routers.create_floating_ip(session, admin, api.settings, "default", "walk-f", {"port": "walk-fp"})
        kernel = api.settings.data_dir / "walk-kernel"
        kernel.write_bytes(b"k")
        images.record(session, default.id, "walk-img", {"kind": "vm", "format": "kernel", "kernel": str(kernel)})
        images.record(session, default.id, "walk-oci", {"kind": "container", "format": "oci",
                                                        "archive": str(kernel)})
        instances.create(session, admin, "vm", "default", "walk-vm", {"cpu": 1, "memory": "256MiB",
                                                                      "image": "walk-img"})
        instances.create(session, admin, "container", "default", "walk-ct", {"cpu": 1, "memory": "64MiB",
                                                                             "image": "walk-oci"})
        pools.create(session, None, "default", "node-1", "local", str(api.settings.data_dir / "pool"))
        vol, _ = volumes.create(session, admin, "default", "walk-vol", "1GiB")
        volumes.finish(session, vol, phase="Available")
        volumes.record_snapshot(session, vol, "walk-snap")
        task_id = tasks.create(session, "node.inventory", {"node": "node-1"}, queue="cluster",
                               principal=admin, project_id=default.id)["id"]
    callers = {
        "viewer": api.headers_for("viewer1", cluster_role="viewer", project="default", role="viewer"),
        "other": api.headers_for("mallory", project="other", role="admin"),
    }
    return api, task_id, callers


def test_every_route_declares_its_access_rule(api: Api) -> None:
    missing = [f"{m.upper()} {p}" for m, p, op in operations(api) if "x-cairn-access" not in op]
    assert missing == [], "declare access(...) on these routes"
    needs_body = [f"{m.upper()} {p}" for m, p, op in operations(api)
                  if "requestBody" in op and op["requestBody"].get("required") and (m, p) not in BODIES]
    assert needs_body == [], "add an example body to BODIES for these routes"


def test_anonymous_callers_are_refused_everywhere_but_public_routes(world: Any) -> None:
    api, task_id, _ = world
    for method, path, op in operations(api):
        status = call(api, method, path, task_id, {})
        if op["x-cairn-access"] == "public":
            assert status != 401, f"{method} {path} is public but refused"
        else:
            assert status == 401, f"anonymous {method.upper()} {path} got {status}"


def test_viewers_cannot_write(world: Any) -> None:
    api, task_id, callers = world
    for method, path, op in operations(api):
        rule = op["x-cairn-access"]
        status = call(api, method, path, task_id, callers["viewer"])
        if ":" in rule and rule.split(":")[1] in WRITES:
            assert status in (403, 404), f"viewer {method.upper()} {path} ({rule}) got {status}"
        else:
            assert status not in (401, 403), f"viewer {method.upper()} {path} ({rule}) refused: {status}"


def test_other_project_members_are_refused(world: Any) -> None:
    api, task_id, callers = world
    for method, path, op in operations(api):
        rule = op["x-cairn-access"]
        status = call(api, method, path, task_id, callers["other"])
        if rule.startswith(("cluster:", "project:")):
            assert status in (403, 404), f"other-project {method.upper()} {path} ({rule}) got {status}"


def test_admin_passes_every_route(world: Any) -> None:
    """The positive control: the walk's requests are well-formed, so refusals mean policy."""
    api, task_id, _ = world
    for method, path, _op in operations(api):
        if (method, path) in OWN_CREDENTIALS:
            continue
        status = call(api, method, path, task_id, api.admin)
        assert status not in (401, 403, 422, 500), f"admin {method.upper()} {path} got {status}"
