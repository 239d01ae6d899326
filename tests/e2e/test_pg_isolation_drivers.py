"""Isolation through the Postgres proxy with real drivers in their DEFAULT modes (issue 12).

Drivers: psycopg 3 (plain ``psycopg.connect``: not autocommit, every statement opens a transaction
the program ends with commit/rollback), asyncpg, SQLAlchemy 2 (default engine on the psycopg dialect),
node-postgres (``pg``) and Postgres.js (``postgres``), the last two run with ``node`` from tests/node
(pg_isolation.mjs, postgresjs_isolation.mjs). Every driver runs the same SQL (``SPEC``, handed to the
node scripts as JSON) and returns the same shapes, checked by one function per test.

One stack per module: a PostgreSQL cluster (SCRAM, TLS), ``hd edge``, a tunnel with a connector,
a service token and an Access application; two configs of the same origin database, each limited
to 5 origin connections: ``tunnel`` (through the tunnel with the token, caching on, as users create
it) and ``direct`` (direct TCP, caching disabled). Clients use the connection string exactly as
``hd hyperdrive get --connection-string`` prints it. Every verdict is taken at the ORIGIN where it
can be (a superuser connection over its unix socket), never through the proxy.

Tests (each for every driver and both configs):

    rollback     rows inserted in a transaction and rolled back are not in the table (counted at
                 the origin); a committed marker row is (the count looks at the right rows)
    killed       a client SIGKILLed inside a transaction (after its insert; the Python drivers on
                 the tunnel config with SO_LINGER 0, i.e. a RST) leaves no row, and its origin
                 backend leaves "idle in transaction" within a deadline (the backend was seen in
                 that state with an xid before the kill: the transaction really was open)
    no_leak      client A leaves session state behind in nine ways (SET search_path, SET
                 statement_timeout, SET client_encoding, SET application_name, a temp table, SET
                 ROLE, then set_config(..., false), a DO block and a function that call it, last,
                 so that a proxy resetting only after visible SETs cannot hide them), each ended as
                 its driver ends a transaction; then 20 new clients (10 while A is still connected
                 and idle, 10 after it left) each run one query reporting pg_backend_pid() and that
                 state, in groups of 5 at once, each holding its transaction until the 5 have their
                 answer: together they take every server connection of the pool (limit 5), whichever
                 the pool hands out first (it resets a dirty one in the background, so sequential
                 clients would keep getting another one). None may see any of A's state; at least one
                 must have been served by a backend A's set_config/function ran on ("proved nothing"
                 otherwise)
    carried      A itself sees its session-level values in its next transaction, and again in a
                 transaction on an origin connection it never used (the test terminates every idle
                 origin connection at the origin and waits until the config's pool has none open):
                 the plain SETs (search_path, statement_timeout, client_encoding, application_name,
                 role) and the values set by set_config(..., false), the DO block and the function
    defaults     a client that set nothing gets from SHOW (application_name, statement_timeout,
                 client_encoding, DateStyle, TimeZone, IntervalStyle, search_path) and from the
                 driver's own view of the reported parameters exactly what the same driver gets
                 on a direct connection to the origin (statement_timeout 0, never the proxy's)
    reported     after SET client_encoding/DateStyle/TimeZone/IntervalStyle/application_name, the
                 driver's view (ParameterStatus as the driver keeps it) equals SHOW in the next
                 transaction, SHOW gives the values set, and a text round trip of 'é' gives what
                 the same driver gets from the origin directly

Known failures on the current proxy are xfailed strictly (``XFAIL``) with the wrong value seen, and
only for AssertionError: a crash or a "proved nothing" guard (pytest.fail) fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pytest

from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.pg import PgCluster
from tests.harness.procs import WaitTimeout, poll_until

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
HOST = "db-iso.internal.example"
LIMIT = 5  # origin connections per config: a group of LIMIT later clients takes all of them
LATER = 20  # clients after A, in groups of GROUP at once
GROUP = LIMIT  # together they hold every server connection of the pool
WHILE_CONNECTED = 10  # of them while A is still connected (idle), the rest after it left
GROUP_WAIT = 20.0  # for the clients of a group to hold their servers together
SCRIPT_TIMEOUT = 60.0
LEAVE_TIMEOUT = 60.0  # for the origin backend of a killed client to leave its transaction (hang guard)

# ------------------------------------------------------------------------------ the SQL every driver runs

PROBE = ("select pg_backend_pid() as pid,"
         " current_setting('search_path') as search_path,"
         " current_setting('statement_timeout') as statement_timeout,"
         " current_setting('app.tenant', true) as tenant,"
         " current_setting('app.do_tenant', true) as do_tenant,"
         " current_setting('app.fn_tenant', true) as fn_tenant,"
         " current_setting('client_encoding') as client_encoding,"
         " current_setting('application_name') as application_name,"
         " current_setting('role') as role,"
         " current_user::text as who,"
         " (select count(*) from pg_class where relnamespace = pg_my_temp_schema()"
         " and relname = 'iso_tmp')::int as temp_tables")

# Visible session changes first, the ones a proxy cannot see in a statement's tag last (a reset
# triggered by a later SET would otherwise wipe them before anyone could see them).
A_STEPS: list[tuple[str, str]] = [
    ("search_path", "SET search_path = iso_a, public"),
    ("statement_timeout", "SET statement_timeout = '4321ms'"),
    ("client_encoding", "SET client_encoding = 'LATIN1'"),
    ("application_name", "SET application_name = 'iso-a'"),
    ("temp_table", "CREATE TEMP TABLE iso_tmp (i int)"),
    ("role", "SET ROLE iso_reader"),
    ("set_config", "select set_config('app.tenant', '42', false) as v, pg_backend_pid() as pid"),
    ("do_block", "DO $$ BEGIN PERFORM set_config('app.do_tenant', '43', false); END $$"),
    ("function", "select iso_set_guc('44') as v, pg_backend_pid() as pid"),
]
A_STATE: dict[str, Any] = {"search_path": "iso_a, public", "statement_timeout": "4321ms", "client_encoding": "LATIN1",
                           "application_name": "iso-a", "temp_tables": 1, "role": "iso_reader", "tenant": "42",
                           "do_tenant": "43", "fn_tenant": "44"}
# What A must still see in its next transaction (a session-level value lasts for the session).
CARRIED = ("search_path", "statement_timeout", "client_encoding", "application_name", "role", "tenant",
           "do_tenant", "fn_tenant")
# The steps whose backend certainly holds state afterwards (they report pg_backend_pid()).
STATE_PID_STEPS = ("set_config", "function")

SHOW_KEYS = ("application_name", "statement_timeout", "client_encoding", "DateStyle", "TimeZone", "IntervalStyle",
             "search_path")
VIEW_KEYS = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "application_name")
PARAM_STEPS: list[tuple[str, str]] = [
    ("client_encoding", "SET client_encoding = 'LATIN1'"),
    ("DateStyle", "SET DateStyle = 'SQL, DMY'"),
    ("TimeZone", "SET TimeZone = 'America/New_York'"),
    ("IntervalStyle", "SET IntervalStyle = 'iso_8601'"),
    ("application_name", "SET application_name = 'iso-params'"),
]
PARAM_VALUES = {"client_encoding": "LATIN1", "DateStyle": "SQL, DMY", "TimeZone": "America/New_York",
                "IntervalStyle": "iso_8601", "application_name": "iso-params"}
ROUNDTRIP = ("select $1::text as t, length($1::text) as n", "é")

INSERT = "insert into iso_rows (tag, v) values ($1, $2)"
COUNT = "select count(*)::int as n from iso_rows where tag = $1"

SPEC = {"probe": PROBE, "a_steps": A_STEPS, "later": LATER, "group": GROUP, "group_wait": GROUP_WAIT,
        "while_connected": WHILE_CONNECTED,
        "show_keys": SHOW_KEYS, "view_keys": VIEW_KEYS, "param_steps": PARAM_STEPS, "roundtrip": ROUNDTRIP,
        "insert": INSERT, "count": COUNT}

ORIGIN_SETUP = """
create table iso_rows (id serial primary key, tag text not null, v text not null);
create function iso_set_guc(v text) returns text language plpgsql
    as $$ begin perform set_config('app.fn_tenant', v, false); return v; end $$;
