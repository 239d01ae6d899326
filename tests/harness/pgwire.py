"""A raw PostgreSQL wire client for tests that must control every byte (differential tests).

Built on the project's own sans-I/O pieces — `proxy.pg.protocol` frames and parses, builds the
startup and frontend messages; `proxy.pg.auth.ScramClient` does SCRAM-SHA-256 — so no new codec
is written here. Drivers hide exactly what these tests look at (message order, what arrives
before a Sync or a Flush), hence a client that sends the bytes it is given and returns every
backend message as it came::

    conn = await PgWire.connect("127.0.0.1", port, user="app", password="pw", database="app")
    conn.send(proto.parse("s1", "select 1") + proto.bind("", "s1") + proto.execute() + proto.sync())
    msgs = await conn.read_until(lambda m: m.type == "Z", timeout=10)
    print([m.describe() for m in msgs])

Every wait has a deadline: `PgWireTimeout` (an AssertionError) carries what did arrive.

`AnswerTracker` follows a server's answers to a list of frontend messages the way PostgreSQL
produces them (one answer per Parse/Bind/Describe/Execute/Close, none for Flush, a
ReadyForQuery per Sync and per simple Query, nothing for messages skipped after an error until
the next Sync), so a reader knows when an answer is complete without waiting for silence.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from proxy.pg import protocol as proto
from proxy.pg.auth import ScramClient, md5_response

# Backend message types that may come at any time, outside the answer to a request.
ASYNC_TYPES = frozenset("SNA")  # ParameterStatus, NoticeResponse, NotificationResponse


class PgWireError(Exception):
    """The server refused the connection or broke the protocol during startup."""

    def __init__(self, text: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.fields = dict(fields or {})


class PgWireClosed(PgWireError):
    """The server closed the connection."""


class PgWireTimeout(AssertionError):
    """A bounded wait ran out; `received` holds what arrived meanwhile."""

    def __init__(self, text: str, received: list["BackendMessage"]) -> None:
        super().__init__(text)
        self.received = received


# ----------------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class BackendMessage:
    type: str  # the type letter ('Z', 'D', 'E', ...)
    payload: bytes

    @property
    def raw(self) -> bytes:
        return self.type.encode() + struct.pack("!i", len(self.payload) + 4) + self.payload

    def fields(self) -> dict[str, str]:
        """ErrorResponse / NoticeResponse fields."""
        return proto.parse_error_fields(self.payload)

    def describe(self) -> str:
        """One readable line: `DataRow('1', 'one')`, `ErrorResponse(ERROR 22012 division by zero)`."""
        t, p = self.type, self.payload
        try:
            if t == "Z":
                return f"ReadyForQuery({proto.parse_ready_for_query(p)})"
            if t == "D":
                return "DataRow(" + ", ".join(_show_value(v) for v in proto.parse_data_row(p)) + ")"
            if t == "C":
                return f"CommandComplete({proto.parse_command_complete(p)!r})"
            if t in "EN":
                f = self.fields()
                name = "ErrorResponse" if t == "E" else "NoticeResponse"
                extra = "".join(f" {k}={f[k]!r}" for k in "DHP" if k in f)
                return f"{name}({f.get('V', f.get('S', '?'))} {f.get('C', '?')} {f.get('M', '')!r}{extra})"
            if t == "T":
                cols = ", ".join(f"{c.name}:{c.type_oid}{'/bin' if c.format else ''}"
                                 for c in proto.parse_row_description(p))
                return f"RowDescription({cols})"
            if t == "t":
                return f"ParameterDescription({list(proto.parse_parameter_description(p))})"
            if t == "S":
                name, value = proto.parse_parameter_status(p)
                return f"ParameterStatus({name}={value!r})"
            if t == "K":
                return "BackendKeyData(...)"
            if t == "R":
                return f"Authentication({proto.parse_authentication(p)[0]})"
        except proto.PgProtocolError:
            return f"MALFORMED {proto.message_name(ord(t))} {p!r}"
        simple = {"1": "ParseComplete", "2": "BindComplete", "3": "CloseComplete", "n": "NoData",
                  "I": "EmptyQueryResponse", "s": "PortalSuspended"}
        if t in simple:
            return simple[t] if not p else f"{simple[t]}(+{p!r})"
        return f"{proto.message_name(ord(t))}({p[:60]!r})"


def _show_value(v: bytes | None) -> str:
    if v is None:
        return "NULL"
    try:
        return repr(bytes(v).decode())
    except UnicodeDecodeError:
        return bytes(v).hex()


def describe_frontend(raw: bytes) -> str:
    """One readable line for a frontend message (used to print a generated sequence)."""
    t, p = chr(raw[0]), raw[5:]
    try:
        if t == "P":
            name, query, oids = proto.parse_parse(p)
            return f"Parse({name!r}, {query!r}{', oids=' + repr(list(oids)) if oids else ''})"
        if t == "B":
            b = proto.parse_bind(p)
            parts = [repr(b.portal), repr(b.statement), "[" + ", ".join(_show_value(v) for v in b.params) + "]"]
            if b.param_formats:
                parts.append(f"param_formats={list(b.param_formats)}")
            if b.result_formats:
                parts.append(f"result_formats={list(b.result_formats)}")
            return "Bind(" + ", ".join(parts) + ")"
        if t == "D":
            kind, name = proto.parse_describe(p)
            return f"Describe({kind}, {name!r})"
        if t == "C":
            kind, name = proto.parse_close(p)
            return f"Close({kind}, {name!r})"
        if t == "E":
            portal, rows = proto.parse_execute(p)
            return f"Execute({portal!r}{f', max_rows={rows}' if rows else ''})"
        if t == "Q":
            return f"Query({proto.parse_query(p)!r})"
    except proto.PgProtocolError:
        pass
    names = {"S": "Sync", "H": "Flush", "X": "Terminate"}
    return names.get(t) or f"{proto.message_name(raw[0], backend=False)}({p[:60]!r})"


def split_frontend(data: bytes) -> list[bytes]:
    """Typed frontend messages of `data`, each as its raw bytes."""
    reader = proto.MessageReader()
    msgs = reader.feed(data)
    if reader.buffered:
        raise ValueError("trailing partial message")
    return [bytes(reader.raw(m)) for m in msgs]


# ----------------------------------------------------------------------------------- the client

def _insecure_tls() -> ssl.SSLContext:
    """libpq's sslmode=require: encrypt, verify nothing (test servers are self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def served_certificate(host: str, port: int, timeout: float = 10.0) -> bytes:
    """The DER certificate a Postgres listener presents after an SSLRequest (read, not verified:
    the tests compare it with the one they expect)."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))
        assert raw.recv(1) == b"S"
        with _insecure_tls().wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


@dataclass
class PgWire:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    startup: list[BackendMessage] = field(default_factory=list)  # AuthenticationOk .. ReadyForQuery
    _frames: proto.MessageReader = field(default_factory=proto.MessageReader)
    _ready: deque[BackendMessage] = field(default_factory=deque)
    closed: bool = False

    @classmethod
    async def connect(cls, host: str, port: int, *, user: str, password: str | None, database: str,
                      params: Mapping[str, str] | None = None, tls: bool = False,
                      timeout: float = 10.0) -> "PgWire":
        """Connect, [SSLRequest → TLS], StartupMessage, authenticate (SCRAM-SHA-256, md5,
        cleartext or trust) and read up to the first ReadyForQuery (kept in `startup`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        conn = cls(reader, writer)
        try:
            if tls:
                writer.write(proto.ssl_request())
                answer = await asyncio.wait_for(reader.readexactly(1), max(0.01, deadline - loop.time()))
                if answer != b"S":
                    raise PgWireError(f"the server refused TLS (answered {answer!r})")
                await asyncio.wait_for(writer.start_tls(_insecure_tls()), max(0.01, deadline - loop.time()))
            writer.write(proto.startup_message({"user": user, "database": database, **(params or {})}))
            await conn._authenticate(user, password, deadline)
            conn.startup = await conn.read_until(lambda m: m.type == "Z", deadline - loop.time(),
                                                 what="the startup's ReadyForQuery")
            for m in conn.startup:
                if m.type == "E":
                    raise PgWireError(f"startup failed: {m.describe()}", m.fields())
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _authenticate(self, user: str, password: str | None, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        scram: ScramClient | None = None
        while True:
            m = await self.recv(deadline - loop.time())
            if m.type == "E":
                raise PgWireError(f"authentication failed: {m.describe()}", m.fields())
            if m.type != "R":
                raise PgWireError(f"unexpected {m.describe()} during authentication")
            code, data = proto.parse_authentication(m.payload)
            if code == proto.Auth.OK:
                self.startup.append(m)
                return
            if password is None:
                raise PgWireError(f"the server asks for a password (authentication request {code})")
            if code == proto.Auth.SASL:
                if ScramClient.mechanism not in proto.parse_sasl_mechanisms(data):
                    raise PgWireError(f"no supported SASL mechanism in {data!r}")
                scram = ScramClient(password)
                self.send(proto.sasl_initial_response(ScramClient.mechanism, scram.first()))
            elif code == proto.Auth.SASL_CONTINUE and scram is not None:
                self.send(proto.sasl_response(scram.final(data)))
            elif code == proto.Auth.SASL_FINAL and scram is not None:
                scram.verify(data)
            elif code == proto.Auth.MD5:
                self.send(proto.password_message(md5_response(user, password, data)))
            elif code == proto.Auth.CLEARTEXT:
                self.send(proto.password_message(password.encode()))
            else:
                raise PgWireError(f"unsupported authentication request {code}")

    # -------------------------------------------------------------------------------- I/O
    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def buffered(self) -> list[BackendMessage]:
        """Messages already received and not yet returned (no waiting)."""
        out = list(self._ready)
        self._ready.clear()
        return out

    async def recv(self, timeout: float) -> BackendMessage:
        """The next backend message; `asyncio.TimeoutError` after `timeout` seconds,
        `PgWireClosed` when the server closed the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready:
            if self.closed:
                raise PgWireClosed("the server closed the connection")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError()
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except (ConnectionError, ssl.SSLError) as exc:
                self.closed = True
                raise PgWireClosed(f"the connection broke: {exc}") from None
            if not data:
                self.closed = True
                continue
            self._take(data)
        return self._ready.popleft()

    def _take(self, data: bytes) -> None:
        frames = self._frames
        for t, s, e in frames.feed(data):
            self._ready.append(BackendMessage(chr(t), bytes(frames.buf[s + 5:e])))

    async def read_until(self, done: Callable[[BackendMessage], bool], timeout: float,
                         what: str = "an answer") -> list[BackendMessage]:
        """Messages up to and including the first for which `done(msg)` is true."""
        out: list[BackendMessage] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                m = await self.recv(deadline - loop.time())
            except asyncio.TimeoutError:
                raise PgWireTimeout(f"no {what} within {timeout:.1f}s", out) from None
            except PgWireClosed as exc:
                raise PgWireTimeout(f"connection closed before {what}: {exc}", out) from None
            out.append(m)
            if done(m):
                return out

    async def query(self, sql: str, timeout: float = 10.0) -> list[BackendMessage]:
        """A simple Query; every message up to its ReadyForQuery."""
        self.send(proto.query(sql))
        return await self.read_until(lambda m: m.type == "Z", timeout, what=f"ReadyForQuery after {sql!r}")

    def abort(self) -> None:
        self.closed = True
        transport = self.writer.transport
        if transport is not None:
            transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        """Terminate and close; bounded."""
        if not self.closed:
            try:
                self.writer.write(proto.terminate())
            except (ConnectionError, RuntimeError):
                pass
        self.closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout)
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
            self.abort()


# ----------------------------------------------------------------------------------- the tracker

class AnswerTracker:
    """Which frontend request each backend message answers, as PostgreSQL sends them.

    `requests` are raw frontend messages (Parse, Bind, Describe, Execute, Close, Flush, Sync,
    Query). Feed every backend message in arrival order; `owner` of each fed message is the
    index of the request it answers (None for an asynchronous message or an unexpected one,
    which is also listed in `unexpected`). After an ErrorResponse to an extended-protocol
    message the server ignores everything up to the next Sync, simple Queries included.
    """

    def __init__(self, requests: Iterable[bytes]) -> None:
        self.kinds: list[str] = []
        for raw in requests:
            k = chr(raw[0])
            if k in "DC":  # Describe / Close: statement or portal
                k += chr(raw[5])
            self.kinds.append(k)
        self.i = 0
        self.skipping = False
        self.described = False  # a Describe S got its ParameterDescription
        self.ready = 0
        self.owners: list[int | None] = []
        self.unexpected: list[int] = []  # positions (in fed order) of messages that fit no request

    def _advance(self) -> None:
        kinds = self.kinds
        while self.i < len(kinds) and (kinds[self.i] == "H" or (self.skipping and kinds[self.i] != "S")):
            self.i += 1

    def feed(self, msg: BackendMessage) -> None:
        t = msg.type
        if t in ASYNC_TYPES:
            self.owners.append(None)
            return
        self._advance()
        if self.i >= len(self.kinds):
            self.owners.append(None)
            self.unexpected.append(len(self.owners) - 1)
            return
        k = self.kinds[self.i]
        owner = self.i
        ok, done = self._fits(k, t)
        if not ok:
            self.owners.append(None)
            self.unexpected.append(len(self.owners) - 1)
            return
        self.owners.append(owner)
        if t == "E" and k not in ("Q", "S"):
            self.skipping = True
            done = True
        if done:
            self.i += 1
            self.described = False
            if t == "Z":
                self.ready += 1
                self.skipping = False

    def _fits(self, k: str, t: str) -> tuple[bool, bool]:
        """(does message type t belong to request kind k, does it end that request's answer)"""
        if k == "Q":
            return True, t == "Z"
        if k == "S":
            return t == "Z", True
        if t == "E":
            return True, True
        if k == "P":
            return t == "1", True
        if k == "B":
            return t == "2", True
        if k in ("CS", "CP"):
            return t == "3", True
        if k == "DS":
            if t == "t" and not self.described:
                self.described = True
                return True, False
            return t in "Tn" and self.described, True
        if k == "DP":
            return t in "Tn", True
        if k == "E":
            if t == "D":
                return True, False
            return t in "CIs", True
        return False, False

    def answered(self, upto: int) -> bool:
        """Whether every request with index <= `upto` has its whole answer (skipped ones count)."""
        j = self.i
        kinds = self.kinds
        while j <= upto and j < len(kinds) and (kinds[j] == "H" or (self.skipping and kinds[j] != "S")):
            j += 1
        return j > upto
