"""Password authentication for PostgreSQL, sans-I/O: SCRAM-SHA-256 (both ends), md5, cleartext.

SCRAM-SHA-256 follows RFC 5802 / RFC 7677 the way PostgreSQL uses it:

* The username in the client-first message is ignored (the StartupMessage's ``user`` counts);
  our client sends ``n=`` empty, as libpq does.
* GS2 header ``n,,`` or ``y,,`` only. We do not offer SCRAM-SHA-256-PLUS, so a client asking
  for channel binding (``p=…``) is refused with a clear error; an authorization identity
  (``a=``) and mandatory extensions (``m=``) are refused as PostgreSQL does.
* Nonces are printable ASCII except ``,``; ours are 18 random bytes in base64 (as PG).
* Passwords go through SASLprep (RFC 4013) exactly like PostgreSQL's ``pg_saslprep``: pure
  ASCII is used unchanged; otherwise map, NFKC-normalize, and if the string is not valid
  UTF-8, is empty after mapping, contains prohibited or unassigned code points or breaks the
  bidi rules, the raw bytes are used instead. (PG checks the prohibited/bidi rules on the
  mapped string before normalization; we do the same so both sides derive the same keys.)

`AuthFailed` is the only exception raised for bad peer input (wrong proof, malformed or
inconsistent messages, messages out of order); its text says what is wrong and is safe to log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
SALT_LEN = 16  # PG's SCRAM_DEFAULT_SALT_LEN
NONCE_LEN = 18  # PG's SCRAM_RAW_NONCE_LEN (random bytes before base64)
MAX_ITERATIONS = 10_000_000  # client side: an origin asking for more is refused (CPU DoS)


class AuthFailed(Exception):
    """Authentication failed or the peer's message was malformed; the text says why."""


# ---------------------------------------------------------------------------------------------
# SASLprep (RFC 4013), PostgreSQL flavour


def _prohibited(c: str) -> bool:
    return (stringprep.in_table_c12(c) or stringprep.in_table_c21_c22(c) or stringprep.in_table_c3(c)
            or stringprep.in_table_c4(c) or stringprep.in_table_c5(c) or stringprep.in_table_c6(c)
            or stringprep.in_table_c7(c) or stringprep.in_table_c8(c) or stringprep.in_table_c9(c)
            or stringprep.in_table_a1(c))


