"""Forming a cluster, on the node that runs the command: ``cairn cluster init`` writes the
first member's configuration (its CA becomes the cluster CA); ``cairn cluster join``
checks the member's CA against the token's fingerprint, asks to be admitted, and writes
what it was handed. Both leave starting the engines to the node's supervisor
(``cairn up``), which reads the configuration."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance import pki
from appliance.cluster.config import TIMING_PROFILES, ClusterConfig, Member, Timing
from appliance.cluster.etcd import peer_url
from appliance.cluster.runtime import ceph_conf_path, ceph_node
from appliance.errors import CairnError, Conflict, InvalidInput
from appliance.settings import Settings

API_PORT = 8443


def _network_of(address: str) -> str:
    """The CIDR of the local interface that holds ``address``."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.address == address and a.netmask:
                return str(ipaddress.IPv4Network(f"{address}/{a.netmask}", strict=False))
    raise InvalidInput(f"no interface of this node has the address {address}: give one it has (--address)")


def _route_source(peer: str) -> str:
    """This node's address on the path to ``peer``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, API_PORT))
        return str(s.getsockname()[0])


def _refuse_if_member(settings: Settings) -> None:
    cfg = settings.cluster
    if cfg is not None:
        raise Conflict(f"this node ({cfg.node}) is already a member of cluster {cfg.name} ({cfg.cluster_id})")
    if (settings.data_dir / "cairn.db").exists():
        raise Conflict(f"this node already runs as a single-node appliance ({settings.data_dir / 'cairn.db'}): "
                       "a cluster starts on fresh nodes")


def init(settings: Settings, address: str | None = None, osds: list[str] | None = None,
         name: str = "cairn", timing: Timing = "fast") -> ClusterConfig:
    """Make this node the first member (idempotent only in the sense that it refuses twice)."""
    from storage.backends.rados_deploy import new_fsid

    _refuse_if_member(settings)
    if address is None:
        from appliance.agent.inventory import underlay

        address = str(underlay(settings.underlay_interface)["ip"])
    network = _network_of(address)
    pki.ensure(settings.pki_dir)
    node = settings.node_name
    me = Member(name=node, address=address)
    cfg = ClusterConfig(
        name=name, node=node, address=address, network=network, bootstrap="init", members=[me],
        etcd_initial_cluster=f"{node}={peer_url(address)}", etcd_state="new", redis_master=address,
        ceph_fsid=new_fsid(), ceph_mon=True, ceph_mons=[me], ceph_osds=list(osds or ["file:8589934592"]),
        timing=timing, **TIMING_PROFILES[timing],
    )
    cfg.save(settings.cluster_file)
    return cfg


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("detail") or body.get("title") or r.text)
    except ValueError:
        return r.text[:300]


def join(settings: Settings, member: str, token: str, address: str | None = None,
         osds: list[str] | None = None) -> ClusterConfig:
    """Join the cluster ``member`` belongs to. Nothing is written on this node unless the
    member admitted it."""
    from appliance.services.cluster import parse_token
    from storage.backends.rados_deploy import CephNode, join_mon

    _refuse_if_member(settings)
    fingerprint, _, _ = parse_token(token)
    base = f"https://{member}:{API_PORT}/api/v1"
    try:
        # Not trusted yet: only compared with the fingerprint the token carries.
        ca_pem = httpx.get(f"{base}/cluster/ca", verify=False, timeout=10).text
    except httpx.HTTPError as exc:
        raise CairnError(f"cannot reach the member at {member}:{API_PORT}: {exc}")
    try:
        got = pki.fingerprint(ca_pem.encode())
    except ValueError:
        raise CairnError(f"{member} did not answer with a CA certificate: is it a Cairn member?")
    if got != fingerprint:
        raise CairnError(f"the CA of {member} (sha256 {got}) is not the one the token names ({fingerprint}): "
                         "refusing to join (wrong cluster, or someone in the middle)")
    address = address or _route_source(member)
    _network_of(address)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        csr = pki.node_csr(scratch)
        ctx = ssl.create_default_context(cadata=ca_pem)
        body = {"token": token, "name": settings.node_name, "address": address, "csr": csr.decode(),
                "osds": list(osds or ["file:8589934592"])}
        try:
            r = httpx.post(f"{base}/cluster/join", json=body, verify=ctx, timeout=120)
        except httpx.HTTPError as exc:
            raise CairnError(f"the join request to {member} failed: {exc}")
        if r.status_code >= 400:
            raise CairnError(f"{member} refused the join ({r.status_code}): {_problem(r)}")
        admitted: dict[str, Any] = r.json()
        settings.pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.move(scratch / "server.key", settings.pki_dir / "server.key")
    pki.install_cluster_pki(settings.pki_dir, admitted["ca_crt"].encode(), admitted["ca_key"].encode(),
                            admitted["node_crt"].encode())
    cfg = ClusterConfig.model_validate(admitted["cluster"])
    node = ceph_node(settings, cfg)
    assert isinstance(node, CephNode)
    ceph = admitted["ceph"]
    conf = ceph_conf_path()
    conf.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(node.admin_keyring, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ceph["admin_keyring"])
    if cfg.ceph_mon:
        join_mon(node, base64.b64decode(ceph["monmap"]), ceph["mon_keyring"])
    cfg.save(settings.cluster_file)
    return cfg
