"""Golden-file tests for build_domain_xml: one file per device combination.

Regenerate after an intended change with ``CAIRN_REGEN_GOLDEN=1``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import typing
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from compute.errors import InvalidSpec
from compute.libvirt_xml import build_domain_xml
from compute.spec import (
    ChannelSpec,
    Consoles,
    DiskSpec,
    FileSource,
    FilesystemShare,
    IoTune,
    KernelBoot,
    NbdSource,
    NicSpec,
    Placement,
    QosClass,
    RbdSource,
    VirtType,
    VmSpec,
)

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden"
UUID = "6f1c2b3a-0000-4000-8000-000000000001"
CONSOLES = Consoles(serial_log="/var/lib/cairn/vm1/serial.log", serial_socket="/run/cairn/vm1/serial.sock")


def vm(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(name="vm1", vcpus=1, memory_mib=256, consoles=CONSOLES, uuid=UUID)
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


CASES: dict[str, VmSpec] = {
    "minimal_pty_no_vnc": vm(consoles=Consoles(serial_log="/var/log/vm1.log", vnc=False)),
    "kernel_boot_tcg": vm(kernel_boot=KernelBoot("/boot/vmlinuz", "/boot/initrd.img", "console=ttyS0 quiet")),
    "kernel_boot_kvm": vm(virt_type=VirtType.KVM, kernel_boot=KernelBoot("/boot/vmlinuz")),
    "nbd_unix_disk": vm(disks=(DiskSpec(NbdSource("nbd+unix:///vol-1?socket=/run/cairn/nbd/vol-1.sock")),)),
    "nbd_tcp_disk_with_serial": vm(
        disks=(DiskSpec(NbdSource("nbd://10.0.0.5:10809/vol-2"), serial="vol-2"),)
    ),
    "rbd_disk_with_auth": vm(
        disks=(
            DiskSpec(
                RbdSource("rbd", "vol-3", monitors=("10.0.0.1:6789", "10.0.0.2:3300"), user="cairn",
                          secret_uuid="11111111-2222-4333-8444-555555555555"),
            ),
        )
    ),
    "rbd_disk_with_ceph_conf": vm(
        disks=(DiskSpec(RbdSource("cairn", "vol-4", config="/var/lib/cairn/ceph/ceph.conf"), serial="vol-4"),)
    ),
    "iotune_bytes_and_iops": vm(
        disks=(
            DiskSpec(NbdSource("nbd://h:1/a"), iotune=IoTune(read_bytes_sec=10_000_000, write_bytes_sec=5_000_000,
                                                             total_iops_sec=500)),
            DiskSpec(NbdSource("nbd://h:1/b"), readonly=True, iotune=IoTune(total_bytes_sec=1_000_000,
                                                                          read_iops_sec=100, write_iops_sec=50)),
        )
    ),
    "cloud_init_cdrom_and_disk": vm(
        disks=(
            DiskSpec(NbdSource("nbd+unix:///?socket=/s.sock")),
            DiskSpec(FileSource("/var/lib/cairn/vm1/seed.iso"), device="cdrom"),
        )
    ),
    "two_nics_tap_mtu": vm(
        nics=(
            NicSpec(mac="52:54:00:12:34:56", bridge="br-vni100", tap="tap-vm1-0", mtu=1450),
            NicSpec(mac="52:54:00:12:34:57", bridge="br-vni200"),
        )
    ),
    "vnc_tcp_any_address_qcow2_file": vm(
        consoles=Consoles(serial_log="/l", vnc_listen="0.0.0.0"),
        disks=(DiskSpec(FileSource("/var/lib/cairn/base.qcow2", format="qcow2")),),
    ),
    "virtiofs_share_memfd": vm(
        filesystems=(FilesystemShare("/var/lib/cairn/ct1/rootfs", "rootfs", virtiofsd="/usr/libexec/virtiofsd"),),
    ),
    "virtiofs_rootfs_with_agent_channel": vm(
        filesystems=(FilesystemShare("/var/lib/cairn/microvms/ct2/rootfs", "rootfs"),),
        channels=(ChannelSpec("org.cairn.agent.0", "/var/lib/cairn/microvms/ct2/agent.sock"),),
    ),
    "vnc_unix_socket": vm(consoles=Consoles(serial_log="/l", serial_socket="/s", vnc_socket="/run/vnc.sock")),
    "guaranteed_pinned_hugepages": vm(
        vcpus=2, memory_mib=1024, qos_class=QosClass.GUARANTEED,
        placement=Placement(host_cpus=(2, 3), numa_nodes=(0,), hugepages_kib=2048),
    ),
    "guaranteed_hugepages_with_virtiofs": vm(
        qos_class=QosClass.GUARANTEED, placement=Placement(host_cpus=(0,), hugepages_kib=1048576),
        filesystems=(FilesystemShare("/srv/share", "share"),),
    ),
    "guaranteed_pinned_normal_pages": vm(
        vcpus=1, qos_class=QosClass.GUARANTEED, placement=Placement(host_cpus=(1,), numa_nodes=(1,)),
    ),
    "burstable_q35_custom_emulator": vm(qos_class=QosClass.BURSTABLE, machine="q35", emulator="/opt/qemu"),
    "unprivileged_dac_label": vm(run_as=(16777216, 16842752)),
    "nbd_tls_disk": vm(disks=(DiskSpec(NbdSource("nbds://10.0.0.5:10809/vol-3"), serial="vol-3"),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_xml_matches_golden_file(case: str) -> None:
    xml = build_domain_xml(CASES[case])
    ET.fromstring(xml)  # well-formed
    path = GOLDEN / f"{case}.xml"
    if os.environ.get("CAIRN_REGEN_GOLDEN"):
        path.write_text(xml)
    assert path.exists(), f"missing golden file {path}: run with CAIRN_REGEN_GOLDEN=1"
    assert xml == path.read_text()


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.xml")} == set(CASES)


def _fields(obj: object, prefix: str) -> set[str]:
    """Dotted names of spec fields set to a non-default value somewhere in obj."""
    out: set[str] = set()
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default or f.default_factory is not dataclasses.MISSING:
            out.add(name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item):
                out |= _fields(item, f"{prefix}.{f.name}")
    return out


def _all_fields(cls: type, prefix: str) -> set[str]:
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}"
        out.add(name)
        for arg in typing.get_args(hints[f.name]) or (hints[f.name],):
            for sub in typing.get_args(arg) or (arg,):
                if dataclasses.is_dataclass(sub) and isinstance(sub, type):
                    out |= _all_fields(sub, name)
    return out


def test_every_vm_spec_field_is_exercised_by_a_golden_case() -> None:
    exercised: set[str] = set()
    for spec in CASES.values():
        exercised |= _fields(spec, "vm")
    missing = _all_fields(VmSpec, "vm") - exercised
    assert missing == set()


def _seen(obj: object, prefix: str, out: dict[str, list[object]]) -> dict[str, list[object]]:
    """Every value each dotted field takes somewhere in ``obj`` (devices included)."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value, name = getattr(obj, f.name), f"{prefix}.{f.name}"
        items = value if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]) else (value,)
        for item in items:
            if dataclasses.is_dataclass(item):
                _seen(item, name, out)
            elif item not in out.setdefault(name, []):
                out[name].append(item)
    return out


