"""`hd`: the operator's command line. Thin: every command except `edge` and `access tcp/ssh` is
one call to the control API.

Contract (PRODUCT.md): every command accepts `--json` and then prints exactly one JSON document on
stdout; without it, aligned tables and the one next step. User mistakes are one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

import click
from click.core import ParameterSource

from cli import output as out
from cli.apiclient import ApiClient, CliError, default_state_dir, quote, resolve_api
from control.addr import join_hostport, parse_hostport
from control.durations import format_duration, parse_duration

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# --- shared option handling -----------------------------------------------------------------
@dataclass
class Opts:
    json: bool
    api_url: str | None
    api_token: str | None
    state_dir: str | None

    def client(self) -> ApiClient:
        return resolve_api(self.api_url, self.api_token, self.state_dir)


_COMMON = ("as_json", "api_url", "api_token", "state_dir")


def _merge(ctx: click.Context, name: str, value: Any) -> Any:
    """A leaf option typed on the command line wins; else the same option given before the
    subcommand (`hd --json tunnel list`); else the leaf's env/default."""
    if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
        return value
    root = ctx.find_root().params.get(name)
    return root if root not in (None, False) else value


def common_options(fn: Callable) -> Callable:
    """--json, --api-url, --api-token, --state-dir on a leaf command; passes `opts: Opts`."""

    @click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
    @click.option("--state-dir", envvar="HD_STATE_DIR", metavar="DIR",
                  help="Local edge state directory (default ~/.hd), used to find the API.")
    @click.option("--api-token", envvar="HD_API_TOKEN", metavar="TOKEN", help="Admin token of the control API.")
    @click.option("--api-url", envvar="HD_API_URL", metavar="URL", help="Control API URL, e.g. http://127.0.0.1:8787.")
    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        ctx = click.get_current_context()
        vals = {k: _merge(ctx, k, kw.pop(k)) for k in _COMMON}
        opts = Opts(json=bool(vals["as_json"]), api_url=vals["api_url"], api_token=vals["api_token"],
                    state_dir=vals["state_dir"])
        return fn(opts, **kw)

    return wrapper


class Duration(click.ParamType):
    name = "DURATION"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive  # refuse 0, negative and infinite durations

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(value)
            except ValueError as e:
                self.fail(str(e), param, ctx)
        if self.positive and not (math.isfinite(seconds) and seconds > 0):
            self.fail("must be more than 0, e.g. 15m, 1h or 24h", param, ctx)
        return seconds


def run_async(coro: Coroutine, *, fast_loop: bool = False) -> Any:
    """Run `coro`; with `fast_loop`, on uvloop when installed (DESIGN.md: ~3x cheaper per hop)."""
    factory: Callable | None = None
    if fast_loop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# --- the group ------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
