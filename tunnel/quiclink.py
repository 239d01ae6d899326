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
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import Any, Callable

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer
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
HANDSHAKE_TIMEOUT = 5.0
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

    async def close(self, code: int = 0, reason: str = "") -> None:
        if not self.close_reason:
            self.close_reason = reason
        if not self._done.done():
            self.proto.close(error_code=code, reason_phrase=reason[:120])
            self._ended(self.close_reason or "closed")
        self.proto.hd_release()

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
        if link is not None and link.paused:
            link._after_transmit()

    # --- aioquic events
    def quic_event_received(self, event: events.QuicEvent) -> None:
        link = self.link
        if link is not None:
            link._event(event)
            if type(event) is events.ConnectionTerminated:
                self._stop_pings()
            return
        if isinstance(event, events.HandshakeCompleted):
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

    def hd_release(self) -> None:
        """The link is over: stop timers, and close the UDP socket if it is ours (client)."""
        self._stop_pings()
        if self.owns_transport and self._transport is not None:
            self._loop.call_later(0.05, self._transport.close)  # let the CONNECTION_CLOSE go out


async def dial_quic_link(host: str, port: int, pin: str, *, timeout: float = HANDSHAKE_TIMEOUT) -> QuicLink:
    """QUIC handshake with the edge at host:port (UDP), check the certificate pin; return the link.

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
        lambda: QuicLinkProtocol(quic, client=True), remote_addr=addr[:2], family=family)
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


async def serve_quic_links(host: str, port: int, cert: Path, key: Path,
                           on_open: Callable[[QuicLink], None]) -> QuicServer:
    """Listen for connector links on UDP host:port; `on_open` gets each link after its handshake."""
    config = _configuration(client=False)
    config.load_cert_chain(str(cert), str(key))

    def factory(quic: QuicConnection, **kwargs: Any) -> QuicLinkProtocol:
        # aioquic's server builds a plain QuicConnection; give it our credit-based windows
        # before the handshake (the transport parameters carry MAX_STREAMS).
        quic.__class__ = _CreditConnection
        quic.hd_init()  # type: ignore[attr-defined]
        return QuicLinkProtocol(quic, client=False, on_open=on_open)

    return await serve(host, port, configuration=config, create_protocol=factory, retry=False)


__all__ = ["ALPN", "QuicHandshakeError", "QuicLink", "QuicLinkStream", "dial_quic_link", "serve_quic_links"]
