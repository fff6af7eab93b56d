"""Sizes in bytes, read from and written as text ('2GiB'), so a spec file says what a person would."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20}
_UNITS |= {"g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(value: str | int) -> int:
    """'2GiB', '512MB', '1g' or a plain number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or 1000000")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read '{value}' as a size; write e.g. 2GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str | int:
    """The largest binary unit that holds `n` exactly: 2**31 -> '2GiB'; a size no unit divides stays a
    plain number, so parse_bytes(format_bytes(n)) == n always."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return n
