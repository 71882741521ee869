"""The libvirt/QEMU VM driver."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt

from compute.driver import ComputeDriver, ConsoleEndpoint, InstanceStats, MigrationResult, NodeResources
from compute.errors import (
    HypervisorError,
    ImageNotFound,
    InstanceExists,
    InstanceNotFound,
    InsufficientResources,
    InvalidPowerState,
)
from compute.libvirt_xml import BALLOON_STATS_PERIOD_S, build_domain_xml, build_memory_snapshot_xml
from compute.spec import FileSource, PowerState, VirtType, VmSpec

log = logging.getLogger(__name__)

PVM_MARKER = Path("/sys/module/kvm_pvm")
STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
}


# the guest's balloon statistics are older than this: its driver stopped reporting (QEMU
# keeps the last figures across a guest reboot, into an OS that may have no driver)
BALLOON_STATS_STALE_S = 6 * BALLOON_STATS_PERIOD_S


def guest_memory_used(record: dict[str, Any], now: float) -> int | None:
    """Bytes in use inside the guest from its balloon statistics (KiB in the record):
    ``balloon.available`` (the guest's MemTotal) less ``balloon.usable`` (its
    MemAvailable), what ``free`` counts as used and the node graph shows too; guests
    whose driver does not report MemAvailable (Linux before 4.6): MemTotal less MemFree
    (``balloon.unused``) less the page cache (``balloon.disk_caches``) when reported.
    None when the guest reports nothing (libvirt leaves out what QEMU has not received)
    or reported last over :data:`BALLOON_STATS_STALE_S` ago."""
    total = record.get("balloon.available")
    updated = record.get("balloon.last-update")
    if total is None or updated is None or now - int(updated) > BALLOON_STATS_STALE_S:
        return None
    if "balloon.usable" in record:
        free = int(record["balloon.usable"])
    elif "balloon.unused" in record:
        free = int(record["balloon.unused"]) + int(record.get("balloon.disk_caches", 0))
    else:
        return None
    return max(0, int(total) - free) * 1024


def stats_from_record(record: dict[str, Any], now: float | None = None) -> InstanceStats:
    """One domain's ``virConnectGetAllDomainStats`` record as InstanceStats (libvirt
    reports interface counters from the guest's side already): ``memory_bytes`` is
    QEMU's resident set on the host, ``memory_used_bytes`` the guest's own figure
    (:func:`guest_memory_used`). ``now``: the time to judge the guest's report by."""

    def total(group: str, key: str) -> int:
        return sum(int(record.get(f"{group}.{i}.{key}", 0)) for i in range(int(record.get(f"{group}.count", 0))))

    memory_kib = record.get("balloon.rss") or record.get("balloon.current") or 0
    return InstanceStats(
        cpu_seconds=int(record.get("cpu.time", 0)) / 1e9, memory_bytes=int(memory_kib) * 1024,
        memory_used_bytes=guest_memory_used(record, time.time() if now is None else now),
        net_rx_bytes=total("net", "rx.bytes"), net_tx_bytes=total("net", "tx.bytes"),
        disk_read_bytes=total("block", "rd.bytes"), disk_write_bytes=total("block", "wr.bytes"),
        disk_read_ops=total("block", "rd.reqs"), disk_write_ops=total("block", "wr.reqs"),
    )


def choose_virt_type(
    requested: str = "auto", pvm_marker: Path = PVM_MARKER, kvm_dev: Path = Path("/dev/kvm")
) -> VirtType:
    """Resolve ``auto | kvm | qemu`` to the accelerator this node should use.

    ``auto`` picks KVM on real hardware, and TCG where KVM is missing or is nested
    PVM (``/sys/module/kvm_pvm``), which only runs PVM-built guest kernels.
    """
    if requested in ("kvm", "qemu"):
        return VirtType(requested)
    if requested != "auto":
        raise ValueError(f"virt_type must be auto, kvm or qemu, not {requested!r}")
    if pvm_marker.exists():
        log.warning("KVM here is nested PVM (%s): using TCG emulation (virt_type=qemu)", pvm_marker)
        return VirtType.QEMU
    if not kvm_dev.exists():
        log.warning("%s is missing: using TCG emulation (virt_type=qemu)", kvm_dev)
        return VirtType.QEMU
    return VirtType.KVM


