"""The agent's replica watch decides from Patroni's samples alone (the lab's
``late-replay`` failover test runs it against a real stuck replica)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import pytest

from appliance.agent.replica_watch import ReplicaWatch, Sample, stuck_after
from appliance.cluster.config import TIMING_PROFILES, ClusterConfig

STUCK = Sample(role="replica", state="running", lag=59264, position=(83886080, 84719464), timeline=1,
               leader_timeline=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(watch: ReplicaWatch, clock: Clock, sample: Sample, seconds: float, every: float = 15) -> list[str]:
    steps = []
    end = clock.now + seconds
    while clock.now < end:
        step = watch.observe(sample)
        if step:
            steps.append(step)
        clock.now += every
    return steps


def test_a_stuck_replica_is_restarted_after_a_period_then_reinitialised_then_left_alone() -> None:
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    assert run(watch, clock, STUCK, 59) == []
    assert run(watch, clock, STUCK, 60) == ["restart"]
    assert run(watch, clock, STUCK, 60) == ["reinitialize"]
    assert run(watch, clock, STUCK, 600) == []  # nothing more to try: an operator's turn


def test_a_replica_that_moves_or_catches_up_is_never_touched() -> None:
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    for i in range(40):  # catching up slowly: every sample a little further
        assert watch.observe(replace(STUCK, position=(STUCK.position[0] + i, STUCK.position[1] + i))) is None
        clock.now += 15
    caught_up = replace(STUCK, lag=0, timeline=2)
    assert run(watch, clock, caught_up, 600) == []


def test_a_replica_cut_off_from_the_primary_or_paused_or_being_rebuilt_is_left_alone() -> None:
    for sample in (replace(STUCK, leader=False), replace(STUCK, paused=True),
                   replace(STUCK, state="creating replica"), replace(STUCK, role="master"),
                   replace(STUCK, lag=None, timeline=2)):
        clock = Clock()
        assert run(ReplicaWatch(60, clock), clock, sample, 600) == [], sample


def test_a_same_timeline_replica_standing_behind_counts_as_stuck_and_recovery_resets_the_steps() -> None:
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    behind = replace(STUCK, timeline=2)  # e.g. its WAL is gone from the primary
    assert run(watch, clock, behind, 75) == ["restart"]
    assert watch.observe(replace(behind, lag=0)) is None  # it streamed again
    assert run(watch, clock, behind, 75) == ["restart"]  # a new stall starts over


def test_the_period_follows_the_timing_profile() -> None:
    fast, relaxed = (TIMING_PROFILES[t]["patroni_ttl"] for t in ("fast", "relaxed"))
    assert stuck_after(cast(ClusterConfig, SimpleNamespace(patroni_ttl=fast))) == 60
    assert stuck_after(cast(ClusterConfig, SimpleNamespace(patroni_ttl=relaxed))) == 4 * relaxed


def test_a_standby_that_never_finishes_starting_gets_two_periods_then_is_rebuilt_once() -> None:
    """A restart would start it with the same settings (and hold Patroni's loop for minutes)."""
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    starting = Sample(role="replica", state="starting", lag=None, position=(0, 0))
    assert run(watch, clock, starting, 119) == []
    assert run(watch, clock, starting, 15) == ["reinitialize"]
    assert run(watch, clock, starting, 900) == []  # rebuilt and still not starting: an operator's turn
    assert run(ReplicaWatch(60, clock), clock, replace(starting, leader=False), 900) == []


def test_a_restarted_replica_that_then_cannot_start_is_rebuilt() -> None:
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    assert run(watch, clock, STUCK, 75) == ["restart"]
    starting = replace(STUCK, state="starting", lag=None, position=(0, 0))
    assert run(watch, clock, starting, 119) == []
    assert run(watch, clock, starting, 15) == ["reinitialize"]
    assert run(watch, clock, starting, 900) == []


def test_the_restart_passing_through_other_states_still_leads_to_the_reinitialisation() -> None:
    clock = Clock()
    watch = ReplicaWatch(60, clock)
    assert run(watch, clock, STUCK, 75) == ["restart"]
    for state in ("restarting", "stopped", "starting"):
        assert watch.observe(replace(STUCK, state=state, position=(0, 0))) is None
        clock.now += 5
    assert run(watch, clock, STUCK, 75) == ["reinitialize"]


def test_a_sample_asks_the_cluster_only_about_a_replica_and_the_primary_only_when_it_is_not_caught_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.agent import replica_watch

    answers: dict[str, dict[str, object]] = {}
    asked: list[str] = []

    class Answer:
        def __init__(self, url: str) -> None:
            self.url = url

        def json(self) -> dict[str, object]:
            return answers[self.url]

    def get(url: str, **_: object) -> Answer:
        asked.append(url)
        return Answer(url)

    monkeypatch.setattr(replica_watch.httpx, "get", get)
    cfg = cast(ClusterConfig, SimpleNamespace(address="10.0.0.2", node="n2"))
    watch = replica_watch.PatroniReplica(cfg, "ca.crt", ReplicaWatch(60))
    me, cluster = (f"https://10.0.0.2:8008/{p}" for p in ("patroni", "cluster"))
    primary = "https://10.0.0.1:8008/patroni"
    answers[me] = {"role": "master", "state": "running", "timeline": 2}
    assert watch.sample().role == "master" and asked == [me]
    members = [{"name": "n1", "role": "leader", "state": "running", "timeline": 2, "api_url": primary},
               {"name": "n2", "role": "replica", "state": "running", "timeline": 2, "lag": 0}]
    answers[me] = {"role": "replica", "state": "running", "timeline": 2, "xlog": {"received_location": 5}}
    answers[cluster] = {"members": members}
    answers[primary] = {"role": "master"}
    asked.clear()
    assert watch.sample().leader is False and asked == [me, cluster]
    members[1]["lag"] = 4096
    asked.clear()
    s = watch.sample()
    assert (s.lag, s.leader, s.leader_timeline) == (4096, True, 2) and asked == [me, cluster, primary]
