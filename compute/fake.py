"""In-memory fake drivers with the same contract as the real ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic

from compute.driver import ComputeDriver, ConsoleEndpoint, InstanceStats, MigrationResult, NodeResources, SpecT
from compute.errors import (
    InstanceExists,
    InstanceNotFound,
    InsufficientResources,
    InvalidPowerState,
)
from compute.spec import ContainerSpec, PowerState, VmSpec


@dataclass
class _Instance(Generic[SpecT]):
    spec: SpecT
    state: PowerState = PowerState.SHUTDOWN
    log: bytearray = field(default_factory=bytearray)
    boots: int = 0


class FakeDriver(ComputeDriver[SpecT]):
    """Keeps instances in a dict; ``marker`` is "printed" to the console on every boot."""

    def __init__(
        self, kind: str = "vm", cpus: int = 2, memory_mib: int = 4096, marker: bytes = b"CAIRN-MARKER"
    ) -> None:
        self.kind = kind
        self._res = NodeResources(cpus=cpus, memory_mib=memory_mib)
        self._marker = marker
        self._instances: dict[str, _Instance[SpecT]] = {}
        self.peers: dict[str, FakeDriver[SpecT]] = {}  # destination URI -> driver, for migrate()

    def _get(self, name: str) -> _Instance[SpecT]:
        try:
            return self._instances[name]
        except KeyError:
            raise InstanceNotFound(f"no {self.kind} named {name!r} on this node")

    def resources(self) -> NodeResources:
        """Return the configured fake capacity."""
        return self._res

    def define(self, spec: SpecT) -> None:
        """Record ``spec``; checks capacity like the real drivers."""
        if spec.name in self._instances:
            raise InstanceExists(f"{self.kind} {spec.name!r} already exists")
        if spec.vcpus > self._res.cpus:
            raise InsufficientResources(f"{spec.vcpus} vCPUs requested, node has {self._res.cpus}")
        if spec.memory_mib > self._res.memory_mib:
            raise InsufficientResources(f"{spec.memory_mib} MiB requested, node has {self._res.memory_mib} MiB")
        self._instances[spec.name] = _Instance(spec)

    def start(self, name: str) -> None:
        """Boot: state running, marker appended to the log."""
        inst = self._get(name)
        if inst.state is PowerState.PAUSED:
            raise InvalidPowerState(f"{name!r} is paused: resume it instead")
        if inst.state is not PowerState.RUNNING:
            inst.state = PowerState.RUNNING
            inst.boots += 1
            inst.log += self._marker + b"\n"

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Power off."""
        self._get(name).state = PowerState.SHUTDOWN

    def reboot(self, name: str) -> None:
        """Reboot a running instance."""
        inst = self._get(name)
        if inst.state is not PowerState.RUNNING:
            raise InvalidPowerState(f"{name!r} is {inst.state}: only a running instance can reboot")
        inst.state = PowerState.SHUTDOWN
        self.start(name)

    def pause(self, name: str) -> None:
        """Pause a running instance."""
        inst = self._get(name)
        if inst.state is not PowerState.RUNNING:
            raise InvalidPowerState(f"{name!r} is {inst.state}: only a running instance can be paused")
        inst.state = PowerState.PAUSED

    def resume(self, name: str) -> None:
        """Resume a paused instance."""
        inst = self._get(name)
        if inst.state is not PowerState.PAUSED:
            raise InvalidPowerState(f"{name!r} is {inst.state}: only a paused instance can be resumed")
        inst.state = PowerState.RUNNING

    def delete(self, name: str) -> None:
        """Forget the instance (idempotent)."""
        self._instances.pop(name, None)

    def power_state(self, name: str) -> PowerState:
        """Return the recorded state."""
        return self._get(name).state

    def list_instances(self) -> list[str]:
        """Return the defined names."""
        return sorted(self._instances)

    def console_log(self, name: str) -> bytes:
        """Return the fake console log."""
        return bytes(self._get(name).log)

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """One fake log endpoint."""
        self._get(name)
        return [ConsoleEndpoint(kind="log", path=f"/fake/{name}.log")]

    def stats(self) -> dict[str, InstanceStats]:
        """Running instances: all their memory (on the host and in use), one CPU second per boot."""
        return {name: InstanceStats(cpu_seconds=float(inst.boots), memory_bytes=inst.spec.memory_mib << 20,
                                    memory_used_bytes=inst.spec.memory_mib << 20)
                for name, inst in self._instances.items() if inst.state is PowerState.RUNNING}

    def migrate(self, name: str, destination: str) -> MigrationResult:
        """Move the instance to the peer registered under ``destination`` (VMs only)."""
        if self.kind != "vm":
            return super().migrate(name, destination)
        inst = self._get(name)
        if inst.state is not PowerState.RUNNING:
            raise InvalidPowerState(f"{name!r} is {inst.state}: only a running VM can be live-migrated")
        peer = self.peers[destination]
        peer.define(inst.spec)
        peer._instances[name].state = PowerState.RUNNING
        peer._instances[name].log = inst.log
        del self._instances[name]
        return MigrationResult(name=name, duration_s=0.0, downtime_ms=0.0)


def fake_vm_driver(cpus: int = 2, memory_mib: int = 4096) -> FakeDriver[VmSpec]:
    """A fake VM driver."""
    return FakeDriver[VmSpec]("vm", cpus, memory_mib)


def fake_container_driver(cpus: int = 2, memory_mib: int = 4096) -> FakeDriver[ContainerSpec]:
    """A fake container driver."""
    return FakeDriver[ContainerSpec]("container", cpus, memory_mib)
