"""The metrics sampler (Proxmox's pvestatd): every ``metrics_interval`` seconds the node's
counters (CPU, memory, network, disks) and those of every instance running here, written
atomically as Prometheus text, each sample with the time it was taken, to
``<data_dir>/metrics/node.prom``. This node's API appends that file to ``/metrics``, and
the Prometheus server of every member scrapes every member's ``/metrics``: the history
of any node or instance is on every node (see ``appliance/timeseries``).

Counters are what the kernel and the hypervisor count since boot or since an instance
started (they drop to zero when it restarts: Prometheus' ``rate()`` handles that); the
rates and percentages are computed when the graphs are read."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.agent import inventory
from appliance.services.desired_state import InstanceDoc, NodeDocument
from appliance.settings import Settings
from compute.driver import ComputeDriver, InstanceStats
from compute.errors import ComputeError, NotSupported

log = logging.getLogger("cairn.agent.sampler")


@dataclass(frozen=True)
class NodeCounters:
    cpus: int
    cpu_busy_seconds: float
    memory_bytes: int
    memory_used_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    disk_read_ops: int
    disk_write_ops: int


def node_counters() -> NodeCounters:
    """This node's counters: CPU time not idle, memory not available, and the bytes and
    operations of its own NICs and whole disks (not bridges, taps, partitions)."""
    cpu = psutil.cpu_times()
    idle = cpu.idle + getattr(cpu, "iowait", 0.0)
    # guest time is counted in user time already
    busy = sum(cpu) - idle - getattr(cpu, "guest", 0.0) - getattr(cpu, "guest_nice", 0.0)
    mem = psutil.virtual_memory()
    nics = {n: c for n, c in psutil.net_io_counters(pernic=True).items() if inventory.is_node_nic(n)}
    disks = {d: c for d, c in (psutil.disk_io_counters(perdisk=True) or {}).items()
             if inventory.is_node_disk(d) and (inventory.SYS / "block" / d).exists()}
    return NodeCounters(
        cpus=psutil.cpu_count() or 1, cpu_busy_seconds=busy, memory_bytes=mem.total,
        memory_used_bytes=mem.total - mem.available,
        net_rx_bytes=sum(c.bytes_recv for c in nics.values()), net_tx_bytes=sum(c.bytes_sent for c in nics.values()),
        disk_read_bytes=sum(c.read_bytes for c in disks.values()),
        disk_write_bytes=sum(c.write_bytes for c in disks.values()),
        disk_read_ops=sum(c.read_count for c in disks.values()),
        disk_write_ops=sum(c.write_count for c in disks.values()),
    )


# (metric name without _total, help, attribute): the same names for nodes and instances
COUNTERS = (
    ("network_receive_bytes", "Bytes received over the network", "net_rx_bytes"),
    ("network_transmit_bytes", "Bytes sent over the network", "net_tx_bytes"),
    ("disk_read_bytes", "Bytes read from disks", "disk_read_bytes"),
    ("disk_written_bytes", "Bytes written to disks", "disk_write_bytes"),
    ("disk_reads", "Read operations on disks", "disk_read_ops"),
    ("disk_writes", "Write operations on disks", "disk_write_ops"),
)


def families(node: str, at: float, counters: NodeCounters,
             instances: Iterable[tuple[InstanceDoc, InstanceStats]]) -> list[Metric]:
    """The samples of one pass as metric families, every sample stamped ``at`` (pure)."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        fam = GaugeMetricFamily(name, doc, labels=labels)
        out.append(fam)
        return fam

    def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        fam = CounterMetricFamily(name, doc, labels=labels)
        out.append(fam)
        return fam

    gauge("cairn_node_cpus", "CPUs (threads) of the node", ["node"]).add_metric([node], counters.cpus, timestamp=at)
    counter("cairn_node_cpu_busy_seconds", "CPU seconds not idle, summed over the node's CPUs",
            ["node"]).add_metric([node], counters.cpu_busy_seconds, timestamp=at)
    gauge("cairn_node_memory_bytes", "Memory of the node",
          ["node"]).add_metric([node], counters.memory_bytes, timestamp=at)
    gauge("cairn_node_memory_used_bytes", "Memory of the node in use (not available)",
          ["node"]).add_metric([node], counters.memory_used_bytes, timestamp=at)
    for name, doc, attr in COUNTERS:
        counter(f"cairn_node_{name}", f"{doc} (the node's own NICs and disks)",
                ["node"]).add_metric([node], getattr(counters, attr), timestamp=at)

    labels = ["node", "kind", "id", "name"]
    rows = list(instances)
    vcpus = gauge("cairn_instance_vcpus", "vCPUs (VMs) or CPU limit (containers) of the instance", labels)
    cpu = counter("cairn_instance_cpu_seconds", "CPU seconds the instance used since it started", labels)
    mem = gauge("cairn_instance_memory_bytes", "Memory the instance was given", labels)
    used = gauge("cairn_instance_memory_used_bytes",
                 "Memory in use inside the instance: a VM's guest MemTotal less MemAvailable as its virtio "
                 "balloon driver reports them (no sample when the guest reports nothing), a container's "
                 "cgroup working set", labels)
    host = gauge("cairn_instance_memory_host_bytes",
                 "Memory the instance holds on the host: a VM's QEMU resident set (guest RAM it touched plus "
                 "QEMU's own memory and TCG code cache, so it may exceed the memory given), a container's "
                 "cgroup working set", labels)
    io = [(counter(f"cairn_instance_{name}", f"{doc} since the instance started", labels), attr)
          for name, doc, attr in COUNTERS]
    for inst, st in rows:
        values = [node, inst.kind, inst.id, inst.name]
        vcpus.add_metric(values, inst.cpu, timestamp=at)
        cpu.add_metric(values, st.cpu_seconds, timestamp=at)
        mem.add_metric(values, inst.memory_bytes, timestamp=at)
        host.add_metric(values, st.memory_bytes, timestamp=at)
        if st.memory_used_bytes is not None:
            used.add_metric(values, st.memory_used_bytes, timestamp=at)
        for fam, attr in io:
            fam.add_metric(values, getattr(st, attr), timestamp=at)
    return out


