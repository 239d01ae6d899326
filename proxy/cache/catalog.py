"""What the query cache must know about one origin database, and the verdict per statement.

`OriginCatalog` holds a snapshot of the origin's catalog: function volatility from `pg_proc`
(user-defined functions included), relations from `pg_class` (kind, schema, row security,
view definitions, user triggers and rules), inheritance (`pg_inherits`) and cascading foreign
keys (`pg_constraint`). It is loaded with `CATALOG_SQL` over an ordinary origin connection and
decides, per statement text (sans-I/O):

* the cache status a read gets from its text alone: ``cacheable`` or one of
  uncacheable / volatile / multiplestatements / notaquery / parseerror;
* the tables a cacheable read depends on (views expanded to their base tables, partitions and
  inheritance children included), as *tokens* (relation oids) that writes invalidate;
* the tokens a statement may write, or "everything" when it cannot tell (DDL, a parse error, a
  utility statement that is not known to be read-only, a user-defined volatile function, a
  table with user triggers or rules, an unknown table).

Fail closed throughout: an unknown function is volatile, an unknown table uncacheable, and an
unknown write target invalidates the whole database. Names are resolved conservatively: an
unqualified name matches that name in every schema (the least immutable overload wins), since
the search_path of the session is not known here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from proxy.sql.classify import Classification, ClassificationCache, has_time_word, normalize

# Statement kinds that never change data (DDL and DML are recognised separately; any other
# utility statement may write, so it invalidates everything).
READ_ONLY_UTILITIES = frozenset({
    "TransactionStmt", "VariableSetStmt", "VariableShowStmt", "ExplainStmt", "CopyStmt",
    "ListenStmt", "UnlistenStmt", "NotifyStmt", "DeallocateStmt", "PrepareStmt", "DiscardStmt",
    "CheckPointStmt", "VacuumStmt", "LockStmt", "DeclareCursorStmt", "FetchStmt",
    "ClosePortalStmt", "ConstraintsSetStmt", "LoadStmt", "SelectStmt",
})
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
# SQL-standard value functions (the classifier reports them by these names); all STABLE.
SQL_VALUE_FUNCTIONS = frozenset({
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "current_role", "current_user", "user", "session_user", "current_catalog", "current_schema",
    "sqlvaluefunction",
})
# Casts whose result depends on the catalog (reg* types read pg_class, pg_proc, ... by name).
CATALOG_CAST_TYPES = frozenset(
    name for base in ("regclass", "regproc", "regprocedure", "regoper", "regoperator", "regtype",
                      "regnamespace", "regrole", "regconfig", "regdictionary", "regcollation")
    for name in (base, "pg_catalog." + base))
# Extension functions that reach other databases or write by design.
EXTENSION_WRITERS = frozenset({"dblink", "dblink_exec", "dblink_send_query", "dblink_open"})
# Builtins whose effect on the session the classifier judges from the call itself.
SESSION_BUILTINS = frozenset({"set_config", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                              "pg_try_advisory_lock_shared", "setseed"})
RELOAD_MIN_INTERVAL = 1.0  # seconds between reloads caused by unknown names
MISSING_RECHECK = 60.0  # a name a reload did not find triggers no other reload for this long

# Custom settings a function body (or a DO block) names: set_config('app.x', …) or SET app.x.
# They are read back after a call, so a session keeps what its functions set.
BODY_SETTINGS = r"(?:set_config\s*\(\s*'|\mset\s+(?:session\s+)?)([A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$.]*)"

# One round trip: four result sets, in this order (see `OriginCatalog.load`).
CATALOG_SQL = """\
SELECT n.nspname, p.proname, p.pronargs, p.pronargdefaults, p.provariadic <> 0, p.provolatile::text,
       w.may_write,
       CASE WHEN w.may_write THEN (SELECT pg_catalog.string_agg(DISTINCT m[1], ',')
                                     FROM pg_catalog.regexp_matches(p.prosrc, BODY_SETTINGS_RE, 'gi') AS m) END
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace,
       LATERAL (SELECT p.provolatile = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                                        WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                          AND d.objid = p.oid AND d.deptype = 'e') AS may_write) AS w;
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relrowsecurity,
       CASE WHEN c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            THEN pg_catalog.pg_get_viewdef(c.oid) END,
       EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN')
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%';
SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits;
SELECT conrelid, confrelid FROM pg_catalog.pg_constraint
 WHERE contype = 'f' AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'));
