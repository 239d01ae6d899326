"""The control API: a thin JSON-over-HTTP face on the store, in the edge's event loop.

Every route needs `Authorization: Bearer <admin token>` except `/openapi.json`, `/healthz`, the
Access JWKS at `/cdn-cgi/access/certs` (public keys only) and the Prometheus `/metrics` (counters
and gauges only, for scrapers without the token). Errors are `{"error": "message"}`
with 400/401/404/405/408/409/413/503 (500 only for bugs); a failed origin test of a Hyperdrive config
adds `"code"` (2008–2016) and `"hint"`.

Bounds (the API shares the edge's process and file descriptors with every listener): a connection
must deliver a complete request head within HEADER_TIMEOUT of connecting (or of its previous
response), heads are capped by SERVER_LIMITS, a body must arrive within BODY_TIMEOUT and is at most
MAX_BODY bytes (after decompression), JSON nests at most MAX_JSON_DEPTH deep; anything malformed is
a 4xx, never a traceback. Secrets and tokens are never logged: a tunnel token appears only
in the body of `/token` and `POST /v1/tunnels` responses, a service-token secret only in the
responses that create or rotate it (the store keeps a keyed hash); a Hyperdrive config's origin
password and access secret are never returned, its connection string (which holds the generated
client password) only on create and on `GET …?connection_string=1`.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import hmac
import inspect
import json
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from access.assertion import SigningKey, jwks_document
from access.tokens import SecretHasher, new_client_id, new_client_secret
from control.certs import connection_params
from control.durations import parse_duration
from control.openapi import OPENAPI
from control.store import (
    DEFAULT_CONNECT_TIMEOUT,
    ACCESS_LOG_MAX_ROWS,
    AccessApp,
    Certificate,
    ConflictError,
    HyperdriveConfig,
    NotFoundError,
    Route,
    ServiceToken,
    Store,
    Tunnel,
    ValidationError,
    normalize_hostname,
)
from proxy.configs import (
    DEFAULT_PG_LISTEN,
    check_origin_flags,
    connection_string,
    origin_spec,
    parse_connection_string,
)
from proxy.errors import GENERIC, OriginError
from tunnel.token import TunnelToken

log = logging.getLogger("hd.api")

JWKS_PATH = "/cdn-cgi/access/certs"
METRICS_PATH = "/metrics"
PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz", JWKS_PATH, METRICS_PATH})
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_METRICS_SINCE = "1h"
EDGE_INFO_KEYS = ("api_url", "tunnel_url", "tunnel_address", "cert_pin", "issuer", "pg_listen", "mysql_listen",
                  "ca_path", "client_tls")
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_BODY = 1024 * 1024  # a CA bundle can be a few hundred KiB
MAX_JSON_DEPTH = 16  # our bodies nest 3 deep; json.loads itself would recurse ~1000 deep
# web.AppRunner keyword arguments (control/edge.py; the tests' servers too). aiohttp's idle timer
# runs from accept and from each response, and closes a connection still waiting for a complete
# request head: the header timeout. A head is at most 8 KiB of request line and 32 fields of 2 KiB.
# Bodies are decoded here (`_decode_body`), not by aiohttp, whose decoding errors surface as
# unhandled exceptions when it drains a body after the response.
class _MalformedRequests(logging.Filter):
    """aiohttp logs a stranger's malformed request (head too long, bad framing) as an ERROR with a
    traceback: anyone could fill the log. Those become one DEBUG line; real errors stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = f"{record.getMessage()}: {exc.message}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_HTTP_LOG = logging.getLogger("hd.api.http")
_HTTP_LOG.addFilter(_MalformedRequests())
SERVER_LIMITS: dict[str, Any] = {"keepalive_timeout": HEADER_TIMEOUT, "max_line_size": 8190,
                                 "max_field_size": 2048, "max_headers": 32, "auto_decompress": False,
                                 "logger": _HTTP_LOG}
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
DEFAULT_MYSQL_LISTEN = "127.0.0.1:3307"
PROBE_TIMEOUT = 60.0  # a guard only: the proxy's own connect timeout (15 s) comes first

# POST/PATCH /v1/hyperdrive/configs fields (named as the wrangler flags) -> store fields
HYPERDRIVE_BODY_FIELDS = {
    "name": "name",
    "origin_scheme": "scheme",
    "origin_host": "host",
    "origin_port": "port",
    "database": "database",
    "origin_user": "user",
    "origin_password": "password",
    "access_client_id": "access_client_id",
    "access_client_secret": "access_client_secret",
    "sslmode": "sslmode",
    "ca_certificate_id": "ca_certificate_id",
    "mtls_certificate_id": "mtls_certificate_id",
    "caching_disabled": "caching_disabled",
    "max_age": "max_age",
    "swr": "swr",
    "origin_connection_limit": "origin_connection_limit",
}
HYPERDRIVE_BODY = frozenset(HYPERDRIVE_BODY_FIELDS) | {"connection_string"}
_CLEARABLE = ("access_client_id", "access_client_secret", "ca_certificate_id", "mtls_certificate_id")