"""


# --------------------------------------------------------------------------------------------- the stack

@dataclass
class Stack:
    cluster: PgCluster
    edge: EdgeProc
    urls: dict[str, str]  # route -> connection string as `hd hyperdrive get --connection-string` prints it
    direct_origin: str  # the origin itself (no proxy), for differential baselines
    memo: dict[tuple, Any] = field(default_factory=dict)

    def origin_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.cluster.connect(dbname=APP_DB) as conn:
            return conn.execute(sql, params or None).fetchall()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cluster = PgCluster(auth="scram-sha-256", tls=True)
    edge = None
    try:
        cluster.start()
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.execute("create role iso_reader nologin; grant iso_reader to app", dbname=APP_DB)
        cluster.execute(ORIGIN_SETUP, dbname=APP_DB, user=APP_USER)
        state = tmp_path_factory.mktemp("hd-state")
        state.chmod(0o700)
        edge = EdgeProc(state).start()
        t = edge.hd("tunnel", "create", "iso-vpc")
        edge.hd("tunnel", "route", "iso-vpc", HOST, "--service", f"tcp://127.0.0.1:{cluster.port}")
        tok = edge.hd("access", "service-token", "create", "iso-token")
        edge.hd("access", "app", "create", "iso-db", "--domain", HOST, "--service-token", "iso-token")
        ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
        common = ["--database", APP_DB, "--origin-user", APP_USER, "--origin-password", APP_PASSWORD,
                  "--origin-connection-limit", str(LIMIT)]
        edge.hd("hyperdrive", "create", "iso-tunnel", "--origin-host", HOST, *common,
                "--access-client-id", tok["client_id"], "--access-client-secret", tok["client_secret"])
        edge.hd("hyperdrive", "create", "iso-direct", "--origin-host", "127.0.0.1", "--origin-port",
                str(cluster.port), "--caching-disabled", "true", *common)
        urls = {route: edge.hd("hyperdrive", "get", f"iso-{route}", "--connection-string", json=False).strip()
                for route in ("tunnel", "direct")}
        for url in urls.values():
            assert url.startswith("postgresql://") and "sslmode=verify-full&sslrootcert=" in url, url
        # every driver verifies what it talks to: the edge with its CA (in the URLs above), the origin
        # with the cluster's
        yield Stack(cluster, edge, urls, cluster.dsn(APP_USER, dbname=APP_DB, sslmode="verify-full",
                                                     sslrootcert=cluster.ca_cert_path))
    finally:
        if edge is not None:
            # the edge first: while its pooled origin connections through the tunnel are open,
            # the connector waits for them and takes 10 s to stop
            edge.stop()
            edge.stop_children()
        cluster.stop()


@pytest.fixture(autouse=True)
def _report_on_failure(request, stack):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== edge (and connector) logs =====\n{stack.edge.diagnostics(80)}")
        print("\n===== origin log tail =====\n" + "\n".join(stack.cluster.log_text().splitlines()[-20:]))


# ----------------------------------------------------------------------------------- the Python drivers

def _error(e: BaseException) -> str:
    code = getattr(e, "sqlstate", None) or getattr(getattr(e, "orig", None), "sqlstate", None)
    return f"error {code}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"


def _set_linger_zero(fd: int) -> None:
    """SO_LINGER {on, 0} on the socket behind `fd`: when the process dies the kernel sends RST."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()  # the dup only; the driver's descriptor keeps the connection


