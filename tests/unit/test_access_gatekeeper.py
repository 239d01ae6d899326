"""The relay's access decisions, with an in-memory store and an injected clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import jwt
import pytest

from access.assertion import AssertionMinter, SigningKey
from access.gatekeeper import FailureLimiter, Gatekeeper
from access.tokens import SecretHasher, new_client_id, new_client_secret

NOW = 1_800_000_000.0
KEY = SigningKey.generate(NOW)
HASHER = SecretHasher(b"k" * 32)


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Token:
    id: str
    name: str
    client_id: str
    secret_hash: str
    prev_secret_hash: str | None = None
    prev_expires_at: float | None = None
    expires_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True)
class App:
    id: str
    name: str
    aud: str
    token_ids: tuple[str, ...]
    any_token: bool = False


@dataclass(frozen=True)
class Route:
    hostname: str
    public: bool = False


class Store:
    def __init__(self) -> None:
        self.tokens: dict[str, Token] = {}
        self.apps: dict[str, App] = {}
        self.logs: list[dict] = []
        self.lookups = 0

    def token_by_client_id(self, client_id: str):
        self.lookups += 1
        return self.tokens.get(client_id)

    def app_for_hostname(self, hostname: str):
        return self.apps.get(hostname)

    def add_access_logs(self, entries):
        self.logs.extend(entries)


@pytest.fixture
def world():
    store, clock = Store(), Clock()
    secret = new_client_secret()
    tok = Token("t1", "hyperdrive", new_client_id(), HASHER.hash(secret))
    other_secret = new_client_secret()
    other = Token("t2", "other", new_client_id(), HASHER.hash(other_secret))
    store.tokens = {tok.client_id: tok, other.client_id: other}
    store.apps = {"db.example": App("a1", "db", "f" * 64, ("t1",))}
    gk = Gatekeeper(store, HASHER, AssertionMinter(KEY, "https://edge", clock=clock), clock=clock,
                    limiter=FailureLimiter(limit=5, window=60, clock=clock))
    return gk, store, clock, tok, secret, other, other_secret


def creds(token: Token, secret: str) -> dict[str, str]:
    return {"CF-Access-Client-Id": token.client_id, "CF-Access-Client-Secret": secret}


def test_valid_token_allowed_with_an_assertion_for_the_app(world):
    gk, store, clock, tok, secret, *_ = world
    v = gk.check(Route("db.example"), creds(tok, secret), "10.0.0.1:5000")
    assert v.decision.allowed and v.assertion
    c = jwt.decode(v.assertion, KEY.private_key.public_key(), algorithms=["RS256"], audience="f" * 64,
                   options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert c["common_name"] == tok.client_id and c["sub"] == "" and c["type"] == "app"


def test_headers_are_matched_case_insensitively(world):
    gk, store, clock, tok, secret, *_ = world
    h = {"cf-access-client-id": tok.client_id, "CF-ACCESS-CLIENT-SECRET": secret}
    assert gk.check(Route("db.example"), h, "s:1").decision.allowed


@pytest.mark.parametrize("case, status, code", [
    ("none", 401, "missing_credentials"),
    ("wrong_secret", 401, "invalid_credentials"),
    ("unknown_id", 401, "invalid_credentials"),
    ("expired", 401, "token_expired"),
    ("revoked", 401, "token_revoked"),
    ("not_in_policy", 403, "access_denied"),
])
def test_denials(world, case, status, code):
    gk, store, clock, tok, secret, other, other_secret = world
    headers = creds(tok, secret)
    if case == "none":
        headers = {}
    elif case == "wrong_secret":
        headers = creds(tok, new_client_secret())
    elif case == "unknown_id":
        headers = creds(replace(tok, client_id=new_client_id()), secret)
    elif case == "expired":
        store.tokens[tok.client_id] = replace(tok, expires_at=NOW - 1)
    elif case == "revoked":
        store.tokens[tok.client_id] = replace(tok, revoked_at=NOW - 1)
    elif case == "not_in_policy":
        headers = creds(other, other_secret)
    d = gk.check(Route("db.example"), headers, "s:1").decision
    assert (d.allowed, d.status, d.code) == (False, status, code)
    assert d.reason


def test_no_app_means_denied_unless_public(world):
    gk, store, clock, tok, secret, *_ = world
    d = gk.check(Route("other.example"), creds(tok, secret), "s:1").decision
    assert (d.status, d.code) == (403, "access_denied") and "--public" in d.reason
    v = gk.check(Route("other.example", public=True), {}, "s:1")
    assert v.decision.allowed and v.assertion is None


def test_any_service_token_policy(world):
    gk, store, clock, tok, secret, other, other_secret = world
    store.apps["db.example"] = replace(store.apps["db.example"], any_token=True)
    assert gk.check(Route("db.example"), creds(other, other_secret), "s:1").decision.allowed


def test_revocation_applies_within_one_second_even_without_invalidation(world):
    gk, store, clock, tok, secret, *_ = world
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.allowed
    store.tokens[tok.client_id] = replace(tok, revoked_at=clock.t)
    clock.t += 0.5
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.allowed  # cached
    clock.t += 0.51
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.code == "token_revoked"


def test_invalidate_makes_revocation_immediate(world):
    gk, store, clock, tok, secret, *_ = world
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.allowed
    store.tokens[tok.client_id] = replace(tok, revoked_at=clock.t)
    gk.invalidate()
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.code == "token_revoked"


def test_cache_spares_the_store_on_a_busy_path(world):
    gk, store, clock, tok, secret, *_ = world
    for _ in range(100):
        assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.allowed
    assert store.lookups == 1


def test_rotation_grace_keeps_the_old_secret_until_it_ends(world):
    gk, store, clock, tok, secret, *_ = world
    new_secret = new_client_secret()
    store.tokens[tok.client_id] = replace(tok, secret_hash=HASHER.hash(new_secret),
                                          prev_secret_hash=tok.secret_hash, prev_expires_at=NOW + 1)
    gk.invalidate()
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.allowed
    assert gk.check(Route("db.example"), creds(tok, new_secret), "s:1").decision.allowed
    clock.t = NOW + 1.0  # the cached success must not outlive the grace period
    assert gk.check(Route("db.example"), creds(tok, secret), "s:1").decision.code == "invalid_credentials"
    assert gk.check(Route("db.example"), creds(tok, new_secret), "s:1").decision.allowed


def test_failed_checks_are_rate_limited_per_claimed_id_and_per_source_for_unknown_ids(world):
    """(Issue 13) A valid token is never refused: failures lock out the id that failed (any
    source) or, for ids that do not exist, the source — and only for further failures."""
    gk, store, clock, tok, secret, other, other_secret = world
    for _ in range(5):
        assert gk.check(Route("db.example"), creds(tok, "wrong"), "10.0.0.9:1").decision.status == 401
    d = gk.check(Route("db.example"), creds(tok, "wrong"), "10.0.0.5:2").decision
    assert (d.status, d.code) == (429, "rate_limited")  # the hammered id, from anywhere
    assert gk.check(Route("db.example"), creds(tok, secret), "10.0.0.9:2").decision.allowed  # its holder
    store.apps["db.example"] = replace(store.apps["db.example"], any_token=True)
    gk.invalidate()
    for _ in range(5):  # unknown ids spray the source itself
        gk.check(Route("db.example"), creds(replace(tok, client_id=new_client_id()), "x"), "10.0.0.7:1")
    unknown = creds(replace(tok, client_id=new_client_id()), "x")
    assert gk.check(Route("db.example"), unknown, "10.0.0.7:2").decision.code == "rate_limited"
    assert gk.check(Route("db.example"), unknown, "10.0.0.6:1").decision.code == "invalid_credentials"
    assert gk.check(Route("db.example"), creds(other, other_secret), "10.0.0.7:2").decision.allowed
    clock.t += 61
    assert gk.check(Route("db.example"), creds(tok, "wrong"), "10.0.0.9:3").decision.code == "invalid_credentials"
    assert gk.check(Route("db.example"), unknown, "10.0.0.7:3").decision.code == "invalid_credentials"


def test_every_decision_is_logged_without_secrets(world):
    gk, store, clock, tok, secret, other, other_secret = world
    gk.check(Route("db.example"), creds(tok, secret), "s:1")
    gk.check(Route("db.example"), creds(tok, "not-the-secret-" + "x" * 20), "s:1")
    gk.check(Route("db.example"), {"CF-Access-Client-Id": "junk-that-might-be-a-secret", "CF-Access-Client-Secret": "y"}, "s:1")
    gk.check(Route("db.example"), creds(other, other_secret), "s:1")
    gk.flush()
    assert [e["decision"] for e in store.logs] == ["allow", "deny", "deny", "deny"]
    assert [e["status"] for e in store.logs] == [200, 401, 401, 403]
    assert store.logs[0]["token_name"] == "hyperdrive" and store.logs[0]["app"] == "db"
    text = json.dumps(store.logs)
    for s in (secret, other_secret, "not-the-secret-", "junk-that-might-be-a-secret"):
        assert s not in text
