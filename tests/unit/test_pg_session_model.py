"""The client's session as the pooling core carries it, byte for byte without sockets: settings
read back and re-applied, ParameterStatus kept truthful, state that cannot be carried reset,
errors the proxy raises through the server, pipelines that never hang, stale shared statements."""

from __future__ import annotations

from proxy.pg.pooling import ClientCore, ServerState, message
from proxy.pg.settings import SessionSettings, SqlText, apply_sql, readback_sql
from proxy.pg.statements import StatementRegistry
from tests.unit.test_pg_pooling import (BIND_OK, EXECUTE, I16, I32, PARSE_OK, SYNC, bind, describe, done, err,
                                        parse, q, readback_answer, rfq, row, split, take)


def ps(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


def error(code: str, text: str) -> bytes:
    return message(b"E", b"SERROR\x00C" + code.encode() + b"\x00M" + text.encode() + b"\x00\x00")


def core_with(values: dict[str, str] | None = None, **kw: object) -> ClientCore:
    return ClientCore(StatementRegistry(), settings=SessionSettings(values or {}, login_user="app", **kw))


def finish_readback(core: ClientCore, *rows: tuple[str, str]) -> None:
    sent = take(core.to_server)
    assert sent.startswith(b"Q") and b"pg_settings" in sent, sent
    core.feed_server(readback_answer(*rows))


# ----------------------------------------------------------------------------- settings


def test_apply_sql_sets_the_difference_and_resets_the_rest():
    assert apply_sql({"a": "1"}, {"a": "1"}) == ("", False)
    sql, blocking = apply_sql({"a": "1", "b": "2"}, {"a": "3", "c": "it's"})
    assert sql == ('RESET "b";SELECT pg_catalog.set_config(\'a\', \'3\', false), '
                   "pg_catalog.set_config('c', 'it''s', false);")
    assert not blocking
    sql, blocking = apply_sql({}, {"search_path": "x", "role": "reader"})
    assert blocking and sql.index("'role'") < sql.index("'search_path'")  # role first, and it blocks
    assert apply_sql({"role": "reader"}, {})[1]  # resetting a role blocks too
    assert "E'a\\\\b'" in apply_sql({}, {"x.y": "a\\b"})[0]  # backslashes survive


def test_readback_names_custom_settings_the_session_touched():
    assert "unnest" not in readback_sql([])
    sql = readback_sql(["app.tenant", "search_path"])
    assert "'app.tenant'" in sql and "'search_path'" not in sql.split("unnest")[1]


def test_a_carried_setting_is_applied_on_the_next_server_pipelined():
    a = core_with()
    s1, s2 = ServerState(), ServerState()
    a.feed_client(q("select set_config('search_path', 'tenant_a', false)"))
    a.attach(s1)
    take(a.to_server)
    a.feed_server(message(b"T", b"\x00\x00") + row(b"tenant_a") + done("SELECT 1") + rfq())
    finish_readback(a, ("search_path", "tenant_a"))
    assert a.can_release and take(a.to_client).endswith(done("SELECT 1") + rfq())
    a.detach()
    a.feed_client(q("select * from t"))
    a.attach(s2)
    assert split(take(a.to_server)) == [
        q("SELECT pg_catalog.set_config('search_path', 'tenant_a', false);"), q("select * from t")]
    # the apply's own answer is the proxy's: the client sees only its query's
    a.feed_server(message(b"T", b"\x00\x00") + row(b"tenant_a") + done("SELECT 1") + rfq()
                  + done("SELECT 0") + rfq())
    assert take(a.to_client) == done("SELECT 0") + rfq()
    assert s2.params == {"search_path": "tenant_a"} and a.can_release


def test_reset_of_a_startup_setting_gives_the_startup_value_back():
    a = core_with({"search_path": "tenant_a"})
    server = ServerState()
    server.params = {"search_path": "tenant_a"}
    a.feed_client(q("reset search_path"))
    a.attach(server)
    # right behind the RESET, before anything else of the client's: its startup value again
    assert split(take(a.to_server)) == [
        q("reset search_path"), q("SELECT pg_catalog.set_config('search_path', 'tenant_a', false);")]
    a.feed_server(done("RESET") + rfq() + message(b"T", b"\x00\x00") + row(b"tenant_a") + done("SELECT 1") + rfq())
    assert take(a.to_client) == done("RESET") + rfq()
    assert not a.to_server  # a plain RESET outside a transaction is recorded from its answer
    assert a.settings.values == {"search_path": "tenant_a"}  # as on a direct connection
    assert server.params == {"search_path": "tenant_a"} and a.can_release


def test_reset_all_tells_the_client_nothing_when_its_startup_values_come_back():
    told = {b"application_name": b"mine", b"TimeZone": b"UTC"}
    a = core_with({"application_name": "mine"}, reported=told)
    server = ServerState(reported=dict(told))
    server.params = {"application_name": "mine", "timezone": "Asia/Tokyo"}
    a.settings.values["timezone"] = "Asia/Tokyo"
    a.settings.reported[b"TimeZone"] = b"Asia/Tokyo"
    a.feed_client(q("RESET ALL"))
    a.attach(server)
    assert split(take(a.to_server))[1] == q("SELECT pg_catalog.set_config('application_name', 'mine', false);")
    a.feed_server(ps("application_name", "") + ps("TimeZone", "UTC") + done("RESET") + rfq()
                  + ps("application_name", "mine") + message(b"T", b"\x00\x00") + row(b"mine") + done("SELECT 1")
                  + rfq())
    # as from a direct connection: TimeZone went back to the default, application_name never changed
    assert take(a.to_client) == ps("TimeZone", "UTC") + done("RESET") + rfq()
    assert a.settings.values == {"application_name": "mine"} and server.params == {"application_name": "mine"}


def test_a_plain_set_outside_a_transaction_needs_no_readback():
    a = core_with()
    s1, s2 = ServerState(), ServerState()
    a.feed_client(q('SET search_path = a, "B"'))
    a.attach(s1)
    take(a.to_server)
    a.feed_server(done("SET") + rfq())
    assert not a.to_server and a.can_release and a.settings.known
    a.detach()
    assert not s1.dirty and s1.params == {"search_path": SqlText('a, "B"')}
    a.feed_client(q("select 1"))
    a.attach(s2)  # replayed as written: it means what it meant
    assert split(take(a.to_server))[0] == q('SET "search_path" = a, "B";')


def test_a_plain_set_that_fails_or_runs_in_a_transaction_is_read_back():
    a = core_with()
    a.feed_client(q("set statement_timeout = 'soon'"))
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(error("22023", "invalid value") + rfq())
    finish_readback(a)
    assert a.settings.values == {} and a.can_release
    a.feed_client(q("begin") + q("set search_path = x") + q("commit"))
    take(a.to_server)
    a.feed_server(done("BEGIN") + rfq(b"T") + done("SET") + rfq(b"T") + done("COMMIT") + rfq())
    finish_readback(a, ("search_path", "x"))
    assert a.settings.values == {"search_path": "x"}


def test_the_origin_is_the_truth_a_rolled_back_set_is_not_carried():
    a = core_with()
    server = ServerState()
    a.feed_client(q("begin") + q("set search_path = x") + q("rollback"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(done("BEGIN") + rfq(b"T") + done("SET") + rfq(b"T") + done("ROLLBACK") + rfq())
    finish_readback(a)
    assert a.settings.values == {} and a.can_release


def test_set_config_with_a_literal_name_is_read_back_by_that_name():
    a = core_with()
    a.feed_client(q("select set_config('app.tenant', '42', false)"))
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(message(b"T", b"\x00\x00") + row(b"42") + done("SELECT 1") + rfq())
    sent = take(a.to_server)
    assert b"'app.tenant'" in sent  # the custom name is asked for explicitly
    a.feed_server(readback_answer(("app.tenant", "42")))
    assert a.settings.values == {"app.tenant": "42"}
    a.detach()


def test_set_config_local_needs_nothing():
    a = core_with()
    server = ServerState()
    a.feed_client(q("select set_config('app.tenant', '42', true)"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(message(b"T", b"\x00\x00") + row(b"42") + done("SELECT 1") + rfq())
    assert not a.to_server and a.can_release
    a.detach()
    assert not server.dirty


def test_a_do_block_is_read_back_and_its_server_reset():
    a = core_with()
    server = ServerState()
    a.feed_client(q("do $$begin perform set_config('app.x', '1', false); end$$"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(done("DO") + rfq())
    finish_readback(a, ("search_path", "y"))
    assert a.settings.values == {"search_path": "y"}  # what is visible is carried…
    a.detach()
    assert server.dirty  # …and the server is reset: what the block did may not be visible


def test_a_temp_table_resets_the_server_without_a_readback():
    a = core_with()
    server = ServerState()
    a.feed_client(q("begin") + q("create temp table t (i int)") + q("commit"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(done("BEGIN") + rfq(b"T") + done("CREATE TABLE") + rfq(b"T") + done("COMMIT") + rfq())
    assert not a.to_server and a.can_release
    a.detach()
    assert server.dirty


def test_a_client_that_vanished_is_released_without_a_readback():
    a = core_with()
    server = ServerState()
    a.feed_client(q("select set_config('search_path', 'x', false)"))
    a.attach(server)
    take(a.to_server)
    a.gone = True
    a.feed_server(message(b"T", b"\x00\x00") + row(b"x") + done("SELECT 1") + rfq())
    assert not a.to_server and a.can_release
    a.detach()
    assert server.dirty  # its settings were never read back: reset


# ----------------------------------------------------------------------------- ParameterStatus


def test_parameter_status_reaches_the_client_only_when_it_tells_something_new():
    told = {b"application_name": b"a", b"client_encoding": b"UTF8"}
    a = core_with({"application_name": "a"}, reported=told)
    server = ServerState(reported={b"application_name": b"", b"client_encoding": b"UTF8"})
    a.feed_client(q("select 1"))
    a.attach(server)
    take(a.to_server)
    # applying a's own setting: the server reports it, a knows it already
    a.feed_server(ps("application_name", "a") + message(b"T", b"\x00\x00") + row(b"a") + done("SELECT 1") + rfq()
                  + done("SELECT 1") + rfq())
    assert take(a.to_client) == done("SELECT 1") + rfq()
    assert server.reported[b"application_name"] == b"a"
    # the client's own change is news
    a.feed_client(q("set client_encoding = 'LATIN1'"))
    take(a.to_server)
    a.feed_server(ps("client_encoding", "LATIN1") + done("SET") + rfq())
    assert take(a.to_client) == ps("client_encoding", "LATIN1") + done("SET") + rfq()
    assert not a.to_server  # a plain SET: recorded from its answer
    # setting it back is news again, even on a server where it never changed
    a.detach()
    b_server = ServerState(reported={b"client_encoding": b"UTF8"})
    a.feed_client(q("set client_encoding = 'UTF8'"))
    a.attach(b_server)
    sent = split(take(a.to_server))
    assert b"LATIN1" in sent[0]  # first a's carried settings…
    a.feed_server(ps("client_encoding", "LATIN1") + ps("application_name", "a") + done("SET")
                  + message(b"T", b"\x00\x00") + row(b"x") + done("SELECT 1") + rfq()
                  + ps("client_encoding", "UTF8") + done("SET") + rfq())
    assert take(a.to_client) == ps("client_encoding", "UTF8") + done("SET") + rfq()


def test_a_role_change_is_applied_before_the_client_runs_anything():
    a = core_with({"role": "reader"})
    server = ServerState()
    a.feed_client(q("select secret from t"))
    a.attach(server)
    assert split(take(a.to_server)) == [q("SELECT pg_catalog.set_config('role', 'reader', false);")]
    assert not a.can_release
    a.feed_server(message(b"T", b"\x00\x00") + row(b"reader") + done("SELECT 1") + rfq())
    assert take(a.to_server) == q("select secret from t")  # only now


def test_a_failed_role_change_answers_the_client_and_the_server_is_not_reused():
    a = core_with({"role": "gone"})
    server = ServerState()
    a.feed_client(q("select secret from t"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(error("22023", 'role "gone" does not exist') + rfq())
    out = take(a.to_client)
    assert b'role "gone" does not exist' in out and out.endswith(rfq())
    assert not a.to_server and server.broken  # the query never reached the origin


def test_a_failed_pipelined_apply_ends_the_session():
    a = core_with({"search_path": "x"})
    server = ServerState()
    a.feed_client(q("select 1"))
    a.attach(server)
    take(a.to_server)
    a.feed_server(error("XX000", "boom") + rfq() + done("SELECT 1") + rfq())
    assert a.fatal is not None and b"FATAL" in a.fatal and server.broken


# ----------------------------------------------------------------------------- errors raised through the server


def test_a_reused_statement_name_fails_as_on_the_server():
    a = core_with()
    a.feed_client(parse("s1", "select 1") + SYNC)
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(PARSE_OK + rfq())
    take(a.to_client)
    a.feed_client(q("begin") + parse("s1", "select 2") + bind("s1") + EXECUTE + SYNC)
    # the name is taken unless something outstanding fails: the Parse waits for the BEGIN's answer
    assert split(take(a.to_server)) == [q("begin")]
    a.feed_server(done("BEGIN") + rfq(b"T"))
    sent = split(take(a.to_server))
    # the server parses the text first (a syntax error would come before 42P05), then fails on purpose
    assert sent[0] == parse("", "select 2") and b"hd proxy raises" in sent[1]
    # the server fails on purpose, skips Bind and Execute, answers the Sync: 'E' (failed block)
    a.feed_server(PARSE_OK + err("no such statement") + rfq(b"E"))
    out = take(a.to_client)
    assert out.startswith(done("BEGIN") + rfq(b"T"))
    assert b"42P05" in out and b'prepared statement "s1" already exists' in out and out.endswith(rfq(b"E"))
    assert a.statements["s1"].query == b"select 1"


def test_an_unknown_statement_name_never_reaches_the_server_raw():
    a = core_with()
    a.feed_client(bind("hd_1") + EXECUTE + SYNC)  # a name the proxy itself could use on servers
    a.attach(ServerState())
    sent = take(a.to_server)
    assert b"hd_1" not in sent
    a.feed_server(err("syntax error") + rfq())
    out = take(a.to_client)
    assert b"26000" in out and b'prepared statement "hd_1" does not exist' in out


def test_a_failed_named_parse_then_a_bind_of_it_before_the_sync_does_not_hang():
    a = core_with()
    a.feed_client(parse("s1", "select 1 from nowhere") + message(b"H", b""))
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(err("syntax error"))  # at once, before the client's next messages
    assert take(a.to_client) == err("syntax error")
    assert "s1" not in a.statements  # the statement was not created
    a.feed_client(bind("s1") + EXECUTE + SYNC)
    a.feed_server(rfq())  # the server skipped Bind and Execute; only the Sync is answered
    assert take(a.to_client) == rfq() and a.can_release


def test_a_partial_pipeline_goes_out_when_the_client_sends_nothing_more():
    a = core_with()
    a.feed_client(q("begin"))
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(done("BEGIN") + rfq(b"T"))
    a.feed_client(parse("", "select 1/0") + bind("") + EXECUTE)  # no Sync, no Flush
    assert take(a.to_server) == parse("", "select 1/0") + bind("") + EXECUTE


# ----------------------------------------------------------------------------- prepared statements and the catalog


def test_ddl_through_the_proxy_makes_later_parses_prepare_afresh():
    reg = StatementRegistry()
    a = ClientCore(reg)
    server = ServerState()
    a.feed_client(parse("s", "select * from t") + SYNC)
    a.attach(server)
    assert b"hd_1" in take(a.to_server)
    a.feed_server(PARSE_OK + rfq())
    a.feed_client(q("alter table t add column j int"))
    a.feed_server(done("ALTER TABLE") + rfq())
    a.detach()
    b = ClientCore(reg)
    b.feed_client(parse("s", "select * from t") + SYNC)
    b.attach(server)
    sent = take(b.to_server)
    assert b"hd_1" not in sent and b"hd_2" in sent  # not the statement prepared before the DDL


def test_a_stale_shared_statement_is_prepared_afresh_and_the_group_retried():
    reg = StatementRegistry()
    server = ServerState()
    a = ClientCore(reg)  # prepares the statement on this server
    a.feed_client(parse("x", "select * from t") + SYNC)
    a.attach(server)
    take(a.to_server)
    a.feed_server(PARSE_OK + rfq())
    a.detach()
    # the table changed behind the proxy's back; b prepares the same text and runs it at once
    b = ClientCore(reg)
    b.feed_client(parse("s", "select * from t") + describe(b"S", "s") + bind("s") + EXECUTE + SYNC)
    b.attach(server)
    sent = split(take(b.to_server))
    assert sent[0] == describe(b"S", "hd_1")  # the Parse was answered from the shared statement
    b.feed_server(message(b"t", I16.pack(0)) + message(b"T", b"\x00\x00")
                  + error("0A000", "cached plan must not change result type") + rfq())
    retried = split(take(b.to_server))
    assert retried[0] == parse("hd_2", "select * from t") and retried[1].startswith(b"B") and b"hd_2" in retried[1]
    b.feed_server(PARSE_OK + BIND_OK + row(b"1") + done("SELECT 1") + rfq())
    out = take(b.to_client)
    assert b"cached plan" not in out and out.endswith(row(b"1") + done("SELECT 1") + rfq())
    assert b.statements["s"].server_name == "hd_2"


def test_a_stale_statement_prepared_earlier_fails_as_on_a_direct_connection():
    reg = StatementRegistry()
    a = ClientCore(reg)
    a.feed_client(parse("s", "select * from t") + SYNC)
    a.attach(ServerState())
    take(a.to_server)
    a.feed_server(PARSE_OK + rfq())
    a.feed_client(bind("s") + EXECUTE + SYNC)
    take(a.to_server)
    a.feed_server(error("0A000", "cached plan must not change result type") + rfq())
    assert b"cached plan" in take(a.to_client)  # the client's statement is stale on a direct connection too
    a.feed_client(parse("t", "select * from t") + SYNC)
    assert b"hd_2" in take(a.to_server)  # but a new Parse gets a fresh statement


# ----------------------------------------------------------------------------- statement timeout


def test_a_cancel_by_the_edge_timeout_is_reported_as_a_timeout():
    a = core_with()
    a.feed_client(q("select pg_sleep(100)"))
    a.attach(ServerState())
    take(a.to_server)
    a.timeout_cancelled = True
    a.feed_server(error("57014", "canceling statement due to user request") + rfq())
    out = take(a.to_client)
    assert b"C57014" in out and b"statement timeout" in out and b"user request" not in out
    assert not a.timeout_cancelled


# ----------------------------------------------------------------------------- the cache


def test_settings_being_read_back_keep_the_client_away_from_the_cache():
    from tests.unit.test_query_cache import World, ANSWER
    w = World()
    c = w.core()
    c.feed_client(q("select set_config('search_path', 'other', false)") + q("SELECT * FROM items"))
    c.attach(ServerState())
    take(c.to_server)
    c.feed_server(message(b"T", b"\x00\x00") + row(b"other") + done("SELECT 1") + rfq() + ANSWER + rfq())
    finish_readback(c, ("search_path", "other"))
    assert c.can_release
    assert "miss" not in w.statuses() and not w.ns.entries  # neither stored under the old key…
    c.detach()
    c.feed_client(q("SELECT * FROM items"))
    assert c.wants_server  # …nor served; under the new settings it is a miss of its own
    c.attach(ServerState())
    assert b"'other'" in take(c.to_server)
    c.feed_server(message(b"T", b"\x00\x00") + row(b"other") + done("SELECT 1") + rfq() + ANSWER + rfq())
    assert w.statuses().get("miss") == 1
