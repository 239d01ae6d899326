"""The QUIC tunnel link (tunnel/quiclink.py) over real UDP sockets on 127.0.0.1.

Covers the `Link`/`LinkStream` contract (data, half-close, reset, many streams), the credit-based
receive windows (per stream and per connection), send back-pressure, the handshake failures
(pin, ALPN, nobody listening) and the liveness check. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aioquic.asyncio import serve as aioquic_serve
from aioquic.quic.configuration import QuicConfiguration

import tunnel.quiclink as ql
from tunnel.link import LinkStream
from tunnel.messages import RST_CANCEL, RST_PROTOCOL, RST_REFUSED, RST_SHUTDOWN
from tunnel.quiclink import (
    ALPN,
    CONN_WINDOW,
    MAX_DATAGRAM,
    SEND_HIGH,
    STREAM_WINDOW,
    QuicHandshakeError,
    QuicLink,
    QuicLinkStream,
    dial_quic_link,
    serve_quic_links,
)
from tunnel.tls import PinMismatch, cert_pin, ensure_edge_certificate

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024  # the writers' chunk size


# ------------------------------------------------------------------------------ helpers


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_edge_certificate(tmp_path_factory.mktemp("edge"), ["localhost"])


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_edge_certificate(tmp_path_factory.mktemp("other-edge"), ["localhost"])


async def until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `pred`; `timeout` is a hang guard only, never a verdict (generous on a loaded box)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


class Sink:
    """A StreamHandler recording everything; consumes what it gets unless told not to."""

    def __init__(self, stream: LinkStream, *, consume: bool = True) -> None:
        self.stream = stream
        self.consume = consume
        self.data = bytearray()
        self.unconsumed = 0
        self.max_unconsumed = 0
        self.eof = False
        self.reset: tuple[int, str] | None = None
        self.pauses = 0
        self.resumes = 0
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.log: list[str] = []
        stream.set_handler(self)

    # StreamHandler
    def stream_data(self, data: bytes) -> None:
        assert not self.eof and self.reset is None, "data after EOF/reset"
        self.data += data
        self.log.append("data")
        if self.consume:
            self.stream.consumed(len(data))
        else:
            self.unconsumed += len(data)
            self.max_unconsumed = max(self.max_unconsumed, self.unconsumed)

    def stream_eof(self) -> None:
        assert not self.eof, "EOF twice"
        self.eof = True
        self.log.append("eof")

    def stream_reset(self, code: int, reason: str) -> None:
        assert self.reset is None, "reset twice"
        self.reset = (code, reason)
        self.log.append("reset")

    def stream_pause(self) -> None:
        self.pauses += 1
        self.paused = True
        self.writable.clear()

    def stream_resume(self) -> None:
        self.resumes += 1
        self.paused = False
        self.writable.set()

    # test side
    def start_consuming(self) -> None:
        self.consume = True
        n, self.unconsumed = self.unconsumed, 0
        if n:
            self.stream.consumed(n)

    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class Echo:
    """Server-side handler: sends back what it gets, half-closes when the peer does."""

    def __init__(self, stream: QuicLinkStream) -> None:
        self.stream = stream
        self.reset: tuple[int, str] | None = None
        stream.set_handler(self)

    def stream_data(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.stream.write_eof()

    def stream_reset(self, code: int, reason: str) -> None:
        self.reset = (code, reason)

    def stream_pause(self) -> None:
        pass

    def stream_resume(self) -> None:
        pass


class Pair:
    def __init__(self) -> None:
        self.port = 0
        self.server: Any = None
        self.client: QuicLink | None = None
        self.server_link: QuicLink | None = None
        self.server_links: list[QuicLink] = []
        self.server_streams: list[QuicLinkStream] = []
        self.client_streams: list[QuicLinkStream] = []
        self.client_run: asyncio.Task[None] | None = None
        self.server_runs: list[asyncio.Task[None]] = []


@contextlib.asynccontextmanager
async def quic_pair(certs: tuple[Path, Path], *,
                    on_server_stream: Callable[[QuicLinkStream], None] | None = None,
                    on_client_stream: Callable[[QuicLinkStream], None] | None = None,
                    ) -> AsyncIterator[Pair]:
    """A served QUIC link and its dialled client; both `run()` in tasks; all closed on exit."""
    cert, key = certs
    loop = asyncio.get_running_loop()
    p = Pair()
    opened: asyncio.Future[QuicLink] = loop.create_future()

    def server_stream(stream: QuicLinkStream) -> None:
        p.server_streams.append(stream)
        if on_server_stream is not None:
            on_server_stream(stream)
        else:
            Sink(stream)

    def client_stream(stream: QuicLinkStream) -> None:
        p.client_streams.append(stream)
        if on_client_stream is not None:
            on_client_stream(stream)
        else:
            Sink(stream)

    def on_open(link: QuicLink) -> None:
        link.on_stream = server_stream
        p.server_links.append(link)
        p.server_runs.append(asyncio.ensure_future(link.run()))
        if not opened.done():
            opened.set_result(link)

    p.port = free_udp_port()
    p.server = await serve_quic_links("127.0.0.1", p.port, cert, key, on_open)
    try:
        p.client = await dial_quic_link("127.0.0.1", p.port, cert_pin(cert), timeout=30.0)
        p.client.on_stream = client_stream
        p.client_run = asyncio.ensure_future(p.client.run())
        p.server_link = await asyncio.wait_for(opened, 30.0)
        yield p
    finally:
        if p.client is not None and not p.client.is_closed:
            await p.client.close(0, "test over")
        for link in p.server_links:
            if not link.is_closed:
                await link.close(0, "test over")
        p.server.close()
        tasks = [t for t in [p.client_run, *p.server_runs] if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30.0)
        for t in tasks:
            t.cancel()
        await asyncio.sleep(0.1)  # the client's UDP socket closes 50 ms after the link


async def write_all(link: QuicLink, stream: QuicLinkStream, sink: Sink, payload: bytes,
                    stats: dict[str, int], *, eof: bool = True, timeout: float = 30.0) -> None:
    """Write `payload` in CHUNK pieces, waiting whenever the link says stream_pause."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    view = memoryview(payload)
    for off in range(0, len(payload), CHUNK):
        if sink.paused:
            await asyncio.wait_for(sink.writable.wait(), max(0.01, deadline - loop.time()))
        stream.write(bytes(view[off:off + CHUNK]))
        stats["max_buffered"] = max(stats.get("max_buffered", 0), link.buffered(stream.id))
        stats["max_unsent"] = max(stats.get("max_unsent", 0), link.unsent(stream.id))
        await asyncio.sleep(0)
    if eof:
        stream.write_eof()


