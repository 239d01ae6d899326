"""connect_mysql_origin against a scripted fake server on loopback: caching_sha2_password (which
MariaDB lacks) driven by `CachingSha2Server` from proxy/mysql/auth.py — fast path, full
authentication over RSA with the public key requested, AuthSwitchRequest — and greeting errors."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.errors import GENERIC, INVALID_CREDENTIALS, OriginError
from proxy.mysql import protocol as P
from proxy.mysql.auth import CACHING_SHA2_PASSWORD, CachingSha2Server, Done, Sha2Verifier, new_nonce
from proxy.mysql.origin import DirectDialer, OriginSpec, connect_mysql_origin

pytestmark = pytest.mark.timeout(30)

C = P.Capability
SERVER_CAPS = int(C.CLIENT_LONG_PASSWORD | C.CLIENT_LONG_FLAG | C.CLIENT_CONNECT_WITH_DB | C.CLIENT_PROTOCOL_41
                  | C.CLIENT_TRANSACTIONS | C.CLIENT_SECURE_CONNECTION | C.CLIENT_MULTI_STATEMENTS
                  | C.CLIENT_MULTI_RESULTS | C.CLIENT_PLUGIN_AUTH | C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                  | C.CLIENT_LOCAL_FILES | C.CLIENT_DEPRECATE_EOF | C.CLIENT_SESSION_TRACK)
PASSWORD = "sha2-Secret-9"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeServer:
    """A MySQL 8-like server for one connection at a time; records what it saw."""

    def __init__(self, *, cached: bool = True, greeting_plugin: str = CACHING_SHA2_PASSWORD,
                 greeting_err: P.ErrPacket | None = None, password: str = PASSWORD) -> None:
        self.cached = cached
        self.greeting_plugin = greeting_plugin
        self.greeting_err = greeting_err
        self.verifier = Sha2Verifier.from_password(password, cached=cached)
        self.login: P.HandshakeResponse41 | None = None
        self.client_packets: list[bytes] = []
        self.queries: list[str] = []
        self.result: Done | None = None
        self.server = None

    async def __aenter__(self) -> "FakeServer":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = P.PacketReader()
        queue: list[tuple[int, bytes]] = []

        async def read() -> tuple[int, bytes]:
            while not queue:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("client went away")
                queue.extend(framer.read(data))
            return queue.pop(0)

        def send(payload: bytes, seq: int) -> None:
            writer.write(P.frame(payload, seq))

        try:
            if self.greeting_err is not None:
                send(self.greeting_err.build(0), 0)  # pre-handshake ERR: no SQLSTATE
                await writer.drain()
                return
            sha2 = CachingSha2Server(self.verifier, new_nonce(), tls=False, private_key=KEY)
            greeting_nonce = sha2.nonce if self.greeting_plugin == CACHING_SHA2_PASSWORD else new_nonce()
            send(P.HandshakeV10("8.0.36-fake", 77, greeting_nonce, SERVER_CAPS, 255, 2,
                                self.greeting_plugin).build(), 0)
            seq, payload = await read()
            login = P.parse_client_handshake(payload)
            assert isinstance(login, P.HandshakeResponse41)
            self.login = login
            payload = login.auth_response
            if login.auth_plugin != CACHING_SHA2_PASSWORD:
                send(P.AuthSwitchRequest(CACHING_SHA2_PASSWORD, sha2.plugin_data).build(), seq + 1)
                seq, payload = await read()
            self.client_packets.append(payload)
            out = sha2.receive(payload)
            while not isinstance(out, Done):
                send(out, seq + 1)
                seq, payload = await read()
                self.client_packets.append(payload)
                out = sha2.receive(payload)
            self.result = out
            if out.send:
                seq += 1
                send(out.send, seq)
            if not out.ok:
                send(P.ErrPacket.for_code(1045, "Access denied for user 'u'@'localhost' (using password: YES)")
                     .build(), seq + 1)
                await writer.drain()
                return
            caps = login.capabilities
            send(P.OkPacket(status=2).build(caps), seq + 1)
            while True:
                seq, payload = await read()
                if payload[0] == P.Command.COM_QUIT:
                    return
                q = P.parse_com_query(payload)
                self.queries.append(q.sql)
                cols = [P.ColumnDefinition("x")]
                writer.write(P.text_result_set(cols, [["1"], [None]], capabilities=caps))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def spec(port: int, **kw) -> OriginSpec:
    args = dict(host="127.0.0.1", port=port, database="app", user="u", password=PASSWORD,
                sslmode="disable", connect_timeout=5)
    args.update(kw)
    return OriginSpec(**args)


async def test_caching_sha2_fast_path():
    async with FakeServer(cached=True) as srv:
        conn = await connect_mysql_origin(spec(srv.port), DirectDialer())
        try:
            assert conn.auth == CACHING_SHA2_PASSWORD and not conn.tls
            assert srv.result.ok and "fast auth" in srv.result.reason
            assert len(srv.client_packets) == 1 and len(srv.client_packets[0]) == 32
            login = srv.login
            assert login.user == "u" and login.database == "app" and login.charset == 255
            assert not login.capabilities & C.CLIENT_LOCAL_FILES
            assert not login.capabilities & C.CLIENT_MULTI_STATEMENTS
            assert login.capabilities & C.CLIENT_DEPRECATE_EOF and login.capabilities & C.CLIENT_MULTI_RESULTS
            assert conn.server_version == "8.0.36-fake" and conn.connection_id == 77 and not conn.is_mariadb
            r = await conn.query("SELECT x")
            assert r.rows == [[b"1"], [None]] and srv.queries == ["SELECT x"]
        finally:
            conn.close()


async def test_caching_sha2_full_auth_over_rsa_requests_the_key():
    async with FakeServer(cached=False) as srv:
        conn = await connect_mysql_origin(spec(srv.port), DirectDialer())
        try:
            assert srv.result.ok and "full authentication over RSA" in srv.result.reason
            scramble, key_request, ciphertext = srv.client_packets
            assert len(scramble) == 32 and key_request == b"\x02" and len(ciphertext) == 256
            assert conn.server_public_key is not None and b"PUBLIC KEY" in conn.server_public_key
        finally:
            conn.close()


async def test_auth_switch_to_caching_sha2():
    async with FakeServer(cached=False, greeting_plugin="mysql_native_password") as srv:
        conn = await connect_mysql_origin(spec(srv.port), DirectDialer())
        try:
            assert srv.login.auth_plugin == "mysql_native_password"
            assert conn.auth == CACHING_SHA2_PASSWORD and srv.result.ok
        finally:
            conn.close()


@pytest.mark.parametrize("cached", [True, False])
async def test_caching_sha2_wrong_password(cached):
    async with FakeServer(cached=cached) as srv:
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec(srv.port, password="wrong"), DirectDialer())
        assert ei.value.code == INVALID_CREDENTIALS and "Access denied" in ei.value.message
        assert srv.result is not None and not srv.result.ok


async def test_greeting_err():
    err = P.ErrPacket(1040, "Too many connections", "08004")
    async with FakeServer(greeting_err=err) as srv:
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec(srv.port), DirectDialer())
        assert ei.value.code == GENERIC and "Too many connections" in ei.value.message
        assert "max_connections" in ei.value.hint


async def test_not_a_mysql_server():
    async def http(reader, writer):
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(OriginError) as ei:
            await connect_mysql_origin(spec(port), DirectDialer())
        assert ei.value.code == GENERIC and "MySQL" in (ei.value.hint or "")
    finally:
        server.close()
