"""The connector's metrics server (connector/metrics.py): histogram math, the Prometheus text,
/ready, and the HTTP server itself on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

import connector.metrics as metrics_mod
from connector.metrics import DIAL_BUCKETS, ConnectorMetrics, Histogram, prometheus_text, ready_body, serve_metrics
from connector.protocol import ProtocolSelector
from connector.supervisor import EdgeConnection, Supervisor
from tunnel.token import TunnelToken

pytestmark = pytest.mark.timeout(60)

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=5)


# ------------------------------------------------------------------------------ helpers


class FakeSupervisor:
    """Exactly what prometheus_text/ready_body read from a connector.supervisor.Supervisor."""

    def __init__(self) -> None:
        self.version = "9.8.7"
        self.connector_id = "11111111-2222-3333-4444-555555555555"
        self.selector = ProtocolSelector("auto", prefer="quic", now=0.0)
        self.metrics = ConnectorMetrics()
        self.orchestrator = SimpleNamespace(config=SimpleNamespace(version=17))
        self.streams_active = 3
        self.by_protocol = {"quic": 2, "websocket": 1}
        self.bytes = (123_456, 7_890)
        self.ready = 3

    def connections_by_protocol(self) -> dict[str, int]:
        return dict(self.by_protocol)

    def stream_bytes(self) -> tuple[int, int]:
        return self.bytes

    def ready_connections(self) -> int:
        return self.ready


def busy_fake() -> FakeSupervisor:
    sup = FakeSupervisor()
    m = sup.metrics
    m.streams_total = 42
    m.streams_refused = 5
    for v in (0.0004, 0.001, 0.003, 0.2, 0.2, 20.0):  # 0.001 sits exactly on a bucket bound
        m.origin_dial.observe(v)
    m.dial_error("timeout")
    m.dial_error("timeout")
    m.dial_error("unreachable")
    m.reconnect("quic")
    m.reconnect("quic")
    m.reconnect("websocket")
    sup.selector.failed("quic", "UDP blocked", now=1.0)  # one protocol switch
    sup.selector.failed("websocket", "refused", now=2.0)  # and back: two
    return sup


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")
_LABELS = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """Validate Prometheus text format 0.0.4 strictly enough for our output; returns
    ({family: type}, {(sample name, labels): value})."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, frozenset], float] = {}
    finished: set[str] = set()  # families whose samples are over (each family is one block)
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "blank line"
        if line.startswith("#"):
            m = re.match(rf"^# (HELP|TYPE) ({_NAME}) (.+)$", line)
            assert m, f"bad comment line {line!r}"
            kind, fam, rest = m.groups()
            assert fam not in finished and fam != current, f"{kind} for {fam} after its samples"
            if kind == "HELP":
                assert fam not in helps and fam not in types, f"HELP for {fam} twice or after TYPE"
                helps.add(fam)
            else:
                assert fam in helps, f"TYPE for {fam} without HELP first"
                assert fam not in types and rest in _TYPES, line
                types[fam] = rest
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.groups()
        fam = name
        if name not in types:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                    fam = name[: -len(suffix)]
        assert fam in types, f"sample {name} without a TYPE line before it"
        if fam != current:
            if current is not None:
                finished.add(current)
            assert fam not in finished, f"samples of {fam} are not in one block"
            current = fam
        label_set = frozenset(_LABELS.findall(labels or ""))
        assert (name, label_set) not in samples, f"duplicate sample {line!r}"
        if value in ("+Inf", "-Inf", "NaN"):
            v = float(value.replace("Inf", "inf"))
        else:
            assert re.match(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$", value), f"bad value {value!r}"
            v = float(value)
        samples[(name, label_set)] = v
    for fam, kind in types.items():
        assert any(n == fam or n.startswith(fam + "_") for n, _ in samples), f"{fam} has no samples"
    return types, samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


EXPECTED_FAMILIES = {
    "hd_connector_info": "gauge",
    "hd_connector_connections": "gauge",
    "hd_connector_streams_active": "gauge",
    "hd_connector_streams_total": "counter",
    "hd_connector_streams_refused_total": "counter",
    "hd_connector_bytes_total": "counter",
    "hd_connector_origin_dial_seconds": "histogram",
    "hd_connector_origin_dial_errors_total": "counter",
    "hd_connector_reconnects_total": "counter",
    "hd_connector_protocol_switches_total": "counter",
    "hd_connector_config_version": "gauge",
}


def families_in_module() -> dict[str, str]:
    """Every family the module's source names (so a new one cannot go untested)."""
    src = Path(metrics_mod.__file__).read_text()
    found = dict(re.findall(r"# TYPE (hd_connector_\w+) (\w+)", src))
    assert found == EXPECTED_FAMILIES
    return EXPECTED_FAMILIES


# ------------------------------------------------------------------------------ Histogram


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    assert h.lines("x") == ['x_bucket{le="1"} 0', 'x_bucket{le="2"} 0', 'x_bucket{le="5"} 0',
                            'x_bucket{le="+Inf"} 0', "x_sum 0.000000", "x_count 0"]
    for v in (0.5, 1.0, 1.5, 2.0, 4.9, 7.0, 100.0):  # 1.0 and 2.0 are "less or equal" their bound
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="1"} 2', 'x_bucket{le="2"} 4', 'x_bucket{le="5"} 5',
                            'x_bucket{le="+Inf"} 7', "x_sum 116.900000", "x_count 7"]
    assert h.n == 7 and math.isclose(h.total, 116.9)


