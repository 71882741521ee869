"""Which compute drivers this node's agent uses, built lazily: the hypervisor may
come up after the agent (both are supervised), so a pass that cannot reach it
reports why and the next pass tries again."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from appliance.settings import Settings
from compute.driver import ComputeDriver

log = logging.getLogger("cairn.agent.drivers")


class DriverSet:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._drivers: dict[str, ComputeDriver[Any]] = {}
        self.errors: dict[str, str] = {}

    def _build(self, kind: str, name: str) -> ComputeDriver[Any] | None:
        if name == "none":
            return None
        if name == "libvirt":
            module = importlib.import_module("compute.libvirt_driver")
            return module.LibvirtDriver(self.settings.libvirt_uri, self.settings.virt_type)  # type: ignore[no-any-return]
        if name == "crun":
            module = importlib.import_module("compute.oci_driver")
            return module.OciDriver(self.settings.data_dir / "containers",  # type: ignore[no-any-return]
                                    host_prefix=self.settings.host_prefix)
        if name == "fake":
            from compute.fake import FakeDriver

            return FakeDriver(kind)
        raise ValueError(f"unknown {kind} driver {name!r}")

    def _vm_isolation(self, plain: ComputeDriver[Any]) -> ComputeDriver[Any]:
        """Containers asking for ``isolation: vm`` run in a microVM on this node's hypervisor."""
        vms = self._drivers.get("vm")
        if vms is None:
            return plain
        from appliance.agent.vm_access import VmAccess
        from compute.container_router import ContainerRouter
        from compute.testguest import ensure_test_guest
        from compute.vm_isolation import VmIsolatedContainerDriver

        guest = ensure_test_guest(self.settings.data_dir / "cache" / "testguest")
        # each microVM's QEMU an unprivileged uid of its own, as plain VMs (agent/vm_access.py)
        isolated = VmIsolatedContainerDriver(vms, self.settings.data_dir / "microvms", guest.kernel, guest.initrd,
                                             access=VmAccess(self.settings))
        return ContainerRouter(plain, isolated)

    def get(self) -> dict[str, ComputeDriver[Any]]:
        """The drivers that are up; failures are kept in ``errors`` and retried next time."""
        for kind, name in (("vm", self.settings.vm_driver), ("container", self.settings.container_driver)):
            if kind in self._drivers:
                continue
            try:
                driver = self._build(kind, name)
            except Exception as exc:  # the daemon is not up yet: try again next pass
                self.errors[kind] = f"{name}: {exc}"
                log.warning("compute driver not ready", extra={"kind": kind, "error": str(exc)})
                continue
            if driver is not None:
                if kind == "container" and self.settings.vm_driver == "libvirt":
                    try:
                        driver = self._vm_isolation(driver)
                    except Exception as exc:  # plain containers still work without it
                        self.errors["container-vm-isolation"] = str(exc)
                self._drivers[kind] = driver
                self.errors.pop(kind, None)
        return self._drivers

    def drop(self, kind: str) -> None:
        """Forget a driver whose connection broke (it is rebuilt on the next pass)."""
        self._drivers.pop(kind, None)
