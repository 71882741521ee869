"""The resource model through the API, on SQLite and PostgreSQL: shape,
pagination, filters, If-Match, events, migrations."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from appliance.agent.inventory import allocatable
from appliance.db.engine import session_scope
from appliance.db.migrate import downgrade, upgrade
from appliance.db.models import Base
from appliance.services import nodes

from .conftest import Api

pytestmark = pytest.mark.functional

INVENTORY: dict[str, Any] = {
    "cpu_model": "Test CPU", "cores": 8, "threads": 16, "numa_nodes": 2, "memory_bytes": 64 << 30,
    "disks": [], "nics": [], "virt_type": "kvm", "kernel": "6.1",
}


def register(api: Api, *names: str) -> None:
    with session_scope(api.settings.resolved_database_url) as session:
        for name in names:
            nodes.register(session, name, INVENTORY, allocatable(INVENTORY))


def test_migrations_round_trip_and_match_the_models(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"


def test_node_follows_the_resource_model(api: Api) -> None:
    register(api, "node-1")
    node = api.client.get("/api/v1/nodes/node-1", headers=api.admin).json()
    assert set(node) >= {"id", "name", "project", "spec", "status", "generation", "observed_generation",
                         "conditions", "created_at", "updated_at"}
    assert node["status"]["phase"] == "Ready"
    assert node["status"]["inventory"]["numa_nodes"] == 2
    assert node["conditions"][0]["type"] == "Ready" and node["conditions"][0]["status"] == "True"
    assert node["spec"] == {"schedulable": True, "labels": {}}


def test_list_pages_with_cursor_and_filters(api: Api) -> None:
    names = [f"n{i:02d}" for i in range(25)]
    register(api, *names)
    seen, cursor = [], None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/api/v1/nodes", params=params, headers=api.admin).json()
        seen += [n["name"] for n in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == names
    with session_scope(api.settings.resolved_database_url) as session:
        nodes.mark_lost(session, grace_seconds=-1)
    not_ready = api.client.get("/api/v1/nodes", params={"phase": "NotReady", "limit": 100},
                               headers=api.admin).json()
    assert len(not_ready["items"]) == 25
    assert api.client.get("/api/v1/nodes", params={"phase": "Ready"}, headers=api.admin).json()["items"] == []


def test_stale_if_match_gets_409_and_changes_nothing(api: Api) -> None:
    register(api, "node-1")
    url = "/api/v1/nodes/node-1"
    r = api.client.patch(url, json={"spec": {"schedulable": False}}, headers={**api.admin, "If-Match": "1"})
    assert r.status_code == 200 and r.json()["generation"] == 2
    stale = api.client.patch(url, json={"spec": {"labels": {"rack": "a"}}},
                             headers={**api.admin, "If-Match": "1"})
    assert stale.status_code == 409
    assert stale.headers["content-type"] == "application/problem+json"
    assert "generation 2" in stale.json()["detail"]
    node = api.client.get(url, headers=api.admin).json()
    assert node["spec"]["labels"] == {} and node["generation"] == 2


def test_changes_are_recorded_as_events(api: Api) -> None:
    register(api, "node-1")
    api.client.patch("/api/v1/nodes/node-1", json={"spec": {"labels": {"zone": "z1"}}}, headers=api.admin)
    with session_scope(api.settings.resolved_database_url) as session:
        from appliance.services import events

        admin = api.client.get("/api/v1/auth/me", headers=api.admin).json()
        assert admin["name"] == "admin"
        from appliance.services.auth import _user, principal_for

        batch, last = events.since(session, principal_for(session, _user(session, "admin"), "token"), 0)
    kinds = [(e["kind"], e["verb"]) for e in batch]
    assert ("node", "created") in kinds and ("node", "updated") in kinds
    assert batch[-1]["object"]["spec"]["labels"] == {"zone": "z1"} and last == batch[-1]["seq"]


def test_benchmark_answers_202_with_location_of_the_task(api: Api, sent: list[Any]) -> None:
    register(api, "node-1")
    r = api.client.post("/api/v1/nodes/node-1/benchmark", json={"seconds": 1}, headers=api.admin)
    assert r.status_code == 202
    task = r.json()
    assert r.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert task["state"] == "pending" and task["resource"]["name"] == "node-1"
    assert sent == [(task["id"], "node.node-1", 0.0)]
    assert api.client.get(r.headers["location"], headers=api.admin).json()["id"] == task["id"]
