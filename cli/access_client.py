"""`hd access tcp` / `hd access ssh`: carry local connections to a hostname through the edge.

One multiplexed link to the relay per process (re-dialled when it drops), one stream per TCP
connection: no TLS+WebSocket handshake per connection, unlike `cloudflared access tcp`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from tunnel.client import OPEN_TIMEOUT, EdgeSession, Endpoint, StreamRefused
from tunnel.tls import PinMismatch
from tunnel.link import StreamInbox
from tunnel.messages import RST_CANCEL
from tunnel.splice import TcpStreamSplice

__all__ = ["OPEN_TIMEOUT", "EdgeSession", "Endpoint", "StreamRefused", "serve_stdio", "serve_tcp"]

log = logging.getLogger("access")


def _explain(hostname: str, exc: BaseException) -> str:
    if isinstance(exc, StreamRefused):
        r = exc.response
        return f"{hostname}: refused ({r.status} {r.code}): {r.error}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{hostname}: cannot reach the edge: connection refused — is `hd edge` running?"
    return f"{hostname}: {exc or type(exc).__name__}"


class _LocalConnection(TcpStreamSplice):
    def __init__(self, session: EdgeSession, hostname: str, headers: dict[str, str]) -> None:
        super().__init__()
        self._session = session
        self._hostname = hostname
        self._headers = headers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            inbox, _ = await self._session.open(self._hostname, self._headers)
        except (StreamRefused, PinMismatch, OSError, ValueError, asyncio.TimeoutError) as exc:
            log.error("%s", _explain(self._hostname, exc))
            if isinstance(exc, PinMismatch):
                log.error("the edge certificate does not match the pin; check --edge-pin / the state dir")
            if self.transport is not None:
                self.transport.close()
            return
        except Exception as exc:  # never let one connection kill the listener
            log.exception("unexpected error opening a stream: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self.stream = inbox.stream
        inbox.hand_over(self)
        self.activate()

    def stream_reset(self, code: int, reason: str) -> None:
        # The edge cut an established connection (e.g. the connector carrying it died): the
        # application only sees a TCP reset, so say why here.
        log.warning("connection to %s cut by the edge: %s", self._hostname, reason or f"reset (code {code})")
        super().stream_reset(code, reason)


async def serve_tcp(edge: Any, hostname: str, listen_host: str, listen_port: int,
                    headers: dict[str, str]) -> None:
    _setup_logging()
    session = EdgeSession(edge)
    try:
        await session.link()
    except PinMismatch as exc:
        raise SystemExit(f"hd access tcp: error: {exc}") from None
    except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
        log.warning("cannot reach the edge at %s yet (%s); will retry per connection",
                    edge.url, exc or type(exc).__name__)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _LocalConnection(session, hostname, headers), listen_host, listen_port)
    port = server.sockets[0].getsockname()[1]
    log.info("listening on %s:%d, carrying connections to %s through %s", listen_host, port, hostname, edge.url)
    try:
        await server.serve_forever()
    finally:
        server.close()
        await session.close()


# ---------------------------------------------------------------------------- stdio (ssh)


class _StdioBridge:
    """stdin → stream, stream → stdout, for ssh's ProxyCommand."""

    def __init__(self, inbox: StreamInbox, done: asyncio.Future[int]) -> None:
        self.stream = inbox.stream
        self.done = done
        self.out: asyncio.WriteTransport | None = None
        self.inp: asyncio.ReadTransport | None = None
        self.out_paused = False
        self.owed = 0
        self.eof_in = False
        self.eof_out = False

    # stream side
    def stream_data(self, data: bytes) -> None:
        assert self.out is not None
        self.out.write(data)
        if self.out_paused:
            self.owed += len(data)
        else:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.eof_out = True
        if self.out is not None:
            self.out.close()
        self._check()

    def stream_reset(self, code: int, reason: str) -> None:
        log.error("connection reset: %s", reason or code)
        if not self.done.done():
            self.done.set_result(1)

    def stream_pause(self) -> None:
        if self.inp is not None:
            self.inp.pause_reading()

    def stream_resume(self) -> None:
        if self.inp is not None:
            self.inp.resume_reading()

    def _check(self) -> None:
        if self.eof_in and self.eof_out and not self.done.done():
            self.done.set_result(0)


class _StdinProtocol(asyncio.Protocol):
    def __init__(self, bridge: _StdioBridge) -> None:
        self.b = bridge

    def data_received(self, data: bytes) -> None:
        self.b.stream.write(data)

    def eof_received(self) -> bool:
        self.b.eof_in = True
        self.b.stream.write_eof()
        self.b._check()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.b.eof_in:
            self.eof_received()


class _StdoutProtocol(asyncio.Protocol):
    def __init__(self, bridge: _StdioBridge) -> None:
        self.b = bridge

    def pause_writing(self) -> None:
        self.b.out_paused = True

    def resume_writing(self) -> None:
        self.b.out_paused = False
        if self.b.owed:
            owed, self.b.owed = self.b.owed, 0
            self.b.stream.consumed(owed)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.b.done.done():
            self.b.stream.reset(RST_CANCEL, "stdout closed")
            self.b.done.set_result(1)


async def serve_stdio(edge: Any, hostname: str, headers: dict[str, str]) -> int:
    _setup_logging()
    session = EdgeSession(edge)
    try:
        inbox, _ = await session.open(hostname, headers)
    except (StreamRefused, PinMismatch, OSError, ValueError, asyncio.TimeoutError) as exc:
        log.error("%s", _explain(hostname, exc))
        await session.close()
        return 1
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    bridge = _StdioBridge(inbox, done)
    out_t, _ = await loop.connect_write_pipe(lambda: _StdoutProtocol(bridge), os.fdopen(sys.stdout.fileno(), "wb", 0, closefd=False))
    bridge.out = out_t
    inbox.hand_over(bridge)
    in_t, _ = await loop.connect_read_pipe(lambda: _StdinProtocol(bridge), os.fdopen(sys.stdin.fileno(), "rb", 0, closefd=False))
    bridge.inp = in_t
    try:
        return await done
    finally:
        in_t.close()
        await session.close()


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="hd access: %(levelname)s: %(message)s")
