"""``isolation: vm`` containers: a container with a kernel of its own.

For hard multi-tenancy a container gets its own microVM: the image's root
filesystem is shared into a tiny guest over virtiofs, and the guest's agent
(``compute/guest_agent.c``, PID 1 of the guest, Kata's agent is the model) runs
the container's processes there: the main process, ``exec`` sessions (with or
without a terminal; exit status, stdout and stderr come back), a terminal for
``tty`` containers, resource limits (a cgroup in the guest: memory.max = the
container's limit, cpu.max for the guaranteed class, pids.max), volumes (virtio
disks the agent mounts; a blank one is formatted on the host first). The host
talks to it over a virtio-serial port (:mod:`compute.guest_agent`). When the main
process exits the guest powers off, so the container is ``shutdown`` as a plain one
would be. Same spec, same bridge (the NIC's MAC/IP come from the container's port,
so the same security groups apply to its tap), same console shapes as other
containers.

Given a :class:`GuestAccess` (the appliance's agent gives its ``VmAccess``), each
microVM's QEMU runs as an unprivileged uid of its own (``VmSpec.run_as``), as plain VMs
do: the uid comes from the host's id registry (``guests/<name>`` is that uid's and holds
only its label), the kernel, initrd and block volumes are granted before each start, and
the uid goes back when the container is deleted. QEMU opens nothing in the container's own
directory (root's, 0700: root filesystem, environment in ``process.json``/``config.bin``,
sockets, logs): libvirt binds the agent channel's socket and virtlogd opens the serial
log, and both hand QEMU a descriptor, so no root process ever opens a path QEMU could
have replaced. virtiofsd, which libvirt starts per microVM to serve the root filesystem,
stays root (see compute/README.md, "VM confinement").

This module drives any VM driver (libvirt, or the fake one) through the driver
interface; it never imports libvirt itself.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

from compute import block_volumes
from compute.driver import ComputeDriver, ConsoleEndpoint, ExecResult, InstanceStats, NodeResources
from compute.errors import HypervisorError, InstanceExists, InstanceNotFound, InvalidPowerState, InvalidSpec
from compute.guest_agent import PORT_NAME, AgentLink, process_payload, run_process
from compute.oci_bundle import CPU_PERIOD_US, process_cwd, process_env
from compute.oci_driver import socket_path
from compute.oci_image import ImageStore
from compute.spec import (
    ChannelSpec,
    Consoles,
    ContainerSpec,
    DiskSpec,
    FilesystemShare,
    KernelBoot,
    NicSpec,
    PowerState,
    QosClass,
    VmSpec,
    container_spec_from_dict,
    container_spec_to_dict,
)

GUEST_OVERHEAD_MIB = 96  # the guest kernel + init on top of the container's own limit
PIDS_LIMIT = 4096  # as for plain containers (compute.oci_bundle)


class GuestAccess(Protocol):
    """Who a microVM's QEMU runs as, and what it is let reach (``appliance.agent.vm_access.VmAccess``)."""

    def label(self, workdir: Path) -> tuple[int, int]:
        """An unprivileged (uid, gid) of the guest's own; ``workdir`` made its own."""

    def grant(self, spec: VmSpec) -> None:
        """Let ``spec.run_as`` reach the files, sockets and volumes ``spec`` names."""

    def release(self, workdir: Path) -> None:
        """Give the deleted guest's uid back."""


def _paths(state_dir: Path, name: str) -> dict[str, Path]:
    d = Path(state_dir) / "containers" / name
    return {"dir": d, "spec": d / "spec.json", "process": d / "process.json", "config": d / "config.bin",
            "log": d / "console.log", "serial": d / "serial.log", "rootfs": d / "rootfs", "volumes": d / "volumes",
            "agent": socket_path(d / "agent.sock"), "exec": socket_path(d / "exec.sock"),
            "tty": socket_path(d / "tty.sock"),
            "guest": Path(state_dir) / "guests" / name}  # its QEMU's uid's: only that uid's label


def exec_in(state_dir: Path, name: str, argv: list[str], tty: bool = False, timeout: float = 60.0) -> ExecResult:
    """Run ``argv`` in the running container ``name`` (any process on the node may call this:
    it goes through the link the node agent holds)."""
    p = _paths(state_dir, name)
    if not p["spec"].exists():
        raise InstanceNotFound(f"no container named {name!r} on this node")
    process = json.loads(p["process"].read_text())
    env = dict(process["env"], **({"TERM": "xterm"} if tty else {}))
    return run_process(p["exec"], process_payload(argv, env, process["cwd"], tty), timeout=timeout)