def test_histogram_dial_buckets_format() -> None:
    h = Histogram(DIAL_BUCKETS)
    h.observe(0.0025)
    h.observe(0.0)
    lines = h.lines("d")
    assert len(lines) == len(DIAL_BUCKETS) + 3
    les = [re.search(r'le="([^"]+)"', ln).group(1) for ln in lines[: len(DIAL_BUCKETS) + 1]]
    assert les == ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                   "1", "2.5", "5", "10", "+Inf"]
    counts = [int(ln.rsplit(" ", 1)[1]) for ln in lines[: len(DIAL_BUCKETS) + 1]]
    assert counts == [1] + [2] * (len(DIAL_BUCKETS))
    assert lines[-2:] == ["d_sum 0.002500", "d_count 2"]


def test_connector_metrics_counters() -> None:
    m = ConnectorMetrics()
    m.dial_error("timeout")
    m.dial_error("timeout")
    m.reconnect("quic")
    assert m.origin_dial_errors == {"timeout": 2} and m.reconnects == {"quic": 1}
    assert m.streams_total == m.streams_refused == m.protocol_switches == 0


# ------------------------------------------------------------------------------ /metrics text


def test_prometheus_text_values_and_format() -> None:
    sup = busy_fake()
    types, s = parse_exposition(prometheus_text(sup))
    assert types == families_in_module()  # every family the module names, with its type, and no other

    assert sample(s, "hd_connector_info", version="9.8.7", connector_id=sup.connector_id,
                  protocol_mode="auto", protocol="quic") == 1
    assert sample(s, "hd_connector_connections", protocol="quic") == 2
    assert sample(s, "hd_connector_connections", protocol="websocket") == 1
    assert sample(s, "hd_connector_streams_active") == 3
    assert sample(s, "hd_connector_streams_total") == 42
    assert sample(s, "hd_connector_streams_refused_total") == 5
    assert sample(s, "hd_connector_bytes_total", direction="in") == 123_456
    assert sample(s, "hd_connector_bytes_total", direction="out") == 7_890
    assert sample(s, "hd_connector_origin_dial_errors_total", reason="timeout") == 2
    assert sample(s, "hd_connector_origin_dial_errors_total", reason="unreachable") == 1
    assert sample(s, "hd_connector_reconnects_total", protocol="quic") == 2
    assert sample(s, "hd_connector_reconnects_total", protocol="websocket") == 1
    assert sample(s, "hd_connector_protocol_switches_total") == 2
    assert sample(s, "hd_connector_config_version") == 17

    h = "hd_connector_origin_dial_seconds"
    buckets = {k: v for (n, lbl), v in s.items() if n == h + "_bucket" for k in [dict(lbl)["le"]]}
    assert buckets["0.001"] == 2 and buckets["0.0025"] == 2 and buckets["0.005"] == 3
    assert buckets["0.1"] == 3 and buckets["0.25"] == 5 and buckets["10"] == 5
    assert buckets["+Inf"] == 6 == sample(s, h + "_count")
    finite = [buckets[f"{b:g}"] for b in DIAL_BUCKETS]
    assert finite == sorted(finite)  # cumulative
    assert math.isclose(sample(s, h + "_sum"), 0.0004 + 0.001 + 0.003 + 0.4 + 20.0, abs_tol=1e-6)


def test_prometheus_text_of_an_idle_connector() -> None:
    sup = FakeSupervisor()
    sup.by_protocol = {}
    sup.bytes = (0, 0)
    sup.streams_active = 0
    sup.orchestrator.config.version = -1
    types, s = parse_exposition(prometheus_text(sup))
    assert types == families_in_module()
    # labelled series exist at zero from the start, so rate() and alerts have a baseline
    for proto in ("quic", "websocket"):
        assert sample(s, "hd_connector_connections", protocol=proto) == 0
        assert sample(s, "hd_connector_reconnects_total", protocol=proto) == 0
    for reason in ("timeout", "unreachable"):
        assert sample(s, "hd_connector_origin_dial_errors_total", reason=reason) == 0
    assert sample(s, "hd_connector_origin_dial_seconds_count") == 0
    assert sample(s, "hd_connector_config_version") == -1
    assert sample(s, "hd_connector_protocol_switches_total") == 0


def test_parser_rejects_malformed_exposition() -> None:
    """The format checker above must be able to fail."""
    good = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
    parse_exposition(good)
    for bad in (
        "a_total 1\n",  # no TYPE
        "# TYPE a_total counter\na_total 1\n",  # TYPE without HELP
        good.replace("a_total 1", "a_total{x=1} 1"),  # unquoted label
        good.replace("a_total 1", "a_total one"),  # not a number
        good.replace(" 1\n", " 1"),  # no final newline
        good + "# HELP b B.\n# TYPE b gauge\nb 1\na_total{x=\"y\"} 2\n",  # family split in two
        good + "# HELP a_total again.\n",  # HELP after samples
    ):
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# ------------------------------------------------------------------------------ /ready


