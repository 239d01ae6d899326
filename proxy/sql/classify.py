"""Sans-I/O SQL statement classification for the query cache.

The classifier parses the statement with PostgreSQL's own grammar (libpg_query,
via the BSD-licensed ``postgast`` binding) and walks the raw parse tree. It
therefore understands comments (including nested ``/* */``), ``'...'``,
``E'...'``, ``$tag$...$tag$`` and ``"quoted identifiers"`` exactly like the
server: a function name inside a comment or a string literal never changes the
verdict.

Fail closed: anything the parser rejects, anything that is not exactly one
statement, and any internal error yields a non-cacheable status.

What this module decides
    * statement count and kind (read, DML write, DDL, other utility);
    * FOR UPDATE/SHARE (anywhere, including subqueries and CTEs), SELECT INTO,
      data-modifying CTEs, ``CREATE TEMP``/``SELECT INTO TEMP``/``pg_temp.x``
      references, TABLESAMPLE  → ``uncacheable``.

What it does NOT decide
    * Function volatility. ``functions`` lists every function called (and the
      SQL-standard keywords that behave like functions, e.g. ``current_timestamp``),
      and the caller checks them against the origin's ``pg_proc.provolatile``.
      :data:`BUILTIN_VOLATILE_OR_STABLE` is a name-based fallback only.
    * Whether an unqualified table is a temp table, a view hiding a volatile
      function, a system catalog or RLS-protected: ``tables`` is provided so the
      caller can check ``pg_class``.
    * Transaction state (that is protocol state: ReadyForQuery ``T``/``E``).

``tables`` is best effort: every relation name the statement mentions
(FROM/JOIN, DML targets, INTO, TABLE, DDL targets), schema-qualified when the
query qualifies it. Unquoted identifiers are lower-cased by the parser, quoted
ones keep their case. CTE names referenced in FROM are included too (harmless
for invalidation, which is the intended use). Operators (which also resolve to
functions in ``pg_operator``) and casts are not in ``functions``; cast target
types are reported in ``casts`` (``'now'::timestamptz`` is not immutable).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Literal

from postgast.native import lib as _pgq

__all__ = [
    "BUILTIN_VOLATILE_OR_STABLE",
    "Classification",
    "ClassificationCache",
    "Status",
    "NON_IMMUTABLE_CAST_TYPES",
    "builtin_non_immutable",
    "cache_decision",
    "classify",
    "fallback_provolatile",
    "has_time_word",
    "normalize",
]

Status = Literal["cacheable", "multiplestatements", "notaquery", "parseerror", "uncacheable"]

# Well-known non-IMMUTABLE builtins (VOLATILE or STABLE), bare names. A fallback
# for when the origin's pg_proc cannot be consulted; the authoritative check is
# pg_proc.provolatile. Keyword forms (current_timestamp, current_user, ...) are
# reported by the classifier under these lower-case names.
BUILTIN_VOLATILE_OR_STABLE: Final[frozenset[str]] = frozenset(
    {
        # time (STABLE or VOLATILE)
        "now",
        "current_timestamp",
        "current_date",
        "current_time",
        "localtime",
        "localtimestamp",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "age",
        "to_timestamp",
        "timezone",
        "date_part",
        "extract",
        "date_trunc",
        "to_char",
        # randomness
        "random",
        "random_normal",
        "setseed",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
        # sequences
        "nextval",
        "currval",
        "lastval",
        "setval",
        # session / identity
        "current_user",
        "session_user",
        "user",
        "current_role",
        "current_schema",
        "current_schemas",
        "current_catalog",
        "current_database",
        "current_query",
        "system_user",
        "current_setting",
        "set_config",
        "pg_backend_pid",
        "inet_client_addr",
        "inet_client_port",
        "inet_server_addr",
        "inet_server_port",
        "version",
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "has_function_privilege",
        "pg_has_role",
        # transactions / snapshots
        "txid_current",
        "txid_current_if_assigned",
        "txid_current_snapshot",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_current_snapshot",
        "pg_current_wal_lsn",
        # side effects
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_notify",
        "pg_advisory_lock",
        "pg_advisory_xact_lock",
        "pg_try_advisory_lock",
        "pg_try_advisory_xact_lock",
        "pg_advisory_unlock",
        "pg_advisory_unlock_all",
        "pg_cancel_backend",
        "pg_terminate_backend",
        "pg_reload_conf",
        "pg_stat_reset",
        "lo_import",
        "lo_export",
        "lo_create",
        "lo_unlink",
        "dblink",
        "dblink_exec",
        # catalog / size lookups that change under DDL or data changes
        "pg_relation_size",
        "pg_total_relation_size",
        "pg_table_size",
        "pg_database_size",
        "pg_postmaster_start_time",
        "pg_conf_load_time",
        "to_regclass",
        "to_regproc",
        "to_regtype",
    }
)

_DML_KINDS: Final[frozenset[str]] = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})

# Utility statements that change the schema or privileges.
_DDL_EXTRA_KINDS: Final[frozenset[str]] = frozenset(
    {
        "TruncateStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "CommentStmt",
        "IndexStmt",
        "ViewStmt",
        "RenameStmt",
        "DefineStmt",
        "RuleStmt",
        "CompositeTypeStmt",
        "SecLabelStmt",
        "ReindexStmt",
        "ClusterStmt",
        "RefreshMatViewStmt",
        "ReassignOwnedStmt",
        "ImportForeignSchemaStmt",
    }
)


def _is_ddl_kind(kind: str) -> bool:
    return kind.startswith(("Create", "Alter", "Drop")) or kind in _DDL_EXTRA_KINDS


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict for one simple-query string (or one extended-protocol Parse).

    ``status`` is ``"cacheable"`` only for a single read-only statement with no
    locking, SELECT INTO, data-modifying CTE, temp table or TABLESAMPLE. Even
    then the caller must still check ``functions`` for non-IMMUTABLE functions
    and the transaction state.
    ``reason`` is a short code: ``"read"`` (cacheable), ``"write"``, ``"ddl"``,
    ``"locking"``, ``"select_into"``, ``"dml_cte"``, ``"temp_table"``,
    ``"tablesample"``, ``"utility"``, ``"empty"``, ``"multiple"`` or, for
    ``parseerror``, ``"parse: <message>"``.
    """

    status: Status
    reason: str
    functions: frozenset[str] = frozenset()
    tables: frozenset[str] = frozenset()
    is_write: bool = False
    is_ddl: bool = False
    write_tables: frozenset[str] = frozenset()
    casts: frozenset[str] = frozenset()
    statement_kinds: tuple[str, ...] = field(default=())
    cte_names: frozenset[str] = frozenset()
    # (function name as in `functions`, number of arguments; -1 when VARIADIC makes it unknown)
    calls: frozenset[tuple[str, int]] = frozenset()
    # A string constant that date/time input would read as 'now', 'today', 'tomorrow' or
    # 'yesterday' (outside a bare select-list item, where it stays text): time-dependent.
    time_literal: bool = False
    # What the statement may leave in the session beyond its transaction (see `_Walk`):
    # settings it sets or resets at session level (lower case; "*" for RESET ALL / DISCARD ALL),
    # whether it may change settings it does not name (DO, CALL, set_config with a computed
    # name), and state that cannot be carried to another connection ("listen", "prepare",
    # "cursor", "temp", "lock", "load", "seed").
    session_gucs: frozenset[str] = frozenset()
    session_opaque: bool = False
    session_holds: frozenset[str] = frozenset()
    # The statement is exactly one plain session-level SET/RESET whose effect the pooler can
    # record without asking the server: ("set", name, value as written in SQL) | ("reset", name)
    # | ("reset_all",) | ("discard_all",). None otherwise (role and session authorization never:
    # they are read back).
    session_set: tuple[str, ...] | None = None

    @property
    def cacheable(self) -> bool:
        return self.status == "cacheable"


