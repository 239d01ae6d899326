"""Self-tests of the test harness (tests/harness): if these fail, nothing built on them is trusted."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import asyncssh
import psycopg
import pytest

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.harness.origins import (SinkServer, SourceServer, expected_sha256, in_thread,
                                   send_and_collect)
from tests.harness.edge import count_connections
from tests.harness.procs import (Proc, ProcExited, WaitTimeout, free_port, is_listening, open_fds, open_sockets,
                                 poll_until, wait_port)


# --- PostgreSQL ---------------------------------------------------------------------------------

def test_pg_cluster_scram(pg_cluster):
    with psycopg.connect(pg_cluster.dsn(APP_USER, dbname=APP_DB), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (APP_USER, APP_DB)
        assert conn.info.port == pg_cluster.port and conn.info.host == "127.0.0.1"
    stored = pg_cluster.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (APP_USER,))[0][0]
    assert stored.startswith("SCRAM-SHA-256$")
    hba = pg_cluster.execute("SELECT type, auth_method FROM pg_hba_file_rules WHERE type <> 'local'")
    assert hba and all(m == "scram-sha-256" for _, m in hba)

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_cluster.dsn(APP_USER, "wrong-password", dbname=APP_DB), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):  # TCP is not trust: no password, no entry
        psycopg.connect(f"host=127.0.0.1 port={pg_cluster.port} user={APP_USER} dbname={APP_DB} "
                        "password=''", connect_timeout=5)


def test_pg_cluster_psql(pg_cluster):
    r = pg_cluster.psql("-Atc", "SELECT 40 + 2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    # psql over TCP with the app password (scram)
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "5"}
    r = subprocess.run(["psql", "-X", "-Atc", "SELECT current_user",
                        f"host=127.0.0.1 port={pg_cluster.port} user={APP_USER} dbname={APP_DB}"],
                       env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == APP_USER
    # settings requested by the harness took effect
    assert pg_cluster.execute("SHOW max_connections")[0][0] == "300"
    assert pg_cluster.execute("SHOW fsync")[0][0] == "off"
    assert pg_cluster.execute("SHOW listen_addresses")[0][0] == "127.0.0.1"


def test_pg_cluster_tls(pg_cluster_factory):
    c = pg_cluster_factory(auth="scram-sha-256", ssl_only=True)
    c.create_user("u", "pw")
    with psycopg.connect(c.dsn("u", dbname="postgres", sslmode="require"), connect_timeout=5) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    # the certificate really is for 127.0.0.1 and signed by the cluster's CA
    with psycopg.connect(c.dsn("u", dbname="postgres", sslmode="verify-full", sslrootcert=c.ca_cert_path),
                         connect_timeout=5):
        pass
    with pytest.raises(psycopg.OperationalError):  # hostssl only: plain TCP has no pg_hba entry
        psycopg.connect(c.dsn("u", dbname="postgres", sslmode="disable"), connect_timeout=5)


def test_pg_cluster_md5_and_client_cert(pg_cluster_factory, tmp_path):
    md5 = pg_cluster_factory(auth="md5")
    md5.create_user("m", "pw")
    assert md5.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'm'")[0][0].startswith("md5")
    with psycopg.connect(md5.dsn("m", dbname="postgres"), connect_timeout=5):
        pass

    cc = pg_cluster_factory(client_cert=True)
    cc.create_user("certuser")
    cert, key = cc.issue_client_cert("certuser", tmp_path)
    dsn = cc.dsn("certuser", dbname="postgres", sslmode="verify-full", sslrootcert=cc.ca_cert_path,
                 sslcert=cert, sslkey=key)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("certuser",)
    with pytest.raises(psycopg.OperationalError):  # no client certificate: refused
        psycopg.connect(cc.dsn("certuser", dbname="postgres", sslmode="require"), connect_timeout=5)


def test_pg_cluster_stop_removes_everything(pg_cluster_factory):
    c = pg_cluster_factory()
    pid, base = c.pid, c.base_dir
    assert base.exists()
    c.stop()
    assert not base.exists()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    c.stop()  # idempotent


# --- misbehaving ports ----------------------------------------------------------------------------

def test_black_hole_connect_times_out(black_hole):
    s = socket.socket()
    s.settimeout(1.0)
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        s.connect(("127.0.0.1", black_hole.port))
    elapsed = time.monotonic() - t0
    s.close()
    assert elapsed >= 0.9, elapsed  # waited out the timeout: no refusal, no answer
    assert elapsed < 30.0, elapsed  # hang guard only


async def test_black_hole_asyncio_connect_times_out(black_hole):
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.open_connection(black_hole.host, black_hole.port), 1.0)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.9, elapsed  # waited out the timeout: no refusal, no answer
    assert elapsed < 30.0, elapsed  # hang guard only


def test_refusing_port_refuses_at_once(refusing_port):
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", refusing_port.port), timeout=120)
    assert time.monotonic() - t0 < 60  # refused, not left to wait out its 120 s timeout


# --- origins ------------------------------------------------------------------------------------

async def test_echo_source_sink(echo_server):
    n, digest = await send_and_collect(echo_server.host, echo_server.port, nbytes=3_000_001, seed=5)
    assert (n, digest) == (3_000_001, expected_sha256(3_000_001, 5))

    async with SourceServer(1_000_000, seed=9) as src:
        assert await send_and_collect(src.host, src.port, b"") == (1_000_000, src.sha256)

    async with SinkServer() as sink:
        await send_and_collect(sink.host, sink.port, nbytes=777_777, seed=2)
        (result,) = await sink.wait_results(1, timeout=10)
        assert (result.count, result.sha256) == (777_777, expected_sha256(777_777, 2))


def test_origin_in_thread():
    with in_thread(SinkServer(reply=True)) as sink:
        with socket.create_connection((sink.host, sink.port), timeout=5) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            reply = b""
            while chunk := s.recv(1024):
                reply += chunk
        assert reply.split() == [b"5", expected_digest(b"hello").encode()]
        assert sink.wait_results_sync(1, timeout=5)[0].count == 5


def expected_digest(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


# --- sshd ---------------------------------------------------------------------------------------

async def test_sshd_runs_commands(sshd):
    async with asyncssh.connect(**sshd.client_kwargs()) as conn:
        r = await conn.run("echo hello world", check=True, timeout=10)
        assert r.stdout == "hello world\n"
        r = await conn.run("cat", input="piped\n", check=True, timeout=10)
        assert r.stdout == "piped\n"
        r = await conn.run("exit 3", timeout=10)
        assert r.exit_status == 3
    async with asyncssh.connect(**sshd.client_kwargs(password=True)) as conn:
        assert (await conn.run("uptime", check=True, timeout=10)).stdout == "ran: uptime\n"
    bad = sshd.client_kwargs(password=True)
    bad["password"] = "wrong"
    with pytest.raises(asyncssh.PermissionDenied):
        async with asyncssh.connect(**bad):
            pass
    assert sshd.commands == ["echo hello world", "cat", "exit 3", "uptime"]


# --- processes ----------------------------------------------------------------------------------

CHILD = r"""
import signal, socket, sys, time
ls = socket.socket(); ls.bind(("127.0.0.1", int(sys.argv[1]))); ls.listen(8)
extra = [socket.socket() for _ in range(3)]
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", ls.getsockname()[1], flush=True)
print("to stderr", file=sys.stderr, flush=True)
while True:
    c, _ = ls.accept(); c.close()
