"""The tunnel link over WebSocket, driven straight from asyncio.Protocol callbacks.

websockets' sans-I/O core parses and builds frames; there is no reader task, writer task or
message queue: `data_received` feeds the WebSocket parser and the mux synchronously, and all
output produced during one loop iteration goes out in one flush (`call_soon`). Measured with
bench/tunnel_bench.py, the coroutine API cost two loop iterations and a task wake-up per
message; this costs one callback.

`WsLinkProtocol` serves both ends: as a client it sends the upgrade request once TLS is up and
the edge's certificate matched the pin; as a server (the relay) it answers the upgrade (or a
plain HTTP GET for the JWKS) and then hands the link to the relay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any, Callable
from urllib.parse import urlsplit

import websockets.frames
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, ProtocolError
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tunnel.link import MuxLink
from tunnel.mux import MuxProtocolError
from tunnel.tls import PinMismatch, pinned_client_ssl_context, verify_pin

log = logging.getLogger(__name__)


class _MaskSource:
    """Frame masks for websockets' serializer, drawn from a pre-filled os.urandom pool.

    websockets calls `secrets.token_bytes(4)` for every frame a client sends: one getrandom()
    syscall per frame, ~9 % of the connector's CPU in bench/proxy_bench.py. Masks only need to
    be unpredictable (RFC 6455 §10.3), which urandom bytes are, however they are batched.
    """

    def __init__(self, size: int = 64 * 1024) -> None:
        self._size = size
        self._pool = b""
        self._off = 0

    def token_bytes(self, n: int) -> bytes:
        if self._off + n > len(self._pool):
            self._pool = os.urandom(self._size)
            self._off = 0
        out = self._pool[self._off:self._off + n]
        self._off += n
        return out


websockets.frames.secrets = _MaskSource()  # type: ignore[assignment]  # only token_bytes is used there

WS_MAX_MESSAGE = 2 * 1024 * 1024
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
HANDSHAKE_TIMEOUT = 15.0


class WsLink(MuxLink):
    """A MuxLink whose bytes move through a `WsLinkProtocol` instead of websockets' asyncio API."""

    def __init__(self, proto: WsLinkProtocol, *, client: bool) -> None:
        super().__init__(client=client)
        self.proto = proto
        self._loop = asyncio.get_running_loop()  # cached: get_running_loop() costs a getpid() syscall
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._flush_scheduled = False
        self.remote_address = proto.remote_address

    # The data path: one flush per loop iteration, whatever produced output meanwhile.
    def kick(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        proto = self.proto
        if proto.write_paused or self._closed:
            return  # resume_writing() flushes again
        mux = self.mux
        ws = proto.ws
        if ws is None or ws.state is not State.OPEN:
            return  # closing: nothing more can be sent
        sent = False
        while mux.wants_write:
            for message in mux.messages_to_send():
                self.bytes_out += len(message)
                ws.send_binary(message)
            sent = True
            self._dispatch(mux.events())
        if sent:
            proto.write_out()

    async def run(self) -> None:
        try:
            await asyncio.shield(self._done)  # cancelling run() must not cancel the link's end
        finally:
            self._shutdown(f"tunnel connection closed ({self.close_reason})" if self.close_reason
                           else "tunnel connection closed")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.close_reason:
            self.close_reason = reason
        self._flush()
        self.proto.close(code, reason)
        if self._done.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._done), 5)
        except asyncio.TimeoutError:
            self.proto.abort()

    def abort(self, reason: str = "") -> None:
        if not self.close_reason:
            self.close_reason = reason
        self.proto.abort()

    # Called by the protocol.
    def _message(self, data: bytes) -> None:
        self.bytes_in += len(data)
        mux = self.mux
        mux.receive_message(data)
        self._dispatch(mux.events())
        if mux.wants_write:
            self.kick()

    def _ended(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        if not self._done.done():
            self._done.set_result(None)


class WsLinkProtocol(asyncio.Protocol):
    def __init__(self, *, client: bool, path: str = "", host: str = "", pin: str | None = None,
                 on_open: Callable[[WsLinkProtocol], None] | None = None,
                 on_http: Callable[[Request], Response | None] | None = None,
                 max_size: int = WS_MAX_MESSAGE) -> None:
        self.client = client
        self.path = path
        self.host = host
        self.pin = pin
        self.on_open = on_open
        self.on_http = on_http
        self.ws: Any = None
        self.link: WsLink | None = None
        self.transport: Any = None
        self.write_paused = False
        self.remote_address: tuple[str, int] = ("?", 0)
        self.request: Request | None = None
        self.opened: asyncio.Future[WsLinkProtocol] = asyncio.get_running_loop().create_future()
        self._max_size = max_size
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_deadline: float | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote_address = (str(peer[0]), int(peer[1]))
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if self.client:
            if self.pin is not None:
                try:
                    ssl_object = transport.get_extra_info("ssl_object")
                    if ssl_object is None:
                        raise PinMismatch("the edge did not negotiate TLS")
                    verify_pin(ssl_object, self.pin)
                except PinMismatch as exc:
                    self._fail_open(exc)
                    transport.abort()
                    return
            self.ws = ClientProtocol(parse_uri(f"wss://{self.host}{self.path}"), max_size=self._max_size)
            request = self.ws.connect()
            request.headers.pop("User-Agent", None)
            self.ws.send_request(request)
            self.write_out()
        else:
            self.ws = ServerProtocol(max_size=self._max_size)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Response):
                self._on_response(event)
            else:
                self._on_frame(event)
        self.write_out()
        if ws.state is State.CLOSED and not self.client:
            # Closing handshake done: the server closes TCP first (RFC 6455 §7.1.1).
            self._force_close()
        elif ws.state is State.CLOSED or ws.close_expected():
            self._closing_soon()

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.receive_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._ping_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        reason = "connection lost"
        if exc is not None:
            reason = f"connection error: {exc}"
        elif self.ws is not None and self.ws.close_code is not None:
            reason = f"closed by peer ({self.ws.close_code} {self.ws.close_reason})".strip()
        if self.link is not None:
            self.link._ended(reason)
        self._fail_open(ConnectionError(reason))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.link is not None:
            self.link._flush()

    # ------------------------------------------------------------------ output
    def write_out(self) -> None:
        ws = self.ws
        t = self.transport
        if ws is None or t is None:
            return
        chunks = ws.data_to_send()
        if not chunks:
            return
        eof = chunks[-1] == b""  # websockets' sans-I/O signal: end the TCP connection now
        data = b"".join(chunks)
        if data and not t.is_closing():
            t.write(data)
        if eof and not t.is_closing():
            if self.client and t.can_write_eof():
                try:
                    t.write_eof()
                except (OSError, RuntimeError):
                    t.close()
            else:
                t.close()

    def close(self, code: int = 1000, reason: str = "") -> None:
        ws = self.ws
        if ws is not None and ws.state is State.OPEN:
            ws.send_close(code, reason[:120])
            self.write_out()
            self._closing_soon()
        elif self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _closing_soon(self) -> None:
        # Give the peer a moment to complete the closing handshake, then close the TCP side.
        if self.transport is not None and not self.transport.is_closing():
            asyncio.get_running_loop().call_later(2.0, self._force_close)

    def _force_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ handshake
    def _on_request(self, request: Request) -> None:
        self.request = request
        if self.on_http is not None:
            answer = self.on_http(request)
            if answer is not None:  # plain HTTP (JWKS, 404): answer and close
                self.ws.send_response(answer)
                self.write_out()
                self._force_close()
                return
        response = self.ws.accept(request)
        response.headers.pop("Server", None)
        self.ws.send_response(response)
        if self.ws.state is not State.OPEN:
            self.write_out()
            self._closing_soon()
            return
        self._open()

    def _on_response(self, response: Response) -> None:
        if self.ws.handshake_exc is not None or self.ws.state is not State.OPEN:
            exc = self.ws.handshake_exc or InvalidHandshake(f"upgrade refused ({response.status_code})")
            self._fail_open(exc)
            self.abort()
            return
        self._open()

    def _open(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.link = WsLink(self, client=self.client)
        self._schedule_ping()
        if not self.opened.done():
            self.opened.set_result(self)
        if self.on_open is not None:
            self.on_open(self)

    def _fail_open(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
            self.opened.exception()  # retrieved by the dialer; never "unretrieved"

    def _handshake_timeout(self) -> None:
        if self.link is None:
            self._fail_open(TimeoutError("WebSocket handshake timed out"))
            self.abort()

    # ------------------------------------------------------------------ frames
    def _on_frame(self, frame: Any) -> None:
        op = frame.opcode
        if op is Opcode.BINARY or op is Opcode.CONT:
            if not frame.fin or self._fragments:
                self._fragments.append(frame.data)
                self._fragment_size += len(frame.data)
                if self._fragment_size > self._max_size:
                    self._protocol_error(MuxProtocolError("message too big", close_code=1009))
                    return
                if not frame.fin:
                    return
                data = b"".join(self._fragments)
                self._fragments.clear()
                self._fragment_size = 0
            else:
                data = frame.data
            if self.link is not None:
                try:
                    self.link._message(data)
                except MuxProtocolError as exc:
                    self._protocol_error(exc)
        elif op is Opcode.TEXT:
            self._protocol_error(MuxProtocolError("text messages are not part of the protocol"))
        elif op is Opcode.PONG:
            self._pong_deadline = None

    def _protocol_error(self, exc: MuxProtocolError) -> None:
        reason = f"protocol error: {exc.reason}"
        log.warning("closing link: %s", reason)
        if self.link is not None:
            self.link.close_reason = reason
        self.close(exc.close_code, exc.reason)

    # ------------------------------------------------------------------ keepalive
    def _schedule_ping(self) -> None:
        self._ping_timer = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping)

    def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pong_deadline is not None and loop.time() > self._pong_deadline:
            if self.link is not None:
                self.link.close_reason = "keepalive ping timeout"
            self.abort()
            return
        if self.ws is not None and self.ws.state is State.OPEN:
            self.ws.send_ping(b"hd")
            self.write_out()
            if self._pong_deadline is None:
                self._pong_deadline = loop.time() + PING_TIMEOUT
        self._schedule_ping()


async def dial_link(url: str, pin: str, path: str, *, timeout: float = HANDSHAKE_TIMEOUT) -> WsLink:
    """Connect to `wss://host:port` + path, check the certificate pin, upgrade; return the link."""
    parts = urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname:
        raise ValueError(f"edge URL must look like wss://HOST:PORT, got {url!r}")
    host = parts.hostname
    port = parts.port or 443
    loop = asyncio.get_running_loop()
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def factory() -> WsLinkProtocol:
        return WsLinkProtocol(client=True, path=path, host=hostport, pin=pin)

    ctx: ssl.SSLContext = pinned_client_ssl_context()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(factory, host, port, ssl=ctx, server_hostname=host,
                               ssl_handshake_timeout=timeout), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
    except BaseException:
        transport.abort()
        raise
    assert proto.link is not None
    return proto.link


def http_response(status: int, body: bytes, content_type: str = "text/plain") -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Connection"] = "close"
    return Response(status, {200: "OK", 404: "Not Found"}.get(status, "Error"), headers, body)


__all__ = ["PinMismatch", "ProtocolError", "WsLink", "WsLinkProtocol", "dial_link", "http_response"]
