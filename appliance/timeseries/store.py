"""The node's Prometheus server: its configuration (pure builders, golden files), the
scrape credential, and the process that runs it (``python -m appliance.processes
prometheus``, under the supervisor).

Why every node scrapes every member (rather than each node keeping only its own samples
and the API proxying to the owner): the history of a node is readable from any other
node's API, also while that node is down (after a failover is exactly when one looks at
what it did before), and an instance's history survives its migrations, with no
replication of our own: Prometheus servers scraping the same targets is how
Prometheus itself is made highly available. Each member's ``/metrics`` serves the
samples its agent took (``appliance/agent/sampler.py``) and the pools' space as the
database has it.

The scrape credential is a bearer token that opens ``/metrics`` and nothing else: in a
cluster it is derived from the cluster's shared secrets (every member computes the same
one), on a single node it is a random secret kept in ``secrets/metrics-scrape``."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from appliance.settings import Settings
from appliance.supervisor import PR_SET_PDEATHSIG

log = logging.getLogger("cairn.timeseries")
SCRAPE_PREFIX = "cairn-scrape-"
JOB = "cairn"


def scrape_token(settings: Settings) -> str:
    """The bearer token Prometheus servers scrape ``/metrics`` with (the same on every member)."""
    cluster = settings.cluster
    if cluster is not None:
        mac = hmac.new(cluster.secrets.pg_cairn.encode(), f"metrics-scrape:{cluster.cluster_id}".encode(),
                       hashlib.sha256)
        return SCRAPE_PREFIX + mac.hexdigest()
    path = settings.secrets_dir / "metrics-scrape"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = SCRAPE_PREFIX + secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use that one
        time.sleep(0.05)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def is_scrape_token(settings: Settings, authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(SCRAPE_PREFIX):
        return False
    return hmac.compare_digest(token.encode(), scrape_token(settings).encode())


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def targets(settings: Settings) -> list[dict[str, Any]]:
    """Every member's API (only this node's on a single node), for file-based discovery."""
    cluster = settings.cluster
    if cluster is None:
        return [{"targets": [urlsplit(settings.resolved_api_url).netloc], "labels": {"member": settings.node_name}}]
    return [{"targets": [f"{_host(m.address)}:{settings.api_port}"], "labels": {"member": m.name}}
            for m in sorted(cluster.members, key=lambda m: m.name)]


def config(settings: Settings) -> dict[str, Any]:
    """prometheus.yml (JSON is YAML): one job scraping every member's /metrics over TLS
    with the cluster CA and the scrape token."""
    d = settings.prometheus_dir
    scheme = "https" if settings.cluster is not None else urlsplit(settings.resolved_api_url).scheme
    interval = f"{max(1, round(settings.metrics_interval))}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": "1m"},
        "scrape_configs": [{
            "job_name": JOB,
            "scheme": scheme,
            "metrics_path": "/metrics",
            "authorization": {"type": "Bearer", "credentials_file": str(d / "scrape-token")},
            "tls_config": {"ca_file": str(settings.pki_dir / "ca.crt")},
            "file_sd_configs": [{"files": [str(d / "targets.json")], "refresh_interval": "30s"}],
        }],
    }


def write_private(path: Path, text: str) -> bool:
    """Write ``text`` atomically (0600) unless the file already holds it; True if written."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)
    return True


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "prometheus.json"


def store_url(settings: Settings) -> str | None:
    """Where this node's Prometheus answers, or None when it has not started."""
    try:
        return str(json.loads(state_file(settings).read_text())["url"])
    except (OSError, ValueError, KeyError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def argv(settings: Settings, port: int) -> list[str]:
    d = settings.prometheus_dir
    return [settings.prometheus_binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
            f"--storage.tsdb.retention.time={settings.metrics_retention}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    """Between fork and exec: nothing to import here."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def prepare(settings: Settings) -> None:
    """Configuration, credential and targets files (idempotent)."""
    d = settings.prometheus_dir
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(d / "scrape-token", scrape_token(settings) + "\n")
    write_private(d / "targets.json", json.dumps(targets(settings), indent=1))
    write_private(d / "prometheus.yml", json.dumps(config(settings), indent=1))


def serve(settings: Settings) -> None:
    """Run Prometheus until SIGTERM, keeping its targets current with the cluster's
    members; exits (for the supervisor to restart it) if Prometheus dies."""
    prepare(settings)
    port = settings.prometheus_port or _free_port()
    proc = subprocess.Popen(argv(settings, port), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    stopping = {"now": False}

    def _term(*_: object) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not stopping["now"] and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        write_private(state_file(settings), json.dumps({"url": url, "pid": proc.pid}))
        log.info("prometheus up", extra={"url": url})
        while not stopping["now"] and proc.poll() is None:
            if write_private(settings.prometheus_dir / "targets.json", json.dumps(targets(settings), indent=1)):
                log.info("scrape targets changed", extra={"targets": targets(settings)})
            time.sleep(2)
    finally:
        state_file(settings).unlink(missing_ok=True)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if not stopping["now"]:
        raise SystemExit(f"prometheus exited ({proc.returncode}); the supervisor restarts it")
