"""Isolation through the real proxy (issue 12), judged at the origin: the client's session is
carried and nobody else's shows through; the edge's limits cannot be lifted by a client; the
cache never serves one session's settings to another; prepared statements survive catalog
changes; a client that vanishes gets its query cancelled and its connection counted.

The proxy runs in the test's event loop (tests/harness/inproc.py), with real async drivers and
a real origin cluster."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.harness.inproc import FakeClock, ProxyStack
from tests.harness.pg import PgCluster

STATEMENT_TIMEOUT_MS = 1500


@pytest.fixture(scope="module")
def origin():
    pg = PgCluster(auth="scram-sha-256", tls=True).start()
    try:
        pg.create_user("app", "app-pw")
        pg.create_user("reader", None)
        pg.create_database("app", "app")
        pg.execute("grant reader to app")
        pg.execute("create schema other authorization app;"
                   " create table public.items (v text); insert into public.items values ('public row');"
                   " create table other.items (v text); insert into other.items values ('OTHER ROW');"
                   " create table secrets (v text); insert into secrets values ('s3cret');"
                   " create table t (i int); insert into t values (1);"
                   " create table marks (who text, v int)", dbname="app", user="app")
        pg.execute("grant select on public.items to reader", dbname="app", user="app")
        pg.execute("create function login_as(tenant text) returns void language plpgsql volatile as"
                   " $$ begin perform set_config('app.tenant', tenant, false);"
                   " perform set_config('search_path', 'other, public', false); end $$", dbname="app", user="app")
        yield pg
    finally:
        pg.stop()


@pytest.fixture
async def stack(tmp_path):
    st = await ProxyStack.start(tmp_path, FakeClock(), statement_timeout_ms=STATEMENT_TIMEOUT_MS)
    try:
        yield st
    finally:
        await st.close()


def config(st: ProxyStack, origin: PgCluster, **fields: Any) -> Any:
    return st.add_config(fields.pop("name", "iso"), origin, user="app", password="app-pw", database="app", **fields)


async def connect(st: ProxyStack, cfg: Any, **kw: Any) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(st.dsn(cfg), **kw)  # psycopg's default: not autocommit


async def one(conn: psycopg.AsyncConnection, sql: str, params: Any = None) -> Any:
    cur = await conn.execute(sql, params)
    row = await cur.fetchone()
    return row[0] if row is not None and len(row) == 1 else row


async def eventually(predicate: Any, timeout: float = 60.0) -> None:  # hang guard
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.05)


def origin_sessions(origin: PgCluster) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the proxy's origin connections (only the proxy logs in as app)."""
    return [tuple(r) for r in origin.execute(  # type: ignore[misc]
        "select pid, state, query from pg_stat_activity where usename = 'app' and backend_type = 'client backend'")]


# ----------------------------------------------------------------------------- what a client sees


async def test_show_gives_the_servers_defaults_or_the_clients_own_never_the_proxys(origin, stack):
    cfg = config(stack, origin)
    async with await connect(stack, cfg) as plain, \
            await connect(stack, cfg, application_name="mine", options="-c statement_timeout=5s") as own:
        assert await one(plain, "show application_name") == ""
        assert await one(plain, "show statement_timeout") == "0"
        assert await one(own, "show application_name") == "mine"
        assert await one(own, "show statement_timeout") == "5s"
        assert own.info.parameter_status("application_name") == "mine"
        assert plain.info.parameter_status("application_name") == ""


