"""MySQL authentication plugins, sans-I/O, both ends: ``mysql_native_password`` and
``caching_sha2_password`` (MySQL 8's default; MariaDB does not implement it).

Byte conventions
----------------
Everything here is packet *payloads*: no 3-byte length, no sequence id (framing and sequence
numbers belong to `proxy.mysql.protocol`).

* ``start()`` (clients) returns the auth response: the bytes of the ``auth-response`` field of
  HandshakeResponse41 (without its length prefix) or the whole payload of an AuthSwitchResponse.
* Server ``receive(payload)`` takes exactly that on its first call, then the whole payload of
  each later client packet (e.g. ``b"\\x02"``, ``b"secret\\x00"``, a 256-byte RSA ciphertext).
* AuthMoreData is a packet whose payload starts with ``0x01``; that status byte is part of what
  we take and return: a server returns ``b"\\x01\\x03"`` (fast auth success),
  ``b"\\x01\\x04"`` (perform full authentication) or ``b"\\x01" + PEM`` (public key); a
  client's ``receive`` expects them with the ``0x01``.
* Client ``receive`` also takes the server's OK (``0x00 …``) and ERR (``0xFF …``) payloads and
  turns them into `Done`. An AuthSwitchRequest (``0xFE …``) must be handled by the caller (it
  starts a new plugin with the new nonce); handed to ``receive`` it is a failure.

Return values: ``bytes`` = send this payload, then pass the next packet to ``receive``;
``None`` = send nothing, pass the next packet; `Done` = the exchange is over. A server's
``Done.send``, if not None, is a last payload to send before the caller's OK (the ``0x01 0x03``
of the caching_sha2 fast path); after ``Done(ok=False)`` the caller sends ERR 1045.

Errors: a misbehaving peer (wrong lengths, unexpected bytes, wrong password, a bad key) never
raises: it ends in ``Done(ok=False, reason=...)``, the reason safe to log (no secrets). Misuse by
the caller (a bad nonce or key, ``receive`` after `Done`) raises `MySQLAuthError`.

Nonces
------
The scramble is 20 bytes. MySQL and MariaDB send it NUL-terminated: in HandshakeV10 as
auth-plugin-data-part-1 (8 bytes) + part-2 (13 bytes, the last a NUL), in AuthSwitchRequest as
the plugin data after the plugin name (20 bytes + NUL). Callers join the parts and call
`parse_nonce` (which strips that NUL and checks the length). A server's `plugin_data` is the
nonce + NUL to put there; `new_nonce` makes nonces like MySQL's ``generate_user_salt``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

NATIVE_PASSWORD = "mysql_native_password"
CACHING_SHA2_PASSWORD = "caching_sha2_password"
NONCE_LEN = 20  # SCRAMBLE_LENGTH

# caching_sha2_password AuthMoreData payloads (status byte 0x01 + one byte) and client requests
AUTH_MORE_DATA = 0x01
FAST_AUTH_SUCCESS = b"\x01\x03"
PERFORM_FULL_AUTH = b"\x01\x04"
REQUEST_PUBLIC_KEY = b"\x02"

_OK, _ERR, _AUTH_SWITCH = 0x00, 0xFF, 0xFE
# RSA_PKCS1_OAEP_PADDING in OpenSSL, which both MySQL ends use: OAEP with SHA-1 and MGF1-SHA-1
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
_OAEP_OVERHEAD = 2 * 20 + 2  # 2*hLen + 2 for SHA-1


class MySQLAuthError(Exception):
    """The caller misused this module (bad nonce, key or state); peer input never raises this."""


@dataclass(frozen=True)
class Done:
    """The end of an exchange. ``reason``: why it failed, or on success which path was taken."""

    ok: bool
    reason: str
    send: bytes | None = None  # server only: last payload to send before OK


Step = bytes | None | Done


# ---------------------------------------------------------------------------------------------
# Nonces and hashes


def new_nonce(randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """20 random bytes the way MySQL's ``generate_user_salt`` makes them: 7-bit, no NUL (clients
    read part-2 of the greeting as a C string) and no ``$``."""
    raw = randbytes(NONCE_LEN)
    if len(raw) != NONCE_LEN:
        raise MySQLAuthError("randbytes returned the wrong number of bytes")
    return bytes(b + 1 if b in (0, 0x24) else b for b in (x & 0x7F for x in raw))


def parse_nonce(data: bytes) -> bytes:
    """The 20-byte scramble from greeting (part-1 + part-2 joined) or AuthSwitchRequest plugin
    data: 20 bytes, or 21 with the trailing NUL servers send."""
    data = bytes(data)
    if len(data) == NONCE_LEN + 1 and data[-1] == 0:
        data = data[:-1]
    if len(data) != NONCE_LEN:
        raise MySQLAuthError(f"the server's scramble must be {NONCE_LEN} bytes "
                             f"(optionally NUL-terminated), got {len(data)}")
    return data


def _check_nonce(nonce: bytes) -> bytes:
    nonce = bytes(nonce)
    if len(nonce) != NONCE_LEN:
        raise MySQLAuthError(f"nonce must be {NONCE_LEN} bytes (strip the NUL with parse_nonce), "
                             f"got {len(nonce)}")
    return nonce


def _b(password: str | bytes) -> bytes:
    return password.encode() if isinstance(password, str) else bytes(password)


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _xor_cyclic(data: bytes, key: bytes) -> bytes:
    # MySQL's xor_string over password + NUL; the NUL is scrambled too
    return bytes(c ^ key[i % len(key)] for i, c in enumerate(data))


def native_scramble(password: str | bytes, nonce: bytes) -> bytes:
    """mysql_native_password: ``SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw)))`` (20 bytes)."""
    stage1 = _sha1(_b(password))
    return _xor(stage1, _sha1(_check_nonce(nonce) + _sha1(stage1)))


def native_password_hash(password: str | bytes) -> str:
    """What MySQL/MariaDB store and ``PASSWORD()`` returns: ``*`` + upper hex SHA1(SHA1(pw)),
    ``""`` for the empty password."""
    pw = _b(password)
    return "*" + _sha1(_sha1(pw)).hex().upper() if pw else ""


def parse_native_hash(stored: str | bytes) -> bytes:
    """SHA1(SHA1(pw)) from ``*HEX`` (41 chars) or 20 raw bytes; ``b""`` for the empty password."""
    if isinstance(stored, str):
        if stored == "":
            return b""
        if len(stored) == 41 and stored[0] == "*":
            try:
                return bytes.fromhex(stored[1:])
            except ValueError:
                pass
        raise MySQLAuthError("not a mysql_native_password hash (expected '*' + 40 hex digits or '')")
    stored = bytes(stored)
    if len(stored) not in (0, 20):
        raise MySQLAuthError("a mysql_native_password hash is 20 bytes (SHA1(SHA1(password)))")
    return stored


def caching_sha2_scramble(password: str | bytes, nonce: bytes) -> bytes:
    """caching_sha2_password fast path: ``SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)``."""
    stage1 = _sha256(_b(password))
    return _xor(stage1, _sha256(_sha256(stage1) + _check_nonce(nonce)))


def caching_sha2_digest(password: str | bytes) -> bytes:
    """SHA256(SHA256(pw)): MySQL's fast-auth cache entry, enough to verify a fast-path scramble."""
    return _sha256(_sha256(_b(password)))


