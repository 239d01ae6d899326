"""The `hd` CLI against a real edge (control API + state dir), with a fake relay in a thread.

`run_edge` is the real one; only the data plane is replaced, so these tests stand alone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from cli.apiclient import CliError
from cli.edgeconf import EdgeEndpoint, resolve_edge
from cli.main import run
from control.edge import EdgeError, run_edge
from control.secretbox import SecretBox
from control.store import Store
from proxy.cache.metrics import MetricsRegistry
from tunnel.token import TunnelToken

HD = Path(sys.executable).with_name("hd")


class FakeRelay:
    """Stands in for relay.server.Relay: listens (TLS) so the port is real, nothing more."""

    def __init__(self, store: Store, ssl_context, *, hash_key: bytes, quic_cert=None) -> None:
        self.store, self.ssl_context, self.hash_key = store, ssl_context, hash_key
        self.issuer: str | None = None  # set by run_edge before it serves
        self.issuer_at_api_start: str | None = None
        self.events: list[tuple[str, str]] = []
        self.conns: dict[str, list[dict]] = {}
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(lambda r, w: w.close(), host, port, ssl=self.ssl_context)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def config_changed(self, tunnel_id: str) -> None:
        self.events.append(("config_changed", tunnel_id))

    def tunnel_deleted(self, tunnel_id: str) -> None:
        self.events.append(("tunnel_deleted", tunnel_id))

    def connections_info(self, tunnel_id: str) -> list[dict]:
        return self.conns.get(tunnel_id, [])

    def stats(self) -> dict:
        return {}

    def access_changed(self) -> None:
        self.events.append(("access_changed", ""))

    def keys_rotated(self) -> None:
        self.events.append(("keys_rotated", ""))

    def flush_access_logs(self) -> None:
        self.events.append(("flush_access_logs", ""))


class FakeProxy:
    """Stands in for proxy.service: its origin test succeeds, or raises `fail_with`."""

    def __init__(self, store: Store, relay: FakeRelay) -> None:
        self.store, self.relay = store, relay
        self.probes: list = []
        self.events: list[tuple[str, str]] = []
        self.fail_with: Exception | None = None
        self.metrics = MetricsRegistry()

    async def probe(self, spec) -> dict:
        self.probes.append(spec)
        if self.fail_with is not None:
            raise self.fail_with
        return {}

    def config_changed(self, config_id: str) -> None:
        self.events.append(("config_changed", config_id))

    def config_deleted(self, config_id: str) -> None:
        self.events.append(("config_deleted", config_id))

    def metrics_summary(self, config_id: str, since_s: float | None) -> dict:
        return self.metrics.for_config(config_id).summary(since_s)

    def prometheus_text(self) -> str:
        return self.metrics.render_prometheus({c.id: c.name for c in self.store.list_hyperdrives()})


class EdgeThread:
    """`run_edge` on its own loop in a thread, stopped through its stop_event."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.ready = threading.Event()
        self.info: dict | None = None
        self.error: BaseException | None = None
        self.relay: FakeRelay | None = None
        self.proxy: FakeProxy | None = None
        self.stop = asyncio.Event()

    def _factory(self, store, ctx, **kw) -> FakeRelay:
        self.relay = FakeRelay(store, ctx, **kw)
        return self.relay

    def _proxy_factory(self, store, relay) -> FakeProxy:
        self.proxy = FakeProxy(store, relay)
        return self.proxy

    def _ready(self, info: dict) -> None:
        self.info = info
        self.ready.set()

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(
                run_edge(self.state_dir, "127.0.0.1:0", "127.0.0.1:0", self._ready,
                         relay_factory=self._factory, proxy_factory=self._proxy_factory, stop_event=self.stop)
            )
        except BaseException as e:  # surfaced by start()
            self.error = e
        finally:
            self.ready.set()
            self.loop.close()

    def start(self) -> "EdgeThread":
        self.thread = threading.Thread(target=self._run, name="edge", daemon=True)
        self.thread.start()
        assert self.ready.wait(15), "edge did not start"
        if self.error:
            raise self.error
        return self

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    e = EdgeThread(tmp_path_factory.mktemp("hd") / "state").start()
    yield e
    e.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("HD_API_URL", "HD_API_TOKEN", "HD_STATE_DIR", "HD_EDGE_URL", "HD_EDGE_PIN",
                "HD_SERVICE_TOKEN_ID", "HD_SERVICE_TOKEN_SECRET", "HD_ORIGIN_PASSWORD", "HD_ACCESS_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # never touch the real ~/.hd


def hd(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def hd_in(capsys, edge: EdgeThread, *args: str) -> tuple[int, str, str]:
    return hd(capsys, *args, "--state-dir", str(edge.state_dir))


def one_json(out: str):
    doc = json.loads(out)  # the whole of stdout is one document
    assert isinstance(doc, (dict, list))
    return doc


def one_line_error(rc: int, out: str, err: str, needle: str) -> None:
    assert rc != 0
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("hd: error: ") and needle in err, err
    assert "Traceback" not in err


def test_cli_durations() -> None:
    from control.durations import format_duration, parse_duration

    cases = {"10s": 10, "1m": 60, "24h": 86400, "8760h": 8760 * 3600, "1h30m": 5400, "500ms": 0.5, "2.5": 2.5,
             "1d": 86400}
    for text, seconds in cases.items():
        assert parse_duration(text) == seconds, text
    for bad in ("", "s", "10x", "1h30", "ten seconds", "-1s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    assert [format_duration(x) for x in (10, 0.5, 90, 3600, 86400 * 365)] == ["10s", "0.5s", "1m30s", "1h", "8760h"]


# --- the edge's state directory ---------------------------------------------------------------

def test_edge_writes_its_state_privately(edge) -> None:
    d = edge.state_dir
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in ("edge.json", "admin-token", "secret.key", "edge-key.pem"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert (d / "state.db").exists() and (d / "edge-cert.pem").exists()
    info = json.loads((d / "edge.json").read_text())
    assert info == edge.info
    assert info["api_url"].startswith("http://127.0.0.1:") and not info["api_url"].endswith(":0")
    assert info["tunnel_url"] == f"wss://127.0.0.1:{edge.relay.port}"
    assert info["tunnel_address"] == f"127.0.0.1:{edge.relay.port}"
    assert info["cert_pin"].startswith("sha256:") and info["pid"] == os.getpid()
    assert info["issuer"] == f"https://127.0.0.1:{edge.relay.port}" == edge.relay.issuer
    box = SecretBox.load_or_create(d / "secret.key")
    assert edge.relay.hash_key == box.derive_key(b"service-token-hash")  # the API's key, too
    store = Store(d / "state.db", box)
    try:
        assert len(store.signing_keys()) >= 1  # made on first start
    finally:
        store.close()


async def test_run_edge_advertise_and_restart_keeps_identity(tmp_path) -> None:
    infos = []
    for _ in range(2):
        stop, ready = asyncio.Event(), asyncio.Event()

        def on_ready(info, ready=ready):
            infos.append(info)
            ready.set()

        task = asyncio.create_task(run_edge(
            tmp_path, "127.0.0.1:0", "127.0.0.1:0", on_ready, advertise="edge.example:443",
            relay_factory=FakeRelay, stop_event=stop))
        await asyncio.wait_for(ready.wait(), 60)
        stop.set()
        await asyncio.wait_for(task, 60)
    assert infos[0]["tunnel_address"] == "edge.example:443" and infos[0]["tunnel_url"] == "wss://edge.example:443"
    assert infos[0]["cert_pin"] == infos[1]["cert_pin"]  # the certificate is made once
    assert infos[0]["issuer"] == "https://edge.example:443"
    store = Store(tmp_path / "state.db", SecretBox.load_or_create(tmp_path / "secret.key"))
    try:
        assert len(store.signing_keys()) == 1  # made on first start, kept on restart
    finally:
        store.close()


async def test_run_edge_rotates_the_signing_key_when_it_is_old(tmp_path) -> None:
    relays: list[FakeRelay] = []

    def factory(store, ctx, **kw):
        relays.append(FakeRelay(store, ctx, **kw))
        return relays[-1]

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_edge(
        tmp_path, "127.0.0.1:0", "127.0.0.1:0", lambda info: ready.set(), relay_factory=factory,
        stop_event=stop, key_rotation=0.3, key_check_interval=0.1))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        store = relays[0].store
        first = store.signing_keys()[0]
        deadline = asyncio.get_running_loop().time() + 60  # hang guard
        while ("keys_rotated", "") not in relays[0].events:
            assert asyncio.get_running_loop().time() < deadline, "the key was never rotated"
            await asyncio.sleep(0.05)
        keys = store.signing_keys()
        assert len(keys) == 2 and keys[1] == first and keys[0][1] > first[1]  # the previous key is kept
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    with pytest.raises(EdgeError, match="--key-rotation"):
        await run_edge(tmp_path, "127.0.0.1:0", "127.0.0.1:0", relay_factory=factory, key_rotation=0)


async def test_run_edge_port_in_use_is_a_clear_error(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EdgeError, match=f"cannot listen for the control API on 127.0.0.1:{port}"):
            await asyncio.wait_for(run_edge(tmp_path, f"127.0.0.1:{port}", "127.0.0.1:0",
                                            relay_factory=FakeRelay), 60)
    assert not (tmp_path / "edge.json").exists()
    with pytest.raises(EdgeError, match="--tunnel-listen"):
        await run_edge(tmp_path, "127.0.0.1:0", "nope:port", relay_factory=FakeRelay)


# --- tunnel commands --------------------------------------------------------------------------

def test_tunnel_create_json_is_exactly_id_name_token(edge, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "tunnel", "create", "vpc-01", "--json")
    assert rc == 0 and err == ""
    doc = one_json(out)
    assert set(doc) == {"id", "name", "token"} and doc["name"] == "vpc-01"
    token = TunnelToken.decode(doc["token"])
    assert token.tunnel_id == doc["id"]
    assert token.pin == edge.info["cert_pin"] and token.edge == [edge.info["tunnel_address"]]
    store = Store(edge.state_dir / "state.db", SecretBox.load_or_create(edge.state_dir / "secret.key"))
    try:
        assert store.get_tunnel("vpc-01").secret == token.secret
    finally:
        store.close()
    rc, out, _ = hd_in(capsys, edge, "tunnel", "token", "vpc-01")
    assert rc == 0 and out == doc["token"] + "\n"
    rc, out, _ = hd_in(capsys, edge, "tunnel", "token", doc["id"], "--json")
    assert one_json(out) == doc


def test_tunnel_create_for_people_says_what_next(edge, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "tunnel", "create", "people")
    assert rc == 0 and err == ""
    assert "Created tunnel people" in out
    assert "Next: hd tunnel route people HOSTNAME --service tcp://HOST:PORT, then run: hd-connector --token " in out


def test_route_without_service_is_shown_as_the_connectors_local_config(edge, capsys) -> None:
    hd_in(capsys, edge, "tunnel", "create", "loc")
    rc, out, err = hd_in(capsys, edge, "tunnel", "route", "loc", "db.loc.example")
    assert rc == 0 and err == ""
    assert "Routed db.loc.example -> (connector's local config) through tunnel loc" in out
    rc, out, _ = hd_in(capsys, edge, "tunnel", "route", "loc", "*.ssh.loc.example", "--public", "--json")
    assert one_json(out)["service"] == ""

    rc, out, _ = hd_in(capsys, edge, "tunnel", "info", "loc")
    lines = out.splitlines()
    assert any(line.split()[:4] == ["db.loc.example", "(connector's", "local", "config)"] for line in lines)
    assert "Note:" not in out
    rc, out, _ = hd_in(capsys, edge, "tunnel", "info", "loc", "--json")
    assert [r["service"] for r in one_json(out)["routes"]] == ["", ""]

    # one route naming a service: the pushed config replaces the connectors' files
    hd_in(capsys, edge, "tunnel", "route", "loc", "pg.loc.example", "--service", "tcp://127.0.0.1:5432")
    rc, out, _ = hd_in(capsys, edge, "tunnel", "info", "loc")
    assert "replaces the connectors' local --config: db.loc.example, *.ssh.loc.example fall to the catch-all" in out


def test_route_info_list_delete(edge, capsys) -> None:
    _, out, _ = hd_in(capsys, edge, "tunnel", "create", "rt", "--json")
    tid = one_json(out)["id"]
    rc, out, err = hd_in(capsys, edge, "tunnel", "route", "rt", "db.rt.example", "--service",
                         "tcp://127.0.0.1:5432", "--connect-timeout", "1m", "--json")
    assert rc == 0 and err == ""
    r = one_json(out)
    assert (r["hostname"], r["service"], r["public"], r["connect_timeout"]) == (
        "db.rt.example", "tcp://127.0.0.1:5432", False, 60.0)
    assert ("config_changed", tid) in edge.relay.events

    rc, out, _ = hd_in(capsys, edge, "tunnel", "route", "rt", "ssh.rt.example", "--service", "ssh://127.0.0.1",
                       "--public")
    assert rc == 0 and "Routed ssh.rt.example -> ssh://127.0.0.1:22" in out and "public" in out
    assert "Next: hd access tcp --hostname ssh.rt.example" in out

    edge.relay.conns[tid] = [
        {"connector_id": "conn-b", "conn_index": 1, "connection_id": "x1", "protocol": "websocket",
         "version": "0.1.0", "since": time.time() - 90, "uptime": 90.2, "streams": 0, "hostname": "vm-b",
         "draining": True, "remote": "10.0.0.2:4000"},
        {"connector_id": "conn-a", "conn_index": 0, "connection_id": "x0", "protocol": "quic",
         "version": "0.1.0", "since": "2024-01-01T00:00:00Z", "uptime": 3725, "streams": 3, "hostname": "vm-a",
         "draining": False, "remote": "10.0.0.1:4000"},
    ]
    rc, out, _ = hd_in(capsys, edge, "tunnel", "info", "rt", "--json")
    info = one_json(out)
    assert [x["hostname"] for x in info["routes"]] == ["db.rt.example", "ssh.rt.example"]
    assert len(info["connections"]) == 2

    rc, out, err = hd_in(capsys, edge, "tunnel", "info", tid)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    # One line per replica, then one per connection.
    header = next(i for i, line in enumerate(lines) if line.startswith("CONNECTOR ID"))
    assert lines[header].split() == ["CONNECTOR", "ID", "HOST", "VERSION", "CONNECTIONS", "PROTOCOLS", "UPTIME"]
    assert lines[header + 1].split() == ["conn-a", "vm-a", "0.1.0", "1", "quic", "1h2m5s"]
    assert lines[header + 2].split() == ["conn-b", "vm-b", "0.1.0", "1", "websocket", "1m30s"]
    header = next(i for i, line in enumerate(lines) if i > header and line.startswith("CONNECTOR ID"))
    assert lines[header].split() == ["CONNECTOR", "ID", "CONN", "PROTOCOL", "STATE", "SINCE", "UPTIME", "STREAMS",
                                     "FROM"]
    assert lines[header + 1].startswith("conn-a") and "quic" in lines[header + 1] and "serving" in lines[header + 1]
    assert lines[header + 2].startswith("conn-b") and "(1m ago)" in lines[header + 2]
    assert "draining" in lines[header + 2] and "10.0.0.2:4000" in lines[header + 2]
    assert "2 connection(s) from 2 connector replica(s)" in out
    assert any(line.split()[:3] == ["db.rt.example", "tcp://127.0.0.1:5432", "no"] for line in lines)

    rc, out, _ = hd_in(capsys, edge, "tunnel", "list", "--json")
    listed = {t["name"]: t for t in one_json(out)}
    assert listed["rt"]["connections"] == 2
    rc, out, _ = hd(capsys, "--json", "--state-dir", str(edge.state_dir), "tunnel", "list")
    assert isinstance(one_json(out), list)  # --json before the subcommand works too
    rc, out, _ = hd_in(capsys, edge, "tunnel", "list")
    head = out.splitlines()[0]
    assert head.split() == ["ID", "NAME", "ROUTES", "CONNECTIONS", "CREATED"]
    assert head.index("NAME") == out.splitlines()[1].index(next(iter(listed)))  # columns line up

    rc, out, _ = hd_in(capsys, edge, "tunnel", "delete", "rt", "--json")
    assert one_json(out)["deleted"] is True and ("tunnel_deleted", tid) in edge.relay.events
    rc, out, err = hd_in(capsys, edge, "tunnel", "info", "rt")
    one_line_error(rc, out, err, "no tunnel named or with id 'rt'")


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["tunnel", "create", "dup"], "already exists", 1),
        (["tunnel", "create", "bad name"], "invalid tunnel name", 1),
        (["tunnel", "route", "ghost", "a.example", "--service", "tcp://h:1"], "no tunnel", 1),
        (["tunnel", "route", "dup", "a.example", "--service", "tcp://h"], "needs a port", 1),
        (["tunnel", "route", "dup", "a.example:1", "--service", "tcp://h:1"], "no port", 1),
        (["tunnel", "route", "dup", "a.example", "--service", "tcp://h:1", "--connect-timeout", "soon"],
         "invalid duration", 2),
        (["tunnel", "route", "dup", "a.example", "--service", ""], "leave it out", 1),
        (["tunnel", "create"], "Missing argument 'NAME'", 2),
        (["tunnel", "frobnicate"], "No such command", 2),
        (["tunnel", "delete", "ghost"], "no tunnel", 1),
    ],
)
def test_mistakes_are_one_line_with_nonzero_exit(edge, capsys, args, needle, code) -> None:
    hd_in(capsys, edge, "tunnel", "create", "dup")
    for extra in ([], ["--json"]):
        rc, out, err = hd_in(capsys, edge, *args, *extra)
        one_line_error(rc, out, err, needle)
        assert rc == code


