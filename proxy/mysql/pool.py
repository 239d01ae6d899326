"""A pooled MySQL origin connection: what proxy/pool.py's Pool holds for a mysql config.

The same surface as the Postgres ServerConn (closed, session, last_used, state.dirty,
reset(), close()), so one Pool implementation serves both protocols. A connection a client
changed (SET, user variables, temporary tables, …) is reset with COM_RESET_CONNECTION (or
COM_CHANGE_USER where unsupported, see origin.py) before anyone else gets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.mysql.origin import DEFAULT_CAPABILITIES, MySQLOriginConnection
from proxy.mysql.protocol import Capability

if TYPE_CHECKING:
    from proxy.pool import Pool, SessionLike

log = logging.getLogger("proxy.mysql.pool")

RESET_TIMEOUT = 5.0
# Replies are forwarded to clients byte for byte, so pooled connections use the classic reply
# format every client understands: no DEPRECATE_EOF, no session-state blocks in OKs.
POOL_CAPABILITIES = DEFAULT_CAPABILITIES & ~int(Capability.CLIENT_DEPRECATE_EOF | Capability.CLIENT_SESSION_TRACK)


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
        self._attach()

    def _attach(self) -> None:
        self.origin.set_receiver(self._on_data, self._on_close)

    def write(self, data: bytes | bytearray) -> None:
        self.origin.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.origin.close()
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
        """COM_RESET_CONNECTION also rolls back an open transaction, so `rollback` needs
        nothing extra. The origin's coroutine helpers own the receiver meanwhile."""
        try:
            await asyncio.wait_for(self.origin.reset(), RESET_TIMEOUT)
        finally:
            self._attach()  # the command helper borrowed the receiver
        self.state.dirty = False


__all__ = ["POOL_CAPABILITIES", "MySQLServerConn", "MySQLServerState"]
