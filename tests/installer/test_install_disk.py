"""The install steps on a real block device (a loop device over a sparse file) with a small
two-layer image: partitions, file systems, the copy, the node's files, grub for BIOS and
UEFI; and the installer session, which stops before any disk is touched when the
answer does not fit the machine."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer.console import Reporter
from installer.discovery import FoundAnswer
from installer.hardware import Disk, Hardware, Nic, System
from installer.media import Medium
from installer.session import Session

pytestmark = pytest.mark.functional

HASH = "$6$rounds=4096$salt$0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGsRnY9D6xUFYvNqsz+ET8C1r8eqUqXAvDfxNQk7eUtE admin@laptop"
MAC = "52:54:00:aa:00:01"
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def _mounts_of(device: str) -> list[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "SOURCE,TARGET"], capture_output=True, text=True).stdout
    return [line.split()[1] for line in out.splitlines() if line.split()[0].startswith(device)]


@pytest.fixture
def loop_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A loop device (1 GiB, or the size a test marks with loop_size); its mounts,
    partitions and the device go away even on failure."""
    marker = request.node.get_closest_marker("loop_size")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(marker.args[0] if marker else 1 << 30)
    loop = sh("losetup", "--find", "--show", "--partscan", str(image)).strip()
    try:
        yield loop, image
    finally:
        for target in _mounts_of(loop):
            subprocess.run(["umount", "--lazy", target], capture_output=True)
        subprocess.run(["partx", "--delete", loop], capture_output=True)
        subprocess.run(["losetup", "--detach", loop], capture_output=True)
    assert not _mounts_of(loop), "the install left a mount behind"