# ------------------------------------------------------------------------------ streams


async def test_echo_both_ways_with_half_close(certs) -> None:
    async with quic_pair(certs, on_server_stream=Echo) as p:
        assert p.client.remote_address == ("127.0.0.1", p.port)
        # what each end advertised: our windows and more concurrent streams than aioquic's 128
        for a, b in ((p.client, p.server_link), (p.server_link, p.client)):
            assert a.quic._remote_max_data == CONN_WINDOW
            assert a.quic._remote_max_stream_data_bidi_remote == STREAM_WINDOW
            assert a.quic._remote_max_streams_bidi == ql.MAX_STREAMS
            assert b.quic.tls.alpn_negotiated == ALPN
        assert p.server_link.remote_address[0] == "127.0.0.1"

        # client-opened stream: data, EOF; the server echoes and half-closes after our EOF
        s = p.client.open_stream()
        sink = Sink(s)
        assert s.id % 4 == 0  # client-initiated bidirectional
        payload = os.urandom(300_000)
        s.write(payload[:1000])
        s.write(payload[1000:])
        s.write_eof()
        s.write(b"ignored after EOF")  # a write after our FIN is a no-op
        await until(lambda: sink.eof, what="echo EOF")
        assert bytes(sink.data) == payload and sink.reset is None
        assert s.closed and p.client.stream_count == 0
        await until(lambda: p.server_link.stream_count == 0, what="server forgets the stream")
        assert p.client.bytes_out == len(payload) == p.client.bytes_in
        assert p.server_link.bytes_in == len(payload) == p.server_link.bytes_out

        # server-opened stream with an explicit half-close on each side
        t = p.server_link.open_stream()
        assert t.id % 4 == 1  # server-initiated bidirectional
        tsink = Sink(t)
        t.write(b"hello from the edge")
        t.write_eof()
        await until(lambda: len(p.client_streams) == 1 and p.client_streams[0].handler.eof,
                    what="client gets the server's stream and its EOF")
        cs = p.client_streams[0]
        csink = cs.handler
        assert cs.id == t.id and bytes(csink.data) == b"hello from the edge"
        assert not cs.closed and not t.closed  # half-closed: the other direction is still open
        for i in range(3):  # the client keeps talking after the server's FIN
            cs.write(b"reply %d;" % i)
        await until(lambda: tsink.data == b"reply 0;reply 1;reply 2;", what="data after the peer's FIN")
        assert not tsink.eof and not t.closed
        cs.write_eof()
        await until(lambda: tsink.eof, what="server sees the client's EOF")
        assert cs.closed and t.closed
        assert csink.log == ["data", "eof"] and tsink.log[-1] == "eof" and tsink.reset is None


