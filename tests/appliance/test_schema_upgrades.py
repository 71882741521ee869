"""Rolling upgrades (appliance/db/migrate.py): migrations run once under a lock, only
when every member's code can run on the result; a member one release behind keeps
working on an additive migration and one further behind refuses to start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, MetaData, create_engine, insert, select

from appliance.db import migrate
from appliance.db.engine import session_scope
from appliance.services import nodes
from appliance.version import __version__

from .conftest import Api

pytestmark = pytest.mark.functional
REPO = Path(__file__).resolve().parents[2]
INVENTORY: dict[str, Any] = {"cpu_model": "Test CPU", "cores": 2, "threads": 4, "numa_nodes": 1,
                             "memory_bytes": 8 << 30, "disks": [], "nics": [], "virt_type": "kvm"}
START = """
import json, os, sys, time
from appliance.db import migrate
url, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
print(json.dumps(migrate.ensure_schema(url, None).action))
"""


def test_concurrent_first_starts_migrate_once(db_url: str, tmp_path: Path) -> None:
    """Two processes start on an empty database at the same moment: one migrates, the
    other waits for the lock, then finds the schema current."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", START, db_url, str(go)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:  # every interpreter has imported the code
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate()[1][-2000:]
    go.touch()
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(outcomes) == ["current", "migrated"]
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert migrate.database_state(conn) == (migrate.code_schema(), migrate.chain().floor_of(
            migrate.chain().revisions))
    engine.dispose()


NEXT = '''"""a test migration after the real head

Revision ID: {rev}
Revises: {down}
"""
from alembic import op
import sqlalchemy as sa

revision = '{rev}'
down_revision = '{down}'
branch_labels = None
depends_on = None
{compat}


def upgrade() -> None:
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.add_column(sa.Column('test_rack', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.drop_column('test_rack')
'''


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``release(additive)`` switches this process to a next release: today's migrations
    plus one that adds a column (additive or not); ``release(None)`` switches back."""
    real = migrate.MIGRATIONS
    head = migrate.code_schema()
    nxt = f"{int(head) + 1:04d}"

    def switch(additive: bool | None) -> str:
        migrate.chain.cache_clear()
        if additive is None:
            monkeypatch.setattr(migrate, "MIGRATIONS", real)
            return head
        scripts = tmp_path / f"migrations-{additive}"
        if not scripts.exists():
            shutil.copytree(real, scripts, ignore=shutil.ignore_patterns("__pycache__"))
            compat = f"compatible_with = '{head}'" if additive else ""
            (scripts / "versions" / f"{nxt}_test.py").write_text(NEXT.format(rev=nxt, down=head, compat=compat))
        monkeypatch.setattr(migrate, "MIGRATIONS", scripts)
        return nxt

    yield switch
    migrate.chain.cache_clear()


def _members(url: str, *names: str) -> None:
    with session_scope(url) as session:
        for name in names:
            nodes.register(session, name, INVENTORY, {"cpu": 4, "memory_bytes": 4 << 30})


def _versions(url: str) -> dict[str, str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        found = {name: schema for name, _, schema in migrate.members(conn)}
        found["database"] = str(migrate.database_state(conn)[0])
    engine.dispose()
    return found


def test_a_migration_waits_for_every_member_then_runs_once(sqlite_url: str, release: Any) -> None:
    head = release(None)
    migrate.upgrade(sqlite_url)
    _members(sqlite_url, "n1", "n2")
    nxt = release(False)  # n1 is upgraded to a release whose migration old code cannot run on
    with pytest.raises(migrate.SchemaWaiting, match=rf"n2 \(schema {head}\)"):
        migrate.ensure_schema(sqlite_url, "n1", wait_seconds=0.2, poll_seconds=0.05)
    assert _versions(sqlite_url) == {"n1": nxt, "n2": head, "database": head}  # n1 recorded, nothing migrated
    assert migrate.step(sqlite_url, "n2").action == "migrated"  # the last member upgraded: it migrates
    assert migrate.step(sqlite_url, "n1").action == "current"  # once
    assert _versions(sqlite_url) == {"n1": nxt, "n2": nxt, "database": nxt}
    release(None)  # a member still on the old release: it may not run on this schema
    with pytest.raises(migrate.SchemaTooNew, match="upgrade this node"):
        migrate.step(sqlite_url, "n3")


def test_a_member_one_release_behind_keeps_working_on_an_additive_migration(sqlite_url: str, release: Any,
                                                                            tmp_path: Path) -> None:
    head = release(None)
    migrate.upgrade(sqlite_url)
    _members(sqlite_url, "n1", "n2")
    nxt = release(True)
    assert migrate.step(sqlite_url, "n1").action == "migrated"  # additive: no need to wait for n2
    release(None)  # n2 still runs today's code
    outcome = migrate.step(sqlite_url, "n2")
    assert (outcome.action, outcome.revision, outcome.compatible_with) == ("behind", nxt, head)
    # and today's code works on the newer schema: the agent registers, the API lists
    _members(sqlite_url, "n2", "n3")
    with session_scope(sqlite_url) as session:
        listed, _ = nodes.list_(session, _Admin(), 10, None)
    assert [(n["name"], n["status"]["version"]) for n in listed] == [
        ("n1", {"code": __version__, "schema": nxt}), ("n2", {"code": __version__, "schema": head}),
        ("n3", {"code": __version__, "schema": head})]


class _Admin:
    def require_cluster(self, action: str) -> None:
        return None


FILLER = {Integer: 1, BigInteger: 1, Float: 1.0, Boolean: False, JSON: {}}


def _value(column: Any) -> Any:
    for kind, value in FILLER.items():
        if isinstance(column.type, kind):
            return value
    if isinstance(column.type, DateTime):
        return datetime.now(UTC)
    return "x"


@pytest.mark.parametrize("revision", [r for r in migrate.chain().revisions
                                      if migrate.chain().floors[r] != r])
def test_additive_migrations_keep_the_previous_releases_queries_working(tmp_path: Path, revision: str) -> None:
    """For each migration that declares code one release behind compatible: every table
    and column of the previous schema is still there, and a row written with only the
    previous schema's columns (what old code inserts) can be read back."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    previous = migrate.chain().floors[revision]
    migrate.upgrade(url, previous)
    old = MetaData()
    engine = create_engine(url)
    old.reflect(engine)
    engine.dispose()
    migrate.upgrade(url, revision)
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in old.sorted_tables:
            if table.name == "alembic_version":
                continue
            conn.execute(insert(table).values({c.name: _value(c) for c in table.columns}))
            assert conn.execute(select(table)).first() is not None, table.name
    engine.dispose()


def test_cluster_status_and_node_inventory_show_each_members_versions(api_sqlite: Api) -> None:
    url = api_sqlite.settings.resolved_database_url
    _members(url, "node-1")
    status = api_sqlite.client.get("/api/v1/cluster/status", headers=api_sqlite.admin).json()
    head = migrate.code_schema()
    assert status["versions"]["database_schema"] == head
    assert {"name": "node-1", "code": __version__, "schema": head} in status["versions"]["members"]
    node = api_sqlite.client.get("/api/v1/nodes/node-1", headers=api_sqlite.admin).json()
    assert node["status"]["version"] == {"code": __version__, "schema": head}
    assert os.environ.get("CAIRN_SCHEMA_WAIT_SECONDS", "0") == "0"
