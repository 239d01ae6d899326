"""The proxy's own queries on pooled origin connections: the cache's catalog snapshot, and
background refreshes of stale cache entries (stale-while-revalidate)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.pg import protocol as pgp
from proxy.pg.pooling import encode_query
from proxy.pg.settings import SessionSettings, apply_sql

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
            elif kind == 0x43:  # CommandComplete (of a statement with a result set: SET, RESET… have none)
                if self.rows is not None:
                    self.results.append(self.rows)
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
    """Run `sql` (may hold several statements) on a pooled connection; its result sets in text.
    It runs under the connection's baseline settings, whatever the last client had set there."""
    conn = await asyncio.wait_for(pool.acquire(), timeout)
    fut: asyncio.Future[list[Rows]] = asyncio.get_running_loop().create_future()
    conn.session = _Collector(fut)
    baseline, _ = apply_sql(conn.state.params, {})
    conn.state.params = {}
    conn.write(encode_query(baseline + sql))
    try:
        results = await asyncio.wait_for(fut, timeout)
    except BaseException:
        conn.session = None
        conn.close()  # its state is unknown
        raise
    pool.release(conn)
    return results


class SettingsRejected(Exception):
    """The origin refused a client's startup settings (as a direct connection would at login)."""

    def __init__(self, error: bytes) -> None:
        super().__init__("the origin refused the session's settings")
        self.error = error  # the origin's ErrorResponse, whole


class _Settler:
    """Reads the answers to (apply the settings; read them back) off a server connection."""

    def __init__(self, fut: asyncio.Future[tuple[bytes | None, bytes]], state: Any) -> None:
        self.fut = fut
        self.state = state
        self.reader = pgp.MessageReader()
        self.readies = 0
        self.error: bytes | None = None
        self.rows = bytearray()

    def server_data(self, data: bytes) -> None:
        reader = self.reader
        for msg in reader.feed(data):
            kind = msg[0]
            raw = bytes(reader.raw(msg))
            if kind == 0x53:  # ParameterStatus: what the client will be told
                name, _, value = raw[5:-1].partition(b"\x00")
                self.state.reported[name] = value
            elif kind == 0x45 and self.readies == 0 and self.error is None:
                self.error = raw
            elif kind == 0x44 and self.readies == 1:
                self.rows += raw
            elif kind == 0x5A:
                self.readies += 1
                if self.readies == 2 and not self.fut.done():
                    self.fut.set_result((self.error, bytes(self.rows)))

    def server_lost(self, exc: Exception | None) -> None:
        if not self.fut.done():
            self.fut.set_exception(ConnectionError(f"the origin connection closed: {exc}"))


async def prepare_settings(pool: Any, settings: dict[str, str], login_user: str,
                           timeout: float) -> tuple[dict[str, str], dict[bytes, bytes]]:
    """A new client's startup settings, applied on a pooled connection and read back: the origin
    judges them (raises SettingsRejected with its error, which the client gets at login as from
    a direct connection) and gives their canonical form. Returns (the session's values, the
    ParameterStatus values the client is to be told)."""
    conn = await asyncio.wait_for(pool.acquire(), timeout)
    state = conn.state
    sql, _ = apply_sql(state.params, settings)
    session = SessionSettings(settings, login_user=login_user)
    fut: asyncio.Future[tuple[bytes | None, bytes]] = asyncio.get_running_loop().create_future()
    conn.session = _Settler(fut, state)
    conn.write(encode_query(sql or ";") + encode_query(session.readback()))
    try:
        error, rows = await asyncio.wait_for(fut, timeout)
    except BaseException:
        conn.session = None
        conn.close()  # its state is unknown
        raise
    values = session.after_readback((_cell(r[0]), _cell(r[1])) for r in _rows(rows))
    state.params = dict(values)  # what is set there now (the apply is all or nothing)
    reported = dict(state.reported)
    pool.release(conn)
    if error is not None:
        raise SettingsRejected(error)
    return session.values, reported


def _rows(data: bytes) -> list[list[bytes | None]]:
    out = []
    off = 0
    while off + 5 <= len(data):
        length = int.from_bytes(data[off + 1:off + 5], "big")
        out.append(pgp.parse_data_row(data[off + 5:off + 1 + length]))
        off += 1 + length
    return out


def _cell(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


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