def test_api_discovery_errors(edge, capsys, tmp_path, monkeypatch) -> None:
    rc, out, err = hd(capsys, "tunnel", "list", "--state-dir", str(tmp_path / "empty"))
    one_line_error(rc, out, err, "no edge found")
    rc, out, err = hd_in(capsys, edge, "tunnel", "list", "--api-token", "wrong")
    one_line_error(rc, out, err, "rejected the admin token")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc, out, err = hd(capsys, "tunnel", "list", "--api-url", dead, "--api-token", "x", "--json")
    one_line_error(rc, out, err, f"cannot reach the edge API at {dead}: connection refused — is `hd edge` running?")
    rc, out, err = hd(capsys, "tunnel", "list", "--api-url", dead, "--state-dir", str(tmp_path / "empty"))
    one_line_error(rc, out, err, "no admin token")


def test_env_vars_find_the_api(edge, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HD_API_URL", edge.info["api_url"])
    monkeypatch.setenv("HD_API_TOKEN", (edge.state_dir / "admin-token").read_text().strip())
    monkeypatch.setenv("HD_STATE_DIR", str(tmp_path / "nothing-here"))
    rc, out, err = hd(capsys, "tunnel", "list", "--json")
    assert rc == 0 and isinstance(one_json(out), list) and err == ""
    monkeypatch.delenv("HD_API_URL")
    monkeypatch.delenv("HD_API_TOKEN")
    monkeypatch.setenv("HD_STATE_DIR", str(edge.state_dir))
    rc, out, err = hd(capsys, "tunnel", "list", "--json")
    assert rc == 0 and isinstance(one_json(out), list)


def test_console_script_prints_one_json_document(edge) -> None:
    env = {**os.environ, "HD_STATE_DIR": str(edge.state_dir)}
    for var in ("HD_API_URL", "HD_API_TOKEN"):
        env.pop(var, None)
    p = subprocess.run([str(HD), "--json", "tunnel", "list"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert isinstance(json.loads(p.stdout), list)
    p = subprocess.run([str(HD), "tunnel", "info", "nope", "--json"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1


# --- hd access service-token / app / logs / keys -----------------------------------------------

def test_service_token_lifecycle(edge, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "access", "service-token", "create", "hyperdrive-vpc-01", "--json")
    assert rc == 0 and err == ""
    t = one_json(out)
    assert set(t) == {"id", "name", "client_id", "client_secret", "expires_at"}
    assert t["client_id"].endswith(".access") and t["expires_at"]
    assert ("access_changed", "") in edge.relay.events

    rc, out, err = hd_in(capsys, edge, "access", "service-token", "create", "forever", "--duration", "non-expiring")
    assert rc == 0 and err == ""
    assert "Client ID:" in out and "Client secret:" in out and "expires never" in out
    assert "it will not be shown again" in out
    assert "Next: hd access app create APP --domain HOSTNAME --service-token forever" in out
    secret = next(line.split()[-1] for line in out.splitlines() if "Client secret:" in line)
    assert len(secret) == 64

    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "create", "short", "--duration", "1h", "--json")
    assert rc == 0 and one_json(out)["expires_at"]

    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "list", "--json")
    listing = {x["name"]: x for x in one_json(out)}
    assert listing["forever"]["expires_at"] is None and listing["hyperdrive-vpc-01"]["status"] == "active"
    assert secret not in out and t["client_secret"] not in out
    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "list")
    assert out.splitlines()[0].split() == ["NAME", "CLIENT", "ID", "STATUS", "EXPIRES", "PREVIOUS", "SECRET",
                                           "CREATED"]
    assert secret not in out and t["client_secret"] not in out

    # rotate by client id, with a grace period
    rc, out, err = hd_in(capsys, edge, "access", "service-token", "rotate", t["client_id"], "--grace", "2h", "--json")
    assert rc == 0 and err == ""
    r = one_json(out)
    assert set(r) == {"id", "name", "client_id", "client_secret", "previous_secret_expires_at"}
    assert r["client_secret"] != t["client_secret"] and r["id"] == t["id"]
    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "rotate", "hyperdrive-vpc-01")
    assert rc == 0 and "New client secret:" in out and "keeps working until" in out
    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "rotate", "hyperdrive-vpc-01", "--grace", "0s")
    assert rc == 0 and "no longer works" in out

    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "revoke", t["id"])
    assert rc == 0 and "Revoked service token hyperdrive-vpc-01" in out
    rc, out, _ = hd_in(capsys, edge, "access", "service-token", "revoke", "short", "--json")
    assert one_json(out)["status"] == "revoked"
    rc, out, err = hd_in(capsys, edge, "access", "service-token", "rotate", "short")
    one_line_error(rc, out, err, "revoked")


