"""Value types describing VMs and containers: what to run, never how.

Specs are frozen dataclasses validated on construction, so a bad spec fails
with :class:`~compute.errors.InvalidSpec` before any hypervisor is touched.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, urlparse

from compute.errors import InvalidSpec

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEV_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,14}$")  # Linux IFNAMSIZ is 16 incl. NUL


class QosClass(StrEnum):
    """QoS classes shared by VMs and containers (same names as Kubernetes)."""

    BEST_EFFORT = "best-effort"
    BURSTABLE = "burstable"
    GUARANTEED = "guaranteed"


class VirtType(StrEnum):
    """Accelerator for a domain: ``kvm`` (hardware) or ``qemu`` (TCG emulation)."""

    KVM = "kvm"
    QEMU = "qemu"


class PowerState(StrEnum):
    """Observed power state of an instance (Nova's ``power_state``)."""

    NOSTATE = "nostate"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"


def check_name(name: str, what: str = "instance name") -> str:
    """Return ``name`` if it is a valid DNS-label-like name, else raise InvalidSpec."""
    if not NAME_RE.match(name):
        raise InvalidSpec(f"{what} {name!r} must match {NAME_RE.pattern}")
    return name


def check_mac(mac: str) -> str:
    """Return ``mac`` lower-cased if it is a unicast MAC address, else raise InvalidSpec."""
    mac = mac.lower()
    if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
        raise InvalidSpec(f"MAC address {mac!r} is not a unicast aa:bb:cc:dd:ee:ff address")
    return mac


def check_dev(dev: str, what: str) -> str:
    """Return ``dev`` if it is a valid Linux interface name, else raise InvalidSpec."""
    if not DEV_RE.match(dev):
        raise InvalidSpec(f"{what} {dev!r} is not a valid interface name (max 15 chars, [a-z0-9._-])")
    return dev


@dataclass(frozen=True)
class NbdSource:
    """An NBD export: ``nbd+unix:///export?socket=/path``,
    ``nbds://host:port/export?tls-certificates=/dir`` (TCP with TLS, libnbd's spelling:
    QEMU's ``tls-creds-x509`` client directory; libvirt domains use the node's, see
    ``LibvirtNode(nbd_tls_dir=)``) or ``nbd://host:port/export`` (plaintext TCP, for
    exports on a trusted loopback only)."""

    uri: str

    def __post_init__(self) -> None:
        self.parts()  # validates

    @property
    def tls(self) -> bool:
        return urlparse(self.uri).scheme in ("nbds", "nbds+tcp")

    @property
    def tls_certificates(self) -> str | None:
        """The client directory (``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``)."""
        return parse_qs(urlparse(self.uri).query).get("tls-certificates", [None])[0]

    def parts(self) -> tuple[str, str, str, int, str]:
        """Return (transport, socket, host, port, export); transport is ``unix`` or ``tcp``."""
        u = urlparse(self.uri)
        export = u.path.lstrip("/")
        if u.scheme == "nbd+unix":
            sock = parse_qs(u.query).get("socket", [""])[0]
            if not sock.startswith("/"):
                raise InvalidSpec(f"NBD URI {self.uri!r}: needs ?socket=/absolute/path")
            return "unix", sock, "", 0, export
        if u.scheme in ("nbd", "nbd+tcp", "nbds", "nbds+tcp"):
            if not u.hostname:
                raise InvalidSpec(f"NBD URI {self.uri!r}: needs a host")
            try:
                port = u.port or 10809
            except ValueError:
                raise InvalidSpec(f"NBD URI {self.uri!r}: bad port")
            certs = parse_qs(u.query).get("tls-certificates", [""])[0]
            if u.query and not (self.tls and certs.startswith("/")):
                raise InvalidSpec(f"NBD URI {self.uri!r}: the only option is tls-certificates=/absolute/dir, "
                                  "with nbds://")
            return "tcp", "", u.hostname, port, export
        raise InvalidSpec(f"NBD URI {self.uri!r}: scheme must be nbd+unix, nbds (TCP with TLS) or nbd")


@dataclass(frozen=True)
class RbdSource:
    """A Ceph RBD image, reached by QEMU's librbd client."""

    pool: str
    image: str
    monitors: tuple[str, ...] = ()  # "host:port"
    user: str | None = None
    secret_uuid: str | None = None  # libvirt secret holding the cephx key
    config: str | None = None  # a ceph.conf for librbd (monitors, keyring): instead of monitors + secret

    def __post_init__(self) -> None:
        if not self.pool or not self.image or "/" in self.pool + self.image:
            raise InvalidSpec(f"RBD source {self.pool!r}/{self.image!r}: pool and image are required, no '/'")
        if (self.user is None) != (self.secret_uuid is None):
            raise InvalidSpec("RBD source: user and secret_uuid go together")
        if self.config is not None and not self.config.startswith("/"):
            raise InvalidSpec(f"RBD source: config {self.config!r} must be an absolute path to a ceph.conf")


@dataclass(frozen=True)
class FileSource:
    """A local image file (the cloud-init seed ISO, or a test disk)."""

    path: str
    format: str = "raw"


@dataclass(frozen=True)
class IoTune:
    """Disk I/O limits (libvirt ``<iotune>``); None means unlimited."""

    total_bytes_sec: int | None = None
    read_bytes_sec: int | None = None
    write_bytes_sec: int | None = None
    total_iops_sec: int | None = None
    read_iops_sec: int | None = None
    write_iops_sec: int | None = None

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if v is not None and v <= 0:
                raise InvalidSpec(f"iotune {k} must be positive, got {v}")
        if self.total_bytes_sec and (self.read_bytes_sec or self.write_bytes_sec):
            raise InvalidSpec("iotune: total_bytes_sec excludes read/write_bytes_sec")
        if self.total_iops_sec and (self.read_iops_sec or self.write_iops_sec):
            raise InvalidSpec("iotune: total_iops_sec excludes read/write_iops_sec")


@dataclass(frozen=True)
class DiskSpec:
    """One guest disk."""

    source: NbdSource | RbdSource | FileSource
    device: str = "disk"  # disk | cdrom
    readonly: bool = False
    serial: str | None = None  # shows up as /dev/disk/by-id/virtio-<serial>
    iotune: IoTune | None = None

    def __post_init__(self) -> None:
        if self.device not in ("disk", "cdrom"):
            raise InvalidSpec(f"disk device must be disk or cdrom, got {self.device!r}")
        if self.serial is not None and not re.match(r"^[A-Za-z0-9_-]{1,20}$", self.serial):
            raise InvalidSpec(f"disk serial {self.serial!r}: 1-20 chars of [A-Za-z0-9_-]")


@dataclass(frozen=True)
class NicSpec:
    """A virtio NIC: a tap named ``tap`` enslaved to ``bridge``, MAC from the port."""

    mac: str
    bridge: str
    tap: str | None = None  # None lets libvirt name it vnetN
    mtu: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))
        check_dev(self.bridge, "bridge")
        if self.tap is not None:
            check_dev(self.tap, "tap")
        if self.mtu is not None and not 576 <= self.mtu <= 9216:
            raise InvalidSpec(f"MTU {self.mtu} out of range 576..9216")