SEEN: dict[str, list[object]] = {}
for _case in CASES.values():
    _seen(_case, "vm", SEEN)


def _others(value: object, hint: object, name: str) -> list[object]:
    """Different values of the same kind, best first: other members of a Literal, values
    golden cases use for the same field, then a derived one (the spec may refuse some)."""
    out = [c for arg in (hint, *typing.get_args(hint)) if typing.get_origin(arg) is typing.Literal
           for c in typing.get_args(arg)]
    out += [c for c in SEEN.get(name, []) if type(c) is type(value)]
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, enum.Enum):
        out += [m for m in type(value) if m is not value]
    elif isinstance(value, int):
        out.append(value + 1)
    elif isinstance(value, str):
        if re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", value):
            out.append(value[:-2] + ("a1" if value[-2:] != "a1" else "a2"))
        try:
            uuid.UUID(value)
            out.append(str(uuid.uuid4()))
        except ValueError:
            out.append(value + "x" if len(value) < 14 else value[:-1] + "x")
    elif isinstance(value, tuple) and value and not dataclasses.is_dataclass(value[0]):
        out += [(*value[:-1], o) for o in _others(value[-1], None, "")]
    return [o for o in out if o != value]


def _accepted(obj: object, field: str, values: Iterable[object]) -> Iterator[object]:
    """Copies of ``obj`` with ``field`` set to each of ``values`` that the spec accepts."""
    for value in values:
        try:
            yield dataclasses.replace(obj, **{field: value})  # type: ignore[type-var]
        except (InvalidSpec, ValueError):
            continue


