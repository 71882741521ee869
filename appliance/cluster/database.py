"""The control plane's PostgreSQL database in a cluster: the ``cairn`` role and database,
made once on the Patroni primary (idempotent), reached through a multi-host URL with
``target_session_attrs=read-write`` so every connection lands on the current primary."""

from __future__ import annotations

import logging
import time

import psycopg
from psycopg import sql

from appliance.cluster.config import superuser_dsn
from appliance.errors import Unavailable
from appliance.settings import Settings

log = logging.getLogger("cairn.cluster.database")


def wait_primary(settings: Settings, timeout: float = 180) -> None:
    """Block until some member's PostgreSQL accepts read-write connections."""
    cfg = settings.cluster
    assert cfg is not None
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(superuser_dsn(cfg), autocommit=True) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.Error as exc:
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            time.sleep(1)
    raise Unavailable(f"no PostgreSQL primary after {timeout:g} s (Patroni): {last}")


def ensure_database(settings: Settings, timeout: float = 180) -> None:
    """The ``cairn`` role (its password from the cluster secrets) and database, once."""
    cfg = settings.cluster
    assert cfg is not None
    wait_primary(settings, timeout)
    with psycopg.connect(superuser_dsn(cfg), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'cairn'").fetchone()
        stmt = "ALTER ROLE cairn WITH LOGIN PASSWORD {}" if exists else "CREATE ROLE cairn LOGIN PASSWORD {}"
        conn.execute(sql.SQL(stmt).format(sql.Literal(cfg.secrets.pg_cairn)))
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'cairn'").fetchone():
            conn.execute("CREATE DATABASE cairn OWNER cairn")
            log.info("created the cairn database")