@click.option("--state-dir", metavar="DIR", help="Local edge state directory (default ~/.hd).")
@click.option("--api-url", metavar="URL", help="Control API URL.")
@click.option("--api-token", metavar="TOKEN", help="Admin token of the control API.")
@click.version_option(package_name="hyperdrive-oss", prog_name="hd")
def hd(as_json: bool, state_dir: str | None, api_url: str | None, api_token: str | None) -> None:
    """Self-hosted tunnels, access and database proxy."""


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """`256MiB`, `2GiB`, `500MB`, `1048576` → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 256MiB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


# --- hd edge --------------------------------------------------------------------------------
@hd.group("edge", invoke_without_command=True, context_settings=CONTEXT)
@click.option("--state-dir", envvar="HD_STATE_DIR", metavar="DIR", help="State directory (default ~/.hd).")
@click.option("--api-listen", default="127.0.0.1:8787", show_default=True, metavar="H:P",
              help="Control API address (port 0: any free port).")
@click.option("--tunnel-listen", default="127.0.0.1:7844", show_default=True, metavar="H:P",
              help="Relay address for connectors and access clients.")
@click.option("--pg-listen", default="127.0.0.1:6432", show_default=True, metavar="H:P",
              help="Postgres proxy address (put in Hyperdrive connection strings).")
@click.option("--mysql-listen", default="127.0.0.1:3307", show_default=True, metavar="H:P",
              help="MySQL proxy address (put in the connection strings of mysql configs).")
@click.option("--advertise", metavar="H:P",
              help="Tunnel address put in tokens (default: the bound address); its host is also the host of"
                   " connection strings for a listener on every address, and a name the certificate carries.")
@click.option("--tls-cert", metavar="FILE", type=click.Path(dir_okay=False),
              help="Your own certificate (chain, PEM) for the database listeners, e.g. from an ACME client;"
                   " reloaded when the file changes. Default: one signed by the edge's CA.")
@click.option("--tls-key", metavar="FILE", type=click.Path(dir_okay=False), help="The key of --tls-cert (PEM).")
@click.option("--tls-ca", metavar="FILE", type=click.Path(dir_okay=False),
              help="The CA bundle applications verify --tls-cert with (put in connection strings; default:"
                   " this machine's system bundle, right for a public CA).")
@click.option("--tls-name", "tls_names", multiple=True, metavar="NAME",
              help="Another DNS name or IP address the edge's own listener certificate carries (repeatable);"
                   " localhost, 127.0.0.1, ::1, --advertise and the listen addresses always are.")
@click.option("--client-tls", type=click.Choice(["require", "allow"]),
              help="require: refuse database clients without TLS; allow: accept them. Default: require on"
                   " listeners bound to anything but loopback, allow on loopback.")
@click.option("--key-rotation", type=Duration(), default="1008h", show_default=True,
              help="Rotate the Access signing key when it is this old (the JWKS keeps the previous one).")
@click.option("--connect-timeout", type=Duration(), default="15s", show_default=True,
              help="Proxy: bound on opening an origin connection, and on a client's wait for one.")
@click.option("--idle-timeout", type=Duration(), default="10m", show_default=True,
              help="Proxy: idle origin connections are closed after this.")
@click.option("--statement-timeout", type=Duration(), default="60s", show_default=True,
              help="Proxy: the longest a statement may run; enforced by the proxy (cancelled at the origin, SQLSTATE 57014) whatever the client sets.")
@click.option("--cache-size", default="256MiB", show_default=True, metavar="SIZE",
              help="Proxy: memory for cached query results, all configs together (e.g. 64MiB, 2GiB; 0 turns"
                   " the cache off for every config).")
@click.option("--json", "as_json", is_flag=True, help="Print the edge's endpoints as one JSON object once ready.")
@click.pass_context
def edge_cmd(ctx: click.Context, state_dir: str | None, api_listen: str, tunnel_listen: str, pg_listen: str | None,
             mysql_listen: str | None, advertise: str | None, tls_cert: str | None, tls_key: str | None,
             tls_ca: str | None, tls_names: tuple[str, ...], client_tls: str | None, key_rotation: float,
             connect_timeout: float, idle_timeout: float, statement_timeout: float, cache_size: str,
             as_json: bool) -> None:
    """Run the edge in the foreground: control API, tunnel relay and the Postgres and MySQL proxy.

    `hd edge ca` prints the certificate applications verify the edge with."""
    if ctx.invoked_subcommand is not None:
        return  # `hd edge ca`: its own options decide
    from control.edge import EdgeError, run_edge

    as_json = as_json or bool(ctx.find_root().params.get("as_json"))
    sdir = default_state_dir(state_dir or ctx.find_root().params.get("state_dir"))
    logging.basicConfig(
        level=os.environ.get("HD_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if key_rotation <= 0:
        raise click.BadParameter("must be more than 0, e.g. 1008h", param_hint="'--key-rotation'")
    try:
        cache_bytes = parse_size(cache_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--cache-size'") from None
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together: give both")
    if tls_ca and not tls_cert:
        raise click.UsageError("--tls-ca is the CA of your own --tls-cert: give --tls-cert and --tls-key too")

    def ready(info: dict) -> None:
        if as_json:
            out.emit_json(info)
        else:
            out.say(f"Edge ready: API {info['api_url']}, tunnels {info['tunnel_url']}, state in {sdir}")
            if info.get("ca_path"):
                out.say(f"Applications verify the edge with {info['ca_path']} (hd edge ca prints it)")
            out.say("Next: hd tunnel create NAME")
        sys.stdout.flush()

    try:
        run_async(run_edge(sdir, api_listen, tunnel_listen, ready, advertise=advertise,
                           pg_listen=pg_listen, mysql_listen=mysql_listen, key_rotation=key_rotation,
                           proxy_options={"connect_timeout": connect_timeout, "idle_timeout": idle_timeout,
                                          "statement_timeout_ms": int(statement_timeout * 1000),
                                          "cache_max_bytes": cache_bytes},
                           tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, tls_names=tls_names,
                           client_tls=client_tls),
                  fast_loop=True)
    except EdgeError as e:
        raise CliError(str(e)) from None
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("relay"):
            raise CliError("the relay (relay.server) is not installed in this build") from None
        raise


@edge_cmd.command("ca")
@common_options
def edge_ca(opts: Opts) -> None:
    """Print the CA certificate (PEM) applications verify the edge's database listeners with.

    From the local state dir (the edge need not be running), or from the API named with
    --api-url/HD_API_URL. --json: {"pem", "path"} (path: the file on the edge's host)."""
    api_url = opts.api_url or os.environ.get("HD_API_URL")
    if api_url:
        doc = opts.client().get("/v1/edge/ca")
        pem, path = doc["pem"], doc["path"]
    else:
        pem, path = _local_ca(default_state_dir(opts.state_dir or _edge_group_state_dir()))
    if opts.json:
        return out.emit_json({"pem": pem, "path": path})
    sys.stdout.write(pem if pem.endswith("\n") else pem + "\n")  # alone on stdout: hd edge ca > edge-ca.pem


def _edge_group_state_dir() -> str | None:
    """`hd edge --state-dir D ca`: the group's option, when the subcommand did not get its own."""
    ctx = click.get_current_context()
    parent = ctx.parent
    return parent.params.get("state_dir") if parent is not None else None


def _local_ca(sdir: Any) -> tuple[str, str]:
    from cli.apiclient import read_edge_json
    from control.certs import CA_CERT_FILE

    doc = read_edge_json(sdir) or {}
    if "ca_path" in doc and not doc["ca_path"]:
        raise CliError("this edge's certificate is verified with the clients' own trust store (it has no CA file)")
    path = doc.get("ca_path") or str((sdir / CA_CERT_FILE).absolute())
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read(), path
    except FileNotFoundError:
        raise CliError(f"no edge CA in {sdir}: start `hd edge` once (it makes the CA on first start)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# --- hd tunnel ------------------------------------------------------------------------------
@hd.group("tunnel", context_settings=CONTEXT)
def tunnel() -> None:
    """Create tunnels, route hostnames through them, inspect their connectors."""


@tunnel.command("create")
@click.argument("name")
@common_options
def tunnel_create(opts: Opts, name: str) -> None:
    """Create a tunnel; prints its id and the token for hd-connector."""
    t = opts.client().post("/v1/tunnels", {"name": name})
    doc = {"id": t["id"], "name": t["name"], "token": t["token"]}
    if opts.json:
        return out.emit_json(doc)
    out.say(f"Created tunnel {t['name']} with id {t['id']}")
    out.say("Token (secret: it lets a connector serve this tunnel):")
    out.say(t["token"])
    out.say()
    out.say(f"Next: hd tunnel route {t['name']} HOSTNAME --service tcp://HOST:PORT, "
            f"then run: hd-connector --token {t['token']}")


@tunnel.command("token")
@click.argument("name")
@common_options
def tunnel_token(opts: Opts, name: str) -> None:
    """Print the tunnel's token (for hd-connector --token)."""
    t = opts.client().get(f"/v1/tunnels/{quote(name)}/token")
    if opts.json:
        return out.emit_json({"id": t["id"], "name": t["name"], "token": t["token"]})
    out.say(t["token"])  # alone on stdout, so TOKEN=$(hd tunnel token NAME) works


@tunnel.command("list")
@common_options
def tunnel_list(opts: Opts) -> None:
    """List tunnels."""
    tunnels = opts.client().get("/v1/tunnels")
    if opts.json:
        return out.emit_json(tunnels)
    if not tunnels:
        out.say("No tunnels yet.")
        out.say("Next: hd tunnel create NAME")
        return
    rows = [
        [t["id"], t["name"], ", ".join(t.get("routes", [])) or "-", t.get("connections", 0),
         out.fmt_time(t.get("created_at"))]
        for t in tunnels
    ]
    out.say(out.table(["ID", "NAME", "ROUTES", "CONNECTIONS", "CREATED"], rows))


@tunnel.command("info")
@click.argument("name")
@common_options
def tunnel_info(opts: Opts, name: str) -> None:
    """Show a tunnel's routes and each connector replica's connections."""
    t = opts.client().get(f"/v1/tunnels/{quote(name)}")
    if opts.json:
        return out.emit_json(t)
    out.say(f"Tunnel {t['name']}  id {t['id']}  config version {t['config_version']}"
            f"  created {out.fmt_time(t.get('created_at'))}")
    out.say()
    routes = t.get("routes", [])
    if routes:
        out.say(out.table(
            ["HOSTNAME", "SERVICE", "PUBLIC", "CONNECT TIMEOUT"],
            [[r["hostname"], _service_text(r), "yes" if r["public"] else "no", format_duration(r["connect_timeout"])]
             for r in routes],
        ))
        local = [r["hostname"] for r in routes if not r["service"]]
        if local and len(local) < len(routes):
            # the pushed config replaces each connector's file, so these hostnames hit the catch-all
            out.say(f"Note: some routes name a service, so the edge pushes this tunnel's ingress config and it"
                    f" replaces the connectors' local --config: {', '.join(local)} fall to the catch-all (404)")
    else:
        out.say("No routes.")
    out.say()
    conns = sorted(t.get("connections", []), key=lambda c: (str(c.get("connector_id")), c.get("conn_index", 0)))
    if conns:
        replicas: dict[str, list[dict]] = {}
        for c in conns:
            replicas.setdefault(str(c.get("connector_id")), []).append(c)
        out.say(f"{len(conns)} connection(s) from {len(replicas)} connector replica(s):")
        out.say(out.table(
            ["CONNECTOR ID", "HOST", "VERSION", "CONNECTIONS", "PROTOCOLS", "UPTIME"],
            [[cid, cs[0].get("hostname") or "", cs[0].get("version"), len(cs),
              ",".join(sorted({str(c.get("protocol")) for c in cs})),
              format_duration(round(max(float(c.get("uptime") or 0) for c in cs)))]
             for cid, cs in replicas.items()],
        ))
        out.say()
        out.say(out.table(
            ["CONNECTOR ID", "CONN", "PROTOCOL", "STATE", "SINCE", "UPTIME", "STREAMS", "FROM"],
            [[c.get("connector_id"), c.get("conn_index"), c.get("protocol"),
              "draining" if c.get("draining") else "serving", out.fmt_time(c.get("since")),
              format_duration(round(float(c.get("uptime") or 0))), c.get("streams", ""), c.get("remote", "")]
             for c in conns],
        ))
    else:
        out.say("No connector is connected.")
    if not routes:
        out.say(f"Next: hd tunnel route {t['name']} HOSTNAME --service tcp://HOST:PORT")
    elif not conns:
        out.say(f"Next: run the connector: hd-connector --token \"$(hd tunnel token {t['name']})\"")


@tunnel.command("delete")
@click.argument("name")
@common_options
def tunnel_delete(opts: Opts, name: str) -> None:
    """Delete a tunnel and its routes; its connectors are disconnected."""
    t = opts.client().delete(f"/v1/tunnels/{quote(name)}")
    if opts.json:
        return out.emit_json(t)
    out.say(f"Deleted tunnel {t['name']} ({t['id']}) and its routes; its connectors were told to stop.")


@tunnel.command("route")
@click.argument("name")
@click.argument("hostname")
@click.option("--service", metavar="URL",
              help="tcp://host:port, ssh://host[:port] or http_status:NNN (as seen from the connector)."
                   " Without it, the connector's local --config decides where HOSTNAME goes.")
@click.option("--public", is_flag=True, help="Reachable without an Access application (no credentials).")
@click.option("--connect-timeout", type=Duration(), default="10s", show_default=True,
              help="How long the connector waits for the origin to accept, e.g. 10s, 1m (without --service:"
                   " how long the edge waits, so at least the local config's connectTimeout).")
@common_options
def tunnel_route(opts: Opts, name: str, hostname: str, service: str | None, public: bool,
                 connect_timeout: float) -> None:
    """Route HOSTNAME to a service through tunnel NAME (replaces an existing route)."""
    r = opts.client().post(
        f"/v1/tunnels/{quote(name)}/routes",
        {"hostname": hostname, "service": service, "public": public, "connect_timeout": connect_timeout},
    )
    if opts.json:
        return out.emit_json(r)
    verb = "Re-routed" if r.get("replaced") else "Routed"
    out.say(f"{verb} {r['hostname']} -> {_service_text(r)} through tunnel {r.get('tunnel_name', name)}"
            f" (config version {r.get('config_version')}, {'public' if r['public'] else 'not public'})")
    if r["public"]:
        example = r["hostname"].replace("*", "NAME", 1)
        out.say(f"Next: hd access tcp --hostname {example} --url 127.0.0.1:PORT")
    else:
        out.say(f"Next: allow it with an Access application (hd access app create NAME --domain {r['hostname']}"
                " --service-token TOKEN), or re-run with --public; until then it is refused")


def _service_text(route: dict) -> str:
    return route["service"] or "(connector's local config)"


# --- hd access tcp / ssh --------------------------------------------------------------------
@hd.group("access", context_settings=CONTEXT)
def access() -> None:
    """Service tokens, Access applications and the access log; reach tunnel hostnames from here."""


def access_options(fn: Callable) -> Callable:
    @click.option("--hostname", required=True, help="Tunnel hostname to reach.")
    @click.option("--service-token-id", envvar="HD_SERVICE_TOKEN_ID", metavar="ID", help="Access client id.")
    @click.option("--service-token-secret", envvar="HD_SERVICE_TOKEN_SECRET", metavar="SECRET",
                  help="Access client secret (prefer HD_SERVICE_TOKEN_SECRET: argv is visible to others).")
    @click.option("--edge-url", envvar="HD_EDGE_URL", metavar="wss://H:P", help="Edge tunnel endpoint.")
    @click.option("--edge-pin", envvar="HD_EDGE_PIN", metavar="sha256:…", help="Pin of the edge certificate.")
    @common_options
    @functools.wraps(fn)
    def wrapper(opts: Opts, hostname: str, service_token_id: str | None, service_token_secret: str | None,
                edge_url: str | None, edge_pin: str | None, **kw: Any) -> Any:
        from cli.edgeconf import resolve_edge

        hostname = _client_hostname(hostname)
        if bool(service_token_id) != bool(service_token_secret):
            raise CliError("--service-token-id and --service-token-secret go together: give both or neither")
        headers = {}
        if service_token_id:
            headers = {"CF-Access-Client-Id": service_token_id, "CF-Access-Client-Secret": service_token_secret}
        edge = resolve_edge(edge_url, edge_pin, state_dir=opts.state_dir, api_url=opts.api_url,
                            api_token=opts.api_token)
        return fn(opts, hostname, edge, headers, **kw)

    return wrapper


def _client_hostname(hostname: str) -> str:
    h = hostname.strip().lower().rstrip(".")
    if not h or "://" in h or "/" in h or ":" in h or "*" in h or " " in h:
        raise CliError(f"--hostname must be a plain hostname like db.example.com (got {hostname!r})")
    return h


@access.command("tcp")
@click.option("--url", "listen", required=True, metavar="H:P",
              help="Local address to listen on, e.g. 127.0.0.1:5432.")
@access_options
def access_tcp(opts: Opts, hostname: str, edge: Any, headers: dict, listen: str) -> None:
    """Listen locally; carry every TCP connection to HOSTNAME through the edge."""
    spec = listen.strip()
    for prefix in ("tcp://", "localhost://"):
        if spec.lower().startswith(prefix):
            spec = spec[len(prefix):]
    try:
        host, port = parse_hostport(spec, what="--url")
    except ValueError as e:
        raise CliError(str(e)) from None
    if host == "localhost":
        host = "127.0.0.1"
    from cli.access_client import serve_tcp

    if opts.json:  # for people, serve_tcp itself says where it listens
        out.emit_json({"hostname": hostname, "listen": join_hostport(host, port), "edge_url": edge.url})
    try:
        run_async(serve_tcp(edge, hostname, host, port, headers), fast_loop=True)
    except KeyboardInterrupt:
        return
    except OSError as e:
        raise CliError(f"cannot serve on {join_hostport(host, port)}: {e.strerror or e}") from None


@access.command("ssh")
@access_options
def access_ssh(opts: Opts, hostname: str, edge: Any, headers: dict) -> None:
    """Carry stdin/stdout to HOSTNAME through the edge (for ssh's ProxyCommand).

    stdout is the data stream here, so --json prints nothing.
    """
    from cli.access_client import serve_stdio

    try:
        rc = run_async(serve_stdio(edge, hostname, headers))
    except KeyboardInterrupt:
        rc = 130
    click.get_current_context().exit(int(rc or 0))


# --- hd access service-token / app / logs / keys ---------------------------------------------
class TokenDuration(click.ParamType):
    """A service-token lifetime: a duration (8760h) or "non-expiring" (None)."""

    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | None:
        if value is None or isinstance(value, (int, float)):
            return value
        if str(value).strip().lower() in ("non-expiring", "never"):
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.fail(f"{e}, or non-expiring", param, ctx)
        if seconds <= 0:
            self.fail("must be more than 0 (or non-expiring)", param, ctx)
        return seconds


def _when(value: Any, never: str = "never") -> str:
    return out.fmt_time(value) if value else never


@access.group("service-token", context_settings=CONTEXT)
def service_token() -> None:
    """Service tokens: a client id and secret that let programs through Access."""


@service_token.command("create")
@click.argument("name")
@click.option("--duration", type=TokenDuration(), default="8760h", show_default=True,
              help="Lifetime, e.g. 720h, or non-expiring.")
@common_options
def service_token_create(opts: Opts, name: str, duration: float | None) -> None:
    """Create a service token; prints its client id and secret (the secret only this once)."""
    t = opts.client().post("/v1/access/service-tokens", {"name": name, "duration": duration})
    if opts.json:
        return out.emit_json(t)
    out.say(f"Created service token {t['name']} (id {t['id']}), expires {_when(t.get('expires_at'))}")
    out.say(f"  Client ID:     {t['client_id']}")
    out.say(f"  Client secret: {t['client_secret']}")
    out.say()
    out.say("Copy the client secret now: it will not be shown again (rotate the token if it is lost).")
    out.say(f"Next: hd access app create APP --domain HOSTNAME --service-token {t['name']}")


@service_token.command("list")
@common_options
def service_token_list(opts: Opts) -> None:
    """List service tokens (never their secrets)."""
    tokens = opts.client().get("/v1/access/service-tokens")
    if opts.json:
        return out.emit_json(tokens)
    if not tokens:
        out.say("No service tokens yet.")
        out.say("Next: hd access service-token create NAME")
        return
    rows = []
    for t in tokens:
        prev = "-"
        if t.get("previous_secret_active"):
            prev = "until " + out.fmt_time(t.get("previous_secret_expires_at"))
        rows.append([t["name"], t["client_id"], t["status"], _when(t.get("expires_at")), prev,
                     out.fmt_time(t.get("created_at"))])
    out.say(out.table(["NAME", "CLIENT ID", "STATUS", "EXPIRES", "PREVIOUS SECRET", "CREATED"], rows))


@service_token.command("rotate")
@click.argument("name")
@click.option("--grace", type=Duration(), default="24h", show_default=True,
              help="How long the previous secret keeps working (0s: stop it at once; at most 720h).")
@common_options
def service_token_rotate(opts: Opts, name: str, grace: float) -> None:
    """Give a service token a new secret; the old one works for the grace period."""
    t = opts.client().post(f"/v1/access/service-tokens/{quote(name)}/rotate", {"grace": grace})
    if opts.json:
        return out.emit_json(t)
    out.say(f"Rotated service token {t['name']} (client id {t['client_id']})")
    out.say(f"New client secret: {t['client_secret']}")
    out.say()
    out.say("Copy the new secret now: it will not be shown again.")
    if grace > 0:
        out.say(f"The previous secret keeps working until {out.fmt_time(t.get('previous_secret_expires_at'))}.")
    else:
        out.say("The previous secret no longer works.")
    out.say("Next: give the new secret to every client of this token (e.g. hd hyperdrive update ID"
            " --access-client-secret …)")


@service_token.command("revoke")
@click.argument("name")
@common_options
def service_token_revoke(opts: Opts, name: str) -> None:
    """Revoke a service token at once: it can no longer open streams."""
    t = opts.client().post(f"/v1/access/service-tokens/{quote(name)}/revoke", {})
    if opts.json:
        return out.emit_json(t)
    out.say(f"Revoked service token {t['name']} (client id {t['client_id']}); new streams with it are refused.")


@access.group("app", context_settings=CONTEXT)
def access_app() -> None:
    """Access applications: which service tokens may reach which hostnames."""


@access_app.command("create")
@click.argument("name")
@click.option("--domain", "domains", multiple=True, required=True, metavar="HOST",
              help="Hostname to protect (exact or *.suffix); repeat for several.")
@click.option("--service-token", "tokens", multiple=True, metavar="NAME",
              help="Allow this service token (name, id or client id); repeat for several.")
@click.option("--any-service-token", is_flag=True, help="Allow any valid service token.")
@common_options
def access_app_create(opts: Opts, name: str, domains: tuple[str, ...], tokens: tuple[str, ...],
                      any_service_token: bool) -> None:
    """Create an Access application (Service Auth policy); prints its aud tag."""
    if not tokens and not any_service_token:
        raise click.UsageError("give at least one --service-token NAME, or --any-service-token")
    a = opts.client().post("/v1/access/apps", {"name": name, "domains": list(domains),
                                               "service_tokens": list(tokens),
                                               "any_service_token": any_service_token})
    if opts.json:
        return out.emit_json(a)
    out.say(f"Created Access application {a['name']} for {', '.join(a['domains'])}, allowing {_policy(a)}")
    out.say(f"AUD tag: {a['aud']}")
    host = a["domains"][0].replace("*", "NAME", 1)
    out.say(f"Next: hd access tcp --hostname {host} --url 127.0.0.1:PORT --service-token-id CLIENT_ID"
            " --service-token-secret SECRET (or hd hyperdrive create … --access-client-id …)")


def _policy(a: dict) -> str:
    parts = []
    if a.get("any_service_token"):
        parts.append("any service token")
    if a.get("service_tokens"):
        parts.append("service token(s) " + ", ".join(a["service_tokens"]))
    return " and ".join(parts) or "nobody"


@access_app.command("list")
@common_options
def access_app_list(opts: Opts) -> None:
    """List Access applications."""
    apps = opts.client().get("/v1/access/apps")
    if opts.json:
        return out.emit_json(apps)
    if not apps:
        out.say("No Access applications yet.")
        out.say("Next: hd access app create NAME --domain HOSTNAME --service-token TOKEN")
        return
    rows = [[a["name"], ", ".join(a["domains"]), _policy(a), a["aud"], out.fmt_time(a.get("created_at"))]
            for a in apps]
    out.say(out.table(["NAME", "DOMAINS", "ALLOWS", "AUD", "CREATED"], rows))


@access_app.command("delete")
@click.argument("name")
@common_options
def access_app_delete(opts: Opts, name: str) -> None:
    """Delete an Access application (its hostnames are refused again, unless public)."""
    a = opts.client().delete(f"/v1/access/apps/{quote(name)}")
    if opts.json:
        return out.emit_json(a)
    out.say(f"Deleted Access application {a['name']}; {', '.join(a['domains'])} no longer accept its tokens.")


@access.command("logs")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="How many of the newest decisions to show.")
@common_options
def access_logs(opts: Opts, limit: int) -> None:
    """Show recent access decisions (allow and deny), newest first."""
    entries = opts.client().get(f"/v1/access/logs?limit={limit}")
    if opts.json:
        return out.emit_json(entries)
    if not entries:
        out.say("No access decisions logged yet.")
        return
    rows = [[out.fmt_time(e.get("time")), e.get("decision"), e.get("status"),
             e.get("token_name") or e.get("client_id") or "-", e.get("app") or "-", e.get("hostname"),
             e.get("reason") or "-"] for e in entries]
    out.say(out.table(["TIME", "DECISION", "STATUS", "TOKEN", "APP", "HOSTNAME", "REASON"], rows))


@access.group("keys", context_settings=CONTEXT)
def access_keys() -> None:
    """The keys that sign Access assertions (published at /cdn-cgi/access/certs)."""


@access_keys.command("rotate")
@common_options
def access_keys_rotate(opts: Opts) -> None:
    """Rotate the signing key now; the JWKS keeps the previous key until the next rotation."""
    k = opts.client().post("/v1/access/keys/rotate", {})
    if opts.json:
        return out.emit_json(k)
    prev = f"; the previous key {k['previous_kid']} stays published until the next rotation" if k.get(
        "previous_kid") else ""
    out.say(f"Rotated the Access signing key: new key id {k['kid']}{prev}.")


# --- hd hyperdrive ---------------------------------------------------------------------------
PROBE_CLIENT_TIMEOUT = 90.0  # create/update test the origin first (the proxy gives up after 15 s)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _probe_client(opts: Opts) -> ApiClient:
    """An API client that waits for origin tests and prints their errors as
    `[2013] message (hint: …)`."""
    client = opts.client()
    client.timeout = max(client.timeout, PROBE_CLIENT_TIMEOUT)
    base = client._http_error

    def http_error(e: Any) -> str:
        raw = e.read()
        e.read = lambda *a: raw  # the base formatter reads the body again
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("code") is not None and doc.get("error"):
            text = f"[{doc['code']}] {doc['error']}"
            if doc.get("hint"):
                text += f" (hint: {doc['hint']})"
            return text
        return base(e)

    client._http_error = http_error  # type: ignore[method-assign]
    return client


def hyperdrive_options(fn: Callable) -> Callable:
    """The origin/caching/pool flags of `hd hyperdrive create` and `update` (as in wrangler)."""
    from control.store import MAX_MAX_AGE, MAX_ORIGIN_CONNECTION_LIMIT, MAX_SWR, MIN_ORIGIN_CONNECTION_LIMIT

    options = [
        click.option("--connection-string", metavar="URL",
                     help="postgresql:// or mysql://USER:PASSWORD@HOST[:PORT]/DATABASE (instead of the --origin-* flags)."),
        click.option("--origin-host", metavar="HOST",
                     help="Origin database host; with access credentials, the tunnel hostname."),
        click.option("--origin-port", type=click.IntRange(1, 65535), metavar="PORT",
                     help="Origin port (direct origins only; default 5432, 3306 for mysql)."),
        click.option("--origin-scheme", type=click.Choice(["postgresql", "postgres", "mysql"]),
                     help="Origin protocol (default postgresql)."),
        click.option("--database", metavar="NAME", help="Database name at the origin."),
        click.option("--origin-user", metavar="USER", help="User the proxy logs in to the origin as."),
        click.option("--origin-password", envvar="HD_ORIGIN_PASSWORD", show_envvar=True, metavar="PASSWORD",
                     help="Origin password (prefer HD_ORIGIN_PASSWORD: argv is visible to others)."),
        click.option("--access-client-id", metavar="ID",
                     help="Service token client id: reach the origin through a tunnel."),
        click.option("--access-client-secret", envvar="HD_ACCESS_CLIENT_SECRET", show_envvar=True, metavar="SECRET",
                     help="Service token secret (prefer HD_ACCESS_CLIENT_SECRET)."),
        click.option("--caching-disabled", type=click.BOOL, is_flag=False, flag_value="true", default=None,
                     metavar="[true|false]", help="Turn query caching off (--caching-disabled false: on again)."),
        click.option("--max-age", type=click.IntRange(1, MAX_MAX_AGE), metavar="SECONDS",
                     help=f"How long a cached result is fresh (default 60, at most {MAX_MAX_AGE})."),
        click.option("--swr", type=click.IntRange(0, MAX_SWR), metavar="SECONDS",
                     help="Stale-while-revalidate: how long a stale result may still be served (default 15)."),
        click.option("--ca-certificate-id", metavar="ID",
                     help="CA (hd cert upload certificate-authority) the origin's certificate must chain to."),
        click.option("--mtls-certificate-id", metavar="ID",
                     help="Client certificate (hd cert upload mtls-certificate) to present to the origin."),
        click.option("--sslmode", type=click.Choice(["require", "verify-ca", "verify-full", "disable"]),
                     help="TLS to the origin: require (default: encrypt), verify-ca, verify-full"
                     " (disable: no TLS, local development only)."),
        click.option("--origin-connection-limit", metavar="N",
                     type=click.IntRange(MIN_ORIGIN_CONNECTION_LIMIT, MAX_ORIGIN_CONNECTION_LIMIT),
                     help=f"Soft limit of origin connections (default 20, at least {MIN_ORIGIN_CONNECTION_LIMIT})."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_HD_FLAG_KEYS = ("connection_string", "origin_host", "origin_port", "origin_scheme", "database", "origin_user",
                 "origin_password", "access_client_id", "access_client_secret", "caching_disabled", "max_age", "swr",
                 "ca_certificate_id", "mtls_certificate_id", "sslmode", "origin_connection_limit")


def _hyperdrive_body(kw: dict, *, creating: bool) -> dict:
    """The API body from the flags: only what was given. Secrets from the environment give way to
    an explicit connection string (it carries its own password) and, on create, an access secret
    from the environment without --access-client-id is left out."""
    from proxy.configs import check_origin_flags

    ctx = click.get_current_context()
    body = {k: kw[k] for k in _HD_FLAG_KEYS if kw.get(k) is not None}
    from_env = {k for k in ("origin_password", "access_client_secret")
                if ctx.get_parameter_source(k) == ParameterSource.ENVIRONMENT}
    if "origin_password" in from_env and "connection_string" in body:
        body.pop("origin_password", None)
    if creating and "access_client_secret" in from_env and "access_client_id" not in body:
        body.pop("access_client_secret", None)
    try:
        check_origin_flags(body, creating=creating, label=_flag)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return body


def _origin_text(c: dict) -> str:
    o = c.get("origin", {})
    where = o.get("host", "?") if o.get("port") is None else join_hostport(o.get("host", "?"), o["port"])
    text = f"{o.get('scheme', 'postgresql')}://{o.get('user', '?')}@{where}/{o.get('database', '?')}"
    return text + (" via tunnel" if o.get("access_client_id") else "")


def _caching_text(c: dict) -> str:
    k = c.get("caching", {})
    if k.get("disabled"):
        return "off"
    return f"max-age {k.get('max_age')}s, swr {k.get('stale_while_revalidate')}s"


@hd.group("hyperdrive", context_settings=CONTEXT)
def hyperdrive() -> None:
    """Hyperdrive configs: pooled, cached access to an origin database through the edge's proxy."""


@hyperdrive.command("create")
@click.argument("name")
@hyperdrive_options
@common_options
def hyperdrive_create(opts: Opts, name: str, **kw: Any) -> None:
    """Create a config; its origin is tested first. Prints its id and connection string."""
    body = _hyperdrive_body(kw, creating=True)
    if "connection_string" not in body:
        missing = [_flag(k) for k in ("origin_host", "database", "origin_user") if k not in body]
        if missing:
            raise click.UsageError(f"give --connection-string, or {', '.join(missing)} (and --origin-password)")
        if "origin_password" not in body:
            raise click.UsageError("give --origin-password (or set HD_ORIGIN_PASSWORD)")
    c = _probe_client(opts).post("/v1/hyperdrive/configs", {"name": name, **body})
    if opts.json:
        return out.emit_json(c)
    out.say(f"Created Hyperdrive config {c['name']} (id {c['id']}): {_origin_text(c)}, caching {_caching_text(c)}")
    out.say("The origin answered the test connection.")
    out.say("Connection string (it holds the password of the config's generated client user):")
    out.say(c["connection_string"])
    out.say()
    out.say(f'Next: psql "$(hd hyperdrive get {c["name"]} --connection-string)"')


@hyperdrive.command("update")
@click.argument("name")
@click.option("--name", "new_name", metavar="NAME", help="Rename the config.")
@hyperdrive_options
@common_options
def hyperdrive_update(opts: Opts, name: str, new_name: str | None, **kw: Any) -> None:
    """Change the given settings (tested against the origin first). Neither purges the cache nor
    tears down the pool: new connections use the new settings."""
    body = _hyperdrive_body(kw, creating=False)
    if new_name is not None:
        body["name"] = new_name
    if not body:
        raise click.UsageError("nothing to change: give at least one setting (see --help)")
    c = _probe_client(opts).request("PATCH", f"/v1/hyperdrive/configs/{quote(name)}", body)
    if opts.json:
        return out.emit_json(c)
    out.say(f"Updated Hyperdrive config {c['name']} ({c['id']}): {_origin_text(c)}, caching {_caching_text(c)}")
    out.say("New connections use the new settings; the pool and the cache were kept.")


@hyperdrive.command("list")
@common_options
def hyperdrive_list(opts: Opts) -> None:
    """List configs (never passwords or connection strings)."""
    configs = opts.client().get("/v1/hyperdrive/configs")
    if opts.json:
        return out.emit_json(configs)
    if not configs:
        out.say("No Hyperdrive configs yet.")
        out.say("Next: hd hyperdrive create NAME --origin-host HOST --database DB --origin-user USER"
                " --origin-password …")
        return
    rows = [[c["id"], c["name"], _origin_text(c), _caching_text(c), c.get("sslmode"),
             out.fmt_time(c.get("created_at"))] for c in configs]
    out.say(out.table(["ID", "NAME", "ORIGIN", "CACHING", "SSLMODE", "CREATED"], rows))


@hyperdrive.command("get")
@click.argument("name")
@click.option("--connection-string", "want_url", is_flag=True,
              help="Print only the connection string (for psql \"$(hd hyperdrive get NAME --connection-string)\").")
@common_options
def hyperdrive_get(opts: Opts, name: str, want_url: bool) -> None:
    """Show a config; with --connection-string, only the string applications connect with."""
    path = f"/v1/hyperdrive/configs/{quote(name)}" + ("?connection_string=1" if want_url else "")
    c = opts.client().get(path)
    if opts.json:
        return out.emit_json(c)
    if want_url:
        out.say(c["connection_string"])  # alone on stdout: psql "$(hd hyperdrive get NAME --connection-string)"
        return
    o = c.get("origin", {})
    pairs = [
        ("id", c["id"]),
        ("origin", _origin_text(c)),
    ]
    if o.get("access_client_id"):
        pairs.append(("access client id", o["access_client_id"]))
    pairs += [
        ("sslmode", c.get("sslmode")),
        ("CA certificate", c.get("ca_certificate_id") or "-"),
        ("mTLS certificate", c.get("mtls_certificate_id") or "-"),
        ("caching", _caching_text(c)),
        ("origin connections", f"up to {c.get('origin_connection_limit')} (soft)"),
        ("created", out.fmt_time(c.get("created_at"))),
        ("updated", out.fmt_time(c.get("updated_at"))),
    ]
    out.say(f"Hyperdrive config {c['name']}")
    out.say(out.fields(pairs, indent=2))
    out.say(f"Next: psql \"$(hd hyperdrive get {c['name']} --connection-string)\"")


def _fmt_bytes(n: Any) -> str:
    value = float(n or 0)
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _fmt_ms(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    digits = 3 if v < 1 else 2 if v < 10 else 1 if v < 100 else 0
    return f"{v:.{digits}f} ms"


def _right_table(headers: list[str], rows: list[list[Any]], right: set[int], indent: int = 2) -> str:
    """out.table with the `right` columns right-aligned (numbers), indented."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    for i in right:
        width = max(len(r[i]) for r in cells)
        for r in cells:
            r[i] = r[i].rjust(width)
    return "\n".join(" " * indent + line for line in out.table(cells[0], cells[1:]).splitlines())


_PCTS = ("p50", "p90", "p99", "max")


def _say_metrics(m: dict, requested_s: float, api_url: str) -> None:
    q = m.get("queries", {})
    total = q.get("total", 0)
    events = q.get("by_event_status", {})
    window = m.get("window_seconds", requested_s)
    kept = f" (metrics are kept for {format_duration(m['retained_seconds'])})" if window < requested_s else ""
    out.say(f"Hyperdrive config {m['name']} ({m['id']}): the last {format_duration(window)}{kept},"
            f" since {out.fmt_time(m.get('since'))}")
    ratio = m.get("cache_hit_ratio")
    refreshes = m.get("refreshes", {})
    out.say(out.fields([
        ("queries", f"{total} ({events.get('complete', 0)} complete, {events.get('error', 0)} error)"),
        ("cache hit ratio", "- (no hits or misses)" if ratio is None else f"{ratio * 100:.1f}% (hit / (hit + miss))"),
        ("query bytes", _fmt_bytes(m.get("query_bytes"))),
        ("result bytes", _fmt_bytes(m.get("result_bytes"))),
        ("cache refreshes", f"{refreshes.get('complete', 0)} complete, {refreshes.get('error', 0)} error"),
    ], indent=2))
    by_cache = [(status, n) for status, n in q.get("by_cache_status", {}).items() if n]
    if by_cache:
        out.say()
        out.say(_right_table(["CACHE STATUS", "QUERIES", "SHARE"],
                             [[status, n, f"{100 * n / total:.1f}%"] for status, n in by_cache], {1, 2}))
    out.say()
    ql, cl = m.get("query_latency_ms", {}), m.get("connection_latency_ms", {})
    out.say(_right_table(
        ["LATENCY", "COUNT", "ERRORS", "P50", "P90", "P99", "MAX"],
        [["query", ql.get("count", 0), events.get("error", 0), *(_fmt_ms(ql.get(k)) for k in _PCTS)],
         ["connection", cl.get("count", 0), cl.get("errors", 0), *(_fmt_ms(cl.get(k)) for k in _PCTS)]],
        {1, 2, 3, 4, 5, 6},
    ))
    if total == 0:
        out.say(f'Next: send it a query: psql "$(hd hyperdrive get {m["name"]} --connection-string)"')
    else:
        out.say(f"Next: scrape {api_url}/metrics with Prometheus for every config's counters and latency histograms")


@hyperdrive.command("metrics")
@click.argument("name")
@click.option("--since", type=Duration(positive=True), default="1h", show_default=True,
              help="How far back to look, e.g. 15m, 1h or 24h (metrics are kept for 24h).")
@common_options
def hyperdrive_metrics(opts: Opts, name: str, since: float) -> None:
    """Show a config's queries by cache status and event status, query and result bytes, and
    query and connection latency percentiles."""
    client = opts.client()
    m = client.get(f"/v1/hyperdrive/configs/{quote(name)}/metrics?{urllib.parse.urlencode({'since': f'{since:g}'})}")
    if opts.json:
        return out.emit_json(m)
    _say_metrics(m, since, client.base_url)


@hyperdrive.command("delete")
@click.argument("name")
@common_options
def hyperdrive_delete(opts: Opts, name: str) -> None:
    """Delete a config; clients using its connection string are refused from now on."""
    c = opts.client().delete(f"/v1/hyperdrive/configs/{quote(name)}")
    if opts.json:
        return out.emit_json(c)
    out.say(f"Deleted Hyperdrive config {c['name']} ({c['id']}); its connection string no longer works.")


# --- hd cert ---------------------------------------------------------------------------------
def _read_pem(path: str, flag: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(2 * 1024 * 1024)
    except OSError as e:
        raise CliError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CliError(f"{flag} {path} is not a PEM file (PEM is text: -----BEGIN ...-----)") from None


@hd.group("cert", context_settings=CONTEXT)
def cert() -> None:
    """Certificates for TLS to origin databases (CA certificates and mTLS client certificates)."""


@cert.group("upload", context_settings=CONTEXT)
def cert_upload() -> None:
    """Upload a certificate authority or an mTLS client certificate."""


def _say_uploaded(c: dict) -> None:
    out.say(f"Uploaded {c['kind']} {c['name']} (id {c['id']}): {c['subject']}, expires {out.fmt_time(c['expires_on'])}")


@cert_upload.command("certificate-authority")
@click.option("--ca-cert", "ca_cert", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="PEM file with the CA certificate(s) the origin's certificate chains to.")
@click.option("--name", required=True, metavar="NAME", help="Name of the certificate.")
@common_options
def cert_upload_ca(opts: Opts, ca_cert: str, name: str) -> None:
    """Upload a CA certificate, for --sslmode verify-ca/verify-full."""
    c = opts.client().post("/v1/certificates", {"name": name, "kind": "certificate-authority",
                                                "cert_pem": _read_pem(ca_cert, "--ca-cert")})
    if opts.json:
        return out.emit_json(c)
    _say_uploaded(c)
    out.say(f"Next: hd hyperdrive update ID --ca-certificate-id {c['name']} --sslmode verify-full")


@cert_upload.command("mtls-certificate")
@click.option("--cert", "cert_file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="PEM file with the client certificate (then any intermediates).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="PEM file with its private key (unencrypted; stored encrypted).")
@click.option("--name", required=True, metavar="NAME", help="Name of the certificate.")
@common_options
def cert_upload_mtls(opts: Opts, cert_file: str, key_file: str, name: str) -> None:
    """Upload a client certificate and its key, presented to origins that ask for one."""
    c = opts.client().post("/v1/certificates", {"name": name, "kind": "mtls-certificate",
                                                "cert_pem": _read_pem(cert_file, "--cert"),
                                                "key_pem": _read_pem(key_file, "--key")})
    if opts.json:
        return out.emit_json(c)
    _say_uploaded(c)
    out.say(f"Next: hd hyperdrive update ID --mtls-certificate-id {c['name']}")


@cert.command("list")
@common_options
def cert_list(opts: Opts) -> None:
    """List certificates (never private keys)."""
    certs = opts.client().get("/v1/certificates")
    if opts.json:
        return out.emit_json(certs)
    if not certs:
        out.say("No certificates yet.")
        out.say("Next: hd cert upload certificate-authority --ca-cert FILE --name NAME")
        return
    rows = [[c["id"], c["name"], c["kind"], c["subject"], out.fmt_time(c.get("expires_on"))] for c in certs]
    out.say(out.table(["ID", "NAME", "KIND", "SUBJECT", "EXPIRES"], rows))


@cert.command("delete")
@click.argument("name")
@common_options
def cert_delete(opts: Opts, name: str) -> None:
    """Delete a certificate (refused while a Hyperdrive config uses it)."""
    c = opts.client().delete(f"/v1/certificates/{quote(name)}")
    if opts.json:
        return out.emit_json(c)
    out.say(f"Deleted {c['kind']} {c['name']} ({c['id']}).")


# --- entry point ----------------------------------------------------------------------------
def _err(message: str) -> None:
    out.warn("hd: error: " + " ".join(str(message).split()))


def run(argv: list[str] | None = None) -> int:
    """Run `hd` and return its exit status instead of exiting (tests call this)."""
    try:
        rv = hd.main(args=argv, prog_name="hd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        out.say(e.ctx.get_help())
        return 0
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _err(e.format_message() + hint)
        return 2
    except click.ClickException as e:
        _err(e.format_message())
        return e.exit_code or 1
    except CliError as e:
        _err(str(e))
        return 1
    except click.exceptions.Abort:
        _err("interrupted")
        return 130
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return rv if isinstance(rv, int) else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