@pytest.fixture
def medium(tmp_path: Path) -> Medium:
    """A medium like the ISO's: two squashfs layers, their order, a kernel and an initrd."""
    live = tmp_path / "medium" / "live"
    live.mkdir(parents=True)
    base, layer = tmp_path / "base", tmp_path / "cairn"
    for d in ("etc/ssh", "lib/modules/6.1.0-99-amd64", "usr/share/zoneinfo", "root", "var/log"):
        (base / d).mkdir(parents=True)
    (base / "etc" / "shadow").write_text("root::19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    (base / "etc" / "hostname").write_text("cairn-installer\n")
    (base / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("the image's key: never on a node\n")
    (layer / "opt" / "cairn").mkdir(parents=True)
    (layer / "opt" / "cairn" / "marker").write_text("from the second layer\n")
    (layer / "etc").mkdir()
    (layer / "etc" / "hostname").write_text("overridden-by-layer-2\n")
    for src, name in ((base, "base.squashfs"), (layer, "cairn.squashfs")):
        sh("mksquashfs", str(src), str(live / name), "-comp", "zstd", "-quiet", "-no-progress", "-noappend")
    (live / "filesystem.module").write_text("base.squashfs\ncairn.squashfs\n")
    (live / "vmlinuz").write_bytes(b"kernel image\n")
    (live / "initrd.img").write_bytes(b"initrd image\n")
    return Medium(tmp_path / "medium")


def machine(loop: str, size: int = 1 << 30) -> Hardware:
    return Hardware(system=System(serial="LOOP-1"),
                    disks=[Disk(name=Path(loop).name, path=loop, size=size, serial="LOOPSERIAL", model="Loop Disk")],
                    nics=[Nic(name="eth0", mac=MAC, driver="virtio_net", carrier=True)])


def answer(**over: str) -> str:
    values = {"disk": 'serial = "LOOPSERIAL"', "mac": MAC, "cluster": "", "extra": ""} | over
    return f'''
hostname = "loop1"
root_password_hash = "{HASH}"
ssh_keys = ["{KEY}"]
timezone = "Europe/Vienna"
network = {{ mac = "{values['mac']}", mode = "static", address = "10.9.0.5/24", gateway = "10.9.0.1" }}
disks.install = {{ {values['disk']} }}
{values['cluster']}
{values['extra']}
'''


def session(tmp_path: Path, med: Medium, hw: Hardware, text: str, powered: list[str]) -> tuple[Session, Path]:
    serial = tmp_path / "serial.log"
    reporter = Reporter("CAIRN-INSTALL", consoles=(serial,), echo=False)
    s = Session(med, "boot=live", reporter, collect_hw=lambda: hw, power=powered.append,
                find=lambda medium, cmdline: FoundAnswer(text, "the test"), run_dir=tmp_path / "run",
                network_up=lambda a: None)
    return s, serial


def debugfs(device: str, command: str) -> str:
    return sh("debugfs", "-R", command, device)


def test_the_installer_partitions_copies_configures_and_installs_grub(
        tmp_path: Path, loop_disk: tuple[str, Path], medium: Medium) -> None:
    loop, _ = loop_disk
    powered: list[str] = []
    s, serial = session(tmp_path, medium, machine(loop), answer(), powered)
    assert s.run() == 0, serial.read_text()
    log = serial.read_text()
    assert log.splitlines()[-2:] == ["CAIRN-INSTALL: OK", "CAIRN-INSTALL: done; reboot in 3 s"]
    assert powered == ["reboot"]
    assert not _mounts_of(loop)

    table = sh("sgdisk", "-p", loop)
    assert [line.split()[-2:] for line in table.splitlines()[-3:]] == [["EF02", "bios-boot"], ["EF00", "esp"],
                                                                       ["8304", "cairn-root"]]
    root, esp = f"{loop}p3", f"{loop}p2"
    root_uuid = sh("blkid", "-p", "-o", "value", "-s", "UUID", root).strip()
    esp_uuid = sh("blkid", "-p", "-o", "value", "-s", "UUID", esp).strip()
    fstab = debugfs(root, "cat /etc/fstab")
    assert f"UUID={root_uuid} / ext4" in fstab and f"UUID={esp_uuid} /boot/efi vfat" in fstab
    # both layers, later over earlier; the kernel and initrd from outside the layers
    assert debugfs(root, "cat /opt/cairn/marker") == "from the second layer\n"
    assert debugfs(root, "cat /etc/hostname") == "loop1\n"
    assert debugfs(root, "cat /boot/vmlinuz-6.1.0-99-amd64") == "kernel image\n"
    assert "boot/initrd.img-6.1.0-99-amd64" in debugfs(root, "stat /initrd.img")
    # the node's own identity and access
    assert debugfs(root, "cat /etc/shadow").startswith(f"root:{HASH}:")
    assert debugfs(root, "cat /root/.ssh/authorized_keys") == KEY + "\n"
    assert "Mode:  0600" in debugfs(root, "stat /root/.ssh/authorized_keys")
    keys = debugfs(root, "ls -l /etc/ssh")
    assert "ssh_host_ed25519_key.pub" in keys
    assert "never on a node" not in debugfs(root, "cat /etc/ssh/ssh_host_ed25519_key")
    assert debugfs(root, "cat /etc/machine-id") == ""
    assert f"PermanentMACAddress={MAC}" in debugfs(root, "cat /etc/systemd/network/10-cairn-mgmt.network")
    assert "Mode:  0600" in debugfs(root, "stat /etc/cairn/node.json")
    assert "CAIRN_NODE_NAME=loop1" in debugfs(root, "cat /etc/cairn/cairn.env")
    assert "/usr/share/zoneinfo/Europe/Vienna" in debugfs(root, "stat /etc/localtime")
    assert "CAIRN-INSTALL: OK" not in debugfs(root, "cat /var/log/cairn-installer/device-info.json")
    assert '"serial": "LOOPSERIAL"' in debugfs(root, "cat /var/log/cairn-installer/device-info.json")
    # grub: one grub.cfg for both firmwares; BIOS core image in the BIOS boot partition,
    # i386-pc modules; a standalone BOOTX64.EFI on the ESP (the removable-media path)
    assert f"linux /vmlinuz root=UUID={root_uuid} ro" in debugfs(root, "cat /boot/grub/grub.cfg")
    assert "normal.mod" in debugfs(root, "ls /boot/grub/i386-pc")
    assert "linux.mod" in debugfs(root, "ls /boot/grub/x86_64-efi")
    with open(f"{loop}p1", "rb") as f:
        assert f.read(512).strip(b"\0"), "no grub core image in the BIOS boot partition"
    efi = subprocess.run(["mdir", "-i", esp, "-b", "::/EFI/BOOT"], capture_output=True, text=True, env=MTOOLS)
    assert "::/EFI/BOOT/BOOTX64.EFI" in efi.stdout
    boot_efi = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI", str(boot_efi)], check=True, env=MTOOLS)
    assert boot_efi.read_bytes()[:2] == b"MZ" and root_uuid.encode() in boot_efi.read_bytes()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.loop_size(16 << 20)
@pytest.mark.parametrize(("case", "text", "reason"), [
    ("missing disk", answer(disk='serial = "NOPE*"'),
     "FAIL the answer does not fit this machine:"),
    ("unknown NIC", answer(mac="52:54:00:aa:00:99"),
     "FAIL the answer does not fit this machine:"),
    ("wrong token", answer(cluster='cluster = { mode = "join", address = "10.9.0.1", token = "bad token" }'),
     "FAIL answer from the test: 1 problem(s)"),
    ("two nodes with one MAC", f'''
root_password_hash = "{HASH}"
disks.install = {{}}
[[node]]
match.mac = "{MAC}"
hostname = "a"
network.mac = "{MAC}"
[[node]]
match.serial = "LOOP-1"
hostname = "b"
network.mac = "{MAC}"
''', "FAIL answer from the test: 1 problem(s)"),
], ids=lambda v: v if v in ("missing disk", "unknown NIC", "wrong token", "two nodes with one MAC") else "")
def test_a_bad_answer_stops_the_installer_before_any_disk_is_touched(
        tmp_path: Path, loop_disk: tuple[str, Path], medium: Medium, case: str, text: str, reason: str) -> None:
    loop, image = loop_disk
    with open(loop, "r+b") as dev:  # something the installer must not erase
        dev.write(b"precious data " * 100)
    before = _digest(image)
    powered: list[str] = []
    s, serial = session(tmp_path, medium, machine(loop), text, powered)
    assert s.run() == 1
    log = serial.read_text()
    assert f"CAIRN-INSTALL: {reason}" in log, log
    detail = {"missing disk": "disks.install (serial='NOPE*') matches no disk",
              "unknown NIC": "network.mac: no NIC has MAC 52:54:00:aa:00:99",
              "wrong token": "cluster.token: not a join token",
              "two nodes with one MAC": f"node[1].network: MAC {MAC} is also used by node[0]"}[case]
    assert detail in log, log
    assert "partitioning" not in log
    assert powered == []
    assert _digest(image) == before
