"""Benchmark origin process: a 64-byte-friendly echo server and a byte-counting sink.

    python -m bench.origin            # prints {"echo": PORT, "sink": PORT, "uvloop": bool} on stdout

Both listen on 127.0.0.1 (ports chosen by the kernel). The sink counts every byte it receives and,
when the client half-closes, answers with the count as an 8-byte big-endian integer and closes.
Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

HOST = "127.0.0.1"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close


class Sink(asyncio.BufferedProtocol):
    """Counts bytes into a reusable buffer (no allocation per read)."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 20)
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _nodelay(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.count += nbytes

    def eof_received(self) -> bool:
        self.transport.write(struct.pack("!Q", self.count))
        self.transport.close()
        return True


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    echo = await loop.create_server(Echo, HOST, 0, backlog=1024)
    sink = await loop.create_server(Sink, HOST, 0, backlog=1024)
    info = {"echo": echo.sockets[0].getsockname()[1], "sink": sink.sockets[0].getsockname()[1],
            "uvloop": uvloop is not None}
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    await stop.wait()
    echo.close()
    sink.close()


if __name__ == "__main__":
    (uvloop.run if uvloop is not None else asyncio.run)(main())
