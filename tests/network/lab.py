"""A throwaway lab: simulated nodes as network namespaces on one underlay bridge.

Every namespace carries a random prefix so parallel runs and other engineers'
namespaces never collide; ``Lab.close()`` removes exactly what this lab made.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field

from network.model import NodeNetworkState, Port
from network.netlink import (
    netns_create,
    netns_remove,
    node_links,
    popen_in_netns,
    run_in_netns,
    socket_in_netns,
)

UNDERLAY_NET = "192.0.2"


@dataclass
class Lab:
    """Nodes ``n1..nN`` (namespaces) with ``ul0`` = 192.0.2.N/24 on a shared bridge."""

    nodes: int = 3
    prefix: str = field(default_factory=lambda: "cn" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, short: str) -> str:
        """Full namespace name of a lab-local short name."""
        return f"{self.prefix}{short}"

    def node(self, n: int) -> str:
        """Namespace of node ``n``."""
        return self.ns(f"n{n}")

    def vtep(self, n: int) -> str:
        """Underlay address of node ``n``."""
        return f"{UNDERLAY_NET}.{n}"

    def make_ns(self, short: str) -> str:
        """Create a namespace that close() removes."""
        name = self.ns(short)
        netns_create(name)
        self.namespaces.append(name)
        return name

    def up(self) -> Lab:
        """Build the underlay and the node namespaces."""
        ul = self.make_ns("ul")
        with node_links(ul) as nl:
            nl.add_bridge("ul0", 1500)
            br = nl.index("ul0")
            nl.set_link(br, state="up")
            for n in range(1, self.nodes + 1):
                node = self.make_ns(f"n{n}")
                nl.add_veth(f"ul-n{n}", "ul0", 1500, peer_ns=node)
                nl.set_link(nl.index(f"ul-n{n}"), master=br, state="up")
                with node_links(node) as nn:
                    i = nn.index("ul0")
                    nn.addr_add(i, f"{self.vtep(n)}/24")
                    nn.set_link(i, state="up")
        return self

    def state(self, n: int, networks: tuple = ()) -> NodeNetworkState:  # type: ignore[type-arg]
        """A desired state for node ``n``."""
        return NodeNetworkState("ul0", self.vtep(n), 1500, networks)

    def endpoint(self, n: int, short: str, port: Port, cidr: str | None = None, gw: str | None = None) -> str:
        """A namespace standing in for a VM/container on node ``n``: ``eth0`` with the
        port's MAC, its host end ``port.host_ifname`` left in the node namespace."""
        ep = self.make_ns(short)
        with node_links(self.node(n)) as nl:
            nl.add_veth(port.host_ifname, "eth0", 1450, peer_ns=ep, peer_mac=port.mac)
        with node_links(ep) as nl:
            i = nl.index("eth0")
            if cidr:
                nl.addr_add(i, cidr)
            nl.set_link(i, state="up")
            if gw:
                nl.route_add("default", gw)
        return ep

    def popen(self, ns: str, argv: list[str]) -> subprocess.Popen[str]:
        """Start a program in ``ns``; close() stops it."""
        p = popen_in_netns(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Stop our processes (by handle) and remove our namespaces."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for name in reversed(self.namespaces):
            netns_remove(name)


def ping(ns: str, dst: str, count: int = 2, wait: int = 1) -> bool:
    """True when ``dst`` answers an ICMP echo from ``ns``."""
    r = run_in_netns(ns, ["busybox", "ping", "-c", str(count), "-W", str(wait), dst], timeout=count * wait + 10)
    return r.returncode == 0


def wait_ping(ns: str, dst: str, seconds: float = 5) -> bool:
    """Ping until it answers or ``seconds`` pass (ports need a moment for carrier)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ping(ns, dst, 1):
            return True
    return False


def listen(ns: str, ip: str, port: int) -> socket.socket:
    """A TCP listener in ``ns``."""
    s = socket_in_netns(ns)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(16)
    return s


def tcp_exchange(src_ns: str, server: socket.socket | None, dst: str, port: int, timeout: float = 2.0) -> str:
    """Connect from ``src_ns``; if ``server`` is given, accept and echo one message back.

    Returns "ok" (payload went there and back), "connected" (handshake done, no
    ``server`` to answer), "timeout", "refused" or an error."""
    c = socket_in_netns(src_ns)
    c.settimeout(timeout)
    try:
        c.connect((dst, port))
        if server is None:
            return "connected"
        c.sendall(b"ping")
        server.settimeout(timeout)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            conn.sendall(conn.recv(16).upper())
        return "ok" if c.recv(16) == b"PING" else "bad reply"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"error {e.errno}"
    finally:
        c.close()