""".replace("BODY_SETTINGS_RE", "'" + BODY_SETTINGS.replace("'", "''") + "'")

Rows = Sequence[Sequence[str | None]]


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict for one statement text against one origin's catalog."""

    status: str  # "cacheable" or a cache status (uncacheable, volatile, notaquery, ...)
    reason: str
    read_tokens: frozenset[int] = frozenset()
    write_tokens: frozenset[int] = frozenset()
    write_all: bool = False
    reload_catalog: bool = False  # DDL: reload the catalog once it has run
    unknown: frozenset[str] = frozenset()  # names the catalog did not know (fail closed)
    # What it may leave in the session (the pooler's isolation, docs/ARCHITECTURE.md):
    # `readback` — it may change session settings: read them back from the server afterwards;
    # `dirty` — it may leave state no setting shows (or settings it does not name): reset the
    # server before another client gets it; `names` — custom settings it names (read back);
    # `holds` — kinds of state that cannot be carried (see Classification.session_holds).
    readback: bool = False
    dirty: bool = False
    names: frozenset[str] = frozenset()
    holds: frozenset[str] = frozenset()
    direct: tuple[str, ...] | None = None  # a plain SET/RESET: Classification.session_set

    @property
    def cacheable(self) -> bool:
        return self.status == "cacheable"

    @property
    def writes(self) -> bool:
        return self.write_all or bool(self.write_tokens)


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # r table, p partitioned, v view, m materialized view, f foreign
    row_security: bool
    view_sql: str | None
    triggers: bool  # user triggers or rules: a write may touch anything


@dataclass(slots=True)
class _Resolution:
    tokens: set[int] = field(default_factory=set)
    calls: set[tuple[str, int]] = field(default_factory=set)
    casts: set[str] = field(default_factory=set)
    time_literal: bool = False
    unknown: set[str] = field(default_factory=set)
    blocker: tuple[str, str] | None = None  # (status, reason) that makes the read uncacheable


