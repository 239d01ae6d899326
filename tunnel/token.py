"""The tunnel token: everything `hd-connector --token T` needs, in one opaque string.

Format: standard base64 of compact JSON `{"t": tunnel id, "s": b64 secret, "e": ["host:port"…],
"p": "sha256:<hex>"}` (the cloudflared layout, plus the edge addresses and certificate pin so a
self-signed edge needs no other configuration).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field

MIN_SECRET_BYTES = 32
_PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ADDR_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class InvalidToken(ValueError):
    """The text is not a tunnel token; the message says what is wrong (never the secret)."""


@dataclass(frozen=True)
class TunnelToken:
    tunnel_id: str
    secret: bytes = field(repr=False)  # never shown in reprs or logs
    edge: list[str]
    pin: str

    def encode(self) -> str:
        doc = {
            "t": self.tunnel_id,
            "s": base64.b64encode(self.secret).decode("ascii"),
            "e": list(self.edge),
            "p": self.pin,
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return base64.b64encode(raw).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> "TunnelToken":
        if not isinstance(text, str):
            raise InvalidToken("tunnel token must be text")
        text = "".join(text.split())  # tolerate surrounding whitespace and line wrapping
        if not text:
            raise InvalidToken("tunnel token is empty")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken("tunnel token is not valid base64 — was it copied completely?") from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise InvalidToken("tunnel token does not contain a JSON document — was it copied completely?") from None
        if not isinstance(doc, dict):
            raise InvalidToken("tunnel token does not contain a JSON object")
        missing = [k for k in ("t", "s", "e", "p") if k not in doc]
        if missing:
            raise InvalidToken(f"tunnel token is missing field(s) {', '.join(missing)}")

        tunnel_id, secret_b64, edge, pin = doc["t"], doc["s"], doc["e"], doc["p"]
        if not isinstance(tunnel_id, str) or not tunnel_id:
            raise InvalidToken("tunnel token has an empty or non-text tunnel id")
        if not isinstance(secret_b64, str):
            raise InvalidToken("tunnel token secret is not text")
        try:
            secret = base64.b64decode(secret_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken("tunnel token secret is not valid base64") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise InvalidToken(f"tunnel token secret is too short ({len(secret)} bytes, need at least {MIN_SECRET_BYTES})")
        if isinstance(edge, str):
            edge = [edge]
        if not isinstance(edge, list) or not edge:
            raise InvalidToken("tunnel token has no edge address")
        for addr in edge:
            if not isinstance(addr, str) or not _valid_address(addr):
                raise InvalidToken(f"tunnel token has an invalid edge address {addr!r} (expected host:port)")
        if not isinstance(pin, str) or not _PIN_RE.match(pin):
            raise InvalidToken("tunnel token has an invalid certificate pin (expected sha256:<64 hex>)")
        return cls(tunnel_id=tunnel_id, secret=secret, edge=list(edge), pin=pin)


def _valid_address(addr: str) -> bool:
    m = _ADDR_RE.match(addr)
    return bool(m) and 1 <= int(m.group(2)) <= 65535
