"""``isolation: vm`` containers: the container's root filesystem runs inside a tiny guest.

For hard multi-tenancy a container gets its own kernel: the image's root
filesystem is shared into a microVM over virtiofs and the guest's init chroots
into it and runs the container's command. Same spec, same bridge (the NIC's
MAC/IP come from the container's port), same console shape as other instances.

This module drives any VM driver (libvirt, or the fake one) through the
driver interface; it never imports libvirt itself.
"""

from __future__ import annotations

import base64
import json
import math
import shlex
import shutil
import subprocess
from pathlib import Path

from compute.driver import ComputeDriver, ConsoleEndpoint, NodeResources
from compute.errors import InstanceExists, InstanceNotFound, InvalidSpec
from compute.oci_image import ImageStore
from compute.spec import (
    Consoles,
    ContainerSpec,
    FilesystemShare,
    KernelBoot,
    NicSpec,
    PowerState,
    VmSpec,
    container_spec_from_dict,
    container_spec_to_dict,
)

GUEST_OVERHEAD_MIB = 96  # the guest kernel + init on top of the container's own limit


class VmIsolatedContainerDriver(ComputeDriver[ContainerSpec]):
    """Containers each in their own guest, booted from ``kernel``/``initrd`` (see compute.testguest)."""

    kind = "container"

    def __init__(self, vms: ComputeDriver[VmSpec], state_dir: Path, kernel: str, initrd: str,
                 images: ImageStore | None = None) -> None:
        self.vms = vms
        self.state_dir = Path(state_dir)
        self.kernel, self.initrd = kernel, initrd
        self.images = images or ImageStore(self.state_dir / "images")
        (self.state_dir / "containers").mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        return self.state_dir / "containers" / name

    def _spec(self, name: str) -> ContainerSpec:
        path = self._dir(name) / "spec.json"
        if not path.exists():
            raise InstanceNotFound(f"no container named {name!r} on this node")
        return container_spec_from_dict(json.loads(path.read_text()))

    def resources(self) -> NodeResources:
        """The VM driver's node."""
        return self.vms.resources()

    def vm_spec(self, spec: ContainerSpec, rootfs: Path) -> VmSpec:
        """The guest that runs ``spec`` (pure apart from the paths it is given)."""
        if len(spec.nics) > 1:
            raise InvalidSpec("isolation: vm supports one NIC")
        if spec.volumes or spec.io_limits:
            raise InvalidSpec("isolation: vm does not support volumes or I/O limits yet")
        env = " ".join(f"export {k}={shlex.quote(v)};" for k, v in spec.env)
        script = f"{env} cd {shlex.quote(spec.workdir)} && exec {shlex.join(spec.command)}"
        cmdline = ["console=ttyS0", "panic=-1", "quiet", "cairn.virtiofs=rootfs",
                   "cairn.run=" + base64.b64encode(script.encode()).decode()]
        nics = tuple(NicSpec(mac=n.mac, bridge=n.bridge, tap=n.host_dev) for n in spec.nics)
        if spec.nics and spec.nics[0].address:
            cmdline.append(f"cairn.ip={spec.nics[0].address}")
        d = self._dir(spec.name)
        return VmSpec(
            name=spec.name, vcpus=max(1, math.ceil(spec.vcpus)), memory_mib=spec.memory_mib + GUEST_OVERHEAD_MIB,
            kernel_boot=KernelBoot(self.kernel, self.initrd, " ".join(cmdline)), nics=nics,
            filesystems=(FilesystemShare(str(rootfs), "rootfs"),),
            consoles=Consoles(serial_log=str(d / "console.log"), serial_socket=str(d / "console.sock"), vnc=False),
        )

    def define(self, spec: ContainerSpec) -> None:
        """Copy the image into a private root filesystem and define the guest."""
        d = self._dir(spec.name)
        if (d / "spec.json").exists():
            raise InstanceExists(f"container {spec.name!r} already exists")
        image = self.images.resolve(spec.image)
        rootfs = d / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        # a copy, not an overlay: the libvirt node's mount namespace would not see a mount made now
        for layer in image.layers:
            subprocess.run(["cp", "-a", f"{layer}/.", str(rootfs)], check=True, capture_output=True)
        try:
            self.vms.define(self.vm_spec(spec, rootfs))
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        (d / "spec.json").write_text(json.dumps(container_spec_to_dict(spec)))

    def start(self, name: str) -> None:
        """Boot the guest."""
        self._spec(name)
        self.vms.start(name)

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Shut the guest down (forced after ``timeout``)."""
        self._spec(name)
        self.vms.stop(name, timeout)

    def reboot(self, name: str) -> None:
        """Reset the guest: the container's command runs again."""
        self._spec(name)
        self.vms.reboot(name)

    def pause(self, name: str) -> None:
        """Pause the guest."""
        self._spec(name)
        self.vms.pause(name)

    def resume(self, name: str) -> None:
        """Resume the guest."""
        self._spec(name)
        self.vms.resume(name)

    def delete(self, name: str) -> None:
        """Delete the guest and the container's root filesystem (idempotent)."""
        self.vms.delete(name)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def power_state(self, name: str) -> PowerState:
        """The guest's power state."""
        self._spec(name)
        return self.vms.power_state(name)

    def list_instances(self) -> list[str]:
        """Defined containers."""
        return sorted(p.parent.name for p in (self.state_dir / "containers").glob("*/spec.json"))

    def console_log(self, name: str) -> bytes:
        """The guest's serial console: the command's output (and the guest kernel's)."""
        self._spec(name)
        return self.vms.console_log(name)

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """The guest's serial console endpoints."""
        self._spec(name)
        return self.vms.consoles(name)
