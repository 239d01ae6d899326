"""Bad input end to end: each case gives a clear error where the user sees it, the relay keeps
serving everyone else, and nothing leaks (streams counted by the relay, sockets and fds
counted in /proc for the edge and the connector)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import struct
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.harness.edge import AccessTcpProc, ConnectorProc, EdgeProc, count_connections
from tests.harness.origins import BlackHole, EchoServer, RefusingPort, in_thread
from tests.harness.procs import Proc, connector_argv, hd_argv, open_fds, open_sockets, poll_until
from tunnel.token import TunnelToken


def _insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _echo_ok(address: tuple[str, int], payload: bytes = b"still serving") -> None:
    with socket.create_connection(address, timeout=10) as s:
        s.settimeout(10)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "healthy stream closed early"
            got += chunk
        assert got == payload


def _expect_refused(fwd: AccessTcpProc, text: str, *, within: float = 10.0) -> float:
    """The local connection is closed without data, and the access client says why."""
    start = time.monotonic()
    with socket.create_connection(fwd.address, timeout=5) as s:
        s.settimeout(within + 5)
        assert s.recv(100) == b""
    elapsed = time.monotonic() - start
    poll_until(lambda: text in fwd.log_text(), 30, what=f"{text!r} in the access client's log",
               on_timeout=lambda: fwd.log_text()[-2000:])
    return elapsed


def _connector(edge: EdgeProc, token: str, name: str = "connector") -> Proc:
    proc = Proc(connector_argv("--token", token, "--ha-connections", "2"), name=name,
                log_dir=edge.state_dir / "logs")
    edge.children.append(proc)
    return proc


# ------------------------------------------------------------------------- connector auth


def test_wrong_token_is_final_with_a_clear_message(edge):
    t = edge.hd("tunnel", "create", "auth")
    good = TunnelToken.decode(t["token"])
    bad = TunnelToken(good.tunnel_id, bytes(32), good.edge, good.pin).encode()
    proc = _connector(edge, bad, "wrong-secret")
    assert proc.wait_exit(20) != 0
    assert "refused this tunnel token" in proc.stderr_text()
    assert "secret is wrong" in proc.stderr_text()
    assert proc.stderr_text().count("reconnecting") == 0  # no retry storm

    garbled = _connector(edge, "not-a-token", "garbled")
    assert garbled.wait_exit(10) != 0
    assert "token is not valid" in garbled.stderr_text()

    other_pin = TunnelToken(good.tunnel_id, good.secret, good.edge, "sha256:" + "0" * 64).encode()
    impostor = _connector(edge, other_pin, "wrong-pin")
    assert impostor.wait_exit(20) != 0
    assert "not the one this token was issued by" in impostor.stderr_text()


def test_deleted_tunnel_stops_its_connector_and_refuses_new_ones(edge):
    t = edge.hd("tunnel", "create", "doomed")
    conn = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
    edge.hd("tunnel", "delete", "doomed")
    assert conn.proc.wait_exit(20) != 0
    assert "deleted" in conn.proc.stderr_text()
    late = _connector(edge, t["token"], "late")
    assert late.wait_exit(20) != 0
    assert "does not exist" in late.stderr_text()


# ------------------------------------------------------------------------- hostnames and origins


def test_stream_errors_are_clear_bounded_and_leak_nothing(edge):
    with in_thread(EchoServer()) as echo, RefusingPort() as refusing, BlackHole() as hole:
        t = edge.hd("tunnel", "create", "errs")
        for host, service, extra in [
            ("echo.internal.example", echo.url, ["--public"]),
            ("refused.internal.example", f"tcp://{refusing.address}", ["--public"]),
            ("hole.internal.example", f"tcp://{hole.address}", ["--public", "--connect-timeout", "1s"]),
            ("private.internal.example", echo.url, []),
            ("gone.internal.example", "http_status:410", ["--public"]),
        ]:
            edge.hd("tunnel", "route", "errs", host, "--service", service, *extra)
        idle = edge.hd("tunnel", "create", "idle")
        edge.hd("tunnel", "route", "idle", "idle.internal.example", "--service", echo.url, "--public")

        conn = ConnectorProc(edge, t["token"], tunnel=t["id"]).start(min_connections=4)
        healthy = AccessTcpProc(edge, "echo.internal.example", name="access-echo").start()
        _echo_ok(healthy.address)
        base_edge = (open_fds(edge.pid), open_sockets(edge.pid))
        base_conn = (open_fds(conn.pid), open_sockets(conn.pid))

        cases = [
            ("nope.internal.example", "404 no_route"),
            ("private.internal.example", "403 access_denied"),
            ("refused.internal.example", "502 origin_unreachable"),
            ("gone.internal.example", "410"),
            ("idle.internal.example", "503 no_connector"),
        ]
        clients = []
        for host, text in cases:
            fwd = AccessTcpProc(edge, host, name=f"access-{host.split('.')[0]}").start()
            clients.append(fwd)
            assert _expect_refused(fwd, text) < 12  # refused, not hung (generous for a busy box)
            _echo_ok(healthy.address)  # everyone else is still served

        # An origin that never answers: refused after the route's 1 s connect timeout, not hung.
        fwd = AccessTcpProc(edge, "hole.internal.example", name="access-hole").start()
        clients.append(fwd)
        elapsed = _expect_refused(fwd, "504 origin_timeout", within=10)
        assert 0.9 < elapsed < 12, elapsed  # the route's 1 s, not the 15 s default (generous for a busy box)
        assert "did not accept the connection within 1s" in fwd.log_text()
        _echo_ok(healthy.address)

        # `hd access ssh` reports the same errors on stderr with a non-zero exit.
        code, err = edge.hd_fail("access", "ssh", "--hostname", "nope.internal.example")
        assert code != 0 and "no tunnel route for hostname nope.internal.example" in err

        for c in clients:
            c.stop()

        # Nothing leaked: relay streams back to the healthy client's idle link, sockets and fds too.
        def settled() -> bool:
            status, stats = edge.api("GET", "/v1/stats")
            return (stats["bridges_active"] == 0 and stats["client_streams"] == 0
                    and stats["connector_streams"] == 4  # one control stream per connection
                    and (open_fds(edge.pid), open_sockets(edge.pid)) <= base_edge
                    and (open_fds(conn.pid), open_sockets(conn.pid)) <= base_conn)

        poll_until(settled, 15, what="streams, sockets and fds to return to the baseline",
                   on_timeout=lambda: json.dumps([edge.api("GET", "/v1/stats")[1], base_edge,
                                                  (open_fds(edge.pid), open_sockets(edge.pid)),
                                                  base_conn, (open_fds(conn.pid), open_sockets(conn.pid))]))
        _echo_ok(healthy.address)
        healthy.stop()
        conn.stop()


# ------------------------------------------------------------------------- malformed link traffic


@pytest.mark.parametrize("path", ["/client", "/tunnel"])
async def test_malformed_and_oversized_frames_close_only_that_link(edge, path):
    async with EchoServer() as echo:
        t = edge.hd("tunnel", "create", "frames")
        edge.hd("tunnel", "route", "frames", "echo.internal.example", "--service", echo.url, "--public")
        url = edge.tunnel_url.rstrip("/") + path

        async def send_raw(payload: bytes) -> tuple[int, str]:
            async with connect(url, ssl=_insecure(), compression=None, max_size=None) as ws:
                await ws.send(payload)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                assert ws.close_code is not None
                return ws.close_code, ws.close_reason or ""

        header = struct.Struct("!IBI")
        cases = [
            (b"\x00\x00\x00", 1002, "truncated"),  # shorter than a frame header
            (header.pack(1, 99, 0), 1002, "unknown frame type"),
            (header.pack(1, 2, 16 * 1024 * 1024) + b"x" * 16, 1002, "exceeds maximum"),  # oversized frame
            (header.pack(1, 2, 10) + b"short", 1002, "truncated"),
            (header.pack(2, 1, 0), 1002, "parity"),  # wrong id parity for a client
        ]
        # Keep one healthy client session open through all of it (on the same relay).
        with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
                AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _echo_ok, fwd.address)
            for payload, code, text in cases:
                got_code, reason = await send_raw(payload)
                assert got_code == code, (payload[:12], got_code, reason)
                assert text in reason.lower(), reason
                await loop.run_in_executor(None, _echo_ok, fwd.address)
            # A WebSocket message above the relay's size limit: closed with 1009 (message too big).
            got_code, reason = await send_raw(b"\x00" * (3 * 1024 * 1024))
            assert got_code == 1009, (got_code, reason)
            await loop.run_in_executor(None, _echo_ok, fwd.address)

            # A well-formed stream whose ConnectRequest is garbage is reset; the link survives.
            async with connect(edge.tunnel_url.rstrip("/") + "/client", ssl=_insecure(), compression=None) as ws:
                junk = b"\x00\x00\x00\x05notjs"
                await ws.send(header.pack(1, 1, 0) + header.pack(1, 2, len(junk)) + junk)
                reply = await asyncio.wait_for(ws.recv(), 10)
                sid, ftype, length = header.unpack_from(reply, 0)
                assert (sid, ftype) == (1, 4)  # RST
                assert b"ConnectRequest" in reply[9 + 4: 9 + length]
                await ws.ping()
            status, stats = edge.api("GET", "/v1/stats")
            assert stats["bridges_active"] <= 1
