"""Golden-file comparison; ``CAIRN_REGEN_GOLDEN=1`` rewrites the files when a change is intended."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str, directory: Path = GOLDEN) -> None:
    """Compare ``text`` with <directory>/<name>, tests/network/golden by default (or rewrite
    it when regenerating)."""
    path = directory / name
    if os.environ.get("CAIRN_REGEN_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with CAIRN_REGEN_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} differs from its golden file (CAIRN_REGEN_GOLDEN=1 if intended)"