DEFAULT_TOKEN_DURATION = 8760 * 3600.0  # one year, as Cloudflare's API
DEFAULT_ROTATE_GRACE = 86400.0
MAX_ROTATE_GRACE = 30 * 86400.0
NON_EXPIRING = ("non-expiring", "never")


class Relay(Protocol):
    def config_changed(self, tunnel_id: str) -> None: ...
    def tunnel_deleted(self, tunnel_id: str) -> None: ...
    def connections_info(self, tunnel_id: str) -> list[dict]: ...
    def stats(self) -> dict: ...
    def access_changed(self) -> None: ...
    def keys_rotated(self) -> None: ...
    def flush_access_logs(self) -> Any: ...


class Proxy(Protocol):
    """The database proxy as the control plane uses it (proxy/service.py)."""

    async def probe(self, spec: Any) -> None: ...  # connect + run ";"; raises proxy.errors.OriginError
    # mysql configs, when `supports_mysql` is true: connect + SELECT 1; raises OriginError
    async def probe_mysql(self, spec: Any) -> None: ...
    def config_changed(self, config_id: str) -> None: ...  # new connections use the new settings
    def config_deleted(self, config_id: str) -> None: ...
    # proxy.cache.metrics.ConfigMetrics.summary() of the config (zeros when it saw no traffic)
    def metrics_summary(self, config_id: str, since_s: float | None) -> dict: ...
    def prometheus_text(self) -> str: ...  # text format 0.0.4: every config's counters, pool/cache gauges


def iso_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


def tunnel_json(t: Tunnel) -> dict:
    return {"id": t.id, "name": t.name, "created_at": iso_time(t.created_at), "config_version": t.config_version}


def route_json(r: Route, tunnel_name: str | None = None) -> dict:
    out = {
        "hostname": r.hostname,
        "tunnel_id": r.tunnel_id,
        "service": r.service,
        "public": r.public,
        "connect_timeout": r.connect_timeout,
        "created_at": iso_time(r.created_at),
    }
    if tunnel_name is not None:
        out["tunnel_name"] = tunnel_name
    return out


def _opt_time(ts: float | None) -> str | None:
    return None if ts is None else iso_time(ts)


def token_status(t: ServiceToken, now: float) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.expires_at is not None and t.expires_at <= now:
        return "expired"
    return "active"


def token_json(t: ServiceToken, now: float) -> dict:
    """A service token as listed: never its secret nor its hash."""
    prev_active = (t.revoked_at is None and t.prev_secret_hash is not None and t.prev_expires_at is not None
                   and t.prev_expires_at > now)
    return {
        "id": t.id,
        "name": t.name,
        "client_id": t.client_id,
        "status": token_status(t, now),
        "created_at": iso_time(t.created_at),
        "expires_at": _opt_time(t.expires_at),
        "revoked_at": _opt_time(t.revoked_at),
        "rotated": t.prev_secret_hash is not None,
        "previous_secret_expires_at": _opt_time(t.prev_expires_at),
        "previous_secret_active": prev_active,
    }


def hyperdrive_json(c: HyperdriveConfig) -> dict:
    """A Hyperdrive config as the API shows it: never the origin password nor the access secret
    (the connection string, with the client password, is added only where documented)."""
    return {
        "id": c.id,
        "name": c.name,
        "origin": {
            "scheme": c.scheme,
            "host": c.host,
            "port": c.port,
            "database": c.database,
            "user": c.user,
            "access_client_id": c.access_client_id,
        },
        "caching": {"disabled": c.caching_disabled, "max_age": c.max_age, "stale_while_revalidate": c.swr},
        "sslmode": c.sslmode,
        "ca_certificate_id": c.ca_certificate_id,
        "mtls_certificate_id": c.mtls_certificate_id,
        "origin_connection_limit": c.origin_connection_limit,
        "created_at": iso_time(c.created_at),
        "updated_at": iso_time(c.updated_at),
    }


def certificate_json(c: Certificate) -> dict:
    """An origin certificate as listed: never its private key."""
    return {
        "id": c.id,
        "name": c.name,
        "kind": c.kind,
        "subject": c.subject,
        "issuer": c.issuer,
        "expires_on": iso_time(c.expires_on),
        "created_at": iso_time(c.created_at),
    }


def log_json(entry: dict) -> dict:
    return {**entry, "time": iso_time(entry["time"])}


