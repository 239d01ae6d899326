"""Sans-I/O stream multiplexer for the tunnel link (wire format: docs/ARCHITECTURE.md).

No sockets, no asyncio, no clocks: bytes go in through `receive_message()` and come back out as
events from `events()`; application calls (`open_stream`, `send`, ...) queue frames that
`messages_to_send()` batches into WebSocket-sized messages. The caller owns all I/O.

Frame: ``stream_id u32 | type u8 | length u32 | payload`` (network byte order). Each stream has
per-direction credit-based flow control: the sender may have at most the granted window of DATA in
flight; the receiver returns credit with WINDOW frames once the application reports bytes as
delivered (`consumed()`).

This is the data path of the tunnel, so the per-frame work is kept O(1): headers are parsed with
`Struct.unpack_from`, outgoing payloads are memoryview slices of the caller's buffers and each
message is assembled with a single `b"".join`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Union

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_FRAME_PAYLOAD",
    "MAX_MESSAGE",
    "HEADER",
    "MAX_WINDOW",
    "RST_REFUSED",
    "PROTOCOL_ERROR_CLOSE_CODE",
    "FrameType",
    "MuxError",
    "MuxProtocolError",
    "StreamOpened",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "StreamWritable",
    "GoAway",
    "Event",
    "Mux",
]

DEFAULT_WINDOW = 256 * 1024  # initial per-stream send window (both directions)
MAX_FRAME_PAYLOAD = 64 * 1024  # DATA frames are split to at most this
MAX_MESSAGE = 256 * 1024  # frames are batched into one output message up to about this size
HEADER = struct.Struct("!IBI")  # stream_id u32, type u8, length u32

MAX_WINDOW = 2**31 - 1  # cap on a stream's total send credit
MAX_STREAM_ID = 2**32 - 1
RST_REFUSED = 2  # RST code for a peer-opened stream beyond max_streams
PROTOCOL_ERROR_CLOSE_CODE = 1002  # WebSocket close code for protocol errors
_MAX_REASON = 1024  # reasons are truncated (in UTF-8 bytes) so a frame always fits the peer's max_frame
_MIN_FRAME = 16  # room for RST/GOAWAY code + a short reason

_HLEN = HEADER.size  # 9
_U32 = struct.Struct("!I")
_OPEN, _DATA, _FIN, _RST, _WINDOW, _GOAWAY = 1, 2, 3, 4, 5, 6


class FrameType(enum.IntEnum):
    OPEN = 1
    DATA = 2
    FIN = 3
    RST = 4
    WINDOW = 5
    GOAWAY = 6


class MuxError(Exception):
    """Local misuse or a state that forbids the call (unknown stream, after GOAWAY, too many streams)."""


class MuxProtocolError(Exception):
    """The peer violated the wire protocol; close the link with `close_code` and `reason`."""

    def __init__(self, reason: str, close_code: int = PROTOCOL_ERROR_CLOSE_CODE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


# --------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream; report them with `Mux.consumed()` once delivered."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more data (half-close)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream; it is already forgotten."""

    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream whose `send()` returned False has drained below the low-water mark."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer will open no more streams."""

    code: int
    reason: str


Event = Union[StreamOpened, DataReceived, StreamEnded, StreamReset, StreamWritable, GoAway]


# --------------------------------------------------------------------------------- state


class _Stream:
    """Per-stream state. `ready` mirrors membership in Mux._ready (data queued and credit > 0)."""

    __slots__ = (
        "id",
        "credit",  # bytes we may still send (peer's grant)
        "recv_window",  # bytes the peer may still send us
        "unacked",  # consumed bytes not yet returned with a WINDOW frame
        "buf",  # deque of bytes chunks not yet sent
        "off",  # bytes of buf[0] already sent
        "buf_len",  # unsent bytes in buf (minus off)
        "fin_queued",
        "fin_sent",
        "fin_received",
        "blocked",  # send() returned False; StreamWritable pending
        "ready",
    )

    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.credit = window
        self.recv_window = window
        self.unacked = 0
        self.buf: deque[bytes] = deque()
        self.off = 0
        self.buf_len = 0
        self.fin_queued = False
        self.fin_sent = False
        self.fin_received = False
        self.blocked = False
        self.ready = False