def _server_end(payload: bytes, plugin: str) -> Done | None:
    """OK/ERR/AuthSwitch as the end of a client's exchange; None if it is none of them."""
    if not payload:
        return Done(False, f"{plugin}: empty packet from the server")
    if payload[0] == _OK:
        return Done(True, f"{plugin}: server sent OK")
    if payload[0] == _ERR:
        return Done(False, f"server refused authentication: {_err_text(payload)}")
    if payload[0] == _AUTH_SWITCH:
        return Done(False, f"{plugin}: unexpected AuthSwitchRequest (0xFE): the caller must "
                           "switch plugins before calling receive()")
    return None


def _err_text(payload: bytes) -> str:
    # ERR: 0xFF, code u16 LE, ['#' + 5-byte SQLSTATE], message (PROTOCOL_41 layout, lenient)
    if len(payload) < 3:
        return "ERR packet (truncated)"
    code = int.from_bytes(payload[1:3], "little")
    rest = payload[3:]
    state = ""
    if rest[:1] == b"#" and len(rest) >= 6:
        state, rest = rest[1:6].decode("ascii", "replace"), rest[6:]
    msg = rest[:300].decode("utf-8", "replace")
    return f"ERROR {code} ({state}): {msg}" if state else f"ERROR {code}: {msg}"