def _wrap(e: libvirt.libvirtError, what: str) -> HypervisorError:
    return HypervisorError(f"{what}: {e.get_error_message()}")


class LibvirtDriver(ComputeDriver[VmSpec]):
    """VMs on one libvirtd, reached at ``uri``."""

    kind = "vm"

    def __init__(self, uri: str, virt_type: str = "auto", migration_host: str | None = None,
                 migration_max_downtime_ms: int | None = 50) -> None:
        self.uri = uri
        self.virt_type = choose_virt_type(virt_type)
        self.migration_host = migration_host  # address the migration data stream uses
        self.migration_max_downtime_ms = migration_max_downtime_ms  # switchover target; QEMU's own is 300
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"cannot connect to libvirt at {uri}")

    def close(self) -> None:
        """Close the libvirt connection."""
        self._conn.close()

    def _dom(self, name: str) -> libvirt.virDomain:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(f"no VM named {name!r} on {self.uri}")
            raise _wrap(e, f"looking up {name!r}")

    def resources(self) -> NodeResources:
        """Return the node's CPUs and memory as libvirt sees them."""
        info = self._conn.getInfo()
        return NodeResources(cpus=int(info[2]), memory_mib=int(info[1]))

    def _check(self, spec: VmSpec) -> None:
        res = self.resources()
        if spec.vcpus > res.cpus:
            raise InsufficientResources(f"VM {spec.name!r} asks for {spec.vcpus} vCPUs; this node has {res.cpus}")
        if spec.memory_mib > res.memory_mib:
            raise InsufficientResources(
                f"VM {spec.name!r} asks for {spec.memory_mib} MiB; this node has {res.memory_mib} MiB")
        paths = [d.source.path for d in spec.disks if isinstance(d.source, FileSource)]
        if spec.kernel_boot is not None:
            paths += [p for p in (spec.kernel_boot.kernel, spec.kernel_boot.initrd) if p]
        for p in paths:
            if not os.path.exists(p):
                raise ImageNotFound(f"VM {spec.name!r}: image {p} does not exist")

    def define(self, spec: VmSpec) -> None:
        """Define the domain (the node's accelerator overrides ``spec.virt_type``)."""
        spec = dataclasses.replace(spec, virt_type=self.virt_type)
        try:
            self._conn.lookupByName(spec.name)
            raise InstanceExists(f"VM {spec.name!r} already exists on {self.uri}")
        except libvirt.libvirtError:
            pass
        self._check(spec)
        for p in (spec.consoles.serial_log, spec.consoles.serial_socket):
            if p:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn.defineXML(build_domain_xml(spec))
        except libvirt.libvirtError as e:
            raise _wrap(e, f"defining VM {spec.name!r}")

    def start(self, name: str) -> None:
        """Start the domain."""
        dom = self._dom(name)
        state = self.power_state(name)
        if state is PowerState.PAUSED:
            raise InvalidPowerState(f"VM {name!r} is paused: resume it instead")
        if state is PowerState.RUNNING:
            return
        try:
            dom.create()
        except libvirt.libvirtError as e:
            raise _wrap(e, f"starting VM {name!r}")

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """ACPI shutdown, then power off after ``timeout`` seconds."""
        dom = self._dom(name)
        if not dom.isActive():
            return
        try:
            dom.shutdown()
        except libvirt.libvirtError as e:
            log.info("VM %s: graceful shutdown refused (%s): powering off", name, e.get_error_message())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and dom.isActive():
            time.sleep(0.1)
        if dom.isActive():
            log.info("VM %s did not shut down within %.0fs: powering off", name, timeout)
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                if dom.isActive():
                    raise _wrap(e, f"powering off VM {name!r}")

    def reboot(self, name: str) -> None:
        """Hard reset of a running VM."""
        dom = self._dom(name)
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: only a running VM can reboot")
        try:
            dom.reset(0)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"resetting VM {name!r}")

    def pause(self, name: str) -> None:
        """Suspend the VM's vCPUs."""
        dom = self._dom(name)
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: only a running VM can be paused")
        dom.suspend()

    def resume(self, name: str) -> None:
        """Resume a paused VM."""
        dom = self._dom(name)
        if self.power_state(name) is not PowerState.PAUSED:
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: only a paused VM can be resumed")
        dom.resume()

    def delete(self, name: str) -> None:
        """Power off and undefine; removes the serial log and socket. Idempotent."""
        try:
            dom = self._dom(name)
        except InstanceNotFound:
            return
        files = [p for p in (self._serial_log(dom), self._serial_socket(dom)) if p]
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise _wrap(e, f"deleting VM {name!r}")
        for p in files:
            Path(p).unlink(missing_ok=True)

    def power_state(self, name: str) -> PowerState:
        """Map libvirt's domain state to a PowerState."""
        try:
            state = self._dom(name).state()[0]
        except libvirt.libvirtError as e:
            raise _wrap(e, f"reading state of {name!r}")
        return STATES.get(state, PowerState.NOSTATE)

    def list_instances(self) -> list[str]:
        """Names of all defined domains."""
        return sorted(d.name() for d in self._conn.listAllDomains())

    def stats(self) -> dict[str, InstanceStats]:
        """Every running domain's counters, in one libvirt call."""
        wanted = (libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
                  | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
        try:
            records = self._conn.getAllDomainStats(wanted, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        except libvirt.libvirtError as e:
            raise _wrap(e, "reading domain statistics")
        now = time.time()
        return {dom.name(): stats_from_record(record, now) for dom, record in records}

    def _xml(self, dom: libvirt.virDomain) -> ET.Element:
        return ET.fromstring(dom.XMLDesc(0))

    def _serial_log(self, dom: libvirt.virDomain) -> str | None:
        el = self._xml(dom).find("./devices/serial/log")
        return el.get("file") if el is not None else None

    def _serial_socket(self, dom: libvirt.virDomain) -> str | None:
        el = self._xml(dom).find("./devices/serial[@type='unix']/source")
        return el.get("path") if el is not None else None

    def console_log(self, name: str) -> bytes:
        """Everything the guest wrote to its serial port (from the log file)."""
        path = self._serial_log(self._dom(name))
        if path is None or not os.path.exists(path):
            return b""
        return Path(path).read_bytes()

    def consoles(self, name: str) -> list[ConsoleEndpoint]:
        """Serial (unix socket or pty), VNC (TCP or unix socket) and the serial log."""
        root = self._xml(self._dom(name))
        out: list[ConsoleEndpoint] = []
        serial = root.find("./devices/serial")
        if serial is not None:
            src = serial.find("source")
            if serial.get("type") == "unix" and src is not None:
                out.append(ConsoleEndpoint(kind="serial-unix", path=src.get("path", "")))
            elif serial.get("type") == "pty" and src is not None:
                out.append(ConsoleEndpoint(kind="pty", path=src.get("path", "")))
            logf = serial.find("log")
            if logf is not None:
                out.append(ConsoleEndpoint(kind="log", path=logf.get("file", "")))
        vnc = root.find("./devices/graphics[@type='vnc']")
        if vnc is not None:
            if vnc.get("socket"):
                out.append(ConsoleEndpoint(kind="vnc-unix", path=vnc.get("socket", "")))
            elif int(vnc.get("port", "-1")) > 0:
                out.append(ConsoleEndpoint(kind="vnc-tcp", host=vnc.get("listen", "127.0.0.1"),
                                           port=int(vnc.get("port", "0"))))
        return out

    def save_state(self, name: str, path: str) -> None:
        """Save the VM's memory and device state to ``path`` (a memory snapshot); the VM is then shut off.

        Disks are not included: snapshot them through the storage layer at the same moment.
        """
        dom = self._dom(name)
        if self.power_state(name) not in (PowerState.RUNNING, PowerState.PAUSED):
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: only a running VM has state to save")
        try:
            dom.save(path)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"saving the state of VM {name!r}")

    def snapshot_memory(self, name: str, path: str) -> None:
        """Write a running or paused VM's memory and device state to ``path`` (libvirt's
        external memory snapshot, without libvirt metadata); the VM keeps running (or stays
        paused). Disks are left out: snapshot them through the storage layer while it is
        paused, so that they agree with the memory. :meth:`restore_state` resumes it."""
        dom = self._dom(name)
        state = self.power_state(name)
        if state not in (PowerState.RUNNING, PowerState.PAUSED):
            raise InvalidPowerState(f"VM {name!r} is {state}: only a running VM has memory to snapshot")
        targets = [t.get("dev", "") for t in self._xml(dom).findall("./devices/disk/target")]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).unlink(missing_ok=True)
        try:
            dom.snapshotCreateXML(build_memory_snapshot_xml(f"mem-{int(time.time() * 1000)}", path, targets),
                                  libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"snapshotting the memory of VM {name!r}")

    def restore_state(self, name: str, path: str) -> None:
        """Restore the VM from a state file written by :meth:`save_state` or
        :meth:`snapshot_memory`; it resumes running where it was."""
        if self.power_state(name) is not PowerState.SHUTDOWN:
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: stop it before restoring a state")
        if not os.path.exists(path):
            raise ImageNotFound(f"state file {path} does not exist")
        try:
            self._conn.restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"restoring VM {name!r} from {path}")

    def migrate(self, name: str, destination: str, destination_host: str | None = None,
                run_as: tuple[int, int] | None = None, paths: dict[str, str] | None = None) -> MigrationResult:
        """Live-migrate peer-to-peer to the libvirtd at ``destination`` (its URI); disks must be
        shared. The memory stream goes to ``destination_host`` (the target's migration
        address; default this driver's ``migration_host``, right when both share a host).
        ``run_as``: the uid:gid the target gave the guest (its DAC label there; the
        source's uid means nothing on another node); None runs it as the target's default.
        ``paths``: directory prefixes of this node -> the target's (console sockets, serial
        log, seed ISO of a node whose data directory is elsewhere)."""
        dom = self._dom(name)
        if self.power_state(name) is not PowerState.RUNNING:
            raise InvalidPowerState(f"VM {name!r} is {self.power_state(name)}: only a running VM can be migrated")
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML:
                                     _xml_for_target(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
                                                     run_as, paths or {})}
        host = destination_host or self.migration_host
        if host:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{host}"
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
        if self.migration_max_downtime_ms:
            dom.migrateSetMaxDowntime(self.migration_max_downtime_ms, 0)
        t0 = time.monotonic()
        try:
            dom.migrateToURI3(destination, params, flags)
        except libvirt.libvirtError as e:
            raise _wrap(e, f"migrating VM {name!r} to {destination}")
        duration = time.monotonic() - t0
        downtime: float | None = None
        try:
            dest = libvirt.open(destination)
            try:
                stats = dest.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                downtime = float(stats["downtime"]) if "downtime" in stats else None
            finally:
                dest.close()
        except libvirt.libvirtError as e:
            log.info("VM %s: no completed-job stats on %s: %s", name, destination, e.get_error_message())
        return MigrationResult(name=name, duration_s=duration, downtime_ms=downtime)


def _xml_for_target(xml: str, run_as: tuple[int, int] | None, paths: dict[str, str]) -> str:
    """A domain's XML for another node: its DAC label (``VmSpec.run_as``) is this node's
    uid, so it is replaced by the one the target allocated (and granted access to), or
    dropped (the target's default user) when the target gave none; file paths under a
    directory of ``paths`` are moved to the target's."""
    root = ET.fromstring(xml)
    for element in root.iter():
        for key, value in element.attrib.items():
            for mine, theirs in paths.items():
                if value == mine or value.startswith(mine.rstrip("/") + "/"):
                    element.set(key, theirs.rstrip("/") + value[len(mine.rstrip("/")):])
    for label in root.findall("seclabel"):
        if label.get("model") == "dac":
            root.remove(label)
    if run_as is not None:
        label = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(label, "label").text = f"+{run_as[0]}:+{run_as[1]}"
    return ET.tostring(root, encoding="unicode")
