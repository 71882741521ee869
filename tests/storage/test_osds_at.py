"""Which OSDs live on a host, from ``osd dump`` (the HA fence marks a dead node's OSDs down
at once instead of waiting for the monitors' heartbeat grace)."""

from __future__ import annotations

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.backends.rados_deploy import Admin, osds_at

DUMP = {"osds": [
    {"osd": 0, "public_addr": "172.29.0.11:6801/1234",
     "public_addrs": {"addrvec": [{"type": "v2", "addr": "172.29.0.11:6800", "nonce": 1234},
                                  {"type": "v1", "addr": "172.29.0.11:6801", "nonce": 1234}]}},
    {"osd": 2, "public_addr": "172.29.0.13:6801/99", "public_addrs": {"addrvec": [
        {"type": "v2", "addr": "172.29.0.13:6800", "nonce": 99}]}},
    {"osd": 3, "public_addr": "172.29.0.130:6801/7"},  # a longer address with the same prefix
    {"osd": 1, "public_addr": "-", "public_addrs": {"addrvec": []}},  # never booted
]}


def test_the_osds_of_a_host_are_those_on_its_address_and_no_other() -> None:
    assert osds_at(DUMP, "172.29.0.13") == [2]
    assert osds_at(DUMP, "172.29.0.11") == [0]
    assert osds_at(DUMP, "172.29.0.130") == [3]
    assert osds_at(DUMP, "172.29.0.12") == []
    assert osds_at({}, "172.29.0.11") == []


@pytest.mark.functional
def test_a_real_clusters_osd_dump_names_its_osds_by_address(ceph: CephCluster) -> None:
    """The contract of the fake dump above: a real ``osd dump`` of the session's cluster
    (every OSD on one loopback address)."""
    with Admin(ceph.conf) as admin:
        dump = admin.mon("osd dump")
        assert len(dump["osds"]) == 3
        assert admin.osds_at(ceph.ip) == sorted(o["osd"] for o in dump["osds"])
        assert admin.osds_at("192.0.2.1") == []
