"""Smoke tests of the process harness (tests/harness/edge.py) against the real commands:
`hd edge`, `hd tunnel ...`, `hd-connector`, `hd access tcp`."""

from __future__ import annotations

import hashlib
import socket

from tests.harness.edge import AccessTcpProc, ConnectorProc, count_connections
from tests.harness.origins import EchoServer, deterministic_bytes, in_thread
from tests.harness.procs import open_sockets


def test_edge_and_connector_come_up(edge):
    assert edge.api_url.startswith("http://127.0.0.1:")
    assert edge.tunnel_address.startswith("127.0.0.1:")
    assert edge.cert_pin.startswith("sha256:")
    t = edge.hd("tunnel", "create", "vpc-01")
    assert t["name"] == "vpc-01" and t["id"] and t["token"]
    code, err = edge.hd_fail("tunnel", "info", "no-such-tunnel")
    assert code != 0 and err.strip()

    conn = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
    try:
        n = conn.wait_connections(4, timeout=30)  # default --ha-connections 4
        assert n >= 4
        assert open_sockets(conn.pid) >= 4
    finally:
        rc = conn.stop(timeout=15)
    assert rc is not None
    edge.proc.wait_for(lambda: count_connections(edge.hd("tunnel", "info", t["id"])) == 0, 15,
                       what="connections to go away after the connector stopped")


def test_bytes_through_access_tcp(edge):
    t = edge.hd("tunnel", "create", "vpc-02")
    with in_thread(EchoServer()) as echo:
        edge.hd("tunnel", "route", "vpc-02", "echo.internal.example", "--service", echo.url, "--public")
        with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
                AccessTcpProc(edge, "echo.internal.example").start() as fwd:
            payload = deterministic_bytes(1_000_000, seed=11)
            with socket.create_connection(fwd.address, timeout=10) as s:
                s.settimeout(10)
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while chunk := s.recv(65536):
                    got += chunk
            assert len(got) == len(payload)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
