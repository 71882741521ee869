"""The agent's instance reconciler (KubeVirt's virt-handler): makes the compute
drivers on this node match the instances the database places here, and reports
what it observes (``power_state``, console paths) back."""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select

from appliance.agent.drivers import DriverSet
from appliance.agent.network import port_ifname
from appliance.db.engine import session_scope
from appliance.db.models import Claim, Image, Instance, Node
from appliance.services.instances import KINDS
from appliance.settings import Settings
from compute.cloudinit import CloudInitSeed, write_seed_iso
from compute.driver import ComputeDriver
from compute.errors import ComputeError, HypervisorError, InstanceNotFound, InsufficientResources
from compute.spec import (
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
    VirtType,
    VmSpec,
)
from network.model import HostNames

log = logging.getLogger("cairn.agent.instances")
MIB = 1 << 20
BACKOFF_MAX = 60.0
BACKOFF_RESET = 120.0  # running this long counts as stable again
ORPHAN = re.compile(r"cairn-[a-z0-9][a-z0-9-]*-[0-9a-f]{8}")  # what domain_name() makes


def domain_name(row: Instance) -> str:
    """The name on the node: readable, unique across projects, and marked as Cairn's
    (only such names are ever removed as orphans; a hand-made domain is left alone)."""
    return f"cairn-{row.name[:48]}-{row.id[:8]}"


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



def volume_disk(disk: dict[str, Any]) -> DiskSpec:
    """A volume as a virtio disk: its NBD export over the local unix socket when the
    pool is served on this node, else over TCP; the serial names it inside the guest
    (/dev/disk/by-id/virtio-<volume>)."""
    uri = disk["export"]
    sock = parse_qs(urlsplit(uri).query).get("socket", [""])[0]
    if sock and not Path(sock).exists() and disk.get("exports", {}).get("tcp"):
        uri = disk["exports"]["tcp"]
    serial = re.sub(r"[^A-Za-z0-9_-]", "-", disk["volume"])[:20]
    return DiskSpec(NbdSource(uri), serial=serial)

