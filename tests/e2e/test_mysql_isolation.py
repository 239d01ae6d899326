"""MySQL isolation through the proxy (issue 12), judged at the origin, with PyMySQL in its DEFAULT
mode (autocommit off: it sends `SET AUTOCOMMIT = 0` at connect) and the mysql2 tests in
tests/node/mysql_isolation.mjs (default mode too: autocommit on, collation utf8mb4_unicode_ci).

One stack per module (tests/harness/mysql_proxy.py): a throwaway MariaDB, a real `hd edge`, mysql
configs reaching MariaDB directly. Every case listed for MySQL in the issue has a test here that
fails on the code before the session model (see each docstring).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pymysql
import pytest

from tests.harness.mariadb import ROOT_PASSWORD
from tests.harness.mysql_proxy import DB, ORIGIN_PASSWORD, ORIGIN_USER, MySQLProxyStack
from tests.harness.procs import poll_until

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
NEXT_CLIENTS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = MySQLProxyStack(tmp_path_factory.mktemp("hd-mysql-iso") / "state")
    s.start()
    try:
        s.db.query(f"CREATE TABLE {DB}.iso (id INT AUTO_INCREMENT PRIMARY KEY, who VARCHAR(40), v TEXT) ENGINE=InnoDB")
        s.db.query(f"CREATE TABLE {DB}.one (i INT) ENGINE=InnoDB")
        s.db.query(f"INSERT INTO {DB}.one VALUES (1)")
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _edge_logs_on_failure(request, stack):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and stack.edge is not None:
        print(f"\n===== edge =====\n{stack.edge.diagnostics(120)}")


def rows_of(stack: MySQLProxyStack, who: str) -> int:
    return int(stack.db.query(f"SELECT COUNT(*) FROM {DB}.iso WHERE who = %s", (who,))[0][0])


# ------------------------------------------------------------------------------ autocommit off

def test_pymysql_default_rollback_leaves_nothing_at_the_origin(stack):
    """PyMySQL's default is autocommit off. Before: `SET AUTOCOMMIT = 0` did not open a
    transaction, the connection went back to the pool (reset: autocommit on) and the INSERT ran on
    another connection in autocommit mode — rollback() left the row."""
    cfg = stack.config("iso-ac", limit=5)
    c = stack.connect(cfg)
    try:
        assert c.get_autocommit() is False
        cur = c.cursor()
        cur.execute("INSERT INTO iso (who, v) VALUES ('rb', 'x')")
        cur.execute("INSERT INTO iso (who, v) VALUES ('rb', 'y')")
        assert rows_of(stack, "rb") == 0  # not committed: invisible at the origin
        c.rollback()
        assert rows_of(stack, "rb") == 0
        cur.execute("SELECT @@autocommit")
        assert cur.fetchone() == (0,)  # still off, as on a direct connection
        cur.execute("INSERT INTO iso (who, v) VALUES ('rb-commit', 'z')")
        c.commit()
        assert rows_of(stack, "rb-commit") == 1
    finally:
        c.close()


def test_the_status_flags_match_a_direct_connection(stack):
    """SERVER_STATUS_AUTOCOMMIT and IN_TRANS as the client sees them (PyMySQL keeps the last ones)."""
    cfg = stack.config("iso-ac", limit=5)
    seen = {}
    for name, conn in (("direct", stack.direct()), ("proxy", stack.connect(cfg))):
        try:
            cur = conn.cursor()
            flags = []
            for sql in ("SELECT 1", "INSERT INTO iso (who) VALUES ('flags')", "SELECT COUNT(*) FROM one",
                        "ROLLBACK", "SET autocommit = 1", "SELECT 2", "BEGIN", "SELECT 3", "COMMIT"):
                cur.execute(sql)
                cur.fetchall()
                flags.append(conn.server_status & 0x0003)  # IN_TRANS | AUTOCOMMIT
            conn.ping(reconnect=False)
            flags.append(conn.server_status & 0x0003)
            seen[name] = flags
        finally:
            conn.close()
    assert seen["proxy"] == seen["direct"], seen
    assert rows_of(stack, "flags") == 0


def _run_child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


_INSERT_THEN_WAIT = """
    import sys, time, pymysql
    from urllib.parse import urlsplit, unquote
    u = urlsplit(sys.argv[1])
    c = pymysql.connect(host=u.hostname, port=u.port, user=unquote(u.username), password=unquote(u.password),
                        database=u.path.lstrip('/'), connect_timeout=10)   # DEFAULT: autocommit off
    cur = c.cursor()
    cur.execute("INSERT INTO iso (who, v) VALUES (%s, 'never committed')", (sys.argv[2],))
    cur.execute("SELECT CONNECTION_ID()")
    print(cur.fetchone()[0], flush=True)
    time.sleep(600)
