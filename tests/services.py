"""Real system services for the test suite, started once per session and always
stopped: PostgreSQL (initdb in a temp dir, run as the postgres user) and Redis
(on a unix socket). A service that cannot start fails the tests with the reason."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def process_started(pid: int) -> str | None:
    """The start time of process ``pid`` (with the pid it names one process: a killed test
    run's pid may be reused), None when no such process runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted(base.glob("*/bin/initdb")) if base.exists() else []
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (apt package 'postgresql'): run ./bootstrap.sh test")
    return versions[-1].parent


class Postgres:
    """A private PostgreSQL (initdb in a temp dir, run as the postgres user) that a test
    may stop and start again (a database that goes away, as in a failover)."""

    def __init__(self, durable: bool = False, listen: str = "127.0.0.1") -> None:
        """``durable``: a commit survives a crash of the server (synchronous_commit=on, as
        in production); the suite's default trades that for speed. ``listen``: its
        listen_addresses (``*``: every address, as a cluster node's)."""
        self.durable = durable
        self.listen = listen
        self.bindir = _pg_bin()
        pg = pwd.getpwnam("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="cairn-pg-"))
        os.chown(self.root, pg.pw_uid, pg.pw_gid)
        self.data, self.port = self.root / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _as_pg(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              cwd=self.root)

    def init(self) -> None:
        r = self._as_pg(str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
                        "-E", "UTF8")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses='{self.listen}' -c fsync=off "
                f"-c synchronous_commit={'on' if self.durable else 'off'}")
        r = self._as_pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                        str(self.root / "log"), "-w", "start")
        if r.returncode:
            raise RuntimeError(f"PostgreSQL did not start: {r.stderr}{(self.root / 'log').read_text()}")

    def stop(self) -> None:
        """Like a crash (``-m immediate``): unless ``durable``, the last commits may be lost."""
        self._as_pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres(durable: bool = False, listen: str = "127.0.0.1") -> Iterator[Postgres]:
    """A started private PostgreSQL, always removed."""
    server = Postgres(durable, listen)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a server URL prefix ``postgresql+psycopg://postgres@127.0.0.1:<port>``."""
    with postgres() as server:
        yield server.url


def create_pg_database(server: str, name: str) -> str:
    import psycopg

    dsn = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@contextmanager
def redis_server(listen: str | None = None) -> Iterator[str]:
    """Yields ``unix://<socket>`` of a private redis-server; with ``listen`` (an address,
    ``0.0.0.0``: every one, as a cluster node's) it also serves TCP there and yields
    ``redis://<listen>:<port>``."""
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("redis-server is not installed (apt package 'redis-server'): run ./bootstrap.sh test")
    root = Path(tempfile.mkdtemp(prefix="cairn-redis-"))
    sock = root / "redis.sock"
    port = free_port() if listen else 0
    tcp = ["--bind", listen, "--protected-mode", "no"] if listen else []
    proc = subprocess.Popen([exe, "--port", str(port), *tcp, "--unixsocket", str(sock), "--dir", str(root),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://{listen}:{port}" if listen else f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def metrics_store(settings: Any) -> Iterator[str]:
    """This node's Prometheus (Debian's) as the appliance configures it for ``settings``
    (``appliance.timeseries.store``), registered where the API looks for it; yields its URL."""
    import httpx

    from appliance.timeseries import store

    store.prepare(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(store.argv(settings, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus ({settings.prometheus_binary}) did not start")
            time.sleep(0.1)
        store.write_private(store.state_file(settings), f'{{"url": "{url}", "pid": {proc.pid}}}')
        yield url
    finally:
        store.state_file(settings).unlink(missing_ok=True)
        proc.terminate()
        proc.wait(10)
