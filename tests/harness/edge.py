"""The edge, the connector and the access client as real processes.

    edge = EdgeProc(state_dir).start()          # hd edge --state-dir D --api-listen 127.0.0.1:0 ...
    t = edge.hd("tunnel", "create", "vpc-01")   # runs `hd ... --json` with HD_STATE_DIR=D, parsed JSON
    edge.hd("tunnel", "route", "vpc-01", "db.example", "--service", echo.url, "--public")
    conn = ConnectorProc(edge, t["token"], tunnel=t["id"]).start()   # waits for >= 1 live connection
    fwd = AccessTcpProc(edge, "db.example").start()                   # waits until its port listens
    ... connect to 127.0.0.1:fwd.port ...
    fwd.stop(); conn.stop(); edge.stop()

Readiness: ``hd edge`` writes ``STATE_DIR/edge.json`` (``api_url``, ``tunnel_url``,
``tunnel_address``, ``cert_pin``) last, atomically, once every listener is up (and removes a stale
one first); we poll for a parsable file *and* the API port accepting connections.
"""

from __future__ import annotations

import base64
import json as _json
import os
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from .procs import (Proc, base_env, can_connect, connector_argv, free_port, hd_argv, run,
                    wait_listening)

START_TIMEOUT = 30.0
EDGE_INFO_KEYS = ("api_url", "tunnel_url", "cert_pin")
# the CLI must find the edge through the state dir, never through the caller's environment
_API_ENV = ("HD_API_URL", "HD_API_TOKEN")


