"""The node's liveness as the cluster sees it, and its self-fencing (DESIGN.md, HA).

The agent holds an etcd lease (``ha_lease_ttl`` seconds) carrying the key
``/cairn/nodes/<name>`` = its boot id and address, and renews it every second in a
thread of its own (a slow reconcile pass never delays it). The HA manager treats a node
whose key is gone as dead.

While the node runs HA workloads its watchdog is armed and fed *only after a successful
renewal*: a node that cannot renew (cut off, etcd out of reach) or whose agent hangs
(SIGSTOP, a deadlock) stops feeding it and is reset ``watchdog_timeout`` seconds after
its last renewal, which is before the lease can expire anywhere (the TTL counts from
that same renewal, and etcd only ever extends it). So when the HA manager sees the key
vanish, the node is already dead. Until it renews again, the node also does not start
any HA instance itself."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from appliance.cluster.etcd import Etcd
from appliance.cluster.watchdog import Watchdog, WatchdogUnavailable
from appliance.settings import Settings

log = logging.getLogger("cairn.agent.liveness")
KEY_PREFIX = "/cairn/nodes/"
RENEW_EVERY = 1.0
SLOW_STEP = 2.0


def node_key(name: str) -> str:
    return f"{KEY_PREFIX}{name}"


class Liveness(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="cairn-liveness", daemon=True)
        self.settings = settings
        cfg = settings.cluster
        assert cfg is not None
        self.cfg = cfg
        self.etcd = Etcd.for_node(cfg, settings.pki_dir, timeout=1)  # a renewal must not hang
        self.watchdog = Watchdog(settings.watchdog_device, settings.watchdog_timeout)
        self.want_armed = False  # set by the instance reconciler: HA workloads run here
        self.last_renewal = 0.0
        self.lease: Any = None
        self.error = ""
        self.failing = False  # renewals fail (logged once when it starts and once when it ends)
        self._stopping = threading.Event()

    def fresh(self) -> bool:
        """Whether the node renewed its lease recently enough to act as a live member
        (start HA instances)."""
        return time.monotonic() - self.last_renewal < min(3.0, self.settings.watchdog_timeout / 2)

    def renew(self) -> bool:
        """One renewal (a new lease and key if there is none or it expired)."""
        try:
            if self.lease is not None and self.lease.refresh() <= 0:
                self.lease = None  # it expired: the cluster may have fenced us; only a reboot lifts that
            if self.lease is None:
                lease = self.etcd.lease(self.settings.ha_lease_ttl)
                value = json.dumps({"boot_id": self.settings.boot_id, "address": self.cfg.address,
                                    "since": time.time()})
                self.etcd.put(node_key(self.cfg.node), value, lease=lease)
                self.lease = lease
                log.info("node lease taken", extra={"ttl": self.settings.ha_lease_ttl,
                                                     "boot_id": self.settings.boot_id})
        except Exception as exc:  # etcd out of reach: do not feed the watchdog
            if not self.failing:
                self.failing = True
                log.warning("lease renewal failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        now = time.monotonic()
        if self.failing:
            self.failing = False
            log.warning("lease renewed again", extra={"unrenewed_seconds": round(now - self.last_renewal, 2)})
        self.error = ""
        self.last_renewal = now
        return True

    def step(self) -> None:
        if self.renew():
            try:
                if self.want_armed:
                    self.watchdog.arm()
                    self.watchdog.feed()
                elif self.watchdog.armed:
                    self.watchdog.disarm()
            except WatchdogUnavailable as exc:
                self.error = str(exc)
                log.error("HA workloads run here but the watchdog cannot be armed", extra={"error": str(exc)})

    def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            self.step()
            took = time.monotonic() - started
            if took > SLOW_STEP:  # the watchdog went unfed that long: say so (a loaded host, a slow etcd)
                log.warning("slow lease renewal", extra={"seconds": round(took, 2), "error": self.error})
            self._stopping.wait(max(0.05, RENEW_EVERY - (time.monotonic() - started)))

    def stop(self) -> None:
        """A clean stop (the agent shuts down on purpose: `cairn down`, a restart): disarm.
        The lease is not given back: a restarted agent takes a new one before it expires,
        and a node that stays down is fenced once it has."""
        self._stopping.set()
        if self.watchdog.armed:
            self.watchdog.disarm()
