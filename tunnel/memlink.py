"""A pair of links inside one process, for the proxy that runs next to the relay.

Dialing the relay over loopback TLS would encrypt and decrypt every byte twice in the same
process for nothing. A `MemoryLink` pair runs the same mux and tunnel protocol, and hands each
batched mux message straight to the peer's parser on the next loop iteration: no socket, no
TLS, no queue, no task per message. Flow control stays with the mux's per-stream credit
windows.
"""

from __future__ import annotations

import asyncio

from tunnel.link import MuxLink
from tunnel.mux import MuxProtocolError


class MemoryLink(MuxLink):
    def __init__(self, *, client: bool, name: str) -> None:
        super().__init__(None, client=client)
        self.peer: MemoryLink | None = None
        self.remote_address = (name, 0)
        self._loop = asyncio.get_running_loop()  # cached: get_running_loop() costs a getpid() syscall
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._flush_scheduled = False

    @classmethod
    def pair(cls, client_name: str = "in-process", server_name: str = "relay") -> tuple[MemoryLink, MemoryLink]:
        client = cls(client=True, name=server_name)
        server = cls(client=False, name=client_name)
        client.peer, server.peer = server, client
        return client, server

    def kick(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        peer = self.peer
        if self._closed or peer is None or peer._closed:
            return
        mux = self.mux
        while mux.wants_write:
            for message in mux.messages_to_send():
                self.bytes_out += len(message)
                try:
                    peer._message(message)
                except MuxProtocolError as exc:  # cannot happen between two of our muxes; be safe
                    self._end(f"protocol error: {exc.reason}")
                    return
            self._dispatch(mux.events())

    def _message(self, data: bytes) -> None:
        self.bytes_in += len(data)
        mux = self.mux
        mux.receive_message(data)
        self._dispatch(mux.events())
        if mux.wants_write:
            self.kick()

    async def run(self) -> None:
        try:
            await asyncio.shield(self._done)
        finally:
            self._shutdown(self.close_reason or "in-process link closed")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._flush()
        self._end(reason or "closed")

    def _end(self, reason: str) -> None:
        for side in (self, self.peer):
            if side is not None:
                if not side.close_reason:
                    side.close_reason = reason
                if not side._done.done():
                    side._done.set_result(None)
