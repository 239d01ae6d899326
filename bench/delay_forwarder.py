"""A TCP forwarder that adds a fixed one-way delay in both directions: a far-away origin on loopback.

    python -m bench.delay_forwarder --target 127.0.0.1:5432 [--listen 127.0.0.1:0] [--delay-ms 25]
                                    [--no-handshake]

Prints one JSON line `{"port": N, "delay_ms": D, "handshake": true}` on stdout once it listens,
then forwards until SIGTERM/SIGINT. Loopback only (both the listen and the target address).

Every chunk read from one side is written to the other side `delay` seconds after it arrived
(asyncio timers; a FIFO per direction, so order is kept even when chunks arrive within one timer
tick), so a request/response round trip costs 2 x delay more than on loopback — 50 ms RTT at the
default 25 ms, like a database in another region.

The TCP handshake is simulated too (unless --no-handshake): a real client can send its first byte
only one RTT after its SYN, so client-to-server bytes are delivered no earlier than 3 x delay after
the connection was accepted (SYN, SYN-ACK, then the data's own trip). A client's connect + first
query therefore pays the same round trips it would to a remote server: TCP, SSLRequest, TLS, the
startup/SCRAM exchange and the query.

EOF and close travel with the same delay, after the data queued before them. Each direction's
queue is bounded (the reading side is paused above 4 MiB queued, resumed below 1 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from collections import deque
from typing import Any

QUEUE_HIGH = 4 * 1024 * 1024
QUEUE_LOW = 1024 * 1024
_EOF = object()
_CLOSE = object()


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not _loopback(host):
        raise argparse.ArgumentTypeError(f"{text}: loopback addresses only")
    return host, int(port)


class DelayLine:
    """One direction: chunks queued with their delivery time, written to `dst` when due, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, src: "Side") -> None:
        self.loop = loop
        self.delay = delay
        self.src = src  # paused when too much is queued
        self.dst: Side | None = None
        self.queue: deque[tuple[float, Any]] = deque()
        self.queued_bytes = 0
        self.not_before = 0.0  # deliveries are never earlier than this (handshake simulation)
        self.last_when = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused_src = False

    def push(self, item: Any) -> None:
        when = max(self.loop.time() + self.delay, self.not_before, self.last_when)
        self.last_when = when
        self.queue.append((when, item))
        if isinstance(item, (bytes, bytearray)):
            self.queued_bytes += len(item)
            if self.queued_bytes > QUEUE_HIGH and not self.paused_src:
                self.paused_src = True
                self.src.pause()
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and self.dst.transport is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def start(self, dst: "Side") -> None:
        self.dst = dst
        self._arm()

    def _flush(self) -> None:
        self.timer = None
        dst = self.dst
        assert dst is not None and dst.transport is not None
        now = self.loop.time()
        out: list[bytes] = []
        while self.queue and self.queue[0][0] <= now + 0.0005:
            _, item = self.queue.popleft()
            if isinstance(item, (bytes, bytearray)):
                self.queued_bytes -= len(item)
                out.append(item)
                continue
            if out:
                dst.transport.write(b"".join(out))
                out.clear()
            if item is _EOF:
                if dst.transport.can_write_eof():
                    dst.transport.write_eof()
                else:
                    dst.transport.close()
            else:  # _CLOSE
                dst.transport.close()
                self.queue.clear()
                return
        if out:
            dst.transport.write(b"".join(out))
        if self.paused_src and self.queued_bytes < QUEUE_LOW:
            self.paused_src = False
            self.src.resume()
        self._arm()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class Side(asyncio.Protocol):
    """One TCP connection of a forwarded pair; what it reads goes into `line` (towards the peer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.line = DelayLine(loop, delay, self)
        self.peer_line: DelayLine | None = None  # the line that writes to us
        self.closed = False
        self.read_paused = False
        self.want_pause = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.want_pause:
            self.pause()
        if self.peer_line is not None:
            self.peer_line._arm()

    def data_received(self, data: bytes) -> None:
        self.line.push(data)

    def eof_received(self) -> bool:
        self.line.push(_EOF)
        return True  # keep our write side open until the peer's EOF/close arrives

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.line.push(_CLOSE)
        if self.peer_line is not None:
            self.peer_line.cancel()

    def pause(self) -> None:
        self.want_pause = True
        if self.transport is not None and not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        self.want_pause = False
        if self.transport is not None and self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()


class Forwarder:
    def __init__(self, target: tuple[str, int], delay: float, handshake: bool) -> None:
        self.target = target
        self.delay = delay
        self.handshake = handshake
        self.pairs = 0

    def accept(self) -> Side:
        loop = asyncio.get_running_loop()
        client = Side(loop, self.delay)
        upstream = Side(loop, self.delay)
        client.peer_line, upstream.peer_line = upstream.line, client.line
        if self.handshake:
            # the client's first bytes leave one RTT after its SYN, then travel one delay
            client.line.not_before = loop.time() + 3 * self.delay
        client.line.start(upstream)
        upstream.line.start(client)
        self.pairs += 1
        loop.create_task(self._dial(client, upstream))
        return client

    async def _dial(self, client: Side, upstream: Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: upstream, *self.target), 10.0)
        except (OSError, asyncio.TimeoutError):
            # refused/unreachable: the client learns it one delay later, as it would remotely
            await asyncio.sleep(self.delay)
            if client.transport is not None:
                client.transport.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float, handshake: bool) -> None:
    loop = asyncio.get_running_loop()
    fwd = Forwarder(target, delay, handshake)
    server = await loop.create_server(fwd.accept, *listen)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port, "delay_ms": delay * 1000, "handshake": handshake}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.delay_forwarder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=_hostport, required=True, help="H:P to forward to (loopback)")
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="H:P (loopback; default port 0)")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay in ms (default 25: 50 ms RTT)")
    ap.add_argument("--no-handshake", action="store_true", help="do not simulate the TCP handshake round trip")
    a = ap.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(a.listen, a.target, a.delay_ms / 1000.0, not a.no_handshake))
    return 0


if __name__ == "__main__":
    sys.exit(main())