@dataclass(frozen=True)
class FilesystemShare:
    """A host directory shared into the guest over virtiofs, mounted by ``tag``."""

    source: str
    tag: str
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"

    def __post_init__(self) -> None:
        if not self.source.startswith("/"):
            raise InvalidSpec(f"filesystem share source {self.source!r} must be an absolute path")
        if not re.match(r"^[A-Za-z0-9_-]{1,36}$", self.tag):
            raise InvalidSpec(f"filesystem share tag {self.tag!r}: 1-36 chars of [A-Za-z0-9_-]")


@dataclass(frozen=True)
class ChannelSpec:
    """A virtio-serial port named ``name`` in the guest, a unix socket (QEMU listens) on the host."""

    name: str
    socket: str

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z0-9][a-z0-9._-]{0,62}$", self.name):
            raise InvalidSpec(f"channel name {self.name!r}: 1-63 chars of [a-z0-9._-]")
        if not self.socket.startswith("/"):
            raise InvalidSpec(f"channel socket {self.socket!r} must be an absolute path")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot (no bootloader)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"


@dataclass(frozen=True)
class Consoles:
    """Serial console to a log file plus a unix socket (or a pty); optional VNC."""

    serial_log: str
    serial_socket: str | None = None  # None -> pty
    vnc: bool = True
    vnc_listen: str = "127.0.0.1"
    vnc_socket: str | None = None  # a unix socket instead of a TCP port


