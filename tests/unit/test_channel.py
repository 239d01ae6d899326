"""ByteChannel implementations: TCP, tunnel stream, TLS over an in-memory pipe and over TCP.

Every scenario runs on asyncio's default loop and on uvloop (the proxy's production loop), via
`asyncio.run` / `uvloop.run` from a sync test, so no loop fixture is involved.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from pathlib import Path

import pytest

from proxy.channel import ByteChannel, ChannelClosed, StreamChannel, TcpChannel
from proxy.pg.tls import TlsChannel, TlsCore, TlsHandshakeError
from tests.harness.pg import _gen_key, _make_cert, _write_cert, _write_key

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(loop_kind: str, coro, timeout: float = 120.0):  # hang guard only
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    if loop_kind == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


async def until(pred, timeout: float = 30.0, what: str = "condition") -> None:  # hang guard only
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class Recorder:
    """A receiver that records what it gets."""

    def __init__(self, channel: ByteChannel | None = None) -> None:
        self.data = bytearray()
        self.chunks = 0
        self.closed: list[Exception | None] = []
        if channel is not None:
            channel.set_receiver(self.on_data, self.on_close)

    def on_data(self, data: bytes) -> None:
        assert not self.closed, "data after on_close"
        self.data += data
        self.chunks += 1

    def on_close(self, exc: Exception | None) -> None:
        self.closed.append(exc)


# ------------------------------------------------------------------------ in-memory pipe


class MemoryChannel(ByteChannel):
    """One end of an in-memory pipe with transport-like back-pressure.

    Bytes written travel asynchronously (call_soon). The receiving end takes them only while
    its source is not paused; untaken bytes count as in flight for the writer, whose
    `write_paused` turns on above `high` and off at or below `low` (like a socket buffer).
    """

    def __init__(self, high: int = 64 * 1024, low: int = 16 * 1024) -> None:
        super().__init__()
        self.peer: MemoryChannel | None = None
        self.high, self.low = high, low
        self.in_flight = 0
        self._queue: list[bytes | None] = []  # arrived, not yet taken (None = EOF)
        self._taking = False
        self.source_pauses = 0

    @classmethod
    def pair(cls, **kw) -> tuple[MemoryChannel, MemoryChannel]:
        a, b = cls(**kw), cls(**kw)
        a.peer, b.peer = b, a
        return a, b

    def write(self, data: bytes) -> None:
        if self._finished or not data:
            return
        self.in_flight += len(data)
        asyncio.get_running_loop().call_soon(self.peer._arrive, bytes(data))
        if self.in_flight > self.high:
            self._set_write_paused(True)

    def write_eof(self) -> None:
        asyncio.get_running_loop().call_soon(self.peer._arrive, None)

    def close(self) -> None:
        if not self._finished:
            self.write_eof()
        self._closed_locally()

    def abort(self) -> None:
        if not self._finished:
            asyncio.get_running_loop().call_soon(self.peer._ended, ConnectionResetError("peer aborted"))
        self._closed_locally()

    def _arrive(self, data: bytes | None) -> None:
        self._queue.append(data)
        self._take()

    def _take(self) -> None:
        if self._taking:
            return
        self._taking = True
        try:
            while self._queue and not self._source_paused:
                data = self._queue.pop(0)
                if data is None:
                    self._ended(None)
                    continue
                self.peer._taken(len(data))
                self._received(data)
        finally:
            self._taking = False

    def _taken(self, n: int) -> None:
        self.in_flight -= n
        if self.in_flight <= self.low:
            self._set_write_paused(False)

    def _pause_source(self) -> None:
        self.source_pauses += 1

    def _resume_source(self) -> None:
        asyncio.get_running_loop().call_soon(self._take)


def test_memory_pipe_back_pressure_signalling():
    """The generic contract: a paused reader backs the writer up; resuming drains it."""

    async def scenario():
        a, b = MemoryChannel.pair(high=1000, low=100)
        rec = Recorder(b)
        b.pause_reading()
        events: list[str] = []
        a.set_write_flow(lambda: events.append("pause"), lambda: events.append("resume"))
        for _ in range(30):
            a.write(b"x" * 100)
        assert a.write_paused and events == ["pause"]
        await asyncio.sleep(0.01)
        assert rec.data == b"" and a.write_paused  # nothing delivered to a paused reader
        drained = asyncio.ensure_future(a.drain())
        await asyncio.sleep(0.01)
        assert not drained.done()
        b.resume_reading()
        await asyncio.wait_for(drained, 30)
        assert events == ["pause", "resume"] and len(rec.data) == 3000
        # set_write_flow on a channel that is already backed up reports it at once
        b.pause_reading()
        for _ in range(20):
            a.write(b"y" * 100)
        late: list[str] = []
        a.set_write_flow(lambda: late.append("pause"), None)
        assert late == ["pause"]
        a.close()
        with pytest.raises(ChannelClosed):
            await a.drain()

    run("asyncio", scenario())


# ------------------------------------------------------------------------------ TCP


async def _tcp_pair(server_cb=None):
    """A TcpChannel client connected to an asyncio stream server; returns (channel, server, conns)."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    connected = asyncio.Event()

    async def handle(r, w):
        conns.append((r, w))
        connected.set()
        if server_cb is not None:
            await server_cb(r, w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, ch = await loop.create_connection(TcpChannel, "127.0.0.1", port)
    await asyncio.wait_for(connected.wait(), 30)
    return ch, server, conns


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tcp_channel_data_pause_and_eof(loop_kind):
    async def scenario():
        ch, server, conns = await _tcp_pair()
        r, w = conns[0]
        assert ch.get_extra_info("peername")[0] == "127.0.0.1"
        rec = Recorder(ch)
        ch.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        w.write(b"one")
        await until(lambda: rec.data == b"one", what="first chunk")
        ch.pause_reading()
        w.write(b"two")
        await w.drain()
        await asyncio.sleep(0.05)
        assert rec.data == b"one"  # paused: nothing delivered
        ch.resume_reading()
        await until(lambda: rec.data == b"onetwo", what="data after resume")
        # no receiver: bytes are buffered (and the transport paused) until the next one
        ch.set_receiver(None, None)
        w.write(b"three")
        w.write_eof()
        await asyncio.sleep(0.05)
        rec2 = Recorder(ch)
        await until(lambda: rec2.closed, what="on_close")
        assert rec2.data == b"three" and rec2.closed == [None] and rec.closed == []
        assert ch.is_closing()
        w.close()
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tcp_channel_write_back_pressure(loop_kind):
    async def scenario():
        ch, server, conns = await _tcp_pair()
        r, w = conns[0]
        events: list[str] = []
        ch.set_write_flow(lambda: events.append("pause"), lambda: events.append("resume"))
        chunk = os.urandom(64 * 1024)
        sent = 0
        h = hashlib.sha256()
        while not ch.write_paused:
            ch.write(chunk)
            h.update(chunk)
            sent += len(chunk)
            assert sent < 256 * 1024 * 1024, "the transport never signalled back-pressure"
            await asyncio.sleep(0)
        assert events == ["pause"]
        drained = asyncio.ensure_future(ch.drain())
        await asyncio.sleep(0.02)
        assert not drained.done()
        got = hashlib.sha256()
        n = 0
        while n < sent:
            data = await r.read(1 << 20)
            got.update(data)
            n += len(data)
        await asyncio.wait_for(drained, 30)
        assert events == ["pause", "resume"] and got.digest() == h.digest()
        closed = Recorder(ch)
        ch.close()
        assert closed.closed == [None]  # a local close reports at once
        assert await r.read() == b""
        w.close()
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tcp_channel_reset_is_an_error(loop_kind):
    async def scenario():
        ch, server, conns = await _tcp_pair()
        _, w = conns[0]
        rec = Recorder(ch)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.transport.abort()
        await until(lambda: rec.closed, what="on_close")
        assert isinstance(rec.closed[0], ConnectionError)
        ch.write(b"ignored")  # writing to a closed channel is a no-op, not an exception
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario())


