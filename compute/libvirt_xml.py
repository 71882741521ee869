"""Pure builder: a :class:`~compute.spec.VmSpec` to libvirt domain XML.

No libvirt import here: this module only describes XML, so it is tested with
golden files and usable on machines without libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from compute.spec import DiskSpec, FileSource, NbdSource, QosClass, RbdSource, VirtType, VmSpec

DISK_BUSES = {"disk": ("vd", "virtio"), "cdrom": ("sd", "sata")}
# seconds between the guest's memory reports over the virtio balloon (the agent samples
# every 10 s by default); the balloon itself is never inflated: memory == currentMemory
BALLOON_STATS_PERIOD_S = 10


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk_target(disk: DiskSpec, index: int) -> tuple[str, str]:
    prefix, bus = DISK_BUSES[disk.device]
    return prefix + chr(ord("a") + index), bus


def _add_disk(devices: ET.Element, disk: DiskSpec, index: int) -> None:
    src = disk.source
    kind = "file" if isinstance(src, FileSource) else "network"
    el = _sub(devices, "disk", type=kind, device=disk.device)
    fmt = src.format if isinstance(src, FileSource) else "raw"
    # cache=none + io=native: no host page cache (required for safe live migration of shared disks)
    _sub(el, "driver", name="qemu", type=fmt, cache="none", io="native")
    if isinstance(src, FileSource):
        _sub(el, "source", file=src.path)
    elif isinstance(src, NbdSource):
        transport, sock, host, port, export = src.parts()
        attrs = {"protocol": "nbd"}
        if export:
            attrs["name"] = export
        if src.tls:  # the client certificate: the node's nbd_tls_x509_cert_dir
            attrs["tls"] = "yes"
        s = _sub(el, "source", **attrs)
        if transport == "unix":
            _sub(s, "host", transport="unix", socket=sock)
        else:
            _sub(s, "host", name=host, port=str(port))
    else:
        assert isinstance(src, RbdSource)
        s = _sub(el, "source", protocol="rbd", name=f"{src.pool}/{src.image}")
        if src.config:
            _sub(s, "config", file=src.config)
        for mon in src.monitors:
            mon_host, _, mon_port = mon.rpartition(":")
            _sub(s, "host", name=mon_host or mon, port=mon_port if mon_host else "6789")
        if src.user is not None and src.secret_uuid is not None:
            auth = _sub(el, "auth", username=src.user)
            _sub(auth, "secret", type="ceph", uuid=src.secret_uuid)
    dev, bus = _disk_target(disk, index)
    _sub(el, "target", dev=dev, bus=bus)
    if disk.readonly or disk.device == "cdrom":
        _sub(el, "readonly")
    if disk.serial:
        _sub(el, "serial", disk.serial)
    if disk.iotune is not None:
        tune = _sub(el, "iotune")
        for key, value in vars(disk.iotune).items():
            if value is not None:
                _sub(tune, key, str(value))


def _add_memory_backing(root: ET.Element, spec: VmSpec) -> None:
    """Hugepages for guaranteed placements; shared memfd memory when virtiofs needs it."""
    hugepages = spec.placement.hugepages_kib if spec.placement is not None else None
    if not hugepages and not spec.filesystems:
        return
    backing = _sub(root, "memoryBacking")
    if hugepages:
        hp = _sub(backing, "hugepages")
        _sub(hp, "page", size=str(hugepages), unit="KiB")
        _sub(backing, "locked")
    if spec.filesystems:
        _sub(backing, "source", type="memfd" if not hugepages else "file")
        _sub(backing, "access", mode="shared")


def _add_cpu_tuning(root: ET.Element, spec: VmSpec) -> None:
    """Pinning, NUMA and hugepages: only the guaranteed class gets dedicated resources."""
    if spec.qos_class is not QosClass.GUARANTEED or spec.placement is None:
        return
    p = spec.placement
    nodeset = ",".join(str(n) for n in p.numa_nodes)
    tune = _sub(root, "cputune")
    for vcpu, host_cpu in enumerate(p.host_cpus):
        _sub(tune, "vcpupin", vcpu=str(vcpu), cpuset=str(host_cpu))
    _sub(tune, "emulatorpin", cpuset=",".join(str(c) for c in p.host_cpus))
    numa = _sub(root, "numatune")
    _sub(numa, "memory", mode="strict", nodeset=nodeset)


def _add_cpu_model(root: ET.Element, spec: VmSpec) -> None:
    if spec.virt_type is VirtType.KVM:
        cpu = _sub(root, "cpu", mode="host-passthrough", check="none")
        # QEMU's -cpu host fails "failed to set MSR 0x10a" on nested hosts without it
        _sub(cpu, "feature", policy="disable", name="arch-capabilities")
    else:
        cpu = _sub(root, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", "qemu64", fallback="allow")
    if spec.qos_class is QosClass.GUARANTEED:
        _sub(cpu, "topology", sockets="1", dies="1", cores=str(spec.vcpus), threads="1")
        numa = _sub(cpu, "numa")
        _sub(numa, "cell", id="0", cpus=f"0-{spec.vcpus - 1}", memory=str(spec.memory_mib), unit="MiB")


def build_domain_xml(spec: VmSpec) -> str:
    """Return the libvirt domain XML for ``spec`` (deterministic: same spec, same text)."""
    root = ET.Element("domain", type=spec.virt_type.value)
    _sub(root, "name", spec.name)
    _sub(root, "uuid", spec.uuid)
    meta = _sub(root, "metadata")
    cairn = ET.SubElement(meta, "cairn:instance", {"xmlns:cairn": "https://cairn.example/xmlns/compute/1"})
    _sub(cairn, "cairn:qos", spec.qos_class.value)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    _sub(root, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    _add_memory_backing(root, spec)
    _add_cpu_tuning(root, spec)
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel_boot is not None:
        _sub(os_el, "kernel", spec.kernel_boot.kernel)
        if spec.kernel_boot.initrd:
            _sub(os_el, "initrd", spec.kernel_boot.initrd)
        _sub(os_el, "cmdline", spec.kernel_boot.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _add_cpu_model(root, spec)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")
    devices = _sub(root, "devices")
    _sub(devices, "emulator", spec.emulator)
    if spec.run_as is not None:  # after <devices>, as libvirt orders it
        # relabel="no": libvirt chowns nothing to the domain's ids (it would hand a kernel
        # shared by several VMs to one of them); what QEMU reads is granted by the caller
        label = _sub(root, "seclabel", type="static", model="dac", relabel="no")
        _sub(label, "label", f"+{spec.run_as[0]}:+{spec.run_as[1]}")
    counters = {"disk": 0, "cdrom": 0}
    for disk in spec.disks:
        _add_disk(devices, disk, counters[disk.device])
        counters[disk.device] += 1
    for nic in spec.nics:
        iface = _sub(devices, "interface", type="bridge")
        _sub(iface, "mac", address=nic.mac)
        _sub(iface, "source", bridge=nic.bridge)
        if nic.tap:
            _sub(iface, "target", dev=nic.tap)
        _sub(iface, "model", type="virtio")
        if nic.mtu:
            _sub(iface, "mtu", size=str(nic.mtu))
        _sub(iface, "rom", enabled="no")
    for fs in spec.filesystems:
        fs_el = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(fs_el, "driver", type="virtiofs", queue="1024")
        _sub(fs_el, "binary", path=fs.virtiofsd)
        _sub(fs_el, "source", dir=fs.source)
        _sub(fs_el, "target", dir=fs.tag)
    c = spec.consoles
    serial_type = "unix" if c.serial_socket else "pty"
    serial = _sub(devices, "serial", type=serial_type)
    if c.serial_socket:
        _sub(serial, "source", mode="bind", path=c.serial_socket)
    _sub(serial, "log", file=c.serial_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type=serial_type)
    if c.serial_socket:
        _sub(console, "source", mode="bind", path=c.serial_socket)
    _sub(console, "target", type="serial", port="0")
    for channel in spec.channels:  # virtio-serial: libvirt adds the controller
        ch = _sub(devices, "channel", type="unix")
        _sub(ch, "source", mode="bind", path=channel.socket)
        _sub(ch, "target", type="virtio", name=channel.name)
    if c.vnc:
        if c.vnc_socket:
            g = _sub(devices, "graphics", type="vnc", socket=c.vnc_socket)
        else:
            g = _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=c.vnc_listen)
            _sub(g, "listen", type="address", address=c.vnc_listen)
        _sub(devices, "video").append(ET.Element("model", type="cirrus", vram="16384", heads="1"))
    # a balloon device for its statistics: a guest with the driver reports the memory it
    # uses, which QEMU's resident set on the host cannot tell (see InstanceStats)
    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period=str(BALLOON_STATS_PERIOD_S))
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def build_memory_snapshot_xml(name: str, memory_file: str, disk_targets: list[str]) -> str:
    """A libvirt external snapshot of the memory only: every disk is left out (``snapshot='no'``),
    the storage layer snapshots the volumes while the VM is paused (pure)."""
    root = ET.Element("domainsnapshot")
    _sub(root, "name", name)
    _sub(root, "memory", snapshot="external", file=memory_file)
    disks = _sub(root, "disks")
    for target in disk_targets:
        _sub(disks, "disk", name=target, snapshot="no")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"
