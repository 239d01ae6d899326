"""The tunnel link over QUIC (aioquic): every tunnel stream is one QUIC bidirectional stream.

It carries exactly what the WebSocket link carries (tunnel/link.py's `Link`/`LinkStream`): the
connector's first stream is the control stream, the relay opens one stream per client
connection, and the ConnectRequest/Response preamble travels in-band on each stream.

aioquic is a sans-I/O core; this module is the thin asyncio layer plus what aioquic lacks
(python_stack.md §2):
- send back-pressure: aioquic buffers whatever `send_stream_data` is given. A stream with more
  than SEND_HIGH bytes not yet sent pauses its producer (`stream_pause`) until fewer than
  SEND_LOW remain, so a fast origin cannot grow memory without limit. (Bytes sent but not yet
  acknowledged are bounded by the peer's credit window; counting them too would stall every
  stream on aioquic's 25 ms delayed ACKs.)
- receive back-pressure: aioquic doubles a receive window whenever half of it has *arrived*.
  `_CreditConnection` instead grows windows only as the application reports bytes delivered
  (`consumed`), the same credit discipline as the WebSocket mux.
- liveness: UDP has no connection to break. Both ends PING every PING_INTERVAL and declare the
  link dead after SILENCE_LIMIT without a packet, so a SIGKILLed peer is noticed in seconds.
- batching: writes made during one loop iteration go out in one `transmit()`.
- graceful close: `QuicLink.close()` waits (at most `linger` seconds) until what was written has
  been acknowledged, then sends CONNECTION_CLOSE; aioquic's own close drops unsent stream data.
- handshakes from strangers (`QuicLinkServer`, in place of aioquic's `QuicServer`): the edge
  answers a first Initial with a stateless Retry (address validation; a token bound to the source
  address and port), and only a validated Initial may cost a connection, subject to
  `HandshakeGate` (sans-I/O, time passed in): a token bucket per source address, a global bucket, a
  cap on connections in handshake and a budget for stateless replies. A handshake not complete
  within `handshake_timeout` is dropped, so abandoned handshakes hold bounded memory for a bounded time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.retry import QuicRetryTokenHandler
from cryptography.hazmat.primitives import serialization

from tunnel.link import HalfCloseStream, Link
from tunnel.messages import RST_CANCEL, RST_PROTOCOL, RST_REFUSED, RST_SHUTDOWN
from tunnel.tls import PinMismatch, verify_pin_der

log = logging.getLogger(__name__)

ALPN = "hd-tunnel/1"
STREAM_WINDOW = 256 * 1024  # receive credit per stream (the mux's DEFAULT_WINDOW)
CONN_WINDOW = 16 * 1024 * 1024  # receive credit for the whole connection
SEND_HIGH = 256 * 1024  # a stream's unsent bytes above this pause its producer
SEND_LOW = 64 * 1024
MAX_STREAMS = 4096  # concurrent streams the peer may open (aioquic's default is 128)
MAX_DATAGRAM = 1452  # Ethernet MTU minus IPv6/UDP headers; aioquic has no PMTU discovery
HANDSHAKE_TIMEOUT = 5.0  # the client's dial timeout, and the server's limit per handshake
CLOSE_LINGER = 2.0  # close(): at most this long for written data to be acknowledged
PING_INTERVAL = 1.0
SILENCE_LIMIT = 6.0
PACER_MIN_BURST = 0.002  # seconds of sending the pacer may burst (two uvloop clock ticks)
IDLE_TIMEOUT = 30.0  # aioquic's own idle timer: a backstop behind the silence check

_RESET_REASONS = {
    RST_CANCEL: "the peer closed the connection",
    RST_REFUSED: "refused",
    RST_PROTOCOL: "protocol error",
    RST_SHUTDOWN: "the tunnel connection is going away",
}


class QuicHandshakeError(ConnectionError):
    """The QUIC handshake did not complete (no answer, refused, or rejected)."""


class _TickPacer(QuicPacketPacer):
    """aioquic's pacer with a burst allowance of at least one clock tick.

    The pacer refills a time bucket from `loop.time()`, which uvloop advances in 1 ms steps.
    With a large window on a short path aioquic sizes the bucket below a microsecond, so it
    never holds a packet's worth after a tick and the sender crawls at about one packet per
    millisecond (measured: 14 Mbit/s instead of 180 on loopback).
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        self.bucket_max = max(self.bucket_max, PACER_MIN_BURST)


