"""A client's session settings as the pooler carries them between server connections (sans-I/O).

The session model (docs/ARCHITECTURE.md, "A client's session"): session-level settings (GUCs)
are *carried*. The proxy keeps, per client, the values its session runs under and, per server
connection, the values the proxy knows are set there; before a client's transaction runs on a
server, the difference is applied (`apply_sql`), pipelined with the client's own first message.

How the proxy learns a client's values:

* at startup, from the startup packet and `options` (validated by the origin at login);
* after any statement that may change them (SET, RESET, set_config(), DISCARD, DO, CALL, a
  function not known to be state-free, a ParameterStatus the client did not cause…), by asking
  the server itself once the client's work is done (`READBACK`): `pg_settings` rows whose source
  is the session, plus role, session_authorization and custom (dotted) names the session has
  touched. The origin is the truth: rolled-back SETs, savepoints and functions are covered.

Values are kept as the origin's text (`pg_settings.setting`, which `set_config` accepts back).
Names are lower case. A startup value counts as the session's *reset* value: a client that
RESETs it gets its startup value back, as on a direct connection (see `after_readback`).
"""

from __future__ import annotations

from typing import Iterable, Mapping

# Applied first, in this order: SET SESSION AUTHORIZATION resets role.
_FIRST = ("session_authorization", "role")
# Security-relevant: a client's work must not run before these are in place, so their apply is
# not pipelined (the client's messages wait for its answer).
BLOCKING = frozenset(_FIRST)
# Never carried from startup packets (they are refused there with a clear error).
FORBIDDEN_STARTUP = frozenset({"session_authorization", "role", "transaction_isolation",
                               "transaction_read_only", "transaction_deferrable"})
_ROW_TAG = "\x01"  # marks the readback's own rows (no GUC name starts with it)


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings on; E'' for backslashes)."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_name(name: str) -> str:
    """A GUC name for RESET: each dotted part as a quoted identifier (names are case-blind)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


class SqlText(str):
    """A setting's value as a client's SET statement wrote it (`a, "B"`, `'UTC'`, `5000`):
    applied again as `SET name = <text>`, so it means exactly what it meant. Never equal to a
    plain value (the text `'UTC'` is not the value 'UTC')."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SqlText) and str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(("sql", str(self)))


def apply_sql(server: Mapping[str, str], client: Mapping[str, str]) -> tuple[str, bool]:
    """The statement that turns a server's session settings into a client's: set what differs,
    RESET what the server has and the client does not. ('', False) when they already match.
    The flag says whether the change touches role or session authorization (apply blocking)."""
    names = [n for n in _FIRST if n in client and server.get(n) != client[n]]
    names += [n for n, v in client.items() if n not in _FIRST and server.get(n) != v]
    stale = [n for n in server if n not in client]
    if not names and not stale:
        return "", False
    blocking = any(n in BLOCKING for n in names) or any(n in BLOCKING for n in stale)
    parts: list[str] = []
    # RESET first: a stale session_authorization reset must not undo a role set after it.
    parts += [f"RESET {quote_name(n)}" for n in sorted(stale, key=lambda n: (n not in _FIRST, n))]
    parts += [f"SET {quote_name(n)} = {client[n]}" for n in names if isinstance(client[n], SqlText)]
    calls = ", ".join(f"pg_catalog.set_config({quote_literal(n)}, {quote_literal(client[n])}, false)"
                      for n in names if not isinstance(client[n], SqlText))
    if calls:
        parts.append(f"SELECT {calls}")
    return ";".join(parts) + ";", blocking


def readback_sql(custom: Iterable[str]) -> str:
    """One statement whose rows are (name, value) for every setting the session has changed."""
    sql = ("SELECT pg_catalog.lower(name), setting FROM pg_catalog.pg_settings WHERE source = 'session'"
           " UNION ALL SELECT 'role', pg_catalog.current_setting('role')"
           " UNION ALL SELECT 'session_authorization', pg_catalog.current_setting('session_authorization')")
    names = sorted({n for n in custom if "." in n})
    if names:
        array = ", ".join(quote_literal(n) for n in names)
        sql += (" UNION ALL SELECT n, pg_catalog.current_setting(n, true)"
                f" FROM pg_catalog.unnest(ARRAY[{array}]::text[]) AS n")
    return sql


class SessionSettings:
    """One client's session-level settings: what it started with, what it runs under now, what it
    has been told through ParameterStatus, and whether the proxy is sure of them."""

    __slots__ = ("startup", "values", "reported", "custom", "known", "login_user")

    def __init__(self, startup: Mapping[str, str] | None = None, *, login_user: str = "",
                 reported: Mapping[bytes, bytes] | None = None) -> None:
        self.startup: dict[str, str] = {k.lower(): v for k, v in (startup or {}).items()}
        self.values: dict[str, str] = dict(self.startup)
        self.reported: dict[bytes, bytes] = dict(reported or {})
        self.custom: set[str] = {n for n in self.startup if "." in n}
        # False from the moment a statement that may change them is sent until the readback
        # after it: the cache must neither serve nor store for this client meanwhile.
        self.known = True
        self.login_user = login_user

    def readback(self) -> str:
        return readback_sql(self.custom)

    def restores(self, change: tuple[str, ...]) -> dict[str, str]:
        """The startup values a RESET-like statement takes back to the server's own defaults: the
        proxy sets them again right behind it (on a direct connection RESET gives the startup
        value back)."""
        if change[0] == "reset":
            name = change[1]
            return {name: self.startup[name]} if name in self.startup else {}
        if change[0] in ("reset_all", "discard_all"):
            return {n: v for n, v in self.startup.items() if n not in _FIRST}
        return {}

    def after_set(self, change: tuple[str, ...], server: dict[str, str]) -> None:
        """A plain SET/RESET/RESET ALL/DISCARD ALL the client ran outside a transaction, answered
        without error: record it without asking the server (whose params, `server`, follow;
        startup values were set again behind it, see `restores`)."""
        values = self.values
        kind = change[0]
        if kind == "set":
            name, text = change[1], SqlText(change[2])
            values[name] = server[name] = text
            if "." in name:
                self.custom.add(name)
        elif kind == "reset":
            name = change[1]
            server.pop(name, None)
            if name in self.startup:
                values[name] = server[name] = self.startup[name]
            else:
                values.pop(name, None)
        else:  # RESET ALL keeps role and session authorization; DISCARD ALL resets them too
            kept = {n: v for n, v in values.items() if n in _FIRST} if kind == "reset_all" else {}
            server.clear()
            restored = self.restores(change)
            server.update(restored)
            server.update(kept)
            self.values = {**restored, **kept}

    def after_readback(self, rows: Iterable[tuple[str | None, str | None]]) -> dict[str, str]:
        """Take the readback's rows as the truth; returns the server's session values (what the
        proxy now knows is set on that server). The client's values are those, plus its startup
        values for names it has RESET (their reset value on a direct connection)."""
        server: dict[str, str] = {}
        for name, value in rows:
            if name is None or value is None:
                continue
            if name == "role" and value == "none":
                continue
            if name == "session_authorization" and value == self.login_user:
                continue
            if "." in name and value == "":
                continue  # a custom setting RESET or never set: nothing to carry
            server[name] = value
        self.values = {**{k: v for k, v in self.startup.items() if k not in server}, **server}
        self.custom |= {n for n in server if "." in n}
        self.known = True
        return server
