"""Durations and sizes as operators type them: ``90d``, ``12h``, ``10GiB``, ``0``."""

from __future__ import annotations

import re

from bus import UsageError

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_SIZE = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(text: str) -> float:
    """Seconds from ``<n>[s|m|h|d|w]`` (a bare number is seconds; 0 means none).

    Raises:
        UsageError: not a duration.
    """
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else "?"
    if match is None or (unit and unit not in _DURATION):
        raise UsageError(f"{text!r} is not a duration like 90d, 12h, 30m or 0")
    return float(match.group(1)) * _DURATION.get(unit, 1)


def parse_size(text: str) -> int:
    """Bytes from ``<n>[B|KB|MB|GB|TB|KiB|MiB|GiB|TiB]`` (0 means none).

    Raises:
        UsageError: not a size.
    """
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else "?"
    if match is None or unit not in _SIZE:
        raise UsageError(f"{text!r} is not a size like 10GiB, 500MB or 0")
    return int(float(match.group(1)) * _SIZE[unit])


def human_bytes(value: int) -> str:
    """``1.5 GiB`` style."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_seconds(value: float) -> str:
    """``3.5 d`` / ``2.0 h`` / ``40 s`` style."""
    if value >= 86_400:
        return f"{value / 86_400:.1f} d"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    return f"{value:.0f} s"
