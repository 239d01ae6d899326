"""The shape of an access decision (what the relay answers a stream open with).

`access.gatekeeper.Gatekeeper` makes the decisions: deny by default; a hostname is reachable
through an Access application that allows the presented service token, or through a route
made public explicitly (`hd tunnel route … --public`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class RouteLike(Protocol):
    hostname: str
    public: bool


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str = ""
    reason: str = ""
