"""The query cache without sockets: the store (LRU by bytes, invalidation by table, fills and
races), the catalog's verdicts against a known catalog snapshot, and the cache flow inside the
pooling core byte for byte (hits, misses, extended protocol, transactions, coalescing,
stale-while-revalidate and max_age with an injected clock)."""

from __future__ import annotations

import struct
from typing import Mapping

import pytest

from proxy.cache.catalog import OriginCatalog
from proxy.cache.metrics import ConfigMetrics
from proxy.cache.store import MAX_RESULT_BYTES, QueryCache
from proxy.pg.caching import CacheContext, CachePolicy, analyze_batch, extended_request, text_params_have_time_words
from proxy.pg.pooling import ClientCore, ServerState, encode_parse, message
from proxy.pg.statements import StatementRegistry
from tests.unit.test_pg_pooling import BIND_OK, PARSE_OK, SYNC, done, q, rfq, row, take

I16 = struct.Struct("!H")
I32 = struct.Struct("!I")


# --- a known catalog -----------------------------------------------------------------------
FUNCS = [  # schema, name, arguments, defaults, variadic, provolatile, may write tables
    ("pg_catalog", "now", "0", "0", "f", "s", "f"), ("pg_catalog", "random", "0", "0", "f", "v", "f"),
    ("pg_catalog", "lower", "1", "0", "f", "i", "f"), ("pg_catalog", "nextval", "1", "0", "f", "v", "f"),
    ("pg_catalog", "count", "0", "0", "f", "i", "f"), ("pg_catalog", "count", "1", "0", "f", "i", "f"),
    ("pg_catalog", "abs", "1", "0", "f", "i", "f"),
    ("pg_catalog", "length", "1", "0", "f", "i", "f"), ("pg_catalog", "length", "2", "0", "f", "s", "f"),
    ("pg_catalog", "concat", "1", "0", "t", "s", "f"),
    ("public", "my_vol", "0", "0", "f", "v", "t"), ("public", "my_imm", "1", "0", "f", "i", "f"),
    ("public", "my_stable", "0", "0", "f", "s", "f"),
    ("public", "uuid_generate_v4", "0", "0", "f", "v", "f"),  # an extension's volatile function: not a writer
]
RELS = [  # oid, schema, name, kind, rls, view sql, triggers/rules
    ("100", "public", "items", "r", "f", None, "f"),
    ("101", "public", "orders", "r", "f", None, "f"),
    ("102", "public", "v_items", "v", "f", "SELECT items.id FROM items", "f"),
    ("103", "public", "v_now", "v", "f", "SELECT now() AS t", "f"),
    ("104", "public", "secret", "r", "t", None, "f"),
    ("105", "public", "audited", "r", "f", None, "t"),
    ("106", "public", "measurements", "p", "f", None, "f"),
    ("107", "public", "measurements_2026", "r", "f", None, "f"),
    ("108", "public", "parents", "r", "f", None, "f"),
    ("109", "public", "children", "r", "f", None, "f"),
    ("110", "tenant", "items", "r", "f", None, "f"),
    ("111", "public", "v_nested", "v", "f", "SELECT v_now.t FROM v_now", "f"),
    ("1259", "pg_catalog", "pg_class", "r", "f", None, "f"),
]
INHERITS = [("107", "106")]
FKS = [("109", "108")]  # children REFERENCES parents ON DELETE CASCADE


@pytest.fixture
def catalog() -> OriginCatalog:
    c = OriginCatalog()
    c.load([FUNCS, RELS, INHERITS, FKS])
    return c


