"""DHCP and DNS for a virtual network: a pure dnsmasq config builder and a supervisor.

One dnsmasq per network and node that serves it, bound to the network's bridge inside
the node's namespace. Only fixed leases are handed out (``static`` ranges): the control
plane already chose every port's address, so DHCP just tells each MAC its address, and
DNS answers ``<port name>.<domain>`` for every port of the network.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from network.errors import CommandFailed, InvalidSpec
from network.model import check_ifname, check_mac
from network.netlink import popen_in_netns


@dataclass(frozen=True)
class DhcpHost:
    """A fixed lease: this MAC gets these addresses and this name."""

    mac: str
    ips: tuple[str, ...]
    name: str = ""


@dataclass(frozen=True)
class DhcpSubnet:
    """A subnet served by DHCP; ``gateway`` None = no default route offered."""

    cidr: str
    gateway: str | None = None


@dataclass(frozen=True)
class DhcpConfig:
    """Everything dnsmasq needs for one network."""

    network_id: str
    interface: str  # the network's bridge on this node
    subnets: tuple[DhcpSubnet, ...]
    hosts: tuple[DhcpHost, ...]
    domain: str = "cairn.internal"
    mtu: int = 1450
    lease_seconds: int = 3600
    dns_server: str | None = None  # the address dnsmasq listens on (offered as DNS server)
    run_dir: str = "/run/cairn/dnsmasq"


def build_dnsmasq_config(cfg: DhcpConfig) -> str:
    """dnsmasq configuration text for one network (deterministic: hosts sorted by MAC)."""
    check_ifname(cfg.interface)
    base = f"{cfg.run_dir}/{cfg.network_id}"
    lines = [
        f"# cairn: network {cfg.network_id} (generated; edits are overwritten)",
        f"interface={cfg.interface}",
        "bind-interfaces",
        "except-interface=lo",
        "no-resolv",
        "no-hosts",
        "no-poll",
        f"domain={cfg.domain}",
        f"local=/{cfg.domain}/",
        "dhcp-authoritative",
        "no-ping",  # addresses are fixed by the control plane; the ICMP probe only costs ~3 s per offer
        f"dhcp-leasefile={base}.leases",
        f"pid-file={base}.pid",
        "log-dhcp",
    ]
    for i, sub in enumerate(cfg.subnets):
        try:
            net = ipaddress.ip_network(sub.cidr, strict=True)
        except ValueError as e:
            raise InvalidSpec(f"invalid subnet {sub.cidr!r}: {e}")
        tag = f"s{i}"
        if net.version == 4:
            lines.append(f"dhcp-range=set:{tag},{net.network_address},static,{net.netmask},{cfg.lease_seconds}")
            lines.append(f"dhcp-option=tag:{tag},option:mtu,{cfg.mtu}")
            if sub.gateway:
                lines.append(f"dhcp-option=tag:{tag},option:router,{sub.gateway}")
            else:
                lines.append(f"dhcp-option=tag:{tag},option:router")  # explicitly none
            if cfg.dns_server:
                lines.append(f"dhcp-option=tag:{tag},option:dns-server,{cfg.dns_server}")
        else:
            lines.append(f"dhcp-range=set:{tag},{net.network_address},static,{net.prefixlen},{cfg.lease_seconds}")
    for host in sorted(cfg.hosts, key=lambda h: h.mac):
        mac = check_mac(host.mac)
        addrs = [ip if ipaddress.ip_address(ip).version == 4 else f"[{ip}]" for ip in host.ips]
        fields = [mac, *addrs] + ([host.name] if host.name else [])
        lines.append("dhcp-host=" + ",".join(fields))
        if host.name:
            lines.append(f"host-record={host.name}.{cfg.domain},{host.name}," + ",".join(host.ips))
    return "\n".join(lines) + "\n"


class DnsmasqSupervisor:
    """Keeps one dnsmasq running in a namespace with a given config; restarts it on change.

    The process is our child (we wait on it), so it never lingers as a zombie."""

    def __init__(self, netns: str | None, cfg_path: str | os.PathLike[str]) -> None:
        self.netns = netns
        self.cfg_path = Path(cfg_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while our dnsmasq process lives."""
        return self.proc is not None and self.proc.poll() is None

    def ensure(self, config: str) -> bool:
        """Run dnsmasq with ``config``; returns True when it (re)started."""
        self.cfg_path.parent.mkdir(parents=True, exist_ok=True)
        for line in config.splitlines():  # make the lease and pid file directories
            if line.startswith(("dhcp-leasefile=", "pid-file=")):
                Path(line.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        old = self.cfg_path.read_text() if self.cfg_path.exists() else None
        if old == config and self.running:
            return False
        self.cfg_path.write_text(config)
        self.stop()
        _prune_leases(config)
        # dnsmasq logs every DHCP exchange: to a file, never to a pipe nobody drains.
        log_path = self.cfg_path.with_suffix(".log")
        with log_path.open("ab") as log:
            start = log.tell()
            self.proc = popen_in_netns(
                self.netns,
                ["dnsmasq", "--keep-in-foreground", f"--conf-file={self.cfg_path}", "--user=root",
                 "--log-facility=-"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            self.proc.wait(timeout=0.3)  # a bad config exits at once
        except subprocess.TimeoutExpired:
            return True
        with log_path.open("rb") as log:
            log.seek(start)
            err = log.read()
        raise CommandFailed(f"dnsmasq exited: {err.decode(errors='replace').strip()[-500:]}")

    def stop(self) -> None:
        """Stop our dnsmasq (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _prune_leases(config: str) -> None:
    """Drop the leases ``config`` no longer hands out before dnsmasq starts again (it
    reads its lease file only then): a deleted port's address leased to its old MAC
    would otherwise be refused to the next port given that address ("not using
    configured address … because it is leased to …") until the lease expires."""
    path = next((Path(line.split("=", 1)[1]) for line in config.splitlines()
                 if line.startswith("dhcp-leasefile=")), None)
    if path is None or not path.exists():
        return
    wanted: set[tuple[str, str]] = set()
    for line in config.splitlines():
        if line.startswith("dhcp-host="):
            mac, *rest = line.split("=", 1)[1].split(",")
            wanted.update((mac.lower(), field.strip("[]")) for field in rest)
    kept = [line for line in path.read_text().splitlines()
            if len(parts := line.split()) < 3 or ":" not in parts[1] or parts[1].count(":") != 5
            or (parts[1].lower(), parts[2]) in wanted]
    path.write_text("".join(f"{line}\n" for line in kept))


def parse_leases(text: str) -> list[tuple[str, str, str]]:
    """(MAC, IP, hostname) from a dnsmasq lease file."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and ":" in parts[1]:
            out.append((parts[1], parts[2], parts[3]))
    return out