def saslprep(password: str | bytes) -> bytes:
    """The bytes PostgreSQL's ``pg_saslprep`` derives SCRAM keys from (see module doc)."""
    if isinstance(password, bytes):
        raw = password
        try:
            password = raw.decode()
        except UnicodeDecodeError:
            return raw
    else:
        raw = password.encode("utf-8", "surrogatepass")  # a lone surrogate is PG's invalid UTF-8
    if password.isascii():
        return raw
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in password if not stringprep.in_table_b1(c))
    if not mapped or any(_prohibited(c) for c in mapped):
        return raw
    if any(stringprep.in_table_d1(c) for c in mapped):
        if (any(stringprep.in_table_d2(c) for c in mapped)
                or not stringprep.in_table_d1(mapped[0]) or not stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.ucd_3_2_0.normalize("NFKC", mapped).encode()


# ---------------------------------------------------------------------------------------------
# Key derivation


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


@lru_cache(maxsize=256)
def _derive(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey). Cached: PBKDF2 dominates an origin connect, and the pool reconnects
    with the same password, salt and iteration count over and over."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthFailed(f"malformed SCRAM message: {what} is not valid base64") from None


def _nonce() -> str:
    return _b64(os.urandom(NONCE_LEN))


def _printable(nonce: str) -> bool:
    return bool(nonce) and all("\x21" <= c <= "\x7e" and c != "," for c in nonce)


@dataclass(frozen=True)
class ScramSecret:
    """What a server stores for a SCRAM-SHA-256 password (no password needed to verify it)."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def from_password(cls, password: str | bytes, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS) -> "ScramSecret":
        if iterations < 1:
            raise ValueError("iterations must be positive")
        salt = os.urandom(SALT_LEN) if salt is None else salt
        client_key, server_key = _derive(saslprep(password), salt, iterations)
        return cls(iterations, salt, _h(client_key), server_key)

    def to_string(self) -> str:
        """PostgreSQL's ``pg_authid.rolpassword`` form."""
        return (f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")

    @classmethod
    def from_string(cls, text: str) -> "ScramSecret":
        """Parse ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``; ValueError if it is not one."""
        try:
            mech, params, keys = text.split("$")
            iters, salt = params.split(":")
            stored, server = keys.split(":")
            if mech != MECHANISM or not iters.isdigit():
                raise ValueError
            secret = cls(int(iters), base64.b64decode(salt, validate=True),
                         base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except (ValueError, binascii.Error):
            raise ValueError("not a SCRAM-SHA-256 secret (expected "
                             "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)") from None
        if secret.iterations < 1 or not secret.salt or len(secret.stored_key) != 32 or len(secret.server_key) != 32:
            raise ValueError("not a SCRAM-SHA-256 secret (bad iterations, salt or key length)")
        return secret

    def verify_password(self, password: str | bytes) -> bool:
        """Whether a cleartext password matches (for the ``password`` auth method)."""
        client_key, _ = _derive(saslprep(password), self.salt, self.iterations)
        return hmac.compare_digest(_h(client_key), self.stored_key)


# ---------------------------------------------------------------------------------------------
# Server: clients authenticating to the proxy


def _decode(msg: bytes | None, what: str) -> str:
    if msg is None:  # e.g. a SASLInitialResponse without data
        raise AuthFailed(f"missing SCRAM {what}")
    try:
        return bytes(msg).decode()
    except (UnicodeDecodeError, TypeError):
        raise AuthFailed(f"malformed SCRAM {what}: not valid UTF-8") from None


class ScramServer:
    """One SCRAM-SHA-256 exchange, server side::

        server = ScramServer(secret)
        # → AuthenticationSASL(server.mechanisms); ← SASLInitialResponse(mech, client_first)
        server_first = server.first(client_first)   # → AuthenticationSASLContinue
        server_final = server.final(client_final)   # → AuthenticationSASLFinal, then AuthenticationOk
    """

    mechanisms = [MECHANISM]

    def __init__(self, secret: ScramSecret, nonce: str | None = None) -> None:
        self.secret = secret
        self._server_nonce = _nonce() if nonce is None else nonce
        if not _printable(self._server_nonce):
            raise ValueError("SCRAM nonce must be printable ASCII without ','")
        self._state = "first"
        self._gs2 = ""
        self._client_first_bare = ""
        self._server_first = ""
        self.client_key: bytes | None = None  # recovered from the proof once authenticated

    @property
    def done(self) -> bool:
        """True once `final` accepted the client's proof."""
        return self._state == "done"

    def first(self, client_first: bytes) -> bytes:
        if self._state != "first":
            raise AuthFailed("unexpected SCRAM client-first-message")
        self._state = "failed"
        msg = _decode(client_first, "client-first-message")
        if msg.startswith("p="):
            raise AuthFailed("the client requires SCRAM channel binding (SCRAM-SHA-256-PLUS), which "
                             "this proxy does not offer; use channel_binding=prefer or disable")
        if msg[:2] not in ("n,", "y,"):
            raise AuthFailed("malformed SCRAM client-first-message: expected GS2 header 'n,,' or 'y,,'")
        if msg[2:4] == "a=":
            raise AuthFailed("SCRAM authorization identity (a=) is not supported")
        if msg[2:3] != ",":
            raise AuthFailed("malformed SCRAM client-first-message: expected GS2 header 'n,,' or 'y,,'")
        self._gs2, bare = msg[:3], msg[3:]
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise AuthFailed("the client requires an unsupported SCRAM extension (m=)")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise AuthFailed("malformed SCRAM client-first-message: expected n=<user>,r=<nonce>")
        client_nonce = attrs[1][2:]
        if not _printable(client_nonce):
            raise AuthFailed("malformed SCRAM client-first-message: the nonce must be printable ASCII")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64(self.secret.salt)},i={self.secret.iterations}"
        self._state = "final"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        if self._state != "final":
            raise AuthFailed("unexpected SCRAM client-final-message")
        self._state = "failed"
        msg = _decode(client_final, "client-final-message")
        attrs = msg.split(",")
        if len(attrs) < 3 or not attrs[0].startswith("c=") or not attrs[1].startswith("r=") \
                or not attrs[-1].startswith("p="):
            raise AuthFailed("malformed SCRAM client-final-message: expected c=…,r=…,p=…")
        if _unb64(attrs[0][2:], "channel binding") != self._gs2.encode():
            raise AuthFailed("SCRAM channel binding data does not match the client-first-message header")
        if attrs[1][2:] != self._nonce:
            raise AuthFailed("SCRAM nonce mismatch in client-final-message")
        proof = _unb64(attrs[-1][2:], "proof")
        if len(proof) != 32:
            raise AuthFailed("malformed SCRAM client-final-message: proof has the wrong length")
        without_proof = msg[:len(msg) - len(attrs[-1]) - 1]
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = _xor(proof, _hmac(self.secret.stored_key, auth_message))
        if not hmac.compare_digest(_h(client_key), self.secret.stored_key):
            raise AuthFailed("password authentication failed (wrong SCRAM proof)")
        self.client_key = client_key
        self._state = "done"
        return b"v=" + _b64(_hmac(self.secret.server_key, auth_message)).encode()


# ---------------------------------------------------------------------------------------------
# Client: the proxy authenticating to an origin


def _escape_user(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class ScramClient:
    """One SCRAM-SHA-256 exchange, client side::

        client = ScramClient(password)
        # ← AuthenticationSASL(["SCRAM-SHA-256", ...]) → SASLInitialResponse(MECHANISM, client.first())
        client_final = client.final(server_first)   # ← SASLContinue data; → SASLResponse
        client.verify(server_final)                 # ← SASLFinal data: AuthFailed unless the
                                                    #   server proved it knows the password
    """

    mechanism = MECHANISM

    def __init__(self, password: str | bytes, nonce: str | None = None, *, username: str = "",
                 max_iterations: int = MAX_ITERATIONS) -> None:
        self._password = saslprep(password)
        self._keys: tuple[bytes, bytes] | None = None
        self._expect: tuple[bytes, int] | None = None
        self._nonce = _nonce() if nonce is None else nonce
        if not _printable(self._nonce):
            raise ValueError("SCRAM nonce must be printable ASCII without ','")
        self._bare = f"n={_escape_user(username)},r={self._nonce}"
        self._max_iterations = max_iterations
        self._state = "first"
        self._server_signature = b""

    @classmethod
    def from_keys(cls, client_key: bytes, server_key: bytes, *, salt: bytes, iterations: int,
                  nonce: str | None = None) -> "ScramClient":
        """Authenticate with keys instead of a password (e.g. a client's ClientKey recovered by
        `ScramServer`); the origin must use the same salt and iteration count."""
        client = cls(b"", nonce)
        client._keys = (client_key, server_key)
        client._expect = (salt, iterations)
        return client

    @property
    def done(self) -> bool:
        """True once `verify` accepted the server's signature."""
        return self._state == "done"

    def first(self) -> bytes:
        if self._state != "first":
            raise AuthFailed("SCRAM client-first-message already sent")
        self._state = "final"
        return ("n,," + self._bare).encode()

    def final(self, server_first: bytes) -> bytes:
        if self._state != "final":
            raise AuthFailed("unexpected SCRAM server-first-message")
        self._state = "failed"
        msg = _decode(server_first, "server-first-message")
        attrs = msg.split(",")
        if attrs[0].startswith("m="):
            raise AuthFailed("the server requires an unsupported SCRAM extension (m=)")
        if len(attrs) < 3 or not attrs[0].startswith("r=") or not attrs[1].startswith("s=") \
                or not attrs[2].startswith("i="):
            raise AuthFailed("malformed SCRAM server-first-message: expected r=…,s=…,i=…")
        nonce = attrs[0][2:]
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce) or not _printable(nonce):
            raise AuthFailed("SCRAM nonce mismatch: the server's nonce does not extend ours")
        salt = _unb64(attrs[1][2:], "salt")
        iters = attrs[2][2:]
        if not salt or not iters.isdigit() or not 1 <= int(iters) <= self._max_iterations:
            raise AuthFailed(f"invalid SCRAM salt or iteration count (i={iters[:20]}, "
                             f"allowed 1..{self._max_iterations})")
        iterations = int(iters)
        if self._keys is not None:
            if self._expect != (salt, iterations):
                raise AuthFailed("the server's SCRAM salt/iterations differ from the stored secret's")
            client_key, server_key = self._keys
        else:
            client_key, server_key = _derive(self._password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        auth_message = f"{self._bare},{msg},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._state = "verify"
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        if self._state != "verify":
            raise AuthFailed("unexpected SCRAM server-final-message")
        self._state = "failed"
        msg = _decode(server_final, "server-final-message")
        if msg.startswith("e="):
            raise AuthFailed(f"the server rejected SCRAM authentication: {msg[2:200]}")
        if not msg.startswith("v="):
            raise AuthFailed("malformed SCRAM server-final-message: expected v=…")
        signature = _unb64(msg[2:].split(",", 1)[0], "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("the server's SCRAM signature is wrong: it does not know the password "
                             "(not the expected server?)")
        self._state = "done"


# ---------------------------------------------------------------------------------------------
# md5 and cleartext


def _utf8(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


def md5_secret(user: str | bytes, password: str | bytes) -> str:
    """PostgreSQL's stored md5 form: ``"md5" + md5(password + user)``."""
    return "md5" + hashlib.md5(_utf8(password) + _utf8(user)).hexdigest()


def md5_response_from_secret(secret: str, salt: bytes) -> bytes:
    """The PasswordMessage content for AuthenticationMD5Password, from a stored md5 secret."""
    if len(secret) != 35 or not secret.startswith("md5"):
        raise ValueError("not an md5 secret")
    return b"md5" + hashlib.md5(secret[3:].encode() + salt).hexdigest().encode()


def md5_response(user: str | bytes, password: str | bytes, salt: bytes) -> bytes:
    """``"md5" + md5(md5(password + user) + salt)`` (hex); the NUL is added by `password_message`."""
    return md5_response_from_secret(md5_secret(user, password), salt)


def md5_verify(secret: str, salt: bytes, response: bytes) -> bool:
    """Whether a client's md5 response matches the stored md5 secret (constant time)."""
    return hmac.compare_digest(md5_response_from_secret(secret, salt), bytes(response))


def cleartext_verify(expected: str | bytes, given: bytes) -> bool:
    """Whether a cleartext PasswordMessage matches (constant time)."""
    return hmac.compare_digest(_utf8(expected), bytes(given))
