"""Lockout (issue 13): the relay never refuses a valid service token because of failures — its
own address's, or anyone's. Failures lock out the client id that failed (429), or, for ids that
do not exist, the source; a wrong secret and an unknown id get the same answer, and the access
log keeps the precise reason. Real processes on loopback: every client here is 127.0.0.1."""

from __future__ import annotations

import re

from access.tokens import new_client_id
from tests.e2e.test_access_e2e import HOST, _attempt, _client, protected  # noqa: F401 (fixture)
from tests.harness.edge import AccessTcpProc
from tests.harness.procs import poll_until

_REFUSAL = re.compile(r"refused \((\d{3} [a-z_]+)\): (.*)$", re.M)


def _refusals(fwd: AccessTcpProc) -> list[tuple[str, str]]:
    """(status and code, message) of every refusal the access client reported."""
    return _REFUSAL.findall(fwd.log_text())


def _fail_until_429(fwd: AccessTcpProc, limit: int = 80) -> int:
    """Fail through `fwd` until the relay answers 429; returns the number of attempts."""
    for _ in range(limit):
        if _fail_once(fwd) == "429 rate_limited":
            return len(_refusals(fwd))
    raise AssertionError(f"no 429 after {limit} failures: {_refusals(fwd)[-3:]}")


def _fail_once(fwd: AccessTcpProc) -> str:
    """One failing attempt through `fwd`; its refusal's status and code."""
    n = len(_refusals(fwd)) + 1
    assert not _attempt(fwd)
    poll_until(lambda: len(_refusals(fwd)) >= n, 10, what=f"refusal {n} in the access client's log",
               on_timeout=lambda: fwd.log_text()[-1500:])
    return _refusals(fwd)[n - 1][0]


def _served_while_locked(locked: AccessTcpProc, ok: AccessTcpProc) -> None:
    """`ok` is served between two 429s of `locked`: a 429 is not counted, and a success adds
    nothing, so the lock held all along. A lock drains (one failure per 3 s): on a slow machine
    it may have drained meanwhile; then lock it again and retry (bounded)."""
    for _ in range(5):
        _fail_until_429(locked)
        assert _attempt(ok)
        if _fail_once(locked) == "429 rate_limited":
            return
    raise AssertionError("could not observe the valid token served while the lock held")


def test_failures_from_an_address_never_refuse_a_valid_token_from_it(protected):  # noqa: F811
    edge, allowed, other, app, conn = protected
    wrong = _client(edge, allowed, "wrong-secret", secret="f" * 64)
    unknown = AccessTcpProc(edge, HOST, name="unknown-id", service_token_id=new_client_id(),
                            service_token_secret="e" * 64).start()
    ok = _client(edge, allowed, "allowed")
    assert _attempt(ok)

    # Someone at this address guesses secrets for the allowed token's id until that id is locked
    # out, and sprays unknown ids until the address is locked out for those...
    assert _fail_until_429(wrong) > 10  # the relay's default allows 20 failures at once
    _fail_until_429(unknown)
    # ... and the token's holder, at the same address, is served while both locks hold.
    _served_while_locked(wrong, ok)
    _served_while_locked(unknown, ok)
    assert "refused" not in ok.log_text()

    # A wrong secret and an unknown id get the same answer: status, code and message.
    first_wrong, first_unknown = _refusals(wrong)[0], _refusals(unknown)[0]
    assert first_wrong == first_unknown, (first_wrong, first_unknown)
    assert first_wrong[0] == "401 invalid_credentials"
    assert allowed["name"] not in wrong.log_text()  # the answer does not name the token
    # 429s are generic too: they do not tell a locked id from a locked address
    assert _refusals(wrong)[-1][1].split(";")[0] == _refusals(unknown)[-1][1].split(";")[0]

    # The operator sees the precise reasons.
    logs = edge.hd("access", "logs", "--limit", "400")
    reasons = [e["reason"] for e in logs]
    assert any(r == f"wrong secret for service token {allowed['name']}" for r in reasons), reasons[:5]
    assert any(r == "unknown service token client id" for r in reasons), reasons[:5]
    assert any(r.startswith("too many failed credential checks for this client id") for r in reasons)
    assert any(r.startswith("too many failed credential checks for this source") for r in reasons)
    allowed_after = [e for e in logs if e["decision"] == "allow" and e["client_id"] == allowed["client_id"]]
    assert len(allowed_after) >= 3