def test_access_app_lifecycle_logs_and_keys(edge, capsys) -> None:
    _, out, _ = hd_in(capsys, edge, "tunnel", "create", "app-tun", "--json")
    tid = one_json(out)["id"]
    hd_in(capsys, edge, "tunnel", "route", "app-tun", "db.app.example", "--service", "tcp://127.0.0.1:5432")
    hd_in(capsys, edge, "access", "service-token", "create", "app-tok")
    edge.relay.events.clear()
    rc, out, err = hd_in(capsys, edge, "access", "app", "create", "app-db", "--domain", "db.app.example",
                         "--domain", "*.more.example", "--service-token", "app-tok", "--json")
    assert rc == 0 and err == ""
    a = one_json(out)
    assert a["domains"] == ["db.app.example", "*.more.example"] and a["service_tokens"] == ["app-tok"]
    assert ("config_changed", tid) in edge.relay.events and ("access_changed", "") in edge.relay.events

    rc, out, err = hd_in(capsys, edge, "access", "app", "create", "app-any", "--domain", "any.app.example",
                         "--any-service-token")
    assert rc == 0 and err == ""
    assert "allowing any service token" in out
    aud = next(line.split()[-1] for line in out.splitlines() if line.startswith("AUD tag:"))
    assert len(aud) == 64
    assert "Next: hd access tcp --hostname any.app.example" in out

    rc, out, _ = hd_in(capsys, edge, "access", "app", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DOMAINS", "ALLOWS", "AUD", "CREATED"]
    assert any(line.startswith("app-db") and "service token(s) app-tok" in line for line in lines)
    rc, out, _ = hd_in(capsys, edge, "access", "app", "list", "--json")
    assert {x["name"] for x in one_json(out)} >= {"app-db", "app-any"}

    rc, out, err = hd_in(capsys, edge, "access", "app", "create", "clash", "--domain", "db.app.example",
                         "--any-service-token")
    one_line_error(rc, out, err, "already belongs to Access application 'app-db'")
    rc, out, err = hd_in(capsys, edge, "access", "app", "create", "nopolicy", "--domain", "x.example")
    one_line_error(rc, out, err, "--service-token")
    assert rc == 2

    rc, out, _ = hd_in(capsys, edge, "access", "app", "delete", a["id"])
    assert rc == 0 and "Deleted Access application app-db" in out
    rc, out, _ = hd_in(capsys, edge, "access", "app", "delete", "app-any", "--json")
    assert one_json(out)["deleted"] is True
    rc, out, err = hd_in(capsys, edge, "access", "app", "delete", "app-any")
    one_line_error(rc, out, err, "no Access application")

    # logs: flushed from the relay, newest first
    store = edge.relay.store
    edge.relay.events.clear()
    rc, out, _ = hd_in(capsys, edge, "access", "logs", "--json")
    assert rc == 0 and one_json(out) == [] and ("flush_access_logs", "") in edge.relay.events
    rc, out, _ = hd_in(capsys, edge, "access", "logs")
    assert "No access decisions" in out
    added = threading.Event()  # the edge's loop has stored them (no fixed sleep: a busy box may lag)
    logs = [
        {"time": time.time() - 60 + i, "decision": "deny" if i else "allow", "status": 403 if i else 200,
         "client_id": "c.access", "token_id": None, "token_name": "app-tok" if not i else None, "app": "app-db",
         "hostname": "db.app.example", "reason": f"reason {i}", "source": "127.0.0.1:1"} for i in range(3)]
    edge.loop.call_soon_threadsafe(lambda: (store.add_access_logs(logs), added.set()))
    assert added.wait(60), "the edge loop never stored the access logs"
    rc, out, _ = hd_in(capsys, edge, "access", "logs", "--limit", "2", "--json")
    assert [e["reason"] for e in one_json(out)] == ["reason 2", "reason 1"]
    rc, out, _ = hd_in(capsys, edge, "access", "logs")
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "DECISION", "STATUS", "TOKEN", "APP", "HOSTNAME", "REASON"]
    assert "deny" in lines[1] and "c.access" in lines[1] and "reason 2" in lines[1]
    assert "allow" in lines[3] and "app-tok" in lines[3]
    rc, out, err = hd_in(capsys, edge, "access", "logs", "--limit", "0")
    one_line_error(rc, out, err, "--limit")

    # keys
    edge.relay.events.clear()
    rc, out, err = hd_in(capsys, edge, "access", "keys", "rotate", "--json")
    assert rc == 0 and err == ""
    k = one_json(out)
    assert len(k["kid"]) == 64 and k["previous_kid"] and ("keys_rotated", "") in edge.relay.events
    rc, out, _ = hd_in(capsys, edge, "access", "keys", "rotate")
    assert rc == 0 and f"the previous key {k['kid']} stays published" in out


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["access", "service-token", "create", "x", "--duration", "soon"], "invalid duration", 2),
        (["access", "service-token", "create", "x", "--duration", "0s"], "more than 0", 2),
        (["access", "service-token", "create", "bad name"], "invalid service token name", 1),
        (["access", "service-token", "rotate", "ghost"], "no service token", 1),
        (["access", "service-token", "rotate", "ghost", "--grace", "later"], "invalid duration", 2),
        (["access", "service-token", "revoke", "ghost"], "no service token", 1),
        (["access", "app", "create", "x", "--service-token", "t"], "Missing option '--domain'", 2),
        (["access", "app", "create", "x", "--domain", "h.example", "--service-token", "ghost"], "no service token", 1),
        (["access", "app", "delete", "ghost"], "no Access application", 1),
    ],
)
def test_access_admin_mistakes_are_one_line(edge, capsys, args, needle, code) -> None:
    for extra in ([], ["--json"]):
        rc, out, err = hd_in(capsys, edge, *args, *extra)
        one_line_error(rc, out, err, needle)
        assert rc == code


