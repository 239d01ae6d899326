"""The relay's access decision for each new stream, with its caches, rate limit and log.

Order of checks (deny by default):
1. a source that failed too often recently → 429, without looking at its credentials;
2. no Access application covers the hostname → allowed only if the route is `--public`, else 403;
3. credentials missing, unknown, wrong, expired or revoked → 401 (counts as a failure);
4. valid token not named by the application's policy → 403;
5. allowed → an RS256 assertion for the application's AUD goes with the ConnectRequest.

Token lookups and secret checks are cached for at most `cache_ttl` (1 s), and every change
made through the control plane clears the cache, so a revocation applies to the next stream.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from access.assertion import AssertionMinter
from access.policy import Decision, RouteLike
from access.tokens import SecretHasher, credentials_from_headers, is_client_id


class TokenLike(Protocol):
    id: str
    name: str
    client_id: str
    secret_hash: str
    prev_secret_hash: str | None
    prev_expires_at: float | None
    expires_at: float | None
    revoked_at: float | None


class AppLike(Protocol):
    id: str
    name: str
    aud: str
    token_ids: tuple[str, ...]
    any_token: bool


class AccessStore(Protocol):
    def token_by_client_id(self, client_id: str) -> Any: ...
    def app_for_hostname(self, hostname: str) -> Any: ...
    def add_access_logs(self, entries: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    assertion: str | None = None


class FailureLimiter:
    """At most `limit` failed credential checks per source in a sliding `window`; then the
    source is refused (429) until its oldest failure leaves the window."""

    def __init__(self, limit: int = 20, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str, now: float) -> deque[float] | None:
        q = self._failures.get(source)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[source]
            return None
        return q

    def retry_after(self, source: str) -> float:
        """Seconds until `source` may try again (0 when it may now)."""
        now = self._clock()
        q = self._recent(source, now)
        if q is None or len(q) < self.limit:
            return 0.0
        return max(0.0, q[0] + self.window - now)

    def failure(self, source: str) -> None:
        now = self._clock()
        if len(self._failures) > 100_000:  # bound memory under a spray of sources
            self._failures.clear()
        self._failures.setdefault(source, deque()).append(now)


def _limit_keys(source: str, creds: tuple[str, str] | None) -> list[str]:
    ip = source.rsplit(":", 1)[0]
    if creds is not None and is_client_id(creds[0]):
        return [ip, f"{ip}|{creds[0]}"]
    return [ip]


class Gatekeeper:
    def __init__(self, store: AccessStore, hasher: SecretHasher, minter: AssertionMinter | None, *,
                 clock: Callable[[], float] = time.time, cache_ttl: float = 1.0,
                 limiter: FailureLimiter | None = None) -> None:
        self.store = store
        self.hasher = hasher
        self.minter = minter
        self._clock = clock
        self.cache_ttl = cache_ttl
        self.limiter = limiter or FailureLimiter()
        self._tokens: dict[str, tuple[float, Any]] = {}
        self._checked: dict[tuple[str, str], tuple[float, bool]] = {}
        self._apps: dict[str, tuple[float, Any]] = {}
        self._log: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- cache control
    def invalidate(self) -> None:
        self._tokens.clear()
        self._checked.clear()
        self._apps.clear()

    def _app(self, hostname: str, now: float) -> Any:
        hit = self._apps.get(hostname)
        if hit is not None and hit[0] > now:
            return hit[1]
        app = self.store.app_for_hostname(hostname)
        if len(self._apps) > 10_000:
            self._apps.clear()
        self._apps[hostname] = (now + self.cache_ttl, app)
        return app

    def _token(self, client_id: str, now: float) -> Any:
        hit = self._tokens.get(client_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        token = self.store.token_by_client_id(client_id)
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[client_id] = (now + self.cache_ttl, token)
        return token

    def _secret_ok(self, token: TokenLike, secret: str, now: float) -> bool:
        key = (token.client_id, secret)
        hit = self._checked.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        ok = self.hasher.matches(secret, token.secret_hash) or (
            token.prev_expires_at is not None and now < token.prev_expires_at
            and self.hasher.matches(secret, token.prev_secret_hash))
        if len(self._checked) > 10_000:
            self._checked.clear()
        # Never cache a grace-period success past the end of the grace period.
        until = now + self.cache_ttl
        if token.prev_expires_at is not None and now < token.prev_expires_at:
            until = min(until, token.prev_expires_at)
        self._checked[key] = (until, ok)
        return ok

    # ---------------------------------------------------------------- the decision
    def check(self, route: RouteLike, headers: dict[str, str], source: str) -> Verdict:
        now = self._clock()
        host = route.hostname
        creds = credentials_from_headers(headers)
        wait = max(self.limiter.retry_after(k) for k in _limit_keys(source, creds))
        if wait > 0:
            source_ip = source.rsplit(":", 1)[0]
            return self._deny(429, "rate_limited",
                              f"too many failed credential checks from {source_ip}; retry in {wait:.0f}s",
                              host, source, None, None)
        app = self._app(host, now)
        if app is None:
            if route.public:
                return self._allow(host, source, None, None, None)
            return self._deny(403, "access_denied",
                              f"{host} is not covered by any Access application (create one with "
                              "`hd access app create`, or route it with --public)", host, source, None, None)
        if creds is None or not creds[0] or not creds[1]:
            return self._fail(401, "missing_credentials",
                              f"{host} requires a service token: send CF-Access-Client-Id and "
                              "CF-Access-Client-Secret (hd access tcp --service-token-id/--service-token-secret)",
                              host, source, app, None, creds[0] if creds else None)
        client_id, secret = creds
        token = self._token(client_id, now) if is_client_id(client_id) else None
        if token is None:
            return self._fail(401, "invalid_credentials", "unknown service token client id",
                              host, source, app, None, client_id)
        if token.revoked_at is not None:
            return self._fail(401, "token_revoked", f"service token {token.name} was revoked",
                              host, source, app, token, client_id)
        if token.expires_at is not None and now >= token.expires_at:
            return self._fail(401, "token_expired", f"service token {token.name} has expired",
                              host, source, app, token, client_id)
        if not self._secret_ok(token, secret, now):
            return self._fail(401, "invalid_credentials", f"wrong secret for service token {token.name}",
                              host, source, app, token, client_id)
        if not (app.any_token or token.id in app.token_ids):
            return self._deny(403, "access_denied",
                              f"service token {token.name} is not allowed by Access application {app.name}",
                              host, source, app, token)
        assertion = self.minter.mint(app.aud, token.client_id) if self.minter is not None else None
        return self._allow(host, source, app, token, assertion)

    # ---------------------------------------------------------------- results and the log
    def _allow(self, host: str, source: str, app: Any, token: Any, assertion: str | None) -> Verdict:
        self._record("allow", 200, host, source, app, token, token.client_id if token else None,
                     "public route" if app is None else "service token allowed")
        return Verdict(Decision(True), assertion)

    def _deny(self, status: int, code: str, reason: str, host: str, source: str, app: Any,
              token: Any, client_id: str | None = None) -> Verdict:
        self._record("deny", status, host, source, app, token,
                     client_id if client_id is not None else (token.client_id if token else None), reason)
        return Verdict(Decision(False, status, code, reason))

    def _fail(self, status: int, code: str, reason: str, host: str, source: str, app: Any,
              token: Any, client_id: str | None) -> Verdict:
        # Wrong secrets for a real token count against (source, token): one bad config behind a
        # shared source (the in-process proxy, a NAT) cannot lock out the others. Unknown or
        # missing ids count against the source itself.
        key = _limit_keys(source, (client_id or "", ""))[-1] if token is not None else _limit_keys(source, None)[0]
        self.limiter.failure(key)
        # A client id is not a secret, but an arbitrary header value might be: log only well-formed ids.
        shown = client_id if client_id and is_client_id(client_id) else None
        return self._deny(status, code, reason, host, source, app, token, shown)

    def _record(self, decision: str, status: int, host: str, source: str, app: Any, token: Any,
                client_id: str | None, reason: str) -> None:
        self._log.append({
            "time": self._clock(), "decision": decision, "status": status, "client_id": client_id,
            "token_id": token.id if token else None, "token_name": token.name if token else None,
            "app": app.name if app else None, "hostname": host, "reason": reason, "source": source,
        })
        if len(self._log) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self._log:
            entries, self._log = self._log, []
            self.store.add_access_logs(entries)
