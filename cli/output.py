"""Output for people (aligned tables, one next step) and for programs (`--json`: exactly one
JSON document on stdout, nothing else there)."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from typing import Any, Iterable, Sequence


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def warn(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; trailing spaces trimmed."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, Any]], *, indent: int = 0) -> str:
    """'key:  value' lines with the values aligned."""
    pairs = [(str(k) + ":", "-" if v is None else str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join((" " * indent + k.ljust(width) + "  " + v).rstrip() for k, v in pairs)


def fmt_time(value: Any, *, now: float | None = None) -> str:
    """A timestamp (epoch seconds or ISO 8601) as 'YYYY-MM-DD HH:MM:SS UTC (5m ago)'."""
    if value is None or value == "":
        return "-"
    try:
        if isinstance(value, (int, float)):
            ts = float(value)
        else:
            ts = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return str(value)
    when = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    age = (time.time() if now is None else now) - ts
    return f"{when} ({fmt_age(age)} ago)" if age >= 0 else when


def fmt_age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"