async def test_300_concurrent_streams_echo(certs) -> None:
    n = 300  # more than aioquic's default limit of 128 concurrent streams per direction
    async with quic_pair(certs, on_server_stream=Echo) as p:
        streams = [p.client.open_stream() for _ in range(n)]
        assert len({s.id for s in streams}) == n and p.client.stream_count == n
        sinks = [Sink(s) for s in streams]
        payloads = [os.urandom(2000 + 37 * i) for i in range(n)]
        for s, data in zip(streams, payloads):
            s.write(data[:1000])
        await asyncio.sleep(0)
        await until(lambda: p.server_link.stream_count == n, what=f"{n} streams open at once on the server")
        for s, data in zip(streams, payloads):
            s.write(data[1000:])
            s.write_eof()
        await until(lambda: all(k.eof for k in sinks), timeout=60, what="every echo")
        for k, data in zip(sinks, payloads):
            assert bytes(k.data) == data and k.reset is None
        assert p.client.stream_count == 0
        await until(lambda: p.server_link.stream_count == 0, what="server forgets every stream")
        # and once more: the peer's stream limit was raised again as streams finished
        again = [p.client.open_stream() for _ in range(n)]
        again_sinks = [Sink(s) for s in again]
        for s in again:
            s.write(b"x%d" % s.id)
            s.write_eof()
        await until(lambda: all(k.eof for k in again_sinks), timeout=60, what="second round")
        assert all(bytes(k.data) == b"x%d" % s.id for s, k in zip(again, again_sinks))


async def test_streams_written_out_of_open_order(certs) -> None:
    """A stream whose first bytes reach the peer after a later stream's (written later, or its
    first packet lost and retransmitted) is still a new stream there, not a finished one."""
    async with quic_pair(certs, on_server_stream=Echo) as p:
        a = p.client.open_stream()
        b = p.client.open_stream()
        assert a.id < b.id
        sa, sb = Sink(a), Sink(b)
        b.write(b"second first")
        b.write_eof()
        await until(lambda: sb.eof, what="echo on the later stream")
        a.write(b"first second")
        a.write_eof()
        await until(lambda: sa.eof, timeout=30, what="echo on the earlier stream")
        assert bytes(sa.data) == b"first second" and bytes(sb.data) == b"second first"


@pytest.mark.parametrize("who", ["client", "server"])
async def test_reset_reaches_the_peer(certs, who) -> None:
    async with quic_pair(certs) as p:
        s = p.client.open_stream()
        csink = Sink(s)
        s.write(b"hello")
        await until(lambda: p.server_streams and bytes(p.server_streams[0].handler.data) == b"hello",
                    what="stream on the server")
        t = p.server_streams[0]
        ssink = t.handler
        t.write(b"hi")
        await until(lambda: csink.data == b"hi", what="server's data")
        resetter, victim, victim_sink, victim_link = (
            (s, t, ssink, p.server_link) if who == "client" else (t, s, csink, p.client))
        resetter.reset(RST_REFUSED, "local reason")
        assert resetter.closed
        resetter.reset(RST_PROTOCOL)  # a second reset is a no-op
        resetter.write(b"ignored")
        await until(lambda: victim_sink.reset is not None, what="stream_reset on the peer")
        assert victim_sink.reset == (RST_REFUSED, "refused")
        assert victim.closed and victim_link.stream_count == 0
        assert p.client.stream_count == 0 and p.server_link.stream_count == 0
        victim.write(b"after reset")  # no exception, no effect
        victim.write_eof()
        victim.reset(RST_CANCEL)
        await asyncio.sleep(0.05)
        assert victim_sink.log.count("reset") == 1
        assert not p.client.is_closed and not p.server_link.is_closed  # the link itself lives on

        # codes map to reasons; an unknown one is "reset by the peer"
        for code, reason in [(RST_SHUTDOWN, "the tunnel connection is going away"), (77, "reset by the peer")]:
            s2 = p.client.open_stream()
            Sink(s2)
            s2.write(b"x")
            await until(lambda: len(p.server_streams) >= 2 and p.server_streams[-1].id == s2.id,
                        what="next stream")
            s2.reset(code)
            k = p.server_streams[-1].handler
            await until(lambda: k.reset is not None, what=f"reset {code}")
            assert k.reset == (code, reason)


