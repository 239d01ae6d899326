"""Transaction pooling for one client, sans-I/O.

`ClientCore` sits between one client and whichever server connection it currently holds.
It takes client bytes and server bytes, and produces bytes for each side, while:

* knowing when the server can be given back: no request awaiting an answer, the last
  ReadyForQuery said idle (`I`), no COPY in progress;
* rewriting named prepared statements to proxy-wide names and injecting a Parse when the
  client's statement is not yet prepared on the server it was handed (its ParseComplete is
  swallowed), answering Parse-of-a-known-statement and Close(statement) itself, in order;
* re-sending the client's latest unnamed Parse when an unnamed Bind lands on another server;
* marking a server dirty when the client changed session state (SET, LISTEN, …) so the pool
  resets it before anyone else gets it;
* refusing what transaction pooling cannot offer (LISTEN, SQL PREPARE/EXECUTE, session
  advisory locks) with a clear error, when not inside a transaction.

Every request that draws a response pushes an entry on `expect`; server messages pop them
(PgBouncer's outstanding-request queue, reference/hyperdrive_caching.md §5).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Any

from proxy.pg import protocol as proto
from proxy.pg.statements import ServerStatements, Statement, StatementRegistry

_HDR = struct.Struct("!cI")
_I32 = struct.Struct("!I")
_I16 = struct.Struct("!H")

# Expectation kinds (what the server will answer a request with).
PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY, FUNCTION = range(8)
# Actions: pass the answer to the client, swallow it (we injected the request), or
# answer the client ourselves at this point of the sequence.
FORWARD, SKIP, FAKE = 0, 1, 2

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"

# CommandComplete tags that mean the session was changed beyond the transaction.
_DIRTY_TAGS = (b"SET", b"RESET", b"LISTEN", b"UNLISTEN", b"PREPARE", b"DEALLOCATE", b"DECLARE",
               b"LOAD", b"DISCARD", b"CREATE TABLE", b"SELECT INTO", b"CREATE TABLE AS")

_DEALLOCATE = re.compile(rb'^\s*DEALLOCATE\s+(?:PREPARE\s+)?(?:(ALL)|"([^"]+)"|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*$',
                         re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"^\s*DISCARD\s+ALL\s*;?\s*$", re.IGNORECASE)
# Placeholder status in a faked ReadyForQuery: filled with the session's status when sent.
_RFQ_CURRENT = b"Z\x00\x00\x00\x05?"

_EXTENDED = frozenset(b"PBDECH")
# Decisions per statement text: workloads repeat a small set of statements.
_REFUSALS: dict[bytes, tuple[str, str] | None] = {}
_MISSING = object()  # Parse, Bind, Describe, Execute, Close, Flush

_UNSUPPORTED = re.compile(
    rb"^\s*(?:(LISTEN)\b|(PREPARE)\b|(EXECUTE)\b)|\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(",
    re.IGNORECASE)


class ClientProtocolError(Exception):
    """The client sent something that is not PostgreSQL protocol v3."""


def cstring(buf: bytes, off: int) -> tuple[bytes, int]:
    end = buf.index(b"\x00", off)
    return buf[off:end], end + 1


def message(kind: bytes, payload: bytes) -> bytes:
    return _HDR.pack(kind, len(payload) + 4) + payload


def error_message(sqlstate: str, text: str, severity: str = "ERROR", hint: str | None = None) -> bytes:
    return proto.error_response(severity, sqlstate, text, hint=hint)


def ready_for_query(status: bytes) -> bytes:
    return proto.ready_for_query(status.decode())


def encode_parse(name: str, query: str | bytes, param_oids: tuple[int, ...]) -> bytes:
    q = query.encode() if isinstance(query, str) else query
    payload = name.encode() + b"\x00" + q + b"\x00" + _I16.pack(len(param_oids))
    payload += b"".join(_I32.pack(o) for o in param_oids)
    return message(b"P", payload)


def encode_close_statement(name: str) -> bytes:
    return proto.close("S", name)


def encode_query(sql: str) -> bytes:
    return proto.query(sql)


class ServerState:
    """What the pooling logic knows about one server connection."""

    __slots__ = ("statements", "unnamed_owner", "params", "dirty", "broken")

    def __init__(self, statement_limit: int = 500) -> None:
        self.statements = ServerStatements(statement_limit)
        self.unnamed_owner: object | None = None
        self.params: dict[str, str] = {}  # session settings the proxy applied for clients
        self.dirty = False  # needs a reset before the next client
        self.broken = False

    def reset_done(self) -> None:
        """After DISCARD ALL: no statements, no settings."""
        self.statements.clear()
        self.unnamed_owner = None
        self.params.clear()
        self.dirty = False


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# Settings a client may not carry into pooled connections through startup parameters.
FORBIDDEN_SETTINGS = frozenset({"session_authorization", "role", "transaction_isolation",
                                "transaction_read_only", "transaction_deferrable"})


class ClientCore:
    def __init__(self, registry: StatementRegistry, *, settings: dict[str, str] | None = None) -> None:
        self.registry = registry
        self.server: ServerState | None = None
        self.expect: deque[list[Any]] = deque()
        self.to_client = bytearray()
        self.to_server = bytearray()
        self._buf = bytearray()
        self._sbuf = bytearray()
        self._queued: list[tuple[int, bytes]] = []  # client messages waiting for a server
        self.statements: dict[str, Statement] = {}
        self._unnamed_parse: bytes | None = None
        self._unnamed_token: object = object()
        self.txn = b"I"
        self.copy_in = False
        # Extended-protocol messages run in an implicit transaction until Sync: the server
        # must stay with this client until the Sync's ReadyForQuery, even after a Flush.
        self._unsynced = False
        self._sync_ignored = False
        self.fatal_forwarded = False
        self.held_fatal: bytes | None = None
        self.terminated = False
        # Session settings the client asked for at startup, applied on every server it gets.
        self.settings = {k.lower(): v for k, v in (settings or {}).items()
                         if _GUC_NAME.match(k) and k.lower() not in FORBIDDEN_SETTINGS}
        self.queries = 0

    # ------------------------------------------------------------------ state queries
    @property
    def wants_server(self) -> bool:
        return self.server is None and bool(self._queued)

    @property
    def can_release(self) -> bool:
        return (self.server is not None and not self.expect and self.txn == b"I"
                and not self.copy_in and not self._queued and not self._unsynced)

    # ------------------------------------------------------------------ linking
    def attach(self, server: ServerState) -> None:
        self.server = server
        if server.params != self.settings:
            self._apply_settings(server)
        queued, self._queued = self._queued, []
        for kind, raw in queued:
            self._client_message(kind, raw)
        self._drain_fakes()

    def _apply_settings(self, server: ServerState) -> None:
        # Make the server's session settings exactly this client's: SET what differs, RESET
        # what a previous client had set and this one did not (no leak between clients).
        # set_config() parses the value as a startup parameter would be (lists such as
        # search_path included), unlike SET with one quoted literal.
        changed = [f"set_config({quote_literal(k)}, {quote_literal(v)}, false)"
                   for k, v in self.settings.items() if server.params.get(k) != v]
        sql = f"SELECT {', '.join(changed)};" if changed else ""
        stale = [k for k in server.params if k not in self.settings]
        sql += "".join(f"RESET {k};" for k in stale)
        if sql:
            self.to_server += encode_query(sql)
            self.expect.append([QUERY, SKIP, None, None])
            for k in stale:
                del server.params[k]
            server.params.update(self.settings)

    def detach(self) -> ServerState:
        server = self.server
        assert server is not None
        self.server = None
        return server

    # ------------------------------------------------------------------ client side
    def feed_client(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        off = 0
        n = len(buf)
        while n - off >= 5:
            kind = buf[off]
            (length,) = _I32.unpack_from(buf, off + 1)
            if length < 4 or length > 1 << 30:
                raise ClientProtocolError(f"invalid message length {length}")
            end = off + 1 + length
            if end > n:
                break
            raw = bytes(buf[off:end])
            off = end
            if self.server is None and kind != 0x58:  # 'X' Terminate needs no server
                if self._try_local(kind, raw):
                    continue
                self._queued.append((kind, raw))
            else:
                self._client_message(kind, raw)
        del buf[:off]
        self._drain_fakes()

    def _try_local(self, kind: int, raw: bytes) -> bool:
        """Answer without a server when we can (refusals) — only outside transactions."""
        if kind == 0x51 and not self._queued and self.txn == b"I":  # 'Q'
            refusal = self._refusal(raw[5:-1])
            if refusal:
                self.to_client += error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I")
                return True
        return False

    @staticmethod
    def _refusal(sql: bytes) -> tuple[str, str] | None:
        cached = _REFUSALS.get(sql, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        verdict = ClientCore._judge(sql)
        if len(_REFUSALS) > 4096:
            _REFUSALS.clear()
        _REFUSALS[sql] = verdict
        return verdict

    @staticmethod
    def _judge(sql: bytes) -> tuple[str, str] | None:
        m = _UNSUPPORTED.search(sql[:4096])
        if m is None:
            return None
        if m.group(1):
            return ("LISTEN is not supported in transaction pooling mode",
                    "notifications need a session; connect to the origin directly for LISTEN")
        if m.group(2) or m.group(3):
            return ("SQL-level PREPARE/EXECUTE is not supported in transaction pooling mode",
                    "use your driver's protocol-level prepared statements instead (they work)")
        return ("session-level advisory locks are not supported in transaction pooling mode",
                "use pg_advisory_xact_lock inside a transaction instead")

    def _client_message(self, kind: int, raw: bytes) -> None:
        server = self.server
        out = self.to_server
        expect = self.expect
        if kind in _EXTENDED:
            self._unsynced = True
        if kind == 0x42:  # 'B' Bind
            name, _ = cstring(raw, raw.index(b"\x00", 5) + 1)
            if name:
                st = self.statements.get(name.decode("utf-8", "surrogateescape"))
                if st is not None:
                    self._ensure_prepared(st)
                    portal_end = raw.index(b"\x00", 5) + 1
                    rest = raw[portal_end + len(name) + 1:]
                    raw = message(b"B", raw[5:portal_end] + st.server_name.encode() + b"\x00" + rest)
            else:
                self._ensure_unnamed()
            out += raw
            expect.append([BIND, FORWARD, None, None])
        elif kind == 0x45:  # 'E' Execute
            out += raw
            expect.append([EXECUTE, FORWARD, None, None])
        elif kind == 0x53:  # 'S' Sync
            out += raw
            if not self._sync_ignored:  # the server ignores Sync during an extended COPY IN
                expect.append([SYNC, FORWARD, None, None])
        elif kind == 0x50:  # 'P' Parse
            self._parse(raw)
        elif kind == 0x51:  # 'Q' Query
            self.queries += 1
            sql = raw[5:-1]
            dealloc = _DEALLOCATE.match(sql) if sql[:40].lstrip()[:10].upper() == b"DEALLOCATE" else None
            if dealloc is not None:
                # The client's statement names exist only here: answer for the server.
                expect.append([QUERY, FAKE, self._deallocate(dealloc), None])
                return
            if _DISCARD_ALL.match(sql):
                self.statements.clear()
                self._unnamed_parse = None
            refusal = self._refusal(sql) if self.txn == b"I" else None
            if refusal:
                expect.append([QUERY, FAKE, error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I"), None])
                return
            out += raw
            expect.append([QUERY, FORWARD, None, None])
        elif kind == 0x44:  # 'D' Describe
            what = raw[5:6]
            name = raw[6:-1]
            if what == b"S" and name:
                st = self.statements.get(name.decode("utf-8", "surrogateescape"))
                if st is not None:
                    self._ensure_prepared(st)
                    raw = message(b"D", b"S" + st.server_name.encode() + b"\x00")
            elif what == b"S":
                self._ensure_unnamed()
            out += raw
            expect.append([DESCRIBE, FORWARD, None, None])
        elif kind == 0x43:  # 'C' Close
            what = raw[5:6]
            name = raw[6:-1]
            if what == b"S" and name:
                # Statements stay prepared on the servers (shared); only the client's name goes.
                self.statements.pop(name.decode("utf-8", "surrogateescape"), None)
                expect.append([CLOSE, FAKE, CLOSE_COMPLETE, None])
            else:
                out += raw
                expect.append([CLOSE, FORWARD, None, None])
        elif kind == 0x58:  # 'X' Terminate: the server connection stays with the pool
            self.terminated = True
        elif kind == 0x46:  # 'F' FunctionCall
            out += raw
            expect.append([FUNCTION, FORWARD, None, None])
        else:  # Flush, CopyData, CopyDone, CopyFail, … pass through
            if kind in (0x63, 0x66):  # 'c' CopyDone / 'f' CopyFail end the client's COPY
                self.copy_in = False
                self._sync_ignored = False
            out += raw
        del server

    def _parse(self, raw: bytes) -> None:
        name_b, off = cstring(raw, 5)
        if not name_b:
            self._unnamed_parse = raw
            self._unnamed_token = object()
            assert self.server is not None
            self.server.unnamed_owner = self._unnamed_token
            self.to_server += raw
            self.expect.append([PARSE, FORWARD, None, None])
            return
        query_b, off = cstring(raw, off)
        (count,) = _I16.unpack_from(raw, off)
        oids = tuple(_I32.unpack_from(raw, off + 2 + 4 * i)[0] for i in range(count))
        # Query text stays bytes: no decoding on the hot path, and no failure on odd encodings.
        st = self.registry.get(query_b, oids, encode_parse)
        self.statements[name_b.decode("utf-8", "surrogateescape")] = st
        server = self.server
        assert server is not None
        if server.statements.has(st.server_name):
            self.expect.append([PARSE, FAKE, PARSE_COMPLETE, None])
        else:
            self._prepare_on_server(st, FORWARD)

    def _ensure_prepared(self, st: Statement) -> None:
        server = self.server
        assert server is not None
        if not server.statements.has(st.server_name):
            self._prepare_on_server(st, SKIP)

    def _prepare_on_server(self, st: Statement, action: int) -> None:
        server = self.server
        assert server is not None
        evicted = server.statements.add(st.server_name)
        if evicted is not None:
            self.to_server += encode_close_statement(evicted)
            self.expect.append([CLOSE, SKIP, None, None])
        self.to_server += st.parse_payload
        self.expect.append([PARSE, action, None, st.server_name])

    def _ensure_unnamed(self) -> None:
        server = self.server
        assert server is not None
        if self._unnamed_parse is not None and server.unnamed_owner is not self._unnamed_token:
            self.to_server += self._unnamed_parse
            self.expect.append([PARSE, SKIP, None, None])
            server.unnamed_owner = self._unnamed_token

    def _deallocate(self, m: re.Match[bytes]) -> bytes:
        if m.group(1):
            self.statements.clear()
            return message(b"C", b"DEALLOCATE ALL\x00") + _RFQ_CURRENT
        name = (m.group(2) or m.group(3)).decode("utf-8", "surrogateescape")
        if m.group(3):
            name = name.lower()  # unquoted identifiers fold to lower case, as in PostgreSQL
        if self.statements.pop(name, None) is None:
            return error_message("26000", f'prepared statement "{name}" does not exist') + _RFQ_CURRENT
        return message(b"C", b"DEALLOCATE\x00") + _RFQ_CURRENT

    def _drain_fakes(self) -> None:
        expect = self.expect
        while expect and expect[0][1] == FAKE:
            data = expect.popleft()[2]
            if data.endswith(_RFQ_CURRENT):
                data = data[:-1] + self.txn
            self.to_client += data

    # ------------------------------------------------------------------ server side
    def feed_server(self, data: bytes | bytearray | memoryview) -> None:
        """Answers from the server. Runs of plain forwarded messages are copied in one slice."""
        server = self.server
        assert server is not None
        buf = self._sbuf
        buf += data
        n = len(buf)
        off = 0
        run_start = 0  # start of a run of messages to forward unchanged
        expect = self.expect
        out = self.to_client
        while n - off >= 5:
            kind = buf[off]
            (length,) = _I32.unpack_from(buf, off + 1)
            end = off + 1 + length
            if end > n:
                break
            head = expect[0] if expect else None
            action = head[1] if head is not None else FORWARD
            forward = action != SKIP
            pop = False
            if kind == 0x44:  # 'D' DataRow: the hot case
                if not forward:
                    out += buf[run_start:off]
                    run_start = end
                off = end
                continue
            if kind == 0x43:  # 'C' CommandComplete
                if head is not None and head[0] == EXECUTE:
                    pop = True
                if forward:
                    tag = bytes(buf[off + 5:end - 1])
                    if tag.startswith(_DIRTY_TAGS):
                        server.dirty = True
                        if tag in (b"DISCARD ALL", b"DEALLOCATE ALL"):
                            server.statements.clear()  # the server's prepared statements are gone
                            server.unnamed_owner = None
            elif kind == 0x5A:  # 'Z' ReadyForQuery
                self.txn = bytes(buf[off + 5:off + 6])
                self._sync_ignored = False
                if len(expect) <= 1:  # the last outstanding request: nothing unsynced remains
                    self._unsynced = False
                pop = head is not None
                self.copy_in = False
            elif kind == 0x31:  # '1' ParseComplete
                pop = True
            elif kind == 0x32 or kind == 0x33:  # BindComplete / CloseComplete
                pop = True
            elif kind == 0x54:  # 'T' RowDescription
                pop = head is not None and head[0] == DESCRIBE
            elif kind == 0x6E:  # 'n' NoData
                pop = True
            elif kind == 0x49 or kind == 0x73:  # EmptyQueryResponse / PortalSuspended
                pop = head is not None and head[0] == EXECUTE
            elif kind == 0x45:  # 'E' ErrorResponse
                # Reaches the client, except for our own SET of its startup settings (the
                # client has no request to pair it with).
                forward = not (head is not None and head[0] == QUERY and action == SKIP)
                self.copy_in = False
                self._sync_ignored = False
                severity = bytes(buf[off + 5:off + 12])
                if severity.startswith((b"SFATAL\x00", b"SPANIC\x00")):
                    if head is None:
                        # Unsolicited (e.g. 57P01 at an origin shutdown) while the client awaits
                        # nothing: a driver cannot pair it with a request and reports a bare
                        # "connection closed". Keep it; the session answers the client's next
                        # request with it, so the client gets the SQLSTATE.
                        out += buf[run_start:off]
                        self.held_fatal = bytes(buf[off:end])
                        run_start = end
                        off = end
                        continue
                    # The server ends the session and said why; the client must not get a
                    # second FATAL from us when the connection then drops.
                    self.fatal_forwarded = forward
                if head is not None and head[0] not in (QUERY, FUNCTION, SYNC):
                    self._fail_until_sync()
                    head = None
            elif kind == 0x53:  # 'S' ParameterStatus: the client should know the value
                forward = True
                if action == FORWARD:
                    server.dirty = True
            elif kind == 0x47:  # 'G' CopyInResponse: the client now streams CopyData
                self.copy_in = True
                if head is not None and head[0] == EXECUTE:
                    # COPY started by an Execute: the server ignores Syncs until CopyDone/CopyFail,
                    # including any the client already sent after the Execute (pg8000 does).
                    later = [e for e in list(expect)[1:] if e[0] != SYNC]
                    expect.clear()
                    expect.append(head)
                    expect.extend(later)
                    self._sync_ignored = True
            elif kind == 0x4E or kind == 0x41:  # Notice / Notification: always forwarded
                forward = True
            if not forward:
                out += buf[run_start:off]
                run_start = end
            off = end
            if pop and expect:
                expect.popleft()
                if expect and expect[0][1] == FAKE:
                    out += buf[run_start:off]
                    run_start = off
                    self._drain_fakes()
        out += buf[run_start:off]
        del buf[:off]

    def _fail_until_sync(self) -> None:
        """After an error the server ignores everything up to Sync: so do our expectations."""
        expect = self.expect
        server = self.server
        while expect and expect[0][0] != SYNC:
            entry = expect.popleft()
            if entry[0] == PARSE and entry[3] is not None and server is not None:
                server.statements.discard(entry[3])  # the Parse did not happen

    def server_lost(self) -> None:
        self.expect.clear()
        self.copy_in = False
        self._sync_ignored = False
        self._unsynced = False