# --- hd access tcp / ssh and edge resolution --------------------------------------------------

@pytest.fixture
def fake_access(monkeypatch):
    calls: list[tuple] = []
    mod = types.ModuleType("cli.access_client")

    async def serve_tcp(edge, hostname, listen_host, listen_port, headers):
        calls.append(("tcp", edge, hostname, listen_host, listen_port, headers))

    async def serve_stdio(edge, hostname, headers):
        calls.append(("stdio", edge, hostname, headers))
        return 3

    mod.serve_tcp, mod.serve_stdio = serve_tcp, serve_stdio
    monkeypatch.setitem(sys.modules, "cli.access_client", mod)
    return calls


def test_access_tcp_uses_the_state_dir_edge_and_service_token(edge, capsys, fake_access) -> None:
    rc, out, err = hd_in(capsys, edge, "access", "tcp", "--hostname", "DB.example", "--url", "localhost:15432",
                         "--service-token-id", "abc.access", "--service-token-secret", "s3cret", "--json")
    assert rc == 0, err
    assert one_json(out) == {"hostname": "db.example", "listen": "127.0.0.1:15432", "edge_url": edge.info["tunnel_url"]}
    kind, ep, hostname, host, port, headers = fake_access[0]
    assert ep == EdgeEndpoint(edge.info["tunnel_url"], edge.info["cert_pin"])
    assert (kind, hostname, host, port) == ("tcp", "db.example", "127.0.0.1", 15432)
    assert headers == {"CF-Access-Client-Id": "abc.access", "CF-Access-Client-Secret": "s3cret"}
    assert "s3cret" not in err


