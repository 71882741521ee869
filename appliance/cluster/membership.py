"""Cluster membership as a member sees it: what a joining node is handed (after its
token was checked by the services layer), and how a node leaves.

A join makes the new node an etcd *learner* first (it counts for quorum only once
promoted by the agent, so a join that never starts cannot cost the cluster its
quorum), signs its certificate with the cluster CA, and hands it the engines' secrets,
the Ceph keys and monitor map, and the current Redis master."""

from __future__ import annotations

import base64
import ipaddress
import logging
from typing import Any

from appliance import pki
from appliance.cluster.config import ClusterConfig, Member
from appliance.cluster.etcd import Etcd, EtcdMember, peer_url
from appliance.cluster.runtime import ceph_conf_path, current_redis_master, sentinel_master, sentinel_says
from appliance.settings import Settings

log = logging.getLogger("cairn.cluster")
MAX_MONS = 3


class JoinRefused(Exception):
    """The join cannot go ahead; the message says why (nothing was changed)."""


def etcd_for(settings: Settings, cfg: ClusterConfig) -> Etcd:
    return Etcd.for_node(cfg, settings.pki_dir)


def check_candidate(cfg: ClusterConfig, members: list[EtcdMember], name: str, address: str) -> EtcdMember | None:
    """Refuse a second join of a node, a name or address already taken, an address off
    the cluster network. Returns the learner a failed earlier join of this address left
    (never started, so never named): the new join replaces it."""
    if ipaddress.ip_address(address) not in ipaddress.ip_network(cfg.network):
        raise JoinRefused(f"address {address} is not on the cluster network {cfg.network}")
    stale = None
    for m in members:
        if m.name == name:
            raise JoinRefused(f"node '{name}' is already a member of this cluster "
                              "(remove it first with `cairn cluster remove`)")
        if m.address == address:
            if m.learner and not m.name:
                stale = m
                continue
            raise JoinRefused(f"address {address} already belongs to member '{m.name}'")
    return stale


def admit(settings: Settings, name: str, address: str, csr_pem: bytes, osds: list[str]) -> dict[str, Any]:
    """Everything a new node needs, after adding it to etcd as a learner. Raises
    JoinRefused (nothing changed) or the engine's error."""
    from storage.backends.rados_deploy import Admin

    cfg = settings.cluster
    if cfg is None:
        raise JoinRefused("this node is not part of a cluster: run `cairn cluster init` on it first")
    etcd = etcd_for(settings, cfg)
    members = etcd.members()
    stale = check_candidate(cfg, members, name, address)
    node_crt = pki.sign_node_csr(settings.pki_dir, csr_pem, name, [address])
    with Admin(ceph_conf_path()) as admin:
        mons = admin.mon_names()
        monmap = admin.monmap()
        mon_keyring = admin.keyring("mon.")
        admin_keyring = admin.keyring("client.admin")
    is_mon = len(mons) < MAX_MONS
    ceph_mons = [Member(name=n, address=a) for n, a in mons] + ([Member(name=name, address=address)] if is_mon
                                                                 else [])
    if stale is not None:
        etcd.member_remove(stale.id)
        log.info("removed the learner of an earlier join that never started", extra={"address": address})
    after = etcd.member_add(address, learner=True)
    initial = ",".join(f"{m.name or name}={m.peer_urls[0]}" for m in after if m.peer_urls)
    if f"{name}={peer_url(address)}" not in initial.split(","):
        initial += f",{name}={peer_url(address)}"
    known = [Member(name=m.name, address=m.address) for m in after if m.name]
    node_cfg = ClusterConfig(
        name=cfg.name, cluster_id=cfg.cluster_id, node=name, address=address, network=cfg.network,
        bootstrap="join", members=[*known, Member(name=name, address=address)],
        etcd_initial_cluster=initial, etcd_state="existing", secrets=cfg.secrets,
        redis_master=current_redis_master(cfg) or _local_master(cfg), ceph_fsid=cfg.ceph_fsid,
        ceph_mon=is_mon, ceph_mons=ceph_mons, ceph_osds=osds,
        pg_shared_buffers=cfg.pg_shared_buffers, **cfg.timing_fields(),
    )
    log.info("node admitted", extra={"node": name, "address": address, "ceph_mon": is_mon})
    return {
        "cluster": node_cfg.model_dump(),
        "ca_crt": (settings.pki_dir / "ca.crt").read_text(),
        "ca_key": (settings.pki_dir / "ca.key").read_text(),
        "node_crt": node_crt.decode(),
        "ceph": {"admin_keyring": admin_keyring, "mon_keyring": mon_keyring if is_mon else None,
                 "monmap": base64.b64encode(monmap).decode() if is_mon else None},
    }


def _local_master(cfg: ClusterConfig) -> str:
    """The master this node's own sentinel names (the bootstrapping node asks itself)."""
    return sentinel_master(cfg, cfg.address) or cfg.redis_master


def evict(settings: Settings, name: str) -> dict[str, Any]:
    """Take a departed node out of every engine: etcd membership, its Ceph monitor and OSDs
    (pools shrink to the hosts left, at most 3), the sentinels' memory of its Redis.
    Patroni forgets a member whose key expired by itself. Idempotent."""
    from appliance.cluster.config import CEPH_POOL, REDIS_MASTER_NAME
    from appliance.cluster.fencing import fence_writers
    from storage.backends.rados_deploy import Admin

    cfg = settings.cluster
    if cfg is None:
        raise JoinRefused("this node is not part of a cluster")
    if name == cfg.node:
        raise JoinRefused("a node cannot remove itself: run `cairn cluster remove` on another member")
    done: dict[str, Any] = {"node": name}
    etcd = etcd_for(settings, cfg)
    member = next((m for m in etcd.members() if m.name == name), None)
    if member is not None:
        voters = [m for m in etcd.members() if not m.learner]
        if len(voters) <= 2 and not member.learner:
            raise JoinRefused(f"removing {name} would leave etcd with {len(voters) - 1} member: "
                              "a cluster keeps at least two")
        etcd.member_remove(member.id)
        done["etcd"] = "removed"
    with Admin(ceph_conf_path()) as admin:
        if name in [n for n, _ in admin.mon_names()]:
            admin.remove_mon(name)
            done["ceph_mon"] = "removed"
        if name in admin.osd_hosts():
            admin.remove_host(name)
            hosts = sum(1 for osds in admin.osd_hosts().values() if osds)
            admin.set_pool_size(CEPH_POOL, max(1, min(3, hosts)))
            done["ceph_osds"] = "purged"
    for address in cfg.member_addresses():
        sentinel_says(cfg, address, "RESET", REDIS_MASTER_NAME)
    done["redis"] = "sentinels reset"
    # its dedup writers would hold garbage collection back (it waits for every registered
    # writer's acknowledgement) and its volume locks would wait for a takeover
    done["storage"] = fence_writers(settings, name)
    return done
