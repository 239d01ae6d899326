"""Go-style durations as users type them: `10s`, `1m`, `24h`, `8760h`, `1h30m`, `500ms`."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | float | int) -> float:
    """Seconds in `text`; a bare number means seconds. Raises ValueError with a clear message."""
    if isinstance(text, bool):
        raise ValueError("a duration must be like 10s, 1m, 24h or 1h30m")
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}: use a number with a unit, like 10s, 1m, 24h or 1h30m")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}: use a number with a unit, like 10s, 1m, 24h or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    """Short human form: 10s, 1m30s, 24h, 0.5s."""
    if seconds < 60:
        return f"{seconds:g}s"
    out, rest = "", int(round(seconds))
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out