@pytest.mark.parametrize("sql, tokens", [
    ("SELECT * FROM public.items", {100}),
    ("SELECT 1 /* now() */", set()),
    ("SELECT 'random()'", set()),
    ("SELECT 'now()'", set()),  # a text constant in the select list stays text
    ("select count(*), lower(x) from orders", {101}),
    ("SELECT my_imm(1)", set()),
    ("SELECT * FROM v_items", {100, 102, 110}),  # the view's unqualified "items": every schema
    ("SELECT * FROM measurements", {106, 107}),  # partitions: the whole family
    ("WITH x AS (SELECT id FROM orders) SELECT * FROM x", {101}),
    ("SELECT $1::timestamptz, abs($2)", set()),
    ("SELECT length(v) FROM orders", {101}),  # length(text) is immutable; length(bytea, name) is not
])
def test_cacheable_reads_and_their_tables(catalog, sql, tokens):
    d = catalog.decide(sql.encode())
    assert (d.status, d.reason) == ("cacheable", "read")
    assert d.read_tokens == frozenset(tokens)
    assert not d.writes


def test_unqualified_name_matches_every_schema(catalog):
    assert catalog.decide(b"SELECT * FROM items").read_tokens == {100, 110}
    assert catalog.decide(b"SELECT * FROM tenant.items").read_tokens == {110}


@pytest.mark.parametrize("sql, status, reason", [
    ("SELECT now()", "volatile", "stable function now"),
    ("SELECT random()", "volatile", "volatile function random"),
    ("SELECT nextval('s')", "volatile", "volatile function nextval"),
    ("SELECT my_vol()", "volatile", "volatile function my_vol"),
    ("SELECT my_stable()", "volatile", "stable function my_stable"),
    ("SELECT current_timestamp", "volatile", "stable function current_timestamp"),
    ("SELECT length(b, 'UTF8') FROM orders", "volatile", "stable function length"),
    ("SELECT concat('a', 'b')", "volatile", "stable function concat"),
    ("SELECT * FROM v_now", "volatile", "stable function now"),
    ("SELECT * FROM v_nested", "volatile", "stable function now"),  # a view over a view
    ("SELECT * FROM items WHERE d > 'today'", "volatile", "a 'now'/'today'/'tomorrow'/'yesterday' literal"),
    ("SELECT 'now'::timestamp", "volatile", "a 'now'/'today'/'tomorrow'/'yesterday' literal"),
    ("SELECT 'items'::regclass", "volatile", "cast to regclass"),
    ("SELECT * FROM secret", "uncacheable", "row level security on public.secret"),
    ("SELECT * FROM pg_class", "uncacheable", "system catalog pg_catalog.pg_class"),
    ("SELECT * FROM items FOR UPDATE", "uncacheable", "locking"),
    ("SELECT 1; SELECT 2", "multiplestatements", "multiple"),
    ("SHOW search_path", "notaquery", "utility"),
    ("SELEC 1", "parseerror", None),
])
def test_not_cacheable(catalog, sql, status, reason):
    d = catalog.decide(sql.encode())
    assert d.status == status, d
    if reason is not None:
        assert d.reason == reason


@pytest.mark.parametrize("sql, tokens, write_all", [
    ("INSERT INTO items VALUES (1)", {100, 110}, False),
    ("UPDATE public.orders SET x = 1", {101}, False),
    ("INSERT INTO measurements_2026 VALUES (1)", {106, 107}, False),  # a partition changes its parent's reads
    ("DELETE FROM parents", {108, 109}, False),  # ON DELETE CASCADE reaches children
    ("INSERT INTO audited VALUES (1)", set(), True),  # a trigger may write anything
    ("INSERT INTO v_items VALUES (1)", {100, 102, 110}, False),  # an updatable view writes its base table
    ("INSERT INTO nowhere VALUES (1)", set(), True),  # unknown target: everything
    ("SELECT my_vol()", set(), True),  # a user-defined volatile function may write
    ("INSERT INTO items VALUES (uuid_generate_v4())", {100, 110}, False),
    ("CALL do_things()", set(), True),
    ("DO $$ BEGIN END $$", set(), True),
    ("CREATE TABLE t (i int)", set(), True),
    ("SELEC oops", set(), True),  # cannot parse: cannot tell
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", {101}, False),
])
def test_writes(catalog, sql, tokens, write_all):
    d = catalog.decide(sql.encode())
    assert d.write_all is write_all, d
    if not write_all:
        assert d.write_tokens == frozenset(tokens)
    assert not d.cacheable