class Client(Protocol):
    """One connection of a driver, used the way that driver is used by default."""

    implicit_transactions: bool  # psycopg/SQLAlchemy: a statement opens a transaction

    def execute(self, sql: str, *params: Any) -> dict | None:
        """One statement; its first row as a dict (None without rows). The transaction is left as
        the driver leaves it: open for psycopg/SQLAlchemy, ended for the autocommit drivers."""
    def begin(self) -> None:
        """Start a transaction where the driver does not do it by itself."""
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def view(self) -> dict[str, str | None]:
        """The reported parameters (ParameterStatus) as the driver keeps them."""
    def linger_zero(self) -> None: ...
    def close(self) -> None: ...


class PsycopgClient:
    """psycopg 3, plain connect(): every statement runs in a transaction psycopg opened."""

    implicit_transactions = True

    errors: tuple[type[BaseException], ...]

    def __init__(self, url: str):
        import psycopg
        self.errors = (psycopg.Error,)
        self.conn = psycopg.connect(url, connect_timeout=10)

    def execute(self, sql: str, *params: Any) -> dict | None:
        cur = self.conn.execute(re.sub(r"\$\d+", "%s", sql) if params else sql,
                                _positional(sql, params) if params else None)
        if cur.description is None:
            return None
        row = cur.fetchone()
        return None if row is None else dict(zip([d.name for d in cur.description], row))

    def begin(self) -> None:
        pass  # the next statement opens it

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def view(self) -> dict[str, str | None]:
        return {k: self.conn.info.parameter_status(k) for k in VIEW_KEYS}

    def linger_zero(self) -> None:
        _set_linger_zero(self.conn.pgconn.socket)

    def close(self) -> None:
        self.conn.close()


