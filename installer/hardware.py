"""What a machine has, as the installer sees it: disks, NICs, the SMBIOS serial.

``collect()`` reads sysfs and udev's database (``cairn-installer device-info`` prints
it as JSON); ``Hardware.model_validate_json()`` reads such a JSON back, so an answer
file can be checked against a machine long before it boots the ISO.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from installer.answer import normalize_mac

FORMAT_VERSION = 1


class Disk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    path: str
    size: int  # bytes
    model: str = ""
    serial: str = ""
    rotational: bool = False
    removable: bool = False
    read_only: bool = False
    transport: str = ""
    wwn: str = ""
    by_id: str = ""  # a /dev/disk/by-id link, stable across reboots
    partitions: list[str] = []
    signatures: list[str] = []  # partition tables / file systems found on the disk and its partitions
    labels: list[str] = []  # file system labels on it (a CAIRN-ANS answer volume shows here)
    mounted: list[str] = []  # mount points of it or its partitions (the live medium shows here)

    @property
    def blank(self) -> bool:
        return not self.partitions and not self.signatures

    def describe(self) -> str:
        state = "blank" if self.blank else "holds " + ", ".join(self.signatures or ["partitions"])
        return (f"{self.path}: {_human(self.size)}, model {self.model or '-'!r}, serial {self.serial or '-'!r}, "
                f"{'rotational' if self.rotational else 'non-rotational'}, {state}")


class Nic(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    mac: str
    driver: str = ""
    carrier: bool | None = None
    speed_mbps: int | None = None
    pci: str = ""

    def describe(self) -> str:
        link = {True: "link up", False: "no link", None: "link unknown"}[self.carrier]
        return f"{self.name} {self.mac} ({self.driver or 'driver unknown'}, {link})"


class System(BaseModel):
    model_config = ConfigDict(extra="ignore")

    serial: str = ""
    uuid: str = ""
    vendor: str = ""
    product: str = ""


class Hardware(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = FORMAT_VERSION
    system: System = System()
    disks: list[Disk] = []
    nics: list[Nic] = []


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _udev_props(udev_dir: Path, devnum: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in _read(udev_dir / f"b{devnum}").splitlines():
        if line.startswith("E:") and "=" in line:
            key, _, value = line[2:].partition("=")
            props[key] = value
    return props


def _blkid(dev: str) -> dict[str, str]:
    """Low-level probe of one device (no cache): TYPE / PTTYPE / LABEL."""
    r = subprocess.run(["blkid", "-p", "-o", "export", dev], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def _mounts(proc: Path) -> dict[str, list[str]]:
    """major:minor -> mount points, from mountinfo."""
    out: dict[str, list[str]] = {}
    for line in _read(proc / "self" / "mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 4:
            out.setdefault(fields[2], []).append(fields[4])
    return out


def _by_id(dev_dir: Path, name: str) -> str:
    links = dev_dir / "disk" / "by-id"
    try:
        candidates = sorted(p for p in links.iterdir() if os.path.realpath(p) == str(dev_dir / name))
    except OSError:
        return ""
    # prefer the WWN-free, serial-bearing names (ata-…, nvme-…, virtio-…, scsi-…)
    candidates.sort(key=lambda p: (p.name.startswith("wwn-"), p.name.startswith("nvme-eui"), len(p.name)))
    return str(candidates[0]) if candidates else ""


def collect_disks(sys_dir: Path = Path("/sys"), dev_dir: Path = Path("/dev"),
                  udev_dir: Path = Path("/run/udev/data"), proc: Path = Path("/proc"),
                  probe: bool = True) -> list[Disk]:
    """Whole disks with a backing device (no loop, ram, zram, device-mapper), CD and floppy
    drives left out."""
    mounts = _mounts(proc)
    disks = []
    for block in sorted((sys_dir / "block").iterdir()):
        name = block.name
        if not (block / "device").exists() or name.startswith(("loop", "ram", "zram", "dm-", "md", "sr", "fd")):
            continue
        if _read(block / "device" / "type") == "5":  # SCSI type 5: CD/DVD
            continue
        devnum = _read(block / "dev")
        udev = _udev_props(udev_dir, devnum)
        parts = sorted(p.name for p in block.iterdir() if (p / "partition").exists())
        serial = (udev.get("ID_SERIAL_SHORT") or _read(block / "serial") or _read(block / "device" / "serial")
                  or udev.get("ID_SCSI_SERIAL", ""))
        model = udev.get("ID_MODEL", "").replace("_", " ") or _read(block / "device" / "model")
        transport = udev.get("ID_BUS", "")
        if not transport:
            transport = "nvme" if name.startswith("nvme") else "virtio" if name.startswith("vd") else ""
        signatures, labels, mounted = [], [], list(mounts.get(devnum, []))
        for dev in [name, *parts]:
            if probe:
                info = _blkid(str(dev_dir / dev))
                kind = info.get("PTTYPE") or info.get("TYPE")
                if kind:
                    signatures.append(f"{kind} on {dev}" if dev != name else kind)
                if info.get("LABEL"):
                    labels.append(info["LABEL"])
            if dev != name:
                mounted += mounts.get(_read(block / dev / "dev"), [])
        disks.append(Disk(
            name=name, path=str(dev_dir / name), size=int(_read(block / "size") or 0) * 512,
            model=model.strip(), serial=serial.strip(), rotational=_read(block / "queue" / "rotational") == "1",
            removable=_read(block / "removable") == "1", read_only=_read(block / "ro") == "1",
            transport=transport, wwn=udev.get("ID_WWN", "") or _read(block / "wwid"),
            by_id=_by_id(dev_dir, name), partitions=parts, signatures=signatures, labels=labels, mounted=mounted,
        ))
    return disks


def collect_nics(sys_dir: Path = Path("/sys")) -> list[Nic]:
    """Physical NICs (those with a device behind them), by their permanent MAC."""
    nics = []
    for net in sorted((sys_dir / "class" / "net").iterdir()):
        if not (net / "device").exists():
            continue  # lo, bridges, bonds, VLANs, veths
        mac = _read(net / "bonding_slave" / "perm_hwaddr") or _read(net / "address")
        try:
            mac = normalize_mac(mac)
        except ValueError:
            continue  # not an Ethernet NIC (InfiniBand, CAN, ...)
        carrier = _read(net / "carrier")
        speed = _read(net / "speed")
        driver = os.path.basename(os.path.realpath(net / "device" / "driver")) if (net / "device" / "driver").exists() \
            else ""
        pci = os.path.basename(os.path.realpath(net / "device"))
        nics.append(Nic(name=net.name, mac=mac, driver=driver, carrier={"1": True, "0": False}.get(carrier),
                        speed_mbps=int(speed) if speed.lstrip("-").isdigit() and int(speed) > 0 else None, pci=pci))
    return nics


def collect_system(sys_dir: Path = Path("/sys")) -> System:
    dmi = sys_dir / "class" / "dmi" / "id"
    return System(serial=_read(dmi / "product_serial"), uuid=_read(dmi / "product_uuid"),
                  vendor=_read(dmi / "sys_vendor"), product=_read(dmi / "product_name"))


def settle_udev(timeout: float = 60.0) -> None:
    """Wait for udev to finish with the devices it knows of (where udev runs)."""
    if Path("/run/udev/control").exists() and shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", f"--timeout={int(timeout)}"], capture_output=True)


def collect(sys_dir: Path = Path("/sys"), dev_dir: Path = Path("/dev"), udev_dir: Path = Path("/run/udev/data"),
            proc: Path = Path("/proc"), probe: bool = True) -> Hardware:
    """This machine's disks, NICs and SMBIOS identity (once udev has seen them all)."""
    settle_udev()
    return Hardware(system=collect_system(sys_dir), disks=collect_disks(sys_dir, dev_dir, udev_dir, proc, probe),
                    nics=collect_nics(sys_dir))


def to_json(hw: Hardware) -> str:
    return json.dumps(hw.model_dump(), indent=2) + "\n"
