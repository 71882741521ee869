"""The installer ISO's layout: boot menu, image layers, and baking an answer into it.

On the ISO (and on the live system's medium, /run/live/medium):

    live/base.squashfs, live/cairn.squashfs   image layers, bottom first
    live/filesystem.module                    their order, for live-boot and the installer
    live/vmlinuz, live/initrd.img             kernel and initrd (outside the layers)
    boot/grub/grub.cfg                        boot menu (serial + screen)
    cairn/answer.toml                         an answer baked in by `prepare-iso` (optional)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from installer.answer import read_answer
from installer.errors import BuildError, InstallerError

ISO_VOLUME_ID = "CAIRN"
LAYERS = ("base.squashfs", "cairn.squashfs")
BAKED_ANSWER = "cairn/answer.toml"
LIVE_MEDIUM = Path("/run/live/medium")
# The live system boots to cairn-installer.target (the installer and gettys, none of the
# node's services). The screen is the primary console (/dev/console: the interactive
# questions); the serial port gets kernel messages and the installer's result lines too.
# no_timer_check: see NO_TIMER_CHECK in installer/target.py.
KERNEL_CMDLINE = ("boot=live quiet no_timer_check systemd.unit=cairn-installer.target systemd.show_status=error "
                  "console=ttyS0,115200 console=tty0")


def iso_grub_cfg(timeout: int = 3) -> str:
    """The ISO's boot menu: unattended install by default, interactive, or a live shell."""
    entries = (
        ("Install Cairn", ""),
        ("Install Cairn (interactive, ignore any answer file)", " cairn.interactive"),
        ("Cairn live system (install nothing)", " cairn.install=off"),
    )
    text = ("serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
            f"set timeout={timeout}\nset default=0\n")
    for title, extra in entries:
        text += (f"menuentry \"{title}\" {{\n"
                 "  echo \"CAIRN-GRUB: loading\"\n"
                 f"  linux /live/vmlinuz {KERNEL_CMDLINE}{extra}\n"
                 "  initrd /live/initrd.img\n"
                 "}\n")
    return text


@dataclass(frozen=True)
class Medium:
    """The image on the installer's medium (the ISO's files)."""

    root: Path = LIVE_MEDIUM

    @property
    def live(self) -> Path:
        return self.root / "live"

    def layers(self) -> list[Path]:
        module = self.live / "filesystem.module"
        names = module.read_text().split() if module.exists() else list(LAYERS)
        paths = [self.live / n for n in names]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise InstallerError(f"the installer medium is incomplete: {', '.join(missing)} missing")
        return paths

    @property
    def kernel(self) -> Path:
        return self.live / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.live / "initrd.img"

    @property
    def baked_answer(self) -> Path:
        return self.root / BAKED_ANSWER


def _xorriso(argv: list[str]) -> str:
    r = subprocess.run(["xorriso", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"xorriso {' '.join(argv[:4])} … failed:\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr


def prepare_iso(answer: Path, src: Path, dest: Path) -> None:
    """A copy of ``src`` with ``answer`` baked in as /cairn/answer.toml, booting as before.

    The answer is validated first. xorriso replays the boot setup (El Torito BIOS and
    UEFI images, MBR/GPT); the volume's modification time is kept because GRUB finds the
    ISO by it (its iso9660 "UUID"), and the HFS+/APM part grub-mkrescue adds for Macs is
    left out (xorriso cannot replay it next to GPT)."""
    read_answer(answer)  # raises AnswerError naming every bad key
    if not src.is_file():
        raise InstallerError(f"{src}: no such ISO")
    info = _xorriso(["-indev", str(src), "-pvd_info"])
    found = re.search(r"Modif\. Time\s*:\s*(\d{16})", info)
    if not found:
        raise BuildError(f"{src}: no volume modification time (not an ISO 9660 image?)")
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        _xorriso(["-indev", str(src), "-outdev", str(tmp), "-boot_image", "any", "replay", "-hfsplus", "off",
                  "-volume_date", "uuid", found.group(1), "-overwrite", "on",
                  "-map", str(answer), "/" + BAKED_ANSWER])
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_iso_file(iso: Path, path: str) -> bytes | None:
    """One file from an ISO (None when absent), without mounting it."""
    out = iso.with_name(f".{iso.name}.{path.replace('/', '_')}")
    try:
        subprocess.run(["osirrox", "-indev", str(iso), "-extract", "/" + path.lstrip("/"), str(out)],
                       capture_output=True, check=False)
        return out.read_bytes() if out.exists() else None
    finally:
        if out.exists():
            out.chmod(0o600)
            out.unlink()


def tool_missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]