def test_ddl_asks_for_a_catalog_reload(catalog):
    assert catalog.decide(b"CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql IMMUTABLE").reload_catalog
    assert not catalog.decide(b"INSERT INTO items VALUES (1)").reload_catalog


def test_unknown_names_fail_closed_until_a_reload_finds_them(catalog):
    d = catalog.decide(b"SELECT brand_new(1)")
    assert d.status == "volatile" and d.unknown == {"brand_new"} and d.write_all
    d = catalog.decide(b"SELECT * FROM brand_new_table")
    assert d.status == "uncacheable" and d.unknown == {"brand_new_table"}
    catalog.load([FUNCS + [("public", "brand_new", "1", "0", "f", "i", "f")], RELS, INHERITS, FKS])
    assert catalog.decide(b"SELECT brand_new(1)").cacheable


def test_reloads_are_rate_limited(catalog):
    catalog.reloading_for(10.0, frozenset({"nowhere"}))
    assert not catalog.may_reload(10.5, frozenset({"new_table"}))
    assert catalog.may_reload(11.0, frozenset({"new_table"}))
    # a name the last reload looked for and did not find: not again for a minute
    assert not catalog.may_reload(11.0, frozenset({"nowhere"}))
    assert catalog.may_reload(10.0 + 61, frozenset({"nowhere"}))


def test_an_unloaded_catalog_knows_nothing():
    c = OriginCatalog()
    assert c.decide(b"SELECT lower('x')").unknown == {"lower"}
    assert c.decide(b"SELECT 1").cacheable  # needs no catalog


# --- the store ---------------------------------------------------------------------------------
def test_lru_by_bytes_and_invalidation_by_table():
    cache = QueryCache(max_bytes=3000)
    ns = cache.namespace("db")
    for i in range(3):
        f = ns.begin_fill(("k", i))
        assert ns.complete_fill(f, b"x" * 500, frozenset({i}), now=0.0) is not None
    assert len(cache) == 3
    cache.get(("k", 0))  # most recently used now
    f = ns.begin_fill(("k", 3))
    ns.complete_fill(f, b"x" * 900, frozenset({3}), now=0.0)
    assert cache.peek(("k", 1)) is None and cache.peek(("k", 0)) is not None  # the LRU one went
    assert ns.invalidate({0}) == 1 and cache.peek(("k", 0)) is None
    assert ns.invalidate_all() == 2 and len(cache) == 0 and cache.bytes == 0


def test_a_write_during_a_fill_keeps_the_old_rows_out():
    ns = QueryCache().namespace("db")
    f = ns.begin_fill("k")
    ns.invalidate({7})  # a write to table 7 while the read of table 7 runs
    assert ns.complete_fill(f, b"old rows", frozenset({7}), now=0.0) is None
    f = ns.begin_fill("k2")
    ns.invalidate({8})  # another table: no harm
    assert ns.complete_fill(f, b"rows", frozenset({7}), now=0.0) is not None
    f = ns.begin_fill("k3")
    ns.invalidate_all()
    assert ns.complete_fill(f, b"rows", frozenset({7}), now=0.0) is None


def test_fills_wake_their_waiters_once():
    ns = QueryCache().namespace("db")
    f = ns.begin_fill("k")
    woke: list[str] = []
    f.add_callback(lambda: woke.append("a"))
    f.add_callback(lambda: woke.append("b"))
    assert ns.fills["k"] is f
    ns.abort_fill(f)
    ns.abort_fill(f)
    assert woke == ["a", "b"] and "k" not in ns.fills
    f.add_callback(lambda: woke.append("late"))  # already done: at once
    assert woke[-1] == "late"


def test_results_over_50_mb_are_not_stored():
    ns = QueryCache(max_bytes=200 * 1024 * 1024).namespace("db")
    f = ns.begin_fill("k")
    assert ns.complete_fill(f, b"x" * (MAX_RESULT_BYTES + 1), frozenset(), now=0.0) is None


