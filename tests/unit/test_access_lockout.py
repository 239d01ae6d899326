"""Lockout without locking out the innocent (issue 13), with an injected clock: failures count per
existing client id and, for ids that do not exist, per source; a valid token is never refused;
a wrong secret and an unknown id look the same from outside; the counters' memory is bounded."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import pytest

from access.gatekeeper import INVALID_CREDENTIALS, FailureLimiter, Gatekeeper, source_key
from access.tokens import new_client_id, new_client_secret
from tests.unit.test_access_gatekeeper import HASHER, NOW, App, Clock, Route, Store, Token, creds

ROUTE = Route("db.example")


@pytest.fixture
def world():
    store, clock = Store(), Clock()
    secret = new_client_secret()
    tok = Token("t1", "hyperdrive", new_client_id(), HASHER.hash(secret))
    store.tokens = {tok.client_id: tok}
    store.apps = {"db.example": App("a1", "db", "f" * 64, ("t1",), any_token=True)}
    gk = Gatekeeper(store, HASHER, None, clock=clock, limiter=FailureLimiter(limit=20, window=60, clock=clock))
    return gk, store, clock, tok, secret


def _unknown(secret: str = "x" * 64) -> dict[str, str]:
    return {"CF-Access-Client-Id": new_client_id(), "CF-Access-Client-Secret": secret}


def test_a_valid_token_is_served_from_an_address_that_failed_a_thousand_times(world):
    gk, store, clock, tok, secret = world
    for i in range(500):
        gk.check(ROUTE, creds(tok, new_client_secret()), f"10.0.0.9:{i}")  # guesses for its id
        gk.check(ROUTE, _unknown(), f"10.0.0.9:{i}")  # and a spray of ids
    assert gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.9:1").decision.code == "rate_limited"
    assert gk.check(ROUTE, _unknown(), "10.0.0.9:1").decision.code == "rate_limited"
    for port in range(5):
        assert gk.check(ROUTE, creds(tok, secret), f"10.0.0.9:{port}").decision.allowed


def test_the_hammered_id_is_locked_from_everywhere_for_failures_only(world):
    gk, store, clock, tok, secret = world
    for i in range(20):  # 20 sources, one guess each: it is the id that is hammered
        assert gk.check(ROUTE, creds(tok, "wrong"), f"10.1.0.{i}:1").decision.status == 401
    d = gk.check(ROUTE, creds(tok, "wrong"), "192.0.2.1:1").decision
    assert (d.status, d.code) == (429, "rate_limited") and d.reason.startswith("too many failed credential checks")
    assert gk.check(ROUTE, creds(tok, secret), "192.0.2.1:2").decision.allowed
    # the 429s were not counted: one interval (60 s / 20) later the id may fail once more
    for _ in range(50):
        gk.check(ROUTE, creds(tok, "wrong"), "192.0.2.1:1")
    clock.t += 3.0
    assert gk.check(ROUTE, creds(tok, "wrong"), "192.0.2.1:1").decision.code == "invalid_credentials"
    assert gk.check(ROUTE, creds(tok, "wrong"), "192.0.2.1:1").decision.code == "rate_limited"
    # others' ids from those same sources are not affected
    assert gk.check(ROUTE, _unknown(), "10.1.0.1:1").decision.code == "invalid_credentials"


def test_wrong_secret_and_unknown_id_get_the_same_answer_and_the_log_the_truth(world):
    gk, store, clock, tok, secret = world
    answers = [
        gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.1:1").decision,
        gk.check(ROUTE, _unknown(), "10.0.0.1:1").decision,
        gk.check(ROUTE, {"CF-Access-Client-Id": "not-an-id", "CF-Access-Client-Secret": "s"}, "10.0.0.1:1").decision,
        gk.check(ROUTE, creds(tok, "x" * 100_000), "10.0.0.1:1").decision,  # never hashed, same answer
    ]
    assert {(d.status, d.code, d.reason) for d in answers} == {(401, "invalid_credentials", INVALID_CREDENTIALS)}
    assert tok.name not in INVALID_CREDENTIALS
    gk.flush()
    assert [e["reason"] for e in store.logs] == [
        "wrong secret for service token hyperdrive", "unknown service token client id",
        "malformed service token client id", "wrong secret for service token hyperdrive"]
    assert store.logs[0]["token_name"] == "hyperdrive" and store.logs[1]["token_name"] is None


@pytest.mark.parametrize("state", ["revoked", "expired"])
def test_revoked_or_expired_is_told_only_to_the_secrets_holder(world, state):
    gk, store, clock, tok, secret = world
    change = {"revoked_at": NOW - 1} if state == "revoked" else {"expires_at": NOW - 1}
    store.tokens[tok.client_id] = replace(tok, **change)
    d = gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.1:1").decision
    assert (d.status, d.code, d.reason) == (401, "invalid_credentials", INVALID_CREDENTIALS)
    d = gk.check(ROUTE, creds(tok, secret), "10.0.0.1:1").decision
    assert (d.status, d.code) == (401, f"token_{state}") and tok.name in d.reason


def test_missing_credentials_count_against_the_source(world):
    gk, store, clock, tok, secret = world
    for _ in range(20):
        assert gk.check(ROUTE, {}, "10.0.0.3:1").decision.code == "missing_credentials"
    assert gk.check(ROUTE, {}, "10.0.0.3:1").decision.code == "rate_limited"
    assert gk.check(ROUTE, creds(tok, secret), "10.0.0.3:1").decision.allowed


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4():
    assert source_key("[2001:db8:1:2:aaaa::1]:443") == source_key("2001:db8:1:2:ffff::9:5000") == "src:2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1:5000") != source_key("2001:db8:1:2::1:5000")
    assert source_key("::ffff:192.0.2.7:80") == source_key("192.0.2.7:81") == "src:192.0.2.7"
    assert source_key("in-process:0") == "src:in-process"


def test_the_limiter_is_a_leaky_bucket_with_an_injected_clock():
    t = [100.0]
    lim = FailureLimiter(limit=5, window=60, clock=lambda: t[0])
    for _ in range(4):
        lim.failure("k")
    assert lim.retry_after("k") == 0.0  # 4 of 5
    lim.failure("k")
    assert lim.retry_after("k") == pytest.approx(12.0)  # full: one more every 60 / 5 s
    t[0] += 12.0
    assert lim.retry_after("k") == 0.0
    t[0] += 60.0
    assert lim.retry_after("k") == 0.0 and len(lim) == 0  # drained entries are dropped


def test_a_spray_of_sources_costs_bounded_memory_and_never_unlocks_an_id(world):
    gk, store, clock, tok, secret = world
    store.add_access_logs = lambda entries: None  # keep only the gatekeeper's own memory in view
    for _ in range(20):
        gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.9:1")
    assert gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.9:1").decision.code == "rate_limited"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):  # 100,000 sources, each with an unknown id
            gk.source_limiter.failure(f"src:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(gk.source_limiter) == 65536
    assert grown < 16 * 1024 * 1024, f"{grown / 1e6:.1f} MB for the source counters"
    # the id being hammered is still locked: sources never evict ids
    assert gk.check(ROUTE, creds(tok, "wrong"), "10.0.0.9:1").decision.code == "rate_limited"
    assert gk.check(ROUTE, creds(tok, secret), "10.0.0.9:1").decision.allowed


def test_a_wrong_secret_is_not_cached(world):
    gk, store, clock, tok, secret = world
    for i in range(1000):
        gk.check(ROUTE, creds(tok, f"guess-{i}"), f"10.2.{i >> 8}.{i & 255}:1")
    assert len(gk._checked) == 0
    gk.check(ROUTE, creds(tok, secret), "10.0.0.1:1")
    assert len(gk._checked) == 1
