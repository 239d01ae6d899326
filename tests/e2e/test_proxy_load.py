"""The Postgres proxy of `hd edge` under load and under failure, with real processes:

(a) 200 concurrent clients against a pool limited to 10 origin connections: everything succeeds
    and the origin never sees more than the limit (plus a small margin);
(b) the origin restarted in the middle of the load: only queries in flight fail (with an
    ErrorResponse), everything issued after the restart succeeds at the first try;
(c) through a tunnel, the connector SIGKILLed under in-flight queries: they fail fast and
    clearly, and a new connector brings the config back;
(d) a full pool: the next client gets `Failed to acquire a connection from the pool.` (58000)
    after the acquire timeout, and succeeds on retry once a holder commits.

Every wait is bounded; no test relies on sleeping "long enough".
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import psycopg
import psycopg.pq
import pytest

from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.pg import PgCluster
from tests.harness.procs import async_poll_until

USER, PASSWORD, DB = "app", "load-pw-5e2a", "app"
LIMIT = 10
MARGIN = 2  # the limit is soft: a connection closing while another opens may overlap briefly
ACQUIRE_TIMEOUT = 3.0  # set with `hd edge --connect-timeout` (default 15 s, PRODUCT.md) for a short test
OP_TIMEOUT = 20.0  # no single client operation may take longer than this (a hang is a failure)


@pytest.fixture(scope="module")
def origin():
    cluster = PgCluster(auth="scram-sha-256", tls=True, max_connections=300).start()
    try:
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DB, owner=USER)
        cluster.execute("create table events (id bigserial primary key, client int, n int);"
                        "grant all on events, events_id_seq to public", dbname=DB, user=USER)
        yield cluster
    finally:
        cluster.stop()


def role_for(origin: PgCluster, name: str) -> str:
    """A role of its own for one test, so that backends of earlier tests' (stopped) edges, which
    the origin may still be tearing down, are never counted."""
    role = f"r_{name}"
    origin.create_user(role, PASSWORD)
    return role


def make_config(edge: EdgeProc, origin: PgCluster, name: str, *extra) -> tuple[str, str]:
    role = role_for(origin, name)
    c = edge.hd("hyperdrive", "create", name, "--origin-host", "127.0.0.1", "--origin-port", origin.port,
                "--database", DB, "--origin-user", role, "--origin-password", PASSWORD, *extra)
    return c["connection_string"], role


def origin_backends(origin: PgCluster, role: str) -> int:
    """Connections the proxy holds to the origin: every backend of the role it logs in as
    (our own direct connections are the superuser's)."""
    return origin.execute("select count(*) from pg_stat_activity where usename = %s", (role,))[0][0]


class Sampler(threading.Thread):
    """Counts the proxy's origin connections every few ms over a superuser connection."""

    def __init__(self, origin: PgCluster, role: str, interval: float = 0.005):
        super().__init__(daemon=True)
        self.origin, self.role, self.interval = origin, role, interval
        self.samples: list[int] = []
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.origin.connect() as conn:
                while not self._halt.is_set():
                    cur = conn.execute("select count(*) from pg_stat_activity where usename = %s", (self.role,))
                    self.samples.append(cur.fetchone()[0])
                    self._halt.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


async def aconnect(url: str) -> psycopg.AsyncConnection:
    return await asyncio.wait_for(psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10),
                                  OP_TIMEOUT)


