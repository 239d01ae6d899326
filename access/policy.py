"""Who may open a stream to a hostname.

Deny by default. For now a route is reachable only when it was made public explicitly
(`hd tunnel route … --public`); service tokens and Access applications extend this
decision (issue 3) without changing its shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol


class RouteLike(Protocol):
    hostname: str
    public: bool


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str = ""
    reason: str = ""


ALLOW = Decision(True)


def decide(route: RouteLike, headers: Mapping[str, str]) -> Decision:
    if route.public:
        return ALLOW
    return Decision(
        False,
        403,
        "access_denied",
        f"{route.hostname} is protected and no Access application allows this client "
        "(route it with --public, or create an Access application for it)",
    )
