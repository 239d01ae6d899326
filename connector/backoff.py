"""Reconnect delays: exponential with jitter, 1 s doubling to a 32 s cap, reset on success.

"Equal jitter": the n-th wait is uniform in [d/2, d] with d = min(cap, base * 2**n), so
retries of many connectors spread out but never hammer the edge with zero delay.
"""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    def __init__(
        self, base: float = 1.0, cap: float = 32.0, rand: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self._rand = rand
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return ceiling / 2 + self._rand() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
