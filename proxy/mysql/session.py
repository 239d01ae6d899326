"""The MySQL listener side: one client connection, from greeting to COM_QUIT.

Login: Handshake v10 with our nonce → optional SSLRequest and TLS (a `TlsCore` on memory BIOs,
so bytes a client sends right after its SSLRequest are not lost) → HandshakeResponse41, whose
username names the config → `mysql_native_password` or `caching_sha2_password` (fast path, or
full authentication over TLS or with the listener's RSA key) against the config's generated
password → OK.

Commands: the text protocol is pooled. A COM_QUERY gets a server connection from the config's
pool, goes out unchanged, and the reply is streamed back byte for byte while a
`ResultSetReader` watches for its end; the server goes back to the pool when the reply is
complete and the server reports no open transaction. COM_PING and COM_RESET_CONNECTION are
answered here. What a pooled proxy cannot honour is refused with an ERR that says what to do
instead, and the connection stays usable: prepared statements (binary protocol), COM_INIT_DB
and USE, multi-statement queries, non-UTF-8 text, COM_CHANGE_USER.

Caching (proxy/mysql/caching.py): a cacheable read outside a transaction is answered from the
cache when fresh (or stale within swr, with one background refresh), waits for an identical
query already in flight, or fills the cache from the reply it streams; writes invalidate.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy.cache.store import Fill
from proxy.mysql.caching import Capture, QueryPlan, invalidate, needs_views, plan_query, view_catalog
from proxy.mysql import protocol as P
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
from proxy.pg.tls import TlsCore
from proxy.pool import PoolError

if TYPE_CHECKING:
    from proxy.mysql.pool import MySQLServerConn
    from proxy.service import ProxyService

log = logging.getLogger("proxy.mysql")

LOGIN_TIMEOUT = 15.0
SERVER_VERSION = "8.0.0-hd-proxy"  # clients gate features on "8.0"; the suffix says who answers
C = P.Capability
# What the proxy offers clients: the classic reply format (pooled origin connections use the
# same, see pool.POOL_CAPABILITIES), no LOCAL INFILE, no multi-statements, no compression.
OFFERED = int(
    C.CLIENT_LONG_PASSWORD | C.CLIENT_FOUND_ROWS | C.CLIENT_LONG_FLAG | C.CLIENT_CONNECT_WITH_DB
    | C.CLIENT_PROTOCOL_41 | C.CLIENT_TRANSACTIONS | C.CLIENT_SECURE_CONNECTION | C.CLIENT_MULTI_RESULTS
    | C.CLIENT_PS_MULTI_RESULTS | C.CLIENT_PLUGIN_AUTH | C.CLIENT_CONNECT_ATTRS
    | C.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
UTF8_CHARSETS = {33, 45, 46, 83, 192, 224, 255} | set(range(192, 216)) | set(range(224, 256))
# Statements after which a server connection carries no state the next client could inherit
# (the classifier's kinds), unless they call a function that holds something for the session.
_CLEAN_KINDS = frozenset({"select", "insert", "update", "delete", "replace", "transaction", "show"})
_SESSION_FUNCTIONS = frozenset({"get_lock", "release_lock", "release_all_locks", "is_used_lock", "is_free_lock"})

# caching_sha2_password keeps a per-account cache of verified digests (MySQL does the same):
# the first login of a config after a restart takes the full path, later ones the fast path.
_SHA2_SEEN: set[tuple[str, bytes]] = set()

_IN_TRANS = int(P.ServerStatus.SERVER_STATUS_IN_TRANS)  # plain int: IntFlag `&` runs in Python

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


def _leaves_state(verdict: Any, sql: str) -> bool:
    """Could this statement leave session state (SET, @variables, temporary tables, user locks…)?
    Conservative: anything but plain DML, queries and transaction control counts."""
    if verdict.kind not in _CLEAN_KINDS or verdict.functions & _SESSION_FUNCTIONS:
        return True
    return "@" in sql or "temporary" in sql.lower()


class MySQLClientProtocol(asyncio.Protocol):
    def __init__(self, service: ProxyService, ssl_context: ssl.SSLContext | None) -> None:
        self.service = service
        self.ssl_context = ssl_context
        self.transport: Any = None
        self.reader = P.PacketReader()
        self.tls: TlsCore | None = None
        self.phase = "login"  # login → auth → command → closed
        self.nonce = new_nonce()
        self.connection_id = 0
        self.caps = 0
        self.config: Any = None
        self.user = ""
        self.auth: Any = None
        self.server: MySQLServerConn | None = None
        self.rsr: P.ResultSetReader | None = None
        self.busy = False  # a command is with the origin
        self.queue: deque[tuple[int, bytes]] = deque()
        self.dirty = False
        self.status = int(P.ServerStatus.SERVER_STATUS_AUTOCOMMIT)
        self.origin_status: int | None = None  # as the origin last reported it (sql_mode flags)
        self._cache: tuple[Any, Any, int, Any] | None = None  # namespace, policy, key prefix, metrics
        self.plan: QueryPlan | None = None  # of the query with the origin now
        self.capture: Capture | None = None
        self.pending_writes: list[QueryPlan] = []  # invalidate again when the transaction ends
        self._t0 = 0.0
        self._qbytes = 0
        self._rbytes = 0
        self._login_timer: asyncio.TimerHandle | None = None
        self._write_paused = False

    # ------------------------------------------------------------------ transport
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connection_id = id(self) & 0x7FFFFFFF
        offered = OFFERED | (int(C.CLIENT_SSL) if self.ssl_context is not None else 0)
        hello = P.HandshakeV10(SERVER_VERSION, self.connection_id, self.nonce, offered,
                               auth_plugin=NATIVE_PASSWORD)
        self._send(P.frame(hello.build(), 0))
        self._login_timer = asyncio.get_running_loop().call_later(LOGIN_TIMEOUT, self._login_timeout)

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
        if self._login_timer is not None:
            self._login_timer.cancel()
        self._drop_server(broken=self.busy)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.server is not None:
            self.server.channel.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None:
            self.server.channel.resume_reading()

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
            self.reader = P.PacketReader()
            if rest:
                self.data_received(rest)
            return
        self.caps = hello.capabilities & (OFFERED | int(C.CLIENT_SSL))
        self.user = hello.user
        if hello.charset not in UTF8_CHARSETS:
            self._fatal(P.ErrPacket.for_code(1115, f"the proxy speaks UTF-8 only (charset id {hello.charset}); "
                                             "connect with utf8mb4"), P.next_seq(seq))
            return
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
        if self._login_timer is not None:
            self._login_timer.cancel()
        self._send(P.frame(P.OkPacket(status=self.status).build(self.caps), out_seq))

    def _deny(self, seq: int) -> None:
        self._fatal(P.ErrPacket.for_code(1045, f"Access denied for user '{self.user}' (using password: YES)"),
                    P.next_seq(seq))

    # ------------------------------------------------------------------ commands
    def _command(self, seq: int, payload: bytes) -> None:
        if self.busy:
            self.queue.append((seq, payload))
            return
        if not payload:
            self._err(0, P.ErrPacket.for_code(P.ER.MALFORMED_PACKET, "empty command packet"))
            return
        code = payload[0]
        if code == P.Command.COM_QUIT:
            self._drop_server(broken=False)
            self.phase = "closed"
            self.transport.close()
        elif code == P.Command.COM_PING:
            self._ok(seq)
        elif code == P.Command.COM_RESET_CONNECTION:
            if self.server is not None:
                self.dirty = True
                self._drop_server(broken=False)
            self.status = int(P.ServerStatus.SERVER_STATUS_AUTOCOMMIT)
            self._ok(seq)
        elif code == P.Command.COM_QUERY:
            self._query(seq, payload)
        elif code == P.Command.COM_SET_OPTION:
            on = len(payload) >= 3 and payload[1] == 0  # MYSQL_OPTION_MULTI_STATEMENTS_ON
            if on:
                self._err(seq, P.ErrPacket.for_code(1235, "multi-statement queries are not supported through the proxy"))
            else:
                self._send(P.frame(P.EofPacket(status=self.status).build(self.caps), P.next_seq(seq)))
        elif code in _REFUSALS:
            if code == P.Command.COM_STMT_SEND_LONG_DATA:
                return  # no reply is ever sent for this one
            self._err(seq, P.ErrPacket.for_code(1235, _REFUSALS[P.Command(code)]))
        else:
            self._err(seq, P.ErrPacket.for_code(1047, f"{P.command_name(code)} is not supported through the proxy"))

    def _ok(self, seq: int) -> None:
        self._send(P.frame(P.OkPacket(status=self.status).build(self.caps), P.next_seq(seq)))

    def _err(self, seq: int, err: P.ErrPacket) -> None:
        self._send(P.frame(err.build(self.caps), P.next_seq(seq)))

    def _cache_view(self) -> tuple[Any, Any, int, Any]:
        if self._cache is None:
            svc, config = self.service, self.config
            ns = svc.namespace_for(config)
            policy = svc.policy_for(config)
            prefix = svc.cache.prefix(ns, "mysql", config.user, config.database)
            self._cache = (ns, policy, prefix, svc.metrics.for_config(config.id))
        return self._cache

    def _query(self, seq: int, payload: bytes) -> None:
        self._t0 = time.monotonic()
        try:
            query = P.parse_com_query(payload, self.caps)
        except P.MySQLProtocolError as exc:
            self._err(seq, exc.err_packet())
            return
        ns, policy, prefix, metrics = self._cache_view()
        in_tx = self.server is not None and self.server.origin.in_transaction
        views = view_catalog(ns)
        if not policy.disabled and not in_tx and not views.fresh(self.service.cache.clock()):
            verdict = plan_query(query.sql, ns=ns, prefix=prefix, database=self.config.database, caching=False,
                                 in_transaction=False, origin_status=self.origin_status).verdict
            if needs_views(verdict):
                # Which names are views decides cacheability: learn them first (once, bounded).
                self.busy = True
                self.transport.pause_reading()
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
        if _leaves_state(verdict, query.sql):
            self.dirty = True
        self._qbytes = len(payload)
        self._rbytes = 0
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
        self.transport.resume_reading()
        self._query(seq, payload)
        self._next_queued()

    async def _load_views(self, views: Any) -> None:
        pool = self.service.mysql_pool_for(self.config)
        try:
            conn = await pool.acquire()
            try:
                rows = await conn.admin_query("SHOW FULL TABLES WHERE Table_type = 'VIEW'")
            finally:
                pool.release(conn)
            views.load(self.config.database, rows, self.service.cache.clock())
        finally:
            views.loading = None

    def _refuse(self, seq: int, message: str) -> None:
        self._err(seq, P.ErrPacket.for_code(P.ER.NOT_SUPPORTED_YET, message))

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
            self.transport.pause_reading()
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
        self.transport.resume_reading()
        ns, policy, _, metrics = self._cache_view()
        entry = ns.get(plan.key)
        if entry is not None:
            self.busy = False
            self._send(entry.payload)
            metrics.query("hit", True, time.monotonic() - self._t0, self._qbytes, len(entry.payload))
            self._next_queued()
            return
        self.plan = plan
        self._to_origin(0, payload)

    def _to_origin(self, seq: int, payload: bytes) -> None:
        self.busy = True
        if self.server is not None:
            self._forward(seq, payload)
            return
        pool = self.service.mysql_pool_for(self.config)
        conn = pool.try_acquire()
        if conn is not None:
            self._attach(conn)
            self._forward(seq, payload)
            return
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._acquire_then_forward(pool, seq, payload))

    async def _acquire_then_forward(self, pool: Any, seq: int, payload: bytes) -> None:
        try:
            conn = await pool.acquire()
        except (PoolError, OSError, asyncio.TimeoutError) as exc:
            self.busy = False
            self._query_failed()
            if self.phase != "closed":
                self.transport.resume_reading()
                self._err(seq, P.ErrPacket.for_code(1040, f"{exc}"))
                self._next_queued()
            return
        except Exception as exc:  # origin connect errors carry a message for the client
            self.busy = False
            self._query_failed()
            if self.phase != "closed":
                self.transport.resume_reading()
                self._err(seq, P.ErrPacket.for_code(2013, f"cannot reach the origin database: {exc}"))
                self._next_queued()
            return
        if self.phase == "closed":
            pool.release(conn)
            return
        self.transport.resume_reading()
        self._attach(conn)
        self._forward(seq, payload)

    def _attach(self, conn: MySQLServerConn) -> None:
        self.server = conn
        conn.session = self
        self.rsr = P.ResultSetReader(conn.origin.capabilities, status=conn.origin.status)
        if self._write_paused:
            conn.channel.pause_reading()

    def _forward(self, seq: int, payload: bytes) -> None:
        assert self.server is not None and self.rsr is not None
        self.rsr.reset(status=self.server.origin.status, first_seq=P.next_seq(seq))
        self.server.write(P.frame(payload, seq))

    # SessionLike: called by MySQLServerConn
    def server_data(self, data: bytes) -> None:
        rsr = self.rsr
        if rsr is None or self.server is None:
            return
        try:
            out = rsr.feed(data)
        except P.MySQLProtocolError as exc:
            log.warning("bad reply from the MySQL origin: %s", exc)
            self._drop_server(broken=True)
            self._fatal(P.ErrPacket.for_code(2027, f"malformed reply from the origin: {exc}"), seq=1)
            return
        if out:
            chunk = bytes(out)
            self._rbytes += len(chunk)
            if self.capture is not None:
                self.capture.add(chunk)
            self._send(chunk)
        if rsr.done:
            if rsr.error is None:
                self.server.origin.status = int(rsr.status)
            self.status = self.origin_status = int(self.server.origin.status)
            self.busy = False
            self._query_done(rsr.error is None)
            if not self.server.origin.in_transaction:
                self._drop_server(broken=False)
            self._next_queued()

    def _query_done(self, ok: bool) -> None:
        plan, self.plan = self.plan, None
        ns, _, _, metrics = self._cache_view()
        now = self.service.cache.clock()
        status = plan.status if plan is not None else "notaquery"
        if self.capture is not None:
            capture, self.capture = self.capture, None
            capture.finish(ok, now)
            if capture.overflow:
                status = "oversizedresult"  # answered, too big to keep (as Hyperdrive)
        if plan is not None:
            if plan.is_write:
                invalidate(ns, plan)  # again once done: reads that overlapped it must miss
            metrics.query(status, ok, time.monotonic() - self._t0, self._qbytes, self._rbytes)
        if self.pending_writes and not (self.status & _IN_TRANS):
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
            self._cache[3].query(plan.status, False, time.monotonic() - self._t0, self._qbytes, 0)

    def server_lost(self, exc: Exception | None) -> None:
        self.server = None
        self._query_failed()
        if self.busy and self.phase != "closed":
            self.busy = False
            detail = f": {exc}" if exc else ""
            self._fatal(P.ErrPacket.for_code(2013, f"Lost connection to the origin database during query{detail}"),
                        seq=1)

    def _drop_server(self, *, broken: bool) -> None:
        conn, self.server = self.server, None
        self.rsr = None
        if self.capture is not None:
            self._query_failed()
        if conn is None:
            return
        conn.session = None
        if broken:
            conn.close()
            return
        conn.state.dirty = conn.state.dirty or self.dirty
        self.dirty = False
        if self._write_paused:
            conn.channel.resume_reading()
        conn.pool.release(conn, rollback=conn.origin.in_transaction)

    def _next_queued(self) -> None:
        while self.queue and not self.busy and self.phase == "command":
            seq, payload = self.queue.popleft()
            self._command(seq, payload)


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
    """Stale-while-revalidate: runs the query on a pooled connection in the background and
    stores the answer; nobody waits for it."""

    def __init__(self, session: MySQLClientProtocol, plan: QueryPlan, payload: bytes, fill: Fill) -> None:
        self.service = session.service
        self.config = session.config
        self.metrics = session._cache_view()[3]
        self.plan = plan
        self.payload = payload
        self.capture = Capture(fill, plan)
        self.conn: Any = None
        self.rsr: P.ResultSetReader | None = None

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        pool = self.service.mysql_pool_for(self.config)
        try:
            conn = await pool.acquire()
        except Exception as exc:  # the cache keeps serving the stale entry until it expires
            log.info("background refresh of a cached MySQL query failed: %s", exc)
            self._finish(False)
            return
        self.conn = conn
        conn.session = self
        self.rsr = P.ResultSetReader(conn.origin.capabilities, status=conn.origin.status)
        conn.write(P.frame(self.payload, 0))

    def server_data(self, data: bytes) -> None:
        assert self.rsr is not None
        try:
            out = self.rsr.feed(data)
        except P.MySQLProtocolError:
            self.conn.session = None
            self.conn.close()
            self._finish(False)
            return
        if out:
            self.capture.add(bytes(out))
        if self.rsr.done:
            conn, self.conn = self.conn, None
            conn.session = None
            if self.rsr.error is None:
                conn.origin.status = int(self.rsr.status)
            conn.pool.release(conn, rollback=conn.origin.in_transaction)
            self._finish(self.rsr.error is None)

    def server_lost(self, exc: Exception | None) -> None:
        self.conn = None
        self._finish(False)

    def _finish(self, ok: bool) -> None:
        self.capture.finish(ok, self.service.cache.clock())
        self.metrics.refresh(ok)