async def test_client_refuses_streams_without_on_stream(certs) -> None:
    async with quic_pair(certs) as p:
        p.client.on_stream = None
        t = p.server_link.open_stream()
        k = Sink(t)
        t.write(b"anyone?")
        await until(lambda: k.reset is not None, what="refusal")
        assert k.reset == (RST_REFUSED, "refused") and t.closed


# ------------------------------------------------------------------------------ flow control


async def test_receive_back_pressure_bounds_memory(certs) -> None:
    total = 20 * 1024 * 1024
    payload = os.urandom(total)
    async with quic_pair(certs, on_server_stream=lambda s: Sink(s, consume=False)) as p:
        s = p.client.open_stream()
        wsink = Sink(s)
        stats: dict[str, int] = {}
        writer = asyncio.ensure_future(write_all(p.client, s, wsink, payload, stats))
        try:
            await until(lambda: p.server_streams, what="stream on the server")
            rsink: Sink = p.server_streams[0].handler
            await until(lambda: wsink.pauses >= 1 and len(rsink.data) >= STREAM_WINDOW - MAX_DATAGRAM,
                        what="the window filled and the writer paused")
            await asyncio.sleep(0.3)  # give a broken window every chance to overflow
            handed = len(rsink.data)
            assert STREAM_WINDOW - MAX_DATAGRAM <= handed <= STREAM_WINDOW + MAX_DATAGRAM, handed
            assert wsink.paused and not writer.done()
            assert stats["max_buffered"] <= SEND_HIGH + STREAM_WINDOW + CHUNK, stats
            assert p.client.buffered(s.id) <= SEND_HIGH + STREAM_WINDOW + CHUNK
            assert bytes(rsink.data) == payload[:handed]

            rsink.start_consuming()
            await asyncio.wait_for(writer, 30)
            await until(lambda: rsink.eof, timeout=30, what="all 20 MiB")
        finally:
            writer.cancel()
        assert len(rsink.data) == total
        assert rsink.digest() == hashlib.sha256(payload).hexdigest()
        assert rsink.max_unconsumed <= STREAM_WINDOW + MAX_DATAGRAM
        assert stats["max_buffered"] <= SEND_HIGH + STREAM_WINDOW + CHUNK, stats
        assert stats["max_unsent"] <= SEND_HIGH + CHUNK, stats  # the producer pauses above SEND_HIGH
        assert wsink.resumes >= 1 and wsink.pauses >= wsink.resumes


