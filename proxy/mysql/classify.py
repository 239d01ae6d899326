"""Sans-I/O MySQL / MariaDB statement classification for the query cache (fail closed).

There is no MySQL grammar with a suitable licence, so this is a careful *lexer* plus token-level
rules, not a parser. It lexes the way the server does where that is unambiguous and refuses
(status ``parseerror``, kind ``unknown``) wherever the server's reading could differ from ours:

* identifiers: plain (``[0-9A-Za-z_$]`` and U+0080..U+FFFF, may start with a digit), backtick
  quoted (````` doubled inside);
* strings ``'...'`` and ``"..."`` with backslash escapes and doubled quotes. Whether ``\\``
  escapes depends on ``NO_BACKSLASH_ESCAPES`` and whether ``"..."`` is a string or an identifier
  on ``ANSI_QUOTES``. Pass the modes when known (the OK packet carries
  ``SERVER_STATUS_NO_BACKSLASH_ESCAPES``); when a mode is ``None`` (unknown) a literal whose
  extent differs between the readings is a ``parseerror``, and a ``"..."`` in a place where a
  name would matter (table, function) is refused too;
* numbers, ``X'..'``/``0x..`` hex, ``b'..'``/``0b..`` bit literals (an ``_charset`` or ``N``
  introducer lexes as a word before the string, which is harmless here);
* comments: ``-- `` (a space or control character, or the end, after the dashes), ``#`` to end
  of line, ``/* */``, optimizer hints ``/*+ */``; **executable comments** ``/*! */``,
  ``/*!50700 */`` and MariaDB ``/*M! */`` are code: their content is classified (versioned ones
  too, whatever the server version: conservative). A comment or a literal that would contain the
  ``*/`` of an executable comment, or a nested one, is a ``parseerror``;
* operators, ``;`` separators, ``?`` placeholders, ``@user`` and ``@@system`` variables.

A NUL byte, a stray ``\\`` or any character MySQL would not accept outside a literal is a
``parseerror`` as well.

Verdicts (``status`` values are those of the Postgres side and Hyperdrive's cacheStatus):

``cacheable``
    a single SELECT (``WITH ... SELECT``, ``(SELECT ...) UNION ...``, ``TABLE t``,
    ``VALUES ROW(...)``) using only allow-listed deterministic functions, no variables, no
    locking, no INTO, no system schema;
``volatile``
    a function on the volatile list (``reason`` = its lower-case name, e.g. ``now``,
    ``current_timestamp`` also without parentheses, ``nextval`` for ``NEXT VALUE FOR``), or a
    function that is not on the deterministic allow-list (``reason`` = ``unknown function f``):
    stored functions and UDFs (also ``db.f()`` and ```f`()``) cannot be checked yet. A later
    catalog could read ``information_schema.ROUTINES.IS_DETERMINISTIC`` / ``SQL_DATA_ACCESS`` but
    MySQL does not enforce that flag, so it is a hint at best;
``uncacheable``
    ``write`` (INSERT/UPDATE/DELETE/REPLACE/LOAD DATA), ``ddl``, ``select_into``, ``locking``
    (FOR UPDATE, FOR SHARE, LOCK IN SHARE MODE), ``variable`` (``@x``, ``@@x``),
    ``system_catalog`` (information_schema, performance_schema, mysql, sys), ``placeholder``
    (``?`` is not valid text-protocol SQL), ``session_state`` (SQL_CALC_FOUND_ROWS: a later
    FOUND_ROWS() reads it), ``sql_no_cache`` (honoured as the client's wish; MySQL 8 ignores it),
    ``dml_in_select`` (a DML word where a SELECT cannot have one: we did not understand it),
    ``unparsed_from`` (a FROM item that is neither a name nor a parenthesis, e.g. ``{OJ ...}``);
``multiplestatements``
    more than one statement (a single trailing ``;`` and comments are ignored; ``SELECT 1;;``
    counts as two);
``notaquery``
    SHOW/DESCRIBE/EXPLAIN, SET, USE (``uses_database_change``), CALL, transaction control
    (``reason`` = ``transaction``, ``transaction`` = ``begin``/``commit``/...), everything else,
    and the empty statement (``reason`` = ``empty``);
``parseerror``
    the lexer refused (kind ``unknown``).

Not decided here (the caller's job): temporary tables shadowing a table name, views hiding a
volatile function, triggers and ``ON DELETE CASCADE`` writing other tables, session state that
changes results (``time_zone`` for TIMESTAMP columns, ``sql_mode``, character set/collation,
``lc_time_names``, ``div_precision_increment``, ``default_week_format``; the cache key should
include the ones the pool does not pin), unqualified names when the session's default database is
a system schema, and the transaction state (``SERVER_STATUS_IN_TRANS`` in OK packets).

Names are lower-cased (``db.table`` when qualified, backticks removed): with
``lower_case_table_names=0`` this merges ``T`` and ``t``, which only over-invalidates.
``write_all`` is set whenever the writes cannot be listed (DDL, CALL, unknown statements, any
call to a function not known to be side-effect free, a parse error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from proxy.mysql.state import EMPTY_EFFECT, PARSE_ERROR_EFFECT, Effect, session_effect

__all__ = [
    "DETERMINISTIC_FUNCTIONS",
    "MySQLClassification",
    "SYSTEM_SCHEMAS",
    "VOLATILE_FUNCTIONS",
    "classify",
]

Kind = Literal[
    "select", "show", "insert", "update", "delete", "replace", "ddl", "transaction", "set", "use",
    "call", "other", "unknown",
]

# Non-deterministic or session-dependent builtins (upper case). Anything not on
# DETERMINISTIC_FUNCTIONS is refused as well; this list only gives the precise reason and
# catches the keyword forms that need no parentheses (_BARE_VOLATILE).
VOLATILE_FUNCTIONS: Final[frozenset[str]] = frozenset({
    # time
    "NOW", "CURRENT_TIMESTAMP", "CURRENT_DATE", "CURRENT_TIME", "CURDATE", "CURTIME", "SYSDATE",
    "UTC_DATE", "UTC_TIME", "UTC_TIMESTAMP", "LOCALTIME", "LOCALTIMESTAMP", "UNIX_TIMESTAMP",
    # session time_zone dependent
    "FROM_UNIXTIME", "CONVERT_TZ",
    # randomness
    "RAND", "UUID", "UUID_SHORT", "SYS_GUID", "RANDOM_BYTES",
    # session / server state
    "LAST_INSERT_ID", "ROW_COUNT", "FOUND_ROWS", "CONNECTION_ID", "USER", "CURRENT_USER",
    "SESSION_USER", "SYSTEM_USER", "CURRENT_ROLE", "ROLES_GRAPHML", "DATABASE", "SCHEMA",
    "VERSION", "ICU_VERSION", "PS_CURRENT_THREAD_ID", "PS_THREAD_ID", "LAST_VALUE_SEQ",
    # locks, waits, side effects
    "SLEEP", "GET_LOCK", "RELEASE_LOCK", "IS_FREE_LOCK", "IS_USED_LOCK", "RELEASE_ALL_LOCKS",
    "BENCHMARK", "LOAD_FILE", "MASTER_POS_WAIT", "SOURCE_POS_WAIT", "MASTER_GTID_WAIT",
    "WAIT_FOR_EXECUTED_GTID_SET", "WAIT_UNTIL_SQL_THREAD_AFTER_GTIDS",
    # MariaDB sequences
    "NEXTVAL", "LASTVAL", "SETVAL", "CURRVAL",
    # random salts / keys
    "ENCRYPT", "PASSWORD", "OLD_PASSWORD", "DES_ENCRYPT", "DES_DECRYPT", "AES_ENCRYPT",
    "AES_DECRYPT", "VALIDATE_PASSWORD_STRENGTH", "GTID_SUBSET", "GTID_SUBTRACT",
    # catalog / column defaults (may hide CURRENT_TIMESTAMP)
    "DEFAULT", "VALUES",
})

# Keyword forms valid without parentheses.
_BARE_VOLATILE: Final[frozenset[str]] = frozenset({
    "CURRENT_TIMESTAMP", "CURRENT_DATE", "CURRENT_TIME", "LOCALTIME", "LOCALTIMESTAMP",
    "UTC_DATE", "UTC_TIME", "UTC_TIMESTAMP", "CURRENT_USER", "CURRENT_ROLE",
})

# Builtins whose result depends only on their arguments (given the session's character set,
# collation, sql_mode and lc_time_names, which the cache key must cover). Also type names that
# take a length in CAST/CONVERT.
DETERMINISTIC_FUNCTIONS: Final[frozenset[str]] = frozenset({
    # string
    "ASCII", "BIN", "BIT_LENGTH", "CHAR", "CHAR_LENGTH", "CHARACTER_LENGTH", "CONCAT",
    "CONCAT_WS", "ELT", "EXPORT_SET", "FIELD", "FIND_IN_SET", "FORMAT", "FROM_BASE64", "HEX",
    "INSERT", "INSTR", "LCASE", "LEFT", "LENGTH", "LOCATE", "LOWER", "LPAD", "LTRIM", "MAKE_SET",
    "MID", "OCT", "OCTET_LENGTH", "ORD", "POSITION", "QUOTE", "REPEAT", "REPLACE", "REVERSE",
    "RIGHT", "RPAD", "RTRIM", "SOUNDEX", "SPACE", "STRCMP", "SUBSTR", "SUBSTRING",
    "SUBSTRING_INDEX", "TO_BASE64", "TRIM", "UCASE", "UNHEX", "UPPER", "WEIGHT_STRING",
    "REGEXP_INSTR", "REGEXP_LIKE", "REGEXP_REPLACE", "REGEXP_SUBSTR", "CHARSET", "COLLATION",
    "COERCIBILITY", "LENGTHB",
    # numeric
    "ABS", "ACOS", "ASIN", "ATAN", "ATAN2", "CEIL", "CEILING", "CONV", "COS", "COT", "CRC32",
    "DEGREES", "EXP", "FLOOR", "GREATEST", "LEAST", "LN", "LOG", "LOG10", "LOG2", "MOD", "PI",
    "POW", "POWER", "RADIANS", "ROUND", "SIGN", "SIN", "SQRT", "TAN", "TRUNCATE", "BIT_COUNT",
    # date/time with explicit arguments
    "ADDDATE", "ADDTIME", "DATE", "DATEDIFF", "DATE_ADD", "DATE_SUB", "DATE_FORMAT", "DAY",
    "DAYNAME", "DAYOFMONTH", "DAYOFWEEK", "DAYOFYEAR", "EXTRACT", "FROM_DAYS", "GET_FORMAT",
    "HOUR", "LAST_DAY", "MAKEDATE", "MAKETIME", "MICROSECOND", "MINUTE", "MONTH", "MONTHNAME",
    "PERIOD_ADD", "PERIOD_DIFF", "QUARTER", "SECOND", "SEC_TO_TIME", "STR_TO_DATE", "SUBDATE",
    "SUBTIME", "TIME", "TIMEDIFF", "TIMESTAMP", "TIMESTAMPADD", "TIMESTAMPDIFF", "TIME_FORMAT",
    "TIME_TO_SEC", "TO_DAYS", "TO_SECONDS", "WEEK", "WEEKDAY", "WEEKOFYEAR", "YEAR", "YEARWEEK",
    # control flow, casts, types
    "IF", "IFNULL", "NULLIF", "COALESCE", "ISNULL", "INTERVAL", "NVL", "NVL2", "CAST", "CONVERT",
    "BINARY", "DECIMAL", "DEC", "NUMERIC", "FLOAT", "DOUBLE", "REAL", "NCHAR", "VARCHAR",
    "DATETIME", "VARBINARY",
    # aggregates and window functions
    "COUNT", "SUM", "AVG", "MIN", "MAX", "GROUP_CONCAT", "BIT_AND", "BIT_OR", "BIT_XOR", "STD",
    "STDDEV", "STDDEV_POP", "STDDEV_SAMP", "VAR_POP", "VAR_SAMP", "VARIANCE", "JSON_ARRAYAGG",
    "JSON_OBJECTAGG", "ANY_VALUE", "GROUPING", "ROW_NUMBER", "RANK", "DENSE_RANK",
    "PERCENT_RANK", "CUME_DIST", "NTILE", "LAG", "LEAD", "FIRST_VALUE", "LAST_VALUE", "NTH_VALUE",
    # JSON
    "JSON_ARRAY", "JSON_OBJECT", "JSON_QUOTE", "JSON_CONTAINS", "JSON_CONTAINS_PATH",
    "JSON_EXTRACT", "JSON_KEYS", "JSON_OVERLAPS", "JSON_SEARCH", "JSON_VALUE",
    "JSON_ARRAY_APPEND", "JSON_ARRAY_INSERT", "JSON_INSERT", "JSON_MERGE", "JSON_MERGE_PATCH",
    "JSON_MERGE_PRESERVE", "JSON_REMOVE", "JSON_REPLACE", "JSON_SET", "JSON_UNQUOTE",
    "JSON_DEPTH", "JSON_LENGTH", "JSON_TYPE", "JSON_VALID", "JSON_PRETTY", "JSON_STORAGE_SIZE",
    "JSON_TABLE",
    # hashing, encoding, network
    "MD5", "SHA", "SHA1", "SHA2", "COMPRESS", "UNCOMPRESS", "UNCOMPRESSED_LENGTH", "INET_ATON",
    "INET_NTOA", "INET6_ATON", "INET6_NTOA", "IS_IPV4", "IS_IPV6", "IS_IPV4_COMPAT",
    "IS_IPV4_MAPPED", "UUID_TO_BIN", "BIN_TO_UUID", "IS_UUID",
})

SYSTEM_SCHEMAS: Final[frozenset[str]] = frozenset(
    {"information_schema", "performance_schema", "mysql", "sys"})

# Words followed by "(" that are syntax, not a function call.
_NOT_CALL: Final[frozenset[str]] = frozenset({
    "IN", "EXISTS", "AS", "FROM", "JOIN", "ON", "AND", "OR", "NOT", "XOR", "WHERE", "SELECT",
    "USING", "OVER", "ANY", "ALL", "SOME", "WHEN", "THEN", "ELSE", "BY", "UNION", "INTERSECT",
    "EXCEPT", "LATERAL", "KEY", "INDEX", "ROW", "PARTITION", "DISTINCT", "DISTINCTROW",
    "HAVING", "BETWEEN", "LIKE", "RLIKE", "REGEXP", "DIV", "IS", "WITH", "RECURSIVE", "CASE",
    "ESCAPE", "SEPARATOR", "COLUMNS", "NESTED", "PATH", "FOR", "ORDER", "GROUP", "ROWS", "RANGE",
    "AGAINST", "MATCH", "OF", "STRAIGHT_JOIN", "LIMIT", "OFFSET", "SET", "INTO", "TABLE",
    "VALUE", "ASC", "DESC", "RETURNING", "SOUNDS", "MEMBER", "PRECEDING", "FOLLOWING",
})

# Words that end a FROM list at their parenthesis level.
_END_FROM: Final[frozenset[str]] = frozenset({
    "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "WINDOW", "UNION", "EXCEPT", "INTERSECT",
    "FOR", "LOCK", "INTO", "SET", "RETURNING", "SELECT", "VALUES", "VALUE", "PROCEDURE",
})
# Words that cannot be a table name where one is expected (the reference is something else).
_NOT_TABLE: Final[frozenset[str]] = frozenset({
    "SELECT", "WITH", "VALUES", "VALUE", "TABLE", "DUAL", "LATERAL", "JSON_TABLE", "SET", "WHERE",
    "FROM", "USING", "JOIN", "ON", "PARTITION", "GROUP", "ORDER", "LIMIT", "HAVING", "WINDOW",
    "UNION", "FOR", "LOCK", "INTO", "INNER", "LEFT", "RIGHT", "CROSS", "NATURAL", "OUTER",
    "STRAIGHT_JOIN", "AS", "DEFAULT",
})

_DDL_WORDS: Final[frozenset[str]] = frozenset(
    {"CREATE", "ALTER", "DROP", "TRUNCATE", "RENAME", "GRANT", "REVOKE"})
_KIND_BY_VERB: Final[dict[str, Kind]] = {
    "SELECT": "select", "TABLE": "select", "VALUES": "select",
    "SHOW": "show", "DESCRIBE": "show", "DESC": "show", "EXPLAIN": "show",
    "INSERT": "insert", "UPDATE": "update", "DELETE": "delete", "REPLACE": "replace",
    "SET": "set", "USE": "use", "CALL": "call",
    **{w: "ddl" for w in _DDL_WORDS},
}
_DML_KINDS: Final = frozenset({"insert", "update", "delete", "replace"})

_IDCH = "0-9A-Za-z_$\u0080-\uffff"
_MASTER = re.compile("|".join((
    r"(?P<ws>[ \t\n\r\f\v]+)",
    r"(?P<line>(?:#|--(?=[\x00-\x20\x7f]|\Z))[^\n]*)",
    r"(?P<xopen>/\*M?![0-9]*)",
    r"(?P<block>/\*.*?\*/)",
    r"(?P<badcomment>/\*)",
    r"(?P<xclose>\*/)",
    r"(?P<quote>['\"`])",
    r"(?P<hexlit>[xX]'[0-9a-fA-F]*')",
    r"(?P<bitlit>[bB]'[01]*')",
    r"(?P<badlit>[xXbB]')",
    rf"(?P<hexnum>0x[0-9a-fA-F]+(?![{_IDCH}]))",
    rf"(?P<binnum>0b[01]+(?![{_IDCH}]))",
    rf"(?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?![{_IDCH}]))",
    rf"(?P<id>[{_IDCH}]+)",
    rf"(?P<var>@@?[{_IDCH}.]*)",
    r"(?P<param>\?)",
    r"(?P<op><=>|->>|->|<=|>=|<>|!=|:=|\|\||&&|<<|>>|[-+*/%=<>!~^&|(),.;:{}])",
)), re.S)


def _quoted(q: str, backslash: bool) -> re.Pattern[str]:
    e = re.escape(q)
    if backslash:
        return re.compile(rf"{e}[^{e}\\]*(?:(?:\\.|{e}{e})[^{e}\\]*)*{e}", re.S)
    return re.compile(rf"{e}[^{e}]*(?:{e}{e}[^{e}]*)*{e}", re.S)


_Q_BS: Final = {q: _quoted(q, True) for q in "'\""}
_Q_NOBS: Final = {q: _quoted(q, False) for q in "'\"`"}


class _LexError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class MySQLClassification:
    """The verdict for one COM_QUERY text. ``cacheable`` is ``status == "cacheable"``."""

    status: str
    reason: str
    kind: Kind
    statement_count: int  # -1 when the lexer refused the text
    read_tables: frozenset[str] = frozenset()  # tables read (UPDATE/DELETE: every table named)
    write_tables: frozenset[str] = frozenset()  # tables that may be written (UPDATE/DELETE: all)
    write_all: bool = False  # writes cannot be listed: invalidate everything
    functions: frozenset[str] = frozenset()  # lower-case names called (and keyword forms)
    unknown_functions: frozenset[str] = frozenset()  # not on either list (incl. db.f, `f`)
    cte_names: frozenset[str] = frozenset()
    uses_database_change: bool = False  # a USE statement (or unlexable text naming USE): refuse
    database: str | None = None  # the database a USE names
    transaction: str | None = None  # begin/commit/rollback/savepoint/release/xa
    normalized: str | None = None  # comments dropped, whitespace runs -> " ", constants kept
    session: Effect = EMPTY_EFFECT  # what it does to the client's session (proxy/mysql/state.py)

    @property
    def cacheable(self) -> bool:
        return self.status == "cacheable"

    @property
    def is_write(self) -> bool:
        return self.write_all or bool(self.write_tables)


def _lex(sql: str, backslash: bool | None, ansi: bool | None) -> tuple[list[str], list[str], str]:
    """Token types and values, and the normalized text. Raises _LexError."""
    if "\x00" in sql:
        raise _LexError("NUL byte")
    types: list[str] = []
    vals: list[str] = []
    pieces: list[str] = []
    gap = False
    in_exec = False
    pos = 0
    n = len(sql)
    match = _MASTER.match
    while pos < n:
        m = match(sql, pos)
        if m is None:
            raise _LexError(f"unexpected character {sql[pos]!r} at {pos}")
        kind = m.lastgroup
        text = m.group()
        end = m.end()
        if kind == "ws":
            gap = True
            pos = end
            continue
        if kind == "line" or kind == "block":
            if in_exec:
                raise _LexError("comment inside an executable comment")
            if text.startswith("/*+"):  # optimizer hint: kept in the key (SET_VAR changes results)
                if gap and pieces:
                    pieces.append(" ")
                pieces.append(text)
                gap = False
            else:
                gap = True
            pos = end
            continue
        if kind == "xopen":
            if in_exec:
                raise _LexError("nested executable comment")
            in_exec = True
        elif kind == "xclose":
            if not in_exec:
                raise _LexError("'*/' outside a comment")
            in_exec = False
        elif kind == "badcomment":
            raise _LexError("unterminated comment")
        elif kind == "badlit":
            raise _LexError("bad hex or bit literal")
        elif kind == "quote":
            q = text
            ends: set[int] = set()
            if q == "`":
                typ = "qid"
                mm = _Q_NOBS["`"].match(sql, pos)
                ends.add(mm.end() if mm else -1)
            else:
                string_modes = ansi is not True or q == "'"
                ident_mode = q == '"' and ansi is not False
                if string_modes:
                    if backslash is not False:
                        mm = _Q_BS[q].match(sql, pos)
                        ends.add(mm.end() if mm else -1)
                    if backslash is not True:
                        mm = _Q_NOBS[q].match(sql, pos)
                        ends.add(mm.end() if mm else -1)
                if ident_mode:
                    mm = _Q_NOBS[q].match(sql, pos)
                    ends.add(mm.end() if mm else -1)
                typ = "str" if not ident_mode else ("qid" if not string_modes else "dq")
            if -1 in ends:
                raise _LexError("unterminated quoted text")
            if len(ends) != 1:
                raise _LexError("quoted text whose extent depends on sql_mode")
            end = ends.pop()
            text = sql[pos:end]
            if in_exec and "*/" in text:
                raise _LexError("quoted text spans the end of an executable comment")
            types.append(typ)
            vals.append(text[1:-1].replace(q + q, q) if typ == "qid" else text)
        elif kind == "hexlit":
            if (len(text) - 3) % 2:
                raise _LexError("odd number of hex digits")
            types.append("num")
            vals.append(text)
        elif kind == "id":
            types.append("id")
            vals.append(text.upper())
        else:  # hexnum, binnum, num, bitlit, var, param, op
            if kind in ("hexnum", "binnum", "bitlit"):
                kind = "num"
            types.append(kind)  # type: ignore[arg-type]
            vals.append(text)
        if gap and pieces:
            pieces.append(" ")
        pieces.append(text)
        gap = False
        pos = end
    if in_exec:
        raise _LexError("unterminated executable comment")
    normalized = "".join(pieces)
    if normalized.endswith(";"):
        normalized = normalized[:-1].rstrip()
    return types, vals, normalized


class _Facts:
    __slots__ = ("tables", "writes", "write_all", "functions", "unknown", "volatile", "cte",
                 "uncacheable", "database", "transaction")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.writes: set[str] = set()
        self.write_all = False
        self.functions: set[str] = set()
        self.unknown: list[str] = []
        self.volatile: list[str] = []
        self.cte: set[str] = set()
        self.uncacheable: list[str] = []
        self.database: str | None = None
        self.transaction: str | None = None


def _name_at(T: list[str], V: list[str], j: int, hi: int) -> tuple[str | None, int]:
    """A possibly qualified name starting at j: (lower-case name, index after it)."""
    if j >= hi:
        return None, j
    t = T[j]
    if t in ("dq", "str"):
        raise _LexError("a quoted string where a name is expected (ANSI_QUOTES?)")
    if t == "id":
        if V[j] in _NOT_TABLE:
            return None, j
    elif t != "qid":
        return None, j
    parts = [V[j].lower()]
    k = j + 1
    while k + 1 < hi and T[k] == "op" and V[k] == "." and T[k + 1] in ("id", "qid", "dq", "str"):
        if T[k + 1] in ("dq", "str"):
            raise _LexError("a quoted string where a name is expected (ANSI_QUOTES?)")
        parts.append(V[k + 1].lower())
        k += 2
    return ".".join(parts), k


def _skip(T: list[str], V: list[str], j: int, hi: int, words: frozenset[str]) -> int:
    while j < hi and T[j] == "id" and V[j] in words:
        j += 1
    return j


_INSERT_MODS: Final = frozenset({"LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE", "INTO"})
_DELETE_MODS: Final = frozenset({"LOW_PRIORITY", "QUICK", "IGNORE"})
_UPDATE_MODS: Final = frozenset({"LOW_PRIORITY", "IGNORE"})
_IF_EXISTS: Final = frozenset({"IF", "NOT", "EXISTS", "TABLE"})


def _statement(T: list[str], V: list[str], lo: int, hi: int, f: _Facts) -> Kind:
    """Classify tokens [lo, hi) of one statement into f; returns its kind."""
    i = lo
    while i < hi and T[i] == "op" and V[i] == "(":
        i += 1
    if i >= hi or T[i] != "id":
        raise _LexError("statement does not start with a keyword")
    verb = V[i]
    cte_end = i
    cte_defs: list[tuple[str, int]] = []
    scope: dict[str, int] = {}
    if verb == "WITH":
        depth = 0
        j = i + 1
        while j < hi:
            if T[j] == "op":
                if V[j] == "(":
                    depth += 1
                elif V[j] == ")":
                    depth -= 1
            elif T[j] == "id" and depth == 0 and V[j] in (
                    "SELECT", "UPDATE", "DELETE", "INSERT", "REPLACE", "TABLE", "VALUES"):
                break
            j += 1
        if j >= hi:
            raise _LexError("WITH without a statement")
        cte_end = j
        verb = V[j]
        # CTE names: a name after WITH / RECURSIVE / a depth-0 comma, before AS or "(".
        recursive = i + 1 < hi and V[i + 1] == "RECURSIVE"
        depth = 0
        for k in range(i + 1, cte_end):
            if T[k] == "op" and V[k] in "()":
                depth += 1 if V[k] == "(" else -1
            elif depth == 0 and T[k] in ("id", "qid") and V[k] not in ("RECURSIVE", "AS"):
                prev = V[k - 1] if T[k - 1] in ("id", "op") else ""
                if prev in ("WITH", "RECURSIVE", ","):
                    f.cte.add(V[k].lower())
                    cte_defs.append((V[k].lower(), k))
        # Where each name starts to mean the CTE: everywhere with RECURSIVE, else after its
        # own definition (inside it, the same name is a base table).
        for n, (name, k) in enumerate(cte_defs):
            scope.setdefault(name, k if recursive else (
                cte_defs[n + 1][1] if n + 1 < len(cte_defs) else cte_end))

    kind: Kind
    if verb in _KIND_BY_VERB:
        kind = _KIND_BY_VERB[verb]
    elif verb == "LOAD" and i + 1 < hi and V[i + 1] in ("DATA", "XML"):
        kind = "insert"
    elif verb in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "XA") or (
            verb == "START" and i + 1 < hi and V[i + 1] == "TRANSACTION") or (
            verb == "RELEASE" and i + 1 < hi and V[i + 1] == "SAVEPOINT"):
        kind = "transaction"
        if verb == "BEGIN" and i + 1 < hi and V[i + 1] != "WORK":
            kind = "other"  # MariaDB BEGIN NOT ATOMIC ... END: a compound statement
        else:
            rollback_to = verb == "ROLLBACK" and "TO" in V[i + 1:i + 3]
            f.transaction = {"START": "begin", "BEGIN": "begin"}.get(
                verb, "rollback_to_savepoint" if rollback_to else verb.lower())
    else:
        kind = "other"
    if verb == "EXPLAIN" or verb in ("DESC", "DESCRIBE"):
        if i + 1 < hi and V[i + 1] == "ANALYZE":  # EXPLAIN ANALYZE executes the statement
            kind = "other"
    if kind == "transaction":
        return kind
    if kind == "use":
        f.database, _ = _name_at(T, V, i + 1, hi)
        return kind
    if kind in ("ddl", "call", "other"):
        f.write_all = True
    if kind == "ddl":
        _ddl_targets(T, V, i, hi, f)
        return kind
    if kind == "other":
        return kind  # PREPARE, DO, FLUSH, HANDLER, ...: write_all, nothing else to learn

    select = kind == "select"
    name_idx: set[int] = set()

    def table(j: int, written: bool) -> int:
        name, k = _name_at(T, V, j, hi)
        if name is None:
            return j
        if k < hi and T[k] == "op" and V[k] == "(" and not written:
            return j  # a table function such as JSON_TABLE(...): a call
        name_idx.update(range(j, k))
        if name not in scope or j < scope[name]:
            (f.writes if written else f.tables).add(name)
        return k

    def from_item(j: int) -> None:
        """A table reference in a FROM list: a name, a subquery or nested join, or else."""
        if j < hi and T[j] == "id" and V[j] in ("LATERAL", "DUAL", "JSON_TABLE"):
            return
        if j < hi and T[j] == "op" and V[j] == "(":
            return  # handled when the "(" is read
        if j < hi and T[j] == "id" and V[j] in ("SELECT", "WITH", "VALUES"):
            return  # a subquery: its own FROM lists are read
        if j < hi and T[j] == "id" and V[j] == "TABLE":
            j += 1  # (TABLE t)
        if table(j, False) == j and select:
            f.uncacheable.append("unparsed_from")  # e.g. {OJ ...}: tables not known

    # Statement-specific targets.
    j = cte_end + 1
    if verb in ("INSERT", "REPLACE") and kind in ("insert", "replace"):
        table(_skip(T, V, j, hi, _INSERT_MODS), True)
    elif verb == "LOAD":
        for k in range(j, hi - 2):
            if V[k] == "INTO" and V[k + 1] == "TABLE":
                table(k + 2, True)
                break
        else:
            f.write_all = True
    elif verb == "TABLE" and select:
        table(j, False)

    stack: list[int] = []  # per open paren: 1 if it is a call's argument list
    in_from: dict[int, bool] = {}
    if verb in ("UPDATE", "DELETE") and kind in ("update", "delete"):
        in_from[0] = True
        table(_skip(T, V, j, hi, _UPDATE_MODS if verb == "UPDATE" else _DELETE_MODS), False)
    k = lo
    while k < hi:
        t = T[k]
        v = V[k]
        depth = len(stack)
        nxt_paren = k + 1 < hi and T[k + 1] == "op" and V[k + 1] == "("
        if t == "op":
            if v == "(":
                stack.append(0)
                if in_from.get(depth) and k > lo and (
                        (T[k - 1] == "op" and V[k - 1] in ",(") or
                        V[k - 1] in ("FROM", "JOIN", "STRAIGHT_JOIN")):
                    in_from[depth + 1] = True  # FROM (t1 JOIN t2), (SELECT ...)
                    from_item(k + 1)
            elif v == ")":
                if stack:
                    stack.pop()
                in_from.pop(depth, None)
            elif v == "," and in_from.get(depth):
                from_item(k + 1)
        elif t == "id":
            in_call = bool(stack) and stack[-1] == 1
            if v in ("FROM", "JOIN", "STRAIGHT_JOIN") and not in_call:
                in_from[depth] = True
                from_item(k + 1)
            elif v == "USING" and not nxt_paren and kind == "delete":
                in_from[depth] = True
                table(k + 1, False)
            elif v in _END_FROM:
                in_from[depth] = False
            if k in name_idx:
                pass
            elif nxt_paren:
                if k < cte_end and depth == 0:
                    pass  # CTE column list: WITH c (a, b) AS (...)
                elif k > lo and T[k - 1] == "op" and V[k - 1] == ".":
                    f.unknown.append(f"{V[k - 2].lower()}.{v.lower()}" if T[k - 2] in
                                     ("id", "qid") else v.lower())
                    stack.append(1)
                    k += 2
                    continue
                elif v in ("VALUES", "VALUE") and not select:
                    pass  # INSERT ... VALUES (...), ON DUPLICATE KEY UPDATE a = VALUES(a)
                elif v not in _NOT_CALL:
                    name = v.lower()
                    f.functions.add(name)
                    if v in VOLATILE_FUNCTIONS:
                        f.volatile.append(name)
                    elif v not in DETERMINISTIC_FUNCTIONS:
                        f.unknown.append(name)
                    stack.append(1)
                    k += 2
                    continue
            if v in _BARE_VOLATILE:
                f.functions.add(v.lower())
                f.volatile.append(v.lower())
            elif v in ("NEXT", "PREVIOUS") and k + 2 < hi and V[k + 1] == "VALUE" and \
                    V[k + 2] == "FOR":
                name = "nextval" if v == "NEXT" else "lastval"
                f.functions.add(name)
                f.volatile.append(name)
            elif v in ("NEXTVAL", "CURRVAL", "LASTVAL") and k > lo and V[k - 1] == ".":
                f.functions.add(v.lower())  # MariaDB seq.nextval
                f.volatile.append(v.lower())
            elif select:
                if v == "INTO":
                    f.uncacheable.append("select_into")
                elif v == "FOR" and k + 1 < hi and V[k + 1] in ("UPDATE", "SHARE"):
                    f.uncacheable.append("locking")
                elif v == "LOCK" and k + 1 < hi and V[k + 1] == "IN":
                    f.uncacheable.append("locking")
                elif v == "SQL_CALC_FOUND_ROWS":
                    f.uncacheable.append("session_state")
                elif v == "SQL_NO_CACHE":
                    f.uncacheable.append("sql_no_cache")
                elif v in ("UPDATE", "DELETE", "INSERT", "REPLACE", "SET", "CALL") and \
                        not nxt_paren and not (v == "UPDATE" and V[k - 1] == "FOR") and \
                        not (v == "SET" and V[k - 1] == "CHARACTER"):
                    f.uncacheable.append("dml_in_select")
                    f.write_all = True
        elif t in ("qid", "dq") and nxt_paren and k not in name_idx and not (
                k < cte_end and depth == 0):
            f.unknown.append(f"`{v}`" if t == "qid" else v)  # a stored function or UDF
            stack.append(1)
            k += 2
            continue
        elif t == "var":
            if select:
                f.uncacheable.append("variable")
        elif t == "param":
            if select:
                f.uncacheable.append("placeholder")
        k += 1
    if kind in ("update", "delete"):
        f.writes |= f.tables
    if f.unknown:
        f.write_all = True  # a stored function may write anything
    for name in f.tables:
        if name.partition(".")[0] in SYSTEM_SCHEMAS and "." in name:
            if select:
                f.uncacheable.append("system_catalog")
            break
    return kind


def _ddl_targets(T: list[str], V: list[str], i: int, hi: int, f: _Facts) -> None:
    """Best effort: names after TABLE / VIEW / TRUNCATE and CREATE INDEX ... ON."""
    for k in range(i, hi):
        if T[k] != "id":
            continue
        v = V[k]
        if v in ("TABLE", "TABLES", "VIEW") or (v == "TRUNCATE" and k == i) or (
                v == "ON" and "INDEX" in V[i:k]):
            j = _skip(T, V, k + 1, hi, _IF_EXISTS)
            while True:
                name, j = _name_at(T, V, j, hi)
                if name is None:
                    break
                f.writes.add(name)
                if j < hi and V[j] == ",":
                    j += 1
                else:
                    break
            return


# Compound statements (stored programs, MariaDB's BEGIN NOT ATOMIC and top-level IF/CASE/LOOP/
# WHILE/REPEAT) hold ";" inside their bodies: one statement for the server, so one here.
_ROUTINE_WORDS: Final = frozenset({"PROCEDURE", "FUNCTION", "TRIGGER", "EVENT", "PACKAGE"})
_BLOCK_END_WORDS: Final = frozenset({"IF", "CASE", "LOOP", "WHILE", "REPEAT", "FOR"})
# Where a statement starts inside a compound body: IF/LOOP/WHILE/REPEAT there open a block; elsewhere
# IF(...) and REPEAT(...) are functions.
_BODY_STARTS: Final = frozenset({";", ":", "BEGIN", "ATOMIC", "THEN", "ELSE", "DO", "LOOP", "REPEAT", "ROW"})


def _compound_start(T: list[str], V: list[str], i: int) -> bool:
    """Does the statement starting at token i have a compound body?"""
    n = len(T)
    if T[i] != "id":
        return False
    v = V[i]
    if v == "CREATE":
        for k in range(i + 1, min(n, i + 16)):
            if T[k] == "op" and V[k] == "(":
                return False
            if T[k] == "id" and V[k] in _ROUTINE_WORDS:
                return True
        return False
    if v == "BEGIN":
        return i + 2 < n and V[i + 1] == "NOT" and V[i + 2] == "ATOMIC"
    if i + 2 < n and T[i + 1] == "op" and V[i + 1] == ":" and T[i + 2] == "id":
        return V[i + 2] in ("BEGIN", "LOOP", "WHILE", "REPEAT", "FOR")  # label: BEGIN NOT ATOMIC ...
    return v in ("IF", "CASE", "LOOP", "WHILE", "REPEAT", "FOR")


def _statement_bounds(T: list[str], V: list[str]) -> list[tuple[int, int]]:
    """Token ranges of the statements: split at ";" except inside a compound statement's blocks.
    A block that does not close (or closes too often) is a parse error: fail closed."""
    bounds: list[tuple[int, int]] = []
    n = len(T)
    start = 0
    compound = False
    depth = 0
    i = 0
    while i < n:
        t, v = T[i], V[i]
        if i == start:
            compound = _compound_start(T, V, i)
            depth = 0
        if t == "op" and v == ";":
            if not compound or depth == 0:
                bounds.append((start, i))
                start = i + 1
        elif compound and t == "id":
            prev = V[i - 1] if i > start else ";"
            if v == "END":
                depth -= 1
                if depth < 0:
                    raise _LexError("END without a block")
                if i + 1 < n and T[i + 1] == "id" and V[i + 1] in _BLOCK_END_WORDS:
                    i += 1  # END IF, END LOOP, ...
            elif v == "CASE" or v == "BEGIN":
                depth += 1  # a CASE expression ends with END too; inside a body BEGIN is a block
            elif v in ("IF", "LOOP", "WHILE", "REPEAT", "FOR") and (prev in _BODY_STARTS or i == start):
                depth += 1
        i += 1
    if compound and depth:
        raise _LexError("a compound statement whose blocks do not close")
    if start < n or not bounds:
        bounds.append((start, n))
    return bounds


def classify(sql: str, *, no_backslash_escapes: bool | None = None,
             ansi_quotes: bool | None = None) -> MySQLClassification:
    """Classify one COM_QUERY text. Never raises; fails closed (``parseerror``, ``write_all``).

    ``no_backslash_escapes`` / ``ansi_quotes``: the session's sql_mode flags when known
    (``SERVER_STATUS_NO_BACKSLASH_ESCAPES`` is in every OK packet); ``None`` lexes under both
    readings and refuses text on which they disagree.
    """
    try:
        return _classify(sql, no_backslash_escapes, ansi_quotes)
    except _LexError as exc:
        reason = f"parse: {exc}"
    except Exception as exc:  # noqa: BLE001 - fail closed
        reason = f"parse: {type(exc).__name__}: {exc}"
    # Text we could not lex may still be a USE the server understands: refuse it too.
    return MySQLClassification("parseerror", reason, "unknown", -1, write_all=True,
                               uses_database_change=_USE_WORD.search(sql) is not None,
                               session=PARSE_ERROR_EFFECT)


_USE_WORD: Final = re.compile(r"(?<![0-9A-Za-z_$\u0080-\uffff])use(?![0-9A-Za-z_$\u0080-\uffff])",
                              re.IGNORECASE)


def _classify(sql: str, nbe: bool | None, ansi: bool | None) -> MySQLClassification:
    backslash = None if nbe is None else not nbe
    T, V, normalized = _lex(sql, backslash, ansi)
    bounds = _statement_bounds(T, V)
    count = len(bounds)
    f = _Facts()
    kinds: list[Kind] = []
    first = (0, 0)
    for lo, hi in bounds:
        if lo < hi:
            kinds.append(_statement(T, V, lo, hi, f))
            first = (lo, hi) if len(kinds) == 1 else first
    if not kinds:
        return MySQLClassification("notaquery", "empty", "other", 0 if count == 1 else count,
                                   normalized=normalized)
    kind = kinds[0]
    facts = dict(
        read_tables=frozenset(f.tables), write_tables=frozenset(f.writes),
        write_all=f.write_all, functions=frozenset(f.functions),
        unknown_functions=frozenset(f.unknown), cte_names=frozenset(f.cte),
        uses_database_change="use" in kinds, database=f.database, transaction=f.transaction,
        normalized=normalized,
    )
    if count > 1:
        return MySQLClassification("multiplestatements", "multiple", kind, count, **facts)
    if kind == "select":
        if f.uncacheable:
            status, reason = "uncacheable", f.uncacheable[0]
        elif f.volatile:
            status, reason = "volatile", f.volatile[0]
        elif f.unknown:
            status, reason = "volatile", f"unknown function {f.unknown[0]}"
        else:
            status, reason = "cacheable", "read"
    elif kind in _DML_KINDS:
        status, reason = "uncacheable", "write"
    elif kind == "ddl":
        status, reason = "uncacheable", "ddl"
    elif kind == "transaction":
        status, reason = "notaquery", "transaction"
    elif kind == "use":
        status, reason = "notaquery", "use"
    else:  # show, set, call, other
        status, reason = "notaquery", kind
    effect = session_effect(T, V, first[0], first[1], kind, functions=f.functions,
                            unknown_functions=f.unknown, uses_tables=bool(f.tables or f.writes),
                            transaction=f.transaction)
    return MySQLClassification(status, reason, kind, 1, session=effect, **facts)
