"""Pure placement: choose a node for a workload from in-memory host states.

Filters: node Ready and schedulable, label selector, CPU and memory capacity, NUMA
fit for the guaranteed QoS class, affinity / anti-affinity groups. Weights: spread
(most free memory first) or pack (least free memory that fits). Hosts sit in a
sorted list keyed by free memory, so a placement is O(log n) in the common case
and 10,000 placements over 1,000 nodes take well under a second."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from sortedcontainers import SortedList

QoS = Literal["guaranteed", "burstable", "best-effort"]
Strategy = Literal["spread", "pack"]
GIB = 1 << 30


@dataclass
class NumaCell:
    cpus: int
    memory_bytes: int
    cpus_used: int = 0
    memory_used: int = 0

    def fits(self, cpus: int, memory: int) -> bool:
        return self.cpus - self.cpus_used >= cpus and self.memory_bytes - self.memory_used >= memory


@dataclass
class HostState:
    """What the scheduler knows of a node: capacity, use, labels, groups present."""

    name: str
    cpus: int
    memory_bytes: int
    cpu_used: float = 0.0  # in vCPU units after overcommit
    memory_used: int = 0
    ready: bool = True
    schedulable: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    numa: list[NumaCell] = field(default_factory=list)
    groups: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not self.numa:
            self.numa = [NumaCell(self.cpus, self.memory_bytes)]

    @property
    def free_memory(self) -> int:
        return self.memory_bytes - self.memory_used


@dataclass(frozen=True)
class Request:
    """What a workload asks for (the same shape for VMs and containers)."""

    cpus: float
    memory_bytes: int
    qos: QoS = "burstable"
    group: str | None = None
    group_policy: Literal["affinity", "anti-affinity"] | None = None
    node_selector: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Placement:
    host: str
    cpu_units: float
    memory_bytes: int
    numa_cell: int | None


class NoValidHost(Exception):
    """No node passes the filters; ``reasons`` counts why, per filter."""

    def __init__(self, request: Request, reasons: dict[str, int], hosts: int) -> None:
        self.reasons = reasons
        parts = [f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        super().__init__(
            f"no node can run {request.cpus:g} CPU / {request.memory_bytes / GIB:.2f} GiB "
            f"({request.qos}) among {hosts} node(s): " + ("; ".join(parts) or "there are no nodes")
        )


class Scheduler:
    """Places requests on hosts and keeps the in-memory view up to date."""

    def __init__(self, hosts: list[HostState], strategy: Strategy = "spread",
                 cpu_ratio: float = 4.0) -> None:
        self.strategy = strategy
        self.cpu_ratio = cpu_ratio
        self.hosts = {h.name: h for h in hosts}
        self._sorted: SortedList = SortedList(
            (h.free_memory, h.name) for h in hosts if h.ready and h.schedulable
        )
        self._group_hosts: dict[str, set[str]] = {}
        for h in hosts:
            for g in h.groups:
                self._group_hosts.setdefault(g, set()).add(h.name)

    def cpu_units(self, req: Request) -> float:
        """Guaranteed CPUs are whole dedicated threads; others share with overcommit."""
        return float(int(-(-req.cpus // 1))) * self.cpu_ratio if req.qos == "guaranteed" else req.cpus

    def why_not(self, host: HostState, req: Request) -> str | None:
        """The first filter the host fails, or None if it passes them all."""
        if not host.ready:
            return "node(s) NotReady"
        if not host.schedulable:
            return "node(s) cordoned"
        for key, value in req.node_selector:
            if host.labels.get(key) != value:
                return "node(s) without the requested labels"
        if host.free_memory < req.memory_bytes:
            return "node(s) short of memory"
        if host.cpus * self.cpu_ratio - host.cpu_used < self.cpu_units(req):
            return "node(s) short of CPU"
        if req.qos == "guaranteed" and self._numa_cell(host, req) is None:
            return "node(s) without a NUMA node that fits the guaranteed workload"
        if req.group and req.group_policy:
            members = self._group_hosts.get(req.group, set())
            if req.group_policy == "anti-affinity" and host.name in members:
                return f"node(s) already running a member of anti-affinity group '{req.group}'"
            if req.group_policy == "affinity" and members and host.name not in members:
                return f"node(s) not running the affinity group '{req.group}'"
        return None

    @staticmethod
    def _numa_cell(host: HostState, req: Request) -> int | None:
        cpus = int(-(-req.cpus // 1))
        for i, cell in enumerate(host.numa):
            if cell.fits(cpus, req.memory_bytes):
                return i
        return None

    def _candidates(self, req: Request):  # type: ignore[no-untyped-def]
        if self.strategy == "spread":
            yield from reversed(self._sorted)
        else:
            start = self._sorted.bisect_left((req.memory_bytes, ""))
            yield from self._sorted.islice(start)

    def select(self, req: Request) -> Placement:
        """Choose a host without changing state (raises NoValidHost with reasons)."""
        for free, name in self._candidates(req):
            if free < req.memory_bytes:
                break  # sorted by free memory: nothing further fits
            host = self.hosts[name]
            if self.why_not(host, req) is None:
                cell = self._numa_cell(host, req) if req.qos == "guaranteed" else None
                return Placement(name, self.cpu_units(req), req.memory_bytes, cell)
        reasons = Counter(self.why_not(h, req) for h in self.hosts.values())
        reasons.pop(None, None)
        raise NoValidHost(req, dict(reasons), len(self.hosts))  # type: ignore[arg-type]

    def consume(self, placement: Placement, req: Request) -> None:
        """Account a placement in the in-memory view."""
        host = self.hosts[placement.host]
        listed = host.ready and host.schedulable
        if listed:
            self._sorted.remove((host.free_memory, host.name))
        host.cpu_used += placement.cpu_units
        host.memory_used += placement.memory_bytes
        if placement.numa_cell is not None:
            cell = host.numa[placement.numa_cell]
            cell.cpus_used += int(-(-req.cpus // 1))
            cell.memory_used += req.memory_bytes
        if req.group:
            host.groups[req.group] += 1
            self._group_hosts.setdefault(req.group, set()).add(host.name)
        if listed:
            self._sorted.add((host.free_memory, host.name))

    def place(self, req: Request) -> Placement:
        placement = self.select(req)
        self.consume(placement, req)
        return placement