async def bounded(coro, timeout: float = OP_TIMEOUT):
    """Await with a deadline: a hang is reported as such, not as a stuck test."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"a client operation hung for more than {timeout:g}s") from None


# --- (a) many clients, few origin connections -----------------------------------------------------

async def test_200_clients_share_10_origin_connections(edge, origin):
    url, role = make_config(edge, origin, "load", "--origin-connection-limit", str(LIMIT))
    clients, rounds = 200, 5
    sampler = Sampler(origin, role)
    sampler.start()
    started = time.monotonic()

    async def client(i: int) -> int:
        conn = await aconnect(url)
        try:
            done = 0
            for r in range(rounds):
                # a short transaction: a write and a read of it
                async with conn.transaction():
                    cur = await conn.execute("insert into events (client, n) values (%s, %s) returning id", (i, r))
                    (row_id,) = await cur.fetchone()
                    cur = await conn.execute("select client, n from events where id = %s", (row_id,))
                    assert await cur.fetchone() == (i, r)
                # and queries outside transactions (volatile: never answered from a cache)
                cur = await conn.execute("select %s::int + 1, random() >= 0", (i,))
                assert await cur.fetchone() == (i + 1, True)
                done += 1
            return done
        finally:
            await conn.close()

    try:
        results = await bounded(asyncio.gather(*(client(i) for i in range(clients)), return_exceptions=True), 90)
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    assert sum(results) == clients * rounds
    assert sampler.error is None, sampler.error
    assert len(sampler.samples) >= 20, "the sampler barely ran"
    peak = max(sampler.samples)
    assert 1 <= peak <= LIMIT + MARGIN, f"origin connections peaked at {peak} (limit {LIMIT})"
    count = origin.execute("select count(*) from events where n < %s", (rounds,), dbname=DB)[0][0]
    assert count >= clients * rounds
    print(f"200 clients x {rounds} rounds in {elapsed:.1f}s; origin connections peaked at {peak}")


# --- (b) the origin restarts under load -----------------------------------------------------------

@dataclass
class Op:
    started: float
    ended: float = 0.0
    ok: bool = False
    error: BaseException | None = None
    what: str = "query"


@dataclass
class Log:
    ops: list[Op] = field(default_factory=list)

    async def run(self, what: str, coro_fn):
        op = Op(time.monotonic(), what=what)
        self.ops.append(op)
        try:
            result = await asyncio.wait_for(coro_fn(), OP_TIMEOUT)
            op.ok = True
            return result
        except asyncio.TimeoutError:
            op.error = AssertionError(f"{what} hung for more than {OP_TIMEOUT:g}s")
            raise op.error from None
        except psycopg.Error as exc:
            op.error = exc
            raise
        finally:
            op.ended = time.monotonic()


async def test_origin_restart_mid_load(edge, origin):
    url, _role = make_config(edge, origin, "restart", "--origin-connection-limit", str(LIMIT))
    log = Log()
    stop = asyncio.Event()

    async def client(i: int) -> None:
        conn = None
        n = 0
        while not stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        await conn.close()
                    conn = await log.run("connect", lambda: aconnect(url))
                c = conn

                async def txn():
                    async with c.transaction():
                        await c.execute("insert into events (client, n) values (%s, %s)", (1000 + i, n))
                        cur = await c.execute("select count(*) from events where client = %s", (1000 + i,))
                        return await cur.fetchone()

                await log.run("transaction", txn)
                await log.run("query", lambda: c.execute("select random()"))
                n += 1
            except psycopg.Error:
                await asyncio.sleep(0.05)  # retry (reconnecting if the connection is gone)
            await asyncio.sleep(0.01)
        if conn is not None:
            await conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(20)]
    try:
        # load is running: counts, not a fixed sleep (a busy box may be slow to start)
        await async_poll_until(lambda: any(o.ok for o in log.ops), 60, what="a query succeeding before the restart")
        restart_began = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(origin.restart), 60)
        restart_done = time.monotonic()
        await asyncio.sleep(2.0)  # load after the restart ...
        # ... and at least 20 successes among what was issued after it (counts, not the clock)
        await async_poll_until(lambda: sum(1 for o in log.ops if o.started >= restart_done and o.ended and o.ok) >= 20
                               or any(o.started >= restart_done and o.ended and not o.ok for o in log.ops),
                               60, what="load after the restart")
    finally:
        stop.set()
        await bounded(asyncio.gather(*tasks, return_exceptions=True), OP_TIMEOUT + 5)

    unfinished = [o for o in log.ops if o.ended == 0.0]
    assert not unfinished, f"{len(unfinished)} operations never finished"
    hung = [o for o in log.ops if isinstance(o.error, AssertionError)]
    assert not hung, hung[0].error
    after = [o for o in log.ops if o.started >= restart_done]
    failed_after = [o for o in after if not o.ok]
    assert len([o for o in after if o.ok]) >= 20, "too little load after the restart"
    assert not failed_after, (f"{len(failed_after)} of {len(after)} operations issued after the restart failed, "
                              f"first: {failed_after[0].what}: {failed_after[0].error!r}")
    failed = [o for o in log.ops if not o.ok]
    double_fatal = []
    for o in failed:  # only operations in flight while the origin was down
        assert o.started < restart_done and o.ended >= restart_began - 0.5, (o.what, o.error)
        if isinstance(o.error, psycopg.InternalError) and "received 2 results" in str(o.error):
            double_fatal.append(o)  # see test_an_origin_fatal_reaches_the_client_once
            continue
        # ... and each one a clear ErrorResponse (with a SQLSTATE), not a dropped connection
        assert getattr(o.error, "sqlstate", None), f"{o.what} failed without an ErrorResponse: {o.error!r}"
    print(f"restart took {restart_done - restart_began:.1f}s; {len(failed)} operations failed during it "
          f"({sorted({str(getattr(o.error, 'sqlstate', None)) for o in failed})}), {len(after)} after it all succeeded")
    assert not double_fatal, f"{len(double_fatal)} operations got two FATAL ErrorResponses: {double_fatal[0].error}"


def test_an_origin_fatal_reaches_the_client_once(edge, origin):
    url, role = make_config(edge, origin, "fatal")
    pgconn = psycopg.pq.PGconn.connect(url.encode())
    try:
        assert pgconn.status == psycopg.pq.ConnStatus.OK, pgconn.error_message
        pgconn.send_query(b"select pg_sleep(10)")
        deadline = time.monotonic() + 10
        while not origin.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s"
                                 " and query = 'select pg_sleep(10)' and state = 'active'", (role,)):
            assert time.monotonic() < deadline, "the query did not start at the origin"
            time.sleep(0.02)
        errors = []
        pgconn.nonblocking = 0
        for _ in range(5):  # bounded: the proxy closes the connection after the error
            res = pgconn.get_result()
            if res is None:
                break
            state = res.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
            if state is not None:  # an ErrorResponse (libpq's own "connection closed" has none)
                errors.append(state.decode())
            if pgconn.status == psycopg.pq.ConnStatus.BAD:
                break
        assert errors == ["57P01"], f"ErrorResponses received: {errors}"
    finally:
        pgconn.finish()


# --- (c) the connector dies under in-flight queries -----------------------------------------------

async def test_connector_killed_with_queries_in_flight(edge, origin):
    t = edge.hd("tunnel", "create", "vpc")
    edge.hd("tunnel", "route", "vpc", "db.internal.example", "--service", f"tcp://127.0.0.1:{origin.port}")
    tok = edge.hd("access", "service-token", "create", "hd")
    edge.hd("access", "app", "create", "db", "--domain", "db.internal.example", "--service-token", "hd")
    connector = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
    role = role_for(origin, "tunneled")
    c = edge.hd("hyperdrive", "create", "tunneled", "--origin-host", "db.internal.example", "--database", DB,
                "--origin-user", role, "--origin-password", PASSWORD, "--access-client-id", tok["client_id"],
                "--access-client-secret", tok["client_secret"])
    url = c["connection_string"]
    conns = [await aconnect(url) for _ in range(5)]
    try:
        for k in conns:
            await bounded(k.execute("select 1"))

        async def sleeper(k: psycopg.AsyncConnection):
            try:
                await asyncio.wait_for(k.execute("select pg_sleep(2)"), OP_TIMEOUT)
            except asyncio.TimeoutError:
                return AssertionError("the query hung"), time.monotonic()
            except psycopg.Error as exc:
                return exc, time.monotonic()
            return None, time.monotonic()

        tasks = [asyncio.create_task(sleeper(k)) for k in conns]
        # kill only once every query is running at the origin
        deadline = time.monotonic() + 10
        while origin.execute("select count(*) from pg_stat_activity where usename = %s and query = "
                             "'select pg_sleep(2)' and state = 'active'", (role,))[0][0] < len(conns):
            assert time.monotonic() < deadline, "the queries did not start at the origin"
            await asyncio.sleep(0.02)
        connector.proc.kill()  # SIGKILL
        killed = time.monotonic()
        results = await bounded(asyncio.gather(*tasks), OP_TIMEOUT + 5)
        for exc, when in results:
            assert exc is not None, "a query through the dead connector succeeded"
            assert not isinstance(exc, AssertionError), "a query through the dead connector hung"
            assert when - killed < 10, f"failing took {when - killed:.1f}s"
            assert isinstance(exc, psycopg.Error) and exc.sqlstate, f"unclear error: {exc!r}"
        slowest = max(when for _, when in results) - killed
    finally:
        for k in conns:
            await k.close()

    # a new connector: the config works again, at the first try, for new and old clients
    ConnectorProc(edge, t["token"], tunnel=t["id"], name="connector2").start()
    for _ in range(3):
        k = await aconnect(url)
        try:
            cur = await bounded(k.execute("select current_user, random() >= 0"))
            assert await cur.fetchone() == (role, True)
            async with k.transaction():
                await bounded(k.execute("insert into events (client, n) values (-1, 0)"))
        finally:
            await k.close()
    print(f"in-flight queries failed within {slowest:.2f}s of the SIGKILL: {sorted({e.sqlstate for e, _ in results})}")


# --- (d) a full pool ------------------------------------------------------------------------------

async def test_full_pool_refuses_after_the_acquire_timeout(edge_factory, origin):
    # `hd edge --connect-timeout` bounds the wait for a pooled connection too; 3 s keeps this short.
    edge = edge_factory(extra_args=["--connect-timeout", f"{ACQUIRE_TIMEOUT:g}s"])
    url, role = make_config(edge, origin, "small", "--origin-connection-limit", "5", "--caching-disabled")
    holders = [await aconnect(url) for _ in range(5)]
    waiter = await aconnect(url)
    try:
        for h in holders:  # each holds an origin connection in an open transaction
            await bounded(h.execute("begin"))
            await bounded(h.execute("insert into events (client, n) values (-2, 0)"))
        assert origin_backends(origin, role) == 5
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as exc:
            await bounded(waiter.execute("select random()"), 30)
        waited = time.monotonic() - started
        assert exc.value.sqlstate == "58000"
        assert exc.value.diag.message_primary == "Failed to acquire a connection from the pool."
        assert ACQUIRE_TIMEOUT - 1 <= waited < 30, f"refused after {waited:.1f}s"
        assert not waiter.closed and not waiter.broken  # an ordinary error: the client may retry
        assert origin_backends(origin, role) <= 5

        await bounded(holders[0].execute("commit"))
        cur = await bounded(waiter.execute("select 7 * 6"), 5)
        assert await cur.fetchone() == (42,)
        for h in holders[1:]:
            await bounded(h.execute("commit"))
        assert origin_backends(origin, role) <= 5
    finally:
        for k in holders + [waiter]:
            await k.close()
    print(f"the sixth client was refused after {waited:.1f}s")