def builtin_non_immutable(functions: frozenset[str]) -> frozenset[str]:
    """Names in ``functions`` that are known non-IMMUTABLE builtins (fallback check).

    ``pg_catalog.`` qualification is ignored; other schemas are not builtins.
    """
    out: set[str] = set()
    for name in functions:
        bare = name[len("pg_catalog.") :] if name.startswith("pg_catalog.") else name
        if bare in BUILTIN_VOLATILE_OR_STABLE:
            out.add(name)
    return frozenset(out)


class _Walk:
    """Collects facts from a libpg_query JSON parse tree in one pass."""

    __slots__ = (
        "tables",
        "write_tables",
        "casts",
        "locking",
        "select_into",
        "temp",
        "tablesample",
        "dml",
        "cte_names",
        "time_literal",
        "calls",
        "gucs",
        "opaque",
        "holds",
    )

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.write_tables: set[str] = set()
        self.casts: set[str] = set()
        self.locking = False
        self.select_into = False
        self.temp = False
        self.tablesample = False
        self.dml = False
        self.cte_names: set[str] = set()
        self.time_literal = False
        self.calls: set[tuple[str, int]] = set()
        self.gucs: set[str] = set()
        self.opaque = False
        self.holds: set[str] = set()

    def rel(self, rv: Any, written: bool = False) -> None:
        if not isinstance(rv, dict):
            return
        if "RangeVar" in rv:
            rv = rv["RangeVar"]
        name = rv.get("relname")
        if not isinstance(name, str):
            return
        schema = rv.get("schemaname")
        if rv.get("relpersistence") == "t" or schema == "pg_temp" or (
            isinstance(schema, str) and schema.startswith("pg_temp_")
        ):
            self.temp = True
        full = f"{schema}.{name}" if schema else name
        catalog = rv.get("catalogname")
        if catalog:
            full = f"{catalog}.{full}"
        self.tables.add(full)
        if written:
            self.write_tables.add(full)

    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, val in node.items():
            if key == "FuncCall" or key == "funccall":  # funccall: CallStmt's typed field
                names = val.get("funcname", ())
                fname = ".".join(n["String"]["sval"] for n in names)
                nargs = -1 if val.get("func_variadic") else len(val.get("args", ()))
                self.calls.add((fname, nargs))
                bare = fname.removeprefix("pg_catalog.")
                if bare == "set_config":
                    self.set_config(val.get("args", ()))
                elif bare in _SESSION_FUNCTIONS:
                    self.holds.add(_SESSION_FUNCTIONS[bare])
            elif key == "SQLValueFunction":
                op: str = val.get("op", "")
                name = op.removeprefix("SVFOP_").removesuffix("_N").lower()
                self.calls.add((name or "sqlvaluefunction", 0))
            elif key == "LockingClause":
                self.locking = True
            elif key == "RangeTableSample":
                self.tablesample = True
            elif key == "TypeCast":
                tn = val.get("typeName", {})
                self.casts.add(".".join(n["String"]["sval"] for n in tn.get("names", ())))
            elif key == "CommonTableExpr":
                name = val.get("ctename")
                if isinstance(name, str):
                    self.cte_names.add(name)
            elif key == "A_Const":
                sval = val.get("sval")
                if isinstance(sval, dict) and _TIME_WORD.search(sval.get("sval", "")):
                    self.time_literal = True
            elif key == "ResTarget":
                inner = val.get("val")
                if isinstance(inner, dict) and "A_Const" in inner:
                    continue  # SELECT 'now()': a text constant in the select list stays text
            elif key == "SelectStmt":
                if "intoClause" in val:
                    self.select_into = True
                    self.rel(val["intoClause"].get("rel"), written=True)
                    self.session_statement(key, val)
            elif key in _DML_KINDS:
                self.dml = True
                self.rel(val.get("relation"), written=True)
            elif key == "CopyStmt":
                if val.get("is_from"):
                    self.dml = True
                    self.rel(val.get("relation"), written=True)
            elif key in _SESSION_KINDS:
                self.session_statement(key, val)
            if key == "RangeVar":
                self.rel(val)
            elif isinstance(val, dict):
                if "relname" in val:  # typed RangeVar field (relation, rel, ...)
                    self.rel(val)
                self.walk(val)
            elif isinstance(val, list):
                self.walk(val)


    # -- what a statement leaves in the session (the pooler carries, resets or refuses it)
    def set_config(self, args: Any) -> None:
        """set_config(name, value, is_local): a session setting unless is_local is literally true."""
        if len(args) != 3:
            self.opaque = True
            return
        local = args[2].get("A_Const", {}) if isinstance(args[2], dict) else {}
        if local.get("boolval", {}).get("boolval") is True:
            return  # transaction-local: gone when the transaction ends
        name = args[0].get("A_Const", {}).get("sval", {}).get("sval") if isinstance(args[0], dict) else None
        if isinstance(name, str) and name:
            self.gucs.add(name.lower())
        else:
            self.opaque = True  # a computed name: cannot tell which setting

    def session_statement(self, key: str, val: dict[str, Any]) -> None:
        if key == "VariableSetStmt":
            kind = val.get("kind")
            if val.get("is_local"):
                return
            if kind == "VAR_RESET_ALL":
                self.gucs.add("*")
            elif kind == "VAR_SET_MULTI":
                if val.get("name") == "SESSION CHARACTERISTICS":
                    for item in val.get("args", ()):
                        name = item.get("DefElem", {}).get("defname", "")
                        self.gucs.add(f"default_{name}")
            elif isinstance(val.get("name"), str):
                self.gucs.add(val["name"].lower())
        elif key in ("DoStmt", "CallStmt"):
            self.opaque = True
            for item in val.get("args", ()) if key == "DoStmt" else ():
                body = item.get("DefElem", {}).get("arg", {}).get("String", {}).get("sval")
                if isinstance(body, str):  # custom settings the block names: read back by name
                    self.gucs.update(m.lower() for m in _BODY_SETTINGS.findall(body))
        elif key == "DiscardStmt":
            if val.get("target") == "DISCARD_ALL":
                self.gucs.add("*")
        elif key == "DeclareCursorStmt":
            if int(val.get("options", 0)) & _CURSOR_OPT_HOLD:
                self.holds.add("cursor")
        elif key in ("CreateStmt", "CreateSeqStmt", "ViewStmt", "CreateTableAsStmt", "SelectStmt"):  # temp objects
            if key == "CreateTableAsStmt" or key == "SelectStmt":
                into = val.get("into") or val.get("intoClause") or {}
                rel, oncommit = into.get("rel"), into.get("onCommit")
            else:
                rel = val.get("relation") or val.get("sequence") or val.get("view")
                oncommit = val.get("oncommit")
            if isinstance(rel, dict) and rel.get("relpersistence") == "t" and oncommit != "ONCOMMIT_DROP":
                self.holds.add("temp")
        else:
            self.holds.add(_HOLDING_KINDS[key])


