"""Container networking: veths into the VMs' bridges, their inner ends moved into the
container's own network namespace by an OCI hook.

The network namespace is created by the runtime inside the container's user
namespace (so it belongs to the container: sysfs mounts, and raw sockets reach only
it), which is why the inner ends move in from a ``createRuntime`` hook, run by crun
in the host's namespaces once the container's exist (the container's pid arrives on
the hook's stdin as OCI state JSON). Uses the ``ip`` and ``nsenter`` commands so the
compute library needs no netlink binding. Every change is rolled back if a later
step fails.
"""

from __future__ import annotations

import shlex
import subprocess

from compute.errors import HypervisorError
from compute.spec import ContainerNic


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise HypervisorError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _peer(nic: ContainerNic) -> str:
    return f"{nic.host_dev[:13]}-c"


def plug_nics(nics: tuple[ContainerNic, ...]) -> None:
    """One veth per NIC: the host end on its bridge, the other end waiting in the host
    namespace for :func:`nic_hook` to move it into the container."""
    try:
        for nic in nics:
            _ip("link", "del", nic.host_dev, check=False)
            _ip("link", "add", nic.host_dev, "type", "veth", "peer", "name", _peer(nic))
            _ip("link", "set", nic.host_dev, "master", nic.bridge, "up")
    except BaseException:
        unplug_nics(nics)
        raise


def nic_hook(nics: tuple[ContainerNic, ...]) -> str:
    """The ``createRuntime`` hook script: each NIC's inner end becomes eth0, eth1... in
    the container's network namespace, with its MAC, address and default route."""
    lines = ["#!/bin/sh", "# cairn: move the container's NICs in (generated)", "set -e",
             "pid=$(sed -n 's/.*\"pid\": *\\([0-9][0-9]*\\).*/\\1/p')",
             '[ -n "$pid" ] || { echo "no pid in the OCI state" >&2; exit 1; }',
             'in_ns() { nsenter -t "$pid" -n "$@"; }',
             "in_ns ip link set lo up"]
    for i, nic in enumerate(nics):
        peer, dev = shlex.quote(_peer(nic)), f"eth{i}"
        lines += [f'ip link set {peer} netns "$pid"',
                  f"in_ns ip link set {peer} name {dev} address {nic.mac}",
                  f"in_ns ip link set {dev} up"]
        if nic.address:
            lines.append(f"in_ns ip addr add {shlex.quote(nic.address)} dev {dev}")
        if nic.gateway:
            lines.append(f"in_ns ip route add default via {shlex.quote(nic.gateway)}")
    return "\n".join(lines) + "\n"


def unplug_nics(nics: tuple[ContainerNic, ...]) -> None:
    """Remove the container's veths (idempotent; an inner end goes with its pair)."""
    for nic in nics:
        _ip("link", "del", nic.host_dev, check=False)
        _ip("link", "del", _peer(nic), check=False)
