"""The MariaDB harness (tests/harness/mariadb.py) that the MySQL proxy tests (issue 7) stand on:
a real mariadbd the tests start themselves on 127.0.0.1 (never the machine's own server), reached
by PyMySQL, the `mariadb` command-line client and Node's mysql2, with and without TLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pymysql
import pytest

from tests.harness.mariadb import ROOT_PASSWORD, MariaDbError, MariaDbServer
from tests.harness.procs import can_connect

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
NODE_TIMEOUT = 60
CLI_TIMEOUT = 30


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _scalar(conn, sql: str, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def _ssl_cipher(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cur.fetchone()
    return row[1] if row else ""


def _mariadbd_pids_for(base_dir: Path) -> list[int]:
    """pids of live mariadbd processes whose command line mentions base_dir."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if "mariadbd" in cmd and str(base_dir) in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            pids.append(int(d.name))
    return pids


def _run_node(script: Path, env: dict) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is needed for the mysql2 smoke test and is not on PATH")
    if not (NODE_DIR / "node_modules" / "mysql2").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules/mysql2 is missing: run scripts/bootstrap.sh (npm ci in tests/node)")
    cp = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=NODE_TIMEOUT,
                        env={**os.environ, "NODE_OPTIONS": "--no-deprecation", **env}, cwd=NODE_DIR,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{script.name} exited {cp.returncode}\nstderr: {cp.stderr[-3000:]}"
    lines = cp.stdout.strip().splitlines()
    assert lines, f"{script.name} printed nothing; stderr: {cp.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def tls_server():
    """TLS on, plain TCP refused (require_secure_transport)."""
    with MariaDbServer(tls=True, ssl_only=True) as s:
        yield s


# ---------------------------------------------------------------------------------------------- start


def test_session_server_is_ours_and_fast(mariadb):
    assert mariadb.running()
    assert mariadb.startup_seconds is not None and mariadb.startup_seconds < 30, mariadb.startup_seconds
    assert mariadb.port != 3306 and mariadb.host == "127.0.0.1"
    version, charset, bind, datadir, max_conn, port = mariadb.query(
        "SELECT VERSION(), @@character_set_server, @@bind_address, @@datadir, @@max_connections, @@port")[0]
    assert "MariaDB" in version
    assert charset == "utf8mb4"
    assert bind == "127.0.0.1"
    assert Path(datadir).resolve() == mariadb.data_dir.resolve()
    assert max_conn == 500
    assert port == mariadb.port
    assert can_connect("127.0.0.1", mariadb.port)
    # the session fixture's app user owns the app database
    with pymysql.connect(**mariadb.conninfo("app", database="app"), ssl_disabled=True) as c:
        assert _scalar(c, "SELECT CURRENT_USER()") == "app@%"
        with c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS t (id INT PRIMARY KEY)")
            cur.execute("DROP TABLE t")


def test_fresh_server_starts_within_deadline():
    t0 = time.monotonic()
    with MariaDbServer() as s:
        elapsed = time.monotonic() - t0
        assert elapsed < 30, elapsed
        assert s.query("SELECT 1") == [(1,)]


# ---------------------------------------------------------------------------------------------- PyMySQL


def test_pymysql_native_password_over_tcp(mariadb):
    user, db = _name("u"), _name("db")
    mariadb.create_user(user, "pw-1", plugin="mysql_native_password")
    mariadb.create_database(db, owner=user)
    assert mariadb.query("SELECT JSON_VALUE(Priv, '$.plugin') FROM mysql.global_priv WHERE User = %s",
                         (user,)) == [("mysql_native_password",)]
    with pymysql.connect(host="127.0.0.1", port=mariadb.port, user=user, password="pw-1", database=db,
                         ssl_disabled=True, connect_timeout=10) as c:
        assert _scalar(c, "SELECT CURRENT_USER()") == f"{user}@%"
        assert _scalar(c, "SELECT DATABASE()") == db
        assert _ssl_cipher(c) == ""  # plain TCP
        with c.cursor() as cur:
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY, s VARCHAR(20))")
            cur.execute("INSERT INTO t VALUES (%s, %s)", (1, "é✓"))
            c.commit()
            cur.execute("SELECT s FROM t WHERE id = 1")
            assert cur.fetchone() == ("é✓",)
    with pytest.raises(pymysql.err.OperationalError) as e:
        pymysql.connect(**mariadb.conninfo(user, password="wrong"), ssl_disabled=True, connect_timeout=10)
    assert e.value.args[0] == 1045  # access denied


def test_root_over_tcp_and_url(mariadb):
    assert mariadb.url == f"mysql://root:{ROOT_PASSWORD}@127.0.0.1:{mariadb.port}/"
    assert mariadb.dsn("app", db="app") == f"mysql://app:{mariadb.passwords['app']}@127.0.0.1:{mariadb.port}/app"
    with pymysql.connect(**mariadb.conninfo(), ssl_disabled=True, connect_timeout=10) as c:
        assert _scalar(c, "SELECT CURRENT_USER()") == "root@127.0.0.1"


def test_tls(tls_server):
    s = tls_server
    assert s.query("SELECT @@have_ssl, @@require_secure_transport") == [("YES", 1)]
    user = _name("tls")
    s.create_user(user, "tls-pw")
    # verified against our CA, hostname (IP SAN 127.0.0.1) checked too
    with pymysql.connect(**s.conninfo(user), ssl_ca=str(s.ca_cert_path), ssl_verify_cert=True,
                         ssl_verify_identity=True, connect_timeout=10) as c:
        assert _ssl_cipher(c) != ""
    # the dict form as well
    with pymysql.connect(**s.conninfo(user), ssl={"ca": str(s.ca_cert_path)}, connect_timeout=10) as c:
        assert _ssl_cipher(c) != ""
    # plain TCP is refused by require_secure_transport
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(**s.conninfo(user), ssl_disabled=True, connect_timeout=10)


