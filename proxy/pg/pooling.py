"""Transaction pooling for one client, sans-I/O.

`ClientCore` sits between one client and whichever server connection it currently holds.
It takes client bytes and server bytes, and produces bytes for each side, while:

* knowing when the server can be given back: no request awaiting an answer, the last
  ReadyForQuery said idle (`I`), no COPY in progress;
* rewriting named prepared statements to proxy-wide names and injecting a Parse when the
  client's statement is not yet prepared on the server it was handed (its ParseComplete is
  swallowed), answering Parse-of-a-known-statement and Close(statement) itself, in order;
* re-sending the client's latest unnamed Parse when an unnamed Bind lands on another server;
* carrying the client's session settings (proxy/pg/settings.py): the difference between the
  server's settings and the client's is applied when a server is attached, pipelined with the
  client's first message (blocking only for role changes); after any statement that may have
  changed them, they are read back from the server before it is released;
* marking a server dirty when the client left state that cannot be carried (a temp table, a
  held cursor, a session advisory lock, whatever a DO block or a volatile user function did), so
  the pool resets it before anyone else gets it;
* refusing what transaction pooling cannot offer (LISTEN, SQL PREPARE/EXECUTE, session
  advisory locks) with a clear error, when not inside a transaction;
* never passing a ParameterStatus the client already knows, and sending one whenever the value
  its statements run under differs from what it was last told.

Every request that draws a response pushes an entry on `expect`; server messages pop them
(PgBouncer's outstanding-request queue, reference/hyperdrive_caching.md §5).

With a `CacheContext` (proxy/pg/caching.py) it also runs the query cache: every simple Query and
every Execute gets a QueryObs (cache status, latency, bytes) carried on the expect entries where
its answer starts and ends; outside a transaction, with no server held, a cached answer is written
without a server (`_serve`, and `_fast_parse`/`_fast_batch` for whole extended batches in one read),
identical misses wait on one fill (`wait`/`resume`), and writes invalidate the origin's entries when
sent and again at their ReadyForQuery. Extended-protocol messages are collected up to Sync so a
batch is judged whole.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from typing import Any

from proxy.cache.catalog import Decision, OriginCatalog
from proxy.cache.store import Fill
from proxy.pg import protocol as proto
from proxy.pg.caching import (MAX_KEY_BYTES, PARSE_COMPLETE, Z_IDLE, CacheContext, ExtendedShape, QueryObs,
                              analyze_batch, bind_fields, extended_request, parse_fields,
                              text_params_have_time_words)
from proxy.pg.settings import SessionSettings, apply_sql
from proxy.pg.statements import ServerStatements, Statement, StatementRegistry

_HDR = struct.Struct("!cI")
_I32 = struct.Struct("!I")
_I16 = struct.Struct("!H")

# Expectation kinds (what the server will answer a request with).
PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY, FUNCTION = range(8)
# Actions: pass the answer to the client, swallow it (we injected the request), answer the
# client ourselves at this point of the sequence, collect the answer for a handler (entry[2],
# called with the answer's bytes at its ReadyForQuery), or swallow the answer but send the
# client the error in entry[2] instead of the server's (an error the proxy raises mid-pipeline:
# the server fails a request on purpose so its transaction state is exactly the client's).
FORWARD, SKIP, FAKE, CAPTURE, REPLACE = 0, 1, 2, 3, 4

CLOSE_COMPLETE = b"3\x00\x00\x00\x04"

# CommandComplete tags that mean the session may have changed beyond the transaction (a backstop
# for what the statement classification already saw): settings (read back) and other state
# (read back, and reset before the next client).
_SETTINGS_TAGS = (b"DISCARD",)
_DIRTY_TAGS = (b"LISTEN", b"UNLISTEN", b"PREPARE", b"DEALLOCATE", b"DECLARE", b"LOAD", b"CREATE TABLE",
               b"SELECT INTO", b"CREATE TABLE AS", b"DO", b"CALL", b"CREATE VIEW", b"CREATE SEQUENCE")
_STATE_TAGS = _SETTINGS_TAGS + _DIRTY_TAGS
# Errors that mean a shared server-side prepared statement no longer fits the catalog.
_STALE_STATEMENT = ((b"XX000", b"cache lookup failed for "), (b"0A000", b"cached plan must not change result type"))
MAX_RETRY_BYTES = 1 << 20  # the messages kept for a transparent re-prepare-and-retry
OUTPUT_BUDGET = 256 * 1024  # answers produced while reading one client chunk before the core stops
STREAM_OVER = 1 << 20  # client messages longer than this are streamed to the server, never held whole
MAX_PARSE = 16 << 20  # longest statement text a Parse may carry (kept to prepare it on other servers)
_STREAMED = frozenset(b"BQdF")
_NO_CATALOG = OriginCatalog()  # without a cache context: every function is unknown (fail closed)
_OPAQUE = Decision("notaquery", "function call", write_all=True, readback=True, dirty=True)
_UNKNOWN_SETTINGS = Decision("uncacheable", "the session's settings are being read back")
_FAILED = ("failed",)  # a plain SET whose answer was an error


class _Readback:
    """A settings readback in flight, as something the core waits on: a cacheable query behind
    it waits one round trip for the settings it runs under instead of going uncached."""

    __slots__ = ("callbacks", "done")
    timeout = 30.0

    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self.done = False

    def add_callback(self, fn: Any) -> None:
        if self.done:
            fn()
        else:
            self.callbacks.append(fn)

    def finish(self) -> None:
        self.done = True
        callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            fn()

_DEALLOCATE = re.compile(rb'^\s*DEALLOCATE\s+(?:PREPARE\s+)?(?:(ALL)|"([^"]+)"|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*$',
                         re.IGNORECASE)
_DISCARD_ALL = re.compile(rb"^\s*DISCARD\s+ALL\s*;?\s*$", re.IGNORECASE)
# Placeholder status in a faked ReadyForQuery: filled with the session's status when sent.
_RFQ_CURRENT = b"Z\x00\x00\x00\x05?"

_EXTENDED = frozenset(b"PBDECH")
_BATCHED = frozenset(b"PBDEC")  # collected up to Sync when caching is on
MAX_BATCH_BYTES = 1 << 20
_SYNC = b"S\x00\x00\x00\x04"
_DROPS_STATEMENTS = re.compile(rb"deallocate|discard", re.IGNORECASE)
# A simple Query that matches none of these (no call, no word of a statement that can change the
# session or the catalog) leaves nothing in the session: it needs no parse (a caching-disabled
# config's queries need one for nothing else). A false match only costs the parse.
_MAY_AFFECT_SESSION = re.compile(
    rb"[(]|\b(?:set|reset|discard|do|call|listen|unlisten|prepare|execute|deallocate|declare|create|alter|drop"
    rb"|truncate|grant|revoke|comment|security|load|into|lock|cluster|reindex|refresh|import|reassign|rule)\b",
    re.IGNORECASE)
_FLUSH = b"H\x00\x00\x00\x04"
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


# A request the server always fails (a Bind of a statement that cannot exist: proxy names have no
# spaces), touching neither the unnamed statement nor a portal: how the proxy makes the server
# fail on purpose, so the session's transaction state follows as for a real error.
_FAILING_BIND = message(b"B", b"\x00hd proxy raises an error\x00\x00\x00\x00\x00\x00\x00")


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

    __slots__ = ("statements", "unnamed_owner", "params", "reported", "baseline", "dirty", "broken")

    def __init__(self, statement_limit: int = 500, reported: dict[bytes, bytes] | None = None) -> None:
        self.statements = ServerStatements(statement_limit)
        self.unnamed_owner: object | None = None
        # Session-level settings the proxy knows are set there (applied or read back), lower-case
        # names as in proxy/pg/settings.py. Nothing else may be set: a server whose settings are
        # not known is dirty (reset before the next client).
        self.params: dict[str, str] = {}
        # ParameterStatus values as the server last reported them, and as after its startup
        # (what it reports again after a reset).
        self.baseline: dict[bytes, bytes] = dict(reported or {})
        self.reported: dict[bytes, bytes] = dict(self.baseline)
        self.dirty = False  # needs a reset before the next client
        self.broken = False  # must be closed, never handed out again

    def reset_done(self) -> None:
        """After DISCARD ALL: no statements, no settings."""
        self.statements.clear()
        self.unnamed_owner = None
        self.params = {}
        self.reported = dict(self.baseline)
        self.dirty = False


_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ClientCore:
    def __init__(self, registry: StatementRegistry, *, settings: SessionSettings | dict[str, str] | None = None,
                 cache: CacheContext | None = None) -> None:
        self.registry = registry
        self.server: ServerState | None = None
        # Each entry: [kind, action, fake answer | handler | error, statement name, QueryObs
        # starting here, QueryObs ending here].
        self.expect: deque[list[Any]] = deque()
        self.to_client = bytearray()
        self.to_server = bytearray()
        self._buf = bytearray()
        self._sbuf = bytearray()
        # client messages waiting for a server: (kind, raw, QueryObs or None)
        self._queued: list[tuple[int, bytes, Any]] = []  # Any: QueryObs, _Marks or None
        self.statements: dict[str, Statement] = {}
        self._unnamed_parse: bytes | None = None
        # The unnamed statement as each change to it (a Parse of it, a simple Query dropping it)
        # left it, in order: a change the server did not make (failed, skipped after an error) is
        # undone in its cell, and the cells after it inherit (see _unnamed_change).
        self._unnamed_cell: list[bytes | None] = [None]
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
        # An error that ends the client's session (its settings could not be carried): the
        # session sends it after what is pending and closes the connection.
        self.fatal: bytes | None = None
        # The client's session settings (carried across server connections).
        self.settings = settings if isinstance(settings, SessionSettings) else SessionSettings(
            {k: v for k, v in (settings or {}).items() if _GUC_NAME.match(k)})
        self._check = False  # a statement may have changed settings: read them back before release
        self._dirty = False  # a statement left state that cannot be carried: reset the server after
        self._blocked = False  # a blocking settings apply is in flight: client messages wait
        self._barrier = False  # a message waits for nothing to be outstanding (see _client_message)
        self._readback_tries = 0
        self._direct_pending = 0  # plain SETs sent whose answer records them (see _note)
        self._capture = bytearray()  # the answer of an injected CAPTURE request so far
        self._ddl = False  # DDL sent in this transaction: forget shared statements again at its end
        # The current Sync group's raw client messages (None: too large to keep), for a retry.
        self._since_sync: list[tuple[int, bytes, Any]] | None = []
        self._since_sync_bytes = 0
        self._group_done = True  # its Sync was sent: the next extended message starts a group
        self._group_clean = True
        self._group_txn = b"I"  # the transaction status when the group started
        self._retried = False
        self._ignoring = False  # the server skips everything until the Sync the client has not sent yet
        self._group_unnamed = False  # the current group (re)defines the unnamed statement on the server
        self._unnamed_syncs = 0  # outstanding Syncs of groups that did
        # The edge's statement timeout fired and cancelled the running statement (set by the session):
        # the origin's 57014 "canceling statement due to user request" is reported as a timeout.
        self.timeout_cancelled = False
        self.gone = False  # the client disconnected: its server only finishes what is in flight
        self.readies = 0  # ReadyForQuery messages seen (the session re-arms its statement timer)
        self.queries = 0
        self._plain_q: bytes | None = None  # the last simple Query seen to be plain (see _query)
        self.backlog = False  # feed_client stopped with complete messages left (see OUTPUT_BUDGET)
        self._stream_left = 0  # bytes still to pass (or drop) of a message being streamed
        self._stream_forward = True
        self._stream_pending = False  # a message to stream waits for a server (or its names)
        self._harmless: dict[bytes, int] = {}  # statement texts that leave nothing (catalog version)
        self._harmless_unnamed: bytes | None = None  # the unnamed Parse known to leave nothing
        # --- the query cache (None: no caching, no per-query metrics) ---
        self.cache = cache
        self.catalog = cache.ns.catalog if cache is not None else _NO_CATALOG
        # The cache key prefix for the settings the client runs under; None while they are not
        # known (a readback is due): such a client neither reads nor fills the shared cache.
        self._prefix: int | None = cache.prefix_for(self.settings.values) if cache is not None else None
        # Extended-protocol messages are collected up to Sync/Flush, so a whole batch can be
        # judged (and answered from the cache) at once.
        self._batch: list[tuple[int, bytes]] = []
        self._batch_bytes = 0
        # While waiting (a fill by another client, a catalog reload), client messages wait here.
        self.wait: Any = None
        self._held: deque[tuple[int, bytes]] = deque()
        self._no_coalesce = False
        self._rec: QueryObs | None = None  # the query whose answer is streaming now
        self._await_sync: list[QueryObs] = []  # Executes answered, awaiting their Sync's status
        self._txn_writes: list[QueryObs] = []  # writes to invalidate again when the transaction ends
        self._portals: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}  # portal -> statement (in a txn)
        self.refresh_fill: Fill | None = None  # set on a background refresh's core
        self._reading_back: _Readback | None = None  # the settings readback in flight, if any

    # ------------------------------------------------------------------ state queries
    @property
    def wants_server(self) -> bool:
        return self.server is None and (bool(self._queued) or self._stream_pending)

    @property
    def can_release(self) -> bool:
        if self.gone:  # only what is in flight counts: the pool rolls back and resets the rest
            return self.server is not None and not self.expect and not self.copy_in
        return (self.server is not None and not self.expect and self.txn == b"I" and not self._check
                and not self.copy_in and not self._queued and not self._unsynced and not self._blocked
                and not self._stream_left and not self._stream_pending)

    # ------------------------------------------------------------------ linking
    def attach(self, server: ServerState) -> None:
        self.server = server
        sql, blocking = ("", False) if server.params == self.settings.values else \
            apply_sql(server.params, self.settings.values)
        if sql:
            # Pipelined with the client's messages; a role change first proves it took effect.
            self.to_server += encode_query(sql)
            self.expect.append([QUERY, CAPTURE, self._applied, None, None, None])
            server.params = dict(self.settings.values)
            if blocking:
                self._blocked = True
                return
        self._send_queued()

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        i = 0
        for kind, raw, obs in queued:
            if self._barrier or self._blocked:
                self._queued.extend(queued[i:])  # (a barrier puts its own message first)
                break
            try:  # a queued message's fields are read only now: a short one is still the client's error
                self._client_message(kind, raw, obs)
            except (ValueError, IndexError, struct.error):
                raise ClientProtocolError(f"malformed {chr(kind)!r} message: a name or field is cut short") from None
            i += 1
        self._drain_fakes()
        self._maybe_readback()
        if self._stream_pending and not self._queued and not self._blocked and not self._barrier:
            self.feed_client(b"")  # a large message waited for a server: it goes out now

    def _applied(self, answer: bytes | None) -> None:
        """The answer to a settings apply: on an error the server is not reused, and the client's
        work must not have run (blocking) or the client cannot go on (pipelined). None: the server
        skipped it (after an error, before a Sync), as it skipped what it restored after."""
        if answer is None:
            return
        error = _first_error(answer)
        server = self.server
        if error is None:
            if self._blocked:
                self._blocked = False
                self._send_queued()
            return
        if server is not None:
            server.broken = True
        text = "the proxy could not restore this session's settings on an origin connection: " + _error_text(error)
        if self._blocked:
            self._blocked = False
            self.to_client += self.fail_queued(error)
        else:
            self.fatal = error_message("08006", text, severity="FATAL",
                                       hint="reconnect; the last statement may have run without them")

    def fail_queued(self, error: bytes) -> bytes:
        """Answer the client's queued requests with `error`, as the server would (one error and
        one ReadyForQuery per simple Query / FunctionCall / first Sync)."""
        out = bytearray()
        errored = False
        for kind in self.drop_queued():
            if kind == 0x51 or kind == 0x46 or (kind == 0x53 and not errored):
                out += error + ready_for_query(self.txn)
                errored = True
            elif kind == 0x53:
                out += ready_for_query(self.txn)
        if not errored:
            out += error
        return bytes(out)

    def detach(self) -> ServerState:
        server = self.server
        assert server is not None
        self.server = None
        if self._dirty or self._check:
            server.dirty = True  # state the proxy cannot carry, or settings not read back
            self._dirty = False
        return server

    # ------------------------------------------------------------------ session state
    def _decide(self, sql: bytes) -> Decision:
        return self.catalog.decide(sql)

    def _note(self, d: Decision, simple: bool = False) -> None:
        """What a statement the client sends may leave in its session (before it is sent, so
        that nothing behind it is cached under settings that may no longer hold). A plain
        SET/RESET as a simple Query is recorded from its own answer (`_set_done`), not read back."""
        if d.readback:
            self.settings.custom |= d.names
            self.settings.known = False
            self._prefix = None
            if simple and d.direct is not None:
                self._direct_pending += 1
            else:
                self._check = True
                self._readback_tries = 0
        if d.dirty:
            self._dirty = True
        if d.reload_catalog:
            # DDL: statements prepared before it may not fit the new catalog; prepare anew.
            self.registry.invalidate()
            self._ddl = True

    def _maybe_readback(self) -> None:
        """Once the client's work is done (idle, nothing pending), read its settings back."""
        if (self._check and not self.gone and self.server is not None and not self.expect and self.txn == b"I"
                and not self.copy_in and not self._queued and not self._unsynced and not self._blocked
                and self.fatal is None):
            self._check = False
            self.to_server += encode_query(self.settings.readback())
            self.expect.append([QUERY, CAPTURE, self._read_back, None, None, None])
            if self.cache is not None and self._reading_back is None:
                self._reading_back = _Readback()

    def _readback_over(self) -> None:
        wait, self._reading_back = self._reading_back, None
        if wait is not None:
            wait.finish()

    def _read_back(self, answer: bytes) -> None:
        server = self.server
        error = _first_error(answer)
        if error is not None:
            self._readback_tries += 1
            if self._readback_tries < 2:  # e.g. a statement_timeout of a millisecond: try again
                self._check = True
                self._maybe_readback()
                return
            self._check = True  # still unknown: the server is reset when released
            self._readback_over()
            self.fatal = error_message("08006", "the proxy could not read this session's settings back: "
                                       + _error_text(error), severity="FATAL", hint="reconnect")
            return
        rows = [(_text(r[0]), _text(r[1])) for r in _data_rows(answer) if len(r) == 2]
        before = dict(self.settings.values)
        values = self.settings.after_readback(rows)
        if server is not None:
            server.params = values
        if self.cache is not None and (self._prefix is None or self.settings.values != before):
            self._prefix = self.cache.prefix_for(self.settings.values)
        self._readback_over()

    # ------------------------------------------------------------------ client side
    def feed_client(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._stream_left:
            self._stream_on(buf)
        off = 0
        n = len(buf)
        self.backlog = False
        to_client = self.to_client
        while n - off >= 5 and not self._stream_left:
            if len(to_client) >= OUTPUT_BUDGET:
                # Answers (from the cache, or the proxy's own) are piling up for a client that may
                # not read them: stop here; the session goes on once they are written.
                self.backlog = True
                break
            kind = buf[off]
            (length,) = _I32.unpack_from(buf, off + 1)
            if length < 4 or length > 1 << 30:
                raise ClientProtocolError(f"invalid message length {length}")
            end = off + 1 + length
            if end > n:
                if length > STREAM_OVER:
                    # Never held whole: go on with it as it arrives (or wait for a server first).
                    del buf[:off]
                    off = n = 0
                    self._stream_start(kind, length, buf)
                break
            if (kind == 0x42 or kind == 0x50) and self._fast_ok():
                parsed = self._fast_parse(buf, off, n)
                if parsed is not None:
                    off = self._fast_batch(parsed, off)
                    continue
            raw = bytes(buf[off:end])
            off = end
            if self.wait is not None:
                self._held.append((kind, raw))
            else:
                self._route_checked(kind, raw)
        del buf[:off]
        if self._batch and not buf and self.wait is None and not self.backlog:
            # The client sent part of a batch and nothing more: it may be waiting for what the
            # server says before the Sync (an error is sent at once). Never wait for a Sync or a
            # Flush the client has not sent; the part goes out now, judged message by message.
            self._checked(self._flush_batch, None)
        self._drain_fakes()
        if self._check:
            self._maybe_readback()

    # ------------------------------------------------------------------ large messages
    def _stream_start(self, kind: int, length: int, buf: bytearray) -> None:
        """A message over STREAM_OVER bytes whose start is at buf[0]: forwarded to the server as
        it arrives instead of being held whole (a huge Bind, Query, CopyData, FunctionCall), or
        refused with its bytes discarded (a Parse over MAX_PARSE, anything else that large)."""
        if self.wait is not None:
            return  # resume() goes on with it
        if kind not in _STREAMED:
            if kind == 0x50 and length <= MAX_PARSE:
                return  # a long statement text, still held whole: it must be kept for re-preparing
            if kind != 0x50:
                raise ClientProtocolError(f"{chr(kind)!r} message of {length} bytes is too long")
        if self._batch:
            self._flush_batch(None)
        if self.server is None or self._queued or self._blocked or self._barrier:
            self._stream_pending = True  # a server first (attach goes on), behind what is queued
            return
        self._stream_pending = False
        total = 1 + length
        if kind == 0x50:  # a Parse over MAX_PARSE: refused, its bytes dropped as they come
            self._raise(error_message("54000", f"the statement text is longer than the proxy keeps "
                                               f"({MAX_PARSE >> 20} MiB)",
                                      hint="send large values as parameters of a shorter statement"))
            self._stream(total, False, buf)
            return
        if self._ignoring:  # the server skips it anyway: through, with no answer to expect
            self._stream(total, True, buf)
            return
        self._unsynced = self._unsynced or kind in _EXTENDED
        if kind == 0x42:  # Bind: the statement name comes first; rename it, stream the rest
            try:
                portal_end = buf.index(b"\x00", 5, min(len(buf), 5 + 65536)) + 1
                name_end = buf.index(b"\x00", portal_end, min(len(buf), portal_end + 65536))
            except ValueError:
                if len(buf) > 5 + 2 * 65536:
                    raise ClientProtocolError("malformed 'B' message: names longer than 64 KiB") from None
                self._stream_pending = True  # wait for the names (bounded above)
                return
            name = bytes(buf[portal_end:name_end])
            if name:
                st = self.statements.get(name.decode("utf-8", "surrogateescape"))
                if st is None:
                    self._raise(error_message("26000", f'prepared statement "{_name(name)}" does not exist'))
                    self._stream(total, False, buf)
                    return
                self._bound(st.query)
                self._ensure_prepared(st)
                new = st.server_name.encode()
                self.to_server += b"B" + _I32.pack(length - len(name) + len(new)) + bytes(buf[5:portal_end]) + new
                del buf[:name_end]
                self.expect.append([BIND, FORWARD, st, name, None, None])
                self._stream(total - name_end, True, buf)
                return
            if self._unnamed_parse is None:
                self._raise(error_message("26000", "unnamed prepared statement does not exist"))
                self._stream(total, False, buf)
                return
            self._bound(parse_fields(self._unnamed_parse)[1])
            self._ensure_unnamed()
            self.expect.append([BIND, FORWARD, None, None, None, None])
        elif kind == 0x51:  # Query: too big to judge — fail closed (read back, reset, not cached)
            self.queries += 1
            self._note(_OPAQUE)
            self._drop_unnamed()
            obs = None
            if self.cache is not None:
                obs = self._obs("oversizedquery" if not self.cache.policy.disabled else "disabled", total)
                obs.write_all = True
                obs.invalidate()
            self.expect.append([QUERY, FORWARD, None, None, obs, obs])
            if len(self.expect) == 1 and obs is not None:
                self._begin(obs)
        elif kind == 0x46:  # FunctionCall: may change anything
            self._note(_OPAQUE)
            self.expect.append([FUNCTION, FORWARD, None, None, None, None])
        # CopyData needs no expectation
        self._stream(total, True, buf)

    def _stream(self, left: int, forward: bool, buf: bytearray) -> None:
        self._stream_left = left
        self._stream_forward = forward
        self._stream_on(buf)

    def _stream_on(self, buf: bytearray) -> None:
        """Pass (or drop) what has arrived of the message being streamed."""
        k = min(self._stream_left, len(buf))
        if k:
            if self._stream_forward:
                self.to_server += buf[:k]
            del buf[:k]
            self._stream_left -= k

    def _fast_ok(self) -> bool:
        """Whether a batch may be answered from the cache as it is read (no server held, nothing
        before it, outside a transaction, settings known)."""
        cache = self.cache
        return (cache is not None and not cache.policy.disabled and self.server is None and self.wait is None
                and not self._batch and not self._queued and self.txn == b"I" and self.refresh_fill is None
                and not self.expect and self._prefix is not None)

    def _fast_parse(self, buf: bytearray, off: int, n: int) -> tuple[Any, ...] | None:
        """The hot path of extended-protocol queries: `[Parse] Bind [Describe P] Execute Sync`
        whole in the buffer, with its statement known. Reads only (no side effects); None to
        take the ordinary per-message path (another shape, an incomplete or malformed batch)."""
        try:
            pos = off
            parse_raw = None
            if buf[pos] == 0x50:
                end = pos + 1 + _I32.unpack_from(buf, pos + 1)[0]
                if end + 5 > n or buf[end] != 0x42:
                    return None
                parse_raw = bytes(buf[pos:end])
                pos = end
            end = pos + 1 + _I32.unpack_from(buf, pos + 1)[0]
            if end + 5 > n:
                return None
            bind_raw = bytes(buf[pos:end])
            pos = end
            portal_end = bind_raw.index(b"\x00", 5)
            portal = bind_raw[5:portal_end]
            describe_raw = None
            if buf[pos] == 0x44:
                end = pos + 1 + _I32.unpack_from(buf, pos + 1)[0]
                if end + 5 > n or buf[pos + 5] != 0x50 or buf[pos + 6:end - 1] != portal:
                    return None
                describe_raw = bytes(buf[pos:end])
                pos = end
            if buf[pos] != 0x45:
                return None
            end = pos + 1 + _I32.unpack_from(buf, pos + 1)[0]
            if end + 5 > n or buf[pos + 5:end - 4] != portal + b"\x00" or buf[end - 4:end] != b"\x00\x00\x00\x00":
                return None  # another portal, or a row limit
            execute_raw = bytes(buf[pos:end])
            pos = end
            if buf[pos:pos + 5] != _SYNC:
                return None
            pos += 5
            stmt_end = bind_raw.index(b"\x00", portal_end + 1)
            stmt = bind_raw[portal_end + 1:stmt_end]
            if parse_raw is not None:
                name, query, oids = parse_fields(parse_raw)
                if name != stmt or (name and name.decode("utf-8", "surrogateescape") in self.statements):
                    return None  # another statement, or a name in use (the ordinary path refuses it)
            elif stmt:
                st = self.statements.get(stmt.decode("utf-8", "surrogateescape"))
                if st is None:
                    return None
                query, oids = st.query, st.param_oids
            else:
                if self._unnamed_parse is None:
                    return None
                _, query, oids = parse_fields(self._unnamed_parse)
        except (ValueError, IndexError, struct.error):
            return None  # malformed: the ordinary path says so
        return (pos, parse_raw, bind_raw, describe_raw, execute_raw, portal, stmt, bind_raw[stmt_end + 1:],
                query, oids)

    def _fast_batch(self, parsed: tuple[Any, ...], off: int) -> int:
        """Answer a batch `_fast_parse` read: from the cache when fresh, else as the ordinary
        path would (miss, stale hit, coalescing), without re-reading it. Returns its end."""
        pos, parse_raw, bind_raw, describe_raw, execute_raw, portal, stmt, tail, query, oids = parsed
        cache = self.cache
        assert cache is not None
        key = (self._prefix, b"E", query, oids, tail, False, describe_raw is not None)
        parses = [parse_raw] if parse_raw is not None else []

        def request() -> bytes:
            return extended_request(query, oids, tail, False, describe_raw is not None)

        if self._serve(key, pos - off, parses, request):
            return pos
        batch: list[tuple[int, bytes]] = [(0x50, parse_raw)] if parse_raw is not None else []
        first = len(batch)
        batch.append((0x42, bind_raw))
        if describe_raw is not None:
            batch.append((0x44, describe_raw))
        batch.append((0x45, execute_raw))
        shape = ExtendedShape(parses, first, len(batch) - 1, stmt, portal, tail, 0, False, describe_raw is not None)
        self._send_shaped(batch, _SYNC, shape, True, (query, oids), key, pos - off, looked_up=True)
        return pos

    def resume(self, *, timed_out: bool = False) -> None:
        """What this client waited for is done (or took too long): go on with its messages."""
        self.wait = None
        self._no_coalesce = timed_out
        held = self._held
        while held and self.wait is None:
            kind, raw = held.popleft()
            self._route_checked(kind, raw)
        self._no_coalesce = False
        if self._batch and not held and not self._buf and self.wait is None:
            self._checked(self._flush_batch, None)  # as at the end of feed_client: never wait for an unsent Sync
        self._drain_fakes()
        self._maybe_readback()

    def _route_checked(self, kind: int, raw: bytes) -> None:
        try:
            self._route(kind, raw)
        except (ValueError, IndexError, struct.error):  # a name without its NUL, a short field, ...
            raise ClientProtocolError(f"malformed {chr(kind)!r} message: a name or field is cut short") from None

    def _checked(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (ValueError, IndexError, struct.error):
            raise ClientProtocolError("malformed message: a name or field is cut short") from None

    def _hold(self, wait: Any, messages: list[tuple[int, bytes]]) -> None:
        self.wait = wait
        self._held.extendleft(reversed(messages))

    def _route(self, kind: int, raw: bytes) -> None:
        if kind == 0x50:  # Parse: what its statement may leave in the session
            self._note(self._decide(parse_fields(raw)[1]))
        # (A Bind, each time its statement runs: judged with its batch when caching is on — see
        # _flush_batch and _extended_obs — and as it is sent otherwise, see _bound.)
        cache = self.cache
        caching = cache is not None and not cache.policy.disabled
        if caching:
            if kind in _BATCHED:
                self._batch.append((kind, raw))
                self._batch_bytes += len(raw)
                if self._batch_bytes > MAX_BATCH_BYTES:
                    self._flush_batch(None)
                return
            if kind == 0x53 and self._batch:  # 'S' Sync ends a batch
                self._flush_batch(raw)
                return
        if self._batch:
            self._flush_batch(None)
        if kind == 0x51:  # 'Q'
            self._query(raw)
        elif kind == 0x46:  # 'F' FunctionCall: may change anything in the session
            self._note(_OPAQUE)
            if cache is not None:  # may write anything too
                obs = self._obs("notaquery" if not cache.policy.disabled else "disabled", len(raw))
                obs.write_all = True
                obs.invalidate()
                self._send(kind, raw, obs)
            else:
                self._send(kind, raw, None)
        elif kind == 0x45 and cache is not None:  # caching off: counted, and its writes invalidate
            self._send(kind, raw, self._uncached_execute(raw))
        else:
            if kind == 0x42 and cache is not None and cache.ns.watched:  # caching off: what the portal runs
                self._note_bind(raw)
            self._send(kind, raw, None)

    def _send(self, kind: int, raw: bytes, obs: Any) -> None:
        if (self.server is None or self._blocked or self._barrier) and kind != 0x58:  # 'X' needs no server
            self._queued.append((kind, raw, obs))
        else:
            self._client_message(kind, raw, obs)

    def _bound(self, query: bytes) -> bool:
        """A statement about to run again (its Bind): what it may leave in the session. With
        caching on, the batch's judgement did this before anything behind it was judged.
        True when it leaves nothing."""
        cache = self.cache
        if cache is not None and not cache.policy.disabled:
            return False
        d = self._decide(query)
        if d.readback or d.dirty or d.reload_catalog:
            self._note(d)
            return False
        if len(self._harmless) < 1024:
            self._harmless[query] = self.catalog.version  # (the hot path: a Bind per query)
        return True

    def _bound_query(self, raw: bytes) -> bytes | None:
        """The text of the statement a Bind names (None: not known here)."""
        start = raw.index(b"\x00", 5) + 1
        name = raw[start:raw.index(b"\x00", start)]
        if name:
            st = self.statements.get(name.decode("utf-8", "surrogateescape"))
            return st.query if st is not None else None
        if self._unnamed_parse is not None:
            return parse_fields(self._unnamed_parse)[1]
        return None

    def _note_bind(self, raw: bytes) -> None:
        portal, statement, _ = bind_fields(raw)
        st = self._statement_of(statement, {})
        if st is not None:
            self._portals[portal] = st
        else:
            self._portals.pop(portal, None)

    def _uncached_execute(self, raw: bytes) -> QueryObs:
        """An Execute on a config with caching off: not batched, not cached; still counted,
        and its writes invalidate the cached reads of other configs on the same origin."""
        cache = self.cache
        assert cache is not None
        obs = self._obs("disabled", len(raw))
        if not cache.ns.watched:
            return obs  # nothing is cached from this origin: nothing to invalidate
        st = self._portals.get(raw[5:-5])
        if st is None:
            obs.write_all = True  # cannot tell what it runs
        else:
            obs.writes_from(cache.ns.catalog.decide(st[0]))
        if obs.writes:
            obs.invalidate()
        return obs

    def _obs(self, status: str | None, qbytes: int) -> QueryObs:
        cache = self.cache
        assert cache is not None
        return QueryObs(cache, status, cache.clock(), qbytes)

    # ------------------------------------------------------------------ simple queries
    def _query(self, raw: bytes) -> None:
        sql = raw[5:-1]
        # Most queries are plain (no call, no session or catalog word): one search tells, and
        # spares them the rest (refusals, session effects, DEALLOCATE/DISCARD handling).
        plain = _MAY_AFFECT_SESSION.search(sql) is None
        self._plain_q = raw if plain else None
        local = self.server is None and not self._queued and self.txn == b"I"
        if local and not plain:
            refusal = self._refusal(sql)
            if refusal:
                self._drop_unnamed()  # a simple Query drops the unnamed statement, even one that fails
                self.to_client += error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I")
                if self.cache is not None:
                    obs = self._obs("disabled" if self.cache.policy.disabled else "notaquery", len(raw))
                    obs.failed = True
                    obs.complete(b"I")
                return
        if self.cache is None:
            if not plain:
                self._note(self._decide(sql), simple=True)
            self._send(0x51, raw, None)
            return
        obs = self._query_obs(raw, sql, local)
        if obs is not None:
            self._send(0x51, raw, obs)

    def _query_obs(self, raw: bytes, sql: bytes, local: bool) -> QueryObs | None:
        """The cache's part for a simple Query: None when it was answered or must wait."""
        cache = self.cache
        assert cache is not None
        policy = cache.policy
        ns = cache.ns
        if policy.disabled:  # not cached, but a write still invalidates other configs' reads
            if self.refresh_fill is not None:  # caching was turned off since the refresh began
                ns.abort_fill(self.refresh_fill)
                self.refresh_fill = None
                return None
            obs = self._obs("disabled", len(raw))
            if ns.watched or self._plain_q is not raw:
                d = ns.catalog.decide(sql)
                self._note(d, simple=True)
                if ns.watched:
                    obs.writes_from(d)
                    if obs.writes:
                        obs.invalidate()
            return obs
        refresh = self.refresh_fill
        key = (self._prefix, sql)
        if (refresh is None and local and self._prefix is not None and len(sql) <= MAX_KEY_BYTES
                and self._serve(key, len(raw), (), lambda: raw)):
            self._drop_unnamed()  # as the server would have, running it
            return None
        d = ns.catalog.decide(sql)
        if (d.unknown or ns.catalog_stale) and local and refresh is None:
            wait = cache.reload_catalog(cache.clock(), d.unknown)
            if wait is not None:
                self._hold(wait, [(0x51, raw)])
                return None
        if self._prefix is None and d.cacheable and refresh is None and self._reading_back is not None:
            self._hold(self._reading_back, [(0x51, raw)])  # the settings it runs under are on their way
            return None
        self._note(d, simple=True)
        if self._prefix is None and d.cacheable:
            d = _UNKNOWN_SETTINGS  # its settings are not known: neither served nor stored
        obs = self._obs(d.status if refresh is None else None, len(raw))
        obs.writes_from(d)
        if refresh is not None:
            self.refresh_fill = None
            if d.cacheable:
                obs.start_recording(refresh, key, d.read_tokens)
            else:
                ns.abort_fill(refresh)
        elif d.cacheable:
            if len(sql) > MAX_KEY_BYTES:
                obs.status = "oversizedquery"
            elif local:
                fill = ns.fills.get(key)
                if fill is not None:
                    if not self._no_coalesce:
                        self._hold(fill, [(0x51, raw)])  # the same query is on its way: wait for it
                        return None
                    obs.status = "miss"
                else:
                    obs.status = "miss"
                    obs.start_recording(ns.begin_fill(key), key, d.read_tokens)
            else:  # behind other requests: its transaction status is known when its answer starts
                obs.status = "miss"
                obs.head_check = True
                obs.start_recording(None, key, d.read_tokens)
        if obs.writes:
            obs.invalidate()  # now, so that no read racing it can store the old rows
        return obs

    # ------------------------------------------------------------------ extended protocol
    def _flush_batch(self, sync: bytes | None) -> None:
        """Send a collected batch (ended by `sync`, or cut short by another message)."""
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        cache = self.cache
        executes = [i for i, (k, _) in enumerate(batch) if k == 0x45]
        if cache is None or not executes:
            for kind, raw in batch:
                self._send(kind, raw, None)
            if sync is not None:
                self._send(0x53, sync, None)
            return
        if self.refresh_fill is not None and cache.policy.disabled:
            cache.ns.abort_fill(self.refresh_fill)  # caching was turned off since the refresh began
            self.refresh_fill = None
            return
        shape = (analyze_batch(batch) if sync is not None and len(executes) == 1 and not cache.policy.disabled
                 else None)
        if shape is not None:
            local = self.server is None and not self._queued and self.txn == b"I"
            self._send_shaped(batch, sync, shape, local)  # type: ignore[arg-type]
            return
        # Several Executes, a batch cut short, or caching off: each Execute is judged alone.
        observed: dict[int, QueryObs] = {}
        statements = self._batch_statements(batch)
        qbytes = sum(len(r) for _, r in batch) // len(executes)
        for i in executes:
            query = statements.get(i)
            d = cache.ns.catalog.decide(query) if query is not None else None
            self._note(d if d is not None else _OPAQUE)  # what it may leave in the session
            if cache.policy.disabled:
                # Not cached, but its writes still invalidate other configs' reads.
                obs = self._obs("disabled", qbytes)
                if d is None:
                    obs.write_all = True
                else:
                    obs.writes_from(d)
            elif d is None:
                obs = self._obs("uncacheable" if self.refresh_fill is None else None, qbytes)
                obs.write_all = True  # an unknown statement may write
            else:
                obs = self._obs(d.status, qbytes)
                obs.writes_from(d)
                if d.cacheable:
                    # several Executes in one Sync run as one implicit transaction
                    obs.status = "multiplestatements" if len(executes) > 1 else "uncacheable"
                    obs.head_check = True
            if obs.writes:
                obs.invalidate()
            observed[i] = obs
        for i, (kind, raw) in enumerate(batch):
            self._send(kind, raw, observed.get(i))
        if sync is not None:
            self._send(0x53, sync, None)

    def _send_shaped(self, batch: list[tuple[int, bytes]], sync: bytes, shape: ExtendedShape, local: bool,
                     st: tuple[bytes, tuple[int, ...]] | None = None, key: Any = None, qbytes: int = 0,
                     looked_up: bool = False) -> None:
        """A single-query batch: answered from the cache, held, or sent with its QueryObs."""
        obs = self._extended_obs(batch, sync, shape, local, st, key, qbytes, looked_up)
        if obs is None:
            return  # answered from the cache, or waiting
        for i, (kind, raw) in enumerate(batch):
            if i == shape.first or i == shape.execute:
                self._send(kind, raw, _Marks(obs if i == shape.first else None, obs if i == shape.execute else None))
            else:
                self._send(kind, raw, None)
        self._send(0x53, sync, None)

    def _statement_of(self, name: bytes, batch_parses: dict[bytes, tuple[bytes, tuple[int, ...]]]
                      ) -> tuple[bytes, tuple[int, ...]] | None:
        found = batch_parses.get(name)
        if found is not None:
            return found
        if name:
            st = self.statements.get(name.decode("utf-8", "surrogateescape"))
            return (st.query, st.param_oids) if st is not None else None
        if self._unnamed_parse is not None:
            _, query, oids = parse_fields(self._unnamed_parse)
            return query, oids
        return None

    def _batch_statements(self, batch: list[tuple[int, bytes]]) -> dict[int, bytes]:
        """Query text per Execute index (where it can be told)."""
        parses: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
        portals = dict(self._portals)
        out: dict[int, bytes] = {}
        for i, (kind, raw) in enumerate(batch):
            if kind == 0x50:
                name, query, oids = parse_fields(raw)
                parses[name] = (query, oids)
            elif kind == 0x42:
                portal, statement, _ = bind_fields(raw)
                st = self._statement_of(statement, parses)
                if st is not None:
                    portals[portal] = st
                else:
                    portals.pop(portal, None)
            elif kind == 0x45:
                portal, _ = cstring(raw, 5)
                st = portals.get(portal)
                if st is not None:
                    out[i] = st[0]
        # Portals outlive a Sync inside a transaction block (cursor-style fetches Execute them
        # again later); every one is forgotten at the next ReadyForQuery 'I'.
        self._portals = portals
        return out

    def _extended_obs(self, batch: list[tuple[int, bytes]], sync: bytes, shape: ExtendedShape, local: bool,
                      st: tuple[bytes, tuple[int, ...]] | None = None, key: Any = None,
                      qbytes: int = 0, looked_up: bool = False) -> QueryObs | None:
        """The cache's part for a single-query batch (see `_query_obs`). `looked_up`: the
        fast path already found no usable entry for `key`."""
        cache = self.cache
        assert cache is not None
        ns = cache.ns
        if st is None:
            parses: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
            for raw in shape.parses:
                name, query, oids = parse_fields(raw)
                parses[name] = (query, oids)
            st = self._statement_of(shape.statement, parses)
        qbytes = qbytes or sum(len(r) for _, r in batch)
        refresh = self.refresh_fill
        if st is not None and self.txn != b"I":
            self._portals[shape.portal] = st  # a portal outlives its Sync inside a transaction block
        if st is None:
            obs = self._obs("uncacheable" if refresh is None else None, qbytes)
            obs.write_all = True
            obs.invalidate()
            if refresh is not None:
                self.refresh_fill = None
                ns.abort_fill(refresh)
            return obs
        query, oids = st
        if key is None:
            key = (self._prefix, b"E", query, oids, shape.bind_tail, shape.describe_statement, shape.describe_portal)
        oversized = len(query) + len(shape.bind_tail) > MAX_KEY_BYTES
        if (refresh is None and local and shape.max_rows == 0 and not oversized and not looked_up
                and self._prefix is not None and not self._parses_reuse_names(shape.parses)):
            def request() -> bytes:
                return extended_request(query, oids, shape.bind_tail, shape.describe_statement, shape.describe_portal)

            if self._serve(key, qbytes, shape.parses, request):
                return None
        d = ns.catalog.decide(query)
        if (d.unknown or ns.catalog_stale) and local and refresh is None:
            wait = cache.reload_catalog(cache.clock(), d.unknown)
            if wait is not None:
                self._hold(wait, batch + [(0x53, sync)])
                return None
        if self._prefix is None and d.cacheable and refresh is None and self._reading_back is not None:
            self._hold(self._reading_back, batch + [(0x53, sync)])
            return None
        self._note(d)
        if self._prefix is None and d.cacheable:
            d = _UNKNOWN_SETTINGS  # its settings are not known: neither served nor stored
        obs = self._obs(d.status if refresh is None else None, qbytes)
        obs.writes_from(d)
        if refresh is not None:
            self.refresh_fill = None
            if d.cacheable and shape.max_rows == 0:
                obs.start_recording(refresh, key, d.read_tokens)
            else:
                ns.abort_fill(refresh)
        elif d.cacheable:
            if shape.max_rows != 0:
                obs.status = "uncacheable"  # a partial fetch (row limit)
                obs.head_check = not local
            elif oversized:
                obs.status = "oversizedquery"
            elif text_params_have_time_words(shape.bind_tail):
                obs.status = "volatile"  # a text parameter such as 'now' read as a date/time
            elif local:
                fill = ns.fills.get(key)
                obs.status = "miss"
                if fill is not None:
                    if not self._no_coalesce:
                        self._hold(fill, batch + [(0x53, sync)])
                        return None
                else:
                    obs.start_recording(ns.begin_fill(key), key, d.read_tokens)
            else:
                obs.status = "miss"
                obs.head_check = True
                obs.start_recording(None, key, d.read_tokens)
        if obs.writes:
            obs.invalidate()
        return obs

    def _serve(self, key: Any, qbytes: int, parses: list[bytes] | tuple[()], request: Any) -> bool:
        """Answer from the cache when the entry is fresh or stale-but-within-swr (then one
        background refresh of `request()` starts); an expired entry is dropped."""
        cache = self.cache
        assert cache is not None
        ns = cache.ns
        entry = ns.get(key)
        if entry is None:
            return False
        now = cache.clock()
        age = now - entry.stored_at
        policy = cache.policy
        if age >= policy.max_age + policy.swr:
            ns.remove(entry)
            return False
        out = self.to_client
        for raw in parses:
            self._parse_local(raw)
            out += PARSE_COMPLETE
        out += entry.payload
        out += Z_IDLE
        cache.metrics.query("hit", True, cache.clock() - now, qbytes, len(entry.payload))
        if age >= policy.max_age and key not in ns.fills:
            # stale: one refresh in the background, under the settings of this client
            cache.refresh(request(), ns.begin_fill(key), dict(self.settings.values))
        return True

    def _parses_reuse_names(self, parses: list[bytes] | tuple[()]) -> bool:
        """Whether a Parse of the batch names a statement that exists (the server refuses it)."""
        for raw in parses:
            name = parse_fields(raw)[0]
            if name and name.decode("utf-8", "surrogateescape") in self.statements:
                return True
        return False

    def _parse_local(self, raw: bytes) -> None:
        """A Parse answered from the cache: remember the statement for later Binds."""
        name_b, query_b, oids = parse_fields(raw)
        if not name_b:
            self._unnamed_change(raw)  # on no server yet: re-sent when bound there
            return
        self.statements[name_b.decode("utf-8", "surrogateescape")] = self.registry.get(query_b, oids, encode_parse)

    # ------------------------------------------------------------------ refusals
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

    # ------------------------------------------------------------------ towards the server
    def _client_message(self, kind: int, raw: bytes, obs: Any = None) -> None:
        """One client message to the attached server. `obs` is a QueryObs (starting and ending
        with this message) or a _Marks (an extended-protocol query spanning several)."""
        out = self.to_server
        expect = self.expect
        before = len(expect)
        if kind == 0x50 and raw[5] != 0 and any(e[1] != FAKE for e in expect) \
                and cstring(raw, 5)[0].decode("utf-8", "surrogateescape") in self.statements:
            # A name in use, maybe only by a Parse still outstanding that the server may yet skip.
            self._wait_for_outstanding(kind, raw, obs)
            return
        if self._unnamed_syncs and not self._group_unnamed and expect and (
                (kind == 0x42 and raw[raw.index(b"\x00", 5) + 1] == 0) or (kind == 0x44 and raw[5:7] == b"S\x00")):
            self._wait_for_outstanding(kind, raw, obs)  # a Bind/Describe of the unnamed statement
            return
        if kind in _EXTENDED:
            self._unsynced = True
            if self._since_sync is not None or self._group_done or self._group_clean:
                self._keep_for_retry(kind, raw, obs)
        if self._ignoring and (kind in _EXTENDED or kind == 0x51 or kind == 0x46):
            # The server skips everything up to the next Sync after an error (a FunctionCall too),
            # answering nothing.
            for o in _observations((obs,)):
                o.failed = True
                self._await_sync.append(o)
            return
        if kind == 0x42:  # 'B' Bind
            name, _ = cstring(raw, raw.index(b"\x00", 5) + 1)
            if name:
                st = self.statements.get(name.decode("utf-8", "surrogateescape"))
                if st is None:  # the server would see a name that may be the proxy's: refuse here
                    self._raise(error_message("26000", f'prepared statement "{_name(name)}" does not exist'))
                    return
                if self._harmless.get(st.query) != self.catalog.version:
                    self._bound(st.query)
                self._ensure_prepared(st)
                portal_end = raw.index(b"\x00", 5) + 1
                rest = raw[portal_end + len(name) + 1:]
                raw = message(b"B", raw[5:portal_end] + st.server_name.encode() + b"\x00" + rest)
                out += raw
                entry = [BIND, FORWARD, st, name, None, None]
                if self._since_sync is not None:
                    entry.append(len(self._since_sync) - 1)  # where it is in the kept group
                expect.append(entry)
            else:
                if self._unnamed_parse is None:  # the server's unnamed statement is not the client's
                    self._raise(error_message("26000", "unnamed prepared statement does not exist"))
                    return
                if self._unnamed_parse is not self._harmless_unnamed:
                    if self._bound(parse_fields(self._unnamed_parse)[1]):
                        self._harmless_unnamed = self._unnamed_parse
                self._ensure_unnamed()
                out += raw
                expect.append([BIND, FORWARD, None, None, None, None])
        elif kind == 0x45:  # 'E' Execute
            out += raw
            expect.append([EXECUTE, FORWARD, None, None, None, None])
        elif kind == 0x53:  # 'S' Sync
            out += raw
            self._ignoring = False
            if not self._sync_ignored:  # the server ignores Sync during an extended COPY IN
                # entry[3]: the group (re)defined the unnamed statement (see _unnamed_uncertain)
                expect.append([SYNC, FORWARD, None, self._group_unnamed, None, None])
                if self._group_unnamed:
                    self._unnamed_syncs += 1
            self._group_unnamed = False
            if self._since_sync is not None:
                self._since_sync.append((kind, raw, obs))
            self._group_done = True
        elif kind == 0x50:  # 'P' Parse
            self._parse(raw)
        elif kind == 0x51:  # 'Q' Query
            sql = raw[5:-1]
            if self._plain_q is raw:
                dealloc, discard, refusal = None, False, None
            else:
                dealloc = _DEALLOCATE.match(sql) if sql[:40].lstrip()[:10].upper() == b"DEALLOCATE" else None
                discard = dealloc is None and _DISCARD_ALL.match(sql) is not None
                refusal = self._refusal(sql) if dealloc is None and not discard else None
            if (dealloc is not None or discard or refusal) and any(e[1] != FAKE for e in expect):
                # The proxy judges this one itself: it must know the server's state when it runs
                # (a failed transaction, a transaction block, skipped after an error). Wait until
                # nothing is outstanding; the client's later messages wait behind it.
                self._wait_for_outstanding(kind, raw, obs)
                return
            self.queries += 1
            # Every simple Query drops the unnamed statement (PostgreSQL's exec_simple_query), on
            # the server and so for the client; undone if the server skips it (see _fail_until_sync).
            unnamed_undo = self._drop_unnamed()
            if self._unsynced:
                self._group_unnamed = True  # a later group's unnamed Bind depends on how this ends
            if dealloc is not None and self.txn != b"E":
                # The client's statement names exist only here: answer for the server.
                answer = self._deallocate(dealloc)
                if answer is None:
                    expect.append([QUERY, FAKE, message(b"C", b"DEALLOCATE ALL\x00" if dealloc.group(1)
                                                       else b"DEALLOCATE\x00") + _RFQ_CURRENT, None, None, None,
                                   (None, unnamed_undo)])
                else:
                    self._raise(answer, simple=True)
                if obs is not None:
                    obs.failed = answer is not None
                    obs.complete(self.txn)
                return
            if discard and self.txn == b"I":  # (in a block or a failed one it fails on the server)
                self.statements.clear()
                self.server.statements.clear()  # type: ignore[union-attr]
                self.server.unnamed_owner = None  # type: ignore[union-attr]
            refusal = refusal if self.txn == b"I" else None
            if refusal:
                expect.append([QUERY, FAKE, error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I"),
                               None, None, None, (None, unnamed_undo)])
                if obs is not None:
                    obs.failed = True
                    obs.complete(b"I")
                return
            out += raw
            change = self._decide(sql).direct if self._direct_pending else None
            snapshot = None
            if self._plain_q is not raw and dealloc is None and not discard \
                    and _DROPS_STATEMENTS.search(sql) is not None:
                # DEALLOCATE ALL / DISCARD ALL among other statements: when its tag comes, the
                # statements that existed now are gone, not those prepared after it (pipelined).
                snapshot = (dict(self.statements), self.server.statements.names())  # type: ignore[union-attr]
            entry = [QUERY, FORWARD, change, None, None, None, (snapshot, unnamed_undo)]
            expect.append(entry)
            if change is not None and change[0] != "set":
                restore = self.settings.restores(change)
                if restore:
                    # Right behind it, before anything else of the client's: its startup values
                    # again. What the reset reports for them meanwhile is not passed on.
                    expect[-1][3] = frozenset(n.encode() for n in restore)
                    sql_restore, _ = apply_sql({}, restore)
                    out += encode_query(sql_restore)
                    entry = expect[-1]
                    expect.append([QUERY, CAPTURE, self._applied, None, None, None])
                    if obs is not None:  # the query's own entry carries its observation
                        entry[4] = entry[5] = obs
                        if expect[0] is entry:
                            self._begin(obs)
                    return
        elif kind == 0x44:  # 'D' Describe
            what = raw[5:6]
            name = raw[6:-1]
            if what == b"S" and name:
                st = self.statements.get(name.decode("utf-8", "surrogateescape"))
                if st is None:
                    self._raise(error_message("26000", f'prepared statement "{_name(name)}" does not exist'))
                    return
                self._ensure_prepared(st)
                out += message(b"D", b"S" + st.server_name.encode() + b"\x00")
                entry = [DESCRIBE, FORWARD, st, name, None, None]
                if self._since_sync is not None:
                    entry.append(len(self._since_sync) - 1)
                expect.append(entry)
            else:
                if what == b"S":
                    if self._unnamed_parse is None:
                        self._raise(error_message("26000", "unnamed prepared statement does not exist"))
                        return
                    self._ensure_unnamed()
                out += raw
                expect.append([DESCRIBE, FORWARD, None, None, None, None])
        elif kind == 0x43:  # 'C' Close
            what = raw[5:6]
            name = raw[6:-1]
            if what == b"S" and name:
                # Statements stay prepared on the servers (shared); only the client's name goes
                # (back again if the server skips this group's rest after an error: _fail_until_sync).
                key = name.decode("utf-8", "surrogateescape")
                expect.append([CLOSE, FAKE, CLOSE_COMPLETE, None, None, None, (key, self.statements.pop(key, None))])
            else:
                out += raw
                expect.append([CLOSE, FORWARD, None, None, None, None])
        elif kind == 0x58:  # 'X' Terminate: the server connection stays with the pool
            self.terminated = True
        elif kind == 0x46:  # 'F' FunctionCall
            out += raw
            expect.append([FUNCTION, FORWARD, None, None, None, None])
        else:  # Flush, CopyData, CopyDone, CopyFail, … pass through
            if kind in (0x63, 0x66):  # 'c' CopyDone / 'f' CopyFail end the client's COPY
                self.copy_in = False
                self._sync_ignored = False
            out += raw
        if obs is not None and len(expect) > before:
            entry = expect[-1]
            if isinstance(obs, _Marks):
                entry[4], entry[5] = obs.start, obs.end
            else:
                entry[4] = entry[5] = obs
            if len(expect) == 1 and entry[4] is not None:
                self._begin(entry[4])

    def _unnamed_change(self, raw: bytes | None) -> Any:
        """The client's unnamed statement becomes `raw` (a Parse) or None (dropped); returns
        undo(failed): a failed Parse leaves no unnamed statement, a skipped change leaves what the
        change before it left (itself possibly undone: cells are undone in order)."""
        previous = self._unnamed_cell
        cell: list[bytes | None] = [raw]
        self._unnamed_cell = cell
        self._unnamed_parse = raw
        token = self._unnamed_token = object()

        def undo(failed: bool = False) -> None:
            cell[0] = None if failed else previous[0]
            if self._unnamed_cell is cell:
                self._unnamed_parse = cell[0]
                self._unnamed_token = object()  # sent again where needed
            server = self.server
            if server is not None and server.unnamed_owner is token:
                server.unnamed_owner = None

        return undo

    def _drop_unnamed(self) -> Any:
        """A simple Query drops the unnamed statement; returns what undoes that if it is skipped."""
        server = self.server
        if server is not None:
            server.unnamed_owner = None
        if not self._unsynced:  # nothing before it can make the server skip it: no undo (hot path)
            if self._unnamed_parse is not None or self._unnamed_cell[0] is not None:
                self._unnamed_cell = [None]
                self._unnamed_parse = None
                self._unnamed_token = object()
            return None
        return self._unnamed_change(None)

    def _unnamed_uncertain(self) -> bool:
        """Whether which statement is unnamed on the server depends on how an earlier group ends
        (a Parse of it there may yet be skipped after an error): then a Bind or Describe of it in
        this group waits for that group's end (this group's own Parse of it would decide it)."""
        return self._unnamed_syncs > 0 and not self._group_unnamed

    def _wait_for_outstanding(self, kind: int, raw: bytes, obs: Any) -> None:
        """Hold this message (and the client's next ones) until nothing is outstanding: the
        proxy's answer to it depends on how what is outstanding ends. A Flush makes the server
        answer what it has (the proxy never waits for a Sync or Flush the client has not sent)."""
        self._barrier = True
        self._queued.insert(0, (kind, raw, obs))
        if self._unsynced:
            self.to_server += _FLUSH

    def _raise(self, error: bytes, *, simple: bool = False) -> None:
        """Answer the client's current request with `error`, exactly as if the server had failed
        it: the server fails a request on purpose (so an explicit transaction becomes failed, and
        after an extended-protocol error the server skips everything up to the Sync, as the
        client expects), and the client gets `error` in place of the server's."""
        server = self.server
        assert server is not None
        if simple:
            self.to_server += proto.query("hd proxy raises an error")
            self.expect.append([QUERY, REPLACE, error, None, None, None])
            return
        self.to_server += _FAILING_BIND
        self.expect.append([BIND, REPLACE, error, None, None, None])

    def _keep_for_retry(self, kind: int, raw: bytes, obs: Any) -> None:
        """Keep the raw messages of the current Sync group from its first Parse on, so that a group
        that failed only because a shared server-side statement went stale can be sent again
        (bounded). A group with no Parse, or with a Bind/Execute before it, is never retried:
        nothing is kept (the hot path of prepared statements)."""
        if self._group_done:
            self._group_done = False
            self._since_sync = None
            self._group_clean = True  # only Parse / Close / Describe so far
            self._group_txn = self.txn
            self._retried = False
        kept = self._since_sync
        if kept is None:
            if kind == 0x50 and self._group_clean:
                self._since_sync = [(kind, raw, obs)]
                self._since_sync_bytes = len(raw)
            elif kind != 0x43 and kind != 0x44 and kind != 0x50:
                self._group_clean = False
            return
        self._since_sync_bytes += len(raw)
        if self._since_sync_bytes > MAX_RETRY_BYTES:
            self._since_sync = None
            self._group_clean = False
        else:
            kept.append((kind, raw, obs))

    def _parse(self, raw: bytes) -> None:
        """A client's Parse. Every PARSE expectation carries (7th item) what to undo when the
        Parse does not happen: when it fails, or when the server skips it after an earlier error."""
        server = self.server
        assert server is not None
        name_b, off = cstring(raw, 5)
        if not name_b:
            undo = self._unnamed_change(raw)
            server.unnamed_owner = self._unnamed_token
            self.to_server += raw
            self.expect.append([PARSE, FORWARD, None, "", None, None, undo])
            self._group_unnamed = True
            return
        name = name_b.decode("utf-8", "surrogateescape")
        query_b, off = cstring(raw, off)
        (count,) = _I16.unpack_from(raw, off)
        oids = tuple(_I32.unpack_from(raw, off + 2 + 4 * i)[0] for i in range(count))
        if name in self.statements:
            # The server parses first, then refuses the name: a syntax error wins over 42P05.
            self._parse_unnamed(query_b, oids, SKIP)
            self._raise(error_message("42P05", f'prepared statement "{_name(name_b)}" already exists'))
            return
        # Query text stays bytes: no decoding on the hot path, and no failure on odd encodings.
        st = self.registry.get(query_b, oids, encode_parse)
        self.statements[name] = st

        def forget(failed: bool) -> None:
            if self.statements.get(name) is st:
                del self.statements[name]  # the statement never existed

        if not server.statements.has(st.server_name):
            self._prepare_on_server(st, FORWARD, forget)
        elif self.txn != b"E" and all(e[1] == FAKE for e in self.expect):
            # Prepared there already, and nothing outstanding could fail this Parse: answer it.
            self.expect.append([PARSE, FAKE, PARSE_COMPLETE, None, None, None, forget])
        else:
            # It might fail (a failed transaction: 25P02) or be skipped: the server must say so,
            # and the client's name must exist there only if it does. A statement of its own.
            st = self.registry.private(query_b, oids, encode_parse)
            self.statements[name] = st
            self._prepare_on_server(st, FORWARD, forget)

    def _parse_unnamed(self, query: bytes, oids: tuple[int, ...], action: int, undo: Any = None) -> None:
        """The client's statement parsed by the server as its unnamed one: the answer (or the error)
        a named Parse would get, without creating a name the proxy does not use."""
        server = self.server
        assert server is not None
        server.unnamed_owner = None  # the client's own unnamed statement is sent again when needed
        self.to_server += encode_parse("", query, oids)
        self.expect.append([PARSE, action, None, "", None, None, undo])
        self._group_unnamed = True

    def _ensure_prepared(self, st: Statement) -> None:
        server = self.server
        assert server is not None
        if not server.statements.has(st.server_name):
            self._prepare_on_server(st, SKIP)

    def _prepare_on_server(self, st: Statement, action: int, undo: Any = None) -> None:
        server = self.server
        assert server is not None
        evicted = server.statements.add(st.server_name)
        if evicted is not None:
            self.to_server += encode_close_statement(evicted)
            self.expect.append([CLOSE, SKIP, None, None, None, None])
        self.to_server += st.parse_payload

        def not_prepared(failed: bool) -> None:
            server.statements.discard(st.server_name)
            if undo is not None:
                undo(failed)

        self.expect.append([PARSE, action, None, st.server_name, None, None, not_prepared])

    def _ensure_unnamed(self) -> None:
        server = self.server
        assert server is not None
        if self._unnamed_parse is not None and server.unnamed_owner is not self._unnamed_token:
            self.to_server += self._unnamed_parse
            server.unnamed_owner = self._unnamed_token

            token = self._unnamed_token

            def not_parsed(failed: bool) -> None:
                if server.unnamed_owner is token:
                    server.unnamed_owner = None

            self.expect.append([PARSE, SKIP, None, "", None, None, not_parsed])
            self._group_unnamed = True

    def _deallocate(self, m: re.Match[bytes]) -> bytes | None:
        """DEALLOCATE [ALL | name] on the client's names: None when done, else the error."""
        if m.group(1):
            self.statements.clear()
            # A client deallocates everything after changing the catalog under its statements:
            # later Parses get statements prepared afresh, never older shared ones.
            self.registry.invalidate()
            return None
        name = (m.group(2) or m.group(3)).decode("utf-8", "surrogateescape")
        if m.group(3):
            name = name.lower()  # unquoted identifiers fold to lower case, as in PostgreSQL
        if self.statements.pop(name, None) is None:
            return error_message("26000", f'prepared statement "{name}" does not exist')
        return None

    def _drain_fakes(self) -> None:
        expect = self.expect
        popped = False
        while expect and expect[0][1] == FAKE:
            data = expect.popleft()[2]
            if data.endswith(_RFQ_CURRENT):
                data = data[:-1] + self.txn
            self.to_client += data
            popped = True
        if popped and expect and expect[0][4] is not None:
            self._begin(expect[0][4])

    # ------------------------------------------------------------------ per-query observation
    def _begin(self, obs: QueryObs) -> None:
        """`obs`'s answer comes next."""
        self._rec = obs
        if obs.head_check:
            obs.begin(self.txn)

    def _emit(self, buf: bytearray, start: int, stop: int) -> None:
        """Forward buf[start:stop] to the client (and to the query being recorded)."""
        if start < stop:
            chunk = buf[start:stop]
            self.to_client += chunk
            rec = self._rec
            if rec is not None:
                rec.take(chunk)

    def _ready(self, status: bytes) -> None:
        """A ReadyForQuery: queries waiting for their Sync end now; writes of a finished
        transaction are invalidated a second time, now that they are committed."""
        awaiting = self._await_sync
        if awaiting:
            self._await_sync = []
            for obs in awaiting:
                if obs.complete(status):
                    self._txn_writes.append(obs)
        if status == b"I":
            if self._txn_writes:
                writes, self._txn_writes = self._txn_writes, []
                for obs in writes:
                    obs.invalidate()
            if self._portals:
                self._portals = {}

    def drop_queued(self) -> list[int]:
        """No server will come: forget the queued messages (their queries end as errors) and
        return their kinds, so the session can answer each as the server would have."""
        queued, self._queued = self._queued, []
        for o in _observations(x for _, _, x in queued):
            o.abandon()
        return [kind for kind, _, _ in queued]

    def abandon_all(self) -> None:
        """The session ends or lost its server: every query in flight ends as an error."""
        obs_seen = _observations(x for entry in self.expect for x in (entry[4], entry[5]))
        obs_seen += _observations(x for _, _, x in self._queued)
        if self._rec is not None:
            obs_seen.append(self._rec)
        obs_seen.extend(self._await_sync)
        self._await_sync = []
        self._rec = None
        for o in obs_seen:
            o.abandon()

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
        while n - off >= 5:
            kind = buf[off]
            (length,) = _I32.unpack_from(buf, off + 1)
            end = off + 1 + length
            if end > n:
                break
            head = expect[0] if expect else None
            action = head[1] if head is not None else FORWARD
            forward = action == FORWARD
            pop = False
            instead: bytes | None = None  # what the client gets in place of this message
            if kind == 0x44:  # 'D' DataRow: the hot case
                if not forward:
                    self._emit(buf, run_start, off)
                    run_start = end
                    if action == CAPTURE:
                        self._capture += buf[off:end]
                off = end
                continue
            if kind == 0x43:  # 'C' CommandComplete
                if head is not None and head[0] == EXECUTE:
                    pop = True
                if forward:
                    tag = bytes(buf[off + 5:end - 1])
                    if tag.startswith(_STATE_TAGS):
                        self._state_tag(tag, server, head)
            elif kind == 0x5A:  # 'Z' ReadyForQuery
                forward = forward or action == REPLACE
                status = bytes(buf[off + 5:off + 6])
                if head is not None and head[0] == QUERY and action == FORWARD and head[2] is not None:
                    self._set_done(head[2], status)
                if head is not None and head[5] is not None and (head[0] == QUERY or head[0] == FUNCTION):
                    # A simple query (or FunctionCall) ends here: its answer is what came before.
                    self._emit(buf, run_start, off)
                    run_start = off
                    obs = head[5]
                    self._rec = None
                    if obs.complete(status):
                        self._txn_writes.append(obs)
                self.txn = status
                self.readies += 1
                if self._await_sync or (status == b"I" and (self._txn_writes or self._portals)):
                    self._ready(status)
                if status == b"I" and self._ddl:
                    self._ddl = False
                    self.registry.invalidate()  # again, now that the DDL is committed (or not)
                self._sync_ignored = False
                self.timeout_cancelled = False
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
                payload = bytes(buf[off + 5:end])
                if action == REPLACE:
                    instead = head[2]  # an error the proxy raised: the client gets the proxy's text
                elif action == SKIP:
                    # A Parse we injected to re-prepare the client's statement: the client must
                    # know why its Bind fails. Our own simple queries never reach it.
                    forward = head[0] != QUERY
                elif action == FORWARD and head is not None and head[0] == QUERY and head[2] is not None:
                    head[2] = _FAILED  # a plain SET that failed changed nothing; read back to be sure
                elif (forward and head is not None and (head[0] == BIND or head[0] == DESCRIBE)
                      and head[2] is not None and self._stale_statement(head, payload)):
                    # Sent again on a fresh statement: the client never sees this error.
                    self._emit(buf, run_start, off)
                    run_start = off = end
                    continue
                self.copy_in = False
                self._sync_ignored = False
                if self._rec is not None:
                    self._rec.failed = True
                for obs in self._await_sync:
                    obs.failed = True
                severity = payload[:7]
                if severity.startswith((b"SFATAL\x00", b"SPANIC\x00")):
                    if head is None:
                        # Unsolicited (e.g. 57P01 at an origin shutdown) while the client awaits
                        # nothing: a driver cannot pair it with a request and reports a bare
                        # "connection closed". Keep it; the session answers the client's next
                        # request with it, so the client gets the SQLSTATE.
                        self._emit(buf, run_start, off)
                        self.held_fatal = bytes(buf[off:end])
                        run_start = end
                        off = end
                        continue
                    # The server ends the session and said why; the client must not get a
                    # second FATAL from us when the connection then drops.
                    self.fatal_forwarded = forward
                elif forward and self.timeout_cancelled and b"\x00C57014\x00" in payload:
                    self.timeout_cancelled = False  # the edge's statement timeout cancelled it
                    instead = error_message("57014", "canceling statement due to statement timeout")
                elif forward and head is not None and (head[0] == BIND or head[0] == DESCRIBE) and head[2] is not None:
                    # The server names its statement: the client must read its own name.
                    ours = b'"' + head[2].server_name.encode() + b'"'
                    if ours in payload:
                        payload = payload.replace(ours, b'"' + head[3] + b'"')
                        instead = message(b"E", payload)
                if head is not None and head[0] not in (QUERY, FUNCTION, SYNC):
                    self._fail_until_sync()
                    head = None
            elif kind == 0x53:  # 'S' ParameterStatus: what the client's statements run under
                plain_set = head is not None and head[0] == QUERY and head[2] is not None
                held = head[3] if plain_set and action == FORWARD else None
                forward = self._parameter_status(bytes(buf[off + 5:end]), server, action == FORWARD and not plain_set,
                                                 held)
            elif kind == 0x47:  # 'G' CopyInResponse: the client now streams CopyData
                self.copy_in = True
                if head is not None and head[0] == EXECUTE:
                    # COPY started by an Execute: the server ignores Syncs until CopyDone/CopyFail,
                    # including any the client already sent after the Execute (pg8000 does).
                    later = [e for e in list(expect)[1:] if e[0] != SYNC]
                    # (a dropped Sync's group that defined the unnamed statement is over too)
                    self._unnamed_syncs -= sum(1 for e in list(expect)[1:] if e[0] == SYNC and e[3])
                    expect.clear()
                    expect.append(head)
                    expect.extend(later)
                    self._sync_ignored = True
            elif kind == 0x4E or kind == 0x41:  # Notice / Notification
                forward = action == FORWARD or action == REPLACE or head is None
                if self._rec is not None:
                    self._rec.unstorable = True  # never replay a notice from the cache
            if instead is not None:
                forward = False
            if not forward:
                self._emit(buf, run_start, off)
                run_start = end
                if action == CAPTURE and kind != 0x53:
                    self._capture += buf[off:end]
                if instead is not None:
                    self.to_client += instead
            off = end
            if pop and expect:
                popped = expect.popleft()
                if popped[0] == SYNC and popped[3]:
                    self._unnamed_syncs -= 1
                if popped[1] == CAPTURE:
                    answer = bytes(self._capture)
                    self._capture.clear()
                    self._emit(buf, run_start, off)
                    run_start = off
                    popped[2](answer)  # may send requests of its own (a readback, a retry)
                elif popped[5] is not None and popped[0] == EXECUTE:
                    # An Execute's answer ends with this message; its Sync decides the rest.
                    self._emit(buf, run_start, off)
                    run_start = off
                    if self._rec is popped[5]:
                        self._rec = None
                    self._await_sync.append(popped[5])
                if expect:
                    nxt = expect[0]
                    if nxt[1] == FAKE:
                        self._emit(buf, run_start, off)
                        run_start = off
                        self._drain_fakes()
                    elif nxt[4] is not None:
                        self._emit(buf, run_start, off)
                        run_start = off
                        self._begin(nxt[4])
        self._emit(buf, run_start, off)
        del buf[:off]
        if self._barrier and not expect:
            self._barrier = False
            self._send_queued()
        if self._check:
            self._maybe_readback()

    def _parameter_status(self, payload: bytes, server: ServerState, clients_request: bool,
                          held: frozenset[bytes] | None = None) -> bool:
        """A ParameterStatus: passed on only when it tells the client something new, so what
        the client was told always matches what its statements run under (also while the
        proxy applies its settings, and after another client's on that server)."""
        try:
            i = payload.index(0)
            name, value = payload[:i], payload[i + 1:-1]
        except ValueError:
            return True
        server.reported[name] = value
        if held is not None and name.lower() in held:
            return False  # a reset the proxy undoes right behind it (startup values)
        if clients_request:
            self._changed()  # a setting changed under the client's own request: read back
        if self._rec is not None:
            self._rec.unstorable = True
        told = self.settings.reported
        if told.get(name) == value:
            return False
        told[name] = value
        return True

    def _set_done(self, change: Any, status: bytes) -> None:
        """A plain SET/RESET's ReadyForQuery: outside a transaction and without an error it is in
        effect for good (record it); inside one it may yet be rolled back (read back later)."""
        self._direct_pending -= 1
        server = self.server
        if change is None:  # skipped
            pass
        elif change is _FAILED or status != b"I" or server is None:
            self._changed()
            return
        else:
            self.settings.after_set(change, server.params)
        if not self._direct_pending and not self._check:
            self.settings.known = True
            if self.cache is not None:
                self._prefix = self.cache.prefix_for(self.settings.values)

    def _changed(self) -> None:
        self._check = True
        self._readback_tries = 0
        self.settings.known = False
        self._prefix = None

    def _state_tag(self, tag: bytes, server: ServerState, head: list[Any] | None) -> None:
        """A CommandComplete tag that says the session changed (a backstop for the classifier)."""
        # (SET and RESET are judged by the classifier, which tells SET LOCAL apart; a lone
        # DISCARD ALL is recorded from its answer.)
        plain = head is not None and head[0] == QUERY and head[2] is not None
        if (tag == b"DISCARD ALL" and not plain) or tag == b"DO" or tag.startswith(b"CALL"):
            self._changed()
        if tag.startswith(_DIRTY_TAGS):
            self._dirty = True
        if tag in (b"DISCARD ALL", b"DEALLOCATE ALL") and head is not None and len(head) > 6 \
                and head[6][0] is not None:
            # inside a multi-statement Query: what existed when it was sent is gone (on both sides)
            client, names = head[6][0]
            for name, st in client.items():
                if self.statements.get(name) is st:
                    del self.statements[name]
            for name in names:
                server.statements.discard(name)
            server.unnamed_owner = None
            if tag == b"DEALLOCATE ALL":
                self.registry.invalidate()

    def _stale_statement(self, head: list[Any], payload: bytes) -> bool:
        """A Bind (or Describe) of a shared server-side statement failed: it no longer fits the
        catalog (a type was dropped and created again, a table's columns changed behind the
        proxy's back). Later Parses of that text get a statement prepared afresh. When the client
        prepared it in this very group, nothing ran before it in the group (the error rolled
        nothing back) and nothing of the client's follows it, the group is sent again on a fresh
        statement and the client never sees the error (on a direct connection its Parse would
        have prepared against the current catalog). True when it will be."""
        fields = _error_fields(payload)
        code, text = fields.get(b"C", b""), fields.get(b"M", b"")
        if not any(code == c and text.startswith(m) for c, m in _STALE_STATEMENT):
            return False
        st: Statement = head[2]
        self.registry.forget(st)
        kept = self._since_sync
        expect = self.expect
        if kept is None or self._retried or self._group_txn != b"I" or self._queued:
            return False
        sync_at = next((i for i, e in enumerate(expect) if e[0] == SYNC), None)
        if (sync_at is None) == self._group_done or (sync_at is not None and sync_at != len(expect) - 1):
            return False  # another group is in flight behind this one
        first = head[6] if len(head) > 6 else None  # the failed request, in the kept group
        if first is None or not 0 <= first < len(kept):
            return False
        parsed = False
        for kind, raw, _ in kept[:first]:
            if kind != 0x50 and kind != 0x43 and kind != 0x44:
                return False  # something before it ran: the error rolled it back
            if kind == 0x50:
                name = parse_fields(raw)[0].decode("utf-8", "surrogateescape")
                parsed = parsed or self.statements.get(name) is st
        if not parsed:
            return False
        fresh = self.registry.get(st.query, st.param_oids, encode_parse)
        for name, mapped in list(self.statements.items()):
            if mapped is st:
                self.statements[name] = fresh
        again = kept[first:]
        # The server skips the rest of the group up to a Sync: so do we; that Sync's answer
        # (the client's, or ours when the client has not sent one yet) starts the retry.
        while expect and expect[0][0] != SYNC:
            expect.popleft()
        if not expect:
            self.to_server += _SYNC
            expect.append([SYNC, FORWARD, None, None, None, None])
        expect[0][1] = CAPTURE
        expect[0][2] = lambda _answer: self._retry_group(again)
        self._retried = True
        self._blocked = True  # the client's next messages wait for the retried group
        return True

    def _retry_group(self, messages: list[tuple[int, bytes, Any]]) -> None:
        self._blocked = False
        for kind, raw, obs in messages:
            self._client_message(kind, raw, obs)
        self._retried = True  # at most once per group
        self._send_queued()

    def _fail_until_sync(self) -> None:
        """After an error the server ignores everything up to Sync: so do our expectations."""
        expect = self.expect
        first = True
        while expect and expect[0][0] != SYNC:
            entry = expect.popleft()
            if entry[0] == PARSE and len(entry) > 6 and entry[6] is not None:
                entry[6](first)  # a Parse that did not happen (failed, or skipped after the error)
            elif entry[0] == CLOSE and len(entry) > 6 and entry[6][1] is not None:
                self.statements.setdefault(*entry[6])  # a Close that did not happen: the name stays
            first = False
            if entry[1] == CAPTURE and entry[0] == QUERY:
                entry[2](None)  # skipped
            elif entry[1] == FORWARD and entry[0] == QUERY and entry[2] is not None:
                self._set_done(None, b"")  # a plain SET the server skipped: nothing changed
            if entry[0] == QUERY and len(entry) > 6 and entry[6][1] is not None:
                entry[6][1]()  # skipped: the unnamed statement was not dropped after all
            obs = entry[5]
            if obs is not None:
                obs.failed = True
                if self._rec is obs:
                    self._rec = None
                self._await_sync.append(obs)
        if not expect:
            self._ignoring = True  # the Sync is still to come: until then the server answers nothing

    def server_lost(self) -> None:
        self.abandon_all()
        self.expect.clear()
        self.copy_in = False
        self._sync_ignored = False
        self._unsynced = False
        self._ignoring = False
        self._blocked = False
        self._barrier = False
        self._unnamed_syncs = 0
        self._group_unnamed = False


def _observations(marks: Any) -> list[QueryObs]:
    """The QueryObs in an iterable of QueryObs, _Marks and None."""
    out: list[QueryObs] = []
    for m in marks:
        if isinstance(m, _Marks):
            out.extend(x for x in (m.start, m.end) if x is not None)
        elif m is not None:
            out.append(m)
    return out


class _Marks:
    """Where an extended-protocol query's answer starts and ends in the expectations."""

    __slots__ = ("start", "end")

    def __init__(self, start: QueryObs | None, end: QueryObs | None) -> None:
        self.start = start
        self.end = end


def _error_fields(payload: bytes) -> dict[bytes, bytes]:
    """An ErrorResponse payload's fields by their code byte (b"C", b"M", …)."""
    out: dict[bytes, bytes] = {}
    for part in payload.split(b"\x00"):
        if part:
            out[part[:1]] = part[1:]
    return out


def _first_error(answer: bytes) -> bytes | None:
    """The first ErrorResponse (whole message) in a run of server messages."""
    off = 0
    while off + 5 <= len(answer):
        (length,) = _I32.unpack_from(answer, off + 1)
        if answer[off] == 0x45:
            return answer[off:off + 1 + length]
        off += 1 + length
    return None


def _error_text(error: bytes) -> str:
    fields = _error_fields(error[5:])
    return f"{fields.get(b'M', b'error').decode('utf-8', 'replace')} (SQLSTATE {fields.get(b'C', b'?').decode()})"


def _data_rows(answer: bytes) -> list[list[bytes | None]]:
    rows: list[list[bytes | None]] = []
    off = 0
    while off + 5 <= len(answer):
        (length,) = _I32.unpack_from(answer, off + 1)
        if answer[off] == 0x44:
            rows.append(proto.parse_data_row(answer[off + 5:off + 1 + length]))
        off += 1 + length
    return rows


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def _name(name: bytes | str) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name
