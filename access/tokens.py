"""Service-token credentials: generation, keyed hashing, constant-time checks.

Secrets are 256-bit random values, so a fast keyed hash (HMAC-SHA256 under a key kept
outside the database) is the right storage form: a stolen database reveals nothing usable,
and checking a secret costs about a microsecond instead of a password KDF per stream.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

CLIENT_ID_RE = re.compile(r"^[0-9a-f]{32}\.access$")
SECRET_BYTES = 32
HEADER_CLIENT_ID = "CF-Access-Client-Id"
HEADER_CLIENT_SECRET = "CF-Access-Client-Secret"


def new_client_id() -> str:
    return secrets.token_hex(16) + ".access"


def new_client_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def is_client_id(text: str) -> bool:
    return CLIENT_ID_RE.fullmatch(text) is not None


class SecretHasher:
    """HMAC-SHA256 of client secrets under a server-side key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the hashing key must be at least 16 bytes")
        # Domain-separate from other uses of the same master key.
        self._key = hmac.new(key, b"hd/service-token-secret/v1", hashlib.sha256).digest()

    def hash(self, secret: str) -> str:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).hexdigest()

    def matches(self, secret: str, stored_hash: str | None) -> bool:
        if not stored_hash:
            return False
        return hmac.compare_digest(self.hash(secret), stored_hash)


def credentials_from_headers(headers: dict[str, str]) -> tuple[str, str] | None:
    """The (client id, secret) pair from CF-Access-* headers, matched case-insensitively."""
    lowered = {k.lower(): v for k, v in headers.items()}
    client_id = lowered.get(HEADER_CLIENT_ID.lower())
    secret = lowered.get(HEADER_CLIENT_SECRET.lower())
    if client_id is None and secret is None:
        return None
    return (client_id or "", secret or "")
