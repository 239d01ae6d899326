"""The MySQL listener side: one client connection, from greeting to COM_QUIT.

Login: Handshake v10 (the origins' server version, this session's id) → optional SSLRequest and
TLS (a `TlsCore` on memory BIOs, so bytes a client sends right after its SSLRequest are not lost)
→ HandshakeResponse41, whose username names the config → `mysql_native_password` or
`caching_sha2_password` (fast path, or full authentication over TLS or with the listener's RSA
key) against the config's generated password → OK.

The session (docs/ARCHITECTURE.md, "The MySQL session model"). The proxy keeps what a client's
session consists of — autocommit, character set and collation (from the handshake, then SET
NAMES...), session variables SET to constants, LAST_INSERT_ID() — and brings whichever origin
connection runs the client's next statement to it with one SET pipelined in front of the
statement, its reply swallowed (proxy/mysql/exchange.py, proxy/mysql/state.py). The client holds
an origin connection, instead of giving it back after each reply, while:

* a transaction is open: the origin reports IN_TRANS, or autocommit is off and the client ran a
  statement since its last COMMIT / ROLLBACK (MariaDB does not report IN_TRANS for reads), or a
  SET TRANSACTION waits for the next transaction;
* it is pinned: it made state the proxy cannot replay (temporary tables, user variables, SQL
  prepared statements, user locks, CALL ...): for the rest of its session (logged);
* the last reply left warnings or an error (or followed SQL_CALC_FOUND_ROWS) that the next
  statement may read (SHOW WARNINGS, @@warning_count, FOUND_ROWS()): the next statement runs on
  the same connection, and the hold ends once a statement clears the diagnostics.

A connection goes back to the pool as it is when its client left nothing but carried settings
(the next client's SET covers the difference), else it is reset (COM_RESET_CONNECTION, which
also rolls back). A client that vanishes while a command runs gets it killed at the origin
(`MySQLServerConn.abandon`). KILL from another client is routed by session id (kill.py).

Refused with an ERR that says what to do instead, the connection staying usable: prepared
statements (binary protocol), COM_INIT_DB and USE, multi-statement queries, non-UTF-8 text and
character sets, COM_CHANGE_USER, KILL forms other than an id, and ROW_COUNT()/FOUND_ROWS() when
the statement before did not run on the connection the client holds.

Caching (proxy/mysql/caching.py): a cacheable read outside a transaction, by a client holding no
connection, is answered from the cache when fresh (or stale within swr, with one background
refresh), waits for an identical query already in flight, or fills the cache from the reply it
streams; writes invalidate. The key covers the client's carried settings.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy.cache.store import Fill
from proxy.mysql import kill as K
from proxy.mysql import protocol as P
from proxy.mysql import state as S
from proxy.mysql.auth import (
    CACHING_SHA2_PASSWORD,
    NATIVE_PASSWORD,
    CachingSha2Server,
    Done,
    NativePasswordServer,
    Sha2Verifier,
    caching_sha2_digest,
    native_password_hash,
    new_nonce,
)
from proxy.mysql.caching import Capture, QueryPlan, invalidate, needs_views, plan_query, view_catalog
from proxy.mysql.exchange import CLIENT, Exchange, Step, com_query
from proxy.mysql.facts import OriginFacts, facts_for, greeting_version, known_versions
from proxy.pg.tls import TlsCore
from proxy.pool import PoolError

if TYPE_CHECKING:
    from proxy.mysql.pool import MySQLServerConn
    from proxy.service import ProxyService

log = logging.getLogger("proxy.mysql")

LOGIN_TIMEOUT = 15.0
MAX_PRELOGIN_PACKET = 64 * 1024
MAX_QUEUED_BYTES = 1 << 20  # commands a client may send ahead of its answers before it is not read
WARMUP_TIMEOUT = 3.0  # the first greeting after a start waits this long at most for an origin's version
C = P.Capability
# What the proxy offers clients: the classic reply format (pooled origin connections use the
# same, see pool.POOL_CAPABILITIES), no LOCAL INFILE, no multi-statements, no compression.
OFFERED = int(
    C.CLIENT_LONG_PASSWORD | C.CLIENT_FOUND_ROWS | C.CLIENT_LONG_FLAG | C.CLIENT_CONNECT_WITH_DB
    | C.CLIENT_PROTOCOL_41 | C.CLIENT_TRANSACTIONS | C.CLIENT_SECURE_CONNECTION | C.CLIENT_MULTI_RESULTS
    | C.CLIENT_PS_MULTI_RESULTS | C.CLIENT_PLUGIN_AUTH | C.CLIENT_CONNECT_ATTRS
    | C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
# UTF-8 collation ids (MySQL and MariaDB agree below 256): utf8mb3 33, 76, 83, 192-215, 223;
# utf8mb4 45, 46, 224-247, 255 (MySQL 8's utf8mb4_0900_ai_ci).
UTF8_CHARSETS = frozenset({33, 45, 46, 76, 83, 223, 255} | set(range(192, 216)) | set(range(224, 248)))

# caching_sha2_password keeps a per-account cache of verified digests (MySQL does the same):
# the first login of a config after a restart takes the full path, later ones the fast path.
_SHA2_SEEN: set[tuple[str, bytes]] = set()

# Plain ints: IntFlag `&` runs in Python.
_IN_TRANS = int(P.ServerStatus.SERVER_STATUS_IN_TRANS)
_AUTOCOMMIT = int(P.ServerStatus.SERVER_STATUS_AUTOCOMMIT)
_KEEP_STATUS = int(P.ServerStatus.SERVER_STATUS_IN_TRANS | P.ServerStatus.SERVER_STATUS_NO_BACKSLASH_ESCAPES
                   | P.ServerStatus.SERVER_STATUS_IN_TRANS_READONLY | P.ServerStatus.SERVER_STATUS_ANSI_QUOTES)
_MODE_STATUS = int(P.ServerStatus.SERVER_STATUS_NO_BACKSLASH_ESCAPES | P.ServerStatus.SERVER_STATUS_ANSI_QUOTES)
_LID_CAPTURE = com_query("SELECT LAST_INSERT_ID()")
ER_NO_SUCH_THREAD, ER_KILL_DENIED, ER_CONNECTION_KILLED = 1094, 1095, 1927

_REFUSALS = {
    P.Command.COM_STMT_PREPARE: "prepared statements (the binary protocol) are not supported through the proxy; "
                                "use client-side parameter interpolation (e.g. mysql2 query() instead of "
                                "execute(), PyMySQL's %s parameters)",
    P.Command.COM_STMT_EXECUTE: "prepared statements (the binary protocol) are not supported through the proxy",
    P.Command.COM_STMT_SEND_LONG_DATA: "prepared statements (the binary protocol) are not supported through the proxy",
    P.Command.COM_STMT_FETCH: "prepared statements (the binary protocol) are not supported through the proxy",
    P.Command.COM_INIT_DB: "changing the database (COM_INIT_DB / USE) is not supported through the proxy; "
                           "create one Hyperdrive config per database and connect to it",
    P.Command.COM_CHANGE_USER: "COM_CHANGE_USER is not supported through the proxy; open a new connection",
    P.Command.COM_FIELD_LIST: "COM_FIELD_LIST is not supported through the proxy; use SHOW COLUMNS",
    P.Command.COM_BINLOG_DUMP: "replication is not supported through the proxy",
}
_READS_LAST = ("ROW_COUNT(), FOUND_ROWS() and LASTVAL() read what the previous statement left on its connection: "
               "through the proxy they work inside a transaction, or right after SQL_CALC_FOUND_ROWS")


class _Warmup:
    """The first clients after a start are greeted once an origin's version is known (bounded)."""

    task: asyncio.Task[None] | None = None
    tried_at = float("-inf")

    @classmethod
    def needed(cls, service: Any) -> asyncio.Task[None] | None:
        if known_versions():
            return None
        if cls.task is None and time.monotonic() - cls.tried_at > 30.0:
            cls.tried_at = time.monotonic()
            cls.task = asyncio.get_running_loop().create_task(cls._run(service))
        return cls.task

    @classmethod
    async def _run(cls, service: Any) -> None:
        try:
            configs = [c for c in service.store.list_hyperdrives() if getattr(c, "scheme", "") == "mysql"]
            for config in configs[:4]:
                pool = service.mysql_pool_for(config)
                conn = await pool.acquire()
                pool.release(conn)
                if known_versions():
                    return
        except Exception as exc:  # noqa: BLE001 - the fallback version is used meanwhile
            log.info("could not learn an origin's MySQL server version: %s", exc)
        finally:
            cls.task = None


