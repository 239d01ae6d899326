"""Transaction-pooling semantics through the real proxy: session state never leaks between
clients, pipelining, notices, and the clear refusals of what pooling cannot offer."""

from __future__ import annotations

import psycopg
import pytest

from tests.harness.edge import EdgeProc
from tests.harness.pg import PgCluster


@pytest.fixture(scope="module")
def stack():
    pg = PgCluster(auth="scram-sha-256", tls=True).start()
    edge = EdgeProc().start()
    try:
        pg.create_user("app", "app-pw")
        pg.create_database("app", "app")
        cfg = edge.hd("hyperdrive", "create", "sem", "--origin-host", "127.0.0.1", "--origin-port", str(pg.port),
                      "--database", "app", "--origin-user", "app", "--origin-password", "app-pw",
                      "--origin-connection-limit", "5")
        yield pg, edge, cfg["connection_string"]
    finally:
        edge.stop()
        edge.cleanup()
        pg.stop()


def backend(conn: psycopg.Connection) -> int:
    return conn.execute("select pg_backend_pid()").fetchone()[0]


def test_set_is_carried_for_its_client_and_never_reaches_the_next(stack):
    pg, edge, url = stack
    with psycopg.connect(url) as a:
        with a.transaction():
            a.execute("set search_path = leaked, public")
            a.execute("set statement_timeout = 1234")
            pid = backend(a)
            assert a.execute("show search_path").fetchone()[0] == "leaked, public"  # within the transaction
        # A session-level SET lasts for the client's session, as on a direct connection: the
        # proxy carries it to whichever server runs the client's next transaction.
        assert a.execute("show search_path").fetchone()[0] == "leaked, public"
        assert a.execute("show statement_timeout").fetchone()[0] == "1234ms"
        a.commit()
        # Five clients at once, each inside a transaction: the pool (limit 5) must hand out every
        # server it has, including the one that ran the SETs.
        clients = [psycopg.connect(url) for _ in range(5)]
        try:
            seen = set()
            for b in clients:
                seen.add(backend(b))  # opens a transaction: the server stays with b
                assert b.execute("show search_path").fetchone()[0] == '"$user", public'
                assert b.execute("show statement_timeout").fetchone()[0] == "0"  # the server's, not the proxy's
        finally:
            for b in clients:
                b.close()
        assert pid in seen, "the SET connection was not handed out again: the check proved nothing"
        assert a.execute("show search_path").fetchone()[0] == "leaked, public"  # still a's


def test_startup_settings_follow_each_client(stack):
    pg, edge, url = stack
    with psycopg.connect(url, options="-c search_path=tenant_a,public", application_name="client-a") as a, \
            psycopg.connect(url) as b:
        for _ in range(10):
            assert a.execute("show search_path").fetchone()[0] == "tenant_a,public"  # as PostgreSQL shows it
            assert a.execute("show application_name").fetchone()[0] == "client-a"
            assert b.execute("show search_path").fetchone()[0] == '"$user", public'
    # Any encoding the origin accepts is carried like any setting: text arrives intact both ways.
    with psycopg.connect(url, client_encoding="LATIN1") as latin:
        assert latin.info.parameter_status("client_encoding") == "LATIN1"
        assert latin.execute("select 'Grüße'::text, current_setting('client_encoding')").fetchone() == (
            "Grüße", "LATIN1")
        assert latin.execute("select length('Grüße')").fetchone()[0] == 5
    # A setting the origin refuses fails the login with the origin's own error, as direct.
    with pytest.raises(psycopg.OperationalError, match='FATAL:  invalid value for parameter "statement_timeout"'):
        psycopg.connect(url, options="-c statement_timeout=soon")
    with pytest.raises(psycopg.OperationalError, match="invalid value for parameter"):
        psycopg.connect(url, client_encoding="NOT-AN-ENCODING")


def test_pipelined_queries_and_prepared_statements(stack):
    pg, edge, url = stack
    with psycopg.connect(url, prepare_threshold=0) as conn:
        conn.execute("create table if not exists pipe (i int)")
        conn.commit()
        with conn.pipeline():
            curs = [conn.execute("insert into pipe values (%s) returning i", (i,)) for i in range(50)]
            conn.execute("select count(*) from pipe")
        assert [c.fetchone()[0] for c in curs] == list(range(50))
        conn.commit()
        assert conn.execute("select count(*) from pipe where i < 50").fetchone()[0] >= 50


def test_notices_pass_through(stack):
    pg, edge, url = stack
    got: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: got.append(f"{diag.severity}:{diag.message_primary}"))
        conn.execute("do $$ begin raise notice 'hello from the origin'; raise warning 'careful'; end $$")
    assert got == ["NOTICE:hello from the origin", "WARNING:careful"]


@pytest.mark.parametrize("sql, text", [
    ("listen events", "LISTEN is not supported in transaction pooling mode"),
    ("prepare p as select 1", "SQL-level PREPARE/EXECUTE is not supported"),
    ("select pg_advisory_lock(42)", "session-level advisory locks are not supported"),
])
def test_session_features_fail_clearly(stack, sql, text):
    pg, edge, url = stack
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match=text):
            conn.execute(sql)
        assert conn.execute("select 1").fetchone() == (1,)  # the connection stays usable
        # the transaction-scoped alternatives work
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(42)")
