"""A pooled MySQL origin connection: what proxy/pool.py's Pool holds for a mysql config.

The same surface as the Postgres ServerConn (closed, session, last_used, state.dirty,
reset(), close()), so one Pool implementation serves both protocols. Besides, it knows:

* `applied`: the carried settings in force on it (proxy/mysql/state.py) — a client's settings
  are brought to it by a pipelined SET of the difference, so settings alone never force a reset;
* `state.dirty`: session state a later client must not inherit (a pinned client's temporary
  tables or variables, a statement the proxy cannot prove state-free, warnings): reset with
  COM_RESET_CONNECTION (or COM_CHANGE_USER where unsupported, see origin.py) before reuse. The
  reset also rolls back, and is followed by reading the character set it left;
* `abandon()`: its client vanished while a command ran. The statement is killed at the origin
  (`KILL QUERY` over another connection, proxy/mysql/kill.py), the rest of the reply is read and
  dropped, and only then does the connection go back to the pool (reset) — so it counts against
  the config's limit for as long as the origin is still busy with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.mysql.exchange import Exchange
from proxy.mysql.facts import OriginFacts, facts_for, names_sql
from proxy.mysql.kill import killer_for
from proxy.mysql.origin import DEFAULT_CAPABILITIES, MySQLOriginConnection
from proxy.mysql.protocol import Capability, MySQLProtocolError
from proxy.mysql.state import NAMES

if TYPE_CHECKING:
    from proxy.pool import Pool, SessionLike

log = logging.getLogger("proxy.mysql.pool")

RESET_TIMEOUT = 5.0
DRAIN_TIMEOUT = 30.0  # after the kill, for the rest of a reply (a big result still streaming)
# Replies are forwarded to clients byte for byte, so pooled connections use the classic reply
# format every client understands: no DEPRECATE_EOF, no session-state blocks in OKs.
POOL_CAPABILITIES = DEFAULT_CAPABILITIES & ~int(Capability.CLIENT_DEPRECATE_EOF | Capability.CLIENT_SESSION_TRACK)
_AUTOCOMMIT = 0x0002
_NAMES_AFTER_RESET = "SELECT @@character_set_connection, @@collation_connection"


@dataclass
class MySQLServerState:
    dirty: bool = False  # session state a later client must not inherit
    broken: bool = False


class MySQLServerConn:
    def __init__(self, pool: Pool, origin: MySQLOriginConnection) -> None:
        self.pool = pool
        self.origin = origin
        self.channel = origin.channel
        self.state = MySQLServerState()
        self.session: SessionLike | None = None
        self.created = time.monotonic()
        self.last_used = self.created
        self.closed = False
        self.facts: OriginFacts = facts_for(pool)
        self.facts.learn_connection(origin)
        self.applied: dict[str, str] = {NAMES: self.facts.pool_names}
        self.kills_pending = 0  # KILL QUERYs on their way to this connection's thread
        self._release_after_kill: bool | None = None  # release(rollback=...) deferred until they are done
        self._attach()

    @property
    def autocommit(self) -> bool:
        return bool(self.origin.status & _AUTOCOMMIT)

    @property
    def thread_id(self) -> int:
        return self.origin.connection_id

    def _attach(self) -> None:
        self.origin.set_receiver(self._on_data, self._on_close)

    def release_when_free(self, rollback: bool) -> None:
        """Back to the pool — once no KILL for the session that used it is still on its way (it
        would hit the next client's statement)."""
        if self.kills_pending:
            self._release_after_kill = bool(rollback or self._release_after_kill)
            return
        self.pool.release(self, rollback=rollback)

    def release_if_waiting(self) -> None:
        if not self.kills_pending and self._release_after_kill is not None:
            rollback, self._release_after_kill = self._release_after_kill, None
            if self.session is None:
                self.pool.release(self, rollback=rollback)

    def write(self, data: bytes | bytearray) -> None:
        self.origin.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.origin.close()
            self.pool._forget(self)

    def abort(self) -> None:
        """Close at once (no COM_QUIT): the connection is in an unknown state."""
        if not self.closed:
            self.closed = True
            self.origin.abort()
            self.pool._forget(self)

    def _on_data(self, data: bytes) -> None:
        if self.session is not None:
            self.session.server_data(data)
        else:
            # Idle: a server only speaks unasked to say it is closing the connection.
            log.info("idle MySQL origin connection sent %d unexpected bytes; dropping it", len(data))
            self.close()

    def _on_close(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self.session is not None:
            session, self.session = self.session, None
            session.server_lost(exc)
        if not was_closed:
            self.pool._forget(self)

    async def admin_query(self, sql: str) -> list:
        """Rows of an admin query run by the proxy itself (the command helper borrows the
        receiver meanwhile)."""
        try:
            results = await self.origin.query_all(sql, timeout=RESET_TIMEOUT)
        finally:
            self._attach()
        return [row for r in results for row in r.rows]

    async def reset(self, rollback: bool) -> None:
        """COM_RESET_CONNECTION (which also rolls back an open transaction, so `rollback` needs
        nothing extra), then read the character set the reset left. The origin's coroutine
        helpers own the receiver meanwhile."""
        try:
            await asyncio.wait_for(self.origin.reset(), RESET_TIMEOUT)
            r = await self.origin.query(_NAMES_AFTER_RESET, timeout=RESET_TIMEOUT)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            raise
        except Exception as exc:  # an ERR or a protocol error: the pool closes the connection
            raise ConnectionError(f"the origin connection could not be reset: {exc}") from exc
        finally:
            self._attach()  # the command helper borrowed the receiver
        cs, coll = (bytes(v or b"").decode() for v in r.rows[0])
        self.applied = {NAMES: names_sql(cs, coll)}
        self.facts.reset_names = self.applied[NAMES]
        self.state.dirty = False

    # ------------------------------------------------------------------ a vanished client
    def abandon(self, exchange: Exchange) -> None:
        """The client is gone while `exchange` is with the origin: kill, drain, then release."""
        drain = _Drain(self, exchange)
        self.session = drain
        asyncio.get_running_loop().create_task(drain.run())


class _Drain:
    """Reads and drops the rest of an abandoned exchange while the statement is killed."""

    def __init__(self, conn: MySQLServerConn, exchange: Exchange) -> None:
        self.conn = conn
        self.exchange = exchange
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def server_data(self, data: bytes) -> None:
        try:
            self.exchange.feed(data)
        except MySQLProtocolError as exc:
            self._finish(exc)
            return
        if self.exchange.done:
            self._finish(None)

    def server_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionResetError("the origin closed the connection"))

    def _finish(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)

    async def run(self) -> None:
        conn = self.conn
        tid = conn.thread_id
        killer = killer_for(conn.pool)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        wait = 0.2
        try:
            if self.exchange.done:
                self._finish(None)
            # A KILL QUERY that reaches the origin before the statement has started is lost (the
            # thread is between commands), so it is repeated until the reply ends (backing off).
            while not self.done.done() and loop.time() < deadline:
                try:
                    await killer.kill(tid)
                except Exception as exc:  # noqa: BLE001 - retried; bounded by the deadline
                    log.warning("could not kill the statement of a vanished client on origin thread %d: %s",
                                tid, exc)
                try:
                    await asyncio.wait_for(asyncio.shield(self.done), min(wait, max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    wait = min(wait * 2, 2.0)
                except Exception:  # noqa: BLE001 - the connection broke: handled below
                    break
            if not self.done.done() or self.done.exception() is not None:
                log.info("origin thread %d of a vanished client did not finish its reply; killing the connection", tid)
                if not conn.closed:
                    try:
                        await killer.kill(tid, connection=True)
                    except Exception as exc:  # noqa: BLE001
                        log.warning("could not kill origin thread %d: %s", tid, exc)
                    conn.abort()
                return
            log.info("the statement of a vanished client on origin thread %d was killed; connection reused", tid)
            if conn.closed:
                return
            conn.session = None
            conn.state.dirty = True  # whatever the client left behind, and the kill itself
            conn.release_when_free(True)
        finally:
            if conn.session is self:
                conn.session = None


__all__ = ["POOL_CAPABILITIES", "MySQLServerConn", "MySQLServerState"]
