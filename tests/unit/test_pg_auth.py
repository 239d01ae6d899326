"""proxy.pg.auth: SCRAM-SHA-256 (RFC 7677 vector, both ends, against a real PostgreSQL and a real
libpq), md5 and SASLprep."""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import uuid

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pg import protocol as p
from proxy.pg.auth import (
    MECHANISM,
    AuthFailed,
    ScramClient,
    ScramSecret,
    ScramServer,
    cleartext_verify,
    md5_response,
    md5_response_from_secret,
    md5_secret,
    md5_verify,
    saslprep,
)

# RFC 7677 §3
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_secret() -> ScramSecret:
    return ScramSecret.from_password("pencil", salt=RFC_SALT, iterations=4096)


# ------------------------------------------------------------------------------ RFC 7677 vector


def test_rfc7677_client_byte_for_byte():
    c = ScramClient("pencil", RFC_CLIENT_NONCE, username="user")
    assert c.first() == RFC_CLIENT_FIRST
    assert c.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not c.done
    c.verify(RFC_SERVER_FINAL)
    assert c.done


def test_rfc7677_server_byte_for_byte():
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    assert s.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert s.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert s.done
    assert hashlib.sha256(s.client_key).digest() == rfc_secret().stored_key


def test_client_sends_empty_username_like_libpq():
    c = ScramClient("pencil", RFC_CLIENT_NONCE)
    assert c.first() == b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"
    assert ScramClient("x", "abc", username="a=b,c").first() == b"n,,n=a=3Db=2Cc,r=abc"


# ------------------------------------------------------------------------------ round trips


def exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.first(client.first())
    server_final = server.final(client.final(server_first))
    client.verify(server_final)


def test_round_trip_random_nonces_and_salt():
    secret = ScramSecret.from_password("correct horse")
    server, client = ScramServer(secret), ScramClient("correct horse")
    exchange(server, client)
    assert server.done and client.done
    assert ScramServer.mechanisms == [MECHANISM] == ["SCRAM-SHA-256"]
    assert len(secret.salt) == 16 and secret.iterations == 4096


def test_y_gs2_header_is_accepted():
    server = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    server.first(b"y,,n=,r=" + RFC_CLIENT_NONCE.encode())
    with pytest.raises(AuthFailed, match="channel binding data does not match"):  # c=biws is "n,,"
        server.final(RFC_CLIENT_FINAL)


def test_wrong_password_fails_at_the_server():
    server = ScramServer(ScramSecret.from_password("right"))
    client = ScramClient("wrong")
    with pytest.raises(AuthFailed, match="password authentication failed"):
        server.final(client.final(server.first(client.first())))
    assert not server.done and server.client_key is None


def test_impostor_server_is_detected_by_the_client():
    # The impostor does not know the password: it cannot produce the right server signature.
    client = ScramClient("pencil", RFC_CLIENT_NONCE, username="user")
    client.first()
    client.final(RFC_SERVER_FIRST)
    bogus = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(AuthFailed, match="signature is wrong"):
        client.verify(bogus)


def test_server_error_is_reported_by_the_client():
    client = ScramClient("pencil", RFC_CLIENT_NONCE, username="user")
    client.first()
    client.final(RFC_SERVER_FIRST)
    with pytest.raises(AuthFailed, match="rejected SCRAM authentication: invalid-proof"):
        client.verify(b"e=invalid-proof")


def test_client_key_pass_through():
    """A ClientKey recovered by the server side lets the proxy log in to an origin holding the
    same secret (PgBouncer's SCRAM pass-through)."""
    secret = ScramSecret.from_password("s3cret")
    front = ScramServer(secret)
    exchange(front, ScramClient("s3cret"))
    origin = ScramServer(secret)
    exchange(origin, ScramClient.from_keys(front.client_key, secret.server_key,
                                           salt=secret.salt, iterations=secret.iterations))
    other = ScramServer(ScramSecret.from_password("s3cret"))  # same password, other salt
    c = ScramClient.from_keys(front.client_key, secret.server_key, salt=secret.salt,
                              iterations=secret.iterations)
    with pytest.raises(AuthFailed, match="salt/iterations differ"):
        c.final(other.first(c.first()))


