"""Which transport the connector dials: `--protocol auto|quic|websocket`.

`auto` starts with AUTO_PREFERS and falls back to the other transport when a dial fails at the
transport level (UDP blocked, handshake rejected or unanswered, TCP refused, idle/keepalive
timeout). cloudflared never returns from its fallback (issue #1534); here the supervisor
re-probes the preferred transport every `reprobe_interval` and moves back when it answers.
A fixed protocol never switches. Pure logic: time comes in as an argument.
"""

from __future__ import annotations

PROTOCOLS = ("websocket", "quic")

# bench/tunnel_bench.py runs both transports side by side: on CPython + uvloop the WebSocket
# link moves several times more bytes per CPU second than aioquic (a pure-Python QUIC stack,
# one sendto per 1452-byte packet), and its latency is no worse; see README "Tunnel transports".
AUTO_PREFERS = "websocket"
REPROBE_INTERVAL = 120.0


def other(protocol: str) -> str:
    return "quic" if protocol == "websocket" else "websocket"


class ProtocolSelector:
    def __init__(self, mode: str, *, prefer: str = AUTO_PREFERS, reprobe_interval: float = REPROBE_INTERVAL,
                 now: float = 0.0) -> None:
        if mode not in ("auto", *PROTOCOLS) or prefer not in PROTOCOLS:
            raise ValueError(f"unknown protocol {mode!r}/{prefer!r}")
        self.mode = mode
        self.preferred = prefer if mode == "auto" else mode
        self.current = self.preferred
        self.reprobe_interval = reprobe_interval
        self.since = now  # when `current` was chosen
        self.reason = ""  # why (for logs and `hd tunnel info`)
        self.switches = 0

    @property
    def in_fallback(self) -> bool:
        return self.current != self.preferred

    def failed(self, protocol: str, reason: str, now: float) -> str | None:
        """A dial (or keepalive) over `protocol` failed at the transport level. Returns the
        protocol switched to, or None when nothing changes (fixed mode, or already switched by
        another connection)."""
        if self.mode != "auto" or protocol != self.current:
            return None
        self.current = other(protocol)
        self.since = now
        self.reason = f"{protocol} failed: {reason}"
        self.switches += 1
        return self.current

    def reprobe_at(self) -> float | None:
        """When to try the preferred transport again (None: not in fallback)."""
        return self.since + self.reprobe_interval if self.in_fallback else None

    def probe_failed(self, now: float) -> None:
        self.since = now  # next re-probe one interval from now

    def recovered(self, now: float) -> None:
        """The preferred transport answered a re-probe: new dials use it again."""
        self.current = self.preferred
        self.since = now
        self.reason = "re-probe succeeded"
        self.switches += 1
