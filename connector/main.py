"""`hd-connector`: runs inside the private network and dials out to the edge."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from cli.main import Duration
from connector.ingress import IngressConfig, IngressError
from connector.localconfig import load_local_config
from connector.metrics import serve_metrics
from connector.protocol import AUTO_PREFERS, PROTOCOLS, REPROBE_INTERVAL
from connector.supervisor import FatalError, Supervisor
from control.addr import parse_hostport
from tunnel.token import InvalidToken, TunnelToken

log = logging.getLogger("connector")
MAX_GRACE = 180.0  # as cloudflared: a longer drain is a misconfiguration


def _fail(message: str) -> None:
    click.echo(f"hd-connector: error: {message}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--token", envvar="HD_TUNNEL_TOKEN", help="Tunnel token from `hd tunnel token` (prefer --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="File holding the tunnel token.")
@click.option("--protocol", type=click.Choice(["auto", *PROTOCOLS]), default="auto", show_default=True,
              help="Transport to the edge. auto starts with --prefer, falls back to the other one when it "
                   "cannot connect, and re-probes the preferred one every --reprobe-interval.")
@click.option("--prefer", type=click.Choice(PROTOCOLS), default=AUTO_PREFERS, show_default=True,
              help="The transport auto starts with (the faster one on this stack, per bench/tunnel_bench.py).")
@click.option("--reprobe-interval", type=Duration(positive=True), default=f"{REPROBE_INTERVAL:g}s",
              show_default=True, help="After a fallback, how often auto tries the preferred transport again.")
@click.option("--ha-connections", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Connections to the edge (the relay spreads streams over all of them).")
@click.option("--metrics", "metrics_addr", default=None, metavar="H:P",
              help="Serve /metrics (Prometheus), /ready and /healthcheck on this address.")
@click.option("--grace-period", type=Duration(), default="30s", show_default=True,
              help="On SIGTERM/SIGINT, how long in-flight streams may finish (a second signal exits at once).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local YAML ingress config (used unless the edge pushes one: see README).")
@click.option("--loglevel", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def main(token: str | None, token_file: Path | None, protocol: str, prefer: str, reprobe_interval: float,
         ha_connections: int, metrics_addr: str | None, grace_period: float, config_file: Path | None,
         loglevel: str) -> None:
    """Connect this private network to the edge: carries streams for the tunnel's routes."""
    logging.basicConfig(level=loglevel.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if loglevel != "debug":
        # aioquic logs every handshake and close at INFO: with the edge down that would be two
        # more lines per attempt; our own line per attempt says what happened.
        logging.getLogger("quic").setLevel(logging.WARNING)
    if token and token_file:
        _fail("give either --token or --token-file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text()
        except OSError as exc:
            _fail(f"cannot read token file {token_file}: {exc.strerror}")
    if not token:
        _fail("a tunnel token is required: --token-file FILE (or --token TOKEN); get one with `hd tunnel token NAME`")
    try:
        parsed = TunnelToken.decode(token or "")
    except InvalidToken as exc:
        _fail(f"the tunnel token is not valid: {exc}")
        return
    if grace_period > MAX_GRACE:
        _fail(f"--grace-period may be at most {MAX_GRACE:g}s")
    metrics_at: tuple[str, int] | None = None
    if metrics_addr is not None:
        try:
            metrics_at = parse_hostport(metrics_addr, what="--metrics")
        except ValueError as exc:
            _fail(str(exc))
    local: IngressConfig | None = None
    if config_file is not None:
        try:
            local = load_local_config(config_file)
        except IngressError as exc:
            _fail(str(exc))
        assert local is not None
        for warning in local.warnings:
            log.warning("%s: %s", config_file, warning)
        log.info("local ingress config %s: %d rule(s)", config_file, len(local.rules))
    sup = Supervisor(parsed, ha_connections=ha_connections, protocol=protocol, prefer=prefer,
                     reprobe_interval=reprobe_interval, local_config=local)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        code = runner(_run(sup, grace_period, metrics_at))
    except FatalError as exc:
        _fail(str(exc))
        return
    sys.exit(code)


async def _run(sup: Supervisor, grace: float, metrics_at: tuple[str, int] | None) -> int:
    """Serve until a fatal error or a signal. First SIGTERM/SIGINT: graceful shutdown within
    `grace`; a second one: exit at once (status 1)."""
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    metrics_runner = None
    if metrics_at is not None:
        try:
            metrics_runner = await serve_metrics(sup, *metrics_at)
        except OSError as exc:
            raise FatalError(f"cannot serve metrics on {metrics_at[0]}:{metrics_at[1]}: {exc.strerror or exc}") from None
    run = asyncio.create_task(sup.run())
    first = asyncio.create_task(signals.get())
    try:
        done, _ = await asyncio.wait([run, first], return_when=asyncio.FIRST_COMPLETED)
        if run in done:
            first.cancel()
            run.result()  # raises FatalError
            return 0
        log.info("received %s: unregistering and draining for up to %.0fs (send it again to exit now)",
                 signal.Signals(first.result()).name, grace)
        run.cancel()
        drain = asyncio.create_task(sup.shutdown(grace))
        second = asyncio.create_task(signals.get())
        done, _ = await asyncio.wait([drain, second], return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            log.warning("received %s again: exiting now", signal.Signals(second.result()).name)
            drain.cancel()
            return 1
        second.cancel()
        log.info("shut down cleanly")
        return 0
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()


if __name__ == "__main__":
    main()
