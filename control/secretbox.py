"""Encryption of small secrets at rest (tunnel secrets, later origin passwords).

AES-256-GCM with a key kept in `STATE_DIR/secret.key`, outside the database, so a copy of
`state.db` alone reveals nothing. Blob layout: version byte | 12-byte nonce | ciphertext+tag.
Callers pass associated data (e.g. the row id) so a ciphertext cannot be moved to another row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tunnel.tls import write_private_file

KEY_FILE = "secret.key"
KEY_BYTES = 32
_VERSION = b"\x01"
_NONCE_BYTES = 12


class SecretBoxError(Exception):
    pass


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretBoxError(f"secret key must be {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    @classmethod
    def load_or_create(cls, path: Path) -> "SecretBox":
        """Load the key at `path`, or make one (mode 0600) if the file does not exist."""
        path = Path(path)
        if not path.exists():
            write_private_file(path, os.urandom(KEY_BYTES))
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise SecretBoxError(f"{path} is not a valid secret key ({len(key)} bytes, expected {KEY_BYTES})")
        return cls(key)

    def derive_key(self, label: bytes) -> bytes:
        """A 32-byte key for another purpose (e.g. hashing service-token secrets): HMAC-SHA256 of
        `label` under the box key, so it lives and dies with secret.key without being it."""
        if not isinstance(label, bytes) or not label:
            raise ValueError("derive_key needs a non-empty bytes label")
        return hmac.new(self._key, label, hashlib.sha256).digest()

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < 1 + _NONCE_BYTES + 16 or blob[:1] != _VERSION:
            raise SecretBoxError("encrypted secret is malformed")
        nonce, ct = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, ct, aad)
        except InvalidTag:
            raise SecretBoxError(
                "cannot decrypt a stored secret: secret.key does not match this database"
            ) from None
