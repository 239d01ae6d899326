"""Fuzz target: the transaction-pooling core (proxy/pg/pooling.py ClientCore) between a client
and model PostgreSQL servers, without sockets.

A client stream is made of the messages drivers send (simple Queries of every kind the core
judges — transactions, SET/RESET/DISCARD/DEALLOCATE, refused statements, reads and writes of
cached tables, failing statements —, Parse/Bind/Describe/Execute/Close/Sync/Flush with named and
unnamed statements and portals, FunctionCall, COPY messages outside COPY, Terminate, garbage),
sometimes mutated, cut anywhere. The core runs it over a pool of two `ModelServer`s: small
deterministic PostgreSQL stand-ins that answer by the protocol's rules (an error skips to Sync,
an aborted transaction refuses all but its end, statements and portals per connection, DISCARD
ALL, the settings readback), their answers cut anywhere and interleaved with the client's
pipelined messages. With and without a query cache.

What must hold:
- `feed_client` raises `ClientProtocolError` for malformed client input and nothing else;
  `feed_server` never raises for a server that follows the protocol;
- it never hangs: every drive of the loop makes progress (a bounded number of rounds), and once
  the client has sent whole requests and the servers have answered, nothing is outstanding;
- every simple Query, FunctionCall and Sync the core takes gets exactly one ReadyForQuery, and
  what it writes to the client is a well-framed message stream;
- nothing grows without bound: what the core holds is bounded by what it was sent;
- with valid client input, the client sees what it would see connected straight to one model
  server (message for message; errors by SQLSTATE; ParameterStatus aside), with no proxy-side
  statement name ("hd_...") leaking.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.pg import protocol as proto
from proxy.pg.pooling import ClientCore, ClientProtocolError, ServerState
from proxy.pg.statements import StatementRegistry
from tests.fuzz._fuzz import fuzz, mutate, mutations, split
from tests.unit.test_query_cache import World

I16 = struct.Struct("!h")
I32 = struct.Struct("!i")


def msg(t: bytes, payload: bytes) -> bytes:
    return t + I32.pack(len(payload) + 4) + payload


def err(sqlstate: str, text: str, severity: str = "ERROR") -> bytes:
    return proto.error_response(severity, sqlstate, text)


# ------------------------------------------------------------------------ a model server

_WORD = re.compile(rb"\s*([A-Za-z_]+)")
_SET = re.compile(rb"^\s*SET\s+(?:SESSION\s+)?([A-Za-z_.]+)\s*(?:=|TO)\s*'?([^';]*)'?", re.IGNORECASE)
_CONTROL = (b"COMMIT", b"ROLLBACK", b"END", b"ABORT")
_DEALLOCATE = re.compile(rb"^\s*DEALLOCATE\s+(?:PREPARE\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*;?\s*$", re.IGNORECASE)


class ModelServer:
    """A deterministic stand-in for one PostgreSQL backend, enough for the pooler: answers
    depend on the SQL text only (``fail`` in it: an error when it runs; ``ERR``: a syntax error
    at Parse), two rows for a read, the protocol's error and transaction rules."""

    def __init__(self) -> None:
        self.reader = proto.MessageReader()
        self.statements: dict[bytes, bytes] = {}  # name (b"" unnamed) -> query
        self.portals: dict[bytes, list[Any]] = {}  # name -> [query, rows left]
        self.txn = b"I"
        self.ignoring = False
        self.settings: dict[bytes, bytes] = {}
        self.dead = False

    def reset(self) -> None:  # the pool's DISCARD ALL after a dirty session
        self.statements.clear()
        self.portals.clear()
        self.settings.clear()

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        if self.dead:
            return b""
        try:
            batch = self.reader.feed(data)
        except proto.PgProtocolError as exc:
            self.dead = True
            return err("08P01", str(exc), "FATAL")
        for t, s, e in batch:
            payload = self.reader.buf[s + 5:e]
            try:
                out += self.message(t, payload)
            except proto.PgProtocolError as exc:  # PostgreSQL ends the session on a malformed message
                self.dead = True
                out += err("08P01", f"invalid message format: {exc}", "FATAL")
            if self.dead:
                break
        return bytes(out)

    # -- one statement
    def run(self, sql: bytes, max_rows: int = 0, portal: list[Any] | None = None) -> tuple[bytes, bool]:
        """Execute one statement: (answer, failed)."""
        m = _WORD.match(sql)
        word = m.group(1).upper() if m else b""
        if self.txn == b"E" and word not in _CONTROL:
            return err("25P02", "current transaction is aborted, commands ignored until end of transaction block"), True
        if b"fail" in sql:
            return err("22012", "division by zero"), True
        if word in (b"BEGIN", b"START"):
            self.txn = b"T"
            return proto.command_complete("BEGIN"), False
        if word in _CONTROL:
            tag = "ROLLBACK" if self.txn == b"E" or word in (b"ROLLBACK", b"ABORT") else "COMMIT"
            self.txn = b"I"
            return proto.command_complete(tag), False
        if word == b"SET":
            sm = _SET.match(sql)
            out = proto.command_complete("SET")
            if sm:
                self.settings[sm.group(1).lower()] = sm.group(2)
                if sm.group(1).lower() == b"application_name":
                    out += proto.parameter_status("application_name", sm.group(2).decode())
            return out, False
        if word == b"RESET":
            self.settings.clear()
            return proto.command_complete("RESET"), False
        if word == b"DISCARD":
            if self.txn != b"I":
                return err("25001", "DISCARD ALL cannot run inside a transaction block"), True
            self.reset()
            return proto.command_complete("DISCARD ALL"), False
        if word == b"DEALLOCATE":
            dm = _DEALLOCATE.match(sql)
            if dm is None:
                return err("42601", "syntax error"), True
            if dm.group(1).upper() == b"ALL":
                self.statements = {k: v for k, v in self.statements.items() if not k}
                return proto.command_complete("DEALLOCATE ALL"), False
            if self.statements.pop(dm.group(1), None) is None:
                return err("26000", f'prepared statement "{dm.group(1).decode()}" does not exist'), True
            return proto.command_complete("DEALLOCATE"), False
        if b"pg_settings" in sql:  # the proxy's readback: (name, value) rows
            rows = [(k, v) for k, v in sorted(self.settings.items())] + [(b"role", b"none"),
                                                                        (b"session_authorization", b"app")]
            return (proto.row_description([proto.Field("name"), proto.Field("setting")])
                    + b"".join(proto.data_row(list(r)) for r in rows)
                    + proto.command_complete(f"SELECT {len(rows)}")), False
        if word in (b"SELECT", b"WITH", b"VALUES", b"TABLE", b"SHOW"):
            left = portal[1] if portal is not None else 2
            n = left if not max_rows else min(max_rows, left)
            rows = b"".join(proto.data_row([sql[:8], b"%d" % i]) for i in range(n))
            if portal is not None:
                portal[1] -= n
                if max_rows and portal[1] > 0:
                    return rows + proto.portal_suspended(), False
            head = proto.row_description([proto.Field("a"), proto.Field("b")]) if portal is None else b""
            return head + rows + proto.command_complete(f"SELECT {n}"), False
        if not word:
            return proto.empty_query_response(), False
        tags = {b"INSERT": "INSERT 0 1", b"UPDATE": "UPDATE 1", b"DELETE": "DELETE 1", b"CREATE": "CREATE TABLE",
                b"DO": "DO", b"LISTEN": "LISTEN", b"PREPARE": "PREPARE", b"EXECUTE": "SELECT 1"}
        if word not in tags:  # e.g. the proxy's own "hd proxy raises an error"
            return err("42601", f'syntax error at or near "{word.decode()}"'), True
        return proto.command_complete(tags[word]), False

    def _error(self, text: bytes) -> bytes:
        """An error in the extended protocol: skip to Sync; an explicit transaction aborts."""
        self.ignoring = True
        if self.txn == b"T":
            self.txn = b"E"
        return text

    def message(self, t: int, payload: bytes) -> bytes:
        if t == ord("S"):
            self.ignoring = False
            if self.txn == b"I":
                self.portals.clear()
            return proto.ready_for_query(self.txn.decode())
        if t == ord("X"):
            self.dead = True
            return b""
        if t in b"dcfH":  # COPY messages outside COPY are ignored; Flush sends nothing more
            return b""
        if self.ignoring:
            return b""
        if t == ord("Q"):
            sql = proto.parse_query(payload).encode()
            self.statements.pop(b"", None)
            self.portals.pop(b"", None)
            out, failed = self.run(sql)
            if failed and self.txn == b"T":
                self.txn = b"E"
            if self.txn == b"I":
                self.portals.clear()
            return out + proto.ready_for_query(self.txn.decode())
        if t == ord("F"):
            if self.txn == b"E":
                return err("25P02", "current transaction is aborted") + proto.ready_for_query("E")
            return msg(b"V", I32.pack(-1)) + proto.ready_for_query(self.txn.decode())
        if t == ord("P"):
            name, query, _ = proto.parse_parse(payload)
            q = query.encode()
            m = _WORD.match(q)
            if self.txn == b"E" and (m.group(1).upper() if m else b"") not in _CONTROL:
                return self._error(err("25P02", "current transaction is aborted"))
            if b"ERR" in q:  # parsed before the name is stored (exec_parse_message)
                return self._error(err("42601", "syntax error"))
            if name and name.encode() in self.statements:
                return self._error(err("42P05", f'prepared statement "{name}" already exists'))
            self.statements[name.encode()] = q
            return proto.parse_complete()
        if t == ord("B"):
            b = proto.parse_bind(payload)
            q = self.statements.get(b.statement.encode())
            if q is None:
                what = f'prepared statement "{b.statement}"' if b.statement else "unnamed prepared statement"
                return self._error(err("26000", f"{what} does not exist"))
            if self.txn == b"E" and not q.lstrip().upper().startswith(_CONTROL):
                return self._error(err("25P02", "current transaction is aborted"))
            self.portals[b.portal.encode()] = [q, 2]
            return proto.bind_complete()
        if t == ord("D"):
            kind, name = proto.parse_describe(payload)
            if kind == "S":
                q = self.statements.get(name.encode())
                if q is None:
                    return self._error(err("26000", f'prepared statement "{name}" does not exist'))
                desc = proto.parameter_description([])
            else:
                portal = self.portals.get(name.encode())
                if portal is None:
                    return self._error(err("34000", f'portal "{name}" does not exist'))
                q, desc = portal[0], b""
            reads = (_WORD.match(q).group(1).upper() if _WORD.match(q) else b"") in (b"SELECT", b"WITH", b"VALUES")
            return desc + (proto.row_description([proto.Field("a"), proto.Field("b")]) if reads else proto.no_data())
        if t == ord("E"):
            name, max_rows = proto.parse_execute(payload)
            portal = self.portals.get(name.encode())
            if portal is None:
                return self._error(err("34000", f'portal "{name}" does not exist'))
            out, failed = self.run(portal[0], max_rows, portal)
            return self._error(out) if failed else out
        if t == ord("C"):
            kind, name = proto.parse_close(payload)
            (self.statements if kind == "S" else self.portals).pop(name.encode(), None)
            return proto.close_complete()
        self.dead = True
        return err("08P01", f"invalid frontend message type {t}", "FATAL")


