"""The query cache as one client's protocol stream sees it (sans-I/O helpers for ClientCore).

* `CachePolicy` — one config's settings (shared by its sessions, changed in place on update).
* `CacheContext` — what a session needs: the origin's namespace, its key prefix (role,
  database, the client's session settings), metrics, the clock, and hooks to start a background
  refresh or a catalog reload (both run by the service).
* `QueryObs` — one query (a simple Query, or one Execute) from arrival to its ReadyForQuery: its
  cache status, latency and sizes for the metrics, and, for a miss, the recorded response that
  fills the cache. Every QueryObs ends exactly once (`complete` or `abandon`), which is what
  releases the clients waiting on its fill.
* `ExtendedShape` / `analyze_batch` — which extended-protocol batches can be answered from the
  cache: `Parse* [Describe S] Bind [Describe P] Execute(max_rows=0)` then Sync.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

from proxy.cache.store import MAX_RESULT_BYTES, Fill, Namespace
from proxy.sql.classify import TIME_WORDS

Z_IDLE = b"Z\x00\x00\x00\x05I"
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
MAX_KEY_BYTES = 1 << 20  # statement + parameters larger than this: `oversizedquery`
_I16 = struct.Struct("!H")
_I32 = struct.Struct("!I")
_TIME_WORD = re.compile(TIME_WORDS.encode(), re.IGNORECASE)


class CachePolicy:
    """A config's cache settings. Sessions hold this object, so an update applies at once."""

    __slots__ = ("disabled", "max_age", "swr")

    def __init__(self, disabled: bool = False, max_age: float = 60.0, swr: float = 15.0) -> None:
        self.disabled = disabled
        self.max_age = float(max_age)
        self.swr = float(swr)


class CacheContext:
    __slots__ = ("ns", "policy", "prefix_for", "metrics", "clock", "refresh", "reload_catalog")

    def __init__(self, ns: Namespace, policy: CachePolicy, prefix_for: Callable[[Mapping[str, str]], int],
                 metrics: Any, clock: Callable[[], float],
                 refresh: Callable[[bytes, Fill, dict[str, str]], None],
                 reload_catalog: Callable[[float, frozenset[str]], Any]) -> None:
        self.ns = ns
        self.policy = policy
        # The key prefix for a session's settings: (namespace, role, database, the settings
        # that can change an answer). Sessions ask again whenever their settings change.
        self.prefix_for = prefix_for
        self.metrics = metrics  # proxy.cache.metrics.ConfigMetrics
        self.clock = clock
        # (request bytes, fill, session settings) -> run it in the background, fill the cache
        self.refresh = refresh
        # (now, unknown names) -> something with add_callback(fn) while a load runs, or None
        self.reload_catalog = reload_catalog


class QueryObs:
    """One query on its way through the proxy (see the module docstring)."""

    # No __slots__: most queries never touch most of these, and class-level defaults make a
    # new QueryObs cost five attribute stores (it is made for every query).
    buf: bytearray | None = None  # the answer so far while it is being recorded for the cache
    fill: Fill | None = None
    key: Hashable = None
    tokens: frozenset[int] = frozenset()
    failed = False
    head_check = False  # decide miss vs transaction when its answer starts (pipelining)
    write_tokens: frozenset[int] = frozenset()
    write_all = False
    reload = False
    done = False
    unstorable = False  # a notice or setting change came with the rows

    def __init__(self, ctx: CacheContext, status: str | None, t0: float, qbytes: int) -> None:
        self.ctx = ctx
        self.status = status  # None: a background refresh (not a client's query)
        self.t0 = t0
        self.qbytes = qbytes
        self.rbytes = 0

    # -- set-up -----------------------------------------------------------------------------
    def writes_from(self, decision: Any) -> None:
        self.write_tokens = decision.write_tokens
        self.write_all = decision.write_all
        self.reload = decision.reload_catalog

    @property
    def writes(self) -> bool:
        return self.write_all or bool(self.write_tokens)

    def invalidate(self) -> None:
        ns = self.ctx.ns
        if self.reload:
            ns.catalog_stale = True  # DDL: decisions must be made against a fresh catalog
        if self.write_all:
            ns.invalidate_all()
        elif self.write_tokens:
            ns.invalidate(self.write_tokens)

    def start_recording(self, fill: Fill | None, key: Hashable, tokens: frozenset[int]) -> None:
        self.fill = fill
        self.key = key
        self.tokens = tokens
        self.buf = bytearray()

    def begin(self, txn: bytes) -> None:
        """Its answer starts now; `txn` is the session's transaction status just before it."""
        if not self.head_check:
            return
        self.head_check = False
        if txn != b"I":  # only cacheable reads are checked: inside a transaction they are not
            self.status = "transaction"
            self._stop_recording()
            return
        if self.buf is not None and self.fill is None:
            ns = self.ctx.ns
            if self.key in ns.fills:
                self._stop_recording()  # another query is filling it already
            else:
                self.fill = ns.begin_fill(self.key)

    # -- the answer -------------------------------------------------------------------------
    def take(self, chunk: bytes | bytearray) -> None:
        self.rbytes += len(chunk)
        if self.buf is not None:
            if self.rbytes > MAX_RESULT_BYTES:
                self._stop_recording()
                if self.status == "miss":
                    self.status = "oversizedresult"
            else:
                self.buf += chunk  # type: ignore[operator]

    def _stop_recording(self) -> None:
        self.buf = None
        if self.fill is not None:
            self.ctx.ns.abort_fill(self.fill)
            self.fill = None

    def complete(self, txn: bytes) -> bool:
        """The ReadyForQuery that ends it arrived with status `txn`. Returns True when its
        writes must be invalidated again when the transaction ends (it is still open)."""
        if self.done:
            return False
        self.done = True
        ctx = self.ctx
        now = ctx.clock()
        fill = self.fill
        if fill is not None:
            self.fill = None
            if self.buf is not None and not self.failed and not self.unstorable and txn == b"I":
                ctx.ns.complete_fill(fill, bytes(self.buf), self.tokens, now)
            else:
                ctx.ns.abort_fill(fill)
            self.buf = None
        self._report(now)
        if self.write_all or self.write_tokens:
            self.invalidate()  # committed (or rolled back) now: the second invalidation
            return txn != b"I"
        return False

    def abandon(self) -> None:
        """It will never complete (connection lost, no server, client gone)."""
        if self.done:
            return
        self.failed = True
        self.done = True
        self._stop_recording()
        self._report(self.ctx.clock())
        if self.writes:
            self.invalidate()  # it may have run before the connection went

    def _report(self, now: float) -> None:
        metrics = self.ctx.metrics
        if self.status is None:
            metrics.refresh(not self.failed)
        else:
            metrics.query(self.status, not self.failed, now - self.t0, self.qbytes, self.rbytes)


