"""The connector's download of the edge's signing keys (GET /cdn-cgi/access/certs).

Bounded like everything that reads from the network: at most `MAX_JWKS_BYTES` of body (a JWKS
holds a few keys, ~2 KiB each), read incrementally and refused as soon as it passes the cap,
no transparent decompression (a small gzip body must not expand into memory), and one overall
timeout per edge address. The edge's TLS certificate is pinned as on the tunnel itself.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Sequence

import aiohttp

MAX_JWKS_BYTES = 1024 * 1024
JWKS_TIMEOUT = 10.0  # per edge address: connect, headers and body together
_CHUNK = 64 * 1024


class JwksFetchError(OSError):
    """The keys could not be fetched from any edge address (the message says why, per address)."""


async def fetch_jwks(edges: Sequence[str], pin: str, *, max_bytes: int = MAX_JWKS_BYTES,
                     timeout: float = JWKS_TIMEOUT) -> dict[str, Any]:
    """The JWKS document from the first edge address that serves a valid one.

    `pin` is the token's "sha256:<hex>" pin of the edge certificate."""
    fingerprint = aiohttp.Fingerprint(bytes.fromhex(pin.split(":", 1)[1]))
    errors: list[str] = []
    for edge in edges:
        try:
            return await asyncio.wait_for(_fetch_one(edge, fingerprint, max_bytes), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            errors.append(f"{edge}: no complete answer within {timeout:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            errors.append(f"{edge}: {exc or type(exc).__name__}")
    raise JwksFetchError("cannot fetch the edge's signing keys: " + "; ".join(errors))


async def _fetch_one(edge: str, fingerprint: aiohttp.Fingerprint, max_bytes: int) -> dict[str, Any]:
    url = f"https://{edge}/cdn-cgi/access/certs"
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(url, ssl=fingerprint, headers={"Accept-Encoding": "identity"},
                            allow_redirects=False) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
            if r.content_length is not None and r.content_length > max_bytes:
                raise OSError(f"the key set is {r.content_length} bytes, more than the {max_bytes} bytes allowed")
            body = bytearray()
            async for chunk in r.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise OSError(f"the key set is more than the {max_bytes} bytes allowed")
    try:
        doc = json.loads(body)
    except RecursionError:  # deeply nested arrays: not a key set
        raise ValueError("not a JWKS document") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JWKS document")
    return doc