def test_tls_client_certificate(tls_server, tmp_path):
    s = tls_server
    user = _name("x509")
    s.create_user(user, "x509-pw", require="X509")
    cert, key = s.issue_client_cert(user, tmp_path)
    with pymysql.connect(**s.conninfo(user), ssl_ca=str(s.ca_cert_path), ssl_cert=str(cert), ssl_key=str(key),
                         connect_timeout=10) as c:
        assert _ssl_cipher(c) != ""
        assert _scalar(c, "SELECT CURRENT_USER()") == f"{user}@%"
    with pytest.raises(pymysql.err.OperationalError) as e:  # TLS but no client certificate
        pymysql.connect(**s.conninfo(user), ssl_ca=str(s.ca_cert_path), connect_timeout=10)
    assert e.value.args[0] == 1045


# ---------------------------------------------------------------------------------------------- clients


def test_mariadb_cli_client(mariadb):
    # as root over the unix socket
    cp = mariadb.client("-e", "SELECT 40 + 2 AS answer", timeout=CLI_TIMEOUT)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["answer", "42"]
    # as a created user over TCP
    user = _name("cli")
    mariadb.create_user(user, "cli-pw")
    cmd = [shutil.which("mariadb") or "/usr/bin/mariadb", "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1",
           "-P", str(mariadb.port), "-u", user, "--password=cli-pw", "--batch", "--skip-column-names",
           "-e", "SELECT CURRENT_USER(); SHOW SESSION STATUS LIKE 'Ssl_cipher'"]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[0] == f"{user}@%"


def test_node_mysql2(mariadb):
    out = _run_node(NODE_DIR / "mysql_smoke.mjs", {"MYSQL_URL": mariadb.dsn("app", db="app")})
    assert out["two"] == 2
    assert out["user"] == "app@%"
    assert out["db"] == "app"
    assert "MariaDB" in out["version"]
    assert out["echoed"] == 42 and out["joined"] == "ab"
    assert out["ssl_cipher"] == ""


def test_node_mysql2_tls(tls_server):
    s = tls_server
    user = _name("node")
    s.create_user(user, "node-pw")
    out = _run_node(NODE_DIR / "mysql_smoke.mjs", {"MYSQL_URL": s.dsn(user), "MYSQL_SSL_CA": str(s.ca_cert_path)})
    assert out["user"] == f"{user}@%"
    assert out["ssl_cipher"] != ""


# ---------------------------------------------------------------------------------------------- counting


def test_connection_count(mariadb):
    user = _name("cnt")
    mariadb.create_user(user, "cnt-pw")
    assert mariadb.connection_count(user) == 0
    before_all = mariadb.connection_count()
    conns = [pymysql.connect(**mariadb.conninfo(user), ssl_disabled=True, connect_timeout=10) for _ in range(5)]
    try:
        assert mariadb.connection_count(user) == 5
        assert mariadb.connection_count() >= before_all + 5
        rows = mariadb.connections(user)
        assert len(rows) == 5 and all(r["user"] == user and r["host"].startswith("127.0.0.1:") for r in rows)
        conns.pop().close()
        assert mariadb.wait_connection_count(4, user, timeout=10) == 4
        assert mariadb.kill_connections(user) == 4
        mariadb.wait_connection_count(0, user, timeout=10)
    finally:
        for c in conns:
            try:
                c.close()
            except Exception:
                pass


def test_admin_connection_not_counted(mariadb_factory):
    s = mariadb_factory()
    assert s.connection_count() == 0
    assert s.connection_count("root") == 0
    with s.connect() as c:  # root over the socket
        assert s.connection_count("root") == 1
        assert s.connections("root")[0]["id"] == c.thread_id()


# ---------------------------------------------------------------------------------------------- lifecycle


def test_stop_leaves_nothing_behind():
    s = MariaDbServer().start()
    base, pid, port, sock = s.base_dir, s.pid, s.port, s.socket_path
    assert _mariadbd_pids_for(base) == [pid]
    assert sock.exists()
    s.stop()
    assert not s.running()
    assert not base.exists()
    assert _mariadbd_pids_for(base) == []
    assert not Path(f"/proc/{pid}").exists()
    assert not can_connect("127.0.0.1", port)
    s.stop()  # idempotent


def test_kill_and_restart(mariadb_factory):
    s = mariadb_factory()
    s.query("CREATE DATABASE keep; CREATE TABLE keep.t (id INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO keep.t VALUES (7)")
    port = s.port
    s.kill()
    assert not s.running()
    s.restart()
    assert s.port == port
    assert s.query("SELECT id FROM keep.t") == [(7,)]


def test_startup_failure_reports_the_error_log():
    s = MariaDbServer(settings={"no_such_option_hd": 1})
    try:
        with pytest.raises(MariaDbError) as e:
            s.start(timeout=30)
        assert "unknown variable" in str(e.value)
        assert "error log tail" in str(e.value)
    finally:
        s.stop()
    assert not s.base_dir.exists()


def test_port_taken_between_pick_and_bind_is_retried(monkeypatch):
    import socket

    import tests.harness.mariadb as mariadb_mod

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real_free_port, picks = mariadb_mod.free_port, []

        def free_port(host):
            picks.append(host)
            return taken if len(picks) == 1 else real_free_port(host)

        monkeypatch.setattr(mariadb_mod, "free_port", free_port)
        with MariaDbServer() as s:
            assert len(picks) == 2 and s.port != taken
            assert "Address already in use" in s.log_text()
            assert s.query("SELECT 1") == [(1,)]