"""


def test_proc_lifecycle_and_fd_accounting(tmp_path):
    port = free_port()
    p = Proc([sys.executable, "-c", CHILD, str(port), "normal"], name="child", log_dir=tmp_path)
    try:
        m = p.wait_for_log(r"ready (\d+)", timeout=10)
        assert int(m.group(1)) == port
        p.wait_for_log("to stderr", stream="stderr", timeout=10)
        poll_until(lambda: is_listening("127.0.0.1", port), 5, what="child listening")
        wait_port("127.0.0.1", port, timeout=5)
        assert open_sockets(p.pid) >= 4  # listener + 3 unconnected sockets
        assert open_fds(p.pid) >= open_sockets(p.pid) + 3  # + stdin/stdout/stderr
        assert p.returncode is None
    finally:
        rc = p.stop(timeout=5)
    assert rc == -signal.SIGTERM
    assert not is_listening("127.0.0.1", port)


def test_proc_stop_escalates_to_sigkill(tmp_path):
    p = Proc([sys.executable, "-c", CHILD, "0", "ignore"], name="stubborn", log_dir=tmp_path)
    p.wait_for_log("ready", timeout=10)
    t0 = time.monotonic()
    assert p.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 30  # hang guard: SIGKILL followed the ignored SIGTERM


def test_proc_wait_fails_fast_when_the_process_exits(tmp_path):
    p = Proc([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"], name="quitter", log_dir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ProcExited, match="exited with 3"):
        p.wait_for_log("never printed", timeout=120)
    assert time.monotonic() - t0 < 60  # noticed the exit, did not wait out its 120 s timeout
    with pytest.raises(WaitTimeout):
        poll_until(lambda: False, 0.1)


def test_count_connections_shapes():
    assert count_connections({"connections": 3}) == 3
    assert count_connections({"connections": [{"id": 1}, {"id": 2}]}) == 2
    assert count_connections({"connections": [{"connector_id": "a", "connections": [{}, {}]}, {"connections": 1}]}) == 3
    assert count_connections({}) == 0
