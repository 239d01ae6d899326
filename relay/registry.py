"""Live connector connections, by tunnel, and the choice of one for a new stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from tunnel.link import Link, StreamInbox


@dataclass(eq=False)
class ConnectorConnection:
    tunnel_id: str
    connector_id: str
    conn_index: int
    version: str
    protocol: str
    link: Link
    control: StreamInbox  # the control stream, for pushing messages
    remote: str = ""
    hostname: str = ""  # of the connector's machine, as it reports it
    connection_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    since: float = field(default_factory=time.time)
    config_version: int = -1  # last version pushed
    acked_version: int = -1
    draining: bool = False  # the connector unregistered: no new streams
    streams_total: int = 0
    runner: asyncio.Task[None] | None = None  # link.run(): done once the link is gone

    def info(self) -> dict[str, Any]:
        return {
            "connector_id": self.connector_id,
            "conn_index": self.conn_index,
            "connection_id": self.connection_id,
            "protocol": self.protocol,
            "version": self.version,
            "since": self.since,
            "uptime": max(0.0, time.time() - self.since),
            "remote": self.remote,
            "hostname": self.hostname,
            "draining": self.draining,
            "streams": max(0, self.link.stream_count - 1),  # data streams (not the control stream)
            "streams_total": self.streams_total,
            "config_version": self.acked_version,
        }


class Registry:
    """In-process tunnel presence (a Redis-backed one can replace it for several relays)."""

    def __init__(self) -> None:
        self._by_tunnel: dict[str, list[ConnectorConnection]] = {}
        self._rr: dict[str, int] = {}

    def add(self, conn: ConnectorConnection) -> None:
        self._by_tunnel.setdefault(conn.tunnel_id, []).append(conn)

    def remove(self, conn: ConnectorConnection) -> None:
        conns = self._by_tunnel.get(conn.tunnel_id)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._by_tunnel[conn.tunnel_id]

    def connections(self, tunnel_id: str) -> list[ConnectorConnection]:
        return list(self._by_tunnel.get(tunnel_id, ()))

    def all(self) -> list[ConnectorConnection]:
        return [c for conns in self._by_tunnel.values() for c in conns]

    def pick(self, tunnel_id: str, exclude: Iterable[ConnectorConnection] = ()) -> ConnectorConnection | None:
        """Least-loaded live connection; round robin among equals so load spreads."""
        skip = set(exclude)
        live = [c for c in self._by_tunnel.get(tunnel_id, ())
                if not c.draining and not c.link.is_closed and c not in skip]
        if not live:
            return None
        n = self._rr.get(tunnel_id, 0)
        self._rr[tunnel_id] = n + 1
        start = n % len(live)
        ordered = live[start:] + live[:start]
        return min(ordered, key=lambda c: c.link.stream_count)
