"""The pooling core's bounds (issue 13), byte for byte without sockets: large messages streamed
to the server as they arrive, never held whole; answers produced for one read are budgeted."""

from __future__ import annotations

import pytest

from proxy.pg.pooling import (MAX_PARSE, OUTPUT_BUDGET, STREAM_OVER, ClientCore, ClientProtocolError, ServerState,
                              message)
from proxy.pg.statements import StatementRegistry
from tests.unit.test_pg_pooling import EXECUTE, I16, I32, PARSE_OK, SYNC, done, parse, q, rfq, take

CHUNK = 256 * 1024


def big_bind(stmt: str, size: int) -> bytes:
    value = b"v" * size
    return message(b"B", b"\x00" + stmt.encode() + b"\x00" + I16.pack(0) + I16.pack(1) + I32.pack(size) + value
                   + I16.pack(0))


def feed_in_chunks(core: ClientCore, data: bytes, on_chunk=None) -> int:
    """Feed `data` as a socket would; returns the most the core ever held at once."""
    held = 0
    for i in range(0, len(data), CHUNK):
        core.feed_client(data[i:i + CHUNK])
        held = max(held, len(core._buf))
        if on_chunk is not None:
            on_chunk()
    return held


def prepared(core: ClientCore, server: ServerState, name: str = "s") -> None:
    core.feed_client(parse(name, "select $1::text") + SYNC)
    core.attach(server)
    take(core.to_server)
    core.feed_server(PARSE_OK + rfq())
    take(core.to_client)


def test_a_large_bind_is_streamed_and_renamed_never_held():
    core = ClientCore(StatementRegistry())
    server = ServerState()
    prepared(core, server)
    bind = big_bind("s", 8 * STREAM_OVER)
    sent = bytearray()
    held = feed_in_chunks(core, bind + EXECUTE + SYNC, lambda: sent.extend(take(core.to_server)))
    assert held <= CHUNK  # never more than one read
    # the server got the Bind renamed (statement hd_1), its length fixed, then the rest unchanged
    expected = message(b"B", b"\x00hd_1\x00" + bind[8:])  # bind[5:8] is "\0s\0"
    assert bytes(sent) == expected + EXECUTE + SYNC
    core.feed_server(message(b"2", b"") + done("SELECT 1") + rfq())
    assert core.can_release


def test_a_large_bind_waits_for_a_server_then_streams():
    core = ClientCore(StatementRegistry())
    server = ServerState()
    prepared(core, server)
    core.detach()
    bind = big_bind("s", 2 * STREAM_OVER)
    core.feed_client(bind[:CHUNK])
    assert core.wants_server and len(core._buf) <= CHUNK
    core.attach(server)
    core.feed_client(bind[CHUNK:] + EXECUTE + SYNC)
    out = take(core.to_server)
    assert out.startswith(b"B") and out.endswith(EXECUTE + SYNC) and len(out) == len(bind) + len("hd_1") - len("s") + len(EXECUTE + SYNC)


def test_a_large_bind_of_an_unknown_statement_is_refused_and_dropped():
    core = ClientCore(StatementRegistry())
    core.feed_client(q("select 1"))
    server = ServerState()
    core.attach(server)
    take(core.to_server)
    core.feed_server(done("SELECT 1") + rfq())
    core.feed_client(q("begin"))
    take(core.to_server)
    core.feed_server(done("BEGIN") + rfq(b"T"))
    bind = big_bind("nosuch", 2 * STREAM_OVER)
    feed_in_chunks(core, bind + SYNC)
    out = take(core.to_server)
    assert b"v" * 1000 not in out  # dropped, not forwarded
    assert b"hd proxy raises" in out and out.endswith(SYNC)
    core.feed_server(message(b"E", b"SERROR\x00C26000\x00Mx\x00\x00") + rfq(b"E"))
    assert b'prepared statement "nosuch" does not exist' in take(core.to_client)


def test_a_huge_query_is_streamed_and_fails_closed():
    core = ClientCore(StatementRegistry())
    server = ServerState()
    core.feed_client(q("select 1"))
    core.attach(server)
    take(core.to_server)
    core.feed_server(done("SELECT 1") + rfq())
    sql = "select '" + "x" * (3 * STREAM_OVER) + "'"
    held = feed_in_chunks(core, q(sql))
    assert held <= CHUNK and take(core.to_server) == q(sql)
    core.feed_server(done("SELECT 1") + rfq())
    # not judged: its settings are read back before the server goes back
    assert b"pg_settings" in take(core.to_server) and not core.can_release


def test_a_parse_over_the_limit_is_refused_and_its_text_dropped():
    core = ClientCore(StatementRegistry())
    server = ServerState()
    core.feed_client(q("select 1"))
    core.attach(server)
    take(core.to_server)
    core.feed_server(done("SELECT 1") + rfq())
    huge = parse("big", "select '" + "x" * (MAX_PARSE + 10) + "'")
    feed_in_chunks(core, huge + SYNC)
    out = take(core.to_server)
    assert len(out) < 1000 and b"hd proxy raises" in out
    core.feed_server(message(b"E", b"SERROR\x00C26000\x00Mx\x00\x00") + rfq())
    answer = take(core.to_client)
    assert b"54000" in answer and "big" not in core.statements


def test_other_messages_that_long_are_a_protocol_violation():
    core = ClientCore(StatementRegistry())
    with pytest.raises(ClientProtocolError, match="too long"):
        core.feed_client(message(b"D", b"S" + b"x" * (2 * STREAM_OVER))[:CHUNK])


def test_answers_for_one_read_are_budgeted():
    """Requests the proxy answers itself (here: refusals) pile up no more than the budget per
    read; the rest waits in the core until the session has written what came before."""
    core = ClientCore(StatementRegistry())
    refused = q("LISTEN chan")
    count = 200_000
    core.feed_client(refused * count)
    first = take(core.to_client)
    assert core.backlog and len(first) <= OUTPUT_BUDGET + 1000
    answers = [first]
    rounds = 0
    while core.backlog:
        core.feed_client(b"")
        answers.append(take(core.to_client))
        rounds += 1
    out = b"".join(answers)
    assert rounds > 10 and bytes(core._buf) == b""
    # every request answered exactly once, in order: one error and one ReadyForQuery each
    assert out.count(b"Z\x00\x00\x00\x05I") == count
    assert out.count(b"0A000") == count
