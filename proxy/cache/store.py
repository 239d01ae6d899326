"""The in-process query cache: results by key, bounded by bytes, invalidated by table (sans-I/O).

`QueryCache` is process-wide (one LRU over every origin, bounded by bytes). A `Namespace` is one
origin database, shared by every config that points at it, so a write through any of them
invalidates the reads of all. Per namespace:

* entries remember the tables (tokens) their statement read; `invalidate(tokens)` drops the
  entries of those tables, `invalidate_all()` every entry (DDL);
* a `Fill` is an origin query in flight for a key: identical misses wait for it instead of
  querying the origin again (coalescing), and a stale entry gets at most one refresh at a time;
* every invalidation bumps a sequence number, and a fill stores its result only if none of its
  tables was invalidated while it ran: a read that raced a write never caches the old value.

Time is passed in (`now`), so freshness is exact in tests.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

from proxy.cache.catalog import OriginCatalog
from proxy.sql.classify import ClassificationCache

MAX_RESULT_BYTES = 50 * 1024 * 1024  # larger results are returned but not cached (as Hyperdrive)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_PREFIXES = 100_000  # distinct (origin, role, database, settings) combinations remembered
ENTRY_OVERHEAD = 256  # bytes counted per entry besides its payload and key


class Entry:
    __slots__ = ("key", "ns", "payload", "stored_at", "tokens", "size")

    def __init__(self, key: Hashable, ns: Namespace, payload: bytes, stored_at: float,
                 tokens: frozenset[int], size: int) -> None:
        self.key = key
        self.ns = ns
        self.payload = payload
        self.stored_at = stored_at
        self.tokens = tokens
        self.size = size


class Fill:
    """One origin query whose result will fill `key`; others may wait for it."""

    __slots__ = ("key", "ns", "seq", "callbacks", "done")
    # How long a client waits for someone else's fill before asking the origin itself: the
    # origin's statement timeout (60 s) plus a pool wait (15 s), with a margin.
    timeout = 90.0

    def __init__(self, key: Hashable, ns: Namespace, seq: int) -> None:
        self.key = key
        self.ns = ns
        self.seq = seq
        self.callbacks: list[Callable[[], None]] = []
        self.done = False

    def add_callback(self, fn: Callable[[], None]) -> None:
        if self.done:
            fn()
        else:
            self.callbacks.append(fn)

    def _finish(self) -> None:
        self.done = True
        if self.ns.fills.get(self.key) is self:
            del self.ns.fills[self.key]
        callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            fn()


class Namespace:
    """One origin database: its entries' table index, fills in flight and catalog."""

    def __init__(self, cache: QueryCache, ident: Hashable) -> None:
        self.cache = cache
        self.ident = ident
        # A statement's classification depends only on its text: one parse serves every origin.
        self.catalog = OriginCatalog(cache.classifier)
        self.catalog_loading: Any = None  # a future while a load runs (set by the service)
        self.catalog_stale = False  # DDL went through: reload before the next decision
        self.cached_by: set[str] = set()  # ids of the configs with caching on that use this origin
        self.by_token: dict[int, set[Hashable]] = {}
        self.keys: set[Hashable] = set()
        self.fills: dict[Hashable, Fill] = {}
        self.seq = 0
        self.all_seq = 0
        self.token_seq: dict[int, int] = {}
        self.stats = {"stores": 0, "store_races": 0, "invalidations": 0, "invalidated_entries": 0,
                      "full_invalidations": 0}

    # ------------------------------------------------------------------ reads
    def get(self, key: Hashable) -> Entry | None:
        return self.cache.get(key)

    def remove(self, entry: Entry) -> None:
        self.cache.discard(entry)

    # ------------------------------------------------------------------ fills
    def begin_fill(self, key: Hashable) -> Fill:
        fill = Fill(key, self, self.seq)
        self.fills[key] = fill
        return fill

    def complete_fill(self, fill: Fill, payload: bytes, tokens: frozenset[int], now: float) -> Entry | None:
        """Store the result unless a write to one of its tables happened meanwhile."""
        entry = None
        if fill.done:
            return None
        raced = self.all_seq > fill.seq or any(self.token_seq.get(t, 0) > fill.seq for t in tokens)
        if raced:
            self.stats["store_races"] += 1
        elif len(payload) <= MAX_RESULT_BYTES:
            entry = self.cache.put(fill.key, self, payload, tokens, now)
            self.stats["stores"] += 1
        fill._finish()
        return entry

    def abort_fill(self, fill: Fill) -> None:
        if not fill.done:
            fill._finish()

    # ------------------------------------------------------------------ invalidation
    def invalidate(self, tokens: frozenset[int] | set[int]) -> int:
        """Drop the entries that read any of `tokens`; returns how many."""
        self.seq += 1
        self.stats["invalidations"] += 1
        dropped = 0
        for t in tokens:
            self.token_seq[t] = self.seq
            keys = self.by_token.pop(t, None)
            if keys:
                for key in list(keys):
                    entry = self.cache.peek(key)
                    if entry is not None:
                        self.cache.discard(entry)
                        dropped += 1
        self.stats["invalidated_entries"] += dropped
        return dropped

    def invalidate_all(self) -> int:
        self.seq += 1
        self.all_seq = self.seq
        self.stats["full_invalidations"] += 1
        dropped = 0
        for key in list(self.keys):
            entry = self.cache.peek(key)
            if entry is not None:
                self.cache.discard(entry)
                dropped += 1
        self.keys.clear()
        self.by_token.clear()
        self.stats["invalidated_entries"] += dropped
        return dropped

    def _index(self, entry: Entry) -> None:
        self.keys.add(entry.key)
        for t in entry.tokens:
            self.by_token.setdefault(t, set()).add(entry.key)

    def _unindex(self, entry: Entry) -> None:
        self.keys.discard(entry.key)
        for t in entry.tokens:
            keys = self.by_token.get(t)
            if keys is not None:
                keys.discard(entry.key)
                if not keys:
                    del self.by_token[t]

    @property
    def watched(self) -> bool:
        """Whether writes must invalidate: some config caches this origin, or entries or fills
        remain. Configs with caching off skip classifying their queries otherwise."""
        return bool(self.cached_by or self.keys or self.fills)

    @property
    def entries(self) -> int:
        return len(self.keys)


