"""What a MySQL client's statement does to its session, and the settings the proxy carries (sans-I/O).

A pooled client has no origin connection of its own, so every kind of session state needs a rule
(see docs/ARCHITECTURE.md, "The MySQL session model"). `session_effect` reads one statement's
tokens (from the classifier's lexer) and says which rule applies:

``NONE``    nothing the session keeps (queries, DML, DDL, SHOW, transaction control, SET GLOBAL);
``CARRY``   ``SET`` of session settings to constant values (system variables, NAMES / CHARACTER
            SET, SESSION TRANSACTION ...): recorded once the origin accepts them, and applied
            (only the difference) on whichever origin connection runs the client's next statement;
``PIN``     state that cannot be replayed exactly (temporary tables, user variables, SQL
            prepared statements, user locks, LOCK TABLES, HANDLER, XA, CALL, compound statements,
            SET of a computed value or a one-shot variable, text we could not lex): the client
            keeps its origin connection for the rest of its session;
``DIRTY``   may change state we cannot see (a stored function, SET STATEMENT ... FOR, verbs we do
            not know): the connection is reset before another client gets it;
``REFUSE``  refused with a clear error (non-UTF-8 character sets, KILL forms that name origin
            objects);
``NEXT_TX`` ``SET TRANSACTION ...`` without a scope: it applies to the next transaction, so the
            connection is held until that transaction has run;
``KILL``    ``KILL [CONNECTION | QUERY] <id>``: routed by the proxy to the session that owns the id.

Besides the rule, an `Effect` says whether the statement reads or changes LAST_INSERT_ID(),
reads ROW_COUNT()/FOUND_ROWS()/LASTVAL() (state of the previous statement), reads the
diagnostics area (SHOW WARNINGS, @@warning_count...), names a table (a statement that names a
table clears the diagnostics area; one that does not leaves it), or ends a transaction.

`Carried` is a client's carried settings; `prelude` is the one ``SET`` that brings an origin
connection's applied settings to the client's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Iterable, Mapping

NONE, CARRY, PIN, DIRTY, REFUSE, NEXT_TX, KILL = range(7)
ACTION_NAMES: Final = ("none", "carry", "pin", "dirty", "refuse", "next_tx", "kill")

NAMES: Final = "names"  # the key of NAMES / CHARACTER SET (the head of the character-set group)
# Variables SET NAMES (and CHARACTER SET) overwrite: they belong to the character-set group.
CHARSET_GROUP: Final = frozenset({
    NAMES, "character_set_client", "character_set_connection", "character_set_results",
    "collation_connection"})
UTF8_CHARSETS: Final = frozenset({"utf8mb4", "utf8mb3", "utf8"})
# Values that hold for one statement only (binary-log replay): replaying them would be wrong.
_ONE_SHOT: Final = frozenset({
    "insert_id", "last_insert_id", "identity", "rand_seed1", "rand_seed2", "gtid_next", "gtid_seq_no",
    "gtid_domain_id", "server_id", "pseudo_slave_mode", "sql_slave_skip_counter"})
_SCOPES: Final = {"SESSION": "session", "LOCAL": "session", "GLOBAL": "global", "PERSIST": "global",
                  "PERSIST_ONLY": "global"}
_LOCK_FUNCTIONS: Final = frozenset({"get_lock", "release_lock", "release_all_locks"})
_PIN_VERBS: Final = {
    "PREPARE": "a prepared SQL statement", "EXECUTE": "a prepared SQL statement",
    "DEALLOCATE": "a prepared SQL statement", "HANDLER": "HANDLER", "LOCK": "LOCK TABLES",
    "XA": "an XA transaction", "BINLOG": "BINLOG",
}
# Verbs known to leave nothing in the session (anything else of kind "other" is DIRTY).
_STATELESS_VERBS: Final = frozenset({
    "UNLOCK", "ANALYZE", "OPTIMIZE", "REPAIR", "CHECK", "CHECKSUM", "CACHE", "FLUSH", "RESET", "PURGE",
    "INSTALL", "UNINSTALL", "HELP", "SIGNAL", "RESIGNAL", "SHUTDOWN", "DO", "GET", "KILL"})
_DIAG_VARS: Final = frozenset({"warning_count", "error_count"})
_AUTOCOMMIT_VALUES: Final = {"0": False, "1": True, "ON": True, "OFF": False, "TRUE": True, "FALSE": False}
_LID_VARS: Final = frozenset({"identity", "last_insert_id"})
_LAST_FUNCTIONS: Final = frozenset({"row_count", "found_rows", "lastval", "currval"})


@dataclass(frozen=True, slots=True)
class Effect:
    action: int = NONE
    reason: str = ""  # PIN / DIRTY: why; REFUSE: the message for the client
    items: tuple[tuple[str, str | None], ...] = ()  # CARRY: (key, SET item SQL; None = back to DEFAULT)
    kill: tuple[bool, int] | None = None  # KILL: (query only, id)
    reads_lid: bool = False  # LAST_INSERT_ID(), @@identity
    changes_lid: bool = False  # INSERT / REPLACE / LOAD DATA, LAST_INSERT_ID(expr)
    reads_last: bool = False  # ROW_COUNT(), FOUND_ROWS(), LASTVAL(): the previous statement's state
    reads_diag: bool = False  # SHOW WARNINGS / ERRORS / COUNT(*), @@warning_count, GET DIAGNOSTICS
    calc_found_rows: bool = False  # SELECT SQL_CALC_FOUND_ROWS: FOUND_ROWS() comes next
    uses_tables: bool = False  # names a table: clears the diagnostics area
    ends_tx: bool = False  # COMMIT / ROLLBACK (not TO SAVEPOINT)
    opens_tx: bool = False  # with autocommit off, this statement starts the implicit transaction
    autocommit: bool | None = None  # SET autocommit = <constant>
    local: bool = False  # SET NAMES utf8mb4 [COLLATE c] / autocommit only: answerable without the origin

    @property
    def name(self) -> str:
        return ACTION_NAMES[self.action]


PARSE_ERROR_EFFECT: Final = Effect(PIN, "a statement the proxy could not read", changes_lid=True,
                                   reads_lid=True, opens_tx=True)
EMPTY_EFFECT: Final = Effect()


def _pin(reason: str, **kw: bool) -> Effect:
    return Effect(PIN, reason, **kw)


def _refuse(message: str) -> Effect:
    return Effect(REFUSE, message)


def _charset_name(T: list[str], V: list[str], j: int, hi: int) -> tuple[str | None, int]:
    """A character set or collation name at j (word, 'string' or `name`): (lower-case, next)."""
    if j >= hi:
        return None, j
    t = T[j]
    if t == "id":
        return V[j].lower(), j + 1
    if t == "qid":
        return V[j].lower(), j + 1
    if t in ("str", "dq") and len(V[j]) >= 2 and "\\" not in V[j]:
        return V[j][1:-1].lower(), j + 1
    return None, j


def _utf8_charset(name: str | None) -> bool:
    return name in UTF8_CHARSETS


def _utf8_collation(name: str | None) -> bool:
    return name is not None and name.split("_", 1)[0] in UTF8_CHARSETS and "_" in name


_NON_UTF8 = ("the proxy speaks UTF-8 only: use utf8mb4 (SET NAMES utf8mb4 [COLLATE utf8mb4_...]); "
             "convert other encodings in the client")


def _constant(T: list[str], V: list[str], lo: int, hi: int) -> str | None:
    """SQL for a constant SET value in tokens [lo, hi), or None when it is not one we can replay
    exactly under any sql_mode (no backslashes, no introducers, no expressions)."""
    n = hi - lo
    if n == 2 and T[lo] == "op" and V[lo] in ("-", "+") and T[lo + 1] == "num":
        return V[lo] + V[lo + 1]
    if n != 1:
        return None
    t, v = T[lo], V[lo]
    if t == "num":
        return v
    if t == "id":
        return v  # ON, OFF, TRUE, FALSE, NULL, SYSTEM, a mode word ...
    if t == "str":
        if "\\" in v or v[0] != "'":
            return None
        return v
    if t == "dq":  # "..." accepted by the origin as a string: say it with single quotes
        inner = v[1:-1]
        if "\\" in inner or "'" in inner or '"' in inner:
            return None
        return f"'{inner}'"
    return None


def _split_items(T: list[str], V: list[str], lo: int, hi: int) -> list[tuple[int, int]]:
    items = []
    depth = 0
    start = lo
    for k in range(lo, hi):
        if T[k] == "op":
            if V[k] == "(":
                depth += 1
            elif V[k] == ")":
                depth -= 1
            elif V[k] == "," and depth == 0:
                items.append((start, k))
                start = k + 1
    items.append((start, hi))
    return items


_ISOLATION = {"READ UNCOMMITTED": "READ-UNCOMMITTED", "READ COMMITTED": "READ-COMMITTED",
              "REPEATABLE READ": "REPEATABLE-READ", "SERIALIZABLE": "SERIALIZABLE"}


def _set_transaction(T: list[str], V: list[str], lo: int, hi: int, scope: str | None) -> Effect:
    """SET [GLOBAL | SESSION] TRANSACTION characteristic [, characteristic]."""
    if scope == "global":
        return EMPTY_EFFECT
    words = " ".join(V[lo:hi]) if all(t in ("id", "op") for t in T[lo:hi]) else None
    if scope is None:
        return Effect(NEXT_TX, "SET TRANSACTION (the next transaction)")
    if words is None:
        return _pin("SET SESSION TRANSACTION")
    items: list[tuple[str, str | None]] = []
    iso_var, ro_var = "transaction_isolation", "transaction_read_only"  # see for_flavor()
    for part in words.split(" , "):
        part = part.strip()
        if part.startswith("ISOLATION LEVEL "):
            level = _ISOLATION.get(part[len("ISOLATION LEVEL "):])
            if level is None:
                return _pin("SET SESSION TRANSACTION")
            items.append((iso_var, f"@@SESSION.{iso_var} = '{level}'"))
        elif part in ("READ ONLY", "READ WRITE"):
            items.append((ro_var, f"@@SESSION.{ro_var} = {1 if part == 'READ ONLY' else 0}"))
        else:
            return _pin("SET SESSION TRANSACTION")
    return Effect(CARRY, items=tuple(items))


def set_effect(T: list[str], V: list[str], lo: int, hi: int) -> Effect:
    """The effect of a SET statement, tokens [lo, hi) (lo is the SET)."""
    j = lo + 1
    scope: str | None = None
    if j < hi and T[j] == "id" and V[j] in _SCOPES:
        scope = _SCOPES[V[j]]
        j += 1
    if j < hi and T[j] == "id" and V[j] == "TRANSACTION":
        return _set_transaction(T, V, j + 1, hi, scope)
    if j < hi and T[j] == "id" and V[j] in ("PASSWORD", "DEFAULT"):
        return EMPTY_EFFECT  # SET PASSWORD, SET DEFAULT ROLE: account changes, not session state
    if j < hi and T[j] == "id" and V[j] == "ROLE":
        return _pin("SET ROLE")
    if j < hi and T[j] == "id" and V[j] == "STATEMENT":
        return Effect(DIRTY, "SET STATEMENT ... FOR")
    items: list[tuple[str, str | None]] = []
    pin: str | None = None
    autocommit: bool | None = None
    local = True
    for a, b in _split_items(T, V, j, hi):
        if a >= b:
            return _pin("an unreadable SET")
        k = a
        if T[k] == "id" and V[k] in _SCOPES:
            scope = _SCOPES[V[k]]
            k += 1
        if k >= b:
            return _pin("an unreadable SET")
        # NAMES cs [COLLATE c] | CHARACTER SET cs | CHARSET cs
        if T[k] == "id" and V[k] in ("NAMES", "CHARSET", "CHARACTER"):
            head = V[k]
            k += 1
            if head == "CHARACTER":
                if k >= b or V[k] != "SET":
                    return _pin("an unreadable SET")
                k += 1
            cs, k = _charset_name(T, V, k, b)
            if not _utf8_charset(cs):
                return _refuse(_NON_UTF8)
            sql = f"NAMES {cs}" if head == "NAMES" else f"CHARACTER SET {cs}"
            if k < b and T[k] == "id" and V[k] == "COLLATE":
                if head != "NAMES":
                    return _pin("an unreadable SET")
                coll, k = _charset_name(T, V, k + 1, b)
                if not _utf8_collation(coll):
                    return _refuse(_NON_UTF8)
                sql += f" COLLATE {coll}"
            if k != b:
                return _pin("an unreadable SET")
            items.append((NAMES, sql))
            local = local and head == "NAMES" and cs == "utf8mb4"  # (MySQL 8 warns about utf8 / utf8mb3)
            continue
        # variable = value
        name: str | None = None
        var_scope = scope
        if T[k] == "var":
            v = V[k]
            if not v.startswith("@@"):
                pin = "a user variable"
                continue
            parts = v[2:].lower().split(".")
            if len(parts) == 2 and parts[0] in ("session", "local", "global"):
                var_scope = "global" if parts[0] == "global" else "session"
                name = parts[1]
            elif len(parts) == 1 and parts[0]:
                name = parts[0]
                var_scope = "session"
            k += 1
        elif T[k] in ("id", "qid"):
            name = V[k].lower()
            k += 1
            if k < b and T[k] == "op" and V[k] == ".":
                name = None  # structured variable (cache.key_buffer_size) or NEW.col
        if name is None or k >= b or T[k] != "op" or V[k] not in ("=", ":="):
            pin = pin or "an unreadable SET"
            continue
        k += 1
        if var_scope == "global":
            local = False
            continue  # the server's global value: no session state
        value = _constant(T, V, k, b)
        if name == "autocommit":
            # carried from the origin's status flags (SERVER_STATUS_AUTOCOMMIT); a constant is noted
            # so that the proxy may answer it itself when no transaction can be open
            autocommit = _AUTOCOMMIT_VALUES.get((value or "").upper().strip("'"))
            if autocommit is None:
                local = False
            continue
        if name in CHARSET_GROUP or name in ("character_set_database", "collation_database"):
            ok = value is not None and (
                _utf8_collation(value.strip("'").lower()) if name.startswith("collation")
                else _utf8_charset(value.strip("'").lower()))
            if not ok:
                return _refuse(_NON_UTF8)
        if name in _ONE_SHOT:
            pin = pin or f"SET {name}"
            continue
        if value is None:
            pin = pin or f"SET {name} to a computed value"
            continue
        items.append((name, None if value.upper() == "DEFAULT" else f"@@SESSION.{name} = {value}"))
        local = False
    if pin is not None:
        return _pin(pin)
    if not items and autocommit is None:
        return EMPTY_EFFECT
    return Effect(CARRY if items else NONE, items=tuple(items), autocommit=autocommit, local=local)


def kill_effect(T: list[str], V: list[str], lo: int, hi: int) -> Effect:
    """KILL [HARD | SOFT] [CONNECTION | QUERY] <number>: the only form the proxy can route."""
    j = lo + 1
    if j < hi and T[j] == "id" and V[j] in ("HARD", "SOFT"):
        j += 1
    query = False
    if j < hi and T[j] == "id" and V[j] in ("CONNECTION", "QUERY"):
        query = V[j] == "QUERY"
        j += 1
    if j + 1 == hi and T[j] == "num" and V[j].isdigit():
        return Effect(KILL, kill=(query, int(V[j])))
    return _refuse("through the proxy KILL takes the id a connection was greeted with (or its "
                   "CONNECTION_ID()): KILL [CONNECTION | QUERY] <id>")


def session_effect(T: list[str], V: list[str], lo: int, hi: int, kind: str, *,
                   functions: Iterable[str] = (), unknown_functions: Iterable[str] = (),
                   uses_tables: bool = False, transaction: str | None = None) -> Effect:
    """The effect of one statement, tokens [lo, hi) of the classifier's lexer, given what the
    classifier found (kind, called functions, whether it names tables)."""
    i = lo
    while i < hi and T[i] == "op" and V[i] == "(":
        i += 1
    verb = V[i] if i < hi and T[i] == "id" else ""
    fns = frozenset(functions)
    if kind == "set":
        return set_effect(T, V, i, hi)
    if kind == "transaction":
        if verb == "XA":
            return _pin("an XA transaction")
        return Effect(ends_tx=transaction in ("commit", "rollback"))
    if kind == "call":
        return _pin("CALL (a procedure may keep session state)", changes_lid=True, reads_lid=True,
                    opens_tx=True)
    if kind == "show":
        diag = False
        if i + 1 < hi and V[i] == "SHOW":
            rest = V[i + 1:min(hi, i + 6)]
            diag = "WARNINGS" in rest or "ERRORS" in rest
        return Effect(reads_diag=diag)
    if verb == "KILL":
        return kill_effect(T, V, i, hi)
    if verb == "FLUSH" and "LOCK" in V[i:hi]:
        return _pin("FLUSH TABLES ... WITH READ LOCK")
    if kind == "other" and verb not in _STATELESS_VERBS:
        if verb in _PIN_VERBS:
            return _pin(_PIN_VERBS[verb], opens_tx=True)
        if verb == "BEGIN" or (i + 1 < hi and T[i + 1] == "op" and V[i + 1] == ":") or verb in (
                "IF", "CASE", "LOOP", "WHILE", "REPEAT", "FOR"):
            return _pin("a compound statement", changes_lid=True, reads_lid=True, opens_tx=True)
        if verb == "EXPLAIN" or verb == "DESCRIBE" or verb == "DESC":  # EXPLAIN ANALYZE runs it
            return Effect(DIRTY, "EXPLAIN ANALYZE", opens_tx=True, changes_lid=True)
        return Effect(DIRTY, f"{verb or 'an unknown statement'}", opens_tx=True, changes_lid=True)
    if kind == "ddl" and verb == "CREATE" and i + 1 < hi and V[i + 1] == "TEMPORARY" or (
            kind == "ddl" and verb == "CREATE" and i + 3 < hi and V[i + 1] == "OR" and V[i + 3] == "TEMPORARY"):
        return _pin("a temporary table")
    # SELECT, DML, DDL, DO, GET DIAGNOSTICS ...: look at variables and functions.
    reads_lid = "last_insert_id" in fns
    changes_lid = kind in ("insert", "replace")
    reads_diag = verb == "GET"
    calc = False
    pin: str | None = None
    for k in range(i, hi):
        t = T[k]
        if t == "var":
            v = V[k]
            if v.startswith("@@"):
                name = v[2:].lower().rpartition(".")[2]
                if name in _DIAG_VARS:
                    reads_diag = True
                elif name in _LID_VARS:
                    reads_lid = True
            else:
                nxt = V[k + 1] if k + 1 < hi else ""
                prev = V[k - 1] if k > lo else ""
                if nxt == ":=" or prev == "INTO" or (prev == "," and _after_into(T, V, lo, k)) or (
                        reads_diag and nxt == "="):  # GET DIAGNOSTICS @n = NUMBER
                    pin = pin or "a user variable"
        elif t == "id" and V[k] == "SQL_CALC_FOUND_ROWS":
            calc = True
        elif t == "id" and V[k] == "LAST_INSERT_ID" and k + 2 < hi and V[k + 1] == "(" and V[k + 2] != ")":
            changes_lid = True  # LAST_INSERT_ID(expr) sets it
    if fns & _LOCK_FUNCTIONS:
        pin = pin or "a user lock (GET_LOCK)"
    reads_last = bool(fns & _LAST_FUNCTIONS) or any(
        T[k] == "id" and V[k] == "PREVIOUS" and k + 1 < hi and V[k + 1] == "VALUE" for k in range(i, hi))
    opens_tx = uses_tables or kind not in ("select", "show")
    if pin is not None:
        return _pin(pin, reads_lid=reads_lid, changes_lid=changes_lid, reads_diag=reads_diag,
                    reads_last=reads_last, uses_tables=uses_tables, opens_tx=opens_tx)
    action, reason = NONE, ""
    unknown = tuple(unknown_functions)
    if unknown:
        action, reason = DIRTY, f"a stored function ({unknown[0]})"
        changes_lid = True
    return Effect(action, reason, reads_lid=reads_lid, changes_lid=changes_lid, reads_last=reads_last,
                  reads_diag=reads_diag, calc_found_rows=calc, uses_tables=uses_tables and kind != "ddl",
                  opens_tx=opens_tx)


def _after_into(T: list[str], V: list[str], lo: int, k: int) -> bool:
    """Is the variable at k in an INTO list (SELECT ... INTO @a, @b)?"""
    j = k - 1
    while j > lo and V[j] == "," and j - 1 > lo and T[j - 1] == "var":
        j -= 2
    return V[j] == "INTO" if j >= lo else False


# ------------------------------------------------------------------------------- carried settings

_MARIADB_NAMES: Final = {"transaction_isolation": "tx_isolation", "transaction_read_only": "tx_read_only"}


def for_flavor(items: tuple[tuple[str, str | None], ...], mariadb: bool) -> tuple[tuple[str, str | None], ...]:
    """MariaDB before 11.1 knows the transaction characteristics only as tx_isolation and
    tx_read_only (later versions know both; MySQL 8 only the transaction_* names)."""
    if not mariadb or not any(k in _MARIADB_NAMES for k, _ in items):
        return items
    out = []
    for k, v in items:
        if k in _MARIADB_NAMES:
            new = _MARIADB_NAMES[k]
            k, v = new, (None if v is None else v.replace(f"@@SESSION.{k} ", f"@@SESSION.{new} "))
        out.append((k, v))
    return tuple(out)


class Carried:
    """A client's carried settings: key → the SET item that makes it so, in the order the client
    made them (the character-set group keeps NAMES first: NAMES overwrites the others)."""

    __slots__ = ("items", "_key")

    def __init__(self, names: str) -> None:
        self.items: dict[str, str] = {NAMES: names}
        self._key: tuple | None = None

    def apply(self, items: Iterable[tuple[str, str | None]]) -> None:
        for key, sql in items:
            if key == NAMES:
                for k in CHARSET_GROUP - {NAMES}:
                    self.items.pop(k, None)
            if sql is None:
                self.items.pop(key, None)
            else:
                self.items.pop(key, None)  # re-inserted at the end: order is the client's
                if key == NAMES:
                    self.items = {NAMES: sql, **self.items}
                else:
                    self.items[key] = sql
        self._key = None

    def cache_key(self) -> tuple:
        """What the cache key must cover (every carried setting may change a result)."""
        if self._key is None:
            self._key = tuple(self.items.items())
        return self._key


def _group(items: Mapping[str, str]) -> tuple:
    return tuple((k, v) for k, v in items.items() if k in CHARSET_GROUP)


def prelude(client: Mapping[str, str], client_autocommit: bool, applied: Mapping[str, str] | None,
            applied_autocommit: bool, lid: int | None = None) -> str | None:
    """The SET statement that brings an origin connection (its `applied` settings; None: not
    known) to the client's settings — and its LAST_INSERT_ID() to `lid` when given — or None
    when nothing differs. Values are constants without backslashes, single-quoted: the
    statement reads the same under any sql_mode."""
    parts: list[str] = []
    if applied is None or _group(client) != _group(applied):
        parts += [v for k, v in client.items() if k in CHARSET_GROUP]
    for k, v in client.items():
        if k not in CHARSET_GROUP and (applied is None or applied.get(k) != v):
            parts.append(v)
    if applied is not None:
        for k in applied:
            if k not in client and k not in CHARSET_GROUP:
                parts.append(f"@@SESSION.{k} = DEFAULT")
    if client_autocommit != applied_autocommit:
        parts.append(f"autocommit = {int(client_autocommit)}")
    if lid is not None:
        parts.append(f"@@SESSION.last_insert_id = {int(lid)}")
    return "SET " + ", ".join(parts) if parts else None
