"""Cluster housekeeping: nodes past their grace period turn NotReady, tasks whose
worker died are retried or failed (pending ones whose message a broker failover lost
are sent again), old events are pruned. Every API process runs the loop; in a cluster
only the holder of the ``controller`` leader key on etcd acts (each step is also a
compare-and-swap style update, so an overlap at a leader change is harmless)."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from appliance.db.engine import session_scope
from appliance.services import audit, events, nodes, tasks
from appliance.settings import Settings

if TYPE_CHECKING:
    from appliance.cluster.election import Election

log = logging.getLogger("cairn.controller")
KEEP_EVERY = 1.0  # seconds between refreshes of the controller's leader key (its TTL: 10 s)


def run_once(settings: Settings) -> dict[str, list[str]]:
    url = settings.resolved_database_url
    with session_scope(url) as session:
        lost_nodes = nodes.mark_lost(session, settings.node_grace_seconds)
    with session_scope(url) as session:
        reaped = tasks.reap(session, settings.task_grace_seconds)
    with session_scope(url) as session:
        events.prune(session)
    with session_scope(url) as session:
        audit.prune(session, settings.audit_retention_days)
    for name in lost_nodes:
        log.warning("node NotReady: heartbeats stopped", extra={"node": name})
    for task_id in reaped:
        log.warning("task lost its worker", extra={"task_id": task_id})
    return {"nodes_not_ready": lost_nodes, "tasks_reaped": reaped}


class ControllerThread(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="cairn-controller", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        election = None
        manager = None
        cfg = self.settings.cluster
        if cfg is not None:
            from appliance.cluster.election import Election
            from appliance.cluster.etcd import Etcd
            from appliance.hamanager import HaManager

            election = Election(Etcd.for_node(cfg, self.settings.pki_dir, timeout=2), "controller",
                                identity=f"{cfg.node}:{os.getpid()}")
            manager = HaManager(self.settings)
            # the leader key is kept by a thread of its own: a slow pass (a fence waiting
            # for Ceph) never lets it lapse while this one still acts
            keeper = threading.Thread(target=self._keep, args=(election,), name="cairn-controller-election",
                                      daemon=True)
            keeper.start()
        while not self.stopped.wait(self.settings.controller_interval):
            if election is not None and not election.is_leader():
                continue
            if manager is not None:  # first: a lost node's HA instances wait for nothing else
                try:
                    manager.run_once(election.is_leader if election is not None else lambda: True)
                except Exception:
                    log.exception("HA manager pass failed")
            try:
                run_once(self.settings)
            except Exception:
                log.exception("controller pass failed")
        if election is not None:
            keeper.join(timeout=10)  # no campaign may take the key back after this resign
            election.resign()

    def _keep(self, election: Election) -> None:
        while not self.stopped.is_set():
            election.campaign()
            self.stopped.wait(KEEP_EVERY)

    def stop(self) -> None:
        self.stopped.set()
