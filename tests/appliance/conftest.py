"""Fixtures for the control plane: a fresh database on SQLite and on a real
PostgreSQL, an in-process API client, users with each role, and a live stack."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.db.engine import session_scope
from appliance.processes import prepare
from appliance.services import auth, tasks
from appliance.settings import Settings
from tests.services import create_pg_database, postgres_server

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cairn.db'}"
    server = request.getfixturevalue("pg_server")
    return create_pg_database(server, f"cairn_test_{next(_db_counter)}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cairn.db'}"


def make_settings(tmp_path: Path, url: str, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=url, node_name="node-a", **kw)


@dataclass
class Api:
    """An in-process API with the first admin's token, and helpers for other callers."""

    client: TestClient
    settings: Settings
    admin_password: str
    admin: dict[str, str]

    def headers_for(self, user: str, *, cluster_role: str | None = None,
                    project: str | None = None, role: str = "viewer") -> dict[str, str]:
        """Create a user (once) with the given roles and return bearer headers for it."""
        url = self.settings.resolved_database_url
        with session_scope(url) as session:
            admin_user = auth._user(session, "admin")
            admin_p = auth.principal_for(session, admin_user, "token")
            if project and project != "default":
                try:
                    auth.create_project(session, admin_p, project, {})
                except Exception:
                    session.rollback()
        with session_scope(url) as session:
            admin_p = auth.principal_for(session, auth._user(session, "admin"), "token")
            try:
                auth._user(session, user)
            except Exception:
                auth.create_user(session, admin_p, user, "correct horse battery", cluster_role, {})
        with session_scope(url) as session:
            admin_p = auth.principal_for(session, auth._user(session, "admin"), "token")
            if project:
                auth.set_member(session, admin_p, project, user, role)
            principal = auth.principal_for(session, auth._user(session, user), "token")
            token = auth.create_token(session, principal, f"t{next(_db_counter)}", None)["token"]
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def sent() -> Iterator[list[tuple[str, str, float]]]:
    """Capture task messages instead of sending them to a broker."""
    messages: list[tuple[str, str, float]] = []
    tasks.set_dispatcher(lambda tid, queue, countdown: messages.append((tid, queue, countdown)))
    yield messages
    tasks.set_dispatcher(lambda *a: None)


def build_api(tmp_path: Path, url: str) -> Iterator[Api]:
    settings = make_settings(tmp_path, url)
    password = prepare(settings)
    assert password
    app = create_app(settings, controller=False)
    with TestClient(app, base_url="https://testserver") as client:
        with session_scope(url) as session:
            admin = auth.principal_for(session, auth._user(session, "admin"), "token")
            token = auth.create_token(session, admin, "test-admin", None)["token"]
        yield Api(client, settings, password, {"Authorization": f"Bearer {token}"})


@pytest.fixture
def api(tmp_path: Path, db_url: str, sent: list[Any]) -> Iterator[Api]:
    """The API on both databases."""
    yield from build_api(tmp_path, db_url)


@pytest.fixture
def api_sqlite(tmp_path: Path, sqlite_url: str, sent: list[Any]) -> Iterator[Api]:
    """The API on SQLite only (for tests whose subject is not the database)."""
    yield from build_api(tmp_path, sqlite_url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API per module and database (setting one up costs seconds), for modules whose
    tests each clean up what they make. Task messages are dropped: tests run tasks."""
    yield from _module_api(request, tmp_path_factory)


@pytest.fixture(scope="module", params=["sqlite"])
def module_api_sqlite(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``module_api`` on SQLite only (for modules whose subject is not the database)."""
    yield from _module_api(request, tmp_path_factory)


def _module_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'cairn.db'}"
    else:
        url = create_pg_database(request.getfixturevalue("pg_server"), f"cairn_test_{next(_db_counter)}")
    tasks.set_dispatcher(lambda *a: None)
    yield from build_api(tmp, url)
