"""Connections to origin MySQL / MariaDB servers: dial (TCP or tunnel), TLS, login, authentication.

The MySQL twin of `proxy.pg.origin`, sharing its `OriginSpec`, dialers (`DirectDialer`,
`TunnelDialer`), `ByteChannel`s and `TlsChannel`, and its `OriginError` codes (2008–2016)::

    conn = await connect_mysql_origin(spec, DirectDialer())   # raises OriginError
    r = await conn.query("SELECT 1")        # protocol.Result (rows as bytes / None)
    await conn.ping(); await conn.reset()   # COM_PING, COM_RESET_CONNECTION
    conn.close()                            # COM_QUIT, then close
    info = await probe_mysql(spec, DirectDialer())

Connection phase (https://dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_connection_phase.html):
greeting (HandshakeV10, or an ERR: "Too many connections", "Host … is not allowed") → [SslRequest,
TLS handshake over the channel] → HandshakeResponse41 → the announced plugin's exchange, with
AuthSwitchRequest (to mysql_native_password or caching_sha2_password) and AuthMoreData
(caching_sha2 fast-auth success / full authentication: the cleartext password inside TLS, else
RSA-encrypted with the server's public key, which is requested) → OK or ERR. The whole phase is
bounded by `spec.connect_timeout`.

sslmode has the PostgreSQL side's meanings (see `proxy.pg.origin`): require (TLS; the chain is
verified when a CA is given), verify-ca, verify-full (also the host name), disable (plaintext, only
for a direct loopback origin). A server that does not offer CLIENT_SSL fails with 2012 unless
sslmode is disable.

Capabilities asked for: PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH, PLUGIN_AUTH_LENENC_CLIENT_DATA,
TRANSACTIONS, MULTI_RESULTS (CALL), CONNECT_WITH_DB, LONG_PASSWORD, LONG_FLAG, and when the server
offers them DEPRECATE_EOF and SESSION_TRACK (see `DEFAULT_CAPABILITIES`; the pool may pass its own
set to match its clients). Never LOCAL_FILES, MULTI_STATEMENTS, COMPRESS, QUERY_ATTRIBUTES or the
optional-metadata flags. Charset utf8mb4: 255 (utf8mb4_0900_ai_ci) when the server greets with it
(MySQL 8), else 45 (utf8mb4_general_ci).

Raw mode (for the pool): after `connect_mysql_origin` the channel has no receiver (it buffers);
`conn.pending` holds bytes already received after the login OK (normally empty) that a consumer
must handle before anything the channel delivers. `conn.set_receiver(on_data, on_close)` hands
those and then the channel to the consumer, `conn.write(bytes)` sends wire bytes (framed
packets), `conn.reply_reader()` makes a `ResultSetReader` with the negotiated capabilities and
current status; after each reply the consumer should store `reader.status` in `conn.status`
(`conn.in_transaction` then tells whether the connection must stay with its client). The
coroutine helpers (`query`, `ping`, `reset`, `change_user`) must not be used while a consumer
owns the receiver.

reset(): COM_RESET_CONNECTION (MySQL 5.7.3+, MariaDB 10.2.4+). A server that answers ERR 1047
(unknown command) is re-authenticated with COM_CHANGE_USER instead (`change_user()`), which also
clears session state (variables, temporary tables, transactions). Any other failure raises and
the connection must be closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from proxy.channel import ByteChannel
from proxy.errors import (
    CANNOT_CONNECT,
    DATABASE_NOT_FOUND,
    GENERIC,
    INVALID_CREDENTIALS,
    TEST_QUERY_FAILED,
    TLS_NOT_SUPPORTED,
    OriginError,
)
from proxy.mysql import protocol as P
from proxy.mysql.auth import (
    CACHING_SHA2_PASSWORD,
    NATIVE_PASSWORD,
    CachingSha2Client,
    Done,
    MySQLAuthError,
    NativePasswordClient,
    parse_nonce,
)
from proxy.mysql.protocol import Capability as C
from proxy.mysql.protocol import ErrPacket, MySQLProtocolError, Result, ResultSetReader, ServerStatus
from proxy.pg.origin import Dialer, DirectDialer, OriginSpec, TunnelDialer, ssl_context_for  # noqa: F401
from proxy.pg.tls import TlsChannel, TlsHandshakeError

log = logging.getLogger(__name__)

__all__ = ["connect_mysql_origin", "probe_mysql", "MySQLOriginConnection", "MySQLServerError",
           "DEFAULT_CAPABILITIES", "DirectDialer", "TunnelDialer", "OriginSpec"]

MAX_HANDSHAKE_PACKET = 1 << 20  # no connection-phase packet is anywhere near this
DEFAULT_COMMAND_TIMEOUT = 30.0

#: What the proxy asks an origin for (ANDed with what the server offers).
DEFAULT_CAPABILITIES = int(
    C.CLIENT_LONG_PASSWORD | C.CLIENT_LONG_FLAG | C.CLIENT_CONNECT_WITH_DB | C.CLIENT_PROTOCOL_41
    | C.CLIENT_TRANSACTIONS | C.CLIENT_SECURE_CONNECTION | C.CLIENT_MULTI_RESULTS | C.CLIENT_PLUGIN_AUTH
    | C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | C.CLIENT_SESSION_TRACK | C.CLIENT_DEPRECATE_EOF)
#: Never asked for, whatever the caller passes.
FORBIDDEN_CAPABILITIES = int(
    C.CLIENT_LOCAL_FILES | C.CLIENT_MULTI_STATEMENTS | C.CLIENT_COMPRESS | C.CLIENT_SSL
    | C.CLIENT_QUERY_ATTRIBUTES | C.CLIENT_OPTIONAL_RESULTSET_METADATA | C.CLIENT_ZSTD_COMPRESSION_ALGORITHM
    | C.MULTI_FACTOR_AUTHENTICATION | C.CLIENT_CONNECT_ATTRS | C.CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
    | C.CLIENT_SSL_VERIFY_SERVER_CERT | C.CLIENT_REMEMBER_OPTIONS | C.CLIENT_NO_SCHEMA | C.CLIENT_ODBC
    | C.CLIENT_INTERACTIVE | C.CLIENT_IGNORE_SPACE | C.CLIENT_CAPABILITY_EXTENSION) | ~0xFFFFFFFF
_REQUIRED = int(C.CLIENT_PROTOCOL_41 | C.CLIENT_SECURE_CONNECTION)

# server error codes with a specific meaning for a login
ER_DBACCESS_DENIED = 1044
ER_ACCESS_DENIED = 1045
ER_BAD_DB = 1049
ER_UNKNOWN_COM = 1047
ER_CON_COUNT = 1040
ER_TOO_MANY_USER_CONNECTIONS = 1203
ER_USER_LIMIT_REACHED = 1226
ER_HOST_IS_BLOCKED = 1129
ER_HOST_NOT_PRIVILEGED = 1130
ER_NOT_SUPPORTED_AUTH_MODE = 1251
ER_MUST_CHANGE_PASSWORD = (1820, 1862)
ER_ACCOUNT_LOCKED = (3118, 4151)
ER_SECURE_TRANSPORT_REQUIRED = 3159
ER_SERVER_SHUTDOWN = (1053, 1927)


_IN_TRANS = int(ServerStatus.SERVER_STATUS_IN_TRANS)  # plain int: IntFlag `&` runs in Python


class MySQLServerError(Exception):
    """The origin answered a command with ERR (the connection is still usable)."""

    def __init__(self, err: ErrPacket) -> None:
        super().__init__(f"ERROR {err.code} ({err.sqlstate}): {err.message}")
        self.err = err
        self.code = err.code
        self.sqlstate = err.sqlstate
        self.message = err.message


# ============================================================================== TLS


def mysql_ssl_context_for(spec: OriginSpec) -> ssl.SSLContext | None:
    """The (cached, shared) client SSLContext for a spec; None for sslmode=disable."""
    return ssl_context_for(spec, alpn=None)


# ============================================================================== packet stream


class _Packets:
    """Reads logical packets from a channel during the connection phase (and COM_CHANGE_USER).

    Installs itself as the channel's receiver; `release()` removes it and returns the wire bytes
    received but not read."""

    def __init__(self, channel: ByteChannel, initial: bytes = b"") -> None:
        self.channel = channel
        self.reader = P.PacketReader(MAX_HANDSHAKE_PACKET)
        self.queue: deque[tuple[int, bytes, bytes]] = deque()  # (seq, payload, raw)
        self.error: Exception | None = None
        self.ended = False
        self.end_exc: Exception | None = None
        self.last_seq = -1
        self._waiter: asyncio.Future[None] | None = None
        if initial:
            self._on_data(initial)
        channel.set_receiver(self._on_data, self._on_close)

    def _on_data(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            for pkt in self.reader.feed(data):
                self.queue.append((pkt[0], bytes(self.reader.payload(pkt)), bytes(self.reader.raw(pkt))))
        except MySQLProtocolError as exc:
            self.error = exc
        self._wake()

    def _on_close(self, exc: Exception | None) -> None:
        self.ended = True
        self.end_exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def buffered(self) -> bool:
        return bool(self.queue) or self.reader.buffered > 0

    async def read(self) -> bytes:
        """The next packet's payload (its sequence id is kept in `last_seq`)."""
        while not self.queue:
            if self.error is not None:
                raise self.error
            if self.ended:
                detail = f": {self.end_exc}" if self.end_exc is not None else ""
                raise ConnectionResetError(f"the server closed the connection{detail}")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        seq, payload, _ = self.queue.popleft()
        self.last_seq = seq
        if not payload:
            raise MySQLProtocolError("empty packet from the server")
        return payload

    def send(self, payload: bytes) -> None:
        """Frame `payload` with the sequence id after the last one received, and write it."""
        seq = (self.last_seq + 1) & 0xFF
        self.channel.write(P.frame(payload, seq))
        self.last_seq = seq + P.packet_parts(len(payload)) - 1

    def release(self) -> bytes:
        rest = b"".join(raw for _, _, raw in self.queue) + self.reader.rest()
        self.queue.clear()
        self.channel.set_receiver(None, None)
        return rest


