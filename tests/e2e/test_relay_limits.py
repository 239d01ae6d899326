"""Streams per access-client session (issue 13): one `hd access tcp` session cannot make the
connector open more than the relay's cap (1024) of origin sockets; the excess streams get a
clear ConnectResponse error and the session stays usable. Loopback only."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from control.secretbox import SecretBox
from control.store import Store
from relay.server import MAX_CLIENT_STREAMS, Relay
from tests.e2e.test_tunnel_e2e import make_tunnel
from tests.harness.edge import AccessTcpProc, ConnectorProc
from tests.harness.origins import EchoServer, in_thread
from tests.harness.procs import async_poll_until
from tunnel.link import StreamInbox
from tunnel.messages import ConnectRequest, ConnectResponse
from tunnel.tls import cert_pin, ensure_edge_certificate, server_ssl_context
from tunnel.wslink import dial_link


async def _echo_held(addr: tuple[str, int], held: list[asyncio.StreamWriter]) -> bool:
    """One connection through the access client: True if it echoes (it is then kept open)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 60)
    try:
        writer.write(b"x")
        got = await asyncio.wait_for(reader.read(1), 60)
    except ConnectionError:
        got = b""
    if got == b"x":
        held.append(writer)
        return True
    writer.close()
    return False


async def test_one_access_session_cannot_open_more_than_the_cap_of_origin_sockets(edge):
    extra = 60
    with in_thread(EchoServer()) as echo:
        t = make_tunnel(edge, "many", {"echo.internal.example": echo.url})
        with ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--ha-connections", "1"]).start(), \
                AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            held: list[asyncio.StreamWriter] = []
            try:
                results: list[bool] = []
                for start in range(0, MAX_CLIENT_STREAMS + extra, 100):  # batches: the listen backlog is 100
                    n = min(100, MAX_CLIENT_STREAMS + extra - start)
                    results += await asyncio.gather(*(_echo_held(fwd.address, held) for _ in range(n)))
                # Before the cap: every one of them was an origin socket at the connector.
                assert sum(results) == MAX_CLIENT_STREAMS
                assert echo.connections_total == MAX_CLIENT_STREAMS
                await async_poll_until(lambda: "429 too_many_streams" in fwd.log_text(), 10,
                                       what="the refusal in the access client's log")
                assert f"already has {MAX_CLIENT_STREAMS} open streams" in fwd.log_text()
            finally:
                for w in held:
                    w.close()
            # The session stays usable: once streams end, new ones are carried again.
            await async_poll_until(lambda: echo.connections_active == 0, 30, what="the held streams to end")
            again: list[asyncio.StreamWriter] = []
            assert await _echo_held(fwd.address, again)
            for w in again:
                w.close()


@pytest.fixture
async def relay(tmp_path):
    cert, key = ensure_edge_certificate(tmp_path, [])
    store = Store(tmp_path / "state.db", SecretBox.load_or_create(tmp_path / "secret.key"))
    r = Relay(store, server_ssl_context(cert, key), max_client_streams=8)
    await r.start("127.0.0.1", 0)
    try:
        yield r, cert_pin(cert)
    finally:
        await r.close()
        store.close()


async def test_the_cap_refuses_only_the_excess_and_counts_streams_until_they_end(relay):
    r, pin = relay
    link = await dial_link(f"wss://127.0.0.1:{r.port}", pin, "/client")
    runner = asyncio.create_task(link.run())
    try:
        # Streams opened and not yet asked for anything count: the relay holds them.
        idle = [link.open_stream() for _ in range(8)]
        await async_poll_until(lambda: r.stats()["client_streams"] == 8, 10, what="8 streams at the relay")
        over = StreamInbox(link.open_stream())
        over.send_message(ConnectRequest("db.example").to_dict())
        resp = ConnectResponse.from_dict(await over.read_message(10))
        assert (resp.ok, resp.status, resp.code) == (False, 429, "too_many_streams")
        assert "already has 8 open streams" in resp.error
        assert r.stats()["streams_over_cap"] == 1
        over.stream.reset(0, "refused")
        # One ends: the next stream is served (it reaches routing: no route for this name).
        idle[0].reset(0, "done")
        await async_poll_until(lambda: r.stats()["client_streams"] == 7, 10, what="a slot to free up")
        ok = StreamInbox(link.open_stream())
        ok.send_message(ConnectRequest("db.example").to_dict())
        resp = ConnectResponse.from_dict(await ok.read_message(10))
        assert (resp.status, resp.code) == (404, "no_route")
        assert not link.is_closed
    finally:
        await link.close(1000, "done")
        runner.cancel()


def test_the_default_cap_is_1024(tmp_path):
    store = Store(tmp_path / "state.db", SecretBox.load_or_create(tmp_path / "secret.key"))
    try:
        assert Relay(store, ssl.create_default_context()).max_client_streams == MAX_CLIENT_STREAMS == 1024
    finally:
        store.close()