class _CreditConnection(QuicConnection):
    """A QuicConnection whose receive windows follow what the application consumed."""

    def hd_init(self) -> None:
        self.hd_consumed: dict[int, int] = {}
        self.hd_consumed_total = 0
        self._local_max_streams_bidi.value = MAX_STREAMS
        pacer = _TickPacer(max_datagram_size=self._max_datagram_size)
        self._loss._pacer = pacer

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        limit = self._local_max_data
        target = self.hd_consumed_total + CONN_WINDOW
        if target - limit.value >= CONN_WINDOW // 2:
            limit.value = target
        used, limit.used = limit.used, 0  # aioquic would double the window on arrival
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local:
            target = self.hd_consumed.get(stream.stream_id, 0) + STREAM_WINDOW
            if target - stream.max_stream_data_local >= STREAM_WINDOW // 2:
                stream.max_stream_data_local = target
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # same: no doubling on arrival
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest


def _configuration(*, client: bool, server_name: str | None = None) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=client,
        alpn_protocols=[ALPN],
        idle_timeout=IDLE_TIMEOUT,
        max_data=CONN_WINDOW,
        max_stream_data=STREAM_WINDOW,
        max_datagram_size=MAX_DATAGRAM,
        server_name=server_name,
        verify_mode=ssl.CERT_NONE if client else None,  # the client checks the pin itself
    )


# ------------------------------------------------------------------ handshakes from strangers


@dataclass(frozen=True)
class HandshakeLimits:
    """What a QUIC handshake may cost the edge before the peer has proved anything.

    A server handshake costs ~1.5 ms of CPU on the event loop the database proxies share, and a
    connection in handshake ~90 KiB until it completes or is dropped (measured with aioquic 1.7).
    The defaults bound a flood to a few percent of one core and a few MiB, while a connector's
    burst of HA connections (and an edge restart's reconnections, spread over a few seconds by
    the clients' retransmissions) still gets through."""

    retry: bool = True  # validate source addresses with a stateless Retry first
    per_source_rate: float = 4.0  # new handshakes per second per source (IPv4 address, IPv6 /64)
    per_source_burst: float = 16.0
    global_rate: float = 50.0  # new handshakes per second, all sources together
    global_burst: float = 64.0
    max_pending: int = 64  # connections in handshake at once (the oldest is dropped for a new one)
    stateless_rate: float = 1000.0  # Retry / version negotiation / INVALID_TOKEN replies per second (~20 us each)
    stateless_burst: float = 1000.0
    max_sources: int = 4096  # per-source buckets remembered (least recently used forgotten first)
    handshake_timeout: float = HANDSHAKE_TIMEOUT


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second of the injected clock."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


