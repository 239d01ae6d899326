"""QUIC handshake floods against a real `hd edge` (issue 13), loopback only, bounded in count and time.

The edge's memory is read from /proc around the attack; the verdicts are counts and sizes, never
a wall-clock window (the latency a flood costs a real client is measured by bench/quic_flood.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.test_tunnel_e2e import make_tunnel
from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.origins import EchoServer, in_thread
from tests.harness.procs import poll_until
from tests.harness.procstat import rss_mib
from tests.harness.quicflood import abandon_handshakes, handshake_loop, loopback_sources
from tunnel.quiclink import HandshakeLimits

pytestmark = pytest.mark.timeout(180)


def udp_port(edge: EdgeProc) -> int:
    return int(edge.tunnel_address.rpartition(":")[2])


async def test_abandoned_handshakes_leave_the_edge_memory_bounded(edge: EdgeProc) -> None:
    # 1,500 handshakes from 100 addresses, each Retry answered like a real client, then silence.
    # Before the bounds the edge kept every one (~90 KiB each: +130 MiB); now at most
    # max_pending (64) at a time, so its RSS moves by a few MiB.
    port = udp_port(edge)
    await abandon_handshakes("127.0.0.1", port, 50, sources=loopback_sources(10))  # warm the code paths
    before = rss_mib(edge.pid)
    counts = await abandon_handshakes("127.0.0.1", port, 1500, sources=loopback_sources(100))
    assert counts["initials"] >= 1500
    grown = rss_mib(edge.pid) - before
    assert grown < 40, f"edge RSS grew by {grown:.0f} MiB after 1,500 abandoned handshakes ({counts})"


async def test_a_handshake_loop_is_held_to_its_rate_and_a_connector_still_gets_in(edge: EdgeProc) -> None:
    # A stranger completing handshakes in a loop from 127.0.0.2, while a connector (127.0.0.1)
    # dials over QUIC: the stranger gets its burst and then its per-source rate; the connector,
    # another source, registers as if nothing were happening.
    limits = HandshakeLimits()
    with in_thread(EchoServer()) as echo:
        t = make_tunnel(edge, "flooded", {"echo.internal.example": echo.url})
        loop_task = asyncio.ensure_future(handshake_loop("127.0.0.1", udp_port(edge), 8.0, source="127.0.0.2"))
        started = time.monotonic()
        await asyncio.sleep(1.0)  # the loop has spent its burst
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"],
                             extra_args=["--protocol", "quic", "--ha-connections", "1"])
        conn.start(min_connections=0)
        try:
            await asyncio.to_thread(poll_until, lambda: [c["protocol"] for c in edge.hd("tunnel", "info", t["id"])
                                                         .get("connections") or []] == ["quic"], 30,
                                    what="the connector registered over QUIC")
            counts = await asyncio.wait_for(loop_task, 30)
            elapsed = time.monotonic() - started
        finally:
            loop_task.cancel()
            conn.stop()
    allowed = limits.per_source_burst + limits.per_source_rate * elapsed + 1
    assert counts["completed"] <= allowed, f"{counts} in {elapsed:.1f}s: more than {allowed:.0f} handshakes"
    assert counts["completed"] >= limits.per_source_burst  # the loop itself was not broken
