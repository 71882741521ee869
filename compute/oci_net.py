"""Container networking: a named netns per container, veths into the VMs' bridges.

Uses the ``ip`` command (iproute2) so the compute library needs no netlink
binding. Every change is rolled back if a later step fails.
"""

from __future__ import annotations

import subprocess

from compute.errors import HypervisorError
from compute.spec import ContainerNic


def netns_name(container: str, prefix: str = "cairn") -> str:
    """The network namespace of a container (visible as /run/netns/<name>); ``prefix``
    is the driver's, so containers of two stacks on one host never share a name."""
    return f"{prefix}-{container}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise HypervisorError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def attach_nics(container: str, nics: tuple[ContainerNic, ...], prefix: str = "cairn") -> str:
    """Create the container's netns with one veth per NIC (eth0, eth1...); return the netns name."""
    ns = netns_name(container, prefix)
    _ip("netns", "del", ns, check=False)
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        for i, nic in enumerate(nics):
            peer = f"{nic.host_dev[:13]}-c"
            _ip("link", "del", nic.host_dev, check=False)
            _ip("link", "add", nic.host_dev, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", f"eth{i}", "address", nic.mac)
            _ip("link", "set", nic.host_dev, "master", nic.bridge, "up")
            _ip("-n", ns, "link", "set", f"eth{i}", "up")
            if nic.address:
                _ip("-n", ns, "addr", "add", nic.address, "dev", f"eth{i}")
            if nic.gateway:
                _ip("-n", ns, "route", "add", "default", "via", nic.gateway)
    except BaseException:
        detach_nics(container, nics, prefix)
        raise
    return ns


def detach_nics(container: str, nics: tuple[ContainerNic, ...], prefix: str = "cairn") -> None:
    """Remove the container's veths and netns (idempotent)."""
    for nic in nics:
        _ip("link", "del", nic.host_dev, check=False)
    _ip("netns", "del", netns_name(container, prefix), check=False)
