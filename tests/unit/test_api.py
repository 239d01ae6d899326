"""The control API over a real aiohttp server on 127.0.0.1, with a fake relay."""

from __future__ import annotations

import base64
import logging
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer

from control.api import make_app
from control.openapi import OPENAPI
from control.secretbox import SecretBox
from control.store import Store
from tunnel.token import TunnelToken

ADMIN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
EDGE_INFO = {
    "api_url": "http://127.0.0.1:8787",
    "tunnel_url": "wss://127.0.0.1:7844",
    "tunnel_address": "127.0.0.1:7844",
    "cert_pin": "sha256:" + "cd" * 32,
}


class FakeRelay:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.conns: dict[str, list[dict]] = {}

    def config_changed(self, tunnel_id: str) -> None:
        self.events.append(("config_changed", tunnel_id))

    def tunnel_deleted(self, tunnel_id: str) -> None:
        self.events.append(("tunnel_deleted", tunnel_id))

    def connections_info(self, tunnel_id: str) -> list[dict]:
        return self.conns.get(tunnel_id, [])

    def stats(self) -> dict:
        return {"connectors": 0, "streams_total": 7}


@pytest.fixture
async def env(tmp_path):
    store = Store(tmp_path / "state.db", SecretBox(os.urandom(32)))
    relay = FakeRelay()
    app = make_app(store, relay, admin_token=ADMIN, edge_info=dict(EDGE_INFO))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, store, relay
    finally:
        await client.close()
        store.close()


async def call(client, method: str, path: str, json=None, headers=AUTH, **kw):
    resp = await client.request(method, path, json=json, headers=headers, **kw)
    return resp.status, await resp.json()


def app_routes(client) -> list[tuple[str, str]]:
    out = []
    for resource in client.server.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        for route in resource:
            out.append((route.method, path))
    return out


def concrete(path: str) -> str:
    return path.replace("{id_or_name}", "x").replace("{hostname}", "h.example")


# --- auth -----------------------------------------------------------------------------------

async def test_every_route_needs_the_admin_token_except_openapi_and_healthz(env) -> None:
    client, _, _ = env
    for method, path in app_routes(client):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"}):
            status, body = await call(client, method, concrete(path), headers=headers)
            if path in ("/openapi.json", "/healthz"):
                assert status == 200, path
            else:
                assert status == 401, (method, path, headers)
                assert "admin token" in body["error"]


async def test_public_endpoints(env) -> None:
    client, _, _ = env
    assert await call(client, "GET", "/healthz", headers={}) == (200, {"status": "ok"})
    status, doc = await call(client, "GET", "/openapi.json", headers={})
    assert status == 200 and doc["openapi"].startswith("3.1")


def test_openapi_covers_every_route() -> None:
    app = make_app(Store(":memory:", SecretBox(os.urandom(32))), FakeRelay(), admin_token="x", edge_info={})
    seen = 0
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        for route in resource:
            assert path in OPENAPI["paths"], f"{path} missing from openapi"
            assert route.method.lower() in OPENAPI["paths"][path], f"{route.method} {path} missing from openapi"
            seen += 1
    documented = sum(len(ops) for ops in OPENAPI["paths"].values())
    assert seen == documented >= 12


# --- tunnels --------------------------------------------------------------------------------

async def test_create_tunnel_returns_a_token_that_decodes_to_the_stored_secret(env) -> None:
    client, store, _ = env
    status, body = await call(client, "POST", "/v1/tunnels", {"name": "vpc-01"})
    assert status == 201
    assert body["name"] == "vpc-01" and body["config_version"] == 1
    token = TunnelToken.decode(body["token"])
    stored = store.get_tunnel("vpc-01")
    assert token.tunnel_id == stored.id == body["id"]
    assert token.secret == stored.secret
    assert token.edge == ["127.0.0.1:7844"] and token.pin == EDGE_INFO["cert_pin"]
    status, again = await call(client, "GET", "/v1/tunnels/vpc-01/token")
    assert status == 200 and again == {"id": stored.id, "name": "vpc-01", "token": body["token"]}
    status, by_id = await call(client, "GET", f"/v1/tunnels/{stored.id}/token")
    assert by_id["token"] == body["token"]


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"name": "vpc-01"}, 409, "already exists"),
        ({"name": "bad name"}, 400, "invalid tunnel name"),
        ({}, 400, "missing field: name"),
        ({"name": "x", "colour": "red"}, 400, "unknown field(s): colour"),
        (["name"], 400, "JSON object"),
    ],
)
async def test_create_tunnel_errors(env, payload, status, message) -> None:
    client, _, _ = env
    await call(client, "POST", "/v1/tunnels", {"name": "vpc-01"})
    got, body = await call(client, "POST", "/v1/tunnels", payload)
    assert got == status and message in body["error"]


