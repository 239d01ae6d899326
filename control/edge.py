"""`hd edge`: wires the state directory, store, relay and control API into one process.

State directory layout (ARCHITECTURE.md): edge.lock (held while an edge runs: one edge per state
dir), secret.key, the certificates (control/certs.py), state.db, admin-token, and edge.json —
written last, atomically, once every listener is up, so anyone (tests, scripts) can poll for it to
know the edge is ready.

Access signing keys live (encrypted) in the store: one is made on first start, and a background
task rotates it when the newest is older than `key_rotation` (the JWKS keeps the previous one).
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from control.addr import join_hostport, parse_hostport
from access.assertion import SigningKey
from control.api import SERVER_LIMITS, make_app
from control.certs import CertError, EdgeTls, load_edge_tls
from control.secretbox import KEY_FILE, SecretBox, SecretBoxError
from control.store import TOKEN_HASH_LABEL, Store, StoreError
from tunnel.tls import write_private_file

log = logging.getLogger("hd.edge")

DEFAULT_API_LISTEN = "127.0.0.1:8787"
DEFAULT_TUNNEL_LISTEN = "127.0.0.1:7844"
DEFAULT_PG_LISTEN = "127.0.0.1:6432"
DEFAULT_MYSQL_LISTEN = "127.0.0.1:3307"
EDGE_JSON = "edge.json"
LOCK_FILE = "edge.lock"
ADMIN_TOKEN_FILE = "admin-token"
DB_FILE = "state.db"
DEFAULT_KEY_ROTATION = 1008 * 3600.0  # 6 weeks, as Cloudflare Access
KEY_CHECK_INTERVAL = 600.0
TLS_REFRESH_INTERVAL = 60.0  # how soon a renewed --tls-cert (e.g. by an ACME client) is served
CLIENT_TLS_MODES = ("require", "allow")

# relay_factory(store, ssl_context, hash_key=..., quic_cert=(cert, key)) -> the relay (relay.server.Relay)
RelayFactory = Callable[..., Any]
# proxy_factory(store, relay) -> the database proxy the control API uses (control.api.Proxy:
# probe, config_changed, config_deleted)
ProxyFactory = Callable[..., Any]


class EdgeError(Exception):
    """A startup problem the user can fix (bad address, port in use, unreadable state)."""


def _reachable_host(host: str) -> str:
    """The address a local client should dial for a listener bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def load_or_create_admin_token(state_dir: Path) -> str:
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_private_file(path, (token + "\n").encode())
    return token