class OriginCatalog:
    """A snapshot of one origin's catalog and the decisions made against it."""

    def __init__(self, classifier: ClassificationCache | None = None, *, max_decisions: int = 4096) -> None:
        self.classifier = classifier or ClassificationCache()
        self.loaded = False
        self.version = 0  # bumped by every load: verdicts made before may no longer hold
        self.attempted_at = float("-inf")
        self.missing: set[str] = set()  # names reloads were started for (still unknown: absent)
        self.missing_since = float("-inf")
        # bare name -> overloads (schema, fewest arguments, most arguments, provolatile)
        self._overloads: dict[str, list[tuple[str, int, int, str]]] = {}
        self._writers: set[str] = set()  # bare and "schema.name" names that may write tables
        self._settings_of: dict[str, frozenset[str]] = {}  # such a function -> custom settings it names
        self._rels_by_name: dict[str, list[Relation]] = {}
        self._rels_qualified: dict[tuple[str, str], Relation] = {}
        self._rels: dict[int, Relation] = {}
        self._family: dict[int, frozenset[int]] = {}
        self._cascades: dict[int, set[int]] = {}
        self._decisions: OrderedDict[bytes, Decision] = OrderedDict()
        self._max_decisions = max_decisions

    # ------------------------------------------------------------------ loading
    def load(self, results: Sequence[Rows]) -> None:
        """Replace the snapshot with the four result sets of `CATALOG_SQL` (text values)."""
        if len(results) != 4:
            raise ValueError(f"the catalog query returned {len(results)} result sets, expected 4")
        funcs, rels, inherits, fks = results
        overloads: dict[str, list[tuple[str, int, int, str]]] = {}
        writers: set[str] = set()
        settings_of: dict[str, frozenset[str]] = {}
        for schema, name, nargs, ndefaults, variadic, volatility, may_write, *rest in funcs:
            if rest and rest[0]:
                names = frozenset(n.lower() for n in rest[0].split(","))
                for key in (name, f"{schema}.{name}"):
                    settings_of[key] = settings_of.get(key, frozenset()) | names
            assert schema is not None and name is not None and volatility is not None
            most = int(nargs or 0)
            fewest = most - int(ndefaults or 0)
            if variadic == "t":
                fewest, most = max(0, fewest - 1), 1 << 30  # a VARIADIC list takes 0..n arguments
            overloads.setdefault(name, []).append((schema, fewest, most, volatility))
            if may_write == "t" or name in EXTENSION_WRITERS:
                writers.add(name)
                writers.add(f"{schema}.{name}")
        by_name: dict[str, list[Relation]] = {}
        by_qual: dict[tuple[str, str], Relation] = {}
        by_oid: dict[int, Relation] = {}
        for oid, schema, name, kind, rls, view_sql, triggers in rels:
            assert oid is not None and schema is not None and name is not None and kind is not None
            rel = Relation(int(oid), schema, name, kind, rls == "t", view_sql, triggers == "t")
            by_name.setdefault(name, []).append(rel)
            by_qual[(schema, name)] = rel
            by_oid[rel.oid] = rel
        # Inheritance and partitions: a write to any member can change what a read of any
        # other member returns (parents include children), so a family shares its tokens.
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.get(x, x) != x:
                parent[x] = parent.get(parent[x], parent[x])
                x = parent[x]
            return x

        for child, par in inherits:
            a, b = find(int(child)), find(int(par))  # type: ignore[arg-type]
            if a != b:
                parent[a] = b
        groups: dict[int, set[int]] = {}
        for oid in list(parent):
            groups.setdefault(find(oid), set()).add(oid)
        family: dict[int, frozenset[int]] = {}
        for root, members in groups.items():
            members.add(root)
            frozen = frozenset(members)
            for m in members:
                family[m] = frozen
        cascades: dict[int, set[int]] = {}
        for referencing, referenced in fks:
            cascades.setdefault(int(referenced), set()).add(int(referencing))  # type: ignore[arg-type]
        self._overloads, self._writers, self._settings_of = overloads, writers, settings_of
        self._rels_by_name, self._rels_qualified, self._rels = by_name, by_qual, by_oid
        self._family, self._cascades = family, cascades
        self._decisions.clear()
        self.loaded = True
        self.version += 1

    def may_reload(self, now: float, names: frozenset[str] = frozenset()) -> bool:
        """Unknown names justify a reload at most once per RELOAD_MIN_INTERVAL, and names that
        a reload already looked for (a table that does not exist) only after MISSING_RECHECK."""
        if now - self.attempted_at < RELOAD_MIN_INTERVAL:
            return False
        if self.missing and now - self.missing_since >= MISSING_RECHECK:
            self.missing.clear()
        return not names or not names <= self.missing

    def reloading_for(self, now: float, names: frozenset[str]) -> None:
        self.attempted_at = now
        if names and not self.missing:
            self.missing_since = now
        self.missing |= names

    # ------------------------------------------------------------------ decisions
    def decide(self, sql: bytes) -> Decision:
        """The decision for a statement text, cached until the catalog changes."""
        decisions = self._decisions
        found = decisions.get(sql)
        if found is not None:
            return found
        try:
            text = sql.decode("utf-8")
        except UnicodeDecodeError:
            return Decision("parseerror", "the query is not valid UTF-8", write_all=True, readback=True, dirty=True)
        key = sql
        # set_config's constants (name, is_local) and a SET's value decide what they leave in the
        # session: never share their verdict with texts that differ in them.
        lowered = text.lower()
        if not has_time_word(text) and "set_config" not in lowered and not lowered.lstrip().startswith(("set", "reset")):
            # Texts that differ only in constants (ids in simple-protocol queries) share one
            # verdict: classify the normalized text once, not every text.
            norm = normalize(text)
            if norm is not None:
                key = norm.encode("utf-8")
                found = decisions.get(key)
                if found is not None:
                    return found
                d = self.decide_classified(self.classifier.get(norm))
                if d.status == "parseerror":  # normalizing can break odd statements (SET x = $1)
                    key = sql
                    d = self.decide_classified(self.classifier.get(text))
            else:
                d = self.decide_classified(self.classifier.get(text))
        else:
            d = self.decide_classified(self.classifier.get(text))
        # Verdicts with unknown names are kept too: a reload (which clears them all) is what can
        # change them, and the session asks for one whenever it meets `unknown`.
        if len(key) <= self.classifier.max_sql_len:
            decisions[key] = d
            if len(decisions) > self._max_decisions:
                decisions.popitem(last=False)
        return d

    def decide_classified(self, c: Classification) -> Decision:
        kinds = c.statement_kinds
        write_all = False
        write_tokens: set[int] = set()
        unknown: set[str] = set()
        reload_catalog = c.is_ddl
        if c.status == "parseerror" or c.is_ddl:
            write_all = True  # cannot tell what it does / the schema changes under every entry
        elif any(k not in READ_ONLY_UTILITIES and not _is_dml(k) for k in kinds):
            write_all = True  # CALL, DO, EXECUTE, ...: may write anything
        else:
            for name in c.write_tables:
                if not self._write_targets(name, write_tokens):
                    write_all = True
                    if not self._resolve_rel(name):
                        unknown.add(name)
        # Session state: settings named by SET/RESET/set_config are read back; DO, CALL, a parse
        # error, an unknown function or a user-defined volatile one may change anything.
        opaque = c.session_opaque or c.status == "parseerror"
        names = {n for n in c.session_gucs if "." in n}
        for fn, nargs in c.calls:
            if fn.removeprefix("pg_catalog.") in SESSION_BUILTINS:
                continue  # the classifier judged what they leave in the session
            if self._may_write(fn):
                write_all = True
                opaque = True
                parts = fn.split(".")
                names |= self._settings_of.get(".".join(parts[-2:]) if len(parts) > 1 else fn, frozenset())
            elif self._volatility(fn, nargs) is None:
                unknown.add(fn)
                write_all = True  # an unknown function may write
                opaque = True
        writes = dict(write_tokens=frozenset(write_tokens), write_all=write_all, reload_catalog=reload_catalog,
                      readback=opaque or bool(c.session_gucs), dirty=opaque or bool(c.session_holds),
                      names=frozenset(names), holds=c.session_holds,
                      direct=c.session_set if not opaque else None)
        if c.status != "cacheable":
            return Decision(c.status, c.reason, unknown=frozenset(unknown), **writes)  # type: ignore[arg-type]

        res = _Resolution(calls=set(c.calls), casts=set(c.casts), time_literal=c.time_literal)
        for name in c.tables:
            if name in c.cte_names:
                continue  # a WITH query's name, not a relation
            self._read(name, res, depth=0)
        unknown |= res.unknown
        frozen_unknown = frozenset(unknown)
        if res.blocker is not None:
            return Decision(res.blocker[0], res.blocker[1], unknown=frozen_unknown, **writes)  # type: ignore[arg-type]
        stable: str | None = None
        for fn, nargs in sorted(res.calls):
            vol = self._volatility(fn, nargs)
            if vol == "i":
                continue
            if vol is None:
                return Decision("volatile", f"unknown function {fn}", unknown=frozen_unknown, **writes)  # type: ignore[arg-type]
            if vol == "v":
                return Decision("volatile", f"volatile function {fn}", unknown=frozen_unknown, **writes)  # type: ignore[arg-type]
            stable = stable or fn
        if stable is not None:
            return Decision("volatile", f"stable function {stable}", unknown=frozen_unknown, **writes)  # type: ignore[arg-type]
        if res.time_literal:
            return Decision("volatile", "a 'now'/'today'/'tomorrow'/'yesterday' literal", unknown=frozen_unknown,
                            **writes)  # type: ignore[arg-type]
        for cast in sorted(res.casts):
            if cast in CATALOG_CAST_TYPES:
                return Decision("volatile", f"cast to {cast}", unknown=frozen_unknown, **writes)  # type: ignore[arg-type]
        if unknown:
            return Decision("uncacheable", f"unknown relation {sorted(unknown)[0]}", unknown=frozen_unknown,
                            **writes)  # type: ignore[arg-type]
        return Decision("cacheable", "read", read_tokens=frozenset(res.tokens), **writes)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ names
    def _volatility(self, name: str, nargs: int = -1) -> str | None:
        """The least immutable provolatile of the overloads a call could mean: those with
        that name (in that schema, if qualified; in any schema otherwise) that take `nargs`
        arguments (all of them when the count does not narrow it down). None: unknown."""
        parts = name.split(".")
        bare = parts[-1]
        schema = parts[-2] if len(parts) > 1 else None
        found = self._overloads.get(bare, ())
        if schema is not None:
            found = [o for o in found if o[0] == schema]
        if not found:
            if bare in SQL_VALUE_FUNCTIONS and schema in (None, "pg_catalog"):
                return "s"
            return None
        fitting = [o for o in found if nargs < 0 or o[1] <= nargs <= o[2]] or found
        return max(o[3] for o in fitting)  # 'i' < 's' < 'v'

    def _may_write(self, name: str) -> bool:
        parts = name.split(".")
        key = name if len(parts) <= 2 else ".".join(parts[-2:])
        return key in self._writers

    def _resolve_rel(self, name: str) -> list[Relation]:
        parts = name.split(".")
        if len(parts) == 1:
            return self._rels_by_name.get(name, [])
        rel = self._rels_qualified.get((parts[-2], parts[-1]))
        return [rel] if rel is not None else []

    def _family_of(self, oid: int) -> Iterable[int]:
        return self._family.get(oid, (oid,))

    def _read(self, name: str, res: _Resolution, depth: int) -> None:
        rels = self._resolve_rel(name)
        if not rels:
            res.unknown.add(name)
            return
        for rel in rels:
            if rel.schema in SYSTEM_SCHEMAS:
                res.blocker = res.blocker or ("uncacheable", f"system catalog {rel.schema}.{rel.name}")
            elif rel.row_security:
                res.blocker = res.blocker or ("uncacheable", f"row level security on {rel.schema}.{rel.name}")
            elif rel.kind == "v":
                self._expand_view(rel, res, depth)
            else:
                res.tokens.update(self._family_of(rel.oid))

    def _expand_view(self, rel: Relation, res: _Resolution, depth: int) -> None:
        """A view is as cacheable as its definition: its functions, casts and tables count."""
        res.tokens.add(rel.oid)
        if depth > 16 or rel.view_sql is None:
            res.blocker = res.blocker or ("uncacheable", f"view {rel.schema}.{rel.name} could not be inspected")
            return
        c = self.classifier.get(rel.view_sql)
        if c.status != "cacheable":
            res.blocker = res.blocker or ("uncacheable", f"view {rel.schema}.{rel.name}: {c.reason}")
            return
        res.calls |= c.calls
        res.casts |= c.casts
        res.time_literal = res.time_literal or c.time_literal
        for name in c.tables:
            if name not in c.cte_names:
                self._read(name, res, depth + 1)

    def _write_targets(self, name: str, tokens: set[int]) -> bool:
        """Add what a write to `name` can change; False when it cannot be bounded."""
        rels = self._resolve_rel(name)
        if not rels:
            return False
        todo = [r.oid for r in rels]
        seen: set[int] = set()
        while todo:
            oid = todo.pop()
            if oid in seen:
                continue
            seen.add(oid)
            rel = self._rels.get(oid)
            if rel is None or rel.triggers:
                return False
            if rel.kind == "v":
                # An updatable view writes its base tables.
                if rel.view_sql is None:
                    return False
                c = self.classifier.get(rel.view_sql)
                for base in c.tables:
                    base_rels = self._resolve_rel(base)
                    if not base_rels:
                        return False
                    todo.extend(r.oid for r in base_rels)
                tokens.add(oid)
                continue
            for member in self._family_of(oid):
                tokens.add(member)
                todo.extend(self._cascades.get(member, ()))
                if member != oid:
                    todo.append(member)
        return True


def _is_dml(kind: str) -> bool:
    return kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
