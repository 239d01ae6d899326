"""Unit tests for proxy.sql.classify (query-cache statement classification)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sql import (
    BUILTIN_VOLATILE_OR_STABLE,
    Classification,
    ClassificationCache,
    builtin_non_immutable,
    cache_decision,
    classify,
    fallback_provolatile,
)


def decide(sql: str) -> tuple[str, str]:
    return cache_decision(classify(sql), fallback_provolatile)


# --- the cases --------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 /* now() */",
        "SELECT 'random()'",
        "select 'now()'",
        "select $$random()$$",
        "select $fn$ nextval('s') $fn$",
        "select 1 -- now()",
        "select 1 /* outer /* nested now() */ still comment random() */",
        "select E'it\\'s now()'",
        "select 'it''s now()'",
        "select now from t",  # a column named now, not a call
        "select * from t where a = $1",
        "SELECT 1;",
        "select 1 ;  \n ",
        "values (1), (2)",
        "table t",
        "with x as (select 1 as a) select a from x",
        "select lower(name) from users u join orders o on o.uid = u.id",
    ],
)
def test_cacheable(sql: str) -> None:
    c = classify(sql)
    assert c.status == "cacheable", c
    assert c.cacheable
    assert decide(sql) == ("cacheable", "read")
    assert not builtin_non_immutable(c.functions)


@pytest.mark.parametrize(
    ("sql", "fn"),
    [
        ("select now()", "now"),
        ("SELECT NOW()", "now"),
        ("select random()", "random"),
        ("select nextval('s')", "nextval"),
        ("select pg_catalog.now()", "pg_catalog.now"),
        ("select * from t where ts > now() - interval '1 day'", "now"),
        ("select (select random()) from t", "random"),
        ("select 1 from t where exists (select clock_timestamp())", "clock_timestamp"),
        ('select "now"()', "now"),  # quoted identifier call is a call
        ("select gen_random_uuid()", "gen_random_uuid"),
        ("select pg_sleep(1)", "pg_sleep"),
        ("select txid_current()", "txid_current"),
    ],
)
def test_volatile_functions_reported_and_refused(sql: str, fn: str) -> None:
    c = classify(sql)
    assert c.status == "cacheable"  # statement shape is fine ...
    assert fn in c.functions  # ... but the function is reported
    assert decide(sql) == ("volatile", fn)  # ... and refused by volatility


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("select current_timestamp", "current_timestamp"),
        ("select CURRENT_TIMESTAMP(3)", "current_timestamp"),
        ("select current_date", "current_date"),
        ("select current_time", "current_time"),
        ("select localtime", "localtime"),
        ("select localtimestamp", "localtimestamp"),
        ("select current_user", "current_user"),
        ("select session_user", "session_user"),
        ("select user", "user"),
        ("select current_role", "current_role"),
        ("select current_schema", "current_schema"),
        ("select current_catalog", "current_catalog"),
    ],
)
def test_sql_value_keywords_appear_as_functions(sql: str, name: str) -> None:
    c = classify(sql)
    assert name in c.functions
    assert name in BUILTIN_VOLATILE_OR_STABLE
    assert decide(sql)[0] == "volatile"


def test_keyword_in_string_or_comment_is_not_a_function() -> None:
    assert classify("select 'current_timestamp' -- current_user").functions == frozenset()


def test_function_names_schema_qualified_and_case_folded() -> None:
    c = classify('select MySchema.MyFunc(1), "Odd"."Fn"(), abs(-1)')
    assert c.functions == {"myschema.myfunc", "Odd.Fn", "abs"}


def test_user_defined_function_uses_lookup_and_unknown_fails_closed() -> None:
    c = classify("select app.score(x) from t")
    assert cache_decision(c, {"app.score": "i"}.get) == ("cacheable", "read")
    assert cache_decision(c, {"app.score": "s"}.get) == ("stable", "app.score")
    assert cache_decision(c, {"app.score": "v"}.get) == ("volatile", "app.score")
    assert cache_decision(c, {}.get) == ("volatile", "unknown function app.score")


def test_non_immutable_casts_are_stable() -> None:
    assert decide("select 'now'::timestamptz") == ("stable", "cast to timestamptz")
    assert decide("select 'now'::timestamp with time zone")[0] == "stable"
    assert decide("select 't'::regclass")[0] == "stable"
    assert decide("select '1'::int")[0] == "cacheable"


# --- statement shape ----------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    ["select 1; select 2", "select 1;select 2;", "select 1; delete from t", "begin; select 1; commit"],
)
def test_multiple_statements(sql: str) -> None:
    assert classify(sql).status == "multiplestatements"


def test_semicolon_inside_quotes_is_not_a_separator() -> None:
    for sql in ("select ';'", "select $$a;b$$", 'select 1 as ";"', "select 1 /* ; */", "select 1 -- ;\n"):
        assert classify(sql).status == "cacheable", sql


def test_multiple_statements_still_report_writes() -> None:
    c = classify("select 1; delete from t")
    assert c.is_write and c.write_tables == {"t"}


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("select * from t for update", "locking"),
        ("select * from t for share", "locking"),
        ("select * from t for no key update", "locking"),
        ("select * from t for key share skip locked", "locking"),
        ("select * from (select * from t for update) s", "locking"),
        ("with x as (select * from t for update) select * from x", "locking"),
        ("select * into new_t from t", "select_into"),
        ("select * into temp tmp_t from t", "temp_table"),
        ("select * into temporary table tmp_t from t", "temp_table"),
        ("with x as (delete from t returning *) select * from x", "dml_cte"),
        ("with x as (insert into t values (1) returning id) select * from x", "dml_cte"),
        ("with x as (update t set a = 1 returning a) select * from x", "dml_cte"),
        ("select * from pg_temp.scratch", "temp_table"),
        ("select * from t tablesample bernoulli (10)", "tablesample"),
    ],
)
def test_uncacheable_reads(sql: str, reason: str) -> None:
    c = classify(sql)
    assert (c.status, c.reason) == ("uncacheable", reason), c
    assert decide(sql) == ("uncacheable", reason)


def test_data_modifying_cte_reports_write_target() -> None:
    c = classify("with x as (delete from app.t returning *) select * from x")
    assert c.is_write and c.write_tables == {"app.t"}
    assert "app.t" in c.tables


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("insert into t (a) values (1)", {"t"}),
        ("INSERT INTO app.Users SELECT * FROM staging", {"app.users"}),
        ("update app.t set a = now() where id = 1", {"app.t"}),
        ("delete from t using u where t.id = u.id", {"t"}),
        ("merge into t using s on t.id = s.id when matched then delete", {"t"}),
        ('insert into "Quoted"."Tbl" values (1)', {"Quoted.Tbl"}),
        ("copy t from stdin", {"t"}),
    ],
)
def test_writes(sql: str, writes: set[str]) -> None:
    c = classify(sql)
    assert c.is_write
    assert c.write_tables == writes
    assert writes <= c.tables
    assert c.status in ("uncacheable", "notaquery")


def test_write_reads_other_tables() -> None:
    c = classify("insert into t select * from a join b on true")
    assert (c.status, c.reason) == ("uncacheable", "write")
    assert c.tables == {"t", "a", "b"} and c.write_tables == {"t"}


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("create table s.t (a int)", {"s.t"}),
        ("alter table t add column b int", {"t"}),
        ("drop table t", set()),  # DropStmt names are lists, not RangeVars: best effort
        ("truncate a, b", {"a", "b"}),
        ("grant select on t to u", {"t"}),
        ("revoke select on t from u", {"t"}),
        ("comment on table t is 'x'", set()),
        ("create index on t (a)", {"t"}),
        ("create view v as select * from t", {"v", "t"}),
    ],
)
def test_ddl(sql: str, tables: set[str]) -> None:
    c = classify(sql)
    assert c.is_ddl
    assert (c.status, c.reason) == ("uncacheable", "ddl")
    assert tables <= c.tables


def test_truncate_is_write_and_ddl() -> None:
    c = classify("truncate a")
    assert c.is_write and c.is_ddl and c.write_tables == {"a"}


def test_create_temp_table() -> None:
    c = classify("CREATE TEMP TABLE scratch (a int)")
    assert (c.status, c.reason) == ("uncacheable", "temp_table")
    assert c.is_ddl


@pytest.mark.parametrize(
    "sql",
    ["show search_path", "set search_path = a", "begin", "commit", "rollback", "copy t to stdout",
     "explain select 1", "listen x", "discard all", "do $$ begin end $$", "call p()"],
)  # fmt: skip
def test_utility_is_notaquery(sql: str) -> None:
    c = classify(sql)
    assert c.status == "notaquery", c
    assert not c.cacheable


@pytest.mark.parametrize("sql", ["", "   ", ";", ";;", "-- only a comment", "/* c */"])
def test_empty(sql: str) -> None:
    assert (classify(sql).status, classify(sql).reason) == ("notaquery", "empty")


@pytest.mark.parametrize(
    "sql",
    [
        "select 'unterminated",
        "select E'unterminated\\'",
        "select $$unterminated",
        "select $a$ x $b$",
        'select "unterminated',
        "select 1 /* unterminated",
        "select 1 /* /* nested */ unterminated",
        "selec 1",
        "select from where",
        "select 1\x00; drop table t",
    ],
)
def test_parse_errors_fail_closed(sql: str) -> None:
    c = classify(sql)
    assert c.status == "parseerror", c
    assert c.reason.startswith("parse: ")
    assert decide(sql)[0] == "parseerror"


def test_tables_extracted_for_reads() -> None:
    c = classify('select * from public.users u left join "Orders" o on true, lateral (select 1 from db.s.x) q')
    assert c.tables == {"public.users", "Orders", "db.s.x"}
    assert c.write_tables == frozenset()
    assert not c.is_write and not c.is_ddl


# --- cache --------------------------------------------------------------------


def test_cache_parses_once_and_is_bounded() -> None:
    cache = ClassificationCache(max_entries=2)
    a = cache.get("select 1")
    assert cache.get("select 1") is a
    assert (cache.hits, cache.misses) == (1, 1)
    cache.get("select 2")
    cache.get("select 1")  # refresh LRU position
    cache.get("select 3")  # evicts "select 2"
    assert len(cache) == 2
    misses = cache.misses
    cache.get("select 1")
    assert cache.misses == misses
    cache.get("select 2")
    assert cache.misses == misses + 1


def test_cache_skips_huge_texts() -> None:
    cache = ClassificationCache(max_sql_len=10)
    assert cache.get("select 1 + 1 + 1").status == "cacheable"
    assert len(cache) == 0


def test_classification_is_frozen() -> None:
    c = classify("select 1")
    with pytest.raises(AttributeError):
        c.status = "uncacheable"  # type: ignore[misc]


# --- robustness -----------------------------------------------------------------


_SQLISH = st.lists(
    st.sampled_from(
        ["select", " ", "1", "'", "''", "$$", "$a$", '"', ";", "--", "\n", "/*", "*/", "now()", "from", "t",
         "E'\\'", "(", ")", ",", "for update", "into", "with", "as", "delete", "\x00", "\ud800", "é"]
    ),
    max_size=30,
).map("".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _SQLISH))
def test_never_raises(sql: str) -> None:
    c = classify(sql)
    assert isinstance(c, Classification)
    assert c.status in {"cacheable", "multiplestatements", "notaquery", "parseerror", "uncacheable"}
    if c.status == "cacheable":
        assert not c.is_write


def test_deep_nesting_fails_closed() -> None:
    c = classify("select " + "(" * 5000 + "1" + ")" * 5000)
    assert c.status in ("parseerror", "cacheable")
    assert isinstance(c, Classification)
