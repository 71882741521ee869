"""The compute driver interface (Nova virt-driver style).

One interface for VMs (libvirt) and containers (crun); a fake implementation
makes everything above it testable without a hypervisor. A driver never touches
the control plane's database: it is told what to run and reports what it sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

from compute.errors import NotSupported
from compute.spec import ContainerSpec, PowerState, VmSpec

SpecT = TypeVar("SpecT", VmSpec, ContainerSpec)


@dataclass(frozen=True)
class ConsoleEndpoint:
    """Where to reach an instance's console.

    ``kind`` is ``serial-unix`` (a unix stream socket carrying the serial port),
    ``pty`` (a host pty path), ``vnc-tcp`` (host:port), ``vnc-unix`` (a socket),
    or ``log`` (read-only: a file that receives the output).
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class NodeResources:
    """What a node can host; drivers refuse specs that exceed it."""

    cpus: int
    memory_mib: int


@dataclass(frozen=True)
class MigrationResult:
    """Outcome of a live migration, as seen by the source driver."""

    name: str
    duration_s: float
    downtime_ms: float | None  # reported by the hypervisor when known


@dataclass(frozen=True)
class InstanceStats:
    """What a running instance has used: counters since it started (they fall back to
    zero when it restarts) and its memory now. Network directions are the instance's:
    ``net_rx_bytes`` is what it received.

    Memory comes in two figures. ``memory_bytes`` is what the instance holds on the host:
    a VM's QEMU process resident set (guest RAM it has touched, plus QEMU's own memory and,
    under TCG, its translated-code cache, so it can exceed the memory the guest was given),
    a container's cgroup working set. ``memory_used_bytes`` is what the instance itself
    has in use: for a VM, what its guest reports through the virtio balloon's statistics
    (its MemTotal less its MemAvailable, as ``free`` counts "used": page cache the guest
    can drop is not in use), None when the guest reports nothing (no balloon driver, or
    not yet);
    for a container, its cgroup working set again (the host and the container see the
    same pages)."""

    cpu_seconds: float
    memory_bytes: int  # resident on the host
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    disk_read_ops: int = 0
    disk_write_ops: int = 0
    memory_used_bytes: int | None = None  # in use inside the instance (see above)


@dataclass(frozen=True)
class ExecResult:
    """Exit status and captured output of a command run inside a container."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ComputeDriver(ABC, Generic[SpecT]):
    """Lifecycle of instances on one node. Names are the instances' identity."""

    #: "vm" or "container"
    kind: str

    @abstractmethod
    def resources(self) -> NodeResources:
        """Return the node's total CPUs and memory."""

    @abstractmethod
    def define(self, spec: SpecT) -> None:
        """Record the instance so it can be started; raise InstanceExists if the name is taken."""

    @abstractmethod
    def start(self, name: str) -> None:
        """Power on a defined instance (no-op if already running)."""

    @abstractmethod
    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Ask the instance to shut down; after ``timeout`` seconds power it off."""

    @abstractmethod
    def reboot(self, name: str) -> None:
        """Restart a running instance (hard reset: the guest does not need to cooperate)."""

    @abstractmethod
    def pause(self, name: str) -> None:
        """Freeze a running instance's CPUs / processes."""

    @abstractmethod
    def resume(self, name: str) -> None:
        """Unfreeze a paused instance."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Power off (forced) and forget the instance and its node-local files; idempotent."""

    @abstractmethod
    def power_state(self, name: str) -> PowerState:
        """Observe the instance's power state; raise InstanceNotFound if unknown."""

    @abstractmethod
    def list_instances(self) -> list[str]:
        """Return the names of all defined instances on this node, sorted."""

    @abstractmethod
    def console_log(self, name: str) -> bytes:
        """Return the console output captured so far (serial log or container stdout/stderr)."""

    @abstractmethod
    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """Return the endpoints where the instance's consoles can be reached."""

    def spawn(self, spec: SpecT) -> None:
        """Define and start ``spec``; on a failed start the definition is removed again."""
        self.define(spec)
        try:
            self.start(spec.name)
        except BaseException:
            self.delete(spec.name)
            raise

    def save_state(self, name: str, path: str) -> None:
        """Write a running instance's memory/device state to ``path`` and stop it. Default: not supported."""
        raise NotSupported(f"{self.kind} driver cannot save the state of {name!r}")

    def snapshot_memory(self, name: str, path: str) -> None:
        """Write a running instance's memory to ``path``, keeping it running. Default: not supported."""
        raise NotSupported(f"{self.kind} driver cannot snapshot the memory of {name!r}")

    def restore_state(self, name: str, path: str) -> None:
        """Resume ``name`` from a state file written by :meth:`save_state`. Default: not supported."""
        raise NotSupported(f"{self.kind} driver cannot restore {name!r}")

    def stats(self) -> dict[str, InstanceStats]:
        """The counters of every running instance on this node, by name (one call for all:
        the metrics sampler asks every few seconds). Default: not supported."""
        raise NotSupported(f"{self.kind} driver reports no usage statistics")

    def migrate(self, name: str, destination: str) -> MigrationResult:
        """Live-migrate to ``destination`` (a driver-specific URI). Default: not supported."""
        raise NotSupported(f"{self.kind} driver cannot live-migrate {name!r}; restart it on the target instead")