class SqlAlchemyClient:
    """SQLAlchemy 2, create_engine() defaults on postgresql+psycopg: autobegin, commit()/rollback(),
    the pool rolls back on return; one engine per client (its pool would otherwise reuse one
    connection for every "client")."""

    implicit_transactions = True

    def __init__(self, url: str):
        from sqlalchemy import create_engine
        from sqlalchemy.exc import DBAPIError
        self.errors = (DBAPIError,)
        self.engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                                    connect_args={"connect_timeout": 10})
        try:
            self.conn = self.engine.connect()
        except BaseException:
            self.engine.dispose()
            raise

    def execute(self, sql: str, *params: Any) -> dict | None:
        from sqlalchemy import text
        if params:
            names = {f"p{i + 1}": v for i, v in enumerate(_positional(sql, params, distinct=True))}
            result = self.conn.execute(text(re.sub(r"\$(\d+)", r"(:p\1)", sql)), names)
        else:
            result = self.conn.exec_driver_sql(sql)
        if not result.returns_rows:
            return None
        row = result.mappings().first()
        return None if row is None else dict(row)

    def begin(self) -> None:
        pass  # autobegin

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def view(self) -> dict[str, str | None]:
        raw = self.conn.connection.driver_connection
        return {k: raw.info.parameter_status(k) for k in VIEW_KEYS}

    def linger_zero(self) -> None:
        _set_linger_zero(self.conn.connection.driver_connection.pgconn.socket)

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.engine.dispose()


class AsyncpgClient:
    """asyncpg: autocommit unless a transaction is started; every query a named prepared statement."""

    implicit_transactions = False

    def __init__(self, url: str):
        import asyncpg
        self.errors = (asyncpg.PostgresError, asyncpg.InterfaceError)
        self.runner = asyncio.Runner()
        self.tr = None
        try:
            self.conn = self._run(asyncpg.connect(url, timeout=10))
        except BaseException:
            self.runner.close()
            raise

    def _run(self, aw):
        return self.runner.run(asyncio.wait_for(aw, 30))

    def execute(self, sql: str, *params: Any) -> dict | None:
        if sql.lstrip().lower().startswith(("select", "show")):
            row = self._run(self.conn.fetchrow(sql, *params))
            return None if row is None else dict(row)
        self._run(self.conn.execute(sql, *params))
        return None

    def begin(self) -> None:
        self.tr = self.conn.transaction()
        self._run(self.tr.start())

    def commit(self) -> None:
        if self.tr is not None:
            tr, self.tr = self.tr, None
            self._run(tr.commit())

    def rollback(self) -> None:
        if self.tr is not None:
            tr, self.tr = self.tr, None
            self._run(tr.rollback())

    def view(self) -> dict[str, str | None]:
        settings = self.conn.get_settings()
        return {k: getattr(settings, k, None) for k in VIEW_KEYS}

    def linger_zero(self) -> None:
        sock = self.conn._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        try:
            self._run(self.conn.close(timeout=5))
        finally:
            self.runner.close()


def _positional(sql: str, params: tuple, distinct: bool = False) -> list:
    """Parameters for a driver with one placeholder per occurrence ($1 used twice -> twice)."""
    if distinct:
        return list(params)
    return [params[int(n) - 1] for n in re.findall(r"\$(\d+)", sql)]


PY_CLIENTS: dict[str, Callable[[str], Any]] = {
    "psycopg": PsycopgClient, "asyncpg": AsyncpgClient, "sqlalchemy": SqlAlchemyClient}


# ----------------------------------------------------------------- the scenarios (Python side; node mirrors)

def _step(client: Any, sql: str, *params: Any) -> dict:
    """One statement as its own transaction, ended the way the driver ends one (commit, or nothing
    for autocommit drivers); a refusal is recorded, and rolled back."""
    try:
        row = client.execute(sql, *params)
        client.commit()
        return {"ok": True, "pid": (row or {}).get("pid")}
    except client.errors as e:
        try:
            client.rollback()
        except client.errors:
            pass
        return {"ok": False, "error": _error(e)}


def _probe(client: Any, end: str = "commit") -> dict:
    try:
        row = client.execute(PROBE)
        if end == "commit":
            client.commit()
        return row
    except client.errors as e:
        return {"error": _error(e)}


def scenario_rollback(make: Callable[[str], Any], url: str, tag: str) -> dict:
    c = make(url)
    try:
        c.begin()
        pids = set()
        for _ in range(3):
            c.execute(INSERT, tag, "rolled back")
        inside = c.execute(COUNT, tag)["n"]
        pids.add(c.execute("select pg_backend_pid() as pid")["pid"])
        c.rollback()
        c.execute(INSERT, tag, "kept")
        c.commit()
        return {"inside": inside, "pids": sorted(pids)}
    finally:
        c.close()