# ============================================================================== errors


def _login_error(err: ErrPacket, spec: OriginSpec, *, tls: bool) -> OriginError:
    code, msg, state = err.code, err.message or "the server refused the connection", err.sqlstate
    text = f"{msg} (MySQL error {code})"
    if code == ER_ACCESS_DENIED:
        hint = "check the user and password of the configuration"
        if not tls:  # MariaDB also answers 1045 for REQUIRE SSL / require_secure_transport over plaintext
            hint += ("; if the server requires TLS for this user (REQUIRE SSL, require_secure_transport), "
                     "use sslmode require, verify-ca or verify-full")
        return OriginError(INVALID_CREDENTIALS, text, hint, sqlstate=state)
    if code == ER_HOST_NOT_PRIVILEGED:
        return OriginError(INVALID_CREDENTIALS, text,
                           f"the user may not connect from the proxy's address: create it as "
                           f"'{spec.user}'@'%' (or for the proxy's host)", sqlstate=state)
    if code in ER_ACCOUNT_LOCKED or code in ER_MUST_CHANGE_PASSWORD:
        return OriginError(INVALID_CREDENTIALS, text, "unlock the account or set a new password for the user",
                           sqlstate=state)
    if code == ER_BAD_DB:
        return OriginError(DATABASE_NOT_FOUND, text, "check the database name of the configuration",
                           sqlstate=state)
    if code == ER_DBACCESS_DENIED:
        return OriginError(DATABASE_NOT_FOUND, text,
                           f"the database {spec.database} does not exist or the user has no privileges on it: "
                           f"check the database name, or GRANT ALL ON `{spec.database}`.* TO the user",
                           sqlstate=state)
    if code in (ER_CON_COUNT, ER_TOO_MANY_USER_CONNECTIONS, ER_USER_LIMIT_REACHED):
        return OriginError(GENERIC, text, "the database refuses more connections: raise its max_connections "
                                          "(or the user's limit) or lower the configuration's connection limit",
                           sqlstate=state)
    if code == ER_HOST_IS_BLOCKED:
        return OriginError(GENERIC, text, "run FLUSH HOSTS (or mariadb-admin flush-hosts) on the database",
                           sqlstate=state)
    if code == ER_SECURE_TRANSPORT_REQUIRED or ("insecure transport" in msg.lower() and not tls):
        return OriginError(GENERIC, text,
                           "the database requires TLS: use sslmode require, verify-ca or verify-full",
                           sqlstate=state)
    if code == ER_NOT_SUPPORTED_AUTH_MODE:
        return OriginError(GENERIC, text, "use mysql_native_password or caching_sha2_password for the user",
                           sqlstate=state)
    if code in ER_SERVER_SHUTDOWN:
        return OriginError(CANNOT_CONNECT, text, "the database is shutting down; retry later", sqlstate=state)
    return OriginError(GENERIC, text, "see the database server's log for details", sqlstate=state)


