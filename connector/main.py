"""`hd-connector`: runs inside the private network and dials out to the edge."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from connector.supervisor import FatalError, Supervisor
from tunnel.token import InvalidToken, TunnelToken


def _fail(message: str) -> None:
    click.echo(f"hd-connector: error: {message}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--token", envvar="HD_TUNNEL_TOKEN", help="Tunnel token from `hd tunnel token` (prefer --token-file).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), help="File holding the tunnel token.")
@click.option("--protocol", type=click.Choice(["auto", "quic", "websocket"]), default="auto", show_default=True)
@click.option("--ha-connections", type=click.IntRange(1, 16), default=4, show_default=True)
@click.option("--metrics", "metrics_addr", default=None, help="H:P for /metrics, /ready, /healthcheck (not available yet).")
@click.option("--grace-period", default="30s", show_default=True, help="Drain time on SIGTERM.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local YAML ingress config (not available yet).")
@click.option("--loglevel", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def main(token: str | None, token_file: Path | None, protocol: str, ha_connections: int,
         metrics_addr: str | None, grace_period: str, config_file: Path | None, loglevel: str) -> None:
    """Connect this private network to the edge: carries streams for the tunnel's routes."""
    logging.basicConfig(level=loglevel.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    if protocol == "quic":
        _fail("--protocol quic is not available yet; use websocket (or auto)")
    if config_file is not None or metrics_addr is not None:
        _fail("--config and --metrics are not available yet in this version")
    sup = Supervisor(parsed, ha_connections=ha_connections, protocol="websocket")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(_run(sup))
    except FatalError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


async def _run(sup: Supervisor) -> None:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(sup.run())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([run, stopper], return_when=asyncio.FIRST_COMPLETED)
    if run in done:
        stopper.cancel()
        run.result()  # raises FatalError
        return
    logging.getLogger("connector").info("shutting down")
    run.cancel()
    try:
        await run
    except (asyncio.CancelledError, FatalError):
        pass
    await sup.close()


if __name__ == "__main__":
    main()