"""


def test_a_killed_client_leaves_nothing(stack):
    """A PyMySQL process killed (SIGKILL) before commit: its INSERT is rolled back at the origin,
    and the origin connection is clean for the next client. Before: the INSERT had run in
    autocommit mode on another connection and stayed."""
    cfg = stack.config("iso-ac", limit=5)
    child = _run_child(_INSERT_THEN_WAIT, cfg["connection_string"], "killed")
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), child.stderr.read()
        thread = int(line)
        # the transaction is open at the origin, on the connection the child holds
        poll_until(lambda: any(s["id"] == thread for s in stack.origin_sessions()), 10, what="the child's session")
        assert rows_of(stack, "killed") == 0
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)
    # The proxy rolled back (reset) the connection: the row never appears; the connection is reused.
    c = stack.connect(cfg, autocommit=True)
    try:
        cur = c.cursor()

        def reused() -> bool:
            cur.execute("SELECT CONNECTION_ID(), @@in_transaction")
            return cur.fetchone() == (thread, 0)

        poll_until(reused, 10, what="the killed client's origin connection to be clean and reused")
    finally:
        c.close()
    assert rows_of(stack, "killed") == 0


def test_a_socket_closed_without_quit_leaves_nothing(stack):
    """The socket under a PyMySQL connection closed without COM_QUIT, mid-transaction."""
    cfg = stack.config("iso-ac", limit=5)
    c = stack.connect(cfg)
    cur = c.cursor()
    cur.execute("INSERT INTO iso (who, v) VALUES ('dropped', 'x')")
    cur.execute("SELECT CONNECTION_ID()")
    thread = cur.fetchone()[0]
    c._sock.shutdown(socket.SHUT_RDWR)  # noqa: SLF001 - the socket goes, no COM_QUIT, no ROLLBACK
    c._sock.close()  # noqa: SLF001
    assert rows_of(stack, "dropped") == 0

    def rolled_back() -> bool:
        rows = [s for s in stack.origin_sessions() if s["id"] == thread]
        return not rows or rows[0]["command"] == "Sleep"

    poll_until(rolled_back, 10, what="the dropped client's connection to be idle")
    d = stack.connect(cfg, autocommit=True)
    try:
        cur = d.cursor()
        cur.execute("SELECT COUNT(*) FROM iso WHERE who = 'dropped'")
        assert cur.fetchone() == (0,)
    finally:
        d.close()
    assert rows_of(stack, "dropped") == 0


# ------------------------------------------------------------------------------ state never leaks

STATE_SETTERS = [
    "SET @leak = 'secret'",
    "SET SESSION time_zone = '+05:00'",
    "SET SESSION sql_mode = 'ANSI_QUOTES,NO_BACKSLASH_ESCAPES'",
    "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
    "CREATE TEMPORARY TABLE tmp_leak (i INT)",
    "SELECT GET_LOCK('hd-iso-lock', 0)",
    "SET autocommit = 0",
    "SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "INSERT INTO iso (who, v) VALUES ('setter', 'lid')",
]
PROBE = ("SELECT CONNECTION_ID(), @leak, @@time_zone, @@sql_mode, @@collation_connection, "
         "IS_FREE_LOCK('hd-iso-lock'), @@autocommit, @@tx_isolation, LAST_INSERT_ID() FROM one")
CLEAN = (None, "SYSTEM", "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION",
         "utf8mb4_general_ci", 1, 1, "REPEATABLE-READ", 0)


def test_state_set_by_one_client_is_never_seen_by_the_next_20_on_the_same_origin_connection(stack):
    """A PyMySQL client (default mode) sets a user variable, session variables, sql_mode, a
    collation, a temporary table, a user lock, autocommit off, an isolation level and
    LAST_INSERT_ID(); then the next clients of the config that get the same origin connection
    (CONNECTION_ID(), checked in PROCESSLIST) see none of it. Before: a reset dropped them for the
    setter (silently), and the setter's autocommit-off INSERTs ran unseen in autocommit mode."""
    cfg = stack.config("iso-leak", limit=5)
    a = stack.connect(cfg)
    cur = a.cursor()
    for sql in STATE_SETTERS:
        cur.execute(sql)
        cur.fetchall()
    a.commit()
    # the setter keeps all of it (carried or pinned) across its transactions
    cur.execute(PROBE)
    thread, *mine = cur.fetchone()
    assert mine[:6] == ["secret", "+05:00", "NO_BACKSLASH_ESCAPES,ANSI_QUOTES", "utf8mb4_bin", 0, 0] or \
        mine[:6] == ["secret", "+05:00", "ANSI_QUOTES,NO_BACKSLASH_ESCAPES", "utf8mb4_bin", 0, 0], mine
    assert mine[6] == "SERIALIZABLE" and mine[7] > 0, mine
    cur.execute("SELECT COUNT(*) FROM tmp_leak")
    a.commit()
    assert thread in [s["id"] for s in stack.origin_sessions()]
    a.close()

    served: list[int] = []
    attempts = 0
    while len(served) < NEXT_CLIENTS:
        attempts += 1
        assert attempts <= 3 * NEXT_CLIENTS, f"only {len(served)} of the next clients got thread {thread}"
        b = stack.connect(cfg, autocommit=True)
        try:
            cur = b.cursor()
            cur.execute(PROBE)
            got_thread, *state = cur.fetchone()
            assert tuple(state) == CLEAN, (got_thread, state)
            with pytest.raises(pymysql.err.ProgrammingError) as err:
                cur.execute("SELECT * FROM tmp_leak")
            assert err.value.args[0] == 1146
            # autocommit is on for this client: its write is committed at once
            cur.execute("INSERT INTO iso (who, v) VALUES ('next', %s)", (str(got_thread),))
            if got_thread == thread:
                served.append(got_thread)
        finally:
            b.close()
        if got_thread != thread:
            # The setter's connection was still being reset and another served: take that one
            # away at the origin, so that the next client gets the setter's.
            _kill_quietly(stack, got_thread)
    assert rows_of(stack, "next") == attempts
    assert thread in [s["id"] for s in stack.origin_sessions()]  # an origin thread id, still the same one


