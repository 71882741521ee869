"""The agent's storage reconciler: attaches the pools this node serves to its storage
daemon (detaches the others), creates the ``default`` pool on the first node that
reconciles, and reports each pool's phase and space stats (logical / stored bytes,
dedup and compression ratios) back to the database, and which volumes this node owns
(``status.owner``: its storage daemon holds their locks, or, for ``rbd`` volumes, an
instance running here has them open through QEMU's RBD driver). The pools come from the
node's desired-state document, so with a cached one (database away) a restarted storage
daemon gets its pools back and the guests their disks."""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from sqlalchemy import select

from appliance.cluster.config import CEPH_POOL
from appliance.cluster.runtime import ceph_conf_path
from appliance.db.engine import session_scope
from appliance.db.models import Instance, Node, StoragePool, Volume
from appliance.services import pools, volumes
from appliance.services.desired_state import NodeDocument
from appliance.settings import Settings
from storage.control import StorageClient
from storage.errors import StorageError

log = logging.getLogger("cairn.agent.storage")
STATS_EVERY = 30.0  # seconds; stats walk every block map of the pool


def local_capacity(url: str) -> dict[str, int] | None:
    """Size and free space of the file system a ``local://`` pool lives on (None for
    other backends, or before the directory exists)."""
    if not url.startswith("local://"):
        return None
    try:
        usage = shutil.disk_usage(url.removeprefix("local://"))
    except OSError:
        return None
    return {"total_bytes": usage.total, "free_bytes": usage.free}


class StorageReconciler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = StorageClient(settings.storage_socket, timeout=120)
        self._stats_at: dict[str, float] = {}

    def _ensure_default(self) -> bool:
        name = self.settings.storage_default_pool
        if not name:
            return False
        with session_scope(self.settings.resolved_database_url) as session:
            if session.scalar(select(StoragePool.id).where(StoragePool.name == name)):
                return False
            directory = self.settings.data_dir / "storage" / name
            pools.create(session, None, name, self.settings.node_name, "local", str(directory),
                         nbd_port_base=self.settings.storage_nbd_port)
        log.info("created the default storage pool", extra={"pool": name})
        return True

    def _ensure_ceph(self) -> bool:
        """``cairn up --ceph`` or a cluster: once this node's Ceph daemons run, the
        replicated pool (size 3, min_size 2) is the ``ceph`` storage pool (dedup and rbd
        volumes), which every node's storage daemon writes. In a cluster the pool is the
        cluster's (``/etc/ceph/ceph.conf`` on every node)."""
        ready = self.settings.ceph_dir / "ready"
        clustered = self.settings.cluster is not None
        if not (self.settings.ceph_enabled or clustered) or not ready.exists():
            return False
        with session_scope(self.settings.resolved_database_url) as session:
            if session.scalar(select(StoragePool.id).where(StoragePool.name == "ceph")):
                return False
            if clustered:
                url = f"rados://{CEPH_POOL}/cairn?conf={ceph_conf_path()}"
            else:
                url = f"rados://cairn/cairn?conf={self.settings.ceph_dir / 'ceph.conf'}"
            pools.create(session, None, "ceph", self.settings.node_name, "rados", url, replication=3,
                         nbd_port_base=self.settings.storage_nbd_port)
        return True

    def __call__(self, agent: Any, report: Any) -> None:
        if not self.client.ready():
            report.errors.append(f"storage: the storage daemon at {self.settings.storage_socket} is not answering")
            return
        if agent.document_fresh:
            try:
                if self._ensure_default() | self._ensure_ceph():
                    agent.refresh_document(report)  # the pool just made is in the document now
            except Exception as exc:  # the database went away: attach what the document has
                report.errors.append(f"storage: {exc.__class__.__name__}: {str(exc)[:300]}")
        if agent.document is not None:
            self.reconcile(agent.document, report, fresh=agent.document_fresh)

    def reconcile(self, doc: NodeDocument, report: Any, fresh: bool = True) -> None:
        mine = {p.name: p for p in doc.pools}
        attached = {p["name"]: p for p in self.client.call("pools")}
        if fresh:  # a cached document may predate a pool added since
            for name in set(attached) - set(mine):
                self.client.call("detach", pool=name)
                report.actions.append(f"storage: detached pool {name}")
        for name, pool in mine.items():
            update: dict[str, Any] = {}
            if name == "ceph" and not (self.settings.ceph_dir / "ready").exists():
                continue  # the embedded cluster is (re)starting: attaching now would block this pass
            try:
                if name not in attached:
                    (self.settings.data_dir / "storage").mkdir(parents=True, exist_ok=True)
                    self.client.call("attach", name=name, backend=pool.url, chunk_size=pool.chunk_size,
                                     port=pool.nbd_port)
                    report.actions.append(f"storage: attached pool {name}")
                update = {"phase": "Ready", "message": ""}
                if fresh:
                    owned = set(self.client.call("owned", pool=name))
                    report.actions.extend(self._report_owners(pool.id, owned))
                if fresh and time.monotonic() - self._stats_at.get(name, 0.0) >= STATS_EVERY:
                    update["stats"] = self.client.call("stats", pool=name)
                    update["dedup_ratio"] = update["stats"].get("dedup_ratio")  # `cairn pool get -o json`
                    capacity = local_capacity(pool.url)
                    if capacity is not None:
                        update["capacity"] = capacity
                    self._stats_at[name] = time.monotonic()
            except StorageError as exc:
                update = {"phase": "Error", "message": str(exc)}
                report.errors.append(f"storage: pool {name}: {exc}")
            known = {"phase": pool.phase, "message": pool.message}
            if fresh and {k: known.get(k) for k in update} != update:
                try:
                    with session_scope(self.settings.resolved_database_url) as session:
                        row = session.get(StoragePool, pool.id)
                        if row is not None:
                            pools.set_status(session, row, **update)
                except Exception as exc:  # the database went away during the pass
                    report.errors.append(f"storage: pool {name}: reporting failed: {exc}")

    def _report_owners(self, pool_id: str, owned: set[str]) -> list[str]:
        """Set ``status.owner`` to this node on the pool's volumes it owns, clear it on
        those it owned and let go of (other nodes report their own)."""
        me = self.settings.node_name
        changed = []
        with session_scope(self.settings.resolved_database_url) as session:
            node_id = session.scalar(select(Node.id).where(Node.name == me))
            running = session.scalars(select(Instance).where(Instance.node_id == node_id,
                                                             Instance.power_state.in_(("running", "paused"))))
            rbd_here = {d.get("id") for r in running for d in (r.status or {}).get("volumes", [])}
            for row in session.scalars(select(Volume).where(Volume.pool_id == pool_id)):
                mine = row.id in owned or (row.storage_class == "rbd" and row.id in rbd_here)
                current = (row.status or {}).get("owner")
                if mine and current != me:
                    volumes.volumes.set_status(session, row, owner=me)
                    changed.append(f"storage: volume {row.name} owned here")
                elif not mine and current == me:
                    volumes.volumes.set_status(session, row, owner=None)
                    changed.append(f"storage: volume {row.name} released")
        return changed

    def refresh_stats(self) -> None:
        """Report stats on the next pass (after a write-heavy task, for example)."""
        self._stats_at.clear()
