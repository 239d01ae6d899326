"""Tunnel protocol messages: `u32 length | JSON` records carried on link streams.

The same framing is used on the control stream (register, config push, …) and as the
ConnectRequest / ConnectResponse preamble of every data stream, over any link (WebSocket
mux today, QUIC streams next). Sans-I/O: `MessageReader` takes bytes and yields messages.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE_SIZE = 64 * 1024
_LEN = struct.Struct("!I")


class MessageError(Exception):
    """A malformed or oversized tunnel message; the stream carrying it must be reset."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_SIZE:
        raise MessageError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return _LEN.pack(len(body)) + body


class MessageReader:
    """Accumulates stream bytes and splits them into messages.

    `feed()` returns the complete messages; `rest()` hands back any bytes that followed the
    last message taken in preamble mode (they belong to the raw byte phase of a data stream).
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size

    def feed(self, data: bytes, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Parse as many messages as are complete (at most `limit`)."""
        self._buf += data
        out: list[dict[str, Any]] = []
        while limit is None or len(out) < limit:
            if len(self._buf) < 4:
                break
            (size,) = _LEN.unpack_from(self._buf, 0)
            if size > self._max:
                raise MessageError(f"message length {size} exceeds maximum {self._max}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            try:
                msg = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MessageError(f"message is not valid JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise MessageError("message is not a JSON object")
            out.append(msg)
        return out

    def push(self, data: bytes) -> None:
        self._buf += data

    def rest(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------- data stream preamble


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    hostname: str
    type: str = "tcp"
    metadata: dict[str, str] = field(default_factory=dict)
    assertion: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"hostname": self.hostname, "type": self.type}
        if self.metadata:
            d["metadata"] = self.metadata
        if self.assertion is not None:
            d["assertion"] = self.assertion
        if self.headers:
            d["headers"] = self.headers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectRequest:
        hostname = d.get("hostname")
        if not isinstance(hostname, str) or not hostname or len(hostname) > 253:
            raise MessageError("ConnectRequest needs a hostname")
        kind = d.get("type", "tcp")
        meta = d.get("metadata", {})
        headers = d.get("headers", {})
        meta = {} if meta is None else meta
        headers = {} if headers is None else headers
        assertion = d.get("assertion")
        if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(headers, dict):
            raise MessageError("malformed ConnectRequest")
        if assertion is not None and not isinstance(assertion, str):
            raise MessageError("malformed ConnectRequest assertion")
        return cls(
            hostname=hostname.lower().rstrip("."),
            type=kind,
            metadata={str(k): str(v) for k, v in meta.items()},
            assertion=assertion,
            headers={str(k): str(v) for k, v in headers.items()},
        )


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    ok: bool
    status: int = 200
    code: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True}
        return {"ok": False, "status": self.status, "code": self.code, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectResponse:
        if d.get("ok") is True:
            return cls(ok=True)
        status = d.get("status", 502)
        return cls(
            ok=False,
            status=status if isinstance(status, int) else 502,
            code=str(d.get("code", "error")),
            error=str(d.get("error", "the stream was refused")),
        )

    @classmethod
    def fail(cls, status: int, code: str, error: str) -> ConnectResponse:
        return cls(ok=False, status=status, code=code, error=error)

    def describe(self) -> str:
        return "ok" if self.ok else f"{self.status} {self.code}: {self.error}"


# RST codes used on data streams (u32 in the mux RST frame / QUIC error code).
RST_CANCEL = 0x0  # normal abort (peer socket closed with an error)
RST_REFUSED = 0x2
RST_PROTOCOL = 0x3  # malformed preamble
RST_ORIGIN = 0x4  # origin connection failed after the response
RST_SHUTDOWN = 0x5  # connection going away
