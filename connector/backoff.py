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


class ReconnectPolicy:
    """How long one HA connection waits before its next dial, whatever the transport.

    Every failed attempt counts, on either transport, so `auto` alternating between two dead
    transports backs off like a fixed protocol does (1 s doubling to 32 s, with jitter). The one
    exception: when a failure makes `auto` switch transports for the first time since the last
    successful registration, the other transport is tried at once — a blocked transport should
    not cost a backoff step. Pure logic: the caller sleeps.
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._free_switch = True

    def failed(self, switched: bool) -> float:
        """The delay before the next attempt, after one that failed (`switched`: the failure
        moved `auto` to the other transport)."""
        if switched and self._free_switch:
            self._free_switch = False
            return 0.0
        return self.backoff.next_delay()

    def succeeded(self) -> None:
        """A registration went through: the next outage starts again from the shortest delay."""
        self.backoff.reset()
        self._free_switch = True