def _in_tuple(items: tuple[object, ...], i: int, changed: Iterable[object]) -> Iterator[tuple[object, ...]]:
    for item in changed:
        yield (*items[:i], item, *items[i + 1:])


def _variants(obj: object, prefix: str) -> Iterator[tuple[str, Iterator[object]]]:
    """(dotted field, accepted copies of ``obj`` with only that field changed), for every
    field set in ``obj``, nested devices included."""
    assert dataclasses.is_dataclass(obj) and not isinstance(obj, type)
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            for sub, changed in _variants(value, name):
                yield sub, _accepted(obj, f.name, changed)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                for sub, changed in _variants(item, name):
                    yield sub, _accepted(obj, f.name, _in_tuple(value, i, changed))
        if value is None or value == ():
            continue
        others = _others(value, typing.get_type_hints(type(obj))[f.name], name)
        if f.default is None:
            others.append(None)  # an optional value left out
        yield name, _accepted(obj, f.name, others)


def test_every_vm_spec_field_changes_the_xml() -> None:
    """Each field of VmSpec and of its devices, changed alone in some golden case,
    changes the domain XML: no field is silently ignored by the builder."""
    proven: set[str] = set()
    for spec in CASES.values():
        xml = build_domain_xml(spec)
        for name, candidates in _variants(spec, "vm"):
            changed = next(candidates, None)  # the first change the whole spec accepts
            if changed is None:
                continue
            assert isinstance(changed, VmSpec)
            if build_domain_xml(changed) != xml:  # a device proves itself through its fields
                proven |= {".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 2)}
    assert _all_fields(VmSpec, "vm") - proven == set()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"name": "Bad_Name"}, "instance name"),
        ({"vcpus": 0}, "vcpus"),
        ({"memory_mib": 1}, "memory"),
        ({"qos_class": QosClass.GUARANTEED}, "placement"),
        ({"placement": Placement(host_cpus=(0,))}, "only for qos_class guaranteed"),
        ({"qos_class": QosClass.GUARANTEED, "vcpus": 2, "placement": Placement(host_cpus=(0,))}, "pins 1 CPUs"),
    ],
)
def test_invalid_vm_spec_is_refused_with_a_clear_error(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidSpec, match=needle):
        vm(**kw)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: NbdSource("http://x/y"), "scheme"),
        (lambda: NbdSource("nbd+unix:///x"), "socket"),
        (lambda: NicSpec(mac="01:00:00:00:00:01", bridge="br0"), "unicast"),
        (lambda: NicSpec(mac="52:54:00:00:00:01", bridge="a-bridge-name-too-long"), "interface name"),
        (lambda: IoTune(total_bytes_sec=1, read_bytes_sec=1), "excludes"),
        (lambda: IoTune(total_iops_sec=-1), "positive"),
        (lambda: RbdSource("rbd", "img", user="u"), "together"),
        (lambda: RbdSource("rbd", "img", config="ceph.conf"), "absolute"),
    ],
)
def test_invalid_device_spec_is_refused(make: object, needle: str) -> None:
    with pytest.raises(InvalidSpec, match=needle):
        make()  # type: ignore[operator]