class QueryCache:
    """Every namespace's entries in one LRU, bounded by `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], float] | None = None) -> None:
        import time

        self.max_bytes = max_bytes
        self.clock = clock or time.monotonic
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.classifier = ClassificationCache()
        self._namespaces: dict[Hashable, Namespace] = {}
        self._prefixes: dict[tuple[Any, ...], int] = {}
        self._next_prefix = 0

    def namespace(self, ident: Hashable) -> Namespace:
        ns = self._namespaces.get(ident)
        if ns is None:
            ns = self._namespaces[ident] = Namespace(self, ident)
        return ns

    def prefix(self, ns: Namespace, *parts: Hashable) -> int:
        """A small int standing for (namespace, role, database, settings, ...) in keys."""
        key = (ns.ident, *parts)
        pid = self._prefixes.get(key)
        if pid is None:
            if len(self._prefixes) >= MAX_PREFIXES:
                # Pathological clients (every one with its own settings): start over. Ids are
                # never reused, so old entries are merely unreachable and age out of the LRU.
                self._prefixes.clear()
            self._next_prefix += 1
            pid = self._prefixes[key] = self._next_prefix
        return pid

    def get(self, key: Hashable) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: Hashable) -> Entry | None:
        return self._entries.get(key)

    def put(self, key: Hashable, ns: Namespace, payload: bytes, tokens: frozenset[int], now: float) -> Entry | None:
        size = len(payload) + ENTRY_OVERHEAD + _key_size(key)
        if size > self.max_bytes:
            return None
        old = self._entries.get(key)
        if old is not None:
            self.discard(old)
        entry = Entry(key, ns, payload, now, tokens, size)
        self._entries[key] = entry
        self.bytes += size
        ns._index(entry)
        while self.bytes > self.max_bytes and self._entries:
            _, victim = self._entries.popitem(last=False)
            self.bytes -= victim.size
            victim.ns._unindex(victim)
            self.evictions += 1
        return entry

    def discard(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.bytes -= entry.size
            entry.ns._unindex(entry)

    def __len__(self) -> int:
        return len(self._entries)


def _key_size(key: Hashable) -> int:
    n = 64
    if type(key) is tuple:
        for part in key:
            if type(part) is bytes:
                n += len(part)
    return n
