"""Multiplexed links: the transport-independent stream interface and the mux-based link core.

A `Link` carries many bidirectional `LinkStream`s. The tunnel protocol (control stream,
ConnectRequest/Response, raw bytes) is written only against these two classes, so the QUIC
link (issue 6) can carry it unchanged. `MuxLink` runs the sans-I/O `tunnel.mux.Mux` with the
stream bookkeeping and event dispatch; tunnel/wslink.py carries its messages over a WebSocket.

Flow control is credit based per stream: a handler calls `consumed(n)` once it has delivered n
received bytes onwards, and gets `stream_pause()`/`stream_resume()` when its own writes pile up.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol


from tunnel.messages import RST_SHUTDOWN, MessageError, MessageReader, encode
from tunnel.mux import (
    DataReceived,
    GoAway,
    Mux,
    MuxError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamWritable,
)

log = logging.getLogger(__name__)


class StreamHandler(Protocol):
    """Receives what happens on one stream. Called from the event loop, must not block."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_reset(self, code: int, reason: str) -> None: ...
    def stream_pause(self) -> None: ...  # our writes are piling up: stop producing
    def stream_resume(self) -> None: ...


class LinkStream(ABC):
    """One bidirectional byte stream on a link."""

    id: int
    handler: StreamHandler | None

    def set_handler(self, handler: StreamHandler) -> None:
        self.handler = handler

    @abstractmethod
    def write(self, data: bytes) -> None: ...
    @abstractmethod
    def write_eof(self) -> None: ...
    @abstractmethod
    def reset(self, code: int, reason: str = "") -> None: ...
    @abstractmethod
    def consumed(self, n: int) -> None: ...

    @property
    @abstractmethod
    def closed(self) -> bool: ...


class Link(ABC):
    """Many streams over one connection to the peer."""

    on_stream: Callable[[LinkStream], None] | None = None
    on_goaway: Callable[[int, str], None] | None = None

    @abstractmethod
    def open_stream(self) -> LinkStream: ...
    @abstractmethod
    async def run(self) -> None:
        """Serve the link until it closes; every live stream is then reset."""
    @abstractmethod
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    @abstractmethod
    def abort(self, reason: str = "") -> None:
        """Drop the connection now, without a closing handshake; `run()` then returns."""
    @property
    @abstractmethod
    def stream_count(self) -> int: ...
    @property
    @abstractmethod
    def is_closed(self) -> bool: ...

    close_reason: str = ""


# ------------------------------------------------------------------ WebSocket mux link


class HalfCloseStream(LinkStream):
    """The stream lifecycle both transports share: half-close each way, reset, done.

    A stream is done once it is reset (either side) or FIN went both ways; subclasses say how
    FIN and RST go out (`_send_fin`, `_send_reset`) and forget the stream (`_forget`)."""

    __slots__ = ("id", "handler", "_sent_fin", "_recv_fin", "_done")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.handler = None
        self._sent_fin = False
        self._recv_fin = False
        self._done = False

    def write_eof(self) -> None:
        if self._done or self._sent_fin:
            return
        self._sent_fin = True
        self._send_fin()
        if self._recv_fin:
            self._finish()

    def reset(self, code: int, reason: str = "") -> None:
        if self._done:
            return
        self._send_reset(code, reason)
        self._finish()

    @property
    def closed(self) -> bool:
        return self._done

    def _finish(self) -> None:
        self._done = True
        self._forget()

    @abstractmethod
    def _send_fin(self) -> None: ...
    @abstractmethod
    def _send_reset(self, code: int, reason: str) -> None: ...
    @abstractmethod
    def _forget(self) -> None: ...

    # called by the link
    def _on_eof(self) -> None:
        self._recv_fin = True
        if self.handler is not None:
            self.handler.stream_eof()
        if self._sent_fin:
            self._finish()

    def _on_reset(self, code: int, reason: str) -> None:
        self._finish()
        if self.handler is not None:
            self.handler.stream_reset(code, reason)


class MuxStream(HalfCloseStream):
    __slots__ = ("_link",)

    def __init__(self, link: MuxLink, stream_id: int) -> None:
        super().__init__(stream_id)
        self._link = link

    def write(self, data: bytes) -> None:
        if self._done or self._sent_fin or not data:
            return
        link = self._link
        try:
            more = link.mux.send(self.id, data)
        except MuxError:
            return
        link.kick()
        if not more and self.handler is not None:
            self.handler.stream_pause()

    def consumed(self, n: int) -> None:
        if n and not self._done and not self._recv_fin:
            self._link.mux.consumed(self.id, n)
            self._link.kick()

    def _send_fin(self) -> None:
        try:
            self._link.mux.send_fin(self.id)
        except MuxError:
            pass
        self._link.kick()

    def _send_reset(self, code: int, reason: str) -> None:
        self._link.mux.reset(self.id, code, reason)
        self._link.kick()

    def _forget(self) -> None:
        self._link.streams.pop(self.id, None)