def source_key(host: str) -> str:
    """The unit a per-source limit counts: an IPv4 address, an IPv6 /64 (one subscriber's
    prefix: counting single IPv6 addresses would give each attacker 2^64 buckets)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class HandshakeGate:
    """Admission of new QUIC connections and their handshake deadlines (sans-I/O: every call
    that depends on time takes `now`; handles are the caller's, opaque here).

    `admit(source, now)` is asked once per validated Initial that would create a connection
    (False: drop the packet). `start(handle, now)` then records the new handshake and returns
    the handles to drop to make room: the oldest, when `max_pending` are already in progress, so
    a flood of abandoned handshakes churns through the slots instead of locking out the next
    real client. `finished(handle)` when a handshake completes or fails; `expired(now)` gives
    the handshakes past their deadline. `stateless(now)` is asked before each stateless reply."""

    def __init__(self, limits: HandshakeLimits, now: float) -> None:
        self.limits = limits
        self._global = TokenBucket(limits.global_rate, limits.global_burst, now)
        self._stateless = TokenBucket(limits.stateless_rate, limits.stateless_burst, now)
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._pending: OrderedDict[Any, float] = OrderedDict()  # handle -> deadline, oldest first
        self.counts: dict[str, int] = dict.fromkeys(
            ("admitted", "completed", "source_rate", "global_rate", "evicted", "timeouts",
             "stateless_sent", "stateless_dropped"), 0)

    def admit(self, source: str, now: float) -> bool:
        limits = self.limits
        sources = self._sources
        bucket = sources.get(source)
        if bucket is None:
            bucket = sources[source] = TokenBucket(limits.per_source_rate, limits.per_source_burst, now)
            while len(sources) > limits.max_sources:
                sources.popitem(last=False)
        else:
            sources.move_to_end(source)
        # The global bucket is spent only when the source may go: one noisy source must not use
        # up everyone else's tokens.
        if not bucket.ready(now):
            self.counts["source_rate"] += 1
            return False
        if not self._global.take(now):
            self.counts["global_rate"] += 1
            return False
        bucket.take(now)
        self.counts["admitted"] += 1
        return True

    def start(self, handle: Any, now: float) -> list[Any]:
        evicted = []
        while len(self._pending) >= max(1, self.limits.max_pending):
            evicted.append(self._pending.popitem(last=False)[0])
        self.counts["evicted"] += len(evicted)
        self._pending[handle] = now + self.limits.handshake_timeout
        return evicted

    def finished(self, handle: Any, *, completed: bool) -> None:
        if self._pending.pop(handle, None) is not None and completed:
            self.counts["completed"] += 1

    def expired(self, now: float) -> list[Any]:
        """The handshakes whose deadline has passed (forgotten here)."""
        out = []
        pending = self._pending
        while pending:
            handle, deadline = next(iter(pending.items()))
            if deadline > now:
                break
            del pending[handle]
            out.append(handle)
        self.counts["timeouts"] += len(out)
        return out

    def next_deadline(self) -> float | None:
        return next(iter(self._pending.values()), None)

    def stateless(self, now: float) -> bool:
        if self._stateless.take(now):
            self.counts["stateless_sent"] += 1
            return True
        self.counts["stateless_dropped"] += 1
        return False

    def forget_idle(self, now: float) -> None:
        """Drop the buckets that are full again (nothing to remember about those sources)."""
        for source in [s for s, b in self._sources.items() if b.full(now)]:
            del self._sources[source]

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def sources(self) -> int:
        return len(self._sources)


class QuicLinkStream(HalfCloseStream):
    __slots__ = ("_link", "_paused")

    def __init__(self, link: QuicLink, stream_id: int) -> None:
        super().__init__(stream_id)
        self._link = link
        self._paused = False

    def write(self, data: bytes) -> None:
        if self._done or self._sent_fin or not data:
            return
        link = self._link
        try:
            link.quic.send_stream_data(self.id, data, False)
        except (ValueError, AssertionError):  # the stream was reset meanwhile
            return
        link.bytes_out += len(data)
        link.kick()
        if not self._paused and link.unsent(self.id) > SEND_HIGH:
            self._paused = True
            link.paused.add(self)
            if self.handler is not None:
                self.handler.stream_pause()

    def consumed(self, n: int) -> None:
        if n and not self._done:
            self._link.credit(self.id, n)

    def _send_fin(self) -> None:
        try:
            self._link.quic.send_stream_data(self.id, b"", True)
        except (ValueError, AssertionError):
            pass
        self._link.kick()

    def _send_reset(self, code: int, reason: str) -> None:
        quic = self._link.quic
        try:
            quic.reset_stream(self.id, code)
            if not self._recv_fin:
                quic.stop_stream(self.id, code)
        except (ValueError, AssertionError):
            pass
        self._link.kick()

    def _forget(self) -> None:
        link = self._link
        link.streams.pop(self.id, None)
        link.paused.discard(self)
        link._release(self.id)

    def _maybe_resume(self) -> None:
        if self._link.unsent(self.id) < SEND_LOW:
            self._paused = False
            self._link.paused.discard(self)
            if self.handler is not None:
                self.handler.stream_resume()


class QuicLink(Link):
    """One QUIC connection carrying tunnel streams. Created by `QuicLinkProtocol` once the
    handshake is complete."""

    def __init__(self, proto: QuicLinkProtocol) -> None:
        self.proto = proto
        self.quic: _CreditConnection = proto._quic  # type: ignore[assignment]
        self.client = proto.client
        self.streams: dict[int, QuicLinkStream] = {}
        self.paused: set[QuicLinkStream] = set()
        self.close_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.remote_address = proto.remote_address
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None  # close() waiting for the peer's ACKs
        self._kicked = False
        self._peer_bit = 1 if self.client else 0  # stream id % 4 of the bidirectional streams the peer opens
        self._peer_next = self._peer_bit  # lowest peer stream id above every one seen so far
        # Peer streams below _peer_next whose first bytes have not arrived yet: a stream's first
        # packet can be overtaken by a later stream's (loss and retransmission, or written later).
        self._peer_unseen: set[int] = set()
        # Finished streams that may still receive (in flight, or up to a reset's final size):
        # stream id -> receive offset already returned to the connection window.
        self._released: dict[int, int] = {}

    # --- Link API
    def open_stream(self) -> QuicLinkStream:
        if self._closed:
            raise ConnectionError("link is closed")
        quic = self.quic
        sid = quic.get_next_available_stream_id()
        quic.send_stream_data(sid, b"", False)  # creates it now, so the next id differs
        stream = QuicLinkStream(self, sid)
        self.streams[sid] = stream
        return stream

    async def run(self) -> None:
        try:
            await asyncio.shield(self._done)
        finally:
            self._shutdown(f"tunnel connection closed ({self.close_reason})" if self.close_reason
                           else "tunnel connection closed")

    async def close(self, code: int = 0, reason: str = "", *, linger: float = CLOSE_LINGER) -> None:
        """Close the connection after what was already written reached the peer.

        The link takes no new streams from now on (`is_closed` is True); for at most `linger`
        seconds it keeps running until the peer has acknowledged every stream byte, FIN and
        reset written so far (bytes the peer's flow control blocks are not waited for), or the
        peer closes first; then CONNECTION_CLOSE. `linger=0` closes at once, dropping unsent
        data, as aioquic does. Returns when the link is closed."""
        if not self.close_reason:
            self.close_reason = reason
        if not self._done.done():
            self._closed = True
            if linger > 0 and not self._drained():
                if self._closing is None:
                    self._closing = self._loop.create_future()
                self.kick()
                await asyncio.wait((self._closing, self._done), timeout=linger,
                                   return_when=asyncio.FIRST_COMPLETED)
            if not self._done.done():
                self.proto.close(error_code=code, reason_phrase=reason[:120])
                self._ended(self.close_reason or "closed")
        self.proto.hd_release()

    def _drained(self) -> bool:
        """Has the peer acknowledged everything written that flow control lets us send?"""
        quic = self.quic
        # Sent, not yet acknowledged (once declared lost, its frames are pending again, below).
        # Not `_loss.bytes_in_flight`: aioquic 1.7 leaves the bytes of the handshake's discarded
        # packet spaces counted there for good.
        for space in quic._loss.spaces:
            for packet in space.sent_packets.values():
                if packet.in_flight:
                    return False
        room = quic._remote_max_data - quic._remote_max_data_used
        for stream in quic._streams.values():
            sender = stream.sender
            if sender.reset_pending:
                return False
            if sender.buffer_is_empty or sender.is_finished or sender._reset_error_code is not None:
                continue
            if sender._pending_eof and not sender._pending:
                return False  # a lone FIN is never blocked
            if stream.is_blocked:
                continue  # over the peer's stream limit: it cannot go
            if sender.next_offset < min(sender.highest_offset + room, stream.max_stream_data_remote):
                return False  # sendable (cwnd or pacing holds it for a moment)
        return True

    def abort(self, reason: str = "") -> None:
        self._ended(reason or "aborted")
        self.proto.hd_release()

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    @property
    def is_closed(self) -> bool:
        return self._closed or self._done.done()

    # --- used by streams
    def kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._kicked = False
        if not self._done.done():
            self.proto.transmit()

    def unsent(self, sid: int) -> int:
        stream = self.quic._streams.get(sid)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender.highest_offset

    def buffered(self, sid: int) -> int:
        """Bytes aioquic holds for the stream: unsent plus sent-but-unacknowledged."""
        stream = self.quic._streams.get(sid)
        return len(stream.sender._buffer) if stream is not None else 0

    def credit(self, sid: int, n: int) -> None:
        quic = self.quic
        total = quic.hd_consumed[sid] = quic.hd_consumed.get(sid, 0) + n
        quic.hd_consumed_total += n
        stream = quic._streams.get(sid)
        if stream is not None and total + STREAM_WINDOW - stream.max_stream_data_local >= STREAM_WINDOW // 2:
            self.kick()  # a window update is due
        elif quic.hd_consumed_total + CONN_WINDOW - quic._local_max_data.value >= CONN_WINDOW // 2:
            self.kick()

    def _conn_credit(self, n: int) -> None:
        quic = self.quic
        quic.hd_consumed_total += n
        if quic.hd_consumed_total + CONN_WINDOW - quic._local_max_data.value >= CONN_WINDOW // 2:
            self.kick()

    def _release(self, sid: int) -> None:
        """A stream is finished here: what it received but was never consumed (a reset, or a
        handler still delivering its last bytes) goes back to the connection window, or each
        such stream would shrink that window for good until the whole link stalls."""
        quic = self.quic
        consumed = quic.hd_consumed.pop(sid, 0)
        stream = quic._streams.get(sid)
        if stream is None:
            return
        receiver = stream.receiver
        if receiver.highest_offset > consumed:
            self._conn_credit(receiver.highest_offset - consumed)
        if not receiver.is_finished:
            self._released[sid] = max(receiver.highest_offset, consumed)

    def _credit_finished(self, sid: int, n: int) -> None:
        """Bytes (or a reset's final size) arrived for a stream that is no longer ours."""
        seen = self._released.get(sid)
        if seen is None:
            if n:
                self._conn_credit(n)
            return
        stream = self.quic._streams.get(sid)
        if stream is None:
            del self._released[sid]
            return
        receiver = stream.receiver
        if receiver.highest_offset > seen:
            self._conn_credit(receiver.highest_offset - seen)
            self._released[sid] = receiver.highest_offset
        if receiver.is_finished:
            del self._released[sid]

    def _new_peer_stream(self, sid: int) -> bool:
        """Is `sid` a bidirectional stream the peer opened and we have not seen yet?"""
        if sid & 3 != self._peer_bit:
            return False
        if sid >= self._peer_next:
            self._peer_unseen.update(range(self._peer_next, sid, 4))
            self._peer_next = sid + 4
            return True
        if sid in self._peer_unseen:
            self._peer_unseen.discard(sid)
            return True
        return False

    # --- called by the protocol
    def _event(self, event: events.QuicEvent) -> None:
        kind = type(event)
        if kind is events.StreamDataReceived:
            sid = event.stream_id
            stream = self.streams.get(sid)
            data = event.data
            if stream is None:
                if self._closed or not self._new_peer_stream(sid):
                    self._credit_finished(sid, len(data))  # keep the connection window moving
                    return
                stream = self.streams[sid] = QuicLinkStream(self, sid)
                if self.on_stream is None:
                    stream.reset(RST_REFUSED, "streams are not accepted here")
                    return
                self.on_stream(stream)
            if data:
                self.bytes_in += len(data)
                if stream.handler is not None:
                    stream.handler.stream_data(data)
            if event.end_stream and not stream._done:
                stream._on_eof()
        elif kind is events.StreamReset or kind is events.StopSendingReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                try:
                    self.quic.reset_stream(event.stream_id, event.error_code)
                except (ValueError, AssertionError):
                    pass
                stream._on_reset(event.error_code, _RESET_REASONS.get(event.error_code, "reset by the peer"))
            elif kind is events.StreamReset:
                sid = event.stream_id
                if not self._closed and self._new_peer_stream(sid):
                    self._released[sid] = 0  # reset before any of its bytes arrived
                self._credit_finished(sid, 0)  # the final size counts against the window
        elif kind is events.ConnectionTerminated:
            phrase = event.reason_phrase or f"error code {event.error_code}"
            self._ended(f"closed by peer ({phrase})")

    def _after_transmit(self) -> None:
        for stream in list(self.paused):
            stream._maybe_resume()

    def _ended(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        self._closed = True
        if not self._done.done():
            self._done.set_result(None)

    def _shutdown(self, reason: str) -> None:
        self._closed = True
        for s in list(self.streams.values()):
            s._on_reset(RST_SHUTDOWN, reason)
        self.streams.clear()


class QuicLinkProtocol(QuicConnectionProtocol):
    """One QUIC connection (either end); makes a `QuicLink` once the handshake is complete."""

    def __init__(self, quic: QuicConnection, *, client: bool,
                 on_open: Callable[[QuicLink], None] | None = None, **_: Any) -> None:
        super().__init__(quic)
        self.client = client
        self.link: QuicLink | None = None
        self.on_open = on_open
        self.remote_address: tuple[str, int] = ("?", 0)
        self.failure: str = ""
        self.owns_transport = client
        self.hd_on_handshake: Callable[[QuicLinkProtocol], None] | None = None  # the server's bookkeeping
        self._last_rx = self._loop.time()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_uid = 0
        self._handshake_waiter: asyncio.Future[None] = self._loop.create_future()

    # --- asyncio
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        now = self._last_rx = self._loop.time()
        if self.remote_address[0] == "?":
            self.remote_address = (str(addr[0]), int(addr[1]))
        self._quic.receive_datagram(data, addr, now=now)  # type: ignore[arg-type]
        self._process_events()
        link = self.link
        if link is not None and not link.is_closed:
            # One transmit after all the datagrams of this loop iteration, not one per datagram
            # (aioquic's default): measured 4 transmits per round trip per side before.
            link.kick()
        else:
            self.transmit()

    def error_received(self, exc: Exception) -> None:
        # A connected client socket learns of ICMP port-unreachable here: fail fast.
        if self.link is None:
            self._fail_handshake(f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.link is not None:
            self.link._ended(f"UDP socket closed: {exc}" if exc else "UDP socket closed")
        self._fail_handshake("UDP socket closed")

    def transmit(self) -> None:
        self._transmit(self._loop.time())

    def _handle_timer(self) -> None:
        # aioquic's version handles the timer at max(deadline, loop time) but then transmits at
        # the loop time. uvloop's clock moves in 1 ms steps and may still read just before the
        # deadline: the due ACK is not sent, the same deadline is re-armed, and the loop spins
        # until the clock ticks (measured: 19 timer wake-ups and 570 us of CPU per round trip).
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        self._quic.handle_timer(now=now)
        self._process_events()
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        self._transmit_task = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the relay closed its QUIC listener (or our socket is gone): nothing to send
        quic = self._quic
        for data, addr in quic.datagrams_to_send(now=now):
            transport.sendto(data, addr)
        timer_at = quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        link = self.link
        if link is not None:
            if link.paused:
                link._after_transmit()
            closing = link._closing
            if closing is not None and not closing.done() and link._drained():
                closing.set_result(None)

    # --- aioquic events
    def quic_event_received(self, event: events.QuicEvent) -> None:
        link = self.link
        if link is not None:
            link._event(event)
            if type(event) is events.ConnectionTerminated:
                self._stop_pings()
            return
        if isinstance(event, events.HandshakeCompleted):
            if self.hd_on_handshake is not None:
                self.hd_on_handshake(self)
            if event.alpn_protocol != ALPN:
                self.close(error_code=0x178, reason_phrase="unexpected ALPN")
                self._fail_handshake(f"the edge did not negotiate ALPN {ALPN}")
                return
            self.link = QuicLink(self)
            self._schedule_ping()
            if not self._handshake_waiter.done():
                self._handshake_waiter.set_result(None)
            if self.on_open is not None:
                self.on_open(self.link)
        elif isinstance(event, events.ConnectionTerminated):
            self._fail_handshake(f"the edge closed the QUIC handshake: {event.reason_phrase or event.error_code}")

    def _fail_handshake(self, reason: str) -> None:
        if not self._handshake_waiter.done():
            self.failure = reason
            self._handshake_waiter.set_exception(QuicHandshakeError(reason))
            self._handshake_waiter.exception()  # retrieved; never "unretrieved"

    # --- liveness
    def _schedule_ping(self) -> None:
        self._ping_timer = self._loop.call_later(PING_INTERVAL, self._ping)

    def _stop_pings(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None

    def _ping(self) -> None:
        link = self.link
        if link is None or link.is_closed:
            return
        silent = self._loop.time() - self._last_rx
        if silent > SILENCE_LIMIT:
            link._ended(f"no packets from the peer for {silent:.0f}s")
            self._quic.close(error_code=0, reason_phrase="peer silent")
            self.transmit()
            self.hd_release()
            return
        self._ping_uid += 1
        self._quic.send_ping(self._ping_uid)
        self.transmit()
        self._schedule_ping()

    def hd_forget(self, why: str) -> None:
        """Drop a connection still in handshake: no timer, no more packets, nothing kept alive."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_pings()
        self._transport = None
        self._fail_handshake(why)

    def hd_release(self) -> None:
        """The link is over: stop timers, and close the UDP socket if it is ours (client)."""
        self._stop_pings()
        if self.owns_transport and self._transport is not None:
            self._loop.call_later(0.05, self._transport.close)  # let the CONNECTION_CLOSE go out


async def dial_quic_link(host: str, port: int, pin: str, *, timeout: float = HANDSHAKE_TIMEOUT,
                         local_host: str | None = None) -> QuicLink:
    """QUIC handshake with the edge at host:port (UDP), check the certificate pin; return the link.
    `local_host`: the source address to send from (default: the system's choice).

    Raises QuicHandshakeError (no answer within `timeout`, refused, or rejected), PinMismatch.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise QuicHandshakeError(f"cannot resolve {host}")
    family, _, _, _, addr = infos[0]
    quic = _CreditConnection(configuration=_configuration(client=True, server_name=host))
    quic.hd_init()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: QuicLinkProtocol(quic, client=True), remote_addr=addr[:2], family=family,
        local_addr=(local_host, 0) if local_host else None)
    try:
        proto.connect(addr[:2])
        try:
            await asyncio.wait_for(asyncio.shield(proto._handshake_waiter), timeout)
        except asyncio.TimeoutError:
            raise QuicHandshakeError(f"no QUIC answer from {host}:{port} within {timeout:g}s "
                                     "(is UDP to the edge blocked?)") from None
        cert = quic.tls._peer_certificate
        if cert is None:
            raise PinMismatch("the edge presented no TLS certificate; refusing to continue")
        verify_pin_der(cert.public_bytes(serialization.Encoding.DER), pin)
    except BaseException:
        if proto.link is not None:
            proto.link._ended("dial failed")
        proto.close()
        proto.hd_release()
        transport.close()
        raise
    assert proto.link is not None
    return proto.link


try:  # aioquic >= 1.3: the INVALID_TOKEN close it sends itself (private; dropping is the fallback)
    from aioquic.asyncio.server import _encode_invalid_token_close
except ImportError:  # pragma: no cover
    _encode_invalid_token_close = None


class QuicLinkServer(asyncio.DatagramProtocol):
    """The UDP listener: routes datagrams to connections by connection id, and decides which
    Initial packets may create one (Retry first, then `HandshakeGate`).

    Replaces aioquic's `QuicServer`, whose `datagram_received` creates a connection (and a TLS
    handshake's worth of CPU and memory) for any 1200-byte Initial from anywhere. The routing is
    aioquic's: the same connection-id callbacks on the protocol (private attributes of
    `QuicConnectionProtocol`, tested in tests/unit/test_quic_bounds.py). `clock` is for tests."""

    def __init__(self, configuration: QuicConfiguration, on_open: Callable[[QuicLink], None],
                 limits: HandshakeLimits, clock: Callable[[], float] | None = None) -> None:
        self._configuration = configuration
        self._on_open = on_open
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self.gate = HandshakeGate(limits, self._clock())
        self._retry = QuicRetryTokenHandler() if limits.retry else None
        self._protocols: dict[bytes, QuicLinkProtocol] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._log_at = 0.0
        self._sweep: asyncio.TimerHandle | None = None

    # --- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._sweep = self._loop.call_later(60.0, self._forget_idle)

    def close(self) -> None:
        """Close every connection and stop listening."""
        for proto in set(self._protocols.values()):
            proto.close()
        self._protocols.clear()
        for timer in (self._sweep, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        if self._transport is not None:
            self._transport.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return
        proto = self._protocols.get(header.destination_cid)
        if proto is not None:
            proto.datagram_received(data, addr)
            return
        # Only a full-size datagram may start anything (RFC 9000 §14.1): every answer below is
        # smaller than what it answers, so the edge cannot be used to amplify a spoofed flood.
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return
        now = self._clock()
        gate = self.gate
        transport = self._transport
        assert transport is not None
        if header.version is not None and header.version not in self._configuration.supported_versions:
            if header.packet_type != QuicPacketType.VERSION_NEGOTIATION and gate.stateless(now):
                transport.sendto(encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=self._configuration.supported_versions), addr)
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        original_cid: bytes = header.destination_cid
        retry_cid: bytes | None = None
        if self._retry is not None:
            if not header.token:
                if gate.stateless(now):
                    retry_cid = os.urandom(8)
                    token = self._retry.create_token(
                        address=addr, original_destination_connection_id=header.destination_cid,
                        retry_source_connection_id=retry_cid, now=now)
                    transport.sendto(encode_quic_retry(
                        version=header.version, source_cid=retry_cid, destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid, retry_token=token), addr)
                return
            try:
                original_cid = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token, now=now)
            except ValueError:
                if _encode_invalid_token_close is not None and gate.stateless(now):
                    transport.sendto(_encode_invalid_token_close(
                        version=header.version, source_cid=header.destination_cid,
                        destination_cid=header.source_cid), addr)
                return
            retry_cid = header.destination_cid
        if not gate.admit(source_key(str(addr[0])), now):
            # Dropped without a word: the client retransmits its Initial (same token) and is
            # admitted once the buckets allow, within its own dial timeout.
            self._log_refusals(now)
            return
        quic = _CreditConnection(configuration=self._configuration,
                                 original_destination_connection_id=original_cid,
                                 retry_source_connection_id=retry_cid)
        quic.hd_init()
        proto = QuicLinkProtocol(quic, client=False, on_open=self._on_open)
        for old in gate.start(proto, now):
            self._drop(old, "the edge is busy with other handshakes")
        proto.connection_made(transport)
        proto._connection_id_issued_handler = lambda cid: self._protocols.__setitem__(cid, proto)
        proto._connection_id_retired_handler = lambda cid: self._protocols.pop(cid, None)
        proto._connection_terminated_handler = lambda: self._terminated(proto)
        proto.hd_on_handshake = self._handshake_done
        self._protocols[header.destination_cid] = proto
        self._protocols[quic.host_cid] = proto
        self._arm_deadline()
        proto.datagram_received(data, addr)

    # --- connections
    def _handshake_done(self, proto: QuicLinkProtocol) -> None:
        self.gate.finished(proto, completed=True)

    def _terminated(self, proto: QuicLinkProtocol) -> None:
        for cid in [cid for cid, p in self._protocols.items() if p is proto]:
            del self._protocols[cid]
        self.gate.finished(proto, completed=False)

    def _drop(self, proto: QuicLinkProtocol, why: str) -> None:
        """Give up a handshake (past its deadline, or evicted): say so in one packet, then forget
        the connection at once (aioquic would keep it, retransmitting its flight, until its 30 s
        idle timeout)."""
        proto._connection_terminated_handler = lambda: None
        for cid in [cid for cid, p in self._protocols.items() if p is proto]:
            del self._protocols[cid]
        try:
            proto.close(error_code=0x2, reason_phrase=why)  # CONNECTION_REFUSED
        except Exception:  # the connection may be in any handshake state: never let it escape
            pass
        proto.hd_forget(why)

    def _arm_deadline(self) -> None:
        if self._deadline_timer is None:
            deadline = self.gate.next_deadline()
            if deadline is not None:
                self._deadline_timer = self._loop.call_later(max(0.0, deadline - self._clock()), self.expire_due)

    def expire_due(self) -> None:
        """Drop the handshakes past their deadline (a timer calls this; tests with a fake clock too)."""
        self._deadline_timer, timer = None, self._deadline_timer
        if timer is not None:
            timer.cancel()
        for proto in self.gate.expired(self._clock()):
            self._drop(proto, "handshake timeout")
        self._arm_deadline()

    def _forget_idle(self) -> None:
        self.gate.forget_idle(self._clock())
        self._sweep = self._loop.call_later(60.0, self._forget_idle)

    def _log_refusals(self, now: float) -> None:
        # One line per 10 s at most: a flood must not turn into a flood of log lines.
        if now >= self._log_at:
            c = self.gate.counts
            log.warning("QUIC handshakes refused since start: %d over the per-source rate, %d over the global "
                        "rate; %d given up (timeout or evicted)", c["source_rate"], c["global_rate"],
                        c["timeouts"] + c["evicted"])
            self._log_at = now + 10.0

    # --- introspection
    @property
    def in_handshake(self) -> int:
        return self.gate.pending

    @property
    def connections(self) -> int:
        return len(set(self._protocols.values()))

    def stats(self) -> dict[str, int]:
        return {**self.gate.counts, "in_handshake": self.in_handshake, "connections": self.connections,
                "sources": self.gate.sources}


async def serve_quic_links(host: str, port: int, cert: Path, key: Path,
                           on_open: Callable[[QuicLink], None], *, limits: HandshakeLimits | None = None,
                           clock: Callable[[], float] | None = None) -> QuicLinkServer:
    """Listen for connector links on UDP host:port; `on_open` gets each link after its handshake.
    `limits`: what strangers' handshakes may cost (`HandshakeLimits()` by default); `clock`
    (tests): the time the limits count in, the loop's clock by default."""
    config = _configuration(client=False)
    config.load_cert_chain(str(cert), str(key))
    # aioquic logs a WARNING for every protocol error a peer commits: strangers would write the
    # edge's log at the admission rate. What a connector needs to know reaches it in the close.
    quic_log = logging.getLogger("quic")
    if quic_log.level == logging.NOTSET:
        quic_log.setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()
    _, server = await loop.create_datagram_endpoint(
        lambda: QuicLinkServer(config, on_open, limits or HandshakeLimits(), clock), local_addr=(host, port))
    return server


__all__ = ["ALPN", "HandshakeGate", "HandshakeLimits", "QuicHandshakeError", "QuicLink", "QuicLinkServer",
           "QuicLinkStream", "TokenBucket", "dial_quic_link", "serve_quic_links", "source_key"]
