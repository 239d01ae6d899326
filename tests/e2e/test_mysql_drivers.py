"""MySQL clients through proxy → relay → connector → MariaDB (issue 7).

One stack per module: a throwaway MariaDB with TLS (tests/harness/mariadb.py), `hd edge` with a
MySQL listener, a tunnel routed to MariaDB WITHOUT --public, a service token and an Access
application allowing it, a connector, and one mysql Hyperdrive config reaching the origin through
the tunnel. Then the same scenarios with PyMySQL, mysql2 (node, from tests/node) and the `mariadb`
command-line client: connect, queries with client-side parameters, a rolled-back and a committed
transaction, an origin error, a 10 MB result, the refusals (prepared statements, USE / COM_INIT_DB,
multi-statements, non-UTF-8 text) with the connection still usable; and 100 concurrent clients
against a connection limit of 10.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pymysql
import pytest

from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.mariadb import MariaDbServer

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
HOST = "mysql.internal.example"
ORIGIN_USER, ORIGIN_PASSWORD, DB = "app", "app-origin-pw", "app"
BIG = 10 * 1024 * 1024


@dataclass
class Stack:
    db: MariaDbServer
    edge: EdgeProc
    config: dict
    token: dict  # the service token the configs reach the origin with

    @property
    def dsn(self) -> str:
        return self.config["connection_string"]

    @property
    def ca(self) -> str:
        """The CA file the connection string names (ssl-ca): what applications verify the edge with."""
        return parse_qs(urlsplit(self.dsn).query)["ssl-ca"][0]

    def connect(self, **kw) -> pymysql.connections.Connection:
        """PyMySQL as the README says: verified against the edge's CA, host name included (a test
        that means plaintext says ssl_disabled=True)."""
        u = urlsplit(self.dsn)
        args = dict(host=u.hostname, port=u.port, user=unquote(u.username or ""),
                    password=unquote(u.password or ""), database=u.path.lstrip("/"), connect_timeout=10,
                    read_timeout=60, write_timeout=60)
        if "ssl_disabled" not in kw and "ssl" not in kw:
            args.update(ssl_ca=self.ca, ssl_verify_cert=True, ssl_verify_identity=True)
        args.update(kw)
        return pymysql.connect(**args)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    db = MariaDbServer(tls=True)
    edge = None
    try:
        db.start()
        db.create_user(ORIGIN_USER, ORIGIN_PASSWORD)
        db.create_database(DB, ORIGIN_USER)
        db.query(f"CREATE TABLE {DB}.drv_rows (driver VARCHAR(32), id INT, v TEXT)")
        state = tmp_path_factory.mktemp("hd-state")
        state.chmod(0o700)
        edge = EdgeProc(state).start()
        t = edge.hd("tunnel", "create", "vpc-my")
        edge.hd("tunnel", "route", "vpc-my", HOST, "--service", f"tcp://127.0.0.1:{db.port}")
        tok = edge.hd("access", "service-token", "create", "hyperdrive-vpc-my")
        edge.hd("access", "app", "create", "vpc-my-db", "--domain", HOST, "--service-token", "hyperdrive-vpc-my")
        ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
        config = edge.hd("hyperdrive", "create", "mysql-drivers", "--origin-scheme", "mysql",
                         "--origin-host", HOST, "--database", DB, "--origin-user", ORIGIN_USER,
                         "--origin-password", ORIGIN_PASSWORD, "--origin-connection-limit", "10",
                         "--access-client-id", tok["client_id"], "--access-client-secret", tok["client_secret"])
        assert config["connection_string"].startswith("mysql://"), config
        yield Stack(db, edge, config, tok)
    finally:
        if edge is not None:
            edge.stop_children()
            edge.stop()
        db.stop()


# ------------------------------------------------------------------------------------ PyMySQL

def test_pymysql_queries_transactions_errors_and_large_results(stack):
    c = stack.connect()  # TLS, the edge verified
    try:
        cur = c.cursor()
        cur.execute("SELECT 1 + 1, %s, %s", (42, "it's \"quoted\""))
        assert cur.fetchall() == ((2, 42, "it's \"quoted\""),)
        cur.execute("DELETE FROM drv_rows WHERE driver = 'pymysql'")
        c.commit()
        c.begin()
        cur.execute("INSERT INTO drv_rows VALUES ('pymysql', 1, %s)", ("rolled back",))
        c.rollback()
        c.begin()
        cur.execute("INSERT INTO drv_rows VALUES ('pymysql', 2, %s)", ("kept",))
        c.commit()
        cur.execute("SELECT id, v FROM drv_rows WHERE driver = 'pymysql' ORDER BY id")
        assert cur.fetchall() == ((2, "kept"),)
        with pytest.raises(pymysql.err.ProgrammingError) as err:
            cur.execute("SELECT * FROM no_such_table")
        assert err.value.args[0] == 1146  # the origin's own error, unchanged
        cur.execute("SELECT REPEAT('x', %s)", (BIG,))
        assert len(cur.fetchone()[0]) == BIG
        cur.execute("SELECT 'still usable'")
        assert cur.fetchone() == ("still usable",)
    finally:
        c.close()


def test_pymysql_in_plaintext_on_loopback(stack):
    c = stack.connect(ssl_disabled=True)  # allowed on a loopback listener (hd edge --client-tls allow)
    try:
        cur = c.cursor()
        cur.execute("SELECT 'plaintext'")
        assert cur.fetchone() == ("plaintext",)
    finally:
        c.close()


def test_refusals_say_what_to_do_and_keep_the_connection(stack):
    c = stack.connect(ssl_disabled=True)
    try:
        cur = c.cursor()
        cases = {
            "USE mysql": "USE is not supported",
            "SELECT 1; SELECT 2": "multi-statement",
        }
        for sql, words in cases.items():
            with pytest.raises(pymysql.err.MySQLError) as err:
                cur.execute(sql)
            assert words in str(err.value), (sql, err.value)
        with pytest.raises(pymysql.err.MySQLError) as err:
            c.select_db("mysql")  # COM_INIT_DB
        assert "COM_INIT_DB" in str(err.value)
        # A query that is not UTF-8 (raw bytes): refused, not passed on.
        c._execute_command(3, b"SELECT '\xff\xfe'")  # noqa: SLF001 - raw COM_QUERY
        with pytest.raises(pymysql.err.MySQLError) as err:
            c._read_query_result()
        assert err.value.args[0] == 1300, err.value
        cur.execute("SELECT 'usable'")
        assert cur.fetchone() == ("usable",)
    finally:
        c.close()


# ------------------------------------------------------------------------------------ mysql2

def test_mysql2_from_node(stack):
    node = shutil.which("node")
    assert node, "node is needed for the mysql2 tests"
    r = subprocess.run([node, str(NODE_DIR / "mysql_drivers.mjs"), stack.dsn], cwd=NODE_DIR,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["basic"] == {"two": 2, "echoed": 42, "quoted": "it's"}
    assert out["transaction"] == [[2, "kept"]]
    assert not out["error"]["ok"] and out["error"]["code"] == 1146
    assert out["large"] == BIG
    assert not out["prepared"]["ok"] and "prepared statements" in out["prepared"]["message"]
    assert not out["use"]["ok"] and "USE is not supported" in out["use"]["message"]
    assert not out["multi"]["ok"] and "multi-statement" in out["multi"]["message"]
    assert out["usable"] == 7


# ------------------------------------------------------------------------------------ mariadb CLI

def test_mariadb_command_line_client(stack):
    cli = shutil.which("mariadb") or shutil.which("mysql")
    assert cli, "the mariadb client is needed"
    u = urlsplit(stack.dsn)
    base = [cli, "-h", u.hostname, "-P", str(u.port), "-u", unquote(u.username or ""),
            f"--password={unquote(u.password or '')}", f"--ssl-ca={stack.ca}", "--ssl-verify-server-cert",
            "--batch", "--skip-column-names",
            u.path.lstrip("/")]
    r = subprocess.run(base + ["-e", "SELECT 6 * 7"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    r = subprocess.run(base + ["-e", "SELECT * FROM no_such_table"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "1146" in r.stderr
    # A transaction rolled back, a 10 MB value, all in one session.
    script = ("DELETE FROM drv_rows WHERE driver = 'cli'; START TRANSACTION; "
              "INSERT INTO drv_rows VALUES ('cli', 1, 'gone'); ROLLBACK; "
              "SELECT COUNT(*) FROM drv_rows WHERE driver = 'cli'; "
              f"SELECT LENGTH(REPEAT('y', {BIG}));")
    r = subprocess.run(base, input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", str(BIG)]
    # The client's own `use` command is COM_INIT_DB: refused with the reason, session usable.
    r = subprocess.run(base + ["--force"], input="use mysql;\nSELECT 'after use';\n", capture_output=True,
                       text=True, timeout=30)
    assert "COM_INIT_DB" in r.stderr, r.stderr
    assert "after use" in r.stdout


# ------------------------------------------------------------------------------------ load

def test_100_concurrent_clients_against_a_limit_of_10(stack):
    peak = {"n": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["n"] = max(peak["n"], stack.db.connection_count(ORIGIN_USER))
            time.sleep(0.05)

    errors: list[str] = []
    done = []

    def client(i: int) -> None:
        try:
            c = stack.connect(ssl_disabled=True)
            try:
                cur = c.cursor()
                for j in range(5):
                    cur.execute("SELECT %s, SLEEP(0.02)", (i * 100 + j,))
                    assert cur.fetchone()[0] == i * 100 + j
                done.append(i)
            finally:
                c.close()
        except Exception as exc:  # collected and asserted below
            errors.append(f"{i}: {exc!r}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join(5)
    assert not errors, errors[:5]
    assert len(done) == 100
    assert 1 <= peak["n"] <= 10 + 2, peak  # the limit plus a small margin (reset in flight)


# ------------------------------------------------------------------------------------ caching

def _origin_selects(stack: Stack) -> int:
    rows = stack.db.query("SHOW GLOBAL STATUS LIKE 'Com_select'")
    return int(rows[0][1])


def test_reads_are_cached_volatile_ones_are_not_and_writes_invalidate(stack):
    stack.db.query(f"CREATE TABLE IF NOT EXISTS {DB}.drv_cache (id INT PRIMARY KEY, v INT)")
    stack.db.query(f"REPLACE INTO {DB}.drv_cache VALUES (1, 10)")
    # autocommit on: with PyMySQL's default (off) every statement is in a transaction, never cached
    c = stack.connect(ssl_disabled=True, autocommit=True)
    try:
        cur = c.cursor()
        read = "SELECT SUM(v) FROM drv_cache WHERE id < 100"
        before = _origin_selects(stack)
        cur.execute(read)
        assert cur.fetchone()[0] == 10
        cur.execute(read)  # a hit: the origin does not see it
        assert cur.fetchone()[0] == 10
        cur.execute("SELECT  SUM(v)   FROM drv_cache WHERE id < 100 /* same statement */")
        assert cur.fetchone()[0] == 10
        assert _origin_selects(stack) - before == 1
        # Volatile functions go to the origin every time.
        before = _origin_selects(stack)
        for _ in range(2):
            cur.execute("SELECT NOW(6), RAND()")
            cur.fetchall()
        assert _origin_selects(stack) - before == 2
        # A write through the proxy drops the cached read: the next one sees it at once.
        cur.execute("UPDATE drv_cache SET v = 32 WHERE id = 1")
        c.commit()
        cur.execute(read)
        assert cur.fetchone()[0] == 32
        # Inside a transaction nothing is served from the cache.
        before = _origin_selects(stack)
        c.begin()
        cur.execute(read)
        assert cur.fetchone()[0] == 32
        c.commit()
        assert _origin_selects(stack) - before == 1
    finally:
        c.close()
    metrics = stack.edge.hd("hyperdrive", "metrics", stack.config["id"])
    by_status = metrics["queries"]["by_cache_status"]
    assert by_status["hit"] >= 2 and by_status["miss"] >= 2 and by_status["volatile"] >= 2, by_status


# ------------------------------------------------------------------------------------ session state

def test_session_state_never_reaches_the_next_client(stack):
    """SET, user variables, sql_mode, temporary tables and user locks stay with the client that
    made them (carried or pinned) and never reach the next client: the pooled connection is reset
    or brought to the next client's settings before anyone else uses it."""
    a = stack.connect(ssl_disabled=True)
    try:
        cur = a.cursor()
        cur.execute("SET @x = 5")
        cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES'")
        cur.execute("CREATE TEMPORARY TABLE tmp_leak (i INT)")
        cur.execute("SELECT GET_LOCK('hd-test-lock', 0)")
        assert cur.fetchone() == (1,)
    finally:
        a.close()
    seen = []
    for _ in range(12):  # more than the pool's connections: every one gets checked
        b = stack.connect(ssl_disabled=True)
        try:
            cur = b.cursor()
            cur.execute("SELECT @x, @@SESSION.sql_mode LIKE '%ANSI_QUOTES%', IS_USED_LOCK('hd-test-lock') IS NULL")
            seen.append(cur.fetchone())
            with pytest.raises(pymysql.err.ProgrammingError) as err:  # the temporary table is gone
                cur.execute("SELECT * FROM tmp_leak")
            assert err.value.args[0] == 1146
        finally:
            b.close()
    assert all(row == (None, 0, 1) for row in seen), seen


