"""Install the image onto the disk an ``InstallPlan`` chose.

GPT with a BIOS boot partition (grub's core image for legacy BIOS), an EFI system
partition (``\\EFI\\BOOT\\BOOTX64.EFI``, found by any UEFI firmware without an NVRAM
entry) and an ext4 root; the image layers unpacked in order; the node's configuration
written from the answer; grub for both firmwares reading one grub.cfg.

The ESP is written with mtools, never mounted: the installer needs no FAT driver in
the running kernel, and neither do the tests that run these steps on a loop device.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from installer import target as build
from installer.errors import InstallFailed
from installer.hardware import settle_udev
from installer.matching import InstallPlan
from installer.media import Medium

ESP_MIB = 512
GRUB_LIB = Path("/usr/lib/grub")
# Built into BOOTX64.EFI so it can find the root and read grub.cfg; the rest of the
# modules are copied to /boot/grub/x86_64-efi for `insmod`.
EFI_MODULES = ("part_gpt", "part_msdos", "ext2", "fat", "search", "search_fs_uuid", "search_label", "normal",
               "configfile", "linux", "echo", "test", "serial", "terminal", "efi_gop", "all_video", "boot")
Say = Callable[[str], None]


@dataclass(frozen=True)
class Partitions:
    bios: str
    esp: str
    root: str


def run(argv: list[str], timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    """Run one tool; a failure raises InstallFailed with the tool's own words."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise InstallFailed(f"{argv[0]} is not installed")
    except subprocess.TimeoutExpired:
        raise InstallFailed(f"{argv[0]} did not finish within {timeout:g} s")
    if r.returncode != 0:
        words = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise InstallFailed(f"{' '.join(argv[:3])} failed (exit {r.returncode}): {' / '.join(words)}")
    return r.stdout


def partition_path(disk: str, number: int) -> str:
    """/dev/sda → /dev/sda3; /dev/nvme0n1 and /dev/loop0 → /dev/nvme0n1p3, /dev/loop0p3."""
    return f"{disk}{'p' if disk[-1].isdigit() else ''}{number}"


def _settle(paths: list[str], timeout: float = 30.0) -> None:
    settle_udev(timeout)
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            missing = [p for p in paths if not os.path.exists(p)]
            raise InstallFailed(f"the kernel did not create {', '.join(missing)} after partitioning")
        time.sleep(0.1)


def wipe_disk(disk: str) -> None:
    """Erase partition tables and file system signatures (partitions first, then the disk)."""
    names = run(["lsblk", "-nlpo", "NAME", disk]).split()
    for dev in [n for n in names if n != disk] + [disk]:
        run(["wipefs", "--all", "--force", dev])
    run(["sgdisk", "--zap-all", disk])


def partition(disk: str) -> Partitions:
    run(["sgdisk", "--zap-all", disk])
    run(["sgdisk", "-n1:1M:+1M", "-t1:EF02", "-c1:bios-boot",
         f"-n2:0:+{ESP_MIB}M", "-t2:EF00", "-c2:esp",
         "-n3:0:0", "-t3:8304", "-c3:cairn-root", disk])
    parts = Partitions(*(partition_path(disk, n) for n in (1, 2, 3)))
    # sgdisk asks the kernel to re-read the whole table (BLKRRPART); where that is refused
    # (a loop device in a container, a disk with a stale mapping) partx tells it partition
    # by partition (BLKPG)
    subprocess.run(["blockdev", "--rereadpt", disk], capture_output=True)
    try:
        _settle([parts.bios, parts.esp, parts.root], timeout=2)
    except InstallFailed:
        subprocess.run(["partx", "--update", disk], capture_output=True)
        subprocess.run(["partx", "--add", disk], capture_output=True)
        _settle([parts.bios, parts.esp, parts.root])
    return parts


def make_filesystems(parts: Partitions) -> tuple[str, str]:
    """ext4 root and FAT32 ESP with UUIDs chosen here (no probing afterwards)."""
    root_uuid = str(uuid.uuid4())
    volume_id = uuid.uuid4().hex[:8].upper()
    run(["mkfs.vfat", "-F", "32", "-n", "CAIRN-ESP", "-i", volume_id, parts.esp])
    run(["mkfs.ext4", "-q", "-F", "-L", "cairn-root", "-U", root_uuid, parts.root])
    return root_uuid, f"{volume_id[:4]}-{volume_id[4:]}"


@contextlib.contextmanager
def mounted(device: str, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", device, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        subprocess.run(["sync"], capture_output=True)
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True)


