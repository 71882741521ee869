"""The agent's instance reconciler (KubeVirt's virt-handler): makes the compute
drivers on this node match the instances its desired-state document places here, and
reports what it observes (``power_state``, console paths, crashes) back.

It acts on the document of the pass, fresh from the database or, while the database is
away, the cached one: guests wanted running are kept running and a crashed one is
restarted. With a cached document nothing is removed for being absent from it (a VM
may have arrived by live migration since), and reports wait for the database (crashes
seen meanwhile are counted then)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select

from appliance import imagefiles
from appliance.agent.drivers import DriverSet
from appliance.agent.vm_access import VmAccess, fresh_log
from appliance.db.engine import session_scope
from appliance.db.models import Instance
from appliance.pki import nbd_client_tls
from appliance.services import desired_state
from appliance.services.desired_state import Disk, InstanceDoc, Nic, NodeDocument, port_ifname
from appliance.services.instances import KINDS
from appliance.settings import Settings
from compute.cloudinit import CloudInitSeed, write_seed_iso
from compute.driver import ComputeDriver
from compute.errors import ComputeError, HypervisorError, InstanceNotFound, InsufficientResources, InvalidSpec
from compute.spec import (
    BlockVolume,
    Consoles,
    ContainerNic,
    ContainerSpec,
    DiskSpec,
    FileSource,
    KernelBoot,
    NbdSource,
    NicSpec,
    Placement,
    PowerState,
    QosClass,
    RbdSource,
    VirtType,
    VmSpec,
)
from network.model import HostNames

log = logging.getLogger("cairn.agent.instances")
MIB = 1 << 20
BACKOFF_MAX = 60.0
BACKOFF_RESET = 120.0  # running this long counts as stable again
LEFT_LOG_SECONDS = 24 * 3600.0  # a departed VM's serial log stays this long on its old node
ORPHAN = re.compile(r"cairn-[a-z0-9][a-z0-9-]*-[0-9a-f]{8}")  # what domain_name() makes


def domain_name(row: Instance) -> str:
    """The name on the node (see :func:`desired_state.domain_name`); a hand-made
    domain never matches ORPHAN and is left alone."""
    return desired_state.domain_name(row.id, row.name)


def _cpulist(path: Path) -> list[int]:
    """Parse a kernel cpulist like "0-3,8-11"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return []
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def volume_disk(disk: Disk, nbd_client: Callable[[], Path] | None = None) -> DiskSpec:
    """A volume as a virtio disk; the serial names it inside the guest
    (/dev/disk/by-id/virtio-<volume>). A ``dedup`` volume is its NBD export over the
    local unix socket when the pool is served on this node, else over TCP with TLS
    (``nbds://…?tls-certificates=<nbd_client()>``, the node's NBD client directory); an ``rbd``
    one (export ``rbd:<pool>/<image>:conf=<ceph.conf>``) is opened by QEMU's own RBD
    driver with that ceph.conf: no NBD hop."""
    uri = disk.export
    serial = re.sub(r"[^A-Za-z0-9_-]", "-", disk.volume)[:20]
    if uri.startswith("rbd:"):
        path, _, options = uri[4:].partition(":")
        pool, _, image = path.partition("/")
        conf = dict(o.split("=", 1) for o in options.split(":") if "=" in o).get("conf")
        return DiskSpec(RbdSource(pool, image, config=conf), serial=serial)
    sock = parse_qs(urlsplit(uri).query).get("socket", [""])[0]
    if sock and not Path(sock).exists() and disk.exports.get("tcp"):
        # a storage daemon serves TCP with TLS only (the node's NBD client certificate);
        # exports recorded by an older version still say nbd://
        uri = re.sub(r"^nbd(\+tcp)?://", "nbds://", str(disk.exports["tcp"]))
        if nbd_client is not None:
            uri += f"?tls-certificates={nbd_client()}"
    return DiskSpec(NbdSource(uri), serial=serial)


def block_volume(disk: Disk, nbd_client: Callable[[], Path] | None = None) -> BlockVolume:
    """A volume of a container: the same source a VM's disk has (NBD export or RBD image),
    mounted at its path (a blank one formatted with its filesystem)."""
    if not disk.path:
        raise InvalidSpec(f"volume '{disk.volume}' has no mount path in the container")
    source = volume_disk(disk, nbd_client)
    assert isinstance(source.source, NbdSource | RbdSource)
    return BlockVolume(source.source, disk.path, source.serial or "vol", fs=disk.fs, readonly=disk.readonly)


