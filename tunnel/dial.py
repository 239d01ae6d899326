"""Dialing the edge: WebSocket over TLS, with the edge certificate checked against a pin.

The certificate is self-signed, so no CA can vouch for it: the dialer accepts any
certificate during the handshake and then compares its SHA-256 with the pin from the
token before sending anything of value (the upgrade request carries no secret).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

from relay.server import ws_options
from tunnel.tls import PinMismatch, pinned_client_ssl_context, verify_pin

DIAL_TIMEOUT = 15.0

__all__ = ["DIAL_TIMEOUT", "PinMismatch", "dial_edge"]


async def dial_edge(url: str, pin: str, path: str, *, timeout: float = DIAL_TIMEOUT) -> ClientConnection:
    """Open `wss://host:port/path` on the edge; raises PinMismatch, OSError or TimeoutError."""
    parts = urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname:
        raise ValueError(f"edge URL must look like wss://HOST:PORT, got {url!r}")
    base = url.rstrip("/")
    ws = await asyncio.wait_for(
        connect(
            base + path,
            ssl=pinned_client_ssl_context(),
            user_agent_header=None,
            open_timeout=timeout,
            **ws_options(),
        ),
        timeout + 1,
    )
    ssl_object = ws.transport.get_extra_info("ssl_object")
    try:
        if ssl_object is None:
            raise PinMismatch("the edge did not negotiate TLS")
        verify_pin(ssl_object, pin)
    except PinMismatch:
        ws.transport.abort()
        raise
    return ws
