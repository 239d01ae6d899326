"""Bounds of the proxy listeners against strangers and broken peers (issue 13), on a real `hd edge`:
what each attack makes the edge hold is read from /proc (its RSS), every wait is bounded, and a
real client keeps being served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from proxy.pg import protocol as proto
from tests.harness.edge import EdgeProc
from tests.harness.mysql_proxy import MySQLProxyStack
from tests.harness.pg import PgCluster
from tests.harness.pgwire import PgWire
from tests.harness.procs import poll_until
from tests.harness.procstat import rss_mib

MiB = 1 << 20


@pytest.fixture(scope="module")
def stack():
    pg = PgCluster(auth="scram-sha-256", tls=True).start()
    edge = EdgeProc().start()
    try:
        pg.create_user("app", "app-pw")
        pg.create_database("app", "app")
        pg.execute("create table kv (k int primary key, v text); insert into kv select g, repeat('x', 2000)"
                   " from generate_series(1, 50) g", dbname="app", user="app")
        cfg = edge.hd("hyperdrive", "create", "bounds", "--origin-host", "127.0.0.1", "--origin-port", str(pg.port),
                      "--database", "app", "--origin-user", "app", "--origin-password", "app-pw",
                      "--origin-connection-limit", "5")
        url = urlsplit(cfg["connection_string"])
        yield pg, edge, url
    finally:
        edge.stop()
        edge.cleanup()
        pg.stop()


def pg_address(edge: EdgeProc) -> tuple[str, int]:
    host, _, port = edge.info["pg_listen"].rpartition(":")
    return host.strip("[]"), int(port)


def still_served(url: Any) -> None:
    with psycopg.connect(url.geturl(), connect_timeout=10) as conn:
        assert conn.execute("select 41 + 1").fetchone()[0] == 42


def closed_within(sock: socket.socket, bound: float = 10.0) -> bytes:
    """Everything the edge sends until it closes the connection (bounded)."""
    sock.settimeout(bound)
    got = b""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the edge kept the connection open; it sent {got[:200]!r}")


# ----------------------------------------------------------------------------- Postgres, before login


def test_an_auth_message_claiming_a_gigabyte_is_refused_unread(stack):
    pg, edge, url = stack
    before = rss_mib(edge.pid)
    with socket.create_connection(pg_address(edge), timeout=10) as s:
        s.sendall(proto.startup_message({"user": url.username, "database": "app"}))
        s.settimeout(10)
        assert s.recv(1)[:1] == b"R"  # AuthenticationSASL: the edge waits for the SASL message
        s.sendall(b"p" + struct.pack("!I", 1 << 30) + b"\x00" * (1 << 16))
        try:
            for _ in range(64):  # what the attacker would go on sending
                s.sendall(b"\x00" * (1 << 17))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = closed_within(s)
    assert b"08P01" in answer and b"invalid message length" in answer
    assert rss_mib(edge.pid) - before < 16, "the edge buffered what an unauthenticated client claimed"
    still_served(url)


def test_pipelined_gssenc_requests_close_the_connection_without_a_trace(stack):
    pg, edge, url = stack
    with socket.create_connection(pg_address(edge), timeout=10) as s:
        s.sendall(proto.gssenc_request() * 2000)
        answer = closed_within(s)
    assert answer == b"N"  # one answered, the second closes (PostgreSQL allows one per connection)
    assert "Traceback" not in edge.log_text() and "RecursionError" not in edge.log_text()
    still_served(url)


@pytest.mark.parametrize("packet", [struct.pack("!I", 3), struct.pack("!I", 1 << 30) + b"x" * 100,
                                    b"\x00\x00\x00\x08\x00\x01\x00\x00"], ids=["short", "huge", "no-params"])
def test_a_broken_startup_packet_closes_quietly_or_with_the_servers_error(stack, packet):
    pg, edge, url = stack
    with socket.create_connection(pg_address(edge), timeout=10) as s:
        s.sendall(packet)
        answer = closed_within(s)
    if packet[:4] == b"\x00\x00\x00\x08":  # a valid length but protocol 0.1: PostgreSQL answers FATAL
        assert b"FATAL" in answer
    else:
        assert answer == b""  # an invalid length: PostgreSQL logs it and closes, saying nothing
    still_served(url)


# ----------------------------------------------------------------------------- Postgres, after login


async def test_a_huge_bind_is_streamed_not_held(stack):
    pg, edge, url = stack
    before = rss_mib(edge.pid)
    conn = await PgWire.connect(url.hostname, url.port, user=url.username, password=url.password,
                                database="app", timeout=20)
    try:
        conn.send(proto.parse("big", "select length($1::bytea)", [17]) + proto.sync())
        await conn.read_until(lambda m: m.type == "Z", 20)
        value = b"\xab" * (96 * MiB)
        bind = proto.bind("", "big", [1], [value], [0])
        peak = 0.0
        step = 4 * MiB
        for i in range(0, len(bind), step):
            conn.writer.write(bind[i:i + step])
            await conn.writer.drain()
            peak = max(peak, rss_mib(edge.pid))
        del bind, value
        conn.send(proto.execute() + proto.sync())
        msgs = await conn.read_until(lambda m: m.type == "Z", 60)
        rows = [m for m in msgs if m.type == "D"]
        assert rows and b"100663296" in rows[0].raw, [m.describe() for m in msgs]
    finally:
        conn.abort()
    assert peak - before < 48, f"the edge held {peak - before:.0f} MiB of a 96 MiB Bind"


async def _pipeline_without_reading(url, batch: bytes, per_batch: int, batches: int, warm: bytes | None,
                                    drain_timeout: float) -> int:
    """Log in with the raw client, optionally run `warm` once (read), then write `batch` up to
    `batches` times without reading anything; stops when the edge stops reading us. Returns the
    number of queries sent."""
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    sent = 0
    try:
        writer.write(proto.startup_message({"user": url.username, "database": "app"}))
        conn = PgWire(reader, writer)
        await conn._authenticate(url.username, url.password, asyncio.get_running_loop().time() + 20)
        await conn.read_until(lambda m: m.type == "Z", 20)
        if warm is not None:
            conn.send(warm)
            await conn.read_until(lambda m: m.type == "Z", 20)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        for _ in range(batches):
            writer.write(batch)
            sent += per_batch
            try:
                await asyncio.wait_for(writer.drain(), drain_timeout)
            except asyncio.TimeoutError:
                break  # the edge stopped reading us: good
        return sent
    finally:
        writer.transport.abort()


async def test_a_client_that_never_reads_is_not_read_either(stack):
    """Pipelined reads answered from the cache (and from the origin) for a client that reads
    nothing: the edge stops reading it instead of piling up answers."""
    pg, edge, url = stack
    before = rss_mib(edge.pid)
    query = proto.query("select k, v from kv")  # ~100 kB of answer, cacheable: warmed, then answered by the edge
    # up to 400 MB of answers if the edge took every request
    sent = await _pipeline_without_reading(url, query * 10, 10, 4000, warm=query, drain_timeout=2.0)
    grown = rss_mib(edge.pid) - before
    assert grown < 64, f"{sent} pipelined queries, never read: the edge grew by {grown:.0f} MiB"
    still_served(url)


async def test_a_client_pipelining_uncached_queries_without_reading_is_not_read_either(stack):
    """400,000 pipelined queries that go to the origin, never read: the edge stops reading the client
    once it has a bounded number of requests outstanding (before, every one in flight was kept:
    370,000 queries grew the edge by 71 MiB, and the event loop stalled other clients for seconds)."""
    pg, edge, url = stack
    before = rss_mib(edge.pid)
    batch = proto.query("select 1, random()") * 2000  # volatile: every one goes to the origin
    sent = await _pipeline_without_reading(url, batch, 2000, 200, warm=None, drain_timeout=5.0)
    grown = rss_mib(edge.pid) - before
    assert grown < 48, f"{sent} pipelined queries, never read: the edge grew by {grown:.0f} MiB"
    still_served(url)


# ----------------------------------------------------------------------------- MySQL, before login


@pytest.fixture(scope="module")
def mysql_stack(tmp_path_factory):
    stack = MySQLProxyStack(tmp_path_factory.mktemp("hd-mysql-bounds")).start()
    try:
        yield stack
    finally:
        stack.stop()


def test_mysql_multi_packet_payloads_before_login_are_refused(mysql_stack):
    edge = mysql_stack.edge
    cfg = mysql_stack.config("mbounds")
    args = MySQLProxyStack.args(cfg)
    before = rss_mib(edge.pid)
    socks = []
    try:
        for _ in range(4):
            s = socket.create_connection((args["host"], args["port"]), timeout=10)
            socks.append(s)
            s.settimeout(10)
            s.recv(65536)  # the greeting
            s.sendall(b"\xff\xff\xff\x01" + b"\x00" * (1 << 20))  # the start of a 16 MiB packet
        for s in socks:
            answer = closed_within(s)
            assert answer[4:5] == b"\xff" and b"too large" in answer, answer[:100]
    finally:
        for s in socks:
            s.close()
    assert rss_mib(edge.pid) - before < 16
    conn = mysql_stack.connect(cfg)
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def test_a_mysql_client_that_never_reads_is_not_read_either(mysql_stack):
    edge = mysql_stack.edge
    cfg = mysql_stack.config("mnoread", caching=True)
    seed = mysql_stack.connect(cfg, autocommit=True)
    with seed.cursor() as cur:
        cur.execute("create table if not exists wide (k int primary key, v text)")
        cur.execute("replace into wide select seq, repeat('y', 2000) from seq_1_to_50")
    seed.close()
    args = MySQLProxyStack.args(cfg)
    conn = mysql_stack.connect(cfg, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("select k, v from wide")  # a cacheable read, ~100 kB: cached
        sock = conn._sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        payload = b"\x03select k, v from wide"
        packet = len(payload).to_bytes(3, "little") + b"\x00" + payload
        before = rss_mib(edge.pid)
        sock.settimeout(2.0)
        sent = 0
        try:
            for _ in range(40000):  # up to 4 GB of answers if the edge took every command
                sock.sendall(packet * 10)
                sent += 10
        except (socket.timeout, TimeoutError):
            pass  # the edge stopped reading us: good
        grown = rss_mib(edge.pid) - before
        assert grown < 64, f"{sent} pipelined queries, never read: the edge grew by {grown:.0f} MiB"
    finally:
        conn._sock.close()
