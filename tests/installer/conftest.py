"""Installer tests: answer files and hardware fitting (unit), the install steps on a
loop device (functional), and the real ISO booted in QEMU under BIOS and UEFI."""

from __future__ import annotations

import json
from pathlib import Path

from installer.hardware import Hardware
from tests.network.golden import assert_golden

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
# join tokens shaped as `cairn cluster token create` prints them (CJ1.<CA sha256>.<id>.<secret>)
TOKEN = "CJ1." + "5e" * 32 + ".0b5f6a52-8d0e-4c0e-9d43-1f2a3b4c5d6e.Xq3-join-secret_Tk9mZ2hLc3RxY1"
TOKEN2 = "CJ1." + "5e" * 32 + ".7c1d2e3f-0000-4c0e-9d43-1f2a3b4c5d6e.another-secret_0123456789abc"
GOLDEN = HERE / "golden"


def hardware(name: str) -> Hardware:
    """A device-info fixture (tests/installer/fixtures/<name>.json)."""
    return Hardware.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))


def golden(name: str, text: str) -> None:
    assert_golden(name, text, GOLDEN)
