"""Fuzz target: the tunnel multiplexer (tunnel/mux.py) against a hostile peer.

One honest `Mux` is driven by its application (open, send, consume, FIN, reset, GOAWAY) while
the peer's messages are generated frame by frame — mostly plausible (OPENs of the right parity,
DATA near the window, WINDOW grants, FIN, RST, GOAWAY), sometimes not (any id, any type, a lying
length) — and then mutated. Everything the honest side sends is checked by a reference validator
that knows only the wire format (docs/ARCHITECTURE.md), not the Mux:

- the peer can only make it raise `MuxProtocolError` (close code 1002 and a reason), never
  anything else; the application only `MuxError` for its own misuse;
- every frame it sends is well formed: known type, length ≤ max_frame, OPEN ids of its parity and
  increasing, WINDOW increments > 0, RST/GOAWAY with a code and a UTF-8 reason;
- it never sends more DATA on a stream than the peer's window allows (the initial window plus the
  peer's WINDOW grants), nothing after its FIN, FIN once;
- it never grants more credit than the data it received, and never delivers more data on a
  stream than its own window and grants allow (a peer overrunning the window is an error);
- it never holds more streams than max_streams plus its own, and what it sends back is bounded
  by what it was sent (no amplification loop).
"""

from __future__ import annotations

import struct
from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st

from tunnel.mux import (HEADER, MAX_WINDOW, DataReceived, Mux, MuxError, MuxProtocolError, StreamEnded, StreamOpened,
                        StreamReset)
from tests.fuzz._fuzz import fuzz, mutate, mutations

U32 = struct.Struct("!I")
OPEN, DATA, FIN, RST, WINDOW, GOAWAY = 1, 2, 3, 4, 5, 6


def frame(sid: int, ftype: int, payload: bytes = b"", length: int | None = None) -> bytes:
    return HEADER.pack(sid, ftype, len(payload) if length is None else length) + payload


class Validator:
    """What the honest side may send, from the wire alone."""

    def __init__(self, client: bool, window: int, max_frame: int) -> None:
        self.parity = 1 if client else 0  # the client opens odd ids
        self.window = window
        self.max_frame = max_frame
        self.last_open = 0
        self.sent = defaultdict(int)  # DATA bytes the honest side sent per stream
        self.granted_to_us = defaultdict(int)  # WINDOW increments the peer sent per stream
        self.fin = set()  # streams the honest side sent FIN on
        self.reset = set()  # streams the honest side reset
        self.peer_data = defaultdict(int)  # DATA bytes the peer sent per stream (accepted messages)
        self.granted_by_us = defaultdict(int)  # WINDOW increments the honest side sent per stream
        self.goaway = False
        self.control_bytes = 0  # every frame but DATA

    def peer_message(self, msg: bytes) -> None:
        """A peer message the honest side accepted whole."""
        off = 0
        while off < len(msg):
            sid, ftype, length = HEADER.unpack_from(msg, off)
            off += HEADER.size
            if ftype == WINDOW:
                self.granted_to_us[sid] += U32.unpack_from(msg, off)[0]
            elif ftype == DATA:
                self.peer_data[sid] += length
            off += length

    def honest_message(self, msg: bytes) -> None:
        off = 0
        while off < len(msg):
            assert len(msg) - off >= HEADER.size, "truncated frame header"
            sid, ftype, length = HEADER.unpack_from(msg, off)
            off += HEADER.size
            assert length <= self.max_frame and off + length <= len(msg), (sid, ftype, length)
            payload = msg[off:off + length]
            off += length
            if ftype != DATA:
                self.control_bytes += HEADER.size + length
            if ftype == OPEN:
                assert sid and sid % 2 == self.parity and sid > self.last_open and not payload and not self.goaway
                self.last_open = sid
            elif ftype == DATA:
                assert sid and sid not in self.fin and sid not in self.reset, f"DATA on {sid} after FIN/RST"
                self.sent[sid] += length
                assert self.sent[sid] <= self.window + self.granted_to_us[sid], \
                    f"stream {sid}: sent {self.sent[sid]} past the peer's credit"
            elif ftype == FIN:
                assert sid and not payload and sid not in self.fin and sid not in self.reset, f"FIN twice on {sid}"
                self.fin.add(sid)
            elif ftype == RST:
                assert sid and len(payload) >= 4
                payload[4:].decode("utf-8")
                self.reset.add(sid)
            elif ftype == WINDOW:
                assert sid and len(payload) == 4
                inc = U32.unpack(payload)[0]
                assert inc > 0
                self.granted_by_us[sid] += inc
                assert self.granted_by_us[sid] <= self.peer_data[sid], f"stream {sid}: credit for data never received"
                assert self.window + self.granted_by_us[sid] - self.peer_data[sid] <= MAX_WINDOW
            elif ftype == GOAWAY:
                assert sid == 0 and len(payload) >= 4
                payload[4:].decode("utf-8")
                self.goaway = True
            else:
                raise AssertionError(f"unknown frame type {ftype} sent")


# ------------------------------------------------------------------------ the peer's frames

# Operation kinds, repeated to weight them: mostly a plausible peer and a busy application
# (so examples get deep), sometimes a hostile peer.
PEER = ["open"] * 4 + ["data"] * 10 + ["window"] * 4 + ["fin", "rst", "goaway_peer", "raw"]
APP = ["app_open"] * 3 + ["send"] * 8 + ["consume"] * 6 + ["app_fin", "reset"] + ["flush"] * 5
OPS = PEER + APP + ["app_goaway"]


