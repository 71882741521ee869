"""The lab's health rule: what a healed lab must show before the next test runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.lab.layout import Lab
from appliance.lab.ops import ceph_healthy, database_trouble

pytestmark = pytest.mark.unit


def test_slow_heartbeat_pings_alone_are_tolerated_and_nothing_else_is() -> None:
    assert ceph_healthy({"health": "HEALTH_OK", "checks": []})
    assert ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_SLOW_PING_TIME_BACK", "OSD_SLOW_PING_TIME_FRONT"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_SLOW_PING_TIME_BACK", "PG_DEGRADED"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_DOWN"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": []})
    assert not ceph_healthy({"health": "HEALTH_ERR", "checks": ["OSD_SLOW_PING_TIME_BACK"]})
    assert not ceph_healthy({})


def test_a_stuck_database_is_reported_with_its_recovery_settings_and_events_not_its_repeats(tmp_path: Path) -> None:
    """What a failed run shows of a member whose database is not up (the lab is gone after it)."""
    lab = Lab(str(tmp_path), "clabtest", "172.29.0.0/24", str(tmp_path / "cg"))
    for _ in range(3):
        lab.add_node()
    n1 = lab.node("n1")
    (n1.data_dir / "log").mkdir(parents=True)
    (n1.host_path("pg") / "data").mkdir(parents=True)
    (n1.host_path("pg") / "data" / "postgresql.conf").write_text(
        "hot_standby = 'on'\nprimary_conninfo = 'user=replicator host=172.29.0.13 port=5432'\n"
        "primary_slot_name = 'n1'\n")
    events = ["2026-12-07 22:14:01,000 INFO: running pg_rewind from n3",
              "2026-12-07 22:14:02,000 INFO: starting as a secondary"]
    repeats = ["2026-12-07 22:14:03 UTC [1] LOG:  waiting for WAL to become available at 0/7002000",
               "2026-12-07 22:14:03,500 INFO: Lock owner: n3; I am n1", "localhost:5432 - rejecting connections"]
    (n1.data_dir / "log" / "patroni.log").write_text("\n".join(events + repeats * 100) + "\n")
    view = {"members": [{"name": "n1", "database": {"state": "starting", "lag": "unknown"}},
                        {"name": "n2", "database": {"state": "running", "lag": 0}},
                        {"name": "n3", "database": {"state": "running", "lag": None}}]}
    report = database_trouble(lab, view)
    assert "--- n1 (starting, lag unknown)" in report and "--- n2" not in report and "--- n3" not in report
    assert "primary_conninfo = 'user=replicator host=172.29.0.13 port=5432'" in report
    assert "primary_slot_name = 'n1'" in report
    assert all(e in report for e in events)
    assert "waiting for WAL" not in report and "300 of the last 302 repeat every loop" in report
    # a member that says it is up is reported when asked for by name (a wait for it failed)
    assert "--- n2 (running, lag 0)" in database_trouble(lab, view, members=("n2",))
    assert "No such file" in database_trouble(lab, view, members=("n2",))
