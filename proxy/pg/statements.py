"""Named prepared statements across pooled server connections (PgBouncer >= 1.21's scheme).

A client's statement name is mapped to a proxy-wide name derived from (query text, parameter
type OIDs), so identical statements from many clients share one server-side statement. Each
server connection remembers which proxy names it has prepared (bounded, LRU); when a client's
Bind/Describe lands on a server that lacks the statement, the session injects a Parse first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Statement:
    server_name: str
    query: bytes
    param_oids: tuple[int, ...]
    parse_payload: bytes  # Parse payload under server_name, ready to inject


class StatementRegistry:
    """Proxy-wide: one server name per distinct (query, parameter types)."""

    def __init__(self, prefix: str = "hd_") -> None:
        self._by_key: dict[tuple[bytes, tuple[int, ...]], Statement] = {}
        self._prefix = prefix
        self._next = 0

    def get(self, query: bytes, param_oids: tuple[int, ...],
            encode_parse: Callable[[str, bytes, tuple[int, ...]], bytes]) -> Statement:
        key = (query, param_oids)
        st = self._by_key.get(key)
        if st is None:
            self._next += 1
            name = f"{self._prefix}{self._next}"
            st = Statement(name, query, param_oids, encode_parse(name, query, param_oids))
            self._by_key[key] = st
        return st

    def private(self, query: bytes, param_oids: tuple[int, ...],
                encode_parse: Callable[[str, bytes, tuple[int, ...]], bytes]) -> Statement:
        """A statement under a name of its own, never shared (a Parse whose outcome only the
        server can tell: the name must exist there exactly when it succeeded)."""
        self._next += 1
        name = f"{self._prefix}{self._next}"
        return Statement(name, query, param_oids, encode_parse(name, query, param_oids))

    def forget(self, st: Statement) -> None:
        """`st` no longer fits the catalog: the next Parse of its text gets a new server name
        (prepared afresh), while clients that hold `st` keep it, as on a direct connection."""
        key = (st.query, st.param_oids)
        if self._by_key.get(key) is st:
            del self._by_key[key]

    def invalidate(self) -> None:
        """The catalog changed (DDL through the proxy, a client's DEALLOCATE ALL): every later
        Parse gets a statement prepared afresh, never one prepared against the old catalog."""
        self._by_key.clear()

    def __len__(self) -> int:
        return len(self._by_key)


class ServerStatements:
    """Which proxy statement names a server connection has prepared (LRU, bounded)."""

    def __init__(self, limit: int = 500) -> None:
        self._names: OrderedDict[str, None] = OrderedDict()
        self.limit = limit

    def has(self, name: str) -> bool:
        if name in self._names:
            self._names.move_to_end(name)
            return True
        return False

    def add(self, name: str) -> str | None:
        """Record `name`; returns a name to close on the server when the LRU overflows."""
        self._names[name] = None
        self._names.move_to_end(name)
        if len(self._names) > self.limit:
            old, _ = self._names.popitem(last=False)
            return old
        return None

    def names(self) -> list[str]:
        return list(self._names)

    def discard(self, name: str) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()

    def __len__(self) -> int:
        return len(self._names)
