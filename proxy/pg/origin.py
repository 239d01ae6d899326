"""Connections to origin PostgreSQL servers: dial (TCP or tunnel), TLS, startup, authentication.

    spec = OriginSpec(host="db.example", port=5432, database="app", user="app", password="…")
    conn = await connect_origin(spec, DirectDialer())     # raises OriginError(2008…2016)
    conn.channel          # a ByteChannel positioned after the first ReadyForQuery
    info = await probe(spec, DirectDialer())              # what `hd hyperdrive create` runs

Through a tunnel, `TunnelDialer(EdgeSession(Endpoint(url, pin)))` opens a stream to `spec.host`
(the tunnel route's hostname) with the config's CF-Access service token; everything after the
dial — SSLRequest, TLS (over `ssl.MemoryBIO`, `proxy/pg/tls.py`), startup, auth — is the same
code over a `StreamChannel` instead of a `TcpChannel`.

sslmode (libpq's meanings):
  require      TLS, certificate not checked (encrypts against passive listeners only). As in
               libpq, when a CA (`ca_pem`) is given, `require` verifies the chain like verify-ca.
  verify-ca    TLS, the chain must verify against `ca_pem` (or the system CAs if none given);
               the name in the certificate is not checked.
  verify-full  verify-ca and the certificate must name `host` (DNS name or IP SAN).
  disable      no TLS at all. Only for a direct connection to a loopback address (tests, a proxy
               beside its database); refused at construction for anything else.
A server that answers 'N' to SSLRequest fails with 2012 unless sslmode is "disable".
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
import ssl
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from proxy.channel import ByteChannel, StreamChannel, TcpChannel
from proxy.errors import (
    BAD_HOSTNAME,
    CANNOT_CONNECT,
    CONNECTION_REFUSED,
    DATABASE_NOT_FOUND,
    GENERIC,
    INVALID_CREDENTIALS,
    TEST_QUERY_FAILED,
    TLS_NOT_SUPPORTED,
    OriginError,
)
from proxy.pg import protocol as proto
from proxy.pg.auth import AuthFailed, ScramClient, md5_response
from proxy.pg.protocol import Auth, B, PgProtocolError, parse_error_fields
from proxy.pg.tls import TlsChannel, TlsHandshakeError

log = logging.getLogger(__name__)

SSLMODES = ("require", "verify-ca", "verify-full", "disable")
DEFAULT_CONNECT_TIMEOUT = 15.0  # Hyperdrive's initial connection timeout
MAX_HANDSHAKE_MESSAGE = 1 << 20  # no startup-phase message is anywhere near this
MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit for a message
_RESERVED_PARAMS = frozenset({"user", "database", "replication"})


# ============================================================================== configuration


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OriginSpec:
    """Everything needed to open one connection to an origin database.

    `port` is None for an origin reached through a tunnel (the route's service names the real
    address); `access_client_id`/`access_client_secret` are the CF-Access service token sent to
    the edge for tunnel routes covered by an Access application. Secrets are kept out of repr.
    """

    host: str
    port: int | None
    database: str
    user: str
    password: str | None = field(default=None, repr=False)
    sslmode: str = "require"
    ca_pem: bytes | None = field(default=None, repr=False)
    client_cert_pem: bytes | None = field(default=None, repr=False)
    client_key_pem: bytes | None = field(default=None, repr=False)
    access_client_id: str | None = None
    access_client_secret: str | None = field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    startup_params: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.host or len(self.host) > 253:
            raise ValueError("host must be a hostname or an IP address")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError("port must be 1..65535 (or None through a tunnel)")
        if self.sslmode not in SSLMODES:
            raise ValueError(f"sslmode must be one of {', '.join(SSLMODES)}")
        if self.sslmode == "disable" and (self.via_tunnel or not _is_loopback(self.host)):
            raise ValueError("sslmode=disable is only allowed for a direct connection to a loopback address")
        for name in ("user", "database"):
            value = getattr(self, name)
            if not value or len(value.encode()) > 63 or "\0" in value:
                raise ValueError(f"{name} must be 1..63 bytes without NUL")
        if (self.client_cert_pem is None) != (self.client_key_pem is None):
            raise ValueError("a client certificate needs its key (and the key its certificate)")
        if (self.access_client_id is None) != (self.access_client_secret is None):
            raise ValueError("access_client_id and access_client_secret go together")
        if not self.connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        for k, v in self.startup_params.items():
            if (not k or k in _RESERVED_PARAMS or k.startswith("_pq_") or "\0" in k or "\0" in v):
                raise ValueError(f"startup parameter {k!r} is not allowed")

    @property
    def via_tunnel(self) -> bool:
        return self.port is None or self.access_client_id is not None

    @property
    def address(self) -> str:
        """host:port, or the tunnel hostname (for messages; never contains a secret)."""
        if self.port is None:
            return f"{self.host} (through the tunnel)"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` only reads files: use an anonymous memory file where possible."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        try:
            for pem in (cert_pem, key_pem):
                fd = os.memfd_create("hd-origin-tls", getattr(os, "MFD_CLOEXEC", 0))
                fds.append(fd)
                os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="hd-origin-tls-") as d:  # created 0700
        cert_path, key_path = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        for path, pem in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        ctx.load_cert_chain(cert_path, key_path)


@functools.lru_cache(maxsize=64)
def _ssl_context(sslmode: str, ca_pem: bytes | None, cert_pem: bytes | None,
                 key_pem: bytes | None, alpn: str | None = "postgresql") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verify = sslmode in ("verify-ca", "verify-full") or (sslmode == "require" and ca_pem is not None)
    if verify:
        if ca_pem is not None:
            try:
                ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise OriginError(GENERIC, f"the CA certificate is not valid PEM: {exc}") from None
        else:
            ctx.load_default_certs()
        ctx.check_hostname = sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_pem is not None and key_pem is not None:
        try:
            _load_chain(ctx, cert_pem, key_pem)
        except (ssl.SSLError, OSError) as exc:
            raise OriginError(GENERIC, f"the client certificate or key is not valid: {exc}",
                              "give the certificate and its unencrypted private key in PEM") from None
    if alpn is not None:  # PostgreSQL 17's direct SSL negotiation; MySQL defines none
        ctx.set_alpn_protocols([alpn])
    return ctx


def ssl_context_for(spec: OriginSpec, alpn: str | None = "postgresql") -> ssl.SSLContext | None:
    """The (cached, shared) client SSLContext for a spec; None for sslmode=disable."""
    if spec.sslmode == "disable":
        return None
    return _ssl_context(spec.sslmode, spec.ca_pem, spec.client_cert_pem, spec.client_key_pem, alpn)


# ============================================================================== dialers


class Dialer(Protocol):
    """Opens the byte pipe to an origin; raises OriginError (2008/2010/2011/2013…)."""

    async def open(self, spec: OriginSpec) -> ByteChannel: ...


class DirectDialer:
    """TCP to spec.host:spec.port; every address DNS gives is tried in order within the timeout."""

    async def open(self, spec: OriginSpec) -> ByteChannel:
        if spec.port is None:
            raise OriginError(GENERIC, f"{spec.host}: no port given for a direct connection")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.connect_timeout
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM), spec.connect_timeout)
        except socket.gaierror as exc:
            raise OriginError(BAD_HOSTNAME, f"cannot resolve hostname {spec.host}: {exc.strerror or exc}",
                              "check the host name (DNS) of the configuration") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise OriginError(BAD_HOSTNAME, f"resolving hostname {spec.host} timed out") from None
        seen: set[tuple[Any, ...]] = set()
        refused: list[str] = []
        failed: list[str] = []
        timed_out = False
        for family, _type, _proto, _name, addr in infos:
            if addr in seen:
                continue
            seen.add(addr)
            remaining = deadline - loop.time()
            if remaining <= 0:
                timed_out = True
                break
            try:
                _, channel = await asyncio.wait_for(
                    loop.create_connection(TcpChannel, addr[0], addr[1], family=family), remaining)
                return channel
            except ConnectionRefusedError:
                refused.append(addr[0])
            except (asyncio.TimeoutError, TimeoutError):
                timed_out = True
            except OSError as exc:
                failed.append(f"{addr[0]}: {exc.strerror or exc}")
        where = spec.address
        if refused and not failed and not timed_out:
            raise OriginError(CONNECTION_REFUSED, f"connection to {where} refused",
                              "is the database listening on that address and port, and does the "
                              "firewall let the proxy in?")
        if timed_out:
            raise OriginError(CANNOT_CONNECT,
                              f"could not connect to {where} within {spec.connect_timeout:g}s",
                              "check the host and port, and that a firewall does not drop the connection")
        detail = "; ".join(failed + [f"{a}: connection refused" for a in refused]) or "no address"
        raise OriginError(CANNOT_CONNECT, f"could not connect to {where}: {detail}")


class TunnelDialer:
    """A stream through the edge to the tunnel route `spec.host`, over one `EdgeSession`.

    Refusals map to origin codes: 404 (no route / no ingress rule) → 2008, 503 no_connector →
    2010, 401/403 (Access) → 2013, 502 origin_unreachable (the connector was refused by the
    database) → 2011, 504 and other 502s → 2010.
    """

    def __init__(self, session: Any) -> None:
        self.session = session  # cli.access_client.EdgeSession (or anything with .open(host, headers))

    async def open(self, spec: OriginSpec) -> ByteChannel:
        from cli.access_client import StreamRefused
        from tunnel.tls import PinMismatch

        headers: dict[str, str] = {}
        if spec.access_client_id is not None and spec.access_client_secret is not None:
            headers = {"CF-Access-Client-Id": spec.access_client_id,
                       "CF-Access-Client-Secret": spec.access_client_secret}
        task = asyncio.ensure_future(self.session.open(spec.host, headers))
        try:
            done, _ = await asyncio.wait({task}, timeout=spec.connect_timeout)
        except asyncio.CancelledError:
            _drop_late_stream(task)
            raise
        if not done:
            _drop_late_stream(task)
            raise OriginError(CANNOT_CONNECT,
                              f"the edge did not open a stream to {spec.host} within {spec.connect_timeout:g}s")
        try:
            inbox, _resp = task.result()
        except StreamRefused as exc:
            raise _refusal_error(spec.host, exc.response) from None
        except PinMismatch as exc:
            raise OriginError(CANNOT_CONNECT, f"the edge's certificate does not match the pin: {exc}",
                              "check the edge endpoint and its certificate pin") from None
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            raise OriginError(CANNOT_CONNECT, f"cannot reach the edge for {spec.host}: {exc or type(exc).__name__}",
                              "is `hd edge` running and reachable from the proxy?") from None
        except ValueError as exc:
            raise OriginError(GENERIC, f"cannot open a tunnel stream to {spec.host}: {exc}") from None
        return StreamChannel.from_inbox(inbox)


def _drop_late_stream(task: asyncio.Future[Any]) -> None:
    """The stream may still open after we gave up: reset it then instead of leaking it."""

    def done(t: asyncio.Future[Any]) -> None:
        if t.cancelled() or t.exception() is not None:
            return
        inbox, _ = t.result()
        if not inbox.stream.closed:
            from tunnel.messages import RST_CANCEL
            inbox.stream.reset(RST_CANCEL, "the proxy gave up waiting")

    task.add_done_callback(done)


def _refusal_error(hostname: str, resp: Any) -> OriginError:
    status, code, error = resp.status, resp.code, resp.error
    if status == 404:
        return OriginError.no_tunnel_route(hostname, error if code != "no_route" else "")
    if status in (401, 403):
        return OriginError.access_denied(hostname, status, error)
    if status == 503 and code == "no_connector":
        return OriginError.no_connector(hostname)
    if status == 502 and code == "origin_unreachable":
        return OriginError(CONNECTION_REFUSED, f"the connector could not connect to the database for {hostname}: {error}",
                           "check the route's service address and that the database listens there")
    if status == 504:
        return OriginError(CANNOT_CONNECT, f"cannot connect to {hostname} through the tunnel: {error} ({status} {code})",
                           "the connector could not reach the database in time: check the route's service "
                           "address, that the database is up, and `hd tunnel route … --connect-timeout`")
    if status in (502, 503):
        return OriginError(CANNOT_CONNECT, f"cannot connect to {hostname} through the tunnel: {error} ({status} {code})",
                           "check that a connector for this tunnel is running and can reach the database")
    return OriginError(GENERIC, f"the edge refused the stream to {hostname}: {status} {code}: {error}")


# ============================================================================== wire helpers
# Builders and parsers come from proxy.pg.protocol; the startup phase frames with `WireReader`
# below (it must also read the single-byte SSLRequest answer and hand back exact leftovers).


def query_message(sql: str) -> bytes:
    return proto.query(sql)


TERMINATE = proto.terminate()


class WireReader:
    """Reads backend messages from a channel, for handshakes and short exchanges.

    Installs itself as the channel's receiver; `release()` removes it and returns the bytes
    received but not read (the channel then buffers until its next receiver).
    """

    def __init__(self, channel: ByteChannel, initial: bytes = b"", *, max_message: int = MAX_MESSAGE) -> None:
        self.channel = channel
        self.max_message = max_message
        self._buf = bytearray(initial)
        self._end: Exception | None = None
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        channel.set_receiver(self._on_data, self._on_close)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _on_data(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def _on_close(self, exc: Exception | None) -> None:
        self._ended = True
        self._end = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self._ended:
            detail = f": {self._end}" if self._end is not None else ""
            raise ConnectionResetError(f"the server closed the connection{detail}")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_byte(self) -> int:
        while not self._buf:
            await self._wait()
        b = self._buf[0]
        del self._buf[0]
        return b

    async def read_message(self) -> tuple[int, bytes]:
        """(type byte as an int — compare with `protocol.B.*` —, payload) of the next message."""
        while True:
            if len(self._buf) >= 5:
                (length,) = struct.unpack_from("!I", self._buf, 1)
                if length < 4 or length > self.max_message:
                    raise PgProtocolError(f"invalid message length {length} from the server")
                if len(self._buf) >= length + 1:
                    kind = self._buf[0]
                    body = bytes(self._buf[5:length + 1])
                    del self._buf[:length + 1]
                    return kind, body
            await self._wait()

    async def wait_closed(self) -> None:
        while not self._ended:
            self._buf.clear()
            await self._wait_quiet()

    async def _wait_quiet(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def release(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        self.channel.set_receiver(None, None)
        return rest


# ============================================================================== connecting


@dataclass(eq=False)
class OriginConnection:
    """An authenticated origin connection, positioned after its first ReadyForQuery.

    `channel` has no receiver when returned (it buffers; install one with `set_receiver`).
    `pending` holds bytes that had already arrived after ReadyForQuery (normally empty): a
    consumer must process them before anything the channel delivers. `created_at` is from
    the `clock` given to `connect_origin` (monotonic seconds by default).
    """

    channel: ByteChannel
    spec: OriginSpec = field(repr=False)
    parameters: dict[str, str]
    pid: int
    secret_key: bytes = field(repr=False)
    server_version: str
    created_at: float
    tls: bool
    auth: str  # "trust" | "password" | "md5" | "scram-sha-256"
    connect_ms: float
    transaction_status: str = "I"
    pending: bytes = b""
    notices: list[dict[str, str]] = field(default_factory=list)

    @property
    def leftover(self) -> bytes:
        """Alias of `pending`."""
        return self.pending

    def terminate(self) -> None:
        """Send Terminate and close the channel (graceful)."""
        if not self.channel.is_closing():
            self.channel.write(TERMINATE)
        self.channel.close()

    def abort(self) -> None:
        self.channel.abort()


class _Attempt:
    """State of one connection attempt, for error messages and cleanup."""

    def __init__(self, spec: OriginSpec) -> None:
        self.spec = spec
        self.phase = "connecting"
        self.channel: ByteChannel | None = None

    def abort(self) -> None:
        if self.channel is not None:
            self.channel.abort()


def _server_error(fields: dict[str, str], spec: OriginSpec) -> OriginError:
    code = fields.get("C", "")
    message = fields.get("M", "the server reported an error")
    if code in ("28P01", "28000"):
        hint = "check the user and password of the configuration"
        if "pg_hba.conf" in message:
            hint = ("the server's pg_hba.conf does not let this user/database in from the proxy's address "
                    "(it may require TLS or a client certificate)")
        elif "certificate" in message:
            hint = "the server requires a valid client certificate whose CN is the user name"
        return OriginError(INVALID_CREDENTIALS, message, hint, sqlstate=code)
    if code == "3D000":
        return OriginError(DATABASE_NOT_FOUND, message, "check the database name of the configuration",
                           sqlstate=code)
    if code == "42501":  # e.g. no CONNECT privilege on the database: a permissions failure
        return OriginError(TEST_QUERY_FAILED, message,
                           fields.get("H") or f"grant the user what it needs, e.g. GRANT CONNECT ON DATABASE "
                                              f"{spec.database} TO {spec.user}", sqlstate=code)
    return OriginError(GENERIC, message, fields.get("H") or "see the database server's log for details",
                       sqlstate=code or None)


async def _negotiate_tls(spec: OriginSpec, channel: ByteChannel, attempt: _Attempt) -> ByteChannel:
    """SSLRequest; on 'S' a TLS handshake. Returns the channel to speak PostgreSQL on."""
    ctx = ssl_context_for(spec)
    if ctx is None:
        return channel
    attempt.phase = "waiting for the answer to SSLRequest"
    reader = WireReader(channel, max_message=MAX_HANDSHAKE_MESSAGE)
    channel.write(proto.ssl_request())
    answer = await reader.read_byte()
    if answer == ord("N"):
        raise OriginError(TLS_NOT_SUPPORTED, f"the database at {spec.address} does not support TLS",
                          "turn on ssl in postgresql.conf (Hyperdrive-style configs require TLS)")
    if answer != ord("S"):
        raise OriginError(GENERIC, f"{spec.address} answered SSLRequest with {bytes([answer])!r}: "
                                   "is it a PostgreSQL server?")
    if reader.release():
        # CVE-2021-23222: bytes that arrive before the handshake were not protected by TLS
        raise OriginError(GENERIC, f"{spec.address} sent unencrypted data after its SSL response")
    attempt.phase = "in the TLS handshake"
    tls = TlsChannel(channel, ctx, server_hostname=spec.host.strip("[]"))
    attempt.channel = tls
    try:
        await tls.handshake()
    except TlsHandshakeError as exc:
        if exc.verification_failed:
            raise OriginError(GENERIC, f"{exc} ({spec.address})",
                              "check sslmode and the CA certificate (verify-full also checks the host name)") from None
        raise OriginError(GENERIC, f"{exc} ({spec.address})",
                          "the server may require a client certificate, or TLS settings the proxy does not offer") from None
    return tls


async def _authenticate(spec: OriginSpec, channel: ByteChannel, attempt: _Attempt) -> tuple[WireReader, str]:
    reader = WireReader(channel, max_message=MAX_HANDSHAKE_MESSAGE)
    params = {"user": spec.user, "database": spec.database, **spec.startup_params}
    attempt.phase = "during startup"
    channel.write(proto.startup_message(params))
    method = "trust"
    scram: ScramClient | None = None
    attempt.phase = "during authentication"
    while True:
        kind, body = await reader.read_message()
        if kind == B.ERROR_RESPONSE:
            raise _server_error(parse_error_fields(body), spec)
        if kind in (B.NEGOTIATE_PROTOCOL_VERSION, B.NOTICE_RESPONSE):
            continue  # we asked for plain 3.0: nothing to adapt; notices are not errors
        if kind != B.AUTHENTICATION:
            raise OriginError(GENERIC, f"unexpected message {proto.message_name(kind)} from {spec.address} "
                                       "during authentication")
        code, data = proto.parse_authentication(body)
        if code == Auth.OK:
            if scram is not None and not scram.done:
                raise OriginError(GENERIC, "the server ended SCRAM authentication early")
            return reader, method
        if code in (Auth.CLEARTEXT, Auth.MD5, Auth.SASL) and spec.password is None:
            raise OriginError(INVALID_CREDENTIALS, f"{spec.address} requires a password for user {spec.user}",
                              "set the password of the configuration")
        if code == Auth.CLEARTEXT:
            method = "password"
            channel.write(proto.password_message(spec.password.encode()))
        elif code == Auth.MD5:
            method = "md5"
            channel.write(proto.password_message(md5_response(spec.user, spec.password, data)))
        elif code == Auth.SASL:
            mechanisms = proto.parse_sasl_mechanisms(data)
            if "SCRAM-SHA-256" not in mechanisms:
                raise OriginError(GENERIC, f"the server offers only SASL mechanisms {mechanisms}, "
                                           "the proxy speaks SCRAM-SHA-256")
            method = "scram-sha-256"
            scram = ScramClient(spec.password)
            channel.write(proto.sasl_initial_response(scram.mechanism, scram.first()))
        elif code == Auth.SASL_CONTINUE:
            if scram is None:
                raise OriginError(GENERIC, "unexpected SASLContinue from the server")
            try:
                channel.write(proto.sasl_response(scram.final(data)))
            except AuthFailed as exc:
                raise OriginError(GENERIC, f"SCRAM exchange with {spec.address} failed: {exc}") from None
        elif code == Auth.SASL_FINAL:
            if scram is None:
                raise OriginError(GENERIC, "unexpected SASLFinal from the server")
            try:
                scram.verify(data)
            except AuthFailed as exc:
                raise OriginError(INVALID_CREDENTIALS, f"SCRAM authentication with {spec.address} failed: {exc}",
                                  "the server could not prove it knows the password: is it the right server?") from None
        else:
            names = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 9: "SSPI"}
            raise OriginError(GENERIC, f"{spec.address} asks for {names.get(code, f'authentication type {code}')}, "
                                       "which the proxy does not support",
                              "use scram-sha-256, md5 or password authentication for the proxy's user")


async def _connect(spec: OriginSpec, dialer: Dialer, attempt: _Attempt,
                   clock: Callable[[], float], started: float) -> OriginConnection:
    loop = asyncio.get_running_loop()
    attempt.phase = "connecting"
    channel = await dialer.open(spec)
    attempt.channel = channel
    channel = await _negotiate_tls(spec, channel, attempt)
    reader, method = await _authenticate(spec, channel, attempt)
    attempt.phase = "after authentication"
    parameters: dict[str, str] = {}
    notices: list[dict[str, str]] = []
    pid, key = 0, b""
    while True:
        kind, body = await reader.read_message()
        if kind == B.PARAMETER_STATUS:
            name, value = proto.parse_parameter_status(body)
            parameters[name] = value
        elif kind == B.BACKEND_KEY_DATA:
            pid, key = proto.parse_backend_key_data(body)
        elif kind == B.NOTICE_RESPONSE:
            notices.append(parse_error_fields(body))
        elif kind == B.ERROR_RESPONSE:
            raise _server_error(parse_error_fields(body), spec)
        elif kind == B.NEGOTIATE_PROTOCOL_VERSION:
            continue
        elif kind == B.READY_FOR_QUERY:
            status = proto.parse_ready_for_query(body)
            break
        else:
            raise OriginError(GENERIC, f"unexpected message {proto.message_name(kind)} from {spec.address} "
                                       "before ReadyForQuery")
    pending = reader.release()
    return OriginConnection(
        channel=channel, spec=spec, parameters=parameters, pid=pid, secret_key=key,
        server_version=parameters.get("server_version", ""), created_at=clock(),
        tls=isinstance(channel, TlsChannel), auth=method,
        connect_ms=(loop.time() - started) * 1000.0, transaction_status=status,
        pending=pending, notices=notices)


async def connect_origin(spec: OriginSpec, dialer: Dialer, *,
                         clock: Callable[[], float] = time.monotonic) -> OriginConnection:
    """Dial, SSLRequest/TLS per sslmode, StartupMessage, authenticate, collect ParameterStatus and
    BackendKeyData until ReadyForQuery. Bounded by `spec.connect_timeout` as a whole. Raises
    `OriginError`; nothing is left open on failure."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt = _Attempt(spec)
    try:
        async with asyncio.timeout(spec.connect_timeout):
            return await _connect(spec, dialer, attempt, clock, started)
    except TimeoutError:
        attempt.abort()
        if attempt.phase == "connecting":
            msg = f"could not connect to {spec.address} within {spec.connect_timeout:g}s"
        else:
            msg = f"{spec.address} did not complete the connection within {spec.connect_timeout:g}s ({attempt.phase})"
        raise OriginError(CANNOT_CONNECT, msg, "check the host and port, and that a firewall does not drop "
                                               "the connection") from None
    except OriginError:
        attempt.abort()
        raise
    except PgProtocolError as exc:
        attempt.abort()
        raise OriginError(GENERIC, f"{spec.address} broke the protocol {attempt.phase}: {exc}",
                          "is it a PostgreSQL server (and is the port right)?") from None
    except (ConnectionError, OSError) as exc:
        attempt.abort()
        raise OriginError(GENERIC, f"{spec.address} closed the connection {attempt.phase}: {exc}") from None
    except BaseException:
        attempt.abort()
        raise


