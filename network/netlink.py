"""Netlink access (pyroute2): the only module of Cairn that imports pyroute2.

Everything takes a network namespace name (``None`` = the caller's namespace), so
lab nodes that are namespaces and real nodes share one code path.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from network.errors import NetworkError
from network.model import VXLAN_PORT, ZERO_MAC


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says about one interface."""

    index: int
    name: str
    kind: str
    master: int
    mtu: int
    up: bool
    address: str
    vxlan_id: int = 0
    vxlan_local: str = ""
    vxlan_learning: int = 0
    vxlan_port: int = 0


# ------------------------------------------------------------------ namespaces
def netns_create(name: str) -> None:
    """Create a named network namespace (like ``ip netns add``), loopback up."""
    netns.create(name)
    with IPRoute(netns=name, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def netns_remove(name: str) -> None:
    """Remove a named network namespace; its interfaces go with it."""
    if name in netns.listnetns():
        netns.remove(name)


def netns_list() -> list[str]:
    """Names of the existing named network namespaces."""
    return list(netns.listnetns())


def _enter(ns: str | None) -> Any:
    def pre() -> None:
        if ns:
            netns.setns(ns, flags=0)

    return pre


def popen_in_netns(ns: str | None, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start a program inside network namespace ``ns``."""
    return subprocess.Popen(list(argv), preexec_fn=_enter(ns), **kw)


def run_in_netns(
    ns: str | None, argv: Sequence[str], timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program inside ``ns`` to completion, capturing text output."""
    return subprocess.run(
        list(argv), preexec_fn=_enter(ns), capture_output=True, text=True, timeout=timeout, input=input
    )


def socket_in_netns(ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in ``ns`` while this process stays where it is."""
    sock: socket.socket = netns.create_socket(ns, family, type_, flags=0)
    return sock


def write_sysctl(ns: str | None, key: str, value: str) -> None:
    """Set a per-namespace sysctl (``net.ipv4.ip_forward`` style key) inside ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")
    r = run_in_netns(ns, ["/bin/sh", "-c", f"echo {value} > {path}"], timeout=10)
    if r.returncode:
        raise NetworkError(f"sysctl {key}={value} in {ns}: {r.stderr.strip()}")


def read_sysctl(ns: str | None, key: str) -> str:
    """Read a per-namespace sysctl inside ``ns`` (our own /proc shows our namespace's)."""
    path = "/proc/sys/" + key.replace(".", "/")
    r = run_in_netns(ns, ["cat", path], timeout=10)
    if r.returncode:
        raise NetworkError(f"sysctl {key} in {ns}: {r.stderr.strip()}")
    return r.stdout.strip()


# ------------------------------------------------------------------ links
def _ipr(ns: str | None) -> IPRoute:
    return IPRoute(netns=ns, flags=0) if ns else IPRoute()


class NodeLinks:
    """One netlink connection to a namespace, with the few operations Cairn needs."""

    def __init__(self, ns: str | None) -> None:
        self.ns = ns
        self.ipr = _ipr(ns)

    def close(self) -> None:
        """Close the netlink socket."""
        self.ipr.close()

    def __enter__(self) -> NodeLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def links(self) -> dict[str, LinkInfo]:
        """All interfaces of the namespace by name (one dump)."""
        return {info.name: info for info in map(self._info, self.ipr.link("dump"))}

    def link(self, name: str) -> LinkInfo | None:
        """One interface by name (one request), None when absent."""
        try:
            return self._info(self.ipr.link("get", ifname=name)[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise

    @staticmethod
    def _info(msg: Any) -> LinkInfo:
        name = msg.get("ifname")
        kind = msg.get(("linkinfo", "kind")) or ""
        extra: dict[str, Any] = {}
        if kind == "vxlan":
            data = msg.get(("linkinfo", "data"))
            extra = {
                "vxlan_id": data.get("vxlan_id") or 0,
                "vxlan_local": data.get("vxlan_local") or "",
                "vxlan_learning": data.get("vxlan_learning") or 0,
                "vxlan_port": data.get("vxlan_port") or 0,
            }
        return LinkInfo(
            index=msg["index"],
            name=name,
            kind=kind,
            master=msg.get("master") or 0,
            mtu=msg.get("mtu") or 0,
            up=bool(msg["flags"] & 1),
            address=msg.get("address") or "",
            **extra,
        )

    def counters(self, name: str) -> tuple[int, int]:
        """(rx_packets, tx_packets) of an interface."""
        msg = self.ipr.link("get", index=self.index(name))[0]
        stats = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS")
        return int(stats["rx_packets"]), int(stats["tx_packets"])

    def neighbours(self, name: str) -> dict[str, str]:
        """IP -> MAC of an interface's neighbour table."""
        return {
            str(n.get("NDA_DST")): str(n.get("NDA_LLADDR"))
            for n in self.ipr.neigh("dump", ifindex=self.index(name))
            if n.get("NDA_LLADDR")
        }

    def index(self, name: str) -> int:
        """Interface index of ``name``; LookupError when absent."""
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise LookupError(name)
        return int(found[0])

    def add_bridge(self, name: str, mtu: int) -> None:
        """Create a bridge (no STP, no forwarding delay)."""
        self.ipr.link("add", ifname=name, kind="bridge", mtu=mtu, br_stp_state=0, br_forward_delay=0)

    def add_vxlan(self, name: str, vni: int, local: str, underlay_index: int, mtu: int) -> None:
        """Create a VXLAN device: UDP 4789, learning off (the control plane knows every MAC).

        A namespace holds one device per VNI and port: when another stack's device already
        carries ``vni`` the error names it (each stack on a host needs its own VNI range)."""
        try:
            self.ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=local,
                vxlan_port=VXLAN_PORT,
                vxlan_learning=0,
                vxlan_link=underlay_index,
                mtu=mtu,
            )
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
            other = next((i.name for i in self.links().values() if i.kind == "vxlan" and i.vxlan_id == vni), None)
            if other is None or other == name:
                raise
            raise NetworkError(f"VNI {vni} is already carried by {other}, another stack's VXLAN device in this "
                               "namespace: give each Cairn stack on a host its own VNI range") from e

    def add_veth(
        self, name: str, peer: str, mtu: int, peer_ns: str | None = None, peer_mac: str | None = None
    ) -> None:
        """Create a veth pair; the peer end can go straight into another namespace."""
        peer_spec: dict[str, Any] = {"ifname": peer, "mtu": mtu}
        if peer_mac:
            peer_spec["address"] = peer_mac
        if peer_ns:
            peer_spec["net_ns_fd"] = peer_ns
        self.ipr.link("add", ifname=name, kind="veth", mtu=mtu, peer=peer_spec)

    def delete(self, index: int) -> None:
        """Delete an interface (missing is fine)."""
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    def set_link(self, index: int, **kw: Any) -> None:
        """Change link attributes (``master=``, ``mtu=``, ``state='up'``, ``address=``)."""
        self.ipr.link("set", index=index, **kw)

    def all_fdb_entries(self) -> dict[int, set[tuple[str, str]]]:
        """Static (MAC, remote VTEP) entries of every VXLAN device, by ifindex (one dump)."""
        out: dict[int, set[tuple[str, str]]] = {}
        for e in self.ipr.fdb("dump"):
            dst = e.get("dst")
            if dst:
                out.setdefault(int(e.get("ifindex")), set()).add((str(e.get("lladdr")).lower(), str(dst)))
        return out

    def fdb_entries(self, vx_index: int) -> set[tuple[str, str]]:
        """Static (MAC, remote VTEP) forwarding entries of a VXLAN device."""
        out: set[tuple[str, str]] = set()
        for e in self.ipr.fdb("dump", ifindex=vx_index):
            if e.get("ifindex") != vx_index:
                continue
            dst = e.get("dst")
            if dst:
                out.add((str(e.get("lladdr")).lower(), str(dst)))
        return out

    def fdb_add(self, vx_index: int, mac: str, dst: str) -> None:
        """Add one forwarding entry; the all-zero MAC may repeat (head-end replication list)."""
        if mac == ZERO_MAC:
            self.ipr.fdb("append", ifindex=vx_index, lladdr=mac, dst=dst)
        else:
            self.ipr.fdb("append", ifindex=vx_index, lladdr=mac, dst=dst)

    def fdb_del(self, vx_index: int, mac: str, dst: str) -> None:
        """Remove one forwarding entry (missing is fine)."""
        try:
            self.ipr.fdb("del", ifindex=vx_index, lladdr=mac, dst=dst)
        except NetlinkError as e:
            if e.code != errno.ENOENT:
                raise

    def addresses(self, index: int) -> set[str]:
        """Addresses on an interface as "ip/prefix" (link-local IPv6 left out)."""
        out: set[str] = set()
        for a in self.ipr.get_addr(index=index):
            ip = a.get("IFA_ADDRESS")
            if ip and not str(ip).startswith("fe80:"):
                out.add(f"{ip}/{a['prefixlen']}")
        return out

    def addr_add(self, index: int, cidr: str) -> None:
        """Add "ip/prefix" to an interface."""
        ip, plen = cidr.split("/")
        self.ipr.addr("add", index=index, address=ip, prefixlen=int(plen))

    def addr_del(self, index: int, cidr: str) -> None:
        """Remove "ip/prefix" from an interface (missing is fine)."""
        ip, plen = cidr.split("/")
        try:
            self.ipr.addr("del", index=index, address=ip, prefixlen=int(plen))
        except NetlinkError as e:
            if e.code != errno.EADDRNOTAVAIL:
                raise

    def route_add(self, dst: str, gateway: str) -> None:
        """Add a route (``dst`` "default" or a CIDR)."""
        self.ipr.route("add", dst=dst, gateway=gateway)


@contextmanager
def node_links(ns: str | None) -> Iterator[NodeLinks]:
    """``with node_links(ns) as nl:`` — a NodeLinks closed on exit."""
    nl = NodeLinks(ns)
    try:
        yield nl
    finally:
        nl.close()