class _Machine:
    plugin_name = ""

    def __init__(self) -> None:
        self._state = "start"
        self.result: Done | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def _finish(self, ok: bool, reason: str, send: bytes | None = None) -> Done:
        self._state = "done"
        self.result = Done(ok, reason, send)
        return self.result

    def _fail(self, reason: str) -> Done:
        return self._finish(False, f"{self.plugin_name}: {reason}")

    def _check_receive(self) -> None:
        if self._state == "start":
            raise MySQLAuthError(f"{self.plugin_name}: receive() before start()")
        if self._state == "done":
            raise MySQLAuthError(f"{self.plugin_name}: receive() after the exchange ended")


# ---------------------------------------------------------------------------------------------
# mysql_native_password


class NativePasswordClient(_Machine):
    """Client side (the proxy logging in to an origin)::

        c = NativePasswordClient(password, nonce)
        auth_response = c.start()          # 20 bytes, or b"" for the empty password
        done = c.receive(ok_or_err_payload)  # Done
    """

    plugin_name = NATIVE_PASSWORD

    def __init__(self, password: str | bytes, nonce: bytes) -> None:
        super().__init__()
        self._password = _b(password)
        self._nonce = _check_nonce(nonce)

    def start(self) -> bytes:
        if self._state != "start":
            raise MySQLAuthError("mysql_native_password: start() called twice")
        self._state = "result"
        # empty password: empty response, as libmysqlclient and MariaDB's client send
        return native_scramble(self._password, self._nonce) if self._password else b""

    def receive(self, payload: bytes) -> Step:
        self._check_receive()
        payload = bytes(payload)
        end = _server_end(payload, self.plugin_name)
        if end is not None:
            return self._finish(end.ok, end.reason)
        return self._fail(f"unexpected packet 0x{payload[0]:02x} from the server (expected OK or ERR)")


class NativePasswordServer(_Machine):
    """Server side (clients logging in to the proxy), from the stored hash only::

        s = NativePasswordServer(native_password_hash(pw) or stored "*HEX", nonce)
        # greeting/AuthSwitchRequest carries s.plugin_data
        done = s.receive(auth_response)    # Done; then send OK or ERR
    """

    plugin_name = NATIVE_PASSWORD

    def __init__(self, stored_hash: str | bytes, nonce: bytes | None = None) -> None:
        super().__init__()
        self._stage2 = parse_native_hash(stored_hash)
        self.nonce = new_nonce() if nonce is None else _check_nonce(nonce)
        self._state = "scramble"

    @property
    def plugin_data(self) -> bytes:
        return self.nonce + b"\x00"

    def receive(self, payload: bytes) -> Step:
        self._check_receive()
        payload = bytes(payload)
        if payload in (b"", b"\x00"):  # no password given (both forms exist in the wild)
            if self._stage2:
                return self._fail("password required but none given")
            return self._finish(True, "mysql_native_password: empty password")
        if len(payload) != NONCE_LEN:
            return self._fail(f"malformed auth response: expected {NONCE_LEN} bytes, got {len(payload)}")
        if not self._stage2:
            return self._fail("a password was given for an account without one")
        # recover SHA1(pw) from the response and check that it hashes to the stored value
        stage1 = _xor(payload, _sha1(self.nonce + self._stage2))
        if not hmac.compare_digest(_sha1(stage1), self._stage2):
            return self._fail("wrong password")
        return self._finish(True, "mysql_native_password: password ok")


# ---------------------------------------------------------------------------------------------
# caching_sha2_password


