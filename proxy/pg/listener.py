"""The Postgres listener: one port for every config.

Per connection: SSLRequest → TLS with the edge certificate (or a configured one), startup
packet, SCRAM-SHA-256 against the config's generated credentials (the username names the
config), then ParameterStatus/BackendKeyData/ReadyForQuery and hand-over to a
`ClientSession`. CancelRequests are matched to the session by the proxy-generated key and
forwarded to the origin connection that session holds at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import TYPE_CHECKING, Any

from proxy.pg import protocol as pgp
from proxy.pg.auth import AuthFailed, ScramSecret, ScramServer
from proxy.pg.oneshot import SettingsRejected
from proxy.pg.pooling import _GUC_NAME, ClientCore, error_message
from proxy.pg.session import ClientSession
from proxy.pg.settings import FORBIDDEN_STARTUP, SessionSettings

if TYPE_CHECKING:
    from proxy.service import ProxyService

log = logging.getLogger("proxy.listener")

STARTUP_TIMEOUT = 15.0
# What a client that has not authenticated can make the edge hold (docs/ARCHITECTURE.md, bounds):
# startup packets are at most 10,000 bytes (PostgreSQL's own limit), a SASL message at most
# PostgreSQL's 65,535-byte auth token, and nothing more is buffered before login.
MAX_PREAUTH_BUFFER = 64 * 1024
MAX_AUTH_MESSAGE = 65535 + 4
MAX_NAME = 63  # bytes, as PostgreSQL's NAMEDATALEN - 1
# Startup parameters that are not session settings; every other valid name is a setting the
# client's session carries (proxy/pg/settings.py), judged by the origin at login.
PROTOCOL_PARAMS = {"user", "database", "replication", "options"}


def is_utf8(encoding: str) -> bool:
    """Whether PostgreSQL reads this client_encoding as UTF8 (it ignores case and punctuation)."""
    return "".join(ch for ch in encoding.lower() if ch.isalnum()) in ("utf8", "unicode")


class StartupProtocol(asyncio.Protocol):
    """From accept to the first ReadyForQuery; then the session takes the transport."""

    def __init__(self, service: ProxyService, ssl_context: ssl.SSLContext | None) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.transport: Any = None
        self.reader = pgp.StartupReader()
        self.stage = "startup"
        self.tls = False
        self.session: ClientSession | None = None
        self._scram: ScramServer | None = None
        self._config: Any = None
        self._params: dict[str, str] = {}
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._sasl_started = False
        self._ssl_seen = False  # at most one SSLRequest and one GSSENCRequest, as PostgreSQL
        self._gss_seen = False
        self._read_paused = False

    # ------------------------------------------------------------------ transport events
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(STARTUP_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        if self.session is None:
            self._fatal("08006", "startup took too long")

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)
            return
        try:
            if self.stage == "startup":
                self._startup(data)
            elif self.stage == "auth":
                self._auth(data)
            else:  # authenticated, session not set up yet: keep what the client pipelined
                self._buf += data
                if len(self._buf) > MAX_PREAUTH_BUFFER and not self._read_paused:
                    self._read_paused = True  # bounded: read on once the session is set up
                    self.transport.pause_reading()
        except pgp.PgProtocolError as exc:
            if str(exc).startswith("invalid length"):
                self._close_silently()  # as PostgreSQL: a broken packet is logged, not answered
            else:
                self._fatal("08P01", f"invalid startup packet: {exc}")

    def eof_received(self) -> bool | None:
        if self.session is not None:
            return self.session.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.session is not None:
            self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    # ------------------------------------------------------------------ startup
    def _startup(self, data: bytes) -> None:
        if self.reader.buffered + len(data) > MAX_PREAUTH_BUFFER:
            self._close_silently()  # far more than any startup sequence
            return
        event = self.reader.feed(data)
        while event is not None:  # several packets may come in one read: a loop, never recursion
            if isinstance(event, pgp.SslRequest):
                if self._ssl_seen:
                    self._close_silently()  # PostgreSQL accepts one SSLRequest per connection
                    return
                self._ssl_seen = True
                if self.tls or self.ssl_context is None:
                    self.transport.write(b"N")
                    event = self._next_packet()
                    continue
                self.transport.write(b"S")
                rest = self.reader.rest()
                if rest:  # a client must wait for 'S' before its ClientHello
                    self._fatal("08P01", "data received after SSLRequest before the TLS handshake")
                    return
                asyncio.get_running_loop().create_task(self._start_tls())
                return
            if isinstance(event, pgp.GssEncRequest):
                if self._gss_seen:
                    self._close_silently()  # and one GSSENCRequest
                    return
                self._gss_seen = True
                self.transport.write(b"N")
                event = self._next_packet()
                continue
            if isinstance(event, pgp.CancelRequest):
                self.service.cancel(event.pid, event.key)
                self.transport.close()
                return
            self._begin_auth(event.params)
            return

    def _next_packet(self) -> Any:
        rest = self.reader.rest()
        self.reader = pgp.StartupReader()
        return self.reader.feed(rest) if rest else None

    def _close_silently(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.ssl_context, server_side=True)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            log.info("TLS handshake with a client failed: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        self.tls = True
        self.reader = pgp.StartupReader()

    def _begin_auth(self, params: dict[str, str]) -> None:
        if not self.tls and "postgres" in getattr(self.service, "client_tls_required", ()):
            # hd edge --client-tls require (control/edge.py sets the attribute): as PgBouncer's client_tls_sslmode
            self._fatal("28000", "this edge accepts Postgres clients over TLS only (this connection is not encrypted)",
                        hint="connect with sslmode=verify-full and the edge's CA as sslrootcert: the connection"
                             " string from `hd hyperdrive get NAME --connection-string` does")
            return
        user = params.get("user", "")
        database = params.get("database") or user
        if len(user.encode()) > MAX_NAME or len(database.encode()) > MAX_NAME:
            self._fatal("42622", f"user and database names are limited to {MAX_NAME} bytes")
            return
        config = self.service.config_for_user(user)
        if config is None:
            self._fatal("28000", f"no Hyperdrive configuration has the user {user!r}",
                        hint="use the connection string from `hd hyperdrive get NAME --connection-string`")
            return
        if getattr(config, "scheme", "postgresql") == "mysql":
            self._fatal("28000", f"the Hyperdrive configuration {config.name!r} is for a MySQL origin",
                        hint="connect with a MySQL client to the connection string from"
                             " `hd hyperdrive get NAME --connection-string`")
            return
        if database not in (config.database, user):
            self._fatal("3D000", f"this configuration serves database {config.database!r}, not {database!r}")
            return
        try:
            extra = parse_options(params.get("options", ""))
        except ValueError as exc:
            self._fatal("0A000", str(exc))
            return
        params = {**params, **extra}
        forbidden = sorted(k for k in params if k.lower() in FORBIDDEN_STARTUP)
        if forbidden:
            self._fatal("0A000", f"startup parameter {forbidden[0]!r} is not supported by the proxy",
                        hint="set it inside a transaction, or with SET after connecting")
            return
        self._config = config
        self._params = params
        self._scram = ScramServer(ScramSecret.from_string(config.client_scram))
        self.transport.write(pgp.authentication_sasl(self._scram.mechanisms))
        self.stage = "auth"

    def _auth(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 5:
            length = int.from_bytes(self._buf[1:5], "big")
            if length < 4 or length > MAX_AUTH_MESSAGE:
                # never buffered: what an unauthenticated client claims is not taken on trust
                self._fatal("08P01", f"invalid message length {length} during authentication")
                return
            if len(self._buf) < 1 + length:
                return
            kind = self._buf[0]
            payload = bytes(self._buf[5:1 + length])
            del self._buf[:1 + length]
            if kind != ord("p"):
                self._fatal("08P01", "expected a SASL authentication message")
                return
            assert self._scram is not None
            try:
                if not self._sasl_started:
                    mechanism, first = pgp.parse_sasl_initial_response(payload)
                    if first is None:
                        raise AuthFailed("the SASL initial response carries no data")
                    if mechanism != "SCRAM-SHA-256":
                        raise AuthFailed(f"unsupported SASL mechanism {mechanism!r}")
                    self._sasl_started = True
                    self.transport.write(pgp.authentication_sasl_continue(self._scram.first(first)))
                else:
                    final = self._scram.final(payload)
                    self.transport.write(pgp.authentication_sasl_final(final))
                    self._authenticated()
                    return
            except AuthFailed as exc:
                log.info("client authentication failed for %s: %s", self._params.get("user"), exc)
                self._fatal("28P01", f"password authentication failed for user \"{self._params.get('user')}\"")
                return

    def _authenticated(self) -> None:
        self.stage = "ready"
        if self._timer is not None:
            self._timer.cancel()
        asyncio.get_running_loop().create_task(self._welcome())

    async def _welcome(self) -> None:
        config = self._config
        settings = {}
        for key, value in self._params.items():
            k = key.lower()
            if k in PROTOCOL_PARAMS or not _GUC_NAME.match(k):
                continue
            if k == "client_encoding" and is_utf8(value):
                continue  # the origin connections' own encoding: nothing to carry
            settings[k] = value
        try:
            pool = self.service.pool_for(config)
            parameters = await self.service.server_parameters(config)
            await self.service.catalog_ready(config)  # so even a first query is judged knowingly
            # The origin judges the client's settings now, as a direct connection would at login,
            # and says how it spells them (and what it reports for them).
            values, reported = await self.service.session_settings(config, settings)
        except SettingsRejected as exc:
            self._fatal_from_origin(exc.error)
            return
        except Exception as exc:
            msg = getattr(exc, "message", None) or str(exc)
            self._fatal("58000", f"Server connection attempt failed: {msg}")
            return
        if reported is None:
            reported = {k.encode(): v.encode() for k, v in parameters.items()}
        out = bytearray(pgp.authentication_ok())
        for name, value in reported.items():
            out += b"S" + (len(name) + len(value) + 6).to_bytes(4, "big") + name + b"\x00" + value + b"\x00"
        pid = secrets.randbits(31)
        key = secrets.token_bytes(4)
        out += pgp.backend_key_data(pid, key)
        out += pgp.ready_for_query("I")
        if self.transport.is_closing():
            return
        core = ClientCore(self.service.registry_for(config),
                          settings=SessionSettings(values, login_user=config.user, reported=reported),
                          cache=self.service.cache_context(config))
        session = ClientSession(self.transport, pool, core, on_close=self.service.session_closed,
                                cancel=self.service.cancel_server_for(config),
                                statement_timeout=self.service.statement_timeout_ms / 1000.0)
        session.cancel_key = (pid, key)
        self.session = session
        self.service.session_opened(session)
        self.transport.write(bytes(out))
        leftover = bytes(self._buf)
        self._buf.clear()
        if self._read_paused:  # before the session may pause reading for reasons of its own
            self._read_paused = False
            self.transport.resume_reading()
        if leftover:
            session.data_received(leftover)

    def _fatal(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(error_message(sqlstate, text, severity="FATAL", hint=hint))
        self.transport.close()

    def _fatal_from_origin(self, error: bytes) -> None:
        """The origin's own error, as FATAL: what a direct connection answers at login."""
        if self.transport is None or self.transport.is_closing():
            return
        fields = [f for f in error[5:-1].split(b"\x00") if f and f[:1] not in (b"S", b"V")]
        payload = b"SFATAL\x00VFATAL\x00" + b"".join(f + b"\x00" for f in fields) + b"\x00"
        self.transport.write(b"E" + (len(payload) + 4).to_bytes(4, "big") + payload)
        self.transport.close()


def parse_options(options: str) -> dict[str, str]:
    """The `-c name=value` / `--name=value` settings of a startup `options` string.

    Only settings the proxy can re-apply per server connection are taken; anything else is
    refused rather than ignored, so a client never silently runs with settings it did not get.
    """
    out: dict[str, str] = {}
    words = options.replace("\\ ", "\x00").split()
    i = 0
    while i < len(words):
        word = words[i].replace("\x00", " ")
        if word == "-c" and i + 1 < len(words):
            item = words[i + 1].replace("\x00", " ")
            i += 2
        elif word.startswith("-c"):
            item = word[2:]
            i += 1
        elif word.startswith("--"):
            item = word[2:]
            i += 1
        else:
            raise ValueError(f"startup option {word!r} is not supported by the proxy")
        name, sep, value = item.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or not _GUC_NAME.match(name) or name in FORBIDDEN_STARTUP:
            raise ValueError(f"startup option {item!r} is not supported by the proxy")
        out[name] = value
    return out
