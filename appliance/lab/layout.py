"""Where a lab keeps its things: one folder (``lab.json`` + one folder per node), a
random prefix for its host-global names (network namespaces, the cgroup), and an
underlay subnet that exists only inside its own namespaces.

Every host object a lab makes is named from its prefix, so ``cairn lab down`` can
remove exactly what it made even after the lab tool itself crashed."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_DIR = Path("/var/lib/cairn-lab")
DEFAULT_SUBNET = "172.29.0.0/24"
# Inside a node's mount namespace, these node folders sit where a real node keeps them.
NODE_MOUNTS = {
    "data": "/var/lib/cairn",
    "pg": "/var/lib/postgresql/cairn",
    "etc-ceph": "/etc/ceph",
    "etc-cairn": "/etc/cairn",
}


def lab_dir() -> Path:
    """The lab folder: ``$CAIRN_LAB_DIR`` or /var/lib/cairn-lab."""
    return Path(os.environ.get("CAIRN_LAB_DIR") or DEFAULT_DIR)


def watchdog_fifo(node_dir: Path) -> Path:
    """The FIFO a lab node's agent feeds as its /dev/watchdog (inside: /var/lib/cairn/watchdog)."""
    return node_dir / "data" / "watchdog"


@dataclass
class LabNode:
    name: str
    index: int
    address: str
    netns: str
    switch_port: str  # the node's veth end on the switch (cut it = partition)
    dir: str

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def host_path(self, mount: str) -> Path:
        """The host path behind one of the node's NODE_MOUNTS (``data``, ``pg``, ...)."""
        return self.path / mount

    @property
    def data_dir(self) -> Path:
        return self.host_path("data")

    @property
    def api_url(self) -> str:
        return f"https://{self.address}:8443"


@dataclass
class Lab:
    dir: str
    prefix: str
    subnet: str
    cgroup: str
    nodes: list[LabNode] = field(default_factory=list)
    watchdog_timeout: float = 8.0  # the nodes' emulated watchdog (Settings.watchdog_timeout)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}sw"

    @property
    def state_file(self) -> Path:
        return self.path / "lab.json"

    @property
    def daemon_socket(self) -> Path:
        return self.path / "daemon.sock"

    @property
    def ctl_cgroup(self) -> Path:
        return Path(self.cgroup) / "ctl"

    def node_cgroup(self, name: str) -> Path:
        return Path(self.cgroup) / name

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise KeyError(f"the lab in {self.dir} has no node '{name}' (nodes: {known})")

    def gateway(self) -> str:
        """The switch's own address (used by nothing but diagnostics)."""
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))

    def add_node(self) -> LabNode:
        index = max((n.index for n in self.nodes), default=0) + 1
        net = ipaddress.IPv4Network(self.subnet)
        address = str(net.network_address + 10 + index)
        name = f"n{index}"
        node = LabNode(name, index, address, f"{self.prefix}{name}", f"p{self.prefix[-4:]}{name}",
                       str(self.path / "nodes" / name))
        self.nodes.append(node)
        return node

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, directory: Path | None = None) -> Lab:
        d = directory or lab_dir()
        try:
            raw = json.loads((d / "lab.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no lab in {d}: start one with `cairn lab up`") from None
        nodes = [LabNode(**n) for n in raw.pop("nodes")]
        return cls(**raw, nodes=nodes)

    @classmethod
    def new(cls, directory: Path, cgroup_root: Path, subnet: str = DEFAULT_SUBNET) -> Lab:
        prefix = "clab" + secrets.token_hex(2)
        return cls(str(directory), prefix, subnet, str(cgroup_root / f"cairn-lab-{prefix}"))