def test_stale_while_revalidate_and_coalesced_misses(stack):
    """A stale entry within swr is served at once while one background query refreshes it; ten
    identical concurrent misses reach the origin once."""
    stack.db.query(f"CREATE TABLE IF NOT EXISTS {DB}.drv_swr (id INT PRIMARY KEY, v INT)")
    stack.db.query(f"REPLACE INTO {DB}.drv_swr VALUES (1, 1)")
    cfg = stack.edge.hd("hyperdrive", "create", "mysql-swr", "--origin-scheme", "mysql",
                        "--origin-host", HOST, "--database", DB, "--origin-user", ORIGIN_USER,
                        "--origin-password", ORIGIN_PASSWORD, "--max-age", "1", "--swr", "60",
                        "--access-client-id", stack.token["client_id"],
                        "--access-client-secret", stack.token["client_secret"])
    swr = Stack(stack.db, stack.edge, cfg, stack.token)
    c = swr.connect(ssl_disabled=True, autocommit=True)
    try:
        cur = c.cursor()
        read = "SELECT v FROM drv_swr WHERE id = 1"
        cur.execute(read)
        assert cur.fetchone() == (1,)
        stack.db.query(f"UPDATE {DB}.drv_swr SET v = 2 WHERE id = 1")  # behind the proxy's back
        time.sleep(1.3)  # now stale (max_age 1 s), within swr
        before = _origin_selects(stack)
        cur.execute(read)
        assert cur.fetchone() == (1,)  # the stale answer, at once ...
        deadline = time.monotonic() + 60  # hang guard
        while _origin_selects(stack) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _origin_selects(stack) - before == 1  # ... and one refresh in the background
        cur.execute(read)
        assert cur.fetchone() == (2,)  # the refreshed entry
    finally:
        c.close()

    # Coalescing: a slow deterministic read sent by ten clients at once.
    slow = "SELECT COUNT(*) FROM drv_rows a, drv_rows b, drv_rows c, (SELECT 1 UNION ALL SELECT 2) d"
    stack.db.query("INSERT INTO drv_rows SELECT 'fill', seq, 'x' FROM seq_1_to_250", database=DB)
    results: list[object] = []
    barrier = threading.Barrier(10)

    def one() -> None:
        conn = swr.connect(ssl_disabled=True, autocommit=True)
        try:
            cur = conn.cursor()
            barrier.wait(10)
            cur.execute(slow)
            results.append(cur.fetchone()[0])
        finally:
            conn.close()

    # Slow enough that all ten are in flight together: without coalescing each would be a miss.
    t0 = time.monotonic()
    stack.db.query(slow, database=DB)
    assert time.monotonic() - t0 > 0.3, "the query must be slow for this test to mean anything"
    before = _origin_selects(stack)
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 10 and len(set(results)) == 1, results
    assert _origin_selects(stack) - before == 1