class InstanceReconciler:
    """One pass: for each instance the document places on this node, converge define / power."""

    def __init__(self, settings: Settings, drivers: dict[str, ComputeDriver[Any]] | DriverSet) -> None:
        self.settings = settings
        self.names = HostNames(settings.stack_tag)
        self.access = VmAccess(settings)
        self.vm_specs: dict[str, VmSpec] = {}  # what each VM was defined with (to grant before a start)
        self.driver_source = drivers
        self.drivers: dict[str, ComputeDriver[Any]] = drivers if isinstance(drivers, dict) else {}
        self.pinned: set[int] = set()
        self.pins: dict[str, list[int]] = {}
        self.backoff: dict[str, tuple[float, float, float]] = {}  # id -> (next start, delay, last start)
        self.power: dict[str, str] = {}  # id -> power state last observed here (newer than any document)
        self.crashes: dict[str, int] = {}  # id -> crashes seen and not yet reported
        self.liveness: Any = None  # a cluster node's Liveness: HA instances start only while it is fresh

    def __call__(self, agent: Any, report: Any) -> None:
        if agent.document is not None:
            self.reconcile(agent.document, report, fresh=agent.document_fresh)

    def reconcile(self, doc: NodeDocument, report: Any, fresh: bool = True) -> None:
        if isinstance(self.driver_source, DriverSet):
            self.drivers = self.driver_source.get()
            report.errors.extend(f"driver {k}: {v}" for k, v in self.driver_source.errors.items())
        self.pinned = {cpu for i in doc.instances if self.power.get(i.id, i.observed.power_state) != "nostate"
                       for cpu in self.pins.get(i.id, i.observed.pinned_cpus)}
        observed: dict[str, dict[str, Any]] = {}
        if self.liveness is not None:  # the watchdog guards this node while HA workloads run here
            self.liveness.want_armed = any(i.ha and i.power in ("running", "paused") for i in doc.instances)
        if fresh:  # a cached document may predate a VM that arrived by live migration
            self.remove_orphans({i.domain for i in doc.instances} | set(doc.moving), report)
            self.prepare_arrivals(doc, report)
        for inst in doc.instances:
            driver = self.drivers.get(inst.kind)
            if driver is None or inst.migrating:
                continue  # a migration moves it under us: only its task acts on it
            try:
                observed[inst.id] = {**self.converge(driver, inst, doc.virt_type), "generation": inst.generation}
            except HypervisorError as exc:
                # the connection may be gone (daemon restarted): rebuild it next pass
                if isinstance(self.driver_source, DriverSet):
                    self.driver_source.drop(inst.kind)
                report.errors.append(f"{inst.kind} {inst.name}: {exc}")
            except ComputeError as exc:
                report.errors.append(f"{inst.kind} {inst.name}: {exc}")
                observed[inst.id] = {"power_state": "error", "error": str(exc), "generation": inst.generation}
        for iid, seen in observed.items():
            self.power[iid] = seen["power_state"]
        if not fresh:
            return  # the database is away: the next fresh pass reports (crashes are kept until then)
        try:
            self.report(observed, report)
        except Exception as exc:  # the database went away during the pass
            report.errors.append(f"instances: reporting failed: {exc.__class__.__name__}: {str(exc)[:300]}")

    def prepare_arrivals(self, doc: NodeDocument, report: Any) -> None:
        """A VM migrating here needs its folder (serial log, console sockets), its seed ISO
        and its image's files (QEMU here opens them) before its QEMU starts here; the
        migration waits for this node to say it is ready."""
        from appliance.services import instances as instance_service

        for domain in doc.moving:
            (self.settings.instances_dir / domain).mkdir(parents=True, exist_ok=True)
        incoming = {i.id: i for i in doc.incoming}
        for iid in doc.arriving:
            with session_scope(self.settings.resolved_database_url) as session:
                row = session.get(Instance, iid)
                if row is None or ((row.status or {}).get("migration") or {}).get("ready_on") == doc.node:
                    continue
                run_as: list[int] | None = None
                if iid in incoming:
                    try:
                        if incoming[iid].kind == "vm":  # its uid here, granted its files and volumes
                            spec = self.build(incoming[iid], doc.virt_type)
                            run_as = list(spec.run_as) if isinstance(spec, VmSpec) and spec.run_as else None
                        else:
                            self.stage(incoming[iid])
                    except ComputeError as exc:
                        report.errors.append(f"instance {iid}: cannot receive its migration: {exc}")
                        continue

                def ready(cur: dict[str, Any], me: str = doc.node, uid: list[int] | None = run_as) -> dict[str, Any]:
                    # data_dir: where this node keeps the guest's files (its console paths
                    # there; the source rewrites its own prefix in the guest's XML)
                    return {"migration": {**(cur.get("migration") or {}), "ready_on": me, "run_as": uid,
                                          "data_dir": str(self.settings.data_dir)}}

                instance_service.KINDS[row.kind].write_status(session, row, ready)
            report.actions.append(f"instance {iid}: ready to receive its migration")

    def remove_orphans(self, wanted: set[str], report: Any) -> None:
        """Instances this node runs that the database no longer places here (deleted
        while the node was away, or moved to another node) are removed."""
        kept: set[str] = set()  # what the drivers still run here after this
        for kind, driver in self.drivers.items():
            for name in driver.list_instances():
                if name not in wanted and ORPHAN.fullmatch(name):
                    log.warning("removing an instance no longer placed here", extra={"instance": name})
                    driver.delete(name)
                    self._forget(kind, name)
                    report.actions.append(f"{kind} {name}: removed (not placed on this node)")
                else:
                    kept.add(name)
        self._remove_left_folders(wanted | kept, report)

    def _remove_left_folders(self, wanted: set[str], report: Any) -> None:
        """The folder of a VM that left by live migration (libvirt undefined it here, so no
        driver lists it) or was deleted while this node was away: its uid is given back
        and its files removed, except the serial log (the guest's console history up to
        its move), kept for ``LEFT_LOG_SECONDS`` after its last line."""
        root = self.settings.instances_dir
        if not root.is_dir():
            return
        for folder in root.iterdir():
            name = folder.name
            if not folder.is_dir() or not ORPHAN.fullmatch(name) or name in wanted:
                continue
            self._forget("vm", name)
            log_file = folder / "serial.log"
            try:
                keep = time.time() - log_file.stat().st_mtime < LEFT_LOG_SECONDS
            except OSError:
                keep = False
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
                report.actions.append(f"{name}: folder removed (the instance is not on this node)")
                continue
            for entry in folder.iterdir():
                if entry.name == "serial.log":
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def converge(self, driver: ComputeDriver[Any], inst: InstanceDoc, virt: str) -> dict[str, Any]:
        name = inst.domain
        want = inst.power
        present = name in driver.list_instances()
        if want == "pending":  # its create task is still preparing volumes and ports
            return {"power_state": "nostate"}
        if want == "deleted":
            if present:
                driver.delete(name)
            self._forget(inst.kind, name)
            return {"power_state": "nostate", "removed": True}
        cut_off = inst.ha and self.liveness is not None and not self.liveness.fresh()
        if cut_off and want == "running" and (not present or driver.power_state(name) is not PowerState.RUNNING):
            # cut off from the cluster: the HA manager may be starting it elsewhere
            raise ComputeError(f"HA {inst.kind} not started: this node holds no fresh cluster lease "
                               f"({self.liveness.error or 'not renewed yet'})")
        if not present:
            driver.define(self.build(inst, virt))
        state = driver.power_state(name)
        seen: dict[str, Any] = {}
        if want == "running" and self.power.get(inst.id, inst.observed.power_state) == "running" \
                and state is not PowerState.RUNNING:
            # It stopped by itself (crash, guest shutdown, OOM): say so, then restart it.
            self.crashes[inst.id] = self.crashes.get(inst.id, 0) + 1
            seen["last_unexpected_stop"] = {"state": str(state), "time": datetime.now(UTC).isoformat()}
            log.warning("instance stopped by itself; restarting", extra={"instance": name, "state": str(state)})
        if want == "running":
            if state is PowerState.PAUSED:
                driver.resume(name)
            elif state is not PowerState.RUNNING:
                if self._may_restart(inst.id, bool(seen)):
                    if inst.kind == "vm":  # a daemon restart may have taken the VM group's access away
                        self.access.grant(self.vm_specs.get(name) or self.build(inst, virt))  # type: ignore[arg-type]
                    driver.start(name)
            elif inst.reboots > inst.observed.reboots_done:
                driver.reboot(name)
        else:
            self.backoff.pop(inst.id, None)  # a deliberate stop ends a crash loop's backoff
        if want == "stopped" and state in (PowerState.RUNNING, PowerState.PAUSED):
            driver.stop(name, timeout=inst.stop_timeout)
        elif want == "paused" and state is PowerState.RUNNING:
            driver.pause(name)
        state = driver.power_state(name)
        consoles = [{"kind": c.kind, "path": c.path, "host": c.host, "port": c.port} for c in driver.consoles(name)]
        pinned = list(self.pins.get(inst.id, inst.observed.pinned_cpus))
        return {"power_state": str(state), "domain": name, "consoles": consoles, "reboots_done": inst.reboots,
                "error": None, "pinned_cpus": pinned, **seen}

    def stage(self, inst: InstanceDoc) -> str | None:
        """The files an instance's process opens on this node: its image's files, its
        folder and (VMs with cloud-init or NICs) its seed ISO, whose path is returned."""
        image = inst.image
        if image is None:
            raise InstanceNotFound("its image is gone")
        try:
            imagefiles.ensure_local(self.settings, image.blobs)
        except imagefiles.ImageFileMissing as exc:
            raise InstanceNotFound(f"image '{image.name}': {exc}")
        workdir = self.settings.instances_dir / inst.domain
        workdir.mkdir(parents=True, exist_ok=True)
        fresh_log(workdir / "serial.log")  # a migration's destination QEMU: virtlogd opens it too
        if inst.kind == "vm" and (inst.user_data is not None or inst.nics):
            return write_seed_iso(CloudInitSeed(instance_id=inst.id, hostname=inst.name,
                                                user_data=inst.user_data or "#cloud-config\n{}\n"),
                                  str(workdir / "seed.iso"))
        return None

    def build(self, inst: InstanceDoc, virt: str) -> VmSpec | ContainerSpec:
        seed = self.stage(inst)
        image = inst.image
        assert image is not None  # stage refused otherwise
        name = inst.domain
        workdir = self.settings.instances_dir / name
        qos = QosClass(inst.qos_class)
        memory_mib = max(16, inst.memory_bytes // MIB)
        placement = None
        if qos is QosClass.GUARANTEED:
            placement = self.pin(inst, int(-(-inst.cpu // 1)))
        if inst.kind == "vm":
            disks = tuple(volume_disk(d, self._nbd_client) for d in inst.disks)
            if seed is not None:
                disks += (DiskSpec(FileSource(seed), device="cdrom", readonly=True),)
            nics = tuple(NicSpec(mac=n.mac, bridge=self.names.bridge(n.vni), tap=port_ifname("vm", n.port_id),
                                 mtu=n.mtu) for n in inst.nics)
            kernel_boot = None
            if image.format != "disk":
                if not image.kernel:
                    raise InstanceNotFound(f"image '{image.name}' has no kernel")
                kernel_boot = KernelBoot(kernel=image.kernel, initrd=image.initrd,
                                         cmdline=" ".join(filter(None, (image.cmdline or "console=ttyS0",
                                                                       inst.kernel_args))))
            spec = VmSpec(
                disks=disks, nics=nics, name=name, vcpus=int(inst.cpu), memory_mib=memory_mib, uuid=inst.id,
                consoles=Consoles(serial_log=str(workdir / "serial.log"),
                                  serial_socket=str(workdir / "serial.sock"), vnc_socket=str(workdir / "vnc.sock")),
                kernel_boot=kernel_boot, qos_class=qos, placement=placement, virt_type=VirtType(self._virt(virt)),
                run_as=self.access.label(workdir),
            )
            self.access.grant(spec)
            self.vm_specs[name] = spec
            return spec
        if not image.archive:
            raise InstanceNotFound(f"image '{image.name}' has no OCI archive")
        command = tuple(inst.command or image.command or ["/bin/sh"])
        return ContainerSpec(
            name=name, image=image.archive, command=command, vcpus=inst.cpu,
            memory_mib=max(4, memory_mib), qos_class=qos, env=tuple(sorted(inst.env.items())), tty=inst.tty,
            hostname=inst.name, isolation=inst.isolation, nics=tuple(self._container_nic(n) for n in inst.nics),
            block_volumes=tuple(block_volume(d, self._nbd_client) for d in inst.disks),
        )

    def _nbd_client(self) -> Path:
        """This node's NBD client certificate (for ``nbds://`` volumes), issued afresh."""
        return nbd_client_tls(self.settings.pki_dir, self.settings.nbd_client_dir, self.settings.node_name)

    def _forget(self, kind: str, name: str) -> None:
        """A VM removed from this node gives its uid back."""
        if kind == "vm":
            self.vm_specs.pop(name, None)
            self.access.release(self.settings.instances_dir / name)

    def _may_restart(self, iid: str, crashed: bool) -> bool:
        """Crash-looping instances are restarted with a growing delay (1 s … 60 s), as
        Kubernetes does; a first start or a stable instance goes at once."""
        now = time.monotonic()
        due, delay, started = self.backoff.get(iid, (0.0, 0.0, 0.0))
        if not crashed and not delay:
            self.backoff[iid] = (0.0, 0.0, now)
            return True
        if now < due:
            return False
        if now - started > BACKOFF_RESET:
            delay = 0.0
        delay = min(BACKOFF_MAX, max(1.0, delay * 2))
        self.backoff[iid] = (now + delay, delay, now)
        return True

    def _container_nic(self, nic: Nic) -> ContainerNic:
        v4 = next((ip for ip in nic.ips if ":" not in ip.address), None)
        return ContainerNic(mac=nic.mac, bridge=self.names.bridge(nic.vni),
                            host_dev=port_ifname("container", nic.port_id),
                            address=f"{v4.address}/{v4.prefix}" if v4 else None,
                            gateway=v4.gateway if v4 else None)

    def pin(self, inst: InstanceDoc, count: int) -> Placement:
        """Dedicated host CPUs in the NUMA node the scheduler claimed, not used by
        another guaranteed instance here."""
        cell = inst.numa_cell or 0
        cpus = _cpulist(Path(f"/sys/devices/system/node/node{cell}/cpulist")) or list(range(os.cpu_count() or 1))
        free = [c for c in cpus if c not in self.pinned][:count]
        if len(free) < count:
            raise InsufficientResources(f"NUMA node {cell} has {len(free)} unpinned CPUs, {count} needed")
        self.pinned.update(free)
        self.pins[inst.id] = free
        return Placement(host_cpus=tuple(free), numa_nodes=(cell,))

    def _virt(self, inventory_virt: str) -> str:
        return inventory_virt if self.settings.virt_type == "auto" else self.settings.virt_type

    def report(self, observed: dict[str, dict[str, Any]], report: Any) -> None:
        """Write observed state back, each row under its lock (in id order): the power
        state, the status keys seen, crashes seen since the last report added to the
        count the row holds now, and ``observed_generation`` = the generation this pass
        acted on (never the one a task wrote meanwhile). Only rows whose observation
        changed get an event."""
        if not observed:
            return
        with session_scope(self.settings.resolved_database_url) as session:
            for row in session.scalars(select(Instance).where(Instance.id.in_(observed)).order_by(Instance.id)):
                seen = dict(observed[row.id])
                power = seen.pop("power_state")
                acted_on = seen.pop("generation", None)
                crashes = self.crashes.get(row.id, 0)

                def patch(now: dict[str, Any], seen: dict[str, Any] = seen, n: int = crashes) -> dict[str, Any]:
                    return {**seen, "unexpected_stops": int(now.get("unexpected_stops", 0)) + n} if n else seen

                def generation(live: Instance, acted_on: int | None = acted_on) -> None:
                    if acted_on is not None:
                        live.observed_generation = max(live.observed_generation, acted_on)

                if KINDS[row.kind].write_status(session, row, patch, columns={"power_state": power},
                                                change=generation):
                    report.actions.append(f"{row.kind} {row.name}: {power}")
        for iid in observed:  # committed: these crashes are counted
            self.crashes.pop(iid, None)