def exposition(metrics: list[Metric]) -> bytes:
    """Prometheus text format of ``metrics``."""

    class _Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


class Sampler:
    """Samples every ``settings.metrics_interval`` seconds in a thread of its own (the
    agent's passes come at irregular times). ``document`` gives the desired-state
    document (which instance a domain is), ``drivers`` the compute drivers that are up."""

    def __init__(self, settings: Settings, document: Callable[[], NodeDocument | None],
                 drivers: Callable[[], dict[str, ComputeDriver[Any]]]) -> None:
        self.settings = settings
        self.document = document
        self.drivers = drivers
        self._stop = threading.Event()
        self._warned: set[str] = set()

    def instance_stats(self) -> list[tuple[InstanceDoc, InstanceStats]]:
        doc = self.document()
        if doc is None:
            return []
        by_domain: dict[tuple[str, str], InstanceDoc] = {(i.kind, i.domain): i for i in doc.instances}
        out: list[tuple[InstanceDoc, InstanceStats]] = []
        for kind, driver in self.drivers().items():
            try:
                stats = driver.stats()
            except (NotSupported, ComputeError) as exc:
                if kind not in self._warned:
                    log.warning("no instance statistics", extra={"kind": kind, "error": str(exc)[:300]})
                    self._warned.add(kind)
                continue
            self._warned.discard(kind)
            out.extend((by_domain[(kind, dom)], st) for dom, st in stats.items() if (kind, dom) in by_domain)
        return out

    def sample_once(self) -> bytes:
        """One sample of everything, written to ``settings.metrics_file``; returns the text."""
        at = time.time()
        data = exposition(families(self.settings.node_name, at, node_counters(), self.instance_stats()))
        write_atomically(self.settings.metrics_file, data)
        return data

    def run(self) -> None:
        interval = max(1.0, self.settings.metrics_interval)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample_once()
            except Exception:
                log.exception("sampling failed")
            self._stop.wait(max(0.1, interval - (time.monotonic() - started)))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="cairn-agent-sampler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