async def test_settings_are_carried_and_reported_parameters_stay_true(origin, stack):
    cfg = config(stack, origin, origin_connection_limit=5)
    async with await connect(stack, cfg) as a:
        await a.execute("set search_path = other, public")
        await a.execute("set TimeZone = 'Asia/Tokyo'")
        await a.execute("select set_config('app.tenant', '42', false)")
        await a.execute("do $$ begin perform set_config('app.flag', 'on', false); end $$")
        await a.execute("set client_encoding = 'LATIN1'")
        await a.commit()
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert a.info.parameter_status("client_encoding") == "LATIN1"
        for _ in range(3):  # later transactions, whichever server runs them
            assert await one(a, "select v from items") == "OTHER ROW"
            assert await one(a, "select current_setting('app.tenant')") == "42"
            assert await one(a, "select current_setting('app.flag', true)") == "on"
            assert await one(a, "show timezone") == "Asia/Tokyo"
            assert await one(a, "select 'Grüße'::text || '!'") == "Grüße!"  # encoded both ways
            await a.commit()
        await a.execute("set client_encoding = 'UTF8'")
        await a.commit()
        assert a.info.parameter_status("client_encoding") == "UTF8"
        assert await one(a, "select length('Grüße')") == 5


async def test_state_set_by_one_client_never_reaches_the_next_twenty(origin, stack):
    cfg = config(stack, origin, origin_connection_limit=5)
    async with await connect(stack, cfg) as a:
        a_pids = {await one(a, "select pg_backend_pid()")}
        await a.execute("select login_as('tenant-a')")  # a volatile function that sets settings
        await a.execute("set role reader")
        await a.execute("set statement_timeout = 1234")
        await a.execute("create temp table scratch (i int)")
        await a.commit()
        a_pids.add(await one(a, "select pg_backend_pid()"))
        assert await one(a, "select current_user") == "reader"  # a keeps its role…
        assert await one(a, "select current_setting('app.tenant', true)") == "tenant-a"  # …and what login_as set
        await a.commit()
    seen_a = 0
    for _ in range(20):
        async with await connect(stack, cfg) as b:
            pid, user, tenant, path, timeout, temp = await one(
                b, "select pg_backend_pid(), current_user, current_setting('app.tenant', true),"
                   " current_setting('search_path'), current_setting('statement_timeout'),"
                   " to_regclass('pg_temp.scratch') is not null")
            seen_a += pid in a_pids
            assert user == "app" and path == '"$user", public' and timeout == "0" and not temp
            assert tenant in (None, "")  # never a's ('' only where a reset left the name defined)
    assert seen_a, "no later client ran on a's origin connection: the check proved nothing"


async def test_a_rejected_startup_setting_fails_the_login_and_leaks_nothing(origin, stack):
    cfg = config(stack, origin, origin_connection_limit=5)
    with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "statement_timeout"'):
        await connect(stack, cfg, options="-c search_path=other -c statement_timeout=bogus")
    async with await connect(stack, cfg) as b:
        assert await one(b, "show search_path") == '"$user", public'


# ----------------------------------------------------------------------------- limits a client cannot lift


@pytest.mark.parametrize("how", ["set", "startup", "set_config"])
async def test_the_edges_statement_timeout_holds_whatever_the_client_sets(origin, stack, how):
    cfg = config(stack, origin)
    kw = {"options": "-c statement_timeout=0"} if how == "startup" else {}
    async with await connect(stack, cfg, autocommit=True, **kw) as conn:
        if how == "set":
            await conn.execute("set statement_timeout = 0")
        elif how == "set_config":
            await conn.execute("select set_config('statement_timeout', '0', false)")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            await conn.execute("select pg_sleep(120)")
        assert time.monotonic() - started < 60  # cancelled, not run to its end (generous for a busy box)
        assert await one(conn, "select 1") == 1  # the session goes on


async def test_a_shorter_timeout_of_the_clients_own_still_applies(origin, stack):
    cfg = config(stack, origin)
    async with await connect(stack, cfg, autocommit=True) as conn:
        await conn.execute("set statement_timeout = '100ms'")
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            await conn.execute("select pg_sleep(10)")


