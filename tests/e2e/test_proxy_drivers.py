"""The driver matrix: real client drivers through proxy → relay → connector → PostgreSQL.

One stack per module (it is the slow part): a PostgreSQL cluster with SCRAM and TLS, `hd edge`
(proxy listener on a free port), a tunnel routed to the cluster WITHOUT --public, a service token,
an Access application allowing it, a connector, and one Hyperdrive config that reaches the origin
through the tunnel with the token. Every driver then runs the same scenarios against the config's
connection string and returns the same JSON shape per scenario, checked by one function per
scenario (`CHECKS`):

    basic        connect with the connection string; simple (incl. several statements in one Query)
                 and parameterized queries
    prepared     one server-side prepared statement executed 60 times on each of 4 connections at
                 once (240 executions): the statement lands on several pooled server connections
    transaction  a rolled-back insert is gone afterwards; a committed one stays
    error        division by zero (22012) from the origin, unchanged, through the simple and the
                 extended protocol and inside a transaction (then 25P02); the connection stays usable
    large        a ~10 MB result
    copy         COPY ... FROM STDIN (1000 rows) and COPY ... TO STDOUT
    cancel       `select pg_sleep(120)` cancelled after 1 s: 57014, well under 25 s, connection usable

Drivers: psycopg 3 (prepare_threshold=0), asyncpg, pg8000 (native API), SQLAlchemy 2 on
psycopg, node-postgres and Postgres.js (run with `node` from tests/node, a bounded subprocess each).
The four apps in examples/ run against the same config at the end.

TLS: every driver verifies the edge (certificate chain to the edge's CA, and the host name), as the
README tells users: psycopg, asyncpg, SQLAlchemy and node-postgres take the connection string
verbatim (sslmode=verify-full, sslrootcert=<the CA in the state dir>); pg8000 (no URLs) and
Postgres.js (no sslrootcert) are given the CA file the string names. `test_driver_verifies_the_edge`
proves it: with another CA every driver refuses to connect.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization

from control.certs import make_ca
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.pg import PgCluster

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "node"
EXAMPLES = REPO / "examples"
HOST = "db.internal.example"

LARGE_SQL = "select repeat('x', 1000) || i as s from generate_series(1, 10000) i"
LARGE_BYTES = sum(1000 + len(str(i)) for i in range(1, 10_001))  # 10,038,894
CLIENTS, EXECUTIONS = 4, 60
CANCEL_AFTER = 1.0
NODE_TIMEOUT = 60.0
CANCELLED_AT_ORIGIN = "canceling statement due to user request"


# --------------------------------------------------------------------------------------- the stack

@dataclass
class Stack:
    cluster: PgCluster
    edge: EdgeProc
    connector: ConnectorProc
    config: dict

    @property
    def dsn(self) -> str:
        return self.config["connection_string"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cluster = PgCluster(auth="scram-sha-256", tls=True)
    edge = None
    try:
        cluster.start()
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        cluster.execute("create table drv_rows (driver text, id int, v text);"
                        "create table drv_copy (driver text, n int, s text)", dbname=APP_DB, user=APP_USER)
        state = tmp_path_factory.mktemp("hd-state")
        state.chmod(0o700)
        edge = EdgeProc(state).start()
        t = edge.hd("tunnel", "create", "vpc-01")
        edge.hd("tunnel", "route", "vpc-01", HOST, "--service", f"tcp://127.0.0.1:{cluster.port}")
        tok = edge.hd("access", "service-token", "create", "hyperdrive-vpc-01")
        edge.hd("access", "app", "create", "vpc-01-db", "--domain", HOST, "--service-token", "hyperdrive-vpc-01")
        connector = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
        config = edge.hd("hyperdrive", "create", "drivers", "--origin-host", HOST, "--database", APP_DB,
                         "--origin-user", APP_USER, "--origin-password", APP_PASSWORD,
                         "--access-client-id", tok["client_id"], "--access-client-secret", tok["client_secret"])
        assert config["connection_string"].startswith("postgresql://")
        yield Stack(cluster, edge, connector, config)
    finally:
        if edge is not None:
            edge.stop_children()
            edge.stop()
        cluster.stop()


@pytest.fixture(autouse=True)
def _report_on_failure(request, stack):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== edge (and connector) logs =====\n{stack.edge.diagnostics(120)}")
        origin_tail = "\n".join(stack.cluster.log_text().splitlines()[-30:])
        print(f"\n===== origin log tail =====\n{origin_tail}")


# --------------------------------------------------------------------------------- the Python drivers

def _verify_full(dsn: str) -> ssl.SSLContext:
    """libpq's sslmode=verify-full for a driver that takes no URL: the CA file the connection
    string names (sslrootcert), certificate and host name checked (ssl's defaults)."""
    return ssl.create_default_context(cafile=parse_qs(urlsplit(dsn).query)["sslrootcert"][0])


def _send_cancel(host: str, port: int, key_data: bytes) -> None:
    """A CancelRequest (plain TCP) for BackendKeyData `key_data` (pid + secret, 8 bytes)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(struct.pack("!II", 16, 80877102) + key_data)
        s.recv(1)  # the server closes the connection once it has read the request


class Psycopg:
    """psycopg 3, server-side prepare for everything (prepare_threshold=0)."""

    name = "psycopg"

    def __init__(self, dsn: str):
        self.dsn = dsn

    def connect(self, **kw):
        import psycopg
        return psycopg.connect(self.dsn, prepare_threshold=0, connect_timeout=10, autocommit=True, **kw)

    def basic(self):
        with self.connect() as c:
            one = c.execute("select 1 as one", prepare=False).fetchone()[0]
            cur = c.execute("select 1 as a; select 'two' as b", prepare=False)  # no params: one simple Query
            multi = [cur.fetchone()[0]]
            cur.nextset()
            multi.append(cur.fetchone()[0])
            total = c.execute("select %s::int + %s::int", (2, 3)).fetchone()[0]
            text = c.execute("select %s::text", ("héllo ✓",)).fetchone()[0]
            return {"one": one, "sum": total, "text": text, "multi": multi}

    def prepared(self):
        conns = [self.connect() for _ in range(CLIENTS)]
        barrier = threading.Barrier(CLIENTS, timeout=20)
        results: list[tuple[int, int, set]] = []

        def work(c):
            with c.transaction():  # all at once: >= CLIENTS warm server connections
                c.execute("select pg_backend_pid()")
                barrier.wait()
            done = correct = 0
            pids = set()
            for i in range(EXECUTIONS):
                v, pid = c.execute("select %s::int * 2, pg_backend_pid() /* psycopg */", (i,), prepare=True).fetchone()
                done += 1
                correct += v == 2 * i
                pids.add(pid)
            results.append((done, correct, pids))

        try:
            _run_threads(work, conns)
        finally:
            for c in conns:
                c.close()
        return _prepared_result(results)

    def transaction(self):
        import psycopg
        with self.connect() as c:
            count = "select count(*) from drv_rows where driver = %s"
            c.execute("delete from drv_rows where driver = %s", (self.name,))
            with c.transaction() as tx:
                c.execute("insert into drv_rows (driver, id, v) values (%s, 1, 'rolled back')", (self.name,))
                inside = c.execute(count, (self.name,)).fetchone()[0]
                raise psycopg.Rollback(tx)
            after = c.execute(count, (self.name,)).fetchone()[0]
            with c.transaction():
                c.execute("insert into drv_rows (driver, id, v) values (%s, 2, 'kept')", (self.name,))
            committed = c.execute(count, (self.name,)).fetchone()[0]
            return {"inside": inside, "after_rollback": after, "committed": committed}

    def error(self):
        import psycopg

        def state(fn):
            try:
                fn()
            except psycopg.Error as e:
                return e.sqlstate
            return None

        with self.connect() as c:
            simple = state(lambda: c.execute("select 1/0", prepare=False))
            extended = state(lambda: c.execute("select %s::int / %s::int", (1, 0), prepare=False))
            named = state(lambda: c.execute("select %s::int / %s::int as q", (1, 0), prepare=True))
            named_again = c.execute("select %s::int / %s::int as q", (6, 3), prepare=True).fetchone()[0]
            c.autocommit = False
            in_txn = state(lambda: c.execute("select 1/0"))
            aborted = state(lambda: c.execute("select 1"))
            c.rollback()
            c.autocommit = True
            return {"simple": simple, "extended": extended, "named": named, "named_again": named_again,
                    "in_txn": in_txn, "aborted": aborted, "after": c.execute("select 42").fetchone()[0]}

    def large(self):
        with self.connect() as c:
            rows = c.execute(LARGE_SQL).fetchall()
            return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}

    def copy(self):
        with self.connect() as c, c.cursor() as cur:
            cur.execute("delete from drv_copy where driver = %s", (self.name,))
            with cur.copy("copy drv_copy (driver, n, s) from stdin") as cp:
                for n in range(1, 1001):
                    cp.write_row((self.name, n, f"row-{n}"))
            copied_in = cur.rowcount
            with cur.copy("copy (select n, s from drv_copy where driver = {} order by n) to stdout".format(
                    _literal(self.name))) as cp:
                rows = list(cp.rows())
            return {"copied_in": copied_in, "out_rows": len(rows), "sum": sum(int(r[0]) for r in rows),
                    "last": rows[-1][1] if rows else None, **_after(c.execute("select 1, pg_backend_pid()").fetchone())}

    def cancel(self):
        import psycopg
        with self.connect() as c:
            started = time.monotonic()
            timer = threading.Timer(CANCEL_AFTER, c.cancel_safe)
            timer.start()
            try:
                c.execute("select pg_sleep(120)")
                code = None
            except psycopg.Error as e:
                code = e.sqlstate
            finally:
                timer.cancel()
            seconds = time.monotonic() - started
            return {"code": code, "seconds": seconds, "after": c.execute("select 1").fetchone()[0]}


class Asyncpg:
    """asyncpg: every query is a named prepared statement (its statement cache)."""

    name = "asyncpg"

    def __init__(self, dsn: str):
        self.dsn = dsn

    def connect(self):
        import asyncpg
        return asyncpg.connect(self.dsn, timeout=10)  # sslmode=verify-full + sslrootcert from the URL

    def __getattr__(self, case):  # basic() runs self._basic() in a fresh event loop, etc.
        coro = getattr(type(self), f"_{case}", None)
        if coro is None:
            raise AttributeError(case)
        return lambda: asyncio.run(asyncio.wait_for(coro(self), 60))

    async def _basic(self):
        c = await self.connect()
        try:
            one = await c.fetchval("select 1 as one")
            status = await c.execute("select 1 as a; select 'two' as b")  # no args: one simple Query
            return {"one": one, "sum": await c.fetchval("select $1::int + $2::int", 2, 3),
                    "text": await c.fetchval("select $1::text", "héllo ✓"),
                    "multi": [1, "two"] if status == "SELECT 1" else [status]}
        finally:
            await c.close()

    async def _prepared(self):
        conns = [await self.connect() for _ in range(CLIENTS)]
        barrier = asyncio.Barrier(CLIENTS)
        results = []

        async def work(c):
            async with c.transaction():  # all at once: >= CLIENTS warm server connections
                await c.fetchval("select pg_backend_pid()")
                await asyncio.wait_for(barrier.wait(), 20)
            stmt = await c.prepare("select $1::int * 2 as v, pg_backend_pid() as pid /* asyncpg */")
            done = correct = 0
            pids = set()
            for i in range(EXECUTIONS):
                v, pid = await stmt.fetchrow(i)
                done += 1
                correct += v == 2 * i
                pids.add(pid)
            results.append((done, correct, pids))

        try:
            await asyncio.gather(*(work(c) for c in conns))
        finally:
            for c in conns:
                await c.close()
        return _prepared_result(results)

    async def _transaction(self):
        c = await self.connect()
        count = "select count(*) from drv_rows where driver = $1"
        try:
            await c.execute("delete from drv_rows where driver = $1", self.name)
            tr = c.transaction()
            await tr.start()
            await c.execute("insert into drv_rows (driver, id, v) values ($1, 1, 'rolled back')", self.name)
            inside = await c.fetchval(count, self.name)
            await tr.rollback()
            after = await c.fetchval(count, self.name)
            async with c.transaction():
                await c.execute("insert into drv_rows (driver, id, v) values ($1, 2, 'kept')", self.name)
            return {"inside": inside, "after_rollback": after, "committed": await c.fetchval(count, self.name)}
        finally:
            await c.close()

    async def _error(self):
        import asyncpg

        async def state(aw):
            try:
                await aw
            except asyncpg.PostgresError as e:
                return e.sqlstate
            return None

        c = await self.connect()
        try:
            simple = await state(c.execute("select 1/0"))  # no args: simple Query
            extended = await state(c.fetchval("select $1::int / $2::int", 1, 0))
            named = await state(c.fetchval("select $1::int / $2::int as q", 1, 0))
            named_again = await c.fetchval("select $1::int / $2::int as q", 6, 3)
            tr = c.transaction()
            await tr.start()
            in_txn = await state(c.fetchval("select 1/0"))
            aborted = await state(c.fetchval("select 1"))
            await tr.rollback()
            return {"simple": simple, "extended": extended, "named": named, "named_again": named_again,
                    "in_txn": in_txn, "aborted": aborted, "after": await c.fetchval("select 42")}
        finally:
            await c.close()

    async def _large(self):
        c = await self.connect()
        try:
            rows = await c.fetch(LARGE_SQL)
            return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}
        finally:
            await c.close()

    async def _copy(self):
        c = await self.connect()
        try:
            await c.execute("delete from drv_copy where driver = $1", self.name)
            # text format from a file-like object, then binary format from records
            text = "".join(f"{self.name}\t{n}\trow-{n}\n" for n in range(1, 501)).encode()
            st1 = await c.copy_to_table("drv_copy", source=io.BytesIO(text), columns=["driver", "n", "s"])
            st2 = await c.copy_records_to_table("drv_copy", columns=["driver", "n", "s"],
                                                records=[(self.name, n, f"row-{n}") for n in range(501, 1001)])
            copied_in = int(st1.split()[-1]) + int(st2.split()[-1])
            out = io.BytesIO()
            await c.copy_from_query("select n, s from drv_copy where driver = $1 order by n", self.name, output=out)
            rows = [line.split("\t") for line in out.getvalue().decode().splitlines()]
            return {"copied_in": copied_in, "out_rows": len(rows), "sum": sum(int(r[0]) for r in rows),
                    "last": rows[-1][1] if rows else None, **_after(await c.fetchrow("select 1, pg_backend_pid()"))}
        finally:
            await c.close()

    async def _cancel(self):
        # asyncpg has no public cancel(): a query timeout makes it send a CancelRequest (on a new
        # connection, with the BackendKeyData the proxy gave it) and swallow the origin's 57014.
        # The test checks the origin's log for the cancellation instead.
        c = await self.connect()
        try:
            started = time.monotonic()
            try:
                await c.fetch("select pg_sleep(120)", timeout=CANCEL_AFTER)
                code = None
            except asyncio.TimeoutError:
                code = "client-timeout"
            after = await c.fetchval("select 1")  # waits for the cancelled query's end
            return {"code": code, "seconds": time.monotonic() - started, "after": after}
        finally:
            await c.close()


class Pg8000:
    """pg8000's native API (named statements for prepare(), unnamed for run() with parameters,
    a simple Query for run() without parameters)."""

    name = "pg8000"

    def __init__(self, dsn: str):
        self.dsn = dsn
        u = urlsplit(dsn)
        self.kwargs = dict(user=unquote(u.username), password=unquote(u.password), host=u.hostname,
                           port=u.port, database=unquote(u.path.lstrip("/")), ssl_context=_verify_full(dsn),
                           timeout=60)

    def connect(self):
        import pg8000.native
        return pg8000.native.Connection(**self.kwargs)

    @staticmethod
    def _state(fn):
        import pg8000.native
        try:
            fn()
        except pg8000.native.DatabaseError as e:
            return e.args[0].get("C")
        return None

    def basic(self):
        c = self.connect()
        try:
            one = c.run("select 1 as one")[0][0]  # no parameters: simple Query
            multi = c.run("select 1 as a; select 'two' as b")  # pg8000 concatenates the results' rows
            return {"one": one, "sum": c.run("select cast(:a as int) + cast(:b as int)", a=2, b=3)[0][0],
                    "text": c.run("select cast(:t as text)", t="héllo ✓")[0][0], "multi": [r[0] for r in multi]}
        finally:
            c.close()

    def prepared(self):
        conns = [self.connect() for _ in range(CLIENTS)]
        barrier = threading.Barrier(CLIENTS, timeout=20)
        results = []

        def work(c):
            c.run("begin")  # all at once: >= CLIENTS warm server connections
            c.run("select pg_backend_pid()")
            barrier.wait()
            c.run("commit")
            ps = c.prepare("select cast(:v as int) * 2, pg_backend_pid() /* pg8000 */")
            done = correct = 0
            pids = set()
            for i in range(EXECUTIONS):
                v, pid = ps.run(v=i)[0]
                done += 1
                correct += v == 2 * i
                pids.add(pid)
            ps.close()
            results.append((done, correct, pids))

        try:
            _run_threads(work, conns)
        finally:
            for c in conns:
                c.close()
        return _prepared_result(results)

    def transaction(self):
        c = self.connect()
        count = "select count(*) from drv_rows where driver = :d"
        try:
            c.run("delete from drv_rows where driver = :d", d=self.name)
            c.run("begin")
            c.run("insert into drv_rows (driver, id, v) values (:d, 1, 'rolled back')", d=self.name)
            inside = c.run(count, d=self.name)[0][0]
            c.run("rollback")
            after = c.run(count, d=self.name)[0][0]
            c.run("begin")
            c.run("insert into drv_rows (driver, id, v) values (:d, 2, 'kept')", d=self.name)
            c.run("commit")
            return {"inside": inside, "after_rollback": after, "committed": c.run(count, d=self.name)[0][0]}
        finally:
            c.close()

    def error(self):
        c = self.connect()
        st = self._state
        try:
            simple = st(lambda: c.run("select 1/0"))
            extended = st(lambda: c.run("select cast(:a as int) / cast(:b as int)", a=1, b=0))
            ps = c.prepare("select cast(:a as int) / cast(:b as int) as q")
            named = st(lambda: ps.run(a=1, b=0))
            named_again = ps.run(a=6, b=3)[0][0]
            c.run("begin")
            in_txn = st(lambda: c.run("select 1/0"))
            aborted = st(lambda: c.run("select 1"))
            c.run("rollback")
            return {"simple": simple, "extended": extended, "named": named, "named_again": named_again,
                    "in_txn": in_txn, "aborted": aborted, "after": c.run("select 42")[0][0]}
        finally:
            c.close()

    def large(self):
        c = self.connect()
        try:
            rows = c.run(LARGE_SQL)
            return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}
        finally:
            c.close()

    def copy(self):
        c = self.connect()
        try:
            c.run("delete from drv_copy where driver = :d", d=self.name)
            data = "".join(f"{self.name}\t{n}\trow-{n}\n" for n in range(1, 1001))
            c.run("copy drv_copy (driver, n, s) from stdin", stream=io.StringIO(data))
            copied_in = c.row_count
            out = io.StringIO()
            c.run(f"copy (select n, s from drv_copy where driver = {_literal(self.name)} order by n) to stdout",
                  stream=out)
            rows = [line.split("\t") for line in out.getvalue().splitlines()]
            return {"copied_in": copied_in, "out_rows": len(rows), "sum": sum(int(r[0]) for r in rows),
                    "last": rows[-1][1] if rows else None, **_after(c.run("select 1, pg_backend_pid()")[0])}
        finally:
            c.close()

    def cancel(self):
        # pg8000 has no cancel API: we send the CancelRequest ourselves with the BackendKeyData
        # the proxy gave this connection (what libpq's PQcancel does).
        c = self.connect()
        try:
            key = bytes(c._backend_key_data)
            started = time.monotonic()
            timer = threading.Timer(CANCEL_AFTER, _send_cancel, (self.kwargs["host"], self.kwargs["port"], key))
            timer.start()
            try:
                code = self._state(lambda: c.run("select pg_sleep(120)"))
            finally:
                timer.cancel()
            seconds = time.monotonic() - started
            return {"code": code, "seconds": seconds, "after": c.run("select 1")[0][0]}
        finally:
            c.close()


class SqlAlchemy:
    """SQLAlchemy 2 Core on the psycopg 3 dialect (`postgresql+psycopg://`), server-side prepare on."""

    name = "sqlalchemy"

    def __init__(self, dsn: str):
        self.url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    def engine(self):
        from sqlalchemy import create_engine
        return create_engine(self.url, pool_size=CLIENTS, connect_args={"prepare_threshold": 0, "connect_timeout": 10})

    def _with(self, fn):
        engine = self.engine()
        try:
            with engine.connect() as c:
                return fn(c)
        finally:
            engine.dispose()

    @staticmethod
    def _state(c, fn):
        from sqlalchemy.exc import DBAPIError
        try:
            fn()
        except DBAPIError as e:
            c.rollback()
            return getattr(e.orig, "sqlstate", None)
        return None

    def basic(self):
        from sqlalchemy import text

        def run(c):
            one = c.exec_driver_sql("select 1 as one").scalar()
            # several statements in one execute (a simple Query): SQLAlchemy has no notion of
            # it, the DBAPI cursor does (prepare=False: prepare_threshold=0 would Parse it)
            with c.connection.driver_connection.cursor() as cur:
                cur.execute("select 1 as a; select 'two' as b", prepare=False)
                multi = [cur.fetchone()[0]]
                cur.nextset()
                multi.append(cur.fetchone()[0])
            return {"one": one, "multi": multi,
                    "sum": c.execute(text("select cast(:a as int) + cast(:b as int)"), {"a": 2, "b": 3}).scalar(),
                    "text": c.execute(text("select cast(:t as text)"), {"t": "héllo ✓"}).scalar()}
        return self._with(run)

    def prepared(self):
        from sqlalchemy import text
        engine = self.engine()
        barrier = threading.Barrier(CLIENTS, timeout=20)
        results = []
        q = text("select cast(:v as int) * 2, pg_backend_pid() /* sqlalchemy */")

        def work(_):
            with engine.connect() as c:
                with c.begin():  # all at once: >= CLIENTS warm server connections
                    c.execute(text("select pg_backend_pid()"))
                    barrier.wait()
                done = correct = 0
                pids = set()
                for i in range(EXECUTIONS):
                    v, pid = c.execute(q, {"v": i}).one()
                    done += 1
                    correct += v == 2 * i
                    pids.add(pid)
                c.commit()
                results.append((done, correct, pids))

        try:
            _run_threads(work, range(CLIENTS))
        finally:
            engine.dispose()
        return _prepared_result(results)

    def transaction(self):
        from sqlalchemy import text
        count = text("select count(*) from drv_rows where driver = :d")

        def run(c):
            c.execute(text("delete from drv_rows where driver = :d"), {"d": self.name})
            c.commit()
            tx = c.begin()
            c.execute(text("insert into drv_rows (driver, id, v) values (:d, 1, 'rolled back')"), {"d": self.name})
            inside = c.execute(count, {"d": self.name}).scalar()
            tx.rollback()
            after = c.execute(count, {"d": self.name}).scalar()
            c.rollback()
            with c.begin():
                c.execute(text("insert into drv_rows (driver, id, v) values (:d, 2, 'kept')"), {"d": self.name})
            committed = c.execute(count, {"d": self.name}).scalar()
            c.rollback()
            return {"inside": inside, "after_rollback": after, "committed": committed}
        return self._with(run)

    def error(self):
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        def run(c):
            st = self._state
            simple = st(c, lambda: c.exec_driver_sql("select 1/0"))
            extended = st(c, lambda: c.execute(text("select cast(:a as int) / cast(:b as int)"), {"a": 1, "b": 0}))
            named = st(c, lambda: c.execute(text("select cast(:a as int) / cast(:b as int) as q"), {"a": 1, "b": 0}))
            named_again = c.execute(text("select cast(:a as int) / cast(:b as int) as q"), {"a": 6, "b": 3}).scalar()
            c.rollback()
            c.begin()
            in_txn = aborted = None
            try:
                c.execute(text("select 1/0"))
            except DBAPIError as e:
                in_txn = e.orig.sqlstate
            try:
                c.execute(text("select 1"))
            except DBAPIError as e:
                aborted = e.orig.sqlstate
            c.rollback()
            return {"simple": simple, "extended": extended, "named": named, "named_again": named_again,
                    "in_txn": in_txn, "aborted": aborted, "after": c.execute(text("select 42")).scalar()}
        return self._with(run)

    def large(self):
        from sqlalchemy import text

        def run(c):
            rows = c.execute(text(LARGE_SQL)).all()
            return {"rows": len(rows), "bytes": sum(len(r[0]) for r in rows)}
        return self._with(run)

    def copy(self):
        # SQLAlchemy has no COPY API: the usual way is the DBAPI connection underneath (psycopg).
        def run(c):
            raw = c.connection.driver_connection
            with raw.cursor() as cur:
                cur.execute("delete from drv_copy where driver = %s", (self.name,))
                with cur.copy("copy drv_copy (driver, n, s) from stdin") as cp:
                    for n in range(1, 1001):
                        cp.write_row((self.name, n, f"row-{n}"))
                copied_in = cur.rowcount
                with cur.copy("copy (select n, s from drv_copy where driver = {} order by n) to stdout".format(
                        _literal(self.name))) as cp:
                    rows = list(cp.rows())
            raw.commit()
            return {"copied_in": copied_in, "out_rows": len(rows), "sum": sum(int(r[0]) for r in rows),
                    "last": rows[-1][1] if rows else None,
                    **_after(c.exec_driver_sql("select 1, pg_backend_pid()").one())}
        return self._with(run)

    def cancel(self):
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        def run(c):
            raw = c.connection.driver_connection
            started = time.monotonic()
            timer = threading.Timer(CANCEL_AFTER, raw.cancel_safe)
            timer.start()
            try:
                c.execute(text("select pg_sleep(120)"))
                code = None
            except DBAPIError as e:
                code = e.orig.sqlstate
                c.rollback()
            finally:
                timer.cancel()
            seconds = time.monotonic() - started
            return {"code": code, "seconds": seconds, "after": c.execute(text("select 1")).scalar()}
        return self._with(run)


class NodeDriver:
    """A script in tests/node run with `node`: `SCRIPT CASE` with DATABASE_URL, JSON on stdout."""

    def __init__(self, name: str, script: str, dsn: str):
        self.name, self.script, self.dsn = name, script, dsn

    def __getattr__(self, case):
        if case.startswith("_"):
            raise AttributeError(case)
        return lambda: run_node(NODE_DIR / self.script, case, env={"DATABASE_URL": self.dsn, "DRIVER": self.name})


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (Node.js >= 18) is needed for the JavaScript drivers and is not on PATH")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules is missing: run scripts/bootstrap.sh (npm ci in tests/node)")
    return node


def run_node(script: Path, *args: str, env: dict, cwd: Path | None = None) -> dict:
    cp = subprocess.run([node_binary(), str(script), *args], capture_output=True, text=True, timeout=NODE_TIMEOUT,
                        env={**os.environ, "NODE_OPTIONS": "--no-deprecation", **env}, cwd=cwd or NODE_DIR,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{script.name} {' '.join(args)} exited {cp.returncode}\nstderr: {cp.stderr[-3000:]}"
    lines = cp.stdout.strip().splitlines()
    assert lines, f"{script.name} printed nothing; stderr: {cp.stderr[-2000:]}"
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------ helpers

def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _run_threads(fn, items) -> None:
    errors: list[BaseException] = []

    def wrap(item):
        try:
            fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(item,), daemon=True) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a driver thread is still running after 60 s"
    if errors:
        raise errors[0]


def _after(row) -> dict:
    """The query after a COPY: its answer and the origin backend that ran it."""
    return {"after": row[0], "pid": row[1]}


def _prepared_result(results: list[tuple[int, int, set]]) -> dict:
    pids = set().union(*(r[2] for r in results)) if results else set()
    return {"executions": sum(r[0] for r in results), "correct": sum(r[1] for r in results),
            "pids": len(pids), "clients": len(results)}


# ------------------------------------------------------------------------- checks (one per scenario)

def check_basic(r, stack):
    assert r == {"one": 1, "sum": 5, "text": "héllo ✓", "multi": [1, "two"]}


def check_prepared(r, stack):
    assert r["clients"] == CLIENTS
    assert r["executions"] == CLIENTS * EXECUTIONS and r["correct"] == r["executions"], r
    # the same statement ran on several pooled server connections (injected Parse where missing)
    assert r["pids"] >= 2, r


def check_transaction(r, stack):
    assert r == {"inside": 1, "after_rollback": 0, "committed": 1}


def check_error(r, stack):
    assert r == {"simple": "22012", "extended": "22012", "named": "22012", "named_again": 2,
                 "in_txn": "22012", "aborted": "25P02", "after": 42}


def check_large(r, stack):
    assert r == {"rows": 10_000, "bytes": LARGE_BYTES}


def check_copy(r, stack):
    pid = r.pop("pid")
    assert r == {"copied_in": 1000, "out_rows": 1000, "sum": 500_500, "last": "row-1000", "after": 1}
    # The driver has disconnected (cleanly, idle). The server connection that ran its last query
    # went back to the pool when the server said idle, so it is still open at the origin; a proxy
    # that still held it for the client (lost track of the COPY's messages) closes it now.
    time.sleep(0.5)  # the closing (proxy → tunnel → origin) takes milliseconds
    alive = {row[0] for row in stack.cluster.execute("select pid from pg_stat_activity where usename = 'app'")}
    assert pid in alive, (f"origin backend {pid} (the driver's last query after COPY) was closed when the "
                          f"client disconnected: the proxy never gave it back to the pool")


def check_cancel(r, stack):
    assert r["after"] == 1
    assert CANCEL_AFTER <= r["seconds"] < 25, r  # cancelled, not run to its end (the node drivers sleep 30 s)
    if r["code"] != "client-timeout":  # asyncpg swallows the 57014 it provoked; checked at the origin below
        assert r["code"] == "57014", r


CHECKS = {"basic": check_basic, "prepared": check_prepared, "transaction": check_transaction,
          "error": check_error, "large": check_large, "copy": check_copy, "cancel": check_cancel}

DRIVERS = {
    "psycopg": Psycopg,
    "asyncpg": Asyncpg,
    "pg8000": Pg8000,
    "sqlalchemy": SqlAlchemy,
    "node-pg": lambda dsn: NodeDriver("node-pg", "pg_driver.mjs", dsn),
    "postgres.js": lambda dsn: NodeDriver("postgres.js", "postgresjs_driver.mjs", dsn),
}

# Known proxy bugs, xfailed (strict) only until the product is fixed: {(driver, case): reason}.
XFAIL: dict[tuple[str, str], str] = {}


def _params():
    for driver in DRIVERS:
        for case in CHECKS:
            marks = []
            if (driver, case) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=XFAIL[(driver, case)]))
            yield pytest.param(driver, case, id=f"{driver}-{case}", marks=marks)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver,case", list(_params()))
def test_driver(stack, driver, case):
    impl = DRIVERS[driver](stack.dsn)
    cancelled_before = stack.cluster.log_text().count(CANCELLED_AT_ORIGIN) if case == "cancel" else 0
    result = getattr(impl, case)()
    CHECKS[case](result, stack)
    if case == "cancel":  # the CancelRequest reached the origin as one: it cancelled the statement
        assert stack.cluster.log_text().count(CANCELLED_AT_ORIGIN) > cancelled_before


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", list(DRIVERS))
def test_driver_verifies_the_edge(stack, driver, tmp_path):
    """The same connection string with another CA as sslrootcert: the driver refuses the edge's
    certificate, so the matrix above ran with verification really on."""
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca()[0].public_bytes(serialization.Encoding.PEM))
    ca = parse_qs(urlsplit(stack.dsn).query)["sslrootcert"][0]
    assert Path(ca).is_file() and ca in stack.dsn
    impl = DRIVERS[driver](stack.dsn.replace(quote(ca, safe="/"), quote(str(other), safe="/")))
    with pytest.raises(Exception) as refused:
        impl.basic()
    text = f"{refused.value!r} {refused.value}"
    assert re.search(r"certificate verify failed|self[- ]signed certificate|unable to (get|verify)"
                     r"|SELF_SIGNED|UNABLE_TO", text), text[-2000:]


# --------------------------------------------------------------------------------------- the examples

@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", ["psycopg_app.py", "asyncpg_app.py", "sqlalchemy_app.py",
                                     "node_postgres_app.mjs"])
def test_example_app(stack, example, tmp_path):
    env = {**os.environ, "DATABASE_URL": stack.dsn}
    if example.endswith(".mjs"):
        # As in a user's project: the app beside a node_modules that has `pg`.
        (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
        script = tmp_path / example
        shutil.copy(EXAMPLES / example, script)
        argv = [node_binary(), str(script)]
    else:
        argv = [sys.executable, str(EXAMPLES / example)]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{example} exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr[-3000:]}"
    out = cp.stdout
    assert "connected to PostgreSQL " in out, out
    assert "1 + 1 = 2" in out, out
    assert "rolled back: 0 rows" in out, out
    assert "notes:" in out, out
