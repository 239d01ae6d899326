"""The MySQL session model's sans-I/O parts: what a statement does to a session
(proxy/mysql/state.py, through the classifier), the carried settings and their prelude, compound
statements, and `Exchange` following pipelined replies (proxy/mysql/exchange.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mysql import protocol as P
from proxy.mysql import state as S
from proxy.mysql.classify import classify
from proxy.mysql.exchange import CLIENT, Exchange, Step, com_query


def effect(sql: str) -> S.Effect:
    return classify(sql).session


# ------------------------------------------------------------------------------ effects

@pytest.mark.parametrize(("sql", "items"), [
    ("SET NAMES utf8mb4", (("names", "NAMES utf8mb4"),)),
    ("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_bin'", (("names", "NAMES utf8mb4 COLLATE utf8mb4_bin"),)),
    ("SET CHARACTER SET utf8mb4", (("names", "CHARACTER SET utf8mb4"),)),
    ("SET SESSION sql_mode = 'ANSI_QUOTES'", (("sql_mode", "@@SESSION.sql_mode = 'ANSI_QUOTES'"),)),
    ('SET @@session.time_zone = "+00:00"', (("time_zone", "@@SESSION.time_zone = '+00:00'"),)),
    ("SET @@LOCAL.wait_timeout = 100, max_join_size = -1",
     (("wait_timeout", "@@SESSION.wait_timeout = 100"), ("max_join_size", "@@SESSION.max_join_size = -1"))),
    ("SET sql_mode = DEFAULT", (("sql_mode", None),)),
    ("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY",
     (("transaction_isolation", "@@SESSION.transaction_isolation = 'READ-COMMITTED'"),
      ("transaction_read_only", "@@SESSION.transaction_read_only = 1"))),
    ("SET character_set_results = utf8mb4", (("character_set_results", "@@SESSION.character_set_results = UTF8MB4"),)),
    ("SET GLOBAL max_connections = 10, SESSION time_zone = 'UTC'", (("time_zone", "@@SESSION.time_zone = 'UTC'"),)),
])
def test_constant_session_sets_are_carried(sql: str, items: tuple) -> None:
    e = effect(sql)
    assert (e.action, e.items) == (S.CARRY, items)


@pytest.mark.parametrize(("sql", "value", "local"), [
    ("SET autocommit = 0", False, True), ("SET AUTOCOMMIT = 1", True, True), ("SET autocommit=OFF", False, True),
    ("SET @@session.autocommit = ON", True, True), ("SET NAMES utf8mb4, autocommit = 0", False, True),
    ("SET autocommit = 0, sql_mode = ''", False, False), ("SET NAMES utf8mb3", None, False),
])
def test_autocommit_and_what_the_proxy_may_answer_itself(sql: str, value: bool | None, local: bool) -> None:
    e = effect(sql)
    assert e.autocommit is value and e.local is local


@pytest.mark.parametrize(("sql", "reason"), [
    ("SET @x = 5", "a user variable"), ("SET @x := 5, sql_mode = ''", "a user variable"),
    ("SELECT @x := 1", "a user variable"), ("SELECT 1 INTO @a", "a user variable"),
    ("SELECT a, b INTO @a, @b FROM t", "a user variable"), ("DO @x := 2", "a user variable"),
    ("GET DIAGNOSTICS @n = NUMBER", "a user variable"),
    ("SET sql_mode = CONCAT(@@sql_mode, ',ANSI')", "SET sql_mode to a computed value"),
    ("SET time_zone = 'it''s'", None),
    ("SET insert_id = 5", "SET insert_id"), ("SET @@identity = 5", "SET identity"),
    ("CREATE TEMPORARY TABLE t (i INT)", "a temporary table"),
    ("CREATE OR REPLACE TEMPORARY TABLE t (i INT)", "a temporary table"),
    ("CALL p(@out)", "CALL (a procedure may keep session state)"),
    ("PREPARE s FROM 'SELECT 1'", "a prepared SQL statement"), ("EXECUTE s", "a prepared SQL statement"),
    ("SELECT GET_LOCK('a', 0)", "a user lock (GET_LOCK)"), ("LOCK TABLES t READ", "LOCK TABLES"),
    ("HANDLER t OPEN", "HANDLER"), ("XA START 'x'", "an XA transaction"),
    ("FLUSH TABLES WITH READ LOCK", "FLUSH TABLES ... WITH READ LOCK"), ("SET ROLE r", "SET ROLE"),
    ("BEGIN NOT ATOMIC SELECT 1; END", "a compound statement"),
    ('SELECT "a\\"b"', "a statement the proxy could not read"),
])
def test_state_that_cannot_be_replayed_pins(sql: str, reason: str | None) -> None:
    e = effect(sql)
    if reason is None:
        assert e.action == S.CARRY  # a doubled quote is a constant too
    else:
        assert (e.action, e.reason) == (S.PIN, reason)


@pytest.mark.parametrize("sql", [
    "SET NAMES latin1", "SET NAMES DEFAULT", "SET CHARACTER SET cp1251", "SET character_set_results = NULL",
    "SET character_set_client = 'latin1'", "SET collation_connection = latin1_swedish_ci",
    "SET NAMES utf8mb4 COLLATE latin1_bin", "KILL USER app", "KILL QUERY ID 5", "KILL CONNECTION_ID()",
])
def test_refused(sql: str) -> None:
    assert effect(sql).action == S.REFUSE


@pytest.mark.parametrize(("sql", "kill"), [
    ("KILL 7", (False, 7)), ("KILL QUERY 5", (True, 5)), ("KILL CONNECTION 9", (False, 9)),
    ("KILL HARD QUERY 3", (True, 3)), ("kill query 12;", (True, 12)),
])
def test_kill(sql: str, kill: tuple) -> None:
    e = effect(sql)
    assert (e.action, e.kill) == (S.KILL, kill)


@pytest.mark.parametrize(("sql", "flags"), [
    ("SELECT LAST_INSERT_ID()", {"reads_lid"}), ("SELECT @@identity", {"reads_lid"}),
    ("INSERT INTO t VALUES (1)", {"changes_lid", "uses_tables", "opens_tx"}),
    ("UPDATE t SET id = LAST_INSERT_ID(id + 1)", {"reads_lid", "changes_lid", "uses_tables", "opens_tx"}),
    ("SELECT ROW_COUNT()", {"reads_last"}), ("SELECT FOUND_ROWS()", {"reads_last"}),
    ("SELECT PREVIOUS VALUE FOR s", {"reads_last"}),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1", {"calc_found_rows", "uses_tables", "opens_tx"}),
    ("SHOW WARNINGS", {"reads_diag"}), ("SHOW COUNT(*) ERRORS", {"reads_diag"}),
    ("SELECT @@session.warning_count", {"reads_diag"}), ("SHOW TABLES", set()), ("SELECT 1", set()),
    ("SELECT * FROM t", {"uses_tables", "opens_tx"}), ("COMMIT", {"ends_tx"}), ("ROLLBACK", {"ends_tx"}),
    ("ROLLBACK TO SAVEPOINT a", set()), ("BEGIN", set()),
    ("CREATE TABLE t (i INT)", {"opens_tx"}),
])
def test_what_a_statement_reads_and_changes(sql: str, flags: set) -> None:
    e = effect(sql)
    names = ("reads_lid", "changes_lid", "reads_last", "reads_diag", "calc_found_rows", "uses_tables",
             "ends_tx", "opens_tx")
    assert {n for n in names if getattr(e, n)} == flags
    assert e.action == S.NONE


def test_stored_functions_dirty_the_connection() -> None:
    e = effect("SELECT my_func(1) FROM t")
    assert e.action == S.DIRTY and "my_func" in e.reason


def test_set_transaction_holds_for_the_next_transaction() -> None:
    assert effect("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").action == S.NEXT_TX
    assert effect("SET GLOBAL TRANSACTION ISOLATION LEVEL SERIALIZABLE").action == S.NONE


# ------------------------------------------------------------------------------ carried settings

def test_names_overwrite_the_character_set_group_and_stay_first() -> None:
    c = S.Carried("NAMES utf8mb4 COLLATE utf8mb4_general_ci")
    c.apply([("sql_mode", "@@SESSION.sql_mode = ''"), ("character_set_results", "@@SESSION.character_set_results = UTF8MB3")])
    c.apply([("names", "NAMES utf8mb4 COLLATE utf8mb4_bin")])
    assert list(c.items) == ["names", "sql_mode"]
    c.apply([("collation_connection", "@@SESSION.collation_connection = UTF8MB4_UNICODE_CI"), ("sql_mode", None)])
    assert list(c.items) == ["names", "collation_connection"]


def test_the_prelude_is_the_difference() -> None:
    names = "NAMES utf8mb4 COLLATE utf8mb4_general_ci"
    client = {"names": names, "time_zone": "@@SESSION.time_zone = '+01:00'"}
    assert S.prelude(client, True, dict(client), True) is None
    assert S.prelude(client, False, dict(client), True) == "SET autocommit = 0"
    assert S.prelude(client, True, {"names": names}, True) == "SET @@SESSION.time_zone = '+01:00'"
    assert S.prelude({"names": names}, True, client, True) == "SET @@SESSION.time_zone = DEFAULT"
    other = {"names": "NAMES utf8mb4 COLLATE utf8mb4_bin", "character_set_results": "@@SESSION.character_set_results = UTF8MB3"}
    assert S.prelude(other, True, {"names": names}, False, lid=7) == (
        "SET NAMES utf8mb4 COLLATE utf8mb4_bin, @@SESSION.character_set_results = UTF8MB3, autocommit = 1, "
        "@@SESSION.last_insert_id = 7")
    assert S.prelude({"names": names}, True, {"names": names, "character_set_results": "x"}, True) == "SET " + names
    assert S.prelude(client, True, None, True) == f"SET {names}, @@SESSION.time_zone = '+01:00'"


def test_transaction_characteristics_for_mariadb() -> None:
    items = effect("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").items
    assert S.for_flavor(items, True) == (("tx_isolation", "@@SESSION.tx_isolation = 'READ-COMMITTED'"),)
    assert S.for_flavor(items, False) == items


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    ("names", "NAMES utf8mb4"), ("names", "NAMES utf8mb4 COLLATE utf8mb4_bin"), ("sql_mode", "@@SESSION.sql_mode = ''"),
    ("sql_mode", None), ("time_zone", "@@SESSION.time_zone = 'UTC'"), ("time_zone", None),
    ("character_set_results", "@@SESSION.character_set_results = UTF8MB3"),
    ("collation_connection", "@@SESSION.collation_connection = UTF8MB4_BIN")]), max_size=8),
    st.lists(st.sampled_from([("sql_mode", "@@SESSION.sql_mode = 'ANSI'"), ("time_zone", "@@SESSION.time_zone = '+02:00'"),
                              ("names", "NAMES utf8mb4 COLLATE utf8mb4_unicode_ci")]), max_size=3))
def test_after_the_prelude_the_connection_has_the_clients_settings(client_sets: list, server_sets: list) -> None:
    """Model: applying the prelude's items to what the connection had gives the client's settings
    (a SET item overwrites its key; DEFAULT removes it; NAMES resets the character-set group)."""
    client, server = S.Carried("NAMES utf8mb4"), S.Carried("NAMES utf8mb4")
    client.apply(client_sets)
    server.apply(server_sets)
    pre = S.prelude(client.items, True, dict(server.items), True)
    if pre is None:
        assert client.items == server.items
        return
    after = S.Carried("NAMES utf8mb4")
    after.items = dict(server.items)
    for part in pre[4:].split(", "):
        if part.startswith(("NAMES", "CHARACTER SET")):
            after.apply([("names", part)])
        else:
            key, _, value = part.removeprefix("@@SESSION.").partition(" = ")
            after.apply([(key, None if value == "DEFAULT" else part)])
    assert after.items == client.items


# ------------------------------------------------------------------------------ compound statements

@pytest.mark.parametrize("sql", [
    "CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END",
    "CREATE DEFINER=`root`@`localhost` PROCEDURE p(IN a INT) BEGIN DECLARE x INT DEFAULT 0; IF a > 0 THEN "
    "SET x = IF(a > 1, 2, 3); ELSE SELECT CASE WHEN a THEN 1 ELSE 2 END; END IF; WHILE x < 3 DO SET x = x + 1; "
    "END WHILE; END",
    "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW BEGIN SET NEW.a = 1; SET NEW.b = 2; END",
    "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW IF NEW.a IS NULL THEN SET NEW.a = 1; END IF",
    "CREATE FUNCTION f(x INT) RETURNS INT DETERMINISTIC BEGIN DECLARE y INT; SET y = x * 2; RETURN y; END",
    "CREATE EVENT e ON SCHEDULE EVERY 1 HOUR DO BEGIN DELETE FROM t; INSERT INTO t VALUES (1); END",
    "CREATE PROCEDURE p() BEGIN DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; END; "
    "REPEAT SET @a = REPEAT('x', 2); UNTIL 1 END REPEAT; lbl: LOOP LEAVE lbl; END LOOP lbl; END",
    "BEGIN NOT ATOMIC DECLARE x INT; SET x = 1; SELECT x; END",
    "lbl: BEGIN NOT ATOMIC SELECT 1; END",
    "IF 1 THEN SELECT 1; ELSE SELECT 2; END IF",
    "BEGIN NOT ATOMIC FOR i IN 1..3 DO SELECT i; END FOR; END",
    "CASE WHEN 1 THEN SELECT 1; ELSE SELECT 2; END CASE",
])
def test_a_compound_statement_is_one_statement(sql: str) -> None:
    c = classify(sql)
    assert c.statement_count == 1 and not c.cacheable and c.write_all, c


@pytest.mark.parametrize(("sql", "count"), [
    ("CREATE PROCEDURE p() SELECT 1; SELECT 2", 2),  # no block: the body is one statement
    ("SELECT CASE WHEN 1 THEN 2 END; SELECT 3", 2),
    ("BEGIN; SELECT 1", 2),
    ("CREATE TABLE t (i INT); SELECT 1", 2),
    ("BEGIN NOT ATOMIC SELECT 1;", -1),  # never closed: fail closed
    ("CREATE PROCEDURE p() BEGIN END END", -1),
])
def test_statements_around_compound_ones(sql: str, count: int) -> None:
    assert classify(sql).statement_count == count


# ------------------------------------------------------------------------------ exchange

CAPS = int(P.Capability.CLIENT_PROTOCOL_41 | P.Capability.CLIENT_TRANSACTIONS)


def ok(seq: int, status: int = 2, warnings: int = 0, insert_id: int = 0) -> bytes:
    return P.frame(P.OkPacket(0, insert_id, status, warnings).build(CAPS), seq)


def result(rows: list[list[bytes]], status: int = 2, warnings: int = 0) -> bytes:
    col = P.ColumnDefinition(name="c", type=P.ColumnType.VAR_STRING)
    return P.text_result_set([col], rows, capabilities=CAPS, status=status, warnings=warnings)


def test_exchange_forwards_only_the_clients_reply() -> None:
    ex = Exchange(CAPS, 2)
    wire = ex.start([Step(com_query("SET autocommit = 0")), Step(b"\x03SELECT 1", 0, CLIENT),
                     Step(com_query("SELECT LAST_INSERT_ID()"), keep=True)])
    assert wire.count(b"\x00\x00\x00") >= 3 and wire.startswith(P.frame(com_query("SET autocommit = 0"), 0))
    client = result([[b"1"]], status=0, warnings=1)
    replies = ok(1, status=0) + client + result([[b"42"]], status=0)
    out, done = b"", []
    for i in range(0, len(replies), 3):  # in small pieces
        o, d = ex.feed(replies[i:i + 3])
        out += o
        done += d
    assert out == client
    assert [s.role for s in done] == [0, CLIENT, 0]
    assert done[1].warnings == 1 and done[1].status == 0
    assert done[2].results[0].rows == [[b"42"]]
    assert ex.done


def test_exchange_reports_errors_of_each_step() -> None:
    ex = Exchange(CAPS, 2)
    ex.start([Step(com_query("SET x = 1")), Step(b"\x03SELECT 1", 0, CLIENT)])
    err = P.frame(P.ErrPacket.for_code(1193, "Unknown system variable 'x'").build(CAPS), 1)
    out, done = ex.feed(err + ok(1))
    assert out == ok(1) and done[0].error is not None and done[0].error.code == 1193 and done[1].error is None


# ------------------------------------------------------------------------------ facts

class _Origin:
    def __init__(self, version: str, mariadb: bool = True, status: int = 2, charset: int = 45) -> None:
        self.server_version, self.is_mariadb, self.status, self.charset = version, mariadb, status, charset


class _Pool:
    pass


def test_the_greeting_shows_the_origins_version_and_the_lowest_when_they_differ() -> None:
    from proxy.mysql import facts as F

    a, b = _Pool(), _Pool()
    F.facts_for(a).learn_connection(_Origin("5.5.5-10.11.19-MariaDB-0+deb12u1"))
    assert F.greeting_version() == "5.5.5-10.11.19-MariaDB-0+deb12u1"
    F.facts_for(b).learn_connection(_Origin("5.5.5-10.6.2-MariaDB", status=0))
    assert F.greeting_version() == "5.5.5-10.6.2-MariaDB"
    assert F.facts_for(b).default_autocommit is False
    del b
    import gc
    gc.collect()
    assert F.greeting_version() == "5.5.5-10.11.19-MariaDB-0+deb12u1"


def test_names_of_a_login_collation() -> None:
    from proxy.mysql.facts import OriginFacts

    f = OriginFacts()
    assert f.names_for(224) == "NAMES utf8mb4 COLLATE utf8mb4_general_ci"  # not known yet: the pool's
    f.collations = {45: ("utf8mb4", "utf8mb4_general_ci"), 224: ("utf8mb4", "utf8mb4_unicode_ci")}
    f.default_collations = {"utf8mb4": "utf8mb4_general_ci"}
    assert f.names_for(224) == "NAMES utf8mb4 COLLATE utf8mb4_unicode_ci"
    assert f.names_for(255) == "NAMES utf8mb4 COLLATE utf8mb4_general_ci"  # unknown to this origin
    assert f.canonical((("names", "NAMES utf8mb4"),)) == (("names", "NAMES utf8mb4 COLLATE utf8mb4_general_ci"),)
