"""What the proxy learns about each mysql config's origin, once, from its pooled connections.

* the server version its greeting announced (clients are greeted with it: MariaDB clients must
  see MariaDB), the default autocommit mode and the connection's character set after login
  (what a pooled connection starts with), learned from every new pooled connection (cheap);
* the origin's UTF-8 collations by id and each character set's default one
  (``information_schema.COLLATIONS``), loaded at a config's first login: a client's handshake
  names its collation by id only, and the proxy applies it by name.

The greeting is sent before the client names its config (the user name comes in the handshake
response), so the listener greets every client with one version: the origins' version when all
configs agree (the usual case), else the lowest one (clients gate features on the version, the
lowest is the safe choice), with a warning in the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("proxy.mysql")

FALLBACK_VERSION = "8.0.0-hd-proxy"  # before any origin was reached (no mysql config yet)
COLLATIONS_SQL = ("SELECT ID, CHARACTER_SET_NAME, COLLATION_NAME, IS_DEFAULT FROM information_schema.COLLATIONS "
                  "WHERE CHARACTER_SET_NAME IN ('utf8mb4', 'utf8mb3', 'utf8')")
LOAD_TIMEOUT = 5.0
# Collation ids pooled connections log in with (see origin._connect), by name.
POOL_COLLATIONS = {45: ("utf8mb4", "utf8mb4_general_ci"), 255: ("utf8mb4", "utf8mb4_0900_ai_ci")}


def names_sql(charset: str, collation: str) -> str:
    return f"NAMES {charset} COLLATE {collation}"


@dataclass
class OriginFacts:
    server_version: str | None = None
    mariadb: bool = True
    default_autocommit: bool = True
    pool_charset: int = 45  # the collation id pooled connections log in with
    collations: dict[int, tuple[str, str]] | None = None  # id -> (charset, collation), UTF-8 only
    default_collations: dict[str, str] = field(default_factory=dict)  # charset -> its default collation
    reset_names: str | None = None  # the NAMES COM_RESET_CONNECTION leaves (MariaDB: the server's default)
    loading: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pool_names(self) -> str:
        return names_sql(*POOL_COLLATIONS.get(self.pool_charset, POOL_COLLATIONS[45]))

    def names_for(self, charset_id: int) -> str:
        """The NAMES a client asking for `charset_id` at login runs with. An id the origin does
        not know falls back to what pooled connections use (a direct connection would fall
        back to the server's default)."""
        if charset_id == self.pool_charset or not self.collations or charset_id not in self.collations:
            return self.pool_names
        return names_sql(*self.collations[charset_id])

    def canonical(self, items: tuple[tuple[str, str | None], ...]) -> tuple[tuple[str, str | None], ...]:
        """`SET NAMES cs` means cs with its default collation: say so, so that a client's NAMES
        compares equal to a connection's that has the same (PyMySQL sends `SET NAMES utf8mb4` at
        every connect: without this each of its statements would need a prelude)."""
        out = []
        for key, sql in items:
            if key == "names" and sql is not None and sql.startswith("NAMES ") and " COLLATE " not in sql:
                default = self.default_collations.get(sql[6:])
                if default is not None:
                    sql = f"{sql} COLLATE {default}"
            out.append((key, sql))
        return tuple(out)

    def learn_connection(self, origin: Any) -> None:
        """From a new pooled connection (MySQLOriginConnection)."""
        version = origin.server_version
        if version != self.server_version:
            self.server_version = version
            _versions_changed()
        self.mariadb = bool(origin.is_mariadb)
        self.default_autocommit = bool(origin.status & 0x0002)
        self.pool_charset = int(origin.charset)

    async def ensure_collations(self, pool: Any) -> None:
        """Load the origin's UTF-8 collations once (bounded; on failure clients fall back to the
        pool's collation, and the next login tries again)."""
        if self.collations is not None:
            return
        if self.loading is None:
            self.loading = asyncio.get_running_loop().create_task(self._load(pool))
        try:
            await asyncio.wait_for(asyncio.shield(self.loading), LOAD_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - logged, fallback
            log.info("cannot list the origin's collations: %s", exc)

    async def _load(self, pool: Any) -> None:
        try:
            conn = await pool.acquire()
            try:
                rows = await conn.admin_query(COLLATIONS_SQL)
            finally:
                pool.release(conn)
            rows = [(int(_text(r[0])), _text(r[1]), _text(r[2]), _text(r[3] or b"")) for r in rows]
            self.default_collations = {cs: coll for _, cs, coll, default in rows if default.lower() == "yes"}
            self.collations = {i: (cs, coll) for i, cs, coll, _ in rows if i < 256}
        finally:
            self.loading = None


def _text(v: Any) -> str:
    return v if isinstance(v, str) else bytes(v).decode()


_FACTS: "weakref.WeakKeyDictionary[Any, OriginFacts]" = weakref.WeakKeyDictionary()  # per Pool
_greeting: list[str | None] = []  # cached choice; emptied when a version is learned or a pool goes


def facts_for(pool: Any) -> OriginFacts:
    """The facts of the config whose pool this is (one pool per config)."""
    f = _FACTS.get(pool)
    if f is None:
        f = _FACTS[pool] = OriginFacts()
        weakref.finalize(pool, _versions_changed)
    return f


def known_versions() -> bool:
    return any(f.server_version for f in list(_FACTS.values()))


def _version_key(v: str) -> tuple[int, ...]:
    v = v[6:] if v.startswith("5.5.5-") else v  # MariaDB's replication prefix
    return tuple(int(x) for x in re.findall(r"\d+", v.split("-", 1)[0])[:3])


def _versions_changed() -> None:
    _greeting.clear()


def greeting_version() -> str:
    if not _greeting:
        versions = sorted({f.server_version for f in list(_FACTS.values()) if f.server_version}, key=_version_key)
        if len(versions) > 1:
            log.warning("mysql configs reach origins of different versions (%s): clients are greeted as %s",
                        ", ".join(versions), versions[0])
        _greeting.append(versions[0] if versions else None)
    return _greeting[0] or FALLBACK_VERSION


__all__ = ["FALLBACK_VERSION", "OriginFacts", "facts_for", "greeting_version", "known_versions", "names_sql"]