def test_access_ssh_returns_the_session_status(edge, capsys, fake_access, monkeypatch) -> None:
    monkeypatch.setenv("HD_EDGE_URL", "wss://127.0.0.1:9")
    monkeypatch.setenv("HD_EDGE_PIN", "sha256:" + "0" * 64)
    rc, out, err = hd(capsys, "access", "ssh", "--hostname", "ssh.example")
    assert rc == 3 and out == ""
    assert fake_access == [("stdio", EdgeEndpoint("wss://127.0.0.1:9", "sha256:" + "0" * 64), "ssh.example", {})]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hostname", "h.example", "--url", "127.0.0.1:1", "--service-token-id", "x"], "go together"),
        (["--hostname", "h.example", "--url", "127.0.0.1"], "needs a port"),
        (["--hostname", "tcp://h.example:5", "--url", "127.0.0.1:1"], "plain hostname"),
        (["--hostname", "h.example", "--url", "127.0.0.1:1", "--edge-url", "wss://127.0.0.1:1"], "go together"),
        (["--hostname", "h.example", "--url", "127.0.0.1:1", "--edge-url", "https://x:1", "--edge-pin",
          "sha256:" + "a" * 64], "wss://"),
        (["--hostname", "h.example", "--url", "127.0.0.1:1", "--edge-url", "wss://x:1", "--edge-pin", "abc"],
         "sha256:<64 hex"),
    ],
)
def test_access_mistakes(edge, capsys, fake_access, args, needle) -> None:
    rc, out, err = hd_in(capsys, edge, "access", "tcp", *args)
    one_line_error(rc, out, err, needle)
    assert fake_access == []


