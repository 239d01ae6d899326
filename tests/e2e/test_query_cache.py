"""The query cache through the real proxy, with real drivers and a real origin.

The proxy runs in the test's event loop (tests/harness/inproc.py) so that max_age and
stale-while-revalidate are tested by moving an injected clock, never by sleeping. The origin
is a throwaway cluster with pg_stat_statements, so "one origin query" is counted by the
origin itself, not by the proxy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.harness.inproc import FakeClock, ProxyStack
from tests.harness.pg import PgCluster

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="module")
def origin():
    pg = PgCluster(auth="scram-sha-256", tls=True,
                   settings={"shared_preload_libraries": "pg_stat_statements"}).start()
    try:
        for user in ("app", "alice", "bob"):
            pg.create_user(user, f"{user}-pw")
        pg.create_database("app", "app")
        pg.create_database("app2", "app")
        pg.execute("create extension pg_stat_statements", dbname="app")
        pg.execute("create schema s1 authorization app; create schema s2 authorization app;"
                   " create schema bobschema authorization bob", dbname="app")
        for db, label in (("app", "app"), ("app2", "app2")):
            pg.execute(f"create table kv (k int primary key, v text); insert into kv values (1, '{label}-one'),"
                       f" (2, '{label}-two'); create table t (id int primary key, n int);"
                       " insert into t values (1, 10), (2, 20); create sequence seq;"
                       " grant all on all tables in schema public to alice, bob;"
                       " grant all on all sequences in schema public to alice, bob", dbname=db, user="app")
        pg.execute("create table s1.items (v text); insert into s1.items values ('from s1');"
                   " create table s2.items (v text); insert into s2.items values ('from s2');"
                   " create table public.items (v text); insert into public.items values ('from public');"
                   " grant select on public.items to alice, bob", dbname="app", user="app")
        pg.execute("create table bobschema.items (v text); insert into bobschema.items values ('bob''s own')",
                   dbname="app", user="bob")
        pg.execute("alter role bob set search_path = bobschema, public")
        pg.execute("create function my_volatile() returns int language sql volatile as 'select 7';"
                   " create function my_immutable(x int) returns int language sql immutable as 'select x * 2';"
                   # falsely IMMUTABLE and slow: lets concurrent identical misses overlap
                   " create function slow_one() returns int language plpgsql immutable as"
                   " $$ begin perform pg_sleep(0.5); return 1; end $$", dbname="app", user="app")
        yield pg
    finally:
        pg.stop()


@pytest.fixture
async def stack(tmp_path):
    clock = FakeClock()
    st = await ProxyStack.start(tmp_path, clock)
    st.clock = clock  # type: ignore[attr-defined]
    try:
        yield st
    finally:
        await st.close()


async def eventually(predicate: Any, timeout: float = 60.0) -> None:  # hang guard
    """Poll (without blocking the loop the proxy runs in) until `predicate()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


def app_config(st: ProxyStack, origin: PgCluster, name: str = "app", user: str = "app", database: str = "app",
               **fields: Any) -> Any:
    return st.add_config(name, origin, user=user, password=f"{user}-pw", database=database, **fields)


async def connect(st: ProxyStack, cfg: Any, **kw: Any) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(st.dsn(cfg), autocommit=True, **kw)


async def run(st: ProxyStack, cfg: Any, conn: psycopg.AsyncConnection, sql: str, params: Any = None,
              binary: bool = False) -> tuple[Any, str]:
    """Run one statement; (raw answer or the error, the cache status it got)."""
    before = st.statuses(cfg)
    cur = conn.cursor(binary=binary)
    try:
        await cur.execute(sql, params)
        res = cur.pgresult
        assert res is not None
        answer: Any = ([(res.fname(c), res.ftype(c), res.fformat(c)) for c in range(res.nfields)],
                       [[res.get_value(r, c) for c in range(res.nfields)] for r in range(res.ntuples)])
    except psycopg.Error as exc:
        answer = exc
    after = st.statuses(cfg)
    changed = [k for k in after if after[k] != before.get(k, 0)]
    assert len(changed) == 1 and after[changed[0]] == before.get(changed[0], 0) + 1, (before, after)
    return answer, changed[0]


# --- hits are the misses, byte for byte ---------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("sql, params", [
    ("select k, v, k * 1.5 as f, '{1,2}'::int[] as a from kv order by k", None),
    ("select * from kv where k = %s", (2,)),
    ("select 1 /* now() */ as one", None),
    ("select 'random()' as s", None),
], ids=["rows", "param", "function-in-comment", "function-in-string"])
async def test_psycopg_hit_is_byte_identical(origin, stack, binary, sql, params):
    cfg = app_config(stack, origin)
    async with await connect(stack, cfg) as conn:
        first, s1 = await run(stack, cfg, conn, sql, params, binary)
        second, s2 = await run(stack, cfg, conn, sql, params, binary)
    assert (s1, s2) == ("miss", "hit")
    assert first == second
    assert first[0][0][2] == (1 if binary else 0)  # the format asked for is the format served


async def test_asyncpg_hit_is_byte_identical(origin, stack):
    cfg = app_config(stack, origin)
    conn = await asyncpg.connect(stack.dsn(cfg), ssl=False)
    try:
        for typ in ("int4", "text"):  # raw binary values, no decoding: compare the bytes
            await conn.set_type_codec(typ, schema="pg_catalog", encoder=lambda v: v, decoder=lambda b: b,
                                      format="binary")
        answers = []
        for _ in range(2):
            before = stack.statuses(cfg).get("hit", 0)
            rows = await conn.fetch("select k, v from kv where k = $1", (1).to_bytes(4, "big"))
            answers.append([tuple(r) for r in rows])
            if _:
                assert stack.statuses(cfg).get("hit", 0) == before + 1
        assert answers[0] == answers[1] == [((1).to_bytes(4, "big"), b"app-one")]
    finally:
        await conn.close()


async def test_node_postgres_hit_is_byte_identical(origin, stack):
    node = shutil.which("node")
    assert node is not None, "node (Node.js >= 18) is needed for the node-postgres test"
    assert (NODE_DIR / "node_modules" / "pg").is_dir(), "run scripts/bootstrap.sh (npm ci in tests/node)"
    cfg = app_config(stack, origin)
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "pg_cache.mjs"), stack.dsn(cfg), "select k, v, k * 2 as d from kv where k >= $1 order by k",
        "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(NODE_DIR))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    for fmt in ("text", "binary"):
        miss, hit = result[fmt]
        assert miss == hit and len(miss["rows"]) == 2
        assert {f[2] for f in miss["fields"]} == ({"text"} if fmt == "text" else {"binary"})
    assert stack.statuses(cfg) == {"miss": 2, "hit": 2}


# --- every status, each from a query that expects it ------------------------------------------
async def test_every_cache_status(origin, stack):
    cfg = app_config(stack, origin)
    off = app_config(stack, origin, name="nocache", caching_disabled=True)
    expected: list[tuple[str, str]] = [
        ("select * from kv order by k", "miss"),
        ("select * from kv order by k", "hit"),
        ("select 1 /* now() */", "miss"),
        ("select 1 /* now() */", "hit"),
        ("select 'random()'", "miss"),
        ("select 'random()'", "hit"),
        ("select now()", "volatile"),
        ("select current_timestamp", "volatile"),
        ("select random()", "volatile"),
        ("select nextval('seq')", "volatile"),
        ("select my_volatile()", "volatile"),
        ("select * from kv for update", "uncacheable"),
        ("update t set n = n where id = 1", "uncacheable"),
        ("select 1; select 2", "multiplestatements"),
        ("show search_path", "notaquery"),
        ("selec 1", "parseerror"),
        ("select length('" + "x" * (1024 * 1024 + 10) + "')", "oversizedquery"),
        ("select repeat('x', 1048576) from generate_series(1, 51)", "oversizedresult"),
    ]
    async with await connect(stack, cfg) as conn:
        for sql, want in expected:
            _, got = await run(stack, cfg, conn, sql)
            assert got == want, (sql[:60], got)
        await conn.execute("begin")
        _, got = await run(stack, cfg, conn, "select * from kv order by k")
        assert got == "transaction"
        await conn.execute("commit")
    async with await connect(stack, off) as conn:
        for _ in range(2):
            _, got = await run(stack, off, conn, "select * from kv order by k")
            assert got == "disabled"
    # exactly one status per query (begin and commit are queries too: notaquery)
    total = sum(stack.statuses(cfg).values())
    assert total == len(expected) + 3
    names = set(stack.statuses(cfg)) | set(stack.statuses(off))
    assert names == {"disabled", "hit", "miss", "uncacheable", "multiplestatements", "notaquery",
                     "oversizedquery", "oversizedresult", "parseerror", "transaction", "volatile"}


async def test_extended_protocol_statuses(origin, stack):
    cfg = app_config(stack, origin)
    async with await connect(stack, cfg) as conn:
        assert (await run(stack, cfg, conn, "select v from kv where k = %s", (1,)))[1] == "miss"
        assert (await run(stack, cfg, conn, "select v from kv where k = %s", (1,)))[1] == "hit"
        assert (await run(stack, cfg, conn, "select now() where %s", (True,)))[1] == "volatile"
        assert (await run(stack, cfg, conn, "select v from kv where k = %s for share", (1,)))[1] == "uncacheable"
        async with conn.transaction():
            assert (await run(stack, cfg, conn, "select v from kv where k = %s", (1,)))[1] == "transaction"
        # a 'now' literal passed as a text parameter is read at execution time: never cached
        assert (await run(stack, cfg, conn, "select %s::text::date - date '2000-01-01'", ("today",)))[1] == "volatile"


# --- keys: what must never share an entry ---------------------------------------------------------
async def test_roles_databases_parameters_and_search_paths_never_share(origin, stack):
    alice = app_config(stack, origin, name="alice", user="alice")
    bob = app_config(stack, origin, name="bob", user="bob")  # bob's search_path finds bobschema.items
    app = app_config(stack, origin, name="app")
    app2 = app_config(stack, origin, name="app2", database="app2")

    async def rows(cfg: Any, sql: str, params: Any = None, **kw: Any) -> list[tuple]:
        async with await connect(stack, cfg, **kw) as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    for _ in range(2):  # the second round is served from the cache: still each its own answer
        assert await rows(alice, "select v from items") == [("from public",)]
        assert await rows(bob, "select v from items") == [("bob's own",)]
        assert await rows(app, "select v from kv where k = 1") == [("app-one",)]
        assert await rows(app2, "select v from kv where k = 1") == [("app2-one",)]
        assert await rows(app, "select v from kv where k = %s", (1,)) == [("app-one",)]
        assert await rows(app, "select v from kv where k = %s", (2,)) == [("app-two",)]
        assert await rows(app, "select v from items", options="-c search_path=s1") == [("from s1",)]
        assert await rows(app, "select v from items", options="-c search_path=s2") == [("from s2",)]
    for cfg in (alice, bob, app, app2):
        assert stack.statuses(cfg).get("hit", 0) >= 1
    # application_name cannot change rows: clients that differ only in it share entries
    hits = stack.statuses(app)["hit"]
    assert await rows(app, "select v from kv where k = 2", application_name="web-1") == [("app-two",)]
    assert await rows(app, "select v from kv where k = 2", application_name="worker-7") == [("app-two",)]
    assert stack.statuses(app)["hit"] == hits + 1


# --- writes -----------------------------------------------------------------------------------
async def test_write_then_read_through_the_proxy_is_fresh_at_once(origin, stack):
    cfg = app_config(stack, origin)
    other = app_config(stack, origin, name="same-origin-other-config")  # the same origin database
    async with await connect(stack, cfg) as conn, await connect(stack, other) as conn2:
        await conn.execute("update t set n = 10 where id = 1")
        for c in (conn, conn2):
            assert (await (await c.execute("select n from t where id = 1")).fetchone()) == (10,)
            assert (await (await c.execute("select n from t where id = 1")).fetchone()) == (10,)  # cached
        await conn.execute("update t set n = 11 where id = 1")  # simple protocol write
        assert (await (await conn2.execute("select n from t where id = 1")).fetchone()) == (11,)
        await conn2.execute("update t set n = %s where id = %s", (12, 1))  # extended protocol, other config
        assert (await (await conn.execute("select n from t where id = 1")).fetchone()) == (12,)
        # Hyperdrive's advice is a second, cache-disabled config for writes: its writes count too
        writer = app_config(stack, origin, name="writer", caching_disabled=True)
        async with await connect(stack, writer) as w:
            await w.execute("update t set n = %s where id = 1", (14,))
        assert (await (await conn.execute("select n from t where id = 1")).fetchone()) == (14,)
        async with conn.transaction():
            await conn.execute("update t set n = 13 where id = 1")
        assert (await (await conn2.execute("select n from t where id = 1")).fetchone()) == (13,)
        assert (await (await conn.execute("select n from t where id = 1")).fetchone()) == (13,)
        # DDL drops every entry of the database
        await conn.execute("select * from kv order by k")
        await conn.execute("select * from kv order by k")
        assert stack.metrics(cfg)["cache"]["entries"] >= 2
        await conn.execute("alter table t add column extra int default 5")
        assert stack.metrics(cfg)["cache"]["entries"] == 0
        assert await (await conn.execute("select * from t where id = 1")).fetchone() == (1, 13, 5)
        await conn.execute("alter table t drop column extra")
        await conn.execute("update t set n = 10 where id = 1")


async def test_functions_created_through_the_proxy_are_judged_at_once(origin, stack):
    cfg = app_config(stack, origin)
    async with await connect(stack, cfg) as conn:
        await conn.execute("select 1")
        await conn.execute("create or replace function fresh_fn(x int) returns int language sql immutable"
                           " as 'select x + 1'")
        assert (await run(stack, cfg, conn, "select fresh_fn(1)"))[1] == "miss"
        assert (await run(stack, cfg, conn, "select fresh_fn(1)"))[1] == "hit"
        await conn.execute("alter function fresh_fn(int) volatile")
        assert (await run(stack, cfg, conn, "select fresh_fn(1)"))[1] == "volatile"
        await conn.execute("drop function fresh_fn(int)")


async def test_direct_writes_show_within_max_age_plus_swr(origin, stack):
    """A write the proxy does not see (made on the origin directly) is served stale for at
    most max_age + swr; within swr one background refresh brings the new value."""
    clock: FakeClock = stack.clock  # type: ignore[attr-defined]
    cfg = app_config(stack, origin, max_age=60, swr=15)
    sql = "select v from kv where k = 2"
    async with await connect(stack, cfg) as conn:
        async def value() -> str:
            return (await (await conn.execute(sql)).fetchone())[0]

        origin.execute("update kv set v = 'v1' where k = 2", dbname="app")
        assert await value() == "v1"  # miss
        origin.execute("update kv set v = 'v2' where k = 2", dbname="app")  # behind the proxy's back
        clock.advance(59.9)
        assert await value() == "v1"  # fresh: a hit
        clock.advance(0.2)  # 60.1 s: stale, within swr
        assert await value() == "v1"  # served stale, and one refresh starts
        await eventually(lambda: stack.metrics(cfg)["refreshes"]["complete"] == 1)
        assert await value() == "v2"  # refreshed in the background: a hit
        origin.execute("update kv set v = 'v3' where k = 2", dbname="app")
        clock.advance(60 + 15 + 0.1)  # past max_age + swr since the refresh: expired
        assert await value() == "v3"
        statuses = stack.statuses(cfg)
        assert statuses == {"miss": 2, "hit": 3}, statuses
        assert stack.metrics(cfg)["refreshes"] == {"complete": 1, "error": 0}
    origin.execute("update kv set v = 'app-two' where k = 2", dbname="app")


# --- coalescing ---------------------------------------------------------------------------------
async def test_concurrent_identical_misses_make_one_origin_query(origin, stack):
    cfg = app_config(stack, origin, origin_connection_limit=10)
    origin.execute("select pg_stat_statements_reset()", dbname="app")
    conns = [await connect(stack, cfg) for _ in range(10)]
    try:
        async def one(c: psycopg.AsyncConnection) -> Any:
            return await (await c.execute("select slow_one()")).fetchone()

        results = await asyncio.wait_for(asyncio.gather(*(one(c) for c in conns)), 30)
    finally:
        for c in conns:
            await c.close()
    assert results == [(1,)] * 10
    calls = origin.execute("select coalesce(sum(calls), 0) from pg_stat_statements where query like '%slow_one()%'"
                           " and query not like '%pg_stat_statements%'", dbname="app")[0][0]
    assert calls == 1, f"the origin ran the query {calls} times"
    assert stack.statuses(cfg) == {"miss": 1, "hit": 9}


async def test_a_waiter_outlives_the_client_it_waited_for(origin, stack):
    """B waits for A's identical query; A's client vanishes mid-query: B is not left hanging,
    it asks the origin itself."""
    cfg = app_config(stack, origin)
    a = await connect(stack, cfg)
    b = await connect(stack, cfg)
    try:
        task_a = asyncio.ensure_future(a.execute("select slow_one()"))
        ns = stack.service.namespace_for(cfg)
        await eventually(lambda: ns.fills)  # A's fill is on its way
        task_b = asyncio.ensure_future(b.execute("select slow_one()"))
        await eventually(lambda: any(f.callbacks for f in ns.fills.values()))  # B waits on it
        a.pgconn.finish()  # A's client goes away without a word
        task_a.cancel()
        cur = await asyncio.wait_for(task_b, 60)
        assert await cur.fetchone() == (1,)
    finally:
        await b.close()
        try:
            await a.close()
        except Exception:
            pass
    assert stack.statuses(cfg).get("miss", 0) >= 1
