"""The agent's cluster reconciler (cluster nodes only): keeps this node's view of the
cluster current and finishes joins. It runs in a thread of its own (``start``): what it
keeps sits under the database, so it must not wait behind reconcile passes that write to
the database (a replica stuck on a timeline under strict synchronous replication holds
every commit, and the pass with it, until this very reconciler repairs the replica).

- the member list in ``cluster.json`` follows etcd's membership, so the database URL,
  the broker's sentinels and etcd's endpoints of every process name every member;
- an etcd learner (a node that just joined) is promoted once it has caught up;
- ``ceph.conf`` names every monitor of the monitor map;
- PostgreSQL's synchronous replication turns strict once three members exist (with
  fewer, a lone primary would refuse writes);
- this node's database replica, stuck behind a timeline it cannot follow, is restarted
  and if need be reinitialised (``replica_watch``);
- etcd's leadership moves off the node of the database primary: if both die together,
  etcd first elects a leader and then grants every lease its full TTL again, which adds
  a whole Patroni TTL to the failover (probes/cluster: 16–20 s → 25 s)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx

from appliance.agent.replica_watch import PatroniReplica
from appliance.cluster.config import CEPH_POOL, PATRONI_PORT, ClusterConfig, Member
from appliance.cluster.etcd import Etcd, EtcdUnavailable
from appliance.settings import Settings

log = logging.getLogger("cairn.agent.cluster")
SLOW_EVERY = 15.0  # seconds between the Ceph and Patroni checks
LEADER_EVERY = 5.0  # seconds between checks of where etcd's leader and the primary are


class ClusterReconciler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slow_at = 0.0
        self._leader_at = 0.0
        self._replica: PatroniReplica | None = None

    def start(self, every: float) -> threading.Thread:
        """Reconcile every ``every`` seconds in a daemon thread, logging what it did."""
        from appliance.agent.agent import PassReport

        def loop() -> None:
            while True:
                report = PassReport()
                try:
                    self(None, report)
                except Exception:  # the next pass tries again
                    log.exception("cluster pass failed")
                for line in report.actions:
                    log.info(line)
                for line in report.errors:
                    log.warning(line)
                time.sleep(every)

        thread = threading.Thread(target=loop, name="cairn-agent-cluster", daemon=True)
        thread.start()
        return thread

    def __call__(self, agent: Any, report: Any) -> None:
        cfg = self.settings.cluster
        if cfg is None:
            return
        etcd = Etcd.for_node(cfg, self.settings.pki_dir, timeout=2)
        try:
            members = etcd.members()
        except EtcdUnavailable as exc:
            report.errors.append(f"cluster: etcd unreachable: {exc}")
            return
        for m in members:
            if m.learner:
                try:
                    etcd.member_promote(m.id)
                    report.actions.append(f"cluster: promoted etcd learner {m.name or m.address}")
                except Exception as exc:  # not caught up yet: next pass
                    log.debug("learner not promoted yet", extra={"member": m.name, "error": str(exc)})
        known = sorted((Member(name=m.name, address=m.address) for m in members if m.name),
                       key=lambda x: x.name)
        if known and [(m.name, m.address) for m in known] != sorted((m.name, m.address) for m in cfg.members):
            cfg = cfg.model_copy(update={"members": known})
            cfg.save(self.settings.cluster_file)
            report.actions.append("cluster: member list updated: " + ", ".join(m.name for m in known))
        if time.monotonic() - self._leader_at >= LEADER_EVERY:
            self._leader_at = time.monotonic()
            try:
                self._etcd_leader_off_primary(cfg, etcd, members, report)
            except Exception as exc:
                report.errors.append(f"cluster: etcd leadership: {exc}")
        if time.monotonic() - self._slow_at >= SLOW_EVERY:
            self._slow_at = time.monotonic()
            voters = sum(1 for m in members if not m.learner and m.name)
            for step in (self._ceph, lambda c, r: self._patroni_strict(c, r, voters), self._replica_watch):
                try:
                    step(cfg, report)
                except Exception as exc:
                    report.errors.append(f"cluster: {exc}")

    def _replica_watch(self, cfg: ClusterConfig, report: Any) -> None:
        if self._replica is None:
            self._replica = PatroniReplica(cfg, str(self.settings.pki_dir / "ca.crt"))
        self._replica.cfg = cfg
        self._replica(report)

    def _etcd_leader_off_primary(self, cfg: ClusterConfig, etcd: Etcd, members: list[Any], report: Any) -> None:
        """Run on every node; acts only where etcd's leader and the database primary meet."""
        me = next((m for m in members if m.name == cfg.node), None)
        if me is None or etcd.status(cfg.address).get("leader") != me.id:
            return
        role = httpx.get(f"https://{cfg.address}:{PATRONI_PORT}/patroni", verify=str(self.settings.pki_dir / "ca.crt"),
                         timeout=2).json().get("role")
        if role not in ("master", "primary"):
            return
        target = next((m for m in members if m.id != me.id and not m.learner and m.name), None)
        if target is not None:
            etcd.move_leader(target.id)
            report.actions.append(f"cluster: moved etcd leadership to {target.name} (away from the database primary)")

    def _ceph(self, cfg: ClusterConfig, report: Any) -> None:
        from appliance.cluster.runtime import ceph_conf_path, ceph_node
        from storage.backends.rados_deploy import Admin, CephNode, write_conf

        if not (self.settings.data_dir / "ceph" / "ready").exists():
            return
        with Admin(ceph_conf_path(), timeout=5) as admin:
            mons = sorted(admin.mon_names())
            admin.replicate_by_hosts(CEPH_POOL)
        if mons and mons != sorted((m.name, m.address) for m in cfg.ceph_mons):
            cfg = cfg.model_copy(update={"ceph_mons": [Member(name=n, address=a) for n, a in mons]})
            cfg.save(self.settings.cluster_file)
            node = ceph_node(self.settings, cfg)
            assert isinstance(node, CephNode)
            write_conf(node)
            report.actions.append("cluster: ceph.conf names monitors " + ", ".join(n for n, _ in mons))

    def _patroni_strict(self, cfg: ClusterConfig, report: Any, voters: int) -> None:
        if voters < 3:
            return
        url = f"https://{cfg.address}:{PATRONI_PORT}/config"
        ca = str(self.settings.pki_dir / "ca.crt")
        current = httpx.get(url, verify=ca, timeout=3).json()
        if current.get("synchronous_mode_strict"):
            return
        r = httpx.patch(url, json={"synchronous_mode_strict": True}, verify=ca, timeout=5,
                        auth=("patroni", cfg.secrets.patroni_rest))
        r.raise_for_status()
        report.actions.append("cluster: PostgreSQL synchronous replication is now strict (3 members)")