def test_resolve_edge_order(edge, tmp_path, monkeypatch) -> None:
    pin_a, pin_b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    sd = str(edge.state_dir)
    from_state = EdgeEndpoint(edge.info["tunnel_url"], edge.info["cert_pin"])
    assert resolve_edge(state_dir=sd) == from_state
    assert resolve_edge("127.0.0.1:1", pin_a, state_dir=sd) == EdgeEndpoint("wss://127.0.0.1:1", pin_a)
    monkeypatch.setenv("HD_EDGE_URL", "wss://127.0.0.1:2")
    monkeypatch.setenv("HD_EDGE_PIN", pin_b)
    assert resolve_edge(state_dir=sd) == EdgeEndpoint("wss://127.0.0.1:2", pin_b)
    assert resolve_edge("wss://127.0.0.1:1", pin_a, state_dir=sd).pin == pin_a  # flags beat env
    monkeypatch.delenv("HD_EDGE_URL")
    monkeypatch.delenv("HD_EDGE_PIN")
    # an explicitly named API is asked (GET /v1/edge), with the token from flags or the state dir
    token = (edge.state_dir / "admin-token").read_text().strip()
    assert resolve_edge(state_dir=str(tmp_path), api_url=edge.info["api_url"], api_token=token) == from_state
    with pytest.raises(CliError, match="cannot find the edge"):
        resolve_edge(state_dir=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("relay.server") is None, reason="relay.server not written yet")
def test_hd_edge_process_end_to_end(tmp_path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HD_")}
    proc = subprocess.Popen(
        [str(HD), "edge", "--state-dir", str(state), "--api-listen", "127.0.0.1:0", "--tunnel-listen",
         "127.0.0.1:0", "--pg-listen", "127.0.0.1:0", "--mysql-listen", "127.0.0.1:0", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60  # hang guard
        while not (state / "edge.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "edge.json never appeared"
            time.sleep(0.05)
        p = subprocess.run([str(HD), "tunnel", "create", "e2e", "--json", "--state-dir", str(state)],
                           env=env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        assert TunnelToken.decode(json.loads(p.stdout)["token"]).pin == json.loads((state / "edge.json").read_text())["cert_pin"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["api_url"].startswith("http://127.0.0.1:")  # one JSON document on stdout
    assert "control API listening" in err and "tunnel relay listening" in err
    assert "not yet available" not in err  # the Postgres proxy is part of the edge now
    assert "pg_listen" in json.loads(out)


# --- hd hyperdrive / hd cert ------------------------------------------------------------------
from proxy.errors import OriginError  # noqa: E402
from tests.unit.test_hyperdrive_configs import make_ca, make_leaf  # noqa: E402

TOKEN_ID = "0123456789abcdef0123456789abcdef.access"
DIRECT_FLAGS = ["--origin-host", "db.example", "--origin-port", "5432", "--database", "app", "--origin-user", "app"]


@pytest.fixture
def proxy(edge):
    edge.proxy.fail_with = None
    edge.proxy.probes.clear()
    edge.proxy.events.clear()
    yield edge.proxy
    edge.proxy.fail_with = None


def _store(edge) -> Store:
    return Store(edge.state_dir / "state.db", SecretBox.load_or_create(edge.state_dir / "secret.key"))


def test_hyperdrive_create_get_update_list_delete(edge, proxy, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-one", *DIRECT_FLAGS, "--origin-password", "pw1",
                         "--max-age", "30", "--caching-disabled", "--json")
    assert rc == 0 and err == "", err
    c = one_json(out)
    assert {"id", "name", "connection_string", "origin", "caching"} <= set(c) and c["name"] == "hd-one"
    assert c["caching"] == {"disabled": True, "max_age": 30, "stale_while_revalidate": 15}
    store = _store(edge)
    try:
        stored = store.get_hyperdrive("hd-one")
    finally:
        store.close()
    # verification on: the edge's CA from the state dir (control/certs.py)
    assert c["connection_string"] == (f"postgresql://{stored.client_user}:{stored.client_password}"
                                      f"@127.0.0.1:6432/app?sslmode=verify-full&sslrootcert={edge.state_dir}/ca-cert.pem")
    assert proxy.probes[-1].password == "pw1" and proxy.events == [("config_changed", c["id"])]
    # get --connection-string prints the string alone: psql "$(hd hyperdrive get hd-one --connection-string)"
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "get", "hd-one", "--connection-string")
    assert rc == 0 and out == c["connection_string"] + "\n" and err == ""
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "get", c["id"], "--json")
    got = one_json(out)
    assert got["id"] == c["id"] and "connection_string" not in got
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "get", "hd-one")
    assert rc == 0 and "Hyperdrive config hd-one" in out and "postgresql://app@db.example:5432/app" in out
    assert stored.client_password not in out and 'Next: psql "$(hd hyperdrive get hd-one --connection-string)"' in out
    # update: only the given settings
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "update", "hd-one", "--caching-disabled", "false", "--swr", "7",
                         "--json")
    assert rc == 0, err
    u = one_json(out)
    assert u["caching"] == {"disabled": False, "max_age": 30, "stale_while_revalidate": 7}
    assert "connection_string" not in u and proxy.events[-1] == ("config_changed", c["id"])
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "update", "hd-one", "--origin-connection-limit", "50")
    assert rc == 0 and "Updated Hyperdrive config hd-one" in out and "pool and the cache were kept" in out
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "update", "hd-one")
    one_line_error(rc, out, err, "nothing to change")
    # list
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "list", "--json")
    assert [x["name"] for x in one_json(out) if x["name"] == "hd-one"] == ["hd-one"]
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "list")
    assert rc == 0 and out.splitlines()[0].split() == ["ID", "NAME", "ORIGIN", "CACHING", "SSLMODE", "CREATED"]
    assert "hd-one" in out and "app@db.example:5432/app" in out
    # delete
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "delete", "hd-one", "--json")
    assert rc == 0 and one_json(out)["deleted"] is True
    assert proxy.events[-1] == ("config_deleted", c["id"])
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "get", "hd-one")
    one_line_error(rc, out, err, "no Hyperdrive config named or with id 'hd-one'")


