"""Series for the graphs, read back from the node's Prometheus: one PromQL query per
series (pure builders), run as range queries over the last hour, day or week.

Counters become rates over a window of at least three samples; gauges are averaged
over the same window, so a node or instance that stopped reporting shows a gap rather
than its last value carried forward. ``max by`` folds the copies of one series that
several scrape targets may hold (an instance seen by two nodes during its migration)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from appliance.errors import Unavailable

Range = Literal["hour", "day", "week"]
SPAN: dict[str, tuple[int, int]] = {"hour": (3600, 15), "day": (86400, 300), "week": (7 * 86400, 1800)}  # s, step


@dataclass(frozen=True)
class SeriesDef:
    name: str
    unit: str  # percent | bytes | bytes/s | ops/s | ratio
    query: str  # with {sel} (the label selector), {w} (the window) and {by} (the grouping label)
    label: str = ""  # what the series is, for people (the CLI prints it); "" = the name says it


def _rate(metric: str) -> str:
    return f"max by ({{by}}) (rate({metric}{{sel}}[{{w}}]))"


def _gauge(metric: str) -> str:
    return f"max by ({{by}}) (avg_over_time({metric}{{sel}}[{{w}}]))"


def _io(prefix: str) -> list[SeriesDef]:
    return [
        SeriesDef("net_in", "bytes/s", _rate(f"{prefix}_network_receive_bytes_total")),
        SeriesDef("net_out", "bytes/s", _rate(f"{prefix}_network_transmit_bytes_total")),
        SeriesDef("disk_read", "bytes/s", _rate(f"{prefix}_disk_read_bytes_total")),
        SeriesDef("disk_write", "bytes/s", _rate(f"{prefix}_disk_written_bytes_total")),
        SeriesDef("disk_read_iops", "ops/s", _rate(f"{prefix}_disk_reads_total")),
        SeriesDef("disk_write_iops", "ops/s", _rate(f"{prefix}_disk_writes_total")),
    ]


NODE = [
    SeriesDef("cpu", "percent", f"100 * {_rate('cairn_node_cpu_busy_seconds_total')} / {_gauge('cairn_node_cpus')}"),
    SeriesDef("memory", "bytes", _gauge("cairn_node_memory_used_bytes"), "in use (total less available)"),
    SeriesDef("memory_total", "bytes", _gauge("cairn_node_memory_bytes"), "the node's memory"),
    *_io("cairn_node"),
]
# CPU of an instance: percent of its vCPUs (or of its CPU limit), as Proxmox shows it.
# Memory as Proxmox shows it too: what the guest itself uses when it reports it (no points
# when a VM's guest has no balloon driver), and apart from it what the instance holds on
# the host, which for a VM includes QEMU's own memory (see compute.driver.InstanceStats)
INSTANCE = [
    SeriesDef("cpu", "percent",
              f"100 * {_rate('cairn_instance_cpu_seconds_total')} / {_gauge('cairn_instance_vcpus')}",
              "percent of its vCPUs (a container: of its CPU limit)"),
    SeriesDef("memory", "bytes", _gauge("cairn_instance_memory_used_bytes"),
              "in use inside (a VM: what its guest reports; none without a balloon driver)"),
    SeriesDef("memory_host", "bytes", _gauge("cairn_instance_memory_host_bytes"),
              "resident on the host (a VM: its QEMU process, guest RAM plus QEMU's own)"),
    SeriesDef("memory_total", "bytes", _gauge("cairn_instance_memory_bytes"), "given to the instance"),
    *_io("cairn_instance"),
]
POOL = [
    SeriesDef("logical_bytes", "bytes", _gauge("cairn_pool_logical_bytes")),
    SeriesDef("stored_bytes", "bytes", _gauge("cairn_pool_stored_bytes")),
    SeriesDef("dedup_ratio", "ratio", _gauge("cairn_pool_dedup_ratio")),
    SeriesDef("compression_ratio", "ratio", _gauge("cairn_pool_compression_ratio")),
]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def promql(series: SeriesDef, labels: dict[str, str], by: str, window_s: int) -> str:
    """The query of ``series`` for the object with ``labels`` (pure)."""
    sel = "{" + ",".join(f"{k}={_quote(v)}" for k, v in sorted(labels.items())) + "}"
    return series.query.format(sel=sel, w=f"{window_s}s", by=by)


def window(step_s: int, interval_s: float) -> int:
    """A rate needs two samples in its window; three ride over one missed scrape."""
    return max(step_s, math.ceil(3 * interval_s))


def _points(result: list[dict[str, Any]]) -> list[list[float]]:
    points: dict[float, float] = {}
    for item in result:
        for t, v in item.get("values", []):
            value = float(v)
            if math.isfinite(value):
                points[float(t)] = max(value, points.get(float(t), value))
    return [[t, points[t]] for t in sorted(points)]


def history(url: str | None, defs: list[SeriesDef], labels: dict[str, str], by: str, span: Range,
            interval_s: float, now: float | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Every series of ``defs`` for one object over ``span``, from the Prometheus at ``url``."""
    if url is None:
        raise Unavailable("the metrics store (this node's Prometheus) is not running: the graphs need it "
                          "(see `cairn status`; CAIRN_METRICS_STORE=none turns it off)")
    seconds, step = SPAN[span]
    end = math.floor(now if now is not None else time.time())
    start = end - seconds
    w = window(step, interval_s)
    series = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for d in defs:
            try:
                r = client.get("/api/v1/query_range", params={
                    "query": promql(d, labels, by, w), "start": start, "end": end, "step": step})
            except httpx.HTTPError as exc:
                raise Unavailable(f"the metrics store at {url} did not answer: {exc}")
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != 200 or body.get("status") != "success":
                raise Unavailable(f"the metrics store refused a query ({r.status_code}): "
                                  f"{body.get('error', r.text[:200])}")
            series.append({"name": d.name, "unit": d.unit, "label": d.label,
                           "points": _points(body["data"]["result"])})
    return {"range": span, "start": start, "end": end, "step": step, "series": series}
