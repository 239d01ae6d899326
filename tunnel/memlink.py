"""An in-process stand-in for a WebSocket connection, for links inside one process.

The Postgres proxy runs in the edge next to the relay; dialing the relay over loopback TLS
would encrypt and decrypt every byte twice in the same process for nothing. A `MemorySocket`
pair carries the same mux messages through two queues instead; `MuxLink` cannot tell the
difference (it only uses `send`, `close` and async iteration). Flow control stays with the
mux's per-stream credit windows, so the queues stay bounded by them.
"""

from __future__ import annotations

import asyncio
from typing import Any


class MemorySocket:
    def __init__(self, name: str) -> None:
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.peer: MemorySocket | None = None
        self.closed = False
        self.remote_address = (name, 0)
        self.request = None
        self.transport = None

    @classmethod
    def pair(cls, client_name: str = "in-process", server_name: str = "relay") -> tuple[MemorySocket, MemorySocket]:
        client, server = cls(server_name), cls(client_name)
        client.peer, server.peer = server, client
        return client, server

    async def send(self, message: bytes) -> None:
        if self.closed or self.peer is None or self.peer.closed:
            raise ConnectionResetError("in-process link closed")
        self.peer._inbox.put_nowait(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        for side in (self, self.peer):
            if side is not None and not side.closed:
                side.closed = True
                side._inbox.put_nowait(None)

    def __aiter__(self) -> MemorySocket:
        return self

    async def __anext__(self) -> Any:
        if self.closed and self._inbox.empty():
            raise StopAsyncIteration
        message = await self._inbox.get()
        if message is None:
            raise StopAsyncIteration
        return message