class MySQLClientProtocol(asyncio.Protocol):
    def __init__(self, service: ProxyService, ssl_context: ssl.SSLContext | None) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.transport: Any = None
        # Before login a client can make the edge hold at most one small packet (the handshake
        # response is a few hundred bytes): no multi-packet payloads, nothing over 64 KiB.
        self.reader = P.PacketReader(MAX_PRELOGIN_PACKET)
        self.tls: TlsCore | None = None
        self.phase = "login"  # login → auth → command → closed
        self.nonce = new_nonce()
        self.connection_id = 0
        self.caps = 0
        self.charset = 45
        self.config: Any = None
        self.pool: Any = None
        self.facts: OriginFacts | None = None
        self.user = ""
        self.auth: Any = None
        self.server: MySQLServerConn | None = None
        self.exchange: Exchange | None = None
        self.busy = False  # a command is in progress (with the origin, or a kill, a load)
        self.queue: deque[tuple[int, bytes]] = deque()
        # the session (see the module doc)
        self.carried = S.Carried("")
        self.autocommit = True
        self.lid = 0  # LAST_INSERT_ID() as this client's session has it
        self.lid_dirty = False  # changed on the held connection, not read back yet
        self.server_lid_ok = False  # the held connection's LAST_INSERT_ID() is the client's
        self.pinned: str | None = None
        self.dirty = False  # the held connection may carry state a later client must not inherit
        self.tx_hold = False  # autocommit off and a statement ran since COMMIT/ROLLBACK
        self.next_tx = False  # SET TRANSACTION waits for the next transaction
        self.diag_hold = False  # the diagnostics area holds what the client may still read
        self.found_hold = False  # SQL_CALC_FOUND_ROWS: FOUND_ROWS() may come next
        self.last_ran_here = False  # the held connection ran the client's previous statement last
        self._pre_sets_lid = False  # the prelude with the origin now sets LAST_INSERT_ID()
        self._spare: Exchange | None = None  # reused while complete
        self.effect: S.Effect = S.EMPTY_EFFECT  # of the statement with the origin now
        self.verdict: Any = None
        self.origin_status: int | None = None  # as the origin last reported it (sql_mode flags)
        self._cache: tuple[Any, Any, Any] | None = None  # namespace, policy, metrics
        self._prefix: tuple[tuple, int] | None = None  # (carried key, cache key prefix)
        self.plan: QueryPlan | None = None  # of the query with the origin now
        self.capture: Capture | None = None
        self.pending_writes: list[QueryPlan] = []  # invalidate again when the transaction ends
        self._t0 = 0.0
        self._qbytes = 0
        self._rbytes = 0
        self._login_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_pauses: set[str] = set()  # why reading from the client is paused (empty: reading)
        self._queued_bytes = 0

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connection_id = K.register(self)
        self._login_timer = asyncio.get_running_loop().call_later(LOGIN_TIMEOUT, self._login_timeout)
        warming = _Warmup.needed(self.service)
        if warming is None:
            self._greet()
        else:
            asyncio.get_running_loop().create_task(self._greet_after(warming))

    async def _greet_after(self, warming: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(warming), WARMUP_TIMEOUT)
        except Exception:  # noqa: BLE001 - greeted with the fallback version
            pass
        if self.phase == "login":
            self._greet()

    def _greet(self) -> None:
        offered = OFFERED | (int(C.CLIENT_SSL) if self.ssl_context is not None else 0)
        hello = P.HandshakeV10(greeting_version(), self.connection_id, self.nonce, offered,
                               auth_plugin=NATIVE_PASSWORD)
        self._send(P.frame(hello.build(), 0))

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            try:
                data = self.tls.receive(data)
            except ssl.SSLError as exc:
                log.info("TLS with a MySQL client failed: %s", exc)
                self._abort()
                return
            self._flush_tls()
            if not data:
                return
        if self.tls is None and self.phase == "login" and len(data) > 36 and data[:3] == b"\x20\x00\x00":
            # A 32-byte packet first: an SSLRequest, and a client's TLS ClientHello may follow it in
            # the same read (the protocol has no answer to wait for). Read it alone: the bytes after
            # it are TLS, not a packet to hold to the pre-login size limit.
            self.data_received(data[:36])
            if self.phase != "closed":
                self.data_received(data[36:])
            return
        try:
            packets = self.reader.read(data)
        except P.MySQLProtocolError as exc:
            self._fatal(exc.err_packet(), seq=0)
            return
        for seq, payload in packets:
            if self.phase == "closed":
                return
            self._packet(seq, bytes(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = "closed"
        K.unregister(self.connection_id)
        if self._login_timer is not None:
            self._login_timer.cancel()
        server, exchange = self.server, self.exchange
        if server is not None and exchange is not None and not exchange.done and not server.closed:
            # Gone while the origin works for it: kill the statement, drain, then release.
            self.server = self.exchange = self._spare = None
            self._query_failed()
            server.abandon(exchange)
            return
        self._drop_server(broken=False)

    # Back-pressure: a client that does not read its answers is not read either (its next
    # commands wait, cache hits included), nor its origin connection; commands queued behind a
    # busy one are bounded too. Reading is paused while any reason holds.
    def pause_writing(self) -> None:
        self._write_paused = True
        if self.server is not None:
            self.server.channel.pause_reading()
        self._pause_reading("write")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None:
            self.server.channel.resume_reading()
        self._resume_reading("write")
        self._next_queued()

    def _pause_reading(self, reason: str) -> None:
        if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._read_pauses.add(reason)

    def _resume_reading(self, reason: str) -> None:
        if reason in self._read_pauses:
            self._read_pauses.discard(reason)
            if not self._read_pauses and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.tls is not None:
            self.tls.send(data)
            self._flush_tls()
        else:
            self.transport.write(data)

    def _flush_tls(self) -> None:
        assert self.tls is not None
        out = self.tls.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _abort(self) -> None:
        self.phase = "closed"
        if self.transport is not None:
            self.transport.abort()

    def _fatal(self, err: P.ErrPacket, seq: int) -> None:
        self._send(P.frame(err.build(P.Capability.CLIENT_PROTOCOL_41), seq))
        self.phase = "closed"
        if self.transport is not None:
            self.transport.close()

    def _login_timeout(self) -> None:
        if self.phase in ("login", "auth"):
            log.info("a MySQL client did not log in within %.0fs", LOGIN_TIMEOUT)
            self._abort()

    # ------------------------------------------------------------------ login
    def _packet(self, seq: int, payload: bytes) -> None:
        if self.phase == "command":
            if seq != 0:
                # The client's mistake, not the origin's: as a MySQL server, refuse and disconnect.
                self._fatal(P._out_of_order(0, seq).err_packet(), seq=1)
                return
            self._command(seq, payload)
        elif self.phase == "login":
            self._login(seq, payload)
        elif self.phase == "auth":
            self._auth_step(seq, payload)

    def _login(self, seq: int, payload: bytes) -> None:
        try:
            hello = P.parse_client_handshake(payload)
        except P.MySQLProtocolError as exc:
            self._fatal(exc.err_packet(), P.next_seq(seq))
            return
        if isinstance(hello, P.SslRequest):
            if self.ssl_context is None or self.tls is not None:
                self._abort()
                return
            self.tls = TlsCore(self.ssl_context, server_side=True)
            rest = self.reader.rest()  # a ClientHello that came in the same read
            self.reader = P.PacketReader(MAX_PRELOGIN_PACKET)
            if rest:
                self.data_received(rest)
            return
        if self.tls is None and "mysql" in getattr(self.service, "client_tls_required", ()):
            # hd edge --client-tls require (control/edge.py sets the attribute): MySQL's require_secure_transport
            self._fatal(P.ErrPacket.for_code(3159, "Connections using insecure transport are prohibited while"
                                             " --require_secure_transport=ON."), P.next_seq(seq))
            return
        self.caps = hello.capabilities & (OFFERED | int(C.CLIENT_SSL))
        self.user = hello.user
        if hello.charset not in UTF8_CHARSETS:
            self._fatal(P.ErrPacket.for_code(1115, f"the proxy speaks UTF-8 only (charset id {hello.charset}); "
                                             "connect with utf8mb4"), P.next_seq(seq))
            return
        self.charset = hello.charset
        config = self.service.config_for_user(hello.user)
        if config is None or getattr(config, "scheme", "mysql") != "mysql":
            self._deny(seq)
            return
        if hello.database and hello.database != config.database:
            self._fatal(P.ErrPacket.for_code(1044, f"this config serves database '{config.database}', "
                                             f"not '{hello.database}'"), P.next_seq(seq))
            return
        self.config = config
        self.phase = "auth"
        plugin = hello.auth_plugin or NATIVE_PASSWORD
        if plugin == CACHING_SHA2_PASSWORD:
            digest = caching_sha2_digest(config.client_password)
            cached = (config.id, digest) in _SHA2_SEEN
            key = getattr(self.service, "mysql_rsa_key", None)
            self.auth = CachingSha2Server(Sha2Verifier.from_password(config.client_password, cached=cached),
                                          self.nonce, tls=self.tls is not None, private_key=key)
            self._auth_step(seq, hello.auth_response, first=True)
        elif plugin == NATIVE_PASSWORD:
            self.auth = NativePasswordServer(native_password_hash(config.client_password), self.nonce)
            self._auth_step(seq, hello.auth_response, first=True)
        else:
            # Ask the client to answer with mysql_native_password instead (every driver has it).
            self.auth = NativePasswordServer(native_password_hash(config.client_password), self.nonce)
            switch = P.AuthSwitchRequest(NATIVE_PASSWORD, self.auth.plugin_data)
            self._send(P.frame(switch.build(), P.next_seq(seq)))

    def _auth_step(self, seq: int, payload: bytes, first: bool = False) -> None:
        step = self.auth.receive(payload)
        out_seq = P.next_seq(seq)
        if not isinstance(step, Done):
            if step is not None:
                self._send(P.frame(step, out_seq))
            return
        if not step.ok:
            log.info("MySQL login to config %s failed: %s", getattr(self.config, "name", "?"), step.reason)
            self._deny(seq)
            return
        if step.send:
            self._send(P.frame(step.send, out_seq))
            out_seq = P.next_seq(out_seq)
        if isinstance(self.auth, CachingSha2Server):
            _SHA2_SEEN.add((self.config.id, caching_sha2_digest(self.config.client_password)))
        self.phase = "command"
        self.reader.max_packet = P.MAX_PACKET
        if self._login_timer is not None:
            self._login_timer.cancel()
        self.pool = self.service.mysql_pool_for(self.config)
        self.facts = facts_for(self.pool)
        if self.facts.collations is None:
            # The client's collation is applied by name: learn the origin's names first (once).
            self.busy = True
            self._pause_reading("work")
            asyncio.get_running_loop().create_task(self._logged_in_later(out_seq))
            return
        self._logged_in(out_seq)

    async def _logged_in_later(self, out_seq: int) -> None:
        assert self.facts is not None
        await self.facts.ensure_collations(self.pool)
        if self.phase != "command":
            return
        self.busy = False
        self._resume_reading("work")
        self._logged_in(out_seq)
        self._next_queued()

    def _logged_in(self, out_seq: int) -> None:
        assert self.facts is not None
        self._init_session(self.facts.names_for(self.charset))
        self._send(P.frame(P.OkPacket(status=self._status()).build(self.caps), out_seq))

    def _init_session(self, names: str) -> None:
        assert self.facts is not None
        self.carried = S.Carried(names)
        self.autocommit = self.facts.default_autocommit
        self.lid = 0
        self.lid_dirty = False
        self.pinned = None
        self.tx_hold = self.next_tx = self.diag_hold = self.found_hold = False
        self.origin_status = None  # sql_mode flags: as a new session's (not known until the origin says)
        self._prefix = None

    def _deny(self, seq: int) -> None:
        self._fatal(P.ErrPacket.for_code(1045, f"Access denied for user '{self.user}' (using password: YES)"),
                    P.next_seq(seq))

    def _status(self) -> int:
        """Status flags for the proxy's own OK/EOF packets: what a direct connection would report."""
        st = _AUTOCOMMIT if self.autocommit else 0
        if self.server is not None:
            st |= self.server.origin.status & _KEEP_STATUS
        elif self.origin_status is not None:
            st |= self.origin_status & _MODE_STATUS
        return st

    # ------------------------------------------------------------------ commands
    def _command(self, seq: int, payload: bytes) -> None:
        if self.busy or self._write_paused:
            self.queue.append((seq, payload))
            self._queued_bytes += len(payload)
            if self._queued_bytes > MAX_QUEUED_BYTES:
                self._pause_reading("queue")  # a client pipelining without end waits for its answers
            return
        if not payload:
            self._err(0, P.ErrPacket.for_code(P.ER.MALFORMED_PACKET, "empty command packet"))
            return
        code = payload[0]
        if code == P.Command.COM_QUERY:
            self._query(seq, payload)
        elif code == P.Command.COM_QUIT:
            self._drop_server(broken=False)
            self.phase = "closed"
            self.transport.close()
        elif code == P.Command.COM_PING:
            self._ok(seq)
        elif code == P.Command.COM_RESET_CONNECTION:
            self._reset_session()
            self._ok(seq)
        elif code == P.Command.COM_PROCESS_KILL:
            if len(payload) < 5:
                self._err(seq, P.ErrPacket.for_code(P.ER.MALFORMED_PACKET, "malformed COM_PROCESS_KILL"))
            else:
                self._kill(seq, False, struct.unpack_from("<I", payload, 1)[0])
        elif code == P.Command.COM_SET_OPTION:
            on = len(payload) >= 3 and payload[1] == 0  # MYSQL_OPTION_MULTI_STATEMENTS_ON
            if on:
                self._err(seq, P.ErrPacket.for_code(1235, "multi-statement queries are not supported through the proxy"))
            else:
                self._send(P.frame(P.EofPacket(status=self._status()).build(self.caps), P.next_seq(seq)))
        elif code in _REFUSALS:
            if code == P.Command.COM_STMT_SEND_LONG_DATA:
                return  # no reply is ever sent for this one
            self._err(seq, P.ErrPacket.for_code(1235, _REFUSALS[P.Command(code)]))
        else:
            self._err(seq, P.ErrPacket.for_code(1047, f"{P.command_name(code)} is not supported through the proxy"))

    def _ok(self, seq: int) -> None:
        self._send(P.frame(P.OkPacket(status=self._status()).build(self.caps), P.next_seq(seq)))

    def _err(self, seq: int, err: P.ErrPacket) -> None:
        self._send(P.frame(err.build(self.caps), P.next_seq(seq)))

    def _refuse(self, seq: int, message: str) -> None:
        self._err(seq, P.ErrPacket.for_code(P.ER.NOT_SUPPORTED_YET, message))

    def _reset_session(self) -> None:
        """COM_RESET_CONNECTION: as a direct connection would be after it (rolled back, settings
        as after a reset, nothing pinned)."""
        if self.server is not None:
            self.dirty = True
            self._drop_server(broken=False)
        assert self.facts is not None
        self._init_session(self.facts.reset_names or self.facts.pool_names)
        self.pending_writes.clear()

    def _cache_view(self) -> tuple[Any, Any, Any]:
        if self._cache is None:
            svc, config = self.service, self.config
            self._cache = (svc.namespace_for(config), svc.policy_for(config), svc.metrics.for_config(config.id))
        return self._cache

    def _cache_prefix(self, ns: Any) -> int:
        """The cache key prefix: namespace, origin user, database and the carried settings."""
        key = self.carried.cache_key()
        if self._prefix is None or self._prefix[0] is not key:
            config = self.config
            self._prefix = (key, self.service.cache.prefix(ns, "mysql", config.user, config.database, key))
        return self._prefix[1]

    def _in_transaction(self) -> bool:
        if not self.autocommit:
            return True  # every statement is in the (implicit) transaction: never from the cache
        server = self.server
        return server is not None and (server.origin.in_transaction or self.tx_hold)

    def _query(self, seq: int, payload: bytes) -> None:
        self._t0 = time.monotonic()
        try:
            query = P.parse_com_query(payload, self.caps)
        except P.MySQLProtocolError as exc:
            self._err(seq, exc.err_packet())
            return
        ns, policy, metrics = self._cache_view()
        prefix = self._cache_prefix(ns)
        in_tx = self._in_transaction()
        views = view_catalog(ns)
        if not policy.disabled and not in_tx and not views.fresh(self.service.cache.clock()):
            verdict = plan_query(query.sql, ns=ns, prefix=prefix, database=self.config.database, caching=False,
                                 in_transaction=False, origin_status=self.origin_status).verdict
            if needs_views(verdict):
                # Which names are views decides cacheability: learn them first (once, bounded).
                self.busy = True
                self._pause_reading("work")
                asyncio.get_running_loop().create_task(self._load_views_then(seq, payload, views))
                return
        plan = plan_query(query.sql, ns=ns, prefix=prefix, database=self.config.database,
                          caching=not policy.disabled, in_transaction=in_tx, origin_status=self.origin_status)
        verdict = plan.verdict
        if verdict.uses_database_change:
            self._refuse(seq, "USE is not supported through the proxy (a pooled connection has a fixed "
                              "database); create one Hyperdrive config per database and connect to it")
            return
        if verdict.statement_count > 1:
            self._refuse(seq, "multi-statement queries are not supported through the proxy; "
                              "send one statement per query")
            return
        effect = verdict.session
        if effect.action == S.REFUSE:
            self._refuse(seq, effect.reason)
            return
        if effect.action == S.KILL:
            assert effect.kill is not None
            self._kill(seq, *effect.kill)
            return
        if effect.reads_last and not (self.server is not None and self.last_ran_here and
                                      (self.server_lid_ok or not effect.reads_lid)):
            self._refuse(seq, _READS_LAST)
            return
        self.effect = effect
        self.verdict = verdict
        self._qbytes = len(payload)
        self._rbytes = 0
        if effect.local and self.server is None and self._set_locally(seq, effect, plan, metrics):
            return
        if plan.key is not None and seq == 0 and self.server is None:
            if self._from_cache(plan, payload, ns, policy, metrics):
                return
        if plan.is_write:
            invalidate(ns, plan)  # as it is sent: readers now miss (and cannot store what raced it)
            self.pending_writes.append(plan)
            if plan.write_all:
                views.forget()  # DDL (CREATE VIEW…): list the views again before the next cached read
        self.plan = plan
        self._to_origin(seq, payload)

    def _set_locally(self, seq: int, effect: S.Effect, plan: QueryPlan, metrics: Any) -> bool:
        """`SET NAMES utf8mb4 [COLLATE c]` / `SET autocommit = n` while no connection is held (so no
        transaction is open) with values the origin is known to accept: recorded and answered
        here, as the origin would (every PyMySQL connect sends both: no origin round trip)."""
        assert self.facts is not None
        for _, sql in effect.items:
            coll = (sql or "").partition(" COLLATE ")[2]
            if coll and (self.facts.collations is None or
                         coll not in {c for _, c in self.facts.collations.values()}):
                return False
        if effect.items:
            self.carried.apply(self.facts.canonical(effect.items))
        if effect.autocommit is not None:
            self.autocommit = effect.autocommit
        self._ok(seq)
        metrics.query(plan.status, True, time.monotonic() - self._t0, self._qbytes, 11)
        return True

    async def _load_views_then(self, seq: int, payload: bytes, views: Any) -> None:
        if views.loading is None:
            views.loading = asyncio.get_running_loop().create_task(self._load_views(views))
        try:
            await asyncio.wait_for(asyncio.shield(views.loading), 5.0)
        except Exception as exc:  # not known: such reads stay uncacheable (fail closed)
            log.info("cannot list the views of %s: %s", self.config.database, exc)
        if not views.fresh(self.service.cache.clock()):
            views.failed(self.service.cache.clock())  # not on every query: again after the TTL
        if self.phase != "command":
            return
        self.busy = False
        self._resume_reading("work")
        self._query(seq, payload)
        self._next_queued()

    async def _load_views(self, views: Any) -> None:
        pool = self.pool
        try:
            conn = await pool.acquire()
            try:
                rows = await conn.admin_query("SHOW FULL TABLES WHERE Table_type = 'VIEW'")
            finally:
                pool.release(conn)
            views.load(self.config.database, rows, self.service.cache.clock())
        finally:
            views.loading = None

    # ------------------------------------------------------------------ KILL
    def _kill(self, seq: int, query_only: bool, target_id: int) -> None:
        if target_id == self.connection_id:
            if query_only:
                self._ok(seq)  # the only statement of ours running is this KILL
            else:
                self._fatal(P.ErrPacket.for_code(ER_CONNECTION_KILLED, "Connection was killed"), P.next_seq(seq))
            return
        target = K.find(target_id) or K.holding(self.config.id, target_id)
        if target is None or target.config is None:
            self._err(seq, P.ErrPacket.for_code(ER_NO_SUCH_THREAD, f"Unknown thread id: {target_id}"))
            return
        if target.config.id != self.config.id:
            self._err(seq, P.ErrPacket.for_code(ER_KILL_DENIED, f"You are not owner of thread {target_id}"))
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._kill_then(seq, target, query_only))

    async def _kill_then(self, seq: int, target: MySQLClientProtocol, query_only: bool) -> None:
        err: P.ErrPacket | None = None
        try:
            await target.kill_running()
        except Exception as exc:  # noqa: BLE001 - reported to the client
            err = P.ErrPacket.for_code(P.ER.UNKNOWN_ERROR, f"could not kill the statement at the origin: {exc}")
        if not query_only:
            target.close_killed()
        if self.phase != "command":
            return
        self.busy = False
        if err is not None:
            self._err(seq, err)
        else:
            self._ok(seq)
        self._next_queued()

    async def kill_running(self) -> None:
        """KILL QUERY of what this session runs at the origin now, if anything. The connection is
        kept from the pool until the kill is done, so it can only hit this session's statement."""
        server, exchange = self.server, self.exchange
        if server is None or exchange is None or exchange.done or not self.busy:
            return
        server.kills_pending += 1
        try:
            await K.killer_for(server.pool).kill(server.thread_id)
        finally:
            server.kills_pending -= 1
            server.release_if_waiting()

    def close_killed(self) -> None:
        """KILL CONNECTION of this session: its client is disconnected (what is running is
        killed by connection_lost, as for any vanished client)."""
        if self.transport is not None and self.phase != "closed":
            self.transport.abort()

    # ------------------------------------------------------------------ the cache
    def _from_cache(self, plan: QueryPlan, payload: bytes, ns: Any, policy: Any, metrics: Any) -> bool:
        """Answer from the cache (True), or arrange for this miss to fill it (False)."""
        now = self.service.cache.clock()
        entry = ns.get(plan.key)
        if entry is not None:
            age = now - entry.stored_at
            if age <= policy.max_age + policy.swr:
                self._send(entry.payload)
                metrics.query("hit", True, time.monotonic() - self._t0, self._qbytes, len(entry.payload))
                if age > policy.max_age and plan.key not in ns.fills:
                    _Refresher(self, plan, payload, ns.begin_fill(plan.key)).start()
                return True
            ns.remove(entry)
        fill = ns.fills.get(plan.key)
        if fill is not None:
            # The same query is with the origin for someone else: wait for its answer (bounded).
            self.busy = True
            self._pause_reading("work")
            waiter = _FillWaiter(self, plan, payload, fill)
            fill.add_callback(waiter.done)
            waiter.timer = asyncio.get_running_loop().call_later(Fill.timeout, waiter.done)
            return True
        self.capture = Capture(ns.begin_fill(plan.key), plan)
        return False

    def _after_fill(self, plan: QueryPlan, payload: bytes) -> None:
        """A query we waited on finished: serve its stored answer, or ask the origin ourselves."""
        if self.phase != "command":
            return
        self._resume_reading("work")
        ns, policy, metrics = self._cache_view()
        entry = ns.get(plan.key)
        if entry is not None:
            self.busy = False
            self._send(entry.payload)
            metrics.query("hit", True, time.monotonic() - self._t0, self._qbytes, len(entry.payload))
            self._next_queued()
            return
        self.plan = plan
        self._to_origin(0, payload)

    # ------------------------------------------------------------------ to the origin
    def _to_origin(self, seq: int, payload: bytes) -> None:
        self.busy = True
        if self.server is not None:
            self._forward(seq, payload)
            return
        pool = self.pool
        conn = pool.try_acquire()
        if conn is not None:
            self._attach(conn)
            self._forward(seq, payload)
            return
        self._pause_reading("work")
        asyncio.get_running_loop().create_task(self._acquire_then_forward(pool, seq, payload))

    async def _acquire_then_forward(self, pool: Any, seq: int, payload: bytes) -> None:
        try:
            conn = await pool.acquire()
        except (PoolError, OSError, asyncio.TimeoutError) as exc:
            self.busy = False
            self._query_failed()
            if self.phase != "closed":
                self._resume_reading("work")
                self._err(seq, P.ErrPacket.for_code(1040, f"{exc}"))
                self._next_queued()
            return
        except Exception as exc:  # origin connect errors carry a message for the client
            self.busy = False
            self._query_failed()
            if self.phase != "closed":
                self._resume_reading("work")
                self._err(seq, P.ErrPacket.for_code(2013, f"cannot reach the origin database: {exc}"))
                self._next_queued()
            return
        if self.phase == "closed":
            pool.release(conn)
            return
        self._resume_reading("work")
        self._attach(conn)
        self._forward(seq, payload)

    def _attach(self, conn: MySQLServerConn) -> None:
        self.server = conn
        conn.session = self
        spare = self._spare
        if spare is not None and spare.rsr.capabilities == conn.origin.capabilities:
            self.exchange = spare  # (the hot path: one per session, not one per statement)
        else:
            self.exchange = self._spare = Exchange(conn.origin.capabilities, conn.origin.status)
        self.server_lid_ok = False
        self.last_ran_here = False
        if self._write_paused:
            conn.channel.pause_reading()

    def _forward(self, seq: int, payload: bytes) -> None:
        """Send the client's command, with the SET that brings the connection to the client's
        session in front of it and the read-back of LAST_INSERT_ID() after it, when needed."""
        server, effect = self.server, self.effect
        assert server is not None and self.exchange is not None
        steps: list[Step] = []
        need_lid = effect.reads_lid and not self.server_lid_ok
        pre = None
        if need_lid or self.autocommit != server.autocommit or self.carried.items != server.applied:
            pre = S.prelude(self.carried.items, self.autocommit, server.applied, server.autocommit,
                            self.lid if need_lid else None)
        if pre is not None:
            steps.append(Step(com_query(pre), keep=False))
            self._pre_sets_lid = need_lid
        steps.append(Step(payload, seq, CLIENT))
        if (self.lid_dirty or effect.changes_lid) and self._releases_after(effect):
            steps.append(Step(_LID_CAPTURE, keep=True))
        server.write(self.exchange.start(steps, server.origin.status))

    def _releases_after(self, effect: S.Effect) -> bool:
        """Will the connection most likely go back to the pool after this statement?"""
        if self.pinned or self.next_tx or effect.action == S.PIN:
            return False
        if effect.ends_tx:
            return True
        return self.autocommit and not self.tx_hold and self.verdict.kind != "transaction" and not (
            self.server is not None and self.server.origin.in_transaction)

    # SessionLike: called by MySQLServerConn
    def server_data(self, data: bytes) -> None:
        exchange, server = self.exchange, self.server
        if exchange is None or server is None:
            return
        try:
            out, finished = exchange.feed(data)
        except P.MySQLProtocolError as exc:
            log.warning("bad reply from the MySQL origin: %s", exc)
            self._drop_server(broken=True)
            self._fatal(P.ErrPacket.for_code(2027, f"malformed reply from the origin: {exc}"), seq=1)
            return
        if out:
            self._rbytes += len(out)
            if self.capture is not None:
                self.capture.add(out)
            self._send(out)
        for step in finished:
            server.origin.status = step.status
            if step.role == CLIENT:
                self._client_reply_done(step)
            elif step.keep:
                self._lid_read(step)
            elif step.error is not None:
                self._prelude_failed(step.error)
                return
            else:
                server.applied = dict(self.carried.items)  # the prelude brought it to the client's
                self.server_lid_ok = self.server_lid_ok or self._pre_sets_lid
        if exchange.done and self.busy and self.server is server:
            self.busy = False
            self._after_command()
            self._next_queued()

    def _prelude_failed(self, err: P.ErrPacket) -> None:
        # Cannot happen with settings the origin accepted before; if it does, the client's
        # statement (already sent behind it) must not run unseen: drop the client, which kills it.
        log.warning("origin refused the session settings of a MySQL client: %s %s", err.code, err.message)
        self._fatal(P.ErrPacket.for_code(2013, f"the proxy could not apply the session's settings on the origin "
                                              f"connection ({err.code}: {err.message}); reconnect"), seq=1)

    def _client_reply_done(self, step: Step) -> None:
        server = self.server
        assert server is not None
        effect = self.effect
        ok = step.error is None
        status = step.status
        self.origin_status = status
        self.autocommit = bool(status & _AUTOCOMMIT)
        if ok and effect.action == S.CARRY:
            assert self.facts is not None
            self.carried.apply(self.facts.canonical(S.for_flavor(effect.items, self.facts.mariadb)))
            server.applied = dict(self.carried.items)
        elif effect.action == S.PIN and (ok or self.verdict.kind in ("call", "other")) and not self.pinned:
            self.pinned = effect.reason
            log.info("MySQL session %d of config %s pinned to origin thread %d for the rest of its session: %s",
                     self.connection_id, self.config.name, server.thread_id, effect.reason)
        elif effect.action == S.DIRTY:
            self.dirty = True
        if effect.action == S.NEXT_TX:
            self.next_tx = self.next_tx or ok
        elif self.verdict.kind != "set":
            self.next_tx = False  # the transaction it was for has started (or ran)
        # The implicit transaction of autocommit off (MariaDB does not report IN_TRANS for reads).
        if status & _IN_TRANS:
            self.tx_hold = True
        elif self.autocommit:
            self.tx_hold = False
        elif effect.ends_tx and ok:
            self.tx_hold = False
        elif effect.opens_tx:
            self.tx_hold = True
        if effect.changes_lid:
            self.lid_dirty = True
            self.server_lid_ok = True
        # What the next statement may read from this connection only.
        self.diag_hold = step.warnings > 0 or not ok or (self.diag_hold and not effect.uses_tables)
        self.found_hold = ok and effect.calc_found_rows
        self.last_ran_here = True
        self._query_done(ok, step.warnings)

    def _lid_read(self, step: Step) -> None:
        if step.error is None and step.results and step.results[0].rows:
            value = step.results[0].rows[0][0]
            self.lid = int(bytes(value)) if value is not None else 0
        self.lid_dirty = False  # (a failed read-back leaves the last value known)
        self.last_ran_here = False  # ROW_COUNT() now describes our read-back, not the client's statement

    def _holds(self) -> bool:
        server = self.server
        return bool(self.pinned or self.tx_hold or self.next_tx or self.diag_hold or self.found_hold or (
            server is not None and server.origin.in_transaction))

    def _after_command(self) -> None:
        """A command's exchange is complete: keep the connection, or give it back."""
        if self.server is None or self._holds():
            return
        if self.lid_dirty:
            # LAST_INSERT_ID() changed here and was not read back with the statement: read it now.
            assert self.exchange is not None
            self.busy = True
            self.server.write(self.exchange.start([Step(_LID_CAPTURE, keep=True)]))
            return
        self._drop_server(broken=False)

    def _query_done(self, ok: bool, warnings: int) -> None:
        plan, self.plan = self.plan, None
        ns, _, metrics = self._cache_view()
        now = self.service.cache.clock()
        status = plan.status if plan is not None else "notaquery"
        if self.capture is not None:
            capture, self.capture = self.capture, None
            capture.finish(ok and not warnings, now)  # a reply with warnings is not stored (SHOW WARNINGS)
            if capture.overflow:
                status = "oversizedresult"  # answered, too big to keep (as Hyperdrive)
        if plan is not None:
            if plan.is_write:
                invalidate(ns, plan)  # again once done: reads that overlapped it must miss
            metrics.query(status, ok, time.monotonic() - self._t0, self._qbytes, self._rbytes)
        if self.pending_writes and not (self.tx_hold or (self.server is not None and self.server.origin.in_transaction)):
            for write in self.pending_writes:  # the transaction ended: what it wrote is visible
                invalidate(ns, write)
            self.pending_writes.clear()

    def _query_failed(self) -> None:
        """The query never reached the origin: release its fill so waiters ask for themselves."""
        if self.capture is not None:
            capture, self.capture = self.capture, None
            capture.finish(False, 0.0)
        plan, self.plan = self.plan, None
        if plan is not None and self._cache is not None:
            self._cache[2].query(plan.status, False, time.monotonic() - self._t0, self._qbytes, 0)

    def server_lost(self, exc: Exception | None) -> None:
        held_state = bool(self.pinned or self.tx_hold or self.next_tx) or (
            self.server is not None and self.server.origin.in_transaction)
        self.server = self.exchange = None
        self._query_failed()
        if self.phase == "closed":
            return
        if self.busy or held_state:
            # Its transaction or pinned state died with the connection: the client must know.
            self.busy = False
            detail = f": {exc}" if exc else ""
            self._fatal(P.ErrPacket.for_code(2013, f"Lost connection to the origin database{detail}"), seq=1)
            return
        self.diag_hold = self.found_hold = False

    def _drop_server(self, *, broken: bool) -> None:
        conn, self.server = self.server, None
        exchange, self.exchange = self.exchange, None
        if self.capture is not None:
            self._query_failed()
        if conn is None:
            return
        conn.session = None
        if broken:
            conn.abort()
            return
        rollback = conn.origin.in_transaction or self.tx_hold
        conn.state.dirty = conn.state.dirty or self.dirty or bool(self.pinned) or self.diag_hold or self.next_tx
        self.dirty = False
        self.pinned = None
        self.tx_hold = self.next_tx = self.diag_hold = self.found_hold = False
        self.last_ran_here = self.server_lid_ok = False
        if self._write_paused:
            conn.channel.resume_reading()
        if exchange is not None and not exchange.done:
            self._spare = None  # never reused half-way
            conn.abandon(exchange)  # a reply is still coming: killed and drained before reuse
            return
        conn.release_when_free(rollback)

    def _next_queued(self) -> None:
        while self.queue and not self.busy and not self._write_paused and self.phase == "command":
            seq, payload = self.queue.popleft()
            self._queued_bytes -= len(payload)
            self._command(seq, payload)
        if self._queued_bytes <= MAX_QUEUED_BYTES // 2:
            self._resume_reading("queue")


class _FillWaiter:
    """A client waiting for an identical query someone else sent (coalescing)."""

    __slots__ = ("session", "plan", "payload", "fill", "timer", "fired")

    def __init__(self, session: MySQLClientProtocol, plan: QueryPlan, payload: bytes, fill: Fill) -> None:
        self.session, self.plan, self.payload, self.fill = session, plan, payload, fill
        self.timer: asyncio.TimerHandle | None = None
        self.fired = False

    def done(self) -> None:
        if self.fired:
            return
        self.fired = True
        if self.timer is not None:
            self.timer.cancel()
        self.session._after_fill(self.plan, self.payload)


class _Refresher:
    """Stale-while-revalidate: runs the query on a pooled connection in the background, with the
    settings of the client whose key it refreshes, and stores the answer; nobody waits for it."""

    def __init__(self, session: MySQLClientProtocol, plan: QueryPlan, payload: bytes, fill: Fill) -> None:
        self.service = session.service
        self.pool = session.pool
        self.metrics = session._cache_view()[2]
        self.settings = dict(session.carried.items)
        self.plan = plan
        self.payload = payload
        self.capture = Capture(fill, plan)
        self.conn: Any = None
        self.exchange: Exchange | None = None

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            conn = await self.pool.acquire()
        except Exception as exc:  # the cache keeps serving the stale entry until it expires
            log.info("background refresh of a cached MySQL query failed: %s", exc)
            self._finish(False)
            return
        self.conn = conn
        conn.session = self
        self.exchange = Exchange(conn.origin.capabilities, conn.origin.status)
        steps = []
        pre = S.prelude(self.settings, True, conn.applied, conn.autocommit)
        if pre is not None:
            steps.append(Step(com_query(pre)))
        steps.append(Step(self.payload, 0, CLIENT))
        conn.write(self.exchange.start(steps))

    def server_data(self, data: bytes) -> None:
        assert self.exchange is not None
        conn = self.conn
        try:
            out, finished = self.exchange.feed(data)
        except P.MySQLProtocolError:
            self.conn = None
            conn.session = None
            conn.abort()
            self._finish(False)
            return
        if out:
            self.capture.add(out)
        ok = True
        for step in finished:
            conn.origin.status = step.status
            if step.role != CLIENT:
                if step.error is not None:
                    ok = False
                    conn.state.dirty = True
                else:
                    conn.applied = dict(self.settings)
            else:
                ok = ok and step.error is None and not step.warnings
                if step.warnings or step.error is not None:
                    conn.state.dirty = True  # its diagnostics must not reach the next client
        if self.exchange.done:
            self.conn = None
            conn.session = None
            conn.release_when_free(conn.origin.in_transaction)
            self._finish(ok)

    def server_lost(self, exc: Exception | None) -> None:
        self.conn = None
        self._finish(False)

    def _finish(self, ok: bool) -> None:
        self.capture.finish(ok, self.service.cache.clock())
        self.metrics.refresh(ok)