class HdError(AssertionError):
    """An `hd` invocation failed (non-zero exit or unparsable --json output)."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str, why: str = ""):
        self.argv, self.returncode, self.stdout, self.stderr = list(argv), returncode, stdout, stderr
        super().__init__(f"{why or 'hd failed'} (exit {returncode}): {' '.join(argv[2:])}\n"
                         f"stderr: {stderr.strip()}\nstdout: {stdout.strip()[:2000]}")


def _hostport(url: str) -> tuple[str, int]:
    u = urlsplit(url if "://" in url else f"x://{url}")
    return u.hostname, u.port


class EdgeProc:
    """``hd edge`` in a subprocess with its own state dir (a temp dir unless given)."""

    def __init__(self, state_dir: str | os.PathLike | None = None, *, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, api_listen: str = "127.0.0.1:0",
                 tunnel_listen: str = "127.0.0.1:0"):
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="hd-edge-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.api_listen = api_listen
        self.tunnel_listen = tunnel_listen
        self.proc: Proc | None = None
        self.info: dict[str, Any] = {}
        self._generation = 0
        self.children: list[Proc] = []  # connectors / access clients started against this edge

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def edge_json_path(self) -> Path:
        return self.state_dir / "edge.json"

    def _read_info(self) -> dict | None:
        try:
            info = _json.loads(self.edge_json_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or not all(info.get(k) for k in EDGE_INFO_KEYS):
            return None
        return info

    def start(self, timeout: float = START_TIMEOUT) -> "EdgeProc":
        if self.proc is not None and self.proc.alive():
            return self
        self._generation += 1
        argv = hd_argv("edge", "--state-dir", self.state_dir, "--api-listen", self.api_listen,
                       "--tunnel-listen", self.tunnel_listen,
                       *([] if "--pg-listen" in self.extra_args else ["--pg-listen", "127.0.0.1:0"]),
                       *([] if "--mysql-listen" in self.extra_args else ["--mysql-listen", "127.0.0.1:0"]),
                       *self.extra_args)
        env = {**self.env}
        self.proc = Proc(argv, env=env, name=f"edge{self._generation}", log_dir=self.state_dir / "logs",
                         cwd=self.state_dir, drop_env=_API_ENV + ("HD_STATE_DIR",))

        def ready():
            info = self._read_info()
            if info is None:
                return None
            host, port = _hostport(info["api_url"])
            return info if can_connect(host, port, timeout=1.0) else None

        try:
            self.info = self.proc.wait_for(ready, timeout, what=f"{self.edge_json_path} and the API")
        except BaseException:
            self.proc.stop(timeout=5)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(sig, timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> "EdgeProc":
        """Stop and start on the same state dir (ports change when they were :0)."""
        self.stop()
        return self.start(timeout)

    def stop_children(self, timeout: float = 10.0) -> None:
        for p in self.children:
            p.stop(timeout=timeout)

    def diagnostics(self, lines: int = 60) -> str:
        """Log tails of the edge and of every connector/access client started against it."""
        parts = [p.diagnostics(lines) for p in ([self.proc] if self.proc else []) + self.children]
        return "\n".join(parts)

    def cleanup(self) -> None:
        self.stop_children()
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> "EdgeProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- addresses -----------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return self.info["api_url"]

    @property
    def tunnel_url(self) -> str:
        return self.info["tunnel_url"]

    @property
    def tunnel_address(self) -> str:
        addr = self.info.get("tunnel_address")
        if addr:
            return addr
        u = urlsplit(self.tunnel_url)
        return u.netloc

    @property
    def cert_pin(self) -> str:
        return self.info["cert_pin"]

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin-token").read_text().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    # -- the CLI -------------------------------------------------------------------------------

    def cli_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"HD_STATE_DIR": str(self.state_dir)}
        if extra:
            env.update(extra)
        return env

    def run_hd(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0,
               input: str | None = None):
        argv = hd_argv(*args)
        full_env = base_env(self.cli_env(env), drop=_API_ENV)
        return argv, run(argv, env=full_env, timeout=timeout, input=input, inherit_env=False)

    def hd(self, *args: str, json: bool = True, env: Mapping[str, str] | None = None,
           timeout: float = 60.0, input: str | None = None):
        """Run ``hd ARGS [--json]`` against this edge; return the parsed JSON (or stdout text when
        ``json=False``). Raises ``HdError`` (with stderr) on a non-zero exit."""
        args = [str(a) for a in args] + (["--json"] if json and "--json" not in args else [])
        argv, cp = self.run_hd(*args, env=env, timeout=timeout, input=input)
        if cp.returncode != 0:
            raise HdError(argv, cp.returncode, cp.stdout, cp.stderr)
        if not json:
            return cp.stdout
        try:
            return _json.loads(cp.stdout)
        except ValueError:
            raise HdError(argv, cp.returncode, cp.stdout, cp.stderr,
                          why="--json output is not exactly one JSON document") from None

    def hd_fail(self, *args: str, json: bool = False, env: Mapping[str, str] | None = None,
                timeout: float = 60.0, input: str | None = None) -> tuple[int, str]:
        """Run an ``hd`` command that must fail; returns (returncode, stderr). Raises if it succeeded."""
        args = [str(a) for a in args] + (["--json"] if json and "--json" not in args else [])
        argv, cp = self.run_hd(*args, env=env, timeout=timeout, input=input)
        if cp.returncode == 0:
            raise HdError(argv, 0, cp.stdout, cp.stderr, why="expected hd to fail but it succeeded")
        return cp.returncode, cp.stderr

    # -- REST API (direct) ---------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None,
            timeout: float = 10.0) -> tuple[int, Any]:
        """Call the control API directly: returns (status, parsed JSON body or text)."""
        data = _json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.admin_token if token is None else token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, _json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def tunnel_connections(self, tunnel: str, protocol: str | None = None) -> int:
        """Live connections of a tunnel as reported by ``hd tunnel info NAME --json`` (only those
        over `protocol` when given)."""
        info = self.hd("tunnel", "info", tunnel)
        if protocol is not None:
            info = dict(info, connections=[c for c in info.get("connections") or []
                                           if isinstance(c, dict) and c.get("protocol") == protocol])
        return count_connections(info)


def count_connections(info: Mapping[str, Any]) -> int:
    """Count live connections in a tunnel-info document: ``connections`` may be an int, a list of
    connections, or a list of connector replicas each carrying its own ``connections`` list."""
    conns = info.get("connections")
    if isinstance(conns, int):
        return conns
    if not isinstance(conns, list):
        return 0
    n = 0
    for c in conns:
        if isinstance(c, dict) and isinstance(c.get("connections"), (list, int)):
            inner = c["connections"]
            n += inner if isinstance(inner, int) else len(inner)
        else:
            n += 1
    return n


def tunnel_id_from_token(token: str) -> str | None:
    """Best effort: the tunnel id inside a token (base64 of JSON); None if it does not decode."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = _json.loads(raw)
    except (ValueError, TypeError):
        return None
    for key in ("tunnel_id", "t", "id", "tunnelID", "TunnelID"):
        if isinstance(doc, dict) and isinstance(doc.get(key), str):
            return doc[key]
    return None


