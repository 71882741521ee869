"""History graphs' plumbing without a running Prometheus (the live path, samples to
graphs in Chromium, is in tests/e2e/test_instances.py): the scrape credential opens
/metrics and nothing else, /metrics serves the agent's fresh samples only, the history
routes explain a missing metrics store and refuse unknown ranges, and the PromQL built
for each series."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.agent import sampler
from appliance.api.metrics import agent_samples
from appliance.cli.metrics import latest, show
from appliance.db.engine import session_scope
from appliance.errors import Unavailable
from appliance.services import nodes
from appliance.services.desired_state import InstanceDoc
from appliance.timeseries import series, store
from compute.driver import InstanceStats
from tests.services import metrics_store

from .conftest import Api
from .test_resources import INVENTORY

pytestmark = pytest.mark.functional


def test_the_scrape_token_opens_metrics_and_nothing_else(module_api_sqlite: Api) -> None:
    api = module_api_sqlite
    token = store.scrape_token(api.settings)
    assert token == store.scrape_token(api.settings)  # kept: every scrape uses the same one
    assert (api.settings.secrets_dir / "metrics-scrape").stat().st_mode & 0o077 == 0
    scrape = {"Authorization": f"Bearer {token}"}
    r = api.client.get("/metrics", headers=scrape)
    assert r.status_code == 200 and "cairn_http_request_duration_seconds" in r.text
    assert api.client.get("/api/v1/nodes", headers=scrape).status_code == 401
    forged = token[:-1] + ("1" if token.endswith("0") else "0")  # one character off, never the token itself
    assert api.client.get("/metrics", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    viewer = api.headers_for("metrics-viewer", project="default", role="viewer")
    assert api.client.get("/metrics", headers=viewer).status_code == 403


def test_metrics_serves_the_agents_samples_while_they_are_fresh(module_api_sqlite: Api) -> None:
    api = module_api_sqlite
    path = api.settings.metrics_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('# TYPE cairn_node_cpus gauge\ncairn_node_cpus{node="node-a"} 2.0 1700000000000\n')
    assert b'cairn_node_cpus{node="node-a"}' in agent_samples(path, 10.0)
    r = api.client.get("/metrics", headers=api.admin)
    assert 'cairn_node_cpus{node="node-a"} 2.0' in r.text
    old = time.time() - 120
    os.utime(path, (old, old))  # the agent stopped sampling: no stale values carried on
    assert agent_samples(path, 10.0) == b""
    assert "cairn_node_cpus" not in api.client.get("/metrics", headers=api.admin).text


def test_history_routes_explain_a_missing_store_and_refuse_unknown_ranges(module_api_sqlite: Api) -> None:
    api = module_api_sqlite
    r = api.client.get("/api/v1/pools/no-such-pool/metrics", headers=api.admin)
    assert r.status_code == 404
    r = api.client.get("/api/v1/nodes/node-a/metrics", params={"range": "year"}, headers=api.admin)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert "range" in r.text
    with pytest.raises(Unavailable, match="Prometheus"):
        series.history(None, series.NODE, {"node": "node-a"}, "node", "hour", 10.0)


def test_promql_of_a_rate_and_a_gauge() -> None:
    cpu = series.promql(series.INSTANCE[0], {"id": 'we"ird'}, "id", 30)
    assert cpu == ('100 * max by (id) (rate(cairn_instance_cpu_seconds_total{id="we\\"ird"}[30s])) '
                   '/ max by (id) (avg_over_time(cairn_instance_vcpus{id="we\\"ird"}[30s]))')
    assert series.window(15, 10.0) == 30 and series.window(300, 10.0) == 300
    merged = series._points([{"values": [[1, "2"], [2, "NaN"]]}, {"values": [[1, "5"], [3, "1"]]}])
    assert merged == [[1.0, 5.0], [3.0, 1.0]]  # copies of one series folded by max, NaN dropped


def test_cli_prints_each_series_latest_value() -> None:
    history = {"series": [{"name": "cpu", "unit": "percent", "points": [[1, 3.0], [2, 12.345]]},
                          {"name": "net_in", "unit": "bytes/s", "points": [[2, 1536.0]]},
                          {"name": "disk_read", "unit": "bytes/s", "points": []}]}
    rows = latest(history)
    assert [(r["name"], r["value"]) for r in rows] == [("cpu", 12.345), ("net_in", 1536.0), ("disk_read", None)]
    labelled = latest({"series": [{"name": "memory_host", "unit": "bytes", "label": "resident on the host",
                                   "points": [[2, 1024.0]]}]})
    assert labelled[0]["label"] == "resident on the host" and rows[0]["label"] == ""
    assert [show(r["value"], r["unit"]) for r in rows] == ["12.3 %", "1.5 KiB/s", "-"]


def test_the_samplers_exposition_has_sample_timestamps() -> None:
    counters = sampler.node_counters()
    text = sampler.exposition(sampler.families("node-a", 1700000000.0, counters, [])).decode()
    assert 'cairn_node_cpus{node="node-a"}' in text
    assert "1700000000000" in text  # Prometheus keeps the agent's sample time, not the scrape's


def _instance(name: str, kind: str = "vm") -> InstanceDoc:
    return InstanceDoc(id=f"id-{name}", name=name, kind=kind, project_id="p", domain=f"d-{name}", generation=1,
                       power="running", cpu=1.0, memory_bytes=256 << 20)


def test_the_sampler_exports_guest_used_and_host_resident_memory_apart() -> None:
    """A VM whose guest reports its memory has both figures; one whose guest reports
    nothing has no "used" sample (not its host figure under that name), only the host's."""
    rows = [(_instance("talks"), InstanceStats(cpu_seconds=1.0, memory_bytes=350 << 20, memory_used_bytes=60 << 20)),
            (_instance("silent"), InstanceStats(cpu_seconds=1.0, memory_bytes=300 << 20)),
            (_instance("box", "container"), InstanceStats(cpu_seconds=1.0, memory_bytes=9 << 20,
                                                          memory_used_bytes=9 << 20))]
    text = sampler.exposition(sampler.families("node-a", 1700000000.0, sampler.node_counters(), rows)).decode()
    found = {f.name: f for f in text_string_to_metric_families(text)}
    used = {s.labels["name"]: s.value for s in found["cairn_instance_memory_used_bytes"].samples}
    host = {s.labels["name"]: s.value for s in found["cairn_instance_memory_host_bytes"].samples}
    given = {s.labels["name"]: s.value for s in found["cairn_instance_memory_bytes"].samples}
    assert used == {"talks": 60 << 20, "box": 9 << 20}
    assert host == {"talks": 350 << 20, "silent": 300 << 20, "box": 9 << 20}
    assert given == {"talks": 256 << 20, "silent": 256 << 20, "box": 256 << 20}
    assert "balloon" in found["cairn_instance_memory_used_bytes"].documentation
    assert "resident set" in found["cairn_instance_memory_host_bytes"].documentation


