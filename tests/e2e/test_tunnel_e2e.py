"""The tunnel end to end, with real processes on loopback: hd edge, hd-connector, hd access tcp/ssh.

Every test builds its own edge (state dir, ports) so failures stay independent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import asyncssh
import psycopg
import pytest

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.harness.edge import AccessTcpProc, ConnectorProc, EdgeProc, count_connections
from tests.harness.origins import (
    EchoServer,
    SinkServer,
    SourceServer,
    deterministic_chunks,
    expected_sha256,
    in_thread,
)
from tests.harness.procs import async_poll_until, free_port, hd_argv, open_sockets, poll_until


@pytest.fixture(params=["websocket", "quic"], autouse=True)
def link_protocol(request):
    """Every test here runs over both tunnel transports (the connector's --protocol)."""
    ConnectorProc.default_protocol = request.param
    try:
        yield request.param
    finally:
        ConnectorProc.default_protocol = None


def make_tunnel(edge: EdgeProc, name: str, routes: dict[str, str], *, public: bool = True,
                extra: tuple[str, ...] = ()) -> dict:
    t = edge.hd("tunnel", "create", name)
    for hostname, service in routes.items():
        args = ["tunnel", "route", name, hostname, "--service", service, *extra]
        if public:
            args.append("--public")
        edge.hd(*args)
    return t


def relay_stats(edge: EdgeProc) -> dict:
    status, body = edge.api("GET", "/v1/stats")
    assert status == 200, body
    return body


# ------------------------------------------------------------------------- the golden path


def test_postgres_through_access_tcp_with_psycopg_and_psql(edge, pg_cluster):
    t = make_tunnel(edge, "vpc-01", {"db.internal.example": f"tcp://127.0.0.1:{pg_cluster.port}"})
    with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
            AccessTcpProc(edge, "db.internal.example").start() as fwd:
        host, port = fwd.address
        with psycopg.connect(host=host, port=port, user=APP_USER, password=APP_PASSWORD,
                             dbname=APP_DB, connect_timeout=10) as conn:
            assert conn.execute("select current_user, %s::int + 1", (41,)).fetchone() == (APP_USER, 42)
            # a ~10 MB result crosses the tunnel intact
            rows = conn.execute("select i, repeat(md5(i::text), 32) from generate_series(1, 10000) i").fetchall()
            assert len(rows) == 10000
            assert rows[-1][1] == hashlib.md5(b"10000").hexdigest() * 32
        psql = shutil.which("psql")
        assert psql, "psql is part of the test requirements"
        out = subprocess.run(
            [psql, f"host={host} port={port} user={APP_USER} dbname={APP_DB}", "-Atc", "select 'via psql', 6*7"],
            env=dict(os.environ, PGPASSWORD=APP_PASSWORD), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "via psql|42"


async def test_ssh_route_with_asyncssh_via_access_tcp_and_access_ssh(edge, sshd, monkeypatch):
    t = make_tunnel(edge, "vpc-ssh", {"ssh.internal.example": f"ssh://127.0.0.1:{sshd.port}"})
    with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
            AccessTcpProc(edge, "ssh.internal.example").start() as fwd:
        host, port = fwd.address
        async with asyncssh.connect(**sshd.client_kwargs(host=host, port=port)) as conn:
            result = await conn.run("echo hello over the tunnel", check=True)
            assert result.stdout == "hello over the tunnel\n"
            result = await conn.run("cat", input="x" * 100_000, check=True)
            assert result.stdout == "x" * 100_000

        # `hd access ssh` as ssh's ProxyCommand (stdin/stdout carry the session)
        monkeypatch.setenv("HD_STATE_DIR", str(edge.state_dir))
        kwargs = sshd.client_kwargs(host="ssh.internal.example", port=22)
        kwargs["proxy_command"] = hd_argv("access", "ssh", "--hostname", "ssh.internal.example")
        async with asyncssh.connect(**kwargs) as conn:
            result = await conn.run("echo via proxy command", check=True)
            assert result.stdout == "via proxy command\n"


# ------------------------------------------------------------------------- scale and fairness


async def _echo_roundtrips(host: str, port: int, ident: int, rounds: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(rounds):
            msg = f"{ident}:{i}:".encode() + os.urandom(512)
            writer.write(msg)
            got = await reader.readexactly(len(msg))
            assert got == msg
    finally:
        writer.close()


async def test_200_concurrent_streams_over_one_connector_connection(edge):
    async with EchoServer() as echo:
        t = make_tunnel(edge, "many", {"echo.internal.example": echo.url})
        with ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--ha-connections", "1"]).start(), \
                AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            conns = [asyncio.open_connection(*fwd.address) for _ in range(200)]
            pairs = await asyncio.wait_for(asyncio.gather(*conns), 30)
            # All 200 are open at once: check the relay sees them as 200 live bridged streams.
            msgs = []
            for i, (r, w) in enumerate(pairs):
                msg = f"hello {i}".encode()
                w.write(msg)
                msgs.append(msg)
            got = await asyncio.wait_for(
                asyncio.gather(*(r.readexactly(len(m)) for (r, _), m in zip(pairs, msgs))), 30)
            assert got == msgs
            stats = relay_stats(edge)
            assert stats["bridges_active"] == 200
            info = edge.hd("tunnel", "info", t["id"])
            assert count_connections(info) == 1
            assert sum(c["streams"] for c in info["connections"]) >= 200
            # and they keep working concurrently
            async def more(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                for j in range(5):
                    m = f"{i}/{j}".encode() * 50
                    w.write(m)
                    assert await r.readexactly(len(m)) == m
            await asyncio.wait_for(asyncio.gather(*(more(i, r, w) for i, (r, w) in enumerate(pairs))), 60)
            for _, w in pairs:
                w.close()
            await async_poll_until(lambda: relay_stats(edge)["bridges_active"] == 0, 15, what="streams to close")


@pytest.mark.slow
def test_256_mib_transfer_is_byte_identical(edge):
    size = 256 * 1024 * 1024
    with in_thread(SinkServer()) as sink:
        t = make_tunnel(edge, "bulk", {"sink.internal.example": sink.url})
        with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
                AccessTcpProc(edge, "sink.internal.example").start() as fwd:
            start = time.monotonic()
            with socket.create_connection(fwd.address, timeout=30) as s:
                for chunk in deterministic_chunks(size, seed=256):
                    s.sendall(chunk)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(120)
                s.recv(1)  # the sink closes once it has counted everything
            [result] = sink.wait_results_sync(1, timeout=120)
            elapsed = time.monotonic() - start
    assert result.count == size
    assert result.sha256 == expected_sha256(size, seed=256)
    print(f"256 MiB through the tunnel in {elapsed:.1f}s ({size * 8 / elapsed / 1e9:.2f} Gbit/s)")


async def test_slow_reader_does_not_stall_other_streams(edge):
    big = 64 * 1024 * 1024
    async with SourceServer(big, seed=3) as source, EchoServer() as echo:
        t = make_tunnel(edge, "fair", {"source.internal.example": source.url, "echo.internal.example": echo.url})
        with ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--ha-connections", "1"]).start(), \
                AccessTcpProc(edge, "source.internal.example").start() as slow_fwd, \
                AccessTcpProc(edge, "echo.internal.example", name="access-echo").start() as fwd:
            # The slow client opens the 64 MiB source and reads almost nothing.
            slow_r, slow_w = await asyncio.open_connection(*slow_fwd.address, limit=1024)
            first = await asyncio.wait_for(slow_r.read(1024), 10)
            assert first
            await asyncio.sleep(0.5)  # let the source fill every window and buffer on the path
            # Meanwhile other streams on the same connector connection stay fast.
            started = time.monotonic()
            # A stall (head-of-line blocking behind the unread stream) never ends while the slow
            # client reads nothing, so the bound only has to tell a stall from a busy box.
            await asyncio.wait_for(
                asyncio.gather(*(_echo_roundtrips(*fwd.address, i, 50) for i in range(20))), 90)
            elapsed = time.monotonic() - started
            assert elapsed < 60, f"other streams were stalled: {elapsed:.1f}s for 1000 round trips"
            # The slow stream is not lost either: read the whole thing, checksum intact.
            h = hashlib.sha256(first)
            n = len(first)
            while n < big:
                chunk = await asyncio.wait_for(slow_r.read(1 << 20), 30)
                assert chunk, f"source stream ended early at {n} bytes"
                h.update(chunk)
                n += len(chunk)
            assert h.hexdigest() == source.sha256
            slow_w.close()


# ------------------------------------------------------------------------- resilience


async def test_relay_restart_connector_reregisters_by_itself(edge_factory):
    # Fixed ports: the token carries the edge address, which must survive the restart.
    edge = edge_factory(tunnel_listen=f"127.0.0.1:{free_port()}", api_listen=f"127.0.0.1:{free_port()}")
    async with EchoServer() as echo:
        t = make_tunnel(edge, "restart", {"echo.internal.example": echo.url})
        with ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--ha-connections", "2"]).start() as conn, \
                AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            await _echo_roundtrips(*fwd.address, 1, 3)
            edge.restart()  # same state dir, same ports
            # The connector re-registers on its own (backoff starts at 1 s).
            poll_until(lambda: count_connections(edge.hd("tunnel", "info", t["id"])) >= 1, 20,
                       what="the connector to re-register after the relay restarted")
            assert conn.proc.alive
            # New connections work again (the access client re-dials the edge on demand).
            await _echo_roundtrips(*fwd.address, 2, 3)
            assert "reconnecting in" in conn.log_text()


async def test_half_close_and_reset_are_honoured_both_ways(edge):
    events: asyncio.Queue = asyncio.Queue()
    waiting = asyncio.Event()  # the origin holds the "wait" stream (an event, not a fixed sleep)

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(100)
        if first == b"reset me":
            # Abort with RST (SO_LINGER 0): the client must see a reset, not a clean EOF.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if first == b"wait":
            waiting.set()
            try:
                more = await reader.read()
                await events.put(f"origin saw EOF after {more!r}")
            except ConnectionResetError:
                await events.put("origin saw reset")
            return
        # Half-close: the client has sent FIN; we can still answer, then close.
        rest = await reader.read()
        writer.write(b"got:" + first + rest)
        await writer.drain()
        writer.close()
        await events.put("half-closed ok")

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = make_tunnel(edge, "resets", {"o.internal.example": f"tcp://127.0.0.1:{port}"})
    try:
        with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
                AccessTcpProc(edge, "o.internal.example").start() as fwd:
            r, w = await asyncio.open_connection(*fwd.address)
            w.write(b"abc")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"def")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 30) == b"got:abcdef"
            assert await asyncio.wait_for(events.get(), 30) == "half-closed ok"
            w.close()

            r, w = await asyncio.open_connection(*fwd.address)
            w.write(b"reset me")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 30)
            w.close()

            # The other way: the client aborts, the origin sees a reset too.
            r, w = await asyncio.open_connection(*fwd.address)
            w.write(b"wait")
            await w.drain()
            await asyncio.wait_for(waiting.wait(), 30)  # the stream reached the origin
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            assert await asyncio.wait_for(events.get(), 30) == "origin saw reset"
            await async_poll_until(lambda: relay_stats(edge)["bridges_active"] == 0, 30, what="streams to close")
    finally:
        server.close()