def _duration_field(body: dict, key: str, default: float | None, *, allow_none: bool) -> float | None:
    """A duration field: seconds (number), a duration string ("24h"), or, where allowed,
    null/"non-expiring" for none."""
    if key not in body:
        return default
    value = body[key]
    if value is None or (isinstance(value, str) and value.strip().lower() in NON_EXPIRING):
        if allow_none:
            return None
        raise ValidationError(f"{key} must be a duration such as 3600 or 24h")
    if isinstance(value, str):
        try:
            value = parse_duration(value)
        except ValueError as e:
            raise ValidationError(f"{key}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{key} must be a number of seconds or a duration such as 24h")
    return float(value)


def _decode_body(raw: bytes, coding: str) -> bytes:
    """A gzip or deflate body inflated to at most MAX_BODY bytes; 400 when it is not what it says."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return raw
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise web.HTTPUnsupportedMediaType(text=f"Content-Encoding {coding!r} is not supported: send gzip,"
                                                " deflate or an unencoded body")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, MAX_BODY + 1)
    except zlib.error as e:
        raise ValidationError(f"request body is not valid {coding} data: {e}") from None
    if len(out) > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY, len(out),
                                            text=f"request body is over {MAX_BODY} bytes once inflated")
    if not inflater.eof:
        raise ValidationError(f"request body is truncated {coding} data")
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion for a hostile document)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _Api:
    def __init__(self, store: Store, relay: Relay, admin_token: str, edge_info: dict, hash_key: bytes,
                 proxy: Proxy | None = None) -> None:
        self.store = store
        self.relay = relay
        self.proxy = proxy
        self.admin_token = admin_token.encode()
        # Kept by reference: `run_edge` fills in the API address after binding port 0.
        self.edge_info = edge_info
        self.hasher = SecretHasher(hash_key)
        self._jwks_cache: tuple[tuple, dict] | None = None

    # --- middleware -------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            denied = self._check_auth(request)
            if denied is not None:
                return denied
        try:
            return await handler(request)
        except ValidationError as e:
            return error(400, str(e))
        except NotFoundError as e:
            return error(404, str(e))
        except ConflictError as e:
            return error(409, str(e))
        except web.HTTPMethodNotAllowed as e:
            return error(405, f"method {e.method} is not allowed on {request.path}")
        except web.HTTPNotFound:
            return error(404, f"no such endpoint: {request.method} {request.path}")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error(e.status, e.text or e.reason)
        except Exception:
            log.exception("internal error handling %s %s", request.method, request.path)
            return error(500, "internal error; see the edge's log")

    def _check_auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="hd"'}
        if scheme.lower() != "bearer" or not presented.strip():
            return error(401, "missing admin token: send 'Authorization: Bearer <token>' (the token is in STATE_DIR/admin-token)", challenge)
        if not hmac.compare_digest(presented.strip().encode(), self.admin_token):
            return error(401, "invalid admin token", challenge)
        return None

    # --- helpers ----------------------------------------------------------------------------
    @staticmethod
    async def _body(request: web.Request, allowed: set[str]) -> dict:
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                raw = await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {BODY_TIMEOUT:g}s") from None
        except HttpProcessingError as e:  # bad chunked or length framing
            raise ValidationError(f"unreadable request body: {e.message}") from None
        raw = _decode_body(raw, request.headers.get("Content-Encoding", ""))
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested past the interpreter's limit
            raise ValidationError("request body is not valid JSON") from None
        if _depth(body) > MAX_JSON_DEPTH:
            raise ValidationError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(body, dict):
            raise ValidationError("request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ValidationError(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        return body

    def _tunnel(self, request: web.Request) -> Tunnel:
        return self.store.require_tunnel(request.match_info["id_or_name"])

    def _token(self, t: Tunnel) -> str:
        address = self.edge_info.get("tunnel_address")
        if not address:
            raise RuntimeError("edge_info has no tunnel_address")
        return TunnelToken(tunnel_id=t.id, secret=t.secret, edge=[address], pin=self.edge_info["cert_pin"]).encode()

    def _notify(self, fn_name: str, tunnel_id: str) -> None:
        # The store change is already committed; a relay hiccup must not turn it into an error
        # (connectors get the current config again when they re-register).
        try:
            getattr(self.relay, fn_name)(tunnel_id)
        except Exception:
            log.exception("relay.%s(%s) failed", fn_name, tunnel_id)

    def _relay_call(self, fn_name: str, *args: Any) -> Any:
        try:
            return getattr(self.relay, fn_name)(*args)
        except Exception:
            log.exception("relay.%s failed", fn_name)
            return None

    def _config_versions(self) -> dict[str, int]:
        return {t.id: t.config_version for t in self.store.list_tunnels()}

    def _apps_changed(self, before: dict[str, int]) -> None:
        """After an app change: the relay drops its access caches, and every tunnel whose pushed
        rules changed (the store bumped its config version) gets its new config."""
        self._relay_call("access_changed")
        for tunnel_id, version in self._config_versions().items():
            if before.get(tunnel_id) != version:
                self._notify("config_changed", tunnel_id)

    def _app_json(self, app: AccessApp) -> dict:
        names = []
        for tid in app.token_ids:
            t = self.store.get_service_token(tid)
            names.append(t.name if t else tid)
        return {
            "id": app.id,
            "name": app.name,
            "aud": app.aud,
            "domains": list(app.domains),
            "service_tokens": names,
            "service_token_ids": list(app.token_ids),
            "any_service_token": app.any_token,
            "created_at": iso_time(app.created_at),
        }

    def _connections(self, tunnel_id: str) -> list[dict]:
        try:
            return list(self.relay.connections_info(tunnel_id))
        except Exception:
            log.exception("relay.connections_info(%s) failed", tunnel_id)
            return []

    # --- handlers ---------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def edge(self, request: web.Request) -> web.Response:
        return web.json_response({k: self.edge_info[k] for k in EDGE_INFO_KEYS if k in self.edge_info})

    async def edge_ca(self, request: web.Request) -> web.Response:
        path = self.edge_info.get("ca_path")
        if not path:
            raise NotFoundError("this edge's certificate is verified with the clients' own trust store (no CA file)")
        try:
            pem = await asyncio.to_thread(Path(path).read_text, encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise NotFoundError(f"cannot read the CA certificate {path}: {getattr(e, 'strerror', None) or e}") from None
        return web.json_response({"pem": pem, "path": path})

    async def create_tunnel(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"name"})
        if "name" not in body:
            raise ValidationError("missing field: name")
        t = self.store.create_tunnel(body["name"])
        log.info("tunnel created: %s (%s)", t.name, t.id)
        return web.json_response({**tunnel_json(t), "token": self._token(t)}, status=201)

    async def list_tunnels(self, request: web.Request) -> web.Response:
        out = []
        for t in self.store.list_tunnels():
            routes = self.store.routes_for(t.id)
            out.append(
                {**tunnel_json(t), "routes": [r.hostname for r in routes], "connections": len(self._connections(t.id))}
            )
        return web.json_response(out)

    async def get_tunnel(self, request: web.Request) -> web.Response:
        t = self._tunnel(request)
        routes = [route_json(r) for r in self.store.routes_for(t.id)]
        return web.json_response({**tunnel_json(t), "routes": routes, "connections": self._connections(t.id)})

    async def delete_tunnel(self, request: web.Request) -> web.Response:
        t = self.store.delete_tunnel(request.match_info["id_or_name"])
        if t is None:
            raise NotFoundError(f"no tunnel named or with id {request.match_info['id_or_name']!r}")
        log.info("tunnel deleted: %s (%s)", t.name, t.id)
        self._notify("tunnel_deleted", t.id)
        return web.json_response({**tunnel_json(t), "deleted": True})

    async def tunnel_token(self, request: web.Request) -> web.Response:
        t = self._tunnel(request)
        return web.json_response({"id": t.id, "name": t.name, "token": self._token(t)})

    async def add_route(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"hostname", "service", "public", "connect_timeout"})
        if "hostname" not in body:
            raise ValidationError("missing field: hostname")
        timeout = body.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        if isinstance(timeout, str):
            try:
                timeout = parse_duration(timeout)
            except ValueError as e:
                raise ValidationError(f"connect_timeout: {e}") from None
        t = self._tunnel(request)
        previous = self.store.get_route_exact(normalize_hostname(body["hostname"]))
        # no service (absent or null): the connector's local --config decides where the hostname goes
        route = self.store.add_route(t.id, body["hostname"], body.get("service"), body.get("public", False), timeout)
        log.info("route %s -> %s via tunnel %s", route.hostname, route.service or "(connector's local config)", t.name)
        self._notify("config_changed", t.id)
        if previous is not None and previous.tunnel_id != t.id:
            self._notify("config_changed", previous.tunnel_id)
        t = self.store.require_tunnel(t.id)
        return web.json_response(
            {**route_json(route, t.name), "config_version": t.config_version, "replaced": previous is not None},
            status=201,
        )

    async def list_routes(self, request: web.Request) -> web.Response:
        names = {t.id: t.name for t in self.store.list_tunnels()}
        return web.json_response([route_json(r, names.get(r.tunnel_id)) for r in self.store.list_routes()])

    async def delete_route(self, request: web.Request) -> web.Response:
        hostname = request.match_info["hostname"]
        route = self.store.delete_route(hostname)
        if route is None:
            raise NotFoundError(f"no route for hostname {hostname!r}")
        log.info("route deleted: %s", route.hostname)
        self._notify("config_changed", route.tunnel_id)
        return web.json_response({**route_json(route), "deleted": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.relay.stats())

    # --- Access: service tokens -------------------------------------------------------------
    async def create_service_token(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"name", "duration"})
        if "name" not in body:
            raise ValidationError("missing field: name")
        duration = _duration_field(body, "duration", DEFAULT_TOKEN_DURATION, allow_none=True)
        if duration is not None and duration <= 0:
            raise ValidationError("duration must be more than 0 (or null for a non-expiring token)")
        now = time.time()
        secret = new_client_secret()
        t = self.store.create_service_token(
            body["name"], new_client_id(), self.hasher.hash(secret), None if duration is None else now + duration
        )
        log.info("service token created: %s (%s, client id %s)", t.name, t.id, t.client_id)
        self._relay_call("access_changed")
        return web.json_response(
            {"id": t.id, "name": t.name, "client_id": t.client_id, "client_secret": secret,
             "expires_at": _opt_time(t.expires_at)},
            status=201,
        )

    async def list_service_tokens(self, request: web.Request) -> web.Response:
        now = time.time()
        return web.json_response([token_json(t, now) for t in self.store.list_service_tokens()])

    async def rotate_service_token(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"grace"})
        grace = _duration_field(body, "grace", DEFAULT_ROTATE_GRACE, allow_none=False)
        assert grace is not None
        if grace < 0 or grace > MAX_ROTATE_GRACE:
            raise ValidationError("grace must be from 0 (the old secret stops at once) to 720h (30 days)")
        t = self.store.require_service_token(request.match_info["id_or_name"])
        now = time.time()
        secret = new_client_secret()
        t = self.store.rotate_service_token(t.id, self.hasher.hash(secret), now + grace)
        log.info("service token rotated: %s (%s), previous secret valid for %gs", t.name, t.id, grace)
        self._relay_call("access_changed")
        return web.json_response(
            {"id": t.id, "name": t.name, "client_id": t.client_id, "client_secret": secret,
             "previous_secret_expires_at": _opt_time(t.prev_expires_at)}
        )

    async def revoke_service_token(self, request: web.Request) -> web.Response:
        await self._body(request, set())
        t = self.store.revoke_service_token(request.match_info["id_or_name"])
        log.info("service token revoked: %s (%s)", t.name, t.id)
        self._relay_call("access_changed")
        return web.json_response(token_json(t, time.time()))

    # --- Access: applications ---------------------------------------------------------------
    async def create_app(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"name", "domains", "service_tokens", "any_service_token"})
        for key in ("name", "domains"):
            if key not in body:
                raise ValidationError(f"missing field: {key}")
        domains = body["domains"]
        if isinstance(domains, str):
            domains = [domains]
        if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
            raise ValidationError("domains must be a non-empty list of hostnames")
        refs = body.get("service_tokens", [])
        if refs is None:
            refs = []
        if not isinstance(refs, list) or not all(isinstance(x, str) for x in refs):
            raise ValidationError("service_tokens must be a list of service token names or ids")
        any_token = body.get("any_service_token", False)
        if not isinstance(any_token, bool):
            raise ValidationError("any_service_token must be true or false")
        if not refs and not any_token:
            raise ValidationError(
                "an Access application needs a policy: give service_tokens, or any_service_token: true"
            )
        token_ids = [self.store.require_service_token(ref).id for ref in refs]
        before = self._config_versions()
        app = self.store.create_app(body["name"], domains, token_ids, any_token)
        log.info("access application created: %s (%s) for %s", app.name, app.id, ", ".join(app.domains))
        self._apps_changed(before)
        return web.json_response(self._app_json(app), status=201)

    async def list_apps(self, request: web.Request) -> web.Response:
        return web.json_response([self._app_json(a) for a in self.store.list_apps()])

    async def delete_app(self, request: web.Request) -> web.Response:
        key = request.match_info["id_or_name"]
        before = self._config_versions()
        app = self.store.delete_app(key)
        if app is None:
            raise NotFoundError(f"no Access application named or with id {key!r}")
        log.info("access application deleted: %s (%s)", app.name, app.id)
        self._apps_changed(before)
        return web.json_response({**self._app_json(app), "deleted": True})

    # --- Access: log and keys ---------------------------------------------------------------
    async def access_logs(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            raise ValidationError(f"limit must be a whole number (got {raw!r})") from None
        if not 1 <= limit <= ACCESS_LOG_MAX_ROWS:
            raise ValidationError(f"limit must be from 1 to {ACCESS_LOG_MAX_ROWS}")
        try:
            flushed = self.relay.flush_access_logs()  # the relay buffers decisions
            if inspect.isawaitable(flushed):
                await flushed
        except Exception:
            log.exception("relay.flush_access_logs failed")
        return web.json_response([log_json(e) for e in self.store.access_logs(limit)])

    async def rotate_keys(self, request: web.Request) -> web.Response:
        await self._body(request, set())
        stored = self.store.signing_keys()
        previous = SigningKey.from_pem(*stored[0]).kid if stored else None
        key = await asyncio.to_thread(SigningKey.generate)  # RSA key generation: off the loop
        self.store.add_signing_key(key.private_pem(), key.created_at)
        log.info("access signing key rotated: kid %s", key.kid)
        self._relay_call("keys_rotated")
        return web.json_response({"kid": key.kid, "previous_kid": previous})

    async def jwks(self, request: web.Request) -> web.Response:
        stored = self.store.signing_keys()
        cache_key = tuple((hashlib.sha256(pem).digest(), created) for pem, created in stored)
        if self._jwks_cache is None or self._jwks_cache[0] != cache_key:
            # parsing the private keys costs milliseconds: redo it only when the keys change
            keys = [SigningKey.from_pem(pem, created) for pem, created in stored]
            self._jwks_cache = (cache_key, jwks_document(keys))
        return web.json_response(self._jwks_cache[1], headers={"Cache-Control": "public, max-age=60"})


    # --- Hyperdrive configs -------------------------------------------------------------------
    def _listen_for(self, c: HyperdriveConfig) -> str:
        if c.scheme == "mysql":
            return self.edge_info.get("mysql_listen") or DEFAULT_MYSQL_LISTEN
        return self.edge_info.get("pg_listen") or DEFAULT_PG_LISTEN

    def _with_connection_string(self, c: HyperdriveConfig) -> dict:
        # The proxy's URL with what makes a driver verify the edge (control/certs.py), in place of
        # proxy.configs' `sslmode=require`, which verifies nothing in libpq and breaks node-postgres.
        base = connection_string(c, self._listen_for(c)).partition("?")[0]
        params = connection_params(c.scheme, self.edge_info.get("ca_path"))
        return {**hyperdrive_json(c), "connection_string": f"{base}?{urlencode(params, quote_via=quote, safe='/')}"}

    @staticmethod
    def _hyperdrive_fields(body: dict, *, creating: bool) -> dict:
        """Store fields from a create/update body, after the conflicting-settings checks."""
        try:
            check_origin_flags(body, creating=creating)
        except ValueError as e:
            raise ValidationError(str(e)) from None
        fields: dict[str, Any] = {}
        for key, store_key in HYPERDRIVE_BODY_FIELDS.items():
            if key not in body:
                continue
            value = body[key]
            if key in _CLEARABLE and value == "":
                value = None  # "" clears, as null does
            if value is None and key not in _CLEARABLE and key != "origin_port":
                if not creating:
                    raise ValidationError(f"{key} cannot be null (leave it out to keep the current value)")
                continue
            fields[store_key] = value
        url = body.get("connection_string")
        if url is not None:
            try:
                parsed = parse_connection_string(url)
            except ValueError as e:
                raise ValidationError(f"connection_string: {e}") from None
            if parsed["port"] is not None and fields.get("access_client_id"):
                raise ValidationError(
                    "the connection string's port conflicts with access_client_id: an origin reached through a"
                    " tunnel has no port (the tunnel route's service decides it); leave the port out"
                )
            url_sslmode = parsed.pop("sslmode", None)
            if url_sslmode is not None:
                if fields.get("sslmode") not in (None, url_sslmode):
                    raise ValidationError(
                        f"sslmode {fields['sslmode']!r} conflicts with the connection string's sslmode={url_sslmode}"
                    )
                fields["sslmode"] = url_sslmode
            if parsed["password"] is None and not creating:
                parsed.pop("password")  # keep the current password
            fields.update(parsed)
        if creating:
            if "name" not in body:
                raise ValidationError("missing field: name")
            if url is None:
                for key in ("origin_host", "database", "origin_user"):
                    if body.get(key) is None:
                        raise ValidationError(f"missing field: {key} (or give connection_string)")
                if body.get("origin_password") is None:
                    raise ValidationError("missing field: origin_password (or give connection_string)")
        return fields

    async def _probe(self, config: HyperdriveConfig) -> web.Response | None:
        """Test the origin as the proxy will use it; an error response, or None when it works."""
        if self.proxy is None:
            return error(503, "the database proxy is not running in this edge, so the origin cannot be tested;"
                              " restart hd edge")
        if config.scheme == "mysql" and not getattr(self.proxy, "supports_mysql", False):
            raise ValidationError("mysql origins are not supported by this edge yet (origin_scheme postgresql)")
        try:
            spec = origin_spec(config, self.store)
        except ValueError as e:  # a setting the origin connector refuses (OriginSpec checks)
            raise ValidationError(str(e)) from None
        try:
            if config.scheme == "mysql":
                result = self.proxy.probe_mysql(spec)  # the MySQL handshake and SELECT 1
            else:
                result = self.proxy.probe(spec)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, PROBE_TIMEOUT)
        except OriginError as e:
            log.info("origin test of Hyperdrive config %s failed: [%s] %s", config.name, e.code, e.message)
            return web.json_response({"error": e.message, "code": e.code, "hint": e.hint}, status=400)
        except asyncio.TimeoutError:
            return web.json_response(
                {"error": f"testing the origin did not finish within {PROBE_TIMEOUT:g}s", "code": GENERIC,
                 "hint": "check that the origin database answers, then try again"},
                status=400,
            )
        return None

    def _proxy_notify(self, fn_name: str, config_id: str) -> None:
        # committed already: a proxy hiccup must not turn the change into an error
        if self.proxy is None:
            return
        try:
            getattr(self.proxy, fn_name)(config_id)
        except Exception:
            log.exception("proxy.%s(%s) failed", fn_name, config_id)

    async def create_hyperdrive(self, request: web.Request) -> web.Response:
        body = await self._body(request, set(HYPERDRIVE_BODY))
        fields = self._hyperdrive_fields(body, creating=True)
        candidate = self.store.new_hyperdrive(**fields)
        failed = await self._probe(candidate)
        if failed is not None:
            return failed
        config = self.store.insert_hyperdrive(candidate)
        log.info("Hyperdrive config created: %s (%s) -> %s", config.name, config.id, config.host)
        self._proxy_notify("config_changed", config.id)
        return web.json_response(self._with_connection_string(config), status=201)

    async def update_hyperdrive(self, request: web.Request) -> web.Response:
        body = await self._body(request, set(HYPERDRIVE_BODY))
        key = request.match_info["id_or_name"]
        fields = self._hyperdrive_fields(body, creating=False)
        merged = self.store.merged_hyperdrive(key, **fields)
        failed = await self._probe(merged)
        if failed is not None:
            return failed  # the stored config is unchanged
        config = self.store.update_hyperdrive(merged.id, **fields)
        log.info("Hyperdrive config updated: %s (%s)", config.name, config.id)
        self._proxy_notify("config_changed", config.id)  # the proxy decides; pools and cache are kept
        return web.json_response(hyperdrive_json(config))

    async def list_hyperdrives(self, request: web.Request) -> web.Response:
        return web.json_response([hyperdrive_json(c) for c in self.store.list_hyperdrives()])

    async def get_hyperdrive(self, request: web.Request) -> web.Response:
        config = self.store.require_hyperdrive(request.match_info["id_or_name"])
        flag = request.query.get("connection_string", "").strip().lower()
        if flag in ("1", "true", "yes"):
            return web.json_response(self._with_connection_string(config))
        if flag not in ("", "0", "false", "no"):
            raise ValidationError("connection_string must be 1 or 0")
        return web.json_response(hyperdrive_json(config))

    def _no_metrics(self, method: str) -> str | None:
        """Why the proxy cannot report metrics (`method`), or None when it can."""
        if self.proxy is None:
            return "the database proxy is not running in this edge, so there are no query metrics; restart hd edge"
        if not callable(getattr(self.proxy, method, None)):
            return "this edge's database proxy does not report query metrics"
        return None

    async def hyperdrive_metrics(self, request: web.Request) -> web.Response:
        raw = request.query.get("since", DEFAULT_METRICS_SINCE)
        try:
            since = parse_duration(raw)
        except ValueError as e:
            raise ValidationError(f"since: {e}") from None
        if not math.isfinite(since) or since <= 0:
            raise ValidationError(f"since must be a duration of more than 0, such as 1h or 24h (got {raw!r})")
        config = self.store.require_hyperdrive(request.match_info["id_or_name"])
        why = self._no_metrics("metrics_summary")
        if why is not None:
            return error(503, why)
        assert self.proxy is not None
        summary = self.proxy.metrics_summary(config.id, since)
        return web.json_response({"id": config.id, "name": config.name, **summary})

    async def prometheus(self, request: web.Request) -> web.Response:
        # public (no admin token) for scrapers: counters and gauges only, never a secret
        why = self._no_metrics("prometheus_text")
        if why is not None:
            return web.Response(status=503, text=why + "\n")
        assert self.proxy is not None
        return web.Response(body=self.proxy.prometheus_text().encode(),
                            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def delete_hyperdrive(self, request: web.Request) -> web.Response:
        await self._body(request, set())
        key = request.match_info["id_or_name"]
        config = self.store.delete_hyperdrive(key)
        if config is None:
            raise NotFoundError(f"no Hyperdrive config named or with id {key!r}")
        log.info("Hyperdrive config deleted: %s (%s)", config.name, config.id)
        self._proxy_notify("config_deleted", config.id)
        return web.json_response({**hyperdrive_json(config), "deleted": True})

    # --- origin certificates ----------------------------------------------------------------
    async def add_certificate(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"name", "kind", "cert_pem", "key_pem"})
        for key in ("name", "kind", "cert_pem"):
            if key not in body:
                raise ValidationError(f"missing field: {key}")
        for key in ("cert_pem", "key_pem"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise ValidationError(f"{key} must be PEM text")
        cert = self.store.add_certificate(body["name"], body["kind"], body["cert_pem"], body.get("key_pem"))
        log.info("certificate uploaded: %s (%s, %s)", cert.name, cert.id, cert.kind)
        return web.json_response(certificate_json(cert), status=201)

    async def list_certificates(self, request: web.Request) -> web.Response:
        return web.json_response([certificate_json(c) for c in self.store.list_certificates()])

    async def delete_certificate(self, request: web.Request) -> web.Response:
        await self._body(request, set())
        key = request.match_info["id_or_name"]
        cert = self.store.delete_certificate(key)
        if cert is None:
            raise NotFoundError(f"no certificate named or with id {key!r}")
        log.info("certificate deleted: %s (%s)", cert.name, cert.id)
        return web.json_response({**certificate_json(cert), "deleted": True})


def make_app(
    store: Store, relay: Relay, *, admin_token: str, edge_info: dict, hash_key: bytes | None = None,
    proxy: Proxy | None = None,
) -> web.Application:
    """The control API. `hash_key` keys the service-token secret hashes and must be the relay's
    (default: `store.service_token_hash_key()`, derived from secret.key). `proxy` tests the origins
    of Hyperdrive configs and hears about their changes (without it, creating or updating one is
    refused with 503) and reports their query metrics. `edge_info["pg_listen"]` is the address put
    in connection strings."""
    if not admin_token:
        raise ValueError("admin_token must not be empty")
    api = _Api(store, relay, admin_token, edge_info, hash_key or store.service_token_hash_key(), proxy)
    # 1 MiB: a CA bundle can be a few hundred KiB
    app = web.Application(middlewares=[api.middleware], client_max_size=MAX_BODY)
    r = app.router
    r.add_get("/openapi.json", api.openapi, allow_head=False)
    r.add_get("/healthz", api.healthz, allow_head=False)
    r.add_get("/v1/edge", api.edge, allow_head=False)
    r.add_get("/v1/edge/ca", api.edge_ca, allow_head=False)
    r.add_post("/v1/tunnels", api.create_tunnel)
    r.add_get("/v1/tunnels", api.list_tunnels, allow_head=False)
    r.add_get("/v1/tunnels/{id_or_name}", api.get_tunnel, allow_head=False)
    r.add_delete("/v1/tunnels/{id_or_name}", api.delete_tunnel)
    r.add_get("/v1/tunnels/{id_or_name}/token", api.tunnel_token, allow_head=False)
    r.add_post("/v1/tunnels/{id_or_name}/routes", api.add_route)
    r.add_get("/v1/routes", api.list_routes, allow_head=False)
    r.add_delete("/v1/routes/{hostname}", api.delete_route)
    r.add_get("/v1/stats", api.stats, allow_head=False)
    r.add_post("/v1/access/service-tokens", api.create_service_token)
    r.add_get("/v1/access/service-tokens", api.list_service_tokens, allow_head=False)
    r.add_post("/v1/access/service-tokens/{id_or_name}/rotate", api.rotate_service_token)
    r.add_post("/v1/access/service-tokens/{id_or_name}/revoke", api.revoke_service_token)
    r.add_post("/v1/access/apps", api.create_app)
    r.add_get("/v1/access/apps", api.list_apps, allow_head=False)
    r.add_delete("/v1/access/apps/{id_or_name}", api.delete_app)
    r.add_get("/v1/access/logs", api.access_logs, allow_head=False)
    r.add_post("/v1/access/keys/rotate", api.rotate_keys)
    r.add_get(JWKS_PATH, api.jwks, allow_head=False)
    r.add_post("/v1/hyperdrive/configs", api.create_hyperdrive)
    r.add_get("/v1/hyperdrive/configs", api.list_hyperdrives, allow_head=False)
    r.add_get("/v1/hyperdrive/configs/{id_or_name}", api.get_hyperdrive, allow_head=False)
    r.add_patch("/v1/hyperdrive/configs/{id_or_name}", api.update_hyperdrive)
    r.add_delete("/v1/hyperdrive/configs/{id_or_name}", api.delete_hyperdrive)
    r.add_get("/v1/hyperdrive/configs/{id_or_name}/metrics", api.hyperdrive_metrics, allow_head=False)
    r.add_get(METRICS_PATH, api.prometheus, allow_head=False)
    r.add_post("/v1/certificates", api.add_certificate)
    r.add_get("/v1/certificates", api.list_certificates, allow_head=False)
    r.add_delete("/v1/certificates/{id_or_name}", api.delete_certificate)
    return app