# --------------------------------------------------------------------------- tunnel stream


class FakeStream:
    """A LinkStream stand-in recording what the channel does to it."""

    id = 7

    def __init__(self) -> None:
        self.handler = None
        self.written = bytearray()
        self.consumed_total = 0
        self.sent_fin = False
        self.recv_fin = False
        self.reset_with: tuple[int, str] | None = None

    def set_handler(self, handler) -> None:
        self.handler = handler

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.sent_fin = True

    def reset(self, code: int, reason: str = "") -> None:
        self.reset_with = (code, reason)

    def consumed(self, n: int) -> None:
        self.consumed_total += n

    @property
    def closed(self) -> bool:
        return self.reset_with is not None or (self.sent_fin and self.recv_fin)

    # driving the handler like the link does
    def data(self, b: bytes) -> None:
        self.handler.stream_data(b)

    def eof(self) -> None:
        self.recv_fin = True
        self.handler.stream_eof()


def test_stream_channel_credit_discipline():
    async def scenario():
        s = FakeStream()
        ch = StreamChannel(s)
        got = bytearray()
        pause_next = [False]

        def on_data(d: bytes) -> None:
            got.extend(d)
            if pause_next[0]:
                ch.pause_reading()  # e.g. the destination backed up while we forwarded this
                pause_next[0] = False

        ch.set_receiver(on_data, lambda exc: None)
        s.data(b"a" * 10)
        assert s.consumed_total == 10  # delivered to a running receiver: credit at once
        pause_next[0] = True
        s.data(b"b" * 20)
        assert got.endswith(b"b" * 20) and s.consumed_total == 10  # receiver paused inside: owed
        s.data(b"c" * 30)  # in flight within the window: buffered, not credited
        assert len(got) == 30 and s.consumed_total == 10
        ch.resume_reading()
        assert got == b"a" * 10 + b"b" * 20 + b"c" * 30 and s.consumed_total == 60
        # no receiver: buffered, uncredited; the next receiver gets it and the credit flows
        ch.set_receiver(None, None)
        s.data(b"d" * 5)
        assert s.consumed_total == 60
        rec = Recorder(ch)
        assert rec.data == b"d" * 5 and s.consumed_total == 65

    run("asyncio", scenario())


