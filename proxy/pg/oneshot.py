"""The proxy's own queries on pooled origin connections: the cache's catalog snapshot, and
background refreshes of stale cache entries (stale-while-revalidate)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.pg import protocol as pgp
from proxy.pg.pooling import encode_query

Rows = list[list[str | None]]


class QueryFailed(Exception):
    pass


class _Collector:
    """Reads one simple query's answer off a server connection: every result set's rows."""

    def __init__(self, fut: asyncio.Future[list[Rows]]) -> None:
        self.fut = fut
        self.reader = pgp.MessageReader()
        self.results: list[Rows] = []
        self.rows: Rows | None = None
        self.error: str | None = None

    def server_data(self, data: bytes) -> None:
        reader = self.reader
        for msg in reader.feed(data):
            kind = msg[0]
            payload = reader.payload(msg)
            if kind == 0x54:  # RowDescription
                self.rows = []
            elif kind == 0x44 and self.rows is not None:  # DataRow
                self.rows.append([None if v is None else bytes(v).decode("utf-8") for v in pgp.parse_data_row(payload)])
            elif kind == 0x43:  # CommandComplete
                self.results.append(self.rows if self.rows is not None else [])
                self.rows = None
            elif kind == 0x45:  # ErrorResponse
                fields = pgp.parse_error_fields(payload)
                self.error = f"{fields.get('C', '')}: {fields.get('M', 'error')}"
            elif kind == 0x5A and not self.fut.done():  # ReadyForQuery
                if self.error is not None:
                    self.fut.set_exception(QueryFailed(self.error))
                else:
                    self.fut.set_result(self.results)

    def server_lost(self, exc: Exception | None) -> None:
        if not self.fut.done():
            self.fut.set_exception(ConnectionError(f"the origin connection closed: {exc}"))


async def run_query(pool: Any, sql: str, timeout: float) -> list[Rows]:
    """Run `sql` (may hold several statements) on a pooled connection; its result sets in text."""
    conn = await asyncio.wait_for(pool.acquire(), timeout)
    fut: asyncio.Future[list[Rows]] = asyncio.get_running_loop().create_future()
    conn.session = _Collector(fut)
    conn.write(encode_query(sql))
    try:
        results = await asyncio.wait_for(fut, timeout)
    except BaseException:
        conn.session = None
        conn.close()  # its state is unknown
        raise
    pool.release(conn)
    return results


class NullTransport:
    """The 'client' of a background refresh: its answer goes only into the cache."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass
