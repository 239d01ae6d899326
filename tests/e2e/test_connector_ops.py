"""The connector as an operator runs it (issue 6): transport fallback and return, HA replicas
under SIGKILL, graceful SIGTERM, the metrics/readiness server — real processes on loopback.

Origins run in their own threads (`in_thread`) so the test's event loop can block on `hd`
calls without stalling them; a `Firewall` between connectors and the edge black-holes UDP or
TCP the way a middlebox would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.test_tunnel_e2e import make_tunnel
from tests.harness.edge import AccessTcpProc, ConnectorProc, EdgeProc
from tests.harness.firewall import Firewall, token_via
from tests.harness.origins import EchoServer, SinkServer, deterministic_chunks, expected_sha256, in_thread
from tests.harness.procs import async_poll_until, free_port, poll_until


def protocols(edge: EdgeProc, tunnel: str, *, draining: bool = False) -> list[str]:
    """Transports of the tunnel's serving connections (or of those draining)."""
    info = edge.hd("tunnel", "info", tunnel)
    return sorted(c["protocol"] for c in info.get("connections") or [] if bool(c.get("draining")) == draining)


def connections_by_replica(edge: EdgeProc, tunnel: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in edge.hd("tunnel", "info", tunnel).get("connections") or []:
        out[c["connector_id"]] = out.get(c["connector_id"], 0) + 1
    return out


async def echo_once(addr: tuple[str, int], payload: bytes, timeout: float = 20.0) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    try:
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
        assert got == payload
    finally:
        writer.close()


class LongEcho:
    """One TCP connection through the tunnel kept open, checked with an echo whenever asked."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> LongEcho:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(*self.addr), 20)
        await self.check()
        return self

    async def check(self) -> None:
        assert self.reader is not None and self.writer is not None
        msg = os.urandom(256)
        self.writer.write(msg)
        assert await asyncio.wait_for(self.reader.readexactly(len(msg)), 10) == msg

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------- transport fallback


@pytest.mark.parametrize("prefer,block", [("quic", "udp"), ("websocket", "tcp")])
async def test_auto_falls_back_when_the_preferred_transport_is_blocked_and_moves_back(edge, prefer, block):
    other = "websocket" if prefer == "quic" else "quic"
    with in_thread(EchoServer()) as echo, in_thread(Firewall(int(edge.tunnel_address.rsplit(":", 1)[1]))) as fw:
        t = make_tunnel(edge, f"fallback-{block}", {"echo.internal.example": echo.url})
        setattr(fw, f"block_{block}", True)
        started = time.monotonic()
        conn = ConnectorProc(edge, token_via(t["token"], fw.port), tunnel=t["id"], extra_args=[
            "--protocol", "auto", "--prefer", prefer, "--reprobe-interval", "3s", "--ha-connections", "2"])
        conn.start(min_connections=0)
        # Up on the other transport soon after starting: the switch is tried at once (the exact
        # schedule is checked with an injected clock in tests/unit/test_connector_backoff.py);
        # the bound here only tells a prompt fallback from a hang, generously for a busy box.
        await asyncio.to_thread(poll_until, lambda: other in protocols(edge, t["id"]), 30,
                                what=f"a connection over {other} while {block} is blocked")
        assert time.monotonic() - started < 30
        log = conn.log_text()
        assert f"falling back to {other}" in log, log
        with AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            inflight = await LongEcho(fwd.address).open()  # carried by a fallback connection
            setattr(fw, f"block_{block}", False)
            # Re-probe every 3 s: both connections move back to the preferred transport...
            await asyncio.to_thread(poll_until, lambda: protocols(edge, t["id"]) == [prefer, prefer], 60,
                                    what=f"both connections back on {prefer}")
            assert "works again; moving connections back" in conn.log_text()
            # ... without dropping the stream that was in flight on the old one, which drains.
            assert protocols(edge, t["id"], draining=True) == [other]
            for _ in range(3):
                await inflight.check()
            inflight.close()
            await asyncio.to_thread(poll_until, lambda: protocols(edge, t["id"], draining=True) == [], 60,
                                    what=f"the drained {other} connection to close")
            await echo_once(fwd.address, b"new stream after the move")
        assert conn.proc.alive


# ------------------------------------------------------------------------- HA replicas


@pytest.mark.parametrize("protocol", ["websocket", "quic"])
async def test_sigkill_of_one_replica_fails_only_its_streams(edge, protocol):
    with in_thread(EchoServer()) as echo:
        t = make_tunnel(edge, f"ha-{protocol}", {"echo.internal.example": echo.url})
        args = ["--protocol", protocol, "--ha-connections", "4"]
        a = ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=args, name="replica-a").start(4)
        b = ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=args, name="replica-b")
        b.start(min_connections=0)
        await asyncio.to_thread(poll_until, lambda: len(connections_by_replica(edge, t["id"])) == 2
                                and sum(connections_by_replica(edge, t["id"]).values()) == 8, 20,
                                what="two replicas with 4 connections each")
        info = edge.hd("tunnel", "info", t["id"])
        assert {c["protocol"] for c in info["connections"]} == {protocol}
        assert {c["version"] for c in info["connections"]} and all(c["uptime"] >= 0 for c in info["connections"])
        _, res = edge.run_hd("tunnel", "info", t["id"])
        assert res.returncode == 0, res.stderr
        assert "8 connection(s) from 2 connector replica(s)" in res.stdout, res.stdout
        assert res.stdout.count(f" {protocol} ") >= 8 and "UPTIME" in res.stdout and "serving" in res.stdout

        with AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            # Long-lived streams, spread over both replicas by the relay.
            longs = [await LongEcho(fwd.address).open() for _ in range(8)]
            stats = {"ok": 0, "failed": 0, "failed_after": 0}
            killed_at: list[float] = []
            stop = asyncio.Event()

            async def steady(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    began = time.monotonic()
                    try:
                        await echo_once(fwd.address, f"{worker}:{i}".encode() * 8, timeout=20)
                        stats["ok"] += 1
                    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                        stats["failed"] += 1
                        if killed_at and began > killed_at[0] + 0.5:
                            stats["failed_after"] += 1
                    await asyncio.sleep(0.02)

            workers = [asyncio.create_task(steady(w)) for w in range(4)]
            # counts, not a fixed sleep: a busy box may echo slower
            await async_poll_until(lambda: stats["ok"] > 10, 60, what="load running")
            before = stats["ok"]
            killed_at.append(time.monotonic())
            a.proc.kill()
            await asyncio.sleep(8 if protocol == "quic" else 3)  # QUIC: the relay notices silence
            await async_poll_until(lambda: stats["ok"] > before, 60, what="echoes after the kill")
            after_kill = stats["ok"]
            await async_poll_until(lambda: stats["ok"] > after_kill, 60, what="echoes later still")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 30)
            # New connections kept working through replica B ...
            assert stats["ok"] > after_kill > before, stats
            # ... and none that started after the kill failed (the relay retried them elsewhere).
            assert stats["failed_after"] == 0, stats
            # At most the streams replica A carried failed: the long-lived ones on A, plus the
            # few short ones in flight at that instant (4 workers).
            survivors = 0
            for s in longs:
                try:
                    await s.check()
                    survivors += 1
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    pass
                s.close()
            assert 0 < survivors < 8, survivors  # both replicas carried some
            assert stats["failed"] <= 4, stats
            # The client side says why its stream ended.
            assert "connection to echo.internal.example cut by the edge: " in fwd.log_text(), fwd.log_text()
        poll_until(lambda: list(connections_by_replica(edge, t["id"]).values()) == [4], 20,
                   what="only replica B's 4 connections left")
        assert b.proc.alive


# ------------------------------------------------------------------------- graceful shutdown


async def test_sigterm_lets_an_inflight_transfer_finish_then_exits(edge):
    with in_thread(SinkServer()) as sink:
        t = make_tunnel(edge, "drain", {"sink.internal.example": sink.url})
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--grace-period", "20s"]).start(4)
        with AccessTcpProc(edge, "sink.internal.example").start() as fwd:
            total = 24 * 1024 * 1024
            reader, writer = await asyncio.open_connection(*fwd.address)
            sent = 0
            began = time.monotonic()
            signalled = None
            for chunk in deterministic_chunks(total, seed=7):
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                await asyncio.sleep(0.008)  # ~3 s in all: a transfer that outlives the signal
                if signalled is None and sent >= total // 4:
                    conn.proc.popen.send_signal(signal.SIGTERM)
                    signalled = time.monotonic()
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 30)  # the sink half-closes after counting
            writer.close()
            assert signalled is not None and time.monotonic() - signalled > 1.0
            result = await asyncio.to_thread(poll_until, lambda: sink.results[-1] if sink.results else None, 60,
                                             what="the sink to count the transfer")
            assert result.count == total and result.sha256 == expected_sha256(total, seed=7)
            code = await asyncio.to_thread(conn.proc.popen.wait, 25)
            assert code == 0, conn.log_text()
            log = conn.log_text()
            assert "draining 1 in-flight stream(s)" in log and "all streams finished" in log, log
            # Nothing is left registered, and a new connection is refused cleanly, not hung.
            assert edge.tunnel_connections(t["id"]) == 0
        assert time.monotonic() - began < 90  # hang guard (the transfer itself is ~3 s)


async def test_second_signal_exits_at_once(edge):
    with in_thread(EchoServer()) as echo:
        t = make_tunnel(edge, "twice", {"echo.internal.example": echo.url})
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--grace-period", "60s"]).start(4)
        with AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            held = await LongEcho(fwd.address).open()  # would keep the drain waiting 60 s
            conn.proc.popen.send_signal(signal.SIGTERM)
            await asyncio.to_thread(conn.proc.wait_for_log, "draining 1 in-flight", 60)
            t0 = time.monotonic()
            conn.proc.popen.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(conn.proc.popen.wait, 40)
            assert time.monotonic() - t0 < 30  # at once, not after the 60 s grace (generous for a busy box)
            assert code == 1
            assert "exiting now" in conn.log_text()
            held.close()


# ------------------------------------------------------------------------- metrics and readiness


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def test_ready_flips_with_the_relay_and_metrics_count(edge_factory):
    edge = edge_factory(tunnel_listen=f"127.0.0.1:{free_port()}", api_listen=f"127.0.0.1:{free_port()}")
    mport = free_port()
    base = f"http://127.0.0.1:{mport}"
    with in_thread(EchoServer()) as echo:
        t = make_tunnel(edge, "ready", {"echo.internal.example": echo.url})
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"],
                             extra_args=["--metrics", f"127.0.0.1:{mport}", "--ha-connections", "2"]).start(2)
        status, body = _get(f"{base}/ready")
        doc = json.loads(body)
        assert status == 200 and set(doc) == {"status", "readyConnections", "connectorId"}, doc
        assert doc["status"] == 200 and doc["readyConnections"] == 2
        assert _get(f"{base}/healthcheck")[0] == 200
        with AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            for i in range(5):
                asyncio.run(echo_once(fwd.address, b"x" * 1000))
        status, text = _get(f"{base}/metrics")
        metrics = text.decode()
        assert status == 200
        assert 'hd_connector_connections{protocol="websocket"} 2' in metrics, metrics
        assert "hd_connector_streams_total 5" in metrics
        assert 'hd_connector_bytes_total{direction="in"} 5000' in metrics
        assert 'hd_connector_bytes_total{direction="out"} 5000' in metrics
        assert "hd_connector_origin_dial_seconds_count 5" in metrics
        assert f"hd_connector_config_version {edge.hd('tunnel', 'info', t['id'])['config_version']}" in metrics

        edge.stop()
        poll_until(lambda: _get(f"{base}/ready")[0] == 503, 15, what="/ready to turn 503 without the relay")
        doc = json.loads(_get(f"{base}/ready")[1])
        assert doc == {"status": 503, "readyConnections": 0, "connectorId": doc["connectorId"]}
        edge.start()
        poll_until(lambda: _get(f"{base}/ready")[0] == 200, 40, what="/ready back to 200 after the relay returns")
        status, text = _get(f"{base}/metrics")
        assert 'hd_connector_reconnects_total{protocol="websocket"}' in text.decode()
        assert conn.proc.alive


# ------------------------------------------------------------------------- local config


async def test_local_config_file_serves_a_locally_managed_tunnel(edge, tmp_path):
    with in_thread(EchoServer()) as echo, in_thread(SinkServer(reply=True)) as sink:
        t = edge.hd("tunnel", "create", "local")
        # Routes without --service: the connector's file decides where each hostname goes.
        for host in ("echo.internal.example", "a.sink.internal.example", "nowhere.internal.example"):
            edge.hd("tunnel", "route", "local", host, "--public")
        cfg = tmp_path / "connector.yml"
        cfg.write_text(f"""
originRequest:
  connectTimeout: 5s
ingress:
  - hostname: echo.internal.example
    service: {echo.url}
    originRequest: {{tcpKeepAlive: 15s}}
  - hostname: "*.sink.internal.example"
    service: {sink.url}
  - service: http_status:404
""")
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"],
                             extra_args=["--config", str(cfg), "--ha-connections", "1"]).start(1)
        with AccessTcpProc(edge, "echo.internal.example").start() as echo_fwd, \
                AccessTcpProc(edge, "a.sink.internal.example").start() as sink_fwd, \
                AccessTcpProc(edge, "nowhere.internal.example").start() as none_fwd:
            await echo_once(echo_fwd.address, b"through the local rule")
            reader, writer = await asyncio.open_connection(*sink_fwd.address)
            writer.write(b"wildcard" * 100)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"800 "), answer
            # The catch-all refuses with its status; the client is told, not hung.
            reader, writer = await asyncio.open_connection(*none_fwd.address)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await asyncio.to_thread(none_fwd.proc.wait_for_log, "404", 10)
        assert "local ingress config" in conn.log_text()
        # Once a route names a service the tunnel is remotely managed: the push replaces the file.
        edge.hd("tunnel", "route", "local", "echo.internal.example", "--service", sink.url, "--public")
        await asyncio.to_thread(conn.proc.wait_for_log, "applied ingress config version", 10)
        with AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            reader, writer = await asyncio.open_connection(*fwd.address)
            writer.write(b"now to the sink")
            writer.write_eof()
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"15 ")
            writer.close()


def test_a_bad_local_config_stops_the_connector_with_a_clear_message(edge, tmp_path):
    t = edge.hd("tunnel", "create", "badlocal")
    cfg = tmp_path / "bad.yml"
    cfg.write_text("ingress:\n  - hostname: a.example\n    service: tcp://127.0.0.1:1\n")
    conn = ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--config", str(cfg)])
    conn.start(min_connections=0)
    code = conn.proc.popen.wait(15)
    assert code == 1
    assert "catch-all" in conn.log_text() and str(cfg) in conn.log_text(), conn.log_text()