def test_stream_channel_flow_eof_reset_and_close():
    async def scenario():
        s = FakeStream()
        ch = StreamChannel(s)
        rec = Recorder(ch)
        events: list[str] = []
        ch.set_write_flow(lambda: events.append("pause"), lambda: events.append("resume"))
        ch.write(b"q")
        assert s.written == b"q"
        s.handler.stream_pause()
        assert ch.write_paused and events == ["pause"]
        s.handler.stream_resume()
        assert not ch.write_paused and events == ["pause", "resume"]
        # EOF behind paused data: delivered after it, then our side is closed too
        ch.pause_reading()
        s.data(b"tail")
        s.eof()
        assert rec.closed == [] and not s.sent_fin
        ch.resume_reading()
        assert rec.data == b"tail" and rec.closed == [None] and s.sent_fin and s.consumed_total == 4

        s2 = FakeStream()
        ch2 = StreamChannel(s2)
        rec2 = Recorder(ch2)
        ch2.pause_reading()
        s2.data(b"dropped")
        s2.handler.stream_reset(3, "origin went away")
        assert rec2.data == b"" and isinstance(rec2.closed[0], ConnectionResetError)
        assert "origin went away" in str(rec2.closed[0])

        s3 = FakeStream()
        ch3 = StreamChannel(s3)
        rec3 = Recorder(ch3)
        ch3.close()
        assert s3.sent_fin and rec3.closed == [None] and ch3.is_closing()
        s3.data(b"late")  # after close: discarded, but credited so the peer is not stalled
        assert rec3.data == b"" and s3.consumed_total == 4
        s4 = FakeStream()
        ch4 = StreamChannel(s4)
        ch4.abort()
        assert s4.reset_with is not None

    run("asyncio", scenario())


