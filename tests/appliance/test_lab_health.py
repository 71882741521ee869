"""The lab's health rule: what a healed lab must show before the next test runs."""

from __future__ import annotations

import pytest

from appliance.lab.ops import ceph_healthy

pytestmark = pytest.mark.unit


def test_slow_heartbeat_pings_alone_are_tolerated_and_nothing_else_is() -> None:
    assert ceph_healthy({"health": "HEALTH_OK", "checks": []})
    assert ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_SLOW_PING_TIME_BACK", "OSD_SLOW_PING_TIME_FRONT"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_SLOW_PING_TIME_BACK", "PG_DEGRADED"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": ["OSD_DOWN"]})
    assert not ceph_healthy({"health": "HEALTH_WARN", "checks": []})
    assert not ceph_healthy({"health": "HEALTH_ERR", "checks": ["OSD_SLOW_PING_TIME_BACK"]})
    assert not ceph_healthy({})
