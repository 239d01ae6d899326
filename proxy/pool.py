"""Per-config pools of warm origin connections.

A client session holds a server connection only for a transaction (see proxy/pg/pooling.py);
in between, connections wait here. The limit is per config; clients beyond it queue, each
with a bounded wait, and get `Failed to acquire a connection from the pool.` when it runs out.
A connection that dies while idle leaves the pool at once (never handed out dead); one that
a client changed (SET, LISTEN, …) is reset with DISCARD ALL before anyone else gets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, Protocol

from proxy.pg.pooling import ServerState, encode_query

log = logging.getLogger("proxy.pool")

RESET_TIMEOUT = 5.0


class PoolError(Exception):
    """A client could not get a server connection; the message is for the client."""


class SessionLike(Protocol):
    def server_data(self, data: bytes) -> None: ...
    def server_lost(self, exc: Exception | None) -> None: ...


class ServerConn:
    """One origin connection: its byte channel plus what pooling knows about it."""

    def __init__(self, pool: Pool, origin: Any) -> None:
        self.pool = pool
        self.origin = origin
        self.channel = origin.channel
        parameters = getattr(origin, "parameters", None) or {}
        self.state = ServerState(reported={k.encode(): v.encode() for k, v in parameters.items()})
        self.session: SessionLike | None = None
        self.created = time.monotonic()
        self.last_used = self.created
        self.closed = False
        self._reset_waiter: asyncio.Future[None] | None = None
        self._reset_pending = 0
        self._rbuf = b""
        self.channel.set_receiver(self._on_data, self._on_close)
        leftover = getattr(origin, "leftover", b"")
        if leftover:
            self._on_data(leftover)

    @property
    def pid(self) -> int:
        return int(getattr(self.origin, "pid", 0) or 0)

    @property
    def secret_key(self) -> bytes:
        return bytes(getattr(self.origin, "secret_key", b"") or b"")

    def write(self, data: bytes | bytearray) -> None:
        self.channel.write(bytes(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.channel.write(b"X\x00\x00\x00\x04")
            except Exception:
                pass
            self.channel.close()
            self.pool._forget(self)

    def _on_data(self, data: bytes) -> None:
        if self.session is not None:
            self.session.server_data(data)
        elif self._reset_waiter is not None:
            self._count_ready(data)
        else:
            # Idle: only asynchronous messages can come (notices, a FATAL before a shutdown).
            if data[:1] == b"E":
                log.info("idle origin connection reported an error; dropping it")
                self.close()

    def _count_ready(self, data: bytes) -> None:
        # Reset replies end with one ReadyForQuery per query sent; count them.
        buf = self._rbuf + data
        off = 0
        while len(buf) - off >= 5:
            length = int.from_bytes(buf[off + 1:off + 5], "big")
            if len(buf) - off < 1 + length:
                break
            if buf[off] == 0x45:  # 'E': the reset failed — do not reuse this connection
                self.state.broken = True
            if buf[off] == 0x5A:
                self._reset_pending -= 1
            off += 1 + length
        self._rbuf = buf[off:]
        if self._reset_pending <= 0 and self._reset_waiter is not None and not self._reset_waiter.done():
            self._reset_waiter.set_result(None)

    def _on_close(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self.session is not None:
            session, self.session = self.session, None
            session.server_lost(exc)
        if self._reset_waiter is not None and not self._reset_waiter.done():
            self._reset_waiter.set_exception(ConnectionError("origin connection closed during reset"))
        if not was_closed:
            self.pool._forget(self)

    async def reset(self, rollback: bool) -> None:
        # After a vanished client the server may sit in an unfinished extended-protocol exchange:
        # a Sync first ends it (and is answered with a ReadyForQuery like the queries).
        queries = ([b"S\x00\x00\x00\x04", encode_query("ROLLBACK")] if rollback else []) + [encode_query("DISCARD ALL")]
        loop = asyncio.get_running_loop()
        self._reset_waiter = loop.create_future()
        self._reset_pending = len(queries)
        self._rbuf = b""
        self.channel.write(b"".join(queries))
        try:
            await asyncio.wait_for(self._reset_waiter, RESET_TIMEOUT)
        finally:
            self._reset_waiter = None
        if self.state.broken:
            raise ConnectionError("the origin refused to reset the connection")
        self.state.reset_done()


class Pool:
    def __init__(
        self,
        name: str,
        connect: Callable[[], Awaitable[Any]],
        *,
        limit: int = 20,
        acquire_timeout: float = 15.0,
        idle_timeout: float = 600.0,
        max_waiters: int = 10_000,
        on_connect: Callable[[float, bool], None] | None = None,
        wrap: Callable[[Pool, Any], Any] | None = None,
    ) -> None:
        self.name = name
        # What a new origin connection is wrapped in: the Postgres ServerConn, or a wire
        # protocol's own (proxy/mysql/pool.py) with the same closed/session/state/reset surface.
        self._wrap = wrap or ServerConn
        self._connect = connect
        self.limit = max(5, limit)
        self.acquire_timeout = acquire_timeout
        self.idle_timeout = idle_timeout
        self.max_waiters = max_waiters
        self._idle: deque[ServerConn] = deque()
        self._all: set[ServerConn] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[ServerConn]] = deque()
        self.parameters: dict[str, str] = {}
        self.stats = {"connects": 0, "connect_errors": 0, "acquire_timeouts": 0, "resets": 0}
        self._on_connect = on_connect  # (seconds, ok): the config's connection-latency metric

    # ------------------------------------------------------------------ introspection
    @property
    def size(self) -> int:
        return len(self._all) + self._opening

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def info(self) -> dict[str, Any]:
        return {"open": len(self._all), "opening": self._opening, "idle": len(self._idle),
                "waiting": len(self._waiters), "limit": self.limit, **self.stats}

    # ------------------------------------------------------------------ acquire / release
    def try_acquire(self) -> ServerConn | None:
        """An idle connection right now, or None (the common case needs no task, no wait)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self) -> ServerConn:
        while self._idle:
            conn = self._idle.pop()  # most recently used: warmest, most likely prepared
            if not conn.closed:
                return conn
        if self.size < self.limit:
            return await self._open()
        if len(self._waiters) >= self.max_waiters:
            raise PoolError("Failed to acquire a connection from the pool.")
        fut: asyncio.Future[ServerConn] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.acquire_timeout)
        except asyncio.TimeoutError:
            self.stats["acquire_timeouts"] += 1
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed over just as we gave up
            else:
                fut.cancel()
            raise PoolError("Failed to acquire a connection from the pool.") from None
        finally:
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    async def open_unpooled(self) -> Any:
        """One more origin connection of this config, outside the pool and its limit (the origin
        connection itself, not wrapped): for short control work such as MySQL's KILL QUERY while
        every pooled connection is busy. The caller closes it."""
        return await self._connect()

    async def _open(self) -> ServerConn:
        self._opening += 1
        started = time.monotonic()
        try:
            origin = await self._connect()
        except Exception:
            self.stats["connect_errors"] += 1
            if self._on_connect is not None:
                self._on_connect(time.monotonic() - started, False)
            raise
        finally:
            self._opening -= 1
        if self._on_connect is not None:
            self._on_connect(time.monotonic() - started, True)
        self.stats["connects"] += 1
        conn = self._wrap(self, origin)
        if not self.parameters:
            self.parameters = dict(getattr(origin, "parameters", {}) or {})
        self._all.add(conn)
        return conn

    def release(self, conn: ServerConn, *, rollback: bool = False) -> None:
        conn.session = None
        conn.last_used = time.monotonic()
        if conn.closed:
            return
        if conn.state.broken:  # e.g. a session's settings could not be applied on it
            conn.close()
            return
        if conn.state.dirty or rollback:
            asyncio.get_running_loop().create_task(self._reset_then_release(conn, rollback))
            return
        self._hand_out(conn)

    async def _reset_then_release(self, conn: ServerConn, rollback: bool) -> None:
        self.stats["resets"] += 1
        log.debug("resetting an origin connection (dirty=%s rollback=%s)", conn.state.dirty, rollback)
        try:
            await conn.reset(rollback)
        except (ConnectionError, asyncio.TimeoutError, OSError) as exc:
            log.info("discarding an origin connection that could not be reset: %s", exc)
            conn.close()
            self._wake_one_for_open()
            return
        self._hand_out(conn)

    def _hand_out(self, conn: ServerConn) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _wake_one_for_open(self) -> None:
        """A slot freed up: let the first waiter open a fresh connection."""
        while self._waiters and self.size < self.limit:
            fut = self._waiters.popleft()
            if fut.done():
                continue
            task = asyncio.get_running_loop().create_task(self._open())

            def done(t: asyncio.Task[ServerConn], fut: asyncio.Future[ServerConn] = fut) -> None:
                if fut.done():
                    if not t.cancelled() and t.exception() is None:
                        self._hand_out(t.result())
                elif t.cancelled():
                    fut.cancel()
                elif t.exception() is not None:
                    fut.set_exception(t.exception())  # type: ignore[arg-type]
                else:
                    fut.set_result(t.result())

            task.add_done_callback(done)
            return

    def _forget(self, conn: ServerConn) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._wake_one_for_open()

    # ------------------------------------------------------------------ housekeeping
    def reap_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        old = [c for c in self._idle if now - c.last_used > self.idle_timeout]
        for c in old:
            c.close()
        return len(old)

    def settings_changed(self, limit: int) -> None:
        """Config updated: the pool stays (warm connections keep working, e.g. through a
        credential rotation); `connect` reads the current settings for new connections."""
        self.limit = max(5, limit)

    def close(self) -> None:
        for c in list(self._all):
            c.close()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(PoolError("the configuration was deleted"))
