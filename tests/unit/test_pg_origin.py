"""Origin connections against real throwaway PostgreSQL clusters (and one real tunnel).

One TLS cluster serves most cases: pg_hba gives each test role its own method, so the md5,
cleartext, SCRAM and trust exchanges all really happen (the result's `auth` proves which).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cli.access_client import EdgeSession, Endpoint
from proxy.errors import OriginError, ProxyError
from proxy.pg import protocol as proto
from proxy.pg.origin import (
    DirectDialer,
    OriginSpec,
    TunnelDialer,
    WireReader,
    cancel_request,
    connect_origin,
    probe,
)
from tests.harness.edge import ConnectorProc
from tests.harness.pg import PgCluster, _gen_key, _make_cert

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

PW = {"app": "app-Secret-1", "u_md5": "md5-Secret-2", "u_pw": "clear-Secret-3"}
TUNNEL_HOST = "pg.internal.example"


@pytest.fixture(scope="module")
def pg():
    hba = [
        "host all u_trust 127.0.0.1/32 trust",
        "host all u_md5 127.0.0.1/32 md5",
        "host all u_pw 127.0.0.1/32 password",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]
    c = PgCluster(tls=True, hba_lines=hba).start()
    try:
        c.create_user("app", PW["app"])
        c.create_user("u_md5", PW["u_md5"], password_encryption="md5")
        c.create_user("u_pw", PW["u_pw"])
        c.create_user("u_trust")
        c.create_database("app", owner="app")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def pg_plain():
    c = PgCluster(auth="trust").start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def pg_cert():
    c = PgCluster(client_cert=True).start()
    try:
        c.create_user("certuser")
        yield c
    finally:
        c.stop()


def spec_for(cluster: PgCluster, user: str = "app", **kw) -> OriginSpec:
    args = dict(host="127.0.0.1", port=cluster.port, database="app" if user == "app" else "postgres",
                user=user, password=PW.get(user), connect_timeout=10.0)
    args.update(kw)
    return OriginSpec(**args)


def other_ca_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    key = _gen_key()
    return _make_cert("some-other-ca", key, ca=True).public_bytes(serialization.Encoding.PEM)


async def origin_error(coro) -> OriginError:
    with pytest.raises(OriginError) as ei:
        await coro
    return ei.value


# ------------------------------------------------------------------------------ spec


def test_spec_validation_and_no_secrets_in_repr():
    s = OriginSpec(host="db.example", port=5432, database="d", user="u", password="hunter2-secret",
                   access_client_id="id.access", access_client_secret="very-secret-value")
    assert "hunter2" not in repr(s) and "very-secret" not in repr(s)
    assert s.sslmode == "require" and s.via_tunnel
    with pytest.raises(ValueError, match="loopback"):
        OriginSpec(host="db.example", port=5432, database="d", user="u", sslmode="disable")
    with pytest.raises(ValueError, match="sslmode"):
        OriginSpec(host="db.example", port=5432, database="d", user="u", sslmode="prefer")
    with pytest.raises(ValueError):
        OriginSpec(host="db.example", port=5432, database="d", user="u", startup_params={"user": "x"})
    with pytest.raises(ValueError):
        OriginSpec(host="db.example", port=5432, database="d", user="u", client_cert_pem=b"x")
    OriginSpec(host="127.0.0.1", port=5432, database="d", user="u", sslmode="disable")
    e = OriginError.no_connector("db.example")
    assert e.to_dict()["code"] == 2010 and "no connector is connected" in e.message
    assert ProxyError.from_origin(e).fields()["C"] == "08001"


# ------------------------------------------------------------------------------ auth modes


@pytest.mark.parametrize("user,method", [("app", "scram-sha-256"), ("u_md5", "md5"),
                                         ("u_pw", "password"), ("u_trust", "trust")])
async def test_auth_modes(pg, user, method):
    conn = await connect_origin(spec_for(pg, user, startup_params={"application_name": "hd-test"}),
                                DirectDialer())
    try:
        assert conn.auth == method and conn.tls
        assert conn.server_version.startswith("15") and conn.parameters["application_name"] == "hd-test"
        assert conn.pid > 0 and len(conn.secret_key) == 4 and conn.transaction_status == "I"
        assert conn.pending == b"" and conn.connect_ms > 0
    finally:
        conn.terminate()


@pytest.mark.parametrize("user", ["app", "u_md5", "u_pw"])
async def test_wrong_password_is_2013(pg, user):
    e = await origin_error(connect_origin(spec_for(pg, user, password="wrong-pw"), DirectDialer()))
    assert e.code == 2013 and e.sqlstate == "28P01" and "password authentication failed" in e.message
    assert "wrong-pw" not in str(e.to_dict())


async def test_unknown_database_is_2014(pg):
    e = await origin_error(connect_origin(spec_for(pg, database="nope"), DirectDialer()))
    assert e.code == 2014 and '"nope" does not exist' in e.message


async def test_refused_port_is_2011(refusing_port):
    spec = OriginSpec(host="127.0.0.1", port=refusing_port.port, database="d", user="u")
    e = await origin_error(connect_origin(spec, DirectDialer()))
    assert e.code == 2011 and str(refusing_port.port) in e.message


async def test_unresolvable_hostname_is_2008():
    spec = OriginSpec(host="no-such-db.invalid", port=5432, database="d", user="u", connect_timeout=5)
    e = await origin_error(connect_origin(spec, DirectDialer()))
    assert e.code == 2008 and "no-such-db.invalid" in e.message


async def test_black_hole_is_2010_within_the_timeout(black_hole):
    spec = OriginSpec(host="127.0.0.1", port=black_hole.port, database="d", user="u", connect_timeout=1)
    t0 = time.monotonic()
    e = await origin_error(connect_origin(spec, DirectDialer()))
    elapsed = time.monotonic() - t0
    assert e.code == 2010 and "within 1s" in e.message
    assert elapsed >= 0.9, elapsed
    assert elapsed < 10, elapsed  # the 1 s connect_timeout, not the 15 s default (generous for a busy box)


async def test_server_silent_after_connect_is_2010():
    """Accepts TCP but never answers the SSLRequest: bounded by connect_timeout as a whole."""
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        spec = OriginSpec(host="127.0.0.1", port=port, database="d", user="u", connect_timeout=0.5)
        t0 = time.monotonic()
        e = await origin_error(connect_origin(spec, DirectDialer()))
        assert e.code == 2010 and "SSLRequest" in e.message
        assert time.monotonic() - t0 < 10  # the 0.5 s connect_timeout, not the 15 s default
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------------------ TLS


async def test_tls_modes(pg):
    ca = pg.ca_cert_path.read_bytes()
    for mode, kw in [("require", {}), ("verify-ca", {"ca_pem": ca}), ("verify-full", {"ca_pem": ca})]:
        info = await probe(spec_for(pg, sslmode=mode, **kw), DirectDialer())
        assert info["tls"] is True and info["auth"] == "scram-sha-256", mode


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full", "require"])
async def test_tls_with_another_ca_fails_clearly(pg, mode):
    e = await origin_error(connect_origin(spec_for(pg, sslmode=mode, ca_pem=other_ca_pem()), DirectDialer()))
    assert e.code == 2015 and "certificate verification failed" in e.message
    assert "CA certificate" in e.hint


async def test_server_without_tls_is_2012_unless_disabled(pg_plain):
    e = await origin_error(connect_origin(spec_for(pg_plain, "postgres", password=None), DirectDialer()))
    assert e.code == 2012 and "does not support TLS" in e.message
    info = await probe(spec_for(pg_plain, "postgres", password=None, sslmode="disable"), DirectDialer())
    assert info["tls"] is False and info["auth"] == "trust"


async def test_client_certificate(pg_cert, tmp_path):
    cert, key = pg_cert.issue_client_cert("certuser", tmp_path)
    spec = spec_for(pg_cert, "certuser", sslmode="verify-full", ca_pem=pg_cert.ca_cert_path.read_bytes(),
                    client_cert_pem=cert.read_bytes(), client_key_pem=key.read_bytes())
    info = await probe(spec, DirectDialer())
    assert info["tls"] and info["auth"] == "trust"  # authenticated by the certificate
    e = await origin_error(connect_origin(spec_for(pg_cert, "certuser"), DirectDialer()))
    assert e.code == 2013 and e.sqlstate == "28000" and "certificate" in e.message
    # plain TCP is not accepted at all by a hostssl-only server
    e = await origin_error(connect_origin(spec_for(pg_cert, "certuser", sslmode="disable"), DirectDialer()))
    assert e.code == 2013 and "no encryption" in e.message


# ------------------------------------------------------------------------------ probe, cancel


async def test_probe_runs_the_empty_query_and_reports(pg):
    info = await probe(spec_for(pg), DirectDialer())
    assert info["server_version"].startswith("15") and info["tls"] and info["auth"] == "scram-sha-256"
    assert 0 < info["connect_ms"] < 10_000
    e = await origin_error(probe(spec_for(pg), DirectDialer(), test_query="select 1/0"))
    assert e.code == 2016 and e.sqlstate == "22012" and "division by zero" in e.message


async def _running(cluster: PgCluster, pid: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sql = "select 1 from pg_stat_activity where pid = %s and state = 'active' and query like 'select pg_sleep%%'"
    while not await asyncio.to_thread(cluster.execute, sql, (pid,)):
        if loop.time() > deadline:
            raise AssertionError("the query never started")
        await asyncio.sleep(0.02)


async def _cancel_and_check(cluster: PgCluster, spec: OriginSpec, dialer) -> None:
    conn = await connect_origin(spec, dialer)
    try:
        reader = WireReader(conn.channel, conn.pending)
        conn.channel.write(proto.query("select pg_sleep(30)"))
        await _running(cluster, conn.pid)
        t0 = time.monotonic()
        await cancel_request(spec, dialer, conn.pid, conn.secret_key)
        fields = None
        async with asyncio.timeout(60):  # hang guard
            while True:
                kind, body = await reader.read_message()
                if kind == proto.B.ERROR_RESPONSE:
                    fields = proto.parse_error_fields(body)
                elif kind == proto.B.READY_FOR_QUERY:
                    break
        assert fields is not None and fields["C"] == "57014", fields
        assert time.monotonic() - t0 < 25  # cancelled, not pg_sleep(30) run to its end
        reader.release()
    finally:
        conn.terminate()


async def test_cancel_request_cancels_a_running_query(pg):
    await _cancel_and_check(pg, spec_for(pg, sslmode="verify-full", ca_pem=pg.ca_cert_path.read_bytes()),
                            DirectDialer())


@pytest.mark.skipif(uvloop is None, reason="uvloop not installed")
def test_origin_under_uvloop(pg):
    """TLS via MemoryBIO over a uvloop TCP transport (where loop.start_tls could not wrap a stream)."""

    async def scenario():
        info = await probe(spec_for(pg, sslmode="verify-full", ca_pem=pg.ca_cert_path.read_bytes()),
                           DirectDialer())
        assert info["tls"]
        await _cancel_and_check(pg, spec_for(pg), DirectDialer())

    uvloop.run(asyncio.wait_for(scenario(), 30))


# ------------------------------------------------------------------------------ tunnel


async def test_through_a_real_tunnel(edge, pg):
    t = edge.hd("tunnel", "create", "pg")
    edge.hd("tunnel", "route", "pg", TUNNEL_HOST, "--service", f"tcp://127.0.0.1:{pg.port}")
    tok = edge.hd("access", "service-token", "create", "pg-token")
    edge.hd("access", "app", "create", "pg-app", "--domain", TUNNEL_HOST, "--service-token", "pg-token")
    edge.hd("tunnel", "create", "idle")
    edge.hd("tunnel", "route", "idle", "idle.internal.example", "--service", f"tcp://127.0.0.1:{pg.port}", "--public")
    ConnectorProc(edge, t["token"], tunnel=t["id"]).start()

    session = EdgeSession(Endpoint(edge.tunnel_url, edge.cert_pin))
    dialer = TunnelDialer(session)
    ca = pg.ca_cert_path.read_bytes()
    spec = OriginSpec(host=TUNNEL_HOST, port=None, database="app", user="app", password=PW["app"],
                      sslmode="verify-ca", ca_pem=ca, access_client_id=tok["client_id"],
                      access_client_secret=tok["client_secret"], connect_timeout=10)
    try:
        info = await probe(spec, dialer)
        assert info["tls"] and info["auth"] == "scram-sha-256" and info["server_version"].startswith("15")
        await _cancel_and_check(pg, spec, dialer)

        bare = OriginSpec(host=TUNNEL_HOST, port=None, database="app", user="app", password=PW["app"])
        e = await origin_error(probe(bare, dialer))
        assert e.code == 2013 and "denied (401)" in e.message and "access client id and secret" in e.hint

        wrong = OriginSpec(host=TUNNEL_HOST, port=None, database="app", user="app", password=PW["app"],
                           access_client_id=tok["client_id"], access_client_secret="x" * 64)
        e = await origin_error(probe(wrong, dialer))
        assert e.code == 2013

        e = await origin_error(probe(OriginSpec(host="nope.internal.example", port=None, database="app",
                                                user="app"), dialer))
        assert e.code == 2008 and "no tunnel route for hostname nope.internal.example" in e.message

        e = await origin_error(probe(OriginSpec(host="idle.internal.example", port=None, database="app",
                                                user="app"), dialer))
        assert e.code == 2010 and "no connector is connected" in e.message
    finally:
        await session.close()
