"""The transaction-pooling core, byte for byte, without sockets: when a server is held and
released, prepared-statement rewriting and re-preparing, fake answers in order, errors,
dirty sessions and refusals."""

from __future__ import annotations

import struct

import pytest

from proxy.pg.pooling import ClientCore, ServerState, encode_parse, message
from proxy.pg.statements import StatementRegistry

I16 = struct.Struct("!H")
I32 = struct.Struct("!I")


def q(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def parse(name: str, sql: str, oids: tuple[int, ...] = ()) -> bytes:
    return encode_parse(name, sql, oids)


def bind(stmt: str, portal: str = "") -> bytes:
    return message(b"B", portal.encode() + b"\x00" + stmt.encode() + b"\x00" + I16.pack(0) + I16.pack(0) + I16.pack(0))


def describe(kind: bytes, name: str) -> bytes:
    return message(b"D", kind + name.encode() + b"\x00")


def close(kind: bytes, name: str) -> bytes:
    return message(b"C", kind + name.encode() + b"\x00")


EXECUTE = message(b"E", b"\x00" + I32.pack(0))
SYNC = message(b"S", b"")
PARSE_OK = message(b"1", b"")
BIND_OK = message(b"2", b"")
CLOSE_OK = message(b"3", b"")
NO_DATA = message(b"n", b"")


def row(v: bytes) -> bytes:
    return message(b"D", I16.pack(1) + I32.pack(len(v)) + v)


def done(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\x00")


def rfq(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def err(text: str = "boom") -> bytes:
    return message(b"E", b"SERROR\x00C42P01\x00M" + text.encode() + b"\x00\x00")


def split(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(data):
        (n,) = I32.unpack_from(data, off + 1)
        out.append(data[off:off + 1 + n])
        off += 1 + n
    return out


def take(buf: bytearray) -> bytes:
    data = bytes(buf)
    buf.clear()
    return data


@pytest.fixture
def core():
    return ClientCore(StatementRegistry())


def test_simple_query_holds_the_server_only_until_idle(core):
    core.feed_client(q("select 1"))
    assert core.wants_server and not core.to_server
    server = ServerState()
    core.attach(server)
    assert take(core.to_server) == q("select 1")
    answer = message(b"T", b"\x00\x00") + row(b"1") + done("SELECT 1") + rfq()
    core.feed_server(answer[:7])  # arrives in pieces
    assert not core.can_release
    core.feed_server(answer[7:])
    assert take(core.to_client) == answer
    assert core.can_release


def test_a_transaction_keeps_the_server(core):
    core.feed_client(q("begin"))
    core.attach(ServerState())
    core.feed_server(done("BEGIN") + rfq(b"T"))
    assert not core.can_release
    core.feed_client(q("select 1"))
    core.feed_server(done("SELECT 1") + rfq(b"T"))
    assert not core.can_release
    core.feed_client(q("commit"))
    core.feed_server(done("COMMIT") + rfq(b"I"))
    assert core.can_release


def test_named_statement_is_rewritten_and_reprepared_on_another_server(core):
    a, b = ServerState(), ServerState()
    core.feed_client(parse("s1", "select $1", (23,)) + describe(b"S", "s1") + SYNC)
    core.attach(a)
    sent = split(take(core.to_server))
    assert sent[0] == parse("hd_1", "select $1", (23,))
    assert sent[1] == describe(b"S", "hd_1")
    core.feed_server(PARSE_OK + message(b"t", b"") + NO_DATA + rfq())
    assert take(core.to_client) == PARSE_OK + message(b"t", b"") + NO_DATA + rfq()
    assert core.can_release
    core.detach()

    # The next use lands on server b, which has never seen the statement.
    core.feed_client(bind("s1") + EXECUTE + SYNC)
    core.attach(b)
    sent = split(take(core.to_server))
    assert sent == [parse("hd_1", "select $1", (23,)), bind("hd_1"), EXECUTE, SYNC]
    core.feed_server(PARSE_OK + BIND_OK + row(b"1") + done("SELECT 1") + rfq())
    # The injected Parse's ParseComplete is swallowed; the rest is the client's.
    assert take(core.to_client) == BIND_OK + row(b"1") + done("SELECT 1") + rfq()
    assert core.can_release
    core.detach()

    # Back on a: already prepared there, nothing injected.
    core.feed_client(bind("s1") + EXECUTE + SYNC)
    core.attach(a)
    assert split(take(core.to_server)) == [bind("hd_1"), EXECUTE, SYNC]


def test_parse_of_a_statement_the_server_has_is_answered_in_order(core):
    server = ServerState()
    other = ClientCore(core.registry)
    other.feed_client(parse("x", "select 2") + SYNC)
    other.attach(server)
    other.feed_server(PARSE_OK + rfq())
    other.detach()
    # Another client prepares the same text under its own name: the server already has it.
    core.feed_client(parse("", "select 0") + bind("") + EXECUTE + parse("mine", "select 2") + bind("mine")
                     + EXECUTE + SYNC)
    core.attach(server)
    # Something outstanding could still fail (and the server would then skip this Parse): the
    # server answers it, under a name of the client's own (it exists there only if it succeeds).
    assert split(take(core.to_server)) == [parse("", "select 0"), bind(""), EXECUTE, parse("hd_2", "select 2"),
                                           bind("hd_2"), EXECUTE, SYNC]
    core.feed_server(PARSE_OK + BIND_OK + done("SELECT 0") + PARSE_OK + BIND_OK + row(b"2") + done("SELECT 1") + rfq())
    assert take(core.to_client) == (PARSE_OK + BIND_OK + done("SELECT 0") + PARSE_OK + BIND_OK + row(b"2")
                                    + done("SELECT 1") + rfq())


def test_parse_with_nothing_outstanding_is_answered_by_the_proxy(core):
    server = ServerState()
    other = ClientCore(core.registry)
    other.feed_client(parse("x", "select 2") + SYNC)
    other.attach(server)
    other.feed_server(PARSE_OK + rfq())
    other.detach()
    core.feed_client(parse("mine", "select 2") + bind("mine") + EXECUTE + SYNC)
    core.attach(server)
    assert split(take(core.to_server)) == [bind("hd_1"), EXECUTE, SYNC]
    assert take(core.to_client) == PARSE_OK


def test_close_statement_is_answered_locally(core):
    core.feed_client(parse("s", "select 1") + SYNC)
    core.attach(ServerState())
    take(core.to_server)
    core.feed_server(PARSE_OK + rfq())
    take(core.to_client)
    core.feed_client(close(b"S", "s") + SYNC)
    assert split(take(core.to_server)) == [SYNC]
    assert take(core.to_client) == CLOSE_OK  # answered at once: it is first in line
    core.feed_server(rfq())
    assert take(core.to_client) == rfq()
    assert "s" not in core.statements


def test_unnamed_statement_is_resent_when_bind_lands_on_another_server(core):
    core.feed_client(parse("", "select 3") + SYNC)
    core.attach(ServerState())
    take(core.to_server)
    core.feed_server(PARSE_OK + rfq())
    core.detach()
    core.feed_client(bind("") + EXECUTE + SYNC)
    core.attach(ServerState())
    assert split(take(core.to_server)) == [parse("", "select 3"), bind(""), EXECUTE, SYNC]
    take(core.to_client)
    core.feed_server(PARSE_OK + BIND_OK + done("SELECT 1") + rfq())
    assert take(core.to_client) == BIND_OK + done("SELECT 1") + rfq()


def test_error_in_extended_protocol_skips_to_sync(core):
    core.feed_client(parse("bad", "select nope") + bind("bad") + EXECUTE + SYNC)
    server = ServerState()
    core.attach(server)
    take(core.to_server)
    core.feed_server(err("column nope does not exist") + rfq())
    assert take(core.to_client) == err("column nope does not exist") + rfq()
    assert core.can_release
    assert not server.statements.has("hd_1")  # the Parse failed: not prepared there


def test_pipelined_requests_keep_the_server_until_the_last_ready(core):
    core.feed_client(q("select 1") + q("select 2"))
    core.attach(ServerState())
    core.feed_server(done("SELECT 1") + rfq())
    assert not core.can_release
    core.feed_server(done("SELECT 1") + rfq())
    assert core.can_release


def test_flush_without_sync_keeps_the_server(core):
    core.feed_client(parse("", "select 1") + describe(b"S", "") + message(b"H", b""))
    core.attach(ServerState())
    core.feed_server(PARSE_OK + message(b"t", b"") + NO_DATA)
    assert not core.can_release  # no Sync yet: the unnamed statement lives on this server


def readback_answer(*rows: tuple[str, str]) -> bytes:
    """The origin's answer to the proxy's settings readback (name, value rows)."""
    out = message(b"T", b"\x00\x00")
    for name, value in rows:
        out += message(b"D", I16.pack(2) + I32.pack(len(name)) + name.encode() + I32.pack(len(value)) + value.encode())
    return out + done(f"SELECT {len(rows)}") + rfq()


def test_a_set_is_read_back_then_carried_not_reset(core):
    server = ServerState()
    core.feed_client(q("begin") + q("set search_path = x") + q("commit"))
    core.attach(server)
    assert take(core.to_server) == q("begin") + q("set search_path = x") + q("commit")
    core.feed_server(done("BEGIN") + rfq(b"T") + done("SET") + rfq(b"T") + done("COMMIT") + rfq())
    assert take(core.to_client) == done("BEGIN") + rfq(b"T") + done("SET") + rfq(b"T") + done("COMMIT") + rfq()
    # Before the server goes back, the proxy asks it what the session's settings are now.
    readback = take(core.to_server)
    assert readback.startswith(b"Q") and b"pg_settings" in readback and not core.can_release
    core.feed_server(readback_answer(("search_path", "x"), ("role", "none"), ("session_authorization", "")))
    assert not core.to_client and core.can_release
    assert core.settings.values == {"search_path": "x"} and server.params == {"search_path": "x"}
    core.detach()
    assert not server.dirty  # carried, not reset


def test_set_local_needs_no_readback(core):
    core.feed_client(q("begin") + q("set local search_path = x") + q("commit"))
    core.attach(ServerState())
    core.feed_server(done("BEGIN") + rfq(b"T") + done("SET") + rfq(b"T") + done("COMMIT") + rfq())
    assert core.can_release and core.settings.values == {}


def test_copy_in_holds_the_server_until_done(core):
    core.feed_client(q("copy t from stdin"))
    core.attach(ServerState())
    core.feed_server(message(b"G", b"\x00\x00\x00"))
    assert core.copy_in and not core.can_release
    core.feed_client(message(b"d", b"1\n") + message(b"c", b""))
    assert split(take(core.to_server))[-2:] == [message(b"d", b"1\n"), message(b"c", b"")]
    core.feed_server(done("COPY 1") + rfq())
    assert core.can_release


def test_startup_settings_are_applied_and_their_answers_hidden(core):
    c = ClientCore(StatementRegistry(), settings={"application_name": "it's me", "bad name;": "x"})
    server = ServerState()
    c.feed_client(q("select 1"))
    c.attach(server)
    sent = split(take(c.to_server))
    # quoted; bad names dropped; pipelined with the client's query
    assert sent == [q("SELECT pg_catalog.set_config('application_name', 'it''s me', false);"), q("select 1")]
    c.feed_server(message(b"S", b"application_name\x00it's me\x00") + message(b"T", b"\x00\x00") + row(b"x")
                  + done("SELECT 1") + rfq() + done("SELECT 1") + rfq())
    # The client had not been told its application_name yet (see listener): it is now, once.
    assert take(c.to_client) == message(b"S", b"application_name\x00it's me\x00") + done("SELECT 1") + rfq()
    assert not server.dirty  # our own SET is tracked, not a client's change
    c.detach()
    c.feed_client(q("select 1"))
    c.attach(server)
    assert split(take(c.to_server)) == [q("select 1")]  # already applied on this server


@pytest.mark.parametrize("sql, text", [
    ("LISTEN chan", "LISTEN is not supported"),
    ("  prepare p as select 1", "SQL-level PREPARE/EXECUTE"),
    ("select pg_advisory_lock(1)", "advisory locks"),
])
def test_unsupported_session_features_are_refused_clearly(core, sql, text):
    core.feed_client(q(sql))
    assert not core.wants_server
    out = take(core.to_client)
    assert b"0A000" in out and text.encode() in out and out.endswith(rfq())


def test_terminate_does_not_reach_the_server(core):
    core.feed_client(message(b"X", b""))
    assert core.terminated and not core.to_server


def test_settings_of_one_client_never_leak_to_the_next():
    reg = StatementRegistry()
    server = ServerState()
    a = ClientCore(reg, settings={"search_path": "tenant_a", "application_name": "a"})
    a.feed_client(q("select 1"))
    a.attach(server)
    assert split(take(a.to_server))[0] == q(
        "SELECT pg_catalog.set_config('search_path', 'tenant_a', false), "
        "pg_catalog.set_config('application_name', 'a', false);")
    a.feed_server(done("SELECT 1") + rfq() + done("SELECT 1") + rfq())
    a.detach()
    b = ClientCore(reg, settings={"application_name": "b"})
    b.feed_client(q("select 1"))
    b.attach(server)
    assert split(take(b.to_server))[0] == q(
        'RESET "search_path";SELECT pg_catalog.set_config(\'application_name\', \'b\', false);')
    assert server.params == {"application_name": "b"}


def test_sql_deallocate_of_a_client_name_is_answered_by_the_proxy(core):
    core.feed_client(parse("_pg3_0", "select 1") + SYNC)
    core.attach(ServerState())
    take(core.to_server)
    core.feed_server(PARSE_OK + rfq())
    take(core.to_client)
    core.feed_client(q("DEALLOCATE _pg3_0") + q('deallocate "_pg3_0"'))
    assert take(core.to_client) == done("DEALLOCATE") + rfq()  # the server never knew that name
    assert "_pg3_0" not in core.statements
    # The second one fails: the server is made to fail a query (so a transaction would be
    # failed too, as on a direct connection) and the client gets the proxy's error instead.
    assert take(core.to_server) == q("hd proxy raises an error")
    core.feed_server(err("syntax error") + rfq())
    out = take(core.to_client)
    assert b"26000" in out and b'prepared statement "_pg3_0" does not exist' in out and out.endswith(rfq())


def test_discard_all_forgets_prepared_statements_on_both_sides(core):
    server = ServerState()
    core.feed_client(parse("s", "select 1") + SYNC)
    core.attach(server)
    core.feed_server(PARSE_OK + rfq())
    core.feed_client(q("DISCARD ALL"))
    assert not core.statements and not server.statements.has("hd_1")
    take(core.to_server)
    core.feed_server(done("DISCARD ALL") + rfq())
    assert not core.to_server  # a lone DISCARD ALL outside a transaction: recorded from its answer
    assert core.can_release and core.settings.values == {}
    core.detach()
    assert not server.dirty  # DISCARD ALL leaves nothing behind


def test_extended_copy_in_syncs_sent_during_copy_are_not_expected(core):
    # pg8000: Bind, Execute, Sync, then CopyData, CopyDone, Sync. The server ignores the first
    # Sync (it arrives in copy-in mode) and answers only the last one.
    core.feed_client(parse("", "copy t from stdin") + SYNC)
    core.attach(ServerState())
    core.feed_server(PARSE_OK + rfq())
    core.feed_client(bind("") + EXECUTE + SYNC)
    core.feed_server(BIND_OK + message(b"G", b"\x00\x00\x00"))
    core.feed_client(message(b"d", b"1\n") + message(b"c", b"") + SYNC)
    core.feed_server(done("COPY 1") + rfq())
    assert not core.expect and core.can_release


def test_a_copy_in_started_by_an_execute_leaves_no_unnamed_statement_pending():
    """pg8000's COPY FROM STDIN: Bind, Flush, Execute, Flush, Sync in one write, the Sync ignored
    by the server until CopyDone. That dropped Sync ended a group that defined the unnamed
    statement; counting it as still pending made the next Describe of the unnamed statement wait
    for an answer that never comes (the client hung)."""
    flush = message(b"H", b"")
    c = ClientCore(StatementRegistry())
    server = ServerState()
    c.feed_client(parse("", "copy t from stdin") + flush + SYNC)
    c.attach(server)
    take(c.to_server)
    c.feed_server(PARSE_OK + rfq())
    take(c.to_client)
    assert c.can_release
    c.detach()
    c.feed_client(bind("") + flush + EXECUTE + flush + SYNC)
    c.attach(ServerState())  # another server: the unnamed statement is prepared there first
    assert take(c.to_server).startswith(b"P")
    c.feed_server(PARSE_OK)
    c.feed_server(BIND_OK + message(b"G", b"\x00\x00\x00"))  # CopyInResponse: the Sync is ignored
    c.feed_client(message(b"d", b"1\n") + message(b"c", b"") + SYNC)
    take(c.to_server)
    c.feed_server(done("COPY 1") + rfq())
    assert not c.expect and c.can_release
    c.detach()
    take(c.to_client)
    c.feed_client(parse("", "copy (select 1) to stdout") + flush + SYNC)
    c.attach(ServerState())
    take(c.to_server)
    c.feed_server(PARSE_OK + rfq())
    take(c.to_client)
    c.feed_client(describe(b"S", "") + flush + SYNC)
    assert take(c.to_server).startswith(b"D")  # sent, not held behind a group long finished