# ------------------------------------------------------------------------------ malformed input

N = RFC_CLIENT_NONCE


@pytest.mark.parametrize("msg, match", [
    (b"p=tls-server-end-point,,n=,r=" + N.encode(), "channel binding"),
    (b"n,a=bob,n=,r=" + N.encode(), "authorization identity"),
    (b"n,,m=ext,n=,r=" + N.encode(), "extension"),
    (b"x,,n=,r=" + N.encode(), "GS2 header"),
    (b"n,n=,r=" + N.encode(), "GS2 header"),
    (b"", "GS2 header"),
    (b"n,,n=user", "expected n=<user>,r=<nonce>"),
    (b"n,,r=abc,n=user", "expected n=<user>,r=<nonce>"),
    (b"n,,n=,r=", "printable"),
    (b"n,,n=,r=a b", "printable"),
    (b"n,,n=,r=ab\x7f", "printable"),
    (b"n,,n=,r=\xc3\xa9", "printable"),
    (b"n,,n=\xff,r=abc", "UTF-8"),
    (None, "missing"),
])
def test_server_rejects_malformed_client_first(msg, match):
    with pytest.raises(AuthFailed, match=match):
        ScramServer(rfc_secret(), RFC_SERVER_NONCE).first(msg)


def _final_with(**changes) -> bytes:
    attrs = dict(a.split("=", 1) for a in RFC_CLIENT_FINAL.decode().split(","))
    attrs.update(changes)
    return ",".join(f"{k}={v}" for k, v in attrs.items() if v is not None).encode()


@pytest.mark.parametrize("msg, match", [
    (_final_with(r=N + "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k1"), "nonce mismatch"),
    (_final_with(r=N), "nonce mismatch"),
    (_final_with(c="eSws"), "channel binding data does not match"),
    (_final_with(c="biws!"), "not valid base64"),
    (_final_with(p="eHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="), "wrong SCRAM proof"),
    (_final_with(p="AAAA"), "wrong length"),
    (_final_with(p="%%%"), "not valid base64"),
    (_final_with(p=None), "expected c="),
    (_final_with(c=None), "expected c="),
    (RFC_CLIENT_FINAL.replace(b"c=biws,", b""), "expected c="),
    (b"garbage", "expected c="),
    (b"\xff\xfe", "UTF-8"),
])
def test_server_rejects_tampered_client_final(msg, match):
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    s.first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthFailed, match=match):
        s.final(msg)
    with pytest.raises(AuthFailed, match="unexpected"):  # no second try on the same exchange
        s.final(RFC_CLIENT_FINAL)


def test_extensions_in_client_final_are_covered_by_the_proof():
    # An extension attribute changes the AuthMessage, so the RFC proof no longer matches.
    msg = RFC_CLIENT_FINAL.replace(b",p=", b",x=ext,p=")
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    s.first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthFailed, match="wrong SCRAM proof"):
        s.final(msg)


def test_server_messages_out_of_order():
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    with pytest.raises(AuthFailed, match="unexpected"):
        s.final(RFC_CLIENT_FINAL)
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    s.first(RFC_CLIENT_FIRST)
    with pytest.raises(AuthFailed, match="unexpected"):
        s.first(RFC_CLIENT_FIRST)