# ------------------------------------------------------------------------ client messages

SQL = [b"SELECT 1", b"SELECT * FROM items", b"SELECT * FROM orders WHERE id = 1", b"select fail", b"BEGIN",
       b"COMMIT", b"ROLLBACK", b"SET application_name = 'a'", b"SET search_path = public", b"RESET ALL",
       b"DISCARD ALL", b"DEALLOCATE s1", b"DEALLOCATE ALL", b"LISTEN ch", b"PREPARE p AS SELECT 1",
       b"SELECT pg_advisory_lock(1)", b"", b"CREATE TEMP TABLE t (x int)", b"UPDATE items SET x = 1",
       b"INSERT INTO orders VALUES (1)", b"SELECT now()", b"SELECT my_vol()", b"DO $$ BEGIN END $$",
       b"SELECT 1; SELECT 2"]
EXT_SQL = [b"SELECT 1", b"SELECT * FROM items WHERE id = $1", b"select fail", b"SELECT ERR", b"BEGIN",
           b"COMMIT", b"UPDATE items SET x = $1", b"SET application_name = 'b'", b"SELECT * FROM orders"]
NAMES = ["", "s1", "s2"]
PORTALS = ["", "p1"]

client_messages = st.one_of(
    st.sampled_from(SQL).map(lambda s: msg(b"Q", s + b"\0")),
    st.builds(lambda n, s: proto.parse(n, s.decode()), st.sampled_from(NAMES), st.sampled_from(EXT_SQL)),
    st.builds(lambda p, n, v: proto.bind(p, n, [], v), st.sampled_from(PORTALS), st.sampled_from(NAMES + ["nope"]),
              st.lists(st.sampled_from([b"1", None]), max_size=1)),
    st.builds(proto.describe, st.sampled_from("SP"), st.sampled_from(NAMES)),
    st.builds(proto.execute, st.sampled_from(PORTALS), st.sampled_from([0, 0, 1])),
    st.builds(proto.close, st.sampled_from("SP"), st.sampled_from(NAMES)),
    st.just(proto.sync()), st.just(proto.sync()), st.just(proto.flush()),
    st.just(msg(b"F", I32.pack(1598) + I16.pack(0) + I16.pack(0) + I16.pack(0))),  # FunctionCall
    st.sampled_from([msg(b"d", b"x"), msg(b"c", b"")]),
)
garbage = st.builds(msg, st.binary(min_size=1, max_size=1), st.binary(max_size=16))


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """(client messages, whether they are all valid)."""
    msgs = draw(st.lists(client_messages, min_size=1, max_size=14))
    valid = True
    if draw(st.integers(0, 4)) == 0:
        msgs.insert(draw(st.integers(0, len(msgs))), draw(garbage))
        valid = False
    if draw(st.integers(0, 9)) == 0:
        msgs.append(proto.terminate())
    return msgs, valid