def _kill_quietly(stack: MySQLProxyStack, thread: int) -> None:
    try:
        stack.db.query(f"KILL CONNECTION {int(thread)}")
    except pymysql.err.MySQLError:
        pass  # gone already


def test_mysql2_default_mode(stack):
    """mysql2 in its default mode (autocommit on, collation utf8mb4_unicode_ci): rollback and a
    killed process leave nothing, a direct connection's collation answers, state never reaches
    the next 20 clients on the same origin connection (tests/node/mysql_isolation.mjs)."""
    node = shutil.which("node")
    assert node, "node is needed for the mysql2 tests"
    cfg = stack.config("iso-node", limit=5)
    direct = f"mysql://{ORIGIN_USER}:{ORIGIN_PASSWORD}@127.0.0.1:{stack.db.port}/{DB}"
    root = f"mysql://root:{ROOT_PASSWORD}@127.0.0.1:{stack.db.port}/"
    r = subprocess.run([node, str(NODE_DIR / "mysql_isolation.mjs"), cfg["connection_string"], direct,
                        str(NEXT_CLIENTS), root], cwd=NODE_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["collation"]["proxy"] == out["collation"]["direct"], out["collation"]
    assert out["collation"]["proxy"]["coll"] == "utf8mb4_unicode_ci"
    assert out["version"]["proxy"] == out["version"]["direct"]
    assert out["rolled_back"] == 0 and rows_of(stack, "node-rb") == 0
    assert out["setter_thread"] and len(out["next"]) >= NEXT_CLIENTS, out
    for probe in out["next"]:
        assert probe["state"] == {"leak": None, "tz": "SYSTEM", "coll": "utf8mb4_unicode_ci", "lock": 1,
                                  "ac": 1, "lid": 0}, probe
        assert probe["tmp"] == 1146, probe
    assert sum(1 for p in out["next"] if p["thread"] == out["setter_thread"]) >= NEXT_CLIENTS
    # The killed node process (SIGKILL mid-transaction): rolled back, its connection reused.
    poll_until(lambda: all(s["command"] == "Sleep" for s in stack.origin_sessions() if s["id"] == out["killed_thread"]),
               10, what="the killed client's origin connection to be idle")
    assert rows_of(stack, "node-killed") == 0


# ------------------------------------------------------------------------------ character sets

@pytest.mark.parametrize("collation", ["utf8mb4_general_ci", "utf8mb4_unicode_ci", "utf8mb4_bin", "utf8mb4_unicode_520_ci"])
def test_the_login_collation_gives_a_direct_connections_answers(stack, collation):
    """PyMySQL's `collation=` (the handshake's charset id). Before: ignored ('ß' = 'ss' was 0
    for utf8mb4_unicode_ci, where MariaDB says 1)."""
    cfg = stack.config("iso-cs", limit=5)
    q = "SELECT 'ß' = 'ss', 'Å' = 'A', 'a' = 'A', @@collation_connection, @@character_set_results"
    answers = []
    for conn in (stack.direct(collation=collation, autocommit=True), stack.connect(cfg, collation=collation, autocommit=True)):
        try:
            cur = conn.cursor()
            cur.execute(q)
            first = cur.fetchone()
            cur.execute(q)  # and again (the connection went back to the pool in between)
            answers.append((first, cur.fetchone()))
        finally:
            conn.close()
    assert answers[0] == answers[1], answers
    assert answers[1][0][3] == collation


def test_set_names_is_carried_and_other_charsets_are_refused(stack):
    """SET NAMES / collation_connection (UTF-8) last for the session, across connections; latin1
    and friends are refused with an error, never answered OK and undone."""
    cfg = stack.config("iso-cs", limit=5)
    c = stack.connect(cfg, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("SET NAMES utf8mb4 COLLATE utf8mb4_bin")
        for _ in range(3):
            cur.execute("SELECT 'a' = 'A', @@collation_connection")
            assert cur.fetchone() == (0, "utf8mb4_bin")
        cur.execute("SET collation_connection = utf8mb4_unicode_ci")
        cur.execute("SELECT 'ß' = 'ss', @@collation_connection")
        assert cur.fetchone() == (1, "utf8mb4_unicode_ci")
        for sql in ("SET NAMES latin1", "SET character_set_results = latin1", "SET character_set_client = 'cp1251'",
                    "SET CHARACTER SET latin1", "SET collation_connection = latin1_swedish_ci",
                    "SET character_set_results = NULL"):
            with pytest.raises(pymysql.err.MySQLError) as err:
                cur.execute(sql)
            assert err.value.args[0] == 1235 and "UTF-8" in err.value.args[1], (sql, err.value)
        cur.execute("SELECT @@character_set_results, @@collation_connection")
        assert cur.fetchone() == ("utf8mb4", "utf8mb4_unicode_ci")
    finally:
        c.close()


# ------------------------------------------------------------------------------ greeting, KILL

def test_the_greeting_presents_the_origins_version(stack):
    """Before: `8.0.0-hd-proxy` while the origin is MariaDB."""
    cfg = stack.config("iso-ac", limit=5)
    d, p = stack.direct(), stack.connect(cfg)
    try:
        assert p.get_server_info() == d.get_server_info()
        assert "MariaDB" in p.get_server_info()
    finally:
        d.close()
        p.close()


def _sleeper(stack: MySQLProxyStack, cfg: dict, result: dict, sql: str = "SELECT SLEEP(120)") -> tuple[pymysql.Connection, threading.Thread]:
    c = stack.connect(cfg, autocommit=True)

    def run() -> None:
        t0 = time.monotonic()
        try:
            with c.cursor() as cur:
                cur.execute(sql)
                result["rows"] = cur.fetchall()
        except Exception as exc:  # noqa: BLE001 - looked at by the test
            result["error"] = exc
        result["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return c, t


def _sleeping(stack: MySQLProxyStack) -> list[dict]:
    return [s for s in stack.origin_sessions() if (s["info"] or "").startswith("SELECT SLEEP")]


@pytest.mark.parametrize("how", ["greeting-id", "connection-id", "com-process-kill"])
def test_kill_query_reaches_the_origin_connection_the_session_holds(stack, how):
    """`KILL QUERY <id>` from another client (what the mysql CLI sends on Ctrl-C, with the id of
    its greeting) stops the statement at the origin. Before: the greeting's id meant nothing
    (KILL went to the origin as is: unknown thread, or someone else's)."""
    cfg = stack.config("iso-kill", limit=5)
    result: dict = {}
    victim, thread = _sleeper(stack, cfg, result)
    killer = stack.connect(cfg, autocommit=True)
    try:
        poll_until(lambda: len(_sleeping(stack)) == 1, 60, what="the SLEEP to run at the origin")
        origin_thread = _sleeping(stack)[0]["id"]
        kcur = killer.cursor()
        if how == "greeting-id":
            kcur.execute(f"KILL QUERY {victim.thread_id()}")
        elif how == "connection-id":
            kcur.execute(f"KILL QUERY {origin_thread}")  # what CONNECTION_ID() showed the victim
        else:
            killer.kill(victim.thread_id())  # COM_PROCESS_KILL: kills the connection
        thread.join(90)
        assert not thread.is_alive()
        assert result["seconds"] < 60, result  # stopped, not run to its 120 s end (generous for a busy box)
        if how == "com-process-kill":
            assert "error" in result, result
        else:
            # SLEEP interrupted: MariaDB answers 1317 (query interrupted), the session goes on
            assert isinstance(result.get("error"), pymysql.err.OperationalError) and \
                result["error"].args[0] == 1317, result
            with victim.cursor() as cur:
                cur.execute("SELECT 'alive'")
                assert cur.fetchone() == ("alive",)
        poll_until(lambda: not _sleeping(stack), 60, what="no SLEEP at the origin")
        # an id the proxy does not know: as MariaDB says it
        with pytest.raises(pymysql.err.MySQLError) as err:
            kcur.execute("KILL QUERY 999999")
        assert err.value.args[0] == 1094
        with pytest.raises(pymysql.err.MySQLError) as err:
            kcur.execute("KILL USER app")  # would kill every client of the origin user: refused
        assert err.value.args[0] == 1235
    finally:
        killer.close()
        try:
            victim.close()
        except Exception:  # noqa: BLE001 - killed
            pass


def test_ctrl_c_in_the_mariadb_cli_kills_the_query(stack):
    """The `mariadb` client on Ctrl-C opens a second connection and sends `KILL QUERY <the id its
    greeting gave>`. Before: that id meant nothing at the origin and the SLEEP ran on."""
    cli = shutil.which("mariadb") or shutil.which("mysql")
    assert cli, "the mariadb client is needed"
    cfg = stack.config("iso-kill", limit=5)
    a = stack.args(cfg)
    p = subprocess.Popen([cli, "-h", a["host"], "-P", str(a["port"]), "-u", a["user"], f"--password={a['password']}",
                          "--skip-ssl", a["database"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        p.stdin.write("SELECT SLEEP(120);\n")
        p.stdin.flush()
        poll_until(lambda: len(_sleeping(stack)) == 1, 60, what="the CLI's SLEEP at the origin")
        p.send_signal(signal.SIGINT)
        poll_until(lambda: not _sleeping(stack), 60, what="the SLEEP to be killed")  # well before its 120 s end
        out, err = p.communicate(input="", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert "query killed" in out + err and "1317" in err, (out, err)


def test_kill_of_another_configs_session_is_refused(stack):
    a_cfg, b_cfg = stack.config("iso-kill", limit=5), stack.config("iso-kill-other", limit=5)
    a, b = stack.connect(a_cfg, autocommit=True), stack.connect(b_cfg, autocommit=True)
    try:
        with pytest.raises(pymysql.err.MySQLError) as err:
            b.cursor().execute(f"KILL {a.thread_id()}")
        assert err.value.args[0] == 1095
        with a.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------ vanished clients

class _Peak:
    """The most origin sessions of the origin user seen while it runs (polled from PROCESSLIST)."""

    def __init__(self, stack: MySQLProxyStack) -> None:
        self.stack, self.n, self.stop = stack, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.n = max(self.n, self.stack.origin_count())
            self.stop.wait(0.02)

    def __enter__(self) -> "_Peak":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def _drop(c: pymysql.Connection) -> None:
    c._sock.shutdown(socket.SHUT_RDWR)  # noqa: SLF001 - gone without COM_QUIT
    c._sock.close()  # noqa: SLF001


def test_clients_that_drop_their_socket_mid_statement_do_not_exceed_the_limit(stack):
    """31 clients, one after the other, start `SELECT SLEEP(120)` through a config limited to 5 and
    drop their socket once it runs at the origin. Each statement is killed at the origin, and its
    connection counts against the limit until the origin let it go: never more than 5 (+1 for the
    kill) sessions of the origin user. Before: the proxy forgot each connection at once and opened
    another; 31 sessions slept at the origin."""
    cfg = stack.config("iso-vanish", limit=5)
    baseline = stack.origin_count()  # other configs' idle connections (same origin user)
    with _Peak(stack) as peak:
        for i in range(31):
            c = stack.connect(cfg, autocommit=True)
            tag = f"/* hd-vanish-{i} */"
            c._execute_command(3, f"SELECT SLEEP(120) {tag}")  # noqa: SLF001 - sent, reply never read
            poll_until(lambda: any(tag in (s["info"] or "") for s in stack.origin_sessions()), 60,
                       what=f"client {i}'s SLEEP to run at the origin")
            _drop(c)
        poll_until(lambda: not _sleeping(stack), 60, what="no SLEEP left at the origin")  # before their 120 s end
    assert peak.n - baseline <= 5 + 1, (peak.n, baseline)
    assert len(stack.origin_sessions()) - baseline <= 5


def test_a_burst_of_vanishing_clients_is_killed_and_drained(stack):
    """31 clients send `SELECT SLEEP(120)` at once against a limit of 5 (26 wait for a connection)
    and all drop their sockets: the 5 running statements are killed, the 26 waiting ones never
    reach the origin, and the limit holds throughout."""
    cfg = stack.config("iso-burst", limit=5)
    baseline = stack.origin_count()
    with _Peak(stack) as peak:
        socks = []
        for _ in range(31):
            c = stack.connect(cfg, autocommit=True)
            c._execute_command(3, "SELECT SLEEP(120)")  # noqa: SLF001
            socks.append(c)
        poll_until(lambda: len(_sleeping(stack)) >= 5, 60, what="five SLEEPs at the origin")
        for c in socks:
            _drop(c)
        poll_until(lambda: not _sleeping(stack), 60, what="no SLEEP left at the origin")  # before their 120 s end
    assert peak.n - baseline <= 5 + 1, (peak.n, baseline)
    # and the config still works
    c = stack.connect(cfg, autocommit=True)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT 'after the burst'")
            assert cur.fetchone() == ("after the burst",)
    finally:
        c.close()


# ------------------------------------------------------------------------------ session state

def test_temporary_tables_user_variables_and_prepared_sql_stay_with_their_client(stack):
    """Before: each statement could run on another origin connection (and the one it ran on was
    reset): `CREATE TEMPORARY TABLE` and `SET @x` answered OK and were gone at the next statement."""
    cfg = stack.config("iso-state", limit=5)
    c = stack.connect(cfg, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("CREATE TEMPORARY TABLE tmp_mine (i INT)")
        cur.execute("INSERT INTO tmp_mine VALUES (1), (2)")
        cur.execute("SELECT COUNT(*) FROM tmp_mine")
        assert cur.fetchone() == (2,)
        cur.execute("SET @x = 40")
        cur.execute("SELECT @x := @x + 1")
        cur.execute("SELECT COUNT(*) INTO @n FROM tmp_mine")
        cur.execute("SELECT @x + 1, @n")
        assert cur.fetchone() == (42, 2)
        cur.execute("PREPARE s FROM 'SELECT ? * 2'")
        cur.execute("EXECUTE s USING @x")
        assert cur.fetchone() == (82,)
        cur.execute("SELECT CONNECTION_ID()")
        thread = cur.fetchone()[0]
        # another client takes connections meanwhile: this one keeps its own (pinned)
        other = stack.connect(cfg, autocommit=True)
        try:
            oc = other.cursor()
            oc.execute("SELECT CONNECTION_ID(), @x")
            other_thread, other_x = oc.fetchone()
            assert other_thread != thread and other_x is None
        finally:
            other.close()
        cur.execute("SELECT CONNECTION_ID(), @x, (SELECT COUNT(*) FROM tmp_mine)")
        assert cur.fetchone() == (thread, 41, 2)
    finally:
        c.close()


def test_session_variables_are_carried_to_another_origin_connection(stack):
    """`SET SESSION time_zone / sql_mode / TRANSACTION ISOLATION LEVEL` last for the session, on
    whichever origin connection runs the next statement. Before: lost after the statement."""
    cfg = stack.config("iso-state", limit=5)
    a = stack.connect(cfg, autocommit=True)
    b = stack.connect(cfg, autocommit=True)
    try:
        ac = a.cursor()
        ac.execute("SET SESSION time_zone = '+05:00', SESSION sql_mode = 'ANSI_QUOTES'")
        ac.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        ac.execute("SELECT CONNECTION_ID()")
        first = ac.fetchone()[0]
        bc = b.cursor()
        bc.execute("BEGIN")
        bc.execute("SELECT CONNECTION_ID(), @@time_zone FROM one")  # b now holds a's last connection
        assert bc.fetchone() == (first, "SYSTEM")
        ac.execute('SELECT CONNECTION_ID(), @@time_zone, @@sql_mode, @@tx_isolation, "i" FROM one')
        thread, tz, mode, iso, word = ac.fetchone()
        assert thread != first
        assert (tz, mode, iso) == ("+05:00", "ANSI_QUOTES", "READ-COMMITTED")
        assert word == 1  # "i" is a column name under ANSI_QUOTES
        bc.execute("ROLLBACK")
        ac.execute("SET sql_mode = DEFAULT")
        ac.execute("SELECT @@sql_mode LIKE '%ANSI_QUOTES%'")
        assert ac.fetchone() == (0,)
    finally:
        a.close()
        b.close()


def test_show_warnings_gives_the_last_statements_warnings(stack):
    """SHOW WARNINGS / SHOW ERRORS / @@warning_count after a statement: that statement's, as on a
    direct connection. Before: another origin connection answered (empty, or another client's)."""
    cfg = stack.config("iso-state", limit=5)
    script = ["SELECT CAST('abc' AS INT)", "SHOW WARNINGS", "SELECT @@warning_count", "SELECT 1",
              "SHOW WARNINGS", "SELECT * FROM no_such_table", "SHOW ERRORS", "SHOW COUNT(*) ERRORS",
              "SELECT i FROM one WHERE i = 1", "SHOW WARNINGS", "UPDATE one SET i = i WHERE i = 'x'",
              "SHOW WARNINGS", "SELECT @@warning_count, @@error_count"]
    answers = []
    for conn in (stack.direct(autocommit=True), stack.connect(cfg, autocommit=True)):
        got = []
        try:
            cur = conn.cursor()
            for sql in script:
                try:
                    cur.execute(sql)
                    got.append((sql, cur.fetchall(), conn._result.warning_count))  # noqa: SLF001
                except pymysql.err.MySQLError as exc:
                    got.append((sql, exc.args[0]))
        finally:
            conn.close()
        answers.append(got)
    assert answers[1] == answers[0]
    assert answers[1][1][1] == (("Warning", 1292, "Truncated incorrect INTEGER value: 'abc'"),)
    assert answers[1][11][1], answers[1][11]  # the UPDATE's warning


def test_last_insert_id_is_the_clients_own(stack):
    """LAST_INSERT_ID() is the session's: another client's inserts on the same origin connection
    never show, and a client's value follows it to another connection."""
    cfg = stack.config("iso-state", limit=5)
    a, b = stack.connect(cfg, autocommit=True), stack.connect(cfg, autocommit=True)
    try:
        ac, bc = a.cursor(), b.cursor()
        ac.execute("INSERT INTO iso (who) VALUES ('lid-a')")
        a_id = ac.lastrowid
        bc.execute("INSERT INTO iso (who) VALUES ('lid-b')")
        b_id = bc.lastrowid
        assert b_id > a_id
        ac.execute("SELECT LAST_INSERT_ID(), @@identity")
        assert ac.fetchone() == (a_id, a_id)
        bc.execute("SELECT LAST_INSERT_ID()")
        assert bc.fetchone() == (b_id,)
        ac.execute("INSERT INTO iso (who, v) VALUES ('lid-child', LAST_INSERT_ID())")
        ac.execute("SELECT v FROM iso WHERE id = LAST_INSERT_ID()")
        assert ac.fetchone() == (str(a_id),)
    finally:
        a.close()
        b.close()
    c = stack.connect(cfg, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("SELECT LAST_INSERT_ID()")
        assert cur.fetchone() == (0,)
    finally:
        c.close()


def test_row_count_outside_a_transaction_is_refused_and_works_inside(stack):
    cfg = stack.config("iso-state", limit=5)
    c = stack.connect(cfg)  # default: autocommit off, so the statements share a connection
    try:
        cur = c.cursor()
        cur.execute("UPDATE iso SET v = 'rc' WHERE who = 'lid-a'")
        cur.execute("SELECT ROW_COUNT()")
        assert cur.fetchone() == (1,)
        c.commit()
        c.autocommit(True)
        cur.execute("UPDATE iso SET v = 'rc2' WHERE who = 'lid-a'")
        with pytest.raises(pymysql.err.MySQLError) as err:
            cur.execute("SELECT ROW_COUNT()")
        assert err.value.args[0] == 1235 and "ROW_COUNT()" in err.value.args[1]
        cur.execute("SELECT SQL_CALC_FOUND_ROWS i FROM one WHERE i = 1 LIMIT 0")
        cur.execute("SELECT FOUND_ROWS()")
        assert cur.fetchone() == (1,)
    finally:
        c.close()


def test_compound_statements_are_one_statement(stack):
    """Before: refused as multi-statement queries."""
    cfg = stack.config("iso-state", limit=5)
    c = stack.connect(cfg, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("CREATE OR REPLACE PROCEDURE two_results() BEGIN SELECT 1 AS a; SELECT 2 AS b; END")
        cur.execute("CALL two_results()")
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == ((2,),)
        cur.execute("CREATE OR REPLACE FUNCTION twice(x INT) RETURNS INT DETERMINISTIC "
                    "BEGIN DECLARE y INT; SET y = x * 2; RETURN y; END")
        cur.execute("CREATE OR REPLACE TRIGGER iso_who BEFORE INSERT ON iso FOR EACH ROW "
                    "BEGIN IF NEW.who = 'trig' THEN SET NEW.v = 'by trigger'; END IF; END")
        cur.execute("INSERT INTO iso (who) VALUES ('trig')")
        cur.execute("SELECT v, twice(21) FROM iso WHERE who = 'trig'")
        assert cur.fetchone() == ("by trigger", 42)
        cur.execute("BEGIN NOT ATOMIC DECLARE n INT DEFAULT 0; WHILE n < 3 DO SET n = n + 1; END WHILE; "
                    "SELECT n; END")
        assert cur.fetchall() == ((3,),)
        with pytest.raises(pymysql.err.MySQLError) as err:
            cur.execute("SELECT 1; SELECT 2")
        assert "multi-statement" in str(err.value)
    finally:
        c.close()
        stack.db.query(f"DROP TRIGGER IF EXISTS {DB}.iso_who")


def test_com_reset_connection_leaves_the_session_as_new(stack):
    cfg = stack.config("iso-state", limit=5)
    q = "SELECT @x, @@time_zone, @@autocommit, @@collation_connection"
    answers = []
    for conn in (stack.direct(collation="utf8mb4_unicode_ci"), stack.connect(cfg, collation="utf8mb4_unicode_ci")):
        try:
            cur = conn.cursor()
            cur.execute("SET @x = 1, time_zone = '+01:00'")
            cur.execute("CREATE TEMPORARY TABLE tmp_reset (i INT)")
            cur.execute("INSERT INTO iso (who) VALUES ('reset')")
            conn._execute_command(0x1F, b"")  # noqa: SLF001 - COM_RESET_CONNECTION
            conn._read_ok_packet()  # noqa: SLF001
            cur.execute(q)
            got = [cur.fetchone(), conn.server_status & 0x3]
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.execute("SELECT * FROM tmp_reset")
            answers.append(got)
        finally:
            conn.close()
    assert answers[1] == answers[0], answers
    assert rows_of(stack, "reset") == 0  # rolled back


def test_a_commit_with_autocommit_off_invalidates_reads_cached_during_the_transaction(stack):
    """A PyMySQL client (autocommit off) updates a row; another reads it through the cache before the
    COMMIT (the old value, cached); after the COMMIT the cached read is dropped."""
    cfg = stack.config("iso-cache", limit=5, caching=True, max_age=3600)
    stack.db.query(f"CREATE TABLE IF NOT EXISTS {DB}.cached (id INT PRIMARY KEY, v INT)")
    stack.db.query(f"REPLACE INTO {DB}.cached VALUES (1, 10)")
    writer, reader = stack.connect(cfg), stack.connect(cfg, autocommit=True)
    try:
        read = "SELECT v FROM cached WHERE id = 1"
        rc, wc = reader.cursor(), writer.cursor()
        rc.execute(read)
        assert rc.fetchone() == (10,)
        wc.execute("UPDATE cached SET v = 20 WHERE id = 1")
        rc.execute(read)
        assert rc.fetchone() == (10,)  # not committed yet: the old value (from the origin, cached again)
        writer.commit()
        rc.execute(read)
        assert rc.fetchone() == (20,)
    finally:
        writer.close()
        reader.close()


def test_the_first_client_after_a_restart_is_greeted_with_the_origins_version(stack):
    """The greeting comes before the client names its config: after a restart the listener first
    learns an origin's version from a pooled connection (bounded), so even the first client sees
    MariaDB. (Last in this module: it restarts the edge.)"""
    cfg = stack.config("iso-ac", limit=5)
    assert stack.edge is not None
    stack.edge.restart()
    url = stack.edge.hd("hyperdrive", "get", cfg["id"], "--connection-string", json=False).strip()
    cfg = stack.configs["iso-ac"] = {**cfg, "connection_string": url}  # the listener's new port
    d, p = stack.direct(), stack.connect(cfg)
    try:
        assert p.get_server_info() == d.get_server_info()
    finally:
        d.close()
        p.close()
