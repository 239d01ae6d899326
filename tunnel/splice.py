"""Byte pumps with back-pressure: TCP socket ⇄ link stream, and link stream ⇄ link stream.

Credit discipline (why memory stays bounded): bytes received on a stream are acknowledged
with `consumed()` only once they have been handed to a destination that is not paused. A
paused destination (full TCP buffer, or a stream whose send buffer is over its high-water
mark) therefore stops the peer at one window per stream, without stalling other streams.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable

from tunnel.link import LinkStream
from tunnel.messages import RST_CANCEL

log = logging.getLogger(__name__)

_LINGER_ZERO = struct.pack("ii", 1, 0)


class TcpStreamSplice(asyncio.Protocol):
    """asyncio Protocol for one TCP connection, spliced onto one link stream.

    Reading from the socket stays paused until `activate()`: the stream may not exist yet
    (client side) or the ConnectResponse must go out first (connector side; SSH servers
    speak first).
    """

    def __init__(self, on_close: Callable[[TcpStreamSplice], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.stream: LinkStream | None = None
        self._active = False
        self._tcp_write_paused = False  # our writes into the socket are backed up
        self._stream_paused = False  # the stream's send buffer is over high water
        self._owed = 0  # received stream bytes not yet acknowledged
        self._eof_to_stream = False
        self._eof_from_stream = False
        self._done = False
        self._on_close = on_close
        self._early: list[bytes] = []  # socket bytes that raced ahead of activate()
        self.bytes_up = 0
        self.bytes_down = 0

    # -------------------------------------------------------------- wiring
    def attach(self, stream: LinkStream) -> None:
        self.stream = stream
        stream.set_handler(self)

    def activate(self) -> None:
        """Start moving bytes (after attach)."""
        self._active = True
        if self._done:
            if self.stream is not None:
                self.stream.reset(RST_CANCEL, "client closed the connection")
            return
        for chunk in self._early:
            self._to_stream(chunk)
        self._early.clear()
        if self.transport is not None and not self._stream_paused:
            self.transport.resume_reading()
        if self._eof_to_stream and self.stream is not None:
            self.stream.write_eof()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------- TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
        if not self._active:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if not self._active:
            self._early.append(data)
            return
        self._to_stream(data)

    def _to_stream(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.stream is not None:
            self.stream.write(data)

    def eof_received(self) -> bool:
        self._eof_to_stream = True
        if self._active and self.stream is not None:
            self.stream.write_eof()
        self._maybe_close()
        return True  # keep our write side open: half-close

    def pause_writing(self) -> None:
        self._tcp_write_paused = True

    def resume_writing(self) -> None:
        self._tcp_write_paused = False
        if self._owed and self.stream is not None:
            owed, self._owed = self._owed, 0
            self.stream.consumed(owed)

    def connection_lost(self, exc: Exception | None) -> None:
        first = not self._done
        self._done = True
        stream = self.stream
        if stream is not None and not stream.closed and self._active:
            if exc is not None or not (self._eof_to_stream and self._eof_from_stream):
                reason = f"connection closed: {exc}" if exc else "connection closed"
                stream.reset(RST_CANCEL, reason)
        if first and self._on_close is not None:
            self._on_close(self)

    # -------------------------------------------------------------- stream side
    def stream_data(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            if self.stream is not None:
                self.stream.consumed(len(data))
            return
        self.bytes_down += len(data)
        t.write(data)
        if self._tcp_write_paused:
            self._owed += len(data)
        elif self.stream is not None:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self._eof_from_stream = True
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self._maybe_close()

    def stream_reset(self, code: int, reason: str) -> None:
        self._done = True
        if self.transport is not None:
            # Pass the abort on as a TCP RST (not a clean FIN), so the peer knows it was cut off.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            self.transport.abort()

    def stream_pause(self) -> None:
        self._stream_paused = True
        if self.transport is not None and self._active:
            self.transport.pause_reading()

    def stream_resume(self) -> None:
        self._stream_paused = False
        t = self.transport
        if t is not None and self._active and not t.is_closing():
            t.resume_reading()

    def _maybe_close(self) -> None:
        if self._eof_to_stream and self._eof_from_stream and self.transport is not None:
            self.transport.close()


class _BridgeEnd:
    """Handler on one stream of a bridge; forwards into the other stream."""

    __slots__ = ("me", "other", "peer_end", "withhold", "owed", "eof", "bridge")

    def __init__(self, bridge: StreamBridge, me: LinkStream, other: LinkStream) -> None:
        self.bridge = bridge
        self.me = me
        self.other = other
        self.peer_end: _BridgeEnd | None = None
        self.withhold = False  # `other` is backed up: keep credit for our incoming data
        self.owed = 0
        self.eof = False

    def stream_data(self, data: bytes) -> None:
        self.other.write(data)
        if self.withhold:
            self.owed += len(data)
        else:
            self.me.consumed(len(data))

    def stream_eof(self) -> None:
        self.eof = True
        self.other.write_eof()
        self.bridge._check_done()

    def stream_reset(self, code: int, reason: str) -> None:
        self.other.reset(code, reason)
        self.bridge._finish()

    def stream_pause(self) -> None:
        # Writes into `me` are backed up: the end that writes into us must stop crediting.
        assert self.peer_end is not None
        self.peer_end.withhold = True

    def stream_resume(self) -> None:
        assert self.peer_end is not None
        peer = self.peer_end
        peer.withhold = False
        if peer.owed:
            owed, peer.owed = peer.owed, 0
            peer.me.consumed(owed)


class StreamBridge:
    """Joins two link streams (the relay's client stream and connector stream)."""

    def __init__(self, a: LinkStream, b: LinkStream, on_done: Callable[[], None] | None = None) -> None:
        self.end_a = _BridgeEnd(self, a, b)
        self.end_b = _BridgeEnd(self, b, a)
        self.end_a.peer_end = self.end_b
        self.end_b.peer_end = self.end_a
        self._on_done = on_done
        self._finished = False

    def _check_done(self) -> None:
        if self.end_a.eof and self.end_b.eof:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._on_done is not None:
                self._on_done()
