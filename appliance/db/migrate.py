"""Schema migrations for a cluster whose members may run different releases (a rolling
upgrade), in LXD's way.

- Every member records on its node row its release (``code_version``) and the newest
  schema revision its code carries (``schema_version``).
- Each migration says which code can run on its result: ``compatible_with = '<rev>'``
  in the migration module (code carrying ``<rev>`` or newer). An additive migration
  (new nullable column, new table, new index) names its predecessor, so a member one
  release behind keeps working; one that drops or renames something omits it (only
  code that carries the migration itself can run on it).
- :func:`ensure_schema` runs pending migrations once, under a cluster-wide lock (a
  PostgreSQL advisory lock; on SQLite the database's own write lock, ``BEGIN
  IMMEDIATE``), in the same transaction as the gate check: only when every member's
  code can run on the result. Otherwise it waits (and says for whom), as an upgraded
  LXD member waits for the others.
- A member whose code is older than the database's schema runs if the database says it
  may (``schema_state.compatible_with``, written with each migration, since old code
  does not know the newer migration files); otherwise it refuses to start, saying so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, inspect, pool, text

from appliance.errors import Unavailable
from appliance.version import __version__

log = logging.getLogger("cairn.db.migrate")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LOCK_KEY = 0x636169726E736368  # pg_advisory_xact_lock key: "cairnsch"
UNRECORDED = "0008"  # members from before versions were recorded carry this schema


class SchemaError(Unavailable):
    title = "Schema not usable yet"
    type_slug = "schema"


class SchemaTooNew(SchemaError):
    """This member's code cannot run on the database's schema: upgrade the member."""


class SchemaWaiting(SchemaError):
    """Migrations are pending but may not run yet (or this process does not run them)."""


@dataclass(frozen=True)
class Chain:
    """The migrations this code carries, oldest first, and what code runs on each."""

    revisions: tuple[str, ...]
    floors: dict[str, str]  # revision -> oldest code schema that can run on it

    @property
    def head(self) -> str:
        return self.revisions[-1]

    def index(self, revision: str | None) -> int:
        return -1 if revision is None else self.revisions.index(revision)

    def knows(self, revision: str | None) -> bool:
        return revision is None or revision in self.revisions

    def floor_of(self, revisions: tuple[str, ...]) -> str:
        """The newest floor among ``revisions``: code that carries it runs on all of them."""
        return max((self.floors[r] for r in revisions), key=self.index)


@dataclass(frozen=True)
class SchemaOutcome:
    action: str  # current | migrated | behind (this code is older than the schema, and may run)
    revision: str | None
    compatible_with: str | None


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@lru_cache(maxsize=1)
def chain() -> Chain:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    scripts = list(reversed(list(script.walk_revisions())))
    revisions = tuple(s.revision for s in scripts)
    floors = {s.revision: str(getattr(s.module, "compatible_with", s.revision)) for s in scripts}
    return Chain(revisions, floors)


def code_schema() -> str:
    """The newest schema revision this code carries (what a member records)."""
    return chain().head


@contextmanager
def _locked(url: str) -> Iterator[Connection]:
    """One transaction holding the cluster-wide migration lock."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, poolclass=pool.NullPool, **({"connect_args": {"timeout": 60}} if sqlite else {}))
    if sqlite:  # foreign keys stay off: batch migrations copy and drop tables
        @event.listens_for(engine, "connect")
        def _autocommit(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, held to COMMIT
    try:
        with engine.connect() as conn, conn.begin():
            if not sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            yield conn
    finally:
        engine.dispose()


def _columns(conn: Connection, table: str) -> set[str]:
    insp = inspect(conn)
    return {c["name"] for c in insp.get_columns(table)} if insp.has_table(table) else set()


def _record(conn: Connection, node: str | None) -> None:
    """This member's release and code schema on its node row (once the columns exist)."""
    if node and {"code_version", "schema_version"} <= _columns(conn, "nodes"):
        conn.execute(text("UPDATE nodes SET code_version = :code, schema_version = :schema WHERE name = :name"),
                     {"code": __version__, "schema": code_schema(), "name": node})


def members(conn: Connection) -> list[tuple[str, str | None, str]]:
    """(name, code version, code schema) of every member; unrecorded ones carry UNRECORDED."""
    cols = _columns(conn, "nodes")
    if not cols:
        return []
    if "schema_version" not in cols:
        return [(r[0], None, UNRECORDED) for r in conn.execute(text("SELECT name FROM nodes ORDER BY name"))]
    rows = conn.execute(text("SELECT name, code_version, schema_version FROM nodes ORDER BY name"))
    return [(r[0], r[1], r[2] or UNRECORDED) for r in rows]


def _compatible_with(conn: Connection) -> str | None:
    if not _columns(conn, "schema_state"):
        return None
    return conn.execute(text("SELECT compatible_with FROM schema_state WHERE id = 1")).scalar()


def database_state(conn: Connection) -> tuple[str | None, str | None]:
    """(revision, oldest code schema that runs on it) of the database."""
    return MigrationContext.configure(conn).get_current_revision(), _compatible_with(conn)


def step(url: str, node: str | None = None, migrate: bool = True) -> SchemaOutcome:
    """One attempt, under the lock: record this member, then migrate if that is due and
    allowed. Raises SchemaWaiting (try again later) or SchemaTooNew (never on this code);
    this member's record is committed either way (the others wait for it)."""
    refused: SchemaError | None = None
    with _locked(url) as conn:
        _record(conn, node)
        try:
            return _migrate(url, conn, node, migrate)
        except SchemaError as exc:
            refused = exc  # leave the block normally: commit the record, then raise
    raise refused


def _migrate(url: str, conn: Connection, node: str | None, migrate: bool) -> SchemaOutcome:
    ch = chain()
    current, floor = database_state(conn)
    if current == ch.head:
        return SchemaOutcome("current", current, floor)
    if not ch.knows(current):  # the database is newer than this code
        if floor is not None and ch.knows(floor):
            return SchemaOutcome("behind", current, floor)
        raise SchemaTooNew(
            f"the database schema is at {current}, which code carrying schema {ch.head} (Cairn "
            f"{__version__}) cannot run on (it needs {floor or 'a newer release'}): upgrade this node")
    if not migrate:
        raise SchemaWaiting(f"the database schema is at {current}; this code needs {ch.head}: "
                            "waiting for an upgraded API to migrate it")
    pending = ch.revisions[ch.index(current) + 1:]
    need = ch.floor_of(pending)
    behind = [(name, schema) for name, _, schema in members(conn)
              if ch.knows(schema) and ch.index(schema) < ch.index(need)]
    if behind:
        who = ", ".join(f"{name} (schema {schema})" for name, schema in behind)
        raise SchemaWaiting(f"migrating to {ch.head} needs every member to run code carrying schema {need} "
                            f"or newer; {who} do not: upgrade them (or remove dead ones with "
                            "`cairn node delete`)")
    cfg = alembic_config(url)
    cfg.attributes["connection"] = conn  # env.py runs the migrations in this locked transaction
    command.upgrade(cfg, "head")
    floor = ch.floor_of(ch.revisions)
    conn.execute(text("DELETE FROM schema_state"))
    conn.execute(text("INSERT INTO schema_state (id, revision, compatible_with, migrated_by, migrated_at) "
                      "VALUES (1, :rev, :floor, :by, :at)"),
                 {"rev": ch.head, "floor": floor, "by": f"{node or '?'} (Cairn {__version__})",
                  "at": datetime.now(UTC)})
    _record(conn, node)
    log.info("schema migrated", extra={"from": current, "to": ch.head, "compatible_with": floor})
    return SchemaOutcome("migrated", ch.head, floor)


def ensure_schema(url: str, node: str | None = None, *, migrate: bool = True, wait_seconds: float = 0,
                  poll_seconds: float = 5.0) -> SchemaOutcome:
    """Bring the schema to what this code needs, waiting while migrations may not run
    yet (``wait_seconds`` 0: as long as it takes, like an upgraded LXD member)."""
    deadline = time.monotonic() + wait_seconds if wait_seconds > 0 else None
    said = ""
    while True:
        try:
            return step(url, node, migrate)
        except SchemaWaiting as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            if exc.detail != said:
                log.warning("waiting to migrate the schema", extra={"reason": exc.detail})
                said = exc.detail
            time.sleep(poll_seconds)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate now (a fresh or single-member database); ``revision`` other than head
    goes straight to Alembic (tests that build an older schema)."""
    if revision == "head":
        step(url)
    else:
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