def test_forwarding_with_a_slow_destination_withholds_stream_credit():
    """The documented wiring: stream source → slow memory destination."""

    async def scenario():
        s = FakeStream()
        src = StreamChannel(s)
        dst, far = MemoryChannel.pair(high=1000, low=100)
        far_rec = Recorder(far)
        far.pause_reading()  # the destination's reader is stuck
        src.set_receiver(dst.write, lambda exc: dst.close())
        dst.set_write_flow(src.pause_reading, src.resume_reading)
        for _ in range(50):
            s.data(b"z" * 100)
        await asyncio.sleep(0.01)
        assert s.consumed_total <= 1100  # credit stopped once the destination backed up
        far.resume_reading()
        await until(lambda: len(far_rec.data) == 5000, what="all bytes through")
        await until(lambda: s.consumed_total == 5000, what="all credit returned")

    run("asyncio", scenario())


# ------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _gen_key()
    ca = _make_cert("channel-test-ca", ca_key, ca=True)
    key = _gen_key()
    cert = _make_cert("localhost", key, ca, ca_key, sans=["localhost", "127.0.0.1"])
    other_key = _gen_key()
    other = _make_cert("other-ca", other_key, ca=True)
    _write_cert(d / "ca.crt", ca)
    _write_cert(d / "server.crt", cert)
    _write_key(d / "server.key", key)
    _write_cert(d / "other.crt", other)
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key", "other": d / "other.crt"}