def _encode_reason(code: int, reason: str, max_frame: int) -> bytes:
    raw = reason.encode("utf-8")
    limit = min(_MAX_REASON, max_frame - 4)
    if len(raw) > limit:
        # Cut on a character boundary so the peer still sees valid UTF-8.
        raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
    return _U32.pack(code) + raw


def _frame(stream_id: int, ftype: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(stream_id, ftype, len(payload)) + payload


# --------------------------------------------------------------------------------- mux


class Mux:
    """One end of a multiplexed link. `client=True` is the WebSocket client (opens odd ids)."""

    def __init__(
        self,
        *,
        client: bool,
        window: int = DEFAULT_WINDOW,
        max_frame: int = MAX_FRAME_PAYLOAD,
        max_message: int = MAX_MESSAGE,
        high_water: int = 64 * 1024,
        max_streams: int = 65536,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..{MAX_WINDOW}")
        if max_frame < _MIN_FRAME or max_message < 1 or high_water < 0 or max_streams < 0:
            raise ValueError(f"need max_frame >= {_MIN_FRAME}, max_message >= 1, high_water and max_streams >= 0")
        self.client = client
        self._window = window
        self._credit_batch = max(1, window // 4)
        self._max_frame = max_frame
        self._max_message = max_message
        # Split a DATA frame to fill the tail of a message only if the piece is worth a header.
        self._min_split = max(1, min(max_frame // 16, 4096))
        self._high_water = high_water
        self._low_water = high_water // 2
        self._max_streams = max_streams
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._peer_parity = 0 if client else 1  # the server opens even ids, the client odd
        self._last_peer_id = 0
        self._ctrl: list[bytes] = []  # encoded control frames, sent before any DATA
        self._ready: deque[_Stream] = deque()  # round-robin of streams with data and credit
        self._events: list[Event] = []
        self._goaway_sent = False
        self._goaway_received = False

    # ------------------------------------------------------------------ properties

    @property
    def wants_write(self) -> bool:
        """Something is sendable now (messages_to_send() would return at least one message)."""
        return bool(self._ctrl or self._ready)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received

    def buffered(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.buf_len if s is not None else 0

    # ------------------------------------------------------------------ application calls

    def open_stream(self) -> int:
        if self._goaway_sent:
            raise MuxError("cannot open a stream after sending GOAWAY")
        if self._goaway_received:
            raise MuxError("cannot open a stream after the peer sent GOAWAY")
        if len(self._streams) >= self._max_streams:
            raise MuxError(f"too many open streams ({self._max_streams})")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            raise MuxError("stream ids exhausted")
        self._next_id = sid + 2
        self._streams[sid] = _Stream(sid, self._window)
        self._ctrl.append(_frame(sid, _OPEN))
        return sid

    def send(self, stream_id: int, data: bytes | memoryview) -> bool:
        s = self._streams.get(stream_id)
        if s is None:
            raise MuxError(f"send on unknown or closed stream {stream_id}")
        if s.fin_queued:
            raise MuxError(f"send on stream {stream_id} after FIN")
        n = len(data)
        if n:
            if type(data) is not bytes:
                # The caller may reuse its buffer (recv_into, bytearray); keep our own copy.
                data = bytes(data)
                n = len(data)
            s.buf.append(data)
            s.buf_len += n
            if not s.ready and s.credit > 0:
                s.ready = True
                self._ready.append(s)
        if s.buf_len > self._high_water:
            s.blocked = True
            return False
        return True

    def send_fin(self, stream_id: int) -> None:
        """Queue FIN after the stream's queued data. No-op for unknown streams and repeated calls
        (the peer may have reset the stream concurrently)."""
        s = self._streams.get(stream_id)
        if s is None or s.fin_queued:
            return
        s.fin_queued = True
        if not s.buf_len:
            # Nothing queued ahead of it: everything earlier is already in the output.
            s.fin_sent = True
            self._ctrl.append(_frame(stream_id, _FIN))
            if s.fin_received:
                self._forget(s)

    def reset(self, stream_id: int, code: int, reason: str = "") -> None:
        s = self._streams.get(stream_id)
        if s is None:
            return
        self._forget(s)
        self._ctrl.append(_frame(stream_id, _RST, _encode_reason(code, reason, self._max_frame)))

    def consumed(self, stream_id: int, n: int) -> None:
        """Return `n` delivered bytes of credit to the peer (batched into WINDOW frames)."""
        s = self._streams.get(stream_id)
        if s is None or s.fin_received or n <= 0:
            return  # after the peer's FIN no more DATA can come, so credit is pointless
        # Never grant more than was received: clamp so an app double-count cannot inflate the window.
        outstanding = self._window - s.recv_window - s.unacked
        if n > outstanding:
            n = outstanding
            if n <= 0:
                return
        unacked = s.unacked + n
        if unacked >= self._credit_batch:
            s.unacked = 0
            s.recv_window += unacked
            self._ctrl.append(HEADER.pack(stream_id, _WINDOW, 4) + _U32.pack(unacked))
        else:
            s.unacked = unacked

    def go_away(self, code: int, reason: str = "") -> None:
        self._goaway_sent = True
        self._ctrl.append(_frame(0, _GOAWAY, _encode_reason(code, reason, self._max_frame)))

    def events(self) -> list[Event]:
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------ receive

    def receive_message(self, data: bytes) -> None:
        """Parse one incoming message of back-to-back frames and queue the resulting events."""
        if type(data) is not bytes:
            data = bytes(data)  # one copy; lets DATA payloads be plain bytes slices
        n = len(data)
        off = 0
        unpack = HEADER.unpack_from
        streams = self._streams
        events = self._events
        max_frame = self._max_frame
        while off < n:
            if n - off < _HLEN:
                raise MuxProtocolError(f"truncated frame header ({n - off} of {_HLEN} bytes)")
            sid, ftype, length = unpack(data, off)
            off += _HLEN
            if length > max_frame:
                raise MuxProtocolError(f"frame length {length} exceeds maximum {max_frame}")
            end = off + length
            if end > n:
                raise MuxProtocolError(f"truncated frame payload ({n - off} of {length} bytes)")
            if ftype == _DATA:  # hot path, kept inline
                s = streams.get(sid)
                if s is not None:
                    if s.fin_received:
                        raise MuxProtocolError(f"DATA on stream {sid} after FIN")
                    if length > s.recv_window:
                        raise MuxProtocolError(
                            f"DATA of {length} bytes exceeds the receive window ({s.recv_window}) on stream {sid}"
                        )
                    if length:
                        s.recv_window -= length
                        events.append(DataReceived(sid, data[off:end]))
                elif sid == 0:
                    raise MuxProtocolError("DATA frame on stream 0")
                # else: a stream that is forgotten (or never existed): late frames are ignored
            else:
                self._control_frame(sid, ftype, data, off, end)
            off = end

    def _control_frame(self, sid: int, ftype: int, data: bytes, off: int, end: int) -> None:
        length = end - off
        if ftype == _WINDOW:
            if sid == 0:
                raise MuxProtocolError("WINDOW frame on stream 0")
            if length != 4:
                raise MuxProtocolError(f"WINDOW payload must be 4 bytes, got {length}")
            (inc,) = _U32.unpack_from(data, off)
            if inc == 0:
                raise MuxProtocolError(f"WINDOW increment 0 on stream {sid}")
            s = self._streams.get(sid)
            if s is None:
                return
            credit = s.credit + inc
            if credit > MAX_WINDOW:
                raise MuxProtocolError(f"WINDOW overflow on stream {sid}: credit {credit} exceeds {MAX_WINDOW}")
            s.credit = credit
            if s.buf_len and not s.ready:
                s.ready = True
                self._ready.append(s)
        elif ftype == _OPEN:
            if sid == 0:
                raise MuxProtocolError("OPEN frame on stream 0")
            if length:
                raise MuxProtocolError(f"OPEN payload must be empty, got {length} bytes")
            if sid & 1 != self._peer_parity:
                who = "server" if self.client else "client"
                raise MuxProtocolError(f"OPEN stream {sid} has the wrong parity for the {who}")
            if sid <= self._last_peer_id:
                raise MuxProtocolError(f"OPEN stream {sid} is not greater than the last opened id {self._last_peer_id}")
            if self._goaway_received:
                raise MuxProtocolError(f"OPEN stream {sid} after GOAWAY")
            self._last_peer_id = sid
            if len(self._streams) >= self._max_streams:
                # Refuse rather than fail the whole link; the id is burnt, so late frames are ignored.
                self._ctrl.append(_frame(sid, _RST, _encode_reason(RST_REFUSED, "too many streams", self._max_frame)))
                return
            self._streams[sid] = _Stream(sid, self._window)
            self._events.append(StreamOpened(sid))
        elif ftype == _FIN:
            if sid == 0:
                raise MuxProtocolError("FIN frame on stream 0")
            if length:
                raise MuxProtocolError(f"FIN payload must be empty, got {length} bytes")
            s = self._streams.get(sid)
            if s is None:
                return
            if s.fin_received:
                raise MuxProtocolError(f"duplicate FIN on stream {sid}")
            s.fin_received = True
            self._events.append(StreamEnded(sid))
            if s.fin_sent:
                self._forget(s)
        elif ftype == _RST:
            if sid == 0:
                raise MuxProtocolError("RST frame on stream 0")
            if length < 4:
                raise MuxProtocolError(f"RST payload must be at least 4 bytes, got {length}")
            s = self._streams.get(sid)
            if s is None:
                return
            (code,) = _U32.unpack_from(data, off)
            reason = data[off + 4 : end].decode("utf-8", "replace")
            self._forget(s)
            self._events.append(StreamReset(sid, code, reason))
        elif ftype == _GOAWAY:
            if sid != 0:
                raise MuxProtocolError(f"GOAWAY frame on stream {sid} (must be stream 0)")
            if length < 4:
                raise MuxProtocolError(f"GOAWAY payload must be at least 4 bytes, got {length}")
            (code,) = _U32.unpack_from(data, off)
            reason = data[off + 4 : end].decode("utf-8", "replace")
            self._goaway_received = True
            self._events.append(GoAway(code, reason))
        else:
            raise MuxProtocolError(f"unknown frame type {ftype}")

    def _forget(self, s: _Stream) -> None:
        del self._streams[s.id]
        if s.ready:
            self._ready.remove(s)  # O(ready streams); resets are rare compared with frames
            s.ready = False
        s.buf.clear()
        s.buf_len = 0
        s.off = 0

    # ------------------------------------------------------------------ send

    def messages_to_send(self) -> list[bytes]:
        """Drain everything sendable now into messages of about max_message bytes.

        Control frames go first (never flow controlled); then DATA round-robin, one frame per
        stream per turn, each stream's FIN right after its last DATA. May queue StreamWritable
        events, so call events() afterwards.
        """
        out: list[bytes] = []
        parts: list[bytes | memoryview] = []
        size = 0
        max_message = self._max_message
        if self._ctrl:
            for frame in self._ctrl:
                flen = len(frame)
                if size and size + flen > max_message:
                    out.append(b"".join(parts))
                    parts = []
                    size = 0
                parts.append(frame)
                size += flen
            self._ctrl = []
        ready = self._ready
        if ready:
            max_frame = self._max_frame
            min_split = self._min_split
            low_water = self._low_water
            pack = HEADER.pack
            append = parts.append
            while ready:
                s = ready.popleft()
                n = s.buf_len
                if n > s.credit:
                    n = s.credit
                if n > max_frame:
                    n = max_frame
                if n <= 0:  # defensive: the ready invariant says this cannot happen
                    s.ready = False
                    continue
                room = max_message - size - _HLEN
                if n > room:
                    if room >= min_split:
                        n = room  # fill the message exactly; the rest goes in the next one
                    elif size:
                        out.append(b"".join(parts))
                        parts = []
                        append = parts.append
                        size = 0
                        room = max_message - _HLEN
                        if 0 < room < n:
                            n = room
                sid = s.id
                append(pack(sid, _DATA, n))
                size += _HLEN + n
                s.credit -= n
                s.buf_len -= n
                # Take n bytes off the chunk queue as zero-copy slices; join copies them once.
                buf = s.buf
                off = s.off
                while n:
                    chunk = buf[0]
                    avail = len(chunk) - off
                    if avail <= n:
                        append(memoryview(chunk)[off:] if off else chunk)
                        buf.popleft()
                        off = 0
                        n -= avail
                    else:
                        append(memoryview(chunk)[off : off + n])
                        off += n
                        break
                s.off = off
                if s.blocked and s.buf_len <= low_water:
                    s.blocked = False
                    self._events.append(StreamWritable(sid))
                if s.buf_len:
                    if s.credit > 0:
                        ready.append(s)  # back of the queue: round-robin
                    else:
                        s.ready = False
                else:
                    s.ready = False
                    if s.fin_queued and not s.fin_sent:
                        s.fin_sent = True
                        append(pack(sid, _FIN, 0))
                        size += _HLEN
                        if s.fin_received:
                            self._forget(s)
        if parts:
            out.append(b"".join(parts))
        return out
