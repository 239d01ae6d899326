"""One round of commands on an origin connection, of which the client sees one reply (sans-I/O).

The proxy sends its own statements around a client's command in the same write (pipelined):
before it, the SET that brings the connection to the client's settings (`state.prelude`), or
`DO LAST_INSERT_ID(n)`; after it, `SELECT LAST_INSERT_ID()` to learn a value the client may read
on another connection later. The server answers each command in turn; `Exchange` follows the
replies with one `ResultSetReader` and says which bytes are the client's (to forward unchanged)
and what each of the proxy's own replies said.

    ex = Exchange(capabilities, status)
    wire = ex.start([Step(prelude_payload), Step(client_payload, seq, CLIENT), Step(capture, keep=True)])
    forward, done = ex.feed(data)     # done: the Steps completed by this data, with their outcome
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from proxy.mysql import protocol as P

OWN, CLIENT = 0, 1
_NONE: list = []  # "no step finished" (never appended to)


@dataclass(slots=True)
class Step:
    payload: bytes
    seq: int = 0
    role: int = OWN  # CLIENT: its reply goes to the client
    keep: bool = False  # keep the rows (a capture)
    # outcome, once the reply is complete:
    error: P.ErrPacket | None = None
    status: int = 0
    warnings: int = 0
    results: list[P.Result] | None = None
    ok: P.OkPacket | None = None


class Exchange:
    __slots__ = ("rsr", "steps")

    def __init__(self, capabilities: int, status: int) -> None:
        self.rsr = P.ResultSetReader(capabilities, status=status)
        self.steps: deque[Step] = deque()

    @property
    def done(self) -> bool:
        return not self.steps

    @property
    def in_client_reply(self) -> bool:
        return bool(self.steps) and self.steps[0].role == CLIENT

    def start(self, steps: list[Step], status: int | None = None) -> bytes:
        """Ready for the replies to `steps`; returns the wire bytes to send (one write)."""
        assert not self.steps, "the previous exchange is not complete"
        self.steps.extend(steps)
        self._ready(status)
        if len(steps) == 1:
            return P.frame(steps[0].payload, steps[0].seq)
        return b"".join(P.frame(s.payload, s.seq) for s in steps)

    def _ready(self, status: int | None = None) -> None:
        step = self.steps[0]
        self.rsr.keep = step.keep
        self.rsr.reset(status=status, first_seq=P.next_seq(step.seq))

    def feed(self, data: bytes) -> tuple[bytes, list[Step]]:
        """The client's bytes completed by `data` (b"" if none) and the steps that finished.
        Raises MySQLProtocolError (the connection is then unusable)."""
        rsr = self.rsr
        out = b""
        finished: list[Step] = _NONE
        chunk = rsr.feed(data)
        while self.steps:
            step = self.steps[0]
            if chunk and step.role == CLIENT:
                out = bytes(chunk) if not out else out + bytes(chunk)
            if not rsr.done:
                break
            self.steps.popleft()
            if finished is _NONE:
                finished = []
            step.error, step.status, step.warnings, step.ok = rsr.error, rsr.status, rsr.warnings, rsr.ok
            if step.keep:
                step.results = rsr.results
            finished.append(step)
            if not self.steps:
                break
            self._ready()
            chunk = rsr.feed(b"")
        return out, finished

    def rest(self) -> bytes:
        """Bytes after the last reply (none, from a well-behaved server)."""
        return self.rsr.rest()


def com_query(sql: str) -> bytes:
    return b"\x03" + sql.encode()


__all__ = ["CLIENT", "OWN", "Exchange", "Step", "com_query"]