def _server_ctx(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    return ctx


def _client_ctx(ca: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


class SslObjectServer:
    """A TLS echo server made directly of ssl.SSLObject + MemoryBIO on a MemoryChannel (not our
    TlsCore), answering every plaintext chunk with b"echo:" + chunk."""

    def __init__(self, channel: MemoryChannel, ctx: ssl.SSLContext) -> None:
        self.ch = channel
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.done = False
        self.plain = bytearray()
        self.error: Exception | None = None
        self.closed: list[Exception | None] = []
        channel.set_receiver(self.on_data, self.closed.append)

    def flush(self) -> None:
        out = self.out.read()
        if out:
            self.ch.write(out)

    def on_data(self, data: bytes) -> None:
        self.inc.write(data)
        try:
            if not self.done:
                try:
                    self.obj.do_handshake()
                    self.done = True
                except ssl.SSLWantReadError:
                    pass
            if self.done:
                while True:
                    try:
                        chunk = self.obj.read(65536)
                    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                        break
                    if not chunk:
                        break
                    self.plain += chunk
                    self.obj.write(b"echo:" + chunk)
        except ssl.SSLError as exc:
            self.error = exc
        self.flush()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tls_over_memory_pipe_against_an_ssl_object_server(loop_kind, pki):
    async def scenario():
        client_end, server_end = MemoryChannel.pair()
        server = SslObjectServer(server_end, _server_ctx(pki))
        tls = TlsChannel(client_end, _client_ctx(pki["ca"]), server_hostname="localhost")
        tls.write(b"early")  # written before the handshake: queued, sent after it
        await tls.handshake(timeout=30)
        assert tls.get_extra_info("tls_version") in ("TLSv1.2", "TLSv1.3")
        assert tls.get_extra_info("peercert")["subject"][0][0][1] == "localhost"
        rec = Recorder(tls)
        await until(lambda: rec.data == b"echo:early", what="echo of early data")
        tls.write(b"ping")
        await until(lambda: rec.data.endswith(b"echo:ping"), what="echo")
        tls.close()
        assert rec.closed == [None]
        await until(lambda: server.closed, what="server side closed")
        assert server.error is None and server.plain == b"earlyping"

    run(loop_kind, scenario())


@pytest.mark.parametrize("ca", ["other", None])
def test_tls_verification_failure_is_a_clear_handshake_error(ca, pki):
    async def scenario():
        client_end, server_end = MemoryChannel.pair()
        SslObjectServer(server_end, _server_ctx(pki))
        ctx = _client_ctx(pki["other"])
        if ca is None:  # right CA, wrong name
            ctx = _client_ctx(pki["ca"])
        tls = TlsChannel(client_end, ctx, server_hostname="localhost" if ca else "db.example.com")
        rec = Recorder(tls)
        with pytest.raises(TlsHandshakeError) as ei:
            await tls.handshake(timeout=30)
        assert ei.value.verification_failed
        assert "certificate verify" in str(ei.value) or "certificate verification failed" in str(ei.value)
        assert isinstance(rec.closed[0], TlsHandshakeError) and client_end.is_closing()

    run("asyncio", scenario())


def test_tls_handshake_fails_when_the_peer_closes_or_is_silent(pki):
    async def scenario():
        a, b = MemoryChannel.pair()
        b.set_receiver(lambda d: b.close(), lambda e: None)  # closes on the ClientHello
        tls = TlsChannel(a, _client_ctx(None))
        with pytest.raises(TlsHandshakeError, match="closed the connection during the TLS handshake"):
            await tls.handshake(timeout=30)
        c, d = MemoryChannel.pair()
        Recorder(d)  # swallows everything
        tls2 = TlsChannel(c, _client_ctx(None))
        with pytest.raises(TimeoutError):
            await tls2.handshake(timeout=0.1)
        assert c.is_closing()

    run("asyncio", scenario())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tls_over_tcp_bulk_with_back_pressure(loop_kind, pki):
    """TLS (ours) over a TcpChannel against asyncio's own TLS server: 4 MiB each way, with the
    receiver pausing now and then and the writer following write_paused."""
    total = 4 * 1024 * 1024

    async def scenario():
        async def echo(r, w):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=_server_ctx(pki))
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        _, tcp = await loop.create_connection(TcpChannel, "127.0.0.1", port)
        tls = TlsChannel(tcp, _client_ctx(pki["ca"]), server_hostname="127.0.0.1")
        await tls.handshake(timeout=30)
        got = hashlib.sha256()
        count = [0]
        pauses = [0]

        def on_data(d: bytes) -> None:
            got.update(d)
            count[0] += len(d)
            if count[0] // (512 * 1024) > pauses[0]:
                pauses[0] += 1
                tls.pause_reading()
                loop.call_later(0.005, tls.resume_reading)

        done = loop.create_future()
        tls.set_receiver(on_data, lambda exc: done.done() or done.set_result(exc))
        sent = hashlib.sha256()
        backed_up = 0
        n = 0
        while n < total:
            chunk = os.urandom(64 * 1024)
            sent.update(chunk)
            tls.write(chunk)
            n += len(chunk)
            if tls.write_paused:
                backed_up += 1
                await tls.drain()
        await until(lambda: count[0] >= total, timeout=60, what="all echoed bytes")
        assert count[0] == total and got.digest() == sent.digest()
        assert pauses[0] >= 4
        tls.close()
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario(), timeout=120)


def test_tls_core_sans_io_round_trip(pki):
    """The core alone, byte for byte: two cores (client and server) talking through lists."""
    client = TlsCore(_client_ctx(pki["ca"]), server_hostname="localhost")
    server = TlsCore(_server_ctx(pki), server_side=True)
    to_server = client.start()
    client.send(b"queued before the handshake")
    plain_at_server = bytearray()
    plain_at_client = bytearray()
    for _ in range(10):
        plain_at_server += server.receive(to_server)
        to_client = server.data_to_send()
        plain_at_client += client.receive(to_client)
        to_server = client.data_to_send()
        if not to_server and not to_client:
            break
    assert client.handshake_done and server.handshake_done
    assert plain_at_server == b"queued before the handshake"
    server.send(b"reply")
    assert client.receive(server.data_to_send()) == b"reply"
    client.close()
    assert server.receive(client.data_to_send()) == b"" and server.peer_closed and server.clean_close