class ConnectorProc:
    """``hd-connector --token T`` in a subprocess; ``start()`` waits until the edge reports at
    least ``min_connections`` live connections for the tunnel (``hd tunnel info ID --json``)."""

    # Tests that run once per transport set this (tests/e2e/test_tunnel_e2e.py): every connector
    # then dials with --protocol X and start() waits for connections over X specifically.
    default_protocol: str | None = None

    def __init__(self, edge: EdgeProc, token: str, *, tunnel: str | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, name: str = "connector", use_token_flag: bool = True,
                 protocol: str | None = None):
        self.edge = edge
        self.protocol = protocol or ConnectorProc.default_protocol
        self.token = token
        self.tunnel = tunnel or tunnel_id_from_token(token)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.name = name
        self.use_token_flag = use_token_flag
        self.proc: Proc | None = None

    def start(self, min_connections: int = 1, timeout: float = START_TIMEOUT) -> "ConnectorProc":
        proto = ["--protocol", self.protocol] if self.protocol and "--protocol" not in self.extra_args else []
        argv = connector_argv(*(["--token", self.token] if self.use_token_flag else []), *proto, *self.extra_args)
        env = {k: v for k, v in self.env.items()}
        self.proc = Proc(argv, env=env, name=self.name, log_dir=self.edge.state_dir / "logs",
                         cwd=self.edge.state_dir)
        self.edge.children.append(self.proc)
        if min_connections > 0:
            self.wait_connections(min_connections, timeout)
        return self

    def wait_connections(self, n: int = 1, timeout: float = START_TIMEOUT) -> int:
        if not self.tunnel:
            raise ValueError("ConnectorProc needs tunnel= (the tunnel id or name) to check connections")
        proto = self.protocol if self.protocol in ("quic", "websocket") else None
        return self.proc.wait_for(
            lambda: (lambda c: c if c >= n else 0)(self.edge.tunnel_connections(self.tunnel, proto)),
            timeout, what=f">= {n} live {proto or ''} connections of tunnel {self.tunnel}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        return self.proc.stop(sig, timeout) if self.proc else None

    def __enter__(self) -> "ConnectorProc":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class AccessTcpProc:
    """``hd access tcp --hostname H --url 127.0.0.1:PORT [--service-token-id … --service-token-secret …]``
    with ``HD_STATE_DIR`` of the edge; ``start()`` waits until PORT is listening.

    Readiness is read from /proc/net/tcp (LISTEN state) rather than by connecting, because every
    accepted connection opens a stream through the edge (and may count as an access decision)."""

    def __init__(self, edge: EdgeProc, hostname: str, *, port: int | None = None,
                 service_token_id: str | None = None, service_token_secret: str | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None, name: str = "access-tcp"):
        self.edge = edge
        self.hostname = hostname
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.service_token_id = service_token_id
        self.service_token_secret = service_token_secret
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.name = name
        self.proc: Proc | None = None

    def start(self, timeout: float = START_TIMEOUT) -> "AccessTcpProc":
        args = ["access", "tcp", "--hostname", self.hostname, "--url", f"{self.host}:{self.port}"]
        if self.service_token_id is not None:
            args += ["--service-token-id", self.service_token_id]
        if self.service_token_secret is not None:
            args += ["--service-token-secret", self.service_token_secret]
        env = dict(self.env)
        env.setdefault("HD_STATE_DIR", str(self.edge.state_dir))
        # the caller's HD_API_URL/HD_API_TOKEN must not redirect the client away from this edge
        self.proc = Proc(hd_argv(*args, *self.extra_args), env=env, name=self.name,
                         log_dir=self.edge.state_dir / "logs", cwd=self.edge.state_dir, drop_env=_API_ENV)
        self.edge.children.append(self.proc)
        wait_listening(self.host, self.port, timeout, proc=self.proc)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        return self.proc.stop(sig, timeout) if self.proc else None

    def __enter__(self) -> "AccessTcpProc":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
