"""Origin-side verification of access assertions: every way an assertion can be wrong is
rejected, each by a test of its own; a valid one passes. Time is injected, no sleeps."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from access.assertion import (
    AssertionMinter,
    AssertionRejected,
    AssertionVerifier,
    JwksCache,
    SigningKey,
    jwks_document,
)

ISSUER = "https://edge.example:7844"
AUD = "a" * 64
OTHER_AUD = "b" * 64
CLIENT = "0123456789abcdef0123456789abcdef.access"
NOW = 1_800_000_000.0

KEY = SigningKey.generate(NOW)
OTHER_KEY = SigningKey.generate(NOW)


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_verifier(keys: list[SigningKey] | None = None, clock: Clock | None = None):
    keys = [KEY] if keys is None else keys
    calls: list[int] = []

    async def fetch() -> dict:
        calls.append(1)
        return jwks_document(keys)

    mono = Clock(0.0)
    cache = JwksCache(fetch, min_refresh=30, clock=mono)
    return AssertionVerifier(cache, ISSUER, clock=clock or Clock()), calls, mono


def claims(**over) -> dict:
    base = {"aud": [AUD], "iss": ISSUER, "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 180,
            "sub": "", "common_name": CLIENT, "type": "app"}
    base.update(over)
    return base


def sign(payload: dict, key: SigningKey = KEY, **headers) -> str:
    return jwt.encode(payload, key.private_key, algorithm="RS256", headers={"kid": key.kid, **headers})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def expect_rejected(token: str | None, text: str, verifier=None) -> None:
    verifier = verifier or make_verifier()[0]
    with pytest.raises(AssertionRejected, match=text):
        await verifier.verify(token, [AUD])


# ------------------------------------------------------------------------ the valid case


async def test_minted_assertion_verifies_with_the_expected_claims():
    minter = AssertionMinter(KEY, ISSUER, clock=Clock())
    token = minter.mint(AUD, CLIENT)
    verifier, _, _ = make_verifier()
    got = await verifier.verify(token, [AUD])
    assert got["aud"] == [AUD] and got["iss"] == ISSUER and got["sub"] == ""
    assert got["common_name"] == CLIENT and got["type"] == "app"
    assert got["exp"] - got["iat"] == 180 and got["nbf"] == got["iat"]
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": KEY.kid, "typ": "JWT"}


def test_minter_reuses_an_assertion_for_half_its_lifetime_only():
    clock = Clock()
    minter = AssertionMinter(KEY, ISSUER, clock=clock)
    first = minter.mint(AUD, CLIENT)
    clock.t += 89
    assert minter.mint(AUD, CLIENT) == first
    clock.t += 2
    assert minter.mint(AUD, CLIENT) != first
    assert minter.mint(OTHER_AUD, CLIENT) != minter.mint(AUD, CLIENT)


# ------------------------------------------------------------------------ each rejection


async def test_rejects_alg_none():
    header = b64(json.dumps({"alg": "none", "kid": KEY.kid, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    await expect_rejected(f"{header}.{body}.", "algorithm 'none' is not allowed")


async def test_rejects_hs256_signed_with_the_public_key():
    # The classic confusion attack: HMAC keyed with the RSA public key the verifier trusts.
    import hashlib
    import hmac

    pem = KEY.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "kid": KEY.kid, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = b64(hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    await expect_rejected(f"{header}.{body}.{sig}", "algorithm 'HS256' is not allowed")


async def test_rejects_expired():
    verifier, _, _ = make_verifier(clock=Clock(NOW + 180 + 6))  # past exp + 5 s leeway
    await expect_rejected(sign(claims()), "expired", verifier)


async def test_accepts_within_the_leeway():
    verifier, _, _ = make_verifier(clock=Clock(NOW + 180 + 4))
    assert await verifier.verify(sign(claims()), [AUD])


async def test_rejects_nbf_in_the_future():
    await expect_rejected(sign(claims(nbf=int(NOW) + 60)), "not valid yet")


async def test_rejects_wrong_aud():
    await expect_rejected(sign(claims(aud=[OTHER_AUD])), "another application")


async def test_rejects_wrong_iss():
    await expect_rejected(sign(claims(iss="https://attacker.example")), "issued by someone else")


async def test_rejects_unknown_kid():
    await expect_rejected(sign(claims(), OTHER_KEY), "unknown key")


async def test_rejects_tampered_payload():
    token = sign(claims())
    header, body, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged["common_name"] = "ffffffffffffffffffffffffffffffff.access"
    body2 = b64(json.dumps(forged).encode())
    await expect_rejected(f"{header}.{body2}.{sig}", "signature is invalid")


async def test_rejects_a_valid_assertion_for_another_app():
    other_app_token = AssertionMinter(KEY, ISSUER, clock=Clock()).mint(OTHER_AUD, CLIENT)
    await expect_rejected(other_app_token, "another application")


async def test_rejects_missing_and_garbage_assertions():
    await expect_rejected(None, "no access assertion")
    await expect_rejected("not.a.jwt", "not a well-formed JWT")
    await expect_rejected(sign(claims(), kid=""), "no key id")


async def test_rejects_missing_exp():
    payload = claims()
    del payload["exp"]
    await expect_rejected(sign(payload), "lacks exp")


# ------------------------------------------------------------------------ JWKS cache


async def test_unknown_kid_refetches_keys_but_no_more_than_the_floor_allows():
    keys = [KEY]
    verifier, calls, mono = make_verifier(keys)
    assert await verifier.verify(sign(claims()), [AUD])
    assert len(calls) == 1
    # Keys rotate on the edge: the new kid is unknown, one refetch finds it... after the floor.
    keys.insert(0, OTHER_KEY)
    await expect_rejected(sign(claims(), OTHER_KEY), "unknown key", verifier)
    assert len(calls) == 1  # within 30 s of the last fetch: no refetch (forged kids cannot amplify)
    mono.t += 31
    assert await verifier.verify(sign(claims(), OTHER_KEY), [AUD])
    assert len(calls) == 2
    # The previous key stays valid until its assertions expire.
    assert await verifier.verify(sign(claims(), KEY), [AUD])
    for _ in range(5):
        await expect_rejected(sign(claims(), SigningKey.generate(NOW)), "unknown key", verifier)
    assert len(calls) == 2


def test_jwks_document_holds_only_public_material():
    doc = jwks_document([KEY, OTHER_KEY])
    assert [k["kid"] for k in doc["keys"]] == [KEY.kid, OTHER_KEY.kid]
    for jwk in doc["keys"]:
        assert set(jwk) == {"kty", "alg", "use", "kid", "n", "e"}
    assert "PRIVATE" not in json.dumps(doc)