def test_hyperdrive_create_for_people_shows_the_connection_string(edge, proxy, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-people", "--connection-string",
                         "postgres://app:pw@db.example/app")
    assert rc == 0, err
    assert "Created Hyperdrive config hd-people" in out and "postgresql://hd_" in out
    assert 'Next: psql "$(hd hyperdrive get hd-people --connection-string)"' in out
    hd_in(capsys, edge, "hyperdrive", "delete", "hd-people")


def test_hyperdrive_probe_errors_are_one_line_with_the_code(edge, proxy, capsys) -> None:
    proxy.fail_with = OriginError(2013, "invalid credentials for user app: password authentication failed",
                                  "check --origin-user and --origin-password")
    for extra in ([], ["--json"]):
        rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-bad", *DIRECT_FLAGS, "--origin-password",
                             "wrong", *extra)
        one_line_error(rc, out, err, "")
        assert rc == 1
        assert err == ("hd: error: [2013] invalid credentials for user app: password authentication failed"
                       " (hint: check --origin-user and --origin-password)\n")
    rc, out, _ = hd_in(capsys, edge, "hyperdrive", "get", "hd-bad")
    assert rc == 1  # nothing was stored


def test_hyperdrive_passwords_from_the_environment(edge, proxy, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HD_ORIGIN_PASSWORD", "from-env-pw")
    monkeypatch.setenv("HD_ACCESS_CLIENT_SECRET", "from-env-secret")
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-env", "--origin-host", "db.internal.example",
                         "--database", "app", "--origin-user", "app", "--access-client-id", TOKEN_ID, "--json")
    assert rc == 0, err
    c = one_json(out)
    assert c["origin"]["port"] is None and c["origin"]["access_client_id"] == TOKEN_ID
    spec = proxy.probes[-1]
    assert (spec.password, spec.access_client_secret) == ("from-env-pw", "from-env-secret")
    # a connection string carries its own password: the environment's gives way; so does an access
    # secret from the environment without --access-client-id
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-env2", "--connection-string",
                         "postgres://app:url-pw@db.example/app", "--json")
    assert rc == 0, err
    assert proxy.probes[-1].password == "url-pw" and proxy.probes[-1].access_client_id is None
    for name in ("hd-env", "hd-env2"):
        hd_in(capsys, edge, "hyperdrive", "delete", name)


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["--connection-string", "postgres://a:b@h/d", "--origin-host", "x"],
         "--connection-string conflicts with --origin-host", 2),
        (["--connection-string", "postgres://a:b@h/d", "--database", "x", "--origin-password", "p"],
         "--connection-string conflicts with --origin-password, --database", 2),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--access-client-id", TOKEN_ID, "--access-client-secret", "s"],
         "--origin-port conflicts with --access-client-id", 2),
        (["--origin-host", "h", "--database", "d", "--origin-user", "u", "--origin-password", "p",
          "--access-client-id", TOKEN_ID], "--access-client-id needs --access-client-secret", 2),
        (["--origin-host", "h", "--database", "d", "--origin-user", "u"], "give --origin-password", 2),
        (["--origin-host", "h"], "give --connection-string, or --database, --origin-user", 2),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--origin-connection-limit", "4"], "4 is not in the range", 2),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--max-age", "3601"], "3601 is not in the range", 2),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--sslmode", "allow"], "'allow' is not one of", 2),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--origin-user", "u" * 64], "longer than 63 bytes", 1),
        (["--connection-string", "mysql:/x"], "the connection string is not a URL", 1),
        ([*DIRECT_FLAGS, "--origin-password", "p", "--ca-certificate-id", "ghost"], "no certificate named", 1),
    ],
)
def test_hyperdrive_mistakes_are_one_line(edge, proxy, capsys, args, needle, code) -> None:
    for extra in ([], ["--json"]):
        rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-mistake", *args, *extra)
        one_line_error(rc, out, err, needle)
        assert rc == code
    assert proxy.probes == []


