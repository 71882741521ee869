"""QEMU (TCG) machines for installer tests and the installer benchmark: boot an ISO or a
disk under SeaBIOS or OVMF, watch the serial log for markers, stop on a failure line.

Every machine gets its own directory (serial log, OVMF variables) and is killed by its
own PID when the caller is done, whatever happened."""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pycdlib

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# a line with one of these ends the wait at once (with the serial log's tail in the error)
FAILURES = ("CAIRN-INSTALL: FAIL", "CAIRN-INSTALL: no answer", "CAIRN-FIRSTBOOT: FAIL", "Kernel panic", "grub> ",
            "grub rescue>", "Welcome to emergency mode", "Give root password for maintenance",
            "This is not a bootable disk", "No bootable device", "Boot Failed")
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class VmFailed(AssertionError):
    pass


@dataclass
class Vm:
    name: str
    workdir: Path
    firmware: str = "bios"  # bios | uefi
    memory_mib: int = 3072
    cpus: int = 2
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seen: dict[str, float] = field(default_factory=dict)

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.serial.log"

    def argv(self, *devices: str, mac: str = "52:54:00:c4:00:01", smbios_serial: str = "",
             nic: str = "user,restrict=on") -> list[str]:
        """QEMU's command line; the NIC is isolated user networking (DHCP inside QEMU, no
        traffic leaves it) unless ``nic`` names another backend (e.g. a tap)."""
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus),
                "-m", str(self.memory_mib), "-nographic", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{self.serial_log}", "-netdev", f"{nic},id=net0",
                # no option ROM: the firmware never tries a network boot before the disks
                "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile="]
        if smbios_serial:
            argv += ["-smbios", f"type=1,serial={smbios_serial}"]
        if self.firmware == "uefi":
            vars_copy = self.workdir / f"{self.name}.vars.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        return argv + list(devices)

    def start(self, argv: list[str]) -> None:
        self.serial_log.write_bytes(b"")
        self.seen = {}
        self.started = time.monotonic()
        with open(self.workdir / f"{self.name}.qemu.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)

    def text(self) -> str:
        return ANSI.sub(b"", self.serial_log.read_bytes()).decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(self, marks: dict[str, str], timeout: float, failures: tuple[str, ...] = FAILURES) -> dict[str, float]:
        """Seconds from start to the first serial line holding each mark's text; raise at a
        failure line, when QEMU exits first, or at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            for label, needle in marks.items():
                if label not in self.seen and needle in text:
                    self.seen[label] = round(time.monotonic() - self.started, 1)
            if all(label in self.seen for label in marks):
                return {k: self.seen[k] for k in marks}
            bad = next((f for f in failures if f in text), None)
            if bad:
                time.sleep(2)  # the lines after a failure line say why
                raise VmFailed(f"{self.name}: '{bad}' on the serial console:\n{self.tail(60)}")
            if self.proc is not None and self.proc.poll() is not None:
                qemu_log = (self.workdir / f"{self.name}.qemu.log").read_text()[-2000:]
                raise VmFailed(f"{self.name}: QEMU exited ({self.proc.returncode}) before "
                               f"{sorted(set(marks) - set(self.seen))}:\n{self.tail()}\n{qemu_log}")
            if time.monotonic() > deadline:
                raise VmFailed(f"{self.name}: no {sorted(set(marks) - set(self.seen))} within {timeout:g} s:\n"
                               f"{self.tail()}")
            time.sleep(0.5)

    def wait_exit(self, timeout: float) -> float:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmFailed(f"{self.name}: still running {timeout:g} s after it should have stopped:\n{self.tail()}")
        return round(time.monotonic() - self.started, 1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def blank_disk(path: Path, size: str = "8G") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def virtio_disk(path: Path, ident: str, serial: str, fmt: str = "qcow2", readonly: bool = False,
                boot: bool = False) -> list[str]:
    """A virtio disk; a writable one skips host flushes (cache=unsafe: test disks are thrown
    away, and a guest's fsyncs cost seconds under TCG on a shared host)."""
    mode = ",readonly=on" if readonly else ",cache=unsafe"
    return ["-drive", f"file={path},if=none,id={ident},format={fmt}{mode}",
            "-device", f"virtio-blk-pci,drive={ident},serial={serial}{',bootindex=0' if boot else ''}"]


def cdrom(path: Path, index: int, boot: bool = False) -> list[str]:
    """A CD; ``boot``: the firmware tries CDs first (SeaBIOS would try the disks before)."""
    first = ["-boot", "order=d"] if boot else []
    return ["-drive", f"file={path},media=cdrom,if=ide,index={index},readonly=on", *first]


def fat_seed(path: Path, answer: str, label: str = "CAIRN-ANS") -> Path:
    """A small FAT image labelled CAIRN-ANS with answer.toml at its root (a USB stick)."""
    path.unlink(missing_ok=True)
    subprocess.run(["mkfs.vfat", "-C", "-n", label, str(path), "8192"], check=True, capture_output=True)
    src = path.with_suffix(".toml")
    src.write_text(answer)
    subprocess.run(["mcopy", "-i", str(path), str(src), "::/answer.toml"], check=True, capture_output=True)
    return path


def iso_seed(path: Path, answer: str, label: str = "CAIRN-ANS") -> Path:
    """An ISO 9660 image labelled CAIRN-ANS with answer.toml (Rock Ridge and Joliet names)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    data = answer.encode()
    iso.add_fp(io.BytesIO(data), len(data), "/ANSWER.TOML;1", rr_name="answer.toml", joliet_path="/answer.toml")
    iso.write(str(path))
    iso.close()
    return path
