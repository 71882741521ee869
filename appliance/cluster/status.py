"""What each engine says about the cluster, gathered into one view: members and their
roles (etcd leader, database primary / sync standby, Redis master, Ceph monitors in
quorum and the active manager), quorum, and Ceph health. Each engine is asked with a
short timeout; an engine that does not answer is reported as such, never hidden."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from appliance.cluster.config import PATRONI_PORT, REDIS_MASTER_NAME, ClusterConfig
from appliance.cluster.etcd import Etcd, EtcdUnavailable
from appliance.cluster.runtime import ceph_conf_path, sentinel_master, sentinel_says
from appliance.settings import Settings

log = logging.getLogger("cairn.cluster.status")


def _etcd(settings: Settings, cfg: ClusterConfig) -> dict[str, Any]:
    etcd = Etcd.for_node(cfg, settings.pki_dir, timeout=2)
    try:
        members = etcd.members()
    except EtcdUnavailable as exc:
        return {"error": str(exc), "members": [], "leader": None}
    leader = etcd.leader_id()
    return {"members": [{"id": m.id, "name": m.name, "address": m.address, "learner": m.learner}
                        for m in members],
            "leader": next((m.name for m in members if m.id == leader), None)}


def _patroni(settings: Settings, cfg: ClusterConfig) -> dict[str, Any]:
    errors = []
    for address in cfg.member_addresses():
        try:
            r = httpx.get(f"https://{address}:{PATRONI_PORT}/cluster", verify=str(settings.pki_dir / "ca.crt"),
                          timeout=2)
            r.raise_for_status()
            return {"members": r.json().get("members", [])}
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"{address}: {exc}")
    return {"error": "no Patroni answered: " + "; ".join(errors), "members": []}


def _redis(cfg: ClusterConfig) -> dict[str, Any]:
    for address in cfg.member_addresses():
        master = sentinel_master(cfg, address)
        if master:
            peers = sentinel_says(cfg, address, "sentinels", REDIS_MASTER_NAME)
            return {"master": master, "sentinels": 1 + (len(peers) if isinstance(peers, list) else 0)}
    return {"error": "no Redis Sentinel answered", "master": None, "sentinels": 0}


def _ceph() -> dict[str, Any]:
    from storage.backends.rados_deploy import Admin

    try:
        with Admin(ceph_conf_path(), timeout=5) as admin:
            health = admin.health()
            quorum = admin.quorum()
            mgr = admin.mon("mgr stat")
            hosts = admin.osd_hosts()
            osd_stat = admin.mon("osd stat")
    except Exception as exc:  # no quorum, no keyring yet: say so
        return {"health": "UNKNOWN", "error": str(exc), "quorum": [], "mons": []}
    return {"health": health.get("status"), "checks": sorted(health.get("checks", {})),
            "quorum": quorum.get("quorum_names", []),
            "mons": [m["name"] for m in quorum.get("monmap", {}).get("mons", [])],
            "mgr": mgr.get("active_name"), "osd_hosts": {h: len(o) for h, o in hosts.items()},
            "osds": {"total": osd_stat.get("num_osds"), "up": osd_stat.get("num_up_osds"),
                     "in": osd_stat.get("num_in_osds")}}


def collect(settings: Settings, ready: dict[str, bool]) -> dict[str, Any]:
    """The cluster view; ``ready`` is each node's Ready flag from the database."""
    cfg = settings.cluster
    if cfg is None:
        return {"mode": "embedded", "members": [{"name": settings.node_name, "address": "127.0.0.1",
                                                 "roles": ["all"], "ready": ready.get(settings.node_name, False)}],
                "quorum": True, "database": {"primary": settings.node_name, "kind": "sqlite"},
                "redis": {"master": settings.node_name}, "ceph": {"health": "NONE"}}
    with ThreadPoolExecutor(4) as pool:
        f_etcd = pool.submit(_etcd, settings, cfg)
        f_pg = pool.submit(_patroni, settings, cfg)
        f_redis = pool.submit(_redis, cfg)
        f_ceph = pool.submit(_ceph)
        etcd, pg, rds, ceph = f_etcd.result(), f_pg.result(), f_redis.result(), f_ceph.result()
    members: dict[str, dict[str, Any]] = {}
    for m in etcd["members"]:
        name = m["name"] or f"(joining {m['address']})"
        roles = ["etcd-learner" if m["learner"] else "etcd"]
        if etcd.get("leader") == m["name"]:
            roles.append("etcd-leader")
        members[name] = {"name": name, "address": m["address"], "roles": roles,
                         "ready": ready.get(m["name"], False)}
    primary = None
    for pm in pg["members"]:
        role = {"leader": "database-primary", "sync_standby": "database-sync-standby",
                "standby_leader": "database-primary"}.get(pm.get("role", ""), "database-replica")
        if role == "database-primary" and pm.get("state") == "running":
            primary = pm["name"]
        if pm.get("name") in members:
            members[pm["name"]]["roles"].append(role)
            members[pm["name"]]["database"] = {"state": pm.get("state"), "lag": pm.get("lag")}
    for member in members.values():
        if rds.get("master") == member["address"]:
            member["roles"].append("redis-master")
        if member["name"] in ceph.get("quorum", []):
            member["roles"].append("ceph-mon")
        if ceph.get("mgr") == member["name"]:
            member["roles"].append("ceph-mgr-active")
    voters = [m for m in etcd["members"] if not m["learner"]]
    quorum = etcd.get("leader") is not None and len(voters) > 0
    return {
        "mode": "cluster",
        "name": cfg.name,
        "cluster_id": cfg.cluster_id,
        "members": sorted(members.values(), key=lambda m: m["name"]),
        "quorum": quorum,
        "etcd": {"leader": etcd.get("leader"), "voters": len(voters), "error": etcd.get("error")},
        "database": {"primary": primary, "kind": "postgresql", "error": pg.get("error"),
                     "members": pg["members"]},
        "redis": rds,
        "ceph": ceph,
    }
