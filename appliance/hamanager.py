"""The HA manager: one per cluster (it runs in the controller loop of whichever API holds
the ``controller`` leader key on etcd), a pass a second.

Every pass reads which nodes hold their etcd lease (``/cairn/nodes/<name>``, see
:mod:`appliance.agent.liveness`). A node that held one and lost it is dead: its
watchdog reset it before the lease could expire (it feeds the watchdog only after
renewing). If it ran HA instances, its storage is fenced first (its Ceph clients
blocklisted, its volume locks broken), and only when that succeeded are its HA
instances queued for a restart elsewhere; its other instances turn ``error`` with the
reason. A fenced node comes back only rebooted (a new boot id): then the blocklist is
lifted. Every step is recorded as an event (the failover's timeline)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from appliance.agent.liveness import KEY_PREFIX
from appliance.cluster import fencing
from appliance.cluster.etcd import Etcd
from appliance.db.engine import session_scope
from appliance.services import ha
from appliance.settings import Settings

log = logging.getLogger("cairn.ha")


class HaManager:
    def __init__(self, settings: Settings) -> None:
        cfg = settings.cluster
        assert cfg is not None
        self.settings = settings
        self.etcd = Etcd.for_node(cfg, settings.pki_dir, timeout=2)

    def alive(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, value in self.etcd.get_prefix(KEY_PREFIX).items():
            try:
                out[key[len(KEY_PREFIX):]] = json.loads(value)
            except ValueError:
                continue
        return out

    def run_once(self, leading: Callable[[], bool] = lambda: True) -> dict[str, list[str]]:
        """One pass. ``leading`` answers whether this manager still holds the leader key:
        checked before each step that acts (a fence can outlast the key's lease)."""
        done: dict[str, list[str]] = {"fenced": [], "lost": [], "unfenced": [], "failovers": []}
        alive = self.alive()  # raises when etcd has no quorum from here: then nothing is decided
        url = self.settings.resolved_database_url
        with session_scope(url) as session:
            back = ha.observe(session, alive)
        for name, address in back:
            fencing.unfence_storage(address)
            with session_scope(url) as session:
                ha.unfenced(session, name)
            done["unfenced"].append(name)
        with session_scope(url, readonly=True) as session:
            lost = ha.lost(session, alive)
        for item in lost:
            if not leading():
                break
            started = time.monotonic()
            report = None
            if item.ha:
                # fence before anything restarts; a failure here leaves everything as it is
                report = fencing.fence_storage(self.settings, item.name, item.address)
                if not leading():  # the new leader fences again (idempotent) and records it
                    break
            with session_scope(url) as session:
                done["failovers"] += ha.record_lost(session, item, bool(item.ha), report)
            done["fenced" if item.ha else "lost"].append(item.name)
            log.warning("node lost", extra={"node": item.name, "fenced": bool(item.ha), "ha_instances": len(item.ha),
                                            "fence_seconds": round(time.monotonic() - started, 2)})
        return done