def scenario_hold(make: Callable[[str], Any], url: str, tag: str, linger_zero: bool) -> None:
    """Insert inside a transaction, report, and wait (for SIGKILL; gives up after 60 s)."""
    c = make(url)
    c.begin()
    for _ in range(3):
        c.execute(INSERT, tag, "uncommitted")
    inside = c.execute(COUNT, tag)["n"]
    pid = c.execute("select pg_backend_pid() as pid")["pid"]
    if linger_zero:
        c.linger_zero()
    print(json.dumps({"pid": pid, "inside": inside}), flush=True)
    time.sleep(SCRIPT_TIMEOUT)
    sys.exit(3)


def scenario_leak(make: Callable[[str], Any], url: str) -> dict:
    a = make(url)
    out: dict[str, Any] = {"later": []}
    try:
        out["a_first"] = _probe(a)
        out["a_steps"] = {name: _step(a, sql) for name, sql in A_STEPS}
        out["a_next"] = _probe(a)
        for first in range(0, LATER, GROUP):
            if first == WHILE_CONNECTED:
                a.close()
                a = None
            out["later"] += _later_group(make, url, min(GROUP, LATER - first))
    finally:
        if a is not None:
            a.close()
    return out


def _later_group(make: Callable[[str], Any], url: str, n: int) -> list[dict]:
    """n new clients at once, each running one query inside a transaction it holds until all n
    have their answer: together they take every server connection of the pool (limit n), so the
    one A used is among them whichever the pool hands out first. Then each ends its transaction
    as its driver does by default (psycopg/SQLAlchemy: disconnect inside the transaction the
    query opened, as a program that only reads does; the others: commit) and disconnects."""
    barrier = threading.Barrier(n, timeout=GROUP_WAIT)
    out: list[dict] = [{"error": "did not run"}] * n

    def one(i: int) -> None:
        try:
            b = make(url)
        except Exception as e:  # noqa: BLE001 - reported as the client's result
            out[i] = {"error": "connect: " + _error(e)}
            barrier.abort()
            return
        try:
            b.begin()
            out[i] = _probe(b, end="none")
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            if not b.implicit_transactions:
                b.commit()
        finally:
            b.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SCRIPT_TIMEOUT)
    if any(t.is_alive() for t in threads):
        pytest.fail(f"a later client is still running after {SCRIPT_TIMEOUT} s")
    return out


def scenario_carry(make: Callable[[str], Any], url: str, pause: Callable[[], None]) -> dict:
    """A sets its state, checks it in its next transaction, then (after `pause`, in which the test
    takes every origin connection away) once more, on an origin connection it never used."""
    a = make(url)
    try:
        out: dict[str, Any] = {"a_first": _probe(a)}
        out["a_steps"] = {name: _step(a, sql) for name, sql in A_STEPS}
        out["a_next"] = _probe(a)
        pause()
        out["a_moved"] = _probe(a)
        return out
    finally:
        a.close()


def scenario_params(make: Callable[[str], Any], url: str) -> dict:
    c = make(url)
    try:
        fresh = {"show": _show_all(c), "view": c.view()}
        steps = {name: _step(c, sql) for name, sql in PARAM_STEPS}
        after = {"show": _show_all(c), "view": c.view()}
        try:
            row = c.execute(ROUNDTRIP[0], ROUNDTRIP[1])
            c.commit()
            roundtrip = [row["t"], row["n"]]
        except c.errors as e:
            c.rollback()
            roundtrip = _error(e)
        return {"fresh": fresh, "steps": steps, "after": after, "roundtrip": roundtrip}
    finally:
        c.close()


def _show_all(c: Any) -> dict:
    out = {}
    for k in SHOW_KEYS:
        try:
            out[k] = next(iter(c.execute(f"SHOW {k}").values()))
        except c.errors as e:
            c.rollback()
            out[k] = _error(e)
    c.commit()
    return out


# -------------------------------------------------------------------------------------- running drivers

def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is needed for the JavaScript drivers and is not on PATH")
    if not (NODE_DIR / "node_modules" / "pg").is_dir() or not (NODE_DIR / "node_modules" / "postgres").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules is missing: run scripts/bootstrap.sh (npm ci in tests/node)")
    return node


NODE_SCRIPTS = {"node-pg": "pg_isolation.mjs", "postgres.js": "postgresjs_isolation.mjs"}
DRIVERS = ("psycopg", "asyncpg", "sqlalchemy", "node-pg", "postgres.js")


