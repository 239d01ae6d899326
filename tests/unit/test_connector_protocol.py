"""The connector's transport choice (connector/protocol.py): pure logic, time passed in."""

from __future__ import annotations

import pytest

from connector.protocol import AUTO_PREFERS, PROTOCOLS, REPROBE_INTERVAL, ProtocolSelector, other


def test_other_and_defaults() -> None:
    assert set(PROTOCOLS) == {"websocket", "quic"}
    assert other("websocket") == "quic" and other("quic") == "websocket"
    sel = ProtocolSelector("auto", now=5.0)
    assert sel.preferred == sel.current == AUTO_PREFERS
    assert sel.reprobe_interval == REPROBE_INTERVAL
    assert sel.since == 5.0 and sel.switches == 0 and sel.reason == "" and not sel.in_fallback
    assert sel.reprobe_at() is None


@pytest.mark.parametrize("mode", ["quic", "websocket"])
def test_fixed_mode_never_switches(mode: str) -> None:
    sel = ProtocolSelector(mode, prefer=other(mode), now=1.0)  # `prefer` only matters for auto
    assert sel.current == sel.preferred == mode
    for t, proto in enumerate([mode, other(mode), mode, mode], start=2):
        assert sel.failed(proto, "boom", now=float(t)) is None
        assert sel.current == mode and not sel.in_fallback
    assert sel.switches == 0 and sel.since == 1.0 and sel.reason == ""
    assert sel.reprobe_at() is None


@pytest.mark.parametrize("prefer", ["websocket", "quic"])
def test_auto_falls_back_on_failure_of_the_current_protocol(prefer: str) -> None:
    fallback = other(prefer)
    sel = ProtocolSelector("auto", prefer=prefer, reprobe_interval=30.0, now=0.0)
    assert sel.current == prefer
    assert sel.failed(prefer, "UDP blocked", now=10.0) == fallback
    assert sel.current == fallback and sel.preferred == prefer and sel.in_fallback
    assert sel.since == 10.0 and sel.switches == 1
    assert sel.reason == f"{prefer} failed: UDP blocked"
    assert sel.reprobe_at() == 40.0


def test_auto_ignores_failures_of_the_other_protocol() -> None:
    """Several HA connections fail together: the first switches, the others' reports of the
    protocol already left behind change nothing."""
    sel = ProtocolSelector("auto", prefer="quic", reprobe_interval=60.0, now=0.0)
    assert sel.failed("quic", "handshake timeout", now=1.0) == "websocket"
    for t in (1.1, 1.2, 1.3):
        assert sel.failed("quic", "handshake timeout", now=t) is None
    assert sel.current == "websocket" and sel.switches == 1 and sel.since == 1.0
    assert sel.reason == "quic failed: handshake timeout"
    assert sel.reprobe_at() == 61.0
    # also before any switch: a late report about the non-current protocol is ignored
    fresh = ProtocolSelector("auto", prefer="websocket", now=0.0)
    assert fresh.failed("quic", "x", now=1.0) is None
    assert fresh.current == "websocket" and fresh.switches == 0


def test_auto_alternates_when_the_fallback_fails_too() -> None:
    sel = ProtocolSelector("auto", prefer="websocket", reprobe_interval=100.0, now=0.0)
    assert sel.failed("websocket", "refused", now=1.0) == "quic"
    assert sel.failed("quic", "no answer", now=2.0) == "websocket"
    # back on the preferred one: not in fallback, so no re-probe is scheduled
    assert sel.current == "websocket" and not sel.in_fallback and sel.reprobe_at() is None
    assert sel.reason == "quic failed: no answer" and sel.switches == 2 and sel.since == 2.0
    assert sel.failed("websocket", "refused", now=3.0) == "quic"
    assert sel.switches == 3 and sel.reprobe_at() == 103.0


def test_reprobe_schedule_probe_failed_and_recovered() -> None:
    sel = ProtocolSelector("auto", prefer="quic", reprobe_interval=120.0, now=0.0)
    assert sel.reprobe_at() is None
    sel.failed("quic", "UDP blocked", now=50.0)
    assert sel.reprobe_at() == 170.0
    sel.probe_failed(now=170.5)  # the preferred transport still does not answer
    assert sel.reprobe_at() == 290.5
    assert sel.current == "websocket" and sel.switches == 1  # a failed probe is not a switch
    sel.probe_failed(now=291.0)
    assert sel.reprobe_at() == 411.0
    sel.recovered(now=411.2)
    assert sel.current == "quic" and not sel.in_fallback
    assert sel.since == 411.2 and sel.reason == "re-probe succeeded" and sel.switches == 2
    assert sel.reprobe_at() is None
    # and it can fall back again later
    assert sel.failed("quic", "idle timeout", now=500.0) == "websocket"
    assert sel.reprobe_at() == 620.0 and sel.switches == 3


@pytest.mark.parametrize("mode,prefer", [("udp", "quic"), ("", "websocket"), ("AUTO", "quic"),
                                         ("auto", "http2"), ("quic", "tcp")])
def test_invalid_mode_or_preference_raises(mode: str, prefer: str) -> None:
    with pytest.raises(ValueError):
        ProtocolSelector(mode, prefer=prefer)
