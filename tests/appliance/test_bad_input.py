"""Bad input gets a 4xx problem+json that says what to fix, and changes nothing."""

from __future__ import annotations

import pytest

from .conftest import Api

pytestmark = pytest.mark.functional


def snapshot(api: Api) -> tuple[list[str], list[str]]:
    projects = [p["name"] for p in api.client.get("/api/v1/projects", headers=api.admin).json()["items"]]
    users = [u["name"] for u in api.client.get("/api/v1/users", headers=api.admin).json()["items"]]
    return projects, users


def problem(r, status: int) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return str(body["detail"])


def test_malformed_json(api: Api) -> None:
    before = snapshot(api)
    r = api.client.post("/api/v1/projects", content=b'{"name": "x",', headers={
        **api.admin, "content-type": "application/json"})
    assert "not valid JSON" in problem(r, 400)
    assert snapshot(api) == before


def test_wrong_types_name_the_field(api: Api) -> None:
    r = api.client.post("/api/v1/users", json={"name": "eve", "password": 12}, headers=api.admin)
    assert "password" in problem(r, 422)
    r = api.client.post("/api/v1/projects", json={"name": "Not A DNS Label"}, headers=api.admin)
    assert "name" in problem(r, 422)


def test_unknown_fields_are_refused(api: Api) -> None:
    before = snapshot(api)
    r = api.client.post("/api/v1/projects", json={"name": "p2", "spec": {"descripton": "typo"}},
                        headers=api.admin)
    detail = problem(r, 422)
    assert "descripton" in detail and "unknown field" in detail
    assert snapshot(api) == before


def test_name_collisions_are_409(api: Api) -> None:
    assert api.client.post("/api/v1/projects", json={"name": "dup"}, headers=api.admin).status_code == 201
    before = snapshot(api)
    assert "already exists" in problem(
        api.client.post("/api/v1/projects", json={"name": "dup"}, headers=api.admin), 409)
    assert "already exists" in problem(api.client.post(
        "/api/v1/users", json={"name": "admin", "password": "long enough password"}, headers=api.admin), 409)
    assert snapshot(api) == before


def test_oversized_bodies_are_413(api_sqlite: Api) -> None:
    api = api_sqlite
    before = snapshot(api)
    big = {"name": "big", "spec": {"description": "x" * (2 << 20)}}
    assert "limited to" in problem(api.client.post("/api/v1/projects", json=big, headers=api.admin), 413)

    def chunks():  # type: ignore[no-untyped-def]  # no Content-Length: streamed
        yield b'{"name": "big", "spec": {"description": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}}'

    r = api.client.post("/api/v1/projects", content=chunks(),
                        headers={**api.admin, "content-type": "application/json"})
    problem(r, 413)
    assert snapshot(api) == before


def test_unknown_paths_and_methods(api_sqlite: Api) -> None:
    assert "openapi" in problem(api_sqlite.client.get("/api/v1/nope", headers=api_sqlite.admin), 404)
    problem(api_sqlite.client.put("/api/v1/nodes", headers=api_sqlite.admin), 405)
    assert "no node" in problem(api_sqlite.client.get("/api/v1/nodes/ghost", headers=api_sqlite.admin), 404)


def test_bad_cursor_and_if_match(api_sqlite: Api) -> None:
    api = api_sqlite
    assert "cursor" in problem(api.client.get("/api/v1/nodes?cursor=garbage", headers=api.admin), 422)
    api.client.post("/api/v1/projects", json={"name": "p"}, headers=api.admin)
    r = api.client.patch("/api/v1/projects/p", json={"spec": {"description": "d"}},
                         headers={**api.admin, "If-Match": "abc"})
    assert "If-Match" in problem(r, 422)