def test_ready_body() -> None:
    sup = FakeSupervisor()
    status, body = ready_body(sup)
    assert status == 200
    assert body == {"status": 200, "readyConnections": 3, "connectorId": sup.connector_id}
    sup.ready = 0
    status, body = ready_body(sup)
    assert status == 503
    assert set(body) == {"status", "readyConnections", "connectorId"}
    assert body == {"status": 503, "readyConnections": 0, "connectorId": sup.connector_id}
    json.dumps(body)  # serialisable as is


def _token() -> TunnelToken:
    return TunnelToken(tunnel_id=str(uuid.uuid4()), secret=b"s" * 32, edge=["127.0.0.1:7844"],
                       pin="sha256:" + "ab" * 32)


def test_a_real_supervisor_has_what_the_metrics_read() -> None:
    """The fake above mirrors Supervisor: a real one (never run) renders the same way."""
    sup = Supervisor(_token(), ha_connections=2, protocol="websocket")
    types, s = parse_exposition(prometheus_text(sup))
    assert types == families_in_module()
    assert sample(s, "hd_connector_info", version=sup.version, connector_id=sup.connector_id,
                  protocol_mode="websocket", protocol="websocket") == 1
    assert sample(s, "hd_connector_config_version") == -1
    assert sample(s, "hd_connector_connections", protocol="websocket") == 0
    assert ready_body(sup) == (503, {"status": 503, "readyConnections": 0, "connectorId": sup.connector_id})

    class StubLink:
        def __init__(self, closed: bool = False) -> None:
            self.is_closed = closed
            self.stream_count = 0

    conn = lambda i, proto, **kw: EdgeConnection(index=i, protocol=proto, edge="e", link=StubLink(kw.pop("closed", False)),  # noqa: E731
                                                 runner=None, **kw)
    sup.conns = {0: conn(0, "quic", registered=True), 1: conn(1, "websocket", registered=True, draining=True)}
    sup.retiring = {conn(0, "quic", registered=True, draining=True), conn(1, "quic", registered=True, closed=True)}
    _, s = parse_exposition(prometheus_text(sup))
    assert sample(s, "hd_connector_connections", protocol="quic") == 2  # serving + retiring, not the closed one
    assert sample(s, "hd_connector_connections", protocol="websocket") == 1
    assert ready_body(sup)[0] == 200 and ready_body(sup)[1]["readyConnections"] == 1  # draining is not ready


# ------------------------------------------------------------------------------ HTTP server


async def test_serve_metrics_over_http() -> None:
    sup = busy_fake()
    bound: list[int] = []
    runner = await serve_metrics(sup, "127.0.0.1", 0, on_bound=bound.append)
    try:
        assert len(bound) == 1 and bound[0] > 0
        base = f"http://127.0.0.1:{bound[0]}"
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.get(base + "/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                text = await r.text()
            assert text == prometheus_text(sup)
            _, s = parse_exposition(text)
            assert sample(s, "hd_connector_streams_total") == 42

            sup.metrics.streams_total += 1  # scraped live, not cached
            async with http.get(base + "/metrics") as r:
                _, s = parse_exposition(await r.text())
            assert sample(s, "hd_connector_streams_total") == 43

            async with http.get(base + "/ready") as r:
                assert r.status == 200 and r.content_type == "application/json"
                assert await r.json() == {"status": 200, "readyConnections": 3, "connectorId": sup.connector_id}
            sup.ready = 0  # lost the edge
            async with http.get(base + "/ready") as r:
                assert r.status == 503
                assert await r.json() == {"status": 503, "readyConnections": 0, "connectorId": sup.connector_id}
            sup.ready = 1
            async with http.get(base + "/ready") as r:
                assert r.status == 200 and (await r.json())["readyConnections"] == 1

            async with http.get(base + "/healthcheck") as r:
                assert r.status == 200 and await r.text() == "OK\n"
            async with http.get(base + "/nope") as r:
                assert r.status == 404
            async with http.post(base + "/metrics") as r:
                assert r.status == 405
    finally:
        await asyncio.wait_for(runner.cleanup(), 5)
    assert not runner.sites and runner.server is None
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"http://127.0.0.1:{bound[0]}/healthcheck"):
                pass


async def test_serve_metrics_fixed_port_and_busy_port() -> None:
    sup = FakeSupervisor()
    first = await serve_metrics(sup, "127.0.0.1", 0)
    try:
        port = first.addresses[0][1]
        with pytest.raises(OSError):  # the port is taken: the caller hears about it
            second = await serve_metrics(sup, "127.0.0.1", port)
            await second.cleanup()
    finally:
        await asyncio.wait_for(first.cleanup(), 5)
    again = await serve_metrics(sup, "127.0.0.1", port, on_bound=lambda p: None)
    try:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.get(f"http://127.0.0.1:{port}/healthcheck") as r:
                assert r.status == 200
    finally:
        await asyncio.wait_for(again.cleanup(), 5)