def test_an_instances_memory_series_are_guest_used_host_resident_and_given() -> None:
    defs = {d.name: d for d in series.INSTANCE}
    assert {"memory", "memory_host", "memory_total"} <= set(defs)  # the names the API documents, and the host's
    q = {n: series.promql(defs[n], {"id": "i"}, "id", 30) for n in ("memory", "memory_host", "memory_total")}
    assert q["memory"] == 'max by (id) (avg_over_time(cairn_instance_memory_used_bytes{id="i"}[30s]))'
    assert "cairn_instance_memory_host_bytes" in q["memory_host"]
    assert "cairn_instance_memory_bytes{" in q["memory_total"]
    assert "host" in defs["memory_host"].label and "guest" in defs["memory"].label
    assert "memory_host" not in {d.name for d in series.NODE}  # a node's graphs are unchanged


def test_every_history_query_runs_on_a_real_prometheus(module_api_sqlite: Api) -> None:
    api = module_api_sqlite
    with session_scope(api.settings.resolved_database_url) as session:
        nodes.register(session, "node-a", INVENTORY, {"cpu": 16, "memory_bytes": 1 << 30})
    with metrics_store(api.settings):
        for path, count in (("/api/v1/nodes/node-a/metrics", len(series.NODE)),
                            ("/api/v1/nodes/node-a/metrics?range=week", len(series.NODE))):
            r = api.client.get(path, headers=api.admin)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["series"]) == count and all(s["points"] == [] for s in body["series"])
            assert body["end"] - body["start"] in (3600, 7 * 86400)
        # an instance's queries (the route needs an instance in the database: asked directly)
        body = series.history(store.store_url(api.settings), series.INSTANCE, {"id": "no-such-id"}, "id", "hour",
                              api.settings.metrics_interval)
        assert [s["name"] for s in body["series"]] == [d.name for d in series.INSTANCE]
        assert all(s["points"] == [] for s in body["series"])