class MuxLink(Link):
    """The mux-based part of a link: streams, event dispatch, shutdown.

    Subclasses move the mux's messages (tunnel/wslink.py: a WebSocket driven from asyncio.Protocol
    callbacks): `kick()` asks for a flush of `mux.messages_to_send()`, `run()` returns when the
    transport is gone, `close()` ends it.
    """

    def __init__(self, *, client: bool, window: int | None = None) -> None:
        kwargs = {} if window is None else {"window": window}
        self.mux = Mux(client=client, **kwargs)
        self.streams: dict[int, MuxStream] = {}
        self._closed = False
        self.close_reason = ""
        self.bytes_in = 0
        self.bytes_out = 0

    # --- Link API
    def open_stream(self) -> MuxStream:
        if self._closed:
            raise MuxError("link is closed")
        sid = self.mux.open_stream()
        stream = MuxStream(self, sid)
        self.streams[sid] = stream
        self.kick()
        return stream

    def go_away(self, code: int = 0, reason: str = "") -> None:
        self.mux.go_away(code, reason)
        self.kick()

    @property
    def stream_count(self) -> int:
        return len(self.streams)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def kick(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        raise NotImplementedError

    async def close(self, code: int = 1000, reason: str = "") -> None:
        raise NotImplementedError

    def abort(self, reason: str = "") -> None:
        raise NotImplementedError

    def _dispatch(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            kind = type(ev)
            if kind is DataReceived:
                s = streams.get(ev.stream_id)
                if s is not None and s.handler is not None:
                    s.handler.stream_data(ev.data)
            elif kind is StreamWritable:
                s = streams.get(ev.stream_id)
                if s is not None and s.handler is not None:
                    s.handler.stream_resume()
            elif kind is StreamOpened:
                s = MuxStream(self, ev.stream_id)
                streams[ev.stream_id] = s
                if self.on_stream is None:
                    s.reset(2, "streams are not accepted here")
                else:
                    self.on_stream(s)
            elif kind is StreamEnded:
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._on_eof()
            elif kind is StreamReset:
                s = streams.get(ev.stream_id)
                if s is not None:
                    s._on_reset(ev.code, ev.reason)
            elif kind is GoAway:
                if self.on_goaway is not None:
                    self.on_goaway(ev.code, ev.reason)

    def _shutdown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self.streams.values()):
            s._on_reset(RST_SHUTDOWN, reason)
        self.streams.clear()


# ------------------------------------------------------------------ pre-splice buffering


class StreamInbox:
    """Handler for a stream's preamble phase: buffers bytes, parses messages, then hands over.

    Used for the control stream (read messages forever) and for data streams (read the
    ConnectRequest/Response, then `hand_over()` the stream to a splice with whatever raw
    bytes, EOF or reset arrived meanwhile).
    """

    def __init__(self, stream: LinkStream) -> None:
        self.stream = stream
        self._reader = MessageReader()
        self._messages: list[dict[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._reset: tuple[int, str] | None = None
        self._paused = False
        stream.set_handler(self)

    # StreamHandler
    def stream_data(self, data: bytes) -> None:
        self._reader.push(data)  # kept raw until parsed or handed over
        self._wake()

    def stream_eof(self) -> None:
        self._eof = True
        self._wake()

    def stream_reset(self, code: int, reason: str) -> None:
        self._reset = (code, reason)
        self._wake()

    def stream_pause(self) -> None:
        self._paused = True

    def stream_resume(self) -> None:
        self._paused = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_message(self, timeout: float) -> dict[str, Any]:
        """Next message; raises EOFError/ConnectionResetError/TimeoutError/MessageError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            before = self._reader.buffered
            msgs = self._reader.feed(b"", limit=1)
            if msgs:
                self.stream.consumed(before - self._reader.buffered)
                return msgs[0]
            if self._reset is not None:
                code, reason = self._reset
                raise ConnectionResetError(reason or f"stream reset (code {code})")
            if self._eof:
                raise EOFError("stream closed before a complete message")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for a message")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiter = None

    def send_message(self, message: dict[str, Any]) -> None:
        self.stream.write(encode(message))

    def hand_over(self, handler: StreamHandler) -> None:
        """Attach the next handler and replay buffered raw bytes / EOF / reset to it."""
        rest = self._reader.rest()
        self.stream.set_handler(handler)
        if self._paused:
            handler.stream_pause()
        if rest:
            handler.stream_data(rest)
        if self._reset is not None:
            handler.stream_reset(*self._reset)
        elif self._eof:
            handler.stream_eof()


class DiscardHandler:
    """Swallows whatever still arrives on a stream we are finished with."""

    def __init__(self, stream: LinkStream) -> None:
        self.stream = stream
        stream.set_handler(self)

    def stream_data(self, data: bytes) -> None:
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.stream.write_eof()

    def stream_reset(self, code: int, reason: str) -> None:
        pass

    def stream_pause(self) -> None:
        pass

    def stream_resume(self) -> None:
        pass


def refuse(inbox: StreamInbox, response: dict[str, Any], linger: float = 10.0) -> None:
    """Send a failure ConnectResponse, half-close, and reset if the peer never closes."""
    stream = inbox.stream
    try:
        inbox.send_message(response)
    except MessageError:
        pass
    stream.write_eof()
    DiscardHandler(stream)
    loop = asyncio.get_running_loop()
    loop.call_later(linger, lambda: stream.closed or stream.reset(RST_SHUTDOWN, "refused"))