# Statement kinds the session walk looks at (see `_Walk.session_statement`).
_HOLDING_KINDS: Final[dict[str, str]] = {"ListenStmt": "listen", "PrepareStmt": "prepare", "LoadStmt": "load"}
_SESSION_KINDS: Final[frozenset[str]] = frozenset({
    "VariableSetStmt", "DoStmt", "CallStmt", "DiscardStmt", "DeclareCursorStmt", "CreateStmt", "CreateSeqStmt",
    "ViewStmt", "CreateTableAsStmt", *_HOLDING_KINDS})
_CURSOR_OPT_HOLD: Final = 0x0020
# Custom settings a DO block names (the catalog's BODY_SETTINGS, for PostgreSQL's regex dialect).
_BODY_SETTINGS: Final = re.compile(
    r"(?:set_config\s*\(\s*'|\bset\s+(?:session\s+)?)([A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$.]*)",
    re.IGNORECASE)
# Builtins that leave state in the session that no setting shows: session-level advisory locks
# (pg_advisory_unlock_all at reset releases them) and the random seed.
_SESSION_FUNCTIONS: Final[dict[str, str]] = {
    "pg_advisory_lock": "lock", "pg_advisory_lock_shared": "lock", "pg_try_advisory_lock": "lock",
    "pg_try_advisory_lock_shared": "lock", "setseed": "seed"}

