"""A middlebox between connectors and the edge: forwards TCP and UDP on one loopback port to the
edge's tunnel port, and can black-hole either protocol — the way a firewall that drops UDP
(or blocks outbound TCP) behaves. Run it with `in_thread(Firewall(edge_port))`.

    with in_thread(Firewall(edge.tunnel_port)) as fw:
        token = token_via(t["token"], fw.port)   # connectors dial the firewall instead
        fw.block_udp = True                       # datagrams are dropped silently both ways
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tunnel.token import TunnelToken

HOST = "127.0.0.1"


def token_via(token: str, port: int, host: str = HOST) -> str:
    """The same tunnel token with its edge address replaced by host:port."""
    t = TunnelToken.decode(token)
    return TunnelToken(t.tunnel_id, t.secret, [f"{host}:{port}"], t.pin).encode()


class _UdpFlow(asyncio.DatagramProtocol):
    """One client's UDP flow: a socket towards the edge; answers go back to the client."""

    def __init__(self, fw: Firewall, client: tuple[str, int]) -> None:
        self.fw, self.client = fw, client
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.fw.block_udp and self.fw._udp is not None:
            self.fw._udp.sendto(data, self.client)


class _UdpFront(asyncio.DatagramProtocol):
    def __init__(self, fw: Firewall) -> None:
        self.fw = fw

    def datagram_received(self, data: bytes, addr: Any) -> None:
        fw = self.fw
        if fw.block_udp:
            fw.udp_dropped += 1
            return
        flow = fw._flows.get(addr)
        if flow is None:
            fw._spawn(fw._open_flow(addr, data))
        elif flow.transport is not None:
            flow.transport.sendto(data)


class Firewall:
    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.block_udp = False
        self.block_tcp = False  # new TCP connections are refused (reset); open ones keep going
        self.udp_dropped = 0
        self.tcp_refused = 0
        self._udp: Any = None
        self._flows: dict[Any, _UdpFlow] = {}
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Firewall:
        loop = asyncio.get_running_loop()
        # Same port number for both protocols, like the edge itself.
        for _ in range(50):
            self._tcp = await asyncio.start_server(self._tcp_client, HOST, 0)
            self.port = self._tcp.sockets[0].getsockname()[1]
            try:
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpFront(self),
                                                                   local_addr=(HOST, self.port))
                return self
            except OSError:
                self._tcp.close()
        raise OSError("no port free for both TCP and UDP")

    async def __aexit__(self, *exc: Any) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._udp is not None:
            self._udp.close()
        for flow in self._flows.values():
            if flow.transport is not None:
                flow.transport.close()
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_flow(self, client: Any, first: bytes) -> None:
        if client in self._flows:
            return
        flow = _UdpFlow(self, client)
        self._flows[client] = flow
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: flow, remote_addr=self.target)
        flow.transport.sendto(first)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.block_tcp:
            self.tcp_refused += 1
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            for w in (writer, up_w):
                self._writers.discard(w)
                w.transport.abort()