async def test_body_that_is_not_json(env) -> None:
    client, _, _ = env
    resp = await client.post("/v1/tunnels", data=b"{nope", headers=AUTH)
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]


async def test_list_get_delete_tunnel(env) -> None:
    client, store, relay = env
    _, t = await call(client, "POST", "/v1/tunnels", {"name": "a"})
    await call(client, "POST", "/v1/tunnels", {"name": "b"})
    await call(client, "POST", "/v1/tunnels/a/routes", {"hostname": "db.a.example", "service": "tcp://127.0.0.1:5432"})
    relay.conns[t["id"]] = [
        {"connector_id": "c1", "conn_index": 0, "connection_id": "k", "protocol": "websocket",
         "version": "0.1.0", "since": 1700000000.0, "streams": 2},
    ]
    status, listing = await call(client, "GET", "/v1/tunnels")
    assert status == 200
    assert [(x["name"], x["routes"], x["connections"]) for x in listing] == [("a", ["db.a.example"], 1), ("b", [], 0)]
    assert all("token" not in x and "secret" not in x for x in listing)

    status, info = await call(client, "GET", f"/v1/tunnels/{t['id']}")
    assert status == 200 and info["name"] == "a" and info["config_version"] == 2
    assert [r["hostname"] for r in info["routes"]] == ["db.a.example"]
    assert info["connections"] == relay.conns[t["id"]]

    relay.events.clear()
    status, gone = await call(client, "DELETE", "/v1/tunnels/a")
    assert status == 200 and gone["deleted"] is True and gone["id"] == t["id"]
    assert relay.events == [("tunnel_deleted", t["id"])]
    assert store.get_route("db.a.example") is None
    status, body = await call(client, "GET", "/v1/tunnels/a")
    assert status == 404 and "no tunnel" in body["error"]
    status, body = await call(client, "DELETE", "/v1/tunnels/a")
    assert status == 404


# --- routes ---------------------------------------------------------------------------------