# --------------------------------------------------------------------------- extended protocol
@dataclass(slots=True)
class ExtendedShape:
    """A batch the cache can answer: `Parse* [Describe S] Bind [Describe P] Execute Sync`."""

    parses: list[bytes]  # raw Parse messages (answered with ParseComplete on a hit)
    first: int  # index in the batch of the first message whose answer is recorded
    execute: int
    statement: bytes  # the statement the Bind names
    portal: bytes
    bind_tail: bytes  # parameter formats, values and result formats, verbatim
    max_rows: int
    describe_statement: bool
    describe_portal: bool


def cstring(buf: bytes, off: int) -> tuple[bytes, int]:
    end = buf.index(b"\x00", off)
    return buf[off:end], end + 1


def parse_fields(raw: bytes) -> tuple[bytes, bytes, tuple[int, ...]]:
    """(name, query, parameter type oids) of a raw Parse message."""
    name, off = cstring(raw, 5)
    query, off = cstring(raw, off)
    (count,) = _I16.unpack_from(raw, off)
    oids = struct.unpack_from(f"!{count}I", raw, off + 2) if count else ()
    return name, query, tuple(oids)


def bind_fields(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(portal, statement, everything after the statement name) of a raw Bind message."""
    portal, off = cstring(raw, 5)
    statement, off = cstring(raw, off)
    return portal, statement, raw[off:]


def analyze_batch(batch: Sequence[tuple[int, bytes]]) -> ExtendedShape | None:
    """The cacheable shape of a Sync-terminated batch, or None."""
    i = 0
    n = len(batch)
    parses: list[bytes] = []
    while i < n and batch[i][0] == 0x50:  # Parse
        parses.append(batch[i][1])
        i += 1
    first = i
    describe_statement = None
    if i < n and batch[i][0] == 0x44 and batch[i][1][5:6] == b"S":
        describe_statement = batch[i][1][6:-1]
        i += 1
    if i >= n or batch[i][0] != 0x42:  # Bind
        return None
    portal, statement, tail = bind_fields(batch[i][1])
    if describe_statement is not None and describe_statement != statement:
        return None
    i += 1
    describe_portal = False
    if i < n and batch[i][0] == 0x44:
        raw = batch[i][1]
        if raw[5:6] != b"P" or raw[6:-1] != portal:
            return None
        describe_portal = True
        i += 1
    if i >= n or batch[i][0] != 0x45:  # Execute
        return None
    exe = batch[i][1]
    exe_portal, off = cstring(exe, 5)
    if exe_portal != portal:
        return None
    (max_rows,) = _I32.unpack_from(exe, off)
    if i + 1 != n:
        return None
    return ExtendedShape(parses, first, i, statement, portal, tail, max_rows,
                         describe_statement is not None, describe_portal)


def text_params_have_time_words(bind_tail: bytes) -> bool:
    """True when a text-format parameter reads as 'now', 'today', ... (time-dependent input)."""
    try:
        (nfmt,) = _I16.unpack_from(bind_tail, 0)
        fmts = struct.unpack_from(f"!{nfmt}H", bind_tail, 2) if nfmt else ()
        off = 2 + 2 * nfmt
        (nparams,) = _I16.unpack_from(bind_tail, off)
        off += 2
        for i in range(nparams):
            (length,) = struct.unpack_from("!i", bind_tail, off)
            off += 4
            if length < 0:
                continue
            fmt = fmts[0] if nfmt == 1 else (fmts[i] if nfmt else 0)
            if fmt == 0 and length <= 64 and _TIME_WORD.search(bind_tail, off, off + length):
                return True
            off += length
    except (struct.error, IndexError):
        return True  # malformed: the server will refuse it; never cache
    return False


def extended_request(query: bytes, oids: Sequence[int], bind_tail: bytes, describe_statement: bool,
                     describe_portal: bool) -> bytes:
    """The batch a background refresh sends for an extended-protocol entry (unnamed statement
    and portal: the answer bytes are the same as for the client's names)."""
    def msg(kind: bytes, payload: bytes) -> bytes:
        return kind + _I32.pack(len(payload) + 4) + payload

    out = msg(b"P", b"\x00" + query + b"\x00" + _I16.pack(len(oids)) + b"".join(_I32.pack(o) for o in oids))
    if describe_statement:
        out += msg(b"D", b"S\x00")
    out += msg(b"B", b"\x00\x00" + bind_tail)
    if describe_portal:
        out += msg(b"D", b"P\x00")
    out += msg(b"E", b"\x00" + _I32.pack(0))
    out += msg(b"S", b"")
    return out
