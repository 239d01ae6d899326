"""The connector's reconnect loop with time injected (issue 13): every failed attempt counts on
either transport, delays grow 1 s → 32 s with jitter, one log line per attempt, and a final
refusal (or a link the edge closed as refused) ends the connector on either transport."""

from __future__ import annotations

import asyncio
import logging

import pytest

from connector.backoff import Backoff, ReconnectPolicy
from connector.supervisor import DialFailed, FatalError, Supervisor, _final_refusal
from tunnel.token import TunnelToken

TOKEN = TunnelToken("11111111-2222-3333-4444-555555555555", b"s" * 32, ["127.0.0.1:9"], "sha256:" + "0" * 64)


class FakeTime:
    """The supervisor's clock and sleep: a sleep records its delay and moves the clock at once."""

    def __init__(self, stop_after: int) -> None:
        self.now = 1000.0
        self.delays: list[float] = []
        self.stop_after = stop_after
        self.sup: Supervisor | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.now += delay
        if len(self.delays) >= self.stop_after and self.sup is not None:
            self.sup.shutting_down = True
        await asyncio.sleep(0)


def _supervisor(protocol: str, fake: FakeTime, rand: float, **kw) -> Supervisor:
    sup = Supervisor(TOKEN, ha_connections=1, protocol=protocol, rand=lambda: rand,
                     clock=fake.clock, sleep=fake.sleep, **kw)
    fake.sup = sup
    return sup


def _attempt_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "connector" and r.levelno >= logging.INFO]


@pytest.mark.parametrize("rand, expected", [
    (1.0, [0.0, 1, 2, 4, 8, 16, 32, 32, 32, 32]),  # jitter at its top: the ceiling
    (0.0, [0.0, 0.5, 1, 2, 4, 8, 16, 16, 16, 16]),  # at its bottom: half of it
])
async def test_auto_with_the_edge_down_backs_off_across_both_transports(caplog, rand, expected):
    caplog.set_level(logging.INFO, logger="connector")
    fake = FakeTime(stop_after=len(expected))
    sup = _supervisor("auto", fake, rand)
    dials: list[str] = []

    async def dial(protocol: str, edge: str):
        dials.append(protocol)
        raise DialFailed("connection refused")

    sup._dial = dial  # type: ignore[method-assign]
    await asyncio.wait_for(sup._connection_loop(0), 10)
    # The first switch is tried at once; after that every attempt, on either transport, waits.
    assert fake.delays == expected
    assert dials == ["websocket", "quic"] * (len(expected) // 2)
    lines = _attempt_lines(caplog)
    assert len(lines) == len(dials), lines  # one line per attempt
    assert "falling back to quic" in lines[0] and "reconnecting in 0.0s" in lines[0]
    assert "switching back to websocket" in lines[1]
    # With the edge down for 20 s: at most 6 attempts (at 0, 0, 1, 3, 7, 15 s), not thousands.
    at, t = [], 0.0
    for d in [0.0, *fake.delays]:
        t += d
        at.append(t)
    assert sum(1 for x in at if x < 20) <= 6 + (rand == 0.0)


async def test_fixed_protocol_backs_off_from_the_first_failure(caplog):
    caplog.set_level(logging.INFO, logger="connector")
    fake = FakeTime(stop_after=8)
    sup = _supervisor("quic", fake, 1.0)

    async def dial(protocol: str, edge: str):
        assert protocol == "quic"
        raise DialFailed("no answer")

    sup._dial = dial  # type: ignore[method-assign]
    await asyncio.wait_for(sup._connection_loop(0), 10)
    assert fake.delays == [1, 2, 4, 8, 16, 32, 32, 32]
    assert len(_attempt_lines(caplog)) == 8


def test_policy_gives_one_free_switch_per_outage_and_resets_on_success():
    policy = ReconnectPolicy(Backoff(rand=lambda: 1.0))
    assert policy.failed(switched=True) == 0.0  # the other transport, at once
    assert policy.failed(switched=True) == 1.0  # it failed too: now we wait
    assert policy.failed(switched=False) == 2.0
    assert policy.failed(switched=True) == 4.0
    policy.succeeded()
    assert policy.failed(switched=False) == 1.0  # a new outage starts at the shortest delay
    assert policy.failed(switched=True) == 0.0  # and gets its one free switch
    assert policy.failed(switched=True) == 2.0


@pytest.mark.parametrize("reason, final", [
    ("closed by peer (1008 registration refused: the tunnel secret is wrong (is the token current?))",
     "the tunnel secret is wrong (is the token current?)"),
    ("closed by peer (registration refused: the tunnel was deleted on the edge)", "the tunnel was deleted on the edge"),
    ("closed by peer (1008 registration refused)", "registration refused"),
    ("registration refused: tunnel x does not exist (was it deleted?)", "tunnel x does not exist (was it deleted?)"),
    ("closed by peer (1000 )", None),
    ("no packets from the peer for 6s", None),
    ("", None),
])
def test_final_refusal_is_read_from_the_close_reason_of_either_transport(reason, final):
    assert _final_refusal(reason) == final


class _Stream:
    def __init__(self) -> None:
        self.id, self.handler, self.closed, self.sent = 0, None, False, []

    def set_handler(self, handler) -> None:
        self.handler = handler

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def consumed(self, n: int) -> None:
        pass


class _ClosingLink:
    """A link the edge closes right after the connector registers, with `reason`; `message`
    (if any) arrives on the control stream just before the close."""

    def __init__(self, reason: str, message: dict | None) -> None:
        self.close_reason = ""
        self.on_stream = None
        self._reason, self._message = reason, message
        self._closed = asyncio.Event()
        self.stream = _Stream()

    def open_stream(self):
        asyncio.get_running_loop().call_soon(self._peer_answers)
        return self.stream

    def _peer_answers(self) -> None:
        from tunnel.messages import encode
        h = self.stream.handler
        if self._message is not None:
            h.stream_data(encode(self._message))
        self.close_reason = self._reason
        h.stream_reset(5, "tunnel connection closed")
        self._closed.set()

    async def run(self) -> None:
        await self._closed.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._closed.set()

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def stream_count(self) -> int:
        return 1


@pytest.mark.parametrize("reason, message, text", [
    # QUIC today: the error message is lost with the connection, only the close reason arrives
    ("closed by peer (registration refused: the tunnel secret is wrong (is the token current?))", None,
     "the tunnel secret is wrong"),
    # the message arrives in the same read as the close: it must not be dropped for the close
    ("closed by peer (1008 )", {"type": "error", "code": "tunnel_not_found", "permanent": True,
                                "message": "tunnel t does not exist (was it deleted?)"}, "does not exist"),
])
async def test_a_refusal_at_registration_is_final_however_it_arrives(reason, message, text):
    fake = FakeTime(stop_after=3)
    sup = _supervisor("quic", fake, 1.0)

    async def dial(protocol: str, edge: str):
        return _ClosingLink(reason, message)

    sup._dial = dial  # type: ignore[method-assign]
    with pytest.raises(FatalError, match=text):
        await asyncio.wait_for(sup._connect_once(0, "quic", "127.0.0.1:9", ReconnectPolicy(Backoff())), 10)
    assert fake.delays == []
