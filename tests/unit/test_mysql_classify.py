"""MySQL / MariaDB lexer + classifier (proxy.mysql.classify): fail-closed rules."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mysql.classify import classify

C = "cacheable"


def _status(sql: str, **kw: bool | None) -> tuple[str, str]:
    c = classify(sql, **kw)
    return c.status, c.reason


# (sql, status, reason)
VERDICTS = [
    # plain reads
    ("SELECT 1", C, "read"),
    ("select a, b from t where id = 5", C, "read"),
    ("SELECT CONCAT(LOWER(a), ABS(-1)) FROM t", C, "read"),
    ("SELECT DATE_FORMAT('2024-01-02', '%Y') FROM t", C, "read"),
    ("SELECT COUNT(*), MAX(x) FROM t GROUP BY y HAVING COUNT(*) > 1 ORDER BY 1 LIMIT 10", C, "read"),
    ("SELECT CAST(x AS DECIMAL(10,2)), CONVERT(y USING utf8mb4), CAST(z AS CHAR(5) CHARACTER SET utf8mb4) FROM t",
     C, "read"),
    ("SELECT EXTRACT(YEAR FROM d), TRIM(LEADING 'x' FROM s), SUBSTRING(s FROM 1 FOR 2) FROM t", C, "read"),
    ("SELECT a FROM t WHERE b IN (SELECT c FROM u) AND EXISTS (SELECT 1 FROM v)", C, "read"),
    ("SELECT ROW_NUMBER() OVER (PARTITION BY a ORDER BY b) FROM t", C, "read"),
    ("SELECT a FROM t USE INDEX (i1, i2) FORCE INDEX FOR JOIN (i3)", C, "read"),
    ("(SELECT a FROM t) UNION (SELECT a FROM u)", C, "read"),
    ("WITH c AS (SELECT 1 AS n) SELECT n FROM c", C, "read"),
    ("WITH RECURSIVE c (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 5) SELECT * FROM c", C, "read"),
    ("TABLE t", C, "read"),
    ("SELECT SQL_CACHE a FROM t", C, "read"),
    ("SELECT a FROM t WHERE MATCH (b) AGAINST ('x' IN BOOLEAN MODE)", C, "read"),
    ("SELECT 1 FROM DUAL", C, "read"),
    ("SELECT user, now, `rand` FROM t", C, "read"),  # column names, not calls
    # tricky lexing: names in strings, comments, identifiers do not count
    ("SELECT 'NOW()'", C, "read"),
    ('SELECT "RAND()"', C, "read"),
    ("SELECT 1 /* RAND() */", C, "read"),
    ("SELECT 1 -- NOW()\n", C, "read"),
    ("SELECT 1 # UUID()\n", C, "read"),
    ("SELECT `now` FROM t", C, "read"),
    ("SELECT `a``NOW()` FROM t", C, "read"),
    ("SELECT 'it''s NOW()'", C, "read"),
    ("SELECT /*+ MAX_EXECUTION_TIME(1000) */ a FROM t", C, "read"),
    ("SELECT X'4E4F57', 0x4e4f57, b'101', 0b101, _utf8mb4'NOW()', N'x' FROM t", C, "read"),
    ("SELECT 1e5, .5, 3.14 FROM t", C, "read"),
    # executable comments are code
    ("SELECT /*! RAND() */ 1", "volatile", "rand"),
    ("SELECT /*!50700 NOW() */ 1", "volatile", "now"),
    ("SELECT /*M! UUID() */ 1", "volatile", "uuid"),
    ("SELECT /*!40001 SQL_NO_CACHE */ a FROM t", "uncacheable", "sql_no_cache"),
    # volatile functions, mixed case, bare keyword forms
    ("SELECT NOW()", "volatile", "now"),
    ("select now()", "volatile", "now"),
    ("SELECT nOw ()", "volatile", "now"),
    ("SELECT CURRENT_TIMESTAMP", "volatile", "current_timestamp"),
    ("SELECT a FROM t WHERE d > current_date", "volatile", "current_date"),
    ("SELECT CURRENT_TIMESTAMP(6)", "volatile", "current_timestamp"),
    ("SELECT LOCALTIME, 1", "volatile", "localtime"),
    ("SELECT UTC_TIMESTAMP", "volatile", "utc_timestamp"),
    ("SELECT CURRENT_USER", "volatile", "current_user"),
    ("SELECT CURDATE()", "volatile", "curdate"),
    ("SELECT SYSDATE()", "volatile", "sysdate"),
    ("SELECT UNIX_TIMESTAMP()", "volatile", "unix_timestamp"),
    ("SELECT UNIX_TIMESTAMP('2020-01-01')", "volatile", "unix_timestamp"),
    ("SELECT FROM_UNIXTIME(0)", "volatile", "from_unixtime"),
    ("SELECT a FROM t ORDER BY RAND()", "volatile", "rand"),
    ("SELECT UUID()", "volatile", "uuid"),
    ("SELECT UUID_SHORT()", "volatile", "uuid_short"),
    ("SELECT LAST_INSERT_ID()", "volatile", "last_insert_id"),
    ("SELECT ROW_COUNT()", "volatile", "row_count"),
    ("SELECT FOUND_ROWS()", "volatile", "found_rows"),
    ("SELECT CONNECTION_ID()", "volatile", "connection_id"),
    ("SELECT USER()", "volatile", "user"),
    ("SELECT SESSION_USER()", "volatile", "session_user"),
    ("SELECT DATABASE()", "volatile", "database"),
    ("SELECT SCHEMA()", "volatile", "schema"),
    ("SELECT VERSION()", "volatile", "version"),
    ("SELECT SLEEP(1)", "volatile", "sleep"),
    ("SELECT GET_LOCK('x', 1)", "volatile", "get_lock"),
    ("SELECT RELEASE_ALL_LOCKS()", "volatile", "release_all_locks"),
    ("SELECT BENCHMARK(10, MD5('x'))", "volatile", "benchmark"),
    ("SELECT LOAD_FILE('/etc/passwd')", "volatile", "load_file"),
    ("SELECT RANDOM_BYTES(16)", "volatile", "random_bytes"),
    ("SELECT NEXTVAL(s)", "volatile", "nextval"),
    ("SELECT NEXT VALUE FOR s", "volatile", "nextval"),
    ("SELECT PREVIOUS VALUE FOR s", "volatile", "lastval"),
    ("SELECT s.nextval", "volatile", "nextval"),
    ("SELECT {fn NOW()}", "volatile", "now"),
    # unknown / user-defined functions fail closed
    ("SELECT my_func(1)", "volatile", "unknown function my_func"),
    ("SELECT db.f(1)", "volatile", "unknown function db.f"),
    ("SELECT `f`(1)", "volatile", "unknown function `f`"),
    ("SELECT a FROM (SELECT 1 AS x) AS dt (a)", "volatile", "unknown function dt"),
    # statement-level reasons
    ("SELECT a FROM t FOR UPDATE", "uncacheable", "locking"),
    ("SELECT a FROM t FOR SHARE", "uncacheable", "locking"),
    ("SELECT a FROM t FOR UPDATE SKIP LOCKED", "uncacheable", "locking"),
    ("SELECT a FROM t LOCK IN SHARE MODE", "uncacheable", "locking"),
    ("SELECT a INTO @x FROM t", "uncacheable", "select_into"),
    ("SELECT a FROM t INTO OUTFILE '/tmp/x'", "uncacheable", "select_into"),
    ("SELECT a FROM t INTO DUMPFILE '/tmp/x'", "uncacheable", "select_into"),
    ("SELECT @x", "uncacheable", "variable"),
    ("SELECT @@version", "uncacheable", "variable"),
    ("SELECT @@session.sql_mode", "uncacheable", "variable"),
    ("SELECT a FROM t WHERE b = @`v`", "uncacheable", "variable"),
    ("SELECT @x := 1", "uncacheable", "variable"),
    ("SELECT a FROM t WHERE id = ?", "uncacheable", "placeholder"),
    ("SELECT SQL_CALC_FOUND_ROWS a FROM t LIMIT 1", "uncacheable", "session_state"),
    ("SELECT SQL_NO_CACHE a FROM t", "uncacheable", "sql_no_cache"),
    ("SELECT * FROM information_schema.tables", "uncacheable", "system_catalog"),
    ("SELECT * FROM `performance_schema`.threads", "uncacheable", "system_catalog"),
    ("SELECT user FROM mysql.user", "uncacheable", "system_catalog"),
    ("SELECT * FROM SYS.processlist", "uncacheable", "system_catalog"),
    ("SELECT * FROM {OJ t1 LEFT OUTER JOIN t2 ON t1.a = t2.a}", "uncacheable", "unparsed_from"),
    ("SELECT a FROM t WHERE b = 1 UPDATE", "uncacheable", "dml_in_select"),
    # other kinds
    ("INSERT INTO t VALUES (1)", "uncacheable", "write"),
    ("UPDATE t SET a = 1", "uncacheable", "write"),
    ("DELETE FROM t", "uncacheable", "write"),
    ("REPLACE INTO t VALUES (1)", "uncacheable", "write"),
    ("LOAD DATA INFILE '/x' INTO TABLE t", "uncacheable", "write"),
    ("CREATE TABLE t (a INT, ts TIMESTAMP DEFAULT CURRENT_TIMESTAMP)", "uncacheable", "ddl"),
    ("TRUNCATE t", "uncacheable", "ddl"),
    ("SHOW TABLES", "notaquery", "show"),
    ("DESCRIBE t", "notaquery", "show"),
    ("EXPLAIN SELECT 1", "notaquery", "show"),
    ("EXPLAIN ANALYZE SELECT 1", "notaquery", "other"),
    ("SET NAMES utf8mb4", "notaquery", "set"),
    ("USE db", "notaquery", "use"),
    ("CALL p(1)", "notaquery", "call"),
    ("DO SLEEP(1)", "notaquery", "other"),
    ("FLUSH TABLES", "notaquery", "other"),
    ("BEGIN", "notaquery", "transaction"),
    ("START TRANSACTION READ ONLY", "notaquery", "transaction"),
    ("COMMIT", "notaquery", "transaction"),
    ("ROLLBACK", "notaquery", "transaction"),
    ("SAVEPOINT s1", "notaquery", "transaction"),
    ("RELEASE SAVEPOINT s1", "notaquery", "transaction"),
    ("XA START 'x'", "notaquery", "transaction"),
    ("", "notaquery", "empty"),
    ("  /* only a comment */ ", "notaquery", "empty"),
    (";", "notaquery", "empty"),
    # multiple statements
    ("SELECT 1; SELECT 2", "multiplestatements", "multiple"),
    ("SELECT 1;;", "multiplestatements", "multiple"),
    ("SELECT 1; DROP TABLE t", "multiplestatements", "multiple"),
    ("SELECT /*! 1; SELECT */ 2", "multiplestatements", "multiple"),
]


@pytest.mark.parametrize(("sql", "status", "reason"), VERDICTS)
def test_verdicts(sql: str, status: str, reason: str) -> None:
    assert _status(sql) == (status, reason)


@pytest.mark.parametrize("sql", [
    "SELECT 1;", "SELECT 1 ; -- trailing\n", "SELECT 1; /* c */", "SELECT ';' FROM t",
    "SELECT `a;b` FROM t", "SELECT 1 -- ; SELECT 2",
])
def test_single_statement(sql: str) -> None:
    c = classify(sql)
    assert c.statement_count == 1 and c.status == C


def test_statement_count() -> None:
    assert classify("SELECT 1; SELECT 2; SELECT 3;").statement_count == 3
    assert classify("SELECT 1;;").statement_count == 2
    assert classify("SET @a = 1; USE db").uses_database_change


# Text the lexer refuses: parseerror, unknown kind, write_all.
@pytest.mark.parametrize("sql", [
    "SELECT 'unterminated",
    "SELECT `unterminated",
    "SELECT 1 /* unterminated",
    "SELECT /*! RAND() ",  # unterminated executable comment
    "SELECT /*! 1 /* nested */ */",
    "SELECT /*!50700 ' */ NOW() ' */",  # the string would hide NOW() on an older server
    "SELECT 1 */",
    "SELECT X'ABC'",  # odd number of hex digits
    "SELECT b'012'",
    "SELECT 1\x00",
    "SELECT \\N",
    "SELECT 1 [x]",
    "SELECT 'O\\'Brien'",  # extent depends on NO_BACKSLASH_ESCAPES
    'SELECT "a\\" FROM t -- "',
    'SELECT * FROM "t"',  # a table only under ANSI_QUOTES
    "'SELECT 1'",
    "(",
    "WITH c AS (SELECT 1)",
])
def test_parseerror(sql: str) -> None:
    c = classify(sql)
    assert (c.status, c.kind, c.statement_count, c.write_all) == ("parseerror", "unknown", -1, True)
    assert not c.cacheable


def test_sql_modes_when_known() -> None:
    # default mode: backslash escapes
    assert _status("SELECT 'O\\'Brien'", no_backslash_escapes=False) == (C, "read")
    # NO_BACKSLASH_ESCAPES: the same bytes are a string then a dangling quote
    assert classify("SELECT 'O\\'Brien'", no_backslash_escapes=True).status == "parseerror"
    assert _status("SELECT 'a\\' , NOW() -- '", no_backslash_escapes=True) == ("volatile", "now")
    assert _status("SELECT 'a\\' , NOW() -- '", no_backslash_escapes=False) == (C, "read")
    # ANSI_QUOTES: "t" is a table name
    c = classify('SELECT * FROM "t"', ansi_quotes=True, no_backslash_escapes=False)
    assert c.status == C and c.read_tables == {"t"}
    assert classify('SELECT "f"(1)', ansi_quotes=True).status == "volatile"
    assert classify('SELECT * FROM "t"', ansi_quotes=False).status == "parseerror"
    assert _status('SELECT "x"', ansi_quotes=False, no_backslash_escapes=False) == (C, "read")


@pytest.mark.parametrize(("sql", "kind"), [
    ("SELECT 1", "select"), ("WITH c AS (SELECT 1) SELECT * FROM c", "select"),
    ("WITH c AS (SELECT 1 AS id) UPDATE t JOIN c USING (id) SET t.a = 1", "update"),
    ("WITH c AS (SELECT 1 AS id) DELETE t FROM t JOIN c USING (id)", "delete"),
    ("SHOW DATABASES", "show"), ("INSERT t SET a = 1", "insert"), ("UPDATE t SET a=1", "update"),
    ("DELETE FROM t", "delete"), ("REPLACE t VALUES (1)", "replace"),
    ("LOAD DATA LOCAL INFILE 'f' INTO TABLE t", "insert"), ("ALTER TABLE t ADD c INT", "ddl"),
    ("DROP TABLE IF EXISTS a, b", "ddl"), ("GRANT SELECT ON db.* TO u", "ddl"),
    ("begin work", "transaction"), ("SET autocommit = 0", "set"), ("use `db`", "use"),
    ("call db.p()", "call"), ("HANDLER t OPEN", "other"), ("LOCK TABLES t READ", "other"),
    ("BEGIN NOT ATOMIC SELECT 1; END", "other"), ("KILL 5", "other"), ("PREPARE s FROM 'x'", "other"),
])
def test_kinds(sql: str, kind: str) -> None:
    assert classify(sql).kind == kind


@pytest.mark.parametrize(("sql", "reads", "writes"), [
    ("SELECT * FROM t", {"t"}, set()),
    ("SELECT * FROM db.t AS x JOIN `Other DB`.`T2` y ON x.a = y.a, u LEFT JOIN v USING (id)",
     {"db.t", "other db.t2", "u", "v"}, set()),
    ("SELECT a FROM t WHERE b IN (SELECT b FROM s.u) UNION SELECT a FROM w", {"t", "s.u", "w"}, set()),
    ("SELECT * FROM t STRAIGHT_JOIN u", {"t", "u"}, set()),
    ("SELECT * FROM JSON_TABLE('[]', '$[*]' COLUMNS (a INT PATH '$')) AS j", set(), set()),
    ("SELECT EXTRACT(YEAR FROM d) FROM t", {"t"}, set()),
    ("WITH c AS (SELECT * FROM base) SELECT * FROM c", {"base"}, set()),
    ("INSERT INTO db.t (a, b) VALUES (1, 2)", set(), {"db.t"}),
    ("INSERT IGNORE INTO t SELECT * FROM u", {"u"}, {"t"}),
    ("INSERT INTO t (a) VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a) + 1", set(), {"t"}),
    ("REPLACE LOW_PRIORITY INTO `t` SET a = 1", set(), {"t"}),
    ("UPDATE t SET a = 1 WHERE id = 2", {"t"}, {"t"}),
    ("UPDATE t1 JOIN t2 ON t1.id = t2.id SET t1.a = t2.a", {"t1", "t2"}, {"t1", "t2"}),
    ("UPDATE LOW_PRIORITY t1, db.t2 SET t1.a = 1", {"t1", "db.t2"}, {"t1", "db.t2"}),
    ("UPDATE t SET a = (SELECT MAX(b) FROM u)", {"t", "u"}, {"t", "u"}),
    ("DELETE FROM t WHERE id = 1", {"t"}, {"t"}),
    ("DELETE t1, t2 FROM t1 INNER JOIN t2 ON t1.id = t2.id", {"t1", "t2"}, {"t1", "t2"}),
    ("DELETE FROM t1.*, t2 USING t1 JOIN t3", {"t1", "t2", "t3"}, {"t1", "t2", "t3"}),
    ("LOAD DATA INFILE '/f' REPLACE INTO TABLE db.t", set(), {"db.t"}),
    ("LOAD XML LOCAL INFILE '/f' INTO TABLE t ROWS IDENTIFIED BY '<r>'", set(), {"t"}),
    ("TRUNCATE TABLE db.t", set(), {"db.t"}),
    ("DROP TABLE IF EXISTS a, b", set(), {"a", "b"}),
    ("CREATE INDEX i ON t (a)", set(), {"t"}),
    # parenthesized joins and derived tables
    ("SELECT * FROM t1 CROSS JOIN (t2, t3)", {"t1", "t2", "t3"}, set()),
    ("SELECT * FROM (t1 JOIN t2 ON (t1.a = t2.a)), (SELECT 1 FROM t4) x, (TABLE t5) y",
     {"t1", "t2", "t4", "t5"}, set()),
    ("SELECT * FROM t1 JOIN t2 ON (t1.a = t2.a) WHERE (x)", {"t1", "t2"}, set()),
    # CTE scope: inside its own (non-recursive) definition the name is the base table
    ("WITH t AS (SELECT * FROM t) SELECT * FROM t", {"t"}, set()),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a JOIN b) SELECT * FROM b", {"b"}, set()),
    ("WITH RECURSIVE c (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT * FROM c", set(), set()),
    ("SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t) a JOIN t", {"t"}, set()),
])
def test_tables(sql: str, reads: set[str], writes: set[str]) -> None:
    c = classify(sql)
    assert c.status != "parseerror", c.reason
    assert c.read_tables == reads
    assert c.write_tables == writes


def test_write_all() -> None:
    assert classify("CREATE TABLE t (a INT)").write_all
    assert classify("CALL p()").write_all
    assert classify("FLUSH TABLES").write_all
    assert classify("SELECT my_func(1)").write_all  # a stored function may write
    assert classify("UPDATE t SET a = my_func(1)").write_all
    assert classify("LOAD DATA INFILE 'f' INTO t").write_all  # target not found
    assert not classify("SELECT 1").write_all
    assert not classify("INSERT INTO t VALUES (NOW())").write_all
    assert not classify("BEGIN").write_all
    assert not classify("SET NAMES utf8mb4").write_all


def test_use_and_transaction_hints() -> None:
    c = classify("USE `shop`")
    assert c.uses_database_change and c.database == "shop" and c.status == "notaquery"
    assert not classify("SELECT 'USE x'").uses_database_change
    assert classify("START TRANSACTION").transaction == "begin"
    assert classify("BEGIN").transaction == "begin"
    assert classify("COMMIT WORK").transaction == "commit"
    assert classify("ROLLBACK").transaction == "rollback"
    assert classify("ROLLBACK TO SAVEPOINT s").transaction == "rollback_to_savepoint"
    assert classify("XA COMMIT 'x'").transaction == "xa"
    # unlexable text that may be a USE is flagged too (fail closed)
    assert classify('USE "db"').uses_database_change
    assert classify("/*!USE db /* x */ */").uses_database_change
    assert not classify("SELECT 'x").uses_database_change
    assert not classify("SELECT `user` FROM t").uses_database_change


def test_functions_reported() -> None:
    c = classify("SELECT CONCAT(a, UPPER(b)), NOW(), CURRENT_DATE, myf(1) FROM t")
    assert c.functions == {"concat", "upper", "now", "current_date", "myf"}
    assert c.unknown_functions == {"myf"}
    assert c.status == "volatile"


def test_normalized_keeps_constants_and_adjacency() -> None:
    a = classify("SELECT  a ,b\n FROM t /* x */ WHERE id = 5 ;")
    assert a.normalized == "SELECT a ,b FROM t WHERE id = 5"
    assert classify("SELECT a FROM t WHERE id = 6").normalized != classify(
        "SELECT a FROM t WHERE id = 5").normalized
    # whitespace between a name and "(" is significant in MySQL: keep it
    assert classify("SELECT COUNT (*) FROM t").normalized != classify("SELECT COUNT(*) FROM t").normalized
    assert classify("SELECT 'a  b'").normalized == "SELECT 'a  b'"
    assert classify("SELECT /*!50700 1 */").normalized == "SELECT /*!50700 1 */"
    assert classify("SELECT 'x").normalized is None


_SQL_WORDS = st.sampled_from([
    "SELECT", "FROM", "t", "db.t", "WHERE", "NOW()", "RAND()", "(", ")", ",", ";", "'", '"', "`",
    "/*", "*/", "/*!", "--", "-- ", "#", "\n", "@x", "@@y", "?", "INSERT", "UPDATE", "INTO", "FOR",
    "SET", "USE", "BEGIN", "1", "0x1F", "X'", "\\", "CURRENT_TIMESTAMP", "WITH", "AS", "JOIN", " ",
    "f(", "`a`", "'s'", "UNION", "TABLE", "VALUES", "DELETE", "LOCK", "IN", "SHARE", "MODE",
])


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_random_text_never_raises(sql: str) -> None:
    c = classify(sql)
    if c.cacheable:
        assert c.kind == "select" and c.statement_count == 1
    if c.status == "parseerror":
        assert c.write_all


@settings(max_examples=600, deadline=None)
@given(st.lists(_SQL_WORDS, max_size=25), st.sampled_from(["", " ", "\n"]))
def test_fuzz_sqlish_cacheable_only_for_selects(words: list[str], sep: str) -> None:
    sql = sep.join(words)
    for mode in (None, True, False):
        c = classify(sql, no_backslash_escapes=mode, ansi_quotes=mode)
        if c.cacheable:
            assert c.kind == "select" and c.statement_count == 1
            assert not c.unknown_functions and not c.write_all
            # the normalized text (the cache key candidate) classifies the same way
            again = classify(c.normalized or "", no_backslash_escapes=mode, ansi_quotes=mode)
            assert (again.status, again.read_tables) == (c.status, c.read_tables)


def test_speed() -> None:
    queries = [
        "SELECT id, name, email FROM users WHERE id = 42",
        "SELECT o.id, SUM(i.price * i.qty) FROM orders o JOIN items i ON i.order_id = o.id "
        "WHERE o.customer_id = 7 AND o.created_at > '2024-01-01' GROUP BY o.id ORDER BY 2 DESC LIMIT 20",
        "INSERT INTO events (kind, payload) VALUES ('click', '{\"x\": 1}')",
        "SELECT NOW()",
    ]
    n = 300
    # CPU time of this thread, not wall-clock time: a busy machine preempting us does not count
    t0 = time.thread_time()
    for _ in range(n):
        for q in queries:
            classify(q)
    per = (time.thread_time() - t0) / (n * len(queries)) * 1e6
    assert per < 500, f"{per:.1f} µs per classify()"