class VmIsolatedContainerDriver(ComputeDriver[ContainerSpec]):
    """Containers each in their own guest, booted from ``kernel``/``initrd`` (see compute.testguest)."""

    kind = "container"

    def __init__(self, vms: ComputeDriver[VmSpec], state_dir: Path, kernel: str, initrd: str,
                 images: ImageStore | None = None, boot_timeout: float = 120.0,
                 access: GuestAccess | None = None) -> None:
        self.vms = vms
        self.state_dir = Path(state_dir)
        self.kernel, self.initrd = kernel, initrd
        self.images = images or ImageStore(self.state_dir / "images")
        self.boot_timeout = boot_timeout
        self.access = access  # None: QEMU runs as the hypervisor's default user (root)
        self._links: dict[str, AgentLink] = {}
        self._lock = threading.Lock()
        (self.state_dir / "containers").mkdir(parents=True, exist_ok=True)
        # root's only: the containers' environment and root filesystems (no guest's QEMU enters)
        (self.state_dir / "containers").chmod(0o700)

    def _paths(self, name: str) -> dict[str, Path]:
        return _paths(self.state_dir, name)

    def _spec(self, name: str) -> ContainerSpec:
        path = self._paths(name)["spec"]
        if not path.exists():
            raise InstanceNotFound(f"no container named {name!r} on this node")
        return container_spec_from_dict(json.loads(path.read_text()))

    def resources(self) -> NodeResources:
        """The VM driver's node."""
        return self.vms.resources()

    def vm_spec(self, spec: ContainerSpec, rootfs: Path, run_as: tuple[int, int] | None = None) -> VmSpec:
        """The guest that runs ``spec``, its QEMU as ``run_as`` (pure apart from the paths it is given)."""
        if len(spec.nics) > 1:
            raise InvalidSpec("isolation: vm supports one NIC")
        if spec.volumes or spec.io_limits:
            raise InvalidSpec("isolation: vm takes volumes as block volumes (no host paths, no device limits)")
        p = self._paths(spec.name)
        cmdline = ["console=ttyS0", "panic=-1", "quiet", "cairn.virtiofs=rootfs"]
        nics = tuple(NicSpec(mac=n.mac, bridge=n.bridge, tap=n.host_dev) for n in spec.nics)
        if spec.nics and spec.nics[0].address:
            cmdline.append(f"cairn.ip={spec.nics[0].address}")
            if spec.nics[0].gateway:
                cmdline.append(f"cairn.gw={spec.nics[0].gateway}")
        return VmSpec(
            name=spec.name, vcpus=max(1, math.ceil(spec.vcpus)), memory_mib=spec.memory_mib + GUEST_OVERHEAD_MIB,
            kernel_boot=KernelBoot(self.kernel, self.initrd, " ".join(cmdline)), nics=nics,
            disks=tuple(DiskSpec(v.source, readonly=v.readonly, serial=v.serial) for v in spec.block_volumes),
            filesystems=(FilesystemShare(str(rootfs), "rootfs"),),
            channels=(ChannelSpec(PORT_NAME, str(p["agent"])),),
            consoles=Consoles(serial_log=str(p["serial"]), vnc=False), run_as=run_as,
        )

    def _guest(self, name: str, spec: ContainerSpec | None = None) -> VmSpec | None:
        """The guest of ``name`` with its QEMU's uid, granted what it opens (None without
        an access, or for a microVM defined before its QEMU had a uid of its own)."""
        p = self._paths(name)
        if self.access is None or (spec is None and not p["guest"].is_dir()):
            return None
        vm = self.vm_spec(spec or self._spec(name), p["rootfs"], self.access.label(p["guest"]))
        self.access.grant(vm)
        return vm

    def config(self, spec: ContainerSpec, env: dict[str, str], cwd: str, filesystems: dict[str, str]) -> bytes:
        """What the guest agent needs to run the container: the main process, limits, mounts (pure)."""
        cpu = int(spec.vcpus * CPU_PERIOD_US) if spec.qos_class is QosClass.GUARANTEED else 0
        extra = [("hostname", spec.hostname or spec.name), ("mem", str(spec.memory_mib << 20)),
                 ("cpu", str(cpu)), ("pids", str(PIDS_LIMIT))]
        extra += [("mount", f"{v.serial}:{filesystems.get(v.serial, v.fs)}:{'ro' if v.readonly else 'rw'}:{v.target}")
                  for v in spec.block_volumes]
        return process_payload(spec.command, env, cwd, spec.tty, extra)

    def define(self, spec: ContainerSpec) -> None:
        """Copy the image into a private root filesystem, give blank volumes a filesystem,
        define the guest."""
        p = self._paths(spec.name)
        if p["spec"].exists():
            raise InstanceExists(f"container {spec.name!r} already exists")
        image = self.images.resolve(spec.image)
        p["rootfs"].mkdir(parents=True, exist_ok=True)
        try:
            # a copy, not an overlay: the libvirt node's mount namespace would not see a mount made now
            for layer in image.layers:
                subprocess.run(["cp", "-a", f"{layer}/.", str(p["rootfs"])], check=True, capture_output=True)
            filesystems = {v.serial: block_volumes.prepare(v, p["volumes"]) for v in spec.block_volumes}
            env, cwd = process_env(spec, image.config), process_cwd(spec, image.config)
            p["process"].write_text(json.dumps({"env": env, "cwd": cwd}))
            p["config"].write_bytes(self.config(spec, env, cwd, filesystems))
            self.vms.define(self._guest(spec.name, spec) or self.vm_spec(spec, p["rootfs"]))
        except BaseException:
            self._forget(spec.name)
            raise
        p["spec"].write_text(json.dumps(container_spec_to_dict(spec)))

    def _link(self, name: str) -> AgentLink:
        """The link to the guest's agent: the one this process holds, or a new one (after a
        restart of this process, the guest keeps running and a new link picks it up)."""
        with self._lock:
            link = self._links.get(name)
            if link is not None and not link.done.is_set():
                return link
            spec = self._spec(name)
            p = self._paths(name)
            link = AgentLink(p["agent"], p["exec"], p["log"], p["config"].read_bytes(),
                             p["tty"] if spec.tty else None)
            link.start()
            self._links[name] = link
            return link

    def _unlink(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            link.stop()
            link.join(5)

    def start(self, name: str) -> None:
        """Boot the guest; returns once the container's main process runs in it."""
        self._spec(name)
        state = self.vms.power_state(name)
        if state is PowerState.PAUSED:
            raise InvalidPowerState(f"container {name!r} is paused: resume it instead")
        if state is PowerState.RUNNING:
            self._link(name)
            return
        self._unlink(name)
        self._guest(name)  # grants again: the storage daemon's sockets are new after its restart
        self.vms.start(name)
        link = self._link(name)
        if not link.main_started.wait(self.boot_timeout) or link.main_pid is None:
            reason = link.main_error or ("its guest stopped" if link.done.is_set() else
                                         f"its agent did not answer within {self.boot_timeout:g} s")
            tail = self._paths(name)["serial"]
            guest = tail.read_bytes()[-300:].decode(errors="replace") if tail.exists() else ""
            self._unlink(name)
            self.vms.stop(name, timeout=0)
            raise HypervisorError(f"container {name!r} did not start: {reason} (guest console: {guest!r})")

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """SIGTERM to the main process (the guest powers off when it exits), SIGKILL after
        ``timeout`` seconds, and the guest is powered off if it still runs."""
        self._spec(name)
        state = self.vms.power_state(name)
        if state is PowerState.PAUSED:
            self.vms.resume(name)  # a frozen guest cannot act on SIGTERM
        if state in (PowerState.RUNNING, PowerState.PAUSED):
            link = self._link(name)
            if link.ready.wait(min(5.0, timeout)):
                for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                    link.signal_main(signum)
                    if self._wait_off(name, wait):
                        break
        self._unlink(name)
        self.vms.stop(name, timeout=0)

    def _wait_off(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.vms.power_state(name) is PowerState.SHUTDOWN:
                return True
            time.sleep(0.05)
        return False

    def reboot(self, name: str) -> None:
        """Restart the container (its command runs again in a fresh guest)."""
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: only a running one can reboot")
        self.stop(name, timeout=5)
        self.start(name)

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
        self._unlink(name)
        self.vms.delete(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        """Remove the container's files and give its QEMU's uid back."""
        p = self._paths(name)
        for sock in ("agent", "exec", "tty"):
            p[sock].unlink(missing_ok=True)  # a stand-in may live outside the directory
        if self.access is not None:
            self.access.release(p["guest"])
        shutil.rmtree(p["dir"], ignore_errors=True)
        shutil.rmtree(p["guest"], ignore_errors=True)

    def power_state(self, name: str) -> PowerState:
        """The guest's power state; a running guest gets its agent link back if this process lost it."""
        self._spec(name)
        state = self.vms.power_state(name)
        if state is PowerState.RUNNING:
            self._link(name)
        return state

    def list_instances(self) -> list[str]:
        """Defined containers."""
        return sorted(p.parent.name for p in (self.state_dir / "containers").glob("*/spec.json"))

    def console_log(self, name: str) -> bytes:
        """The container's output (its main process's stdout and stderr)."""
        self._spec(name)
        path = self._paths(name)["log"]
        return path.read_bytes() if path.exists() else b""

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """The output log, and for ``tty`` containers the interactive terminal as a unix socket."""
        spec = self._spec(name)
        p = self._paths(name)
        out = [ConsoleEndpoint(kind="log", path=str(p["log"]))]
        link = self._links.get(name)
        if spec.tty and link is not None and link.ready.is_set() and not link.done.is_set():
            out.insert(0, ConsoleEndpoint(kind="serial-unix", path=str(p["tty"])))
        return out

    def exec(self, name: str, argv: list[str], timeout: float = 60.0, tty: bool = False) -> ExecResult:
        """Run ``argv`` inside the running container; its exit status and output."""
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"container {name!r} is {self.power_state(name)}: exec needs it running")
        if not self._link(name).ready.wait(timeout):
            raise HypervisorError(f"container {name!r}: its agent does not answer")
        return exec_in(self.state_dir, name, argv, tty, timeout)

    def stats(self) -> dict[str, InstanceStats]:
        """Each container's guest, as the VM driver measures it."""
        mine = set(self.list_instances())
        return {name: st for name, st in self.vms.stats().items() if name in mine}