async def test_routes_crud_and_relay_notifications(env) -> None:
    client, store, relay = env
    _, a = await call(client, "POST", "/v1/tunnels", {"name": "a"})
    _, b = await call(client, "POST", "/v1/tunnels", {"name": "b"})

    status, r = await call(client, "POST", "/v1/tunnels/a/routes",
                           {"hostname": "DB.example", "service": "tcp://127.0.0.1:5432", "connect_timeout": "30s"})
    assert status == 201
    assert (r["hostname"], r["tunnel_id"], r["public"], r["connect_timeout"], r["replaced"]) == (
        "db.example", a["id"], False, 30.0, False)
    assert r["config_version"] == 2 and r["tunnel_name"] == "a"
    assert relay.events == [("config_changed", a["id"])]

    relay.events.clear()
    status, r = await call(client, "POST", f"/v1/tunnels/{b['id']}/routes",
                           {"hostname": "db.example", "service": "ssh://127.0.0.1", "public": True,
                            "connect_timeout": 2.5})
    assert status == 201 and r["replaced"] is True and r["service"] == "ssh://127.0.0.1:22"
    assert sorted(relay.events) == sorted([("config_changed", b["id"]), ("config_changed", a["id"])])
    assert store.get_tunnel("a").config_version == 3

    await call(client, "POST", "/v1/tunnels/a/routes", {"hostname": "*.w.example", "service": "http_status:418"})
    status, routes = await call(client, "GET", "/v1/routes")
    assert status == 200
    assert [(x["hostname"], x["tunnel_name"]) for x in routes] == [("db.example", "b"), ("*.w.example", "a")]

    relay.events.clear()
    status, gone = await call(client, "DELETE", "/v1/routes/%2A.w.example")
    assert status == 200 and gone["hostname"] == "*.w.example" and gone["deleted"] is True
    assert relay.events == [("config_changed", a["id"])]
    status, body = await call(client, "DELETE", "/v1/routes/%2A.w.example")
    assert status == 404 and "no route" in body["error"]


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"service": "tcp://h:1"}, 400, "missing field: hostname"),
        ({"hostname": "a.example"}, 400, "missing field: service"),
        ({"hostname": "a.example:22", "service": "tcp://h:1"}, 400, "no port"),
        ({"hostname": "a.example", "service": "udp://h:1"}, 400, "unsupported service scheme"),
        ({"hostname": "a.example", "service": "tcp://h:1", "public": "yes"}, 400, "public"),
        ({"hostname": "a.example", "service": "tcp://h:1", "connect_timeout": "soon"}, 400, "connect_timeout"),
        ({"hostname": "a.example", "service": "tcp://h:1", "connect_timeout": -1}, 400, "connect_timeout"),
        ({"hostname": "a.example", "service": "tcp://h:1", "extra": 1}, 400, "unknown field"),
    ],
)
async def test_route_validation_errors(env, payload, status, message) -> None:
    client, _, relay = env
    await call(client, "POST", "/v1/tunnels", {"name": "a"})
    relay.events.clear()
    got, body = await call(client, "POST", "/v1/tunnels/a/routes", payload)
    assert got == status and message in body["error"], body
    assert relay.events == []


async def test_route_on_unknown_tunnel_is_404(env) -> None:
    client, _, _ = env
    status, body = await call(client, "POST", "/v1/tunnels/ghost/routes", {"hostname": "a.example", "service": "tcp://h:1"})
    assert status == 404 and "ghost" in body["error"]


# --- misc -----------------------------------------------------------------------------------

async def test_edge_stats_unknown_endpoint_and_wrong_method(env) -> None:
    client, _, _ = env
    assert await call(client, "GET", "/v1/edge") == (200, EDGE_INFO)
    assert await call(client, "GET", "/v1/stats") == (200, {"connectors": 0, "streams_total": 7})
    status, body = await call(client, "GET", "/v1/nothing")
    assert status == 404 and "no such endpoint" in body["error"]
    status, body = await call(client, "PUT", "/v1/tunnels")
    assert status == 405 and "not allowed" in body["error"]


async def test_relay_failures_do_not_fail_the_change(env, caplog) -> None:
    client, store, relay = env

    def boom(tunnel_id: str) -> None:
        raise RuntimeError("relay down")

    relay.config_changed = boom  # type: ignore[method-assign]
    await call(client, "POST", "/v1/tunnels", {"name": "a"})
    status, _ = await call(client, "POST", "/v1/tunnels/a/routes", {"hostname": "a.example", "service": "tcp://h:1"})
    assert status == 201 and store.get_route("a.example") is not None


async def test_secrets_and_tokens_never_reach_the_log(env, caplog) -> None:
    client, store, _ = env
    caplog.set_level(logging.DEBUG)
    _, t = await call(client, "POST", "/v1/tunnels", {"name": "a"})
    await call(client, "GET", "/v1/tunnels/a/token")
    await call(client, "POST", "/v1/tunnels/a/routes", {"hostname": "a.example", "service": "tcp://h:1"})
    await call(client, "GET", "/v1/tunnels", headers={"Authorization": "Bearer wrong"})
    secret_b64 = base64.b64encode(store.get_tunnel("a").secret).decode()
    text = caplog.text
    assert "tunnel created" in text  # the log is on…
    for needle in (t["token"], secret_b64, ADMIN):
        assert needle not in text  # …and holds no secret
