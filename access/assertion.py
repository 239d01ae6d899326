"""Access assertions: RS256 JWTs minted by the relay, verified by the connector.

Claims follow Cloudflare Access service-token assertions (reference/cloudflared_access.md
§2.2): `aud` (list of AUD tags), `iss`, `iat`, `nbf`, `exp`, `sub` = "", `common_name` = the
client id, `type` = "app". The key id is the SHA-256 of the public key (DER, hex).
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

ALGORITHM = "RS256"
DEFAULT_LIFETIME = 180.0  # "a few minutes": an assertion is used once, at stream open
DEFAULT_LEEWAY = 5.0
MAX_JWKS_KEYS = 16  # keys of a fetched or pushed JWKS that are looked at
_MAX_MODULUS_B64 = 16384 // 6 + 4  # base64url length of a 16384-bit modulus: larger is not a signing key of ours


def _b64u(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def key_id(public_key: RSAPublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: RSAPrivateKey = field(repr=False)
    created_at: float

    @classmethod
    def generate(cls, now: float | None = None) -> SigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key_id(private.public_key()), private, time.time() if now is None else now)

    @classmethod
    def from_pem(cls, pem: bytes, created_at: float) -> SigningKey:
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, RSAPrivateKey):
            raise ValueError("signing keys must be RSA")
        return cls(key_id(private.public_key()), private, created_at)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        return {"kty": "RSA", "alg": ALGORITHM, "use": "sig", "kid": self.kid,
                "n": _b64u(numbers.n), "e": _b64u(numbers.e)}

    def public_pem(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


def jwks_document(keys: list[SigningKey]) -> dict[str, Any]:
    """The JWKS served at /cdn-cgi/access/certs (current key first, then the previous one)."""
    return {
        "keys": [k.public_jwk() for k in keys],
        "public_cert": {"kid": keys[0].kid, "cert": keys[0].public_pem()} if keys else None,
        "public_certs": [{"kid": k.kid, "cert": k.public_pem()} for k in keys],
    }


class AssertionMinter:
    """Mints assertions, reusing one per (aud, client id) for half its lifetime: RSA signing
    costs about a millisecond, far too much to pay on every stream of a busy proxy."""

    def __init__(self, key: SigningKey, issuer: str, *, lifetime: float = DEFAULT_LIFETIME,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.issuer = issuer
        self.lifetime = lifetime
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, str]] = {}

    def set_key(self, key: SigningKey) -> None:
        self.key = key
        self._cache.clear()

    def mint(self, aud: str, common_name: str) -> str:
        now = self._clock()
        cached = self._cache.get((aud, common_name))
        if cached is not None and cached[0] > now:
            return cached[1]
        iat = int(now)
        claims = {"aud": [aud], "iss": self.issuer, "iat": iat, "nbf": iat,
                  "exp": iat + int(self.lifetime), "sub": "", "common_name": common_name, "type": "app"}
        token = jwt.encode(claims, self.key.private_key, algorithm=ALGORITHM, headers={"kid": self.key.kid})
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(aud, common_name)] = (now + self.lifetime / 2, token)
        return token


# ------------------------------------------------------------------------ verification


class AssertionRejected(Exception):
    """An assertion that must not open a stream; the message says why (no token content)."""


class JwksCache:
    """Public keys by kid, fetched on demand.

    An unknown kid triggers a refetch (keys rotate), but at most once per `min_refresh`
    seconds so forged kids cannot turn the verifier into a fetch amplifier.
    """

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, Any]]], *, min_refresh: float = 30.0,
                 ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._min_refresh = min_refresh
        self._ttl = ttl
        self._clock = clock
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at: float | None = None
        self.fetches = 0

    def load(self, doc: dict[str, Any]) -> None:
        """Take keys pushed by a trusted source (the edge, over the pinned control stream)."""
        self._load(doc)
        self._fetched_at = self._clock()

    def _load(self, doc: dict[str, Any]) -> None:
        keys: dict[str, RSAPublicKey] = {}
        listed = doc.get("keys")
        # The edge publishes two keys; parsing RSA keys costs CPU, so a few is all we look at.
        for jwk in listed[:MAX_JWKS_KEYS] if isinstance(listed, list) else []:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or "kid" not in jwk:
                continue
            if len(str(jwk.get("n", ""))) > _MAX_MODULUS_B64:
                continue
            try:
                key = jwt.algorithms.RSAAlgorithm.from_jwk(jwk)
            except (jwt.InvalidKeyError, ValueError, KeyError):
                continue
            if isinstance(key, RSAPublicKey):
                keys[str(jwk["kid"])] = key
        self._keys = keys

    async def _refresh(self) -> None:
        self._fetched_at = self._clock()
        self.fetches += 1
        self._load(await self._fetch())

    async def key_for(self, kid: str) -> RSAPublicKey | None:
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._ttl
        if kid not in self._keys or stale:
            if self._fetched_at is None or now - self._fetched_at >= self._min_refresh:
                first = not self._keys
                try:
                    await self._refresh()
                except Exception:
                    if first:  # no key to fall back on: say why rather than "unknown key"
                        raise
        return self._keys.get(kid)


class AssertionVerifier:
    """Checks an assertion at the origin side: algorithm allow-list, kid, signature, iss,
    aud, exp/nbf with a small leeway; time comes from the injected clock."""

    def __init__(self, jwks: JwksCache, issuer: str, *, leeway: float = DEFAULT_LEEWAY,
                 clock: Callable[[], float] = time.time) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.leeway = leeway
        self._clock = clock

    async def verify(self, token: str | None, audiences: list[str]) -> dict[str, Any]:
        if not token:
            raise AssertionRejected("no access assertion was presented")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AssertionRejected("the access assertion is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AssertionRejected(f"algorithm {alg!r} is not allowed (only {ALGORITHM})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AssertionRejected("the access assertion has no key id")
        key = await self.jwks.key_for(kid)
        if key is None:
            raise AssertionRejected("the access assertion was signed by an unknown key")
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM],
                options={"verify_aud": False, "verify_iss": False, "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise AssertionRejected("the access assertion's signature is invalid") from None
        except jwt.PyJWTError as exc:
            raise AssertionRejected(f"the access assertion is invalid: {exc}") from None
        if claims.get("iss") != self.issuer:
            raise AssertionRejected("the access assertion was issued by someone else (iss)")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in audiences for a in auds):
            raise AssertionRejected("the access assertion is for another application (aud)")
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)):
            raise AssertionRejected("the access assertion lacks exp or nbf")
        if now > exp + self.leeway:
            raise AssertionRejected("the access assertion has expired")
        if now + self.leeway < nbf:
            raise AssertionRejected("the access assertion is not valid yet (nbf)")
        return claims