# ============================================================================== the connection


@dataclass(eq=False)
class MySQLOriginConnection:
    """An authenticated origin connection, positioned after the login OK (see the module doc)."""

    channel: ByteChannel
    spec: OriginSpec = field(repr=False)
    server_version: str
    connection_id: int
    capabilities: int  # negotiated: what we sent (a subset of the server's offer)
    server_capabilities: int
    charset: int
    status: int  # ServerStatus flags from the latest OK/EOF
    tls: bool
    auth: str  # the plugin that authenticated: mysql_native_password | caching_sha2_password
    connect_ms: float
    created_at: float
    scramble: bytes = field(default=b"", repr=False)  # the greeting's nonce (COM_CHANGE_USER uses it)
    server_public_key: bytes | None = field(default=None, repr=False)  # RSA key learned in caching_sha2
    pending: bytes = b""
    closed: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    # ---------------------------------------------------------------- facts
    @property
    def is_mariadb(self) -> bool:
        return "mariadb" in self.server_version.lower() or not self.server_capabilities & P.CLIENT_MYSQL

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & _IN_TRANS)

    @property
    def deprecate_eof(self) -> bool:
        return bool(self.capabilities & C.CLIENT_DEPRECATE_EOF)

    @property
    def leftover(self) -> bytes:
        """Alias of `pending` (the name the pool looks for)."""
        return self.pending

    # ---------------------------------------------------------------- raw mode
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.channel.write(bytes(data))

    def set_receiver(self, on_data: Callable[[bytes], None] | None,
                     on_close: Callable[[Exception | None], None] | None) -> None:
        """Hand `pending` (first) and then the channel's data to a consumer; None, None detaches."""
        if on_data is not None and self.pending:
            pending, self.pending = self.pending, b""
            on_data(pending)
        self.channel.set_receiver(on_data, on_close)

    def reply_reader(self, *, keep: bool = False) -> ResultSetReader:
        """A `ResultSetReader` for the reply to the next command (sequence ids from 1)."""
        return ResultSetReader(self.capabilities, keep=keep, status=self.status)

    # ---------------------------------------------------------------- commands
    async def _command(self, payload: bytes, *, keep: bool = False,
                       timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> ResultSetReader:
        if self.closed or self.channel.is_closing():
            raise ConnectionResetError("the origin connection is closed")
        async with self._lock:
            rsr = self.reply_reader(keep=keep)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_data(data: bytes) -> None:
                try:
                    rsr.feed(data)
                except MySQLProtocolError as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                    return
                if rsr.done and not fut.done():
                    fut.set_result(None)

            def on_close(exc: Exception | None) -> None:
                if not fut.done():
                    detail = f": {exc}" if exc is not None else ""
                    fut.set_exception(ConnectionResetError(f"the origin closed the connection{detail}"))

            self.channel.write(P.frame(payload, 0))
            try:
                self.set_receiver(on_data, on_close)
                async with asyncio.timeout(timeout):
                    await fut
            except BaseException:
                self.abort()
                raise
            finally:
                if not self.channel.is_closing():
                    self.channel.set_receiver(None, None)
            self.pending = rsr.rest()
            if rsr.error is None:
                self.status = int(rsr.status)
            return rsr

    async def query_all(self, sql: str, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> list[Result]:
        """COM_QUERY; every result (a CALL has several), rows kept. ERR → `MySQLServerError`."""
        rsr = await self._command(P.ComQuery(sql).build(0), keep=True, timeout=timeout)
        if rsr.error is not None:
            raise MySQLServerError(rsr.error)
        return rsr.results

    async def query(self, sql: str, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> Result:
        """COM_QUERY for small (admin) queries: the first result set if any, else the last OK."""
        results = await self.query_all(sql, timeout=timeout)
        for r in results:
            if r.columns:
                return r
        return results[-1]

    async def scalar(self, sql: str, **kw: Any) -> str | None:
        """The first column of the first row, decoded (None for NULL or no row)."""
        r = await self.query(sql, **kw)
        if not r.rows or r.rows[0][0] is None:
            return None
        return r.rows[0][0].decode("utf-8", "surrogateescape")

    async def ping(self, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> None:
        rsr = await self._command(P.com_ping(), timeout=timeout)
        if rsr.error is not None:
            raise MySQLServerError(rsr.error)

    async def reset(self, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> str:
        """Clear session state: COM_RESET_CONNECTION, or COM_CHANGE_USER where the server does not
        know it (ERR 1047). Returns which was used ("reset_connection" | "change_user")."""
        rsr = await self._command(P.com_reset_connection(), timeout=timeout)
        if rsr.error is None:
            return "reset_connection"
        if rsr.error.code != ER_UNKNOWN_COM:
            raise MySQLServerError(rsr.error)
        await self.change_user(timeout=timeout)
        return "change_user"

    async def change_user(self, *, timeout: float | None = DEFAULT_COMMAND_TIMEOUT) -> None:
        """COM_CHANGE_USER to the same user and database: a full re-authentication that resets the
        session. Raises OriginError (login refused) or MySQLProtocolError/ConnectionError; the
        connection should be closed after a failure."""
        spec = self.spec
        async with self._lock:
            packets = _Packets(self.channel, self.pending)
            self.pending = b""
            try:
                async with asyncio.timeout(timeout):
                    client, plugin = _start_plugin(self.auth, spec, self.scramble, tls=self.tls,
                                                   public_key=self.server_public_key)
                    first = client.start()
                    caps = self.capabilities
                    body = [b"\x11", P.nul_str(spec.user.encode())]
                    if caps & C.CLIENT_SECURE_CONNECTION:
                        body.append(bytes([len(first)]) + first)
                    else:
                        body.append(P.nul_str(first))
                    body.append(P.nul_str(spec.database.encode()))
                    body.append(self.charset.to_bytes(2, "little"))
                    if caps & C.CLIENT_PLUGIN_AUTH:
                        body.append(P.nul_str(plugin.encode()))
                    packets.last_seq = -1
                    packets.send(b"".join(body))
                    ok, plugin, key = await _auth_loop(packets, client, plugin, spec, self.tls, self.capabilities)
            except BaseException:
                self.abort()
                raise
            self.pending = packets.release()
            self.auth = plugin
            self.server_public_key = key or self.server_public_key
            self.status = ok.status

    def close(self) -> None:
        """COM_QUIT, then close the channel (graceful)."""
        if not self.closed:
            self.closed = True
            if not self.channel.is_closing():
                self.channel.write(P.frame(P.com_quit(), 0))
        self.channel.close()

    terminate = close

    def abort(self) -> None:
        self.closed = True
        self.channel.abort()


# ============================================================================== connecting


class _Attempt:
    def __init__(self) -> None:
        self.phase = "connecting"
        self.channel: ByteChannel | None = None

    def abort(self) -> None:
        if self.channel is not None:
            self.channel.abort()


def _start_plugin(plugin: str, spec: OriginSpec, nonce: bytes, *, tls: bool,
                  public_key: bytes | None = None) -> tuple[Any, str]:
    password = spec.password or ""
    if plugin == CACHING_SHA2_PASSWORD:
        try:
            return CachingSha2Client(password, nonce, tls=tls, server_public_key=public_key), plugin
        except MySQLAuthError as exc:
            raise OriginError(GENERIC, str(exc), "caching_sha2_password passwords cannot contain NUL") from None
    # unknown greeting plugins: answer as mysql_native_password (the server switches if it must)
    return NativePasswordClient(password, nonce), NATIVE_PASSWORD


async def _auth_loop(packets: _Packets, client: Any, plugin: str, spec: OriginSpec, tls: bool,
                     caps: int) -> tuple[P.OkPacket, str, bytes | None]:
    """After the login (or COM_CHANGE_USER) was sent: AuthSwitch / AuthMoreData until OK or ERR."""
    switched = False
    while True:
        payload = await packets.read()
        kind = P.classify_reply(payload, auth=True)
        if kind == P.Reply.ERR:
            raise _login_error(P.parse_err(payload), spec, tls=tls)
        if kind == P.Reply.AUTH_SWITCH:
            if switched:
                raise OriginError(GENERIC, f"{spec.address} asked to switch authentication plugins twice")
            switched = True
            req = P.parse_auth_switch_request(payload)
            if req.plugin not in (NATIVE_PASSWORD, CACHING_SHA2_PASSWORD):
                raise OriginError(GENERIC, f"the user {spec.user} authenticates with the {req.plugin} plugin, "
                                           "which the proxy does not support",
                                  "use mysql_native_password or caching_sha2_password for the proxy's user")
            try:
                nonce = parse_nonce(req.data)
            except MySQLAuthError as exc:
                raise OriginError(GENERIC, f"{spec.address} sent a bad AuthSwitchRequest: {exc}") from None
            client, plugin = _start_plugin(req.plugin, spec, nonce, tls=tls)
            packets.send(client.start())
            continue
        step = client.receive(payload)  # OK or AuthMoreData
        if isinstance(step, Done):
            if not step.ok:
                raise OriginError(GENERIC, f"authentication with {spec.address} failed: {step.reason}")
            if kind != P.Reply.OK:  # pragma: no cover - Done(ok) only comes from an OK
                raise OriginError(GENERIC, "authentication ended without OK")
            key = getattr(client, "received_public_key", None)
            return P.parse_ok(payload, caps), plugin, key
        if step is not None:
            packets.send(step)


async def _connect(spec: OriginSpec, dialer: Dialer, attempt: _Attempt, capabilities: int,
                   clock: Callable[[], float], started: float) -> MySQLOriginConnection:
    loop = asyncio.get_running_loop()
    attempt.phase = "connecting"
    channel = await dialer.open(spec)
    attempt.channel = channel
    attempt.phase = "waiting for the server's greeting"
    packets = _Packets(channel)
    payload = await packets.read()
    if payload[0] == 0xFF:
        raise _login_error(P.parse_err(payload), spec, tls=False)
    try:
        hello = P.parse_handshake_v10(payload)
    except MySQLProtocolError as exc:
        raise OriginError(GENERIC, f"{spec.address} sent an unusable greeting: {exc}",
                          "is it a MySQL or MariaDB server (and is the port right)?") from None
    offered = hello.capabilities
    if offered & _REQUIRED != _REQUIRED:
        raise OriginError(GENERIC, f"the server at {spec.address} ({hello.server_version}) is too old: "
                                   "it lacks the 4.1 protocol", "the proxy needs MySQL 5.5+ or MariaDB 10+")
    caps = (capabilities & ~FORBIDDEN_CAPABILITIES) & offered | _REQUIRED
    caps &= 0xFFFFFFFF
    charset = P.Charset.UTF8MB4_0900_AI_CI if hello.charset == P.Charset.UTF8MB4_0900_AI_CI \
        else P.Charset.UTF8MB4_GENERAL_CI
    try:
        nonce = parse_nonce(hello.auth_data)
    except MySQLAuthError as exc:
        raise OriginError(GENERIC, f"{spec.address} sent an unusable greeting: {exc}") from None

    ctx = mysql_ssl_context_for(spec)
    tls = False
    if ctx is not None:
        if not offered & C.CLIENT_SSL:
            raise OriginError(TLS_NOT_SUPPORTED, f"the database at {spec.address} does not support TLS",
                              "configure ssl_cert/ssl_key on the server (Hyperdrive-style configs require TLS)")
        caps |= C.CLIENT_SSL
        attempt.phase = "starting TLS"
        packets.send(P.SslRequest(caps, charset=charset).build())
        seq = packets.last_seq
        if packets.buffered:
            raise OriginError(GENERIC, f"{spec.address} sent unexpected data after the greeting")
        packets.release()
        tls_channel = TlsChannel(channel, ctx, server_hostname=spec.host.strip("[]"))
        attempt.channel = tls_channel
        attempt.phase = "in the TLS handshake"
        try:
            await tls_channel.handshake()
        except TlsHandshakeError as exc:
            if exc.verification_failed:
                raise OriginError(GENERIC, f"{exc} ({spec.address})",
                                  "check sslmode and the CA certificate (verify-full also checks the host name)") from None
            raise OriginError(GENERIC, f"{exc} ({spec.address})",
                              "the server may require a client certificate, or TLS settings the proxy does not offer") from None
        channel = tls_channel
        tls = True
        packets = _Packets(channel)
        packets.last_seq = seq

    attempt.phase = "during authentication"
    client, plugin = _start_plugin(hello.auth_plugin or NATIVE_PASSWORD, spec, nonce, tls=tls)
    login = P.HandshakeResponse41(caps, spec.user, client.start(), database=spec.database,
                                  auth_plugin=plugin, charset=charset)
    packets.send(login.build())
    ok, plugin, key = await _auth_loop(packets, client, plugin, spec, tls, caps)
    pending = packets.release()
    return MySQLOriginConnection(
        channel=channel, spec=spec, server_version=hello.server_version, connection_id=hello.connection_id,
        capabilities=caps, server_capabilities=offered, charset=charset, status=ok.status, tls=tls,
        auth=plugin, connect_ms=(loop.time() - started) * 1000.0, created_at=clock(), scramble=nonce,
        server_public_key=key, pending=pending)


async def connect_mysql_origin(spec: OriginSpec, dialer: Dialer, *, capabilities: int = DEFAULT_CAPABILITIES,
                               clock: Callable[[], float] = time.monotonic) -> MySQLOriginConnection:
    """Dial, greeting, [SslRequest + TLS per sslmode], HandshakeResponse41, authenticate until OK.
    Bounded by `spec.connect_timeout` as a whole. Raises `OriginError`; nothing is left open on
    failure. `capabilities`: what to ask for (ANDed with the server's offer; forbidden bits and
    MariaDB's extended capabilities are dropped)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt = _Attempt()
    try:
        async with asyncio.timeout(spec.connect_timeout):
            return await _connect(spec, dialer, attempt, capabilities, clock, started)
    except TimeoutError:
        attempt.abort()
        if attempt.phase == "connecting":
            msg = f"could not connect to {spec.address} within {spec.connect_timeout:g}s"
        else:
            msg = (f"{spec.address} did not complete the connection within {spec.connect_timeout:g}s "
                   f"({attempt.phase})")
        raise OriginError(CANNOT_CONNECT, msg, "check the host and port, and that a firewall does not drop "
                                               "the connection") from None
    except OriginError:
        attempt.abort()
        raise
    except (MySQLProtocolError, MySQLAuthError) as exc:
        attempt.abort()
        raise OriginError(GENERIC, f"{spec.address} broke the protocol {attempt.phase}: {exc}",
                          "is it a MySQL or MariaDB server (and is the port right)?") from None
    except (ConnectionError, OSError) as exc:
        attempt.abort()
        hint = None
        if attempt.phase == "waiting for the server's greeting":
            hint = "is it a MySQL or MariaDB server (and is the port right)?"
        raise OriginError(GENERIC, f"{spec.address} closed the connection {attempt.phase}: {exc}", hint) from None
    except BaseException:
        attempt.abort()
        raise


async def probe_mysql(spec: OriginSpec, dialer: Dialer, *, test_query: str = "SELECT 1") -> dict[str, Any]:
    """Connect, run the test query, COM_QUIT. Returns {"server_version", "tls", "auth", "connect_ms",
    "flavor" ("mariadb"|"mysql")}; raises OriginError, with 2016 when the test query fails."""
    conn = await connect_mysql_origin(spec, dialer)
    try:
        try:
            await conn.query(test_query, timeout=spec.connect_timeout)
        except MySQLServerError as exc:
            raise OriginError(TEST_QUERY_FAILED, f"the test query failed: {exc.message} (MySQL error {exc.code})",
                              "check that the user may use the database", sqlstate=exc.sqlstate) from None
        except TimeoutError:
            raise OriginError(TEST_QUERY_FAILED,
                              f"the test query did not complete within {spec.connect_timeout:g}s") from None
        except MySQLProtocolError as exc:
            raise OriginError(GENERIC, f"{spec.address} broke the protocol during the test query: {exc}") from None
        except (ConnectionError, OSError) as exc:
            raise OriginError(TEST_QUERY_FAILED,
                              f"the server closed the connection during the test query: {exc}") from None
        return {"server_version": conn.server_version, "tls": conn.tls, "auth": conn.auth,
                "connect_ms": round(conn.connect_ms, 2), "flavor": "mariadb" if conn.is_mariadb else "mysql"}
    finally:
        conn.close()