@pytest.mark.parametrize("msg, match", [
    (b"r=someoneelse%hvYD,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce mismatch"),
    (b"r=" + N.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce mismatch"),  # not extended
    (b"r=" + N.encode() + b"x y,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce mismatch"),
    (b"r=" + N.encode() + b"xyz,s=***,i=4096", "not valid base64"),
    (b"r=" + N.encode() + b"xyz,s=,i=4096", "salt or iteration"),
    (b"r=" + N.encode() + b"xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "salt or iteration"),
    (b"r=" + N.encode() + b"xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1", "salt or iteration"),
    (b"r=" + N.encode() + b"xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999999", "salt or iteration"),
    (b"r=" + N.encode() + b"xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==", "expected r="),
    (b"m=ext,r=" + N.encode() + b"xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1", "extension"),
    (b"e=other-error", "expected r="),
    (b"\xc3", "UTF-8"),
])
def test_client_rejects_malformed_server_first(msg, match):
    c = ScramClient("pencil", N)
    c.first()
    with pytest.raises(AuthFailed, match=match):
        c.final(msg)


@pytest.mark.parametrize("msg", [b"", b"x=1", b"v=", b"v=***", b"v=" + base64.b64encode(b"short"), b"\xff"])
def test_client_rejects_malformed_server_final(msg):
    c = ScramClient("pencil", RFC_CLIENT_NONCE, username="user")
    c.first()
    c.final(RFC_SERVER_FIRST)
    with pytest.raises(AuthFailed):
        c.verify(msg)
    with pytest.raises(AuthFailed, match="unexpected"):
        c.verify(RFC_SERVER_FINAL)


def test_bad_nonce_arguments():
    with pytest.raises(ValueError):
        ScramServer(rfc_secret(), "has,comma")
    with pytest.raises(ValueError):
        ScramClient("pw", "sp ace")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.binary(max_size=120))
def test_fuzz_server_raises_only_auth_failed(first, final):
    s = ScramServer(rfc_secret(), RFC_SERVER_NONCE)
    for msg in (first, b"n,,n=," + first, b"n,,n=,r=" + first):
        try:
            ScramServer(rfc_secret(), RFC_SERVER_NONCE).first(msg)
        except AuthFailed:
            pass
    s.first(RFC_CLIENT_FIRST)
    try:
        s.final(b"c=biws,r=" + RFC_CLIENT_NONCE.encode() + RFC_SERVER_NONCE.encode() + b"," + final)
    except AuthFailed:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_client_raises_only_auth_failed(data):
    for msg in (data, b"r=" + N.encode() + data):
        c = ScramClient("pencil", N)
        c.first()
        try:
            c.final(msg)
        except AuthFailed:
            pass
    c = ScramClient("pencil", RFC_CLIENT_NONCE, username="user")
    c.first()
    c.final(RFC_SERVER_FIRST)
    try:
        c.verify(data)
    except AuthFailed:
        pass


# ------------------------------------------------------------------------------ secrets, SASLprep


def test_secret_string_round_trip_and_repr_hides_keys():
    s = rfc_secret()
    text = s.to_string()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert ScramSecret.from_string(text) == s
    r = repr(s)
    assert base64.b64encode(s.stored_key).decode() not in r and s.stored_key.hex() not in r
    assert s.verify_password("pencil") and not s.verify_password("pencil2")


@pytest.mark.parametrize("text", [
    "", "md5abc", "SCRAM-SHA-256$4096:c2FsdA==$a:b", "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
    "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=$",
])
def test_secret_from_string_rejects(text):
    with pytest.raises(ValueError):
        ScramSecret.from_string(text)


@pytest.mark.parametrize("given, expected", [
    ("user", b"user"),
    ("I\u00adX", b"IX"),          # soft hyphen: mapped to nothing
    ("\u00aa", b"a"),             # NFKC
    ("\u2168", b"IX"),            # ROMAN NUMERAL NINE, NFKC
    ("a\u3000b", b"a b"),         # ideographic space → space
    ("\u0627\u0031", "\u0627\u0031".encode()),   # bidi rule broken: raw
    ("a\ue000", "a\ue000".encode()),             # private use: raw
    ("\u00ad", "\u00ad".encode()),               # empty after mapping: raw
    ("\x07bell", b"\x07bell"),                   # pure ASCII: unchanged (as PG)
    (b"\xff\xfe", b"\xff\xfe"),                  # not UTF-8: raw
    ("caf\u0065\u0301", "caf\u00e9".encode()),   # NFKC composes
])
def test_saslprep(given, expected):
    assert saslprep(given) == expected


# ------------------------------------------------------------------------------ md5, cleartext


def test_md5_known_vector():
    # md5("pw" + "user") and the salted response, computed by hand with hashlib
    inner = hashlib.md5(b"pwuser").hexdigest()
    salt = b"\x01\x02\x03\x04"
    assert md5_secret("user", "pw") == "md5" + inner
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert md5_response("user", "pw", salt) == expected
    assert md5_response_from_secret(md5_secret("user", "pw"), salt) == expected
    assert md5_verify(md5_secret("user", "pw"), salt, expected)
    assert not md5_verify(md5_secret("user", "pw2"), salt, expected)
    assert cleartext_verify("pw", b"pw") and not cleartext_verify("pw", b"pw ")


# ------------------------------------------------------------------------------ real PostgreSQL


def _role(cluster, password: str, encryption: str) -> tuple[str, str]:
    name = f"auth_{uuid.uuid4().hex[:10]}"
    cluster.create_user(name, password, password_encryption=encryption)
    (secret,) = cluster.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,))[0]
    return name, secret