def test_cert_upload_list_delete(edge, proxy, capsys, tmp_path) -> None:
    ca_pem, _, ca, ca_key = make_ca("CLI CA")
    leaf_pem, leaf_key = make_leaf(ca, ca_key, "cli-client")
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "client.pem").write_bytes(leaf_pem)
    (tmp_path / "client.key").write_bytes(leaf_key)
    rc, out, err = hd_in(capsys, edge, "cert", "upload", "certificate-authority", "--ca-cert",
                         str(tmp_path / "ca.pem"), "--name", "cli-ca", "--json")
    assert rc == 0, err
    a = one_json(out)
    assert a["kind"] == "certificate-authority" and a["subject"] == "CN=CLI CA"
    rc, out, err = hd_in(capsys, edge, "cert", "upload", "mtls-certificate", "--cert", str(tmp_path / "client.pem"),
                         "--key", str(tmp_path / "client.key"), "--name", "cli-client")
    assert rc == 0, err
    assert "Uploaded mtls-certificate cli-client" in out and "Next: hd hyperdrive update ID --mtls-certificate-id" in out
    rc, out, _ = hd_in(capsys, edge, "cert", "list")
    assert out.splitlines()[0].split() == ["ID", "NAME", "KIND", "SUBJECT", "EXPIRES"]
    assert "cli-ca" in out and "cli-client" in out and "PRIVATE" not in out
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-tls", *DIRECT_FLAGS, "--origin-password", "p",
                         "--sslmode", "verify-full", "--ca-certificate-id", "cli-ca", "--mtls-certificate-id",
                         "cli-client", "--json")
    assert rc == 0, err
    assert proxy.probes[-1].ca_pem == ca_pem and proxy.probes[-1].client_key_pem == leaf_key
    rc, out, err = hd_in(capsys, edge, "cert", "delete", "cli-ca")
    one_line_error(rc, out, err, "certificate 'cli-ca' is used by Hyperdrive config(s) hd-tls")
    hd_in(capsys, edge, "hyperdrive", "delete", "hd-tls")
    rc, out, _ = hd_in(capsys, edge, "cert", "delete", "cli-ca", "--json")
    assert rc == 0 and one_json(out)["deleted"] is True
    rc, out, err = hd_in(capsys, edge, "cert", "upload", "mtls-certificate", "--cert", str(tmp_path / "client.pem"),
                         "--key", str(tmp_path / "ca.pem"), "--name", "bad")
    one_line_error(rc, out, err, "the private key is not a valid PEM private key")
    rc, out, err = hd_in(capsys, edge, "cert", "upload", "certificate-authority", "--ca-cert",
                         str(tmp_path / "missing.pem"), "--name", "x")
    one_line_error(rc, out, err, "cannot read --ca-cert")
    hd_in(capsys, edge, "cert", "delete", "cli-client")


def test_hyperdrive_metrics_json_and_report(edge, proxy, capsys) -> None:
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "create", "hd-metrics", *DIRECT_FLAGS, "--origin-password", "p",
                         "--json")
    assert rc == 0, err
    c = one_json(out)
    # nothing yet: zeros, and the next step is to send it a query
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "metrics", "hd-metrics")
    assert rc == 0 and err == "", err
    assert "Hyperdrive config hd-metrics" in out and "the last 1h" in out
    assert "queries:          0 (0 complete, 0 error)" in out and "CACHE STATUS" not in out
    assert out.splitlines()[-1] == 'Next: send it a query: psql "$(hd hyperdrive get hd-metrics --connection-string)"'
    m = proxy.metrics.for_config(c["id"])
    for _ in range(30):
        m.query("hit", True, 0.0005, 100, 2048)
    for _ in range(10):
        m.query("miss", True, 0.012, 100, 2048 * 1024)
    m.query("volatile", False, 0.150, 60, 0)
    m.connection(0.004, True)
    m.connection(15.0, False)
    m.refresh(True)
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "metrics", c["id"], "--since", "2h", "--json")
    assert rc == 0 and err == "", err
    doc = one_json(out)
    assert (doc["id"], doc["name"], doc["window_seconds"]) == (c["id"], "hd-metrics", 7200)
    assert doc["queries"]["total"] == 41 and doc["cache_hit_ratio"] == 0.75
    assert doc["queries"]["by_event_status"] == {"complete": 40, "error": 1}
    rc, out, err = hd_in(capsys, edge, "hyperdrive", "metrics", "hd-metrics", "--since", "30d")
    assert rc == 0, err
    lines = out.splitlines()
    assert "the last 24h (metrics are kept for 24h)" in lines[0]
    assert "  queries:          41 (40 complete, 1 error)" in lines
    assert "  cache hit ratio:  75.0% (hit / (hit + miss))" in lines
    assert "  query bytes:      4.0 KiB" in lines and "  result bytes:     20.1 MiB" in lines
    assert "  cache refreshes:  1 complete, 0 error" in lines
    table = lines[lines.index("  CACHE STATUS  QUERIES  SHARE"):][:4]
    assert table == ["  CACHE STATUS  QUERIES  SHARE",
                     "  hit                30  73.2%",
                     "  miss               10  24.4%",
                     "  volatile            1   2.4%"]
    [header] = [x for x in lines if x.startswith("  LATENCY")]
    assert header.split() == ["LATENCY", "COUNT", "ERRORS", "P50", "P90", "P99", "MAX"]
    [query] = [x for x in lines if x.split()[:2] == ["query", "41"]]
    [conn] = [x for x in lines if x.startswith("  connection ")]
    assert query.split()[1:3] == ["41", "1"] and query.endswith("150 ms")
    assert conn.split()[1:3] == ["1", "1"] and conn.endswith("4.00 ms")
    assert len(header) == len(query) == len(conn)  # right-aligned numbers
    assert re.fullmatch(r"Next: scrape http://127\.0\.0\.1:\d+/metrics with Prometheus for every config's counters"
                        r" and latency histograms", lines[-1]), lines[-1]
    hd_in(capsys, edge, "hyperdrive", "delete", "hd-metrics")


@pytest.mark.parametrize("args, needle, code", [
    (["hd-metrics-x", "--since", "soon"], "Invalid value for '--since': invalid duration 'soon'", 2),
    (["hd-metrics-x", "--since", "0s"], "Invalid value for '--since': must be more than 0", 2),
    (["ghost"], "no Hyperdrive config named or with id 'ghost'", 1),
    ([], "Missing argument 'NAME'", 2),
])
def test_hyperdrive_metrics_mistakes_are_one_line(edge, proxy, capsys, args, needle, code) -> None:
    for extra in ([], ["--json"]):
        rc, out, err = hd_in(capsys, edge, "hyperdrive", "metrics", *args, *extra)
        one_line_error(rc, out, err, needle)
        assert rc == code


def test_parse_size_for_edge_cache_size():
    from cli.main import parse_size

    assert parse_size("256MiB") == 256 * 1024 * 1024
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 500_000_000
    assert parse_size("0") == 0
    for bad in ("lots", "12XB", "-1MiB", ""):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)
