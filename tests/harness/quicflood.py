"""QUIC handshake floods against an edge's UDP port, loopback only (issue 13).

Three kinds of stranger, each bounded in count or time:

* `abandon_handshakes`: real client Initials (aioquic's client: a fresh connection id each), the
  server's Retry answered as a real client would (so address validation alone does not stop it),
  then silence: the server is left holding a half-done handshake. Sources can be spread over
  127.0.0.0/8 to look like many addresses.
* `handshake_loop`: complete handshakes in a loop (`dial_quic_link` with a wrong pin: the TLS
  handshake completes, the pin check fails, the link closes) — what a connector retrying too fast,
  or a stranger with a QUIC stack, costs.
* `spray_initials`: Initial datagrams that never answer anything, at a fixed rate.

Also a CLI, for the benchmark's flood processes:

    python -m tests.harness.quicflood abandon --port P --count 3000 [--sources 200]
    python -m tests.harness.quicflood loop --port P --seconds 20
    python -m tests.harness.quicflood spray --port P --seconds 20 --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

ALPN = "hd-tunnel/1"


def loopback_sources(n: int) -> list[str]:
    """n distinct loopback addresses (127.0.0.1 first): on Linux all of 127/8 is local."""
    if not 1 <= n <= 250:
        raise ValueError("between 1 and 250 loopback sources")
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


def _client(host: str) -> QuicConnection:
    return QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE, server_name="localhost"))


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        pass


async def _abandon_one(host: str, port: int, source: str, follow_retry: bool, timeout: float,
                       counts: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    transport, sock = await loop.create_datagram_endpoint(_Socket, local_addr=(source, 0),
                                                          remote_addr=(host, port))
    try:
        quic = _client(host)
        quic.connect((host, port), now=loop.time())
        for data, _ in quic.datagrams_to_send(now=loop.time()):
            transport.sendto(data)
        counts["initials"] += 1
        if not follow_retry:
            return
        try:
            reply = await asyncio.wait_for(sock.queue.get(), timeout)
        except asyncio.TimeoutError:
            counts["no_answer"] += 1
            return
        if reply[0] & 0xF0 == 0xF0:  # long header, type Retry
            counts["retries"] += 1
            quic.receive_datagram(reply, (host, port), now=loop.time())
            for data, _ in quic.datagrams_to_send(now=loop.time()):
                transport.sendto(data)
            counts["initials"] += 1
        else:
            counts["handshake_answers"] += 1  # no Retry: the server is already holding state
    finally:
        transport.close()


async def abandon_handshakes(host: str, port: int, count: int, *, sources: list[str] | None = None,
                             follow_retry: bool = True, concurrency: int = 32,
                             timeout: float = 1.0) -> dict[str, int]:
    """Start `count` handshakes and abandon each right after its (validated) Initial."""
    sources = sources or ["127.0.0.1"]
    counts = dict.fromkeys(("initials", "retries", "handshake_answers", "no_answer"), 0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await _abandon_one(host, port, sources[i % len(sources)], follow_retry, timeout, counts)

    await asyncio.gather(*(one(i) for i in range(count)))
    return counts


async def handshake_loop(host: str, port: int, seconds: float, *, timeout: float = 1.0,
                         source: str | None = None) -> dict[str, int]:
    """Complete handshakes one after the other for `seconds` (wrong pin: each closes at once),
    from `source` when given (a loopback address)."""
    from tunnel.quiclink import QuicHandshakeError, dial_quic_link
    from tunnel.tls import PinMismatch

    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    counts = {"completed": 0, "failed": 0}
    while loop.time() < end:
        try:
            kw = {"local_host": source} if source else {}
            link = await dial_quic_link(host, port, "sha256/" + "A" * 43 + "=", timeout=timeout, **kw)
        except PinMismatch:
            counts["completed"] += 1
        except (QuicHandshakeError, OSError):
            counts["failed"] += 1
        else:  # pragma: no cover - the pin never matches
            await link.close(0, "", linger=0)
    return counts


async def spray_initials(host: str, port: int, seconds: float, rate: float, *, distinct: int = 200) -> dict[str, int]:
    """Send Initials (from `distinct` prepared client connections, round robin) at `rate` per
    second for `seconds`, never answering."""
    loop = asyncio.get_running_loop()
    datagrams = []
    for _ in range(distinct):
        quic = _client(host)
        quic.connect((host, port), now=loop.time())
        datagrams.append(quic.datagrams_to_send(now=loop.time())[0][0])
    transport, _ = await loop.create_datagram_endpoint(_Socket, remote_addr=(host, port))
    sent = 0
    start = loop.time()
    try:
        while (now := loop.time()) < start + seconds:
            due = int((now - start) * rate)
            while sent < due:
                transport.sendto(datagrams[sent % distinct])
                sent += 1
            await asyncio.sleep(0.005)
    finally:
        transport.close()
    return {"sent": sent}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.quicflood")
    ap.add_argument("kind", choices=("abandon", "loop", "spray"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=3000, help="abandon: handshakes")
    ap.add_argument("--sources", type=int, default=1, help="abandon: loopback source addresses")
    ap.add_argument("--seconds", type=float, default=10.0, help="loop/spray: duration")
    ap.add_argument("--rate", type=float, default=2000.0, help="spray: datagrams per second")
    a = ap.parse_args(argv)
    if not a.host.startswith("127."):
        ap.error("loopback only")
    t0 = time.monotonic()
    if a.kind == "abandon":
        res = asyncio.run(abandon_handshakes(a.host, a.port, a.count, sources=loopback_sources(a.sources)))
    elif a.kind == "loop":
        res = asyncio.run(handshake_loop(a.host, a.port, a.seconds))
    else:
        res = asyncio.run(spray_initials(a.host, a.port, a.seconds, a.rate))
    res["elapsed_s"] = round(time.monotonic() - t0, 2)
    res["pid"] = os.getpid()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
