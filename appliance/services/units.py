"""Sizes as users write them."""

from __future__ import annotations

import re

from appliance.errors import InvalidInput

MIB = 1 << 20
GIB = 1 << 30


def parse_size(value: int | str) -> int:
    """Bytes from 268435456, "256MiB", "1GiB", "512M" or "2G" (binary units)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", value, re.IGNORECASE)
    if not m:
        raise InvalidInput(f"size {value!r} must look like 256MiB, 1GiB or a number of bytes")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[unit])
