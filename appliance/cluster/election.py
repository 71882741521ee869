"""Leader election on etcd: one holder of a key at a time, on a lease (no home-made
consensus: etcd's lease and a create-if-absent transaction do the work).

The holder refreshes its lease every pass; a holder that cannot (cut off, hung) loses
the key when the lease's TTL runs out, and another candidate takes it. ``is_leader()``
answers from the last successful refresh, so a cut-off holder stops acting as leader
no later than the lease expires elsewhere."""

from __future__ import annotations

import logging
import os
import socket
import time

from etcd3gw.lease import Lease

from appliance.cluster.etcd import Etcd

log = logging.getLogger("cairn.cluster.election")


class Election:
    def __init__(self, etcd: Etcd, name: str, ttl: int = 10, identity: str | None = None) -> None:
        self.etcd = etcd
        self.key = f"/cairn/leaders/{name}"
        self.ttl = ttl
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.lease: Lease | None = None
        self._valid_until = 0.0

    def campaign(self) -> bool:
        """One step: refresh our lease if we lead, else try to take the key. Returns
        whether we lead now."""
        now = time.monotonic()
        try:
            if self.lease is not None and now < self._valid_until:
                if self.lease.refresh() > 0 and self.etcd.get(self.key) == self.identity:
                    self._valid_until = now + self.ttl * 0.8
                    return True
                self.lease = None
            lease = self.etcd.lease(self.ttl)
            if self.etcd.create_if_absent(self.key, self.identity, lease=lease):
                self.lease, self._valid_until = lease, now + self.ttl * 0.8
                log.info("became leader", extra={"key": self.key, "identity": self.identity})
                return True
            lease.revoke()
        except Exception as exc:  # etcd unreachable: we are not (or no longer) leader
            log.debug("campaign failed", extra={"key": self.key, "error": str(exc)})
        self.lease = None
        self._valid_until = 0.0
        return False

    def is_leader(self) -> bool:
        return self.lease is not None and time.monotonic() < self._valid_until

    def resign(self) -> None:
        if self.lease is not None:
            try:
                self.lease.revoke()
            except Exception:
                pass
        self.lease = None
        self._valid_until = 0.0

    def holder(self) -> str | None:
        return self.etcd.get(self.key)