_PARSE_ERROR_PREFIX: Final = "parse: "
# Date/time input words whose value depends on when the statement runs.
TIME_WORDS: Final = r"\b(?:now|today|tomorrow|yesterday)\b"  # also matched in parameter bytes
_TIME_WORD: Final = re.compile(TIME_WORDS, re.IGNORECASE)


def _parse(sql: str) -> list[dict[str, Any]]:
    """Parse with libpg_query; raises ValueError on a syntax error."""
    result = _pgq.pg_query_parse(sql.encode("utf-8"))
    try:
        if result.error:
            err = result.error.contents
            msg = err.message.decode("utf-8", "replace") if err.message else "syntax error"
            raise ValueError(msg)
        tree = json.loads(result.parse_tree)
    finally:
        _pgq.pg_query_free_parse_result(result)
    stmts: list[dict[str, Any]] = tree.get("stmts", [])
    return stmts


def normalize(sql: str) -> str | None:
    """The statement with every constant replaced by a parameter ($n), by libpg_query (a few
    µs); None when it cannot. Texts that differ only in constants classify alike, except for
    date/time words in string constants (see `_TIME_WORD`), which the caller must check."""
    if "\x00" in sql:
        return None
    result = _pgq.pg_query_normalize(sql.encode("utf-8"))
    try:
        if result.error or result.normalized_query is None:
            return None
        return bytes(result.normalized_query).decode("utf-8")
    finally:
        _pgq.pg_query_free_normalize_result(result)


