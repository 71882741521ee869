"""Installer tests: answer files and hardware fitting (unit), the install steps on a
loop device (functional), and the real ISO booted in QEMU under BIOS and UEFI."""

from __future__ import annotations

import json
from pathlib import Path

from installer.hardware import Hardware
from tests.network.golden import assert_golden

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "golden"


def hardware(name: str) -> Hardware:
    """A device-info fixture (tests/installer/fixtures/<name>.json)."""
    return Hardware.model_validate(json.loads((FIXTURES / f"{name}.json").read_text()))


def golden(name: str, text: str) -> None:
    assert_golden(name, text, GOLDEN)