# ------------------------------------------------------------------------ driving the core

def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """A backend stream as (type, payload) pairs; it must frame exactly."""
    r = proto.MessageReader()
    out = [(t, bytes(r.buf[s + 5:e])) for t, s, e in r.feed(data)] if data else []
    assert r.buffered == 0, "the core wrote a partial message to the client"
    return out


def normalized(data: bytes) -> list[tuple[int, bytes]]:
    """What a client sees, compared: errors by SQLSTATE, ParameterStatus and notices aside."""
    out = []
    for t, payload in _frames(data):
        if t in (ord("S"), ord("N")):
            continue
        if t == ord("E"):
            payload = proto.parse_error_fields(payload).get("C", "").encode()
        out.append((t, payload))
    return out


def requests(msgs: list[bytes]) -> int:
    """ReadyForQuery messages a client expects for these messages (Query, FunctionCall, Sync)."""
    return sum(1 for m in msgs if m[:1] in (b"Q", b"F", b"S"))


def direct(msgs: list[bytes]) -> tuple[bytes, ModelServer]:
    """The same messages on a straight connection to one model server: (answers, the server)."""
    server = ModelServer()
    out = bytearray()
    for m in msgs:
        if m[:1] == b"X":
            break
        out += server.feed(m)
    return bytes(out), server