def _node_env() -> dict[str, str]:
    return {**os.environ, "NODE_OPTIONS": "--no-deprecation", "ISO_SPEC": json.dumps(SPEC)}


def run_scenario(driver: str, case: str, url: str, *args: str, pause: Callable[[], None] | None = None) -> dict:
    if driver in PY_CLIENTS:
        make = PY_CLIENTS[driver]
        if case == "rollback":
            return scenario_rollback(make, url, *args)
        if case == "leak":
            return scenario_leak(make, url)
        if case == "carry":
            return scenario_carry(make, url, pause)
        if case == "params":
            return scenario_params(make, url)
        raise ValueError(case)
    argv = [node_binary(), str(NODE_DIR / NODE_SCRIPTS[driver]), case, url, *args]
    if pause is None:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT, env=_node_env(),
                            cwd=NODE_DIR, stdin=subprocess.DEVNULL)
        returncode, stdout, stderr = cp.returncode, cp.stdout, cp.stderr
    else:  # the script prints one line when it is ready to pause and goes on at a line on stdin
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE,
                                text=True, env=_node_env(), cwd=NODE_DIR)
        try:
            paused = _read_line(proc, SCRIPT_TIMEOUT)
            if paused:
                pause()
            stdout, stderr = proc.communicate("go\n" if paused else "", timeout=SCRIPT_TIMEOUT)
            stdout = paused + stdout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        returncode = proc.returncode
    lines = stdout.strip().splitlines()
    if returncode != 0 or not lines:
        pytest.fail(f"{driver} {case} exited {returncode}, printed {len(lines)} lines\nstderr: {stderr[-3000:]}")
    return json.loads(lines[-1])


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout within `timeout` ('' if it printed none)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


class Holder:
    """A driver in its own process, holding an open transaction until killed."""

    def __init__(self, driver: str, url: str, tag: str, linger_zero: bool):
        if driver in PY_CLIENTS:
            argv = [sys.executable, "-m", "tests.e2e.test_pg_isolation_drivers", "hold", driver, url, tag,
                    "rst" if linger_zero else "fin"]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
        else:
            argv = [node_binary(), str(NODE_DIR / NODE_SCRIPTS[driver]), "hold", url, tag]
            env = _node_env()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=env, cwd=REPO if driver in PY_CLIENTS else NODE_DIR)
        self.driver = driver

    def report(self, timeout: float = 30.0) -> dict:
        """The JSON line the client prints once its transaction holds the rows."""
        line = _read_line(self.proc, timeout)
        if not line.strip():
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            err = self.proc.stderr.read()
            self.kill()
            pytest.fail(f"{self.driver} holder reported nothing within {timeout} s "
                        f"(exit {self.proc.returncode}); stderr: {err[-2000:]}")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def memo(stack: Stack, key: tuple, fn: Callable[[], Any]) -> Any:
    """One run of a scenario serves the tests that check different parts of it."""
    if key not in stack.memo:
        try:
            stack.memo[key] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - re-raised for every test that needs it
            stack.memo[key] = ("error", e)
    kind, value = stack.memo[key]
    if kind == "error":
        raise value
    return value


# ---------------------------------------------------------------------------------- expected failures

# Known proxy bugs, xfailed only until fixed: {(test, driver or "*", route or "*"): what is broken (the
# value seen)}; the first matching entry counts. Strict, and only for AssertionError, so that a crash or
# a "proved nothing" guard still fails. Empty: every case passes on the current proxy (on 3845137,
# before issue 12's work, 40 of the 60 failed: see the commit that added this module).
XFAIL: dict[tuple[str, str, str], str] = {}


def _params(test: str):
    for driver in DRIVERS:
        for route in ("tunnel", "direct"):
            reason = next((r for (t, d, rt), r in XFAIL.items()
                           if t == test and d in (driver, "*") and rt in (route, "*")), None)
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"issue 12: {reason}")] if reason else []
            yield pytest.param(driver, route, id=f"{driver}-{route}", marks=marks)


def _tag(request) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60] + f"-{time.monotonic_ns()}"


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver,route", list(_params("rollback")))
def test_rollback_leaves_nothing(stack, request, driver, route):
    tag = _tag(request)
    r = run_scenario(driver, "rollback", stack.urls[route], tag)
    assert r["inside"] == 3, r  # the rows were there inside the transaction
    counts = dict(stack.origin_rows("select v, count(*) from iso_rows where tag = %s group by v", (tag,)))
    assert counts.get("kept") == 1, f"the committed marker row is missing at the origin: {counts}"
    assert counts.get("rolled back", 0) == 0, f"rolled-back rows were committed at the origin: {counts}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver,route", list(_params("killed")))