def _load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """ValueError unless ``pem`` is an RSA public key (SubjectPublicKeyInfo or PKCS#1 PEM)."""
    try:
        key = serialization.load_pem_public_key(bytes(pem).rstrip(b"\x00"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def public_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    """The PEM a server sends after a client's public key request (SubjectPublicKeyInfo, as MySQL)."""
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Sha2Verifier:
    """What a caching_sha2_password server needs to know about an account.

    ``fast_digest``: SHA256(SHA256(pw)), MySQL's cache entry; None is a cache miss, so the client
    must go through full authentication. ``check_password``: verifies a cleartext password (full
    authentication and the empty password)."""

    fast_digest: bytes | None = field(repr=False)
    check_password: Callable[[bytes], bool] = field(repr=False)

    @classmethod
    def from_password(cls, password: str | bytes, *, cached: bool = True) -> "Sha2Verifier":
        """Keeps only the digest, not the password; ``cached=False`` models a cache miss."""
        return cls.from_digest(caching_sha2_digest(password), cached=cached)

    @classmethod
    def from_digest(cls, digest: bytes, *, cached: bool = True) -> "Sha2Verifier":
        if len(digest) != 32:
            raise MySQLAuthError("a caching_sha2_password digest is 32 bytes (SHA256(SHA256(password)))")
        digest = bytes(digest)
        return cls(digest if cached else None,
                   lambda pw: hmac.compare_digest(caching_sha2_digest(pw), digest))


class CachingSha2Client(_Machine):
    """Client side::

        c = CachingSha2Client(password, nonce, tls=..., server_public_key=pem_or_None)
        out = c.start()                       # 32-byte scramble, or b"" for the empty password
        while not isinstance(out := c.receive(next_payload), Done):
            if out is not None: send(out)     # b"pw\\0", b"\\x02" or an RSA ciphertext

    Full authentication without TLS asks for the server's key (``0x02``) unless it was given or
    ``request_public_key`` is False (then it fails, like libmysqlclient without
    ``--get-server-public-key``: an unauthenticated key is open to a man in the middle).
    ``server_public_key`` is what the server sent last time (`public_key_pem`), without 0x01.
    """

    plugin_name = CACHING_SHA2_PASSWORD

    def __init__(self, password: str | bytes, nonce: bytes, *, tls: bool,
                 server_public_key: bytes | None = None, request_public_key: bool = True) -> None:
        super().__init__()
        self._password = _b(password)
        if b"\x00" in self._password:
            raise MySQLAuthError("caching_sha2_password: a password cannot contain NUL "
                                 "(full authentication sends it NUL-terminated)")
        self._nonce = _check_nonce(nonce)
        self._tls = tls
        self._request_key = request_public_key
        self._key: rsa.RSAPublicKey | None = None
        if server_public_key is not None:
            try:
                self._key = _load_public_key(server_public_key)
            except ValueError as e:
                raise MySQLAuthError(f"caching_sha2_password: server_public_key: {e}") from None
        self.received_public_key: bytes | None = None  # PEM from the server, for reuse

    def start(self) -> bytes:
        if self._state != "start":
            raise MySQLAuthError("caching_sha2_password: start() called twice")
        if not self._password:
            self._state = "result"  # server answers OK/ERR directly
            return b""
        self._state = "fast"
        return caching_sha2_scramble(self._password, self._nonce)

    def receive(self, payload: bytes) -> Step:
        self._check_receive()
        payload = bytes(payload)
        end = _server_end(payload, self.plugin_name)
        if end is not None:
            # OK is only legitimate once the server had a chance to check something we sent
            if end.ok and self._state == "pubkey":
                return self._fail("server sent OK instead of its public key")
            return self._finish(end.ok, end.reason)
        if payload[0] != AUTH_MORE_DATA or self._state == "result":
            return self._fail(f"unexpected packet 0x{payload[0]:02x} from the server")
        if self._state == "fast":
            if payload == FAST_AUTH_SUCCESS:
                self._state = "result"
                return None  # OK follows
            if payload == PERFORM_FULL_AUTH:
                return self._full_auth()
            return self._fail("unexpected AuthMoreData after the scramble "
                              "(expected 0x03 fast auth success or 0x04 full authentication)")
        if self._state == "pubkey":
            try:
                self._key = _load_public_key(payload[1:])
            except ValueError as e:
                return self._fail(f"the server's public key is unusable: {e}")
            self.received_public_key = payload[1:].rstrip(b"\x00")
            return self._encrypt()
        return self._fail("unexpected AuthMoreData")  # pragma: no cover - no other states

    def _full_auth(self) -> Step:
        if self._tls:
            self._state = "result"
            return self._password + b"\x00"  # cleartext is fine inside TLS
        if self._key is not None:
            return self._encrypt()
        if not self._request_key:
            return self._fail("full authentication needs TLS or the server's RSA public key "
                              "(requesting it is disabled)")
        self._state = "pubkey"
        return REQUEST_PUBLIC_KEY

    def _encrypt(self) -> Step:
        assert self._key is not None
        message = _xor_cyclic(self._password + b"\x00", self._nonce)
        if len(message) > self._key.key_size // 8 - _OAEP_OVERHEAD:
            return self._fail("the password is too long for the server's RSA key")
        self._state = "result"
        return self._key.encrypt(message, _OAEP)


class CachingSha2Server(_Machine):
    """Server side::

        s = CachingSha2Server(verifier, nonce, tls=..., private_key=key_or_None)
        # greeting/AuthSwitchRequest carries s.plugin_data
        out = s.receive(auth_response)
        while not isinstance(out, Done):
            send(out)                          # b"\\x01\\x04" or b"\\x01" + PEM
            out = s.receive(next_payload)
        if out.send: send(out.send)            # b"\\x01\\x03" on the fast path
        send(OK if out.ok else ERR)

    A wrong fast-path scramble goes on to full authentication, as in MySQL (the cache may be
    stale after a password change). Full authentication needs TLS or ``private_key``; after it
    succeeds `learned_digest` holds SHA256(SHA256(pw)) for the caller's fast-auth cache.
    """

    plugin_name = CACHING_SHA2_PASSWORD

    def __init__(self, verifier: Sha2Verifier, nonce: bytes | None = None, *, tls: bool,
                 private_key: rsa.RSAPrivateKey | None = None) -> None:
        super().__init__()
        self._verifier = verifier
        self.nonce = new_nonce() if nonce is None else _check_nonce(nonce)
        self._tls = tls
        self._key = private_key
        self._state = "scramble"
        self.learned_digest: bytes | None = None

    @property
    def plugin_data(self) -> bytes:
        return self.nonce + b"\x00"

    def receive(self, payload: bytes) -> Step:
        self._check_receive()
        payload = bytes(payload)
        if self._state == "scramble":
            return self._scramble(payload)
        if self._state == "cleartext":
            if not payload or payload[-1] != 0:
                return self._fail("malformed cleartext password (not NUL-terminated)")
            return self._check(payload[:-1], "TLS")
        if self._state in ("rsa", "rsa_after_key"):
            if payload == REQUEST_PUBLIC_KEY and self._state == "rsa":
                assert self._key is not None
                self._state = "rsa_after_key"
                return bytes([AUTH_MORE_DATA]) + public_key_pem(self._key)
            return self._decrypt(payload)
        return self._fail("unexpected packet")  # pragma: no cover - no other states

    def _scramble(self, payload: bytes) -> Step:
        if payload in (b"", b"\x00"):  # no password given
            if self._verifier.check_password(b""):
                return self._finish(True, "caching_sha2_password: empty password")
            return self._fail("password required but none given")
        if len(payload) != 32:
            return self._fail(f"malformed scramble: expected 32 bytes, got {len(payload)}")
        digest = self._verifier.fast_digest
        if digest is not None:
            # recover SHA256(pw) and check that it hashes to the cached SHA256(SHA256(pw))
            stage1 = _xor(payload, _sha256(digest + self.nonce))
            if hmac.compare_digest(_sha256(stage1), digest):
                return self._finish(True, "caching_sha2_password: fast auth", FAST_AUTH_SUCCESS)
        if self._tls:
            self._state = "cleartext"
        elif self._key is not None:
            self._state = "rsa"
        else:
            return self._fail("full authentication needed (cache miss or wrong password) but this "
                              "connection has neither TLS nor an RSA key pair")
        return PERFORM_FULL_AUTH

    def _decrypt(self, payload: bytes) -> Step:
        assert self._key is not None
        if len(payload) != (self._key.key_size + 7) // 8:
            return self._fail(f"malformed RSA-encrypted password: {len(payload)} bytes, "
                              f"expected {(self._key.key_size + 7) // 8}")
        try:
            message = self._key.decrypt(payload, _OAEP)
        except ValueError:
            return self._fail("could not decrypt the RSA-encrypted password")
        password = _xor_cyclic(message, self.nonce)
        if not password or password[-1] != 0:
            return self._fail("malformed RSA-encrypted password (not NUL-terminated)")
        return self._check(password[:-1], "RSA")

    def _check(self, password: bytes, how: str) -> Done:
        if b"\x00" in password or not self._verifier.check_password(password):
            return self._fail(f"wrong password (full authentication over {how})")
        self.learned_digest = caching_sha2_digest(password)
        return self._finish(True, f"caching_sha2_password: full authentication over {how}")