async def probe(spec: OriginSpec, dialer: Dialer, *, test_query: str = ";") -> dict[str, Any]:
    """Connect, run the test query (`;` by default: EmptyQueryResponse + ReadyForQuery), Terminate.

    Returns {"server_version", "tls", "auth", "connect_ms"}; raises OriginError, with 2016 when
    the test query fails. This is what `hd hyperdrive create/update` run before saving a config.
    """
    conn = await connect_origin(spec, dialer)
    try:
        reader = WireReader(conn.channel, conn.pending)
        error: dict[str, str] | None = None
        try:
            async with asyncio.timeout(spec.connect_timeout):
                conn.channel.write(query_message(test_query))
                while True:
                    kind, body = await reader.read_message()
                    if kind == B.ERROR_RESPONSE:
                        error = parse_error_fields(body)
                    elif kind == B.READY_FOR_QUERY:
                        break
        except TimeoutError:
            raise OriginError(TEST_QUERY_FAILED,
                              f"the test query did not complete within {spec.connect_timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise OriginError(TEST_QUERY_FAILED, f"the server closed the connection during the test query: {exc}") from None
        except PgProtocolError as exc:
            raise OriginError(GENERIC, f"{spec.address} broke the protocol during the test query: {exc}") from None
        if error is not None:
            raise OriginError(TEST_QUERY_FAILED, f"the test query failed: {error.get('M', 'error')}",
                              "check that the user may connect to and use the database",
                              sqlstate=error.get("C"))
        reader.release()
        return {"server_version": conn.server_version, "tls": conn.tls, "auth": conn.auth,
                "connect_ms": round(conn.connect_ms, 2)}
    finally:
        conn.terminate()


async def cancel_request(spec: OriginSpec, dialer: Dialer, pid: int, key: bytes | int) -> None:
    """Ask the origin to cancel the query running on backend `pid` (authenticated by `key`).

    Opens a new connection — with SSLRequest/TLS per sslmode first, as libpq does — sends
    CancelRequest and waits (bounded) for the server to close it. Raises OriginError when the
    connection cannot be made; the server never says whether a cancel took effect.
    """
    if isinstance(key, int):
        key = struct.pack("!I", key)
    attempt = _Attempt(spec)
    try:
        async with asyncio.timeout(spec.connect_timeout):
            channel = await dialer.open(spec)
            attempt.channel = channel
            channel = await _negotiate_tls(spec, channel, attempt)
            attempt.phase = "sending CancelRequest"
            reader = WireReader(channel)
            channel.write(proto.cancel_request(pid, key))
            await reader.wait_closed()
    except TimeoutError:
        attempt.abort()
        if attempt.phase == "sending CancelRequest":
            return  # sent; the server just did not hang up in time
        raise OriginError(CANNOT_CONNECT, f"could not connect to {spec.address} within "
                                          f"{spec.connect_timeout:g}s to cancel a query") from None
    except OriginError:
        attempt.abort()
        raise
    except (ConnectionError, OSError) as exc:
        attempt.abort()
        if attempt.phase == "sending CancelRequest":
            return
        raise OriginError(GENERIC, f"{spec.address} closed the connection {attempt.phase}: {exc}") from None
    else:
        if attempt.channel is not None:
            attempt.channel.close()
