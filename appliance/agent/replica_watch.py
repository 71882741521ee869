"""A database replica that stopped converging is repaired by its own node's agent.

Patroni 3.0.2 (Debian 12) decides whether a running replica must be rewound to follow a
newly promoted primary by comparing the replica's *replayed* position with the new
timeline's switch point. WAL the replica had already received from the old primary,
but replayed only after that check, carries it past the switch point: PostgreSQL then
logs "new timeline N forked off current database system timeline before current
recovery point" on every retry and never streams again, while Patroni, having decided
"no rewind needed", reports it ``running``. Under strict synchronous replication two
such replicas (or one, after the other node is lost) hold every commit of the cluster.
A loaded machine widens the window (replay lags further behind receipt).

The agent watches its own node's replica: behind the primary (``lag`` above zero, or on
an older timeline) with its received and replayed positions standing still for
``stuck_after`` seconds, it asks Patroni to restart PostgreSQL (Patroni checks the
timeline again at start and rewinds); still stuck one more period later, to reinitialise
it from the primary (a fresh base backup: a replica's data is a copy). Then it waits a
whole period again before any other step. A paused replay is an operator's choice and is
left alone.

A standby that has been ``starting`` for two periods (PostgreSQL up but refusing
connections: it cannot reach a consistent point on the primary's timeline, e.g. after a
rewind whose missing WAL it never streams) is reinitialised at once: Patroni's restart
would start it again with the same recovery settings and no timeline check, and would
hold Patroni's own loop for ``primary_start_timeout`` (5 minutes) waiting for a start
that cannot finish (a whole run in CI ended with both replicas stuck like this)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx

from appliance.cluster.config import PATRONI_PORT, ClusterConfig

log = logging.getLogger("cairn.agent.replica")
# a standby that never finishes starting (PostgreSQL up, refusing connections: it cannot
# reach a consistent point on the primary's timeline) gets this many periods, then is rebuilt
STARTING_FACTOR = 2


@dataclass(frozen=True)
class Sample:
    """What this node's Patroni says about its PostgreSQL."""

    role: str
    state: str
    lag: int | None  # bytes behind the primary; None when unknown
    position: tuple[int, int]  # (received, replayed)
    paused: bool = False
    leader: bool = True  # a running primary elsewhere answers this node
    timeline: int = 0  # the replica's, and the primary's
    leader_timeline: int = 0

    @property
    def running(self) -> bool:
        return self.state in ("running", "streaming")

    @property
    def caught_up(self) -> bool:
        """Running on the primary's timeline with nothing left to receive."""
        return self.running and not (self.lag or 0) > 0 and self.timeline >= self.leader_timeline


class ReplicaWatch:
    """Decides, from successive samples, whether the replica is stuck and what to do:
    ``None``, ``"restart"`` or ``"reinitialize"``. Pure: time comes from ``clock``."""

    def __init__(self, stuck_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stuck_after = stuck_after
        self.clock = clock
        self._since: float | None = None  # when the position last moved while behind
        self._position: tuple[int, int] | None = None
        self._acted: list[str] = []  # the steps taken during this stall

    def period(self, s: Sample) -> float:
        """How long ``s``'s replica may stand still before the next step."""
        return self.stuck_after * (STARTING_FACTOR if s.state == "starting" else 1)

    def observe(self, s: Sample) -> str | None:
        now = self.clock()
        starting = s.state == "starting"
        if s.role != "replica" or s.caught_up:
            self._acted = []  # caught up (or promoted): a later stall starts over
        behind = s.role == "replica" and s.leader and not s.paused and (starting or (s.running and not s.caught_up))
        if not behind or s.position != self._position:  # moving, or in between (restarting, cut off)
            self._position = s.position if behind else None
            self._since = now if behind else None
            return None
        assert self._since is not None
        if now - self._since < self.period(s):
            return None
        self._since = now  # each step gets a whole period to work
        if starting:  # a restart starts it the same way again: rebuild it
            step = None if "reinitialize" in self._acted else "reinitialize"
        else:
            step = "restart" if not self._acted else "reinitialize" if self._acted == ["restart"] else None
        if step is not None:
            self._acted.append(step)
        return step


def stuck_after(cfg: ClusterConfig) -> float:
    """A minute on the fast profile; four Patroni TTLs on slower ones."""
    return float(max(60, 4 * cfg.patroni_ttl))


class PatroniReplica:
    """The watch wired to this node's Patroni REST API."""

    def __init__(self, cfg: ClusterConfig, ca: str, watch: ReplicaWatch | None = None) -> None:
        self.cfg = cfg
        self.ca = ca
        self.base = f"https://{cfg.address}:{PATRONI_PORT}"
        self.watch = watch or ReplicaWatch(stuck_after(cfg))

    def sample(self) -> Sample:
        """One look; the cluster and the primary are asked only about a replica, and the
        primary's reachability only when the replica is not plainly caught up."""
        me = httpx.get(f"{self.base}/patroni", verify=self.ca, timeout=3).json()
        xlog = me.get("xlog", {})
        s = Sample(role=str(me.get("role", "")), state=str(me.get("state", "")), lag=None,
                   position=(int(xlog.get("received_location") or 0), int(xlog.get("replayed_location") or 0)),
                   paused=bool(xlog.get("paused")), leader=False, timeline=int(me.get("timeline") or 0))
        if s.role != "replica":
            return s
        members = httpx.get(f"{self.base}/cluster", verify=self.ca, timeout=3).json().get("members", [])
        mine: dict[str, Any] = next((m for m in members if m.get("name") == self.cfg.node), {})
        leader: dict[str, Any] = next((m for m in members if m.get("role") == "leader"), {})
        lag = mine.get("lag")
        s = replace(s, lag=lag if isinstance(lag, int) else None, leader_timeline=int(leader.get("timeline") or 0))
        return s if s.caught_up else replace(s, leader=self._leader_answers(members))

    def _leader_answers(self, members: list[dict[str, Any]]) -> bool:
        """A running primary elsewhere that this node reaches: a replica cut off from it is
        not stuck on a timeline, it waits for the network (and is left alone)."""
        leader = next((m for m in members if m.get("role") == "leader" and m.get("state") == "running"), None)
        if leader is None or leader.get("name") == self.cfg.node or not leader.get("api_url"):
            return False
        try:
            role = httpx.get(leader["api_url"], verify=self.ca, timeout=3).json().get("role")
        except (httpx.HTTPError, ValueError):
            return False
        return role in ("master", "primary")

    def __call__(self, report: Any) -> None:
        s = self.sample()
        step = self.watch.observe(s)
        if step is None:
            return
        body = {"force": True} if step == "reinitialize" else {}
        r = httpx.post(f"{self.base}/{step}", json=body, verify=self.ca, timeout=60,
                       auth=("patroni", self.cfg.secrets.patroni_rest))
        waited = self.watch.period(s)
        why = ("it never finished starting (no consistent point on the primary's timeline)" if s.state == "starting"
               else f"{s.lag} bytes behind the primary, it did not move (a timeline it cannot follow)")
        how = ("rebuild it from the primary" if step == "reinitialize"
               else "restart it (Patroni checks its timeline again and rewinds it)")
        what = (f"cluster: this node's database replica ({s.state}) stood still for {waited:g} s or more: {why}; "
                f"asked Patroni to {how}: {r.status_code} {r.text.strip()[:200]}")
        log.warning(what)
        report.actions.append(what)
