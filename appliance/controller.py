"""Cluster housekeeping: nodes past their grace period turn NotReady, tasks whose
worker died are retried or failed (pending ones whose message a broker failover lost
are sent again), old events are pruned. Every API process runs the loop; in a cluster
only the holder of the ``controller`` leader key on etcd acts (each step is also a
compare-and-swap style update, so an overlap at a leader change is harmless)."""

from __future__ import annotations

import logging
import os
import threading

from appliance.db.engine import session_scope
from appliance.services import audit, events, nodes, tasks
from appliance.settings import Settings

log = logging.getLogger("cairn.controller")


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
        while not self.stopped.wait(self.settings.controller_interval):
            if election is not None and not election.campaign():
                continue
            if manager is not None:  # first: a lost node's HA instances wait for nothing else
                try:
                    manager.run_once()
                except Exception:
                    log.exception("HA manager pass failed")
            try:
                run_once(self.settings)
            except Exception:
                log.exception("controller pass failed")
        if election is not None:
            election.resign()

    def stop(self) -> None:
        self.stopped.set()
