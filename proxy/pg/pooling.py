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

from proxy.cache.store import Fill
from proxy.pg import protocol as proto
from proxy.pg.caching import (MAX_KEY_BYTES, PARSE_COMPLETE, Z_IDLE, CacheContext, ExtendedShape, QueryObs,
                              analyze_batch, bind_fields, extended_request, parse_fields,
                              text_params_have_time_words)
from proxy.pg.statements import ServerStatements, Statement, StatementRegistry

_HDR = struct.Struct("!cI")
_I32 = struct.Struct("!I")
_I16 = struct.Struct("!H")

# Expectation kinds (what the server will answer a request with).
PARSE, BIND, CLOSE, DESCRIBE, EXECUTE, SYNC, QUERY, FUNCTION = range(8)
# Actions: pass the answer to the client, swallow it (we injected the request), or
# answer the client ourselves at this point of the sequence.
FORWARD, SKIP, FAKE = 0, 1, 2

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
_BATCHED = frozenset(b"PBDEC")  # collected up to Sync when caching is on
MAX_BATCH_BYTES = 1 << 20
_SYNC = b"S\x00\x00\x00\x04"
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
    def __init__(self, registry: StatementRegistry, *, settings: dict[str, str] | None = None,
                 cache: CacheContext | None = None) -> None:
        self.registry = registry
        self.server: ServerState | None = None
        # Each entry: [kind, action, fake answer, statement name, QueryObs starting here,
        # QueryObs ending here].
        self.expect: deque[list[Any]] = deque()
        self.to_client = bytearray()
        self.to_server = bytearray()
        self._buf = bytearray()
        self._sbuf = bytearray()
        # client messages waiting for a server: (kind, raw, QueryObs or None)
        self._queued: list[tuple[int, bytes, Any]] = []  # Any: QueryObs, _Marks or None
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
        # --- the query cache (None: no caching, no per-query metrics) ---
        self.cache = cache
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
        for kind, raw, obs in queued:
            self._client_message(kind, raw, obs)
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
            self.expect.append([QUERY, SKIP, None, None, None, None])
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
        self._drain_fakes()

    def _fast_ok(self) -> bool:
        """Whether a batch may be answered from the cache as it is read (no server held, nothing
        before it, outside a transaction)."""
        cache = self.cache
        return (cache is not None and not cache.policy.disabled and self.server is None and self.wait is None
                and not self._batch and not self._queued and self.txn == b"I" and self.refresh_fill is None
                and not self.expect)

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
                if name != stmt:
                    return None
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
        key = (cache.prefix, b"E", query, oids, tail, False, describe_raw is not None)
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
        self._drain_fakes()

    def _route_checked(self, kind: int, raw: bytes) -> None:
        try:
            self._route(kind, raw)
        except (ValueError, IndexError, struct.error):  # a name without its NUL, a short field, ...
            raise ClientProtocolError(f"malformed {chr(kind)!r} message: a name or field is cut short") from None

    def _hold(self, wait: Any, messages: list[tuple[int, bytes]]) -> None:
        self.wait = wait
        self._held.extendleft(reversed(messages))

    def _route(self, kind: int, raw: bytes) -> None:
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
        elif kind == 0x45 and cache is not None:  # caching off: counted, and its writes invalidate
            self._send(kind, raw, self._uncached_execute(raw))
        elif kind == 0x46 and cache is not None:  # 'F' FunctionCall: may write anything
            obs = self._obs("notaquery" if not cache.policy.disabled else "disabled", len(raw))
            obs.write_all = True
            obs.invalidate()
            self._send(kind, raw, obs)
        else:
            if kind == 0x42 and cache is not None and cache.ns.watched:  # caching off: what the portal runs
                self._note_bind(raw)
            self._send(kind, raw, None)

    def _send(self, kind: int, raw: bytes, obs: Any) -> None:
        if self.server is None and kind != 0x58:  # 'X' Terminate needs no server
            self._queued.append((kind, raw, obs))
        else:
            self._client_message(kind, raw, obs)

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
        local = self.server is None and not self._queued and self.txn == b"I"
        if local:
            refusal = self._refusal(sql)
            if refusal:
                self.to_client += error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I")
                if self.cache is not None:
                    obs = self._obs("disabled" if self.cache.policy.disabled else "notaquery", len(raw))
                    obs.failed = True
                    obs.complete(b"I")
                return
        obs = self._query_obs(raw, sql, local) if self.cache is not None else None
        if obs is not None or self.cache is None:
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
            if ns.watched:
                obs.writes_from(ns.catalog.decide(sql))
                if obs.writes:
                    obs.invalidate()
            return obs
        refresh = self.refresh_fill
        key = (cache.prefix, sql)
        if refresh is None and local and len(sql) <= MAX_KEY_BYTES and self._serve(key, len(raw), (), lambda: raw):
            return None
        d = ns.catalog.decide(sql)
        if (d.unknown or ns.catalog_stale) and local and refresh is None:
            wait = cache.reload_catalog(cache.clock(), d.unknown)
            if wait is not None:
                self._hold(wait, [(0x51, raw)])
                return None
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
            key = (cache.prefix, b"E", query, oids, shape.bind_tail, shape.describe_statement, shape.describe_portal)
        oversized = len(query) + len(shape.bind_tail) > MAX_KEY_BYTES
        if refresh is None and local and shape.max_rows == 0 and not oversized and not looked_up:
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
            cache.refresh(request(), ns.begin_fill(key))  # stale: one refresh in the background
        return True

    def _parse_local(self, raw: bytes) -> None:
        """A Parse answered from the cache: remember the statement for later Binds."""
        name_b, query_b, oids = parse_fields(raw)
        if not name_b:
            self._unnamed_parse = raw
            self._unnamed_token = object()  # on no server yet: re-sent when bound there
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
            expect.append([BIND, FORWARD, None, None, None, None])
        elif kind == 0x45:  # 'E' Execute
            out += raw
            expect.append([EXECUTE, FORWARD, None, None, None, None])
        elif kind == 0x53:  # 'S' Sync
            out += raw
            if not self._sync_ignored:  # the server ignores Sync during an extended COPY IN
                expect.append([SYNC, FORWARD, None, None, None, None])
        elif kind == 0x50:  # 'P' Parse
            self._parse(raw)
        elif kind == 0x51:  # 'Q' Query
            self.queries += 1
            sql = raw[5:-1]
            dealloc = _DEALLOCATE.match(sql) if sql[:40].lstrip()[:10].upper() == b"DEALLOCATE" else None
            if dealloc is not None:
                # The client's statement names exist only here: answer for the server.
                expect.append([QUERY, FAKE, self._deallocate(dealloc), None, None, None])
                if obs is not None:
                    obs.complete(self.txn)
                return
            if _DISCARD_ALL.match(sql):
                self.statements.clear()
                self._unnamed_parse = None
            refusal = self._refusal(sql) if self.txn == b"I" else None
            if refusal:
                expect.append([QUERY, FAKE, error_message("0A000", refusal[0], hint=refusal[1]) + ready_for_query(b"I"),
                               None, None, None])
                if obs is not None:
                    obs.failed = True
                    obs.complete(b"I")
                return
            out += raw
            expect.append([QUERY, FORWARD, None, None, None, None])
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
            expect.append([DESCRIBE, FORWARD, None, None, None, None])
        elif kind == 0x43:  # 'C' Close
            what = raw[5:6]
            name = raw[6:-1]
            if what == b"S" and name:
                # Statements stay prepared on the servers (shared); only the client's name goes.
                self.statements.pop(name.decode("utf-8", "surrogateescape"), None)
                expect.append([CLOSE, FAKE, CLOSE_COMPLETE, None, None, None])
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

    def _parse(self, raw: bytes) -> None:
        name_b, off = cstring(raw, 5)
        if not name_b:
            self._unnamed_parse = raw
            self._unnamed_token = object()
            assert self.server is not None
            self.server.unnamed_owner = self._unnamed_token
            self.to_server += raw
            self.expect.append([PARSE, FORWARD, None, None, None, None])
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
            self.expect.append([PARSE, FAKE, PARSE_COMPLETE, None, None, None])
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
            self.expect.append([CLOSE, SKIP, None, None, None, None])
        self.to_server += st.parse_payload
        self.expect.append([PARSE, action, None, st.server_name, None, None])

    def _ensure_unnamed(self) -> None:
        server = self.server
        assert server is not None
        if self._unnamed_parse is not None and server.unnamed_owner is not self._unnamed_token:
            self.to_server += self._unnamed_parse
            self.expect.append([PARSE, SKIP, None, None, None, None])
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
            forward = action != SKIP
            pop = False
            if kind == 0x44:  # 'D' DataRow: the hot case
                if not forward:
                    self._emit(buf, run_start, off)
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
                status = bytes(buf[off + 5:off + 6])
                if head is not None and head[5] is not None and (head[0] == QUERY or head[0] == FUNCTION):
                    # A simple query (or FunctionCall) ends here: its answer is what came before.
                    self._emit(buf, run_start, off)
                    run_start = off
                    obs = head[5]
                    self._rec = None
                    if obs.complete(status):
                        self._txn_writes.append(obs)
                self.txn = status
                if self._await_sync or (status == b"I" and (self._txn_writes or self._portals)):
                    self._ready(status)
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
                if self._rec is not None:
                    self._rec.failed = True
                for obs in self._await_sync:
                    obs.failed = True
                severity = bytes(buf[off + 5:off + 12])
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
                if head is not None and head[0] not in (QUERY, FUNCTION, SYNC):
                    self._fail_until_sync()
                    head = None
            elif kind == 0x53:  # 'S' ParameterStatus: the client should know the value
                forward = True
                if action == FORWARD:
                    server.dirty = True
                if self._rec is not None:
                    self._rec.unstorable = True
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
                if self._rec is not None:
                    self._rec.unstorable = True  # never replay a notice from the cache
            if not forward:
                self._emit(buf, run_start, off)
                run_start = end
            off = end
            if pop and expect:
                popped = expect.popleft()
                if popped[5] is not None and popped[0] == EXECUTE:
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

    def _fail_until_sync(self) -> None:
        """After an error the server ignores everything up to Sync: so do our expectations."""
        expect = self.expect
        server = self.server
        while expect and expect[0][0] != SYNC:
            entry = expect.popleft()
            if entry[0] == PARSE and entry[3] is not None and server is not None:
                server.statements.discard(entry[3])  # the Parse did not happen
            obs = entry[5]
            if obs is not None:
                obs.failed = True
                if self._rec is obs:
                    self._rec = None
                self._await_sync.append(obs)

    def server_lost(self) -> None:
        self.abandon_all()
        self.expect.clear()
        self.copy_in = False
        self._sync_ignored = False
        self._unsynced = False


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
