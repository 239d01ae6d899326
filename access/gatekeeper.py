"""The relay's access decision for each new stream, with its caches, rate limit and log.

Order of checks (deny by default):
1. no Access application covers the hostname → allowed only if the route is `--public`, else 403;
2. credentials missing, unknown, wrong, expired or revoked → 401 (a failure, counted), or 429
   when that failure's counter is full (see below);
3. valid token not named by the application's policy → 403;
4. allowed → an RS256 assertion for the application's AUD goes with the ConnectRequest.

Credentials are always checked, request by request, as Cloudflare Access does: a valid token is
never refused because of failures, its own or anyone else's. Failures are counted per claimed
client id when that id exists, and per source address (an IPv6 /64) when it does not, so an
attacker hammering one id, or spraying ids from one address, gets 429 — and nobody else does.
A wrong secret and an unknown client id get the same answer (status, code and message); the
access log keeps the precise reason for the operator. Revoked and expired are told only to a
caller who presents the right secret.

Token lookups and secret checks are cached for at most `cache_ttl` (1 s), and every change
made through the control plane clears the cache, so a revocation applies to the next stream.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from access.assertion import AssertionMinter
from access.policy import Decision, RouteLike
from access.tokens import SecretHasher, credentials_from_headers, is_client_id

# What a caller learns when its credentials do not check out, whatever the reason (unknown id,
# wrong secret): the same for all, so an answer never tells whether a client id exists.
MAX_SECRET_LENGTH = 256
INVALID_CREDENTIALS = "invalid service token credentials (CF-Access-Client-Id / CF-Access-Client-Secret)"


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
    """Failed credential checks per key, as a leaky bucket (GCRA): `limit` failures at once,
    then one more every `window / limit` seconds — on average `limit` per `window`.

    One float per key, and at most `max_keys` keys: past that, the keys whose last failure is
    oldest (the first to have drained) are forgotten, so a spray of keys costs bounded memory
    and never wipes the counters of the keys being hammered right now.
    """

    def __init__(self, limit: int = 20, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 65536) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._interval = window / limit
        self.clock = clock
        # key -> the time its bucket is empty again; ordered by last failure (oldest first)
        self._empty_at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._empty_at)

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may fail again without being refused (0: it may now)."""
        empty_at = self._empty_at.get(key)
        if empty_at is None:
            return 0.0
        now = self.clock()
        if empty_at <= now:
            del self._empty_at[key]
            return 0.0
        return max(0.0, empty_at - now - (self.window - self._interval))

    def failure(self, key: str) -> None:
        now = self.clock()
        empty_at = self._empty_at.pop(key, now)
        self._empty_at[key] = max(empty_at, now) + self._interval
        while len(self._empty_at) > self.max_keys:
            self._empty_at.popitem(last=False)


def source_key(source: str) -> str:
    """The limiter key of a source "host:port": the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64, so counting single v6 addresses would count nothing)."""
    host = source.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "src:" + host[:64]  # "in-process" and the like
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"src:{ip.ipv4_mapped}"
        return f"src:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"src:{ip}"


