"""KILL through the proxy: client session ids, and killing a statement at the origin.

Every client is greeted with its own session id (never an origin thread id: a client has no
origin connection of its own). `KILL [CONNECTION | QUERY] <id>` (and COM_PROCESS_KILL) from any
client of the same config names either that session id (what `mysql` sends on Ctrl-C, PyMySQL's
`thread_id()`, mysql2's `threadId`) or the origin thread id a session holds at that moment (what
`SELECT CONNECTION_ID()` showed it); the proxy kills the statement that session runs on its
origin connection, and for KILL CONNECTION closes the session too.

`Killer` (one per pool) sends `KILL QUERY <thread>` over another origin connection: an idle
pooled one when there is one, else a connection of its own, opened for the purpose and closed when
no kill is waiting. So killing needs no free slot in a pool that is full of the statements to kill
(the one extra connection is the only time a config exceeds its limit, briefly).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections import deque
from typing import Any

from proxy.mysql.origin import MySQLServerError

log = logging.getLogger("proxy.mysql")

FIRST_SESSION_ID = 0x40000000  # far above the thread ids origins hand out, so the two never meet
KILL_TIMEOUT = 10.0
ER_NO_SUCH_THREAD = 1094

_ids = itertools.count(FIRST_SESSION_ID)
_sessions: dict[int, Any] = {}


def register(session: Any) -> int:
    sid = next(_ids) & 0xFFFFFFFF
    _sessions[sid] = session
    return sid


def unregister(sid: int) -> None:
    _sessions.pop(sid, None)


def find(sid: int) -> Any:
    return _sessions.get(sid)


def holding(config_id: str, thread_id: int) -> Any:
    """The session of `config_id` that holds the origin connection `thread_id` now, if any."""
    for s in _sessions.values():
        server = getattr(s, "server", None)
        if server is not None and server.origin.connection_id == thread_id and s.config is not None \
                and s.config.id == config_id:
            return s
    return None


class Killer:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.queue: deque[tuple[str, asyncio.Future[None]]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.own: Any = None  # a MySQLOriginConnection outside the pool, while kills wait

    async def kill(self, thread_id: int, *, connection: bool = False, timeout: float = KILL_TIMEOUT) -> None:
        """KILL [CONNECTION | QUERY] thread_id at the origin; returns once the origin has done it
        (an unknown thread is fine: it has ended). Raises on failure or timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((f"KILL {'CONNECTION' if connection else 'QUERY'} {int(thread_id)}", fut))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def _run(self) -> None:
        try:
            while self.queue:
                sql, fut = self.queue.popleft()
                try:
                    await self._one(sql)
                except Exception as exc:  # noqa: BLE001 - reported to the one waiting
                    if not fut.done():
                        fut.set_exception(exc)
                else:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self.task = None
            own, self.own = self.own, None
            if own is not None:
                own.close()

    async def _one(self, sql: str) -> None:
        conn = self.pool.try_acquire()
        try:
            if conn is not None:
                await conn.admin_query(sql)
            else:
                if self.own is None or self.own.closed:
                    self.own = await self.pool.open_unpooled()  # outside the pool's count: see the module doc
                await self.own.query(sql, timeout=KILL_TIMEOUT)
        except MySQLServerError as exc:
            if exc.code != ER_NO_SUCH_THREAD:
                raise
        except BaseException:
            if conn is None and self.own is not None:
                self.own.abort()
                self.own = None
            raise
        finally:
            if conn is not None:
                self.pool.release(conn)


_killers: "weakref.WeakKeyDictionary[Any, Killer]" = weakref.WeakKeyDictionary()


def killer_for(pool: Any) -> Killer:
    k = _killers.get(pool)
    if k is None:
        k = _killers[pool] = Killer(pool)
    return k


__all__ = ["FIRST_SESSION_ID", "Killer", "find", "holding", "killer_for", "register", "unregister"]