def _refused(sql: bytes) -> bool:
    return bool(re.match(rb"\s*(LISTEN|PREPARE|EXECUTE)\b", sql, re.IGNORECASE)) or b"pg_advisory_lock(" in sql


class Driver:
    def __init__(self, core: ClientCore, data: st.DataObject, valid: bool = True) -> None:
        self.core = core
        self.valid = valid
        self.data = data
        self.pool: deque[tuple[ServerState, ModelServer]] = deque((ServerState(), ModelServer()) for _ in range(2))
        self.held: tuple[ServerState, ModelServer] | None = None
        self.in_flight = bytearray()  # server bytes not yet given to the core
        self.to_client = bytearray()
        self.closed = False
        self.fed = 0

    def pump(self, *, all_of_it: bool = False) -> None:
        """Move bytes between the core and the servers until quiet (or one partial step)."""
        core, data = self.core, self.data
        for _ in range(10_000):
            progressed = False
            if core.wants_server and self.held is None:
                state, server = self.held = self.pool.popleft()
                core.attach(state)  # a malformed message that waited is a ClientProtocolError
                progressed = True
            if core.to_server:
                assert self.held is not None, "requests for a server while none is attached"
                sent = bytes(core.to_server)
                core.to_server.clear()
                self.in_flight += self.held[1].feed(sent)
                progressed = True
            if self.in_flight:
                n = len(self.in_flight) if all_of_it else data.draw(st.integers(1, len(self.in_flight)))
                chunk = bytes(self.in_flight[:n])
                del self.in_flight[:n]
                core.feed_server(chunk)  # raises only ClientProtocolError (a client message that waited)
                progressed = True
            if core.wait is not None and self.held is None and not self.in_flight:
                core.resume(timed_out=True)  # nobody can finish what it waits for (one client)
                progressed = True
            self.to_client += core.to_client
            core.to_client.clear()
            if self.held is not None and self.held[1].dead:
                core.server_lost()
                self.closed = True
                return
            if core.fatal is not None or core.terminated:
                self.closed = True
                return
            if self.held is not None and core.can_release and not core.to_server:  # (the session writes first)
                state, server = self.held
                self.held = None
                core.detach()
                if state.broken:
                    state, server = ServerState(), ModelServer()
                elif state.dirty:
                    server.reset()
                    state.reset_done()
                self.pool.append((state, server))
                progressed = True
            if not progressed or not all_of_it and not self.in_flight and not core.to_server:
                if not progressed:
                    return
        raise AssertionError("the core did not settle in 10000 rounds")

    def client(self, chunk: bytes) -> None:
        self.fed += len(chunk)
        self.core.feed_client(chunk)
        held = len(self.core._buf) + sum(len(r) for _, r, _ in self.core._queued) + len(self.core.to_server) \
            + sum(len(r) for _, r in self.core._held) + sum(len(r) for _, r in self.core._batch)
        assert held <= 2 * self.fed + 4096, f"the core holds {held} bytes after {self.fed} from the client"
        assert len(self.core.expect) <= 4 * self.fed + 16