class Gatekeeper:
    def __init__(self, store: AccessStore, hasher: SecretHasher, minter: AssertionMinter | None, *,
                 clock: Callable[[], float] = time.time, cache_ttl: float = 1.0,
                 limiter: FailureLimiter | None = None, source_limiter: FailureLimiter | None = None) -> None:
        self.store = store
        self.hasher = hasher
        self.minter = minter
        self._clock = clock
        self.cache_ttl = cache_ttl
        # Two tables: failures per existing client id (as many keys as there are tokens at most)
        # and per source. A spray of sources evicts only source entries, never an id's count.
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.source_limiter = source_limiter if source_limiter is not None else FailureLimiter(
            self.limiter.limit, self.limiter.window, self.limiter.clock)
        self._tokens: dict[str, tuple[float, Any]] = {}
        self._checked: dict[tuple[str, str], float] = {}  # (client id, secret) -> valid until
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
        if len(secret) > MAX_SECRET_LENGTH:  # ours are 64 hex digits; never hash or keep a huge one
            return False
        key = (token.client_id, secret)
        hit = self._checked.get(key)
        if hit is not None and hit > now:
            return True
        ok = self.hasher.matches(secret, token.secret_hash) or (
            token.prev_expires_at is not None and now < token.prev_expires_at
            and self.hasher.matches(secret, token.prev_secret_hash))
        if not ok:
            return False  # failures are not cached: a guesser must not fill memory with its guesses
        if len(self._checked) > 10_000:
            self._checked.clear()
        # Never cache a grace-period success past the end of the grace period.
        until = now + self.cache_ttl
        if token.prev_expires_at is not None and now < token.prev_expires_at:
            until = min(until, token.prev_expires_at)
        self._checked[key] = until
        return True

    # ---------------------------------------------------------------- the decision
    def check(self, route: RouteLike, headers: dict[str, str], source: str) -> Verdict:
        now = self._clock()
        host = route.hostname
        app = self._app(host, now)
        if app is None:
            if route.public:
                return self._allow(host, source, None, None, None)
            return self._deny(403, "access_denied",
                              f"{host} is not covered by any Access application (create one with "
                              "`hd access app create`, or route it with --public)", host, source, None, None)
        creds = credentials_from_headers(headers)
        if creds is None or not creds[0] or not creds[1]:
            message = (f"{host} requires a service token: send CF-Access-Client-Id and "
                       "CF-Access-Client-Secret (hd access tcp --service-token-id/--service-token-secret)")
            return self._fail(source_key(source), 401, "missing_credentials", message, message,
                              host, source, app, None, None)
        client_id, secret = creds
        # A client id is not a secret, but an arbitrary header value might be: log only well-formed ids.
        shown = client_id if is_client_id(client_id) else None
        token = self._token(client_id, now) if shown is not None else None
        if token is None:
            return self._fail(source_key(source), 401, "invalid_credentials", INVALID_CREDENTIALS,
                              "unknown service token client id" if shown else "malformed service token client id",
                              host, source, app, None, shown)
        # The secret first: only its holder may learn that the token was revoked or has expired.
        key = "id:" + token.client_id
        if not self._secret_ok(token, secret, now):
            return self._fail(key, 401, "invalid_credentials", INVALID_CREDENTIALS,
                              f"wrong secret for service token {token.name}", host, source, app, token, shown)
        if token.revoked_at is not None:
            reason = f"service token {token.name} was revoked"
            return self._fail(key, 401, "token_revoked", reason, reason, host, source, app, token, shown)
        if token.expires_at is not None and now >= token.expires_at:
            reason = f"service token {token.name} has expired"
            return self._fail(key, 401, "token_expired", reason, reason, host, source, app, token, shown)
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
              token: Any, client_id: str | None = None, *, logged: str | None = None) -> Verdict:
        self._record("deny", status, host, source, app, token,
                     client_id if client_id is not None else (token.client_id if token else None),
                     logged or reason)
        return Verdict(Decision(False, status, code, reason))

    def _fail(self, key: str, status: int, code: str, message: str, logged: str, host: str, source: str,
              app: Any, token: Any, client_id: str | None) -> Verdict:
        """A failed credential check: counted against `key` (the existing client id, or else the
        source), or answered 429 when that key's failures are over the limit."""
        limiter = self.limiter if key.startswith("id:") else self.source_limiter
        wait = limiter.retry_after(key)
        if wait > 0:
            what = "this client id" if key.startswith("id:") else "this source"
            return self._deny(429, "rate_limited",
                              f"too many failed credential checks; retry in {math.ceil(wait)}s",
                              host, source, app, token, client_id,
                              logged=f"too many failed credential checks for {what}; retry in "
                                     f"{math.ceil(wait)}s ({logged})")
        limiter.failure(key)
        return self._deny(status, code, message, host, source, app, token, client_id, logged=logged)

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