def test_a_view_over_a_volatile_function_is_not_cached(stack):
    """Nothing in `SELECT t FROM v_now` shows that the view calls NOW(): reads of views are not
    cached, and a view created through the proxy is seen at once."""
    c = stack.connect(ssl_disabled=True, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("CREATE OR REPLACE VIEW v_now AS SELECT NOW(6) AS t, v FROM drv_cache")
        before = _origin_selects(stack)
        seen = set()
        for _ in range(3):
            cur.execute("SELECT t FROM v_now WHERE v > 0")
            seen.add(cur.fetchone()[0])
            time.sleep(0.01)
        assert _origin_selects(stack) - before == 3 and len(seen) == 3, seen
    finally:
        c.close()


# ------------------------------------------------------------------------------------ vanished clients

def test_a_vanished_clients_statement_is_killed_through_the_tunnel(stack):
    """Clients that drop their socket while `SELECT SLEEP(120)` runs: the statements are killed at
    the origin (the kill goes through the tunnel too) instead of sleeping on."""
    def sleeping() -> int:
        return sum(1 for c in stack.db.connections(ORIGIN_USER) if (c["info"] or "").startswith("SELECT SLEEP"))

    conns = []
    for _ in range(3):
        c = stack.connect(ssl_disabled=True, autocommit=True)
        c._execute_command(3, "SELECT SLEEP(120)")  # noqa: SLF001 - the reply is never read
        conns.append(c)
    deadline = time.monotonic() + 60  # hang guard
    while sleeping() < 3:
        assert time.monotonic() < deadline, "the SLEEPs did not start"
        time.sleep(0.05)
    for c in conns:
        c._sock.shutdown(socket.SHUT_RDWR)  # noqa: SLF001 - gone without COM_QUIT
        c._sock.close()  # noqa: SLF001
    deadline = time.monotonic() + 60  # well before the 120 s SLEEPs would end on their own
    while sleeping():
        assert time.monotonic() < deadline, "the SLEEPs of the vanished clients still run at the origin"
        time.sleep(0.05)