def _is_wildcard(host: str) -> bool:
    try:
        return host in ("", "*") or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cert_names(hosts: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    """The names the listener certificate carries besides localhost/127.0.0.1/::1: the listen
    hosts, the advertised one, `--tls-name`s, and this machine's name when a listener takes every
    address (clients on the network may reach it by that name)."""
    names = [h for h in (*hosts, *extra) if not _is_wildcard(h)]
    if any(_is_wildcard(h) for h in hosts):
        names.append(socket.gethostname())
    return names


def client_tls_required(mode: str | None, listeners: dict[str, str]) -> frozenset[str]:
    """The listeners ("postgres", "mysql") that refuse plaintext clients: all with `require`, none
    with `allow`; by default (None) those bound anywhere but loopback (PgBouncer's client_tls_sslmode)."""
    if mode is not None and mode not in CLIENT_TLS_MODES:
        raise EdgeError(f"--client-tls must be one of {', '.join(CLIENT_TLS_MODES)} (got {mode!r})")
    out = set()
    for kind, host in listeners.items():
        if mode == "require" or (mode is None and not _is_loopback(host)):
            out.add(kind)
    return frozenset(out)


def lock_state_dir(state_dir: Path) -> int:
    """Take the state dir's lock (released when the returned fd is closed, or the process dies);
    EdgeError naming the holder's pid when another edge has it. Touches nothing else."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise EdgeError(f"another edge (pid {holder or 'unknown'}) is using this state dir ({state_dir});"
                        " stop it first, or give this one its own --state-dir") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def rotate_signing_key_if_due(store: Store, max_age: float, now: float | None = None) -> SigningKey | None:
    """Make a new signing key when there is none or the newest is `max_age` old; returns it."""
    now = time.time() if now is None else now
    keys = store.signing_keys()
    if keys and now - keys[0][1] < max_age:
        return None
    key = SigningKey.generate(now)
    store.add_signing_key(key.private_pem(), key.created_at)
    log.info("access signing key %s: kid %s", "rotated" if keys else "created", key.kid)
    return key


async def _key_rotation_loop(store: Store, relay: Any, max_age: float, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            keys = store.signing_keys()
            if keys and time.time() - keys[0][1] < max_age:
                continue
            key = await asyncio.to_thread(SigningKey.generate)  # RSA generation: off the loop
            # re-check: `hd access keys rotate` may have rotated meanwhile
            keys = store.signing_keys()
            if keys and key.created_at - keys[0][1] < max_age:
                continue
            store.add_signing_key(key.private_pem(), key.created_at)
            log.info("access signing key rotated (older than %gs): kid %s", max_age, key.kid)
            relay.keys_rotated()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("access signing key rotation failed; retrying in %gs", interval)


async def _tls_refresh_loop(tls: EdgeTls, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(tls.refresh)
        except asyncio.CancelledError:
            raise
        except CertError as e:
            log.error("listener certificate not reloaded (the previous one is still served): %s", e)
        except Exception:
            log.exception("listener certificate check failed; retrying in %gs", interval)


async def _start_listener(flag: str, what: str, host: str, port: int, start: Any, bound_port: Any,
                          advertised_host: str | None) -> str:
    """Start one proxy listener; returns the address clients reach it at (the bound port for :0;
    for a listener on every address, the advertised host, which the certificate carries)."""
    try:
        await start(host, port)
    except OSError as e:
        raise EdgeError(f"cannot listen for {what} clients on {join_hostport(host, port)}: {e.strerror or e}") from None
    client_host = (advertised_host or _reachable_host(host)) if _is_wildcard(host) else host
    return join_hostport(client_host, bound_port())


async def run_edge(
    state_dir: Path,
    api_listen: str = DEFAULT_API_LISTEN,
    tunnel_listen: str = DEFAULT_TUNNEL_LISTEN,
    ready_callback: Callable[[dict], Any] | None = None,
    *,
    advertise: str | None = None,
    pg_listen: str | None = None,
    mysql_listen: str | None = None,
    relay_factory: RelayFactory | None = None,
    proxy_factory: ProxyFactory | None = None,
    stop_event: asyncio.Event | None = None,
    key_rotation: float = DEFAULT_KEY_ROTATION,
    key_check_interval: float = KEY_CHECK_INTERVAL,
    proxy_options: dict[str, Any] | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    tls_ca: str | os.PathLike | None = None,
    tls_names: tuple[str, ...] = (),
    client_tls: str | None = None,
    tls_refresh_interval: float = TLS_REFRESH_INTERVAL,
) -> None:
    """Run the edge until SIGINT/SIGTERM (or `stop_event`, for embedding and tests).

    `ready_callback(info)` is called with the edge.json contents once everything listens.
    `relay_factory(store, ssl_context, hash_key=...)` defaults to `relay.server.Relay`.
    `proxy_factory(store, relay)` makes the database proxy handed to the control API (it tests the
    origins of Hyperdrive configs); `pg_listen` / `mysql_listen` ("H:P", port 0: any free port; None:
    no such listener) are where the proxy takes Postgres / MySQL clients, and the bound addresses go
    into edge.json and connection strings.
    `key_rotation`: the age (seconds) at which the Access signing key is replaced, checked at
    start and every `key_check_interval` seconds.
    TLS (control/certs.py): the listeners present a certificate signed by the edge's CA for
    `tls_names` and every address in use, or the operator's `tls_cert`/`tls_key` (verified with
    `tls_ca`), checked for renewal every `tls_refresh_interval` seconds. `client_tls` ("require",
    "allow", None: require unless bound to loopback) decides whether plaintext clients are refused.
    A lock on the state dir is taken first: a second edge on it stops before touching anything.
    """
    if not (isinstance(key_rotation, (int, float)) and key_rotation > 0):
        raise EdgeError("--key-rotation must be a positive duration, e.g. 1008h")
    try:
        api_host, api_port = parse_hostport(api_listen, what="--api-listen")
        tun_host, tun_port = parse_hostport(tunnel_listen, what="--tunnel-listen")
        adv_host, adv_port = (
            parse_hostport(advertise, what="--advertise", default_port=0) if advertise else (None, None)
        )
        pg_addr = parse_hostport(pg_listen, what="--pg-listen") if pg_listen else None
        mysql_addr = parse_hostport(mysql_listen, what="--mysql-listen") if mysql_listen else None
    except ValueError as e:
        raise EdgeError(str(e)) from None
    required_tls = client_tls_required(
        client_tls, {k: a[0] for k, a in (("postgres", pg_addr), ("mysql", mysql_addr)) if a is not None})

    if relay_factory is None:
        from relay.server import Relay  # the data plane; imported late so the control plane stands alone

        relay_factory = Relay

    state_dir = Path(state_dir).expanduser().absolute()
    lock_fd: int | None = None
    try:
        if not state_dir.exists():
            state_dir.mkdir(parents=True, mode=0o700)
            os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
        lock_fd = lock_state_dir(state_dir)  # before anything else is read or written
        # A stale edge.json from an earlier run must not announce readiness before we listen.
        (state_dir / EDGE_JSON).unlink(missing_ok=True)
        box = SecretBox.load_or_create(state_dir / KEY_FILE)
        tls = load_edge_tls(
            state_dir,
            _cert_names([h for h in (adv_host, tun_host, api_host, *(a[0] for a in (pg_addr, mysql_addr) if a))
                         if h is not None], extra=tuple(tls_names)),
            tls_cert=Path(tls_cert) if tls_cert else None, tls_key=Path(tls_key) if tls_key else None,
            tls_ca=Path(tls_ca) if tls_ca else None)
        pin = tls.pin
        admin_token = load_or_create_admin_token(state_dir)
        store = Store(state_dir / DB_FILE, box)
    except EdgeError:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    except CertError as e:
        os.close(lock_fd)  # type: ignore[arg-type]  # set: CertError comes after the lock
        raise EdgeError(str(e)) from None
    except OSError as e:
        if lock_fd is not None:
            os.close(lock_fd)
        raise EdgeError(f"cannot use state directory {state_dir}: {e.strerror or e}") from None
    except (sqlite3.Error, StoreError, SecretBoxError) as e:
        if lock_fd is not None:
            os.close(lock_fd)
        raise EdgeError(f"cannot open the state in {state_dir}: {e}") from None
    # The key service-token secrets are hashed under; the API hashes new secrets, the relay checks them.
    hash_key = box.derive_key(TOKEN_HASH_LABEL)
    try:
        rotate_signing_key_if_due(store, key_rotation)  # first start, or the edge was down a while
    except (sqlite3.Error, StoreError, SecretBoxError) as e:
        store.close()
        os.close(lock_fd)
        raise EdgeError(f"cannot use the Access signing keys in {state_dir}: {e}") from None

    relay: Any = None
    rotation_task: asyncio.Task | None = None
    tls_task: asyncio.Task | None = None
    runner: web.AppRunner | None = None
    proxy: Any = None
    relay_started = False
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    installed: list[int] = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (embedded in tests): rely on stop_event
        # The relay presents its pinned certificate (tokens carry the pin), the listeners theirs.
        relay = relay_factory(store, tls.relay_context(), hash_key=hash_key,
                              quic_cert=(tls.relay_cert, tls.relay_key))
        try:
            await relay.start(tun_host, tun_port)
            relay_started = True
        except OSError as e:
            raise EdgeError(
                f"cannot listen for tunnels on {join_hostport(tun_host, tun_port)}: {e.strerror or e}"
            ) from None
        bound_tun_port = relay.port
        tunnel_address = join_hostport(adv_host or _reachable_host(tun_host), adv_port or bound_tun_port)
        issuer = f"https://{tunnel_address}"
        relay.issuer = issuer  # the iss claim of the assertions it mints
        edge_info: dict[str, Any] = {
            "api_url": None,  # filled in below, once the API has bound its port
            "tunnel_url": f"wss://{tunnel_address}",
            "tunnel_address": tunnel_address,
            "cert_pin": pin,
            "issuer": issuer,
            # what applications verify the listeners with (connection strings' sslrootcert / ssl-ca)
            "ca_path": str(tls.ca_path) if tls.ca_path is not None else None,
            "client_tls": {kind: "require" if kind in required_tls else "allow"
                           for kind, a in (("postgres", pg_addr), ("mysql", mysql_addr)) if a is not None},
        }
        if pg_listen:
            edge_info["pg_listen"] = pg_listen  # the address put in Hyperdrive connection strings
        if mysql_listen:
            edge_info["mysql_listen"] = mysql_listen
        if proxy_factory is None and (pg_listen or mysql_listen):
            proxy_factory = _default_proxy_factory(
                f"wss://{join_hostport(_reachable_host(tun_host), bound_tun_port)}", pin,
                tls.listener_context, proxy_options or {})
        proxy = proxy_factory(store, relay) if proxy_factory is not None else None
        if proxy is not None:
            # read by the listeners at each client's startup (proxy/pg/listener.py, proxy/mysql/session.py)
            proxy.client_tls_required = required_tls
        if proxy is not None and pg_addr and hasattr(proxy, "start"):
            edge_info["pg_listen"] = await _start_listener(
                "--pg-listen", "Postgres", *pg_addr, proxy.start, lambda: proxy.port, adv_host)
        if proxy is not None and mysql_addr and hasattr(proxy, "start_mysql"):
            edge_info["mysql_listen"] = await _start_listener(
                "--mysql-listen", "MySQL", *mysql_addr, proxy.start_mysql, lambda: proxy.mysql_port, adv_host)
        for kind in ("pg_listen", "mysql_listen"):
            host = parse_hostport(edge_info[kind], what=kind)[0] if edge_info.get(kind) else None
            if host is not None and not tls.listener_covers(host):
                log.warning("connection strings name %s, which the listener certificate %s does not cover:"
                            " drivers that verify the edge will refuse it (give --advertise with a name it"
                            " carries)", host, tls.listener_cert)

        app = make_app(store, relay, admin_token=admin_token, edge_info=edge_info, hash_key=hash_key,
                       proxy=proxy)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **SERVER_LIMITS)
        await runner.setup()
        try:
            await web.TCPSite(runner, api_host, api_port).start()
        except OSError as e:
            raise EdgeError(
                f"cannot listen for the control API on {join_hostport(api_host, api_port)}: {e.strerror or e}"
            ) from None
        bound_api_port = runner.addresses[0][1]
        edge_info["api_url"] = f"http://{join_hostport(_reachable_host(api_host), bound_api_port)}"
        rotation_task = asyncio.create_task(
            _key_rotation_loop(store, relay, key_rotation, key_check_interval), name="key-rotation"
        )
        tls_task = asyncio.create_task(_tls_refresh_loop(tls, tls_refresh_interval), name="tls-refresh")

        info = {**edge_info, "pid": os.getpid()}
        write_private_file(state_dir / EDGE_JSON, (json.dumps(info, indent=2) + "\n").encode())

        _say(f"hd edge: control API listening on http://{join_hostport(api_host, bound_api_port)}")
        _say(
            f"hd edge: tunnel relay listening on wss://{join_hostport(tun_host, bound_tun_port)}"
            f" (tokens use {tunnel_address}, pin {pin})"
        )
        if ready_callback is not None:
            result = ready_callback(info)
            if inspect.isawaitable(result):
                await result
        await stop.wait()
        _say("hd edge: shutting down")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        for task in (rotation_task, tls_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if runner is not None:
            await runner.cleanup()
        if proxy is not None and hasattr(proxy, "close"):
            try:
                await proxy.close()
            except Exception:
                log.exception("error while closing the proxy")
        if relay is not None:
            try:
                await relay.close()  # also after a failed start: it may hold half-opened sockets
            except Exception:
                if relay_started:
                    log.exception("error while closing the relay")
        store.close()
        os.close(lock_fd)  # last: the next edge on this state dir may start now


def _default_proxy_factory(tunnel_url: str, pin: str, client_tls: Any, options: dict[str, Any]) -> ProxyFactory:
    """The database proxy (Postgres and MySQL), reaching tunnel origins through this edge's own relay."""

    def make(store: Any, relay: Any) -> Any:
        from proxy.service import ProxyService
        from tunnel.client import Endpoint

        # Tunnel origins go through the relay in this same process: it hands the proxy the
        # connector's streams directly (no socket, no TLS, no second mux).
        session = None
        if hasattr(relay, "open_local"):
            from relay.server import LocalEdgeSession

            session = LocalEdgeSession(relay)
        return ProxyService(store, edge=Endpoint(tunnel_url, pin), ssl_context=client_tls,
                            edge_session=session, **options)

    return make


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
