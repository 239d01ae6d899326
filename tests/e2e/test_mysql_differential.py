"""Differential test of the MySQL proxy (issue 12, point 8): the same text-protocol commands to
MariaDB directly and through the proxy, the answers compared one by one.

Sequences are generated with hypothesis from: SET autocommit, BEGIN / START TRANSACTION /
COMMIT / ROLLBACK, SAVEPOINT, INSERT / UPDATE / DELETE / SELECT [FOR UPDATE] on a scratch table
(point reads that the cache may answer), a duplicate key (an error) and INSERT IGNORE of one (a
warning), SET @var / SELECT @var / @var := / SELECT ... INTO @var, SET TRANSACTION (the next one),
SET NAMES (three utf8mb4 collations), SET collation_connection, SET SESSION sql_mode / time_zone /
TRANSACTION ISOLATION LEVEL / READ ONLY (and back), a CAST that warns, DO, SHOW WARNINGS / SHOW ERRORS /
SHOW COUNT(*) WARNINGS / @@warning_count, errors (unknown table, syntax), LAST_INSERT_ID(), a
temporary table, SELECT SQL_CALC_FOUND_ROWS followed by FOUND_ROWS(), COM_PING and
COM_RESET_CONNECTION. The client is PyMySQL on both sides, so both get the same bytes, starting
from its default mode (autocommit off, `SET NAMES utf8mb4` at connect) or with autocommit on,
with one of three login collations.

One example: a fresh connection to each side; each side empties its own scratch table (`t_d`
direct, `t_p` through the proxy, so that auto-increment ids and cache invalidation follow the
same course); the sequence; then what each side committed (read as root) is compared too.

Compared per command: OK (affected rows, insert id, warnings, status flags) or ERR (code,
SQLSTATE, message) or a result set (column names, types, character sets, lengths, flags, the
rows, warnings, status flags); for COM_PING and COM_RESET_CONNECTION the status flags. Only the
scratch table's name is normalised. Not generated, because the proxy refuses them on purpose
(tests/e2e/test_mysql_isolation.py covers the refusals): USE, multi-statements, non-UTF-8
character sets, ROW_COUNT()/FOUND_ROWS() outside a transaction, KILL. CONNECTION_ID() differs by
design (an origin thread id) and is not generated either.

Both caching modes run (two configs of the same origin). Bounded: HD_MYSQL_DIFF_EXAMPLES examples
per mode (default 60, about 10-20 s each on two cores), derandomized (the same examples every run)
unless HD_MYSQL_DIFF_SEED is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pymysql
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.harness.mysql_proxy import DB, MySQLProxyStack

EXAMPLES = int(os.environ.get("HD_MYSQL_DIFF_EXAMPLES", "60"))
SEED = os.environ.get("HD_MYSQL_DIFF_SEED")
COLLATIONS = ["utf8mb4_general_ci", "utf8mb4_unicode_ci", "utf8mb4_bin"]
TABLES = {"direct": "t_d", "proxy": "t_p"}

FIXED = [
    "SET autocommit = 0", "SET autocommit = 1", "BEGIN", "START TRANSACTION", "COMMIT", "ROLLBACK",
    "SELECT id, v, s FROM {t} ORDER BY id", "SELECT COUNT(*), SUM(v) FROM {t}",
    "SELECT @a", "SELECT @a := IFNULL(@a, 0) + 1",
    "SELECT 'ß' = 'ss', 'Å' = 'A', 'a' = 'A', @@collation_connection, @@character_set_results",
    "SELECT @@sql_mode, @@time_zone, @@autocommit, @@in_transaction, @@tx_isolation",
    "SHOW WARNINGS", "SHOW ERRORS", "SHOW COUNT(*) WARNINGS", "SELECT @@warning_count, @@error_count",
    "SELECT * FROM no_such_table", "SELEC 1", "SELECT CAST('abc' AS INT)", "SELECT 1",
    "SELECT LAST_INSERT_ID()", "INSERT IGNORE INTO {t} (id, v) VALUES (1, -1)",
    "CREATE TEMPORARY TABLE IF NOT EXISTS tmp (i INT)", "INSERT INTO tmp VALUES (7)", "SELECT COUNT(*) FROM tmp",
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED", "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET SESSION sql_mode = 'ANSI_QUOTES'", "SET SESSION sql_mode = DEFAULT", "SET sql_mode = 'NO_BACKSLASH_ESCAPES'",
    "SET time_zone = '+03:00'", "SET time_zone = DEFAULT",
    "SET NAMES utf8mb4", "SET NAMES utf8mb4 COLLATE utf8mb4_bin", "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci",
    "SET collation_connection = utf8mb4_general_ci",
    "SELECT v FROM {t} WHERE id = 1 FOR UPDATE", "SAVEPOINT s", "ROLLBACK TO SAVEPOINT s", "RELEASE SAVEPOINT s",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET SESSION TRANSACTION READ ONLY",
    "SET SESSION TRANSACTION READ WRITE", "SELECT COUNT(*) INTO @a FROM {t}", "DO 1",
    "INSERT INTO {t} (id, v) VALUES (1, 1)",
]


def _query(sql: str) -> tuple:
    return ("query", sql)


command = st.one_of(
    st.sampled_from(FIXED).map(_query),
    st.integers(1, 9).map(lambda n: _query(f"INSERT INTO {{t}} (v, s) VALUES ({n}, 'x{n}')")),
    st.tuples(st.integers(1, 9), st.integers(1, 6)).map(lambda p: _query(f"UPDATE {{t}} SET v = {p[0]} WHERE id = {p[1]}")),
    st.integers(1, 6).map(lambda n: _query(f"DELETE FROM {{t}} WHERE id = {n}")),
    st.integers(1, 6).map(lambda n: _query(f"SELECT v, s FROM {{t}} WHERE id = {n}")),
    st.integers(0, 9).map(lambda n: _query(f"SET @a = {n}")),
    st.just(("found_rows",)), st.just(("ping",)), st.just(("reset",)),
)


@dataclass
class Example:
    autocommit: bool | None  # None: PyMySQL's default (off)
    collation: str
    commands: list[tuple]


examples = st.builds(Example, st.sampled_from([None, True]), st.sampled_from(COLLATIONS),
                     st.lists(command, min_size=1, max_size=16))


def _norm(v: object, table: str) -> object:
    if isinstance(v, str):
        return v.replace(table, "t")
    if isinstance(v, (tuple, list)):
        return tuple(_norm(x, table) for x in v)
    return v


def _answer(conn: pymysql.Connection, table: str, sql: str) -> tuple:
    try:
        conn.query(sql.replace("{t}", table))
    except pymysql.err.MySQLError as exc:
        return ("err", exc.args[0], _norm(exc.args[1] if len(exc.args) > 1 else "", table))
    r = conn._result  # noqa: SLF001 - the whole answer, as the driver read it
    cols = tuple((f.name, f.type_code, f.charsetnr, f.length, f.flags) for f in (getattr(r, "fields", None) or ()))
    return ("ok", cols, _norm(r.rows, table), r.affected_rows, r.insert_id, r.warning_count, r.server_status)


def _run(conn: pymysql.Connection, table: str, cmd: tuple) -> tuple:
    kind = cmd[0]
    if kind == "query":
        return _answer(conn, table, cmd[1])
    if kind == "found_rows":  # the pair the proxy keeps together (SQL_CALC_FOUND_ROWS holds the connection)
        first = _answer(conn, table, "SELECT SQL_CALC_FOUND_ROWS id FROM {t} ORDER BY id LIMIT 1")
        return (first, _answer(conn, table, "SELECT FOUND_ROWS()"))
    if kind == "ping":
        conn.ping(reconnect=False)
        return ("ping", conn.server_status)
    if kind == "reset":
        conn._execute_command(0x1F, b"")  # noqa: SLF001 - COM_RESET_CONNECTION
        try:
            conn._read_ok_packet()  # noqa: SLF001
        except pymysql.err.MySQLError as exc:
            return ("err", exc.args[0])
        return ("reset", conn.server_status)
    raise AssertionError(cmd)


class World:
    def __init__(self, stack: MySQLProxyStack) -> None:
        self.stack = stack
        self.configs = {"on": stack.config("diff-cache", limit=5, caching=True),
                        "off": stack.config("diff-nocache", limit=5)}

    def connect(self, side: str, caching: str, ex: Example) -> pymysql.Connection:
        kw = dict(collation=ex.collation, charset="utf8mb4")
        if ex.autocommit is not None:
            kw["autocommit"] = ex.autocommit
        if side == "direct":
            return self.stack.direct(**kw)
        return self.stack.connect(self.configs[caching], **kw)

    def committed(self, table: str) -> list:
        return self.stack.db.query(f"SELECT id, v, s FROM {DB}.{table} ORDER BY id")

    def check(self, ex: Example, caching: str) -> None:
        answers: dict[str, list] = {}
        for side, table in TABLES.items():
            conn = self.connect(side, caching, ex)
            try:
                conn.query(f"TRUNCATE {table}")  # through the proxy too: it drops cached reads of it
                answers[side] = [(cmd, _run(conn, table, cmd)) for cmd in ex.commands]
            finally:
                conn.close()
        for i, (d, p) in enumerate(zip(answers["direct"], answers["proxy"])):
            assert p == d, (f"command {i} differs ({caching=}, {ex.autocommit=}, {ex.collation=})\n"
                            f"sequence: {[c for c, _ in answers['direct']]}\n direct: {d[1]}\n  proxy: {p[1]}")
        assert self.committed("t_p") == self.committed("t_d"), ex


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    stack = MySQLProxyStack(tmp_path_factory.mktemp("hd-mysql-diff") / "state").start()
    try:
        for table in TABLES.values():
            stack.db.query(f"CREATE TABLE {DB}.{table} (id INT AUTO_INCREMENT PRIMARY KEY, v INT, s VARCHAR(20)) "
                           "ENGINE=InnoDB")
        yield World(stack)
    except BaseException:
        if stack.edge is not None:
            print(f"\n===== edge =====\n{stack.edge.diagnostics(120)}")
        raise
    finally:
        stack.stop()


def _settings(test):
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                    print_blob=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(test)
    return seed(int(SEED))(test) if SEED is not None else test


@pytest.mark.parametrize("caching", ["off", "on"])
@_settings
@given(ex=examples)
def test_differential_text_protocol(world: World, caching: str, ex: Example) -> None:
    world.check(ex, caching)


# Explicit sequences: what the generator found, and the cases, kept as regressions.
REGRESSIONS = {
    "autocommit-off-rollback": Example(None, "utf8mb4_general_ci", [
        _query("INSERT INTO {t} (v, s) VALUES (1, 'a')"), _query("ROLLBACK"), _query("SELECT COUNT(*), SUM(v) FROM {t}")]),
    "warnings-survive-tableless-statements": Example(True, "utf8mb4_general_ci", [
        _query("SELECT CAST('abc' AS INT)"), _query("SELECT 1"), _query("SET @a = 1"), _query("SHOW WARNINGS")]),
    "collation-at-login": Example(True, "utf8mb4_unicode_ci", [
        _query("SELECT 'ß' = 'ss', 'Å' = 'A', 'a' = 'A', @@collation_connection, @@character_set_results"), ("ping",),
        _query("SET NAMES utf8mb4 COLLATE utf8mb4_bin"), ("reset",),
        _query("SELECT 'ß' = 'ss', 'Å' = 'A', 'a' = 'A', @@collation_connection, @@character_set_results")]),
    "last-insert-id": Example(True, "utf8mb4_general_ci", [
        _query("INSERT INTO {t} (v, s) VALUES (1, 'a')"), _query("SELECT 1"), _query("SELECT LAST_INSERT_ID()"),
        _query("INSERT IGNORE INTO {t} (id, v) VALUES (1, -1)"), _query("SHOW WARNINGS"), _query("SELECT LAST_INSERT_ID()")]),
    # the prelude of a new connection (SET autocommit = 0) was taken for one that set LAST_INSERT_ID()
    "last-insert-id-of-the-previous-client": Example(None, "utf8mb4_general_ci", [
        _query("INSERT INTO {t} (v, s) VALUES (1, 'a')"), _query("COMMIT"), ("reset",), _query("SELECT 1 FROM {t}"),
        _query("SELECT LAST_INSERT_ID()")]),
    # sql_mode flags of the proxy's own OK after COM_RESET_CONNECTION were the old session's
    "reset-after-sql-mode": Example(None, "utf8mb4_general_ci", [
        _query("SET SESSION sql_mode = 'ANSI_QUOTES'"), ("reset",)]),
}


@pytest.mark.parametrize("caching", ["off", "on"])
@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_differential_regressions(world: World, caching: str, name: str) -> None:
    world.check(REGRESSIONS[name], caching)