def has_time_word(sql: str) -> bool:
    """Whether 'now', 'today', 'tomorrow' or 'yesterday' appears at all (anywhere in the text)."""
    return _TIME_WORD.search(sql) is not None


def classify(sql: str) -> Classification:
    """Classify one query string. Never raises; fails closed to ``parseerror``."""
    try:
        return _classify(sql)
    except Exception as exc:  # noqa: BLE001 - fail closed (RecursionError, encoding, ...)
        return Classification("parseerror", f"{_PARSE_ERROR_PREFIX}{type(exc).__name__}: {exc}")


def _classify(sql: str) -> Classification:
    if "\x00" in sql:
        # libpg_query takes a C string: a NUL would hide the rest of the text.
        return Classification("parseerror", _PARSE_ERROR_PREFIX + "NUL byte in query")
    try:
        stmts = _parse(sql)
    except ValueError as exc:
        return Classification("parseerror", f"{_PARSE_ERROR_PREFIX}{exc}")
    if not stmts:
        return Classification("notaquery", "empty")

    w = _Walk()
    kinds: list[str] = []
    for raw in stmts:
        stmt = raw.get("stmt", {})
        kinds.extend(stmt.keys())
        w.walk(stmt)
    is_ddl = any(_is_ddl_kind(k) for k in kinds)
    if "TruncateStmt" in kinds:
        w.dml = True
    for k, raw in zip(kinds, stmts):
        if k == "TruncateStmt":
            for r in raw["stmt"][k].get("relations", ()):
                w.rel(r, written=True)
        elif is_ddl and k in ("CreateStmt", "AlterTableStmt", "CreateTableAsStmt", "IndexStmt", "ViewStmt"):
            body = raw["stmt"][k]
            target = body.get("relation") or body.get("view") or body.get("into", {}).get("rel")
            w.rel(target, written=True)
    is_write = w.dml or w.select_into
    facts = dict(
        functions=frozenset(name for name, _ in w.calls),
        tables=frozenset(w.tables),
        is_write=is_write,
        is_ddl=is_ddl,
        write_tables=frozenset(w.write_tables),
        casts=frozenset(w.casts),
        statement_kinds=tuple(kinds),
        cte_names=frozenset(w.cte_names),
        time_literal=w.time_literal,
        calls=frozenset(w.calls),
        session_gucs=frozenset(w.gucs),
        session_opaque=w.opaque,
        session_holds=frozenset(w.holds),
    )

    if len(stmts) > 1:
        return Classification("multiplestatements", "multiple", **facts)  # type: ignore[arg-type]
    kind = kinds[0]
    if kind == "VariableSetStmt":
        facts["session_set"] = _plain_set(stmts[0], sql)
    elif kind == "DiscardStmt" and stmts[0]["stmt"]["DiscardStmt"].get("target") == "DISCARD_ALL":
        facts["session_set"] = ("discard_all",)
    if kind == "SelectStmt":
        if w.select_into:
            reason = "temp_table" if w.temp else "select_into"
        elif w.dml:
            reason = "dml_cte"
        elif w.locking:
            reason = "locking"
        elif w.temp:
            reason = "temp_table"
        elif w.tablesample:
            reason = "tablesample"
        else:
            return Classification("cacheable", "read", **facts)  # type: ignore[arg-type]
        return Classification("uncacheable", reason, **facts)  # type: ignore[arg-type]
    if kind in _DML_KINDS:
        return Classification("uncacheable", "write", **facts)  # type: ignore[arg-type]
    if is_ddl:
        return Classification("uncacheable", "temp_table" if w.temp else "ddl", **facts)  # type: ignore[arg-type]
    # SET, SHOW, BEGIN/COMMIT, COPY, EXPLAIN, CALL, DO, LISTEN, PREPARE, ...
    return Classification("notaquery", "utility", **facts)  # type: ignore[arg-type]


