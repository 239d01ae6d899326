"""Hand-written OpenAPI 3.1 description of the control API (served at /openapi.json).

A unit test checks that every aiohttp route appears here, so add the route and its entry together.
"""

from __future__ import annotations

from typing import Any

from proxy.cache.metrics import CACHE_STATUSES


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
_TOKEN_PARAM = {
    "name": "id_or_name",
    "in": "path",
    "required": True,
    "description": "service token id, name or client id",
    "schema": {"type": "string"},
}
_APP_PARAM = {
    "name": "id_or_name",
    "in": "path",
    "required": True,
    "description": "Access application id or name",
    "schema": {"type": "string"},
}
_DURATION = {
    "oneOf": [{"type": "number", "minimum": 0}, {"type": "string"}],
    "description": "seconds, or a duration such as 24h or 8760h",
}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_HD_PARAM = {
    "name": "id_or_name",
    "in": "path",
    "required": True,
    "description": "Hyperdrive config id or name",
    "schema": {"type": "string"},
}
_CERT_PARAM = {
    "name": "id_or_name",
    "in": "path",
    "required": True,
    "description": "certificate id or name",
    "schema": {"type": "string"},
}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
_CLEARABLE_STR = {"type": ["string", "null"]}
_HD_SETTINGS: dict[str, Any] = {
    "connection_string": {
        "type": "string",
        "description": "postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE (or postgres://, mysql://); conflicts "
        "with origin_scheme, origin_host, origin_port, origin_user, origin_password and database",
    },
    "origin_scheme": {"enum": ["postgresql", "postgres", "mysql"], "default": "postgresql"},
    "origin_host": {"type": "string", "description": "DNS name or IP; the tunnel hostname when access "
                    "credentials are given"},
    "origin_port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535,
                    "description": "direct origins only (default 5432 / 3306); conflicts with access_client_id"},
    "database": {"type": "string", "maxLength": 63, "description": "at most 63 bytes"},
    "origin_user": {"type": "string", "maxLength": 63, "description": "at most 63 bytes"},
    "origin_password": {"type": "string", "description": "never returned"},
    "access_client_id": {**_CLEARABLE_STR, "description": "service token client id: reach the origin through "
                         "a tunnel; null or \"\" clears (update)"},
    "access_client_secret": {**_CLEARABLE_STR, "description": "service token secret; never returned"},
    "sslmode": {"enum": ["require", "verify-ca", "verify-full", "disable"], "default": "require",
                "description": "require: encrypt; verify-ca / verify-full: also check the certificate (against "
                "ca_certificate_id, else the system's CAs); disable: no TLS (only a direct origin on a loopback "
                "address, for local development)"},
    "ca_certificate_id": {**_CLEARABLE_STR, "description": "id or name of a certificate-authority the "
                          "origin's certificate must chain to (as in libpq, also checked with sslmode require)"},
    "mtls_certificate_id": {**_CLEARABLE_STR, "description": "id or name of an mtls-certificate (client "
                            "certificate)"},
    "caching_disabled": {"type": "boolean", "default": False},
    "max_age": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 60},
    "swr": {"type": "integer", "minimum": 0, "maximum": 86400, "default": 15,
            "description": "stale-while-revalidate, seconds"},
    "origin_connection_limit": {"type": "integer", "minimum": 5, "maximum": 1000, "default": 20,
                                "description": "soft limit of origin connections"},
}
_PROBE_ERR = _json(_ref("OriginError"), "invalid settings, or the origin test failed (then with code and hint)")
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
        "description": "Tunnels, routes, Access and Hyperdrive configs of a self-hosted edge. Every operation needs the admin "
        "token (STATE_DIR/admin-token) as a bearer token, except /openapi.json, /healthz, the Prometheus "
        '/metrics and the JWKS at /cdn-cgi/access/certs. Errors are `{"error": "message"}`. A service-token secret is returned only '
        "when the token is created or rotated.",
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
        "/v1/edge/ca": {
            "get": _op(
                "The CA certificate applications verify the edge's database listeners with (`hd edge ca`)",
                {"200": _json({"type": "object", "required": ["pem", "path"],
                               "properties": {"pem": {"type": "string"},
                                              "path": {"type": "string", "description": "the file on the edge's host"}}},
                              "PEM text and where it lives"), "404": _ERR},
            )
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
                    "required": ["hostname"],
                    "additionalProperties": False,
                    "properties": {
                        "hostname": {"type": "string", "description": "exact name or *.suffix; no port, no scheme"},
                        "service": {
                            "type": ["string", "null"],
                            "description": "tcp://host:port, ssh://host[:port] (default 22) or http_status:NNN. Absent"
                            " or null: the connector's local --config decides (a locally-managed tunnel: while no"
                            " route of the tunnel names a service, the edge pushes no ingress config)",
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
        "/v1/access/service-tokens": {
            "post": _op(
                "Create a service token; the response is the only place its secret appears",
                {"201": _json(_ref("ServiceTokenCreated"), "the token and its secret"), "400": _ERR, "409": _ERR},
                body={
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
                        "duration": {
                            "oneOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string"},
                                      {"type": "null"}],
                            "default": 31536000,
                            "description": "lifetime in seconds or as a duration (8760h); null or "
                            '"non-expiring" for a token that never expires',
                        },
                    },
                },
            ),
            "get": _op(
                "List service tokens (never a secret or its hash)",
                {"200": _json({"type": "array", "items": _ref("ServiceToken")}, "all service tokens")},
            ),
        },
        "/v1/access/service-tokens/{id_or_name}/rotate": {
            "post": _op(
                "Give the token a new secret; the previous one stays valid for the grace period",
                {"200": _json(_ref("ServiceTokenRotated"), "the new secret"), "400": _ERR, "404": _ERR,
                 "409": _ERR},
                params=[_TOKEN_PARAM],
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "grace": {**_DURATION, "default": 86400,
                                  "description": "how long the previous secret stays valid: 0 (not at all) "
                                  "to 720h; seconds or a duration such as 24h"},
                    },
                },
            )
        },
        "/v1/access/service-tokens/{id_or_name}/revoke": {
            "post": _op(
                "Revoke a service token at once",
                {"200": _json(_ref("ServiceToken"), "the revoked token"), "404": _ERR},
                params=[_TOKEN_PARAM],
            )
        },
        "/v1/access/apps": {
            "post": _op(
                "Create an Access application (Service Auth policy) on one or more domains",
                {"201": _json(_ref("AccessApp"), "the application with its aud tag"), "400": _ERR,
                 "404": _ERR, "409": _ERR},
                body={
                    "type": "object",
                    "required": ["name", "domains"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
                        "domains": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string"},
                            "description": "exact hostnames or *.suffix; a domain belongs to one application",
                        },
                        "service_tokens": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "names, ids or client ids of the allowed service tokens",
                        },
                        "any_service_token": {"type": "boolean", "default": False},
                    },
                },
            ),
            "get": _op(
                "List Access applications",
                {"200": _json({"type": "array", "items": _ref("AccessApp")}, "all applications")},
            ),
        },
        "/v1/access/apps/{id_or_name}": {
            "delete": _op(
                "Delete an Access application (its hostnames are refused again unless public)",
                {"200": _json(_ref("AccessApp"), "the deleted application"), "404": _ERR},
                params=[_APP_PARAM],
            )
        },
        "/v1/access/logs": {
            "get": _op(
                "Access decisions, newest first",
                {"200": _json({"type": "array", "items": _ref("AccessLogEntry")}, "decisions"), "400": _ERR},
                params=[{
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 100},
                }],
            )
        },
        "/v1/access/keys/rotate": {
            "post": _op(
                "Rotate the assertion signing key (the JWKS keeps the previous one)",
                {"200": _json(
                    {"type": "object", "properties": {"kid": {"type": "string"},
                                                      "previous_kid": {"type": ["string", "null"]}}},
                    "the new and the previous key id",
                )},
            )
        },
        "/v1/hyperdrive/configs": {
            "post": _op(
                "Create a Hyperdrive config; its origin is tested first (connect and run ';'), and nothing is "
                "stored when that fails",
                {"201": _json(_ref("HyperdriveConfigWithConnectionString"), "the config and its connection string"),
                 "400": _PROBE_ERR, "404": _ERR, "409": _ERR, "503": _ERR},
                body={
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": _NAME, **_HD_SETTINGS},
                },
            ),
            "get": _op(
                "List Hyperdrive configs (never a password, secret or connection string)",
                {"200": _json({"type": "array", "items": _ref("HyperdriveConfig")}, "all configs")},
            ),
        },
        "/v1/hyperdrive/configs/{id_or_name}": {
            "get": _op(
                "A Hyperdrive config",
                {"200": _json(_ref("HyperdriveConfigWithConnectionString"), "the config"), "400": _ERR,
                 "404": _ERR},
                params=[_HD_PARAM, {
                    "name": "connection_string",
                    "in": "query",
                    "required": False,
                    "description": "1: include the connection string (it holds the client password)",
                    "schema": {"enum": ["1", "0", "true", "false"]},
                }],
            ),
            "patch": _op(
                "Change the given settings; the merged config's origin is tested first and nothing changes when "
                "that fails. Neither purges the cache nor tears down the pool: new connections use the new "
                "settings. The client credentials never change",
                {"200": _json(_ref("HyperdriveConfig"), "the updated config"), "400": _PROBE_ERR, "404": _ERR,
                 "409": _ERR, "503": _ERR},
                params=[_HD_PARAM],
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"name": _NAME, **_HD_SETTINGS},
                },
            ),
            "delete": _op(
                "Delete a Hyperdrive config",
                {"200": _json(_ref("HyperdriveConfig"), "the deleted config"), "404": _ERR},
                params=[_HD_PARAM],
            ),
        },
        "/v1/hyperdrive/configs/{id_or_name}/metrics": {
            "get": _op(
                "A config's query metrics over a recent window (minute resolution, kept for 24h): queries by "
                "cache status and event status, query and result bytes, query and connection latency "
                "percentiles",
                {"200": _json(_ref("HyperdriveMetrics"), "the metrics"), "400": _ERR, "404": _ERR,
                 "503": _ERR},
                params=[_HD_PARAM, {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "description": "how far back: a duration such as 15m, 1h or 24h (more than the retention "
                    "is cut to it)",
                    "schema": {"type": "string", "default": "1h"},
                }],
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4) of every Hyperdrive config: "
                "hd_hyperdrive_queries_total{config_id,config_name,cache_status,event_status}, "
                "hd_hyperdrive_query_bytes_total, hd_hyperdrive_result_bytes_total, "
                "hd_hyperdrive_query_latency_seconds, hd_hyperdrive_connection_latency_seconds (histograms), "
                "hd_hyperdrive_connection_errors_total, hd_hyperdrive_cache_refreshes_total{outcome}, and "
                "pool and cache gauges. No admin token: it holds no secret",
                "security": [],
                "responses": {
                    "200": {"description": "the metrics", "content": {
                        "text/plain; version=0.0.4": {"schema": {"type": "string"}}}},
                    "503": {"description": "the database proxy is not running in this edge", "content": {
                        "text/plain": {"schema": {"type": "string"}}}},
                },
            }
        },
        "/v1/certificates": {
            "post": _op(
                "Upload a certificate for origin TLS: a certificate-authority (cert_pem only) or an "
                "mtls-certificate (cert_pem and its key_pem; the key is encrypted at rest and never returned)",
                {"201": _json(_ref("Certificate"), "the certificate"), "400": _ERR, "409": _ERR},
                body={
                    "type": "object",
                    "required": ["name", "kind", "cert_pem"],
                    "additionalProperties": False,
                    "properties": {
                        "name": _NAME,
                        "kind": {"enum": ["certificate-authority", "mtls-certificate"]},
                        "cert_pem": {"type": "string", "description": "PEM certificate(s)"},
                        "key_pem": {"type": ["string", "null"], "description": "PEM private key (mTLS only)"},
                    },
                },
            ),
            "get": _op(
                "List certificates (never a private key)",
                {"200": _json({"type": "array", "items": _ref("Certificate")}, "all certificates")},
            ),
        },
        "/v1/certificates/{id_or_name}": {
            "delete": _op(
                "Delete a certificate (refused with 409 while a Hyperdrive config uses it)",
                {"200": _json(_ref("Certificate"), "the deleted certificate"), "404": _ERR, "409": _ERR},
                params=[_CERT_PARAM],
            )
        },
        "/cdn-cgi/access/certs": {
            "get": _op(
                "JWKS of the Access signing keys (current first, then the previous one); public keys only",
                {"200": _json(_ref("Jwks"), "the key set")},
                public=True,
            )
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
                    "issuer": {"type": "string", "description": "iss of Access assertions (https://host:port)"},
                    "pg_listen": {"type": "string", "description": "host:port of the Postgres proxy"},
                    "mysql_listen": {"type": "string", "description": "host:port of the MySQL proxy"},
                    "ca_path": {"type": ["string", "null"],
                                "description": "CA file (on the edge's host) that verifies the listeners;"
                                               " null: the clients' own trust store"},
                    "client_tls": {"type": "object", "description": "per listener (postgres, mysql): require"
                                                                    " (plaintext clients refused) or allow",
                                   "additionalProperties": {"enum": ["require", "allow"]}},
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
                    "service": {"type": "string", "description": "empty: the connector's local --config decides"},
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
            "ServiceTokenCreated": {
                "type": "object",
                "required": ["id", "name", "client_id", "client_secret", "expires_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "client_id": {"type": "string", "pattern": "^[0-9a-f]{32}\\.access$"},
                    "client_secret": {"type": "string", "description": "shown only here"},
                    "expires_at": _TIME_OR_NULL,
                },
            },
            "ServiceTokenRotated": {
                "type": "object",
                "required": ["id", "name", "client_id", "client_secret", "previous_secret_expires_at"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "client_id": {"type": "string"},
                    "client_secret": {"type": "string", "description": "the new secret, shown only here"},
                    "previous_secret_expires_at": {"type": "string", "format": "date-time"},
                },
            },
            "ServiceToken": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "client_id": {"type": "string"},
                    "status": {"enum": ["active", "expired", "revoked"]},
                    "created_at": {"type": "string", "format": "date-time"},
                    "expires_at": _TIME_OR_NULL,
                    "revoked_at": _TIME_OR_NULL,
                    "rotated": {"type": "boolean"},
                    "previous_secret_expires_at": _TIME_OR_NULL,
                    "previous_secret_active": {"type": "boolean"},
                },
            },
            "AccessApp": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "aud": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                            "description": "AUD tag: the aud claim of the application's assertions; never changes"},
                    "domains": {"type": "array", "items": {"type": "string"}},
                    "service_tokens": {"type": "array", "items": {"type": "string"}},
                    "service_token_ids": {"type": "array", "items": {"type": "string"}},
                    "any_service_token": {"type": "boolean"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "deleted": {"type": "boolean"},
                },
            },
            "AccessLogEntry": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "time": {"type": "string", "format": "date-time"},
                    "decision": {"enum": ["allow", "deny"]},
                    "status": {"type": "integer"},
                    "client_id": {"type": ["string", "null"]},
                    "token_id": {"type": ["string", "null"]},
                    "token_name": {"type": ["string", "null"]},
                    "app": {"type": ["string", "null"]},
                    "hostname": {"type": "string"},
                    "reason": {"type": "string"},
                    "source": {"type": "string"},
                },
            },
            "Jwks": {
                "type": "object",
                "properties": {
                    "keys": {"type": "array", "items": {"type": "object"}},
                    "public_cert": {"type": ["object", "null"]},
                    "public_certs": {"type": "array", "items": {"type": "object"}},
                },
            },
            "OriginError": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string"},
                    "code": {"type": "integer", "minimum": 2008, "maximum": 2016,
                             "description": "present when the origin test failed: 2008 bad hostname, 2009 not a "
                             "public IP, 2010 cannot connect, 2011 connection refused, 2012 TLS not supported, "
                             "2013 invalid credentials, 2014 database does not exist, 2015 other, 2016 test query "
                             "failed"},
                    "hint": {"type": ["string", "null"]},
                },
            },
            "HyperdriveConfig": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    "name": {"type": "string"},
                    "origin": {
                        "type": "object",
                        "properties": {
                            "scheme": {"enum": ["postgresql", "mysql"]},
                            "host": {"type": "string"},
                            "port": {"type": ["integer", "null"], "description": "null through a tunnel"},
                            "database": {"type": "string"},
                            "user": {"type": "string"},
                            "access_client_id": {"type": ["string", "null"]},
                        },
                    },
                    "caching": {
                        "type": "object",
                        "properties": {
                            "disabled": {"type": "boolean"},
                            "max_age": {"type": "integer"},
                            "stale_while_revalidate": {"type": "integer"},
                        },
                    },
                    "sslmode": {"type": "string"},
                    "ca_certificate_id": {"type": ["string", "null"]},
                    "mtls_certificate_id": {"type": ["string", "null"]},
                    "origin_connection_limit": {"type": "integer"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "deleted": {"type": "boolean"},
                },
            },
            "HyperdriveConfigWithConnectionString": {
                "allOf": [_ref("HyperdriveConfig"), {"type": "object", "properties": {"connection_string": {
                    "type": "string",
                    "description": "postgresql://CLIENT_USER:CLIENT_PASSWORD@PROXY/DATABASE?sslmode=require; "
                    "only on create and with ?connection_string=1",
                }}}]
            },
            "LatencyMs": {
                "type": "object",
                "required": ["count", "p50", "p90", "p99", "max"],
                "description": "milliseconds; null when count is 0. Percentiles are interpolated in "
                "log-scale buckets (within a few percent) and clamped to the observed min and max",
                "properties": {
                    "count": {"type": "integer"},
                    "errors": {"type": "integer", "description": "connections only: failed attempts (not in "
                               "count or the percentiles)"},
                    "p50": {"type": ["number", "null"]},
                    "p90": {"type": ["number", "null"]},
                    "p99": {"type": ["number", "null"]},
                    "max": {"type": ["number", "null"]},
                },
            },
            "HyperdriveMetrics": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "config_id": {"type": "string"},
                    "since": {"type": "string", "format": "date-time"},
                    "until": {"type": "string", "format": "date-time"},
                    "window_seconds": {"type": "number", "description": "the window summarised: since, cut to "
                                       "retained_seconds"},
                    "retained_seconds": {"type": "number", "description": "how long per-minute metrics are kept"},
                    "queries": {
                        "type": "object",
                        "properties": {
                            "total": {"type": "integer"},
                            "by_cache_status": {"type": "object", "additionalProperties": {"type": "integer"},
                                                "description": "every status: " + ", ".join(CACHE_STATUSES)},
                            "by_event_status": {
                                "type": "object",
                                "properties": {"complete": {"type": "integer"}, "error": {"type": "integer"}},
                            },
                            "by_status": {
                                "type": "array",
                                "description": "non-zero combinations only",
                                "items": {"type": "object", "properties": {
                                    "cache_status": {"enum": list(CACHE_STATUSES)},
                                    "event_status": {"enum": ["complete", "error"]},
                                    "count": {"type": "integer"},
                                }},
                            },
                        },
                    },
                    "cache_hit_ratio": {"type": ["number", "null"], "description": "hit / (hit + miss)"},
                    "query_bytes": {"type": "integer"},
                    "result_bytes": {"type": "integer"},
                    "query_latency_ms": _ref("LatencyMs"),
                    "connection_latency_ms": _ref("LatencyMs"),
                    "refreshes": {
                        "type": "object",
                        "description": "background stale-while-revalidate refreshes (not queries)",
                        "properties": {"complete": {"type": "integer"}, "error": {"type": "integer"}},
                    },
                },
            },
            "Certificate": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "name": {"type": "string"},
                    "kind": {"enum": ["certificate-authority", "mtls-certificate"]},
                    "subject": {"type": "string"},
                    "issuer": {"type": "string"},
                    "expires_on": {"type": "string", "format": "date-time"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "deleted": {"type": "boolean"},
                },
            },
            "Deleted": {
                "allOf": [_ref("Tunnel"), {"type": "object", "properties": {"deleted": {"type": "boolean"}}}]
            },
        },
    },
}