# --- the pooling core with the cache ------------------------------------------------------------
def bind(stmt: str, params: tuple[bytes, ...] = (), portal: str = "", result_formats: tuple[int, ...] = ()) -> bytes:
    body = portal.encode() + b"\x00" + stmt.encode() + b"\x00" + I16.pack(0) + I16.pack(len(params))
    for p in params:
        body += I32.pack(len(p)) + p
    body += I16.pack(len(result_formats)) + b"".join(I16.pack(f) for f in result_formats)
    return message(b"B", body)


def execute(max_rows: int = 0, portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\x00" + I32.pack(max_rows))


def describe(kind: bytes, name: str = "") -> bytes:
    return message(b"D", kind + name.encode() + b"\x00")


ROWDESC = message(b"T", I16.pack(1) + b"v\x00" + I32.pack(0) + I16.pack(0) + I32.pack(25) + I16.pack(65535)
                  + I32.pack(0xFFFFFFFF) + I16.pack(0))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class World:
    """One namespace, its catalog, a clock, metrics, and the hooks a service would provide."""

    def __init__(self, max_age: float = 60, swr: float = 15, disabled: bool = False) -> None:
        self.clock = Clock()
        self.cache = QueryCache(clock=self.clock)
        self.ns = self.cache.namespace("origin")
        self.ns.catalog.load([FUNCS, RELS, INHERITS, FKS])
        self.policy = CachePolicy(disabled, max_age, swr)
        self.metrics = ConfigMetrics("cfg", clock=lambda: 0.0)
        self.refreshes: list[tuple[bytes, object]] = []
        self.registry = StatementRegistry()

    def core(self, settings: dict[str, str] | None = None, role: str = "app") -> ClientCore:
        settings = settings or {}

        def prefix_for(values: Mapping[str, str]) -> int:
            return self.cache.prefix(self.ns, role, "db", tuple(sorted(values.items())))

        ctx = CacheContext(self.ns, self.policy, prefix_for, self.metrics, self.clock,
                           lambda req, fill, values: self.refreshes.append((req, fill)), lambda now, names: None)
        return ClientCore(self.registry, settings=settings, cache=ctx)

    def statuses(self) -> dict[str, int]:
        return {k: v for k, v in self.metrics.summary()["queries"]["by_cache_status"].items() if v}


ANSWER = ROWDESC + row(b"a") + row(b"b") + done("SELECT 2")


def run_simple(core: ClientCore, sql: str, answer: bytes = ANSWER, status: bytes = b"I") -> bytes:
    """Send one simple query; if it needs a server, play the origin's answer."""
    core.feed_client(q(sql))
    if core.wants_server:
        core.attach(ServerState())
        assert take(core.to_server) == q(sql)
        core.feed_server(answer + rfq(status))
        if core.can_release:
            core.detach()
    return take(core.to_client)


def test_a_hit_is_the_miss_byte_for_byte_without_a_server():
    w = World()
    c = w.core()
    first = run_simple(c, "SELECT * FROM items")
    assert first == ANSWER + rfq()
    c.feed_client(q("SELECT * FROM items"))
    assert not c.wants_server  # answered locally
    assert take(c.to_client) == first
    assert w.statuses() == {"miss": 1, "hit": 1}


def test_keys_separate_roles_settings_and_texts():
    w = World()
    run_simple(w.core(), "SELECT * FROM items")
    for other in (w.core(role="other"), w.core({"search_path": "tenant"})):
        other.feed_client(q("SELECT * FROM items"))
        assert other.wants_server
    c = w.core()
    c.feed_client(q("SELECT * FROM items "))  # another text
    assert c.wants_server


def test_write_invalidates_at_send_and_at_commit():
    w = World()
    c = w.core()
    run_simple(c, "SELECT * FROM items")
    c.feed_client(q("INSERT INTO items VALUES (3)"))
    assert w.ns.entries == 0  # gone as soon as the write is sent
    c.attach(ServerState())
    take(c.to_server)
    run_simple(w.core(), "SELECT * FROM items")  # another client re-reads before the commit
    assert w.ns.entries == 1
    c.feed_server(done("INSERT 0 1") + rfq())
    assert w.ns.entries == 0  # the write completed: invalidated again
    assert w.statuses() == {"miss": 2, "uncacheable": 1}


def test_reads_inside_a_transaction_are_not_cached():
    w = World()
    c = w.core()
    run_simple(c, "BEGIN", answer=done("BEGIN"), status=b"T")
    c.feed_client(q("SELECT * FROM items"))
    take(c.to_server)
    c.feed_server(ANSWER + rfq(b"T"))
    assert w.ns.entries == 0
    assert w.statuses() == {"notaquery": 1, "transaction": 1}


def test_a_pipelined_read_after_begin_is_a_transaction_read():
    w = World()
    c = w.core()
    c.feed_client(q("BEGIN") + q("SELECT * FROM items") + q("COMMIT"))
    c.attach(ServerState())
    take(c.to_server)
    c.feed_server(done("BEGIN") + rfq(b"T") + ANSWER + rfq(b"T") + done("COMMIT") + rfq(b"I"))
    assert w.ns.entries == 0
    assert w.statuses() == {"notaquery": 2, "transaction": 1}


def test_errors_and_notices_are_never_cached():
    w = World()
    c = w.core()
    err = message(b"E", b"SERROR\x00C22012\x00Mdivision by zero\x00\x00")
    run_simple(c, "SELECT 1/0 FROM items", answer=ROWDESC + err)
    notice = message(b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00")
    run_simple(c, "SELECT * FROM items", answer=ROWDESC + notice + row(b"a") + done("SELECT 1"))
    assert w.ns.entries == 0
    by_event = w.metrics.summary()["queries"]["by_event_status"]
    assert by_event == {"complete": 1, "error": 1}


def test_identical_misses_are_coalesced():
    w = World()
    a, b = w.core(), w.core()
    a.feed_client(q("SELECT * FROM items"))
    assert a.wants_server
    b.feed_client(q("SELECT * FROM items"))
    assert b.wait is not None and not b.wants_server  # waits for a's answer
    woke: list[bool] = []
    b.wait.add_callback(lambda: woke.append(True))
    a.attach(ServerState())
    a.feed_server(ANSWER + rfq())
    assert woke == [True]
    b.resume()
    assert take(b.to_client) == ANSWER + rfq()
    assert w.statuses() == {"miss": 1, "hit": 1}


def test_a_waiter_that_times_out_asks_the_origin():
    w = World()
    a, b = w.core(), w.core()
    a.feed_client(q("SELECT * FROM items"))
    b.feed_client(q("SELECT * FROM items"))
    b.resume(timed_out=True)
    assert b.wants_server and b.wait is None


def test_a_lost_server_releases_the_waiters():
    w = World()
    a, b = w.core(), w.core()
    a.feed_client(q("SELECT * FROM items"))
    b.feed_client(q("SELECT * FROM items"))
    woke: list[bool] = []
    b.wait.add_callback(lambda: woke.append(True))
    a.attach(ServerState())
    a.server_lost()
    assert woke == [True] and not w.ns.fills
    b.resume()
    assert b.wants_server  # it becomes the one that fills


def test_max_age_and_stale_while_revalidate_with_the_clock():
    w = World(max_age=60, swr=15)
    c = w.core()
    first = run_simple(c, "SELECT * FROM items")
    w.clock.t += 59.9
    assert run_simple(c, "SELECT * FROM items") == first and not w.refreshes  # fresh
    w.clock.t += 5  # 64.9 s: stale, within swr
    assert run_simple(c, "SELECT * FROM items") == first
    assert len(w.refreshes) == 1  # one background refresh ...
    assert run_simple(c, "SELECT * FROM items") == first
    assert len(w.refreshes) == 1  # ... however many stale hits
    request, fill = w.refreshes[0]
    assert request == q("SELECT * FROM items")
    # the refresh runs on its own core and refills the entry
    r = w.core()
    r.refresh_fill = fill
    r.feed_client(request)
    r.attach(ServerState())
    take(r.to_server)
    newer = ROWDESC + row(b"new") + done("SELECT 1")
    r.feed_server(newer + rfq())
    assert run_simple(c, "SELECT * FROM items") == newer + rfq()
    w.clock.t += 75.1  # past max_age + swr: gone
    c.feed_client(q("SELECT * FROM items"))
    assert c.wants_server
    c.attach(ServerState())
    c.feed_server(newer + rfq())
    st = w.statuses()
    assert st == {"miss": 2, "hit": 4}, st
    assert w.metrics.summary()["refreshes"] == {"complete": 1, "error": 0}


def test_caching_disabled_counts_queries_as_disabled():
    w = World(disabled=True)
    c = w.core()
    run_simple(c, "SELECT * FROM items")
    run_simple(c, "SELECT * FROM items")
    assert w.ns.entries == 0 and w.statuses() == {"disabled": 2}


def extended(core: ClientCore, stmt_sql: str, params: tuple[bytes, ...] = (), name: str = "",
             result_formats: tuple[int, ...] = (), with_parse: bool = True, max_rows: int = 0) -> bytes:
    msgs = (encode_parse(name, stmt_sql, ()) if with_parse else b"") + bind(name, params, result_formats=result_formats) \
        + describe(b"P") + execute(max_rows) + SYNC
    core.feed_client(msgs)
    if core.wants_server:
        core.attach(ServerState())
        take(core.to_server)
        answer = (PARSE_OK if with_parse else b"") + BIND_OK + ROWDESC + row(b"x" + b"".join(params)) + done("SELECT 1")
        core.feed_server(answer + rfq())
        if core.can_release:
            core.detach()
    return take(core.to_client)


def test_extended_protocol_hits_named_and_unnamed():
    w = World()
    c = w.core()
    miss = extended(c, "SELECT * FROM items WHERE id = $1", (b"1",))
    hit = extended(c, "SELECT * FROM items WHERE id = $1", (b"1",))
    assert hit == miss
    other = extended(c, "SELECT * FROM items WHERE id = $1", (b"2",))  # another value: its own entry
    assert other != miss
    # named statement: Parse once, then Bind/Execute only; the statement is known on later binds
    n1 = extended(c, "SELECT * FROM orders", name="s1")
    n2 = extended(c, "SELECT * FROM orders", name="s1", with_parse=False)
    assert n2 == n1[len(PARSE_OK):]
    assert w.statuses() == {"miss": 3, "hit": 2}


def test_result_formats_and_partial_fetches():
    w = World()
    c = w.core()
    extended(c, "SELECT * FROM items", result_formats=(0,))
    c.feed_client(encode_parse("", "SELECT * FROM items", ()) + bind("", result_formats=(1,)) + describe(b"P")
                  + execute() + SYNC)
    assert c.wants_server  # binary results: another key
    c2 = w.core()
    extended(c2, "SELECT * FROM orders", max_rows=10)
    extended(c2, "SELECT * FROM orders", max_rows=10)
    assert w.statuses()["uncacheable"] == 2  # a row limit is never cached


def test_hit_parses_are_prepared_later_on_a_server():
    w = World()
    extended(w.core(), "SELECT * FROM orders", name="s1")
    c = w.core()
    extended(c, "SELECT * FROM orders", name="s1")  # a hit: Parse answered locally
    # the statement is on no server: a later Bind (a miss: no Describe this time) injects its Parse
    c.feed_client(bind("s1") + execute() + SYNC)
    assert c.wants_server
    c.attach(ServerState())
    sent = take(c.to_server)
    assert sent.startswith(b"P")


def test_batch_shapes():
    p = encode_parse("", "SELECT 1", ())
    assert analyze_batch([(0x50, p), (0x42, bind("")), (0x44, describe(b"P")), (0x45, execute())]) is not None
    assert analyze_batch([(0x42, bind("s")), (0x45, execute())]) is not None
    assert analyze_batch([(0x42, bind("")), (0x45, execute()), (0x45, execute())]) is None
    assert analyze_batch([(0x42, bind("", portal="a")), (0x45, execute(portal="b"))]) is None
    assert analyze_batch([(0x50, p), (0x44, describe(b"S"))]) is None


def test_time_words_in_text_parameters():
    def tail(*params: bytes) -> bytes:
        return bind("", params)[len(b"B") + 4 + 2:]
    assert text_params_have_time_words(tail(b"now"))
    assert text_params_have_time_words(tail(b"1", b"Today"))
    assert not text_params_have_time_words(tail(b"2026-01-01", b"knowledge"))


def test_refresh_request_rebuilds_the_batch():
    req = extended_request(b"SELECT $1", (23,), b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", False, True)
    kinds = [req[i:i + 1] for i in _offsets(req)]
    assert kinds == [b"P", b"B", b"D", b"E", b"S"]


def _offsets(data: bytes) -> list[int]:
    out, off = [], 0
    while off < len(data):
        out.append(off)
        off += 1 + I32.unpack_from(data, off + 1)[0]
    return out


def test_a_batch_split_inside_a_message_is_still_a_hit():
    w = World()
    c = w.core()
    first = extended(c, "SELECT * FROM items WHERE id = $1", (b"7",), name="s7")
    msgs = bind("s7", (b"7",)) + describe(b"P") + execute() + SYNC
    for cut in (3, len(bind("s7", (b"7",))) + 2, len(msgs) - 2):  # inside a message, inside the Sync
        c.feed_client(msgs[:cut])
        assert not c.to_client and not c.wants_server
        c.feed_client(msgs[cut:])
        assert take(c.to_client) == first[len(PARSE_OK):]
    assert w.statuses() == {"miss": 1, "hit": 3}


def test_a_batch_cut_between_messages_goes_out_at_once():
    """Never wait for a Sync the client has not sent: the client may be waiting for what the
    server says first (an error comes at once on a direct connection)."""
    w = World()
    c = w.core()
    extended(c, "SELECT * FROM items WHERE id = $1", (b"7",), name="s7")
    c.feed_client(bind("s7", (b"7",)) + describe(b"P"))
    assert c.wants_server
    server = ServerState()
    c.attach(server)
    sent = take(c.to_server)
    assert sent.endswith(describe(b"P")) and SYNC not in sent


def test_texts_differing_only_in_constants_are_classified_once(catalog):
    for i in range(50):
        assert catalog.decide(f"SELECT * FROM orders WHERE id = {i} AND tag = 'x{i}'".encode()).cacheable
    assert catalog.classifier.misses == 1
    # a date/time word in a constant is judged on the text itself
    assert catalog.decide(b"SELECT * FROM orders WHERE d > 'yesterday'").status == "volatile"
    assert catalog.decide(b"SELECT * FROM orders WHERE d > '2020-01-01'").cacheable


def test_cursor_fetches_of_a_portal_in_a_transaction_do_not_flush_the_cache():
    """JDBC-style fetch size: Bind a named portal, then Execute it with a row limit, batch after
    batch. The later Executes name only the portal: it is still known, and a read."""
    w = World()
    c = w.core()
    run_simple(w.core(), "SELECT * FROM orders")  # an entry that must survive
    run_simple(c, "BEGIN", answer=done("BEGIN"), status=b"T")
    c.feed_client(encode_parse("s", "SELECT * FROM items", ()) + bind("s", portal="cur") + execute(10, "cur") + SYNC)
    c.attach(ServerState())
    take(c.to_server)
    suspended = message(b"s", b"")
    c.feed_server(PARSE_OK + BIND_OK + row(b"a") + suspended + rfq(b"T"))
    c.feed_client(execute(10, "cur") + SYNC)
    take(c.to_server)
    c.feed_server(row(b"b") + done("SELECT 1") + rfq(b"T"))
    assert w.ns.entries == 1
    assert w.statuses() == {"miss": 1, "notaquery": 1, "transaction": 2}


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from proxy.pg.pooling import ClientProtocolError  # noqa: E402

_KINDS = st.sampled_from([b"P", b"B", b"D", b"E", b"C", b"S", b"Q", b"H"])
_MESSAGES = st.lists(st.tuples(_KINDS, st.binary(max_size=40)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_MESSAGES)
def test_malformed_client_messages_are_protocol_errors(msgs):
    """Random bodies for every message kind the cache reads: either handled, or a clear
    ClientProtocolError (the session answers 08P01) — never another exception."""
    w = World()
    run_simple(w.core(), "SELECT * FROM items")  # something in the cache to look up
    c = w.core()
    data = b"".join(message(k, body) for k, body in msgs)
    try:
        c.feed_client(data)
    except ClientProtocolError:
        pass



def test_writes_through_a_config_with_caching_disabled_still_invalidate():
    """Hyperdrive's pattern: one cached config for reads, one uncached for writes. Writes
    through the uncached one must drop the cached reads (same origin database)."""
    w = World()
    run_simple(w.core(), "SELECT * FROM items")
    extended(w.core(), "SELECT * FROM orders WHERE id = $1", (b"1",))
    assert w.ns.entries == 2
    off = World.__new__(World)  # another config on the same namespace, caching off
    off.__dict__.update(w.__dict__)
    off.policy = CachePolicy(disabled=True)
    writer = off.core()
    run_simple(writer, "UPDATE items SET x = 1", answer=done("UPDATE 1"))
    assert w.ns.entries == 1
    writer.feed_client(encode_parse("", "DELETE FROM orders WHERE id = $1", ()) + bind("", (b"1",)) + execute() + SYNC)
    writer.attach(ServerState())
    take(writer.to_server)
    writer.feed_server(PARSE_OK + BIND_OK + done("DELETE 1") + rfq())
    assert w.ns.entries == 0
    assert w.metrics.summary()["queries"]["by_cache_status"]["disabled"] == 2


def _rows2(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"".join(message(b"D", I16.pack(2) + I32.pack(len(a)) + a + I32.pack(len(b)) + b) for a, b in pairs)


def test_a_read_behind_a_settings_readback_waits_for_it_and_is_cached():
    """A statement that may change the session makes the proxy read the settings back once the
    client is idle; a cacheable read that arrives meanwhile waits that round trip (it is cached
    under the settings it runs under) instead of going uncached."""
    w = World()
    c = w.core()
    c.feed_client(q("SELECT set_config('search_path', 'tenant', false)"))
    server = ServerState()
    c.attach(server)
    assert take(c.to_server).startswith(b"Q")
    c.feed_server(ROWDESC + row(b"tenant") + done("SELECT 1") + rfq())
    readback = take(c.to_server)
    assert b"pg_settings" in readback  # the readback went out behind the answer
    assert take(c.to_client).endswith(rfq())
    c.feed_client(q("SELECT * FROM items"))  # the client's next read, before the readback's answer
    assert c.wait is not None and take(c.to_server) == b""  # it waits
    c.feed_server(ROWDESC + _rows2((b"search_path", b"tenant")) + done("SELECT 1") + rfq())
    assert c.wait is not None and c.wait.done
    c.resume()  # (the session calls this once the wait is done)
    assert take(c.to_server) == q("SELECT * FROM items")  # on the same server, judged now
    c.feed_server(ANSWER + rfq())
    assert take(c.to_client) == ANSWER + rfq()
    assert w.statuses().get("miss") == 1 and "uncacheable" not in w.statuses()
    tenant = w.core({"search_path": "tenant"})
    tenant.feed_client(q("SELECT * FROM items"))
    assert not tenant.wants_server and take(tenant.to_client) == ANSWER + rfq()  # stored under tenant's settings
