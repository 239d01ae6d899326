"""The connector's `--metrics H:P` server: /metrics (Prometheus text), /ready, /healthcheck.

/ready follows cloudflared: 200 with {"status", "readyConnections", "connectorId"} only while at
least one connection is registered with the edge, else 503 with the same body — so a
Kubernetes readiness probe takes a replica out when it has lost the edge.
"""

from __future__ import annotations

import bisect
import json
import logging
from typing import TYPE_CHECKING, Callable

from aiohttp import web

if TYPE_CHECKING:
    from connector.supervisor import Supervisor

log = logging.getLogger("connector.metrics")

DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for bound, count in zip(self.buckets, self.counts):
            acc += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


class ConnectorMetrics:
    """Counters the supervisor bumps; gauges are read from it at scrape time."""

    def __init__(self) -> None:
        self.streams_total = 0
        self.streams_refused = 0
        self.origin_dial = Histogram(DIAL_BUCKETS)
        self.origin_dial_errors: dict[str, int] = {}
        self.reconnects: dict[str, int] = {}
        self.protocol_switches = 0
        self.bytes_in_closed = 0  # of finished streams; live ones are summed at scrape time
        self.bytes_out_closed = 0

    def dial_error(self, reason: str) -> None:
        self.origin_dial_errors[reason] = self.origin_dial_errors.get(reason, 0) + 1

    def reconnect(self, protocol: str) -> None:
        self.reconnects[protocol] = self.reconnects.get(protocol, 0) + 1


def prometheus_text(sup: Supervisor) -> str:
    m = sup.metrics
    by_proto = sup.connections_by_protocol()
    bytes_in, bytes_out = sup.stream_bytes()
    lines = [
        "# HELP hd_connector_info Connector identity.",
        "# TYPE hd_connector_info gauge",
        f'hd_connector_info{{version="{sup.version}",connector_id="{sup.connector_id}",'
        f'protocol_mode="{sup.selector.mode}",protocol="{sup.selector.current}"}} 1',
        "# HELP hd_connector_connections Registered edge connections by transport.",
        "# TYPE hd_connector_connections gauge",
    ]
    lines += [f'hd_connector_connections{{protocol="{p}"}} {by_proto.get(p, 0)}' for p in ("quic", "websocket")]
    lines += [
        "# HELP hd_connector_streams_active Streams being carried to origins now.",
        "# TYPE hd_connector_streams_active gauge",
        f"hd_connector_streams_active {sup.streams_active}",
        "# HELP hd_connector_streams_total Streams accepted from the edge.",
        "# TYPE hd_connector_streams_total counter",
        f"hd_connector_streams_total {m.streams_total}",
        "# HELP hd_connector_streams_refused_total Streams refused (no rule, access, draining, origin down).",
        "# TYPE hd_connector_streams_refused_total counter",
        f"hd_connector_streams_refused_total {m.streams_refused}",
        "# HELP hd_connector_bytes_total Stream payload bytes; in = from the edge to origins.",
        "# TYPE hd_connector_bytes_total counter",
        f'hd_connector_bytes_total{{direction="in"}} {bytes_in}',
        f'hd_connector_bytes_total{{direction="out"}} {bytes_out}',
        "# HELP hd_connector_origin_dial_seconds Time to connect to an origin.",
        "# TYPE hd_connector_origin_dial_seconds histogram",
        *m.origin_dial.lines("hd_connector_origin_dial_seconds"),
        "# HELP hd_connector_origin_dial_errors_total Origin connections that failed, by reason.",
        "# TYPE hd_connector_origin_dial_errors_total counter",
    ]
    for reason in ("timeout", "unreachable"):
        lines.append(f'hd_connector_origin_dial_errors_total{{reason="{reason}"}} {m.origin_dial_errors.get(reason, 0)}')
    lines += [
        "# HELP hd_connector_reconnects_total Edge connections re-established after a loss or failed dial.",
        "# TYPE hd_connector_reconnects_total counter",
    ]
    lines += [f'hd_connector_reconnects_total{{protocol="{p}"}} {m.reconnects.get(p, 0)}' for p in ("quic", "websocket")]
    lines += [
        "# HELP hd_connector_protocol_switches_total Transport changes made by --protocol auto.",
        "# TYPE hd_connector_protocol_switches_total counter",
        f"hd_connector_protocol_switches_total {sup.selector.switches}",
        "# HELP hd_connector_config_version Version of the applied ingress config (-1: local file or none).",
        "# TYPE hd_connector_config_version gauge",
        f"hd_connector_config_version {sup.orchestrator.config.version}",
    ]
    return "\n".join(lines) + "\n"


def ready_body(sup: Supervisor) -> tuple[int, dict[str, object]]:
    ready = sup.ready_connections()
    status = 200 if ready > 0 else 503
    return status, {"status": status, "readyConnections": ready, "connectorId": sup.connector_id}


async def serve_metrics(sup: Supervisor, host: str, port: int,
                        on_bound: Callable[[int], None] | None = None) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(sup), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def ready(_: web.Request) -> web.Response:
        status, body = ready_body(sup)
        return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")

    async def healthcheck(_: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ready", ready)
    app.router.add_get("/healthcheck", healthcheck)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = site._server  # aiohttp keeps the asyncio server here; we need the bound port for :0
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])
    log.info("metrics on http://%s:%d/metrics (also /ready, /healthcheck)", host, bound)
    if on_bound is not None:
        on_bound(bound)
    return runner
