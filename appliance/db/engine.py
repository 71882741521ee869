"""Engine and session factory. SQLite (embedded) and PostgreSQL (clusters) behave the same."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

# libpq: give up connecting after 10 s, drop a connection whose sent data stays
# unacknowledged for 10 s or whose idle peer stops answering keepalives
PG_TIMEOUTS = {"connect_timeout": 10, "tcp_user_timeout": 10000, "keepalives": 1, "keepalives_idle": 5,
               "keepalives_interval": 2, "keepalives_count": 3}


def make_engine(url: str, readonly: bool = False) -> Engine:
    """An engine tuned for our use: WAL + busy timeout on SQLite, pre-ping on PostgreSQL.

    On SQLite, write transactions take the write lock at BEGIN (IMMEDIATE) so that
    read-then-write transactions serialise instead of failing; ``readonly`` engines
    use deferred BEGIN so readers never wait for writers (WAL)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        # pysqlite's own transaction handling fights BEGIN IMMEDIATE: disable it.
        @event.listens_for(engine, "connect", insert=True)
        def _sqlite_autocommit(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        return engine
    # A failed-over or partitioned primary must fail fast, not hang a pass or a request
    # (the agent then works from its cached document); the URL's own settings win.
    given = make_url(url).query
    connect_args = {k: v for k, v in PG_TIMEOUTS.items() if k not in given}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


@lru_cache(maxsize=16)
def engine_for(url: str, readonly: bool = False) -> Engine:
    if not url.startswith("sqlite"):
        readonly = False  # one pool is enough for PostgreSQL
    return make_engine(url, readonly)


@lru_cache(maxsize=16)
def session_factory(url: str, readonly: bool = False) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url, readonly), expire_on_commit=False)


@contextmanager
def session_scope(url: str, readonly: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error."""
    session = session_factory(url, readonly)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    """Run side effects (e.g. sending a Celery message) only once the row they
    point at is committed and visible to the worker."""
    for callback in session.info.pop("after_commit", []):
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop("after_commit", None)


def after_commit(session: Session, callback: object) -> None:
    session.info.setdefault("after_commit", []).append(callback)