@dataclass(frozen=True)
class Placement:
    """Dedicated resources for the ``guaranteed`` QoS class."""

    host_cpus: tuple[int, ...]  # one host CPU per vCPU, in order
    numa_nodes: tuple[int, ...] = (0,)
    hugepages_kib: int | None = None  # e.g. 2048; None -> normal pages

    def __post_init__(self) -> None:
        if not self.host_cpus or len(set(self.host_cpus)) != len(self.host_cpus) or min(self.host_cpus) < 0:
            raise InvalidSpec(f"placement host_cpus {self.host_cpus}: distinct non-negative CPUs required")
        if not self.numa_nodes or min(self.numa_nodes) < 0:
            raise InvalidSpec(f"placement numa_nodes {self.numa_nodes} invalid")


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to define one VM."""

    name: str
    vcpus: int
    memory_mib: int
    consoles: Consoles
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    filesystems: tuple[FilesystemShare, ...] = ()
    channels: tuple[ChannelSpec, ...] = ()
    kernel_boot: KernelBoot | None = None
    qos_class: QosClass = QosClass.BEST_EFFORT
    placement: Placement | None = None
    virt_type: VirtType = VirtType.QEMU
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    machine: str = "pc"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    # QEMU's host uid and gid (libvirt's DAC label for this domain); None = the node's default
    run_as: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.vcpus <= 256:
            raise InvalidSpec(f"vcpus {self.vcpus} out of range 1..256")
        if not 16 <= self.memory_mib <= 4 * 1024 * 1024:
            raise InvalidSpec(f"memory {self.memory_mib} MiB out of range 16 MiB..4 TiB")
        try:
            uuidlib.UUID(self.uuid)
        except ValueError:
            raise InvalidSpec(f"uuid {self.uuid!r} is not a UUID")
        if self.qos_class is QosClass.GUARANTEED:
            if self.placement is None:
                raise InvalidSpec("qos_class guaranteed needs a placement (pinned host CPUs)")
            if len(self.placement.host_cpus) != self.vcpus:
                raise InvalidSpec(f"placement pins {len(self.placement.host_cpus)} CPUs for {self.vcpus} vCPUs")
        elif self.placement is not None:
            raise InvalidSpec(f"placement is only for qos_class guaranteed, not {self.qos_class}")
        if len(self.disks) > 26:
            raise InvalidSpec("at most 26 disks")
        if len({n.mac for n in self.nics}) != len(self.nics):
            raise InvalidSpec("NIC MAC addresses must be distinct")
        if self.run_as is not None and not all(0 < i < 2**32 - 1 for i in self.run_as):
            raise InvalidSpec(f"run_as {self.run_as}: QEMU runs as an unprivileged uid and gid, not root")


@dataclass(frozen=True)
class ContainerNic:
    """A veth whose host end is enslaved to ``bridge``; the container end is eth0..N."""

    mac: str
    bridge: str
    host_dev: str  # host-side veth name
    address: str | None = None  # "10.0.0.5/24"; None -> the container configures itself (DHCP)
    gateway: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", check_mac(self.mac))
        check_dev(self.bridge, "bridge")
        check_dev(self.host_dev, "veth")
        if self.address is not None and not re.match(r"^[0-9a-f.:]+/\d{1,3}$", self.address):
            raise InvalidSpec(f"container address {self.address!r} must be ip/prefix")


@dataclass(frozen=True)
class VolumeMount:
    """A host path bind-mounted into the container."""

    source: str
    target: str
    readonly: bool = False

    def __post_init__(self) -> None:
        if not self.source.startswith("/") or not self.target.startswith("/"):
            raise InvalidSpec(f"volume {self.source!r} -> {self.target!r}: absolute paths required")


FILESYSTEMS = ("ext4", "xfs")


@dataclass(frozen=True)
class BlockVolume:
    """A network volume (an NBD export or an RBD image) mounted as a filesystem at
    ``target``; a blank one is formatted with ``fs`` first. ``serial`` names the disk
    inside a microVM (``/sys/block/vdX/serial``)."""

    source: NbdSource | RbdSource
    target: str
    serial: str
    fs: str = "ext4"
    readonly: bool = False

    def __post_init__(self) -> None:
        if not self.target.startswith("/") or self.target == "/" or ".." in self.target.split("/") \
                or len(self.target) > 200 or not re.match(r"^[A-Za-z0-9._/-]+$", self.target):
            raise InvalidSpec(f"volume mount path {self.target!r}: an absolute path other than / "
                              "(at most 200 chars of [A-Za-z0-9._/-], no '..')")
        if self.fs not in FILESYSTEMS:
            raise InvalidSpec(f"volume filesystem {self.fs!r}: one of {', '.join(FILESYSTEMS)}")
        if not re.match(r"^[A-Za-z0-9_-]{1,20}$", self.serial):
            raise InvalidSpec(f"volume serial {self.serial!r}: 1-20 chars of [A-Za-z0-9_-]")


def block_source_from_dict(d: dict[str, Any]) -> NbdSource | RbdSource:
    """Inverse of ``dataclasses.asdict`` for a volume source (NBD has only a URI)."""
    if set(d) == {"uri"}:
        return NbdSource(d["uri"])
    return RbdSource(**{**d, "monitors": tuple(d.get("monitors", ()))})


@dataclass(frozen=True)
class DeviceIoLimit:
    """Block I/O throttling of one host block device (cgroup blkio / io.max)."""

    device: str  # e.g. /dev/vda (resolved to major:minor when the container starts)
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    def __post_init__(self) -> None:
        if not self.device.startswith("/dev/"):
            raise InvalidSpec(f"I/O limit device {self.device!r} must be a /dev path")
        for k in ("read_bps", "write_bps", "read_iops", "write_iops"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise InvalidSpec(f"I/O limit {k} must be positive, got {v}")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to define one container."""

    name: str
    image: str  # path to an oci-layout tarball, or to a local rootfs directory
    command: tuple[str, ...]
    vcpus: float = 1.0
    memory_mib: int = 256
    qos_class: QosClass = QosClass.BEST_EFFORT
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    nics: tuple[ContainerNic, ...] = ()
    volumes: tuple[VolumeMount, ...] = ()
    io_limits: tuple[DeviceIoLimit, ...] = ()
    block_volumes: tuple[BlockVolume, ...] = ()
    tty: bool = False
    hostname: str | None = None
    isolation: str = "container"  # or "vm": run inside a tiny guest (compute.vm_isolation)

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.command:
            raise InvalidSpec("container command must not be empty")
        if not 0.01 <= self.vcpus <= 256:
            raise InvalidSpec(f"vcpus {self.vcpus} out of range 0.01..256")
        if not 4 <= self.memory_mib <= 4 * 1024 * 1024:
            raise InvalidSpec(f"memory {self.memory_mib} MiB out of range")
        if self.hostname is not None:
            check_name(self.hostname, "hostname")
        if self.isolation not in ("container", "vm"):
            raise InvalidSpec(f"isolation must be container or vm, not {self.isolation!r}")
        targets = [v.target.rstrip("/") for v in self.block_volumes] + [v.target.rstrip("/") for v in self.volumes]
        if len(set(targets)) != len(targets):
            raise InvalidSpec("two volumes are mounted at the same path")
        serials = [v.serial for v in self.block_volumes]
        if len(set(serials)) != len(serials):
            raise InvalidSpec("two block volumes have the same serial")


InstanceSpec = VmSpec | ContainerSpec


def container_spec_to_dict(spec: ContainerSpec) -> dict[str, Any]:
    """A JSON-able dict of ``spec`` (drivers persist specs next to their bundles)."""
    return dataclasses.asdict(spec)


def container_spec_from_dict(d: dict[str, Any]) -> ContainerSpec:
    """Inverse of :func:`container_spec_to_dict`."""
    return ContainerSpec(
        **{**d,
           "command": tuple(d["command"]), "env": tuple(tuple(e) for e in d["env"]),
           "qos_class": QosClass(d["qos_class"]),
           "nics": tuple(ContainerNic(**n) for n in d["nics"]),
           "volumes": tuple(VolumeMount(**v) for v in d["volumes"]),
           "io_limits": tuple(DeviceIoLimit(**x) for x in d["io_limits"]),
           "block_volumes": tuple(BlockVolume(**{**b, "source": block_source_from_dict(b["source"])})
                                  for b in d.get("block_volumes", ()))}
    )
