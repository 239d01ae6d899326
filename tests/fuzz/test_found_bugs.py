"""Product bugs the fuzz targets found, as minimal regression tests (issue 13, point 6).

Each was first marked strict xfail; fixed in the same issue, each now guards its fix (a new find
goes here the same way: strict xfail until fixed, its input in the target's KNOWN_BUGS meanwhile).
"""

from __future__ import annotations

import pytest

from proxy.pg import protocol as p
from proxy.pg import protocol as proto
from proxy.pg.pooling import ClientCore, ClientProtocolError, ServerState
from proxy.pg.protocol import PgProtocolError
from proxy.pg.statements import StatementRegistry


def test_empty_password_message_is_refused() -> None:
    """Found by tests/fuzz/test_pg_codec.py::test_payload_parsers: the payload b"" (a PasswordMessage
    of length 4) parses as the password b"", while PostgreSQL requires exactly one NUL, at the end."""
    with pytest.raises(PgProtocolError):
        p.parse_password(b"")


# ------------------------------------------------------------------------ the pooling core

def _take(buf: bytearray) -> bytes:
    data = bytes(buf)
    buf.clear()
    return data


_MALFORMED_BIND = b"B\x00\x00\x00\x06S\x00"  # a Bind whose statement name has no terminator


@pytest.mark.parametrize("where", ["attach", "barrier"])
def test_malformed_message_sent_later_is_a_protocol_error(where: str) -> None:
    """Found by tests/fuzz/test_pg_pooling.py: feed_client checks a message's fields only when it
    is sent to a server; one that waits (no server yet, or behind a DISCARD ALL waiting for the
    outstanding requests) is checked in attach() or feed_server(), which raise ValueError."""
    core = ClientCore(StatementRegistry())
    try:
        if where == "attach":
            core.feed_client(_MALFORMED_BIND)  # queued: no server yet
            core.attach(ServerState())
        else:
            core.feed_client(proto.query("SELECT 1"))
            core.attach(ServerState())
            core.feed_client(proto.query("DISCARD ALL") + _MALFORMED_BIND)  # both wait for SELECT 1's answer
            assert not _take(core.to_server).endswith(_MALFORMED_BIND)
            core.feed_server(proto.command_complete("SELECT 0") + proto.ready_for_query("I"))
    except ClientProtocolError:
        return
    raise AssertionError("the malformed message was not refused")


def test_function_call_skipped_after_an_error_is_not_awaited() -> None:
    """Found by tests/fuzz/test_pg_pooling.py: PostgreSQL skips every message up to Sync after an
    extended-protocol error, FunctionCall included; the core skips Parse/Bind/.../Query then, not
    FunctionCall. The stale Sync entry then holds the server; a statement the core judges itself
    (DISCARD ALL, DEALLOCATE) waits for it forever: [Parse(bad), Flush] [FunctionCall, Sync]
    [DISCARD ALL] leaves the client without an answer."""
    core = ClientCore(StatementRegistry())
    core.feed_client(proto.parse("", "SELECT oops") + proto.flush())  # a driver that flushes to see errors
    core.attach(ServerState())
    _take(core.to_server)
    core.feed_server(proto.error_response("ERROR", "42601", "syntax error"))  # now skipping to Sync
    assert _take(core.to_client).startswith(b"E")
    function_call = b"F\x00\x00\x00\x0e\x00\x00\x06>\x00\x00\x00\x00\x00\x00"  # oid 1598, no arguments
    core.feed_client(function_call + proto.sync())
    _take(core.to_server)
    core.feed_server(proto.ready_for_query("I"))  # the FunctionCall was skipped: only the Sync answers
    assert _take(core.to_client) == proto.ready_for_query("I")
    if core.expect:  # what a FunctionCall may change is read back (judged as it was sent)
        assert b"pg_settings" in _take(core.to_server)
        core.feed_server(proto.command_complete("SELECT 0") + proto.ready_for_query("I"))
    assert not core.expect and core.can_release
    core.feed_client(proto.query("DISCARD ALL"))
    assert _take(core.to_server) == proto.query("DISCARD ALL")


def test_close_skipped_after_an_error_keeps_the_statement() -> None:
    """Found by tests/fuzz/test_pg_pooling.py (against a model server, then checked against the
    protocol: PostgreSQL skips every message after an extended-protocol error up to Sync, so the
    Close did not happen and the client got no CloseComplete for it)."""
    core = ClientCore(StatementRegistry())
    core.feed_client(proto.parse("s1", "SELECT 1") + proto.describe("P", "nope") + proto.close("S", "s1")
                     + proto.sync())
    core.attach(ServerState())
    _take(core.to_server)
    core.feed_server(proto.parse_complete() + proto.error_response("ERROR", "34000", 'portal "nope" does not exist')
                     + proto.ready_for_query("I"))
    answer = _take(core.to_client)
    assert proto.close_complete() not in answer  # the client was told the Close did not happen
    core.feed_client(proto.bind("", "s1") + proto.execute() + proto.sync())
    sent = _take(core.to_server)
    assert b"hd proxy raises an error" not in sent and sent.startswith(b"B"), sent  # s1 still exists