def test_killed_client_leaves_nothing(stack, request, driver, route):
    tag = _tag(request)
    rst = route == "tunnel" and driver in PY_CLIENTS
    holder = Holder(driver, stack.urls[route], tag, linger_zero=rst)
    try:
        r = holder.report()
        pid = r["pid"]
        assert r["inside"] == 3, r
        # Before the kill: the client's transaction is open at the origin, with its rows (an xid).
        before = stack.origin_rows("select state, backend_xid is not null from pg_stat_activity where pid = %s",
                                   (pid,))
        if before != [("idle in transaction", True)]:
            pytest.fail(f"proved nothing: the client's origin backend {pid} is not idle in a transaction "
                        f"that wrote ({before}) before the kill")
    finally:
        holder.kill()

    def left() -> bool:
        rows = stack.origin_rows("select state from pg_stat_activity where pid = %s", (pid,))
        return not rows or rows[0][0] == "idle"

    poll_until(left, LEAVE_TIMEOUT, what=f"origin backend {pid} of the killed {driver} client to leave "
               f"its transaction ({'RST' if rst else 'FIN'})",
               on_timeout=lambda: str(stack.origin_rows(
                   "select state, query from pg_stat_activity where pid = %s", (pid,))))
    counts = dict(stack.origin_rows("select v, count(*) from iso_rows where tag = %s group by v", (tag,)))
    assert counts == {}, f"rows of the killed client's transaction were committed: {counts}"


def _leak_run(stack: Stack, driver: str, route: str) -> dict:
    return memo(stack, ("leak", driver, route), lambda: run_scenario(driver, "leak", stack.urls[route]))


def _leaks(probe: dict) -> list[str]:
    """What of A's state a later client sees."""
    if "error" in probe:
        return [f"its query failed: {probe['error']}"]
    seen = []
    for k in ("search_path", "statement_timeout", "client_encoding", "application_name"):
        if probe[k] == A_STATE[k]:
            seen.append(f"{k}={probe[k]!r}")
    for k in ("tenant", "do_tenant", "fn_tenant"):
        if probe[k] not in (None, ""):
            seen.append(f"{k}={probe[k]!r}")
    if probe["role"] != "none" or probe["who"] != APP_USER:
        seen.append(f"role={probe['role']!r} current_user={probe['who']!r}")
    if probe["temp_tables"]:
        seen.append("A's temp table")
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver,route", list(_params("no_leak")))
def test_no_state_reaches_later_clients(stack, driver, route):
    r = _leak_run(stack, driver, route)
    steps = r["a_steps"]
    state_pids = {steps[s]["pid"] for s in STATE_PID_STEPS if steps[s].get("ok") and steps[s].get("pid")}
    if not state_pids:  # no step reported its backend: the ones A's probes ran on
        state_pids = {p.get("pid") for p in (r["a_first"], r["a_next"]) if p.get("pid")}
    later = r["later"]
    if len(later) != LATER:
        pytest.fail(f"the scenario ran {len(later)} later clients, not {LATER}")
    served = [i for i, p in enumerate(later) if p.get("pid") in state_pids]
    if not served:
        pytest.fail(f"proved nothing: none of the {LATER} later clients was served by A's backend(s) "
                    f"{sorted(state_pids)} (they got {sorted({p.get('pid') for p in later}, key=str)})")
    problems = [f"later client {i} ({'A connected' if i < WHILE_CONNECTED else 'after A left'}, backend "
                f"{p.get('pid')}{' = A' if i in served else ''}) sees {', '.join(seen)}"
                for i, p in enumerate(later) if (seen := _leaks(p))]
    assert not problems, "\n".join(problems) + f"\nA's steps: {steps}"


def _take_origin_connections(stack: Stack, route: str) -> None:
    """Every idle origin connection of the app role is terminated at the origin, and we wait until
    the config's pool has none open: the client's next transaction runs on a new one."""
    stack.origin_rows("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s and state = 'idle'",
                      (APP_USER,))

    def pool_open() -> int:
        status, body = stack.edge.api("GET", f"/v1/hyperdrive/configs/iso-{route}/metrics")
        if status != 200:
            pytest.fail(f"metrics of iso-{route}: {status} {body}")
        return (body.get("pool") or {}).get("open", 0)

    try:
        poll_until(lambda: pool_open() == 0, LEAVE_TIMEOUT, what=f"the pool of iso-{route} to notice its "
                   "origin connections were terminated")
    except WaitTimeout as e:  # not the proxy's isolation at fault: the scenario could not be set up
        pytest.fail(f"proved nothing: {e}")


