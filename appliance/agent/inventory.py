"""What this node has: CPU, NUMA, memory, disks, NICs, accelerator. Read from
/proc and /sys (psutil for portable parts); no side effects."""

from __future__ import annotations

import ipaddress
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("cairn.agent")
SYS = Path("/sys")


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return default


def cpu_model() -> str:
    for line in _read(Path("/proc/cpuinfo")).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def numa_nodes() -> int:
    nodes = list((SYS / "devices/system/node").glob("node[0-9]*"))
    return max(1, len(nodes))


def virt_type() -> tuple[str, str]:
    """(accelerator, reason): KVM on real hardware; TCG where /dev/kvm is missing
    or is nested PVM, which only runs PVM-built guest kernels."""
    if not os.path.exists("/dev/kvm"):
        return "qemu", "no /dev/kvm: guests run under TCG emulation"
    if (SYS / "module/kvm_pvm").exists():
        return "qemu", "/dev/kvm is nested PVM (kvm_pvm): stock guest kernels need TCG"
    return "kvm", "hardware virtualisation"


def disks() -> list[dict[str, Any]]:
    out = []
    for dev in sorted((SYS / "block").glob("*")):
        name = dev.name
        if not is_node_disk(name):
            continue
        sectors = _read(dev / "size", "0")
        out.append({
            "name": name,
            "size_bytes": int(sectors) * 512 if sectors.isdigit() else 0,
            "model": _read(dev / "device/model") or _read(dev / "device/vendor") or "virtual",
            "rotational": _read(dev / "queue/rotational", "0") == "1",
        })
    return out


def is_node_nic(name: str) -> bool:
    """A NIC of the node itself (hardware, or an ethN of a virtual machine or lab node),
    not loopback or a bridge, tap or veth."""
    return name != "lo" and ((SYS / "class/net" / name / "device").exists() or name.startswith("eth"))


def is_node_disk(name: str) -> bool:
    return not name.startswith(("loop", "ram", "zram", "dm-", "sr", "nbd"))


def nics() -> list[dict[str, Any]]:
    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    out = []
    for name in sorted(addrs):
        if not is_node_nic(name):
            continue
        mac = next((a.address for a in addrs[name] if a.family == psutil.AF_LINK), "")
        ips = [a.address.split("%")[0] for a in addrs[name] if a.family.name in ("AF_INET", "AF_INET6")]
        st = stats.get(name)
        out.append({"name": name, "mac": mac, "mtu": st.mtu if st else 0,
                    "speed_mbps": st.speed if st else 0, "up": bool(st and st.isup), "addresses": ips})
    return out


CAIRN_LINK = re.compile(r"^(?:(?:cbr|cvx)[a-z]{0,4}[0-9]+|(?:tp|ve)[0-9a-f]{10}(?:-c)?)$")  # overlay and ports


def host_networks(underlay_ifname: str = "", external_ifname: str = "") -> list[dict[str, str]]:
    """Every IP network on this host's own interfaces (not loopback, not the bridges and
    ports of Cairn stacks): tenant subnets must never overlap one of them."""
    underlay_ifname = underlay_ifname or default_route_interface()
    out = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name == "lo" or CAIRN_LINK.match(name):
            continue
        role = "underlay" if name == underlay_ifname else "external" if name == external_ifname else "host"
        for a in addrs:
            if a.family.name not in ("AF_INET", "AF_INET6") or not a.netmask:
                continue
            try:
                net = ipaddress.ip_interface(f"{a.address.split('%')[0]}/{a.netmask}").network
            except ValueError:
                continue
            if not net.is_link_local and not net.is_loopback:
                out.append({"cidr": str(net), "interface": name, "role": role})
    return out


def default_route_interface() -> str:
    """The interface of the IPv4 default route ("lo" when there is none)."""
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return "lo"


def underlay(ifname: str = "") -> dict[str, Any]:
    """The NIC and address VXLAN tunnels of this node start from."""
    ifname = ifname or default_route_interface()
    addrs = psutil.net_if_addrs().get(ifname, [])
    ip = next((a.address for a in addrs if a.family.name == "AF_INET"), "127.0.0.1")
    stats = psutil.net_if_stats().get(ifname)
    return {"ifname": ifname, "ip": ip, "mtu": stats.mtu if stats else 1500}


def collect() -> dict[str, Any]:
    accel, reason = virt_type()
    return {
        "cpu_model": cpu_model(),
        "cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "threads": psutil.cpu_count() or 1,
        "numa_nodes": numa_nodes(),
        "memory_bytes": psutil.virtual_memory().total,
        "disks": disks(),
        "nics": nics(),
        "virt_type": accel,
        "virt_reason": reason,
        "kernel": platform.release(),
        "os": _os_release(),
    }


def _os_release() -> str:
    for line in _read(Path("/etc/os-release")).splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def allocatable(inventory: dict[str, Any], reserved_memory: int = 1 << 30,
                cpu_ratio: float = 4.0) -> dict[str, Any]:
    """What workloads may use: all threads (shared vCPUs overcommitted by ``cpu_ratio``),
    memory less a host reserve (never overcommitted)."""
    return {"cpu": inventory["threads"], "cpu_ratio": cpu_ratio,
            "memory_bytes": max(0, inventory["memory_bytes"] - reserved_memory)}
