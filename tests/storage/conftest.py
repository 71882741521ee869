"""Storage fixtures: one throwaway Ceph cluster per session (always torn down), backends."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.backends import ObjectBackend, open_backend
from storage.backends.rados_cluster import CephCluster, start_cluster
from storage.control import StorageClient
from storage.nbd import export_uri

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """1 mon, 1 mgr, 3 OSDs on sparse files; a start failure fails the tests that need it."""
    missing = [b for b in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Ceph is not installed ({', '.join(missing)} missing): apt-get install ceph-mon ceph-mgr ceph-osd")
    base = Path(tempfile.mkdtemp(prefix="cairn-test-ceph-"))
    cluster = start_cluster(base / "cluster", osd_size=6 << 30)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["local", "rados"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty backend of each kind (rados: a new namespace in the session cluster)."""
    if request.param == "local":
        return f"local://{tmp_path / 'pool'}"
    cluster: CephCluster = request.getfixturevalue("ceph")
    return cluster.backend_url(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def backend(backend_url: str) -> Iterator[ObjectBackend]:
    """An opened backend, closed after the test."""
    b = open_backend(backend_url)
    try:
        yield b
    finally:
        b.close()


class NbdDaemon:
    """A ``cairn-nbd`` child process serving a pool on a unix socket (and optionally TCP)."""

    def __init__(self, backend: str, workdir: Path, create: list[str], listen: str | None = None,
                 tls_dir: Path | None = None) -> None:
        self.backend = backend
        self.workdir = workdir
        self.socket = str(workdir / f"nbd-{uuid.uuid4().hex[:8]}.sock")
        self.create = create
        self.listen = listen
        self.tls_dir = tls_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "nbd.log"

    def start(self) -> NbdDaemon:
        """Start and wait for the ready file."""
        ready = self.workdir / f"ready-{uuid.uuid4().hex[:8]}"
        argv = [sys.executable, "-m", "storage.nbd.server", "--backend", self.backend, "--socket", self.socket,
                "--ready-file", str(ready)]
        for c in self.create:
            argv += ["--create", c]
        if self.listen:
            argv += ["--listen", self.listen]
        if self.tls_dir:
            argv += ["--tls-dir", str(self.tls_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"cairn-nbd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def uri(self, export: str) -> str:
        """NBD URI of an export."""
        return export_uri(export, socket=self.socket)

    def rss_kib(self) -> int:
        """Resident set size of the daemon."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        """SIGTERM (clean checkpoint) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def nbd_daemons(tmp_path: Path) -> Iterator[Callable[..., NbdDaemon]]:
    """Factory of started cairn-nbd daemons; every one is killed at teardown."""
    started: list[NbdDaemon] = []

    def factory(backend: str | None = None, create: list[str] | None = None, listen: str | None = None,
                tls_dir: Path | None = None) -> NbdDaemon:
        d = NbdDaemon(backend or f"local://{tmp_path / 'pool'}", tmp_path, create or [], listen, tls_dir)
        started.append(d)
        return d.start()

    try:
        yield factory
    finally:
        for d in started:
            d.kill()


class Daemon:
    """A ``cairn-storaged`` child process (``node``: the name it registers as)."""

    def __init__(self, run_dir: Path, node: str | None = None) -> None:
        self.run_dir = run_dir
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = StorageClient(run_dir / "storage.sock", timeout=60)

    def start(self) -> Daemon:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = (self.run_dir.parent / f"storaged-{self.node or 'node'}.log").open("ab")
        argv = [sys.executable, "-m", "storage.daemon", "--run-dir", str(self.run_dir)]
        if self.node:
            argv += ["--node", self.node]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not self.client.ready():
            assert self.proc.poll() is None, (self.run_dir.parent / f"storaged-{self.node or 'node'}.log").read_text()
            assert time.monotonic() < deadline, "storage daemon did not come up"
            time.sleep(0.05)
        return self

    def socket(self, pool: str) -> str:
        """The NBD socket of an attached pool."""
        return str(self.run_dir / f"nbd-{pool}.sock")

    def signal(self, sig: int) -> None:
        """Send a signal (SIGSTOP / SIGCONT: a node that hangs and comes back)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "run")
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture
def storage_daemons(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """Factory of started storage daemons, one per node name; all stopped at teardown."""
    started: list[Daemon] = []

    def factory(node: str) -> Daemon:
        d = Daemon(tmp_path / f"run-{node}", node)
        started.append(d)
        return d.start()

    try:
        yield factory
    finally:
        for d in started:
            if d.proc is not None and d.proc.poll() is None:
                with contextlib.suppress(OSError):
                    d.proc.send_signal(signal.SIGCONT)
            d.stop()


def run_tool(*argv: str, timeout: float = 300, input: bytes | None = None) -> str:
    """Run a client tool; fail the test with its output when it fails or is missing."""
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (see tools/packages.txt)")
    r = subprocess.run(argv, capture_output=True, timeout=timeout, input=input)
    if r.returncode != 0:
        output = r.stdout.decode()[-2000:] + r.stderr.decode()[-2000:]
        pytest.fail(f"{' '.join(argv)} failed ({r.returncode}): {output}")
    return r.stdout.decode()