def _plain_set(raw: dict[str, Any], sql: str) -> tuple[str, ...] | None:
    """("set", name, value text) for `SET name = value[, value…]` with constants only, the value
    exactly as written (so replaying `SET name = <text>` means what it meant); ("reset", name)
    for RESET / SET … TO DEFAULT; ("reset_all",). None for anything else (SET LOCAL, role, session
    authorization, casts, comments or a second statement around the value)."""
    val = raw["stmt"]["VariableSetStmt"]
    kind, name = val.get("kind"), val.get("name")
    if val.get("is_local"):
        return None
    if kind == "VAR_RESET_ALL":
        return ("reset_all",)
    if not isinstance(name, str) or name in ("role", "session_authorization"):
        return None
    if kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return ("reset", name.lower())
    args = val.get("args") or ()
    if kind != "VAR_SET_VALUE" or not args or not all("A_Const" in a for a in args):
        return None
    text = sql.encode("utf-8")
    start = args[0]["A_Const"].get("location", -1)
    end = raw.get("stmt_location", 0) + raw["stmt_len"] if raw.get("stmt_len") else len(text)
    if not 0 <= start < end:
        return None
    value = text[start:end].decode("utf-8", "replace").strip().rstrip(";").strip()
    if not value or "--" in value or "/*" in value or ";" in value or "\x00" in value:
        return None
    return ("set", name.lower(), value)


# Casts whose input/output functions are not IMMUTABLE (timezone, DateStyle,
# 'now'/'today' literals, catalog lookups). pgpool refuses these as well.
NON_IMMUTABLE_CAST_TYPES: Final[frozenset[str]] = frozenset(
    name
    for base in (
        "timestamptz", "timetz", "timestamp", "date", "time", "interval",
        "regclass", "regproc", "regprocedure", "regoper", "regoperator", "regtype",
        "regnamespace", "regrole", "regconfig", "regdictionary", "regcollation",
    )
    for name in (base, "pg_catalog." + base)
)  # fmt: skip

Provolatile = Callable[[str], "str | None"]


def fallback_provolatile(name: str) -> str:
    """Name-list stand-in for a pg_proc lookup: ``"v"`` for known non-IMMUTABLE
    builtins, ``"i"`` otherwise. Only for when the origin cannot be asked."""
    return "v" if builtin_non_immutable(frozenset((name,))) else "i"


def cache_decision(c: Classification, provolatile: Provolatile) -> tuple[str, str]:
    """Combine a classification with function volatility: ``(cache_status, reason)``.

    ``provolatile(name)`` returns the origin's ``pg_proc.provolatile`` for that
    (possibly schema-qualified) name, the least immutable over all overloads,
    or ``None`` when unknown. Unknown counts as volatile (fail closed).
    Returns ``("cacheable", "read")``, ``("volatile", name)``, ``("stable", name)``
    or ``(c.status, c.reason)`` when the statement itself is not cacheable.
    """
    if c.status != "cacheable":
        return c.status, c.reason
    stable: str | None = None
    for name in sorted(c.functions):
        kind = provolatile(name)
        if kind == "i":
            continue
        if kind == "s":
            stable = stable or name
            continue
        return "volatile", name if kind == "v" else f"unknown function {name}"
    if stable is None:
        for cast in sorted(c.casts):
            if cast in NON_IMMUTABLE_CAST_TYPES:
                stable = f"cast to {cast}"
                break
    if stable is not None:
        return "stable", stable
    return "cacheable", "read"


class ClassificationCache:
    """Bounded LRU of classifications keyed by the exact SQL text.

    The hot path parses a given statement text once. Texts longer than
    ``max_sql_len`` are classified but not remembered (they would pin memory).
    Not thread-safe by design: use one per event loop.
    """

    __slots__ = ("_entries", "max_entries", "max_sql_len", "hits", "misses")

    def __init__(self, max_entries: int = 4096, max_sql_len: int = 16384) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._entries: OrderedDict[str, Classification] = OrderedDict()
        self.max_entries = max_entries
        self.max_sql_len = max_sql_len
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sql: str) -> Classification:
        entries = self._entries
        found = entries.get(sql)
        if found is not None:
            self.hits += 1
            entries.move_to_end(sql)
            return found
        self.misses += 1
        result = classify(sql)
        if len(sql) <= self.max_sql_len:
            entries[sql] = result
            if len(entries) > self.max_entries:
                entries.popitem(last=False)
        return result

    def clear(self) -> None:
        self._entries.clear()
