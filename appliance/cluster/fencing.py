"""Storage fencing of a dead node (DESIGN.md, HA step 2), done by the HA manager before
anything of that node runs elsewhere:

1. every Ceph client of the node's address is blocklisted (an address range of one host:
   its storage daemon's dedup writers, the librbd clients of its guests' rbd disks,
   anything it may still send if it is only half dead); then its OSDs are marked down
   (I/O to the placement groups they led would wait for the monitors' heartbeat grace);
2. the node's volume locks are broken and its writers dropped by this node's storage
   daemon (``fence``: the dedup engine's takeover; storage/README.md), so the new owners
   replay its journals.

The blocklist stays until the node has rebooted (a new boot id) and comes back: only
then is it lifted (``unfence``)."""

from __future__ import annotations

import logging
from typing import Any

from appliance.cluster.runtime import ceph_conf_path
from appliance.settings import Settings

log = logging.getLogger("cairn.cluster.fencing")
BLOCKLIST_SECONDS = 7 * 24 * 3600  # until lifted: a node that never comes back stays out


def fence_storage(settings: Settings, node: str, address: str) -> dict[str, Any]:
    """Blocklist the node's address, then break its volume locks. Raises if either fails
    (the caller retries; nothing may start elsewhere before this succeeded)."""
    from storage.backends.rados_deploy import Admin

    with Admin(ceph_conf_path()) as admin:
        admin.blocklist_range(f"{address}/32", BLOCKLIST_SECONDS)
        # then its OSDs down at once: breaking the locks (and the failover's first reads)
        # would otherwise wait for the monitors' heartbeat grace (4-6 s measured)
        osds = admin.osds_at(address)
        admin.mark_down(osds)
    report: dict[str, Any] = {"blocklisted": f"{address}/32", "osds_down": osds,
                              "volumes": fence_writers(settings, node, blocklisted=[f"{address}/32"])}
    log.warning("node fenced", extra={"node": node, "address": address})
    return report


def fence_writers(settings: Settings, node: str, blocklisted: list[str] | None = None) -> Any:
    """This node's storage daemon breaks ``node``'s volume locks and drops its writers'
    registrations (each writer's RADOS client blocklisted, unless one of the address
    ranges in ``blocklisted`` covers it already), so garbage collection stops waiting for
    them and the volumes' next owners replay their journals. Idempotent."""
    from storage.control import StorageClient
    from storage.errors import InvalidArgument, NotFound

    client = StorageClient(settings.storage_socket, timeout=120)
    try:
        return client.call("fence", node=node, blocklisted=blocklisted or [])
    except (InvalidArgument, NotFound) as exc:
        if "unknown operation" not in str(exc) and "pool ''" not in str(exc):
            raise
        # a storage daemon without volume ownership: its pools are each node's own, the
        # address blocklist is the whole fence
        return "no shared-pool writers to fence"


def unfence_storage(address: str) -> None:
    """Lift the node's blocklist (it rebooted: its old clients are gone for good): the
    range entry of the fence and the single-client entries of that address that came
    with it (a volume lock broken by a takeover, librbd breaking an exclusive lock, the
    mgr's failover), which would otherwise linger for their expiry."""
    from storage.backends.rados_deploy import Admin

    with Admin(ceph_conf_path()) as admin:
        admin.blocklist_range_remove(f"{address}/32")
        for entry in admin.blocklist():
            if entry.rsplit(":", 1)[0] == address:
                admin.blocklist_remove(entry)
    log.warning("node unfenced", extra={"address": address})