async def test_connection_window_bounds_all_streams(certs) -> None:
    n = CONN_WINDOW // STREAM_WINDOW + 4  # stream windows alone would admit 17 MiB
    per_stream = STREAM_WINDOW + 4096
    payloads = [os.urandom(64) * (per_stream // 64) for _ in range(n)]
    async with quic_pair(certs, on_server_stream=lambda s: Sink(s, consume=False)) as p:
        streams = [p.client.open_stream() for _ in range(n)]
        sinks = [Sink(s) for s in streams]
        stats: dict[str, int] = {}
        writers = [asyncio.ensure_future(write_all(p.client, s, k, data, stats))
                   for s, k, data in zip(streams, sinks, payloads)]

        def handed() -> int:
            return sum(len(st.handler.data) for st in p.server_streams)

        try:
            # hang guard only: filling 16 MiB through Python QUIC takes 16-20 s on a loaded box
            await until(lambda: handed() >= CONN_WINDOW - STREAM_WINDOW, timeout=120,
                        what="the connection window filled")
            await asyncio.sleep(0.3)
            got = handed()
            assert CONN_WINDOW - STREAM_WINDOW <= got <= CONN_WINDOW + MAX_DATAGRAM, got
            assert all(len(st.handler.data) <= STREAM_WINDOW for st in p.server_streams)
            assert not any(st.handler.eof for st in p.server_streams)

            for st in p.server_streams:
                st.handler.start_consuming()
            await asyncio.wait_for(asyncio.gather(*writers), 30)
            await until(lambda: len(p.server_streams) == n and all(st.handler.eof for st in p.server_streams),
                        timeout=30, what="every stream complete")
        finally:
            for w in writers:
                w.cancel()
        by_id = {st.id: st.handler for st in p.server_streams}
        for s, data in zip(streams, payloads):
            assert bytes(by_id[s.id].data) == data


async def test_reset_streams_return_their_connection_credit(certs, monkeypatch) -> None:
    """Bytes received on a stream that is then reset (by either side) were never consumed; the
    connection window must not shrink by them, or a link stalls after enough such resets."""
    monkeypatch.setattr(ql, "CONN_WINDOW", 1024 * 1024)  # read when the links are configured
    async with quic_pair(certs, on_server_stream=lambda s: Sink(s, consume=False)) as p:
        assert p.client.quic._remote_max_data == 1024 * 1024
        blob = os.urandom(STREAM_WINDOW)
        for rnd in range(4):  # 4 rounds x 4 streams x 256 KiB = 4 x the connection window
            before = len(p.server_streams)
            streams = [p.client.open_stream() for _ in range(4)]
            for st in streams:
                Sink(st)
                st.write(blob)
            await until(lambda: len(p.server_streams) == before + 4
                        and sum(len(x.handler.data) for x in p.server_streams[before:]) >= 1024 * 1024 - MAX_DATAGRAM,
                        what=f"round {rnd}: the (small) connection window fills")
            for i, st in enumerate(streams):  # half reset by the sender, half by the receiver
                if i % 2:
                    st.reset(RST_CANCEL)
                else:
                    p.server_streams[before + i].reset(RST_CANCEL)
            await until(lambda: p.server_link.stream_count == 0 and p.client.stream_count == 0,
                        what="every stream gone")
        # a consuming stream still gets a whole window's worth through
        final = p.client.open_stream()
        fsink = Sink(final)
        stats: dict[str, int] = {}
        data = os.urandom(3 * 1024 * 1024)
        p.server_link.on_stream = lambda st: (p.server_streams.append(st), Sink(st))
        await asyncio.wait_for(write_all(p.client, final, fsink, data, stats), 60)
        await until(lambda: p.server_streams[-1].id == final.id and p.server_streams[-1].handler.eof,
                    timeout=60, what="a full transfer after the resets")
        assert bytes(p.server_streams[-1].handler.data) == data
        p.server_streams[-1].write_eof()
        await until(lambda: final.closed and p.server_link.stream_count == 0, what="the stream closes")
        # no per-stream bookkeeping piles up for finished streams
        await until(lambda: not p.server_link._released and not p.client._released, what="released streams settle")
        assert not p.server_link.quic.hd_consumed and not p.client.quic.hd_consumed


# ------------------------------------------------------------------------------ handshake


async def test_pin_mismatch(certs, other_certs) -> None:
    cert, key = certs
    seen: list[QuicLink] = []
    port = free_udp_port()
    server = await serve_quic_links("127.0.0.1", port, cert, key, seen.append)
    try:
        for pin in (cert_pin(other_certs[0]), "sha256:" + "0" * 64):
            with pytest.raises(PinMismatch):
                await dial_quic_link("127.0.0.1", port, pin, timeout=30.0)
        # the right pin (any case, surrounding space) still works on the same server
        link = await dial_quic_link("127.0.0.1", port, " " + cert_pin(cert).upper() + " ", timeout=30.0)
        assert not link.is_closed
        await link.close(0, "done")
        assert link.is_closed and link.close_reason == "done"
    finally:
        server.close()
        await asyncio.sleep(0.1)


async def test_nothing_listening_fails_fast(certs) -> None:
    loop = asyncio.get_running_loop()
    port = free_udp_port()
    t0 = loop.time()
    with pytest.raises(QuicHandshakeError):
        await dial_quic_link("127.0.0.1", port, cert_pin(certs[0]), timeout=60.0)
    assert loop.time() - t0 < 30.0  # failed on the ICMP error, not by waiting out its 60 s timeout


async def test_silent_udp_peer_times_out(certs) -> None:
    """A UDP socket that never answers (firewall drops): QuicHandshakeError after `timeout`."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        t0 = loop.time()
        with pytest.raises(QuicHandshakeError, match="no QUIC answer"):
            await dial_quic_link("127.0.0.1", port, cert_pin(certs[0]), timeout=1.0)
        assert loop.time() - t0 >= 0.9  # waited out its timeout (the upper bound is only a hang guard)
        assert loop.time() - t0 < 30.0
    finally:
        transport.close()


@pytest.mark.parametrize("server_alpn", [["h3"], ["hd-tunnel/0", "hd-tunnel/2"], None])
async def test_alpn_mismatch(certs, server_alpn) -> None:
    cert, key = certs
    config = QuicConfiguration(is_client=False, alpn_protocols=server_alpn)
    config.load_cert_chain(str(cert), str(key))
    port = free_udp_port()
    server = await aioquic_serve("127.0.0.1", port, configuration=config)
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        with pytest.raises(QuicHandshakeError) as info:
            await dial_quic_link("127.0.0.1", port, cert_pin(cert), timeout=60.0)
        assert loop.time() - t0 < 30.0  # rejected in the handshake, not by waiting out its 60 s timeout
        assert "ALPN" in str(info.value)  # rejected in the handshake, not a timeout
    finally:
        server.close()
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ liveness, close


async def test_silent_peer_ends_the_link(certs, monkeypatch) -> None:
    # PING_INTERVAL / SILENCE_LIMIT are module globals read whenever a ping is due
    monkeypatch.setattr(ql, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(ql, "SILENCE_LIMIT", 0.5)
    loop = asyncio.get_running_loop()
    async with quic_pair(certs) as p:
        s = p.client.open_stream()
        k = Sink(s)
        s.write(b"open")
        await until(lambda: p.server_streams, what="a live stream")
        await asyncio.sleep(0.9)  # pings keep an idle link alive well past SILENCE_LIMIT
        assert not p.client.is_closed and not p.client_run.done()

        # the path goes black both ways (the edge vanishes without a CONNECTION_CLOSE)
        p.server.datagram_received = lambda data, addr: None
        p.server._transport.sendto = lambda data, addr=None: None
        t0 = loop.time()
        await asyncio.wait_for(asyncio.shield(p.client_run), 30.0)
        assert loop.time() - t0 >= 0.5 - 0.1 - 0.1  # silence counts from the last packet heard
        assert p.client.close_reason.startswith("no packets from the peer"), p.client.close_reason
        assert p.client.is_closed
        assert k.reset is not None and k.reset[0] == RST_SHUTDOWN and s.closed
        assert k.reset[1] == f"tunnel connection closed ({p.client.close_reason})"
        with pytest.raises(ConnectionError):
            p.client.open_stream()
        # the server side notices the same way
        await asyncio.wait_for(asyncio.shield(p.server_runs[0]), 30.0)
        assert p.server_link.close_reason.startswith("no packets from the peer")


async def test_close_resets_open_streams_on_both_sides(certs) -> None:
    async with quic_pair(certs) as p:
        mine = [p.client.open_stream() for _ in range(3)]
        sinks = [Sink(s) for s in mine]
        for s in mine:
            s.write(b"hi")
        await until(lambda: len(p.server_streams) == 3, what="three streams on the server")
        theirs = [st.handler for st in p.server_streams]
        await p.client.close(0, "connector shutting down")
        assert p.client.is_closed
        await asyncio.wait_for(asyncio.shield(p.server_runs[0]), 30.0)
        assert p.server_link.close_reason == "closed by peer (connector shutting down)"
        for k in theirs:
            assert k.reset == (RST_SHUTDOWN, "tunnel connection closed (closed by peer (connector shutting down))")
        await asyncio.wait_for(asyncio.shield(p.client_run), 30.0)
        for k in sinks:
            assert k.reset == (RST_SHUTDOWN, "tunnel connection closed (connector shutting down)")
        assert p.client.stream_count == 0 and p.server_link.stream_count == 0


async def test_abort_ends_run_without_handshake(certs) -> None:
    async with quic_pair(certs) as p:
        s = p.client.open_stream()
        k = Sink(s)
        p.client.abort("gone")
        await asyncio.wait_for(asyncio.shield(p.client_run), 30.0)
        assert p.client.close_reason == "gone" and k.reset == (RST_SHUTDOWN, "tunnel connection closed (gone)")