def copy_image(medium: Medium, root: Path, say: Say) -> str:
    """Unpack the layers in order (later ones add to earlier ones), then the kernel and
    initrd, which the medium keeps outside the layers. Returns the kernel version."""
    layers = medium.layers()
    for i, layer in enumerate(layers, 1):
        say(f"copying {layer.name} ({i}/{len(layers)})")
        run(["unsquashfs", "-f", "-no-progress", "-quiet", "-d", str(root), str(layer)])
    modules = sorted((root / "lib" / "modules").iterdir()) if (root / "lib" / "modules").is_dir() else []
    if len(modules) != 1:
        raise InstallFailed(f"the image has {len(modules)} kernel module trees, expected one")
    version = modules[0].name
    boot = root / "boot"
    boot.mkdir(exist_ok=True)
    shutil.copyfile(medium.kernel, boot / f"vmlinuz-{version}")
    shutil.copyfile(medium.initrd, boot / f"initrd.img-{version}")
    (boot / f"initrd.img-{version}").chmod(0o600)
    for name in ("vmlinuz", "initrd.img"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"boot/{name}-{version}")
    return version


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    tmp.replace(path)


def configure(root: Path, plan: InstallPlan, root_uuid: str, esp_uuid: str) -> None:
    """The node's own files: identity, access, network, time, and what first boot needs."""
    a = plan.answer
    etc = root / "etc"
    data_disks = [d.by_id or d.path for d in plan.data_disks]
    _write(etc / "fstab", build.fstab(root_uuid, esp_uuid))
    _write(etc / "hostname", build.hostname_file(a))
    _write(etc / "hosts", build.hosts_file(a))
    shadow = etc / "shadow"
    current = shadow.read_text() if shadow.exists() else ""
    _write(shadow, build.shadow_with_root_hash(current, a.root_password_hash), 0o640)
    if a.ssh_keys:
        (root / "root" / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(root / "root" / ".ssh" / "authorized_keys", build.authorized_keys(a), 0o600)
    netdir = etc / "systemd" / "network"
    for old in netdir.glob("*-cairn-*") if netdir.exists() else []:
        old.unlink()
    for name, text in build.networkd_files(a.network).items():
        _write(netdir / name, text)
    ntp = build.timesyncd_conf(a)
    if ntp:
        _write(etc / "systemd" / "timesyncd.conf.d" / "cairn.conf", ntp)
    localtime = etc / "localtime"
    localtime.unlink(missing_ok=True)
    localtime.symlink_to(f"/usr/share/zoneinfo/{a.timezone}")
    _write(etc / "timezone", a.timezone + "\n")
    _write(etc / "cairn" / "cairn.env", build.cairn_env(a, data_disks))
    _write(etc / "cairn" / "node.json", build.node_json(a, plan.install_disk.by_id or plan.install_disk.path,
                                                        data_disks), 0o600)
    _write(etc / "machine-id", "")  # systemd makes this node's own on first boot
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    run(["ssh-keygen", "-A", "-f", str(root)])


def install_bootloaders(disk: str, parts: Partitions, root: Path, root_uuid: str, work: Path) -> None:
    grub = root / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    _write(grub / "grub.cfg", build.disk_grub_cfg(root_uuid))
    # BIOS: core image into the BIOS boot partition, modules to /boot/grub/i386-pc
    run(["grub-install", "--target=i386-pc", f"--boot-directory={root / 'boot'}",
         "--modules=part_gpt ext2", disk])
    # UEFI: a standalone BOOTX64.EFI on the ESP that finds the root by UUID
    early = work / "early.cfg"
    early.write_text(build.efi_early_cfg(root_uuid))
    efi = work / "BOOTX64.EFI"
    run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(efi), "-c", str(early), "-p", "/boot/grub",
         "-d", str(GRUB_LIB / "x86_64-efi"), *EFI_MODULES])
    shutil.copytree(GRUB_LIB / "x86_64-efi", grub / "x86_64-efi", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.img", "*.image", "*.efi", "monolithic"))
    mtools = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", parts.esp, "::/EFI", "::/EFI/BOOT"], env=mtools)
    run(["mcopy", "-i", parts.esp, str(efi), "::/EFI/BOOT/BOOTX64.EFI"], env=mtools)


def install(plan: InstallPlan, medium: Medium, say: Say, mount_dir: Path | None = None,
            keep: tuple[Path, ...] = ()) -> dict[str, str]:
    """Wipe what the plan allows, partition, copy, configure, make it bootable. Returns the
    new file systems' UUIDs. The caller has validated the whole answer against this
    machine already: this is the first function that writes to a disk. ``keep``: files
    (the installer's log, the device-info it saw) kept in /var/log/cairn-installer."""
    disk = plan.install_disk.path
    for d in plan.wipe:
        say(f"wiping {d.path} (wipe = true)")
        wipe_disk(d.path)
    say(f"partitioning {disk}")
    parts = partition(disk)
    root_uuid, esp_uuid = make_filesystems(parts)
    with tempfile.TemporaryDirectory(prefix="cairn-install.", dir=mount_dir) as tmp:
        work = Path(tmp)
        with mounted(parts.root, work / "target") as root:
            copy_image(medium, root, say)
            say("writing the node's configuration")
            configure(root, plan, root_uuid, esp_uuid)
            logs = root / "var" / "log" / "cairn-installer"
            logs.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in keep:
                if path.is_file():
                    shutil.copyfile(path, logs / path.name)
            say("installing the boot loader (BIOS and UEFI)")
            install_bootloaders(disk, parts, root, root_uuid, work)
    return {"root_uuid": root_uuid, "esp_uuid": esp_uuid, "disk": disk}
