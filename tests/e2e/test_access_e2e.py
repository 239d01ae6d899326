"""Access end to end: service tokens checked at the relay (401/403), revocation and rotation
with real processes, assertions verified by the real connector, and no secret in any log or
in the SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import time
from pathlib import Path

import jwt
import psycopg
import pytest

from access.assertion import AssertionMinter, SigningKey, jwks_document
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.harness.edge import AccessTcpProc, ConnectorProc, EdgeProc
from tests.harness.origins import EchoServer, in_thread
from tests.harness.procs import Proc, connector_argv, poll_until
from tunnel.link import StreamInbox
from tunnel.wslink import WsLinkProtocol, http_response
from tunnel.messages import ConnectRequest
from tunnel.tls import cert_pin, ensure_edge_certificate, server_ssl_context
from tunnel.token import TunnelToken

HOST = "db.internal.example"


def _attempt(fwd: AccessTcpProc, payload: bytes = b"ping") -> bool:
    """One connection through the access client: True if it reached the echo origin.
    A refused stream closes the local connection (a reset when our bytes were never read)."""
    with socket.create_connection(fwd.address, timeout=5) as s:
        s.settimeout(10)
        got = b""
        try:
            s.sendall(payload)
            while len(got) < len(payload):
                chunk = s.recv(1024)
                if not chunk:
                    return False
                got += chunk
        except ConnectionResetError:
            return False
        return got == payload


def _refused_with(fwd: AccessTcpProc, text: str) -> None:
    before = fwd.log_text().count(text)
    assert not _attempt(fwd)
    poll_until(lambda: fwd.log_text().count(text) > before, 5, what=f"{text!r} in the access client log",
               on_timeout=lambda: fwd.log_text()[-1500:])


@pytest.fixture
def protected(edge):
    """A tunnel with a protected echo route, two tokens and an app that allows only the first."""
    with in_thread(EchoServer()) as echo:
        t = edge.hd("tunnel", "create", "vpc-01")
        edge.hd("tunnel", "route", "vpc-01", HOST, "--service", echo.url)
        allowed = edge.hd("access", "service-token", "create", "hyperdrive-vpc-01")
        other = edge.hd("access", "service-token", "create", "someone-else")
        app = edge.hd("access", "app", "create", "vpc-01-db", "--domain", HOST, "--service-token", "hyperdrive-vpc-01")
        conn = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()
        try:
            yield edge, allowed, other, app, conn
        finally:
            conn.stop()


def _client(edge: EdgeProc, token: dict | None, name: str, secret: str | None = None) -> AccessTcpProc:
    if token is None:
        return AccessTcpProc(edge, HOST, name=name).start()
    return AccessTcpProc(edge, HOST, name=name, service_token_id=token["client_id"],
                         service_token_secret=secret or token["client_secret"]).start()


def test_401_403_and_allowed_through_access_tcp(protected):
    edge, allowed, other, app, conn = protected
    assert len(app["aud"]) == 64
    _refused_with(_client(edge, None, "no-creds"), "401 missing_credentials")
    _refused_with(_client(edge, allowed, "wrong-secret", secret="0" * 64), "401 invalid_credentials")
    _refused_with(_client(edge, other, "not-in-policy"), "403 access_denied")
    ok = _client(edge, allowed, "allowed")
    assert _attempt(ok)
    assert "refused a stream" not in conn.log_text()  # the connector accepted the relay's assertion

    expiring = edge.hd("access", "service-token", "create", "short-lived", "--duration", "1s")
    edge.hd("access", "app", "create", "second", "--domain", "x.internal.example", "--any-service-token")
    edge.hd("tunnel", "route", "vpc-01", "x.internal.example", "--service", "http_status:418")
    time.sleep(1.1)  # the token's whole lifetime: nothing to poll for
    fwd = AccessTcpProc(edge, "x.internal.example", name="expired", service_token_id=expiring["client_id"],
                        service_token_secret=expiring["client_secret"]).start()
    _refused_with(fwd, "401 token_expired")

    logs = edge.hd("access", "logs", "--limit", "50")
    decisions = {(e["decision"], e["status"]) for e in logs}
    assert {("deny", 401), ("deny", 403), ("allow", 200)} <= decisions
    allow = next(e for e in logs if e["decision"] == "allow")
    assert allow["token_name"] == "hyperdrive-vpc-01" and allow["app"] == "vpc-01-db" and allow["hostname"] == HOST


def test_revoke_applies_to_new_streams_within_one_second(protected):
    edge, allowed, other, app, conn = protected
    fwd = _client(edge, allowed, "revoked")
    assert _attempt(fwd)
    edge.hd("access", "service-token", "revoke", "hyperdrive-vpc-01")
    revoked_at = time.monotonic()
    assert not _attempt(fwd)  # the very next stream is refused: no cache outlives the revocation
    assert time.monotonic() - revoked_at < 10.0  # refused, not left to time out (generous for a busy box)
    poll_until(lambda: "401 token_revoked" in fwd.log_text(), 30, what="the revocation message")


def test_rotate_with_grace_keeps_the_old_secret_then_stops_it(protected):
    edge, allowed, other, app, conn = protected
    old = _client(edge, allowed, "old-secret")
    assert _attempt(old)
    rotated = edge.hd("access", "service-token", "rotate", "hyperdrive-vpc-01", "--grace", "1s")
    assert rotated["client_id"] == allowed["client_id"] and rotated["client_secret"] != allowed["client_secret"]
    new = _client(edge, allowed, "new-secret", secret=rotated["client_secret"])
    assert _attempt(old)  # within the grace window
    assert _attempt(new)
    poll_until(lambda: not _attempt(old), 4, what="the old secret to stop working after the grace period")
    assert "401 invalid_credentials" in old.log_text()
    assert _attempt(new)


def test_psycopg_through_a_protected_route(edge, pg_cluster):
    t = edge.hd("tunnel", "create", "pg")
    edge.hd("tunnel", "route", "pg", "pg.internal.example", "--service", f"tcp://127.0.0.1:{pg_cluster.port}")
    tok = edge.hd("access", "service-token", "create", "pg-token")
    edge.hd("access", "app", "create", "pg-app", "--domain", "pg.internal.example", "--service-token", "pg-token")
    with ConnectorProc(edge, t["token"], tunnel=t["id"]).start(), \
            AccessTcpProc(edge, "pg.internal.example", service_token_id=tok["client_id"],
                          service_token_secret=tok["client_secret"]).start() as fwd:
        with psycopg.connect(host=fwd.host, port=fwd.port, user=APP_USER, password=APP_PASSWORD,
                             dbname=APP_DB, connect_timeout=10) as c:
            assert c.execute("select 1").fetchone() == (1,)


def test_jwks_published_and_key_rotation_keeps_streams_working(protected):
    edge, allowed, other, app, conn = protected
    status, doc = edge.api("GET", "/cdn-cgi/access/certs", token="")
    assert status == 200 and len(doc["keys"]) == 1
    first_kid = doc["keys"][0]["kid"]
    fwd = _client(edge, allowed, "rotation")
    assert _attempt(fwd)
    rotated = edge.hd("access", "keys", "rotate")
    status, doc = edge.api("GET", "/cdn-cgi/access/certs", token="")
    assert [k["kid"] for k in doc["keys"]] == [rotated["kid"], first_kid]
    # The relay's TLS port publishes the same document (where connectors fetch it).
    import urllib.request
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://{edge.tunnel_address}/cdn-cgi/access/certs", context=ctx, timeout=10) as r:
        assert [k["kid"] for k in json.loads(r.read())["keys"]] == [rotated["kid"], first_kid]
    # New streams carry assertions signed by the new key, and the connector accepts them at once.
    assert _attempt(fwd)
    assert "refused a stream" not in conn.log_text()


# ------------------------------------------------------------------------- origin-side checks


async def test_the_connector_refuses_streams_whose_assertion_is_not_valid(tmp_path):
    """A stand-in relay (our own protocol code, our own key) drives the real connector process."""
    cert, key = ensure_edge_certificate(tmp_path, [])
    signing = SigningKey.generate()
    stranger = SigningKey.generate()
    aud = "c" * 64
    tunnel_id, secret = "11111111-2222-3333-4444-555555555555", b"s" * 32
    results: asyncio.Queue = asyncio.Queue()
    async with EchoServer() as echo:

        async def handler(link, ready):
            runner = asyncio.create_task(link.run())
            control = await asyncio.wait_for(ready, 10)
            reg = await control.read_message(10)
            assert reg["type"] == "register" and base64.b64decode(reg["secret"]) == secret
            control.send_message({"type": "registered", "connection_id": "x"})
            control.send_message({"type": "keys", "jwks": jwks_document([signing])})
            control.send_message({"type": "config", "version": 1, "config": {"ingress": [
                {"hostname": "db.x", "service": echo.url, "access": {"required": True, "audTag": [aud]}},
                {"service": "http_status:404"}]}})
            issuer = f"https://127.0.0.1:{port}"
            good = AssertionMinter(signing, issuer).mint(aud, "0" * 32 + ".access")
            cases = {
                "valid": good,
                "missing": None,
                "alg none": jwt.encode({"aud": [aud], "iss": issuer}, None, algorithm="none",
                                       headers={"kid": signing.kid}),
                "unknown key": AssertionMinter(stranger, issuer).mint(aud, "x"),
                "other app": AssertionMinter(signing, issuer).mint("d" * 64, "x"),
                "other issuer": AssertionMinter(signing, "https://elsewhere").mint(aud, "x"),
            }
            for name, assertion in cases.items():
                stream = link.open_stream()
                inbox = StreamInbox(stream)
                inbox.send_message(ConnectRequest("db.x", assertion=assertion).to_dict())
                resp = await inbox.read_message(15)
                await results.put((name, resp))
                if not stream.closed:
                    stream.reset(0, "done")
            await results.put(("done", None))
            await runner

        def on_http(request):
            if request.path == "/cdn-cgi/access/certs":
                return http_response(200, json.dumps(jwks_document([signing])).encode(), "application/json")
            return None

        def on_open(proto):
            # Attach the stream handler at once: the connector's first frames may follow immediately.
            ready: asyncio.Future = asyncio.get_running_loop().create_future()
            proto.link.on_stream = lambda s: ready.done() or ready.set_result(StreamInbox(s))
            asyncio.ensure_future(handler(proto.link, ready))

        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: WsLinkProtocol(client=False, on_open=on_open, on_http=on_http),
                                          "127.0.0.1", 0, ssl=server_ssl_context(cert, key))
        async with server:
            port = server.sockets[0].getsockname()[1]
            token = TunnelToken(tunnel_id, secret, [f"127.0.0.1:{port}"], cert_pin(cert)).encode()
            proc = Proc(connector_argv("--token", token, "--ha-connections", "1"), name="connector",
                        log_dir=tmp_path / "logs")
            try:
                got = {}
                while True:
                    name, resp = await asyncio.wait_for(results.get(), 30)
                    if name == "done":
                        break
                    got[name] = resp
            finally:
                proc.stop()
    assert got["valid"] == {"ok": True}
    for name in ("missing", "alg none", "unknown key", "other app", "other issuer"):
        assert got[name]["ok"] is False and got[name]["status"] == 403, (name, got[name])
    assert "no access assertion" in got["missing"]["error"]
    assert "algorithm 'none'" in got["alg none"]["error"]
    assert "unknown key" in got["unknown key"]["error"]
    assert "another application" in got["other app"]["error"]
    assert "issued by someone else" in got["other issuer"]["error"]


# ------------------------------------------------------------------------- secrets stay secret


def test_no_secret_in_any_log_or_in_the_database(edge, pg_cluster):
    t = edge.hd("tunnel", "create", "secretive")
    edge.hd("tunnel", "route", "secretive", "pg.internal.example", "--service", f"tcp://127.0.0.1:{pg_cluster.port}")
    tok = edge.hd("access", "service-token", "create", "svc")
    edge.hd("access", "app", "create", "app", "--domain", "pg.internal.example", "--service-token", "svc")
    rotated = edge.hd("access", "service-token", "rotate", "svc", "--grace", "1h")
    secrets = [tok["client_secret"], rotated["client_secret"], APP_PASSWORD]
    tunnel_secret = base64.b64encode(TunnelToken.decode(t["token"]).secret).decode()
    with ConnectorProc(edge, t["token"], tunnel=t["id"], extra_args=["--loglevel", "debug"]).start() as conn:
        for secret in (tok["client_secret"], rotated["client_secret"], "wrong" * 10):
            with AccessTcpProc(edge, "pg.internal.example", service_token_id=tok["client_id"],
                               service_token_secret=secret, name=f"client-{secret[:4]}").start() as fwd:
                try:
                    with psycopg.connect(host=fwd.host, port=fwd.port, user=APP_USER, password=APP_PASSWORD,
                                         dbname=APP_DB, connect_timeout=10) as c:
                        c.execute("select 1")
                except psycopg.OperationalError:
                    assert secret.startswith("wrong")
        edge.hd("access", "logs")
        edge.hd("access", "service-token", "list")
        edge.hd("access", "service-token", "revoke", "svc")
    edge.stop()
    files = [p for p in Path(edge.state_dir).rglob("*") if p.is_file()]
    logs = [p for p in files if p.suffix == ".log"]
    assert logs and any(p.name.startswith("connector") for p in logs)
    db = Path(edge.state_dir) / "state.db"
    assert db.exists()
    for path in files:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"a secret in clear text in {path.name}"
        if path.suffix == ".log" and "connector" not in path.name:
            assert tunnel_secret.encode() not in blob, f"the tunnel secret in {path.name}"


def test_repeated_failures_for_one_client_id_are_rate_limited(protected):
    edge, allowed, other, app, conn = protected
    fwd = _client(edge, allowed, "guessing", secret="f" * 64)
    for _ in range(20):  # the relay's default: 20 failures at once, then 20 a minute, per client id
        assert not _attempt(fwd)
    # A slow machine may have taken long enough for a failure or two to drain: bounded retries.
    for _ in range(10):
        if fwd.log_text().count("429 rate_limited"):
            break
        assert not _attempt(fwd)
    poll_until(lambda: "429 rate_limited" in fwd.log_text(), 5, what="a 429 in the access client log",
               on_timeout=lambda: fwd.log_text()[-1500:])
    logs = edge.hd("access", "logs", "--limit", "5")
    assert logs[0]["status"] == 429 and "too many failed credential checks" in logs[0]["reason"]
