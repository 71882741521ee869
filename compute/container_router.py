"""One container driver for the agent: routes by ``spec.isolation`` to crun or to a microVM.

``define``/``spawn`` choose the backend from the spec; every other operation
goes to the backend that holds the name, so callers never need to know how a
container is isolated.
"""

from __future__ import annotations

from compute.driver import ComputeDriver, ConsoleEndpoint, ExecResult, InstanceStats, NodeResources
from compute.errors import InstanceExists, InstanceNotFound, NotSupported
from compute.spec import ContainerSpec, PowerState


class ContainerRouter(ComputeDriver[ContainerSpec]):
    """Dispatches to ``plain`` (isolation "container") or ``vm_isolated`` (isolation "vm")."""

    kind = "container"

    def __init__(self, plain: ComputeDriver[ContainerSpec], vm_isolated: ComputeDriver[ContainerSpec]) -> None:
        self.backends = {"container": plain, "vm": vm_isolated}

    def _owner(self, name: str) -> ComputeDriver[ContainerSpec]:
        for backend in self.backends.values():
            if name in backend.list_instances():
                return backend
        raise InstanceNotFound(f"no container named {name!r} on this node")

    def resources(self) -> NodeResources:
        """The node's resources (as the plain backend sees them)."""
        return self.backends["container"].resources()

    def define(self, spec: ContainerSpec) -> None:
        """Define on the backend named by ``spec.isolation``; names are unique across both."""
        if any(spec.name in b.list_instances() for b in self.backends.values()):
            raise InstanceExists(f"container {spec.name!r} already exists")
        self.backends[spec.isolation].define(spec)

    def start(self, name: str) -> None:
        """Start on the owning backend."""
        self._owner(name).start(name)

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Stop on the owning backend."""
        self._owner(name).stop(name, timeout)

    def reboot(self, name: str) -> None:
        """Reboot on the owning backend."""
        self._owner(name).reboot(name)

    def pause(self, name: str) -> None:
        """Pause on the owning backend."""
        self._owner(name).pause(name)

    def resume(self, name: str) -> None:
        """Resume on the owning backend."""
        self._owner(name).resume(name)

    def delete(self, name: str) -> None:
        """Delete wherever the name is defined (idempotent)."""
        try:
            self._owner(name).delete(name)
        except InstanceNotFound:
            pass

    def power_state(self, name: str) -> PowerState:
        """Power state from the owning backend."""
        return self._owner(name).power_state(name)

    def list_instances(self) -> list[str]:
        """Containers of both backends."""
        return sorted(n for b in self.backends.values() for n in b.list_instances())

    def console_log(self, name: str) -> bytes:
        """Console output from the owning backend."""
        return self._owner(name).console_log(name)

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """Console endpoints from the owning backend."""
        return self._owner(name).consoles(name)

    def exec(self, name: str, argv: list[str], timeout: float = 60.0, tty: bool = False) -> ExecResult:
        """Run a process in the container, on the owning backend."""
        backend = self._owner(name)
        run = getattr(backend, "exec", None)
        if run is None:
            raise NotSupported(f"container {name!r}: its backend cannot exec")
        result: ExecResult = run(name, argv, timeout=timeout, tty=tty)
        return result

    def stats(self) -> dict[str, InstanceStats]:
        """Usage of the containers of both backends (those that report it)."""
        out: dict[str, InstanceStats] = {}
        for backend in self.backends.values():
            try:
                out.update(backend.stats())
            except NotSupported:
                continue
        return out