@fuzz(600)
@given(st.booleans(), st.integers(1, 3000), st.integers(16, 700), st.integers(1, 3000), st.integers(0, 3000),
       st.sampled_from([0, 1, 3, 4, 4, 4]), st.integers(0, 120), st.data())
def test_mux_against_a_hostile_peer(client: bool, window: int, max_frame: int, max_message: int, high_water: int,
                                    max_streams: int, n_steps: int, data: st.DataObject) -> None:
    mux = Mux(client=client, window=window, max_frame=max_frame, max_message=max_message, high_water=high_water,
              max_streams=max_streams)
    v = Validator(client, window, max_frame)
    peer_parity = 0 if client else 1
    next_peer_id = 2 if client else 1
    known: list[int] = []  # every stream id either side has named, for the generators to pick from
    unconsumed: defaultdict[int, int] = defaultdict(int)
    ended: set[int] = set()
    opened_by_peer: set[int] = set()
    own_open = 0
    peer_frames_in = app_calls = 0
    pending: list[bytes] = []  # the peer's frames of the message being put together
    peer_goaway = False

    def pick() -> int:
        k = data.draw(st.integers(0, 7))
        return known[k % len(known)] if known else k + 1

    def flush() -> None:
        for msg in mux.messages_to_send():
            assert len(msg) <= max(max_message, HEADER.size + max_frame) + HEADER.size + 4 + 1024
            v.honest_message(msg)

    def handle_events() -> None:
        for ev in mux.events():
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, StreamOpened):
                assert sid % 2 == peer_parity and sid not in opened_by_peer
                opened_by_peer.add(sid)
                known.append(sid)
            elif isinstance(ev, DataReceived):
                assert ev.data and sid not in ended, f"data on {sid} after its end"
                unconsumed[sid] += len(ev.data)
                # the receive window is enforced: what the application holds never exceeds it
                assert unconsumed[sid] <= window, (sid, unconsumed[sid], window)
            elif isinstance(ev, (StreamEnded, StreamReset)):
                assert sid not in ended or isinstance(ev, StreamReset)
                ended.add(sid)

    def deliver() -> bool:
        """Send the peer's pending frames as one message (maybe mutated); False: link closed."""
        nonlocal peer_frames_in
        ops = data.draw(mutations(2)) if data.draw(st.integers(0, 9)) == 0 else []
        msg = mutate(b"".join(pending), ops)
        peer_frames_in += len(pending) + len(ops)
        pending.clear()
        try:
            mux.receive_message(msg)
        except MuxProtocolError as exc:
            assert exc.close_code == 1002 and exc.reason
            return False  # the link is closed with that code; nothing more happens on it
        v.peer_message(msg)
        handle_events()
        return True

    for _ in range(n_steps):
        op = data.draw(st.sampled_from(OPS))
        if op in PEER:
            if op == "open":
                if not peer_goaway:  # (a peer that opens after its own GOAWAY: "raw" covers it)
                    pending.append(frame(next_peer_id, OPEN))
                    known.append(next_peer_id)
                    next_peer_id += 2
            elif op == "data":
                pending.append(frame(pick(), DATA, bytes(data.draw(st.integers(0, min(600, max_frame))))))
            elif op == "window":
                inc = data.draw(st.sampled_from([1, 7, 100, 1000, 1000, 4096, 4096, 2**31 - 1]))
                pending.append(frame(pick(), WINDOW, U32.pack(inc)))
            elif op == "fin":
                pending.append(frame(pick(), FIN))
            elif op == "rst":
                pending.append(frame(pick(), RST, U32.pack(data.draw(st.integers(0, 9))) + data.draw(st.binary(max_size=12))))
            elif op == "goaway_peer":
                peer_goaway = True
                pending.append(frame(0, GOAWAY, U32.pack(data.draw(st.integers(0, 3))) + data.draw(st.binary(max_size=12))))
            else:  # anything at all: any id, any type, maybe a lying length
                pending.append(frame(data.draw(st.sampled_from([0, 1, 2, 3, 4, 5, 2**32 - 1])), data.draw(st.integers(0, 9)),
                                     data.draw(st.binary(max_size=12)), data.draw(st.none() | st.integers(0, 80))))
            if data.draw(st.booleans()) and not deliver():
                return
            continue
        app_calls += 1
        try:
            if op == "app_open":
                known.append(mux.open_stream())
                own_open += 1
            elif op == "send":
                mux.send(pick(), bytes(data.draw(st.integers(0, 3000))))
            elif op == "consume":
                sid = pick()
                n = min(data.draw(st.integers(0, 3000)), unconsumed[sid])
                unconsumed[sid] -= n
                mux.consumed(sid, n)
            elif op == "app_fin":
                mux.send_fin(pick())
            elif op == "reset":
                mux.reset(pick(), 1, "app reset ☃")
            elif op == "app_goaway":
                mux.go_away(0, "bye")
            else:
                flush()
        except MuxError as exc:
            assert str(exc)
        handle_events()
        assert mux.stream_count <= max_streams + own_open
    if pending and not deliver():
        return
    flush()
    handle_events()
    # no amplification: control frames are bounded by what came in and what the app did
    assert v.control_bytes <= (peer_frames_in + app_calls) * (HEADER.size + 4 + 1024)