@pytest.mark.parametrize("password, also", [
    ("app-Pw 1", ()),
    ("I\u00adX", ("IX",)),
    ("\u2168", ("IX",)),
    ("p\u00e4ssw\u00f6rd", ()),
    ("\u0627\u0031", ()),
    ("a\ue000b", ()),
])
def test_secret_from_real_postgres(pg_cluster, password, also):
    _, text = _role(pg_cluster, password, "scram-sha-256")
    secret = ScramSecret.from_string(text)
    assert secret.to_string() == text
    assert secret.verify_password(password)
    for equivalent in also:
        assert secret.verify_password(equivalent)
    assert not secret.verify_password(password + "x")
    exchange(ScramServer(secret), ScramClient(password))
    recomputed = ScramSecret.from_password(password, salt=secret.salt, iterations=secret.iterations)
    assert recomputed == secret


def test_md5_secret_from_real_postgres(pg_cluster):
    name, text = _role(pg_cluster, "md5-pw", "md5")
    assert text == md5_secret(name, "md5-pw")


def _recv_messages(sock: socket.socket, reader: p.MessageReader, until: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    while not out or out[-1][0] not in (until, p.B.ERROR_RESPONSE):
        data = sock.recv(65536)
        assert data, "server closed the connection"
        out += [(t, reader.buf[s + 5:e]) for t, s, e in reader.feed(data)]
    return out


def test_scram_client_logs_in_to_real_postgres(pg_cluster):
    """Our client against PostgreSQL's server side, over a raw TCP socket."""
    user, password = "app", pg_cluster.passwords["app"]
    with socket.create_connection((pg_cluster.host, pg_cluster.port), timeout=10) as sock:
        reader = p.MessageReader()
        sock.sendall(p.startup_message({"user": user, "database": "app"}))
        (t, payload), = _recv_messages(sock, reader, p.B.AUTHENTICATION)
        code, data = p.parse_authentication(payload)
        assert code == p.Auth.SASL and MECHANISM in p.parse_sasl_mechanisms(data)
        client = ScramClient(password)
        sock.sendall(p.sasl_initial_response(MECHANISM, client.first()))
        (t, payload), = _recv_messages(sock, reader, p.B.AUTHENTICATION)
        code, data = p.parse_authentication(payload)
        assert code == p.Auth.SASL_CONTINUE
        sock.sendall(p.sasl_response(client.final(data)))
        msgs = _recv_messages(sock, reader, p.B.READY_FOR_QUERY)
        code, data = p.parse_authentication(msgs[0][1])
        assert code == p.Auth.SASL_FINAL
        client.verify(data)
        assert client.done
        assert p.parse_authentication(msgs[1][1]) == (p.Auth.OK, b"")
        assert p.parse_ready_for_query(msgs[-1][1]) == "I"
        sock.sendall(p.terminate())


def test_real_postgres_rejects_wrong_password(pg_cluster):
    with socket.create_connection((pg_cluster.host, pg_cluster.port), timeout=10) as sock:
        reader = p.MessageReader()
        sock.sendall(p.startup_message({"user": "app", "database": "app"}))
        _recv_messages(sock, reader, p.B.AUTHENTICATION)
        client = ScramClient("not the password")
        sock.sendall(p.sasl_initial_response(MECHANISM, client.first()))
        (_, payload), = _recv_messages(sock, reader, p.B.AUTHENTICATION)
        sock.sendall(p.sasl_response(client.final(p.parse_authentication(payload)[1])))
        (t, payload), = _recv_messages(sock, reader, p.B.AUTHENTICATION)
        assert t == p.B.ERROR_RESPONSE
        fields = p.parse_error_fields(payload)
        assert fields["C"] == "28P01" and "password authentication failed" in fields["M"]


# ------------------------------------------------------------------------------ real libpq


class FakeServer:
    """A one-connection PostgreSQL server built from our protocol and auth modules, in a thread,
    so libpq (psycopg) can authenticate against our server side."""

    def __init__(self, method: str, user: str, password: str):
        self.method, self.user, self.password = method, user, password
        self.secret = ScramSecret.from_password(password)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self.outcome: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                self._serve(conn)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()

    def _read(self, conn, reader) -> tuple[int, bytes]:
        while True:
            msgs = reader.feed(conn.recv(65536))
            if msgs:
                assert len(msgs) == 1
                t, s, e = msgs[0]
                return t, reader.buf[s + 5:e]

    def _serve(self, conn) -> None:
        startup = p.StartupReader()
        while (ev := startup.feed(conn.recv(65536))) is None:
            pass
        if isinstance(ev, p.SslRequest):
            conn.sendall(b"N")
            while (ev := startup.feed(conn.recv(65536))) is None:
                pass
        assert isinstance(ev, p.StartupMessage) and ev.user == self.user
        reader = p.MessageReader()
        ok = False
        try:
            if self.method == "scram":
                server = ScramServer(self.secret)
                conn.sendall(p.authentication_sasl(server.mechanisms))
                t, payload = self._read(conn, reader)
                mech, first = p.parse_sasl_initial_response(payload)
                assert mech == MECHANISM
                conn.sendall(p.authentication_sasl_continue(server.first(first)))
                t, payload = self._read(conn, reader)
                conn.sendall(p.authentication_sasl_final(server.final(payload)))
                ok = True
            elif self.method == "md5":
                salt = b"\x9a\x01\xfe\x33"
                conn.sendall(p.authentication_md5(salt))
                t, payload = self._read(conn, reader)
                ok = md5_verify(md5_secret(self.user, self.password), salt, p.parse_password(payload))
            else:
                conn.sendall(p.authentication_cleartext())
                t, payload = self._read(conn, reader)
                ok = cleartext_verify(self.password, p.parse_password(payload))
        except AuthFailed as e:
            self.outcome = f"failed: {e}"
        if not ok:
            self.outcome = self.outcome or "failed"
            conn.sendall(p.error_response("FATAL", "28P01", f'password authentication failed for user "{self.user}"'))
            return
        self.outcome = "ok"
        conn.sendall(p.authentication_ok()
                     + b"".join(p.parameter_status(k, v) for k, v in (
                         ("server_version", "15.0"), ("server_encoding", "UTF8"), ("client_encoding", "UTF8"),
                         ("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"), ("integer_datetimes", "on"),
                         ("standard_conforming_strings", "on")))
                     + p.backend_key_data(4242, b"\x00\x01\x02\x03")
                     + p.ready_for_query("I"))
        t, _ = self._read(conn, reader)
        assert t == p.F.TERMINATE

    def join(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error


@pytest.mark.parametrize("method", ["scram", "md5", "cleartext"])
def test_libpq_authenticates_against_our_server_side(method):
    srv = FakeServer(method, "alice", "wonder land\u00e9")
    with psycopg.connect(host="127.0.0.1", port=srv.port, user="alice", password="wonder land\u00e9",
                         dbname="db", sslmode="disable", connect_timeout=10) as conn:
        assert conn.info.backend_pid == 4242
    srv.join()
    assert srv.outcome == "ok"


@pytest.mark.parametrize("method", ["scram", "md5", "cleartext"])
def test_libpq_with_wrong_password_is_refused(method):
    srv = FakeServer(method, "alice", "right")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=srv.port, user="alice", password="wrong",
                        dbname="db", sslmode="disable", connect_timeout=10)
    srv.join()
    assert srv.outcome.startswith("failed")
