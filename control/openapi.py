"""Hand-written OpenAPI 3.1 description of the control API (served at /openapi.json).

A unit test checks that every aiohttp route appears here, so add the route and its entry together.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = {"$ref": "#/components/responses/Error"}
_ID_PARAM = {
    "name": "id_or_name",
    "in": "path",
    "required": True,
    "description": "tunnel id or name",
    "schema": {"type": "string"},
}
_HOST_PARAM = {
    "name": "hostname",
    "in": "path",
    "required": True,
    "description": "route hostname (exact or *.suffix, URL-encoded)",
    "schema": {"type": "string"},
}


def _op(summary: str, responses: dict, *, body: dict | None = None, params: list | None = None,
        public: bool = False) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, "401": _ERR, "default": _ERR}}
    if public:
        op["security"] = []
        del op["responses"]["401"]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "hd edge control API",
        "version": "1",
        "description": "Tunnels and routes of a self-hosted edge. Every operation needs the admin token "
        "(STATE_DIR/admin-token) as a bearer token, except /openapi.json and /healthz. Errors are "
        '`{"error": "message"}`.',
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "servers": [{"url": "http://127.0.0.1:8787"}],
    "security": [{"adminToken": []}],
    "paths": {
        "/openapi.json": {
            "get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI document")}, public=True)
        },
        "/healthz": {
            "get": _op(
                "Liveness",
                {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "the API is up")},
                public=True,
            )
        },
        "/v1/edge": {
            "get": _op("Edge endpoints and certificate pin", {"200": _json(_ref("Edge"), "edge information")})
        },
        "/v1/tunnels": {
            "post": _op(
                "Create a tunnel",
                {"201": _json(_ref("TunnelCreated"), "the tunnel and its token"), "400": _ERR, "409": _ERR},
                body={
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}},
                },
            ),
            "get": _op(
                "List tunnels",
                {"200": _json({"type": "array", "items": _ref("TunnelSummary")}, "all tunnels")},
            ),
        },
        "/v1/tunnels/{id_or_name}": {
            "get": _op(
                "A tunnel with its routes and live connections",
                {"200": _json(_ref("TunnelDetail"), "the tunnel"), "404": _ERR},
                params=[_ID_PARAM],
            ),
            "delete": _op(
                "Delete a tunnel and its routes; its connectors are disconnected",
                {"200": _json(_ref("Deleted"), "the deleted tunnel"), "404": _ERR},
                params=[_ID_PARAM],
            ),
        },
        "/v1/tunnels/{id_or_name}/token": {
            "get": _op(
                "The tunnel token for hd-connector --token",
                {"200": _json(_ref("TunnelToken"), "the token"), "404": _ERR},
                params=[_ID_PARAM],
            )
        },
        "/v1/tunnels/{id_or_name}/routes": {
            "post": _op(
                "Route a hostname to a service through the tunnel (replaces an existing route for it)",
                {"201": _json(_ref("RouteChange"), "the route"), "400": _ERR, "404": _ERR},
                params=[_ID_PARAM],
                body={
                    "type": "object",
                    "required": ["hostname", "service"],
                    "additionalProperties": False,
                    "properties": {
                        "hostname": {"type": "string", "description": "exact name or *.suffix; no port, no scheme"},
                        "service": {
                            "type": "string",
                            "description": "tcp://host:port, ssh://host[:port] (default 22) or http_status:NNN",
                        },
                        "public": {"type": "boolean", "default": False},
                        "connect_timeout": {
                            "oneOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string"}],
                            "default": 10,
                            "description": "seconds, or a duration such as 10s or 1m",
                        },
                    },
                },
            )
        },
        "/v1/routes": {
            "get": _op("List all routes", {"200": _json({"type": "array", "items": _ref("Route")}, "all routes")})
        },
        "/v1/routes/{hostname}": {
            "delete": _op(
                "Delete a route",
                {"200": _json(_ref("Route"), "the deleted route"), "404": _ERR},
                params=[_HOST_PARAM],
            )
        },
        "/v1/stats": {
            "get": _op("Relay counters", {"200": _json({"type": "object"}, "relay statistics")})
        },
    },
    "components": {
        "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        "responses": {"Error": _json(_ref("Error"), "error")},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Edge": {
                "type": "object",
                "properties": {
                    "api_url": {"type": "string"},
                    "tunnel_url": {"type": "string", "description": "wss://host:port"},
                    "tunnel_address": {"type": "string", "description": "host:port put in tunnel tokens"},
                    "cert_pin": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                },
            },
            "Tunnel": {
                "type": "object",
                "required": ["id", "name", "created_at", "config_version"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "config_version": {"type": "integer"},
                },
            },
            "TunnelCreated": {
                "allOf": [_ref("Tunnel"), {"type": "object", "properties": {"token": {"type": "string"}}}]
            },
            "TunnelSummary": {
                "allOf": [
                    _ref("Tunnel"),
                    {
                        "type": "object",
                        "properties": {
                            "routes": {"type": "array", "items": {"type": "string"}},
                            "connections": {"type": "integer"},
                        },
                    },
                ]
            },
            "TunnelDetail": {
                "allOf": [
                    _ref("Tunnel"),
                    {
                        "type": "object",
                        "properties": {
                            "routes": {"type": "array", "items": _ref("Route")},
                            "connections": {"type": "array", "items": _ref("Connection")},
                        },
                    },
                ]
            },
            "TunnelToken": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "token": {"type": "string"}},
            },
            "Route": {
                "type": "object",
                "properties": {
                    "hostname": {"type": "string"},
                    "tunnel_id": {"type": "string"},
                    "tunnel_name": {"type": "string"},
                    "service": {"type": "string"},
                    "public": {"type": "boolean"},
                    "connect_timeout": {"type": "number"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "deleted": {"type": "boolean"},
                },
            },
            "RouteChange": {
                "allOf": [
                    _ref("Route"),
                    {
                        "type": "object",
                        "properties": {"config_version": {"type": "integer"}, "replaced": {"type": "boolean"}},
                    },
                ]
            },
            "Connection": {
                "type": "object",
                "properties": {
                    "connector_id": {"type": "string"},
                    "conn_index": {"type": "integer"},
                    "connection_id": {"type": "string"},
                    "protocol": {"type": "string"},
                    "version": {"type": "string"},
                    "since": {},
                    "streams": {"type": "integer"},
                },
            },
            "Deleted": {
                "allOf": [_ref("Tunnel"), {"type": "object", "properties": {"deleted": {"type": "boolean"}}}]
            },
        },
    },
}
