"""The query cache for MySQL configs: the Postgres cache's store, keyed and invalidated by the
MySQL classifier (proxy/mysql/classify.py). Sans-I/O: the session moves the bytes.

What is cached: one SELECT outside a transaction whose every function is known to be
deterministic (NOW(), RAND(), UUID(), LAST_INSERT_ID(), user variables, unknown functions,
locking reads, system schemas: never). The entry is the origin's reply as it went to the client
(classic format: pooled connections never use DEPRECATE_EOF or session tracking), keyed by the
origin database (namespace), the origin user and database, and the statement text with
comments and whitespace normalised (constants kept). A write through the proxy drops the reads
of the tables it names (all of them when it cannot list them), when it is sent and again when
its transaction ends; a read that raced a write is not stored (the store's sequence check).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from proxy.cache.store import MAX_RESULT_BYTES, Fill, Namespace
from proxy.pg.caching import MAX_KEY_BYTES
from proxy.mysql.classify import MySQLClassification, classify
from proxy.mysql.protocol import ServerStatus

_NO_BACKSLASH_ESCAPES = int(ServerStatus.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
_CLASSIFICATIONS: OrderedDict[tuple[str, bool | None], MySQLClassification] = OrderedDict()
_CLASSIFICATION_CACHE_SIZE = 10_000
_MAX_KEYED_SQL = 64 * 1024  # longer statements are classified every time and not remembered


def classify_cached(sql: str, no_backslash_escapes: bool | None) -> MySQLClassification:
    """`classify` with an LRU of verdicts: the same statement text comes back over and over."""
    key = (sql, no_backslash_escapes)
    hit = _CLASSIFICATIONS.get(key)
    if hit is not None:
        _CLASSIFICATIONS.move_to_end(key)
        return hit
    verdict = classify(sql, no_backslash_escapes=no_backslash_escapes)
    if len(sql) <= _MAX_KEYED_SQL:
        _CLASSIFICATIONS[key] = verdict
        if len(_CLASSIFICATIONS) > _CLASSIFICATION_CACHE_SIZE:
            _CLASSIFICATIONS.popitem(last=False)
    return verdict


def table_tokens(tables: frozenset[str], database: str) -> frozenset[int]:
    """Store tokens for table names; unqualified names belong to the config's database, so
    `t` and `app.t` are the same table."""
    out = set()
    for name in tables:
        qualified = name if "." in name else f"{database.lower()}.{name}"
        out.add(hash(("mysql-table", qualified)))
    return frozenset(out)


def backslash_mode(status: int | None) -> bool | None:
    """The origin's NO_BACKSLASH_ESCAPES as its last reply reported it (None: not known yet)."""
    if status is None:
        return None
    return bool(status & _NO_BACKSLASH_ESCAPES)


class QueryPlan:
    """What the session does with one COM_QUERY, decided before it goes anywhere."""

    __slots__ = ("verdict", "status", "key", "read_tokens", "write_tokens", "write_all")

    def __init__(self, verdict: MySQLClassification, status: str, key: Hashable | None,
                 read_tokens: frozenset[int], write_tokens: frozenset[int], write_all: bool) -> None:
        self.verdict = verdict
        self.status = status  # the metrics' cache status for this query
        self.key = key  # set when the reply may be served from / stored in the cache
        self.read_tokens = read_tokens
        self.write_tokens = write_tokens
        self.write_all = write_all

    @property
    def is_write(self) -> bool:
        return self.write_all or bool(self.write_tokens)


VIEWS_TTL = 60.0  # views made on the origin directly are seen within this (through the proxy: at once)


class ViewCatalog:
    """The views of a namespace's database. A view's definition may call NOW() or read other
    databases, and nothing in the statement shows it: a read that names a view is not cached.
    Loaded with SHOW FULL TABLES on the config's database; dropped after DDL through the proxy."""

    __slots__ = ("names", "loaded_at", "loading")

    def __init__(self) -> None:
        self.names: frozenset[str] | None = None  # qualified, lower-case; None: not known
        self.loaded_at = float("-inf")  # of the last attempt, failed ones too (retried after the TTL)
        self.loading: Any = None  # a future while a load runs

    def fresh(self, now: float) -> bool:
        return now - self.loaded_at < VIEWS_TTL

    def load(self, database: str, rows: list, now: float) -> None:
        db = database.lower()
        self.names = frozenset(f"{db}.{(r[0] if isinstance(r[0], str) else bytes(r[0]).decode()).lower()}"
                               for r in rows)
        self.loaded_at = now

    def failed(self, now: float) -> None:
        self.names = None  # reads that name tables stay uncacheable until a load succeeds
        self.loaded_at = now

    def forget(self) -> None:
        self.names = None
        self.loaded_at = float("-inf")


def view_catalog(ns: Namespace) -> ViewCatalog:
    cat = getattr(ns, "mysql_views", None)
    if cat is None:
        cat = ns.mysql_views = ViewCatalog()  # type: ignore[attr-defined]
    return cat


def needs_views(verdict: MySQLClassification) -> bool:
    return verdict.cacheable and bool(verdict.read_tables)


def plan_query(sql: str, *, ns: Namespace, prefix: int, database: str, caching: bool,
               in_transaction: bool, origin_status: int | None) -> QueryPlan:
    verdict = classify_cached(sql, backslash_mode(origin_status))
    write_tokens = table_tokens(verdict.write_tables, database)
    read_tokens = table_tokens(verdict.read_tables, database)
    if not caching:
        status = "disabled"
    elif in_transaction:
        status = "transaction"
    elif verdict.cacheable:
        status = "miss" if len(sql) <= MAX_KEY_BYTES else "oversizedquery"
        views = view_catalog(ns).names
        db = database.lower()
        qualified = {t if "." in t else f"{db}.{t}" for t in verdict.read_tables}
        if views is None or any(not t.startswith(db + ".") or t in views for t in qualified):
            status = "uncacheable"  # a view (or another database's table, or views not known)
    else:
        status = verdict.status
    key = (prefix, verdict.normalized or sql) if status == "miss" else None
    return QueryPlan(verdict, status, key, read_tokens, write_tokens, verdict.write_all)


def invalidate(ns: Namespace, plan: QueryPlan) -> None:
    if plan.write_all:
        ns.invalidate_all()
    elif plan.write_tokens:
        ns.invalidate(plan.write_tokens)


class Capture:
    """Collects a miss's reply while it streams to the client, to fill the cache."""

    __slots__ = ("fill", "plan", "chunks", "size", "overflow")

    def __init__(self, fill: Fill, plan: QueryPlan) -> None:
        self.fill = fill
        self.plan = plan
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def add(self, data: bytes) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > MAX_RESULT_BYTES:
            self.overflow = True  # returned to the client, not cached (as Hyperdrive)
            self.chunks.clear()
            return
        self.chunks.append(data)

    def finish(self, ok: bool, now: float) -> Any:
        ns = self.fill.ns
        if ok and not self.overflow:
            return ns.complete_fill(self.fill, b"".join(self.chunks), self.plan.read_tokens, now)
        ns.abort_fill(self.fill)
        return None