def _carry_run(stack: Stack, driver: str, route: str) -> dict:
    return memo(stack, ("carry", driver, route), lambda: run_scenario(
        driver, "carry", stack.urls[route], pause=lambda: _take_origin_connections(stack, route)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver,route", list(_params("carried")))
def test_session_values_last_for_the_session(stack, driver, route):
    r = _carry_run(stack, driver, route)
    used = {p.get("pid") for p in (r["a_first"], r["a_next"])} | {s.get("pid") for s in r["a_steps"].values()}
    if r["a_moved"].get("pid") in used:
        pytest.fail(f"proved nothing: A's last transaction ran on backend {r['a_moved'].get('pid')}, which it had "
                    f"used before ({sorted(p for p in used if p)})")
    problems = [f"refused: {name}: {v['error']}" for name, v in r["a_steps"].items() if not v["ok"]]
    for when, probe in (("next transaction", r["a_next"]), ("transaction on a new origin connection", r["a_moved"])):
        if "error" in probe:
            problems.append(f"A's {when} failed: {probe['error']}")
            continue
        wrong = {k: (probe[k], A_STATE[k]) for k in CARRIED if probe[k] != A_STATE[k]}
        if wrong:
            problems.append(f"A's {when} (backend {probe['pid']}) sees (got, set): {wrong}")
    assert not problems, "\n".join(problems)


def _params_run(stack: Stack, driver: str, target: str) -> dict:
    url = stack.direct_origin if target == "origin" else stack.urls[target]
    return memo(stack, ("params", driver, target), lambda: run_scenario(driver, "params", url))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver,route", list(_params("defaults")))
def test_defaults_are_the_servers(stack, driver, route):
    direct = _params_run(stack, driver, "origin")["fresh"]
    proxied = _params_run(stack, driver, route)["fresh"]
    if direct["show"]["statement_timeout"] != "0":  # the origin has none: the baseline is sane
        pytest.fail(f"baseline: a direct connection shows statement_timeout {direct['show']['statement_timeout']!r}")
    wrong_show = {k: (proxied["show"][k], direct["show"][k]) for k in SHOW_KEYS
                  if proxied["show"][k] != direct["show"][k]}
    wrong_view = {k: (proxied["view"].get(k), direct["view"].get(k)) for k in VIEW_KEYS
                  if proxied["view"].get(k) != direct["view"].get(k)}
    assert not wrong_show and not wrong_view, (f"a client that set nothing, (through the proxy, direct): "
                                               f"SHOW {wrong_show}; driver's view {wrong_view}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver,route", list(_params("reported")))
def test_reported_parameters_match(stack, driver, route):
    direct = _params_run(stack, driver, "origin")
    proxied = _params_run(stack, driver, route)
    # the baseline: on a direct connection every SET works and lasts
    if not all(s["ok"] for s in direct["steps"].values()) or \
            direct["after"]["show"] != {**direct["fresh"]["show"], **PARAM_VALUES}:
        pytest.fail(f"baseline: on a direct connection the SETs did not all work and last: {direct}")
    problems = []
    refused = {k: v["error"] for k, v in proxied["steps"].items() if not v["ok"]}
    if refused:
        problems.append(f"refused: {refused}")
    show, view = proxied["after"]["show"], proxied["after"]["view"]
    direct_view = direct["after"]["view"]
    # what the driver believes (where it keeps the parameter at all) is what its statements run under
    mismatch = {k: (view[k], show[k]) for k in VIEW_KEYS if direct_view.get(k) is not None and view.get(k) != show[k]}
    if mismatch:
        problems.append(f"driver's view vs SHOW in the next transaction: {mismatch}")
    not_kept = {k: (show[k], v) for k, v in PARAM_VALUES.items() if show[k] != v}
    if not_kept:
        problems.append(f"SHOW in the next transaction (got, set): {not_kept}")
    if proxied["roundtrip"] != direct["roundtrip"]:
        problems.append(f"'é' round trip: {proxied['roundtrip']!r}, directly {direct['roundtrip']!r}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------- a Python driver as its own process

if __name__ == "__main__":  # python -m tests.e2e.test_pg_isolation_drivers hold DRIVER URL TAG rst|fin
    _case, _driver, _url, _tag_arg, _mode = sys.argv[1:6]
    assert _case == "hold", _case
    scenario_hold(PY_CLIENTS[_driver], _url, _tag_arg, _mode == "rst")
