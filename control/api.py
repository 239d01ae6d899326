"""The control API: a thin JSON-over-HTTP face on the store, in the edge's event loop.

Every route needs `Authorization: Bearer <admin token>` except `/openapi.json` and `/healthz`.
Errors are `{"error": "message"}` with 400/401/404/405/409 (500 only for bugs). Secrets and
tokens are never logged: the only place a token appears is the body of `/token` and `POST
/v1/tunnels` responses.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import logging
from typing import Any, Protocol

from aiohttp import web

from control.durations import parse_duration
from control.openapi import OPENAPI
from control.store import (
    DEFAULT_CONNECT_TIMEOUT,
    ConflictError,
    NotFoundError,
    Route,
    Store,
    Tunnel,
    ValidationError,
    normalize_hostname,
)
from tunnel.token import TunnelToken

log = logging.getLogger("hd.api")

PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz"})
EDGE_INFO_KEYS = ("api_url", "tunnel_url", "tunnel_address", "cert_pin")


class Relay(Protocol):
    def config_changed(self, tunnel_id: str) -> None: ...
    def tunnel_deleted(self, tunnel_id: str) -> None: ...
    def connections_info(self, tunnel_id: str) -> list[dict]: ...
    def stats(self) -> dict: ...


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


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _Api:
    def __init__(self, store: Store, relay: Relay, admin_token: str, edge_info: dict) -> None:
        self.store = store
        self.relay = relay
        self.admin_token = admin_token.encode()
        # Kept by reference: `run_edge` fills in the API address after binding port 0.
        self.edge_info = edge_info

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
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise ValidationError("request body is not valid JSON") from None
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
        for key in ("hostname", "service"):
            if key not in body:
                raise ValidationError(f"missing field: {key}")
        timeout = body.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        if isinstance(timeout, str):
            try:
                timeout = parse_duration(timeout)
            except ValueError as e:
                raise ValidationError(f"connect_timeout: {e}") from None
        t = self._tunnel(request)
        previous = self.store.get_route_exact(normalize_hostname(body["hostname"]))
        route = self.store.add_route(t.id, body["hostname"], body["service"], body.get("public", False), timeout)
        log.info("route %s -> %s via tunnel %s", route.hostname, route.service, t.name)
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


def make_app(store: Store, relay: Relay, *, admin_token: str, edge_info: dict) -> web.Application:
    if not admin_token:
        raise ValueError("admin_token must not be empty")
    api = _Api(store, relay, admin_token, edge_info)
    app = web.Application(middlewares=[api.middleware], client_max_size=64 * 1024)
    r = app.router
    r.add_get("/openapi.json", api.openapi, allow_head=False)
    r.add_get("/healthz", api.healthz, allow_head=False)
    r.add_get("/v1/edge", api.edge, allow_head=False)
    r.add_post("/v1/tunnels", api.create_tunnel)
    r.add_get("/v1/tunnels", api.list_tunnels, allow_head=False)
    r.add_get("/v1/tunnels/{id_or_name}", api.get_tunnel, allow_head=False)
    r.add_delete("/v1/tunnels/{id_or_name}", api.delete_tunnel)
    r.add_get("/v1/tunnels/{id_or_name}/token", api.tunnel_token, allow_head=False)
    r.add_post("/v1/tunnels/{id_or_name}/routes", api.add_route)
    r.add_get("/v1/routes", api.list_routes, allow_head=False)
    r.add_delete("/v1/routes/{hostname}", api.delete_route)
    r.add_get("/v1/stats", api.stats, allow_head=False)
    return app
