"""etcd: the cluster's membership, leases and leader keys (etcd3gw over etcd's v3 JSON
gateway, mutual TLS with the cluster CA). One client object tries every member's
endpoint in turn (this node's first), so it works as long as a quorum does."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from appliance.cluster.config import ETCD_CLIENT_PORT, ETCD_PEER_PORT, ClusterConfig
from appliance.errors import Unavailable

log = logging.getLogger("cairn.cluster.etcd")
T = TypeVar("T")


class EtcdUnavailable(Unavailable):
    """No member answered (no quorum reachable from here): a 503 to an API client (a join
    tried while the cluster's etcd is busy or electing is tried again, not refused)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail}; the cluster's membership store (etcd) is not answering right now, "
                         "try again shortly")


@dataclass(frozen=True)
class EtcdMember:
    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool

    @property
    def address(self) -> str:
        """The member's cluster address (host of its peer URL)."""
        url = self.peer_urls[0] if self.peer_urls else ""
        return url.split("//", 1)[-1].rsplit(":", 1)[0]


def peer_url(address: str) -> str:
    return f"https://{address}:{ETCD_PEER_PORT}"


def client_url(address: str) -> str:
    return f"https://{address}:{ETCD_CLIENT_PORT}"


class Etcd:
    """A failover client over ``addresses`` (tried in order) with the node's TLS identity."""

    def __init__(self, addresses: list[str], pki_dir: Path, timeout: float = 3.0) -> None:
        self.addresses = addresses
        self.tls = {"ca_cert": str(pki_dir / "ca.crt"), "cert_cert": str(pki_dir / "server.crt"),
                    "cert_key": str(pki_dir / "server.key")}
        self.timeout = timeout
        self._clients: dict[str, Etcd3Client] = {}

    @classmethod
    def for_node(cls, cfg: ClusterConfig, pki_dir: Path, timeout: float = 3.0) -> Etcd:
        return cls(cfg.member_addresses(), pki_dir, timeout)

    def client(self, address: str) -> Etcd3Client:
        if address not in self._clients:
            session = requests.Session()
            # requests lets REQUESTS_CA_BUNDLE override a session's CA: only the cluster CA counts here
            session.trust_env = False
            session.verify = self.tls["ca_cert"]
            session.cert = (self.tls["cert_cert"], self.tls["cert_key"])
            self._clients[address] = Etcd3Client(host=address, port=ETCD_CLIENT_PORT, protocol="https",
                                                 timeout=self.timeout, api_path="/v3/", session=session)
        return self._clients[address]

    def _any(self, fn: Callable[[Etcd3Client], T]) -> T:
        errors = []
        for address in self.addresses:
            try:
                return fn(self.client(address))
            except Exception as exc:  # connection refused, timeout, no leader: try the next member
                errors.append(f"{address}: {exc}")
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(errors))

    def _post(self, path: str, body: dict[str, Any], address: str | None = None) -> dict[str, Any]:
        if address is not None:
            c = self.client(address)
            return c.post(c.get_url(path), json=body)  # type: ignore[no-any-return]
        return self._any(lambda c: c.post(c.get_url(path), json=body))

    # -- membership
    def members(self) -> list[EtcdMember]:
        out = self._post("/cluster/member/list", {"linearizable": True})
        return [EtcdMember(m["ID"], m.get("name", ""), tuple(m.get("peerURLs", [])),
                           tuple(m.get("clientURLs", [])), bool(m.get("isLearner")))
                for m in out.get("members", [])]

    def member_add(self, address: str, learner: bool = True) -> list[EtcdMember]:
        """Add a member (as a learner: it does not count for quorum until promoted, so a
        join that never starts cannot take the cluster's quorum away). Returns the members,
        the new one with an empty name."""
        out = self._post("/cluster/member/add", {"peerURLs": [peer_url(address)], "isLearner": learner})
        return [EtcdMember(m["ID"], m.get("name", ""), tuple(m.get("peerURLs", [])),
                           tuple(m.get("clientURLs", [])), bool(m.get("isLearner")))
                for m in out.get("members", [])]

    def member_promote(self, member_id: str) -> None:
        self._post("/cluster/member/promote", {"ID": member_id})

    def member_remove(self, member_id: str) -> None:
        self._post("/cluster/member/remove", {"ID": member_id})

    def status(self, address: str) -> dict[str, Any]:
        """One member's own view (its id, the leader's id, raft term)."""
        return self._post("/maintenance/status", {}, address=address)

    def leader_id(self) -> str | None:
        for address in self.addresses:
            try:
                leader = self.status(address).get("leader")
            except Exception:
                continue
            if leader and leader != "0":
                return str(leader)
        return None

    def move_leader(self, target_id: str) -> None:
        """Hand etcd leadership to another member (sent to the current leader)."""
        leader = self.leader_id()
        for m in self.members():
            if m.id == leader and m.address:
                self._post("/maintenance/transfer-leadership", {"targetID": target_id}, address=m.address)
                return

    def healthy(self) -> bool:
        try:
            self._any(lambda c: c.get("cairn-health-probe"))
            return True
        except EtcdUnavailable:
            return False

    # -- keys and leases (for leader election and node liveness)
    def get(self, key: str) -> str | None:
        values = self._any(lambda c: c.get(key))
        return values[0].decode() if values else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under ``prefix`` and its value (a linearizable read)."""
        found = self._any(lambda c: c.get_prefix(prefix))
        return {meta["key"].decode(): value.decode() for value, meta in found}

    def put(self, key: str, value: str, lease: Lease | None = None) -> None:
        self._any(lambda c: c.put(key, value, lease=lease))

    def lease(self, ttl: int) -> Lease:
        return self._any(lambda c: c.lease(ttl))

    def create_if_absent(self, key: str, value: str, lease: Lease | None = None) -> bool:
        """Atomically create ``key`` (a leader key on a lease); False if it exists."""
        return bool(self._any(lambda c: c.create(key, value, lease=lease)))

    def delete_if_value(self, key: str, value: str) -> bool:
        """Delete ``key`` only if it still holds ``value`` (release our own leader key)."""
        def txn(c: Etcd3Client) -> bool:
            k = base64.b64encode(key.encode()).decode()
            v = base64.b64encode(value.encode()).decode()
            out = c.transaction({"compare": [{"key": k, "result": "EQUAL", "target": "VALUE", "value": v}],
                                 "success": [{"request_delete_range": {"key": k}}], "failure": []})
            return bool(out.get("succeeded"))

        return self._any(txn)