class InstanceReconciler:
    """One pass: for each instance placed on this node, converge define / power."""

    def __init__(self, settings: Settings, drivers: dict[str, ComputeDriver[Any]] | DriverSet) -> None:
        self.settings = settings
        self.names = HostNames(settings.stack_tag)
        self.driver_source = drivers
        self.drivers: dict[str, ComputeDriver[Any]] = drivers if isinstance(drivers, dict) else {}
        self.cells: dict[str, int | None] = {}
        self.pinned: set[int] = set()
        self.pins: dict[str, list[int]] = {}
        self.backoff: dict[str, tuple[float, float, float]] = {}  # id -> (next start, delay, last start)

    def __call__(self, agent: Any, report: Any) -> None:
        url = self.settings.resolved_database_url
        if isinstance(self.driver_source, DriverSet):
            self.drivers = self.driver_source.get()
            report.errors.extend(f"driver {k}: {v}" for k, v in self.driver_source.errors.items())
        with session_scope(url, readonly=True) as session:
            node = session.scalar(select(Node).where(Node.name == self.settings.node_name))
            if node is None:
                return
            virt = (node.status or {}).get("inventory", {}).get("virt_type", "qemu")
            rows = list(session.scalars(select(Instance).where(Instance.node_id == node.id)))
            # A domain arriving by live migration is not "ours" in the database yet.
            moving = {domain_name(r) for r in session.scalars(
                select(Instance).where(Instance.task_state == "migrating"))}
            by_name = {(i.project_id, i.name): i for i in session.scalars(select(Image))}
            self.cells = {c.workload_id: c.numa_cell for c in session.scalars(
                select(Claim).where(Claim.node_id == node.id))}
            self.pinned = {cpu for r in rows if r.power_state != "nostate"
                           for cpu in (r.status or {}).get("pinned_cpus", [])}
        observed: dict[str, dict[str, Any]] = {}
        self.remove_orphans({domain_name(r) for r in rows} | moving, report)
        for row in rows:
            driver = self.drivers.get(row.kind)
            if driver is None or row.task_state == "migrating":
                continue  # a migration moves it under us: only its task acts on it
            try:
                observed[row.id] = {**self.converge(driver, row, by_name, virt), "generation": row.generation}
            except HypervisorError as exc:
                # the connection may be gone (daemon restarted): rebuild it next pass
                if isinstance(self.driver_source, DriverSet):
                    self.driver_source.drop(row.kind)
                report.errors.append(f"{row.kind} {row.name}: {exc}")
            except ComputeError as exc:
                report.errors.append(f"{row.kind} {row.name}: {exc}")
                observed[row.id] = {"power_state": "error", "error": str(exc), "generation": row.generation}
        self.report(observed, report)

    def remove_orphans(self, wanted: set[str], report: Any) -> None:
        """Instances this node runs that the database no longer places here (deleted
        while the node was away, or moved to another node) are removed."""
        for kind, driver in self.drivers.items():
            for name in driver.list_instances():
                if name not in wanted and ORPHAN.fullmatch(name):
                    log.warning("removing an instance no longer placed here", extra={"instance": name})
                    driver.delete(name)
                    report.actions.append(f"{kind} {name}: removed (not placed on this node)")

    def converge(self, driver: ComputeDriver[Any], row: Instance, images: dict[tuple[str, str], Image],
                 virt: str) -> dict[str, Any]:
        name = domain_name(row)
        want = (row.spec or {}).get("power", "running")
        present = name in driver.list_instances()
        if want == "pending":  # its create task is still preparing volumes and ports
            return {"power_state": "nostate"}
        if want == "deleted":
            if present:
                driver.delete(name)
            return {"power_state": "nostate", "removed": True}
        if not present:
            driver.define(self.build(row, images, virt))
        state = driver.power_state(name)
        reboots = int((row.spec or {}).get("reboots", 0))
        done = int((row.status or {}).get("reboots_done", 0))
        seen: dict[str, Any] = {}
        if want == "running" and row.power_state == "running" and state is not PowerState.RUNNING:
            # It stopped by itself (crash, guest shutdown, OOM): say so, then restart it.
            seen["crashed"] = True
            seen["last_unexpected_stop"] = {"state": str(state), "time": datetime.now(UTC).isoformat()}
            log.warning("instance stopped by itself; restarting", extra={"instance": name, "state": str(state)})
        if want == "running":
            if state is PowerState.PAUSED:
                driver.resume(name)
            elif state is not PowerState.RUNNING:
                if self._may_restart(row.id, bool(seen)):
                    driver.start(name)
            elif reboots > done:
                driver.reboot(name)
        else:
            self.backoff.pop(row.id, None)  # a deliberate stop ends a crash loop's backoff
        if want == "stopped" and state in (PowerState.RUNNING, PowerState.PAUSED):
            driver.stop(name, timeout=float((row.spec or {}).get("stop_timeout", 30)))
        elif want == "paused" and state is PowerState.RUNNING:
            driver.pause(name)
        state = driver.power_state(name)
        consoles = [{"kind": c.kind, "path": c.path, "host": c.host, "port": c.port} for c in driver.consoles(name)]
        pinned = list(self.pins.get(row.id, (row.status or {}).get("pinned_cpus", [])))
        return {"power_state": str(state), "domain": name, "consoles": consoles, "reboots_done": reboots,
                "error": None, "pinned_cpus": pinned, **seen}

    def build(self, row: Instance, images: dict[tuple[str, str], Image], virt: str) -> VmSpec | ContainerSpec:
        spec = row.spec or {}
        image = images.get((row.project_id, spec.get("image", "")))
        if image is None:
            raise InstanceNotFound(f"image '{spec.get('image')}' is gone")
        name = domain_name(row)
        workdir = self.settings.instances_dir / name
        workdir.mkdir(parents=True, exist_ok=True)
        qos = QosClass(spec.get("qos_class", "burstable"))
        memory_mib = max(16, int(spec["memory_bytes"]) // MIB)
        placement = None
        if qos is QosClass.GUARANTEED:
            placement = self.pin(row, int(-(-float(spec["cpu"]) // 1)))
        if row.kind == "vm":
            disks = tuple(volume_disk(d) for d in (row.status or {}).get("volumes", []))
            if spec.get("user_data") is not None or (row.status or {}).get("ports"):
                seed = write_seed_iso(CloudInitSeed(instance_id=row.id, hostname=row.name,
                                                    user_data=spec.get("user_data") or "#cloud-config\n{}\n"),
                                      str(workdir / "seed.iso"))
                disks += (DiskSpec(FileSource(seed), device="cdrom", readonly=True),)
            nics = tuple(NicSpec(mac=p["mac"], bridge=self.names.bridge(p["vni"]), tap=port_ifname("vm", p["id"]),
                                 mtu=p.get("mtu") or None) for p in (row.status or {}).get("ports", []))
            return VmSpec(
                disks=disks, nics=nics, name=name, vcpus=int(spec["cpu"]), memory_mib=memory_mib, uuid=row.id,
                consoles=Consoles(serial_log=str(workdir / "serial.log"),
                                  serial_socket=str(workdir / "serial.sock"), vnc_socket=str(workdir / "vnc.sock")),
                kernel_boot=None if image.spec.get("format") == "disk" else KernelBoot(
                    kernel=image.spec["kernel"], initrd=image.spec.get("initrd"),
                    cmdline=image.spec.get("cmdline", "console=ttyS0")),
                qos_class=qos, placement=placement, virt_type=VirtType(self._virt(virt)),
            )
        command = tuple(spec.get("command") or image.spec.get("command") or ["/bin/sh"])
        return ContainerSpec(
            name=name, image=image.spec["archive"], command=command, vcpus=float(spec["cpu"]),
            memory_mib=max(4, memory_mib), qos_class=qos,
            env=tuple(sorted((spec.get("env") or {}).items())), tty=bool(spec.get("tty", False)),
            hostname=row.name, isolation=spec.get("isolation", "container"),
            nics=tuple(self._container_nic(p) for p in (row.status or {}).get("ports", [])),
        )

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

    def _container_nic(self, port: dict[str, Any]) -> ContainerNic:
        v4 = next((ip for ip in port.get("ips", []) if ":" not in ip["address"]), None)
        return ContainerNic(mac=port["mac"], bridge=self.names.bridge(port["vni"]),
                            host_dev=port_ifname("container", port["id"]),
                            address=f"{v4['address']}/{v4['prefix']}" if v4 else None,
                            gateway=v4.get("gateway") if v4 else None)

    def pin(self, row: Instance, count: int) -> Placement:
        """Dedicated host CPUs in the NUMA node the scheduler claimed, not used by
        another guaranteed instance here."""
        cell = self.cells.get(row.id) or 0
        cpus = _cpulist(Path(f"/sys/devices/system/node/node{cell}/cpulist")) or list(range(os.cpu_count() or 1))
        free = [c for c in cpus if c not in self.pinned][:count]
        if len(free) < count:
            raise InsufficientResources(f"NUMA node {cell} has {len(free)} unpinned CPUs, {count} needed")
        self.pinned.update(free)
        self.pins[row.id] = free
        return Placement(host_cpus=tuple(free), numa_nodes=(cell,))

    def _virt(self, inventory_virt: str) -> str:
        return inventory_virt if self.settings.virt_type == "auto" else self.settings.virt_type

    def report(self, observed: dict[str, dict[str, Any]], report: Any) -> None:
        """Write observed state back, each row under its lock (in id order): the power
        state, the status keys seen, a crash as +1 on the count the row holds now, and
        ``observed_generation`` = the generation this pass acted on (never the one a
        task wrote meanwhile). Only rows whose observation changed get an event."""
        if not observed:
            return
        with session_scope(self.settings.resolved_database_url) as session:
            for row in session.scalars(select(Instance).where(Instance.id.in_(observed)).order_by(Instance.id)):
                seen = dict(observed[row.id])
                power = seen.pop("power_state")
                acted_on = seen.pop("generation", None)
                crashed = seen.pop("crashed", False)

                def patch(now: dict[str, Any], seen: dict[str, Any] = seen, crashed: bool = crashed) -> dict[str, Any]:
                    return {**seen, "unexpected_stops": int(now.get("unexpected_stops", 0)) + 1} if crashed else seen

                def generation(live: Instance, acted_on: int | None = acted_on) -> None:
                    if acted_on is not None:
                        live.observed_generation = max(live.observed_generation, acted_on)

                if KINDS[row.kind].write_status(session, row, patch, columns={"power_state": power},
                                                change=generation):
                    report.actions.append(f"{row.kind} {row.name}: {power}")