async def test_vanished_clients_get_their_queries_cancelled_and_stay_within_the_limit(origin, stack):
    cfg = config(stack, origin, origin_connection_limit=5)
    conns = [await asyncpg.connect(stack.dsn(cfg), ssl=False) for _ in range(12)]
    tasks = [asyncio.ensure_future(c.fetch("select pg_sleep(120)")) for c in conns]
    peak = 0

    def sleeping() -> int:
        return sum(1 for _, state, q in origin_sessions(origin) if state == "active" and "pg_sleep" in q)

    def sample() -> int:
        nonlocal peak
        n = len(origin_sessions(origin))
        peak = max(peak, n)
        return n

    await eventually(lambda: sleeping() == 5)
    for c in conns:
        c.terminate()  # the socket goes away without a word
    for t in tasks:
        t.cancel()
    started = time.monotonic()
    # Each vanished client's query is cancelled at the origin; the 7 that waited never ran.
    await eventually(lambda: sample() <= 5 and sleeping() == 0, timeout=60)
    assert time.monotonic() - started < 60  # cancelled, not left to finish their 120 s sleeps
    assert peak <= 5, f"{peak} origin sessions for a limit of 5"
    async with await connect(stack, cfg, autocommit=True) as conn:
        assert await one(conn, "select 1") == 1


# ----------------------------------------------------------------------------- the cache


async def test_one_session_settings_never_poison_the_shared_cache(origin, stack):
    cfg = config(stack, origin)  # caching on
    async with await connect(stack, cfg, autocommit=True) as a:
        await a.execute("select set_config('search_path', 'other, public', false)")
        assert await one(a, "select v from items") == "OTHER ROW"
        assert await one(a, "select v from items") == "OTHER ROW"  # a's own entry, if any
    for _ in range(5):
        async with await connect(stack, cfg, autocommit=True) as b:
            assert await one(b, "select v from items") == "public row"
            assert await one(b, "select v from items") == "public row"
    assert stack.statuses(cfg).get("hit", 0) >= 5  # the cache was in play all along


# ----------------------------------------------------------------------------- prepared statements


async def test_prepared_statements_survive_types_and_tables_changing(origin, stack):
    cfg = config(stack, origin, caching_disabled=True)
    async with await connect(stack, cfg, autocommit=True, prepare_threshold=0) as a:
        await a.execute("create type mood as enum ('sad', 'ok')")
        await a.execute("create table feelings (m mood)")
        await a.execute("insert into feelings values (%s::mood)", ("ok",))
        assert await one(a, "select count(*) from feelings where m = %s::mood", ("ok",)) == 1
        await a.execute("drop table feelings")
        await a.execute("drop type mood")
        await a.execute("create type mood as enum ('sad', 'ok', 'happy')")
        await a.execute("create table feelings (m mood)")
        await a.execute("deallocate all")
        await a.execute("insert into feelings values (%s::mood)", ("happy",))
        assert await one(a, "select count(*) from feelings where m = %s::mood", ("happy",)) == 1
    async with await connect(stack, cfg, autocommit=True, prepare_threshold=0) as b:
        assert await one(b, "select count(*) from feelings where m = %s::mood", ("happy",)) == 1


async def test_a_table_changed_behind_the_proxys_back_is_prepared_afresh(origin, stack):
    cfg = config(stack, origin, caching_disabled=True)
    origin.execute("create table wide (a int); insert into wide values (1)", dbname="app", user="app")
    a = await asyncpg.connect(stack.dsn(cfg), ssl=False)
    try:
        assert [tuple(r) for r in await a.fetch("select * from wide")] == [(1,)]
        origin.execute("alter table wide add column b int default 2", dbname="app", user="app")  # not via the proxy
        b = await asyncpg.connect(stack.dsn(cfg), ssl=False)
        try:
            # b prepares the text afresh: on a direct connection it works, so it must here
            assert [tuple(r) for r in await b.fetch("select * from wide")] == [(1, 2)]
        finally:
            await b.close()
    finally:
        await a.close()
