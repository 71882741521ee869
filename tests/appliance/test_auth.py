"""Authentication: console sessions (cookie flags, CSRF), API tokens (argon2,
shown once, revocation), and tenancy between projects."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from appliance.db.engine import session_scope
from appliance.db.models import ApiToken

from .conftest import Api

pytestmark = pytest.mark.functional


def login(api: Api, password: str | None = None):  # type: ignore[no-untyped-def]
    return api.client.post("/api/v1/auth/login",
                           json={"username": "admin", "password": password or api.admin_password})


def test_login_sets_secure_httponly_samesite_cookies(api: Api) -> None:
    r = login(api)
    assert r.status_code == 200
    cookies = r.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("cairn_session="))
    csrf = next(c for c in cookies if c.startswith("cairn_csrf="))
    for flag in ("HttpOnly", "Secure", "SameSite=strict"):
        assert flag.lower() in session.lower()
    assert "httponly" not in csrf.lower() and "secure" in csrf.lower()
    assert r.json()["user"]["roles"] == [{"project": "default", "role": "admin"}]
    assert api.client.get("/api/v1/auth/me").json()["name"] == "admin"


def test_wrong_password_is_401_problem(api_sqlite: Api) -> None:
    r = login(api_sqlite, "not the password")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["detail"] == "wrong user name or password"
    assert "cairn_session" not in r.headers.get("set-cookie", "")


def test_cookie_writes_need_the_csrf_header(api_sqlite: Api) -> None:
    api = api_sqlite
    csrf = login(api).json()["csrf_token"]
    body = {"name": "p1"}
    refused = api.client.post("/api/v1/projects", json=body)
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["detail"]
    assert api.client.get("/api/v1/projects/p1").status_code == 404
    ok = api.client.post("/api/v1/projects", json=body, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201
    api.client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
    api.client.cookies.clear()
    assert api.client.get("/api/v1/auth/me").status_code == 401


def test_token_is_shown_once_and_stored_as_argon2_hash(api: Api) -> None:
    r = api.client.post("/api/v1/tokens", json={"name": "ci"}, headers=api.admin)
    assert r.status_code == 201
    token = r.json()["token"]
    listed = api.client.get("/api/v1/tokens", headers=api.admin).json()["items"]
    assert all("token" not in t for t in listed) and "ci" in [t["name"] for t in listed]
    with session_scope(api.settings.resolved_database_url) as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "ci"))
        assert row is not None and row.secret_hash.startswith("$argon2id$")
        assert token.split("_")[2] not in row.secret_hash
    assert api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_revoked_token_is_refused_at_once(api: Api) -> None:
    token = api.client.post("/api/v1/tokens", json={"name": "tmp"}, headers=api.admin).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/v1/auth/me", headers=headers).status_code == 200
    assert api.client.delete("/api/v1/tokens/tmp", headers=headers).status_code == 204
    assert api.client.get("/api/v1/auth/me", headers=headers).status_code == 401


@pytest.mark.parametrize("header", [
    "Bearer nonsense",
    "Bearer cairn_00000000000000000000000000000000_secret",
    "Basic YWRtaW46YWRtaW4=",
    "Bearer ",
])
def test_bad_tokens_get_401_problem(api_sqlite: Api, header: str) -> None:
    r = api_sqlite.client.get("/api/v1/nodes", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_tampered_secret_is_refused(api_sqlite: Api) -> None:
    token = api_sqlite.admin["Authorization"].split()[1]
    bad = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    assert api_sqlite.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {bad}"}).status_code == 401


def test_projects_are_isolated(api: Api) -> None:
    alice = api.headers_for("alice", project="blue", role="admin")
    bob = api.headers_for("bob", project="red", role="admin")
    assert [p["name"] for p in api.client.get("/api/v1/projects", headers=alice).json()["items"]] == ["blue"]
    assert api.client.get("/api/v1/projects/red", headers=alice).status_code == 404
    assert api.client.get("/api/v1/projects/red/members", headers=alice).status_code == 404
    r = api.client.put("/api/v1/projects/red/members/alice", json={"role": "admin"}, headers=alice)
    assert r.status_code == 404
    assert api.client.get("/api/v1/projects/red/members", headers=bob).json() == [
        {"project": "red", "user": "bob", "role": "admin"}
    ]
    # project users cannot see cluster-scoped resources
    assert api.client.get("/api/v1/nodes", headers=alice).status_code == 403
