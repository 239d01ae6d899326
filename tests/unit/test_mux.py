"""Unit and property tests for the sans-I/O multiplexer (tunnel/mux.py). No sockets."""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.mux import (
    DEFAULT_WINDOW,
    HEADER,
    MAX_FRAME_PAYLOAD,
    MAX_MESSAGE,
    DataReceived,
    Event,
    FrameType,
    GoAway,
    Mux,
    MuxError,
    MuxProtocolError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)

U32 = struct.Struct("!I")


# ------------------------------------------------------------------------------ helpers


def frame(sid: int, ftype: int, payload: bytes = b"", length: int | None = None) -> bytes:
    return HEADER.pack(sid, ftype, len(payload) if length is None else length) + payload


def parse(message: bytes) -> list[tuple[int, FrameType, bytes]]:
    """Split a message into (stream_id, type, payload) without going through a Mux."""
    out = []
    off = 0
    while off < len(message):
        sid, ftype, length = HEADER.unpack_from(message, off)
        off += HEADER.size
        out.append((sid, FrameType(ftype), message[off : off + length]))
        off += length
    assert off == len(message)
    return out


def data_of(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


class Pair:
    """A client Mux and a server Mux wired back to back (like h11's ConnectionPair)."""

    def __init__(self, *, consume: bool = True, **kwargs: Any) -> None:
        self.client = Mux(client=True, **kwargs)
        self.server = Mux(client=False, **kwargs)
        self.consume = consume  # report received data as delivered immediately
        self.c2s: list[bytes] = []  # every message ever sent, for wire-level assertions
        self.s2c: list[bytes] = []

    def step(self, src: Mux, dst: Mux, log: list[bytes], src_ev: list[Event], dst_ev: list[Event]) -> bool:
        msgs = src.messages_to_send()
        src_ev.extend(src.events())  # StreamWritable is produced while sending
        log.extend(msgs)
        for m in msgs:
            dst.receive_message(m)
            evs = dst.events()
            if self.consume:
                for e in evs:
                    if isinstance(e, DataReceived):
                        dst.consumed(e.stream_id, len(e.data))
            dst_ev.extend(evs)
        return bool(msgs)

    def pump(self, max_rounds: int = 10_000) -> tuple[list[Event], list[Event]]:
        """Exchange messages until both sides are quiet; returns (client events, server events)."""
        cev: list[Event] = []
        sev: list[Event] = []
        for _ in range(max_rounds):
            a = self.step(self.client, self.server, self.c2s, cev, sev)
            b = self.step(self.server, self.client, self.s2c, sev, cev)
            if not (a or b):
                assert not self.client.wants_write and not self.server.wants_write
                return cev, sev
        raise AssertionError("pair did not settle")


def protocol_error(mux: Mux, message: bytes) -> MuxProtocolError:
    with pytest.raises(MuxProtocolError) as info:
        mux.receive_message(message)
    assert info.value.close_code == 1002
    assert info.value.reason and str(info.value) == info.value.reason
    return info.value


# ------------------------------------------------------------------------------ basics


def test_constants_and_wire_header() -> None:
    assert DEFAULT_WINDOW == 256 * 1024 and MAX_FRAME_PAYLOAD == 64 * 1024 and MAX_MESSAGE == 256 * 1024
    assert HEADER.size == 9
    m = Mux(client=True)
    sid = m.open_stream()
    m.send(sid, b"hi")
    (msg,) = m.messages_to_send()
    assert msg == b"\x00\x00\x00\x01\x01\x00\x00\x00\x00" + b"\x00\x00\x00\x01\x02\x00\x00\x00\x02hi"


def test_open_data_fin_both_ways_and_forget() -> None:
    p = Pair()
    sid = p.client.open_stream()
    assert sid == 1 and p.client.stream_count == 1
    assert p.client.send(sid, b"hello ") is True
    assert p.client.send(sid, memoryview(b"world")) is True
    p.client.send_fin(sid)
    cev, sev = p.pump()
    assert sev == [StreamOpened(1), DataReceived(1, b"hello world"), StreamEnded(1)]
    assert p.server.stream_count == 1 and p.client.stream_count == 1  # half-closed only

    p.server.send(sid, b"back")
    p.server.send_fin(sid)
    cev, sev = p.pump()
    assert cev == [DataReceived(1, b"back"), StreamEnded(1)]
    assert p.client.stream_count == 0 and p.server.stream_count == 0
    assert p.client.buffered(sid) == 0
    with pytest.raises(MuxError):
        p.client.send(sid, b"x")


def test_server_opened_stream() -> None:
    p = Pair()
    sid = p.server.open_stream()
    assert sid == 2
    p.server.send(sid, b"ping")
    cev, _ = p.pump()
    assert cev == [StreamOpened(2), DataReceived(2, b"ping")]
    p.client.send(sid, b"pong")
    _, sev = p.pump()
    assert sev == [DataReceived(2, b"pong")]


def test_half_close_keeps_other_direction_open() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.client.send_fin(sid)
    _, sev = p.pump()
    assert sev == [StreamOpened(sid), StreamEnded(sid)]
    with pytest.raises(MuxError):
        p.client.send(sid, b"after fin")
    p.client.send_fin(sid)  # repeated FIN is a no-op
    for i in range(3):
        p.server.send(sid, b"chunk%d" % i)
        cev, _ = p.pump()
        assert cev == [DataReceived(sid, b"chunk%d" % i)]
    assert p.client.stream_count == 1 and p.server.stream_count == 1
    p.server.send_fin(sid)
    cev, _ = p.pump()
    assert cev == [StreamEnded(sid)]
    assert p.client.stream_count == 0 and p.server.stream_count == 0
    assert p.c2s and all(t != FrameType.FIN or s == sid for m in p.c2s for s, t, _ in parse(m))


def test_fin_goes_after_queued_data() -> None:
    p = Pair(window=100, max_frame=40)
    sid = p.client.open_stream()
    p.client.send(sid, b"a" * 250)
    p.client.send_fin(sid)
    first = p.client.messages_to_send()
    frames = [f for m in first for f in parse(m)]
    # only the window's worth goes out and FIN must wait behind the rest of the data
    assert [t for _, t, _ in frames] == [FrameType.OPEN] + [FrameType.DATA] * 3
    assert sum(len(pl) for _, t, pl in frames if t == FrameType.DATA) == 100
    p.c2s.extend(first)
    for m in first:
        p.server.receive_message(m)
    for e in p.server.events():
        if isinstance(e, DataReceived):
            p.server.consumed(e.stream_id, len(e.data))
    p.pump()
    wire = [f for m in p.c2s for f in parse(m)]
    assert wire[-1][1] == FrameType.FIN
    assert sum(len(pl) for _, t, pl in wire if t == FrameType.DATA) == 250


def test_send_errors_and_noops() -> None:
    m = Mux(client=True)
    with pytest.raises(MuxError):
        m.send(1, b"x")  # never opened
    with pytest.raises(MuxError):
        m.send(2, b"x")
    m.send_fin(7)  # unknown: no-op
    m.reset(7, 1)  # unknown: no-op
    m.consumed(7, 100)  # unknown: no-op
    assert not m.wants_write and m.messages_to_send() == []
    sid = m.open_stream()
    assert m.send(sid, b"") is True
    assert [t for _, t, _ in parse(m.messages_to_send()[0])] == [FrameType.OPEN]  # no empty DATA
    m.reset(sid, 0)
    with pytest.raises(MuxError):
        m.send(sid, b"x")


def test_invalid_configuration_and_id_exhaustion() -> None:
    for kwargs in ({"window": 0}, {"window": 2**31}, {"max_frame": 8}, {"max_message": 0}, {"high_water": -1}):
        with pytest.raises(ValueError):
            Mux(client=True, **kwargs)
    m = Mux(client=True)
    m._next_id = 2**32 - 1  # white-box: the last odd id
    assert m.open_stream() == 2**32 - 1
    with pytest.raises(MuxError, match="exhausted"):
        m.open_stream()


def test_receive_accepts_any_bytes_like() -> None:
    m = Mux(client=False)
    m.receive_message(bytearray(frame(1, 1)))
    m.receive_message(memoryview(frame(1, 2, b"abc")))
    events = m.events()
    assert events == [StreamOpened(1), DataReceived(1, b"abc")]
    assert type(events[1].data) is bytes


def test_send_copies_mutable_buffers() -> None:
    p = Pair()
    sid = p.client.open_stream()
    buf = bytearray(b"abc")
    p.client.send(sid, buf)
    p.client.send(sid, memoryview(buf))
    buf[:] = b"XYZ"
    _, sev = p.pump()
    assert data_of(sev, sid) == b"abcabc"


# ------------------------------------------------------------------------------ reset


def test_reset_client_to_server_with_reason() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.client.send(sid, b"data")
    p.pump()
    p.client.send(sid, b"dropped" * 1000)
    assert p.client.buffered(sid) == 7000
    p.client.reset(sid, 7, "origin refused")
    assert p.client.stream_count == 0 and p.client.buffered(sid) == 0
    _, sev = p.pump()
    assert sev == [StreamReset(sid, 7, "origin refused")]
    assert p.server.stream_count == 0
    last = [f for m in p.c2s[-1:] for f in parse(m)]
    assert [t for _, t, _ in last] == [FrameType.RST]  # queued data was dropped, not sent
    p.client.reset(sid, 7)  # already forgotten: no-op
    assert not p.client.wants_write


def test_reset_server_to_client_unicode_and_long_reason() -> None:
    p = Pair()
    a = p.client.open_stream()
    b = p.client.open_stream()
    p.pump()
    p.server.reset(a, 0xFFFFFFFF, "naïve ✓")
    p.server.reset(b, 3, "é" * 5000)  # truncated on a character boundary
    cev, _ = p.pump()
    assert cev[0] == StreamReset(a, 0xFFFFFFFF, "naïve ✓")
    assert isinstance(cev[1], StreamReset) and cev[1].code == 3
    assert cev[1].reason == "é" * 512
    assert p.client.stream_count == 0 and p.server.stream_count == 0


def test_reset_before_open_is_flushed_keeps_order() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.client.send(sid, b"x")
    p.client.reset(sid, 1, "changed my mind")
    _, sev = p.pump()
    assert sev == [StreamOpened(sid), StreamReset(sid, 1, "changed my mind")]


def test_late_frames_after_forget_are_ignored() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.pump()
    # both sides act at once: the client's data crosses the server's RST on the wire
    p.client.send(sid, b"in flight")
    in_flight = p.client.messages_to_send()
    p.server.reset(sid, 9, "bye")
    for m in in_flight:
        p.server.receive_message(m)
    assert p.server.events() == []
    cev, sev = p.pump()
    assert cev == [StreamReset(sid, 9, "bye")] and sev == []
    # every kind of stream frame for the forgotten id is ignored on both sides
    late = frame(sid, 2, b"x") + frame(sid, 3) + frame(sid, 4, U32.pack(1)) + frame(sid, 5, U32.pack(10))
    p.server.receive_message(late)
    p.client.receive_message(late)
    assert p.server.events() == [] and p.client.events() == []
    # frames for an id that was never opened (of either parity) are ignored too
    p.client.receive_message(frame(100, 2, b"x") + frame(101, 5, U32.pack(1)))
    assert p.client.events() == []


def test_late_frames_after_clean_close_are_ignored() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.client.send_fin(sid)
    p.pump()
    p.server.send_fin(sid)
    p.pump()
    assert p.client.stream_count == 0 and p.server.stream_count == 0
    p.client.receive_message(frame(sid, 2, b"late") + frame(sid, 3))
    assert p.client.events() == []


# ------------------------------------------------------------------------------ flow control


def test_sender_stops_at_window_and_resumes_after_consumed() -> None:
    p = Pair(consume=False, window=1000, max_frame=300)
    sid = p.client.open_stream()
    p.client.send(sid, bytes(range(250)) * 20)  # 5000 bytes
    _, sev = p.pump()
    assert len(data_of(sev, sid)) == 1000
    assert p.client.buffered(sid) == 4000 and not p.client.wants_write

    p.server.consumed(sid, 249)  # below window // 4: batched, nothing sent
    assert not p.server.wants_write
    p.server.consumed(sid, 1)
    (msg,) = p.server.messages_to_send()
    assert parse(msg) == [(sid, FrameType.WINDOW, U32.pack(250))]
    p.client.receive_message(msg)
    assert p.client.wants_write
    _, sev = p.pump()
    assert len(data_of(sev, sid)) == 250
    assert p.client.buffered(sid) == 3750

    p.consume = True
    p.server.consumed(sid, 1000)  # the rest of what it holds
    _, sev2 = p.pump()
    assert p.client.buffered(sid) == 0
    assert len(data_of(sev2, sid)) == 3750


def test_consumed_is_clamped_to_received() -> None:
    p = Pair(consume=False, window=1000)
    sid = p.client.open_stream()
    p.client.send(sid, b"x" * 400)
    p.pump()
    p.server.consumed(sid, 10**9)  # more than it ever received
    (msg,) = p.server.messages_to_send()
    assert parse(msg) == [(sid, FrameType.WINDOW, U32.pack(400))]
    p.server.consumed(sid, 1)
    assert not p.server.wants_write


def test_consumed_after_peer_fin_sends_nothing() -> None:
    p = Pair(consume=False, window=100)
    sid = p.client.open_stream()
    p.client.send(sid, b"x" * 100)
    p.client.send_fin(sid)
    p.pump()
    p.server.consumed(sid, 100)
    assert not p.server.wants_write


def test_stream_writable_after_backpressure() -> None:
    p = Pair(consume=False, window=1000, high_water=100)
    sid = p.client.open_stream()
    assert p.client.send(sid, b"a" * 100) is True  # at high water, not above
    assert p.client.send(sid, b"a" * 1) is False
    assert p.client.send(sid, b"a" * 1000) is False
    cev, _ = p.pump()
    assert of_type(cev, StreamWritable) == []  # 101 bytes still queued (window exhausted)
    assert p.client.buffered(sid) == 101
    p.server.consumed(sid, 1000)
    cev, _ = p.pump()
    assert of_type(cev, StreamWritable) == [StreamWritable(sid)]
    assert p.client.send(sid, b"b") is True
    cev, _ = p.pump()
    assert of_type(cev, StreamWritable) == []  # only after a False


def test_writable_emitted_at_low_water_not_only_at_empty() -> None:
    m = Mux(client=True, window=10_000, max_frame=16, max_message=40, high_water=100)
    sid = m.open_stream()
    assert m.send(sid, b"z" * 150) is False
    m.messages_to_send()
    assert m.events() == [StreamWritable(sid)]
    assert m.buffered(sid) == 0


def test_window_overflow_is_protocol_error() -> None:
    m = Mux(client=True, window=1000)
    sid = m.open_stream()
    m.receive_message(frame(sid, 5, U32.pack(2**31 - 1 - 1000)))  # exactly at the cap
    err = protocol_error(m, frame(sid, 5, U32.pack(1)))
    assert "overflow" in err.reason


def test_data_beyond_window_is_protocol_error() -> None:
    m = Mux(client=False, window=100, max_frame=1000)
    m.receive_message(frame(1, 1) + frame(1, 2, b"x" * 60))
    err = protocol_error(m, frame(1, 2, b"x" * 41))
    assert "exceeds the receive window" in err.reason and "40" in err.reason


# ------------------------------------------------------------------------------ batching


def test_many_small_frames_are_batched() -> None:
    p = Pair()
    sids = [p.client.open_stream() for _ in range(50)]
    for i in range(20):
        for sid in sids:
            p.client.send(sid, b"%04d" % i)
    msgs = p.client.messages_to_send()
    assert len(msgs) == 1
    # small sends on one stream are coalesced into one DATA frame per stream
    assert [t for _, t, _ in parse(msgs[0])].count(FrameType.DATA) == 50
    for m in msgs:
        p.server.receive_message(m)
    ev = p.server.events()
    assert all(data_of(ev, sid) == b"".join(b"%04d" % i for i in range(20)) for sid in sids)


def test_message_size_cap_and_frame_split() -> None:
    p = Pair(window=2**20)
    sid = p.client.open_stream()
    payload = bytes(range(256)) * 4096  # 1 MiB
    p.client.send(sid, payload)
    msgs = p.client.messages_to_send()
    assert len(msgs) == 5  # 1 MiB + headers in 256 KiB messages
    assert all(len(m) <= MAX_MESSAGE for m in msgs)
    assert sum(len(m) for m in msgs[:-1]) == 4 * MAX_MESSAGE  # messages are filled up
    for m in msgs:
        assert all(len(pl) <= MAX_FRAME_PAYLOAD for _, _, pl in parse(m))
        p.server.receive_message(m)
    assert data_of(p.server.events(), sid) == payload


def test_control_frames_respect_message_cap() -> None:
    m = Mux(client=True, max_message=100)
    for _ in range(30):
        m.open_stream()
    msgs = m.messages_to_send()
    assert len(msgs) == 3 and all(len(x) <= 100 for x in msgs)  # 11 OPENs (99 bytes) per message


@pytest.mark.parametrize("max_message", [5, 30])
def test_small_message_size(max_message: int) -> None:
    p = Pair(max_message=max_message, max_frame=50)
    sid = p.client.open_stream()
    p.client.send(sid, b"q" * 120)
    _, sev = p.pump()
    assert data_of(sev, sid) == b"q" * 120
    # DATA frames shrink to fit the message when there is room; otherwise one frame per message
    limit = max_message if max_message > HEADER.size else HEADER.size + 50
    assert all(len(m) <= limit for m in p.c2s[1:])


# ------------------------------------------------------------------------------ fairness


def test_stream_without_credit_does_not_block_others() -> None:
    p = Pair(consume=False, window=1000)
    bulk = p.client.open_stream()
    other = p.client.open_stream()
    p.client.send(bulk, b"B" * 100_000)
    p.pump()
    assert p.client.buffered(bulk) == 99_000
    p.client.send(other, b"small")
    _, sev = p.pump()
    assert sev == [DataReceived(other, b"small")]


def test_round_robin_between_bulk_streams() -> None:
    m = Mux(client=True, window=2**20, max_frame=1000, max_message=10**9)
    a, b, c = m.open_stream(), m.open_stream(), m.open_stream()
    m.send(a, b"a" * 10_000)
    m.send(b, b"b" * 10_000)
    m.send(c, b"c" * 1_500)
    (msg,) = m.messages_to_send()
    order = [sid for sid, t, _ in parse(msg) if t == FrameType.DATA]
    assert order[:6] == [a, b, c, a, b, c]
    assert order[6:] == [a, b] * 8


def test_round_robin_survives_across_messages() -> None:
    # a stream that just filled a message must not be served first again next time
    m = Mux(client=True, window=2**20, max_frame=100, max_message=109)  # one DATA frame per message
    a, b = m.open_stream(), m.open_stream()
    m.messages_to_send()
    m.send(a, b"a" * 1000)
    m.send(b, b"b" * 1000)
    msgs = m.messages_to_send()
    order = [parse(x)[0][0] for x in msgs]
    assert order[:4] == [a, b, a, b]


# ------------------------------------------------------------------------------ ids, max_streams, goaway


def test_id_parity_and_monotonicity() -> None:
    c = Mux(client=True)
    s = Mux(client=False)
    assert [c.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [s.open_stream() for _ in range(3)] == [2, 4, 6]
    server = Mux(client=False)
    server.receive_message(frame(1, 1) + frame(7, 1))  # gaps are fine
    assert server.events() == [StreamOpened(1), StreamOpened(7)]
    assert "parity" in protocol_error(server, frame(8, 1)).reason
    assert "not greater" in protocol_error(Mux(client=False), frame(7, 1) + frame(5, 1)).reason
    assert "not greater" in protocol_error(Mux(client=False), frame(3, 1) + frame(3, 1)).reason
    client = Mux(client=True)
    assert "parity" in protocol_error(client, frame(3, 1)).reason


def test_max_streams_refusal_and_local_limit() -> None:
    p = Pair()
    p.server = Mux(client=False, max_streams=2)
    ids = [p.client.open_stream() for _ in range(3)]
    cev, sev = p.pump()
    assert sev == [StreamOpened(ids[0]), StreamOpened(ids[1])]
    assert cev == [StreamReset(ids[2], 2, "too many streams")]
    assert p.server.stream_count == 2 and p.client.stream_count == 2
    # late data for the refused id is ignored, and the id stays burnt
    p.server.receive_message(frame(ids[2], 2, b"x"))
    assert p.server.events() == []
    protocol_error(p.server, frame(ids[2], 1))

    m = Mux(client=True, max_streams=2)
    m.open_stream()
    m.open_stream()
    with pytest.raises(MuxError, match="too many"):
        m.open_stream()


def test_go_away() -> None:
    p = Pair()
    sid = p.client.open_stream()
    p.pump()
    p.client.go_away(0, "shutting down")
    assert p.client.goaway_sent and not p.client.goaway_received
    with pytest.raises(MuxError):
        p.client.open_stream()
    cev, sev = p.pump()
    assert sev == [GoAway(0, "shutting down")]
    assert p.server.goaway_received
    with pytest.raises(MuxError):
        p.server.open_stream()
    # existing streams keep working in both directions
    p.server.send(sid, b"still")
    p.client.send(sid, b"here")
    cev, sev = p.pump()
    assert data_of(cev, sid) == b"still" and data_of(sev, sid) == b"here"
    # the peer announced it opens no more streams: an OPEN now is a violation
    assert "GOAWAY" in protocol_error(p.server, frame(99, 1)).reason


def test_goaway_payload_and_stream() -> None:
    m = Mux(client=True)
    m.receive_message(frame(0, 6, U32.pack(5) + b"\xff\xfebad utf8"))
    (ev,) = m.events()
    assert ev.code == 5 and ev.reason.endswith("bad utf8") and "\ufffd" in ev.reason
    assert "stream 0" in protocol_error(Mux(client=True), frame(2, 6, U32.pack(0))).reason
    assert "at least 4" in protocol_error(Mux(client=True), frame(0, 6, b"\x00\x01")).reason


def test_events_in_arrival_order() -> None:
    m = Mux(client=True)
    a = m.open_stream()
    m.receive_message(
        frame(2, 1) + frame(a, 2, b"1") + frame(2, 2, b"2") + frame(a, 3) + frame(2, 4, U32.pack(4) + b"r")
        + frame(0, 6, U32.pack(0))
    )
    assert m.events() == [
        StreamOpened(2),
        DataReceived(a, b"1"),
        DataReceived(2, b"2"),
        StreamEnded(a),
        StreamReset(2, 4, "r"),
        GoAway(0, ""),
    ]
    assert m.events() == []


# ------------------------------------------------------------------------------ protocol errors


def opened_server(window: int = DEFAULT_WINDOW) -> Mux:
    m = Mux(client=False, window=window)
    m.receive_message(frame(1, 1))
    m.events()
    return m


@pytest.mark.parametrize(
    ("message", "expect"),
    [
        (b"\x00\x00\x00\x01\x02", "truncated frame header"),
        (frame(1, 2, b"x") + b"\x00\x00", "truncated frame header"),
        (frame(1, 2, b"abc", length=10), "truncated frame payload"),
        (frame(1, 9), "unknown frame type 9"),
        (frame(1, 0), "unknown frame type 0"),
        (HEADER.pack(1, 2, 16 * 1024 * 1024), "frame length 16777216 exceeds maximum 65536"),
        (frame(1, 2, b"x" * (MAX_FRAME_PAYLOAD + 1)), "exceeds maximum"),
        (frame(0, 2, b"x"), "stream 0"),
        (frame(0, 1), "stream 0"),
        (frame(0, 3), "stream 0"),
        (frame(0, 4, U32.pack(0)), "stream 0"),
        (frame(0, 5, U32.pack(1)), "stream 0"),
        (frame(1, 5, b"\x00\x00\x01"), "WINDOW payload must be 4 bytes"),
        (frame(1, 5, b"\x00\x00\x00\x00\x01"), "WINDOW payload must be 4 bytes"),
        (frame(1, 5, U32.pack(0)), "WINDOW increment 0"),
        (frame(1, 4, b"\x00\x00\x00"), "RST payload must be at least 4 bytes"),
        (frame(1, 3) + frame(1, 2, b"x"), "DATA on stream 1 after FIN"),
        (frame(1, 3) + frame(1, 3), "duplicate FIN"),
        (frame(3, 1, b"x"), "OPEN payload must be empty"),
        (frame(1, 3, b"x"), "FIN payload must be empty"),
        (frame(1, 2, b"x" * (DEFAULT_WINDOW // 4)) * 4 + frame(1, 2, b"x"), "exceeds the receive window"),
    ],
)
def test_protocol_errors(message: bytes, expect: str) -> None:
    err = protocol_error(opened_server(), message)
    assert expect in err.reason


def test_oversized_header_rejected_before_payload_arrives() -> None:
    m = Mux(client=True, max_frame=1000)
    err = protocol_error(m, HEADER.pack(2, 2, 1001))
    assert err.reason == "frame length 1001 exceeds maximum 1000"


def test_rst_reason_bad_utf8_is_replaced() -> None:
    m = opened_server()
    m.receive_message(frame(1, 4, U32.pack(1) + b"bad \xc3\x28"))
    (ev,) = m.events()
    assert ev == StreamReset(1, 1, "bad \ufffd(")


# ------------------------------------------------------------------------------ properties


class Side:
    """Test-side model of one application using one Mux."""

    def __init__(self, mux: Mux) -> None:
        self.mux = mux
        self.inbox: deque[bytes] = deque()
        self.writable: set[int] = set()  # may send (known, not FIN'd, not reset)
        self.sent: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.unconsumed: dict[int, int] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.waiting: set[int] = set()  # send() returned False, StreamWritable not seen yet

    def add(self, sid: int) -> None:
        self.writable.add(sid)
        self.sent[sid] = bytearray()
        self.received[sid] = bytearray()
        self.unconsumed[sid] = 0

    def handle(self) -> None:
        for ev in self.mux.events():
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, StreamOpened):
                assert sid not in self.sent
                self.add(sid)
            elif isinstance(ev, DataReceived):
                assert ev.data and sid not in self.ended and sid not in self.reset
                self.received[sid] += ev.data
                self.unconsumed[sid] += len(ev.data)
            elif isinstance(ev, StreamEnded):
                assert sid not in self.ended
                self.ended.add(sid)
            elif isinstance(ev, StreamReset):
                self.reset.add(sid)
                self.writable.discard(sid)
                self.waiting.discard(sid)
            elif isinstance(ev, StreamWritable):
                self.waiting.discard(sid)

    def flush(self, peer: Side, max_message: int, max_frame: int) -> None:
        for msg in self.mux.messages_to_send():
            assert len(msg) <= max(max_message, HEADER.size + max_frame) + HEADER.size + 4 + 1024
            peer.inbox.append(msg)
        self.handle()

    def deliver(self, n: int) -> None:
        for _ in range(min(n, len(self.inbox))):
            self.mux.receive_message(self.inbox.popleft())
        self.handle()

    def consume(self, sid: int, n: int) -> None:
        n = min(n, self.unconsumed.get(sid, 0))
        self.unconsumed[sid] -= n
        self.mux.consumed(sid, n)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_interleavings_deliver_exactly_in_order(data: st.DataObject) -> None:
    cfg = dict(
        window=data.draw(st.integers(1, 3000), label="window"),
        max_frame=data.draw(st.integers(16, 800), label="max_frame"),
        max_message=data.draw(st.integers(1, 4000), label="max_message"),
        high_water=data.draw(st.integers(0, 3000), label="high_water"),
    )
    c = Side(Mux(client=True, **cfg))
    s = Side(Mux(client=False, **cfg))
    peer = {id(c): s, id(s): c}
    ops = st.sampled_from(["open", "send", "send", "send", "flush", "deliver", "consume", "fin", "reset"])
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        op = data.draw(ops)
        side = data.draw(st.sampled_from([c, s]))
        other = peer[id(side)]
        if op == "open":
            if len(c.sent) + len(s.sent) < 12:
                side.add(side.mux.open_stream())
        elif op == "send" and side.writable:
            sid = data.draw(st.sampled_from(sorted(side.writable)))
            chunk = data.draw(st.binary(min_size=0, max_size=2500))
            side.sent[sid] += chunk
            if side.mux.send(sid, chunk):
                assert side.mux.buffered(sid) <= cfg["high_water"]
            else:
                side.waiting.add(sid)
        elif op == "flush":
            side.flush(other, cfg["max_message"], cfg["max_frame"])
        elif op == "deliver":
            side.deliver(data.draw(st.integers(1, 3)))
        elif op == "consume" and side.unconsumed:
            sid = data.draw(st.sampled_from(sorted(side.unconsumed)))
            side.consume(sid, data.draw(st.integers(0, 3000)))
        elif op == "fin" and side.writable:
            sid = data.draw(st.sampled_from(sorted(side.writable)))
            side.writable.discard(sid)
            side.mux.send_fin(sid)
        elif op == "reset" and side.writable and data.draw(st.integers(0, 3)) == 0:
            sid = data.draw(st.sampled_from(sorted(side.writable)))
            side.writable.discard(sid)
            side.waiting.discard(sid)
            side.reset.add(sid)
            side.mux.reset(sid, 1, "test")

    # Finish: FIN everything still open, then run the link with full consumption until quiet.
    for _ in range(100_000):
        for side in (c, s):
            for sid in sorted(side.writable):  # includes streams only now learned from the peer
                side.mux.send_fin(sid)
            side.writable.clear()
            for sid in list(side.unconsumed):
                side.consume(sid, side.unconsumed[sid])
            side.flush(peer[id(side)], cfg["max_message"], cfg["max_frame"])
        for side in (c, s):
            side.deliver(len(side.inbox))
        busy = (
            side.inbox or side.mux.wants_write or side.writable or any(side.unconsumed.values()) for side in (c, s)
        )
        if not any(busy):
            break
    else:
        raise AssertionError("link did not settle")

    for a, b in ((c, s), (s, c)):
        for sid, sent in a.sent.items():
            got = bytes(b.received.get(sid, b""))
            if sid in a.reset or sid in b.reset:
                assert bytes(sent).startswith(got)
            else:
                assert got == bytes(sent)
                assert sid in b.ended
        assert not a.waiting, "StreamWritable missing after send() returned False"
    assert c.mux.stream_count == 0 and s.mux.stream_count == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_random_garbage_never_crashes(garbage: bytes, client: bool) -> None:
    m = Mux(client=client, max_frame=64)
    try:
        m.receive_message(garbage)
    except MuxProtocolError as exc:
        assert exc.close_code == 1002 and exc.reason
    m.events()
    m.messages_to_send()


_frames = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 2**32 - 1]),  # ids: ours, theirs, 0, far away
        st.integers(0, 8),  # includes unknown types
        st.binary(max_size=12),
        st.one_of(st.none(), st.integers(0, 80)),  # sometimes lie about the length
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_frames, min_size=1, max_size=4), st.booleans())
def test_random_frame_sequences_never_crash(messages: list[Any], client: bool) -> None:
    m = Mux(client=client, window=20, max_frame=64, max_streams=3)
    for _ in range(2):
        m.open_stream()
    for frames in messages:
        msg = b"".join(frame(sid, t, pl, ln) for sid, t, pl, ln in frames)
        try:
            m.receive_message(msg)
        except MuxProtocolError as exc:
            assert exc.close_code == 1002 and exc.reason
            break
        for ev in m.events():
            if isinstance(ev, DataReceived):
                m.consumed(ev.stream_id, len(ev.data))
            if isinstance(ev, StreamOpened) and ev.stream_id % 4 == 1:
                m.send(ev.stream_id, b"reply")
        m.messages_to_send()
        assert m.stream_count <= 3 + 2
