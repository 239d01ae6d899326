"""`ByteChannel`: the one byte-pipe interface of the proxy, whatever carries the bytes.

A channel is a bidirectional byte stream with back-pressure in both directions. The proxy's
origin code, pool and sessions see only this interface; three implementations carry it:

- `TcpChannel`   an `asyncio.Protocol` on a TCP transport (asyncio or uvloop: no isinstance
                 checks on the transport, only the transport methods both loops provide);
- `StreamChannel` a tunnel `LinkStream` (it is the stream's `StreamHandler`);
- `TlsChannel`   TLS over any other channel (`proxy/pg/tls.py`, `ssl.MemoryBIO`).

Reading (push, like `asyncio.Protocol`)::

    ch.set_receiver(on_data, on_close)

`on_data(bytes)` gets every received chunk in order. `on_close(exc)` is called exactly once,
when the channel is finished:
  * `None` after the peer's clean end (TCP FIN, stream FIN, TLS close_notify or EOF) — delivered
    only after every chunk received before it; also `None` when *we* call `close()`/`abort()`
    (then synchronously, from inside that call, and whatever was still buffered is dropped);
  * an exception for an error (connection reset, stream reset, TLS failure) — delivered at once,
    dropping data not yet delivered.
The peer's EOF ends the channel (there is no half-open read side: PostgreSQL never needs one);
our own `write_eof()` half-closes the write side.

Bytes that arrive while there is no receiver (`set_receiver(None, None)`, or before the first
call) or while reading is paused are buffered in the channel and delivered in order by the next
`set_receiver`/`resume_reading`. While something is buffered the channel also stops its source
(pauses the transport, withholds stream credit), so the buffer stays bounded at about one read
(TCP) or one window (stream). Receivers can be swapped at any time (the origin handshake reads
with one receiver and hands the channel to the pool with another); `pause_reading()` guarantees
no `on_data` call until `resume_reading()`, even from inside `on_data`.

Writing: `write(data)` never blocks and never raises on a closed channel (the bytes are dropped;
`on_close` has told, or will tell, the owner). Write-side back-pressure is signalled, not
enforced, the way asyncio transports do it:

    ch.write_paused                      # True while the write buffer is above its high-water mark
    ch.set_write_flow(on_pause, on_resume)   # called on each transition
    await ch.drain()                     # for coroutine code: wait until not write_paused

A forwarder wires two channels so that a slow destination stops the source::

    src.set_receiver(dst.write, on_src_close)
    dst.set_write_flow(src.pause_reading, src.resume_reading)

For a `StreamChannel` source that means credit is returned to the peer (`consumed()`) only for
bytes handed to a receiver that has not paused reading — the same discipline as
`tunnel/splice.py`, so one slow client holds back one stream window, never the whole link.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any, Callable

from tunnel.link import LinkStream, StreamInbox
from tunnel.messages import RST_CANCEL

log = logging.getLogger(__name__)

DataCallback = Callable[[bytes], None]
CloseCallback = Callable[[Exception | None], None]
FlowCallback = Callable[[], None]

#: TCP write buffer limits (bytes) of `TcpChannel`: `write_paused` above HIGH, cleared below LOW.
TCP_WRITE_HIGH = 256 * 1024
TCP_WRITE_LOW = 64 * 1024
#: How long a locally closed stream waits for the peer's FIN before resetting it.
STREAM_CLOSE_LINGER = 10.0


class ChannelClosed(ConnectionError):
    """Raised by `drain()` when the channel is closed."""


class ByteChannel:
    """Base class: receiver plumbing, read buffering/pausing and write-flow signalling.

    Implementations call `_received(data)`, `_ended(exc)` and `_set_write_paused(flag)` and
    implement `write`, `write_eof`, `close`, `abort`, `_pause_source`, `_resume_source`
    (and optionally `_delivered(n)` and `get_extra_info`).
    """

    def __init__(self) -> None:
        self._on_data: DataCallback | None = None
        self._on_close: CloseCallback | None = None
        self._user_paused = False
        self._source_paused = False
        self._inbox: deque[bytes] = deque()
        self._end_pending = False  # a clean end waits behind buffered data
        self._error: Exception | None = None  # an error end waiting for a receiver
        self._finished = False  # on_close delivered (or owed to the next receiver)
        self._close_reported = False
        self._delivering = False
        self._write_paused = False
        self._on_pause_writing: FlowCallback | None = None
        self._on_resume_writing: FlowCallback | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------------ public API: reading
    def set_receiver(self, on_data: DataCallback | None, on_close: CloseCallback | None) -> None:
        """Install (or replace, or with `None, None` remove) the receiver; buffered bytes and a
        pending end are delivered to it at once (synchronously)."""
        self._on_data = on_data
        self._on_close = on_close
        self._flush()
        self._update_source()

    def pause_reading(self) -> None:
        """No `on_data` until `resume_reading()`; the source is stopped too."""
        if not self._user_paused:
            self._user_paused = True
            self._update_source()

    def resume_reading(self) -> None:
        if self._user_paused:
            self._user_paused = False
            self._flush()
            self._update_source()

    @property
    def reading_paused(self) -> bool:
        return self._user_paused

    # ------------------------------------------------------------------ public API: writing
    def write(self, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_eof(self) -> None:  # pragma: no cover - abstract
        """Half-close: we will write no more (TCP FIN, stream FIN, TLS close_notify)."""
        raise NotImplementedError

    @property
    def write_paused(self) -> bool:
        """True while the write side is backed up: producers should stop until it clears."""
        return self._write_paused

    def set_write_flow(self, on_pause: FlowCallback | None, on_resume: FlowCallback | None) -> None:
        """Callbacks for write-side transitions (backed up / drained); one pair per channel
        (a channel wrapped by a `TlsChannel` belongs to the wrapper). If the channel is already
        backed up, `on_pause` is called at once so the producer's state is consistent."""
        self._on_pause_writing = on_pause
        self._on_resume_writing = on_resume
        if self._write_paused and on_pause is not None:
            on_pause()

    async def drain(self) -> None:
        """Wait until the write side is not backed up; raises `ChannelClosed` if it closes."""
        while self._write_paused and not self.is_closing():
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._drain_waiters:
                    self._drain_waiters.remove(fut)
        if self.is_closing():
            raise ChannelClosed("the channel is closed")

    # ------------------------------------------------------------------ public API: lifecycle
    def close(self) -> None:  # pragma: no cover - abstract
        """Graceful close: flush what was written, end the write side, release the carrier.
        Reports `on_close(None)` (synchronously) unless already reported."""
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - abstract
        """Immediate close, dropping buffered writes (TCP RST / stream reset)."""
        raise NotImplementedError

    def is_closing(self) -> bool:
        return self._finished

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport details: "peername", "sockname", "socket", "ssl_object", "peercert"…"""
        return default

    # ------------------------------------------------------------------ for implementations
    def _can_deliver(self) -> bool:
        return self._on_data is not None and not self._user_paused

    def _received(self, data: bytes) -> None:
        if self._finished or not data:
            self._discarded(len(data))
            return
        if not self._inbox and not self._delivering and self._can_deliver():
            self._deliver(data)
            if self._inbox or self._end_pending:
                self._flush()
            self._update_source()
            return
        self._inbox.append(data)
        if not self._delivering:
            self._flush()
        self._update_source()

    def _deliver(self, data: bytes) -> None:
        assert self._on_data is not None
        self._delivering = True
        try:
            self._on_data(data)
        finally:
            self._delivering = False
        self._delivered(len(data))

    def _flush(self) -> None:
        if self._delivering:
            return  # the loop below (further up the stack) picks it up
        while self._inbox and self._can_deliver() and not self._finished:
            data = self._inbox.popleft()
            self._deliver(data)
        if self._finished or self._inbox:
            if self._finished:
                self._report_close()
            return
        if self._end_pending and self._on_close is not None:
            self._end_pending = False
            self._finished = True
            self._report_close()
            self._after_end()

    def _ended(self, exc: Exception | None) -> None:
        """The source has ended: `None` = clean (after buffered data), else an error (at once)."""
        if self._finished or self._end_pending and exc is None:
            return
        if exc is None:
            self._end_pending = True
            self._flush()
            return
        self._error = exc
        self._inbox.clear()
        self._end_pending = False
        self._finished = True
        self._report_close()
        self._wake_drainers()

    def _closed_locally(self) -> None:
        """Called by close()/abort(): finished now, buffered input dropped, on_close(None)."""
        if self._finished and self._close_reported:
            return
        dropped = sum(len(c) for c in self._inbox)
        self._inbox.clear()
        self._discarded(dropped)
        self._end_pending = False
        self._finished = True
        self._report_close()
        self._wake_drainers()

    def _report_close(self) -> None:
        if self._close_reported or self._on_close is None:
            return
        self._close_reported = True
        cb = self._on_close
        try:
            cb(self._error)
        except Exception:  # a receiver's bug must not break the carrier
            log.exception("on_close callback failed")

    def _after_end(self) -> None:
        """Hook: the clean end has been reported (e.g. finish the stream)."""
        self._wake_drainers()

    def _update_source(self) -> None:
        want = self._user_paused or (bool(self._inbox) and not self._can_deliver())
        if want and not self._source_paused:
            self._source_paused = True
            self._pause_source()
        elif not want and self._source_paused:
            self._source_paused = False
            self._resume_source()

    def _set_write_paused(self, paused: bool) -> None:
        if paused == self._write_paused:
            return
        self._write_paused = paused
        cb = self._on_pause_writing if paused else self._on_resume_writing
        if cb is not None:
            cb()
        if not paused:
            self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _pause_source(self) -> None:
        pass

    def _resume_source(self) -> None:
        pass

    def _delivered(self, n: int) -> None:
        """Hook: n bytes were handed to the receiver (StreamChannel returns credit here)."""

    def _discarded(self, n: int) -> None:
        """Hook: n received bytes were dropped (channel finished)."""


# ---------------------------------------------------------------------------------------- TCP


class TcpChannel(ByteChannel, asyncio.Protocol):
    """A channel on a TCP transport; use it as the protocol factory:

        transport, ch = await loop.create_connection(TcpChannel, host, port)
        server = await loop.create_server(lambda: TcpChannel(on_connection=accept), host, port)
    """

    def __init__(self, on_connection: Callable[[TcpChannel], None] | None = None) -> None:
        ByteChannel.__init__(self)
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._on_connection = on_connection

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH, low=TCP_WRITE_LOW)
        if self._source_paused:
            transport.pause_reading()
        if self._on_connection is not None:
            self._on_connection(self)

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def eof_received(self) -> bool:
        self._ended(None)
        return False  # the transport closes itself once our buffered writes are out

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self._finished and not self._end_pending:
            exc = ConnectionResetError("the connection was closed")
        if exc is not None:
            self._ended(exc)
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._set_write_paused(True)

    def resume_writing(self) -> None:
        self._set_write_paused(False)

    # ByteChannel
    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or self._finished or t.is_closing():
            return
        t.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._closed_locally()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._closed_locally()

    def is_closing(self) -> bool:
        return self._finished or (self.transport is not None and self.transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    def _pause_source(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def _resume_source(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()


# ------------------------------------------------------------------------------- tunnel stream


class StreamChannel(ByteChannel):
    """A channel on a tunnel `LinkStream`; it is the stream's `StreamHandler`.

    Credit: received bytes are acknowledged with `consumed()` only when they have been handed
    to a receiver that did not pause reading in the meantime; bytes buffered or delivered into
    a paused receiver are acknowledged on `resume_reading()`. The peer therefore stops after
    one window when we stop reading.
    """

    def __init__(self, stream: LinkStream, *, attach: bool = True) -> None:
        super().__init__()
        self.stream = stream
        self._owed = 0
        self._linger: asyncio.TimerHandle | None = None
        if attach:
            stream.set_handler(self)

    @classmethod
    def from_inbox(cls, inbox: StreamInbox) -> StreamChannel:
        """Take over a stream after its ConnectRequest/Response (replays buffered bytes/EOF/reset)."""
        ch = cls(inbox.stream, attach=False)
        inbox.hand_over(ch)
        return ch

    # StreamHandler
    def stream_data(self, data: bytes) -> None:
        self._received(data)

    def stream_eof(self) -> None:
        if self._finished:  # we closed first and the peer has now answered with its FIN
            self._cancel_linger()
        self._ended(None)

    def stream_reset(self, code: int, reason: str) -> None:
        self._cancel_linger()
        self._ended(ConnectionResetError(reason or f"the tunnel stream was reset (code {code})"))

    def stream_pause(self) -> None:
        self._set_write_paused(True)

    def stream_resume(self) -> None:
        self._set_write_paused(False)

    # ByteChannel
    def write(self, data: bytes) -> None:
        if self._finished or self.stream.closed:
            return
        self.stream.write(data)

    def write_eof(self) -> None:
        if not self.stream.closed:
            self.stream.write_eof()

    def close(self) -> None:
        stream = self.stream
        if not stream.closed:
            stream.write_eof()
            if not stream.closed:  # the peer has not sent its FIN yet: do not wait forever
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    stream.reset(RST_CANCEL, "closed")
                else:
                    self._linger = loop.call_later(STREAM_CLOSE_LINGER, self._linger_expired)
        self._closed_locally()

    def abort(self) -> None:
        self._cancel_linger()
        if not self.stream.closed:
            self.stream.reset(RST_CANCEL, "closed by the proxy")
        self._closed_locally()

    def is_closing(self) -> bool:
        return self._finished or self.stream.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream":
            return self.stream
        if name == "stream_id":
            return self.stream.id
        return default

    def _after_end(self) -> None:
        super()._after_end()
        # The peer ended its side and we have reported it: end ours (finishes the stream).
        if not self.stream.closed:
            self.stream.write_eof()

    def _delivered(self, n: int) -> None:
        if self._user_paused:
            self._owed += n  # the receiver paused while handling it: credit on resume
        elif not self.stream.closed:
            self.stream.consumed(n)

    def _discarded(self, n: int) -> None:
        if n and not self.stream.closed:
            self.stream.consumed(n)

    def _resume_source(self) -> None:
        if self._owed:
            owed, self._owed = self._owed, 0
            if not self.stream.closed:
                self.stream.consumed(owed)

    def _linger_expired(self) -> None:
        self._linger = None
        if not self.stream.closed:
            self.stream.reset(RST_CANCEL, "the peer did not close the stream")

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
