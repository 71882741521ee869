"""Prometheus metrics: request latency by route, task counts by state, node
heartbeat age, pools' space. Gauges from the database are read at scrape time; the
node's and its instances' samples come from the agent (``appliance/agent/sampler.py``)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.db.engine import session_scope
from appliance.services import nodes, pools, tasks

POOL_GAUGES = (
    ("logical_bytes", "Bytes the pool's volumes and snapshots hold, as written"),
    ("stored_bytes", "Bytes the pool keeps after deduplication and compression"),
    ("dedup_ratio", "Logical bytes per unique byte"),
    ("compression_ratio", "Unique bytes per stored byte"),
    ("capacity_bytes", "Size of the file system or cluster the pool lives on, when known"),
    ("free_bytes", "Free space there"),
)


class StateCollector(Collector):
    def __init__(self, url: str) -> None:
        self.url = url

    def collect(self) -> Iterable[GaugeMetricFamily]:
        task_gauge = GaugeMetricFamily("cairn_tasks", "Tasks by state", labels=["state"])
        age = GaugeMetricFamily("cairn_node_heartbeat_age_seconds", "Seconds since a node's last heartbeat",
                                labels=["node"])
        ready = GaugeMetricFamily("cairn_node_ready", "1 if the node is Ready", labels=["node"])
        space = {key: GaugeMetricFamily(f"cairn_pool_{key}", doc, labels=["pool"]) for key, doc in POOL_GAUGES}
        with session_scope(self.url, readonly=True) as session:
            for state, n in tasks.counts_all(session).items():
                task_gauge.add_metric([state], n)
            for name, phase, seconds in nodes.heartbeat_ages(session):
                age.add_metric([name], seconds)
                ready.add_metric([name], 1.0 if phase == "Ready" else 0.0)
            for pool, stats in pools.space_all(session):
                for key, fam in space.items():
                    if isinstance(stats.get(key), int | float):
                        fam.add_metric([pool], float(stats[key]))
        yield task_gauge
        yield age
        yield ready
        yield from space.values()


def make_registry(url: str) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    latency = Histogram(
        "cairn_http_request_duration_seconds", "API request latency", ["method", "route", "status"],
        registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    registry.register(StateCollector(url))
    return registry, latency


class LatencyMiddleware:
    """Observes every HTTP request under its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], path, str(status)).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413 before any handler reads them."""

    def __init__(self, app: ASGIApp, limit: int, streaming: str | None = None) -> None:
        self.app = app
        self.limit = limit
        # Routes that stream their body to disk themselves (image uploads), bounded there.
        self.streaming = re.compile(streaming) if streaming else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.streaming and self.streaming.fullmatch(scope["path"])):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(send, self.limit)
            return
        # Bodies are small JSON documents: read them fully (bounded) so an oversized
        # chunked upload is refused before any handler sees a byte of it.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await _too_large(send, self.limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    import json

    body = json.dumps({"type": "https://cairn.dev/problems/too-large", "title": "Request too large",
                       "status": 413, "detail": f"request bodies are limited to {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def agent_samples(path: Path, interval: float) -> bytes:
    """The agent's latest samples, unless they are stale (the agent stopped sampling)."""
    try:
        if time.time() - path.stat().st_mtime > max(30.0, 5 * interval):
            return b""
        return path.read_bytes()
    except OSError:
        return b""
