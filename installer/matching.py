"""Fit an answer to a machine: which node it is, which disks and NICs its filters mean.

Pure functions from (answer, hardware) to an ``InstallPlan``; nothing here touches a
device. A filter matching no disk or several is an error that lists every disk seen,
so the person fixing the answer sees what the machine has.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from installer.answer import AnswerFile, DiskFilter, NodeAnswer, NodeEntry
from installer.errors import HardwareMismatch
from installer.hardware import Disk, Hardware, Nic

ANSWER_LABEL = "CAIRN-ANS"


@dataclass(frozen=True)
class InstallPlan:
    """What the installer will do on this machine, decided before any disk is touched."""

    entry: NodeEntry
    install_disk: Disk
    data_disks: list[Disk]
    nics: list[Nic]  # the management NICs, in the answer's order
    wipe: list[Disk] = field(default_factory=list)  # chosen disks that hold data (allowed by wipe = true)

    @property
    def answer(self) -> NodeAnswer:
        return self.entry.answer

    def summary(self) -> dict[str, Any]:
        """A JSON-able account of the decisions (golden-tested, printed before installing)."""
        a = self.answer
        return {
            "node": self.entry.label,
            "hostname": a.hostname,
            "install_disk": self.install_disk.path,
            "data_disks": [d.path for d in self.data_disks],
            "wipe": [d.path for d in self.wipe],
            "nics": [f"{n.name} {n.mac}" for n in self.nics],
            "network": {"mode": a.network.mode, "address": str(a.network.address) if a.network.address else None,
                        "bond": a.network.bond.mode if a.network.bond else None, "vlan": a.network.vlan,
                        "mtu": a.network.mtu},
            "cluster": a.cluster.mode if a.cluster else "standalone",
        }


def candidate_problem(disk: Disk) -> str | None:
    """Why a disk can never be installed to or used for data, or None."""
    if disk.mounted:
        return f"mounted at {', '.join(disk.mounted)}"
    if ANSWER_LABEL in disk.labels:
        return f"the {ANSWER_LABEL} answer volume"
    if disk.read_only:
        return "read-only"
    if disk.size == 0:
        return "no medium"
    return None


def disk_matches(f: DiskFilter, disk: Disk) -> bool:
    if f.size_min is not None and disk.size < f.size_min:
        return False
    if f.size_max is not None and disk.size > f.size_max:
        return False
    if f.model is not None and not fnmatch.fnmatchcase(disk.model.lower(), f.model.lower()):
        return False
    if f.serial is not None and not fnmatch.fnmatchcase(disk.serial.lower(), f.serial.lower()):
        return False
    return f.rotational is None or f.rotational == disk.rotational


def disks_seen(hw: Hardware, notes: dict[str, str] | None = None) -> str:
    """Every disk of the machine, one per line, with why it is not a candidate."""
    if not hw.disks:
        return "\n      (no disks seen)"
    lines = []
    for d in hw.disks:
        why = (notes or {}).get(d.path) or candidate_problem(d)
        lines.append(f"\n      {d.describe()}" + (f" [not a candidate: {why}]" if why else ""))
    return "".join(lines)


def nics_seen(hw: Hardware) -> str:
    return "; NICs seen: " + (", ".join(n.describe() for n in hw.nics) or "none")


def select_node(answer: AnswerFile, hw: Hardware) -> NodeEntry:
    """The node of the file this machine is: by one of its NICs' MAC or its SMBIOS serial."""
    if answer.single:
        return answer.nodes[0]
    macs = {n.mac for n in hw.nics}
    found = [e for e in answer.nodes if e.match is not None
             and ((e.match.mac is not None and e.match.mac in macs)
                  or (e.match.serial is not None and e.match.serial == hw.system.serial))]
    if len(found) == 1:
        return found[0]
    me = f"this machine has serial {hw.system.serial or '(none)'!r}" + nics_seen(hw)
    if not found:
        keys = ", ".join(e.label for e in answer.nodes)
        raise HardwareMismatch([f"node: no [[node]] matches this machine ({keys}); {me}"])
    raise HardwareMismatch([f"node: {len(found)} [[node]] tables match this machine "
                            f"({', '.join(e.label for e in found)}); {me}"])


def _where(entry: NodeEntry, key: str) -> str:
    return key if entry.match is None else f"node[{entry.index}].{key}"


def plan_install(answer: AnswerFile, hw: Hardware) -> InstallPlan:
    """Decide everything or raise HardwareMismatch listing every problem at once."""
    entry = select_node(answer, hw)
    a = entry.answer
    problems: list[str] = []

    nics: list[Nic] = []
    by_mac = {n.mac: n for n in hw.nics}
    key = "network.bond.macs" if a.network.bond else "network.mac"
    for mac in a.network.macs:
        if mac in by_mac:
            nics.append(by_mac[mac])
        else:
            problems.append(f"{_where(entry, key)}: no NIC has MAC {mac}{nics_seen(hw)}")

    candidates = [d for d in hw.disks if candidate_problem(d) is None]
    install: Disk | None = None
    found = [d for d in candidates if disk_matches(a.disks.install, d)]
    where = _where(entry, "disks.install")
    if len(found) == 1:
        install = found[0]
    else:
        verdict = "matches no disk" if not found else \
            f"matches {len(found)} disks ({', '.join(d.path for d in found)}); it must match exactly one"
        problems.append(f"{where} ({a.disks.install.describe()}) {verdict}; disks seen:{disks_seen(hw)}")

    data: list[Disk] = []
    taken: dict[str, str] = {}
    notes = {install.path: "the install disk"} if install else {}
    for i, f in enumerate(a.disks.data):
        where = _where(entry, f"disks.data[{i}]")
        found = [d for d in candidates if d is not install and disk_matches(f, d)]
        if len(found) != f.count:
            want = "1 disk" if f.count == 1 else f"{f.count} disks"
            got = "none" if not found else ", ".join(d.path for d in found)
            problems.append(f"{where} ({f.describe()}) must match {want}, matches {len(found)} ({got}); "
                            f"disks seen:{disks_seen(hw, notes)}")
            continue
        for d in found:
            if d.path in taken:
                problems.append(f"{where}: {d.path} is already chosen by {taken[d.path]}; filters must not overlap")
            taken[d.path] = where
        data += found

    wipe: list[Disk] = []
    chosen: list[tuple[Disk, DiskFilter, str]] = []
    if install:
        chosen.append((install, a.disks.install, _where(entry, "disks.install")))
    for i, data_filter in enumerate(a.disks.data):
        where = _where(entry, f"disks.data[{i}]")
        chosen += [(d, data_filter, where) for d in data if taken.get(d.path) == where]
    for disk, chosen_by, where in chosen:
        if disk.blank:
            continue
        if not chosen_by.wipe:
            problems.append(f"{where}: {disk.path} is not blank ({', '.join(disk.signatures or ['partitions'])}); "
                            f"set {where}.wipe = true to erase it")
        elif disk not in wipe:
            wipe.append(disk)
    if problems or install is None:
        raise HardwareMismatch(problems)
    return InstallPlan(entry=entry, install_disk=install, data_disks=data, nics=nics, wipe=wipe)
