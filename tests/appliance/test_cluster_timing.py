"""A cluster's timing profile (``cairn cluster init --timing``): what each engine is told,
what a joiner inherits, and the floors it puts under the node's own HA settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.cluster import formation
from appliance.cluster.config import TIMING_PROFILES, ClusterConfig, Member, database_url, superuser_dsn
from appliance.cluster.engines import NodePaths, etcd_argv, patroni_config
from appliance.cluster.etcd import EtcdUnavailable
from appliance.errors import CairnError
from appliance.settings import Settings

pytestmark = pytest.mark.unit


def _config(timing: str) -> ClusterConfig:
    me = Member(name="n1", address="10.0.0.11")
    return ClusterConfig(node="n1", address="10.0.0.11", network="10.0.0.0/24", bootstrap="init", members=[me],
                         etcd_initial_cluster="n1=https://10.0.0.11:2380", etcd_state="new",
                         redis_master="10.0.0.11", timing=timing, **TIMING_PROFILES[timing])


@pytest.mark.parametrize("timing", sorted(TIMING_PROFILES))
def test_each_profile_reaches_etcd_and_patroni_and_patroni_can_keep_its_lock(timing: str, tmp_path: Path) -> None:
    cfg = _config(timing)
    want = TIMING_PROFILES[timing]
    argv = etcd_argv(cfg, NodePaths(tmp_path / "cluster", tmp_path / "pki"))
    assert f"--heartbeat-interval={want['etcd_heartbeat_ms']}" in argv
    assert f"--election-timeout={want['etcd_election_ms']}" in argv
    assert "--pre-vote=true" in argv  # a member back from a partition must not depose the leader
    # every database connection waits the profile's connect timeout per member
    assert f"connect_timeout={want['db_connect_timeout']}" in database_url(cfg)
    assert f"connect_timeout={want['db_connect_timeout']}" in superuser_dsn(cfg)
    assert want["etcd_election_ms"] >= 10 * want["etcd_heartbeat_ms"] / 2  # etcd's advice: 5-10x
    dcs = yaml.safe_load(patroni_config(cfg, NodePaths(tmp_path / "cluster", tmp_path / "pki")))["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (
        want["patroni_ttl"], want["patroni_loop_wait"], want["patroni_retry_timeout"])
    # Patroni's rule: a leader that retries the DCS for retry_timeout twice in a loop still
    # renews its key before the ttl runs out
    assert dcs["loop_wait"] + 2 * dcs["retry_timeout"] < dcs["ttl"]
    assert want["watchdog_timeout"] < want["ha_lease_ttl"]  # the node resets before others call it dead


def test_the_default_profile_is_fast_and_unchanged() -> None:
    cfg = ClusterConfig.model_validate({k: v for k, v in _config("fast").model_dump().items()
                                        if k not in {"timing", *TIMING_PROFILES["fast"]}})
    assert cfg.timing == "fast" and cfg.timing_fields() == {"timing": "fast", **TIMING_PROFILES["fast"]}


def test_init_writes_the_profile_and_a_joiner_inherits_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", node_name="n1")
    cfg = formation.init(settings, "127.0.0.1", ["file:1073741824"], timing="relaxed")
    saved = settings.cluster
    assert saved is not None and saved.timing == "relaxed"
    assert saved.timing_fields() == {"timing": "relaxed", **TIMING_PROFILES["relaxed"]}
    # what membership.admit hands a joining node
    joiner = ClusterConfig(name=cfg.name, cluster_id=cfg.cluster_id, node="n2", address="127.0.0.2",
                           network=cfg.network, bootstrap="join", members=cfg.members, etcd_initial_cluster="",
                           etcd_state="existing", redis_master=cfg.redis_master, **cfg.timing_fields())
    assert joiner.timing_fields() == saved.timing_fields()


def test_a_relaxed_cluster_raises_the_nodes_ha_lease_watchdog_and_grace(tmp_path: Path) -> None:
    data = tmp_path / "data"
    plain = Settings(data_dir=data, node_name="n1")
    assert (plain.ha_lease_ttl, plain.watchdog_timeout, plain.node_grace_seconds) == (10, 8, 10.0)
    _config("fast").save(plain.cluster_file)
    fast = Settings(data_dir=data, node_name="n1", ha_lease_ttl=5, node_grace_seconds=3)
    assert (fast.ha_lease_ttl, fast.node_grace_seconds) == (5, 3.0)  # fast: the settings as they are
    _config("relaxed").save(plain.cluster_file)
    relaxed = Settings(data_dir=data, node_name="n1")
    assert (relaxed.ha_lease_ttl, relaxed.watchdog_timeout, relaxed.node_grace_seconds) == (60, 45, 60.0)
    assert Settings(data_dir=data, node_name="n1", ha_lease_ttl=120).ha_lease_ttl == 120  # floors, not caps


def test_an_unreachable_etcd_is_a_503_to_retry_not_a_server_error() -> None:
    exc = EtcdUnavailable("no etcd member answered: 10.0.0.11: timed out")
    assert isinstance(exc, CairnError) and exc.status == 503
    assert "try again" in exc.detail and "10.0.0.11" in exc.detail
