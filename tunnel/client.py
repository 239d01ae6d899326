"""The client end of the tunnel: one multiplexed link to the relay's `/client` endpoint,
re-dialled when it drops, and a stream per connection (ConnectRequest → ConnectResponse).
Used by `hd access tcp/ssh` and by the proxy for tunnel origins."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tunnel.wslink import dial_link
from tunnel.link import MuxLink, StreamInbox
from tunnel.messages import RST_CANCEL, ConnectRequest, ConnectResponse, MessageError

# The relay bounds the origin dial (route connect timeout + margin); this only guards
# against a stuck edge.
OPEN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Endpoint:
    url: str
    pin: str


class StreamRefused(Exception):
    def __init__(self, response: ConnectResponse) -> None:
        super().__init__(response.describe())
        self.response = response


class EdgeSession:
    """The client's one link to the relay."""

    def __init__(self, edge: Any) -> None:
        self.edge = edge
        self._link: MuxLink | None = None
        self._runner: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def link(self) -> MuxLink:
        async with self._lock:
            if self._link is None or self._link.is_closed:
                self._link = await dial_link(self.edge.url, self.edge.pin, "/client")
                self._runner = asyncio.create_task(self._link.run())
            return self._link

    async def open(self, hostname: str, headers: dict[str, str]) -> tuple[StreamInbox, ConnectResponse]:
        link = await self.link()
        stream = link.open_stream()
        inbox = StreamInbox(stream)
        inbox.send_message(ConnectRequest(hostname=hostname, headers=headers).to_dict())
        try:
            resp = ConnectResponse.from_dict(await inbox.read_message(OPEN_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError):
            stream.reset(RST_CANCEL, "timeout")
            raise OSError(f"the edge did not answer within {OPEN_TIMEOUT:g}s") from None
        except (EOFError, ConnectionResetError, MessageError) as exc:
            if not stream.closed:
                stream.reset(RST_CANCEL, "bad response")
            raise OSError(f"the edge dropped the stream: {exc}") from None
        if not resp.ok:
            if not stream.closed:
                stream.reset(RST_CANCEL, "refused")
            raise StreamRefused(resp)
        return inbox, resp

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close(1000, "client exiting")
        if self._runner is not None:
            self._runner.cancel()