@fuzz(300)
@given(sessions(), mutations(3), st.lists(st.integers(0, 1 << 12), max_size=6), st.sampled_from(["none", "on", "off"]),
       st.data())
def test_pooling_core(session: tuple[list[bytes], bool], ops: list, cut: list[int], cache: str,
                      data: st.DataObject) -> None:
    msgs, valid = session
    mutated = bool(ops) and data.draw(st.integers(0, 3)) == 0
    stream = mutate(b"".join(msgs), ops) if mutated else b"".join(msgs)
    valid = valid and not mutated
    if cache == "none":
        core = ClientCore(StatementRegistry())
    else:
        world = World(disabled=cache == "off")
        warm = Driver(world.core(), data)  # something in the cache to hit, as the model answers it
        warm.client(msg(b"Q", b"SELECT * FROM items\0"))
        warm.pump(all_of_it=True)
        core = world.core()
    d = Driver(core, data, valid)
    try:
        for chunk in split(stream, cut):
            d.client(chunk)
            d.pump()
            if d.closed:
                break
        if not d.closed:
            d.pump(all_of_it=True)
    except ClientProtocolError as exc:
        assert str(exc) and not valid, f"valid client input refused: {exc}"
        return
    frames = _frames(bytes(d.to_client))
    readies = sum(1 for t, _ in frames if t == ord("Z"))
    if not valid:
        return
    assert readies <= requests(msgs)
    if d.closed:
        return
    # everything sent was answered (but what a server skips after an error, up to a Sync the client
    # has not sent yet): nothing outstanding, one ReadyForQuery per request the server answers
    answers, server = direct(msgs)
    if not server.ignoring:
        assert not core.expect and not d.in_flight, core.expect
    if True:
        expected = sum(1 for t, _ in _frames(answers) if t == ord("Z"))
        assert readies == expected, (readies, expected)
        assert b'"hd_' not in bytes(d.to_client), "a proxy statement name reached the client"
        if not any(_refused(m[5:-1]) for m in msgs if m[:1] == b"Q"):
            assert normalized(bytes(d.to_client)) == normalized(answers)
