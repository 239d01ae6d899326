"""MySQL origin connections (proxy/mysql/origin.py) against a real throwaway MariaDB.

One TLS-capable server serves most cases (plaintext with sslmode=disable on loopback, TLS with
require / verify-ca / verify-full); an ssl_only server shows a TLS-only origin.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.errors import (
    CANNOT_CONNECT,
    CONNECTION_REFUSED,
    DATABASE_NOT_FOUND,
    GENERIC,
    INVALID_CREDENTIALS,
    TEST_QUERY_FAILED,
    OriginError,
)
from proxy.mysql import protocol as P
from proxy.mysql.origin import (
    DirectDialer,
    MySQLServerError,
    OriginSpec,
    connect_mysql_origin,
    probe_mysql,
)
from tests.harness.mariadb import MariaDbServer

pytestmark = pytest.mark.timeout(180)

PW = "mysql-origin-Secret-1"
IN_TRANS = P.ServerStatus.SERVER_STATUS_IN_TRANS


@pytest.fixture(scope="module")
def db():
    server = MariaDbServer(tls=True).start()
    try:
        server.create_user("app", PW)
        server.create_database("app", owner="app")
        server.create_user("tlsuser", PW, require="SSL")
        server.create_database("tlsdb", owner="tlsuser")
        yield server
    finally:
        server.stop()


def spec_for(server: MariaDbServer, **kw) -> OriginSpec:
    args = dict(host="127.0.0.1", port=server.port, database="app", user="app", password=PW,
                sslmode="disable", connect_timeout=10.0)
    args.update(kw)
    return OriginSpec(**args)


def ca_of(server: MariaDbServer) -> bytes:
    return server.ca_cert_path.read_bytes()


async def test_direct_native_password_queries(db):
    conn = await connect_mysql_origin(spec_for(db), DirectDialer())
    try:
        assert conn.auth == "mysql_native_password"
        assert conn.tls is False
        assert "MariaDB" in conn.server_version and conn.is_mariadb
        assert conn.connection_id > 0
        assert conn.capabilities & P.Capability.CLIENT_PROTOCOL_41
        assert not conn.capabilities & P.Capability.CLIENT_MULTI_STATEMENTS
        assert not conn.capabilities & P.Capability.CLIENT_LOCAL_FILES
        assert conn.capabilities & P.Capability.CLIENT_MULTI_RESULTS
        assert conn.pending == b""
        r = await conn.query("SELECT 1 AS one, NULL AS n, 'héllo' AS s")
        assert [c.name for c in r.columns] == ["one", "n", "s"]
        assert r.rows == [[b"1", None, "héllo".encode()]]
        assert await conn.scalar("SELECT DATABASE()") == "app"
        assert await conn.scalar("SELECT CONNECTION_ID()") == str(conn.connection_id)
        assert await conn.scalar("SELECT @@character_set_client") == "utf8mb4"
        await conn.ping()
        ok = await conn.query("CREATE TABLE t_direct (id INT PRIMARY KEY AUTO_INCREMENT, v TEXT)")
        assert ok.columns == []
        ok = await conn.query("INSERT INTO t_direct (v) VALUES ('a'), ('b')")
        assert ok.affected_rows == 2 and ok.last_insert_id == 1
        r = await conn.query("SELECT v FROM t_direct ORDER BY id")
        assert r.rows == [[b"a"], [b"b"]]
        # a stored procedure: several results in one reply (needs CLIENT_MULTI_RESULTS)
        await conn.query("CREATE PROCEDURE p2() BEGIN SELECT 1; SELECT 2; END")
        results = await conn.query_all("CALL p2()")
        assert [r.rows for r in results if r.columns] == [[[b"1"]], [[b"2"]]]
        await conn.query("DROP TABLE t_direct")
        await conn.query("DROP PROCEDURE p2")
    finally:
        conn.close()


async def test_server_error_is_clear_and_connection_stays_usable(db):
    conn = await connect_mysql_origin(spec_for(db), DirectDialer())
    try:
        with pytest.raises(MySQLServerError) as ei:
            await conn.query("SELECT * FROM no_such_table")
        assert ei.value.code == 1146 and ei.value.sqlstate == "42S02"
        assert "no_such_table" in str(ei.value)
        with pytest.raises(MySQLServerError) as ei:
            await conn.query("SELEC 1")
        assert ei.value.code == 1064
        assert await conn.scalar("SELECT 2") == "2"
    finally:
        conn.close()


async def test_transaction_status_is_tracked(db):
    conn = await connect_mysql_origin(spec_for(db), DirectDialer())
    try:
        await conn.query("CREATE TABLE t_tx (id INT PRIMARY KEY) ENGINE=InnoDB")
        assert not conn.in_transaction
        await conn.query("BEGIN")
        assert conn.in_transaction and conn.status & IN_TRANS
        await conn.query("INSERT INTO t_tx VALUES (1)")
        assert conn.in_transaction
        with pytest.raises(MySQLServerError):  # an error inside the transaction keeps it open
            await conn.query("INSERT INTO t_tx VALUES (1)")
        assert conn.in_transaction
        await conn.query("ROLLBACK")
        assert not conn.in_transaction
        assert await conn.scalar("SELECT COUNT(*) FROM t_tx") == "0"
        await conn.query("START TRANSACTION")
        await conn.query("INSERT INTO t_tx VALUES (2)")
        assert conn.in_transaction
        await conn.query("COMMIT")
        assert not conn.in_transaction
        assert await conn.scalar("SELECT COUNT(*) FROM t_tx") == "1"
        await conn.query("DROP TABLE t_tx")
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["reset", "change_user"])
async def test_reset_clears_session_state(db, how):
    conn = await connect_mysql_origin(spec_for(db), DirectDialer())
    try:
        await conn.query("SET @x = 42")
        await conn.query("CREATE TEMPORARY TABLE tmp_reset (a INT)")
        await conn.query("BEGIN")
        await conn.query("INSERT INTO tmp_reset VALUES (1)")
        assert conn.in_transaction
        assert await conn.scalar("SELECT @x") == "42"
        if how == "reset":
            assert await conn.reset() == "reset_connection"
        else:
            await conn.change_user()
        assert not conn.in_transaction
        assert await conn.scalar("SELECT @x") is None
        with pytest.raises(MySQLServerError) as ei:
            await conn.query("SELECT * FROM tmp_reset")
        assert ei.value.code == 1146
        assert await conn.scalar("SELECT DATABASE()") == "app"
        await conn.ping()
    finally:
        conn.close()


async def test_raw_mode_forwarding(db):
    """What the pool does: write framed packets, read the reply with a ResultSetReader."""
    conn = await connect_mysql_origin(spec_for(db), DirectDialer())
    try:
        reader = conn.reply_reader(keep=True)
        done = asyncio.get_running_loop().create_future()
        got = bytearray()

        def on_data(data):
            got.extend(reader.feed(data))
            if reader.done and not done.done():
                done.set_result(None)

        conn.set_receiver(on_data, lambda exc: None)
        conn.write(P.frame(P.ComQuery("SELECT 7 UNION ALL SELECT 8").build(), 0))
        await asyncio.wait_for(done, 10)
        assert reader.results[0].rows == [[b"7"], [b"8"]]
        assert got[:4] == bytes([1, 0, 0, 1])  # column count packet, seq 1
        conn.status = int(reader.status)
        conn.set_receiver(None, None)
        assert await conn.scalar("SELECT 9") == "9"  # the helpers work again afterwards
    finally:
        conn.close()


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
async def test_tls_modes(db, sslmode):
    ca = None if sslmode == "require" else ca_of(db)
    spec = spec_for(db, user="tlsuser", database="tlsdb", sslmode=sslmode, ca_pem=ca)
    conn = await connect_mysql_origin(spec, DirectDialer())
    try:
        assert conn.tls is True
        r = await conn.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert r.rows and r.rows[0][1]
        assert await conn.scalar("SELECT CURRENT_USER()") == "tlsuser@%"
    finally:
        conn.close()


async def test_wrong_ca_fails(db):
    from cryptography.hazmat.primitives import serialization

    from tests.harness.pg import _gen_key, _make_cert
    key = _gen_key()
    bad_ca = _make_cert("some-other-ca", key, ca=True).public_bytes(serialization.Encoding.PEM)
    for sslmode in ("verify-ca", "require"):  # require with a CA verifies the chain too
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec_for(db, sslmode=sslmode, ca_pem=bad_ca), DirectDialer())
        assert ei.value.code == GENERIC and "certif" in ei.value.message.lower()
        assert "CA" in ei.value.hint


async def test_verify_full_checks_the_name(db):
    # the server certificate names localhost/127.0.0.1/::1: a DNS-name match through "localhost"
    conn = await connect_mysql_origin(spec_for(db, host="localhost", sslmode="verify-full", ca_pem=ca_of(db)),
                                      DirectDialer())
    conn.close()


async def test_require_ssl_user_over_plaintext_is_refused(db):
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec_for(db, user="tlsuser", database="tlsdb"), DirectDialer())
    assert ei.value.code == INVALID_CREDENTIALS  # MariaDB answers 1045 for REQUIRE SSL without TLS
    assert "Access denied" in ei.value.message and "sslmode" in ei.value.hint


async def test_ssl_only_server(mariadb_factory):
    server = mariadb_factory(ssl_only=True)
    server.create_user("app", PW)
    server.create_database("app", owner="app")
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec_for(server), DirectDialer())
    # MariaDB 10.11 answers 1045 "Access denied" (MySQL: 3159 insecure transport): the hint says TLS
    assert ei.value.code in (INVALID_CREDENTIALS, GENERIC)
    assert ei.value.hint and "TLS" in ei.value.hint and "sslmode" in ei.value.hint
    conn = await connect_mysql_origin(spec_for(server, sslmode="verify-full", ca_pem=ca_of(server)),
                                      DirectDialer())
    try:
        assert conn.tls
        assert await conn.scalar("SELECT 1") == "1"
    finally:
        conn.close()
    info = await probe_mysql(spec_for(server, sslmode="require"), DirectDialer())
    assert info["tls"] is True


async def test_no_tls_server_fails_unless_disabled(mariadb):
    # the session MariaDB has no TLS: sslmode=require must fail with 2012
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(OriginSpec(host="127.0.0.1", port=mariadb.port, database="app", user="app",
                                              password=mariadb.passwords["app"], connect_timeout=10),
                                   DirectDialer())
    assert ei.value.code == 2012 and "does not support TLS" in ei.value.message


async def test_wrong_password(db):
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec_for(db, password="wrong"), DirectDialer())
    e = ei.value
    assert e.code == INVALID_CREDENTIALS and e.sqlstate == "28000"
    assert "Access denied for user 'app'" in e.message and "password" in e.hint
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec_for(db, user="nobody"), DirectDialer())
    assert ei.value.code == INVALID_CREDENTIALS


async def test_unknown_database(db):
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec_for(db, database="no_such_db"), DirectDialer())
    e = ei.value
    assert e.code == DATABASE_NOT_FOUND
    assert "no_such_db" in e.message and "database" in e.hint
    db.query("GRANT ALL PRIVILEGES ON *.* TO 'app'@'%'")  # with global privileges MariaDB says 1049
    try:
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec_for(db, database="no_such_db"), DirectDialer())
        assert ei.value.code == DATABASE_NOT_FOUND and "Unknown database" in ei.value.message
    finally:
        db.query("REVOKE ALL PRIVILEGES, GRANT OPTION FROM 'app'@'%'")
        db.query("GRANT ALL PRIVILEGES ON `app`.* TO 'app'@'%'")


async def test_nothing_listening(refusing_port):
    spec = OriginSpec(host="127.0.0.1", port=refusing_port.port, database="app", user="app", password="x",
                      sslmode="disable", connect_timeout=120)
    t0 = time.monotonic()
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec, DirectDialer())
    assert ei.value.code == CONNECTION_REFUSED
    assert time.monotonic() - t0 < 60  # refused at once, not left to wait out connect_timeout


async def test_silent_server_times_out(black_hole):
    """A port that accepts and never greets (or never answers SYN): bounded by connect_timeout."""
    spec = OriginSpec(host=black_hole.host, port=black_hole.port, database="app", user="app", password="x",
                      sslmode="require", connect_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(OriginError) as ei:
        await connect_mysql_origin(spec, DirectDialer())
    assert ei.value.code == CANNOT_CONNECT and "1.5s" in ei.value.message
    elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed  # the 1.5 s connect_timeout, not hung (generous for a busy box)


async def test_silent_accepting_server_times_out():
    async def hang(reader, writer):
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        spec = OriginSpec(host="127.0.0.1", port=port, database="app", user="app", password="x",
                          sslmode="disable", connect_timeout=1.0)
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec, DirectDialer())
        assert ei.value.code == CANNOT_CONNECT and "greeting" in ei.value.message
    finally:
        server.close()


async def test_greeting_err_too_many_connections(mariadb_factory):
    server = mariadb_factory(max_connections=10)  # MariaDB's minimum
    server.create_user("app", PW)
    server.create_database("app", owner="app")
    spec = spec_for(server)
    held = []
    try:
        with pytest.raises(OriginError) as ei:
            for _ in range(14):  # MariaDB keeps one extra slot for privileged users
                held.append(await connect_mysql_origin(spec, DirectDialer()))
        assert ei.value.code == GENERIC and "Too many connections" in ei.value.message
        assert "max_connections" in ei.value.hint
    finally:
        for c in held:
            c.close()


async def test_probe(db):
    info = await probe_mysql(spec_for(db, user="tlsuser", database="tlsdb", sslmode="verify-full",
                                      ca_pem=ca_of(db)), DirectDialer())
    assert info["tls"] is True and info["auth"] == "mysql_native_password"
    assert "MariaDB" in info["server_version"] and info["flavor"] == "mariadb"
    assert info["connect_ms"] > 0
    with pytest.raises(OriginError) as ei:
        await probe_mysql(spec_for(db), DirectDialer(), test_query="SELECT * FROM nope")
    assert ei.value.code == TEST_QUERY_FAILED and "nope" in ei.value.message


async def test_closed_connections_leave_nothing_on_the_server(db):
    before = db.connection_count("app")
    conns = [await connect_mysql_origin(spec_for(db), DirectDialer()) for _ in range(3)]
    assert db.wait_connection_count(before + 3, "app") == before + 3
    for c in conns:
        c.close()
    assert db.wait_connection_count(before, "app") == before


async def test_through_a_real_tunnel(edge, db):
    from cli.access_client import EdgeSession, Endpoint
    from proxy.mysql.origin import TunnelDialer
    from tests.harness.edge import ConnectorProc

    host = "mysql.internal.example"
    t = edge.hd("tunnel", "create", "my")
    edge.hd("tunnel", "route", "my", host, "--service", f"tcp://127.0.0.1:{db.port}")
    tok = edge.hd("access", "service-token", "create", "my-token")
    edge.hd("access", "app", "create", "my-app", "--domain", host, "--service-token", "my-token")
    ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
    session = EdgeSession(Endpoint(edge.tunnel_url, edge.cert_pin))
    dialer = TunnelDialer(session)
    spec = OriginSpec(host=host, port=None, database="tlsdb", user="tlsuser", password=PW, sslmode="verify-ca",
                      ca_pem=ca_of(db), access_client_id=tok["client_id"],
                      access_client_secret=tok["client_secret"], connect_timeout=10)
    try:
        info = await probe_mysql(spec, dialer)
        assert info["tls"] is True and info["flavor"] == "mariadb"
        conn = await connect_mysql_origin(spec, dialer)
        try:
            await conn.query("SET @y = 5")
            assert await conn.scalar("SELECT @y + 1") == "6"
            await conn.reset()
            assert await conn.scalar("SELECT @y") is None
        finally:
            conn.close()
        bad = OriginSpec(host=host, port=None, database="tlsdb", user="tlsuser", password=PW,
                         access_client_id=tok["client_id"], access_client_secret="x" * 64, connect_timeout=10)
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(bad, dialer)
        assert ei.value.code == INVALID_CREDENTIALS
    finally:
        await session.close()
