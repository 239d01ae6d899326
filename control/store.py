"""The edge's configuration store: tunnels and their routes, in SQLite.

One connection in WAL mode, used from the event loop thread; every query is short and indexed,
so running them inline is cheaper than a thread hop. Secrets are encrypted with `SecretBox`.
The schema is versioned (`schema_version`) and migrated forward on open.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from control.secretbox import SecretBox

TUNNEL_SECRET_BYTES = 32
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_CONNECT_TIMEOUT = 3600.0
CATCH_ALL_RULE = {"service": "http_status:404"}


class StoreError(Exception):
    """Base class; the message is meant for users."""


class NotFoundError(StoreError):
    pass


class ConflictError(StoreError):
    pass


class ValidationError(StoreError):
    pass


@dataclass(frozen=True)
class Tunnel:
    id: str
    name: str
    secret: bytes = field(repr=False)
    created_at: float
    config_version: int


@dataclass(frozen=True)
class Route:
    hostname: str
    tunnel_id: str
    service: str
    public: bool
    connect_timeout: float
    created_at: float


# --- schema -------------------------------------------------------------------------------
# Append a script to migrate; never edit one that has shipped.
MIGRATIONS: list[str] = [
    # 1: tunnels and routes
    """
    CREATE TABLE tunnels (
        id             TEXT PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        secret         BLOB NOT NULL,          -- SecretBox ciphertext, aad = tunnel id
        created_at     REAL NOT NULL,
        config_version INTEGER NOT NULL
    );
    CREATE TABLE routes (
        hostname        TEXT PRIMARY KEY,      -- lower-case; exact or "*.suffix"
        tunnel_id       TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
        service         TEXT NOT NULL,
        public          INTEGER NOT NULL,
        connect_timeout REAL NOT NULL,
        created_at      REAL NOT NULL
    );
    CREATE INDEX routes_by_tunnel ON routes(tunnel_id);
    """,
]


# --- validation ---------------------------------------------------------------------------
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def validate_tunnel_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("tunnel name must not be empty")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise ValidationError(
            f"invalid tunnel name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if _UUID_RE.match(name):
        # names and ids share one namespace on the command line
        raise ValidationError(f"invalid tunnel name {name!r}: a name must not look like a tunnel id")
    return name


def normalize_hostname(hostname: object) -> str:
    """Validate a route hostname: an exact DNS name or "*.suffix"; lower-cased, no port/scheme."""
    if not isinstance(hostname, str) or not hostname.strip():
        raise ValidationError("hostname must not be empty")
    raw = hostname.strip()
    h = raw.lower().rstrip(".")
    if "://" in h:
        raise ValidationError(f"invalid hostname {raw!r}: give just the name, without a scheme (e.g. db.example.com)")
    if "/" in h:
        raise ValidationError(f"invalid hostname {raw!r}: a hostname has no path")
    if ":" in h:
        raise ValidationError(f"invalid hostname {raw!r}: a hostname has no port (the service URL carries the port)")
    if len(h) > 253:
        raise ValidationError(f"invalid hostname {raw!r}: longer than 253 characters")
    labels = h.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if not labels:
            raise ValidationError(
                f"invalid hostname {raw!r}: a wildcard needs a suffix (e.g. *.example.com); the catch-all is implicit"
            )
    if any("*" in label for label in labels):
        raise ValidationError(f"invalid hostname {raw!r}: '*' is only allowed as the whole first label (*.example.com)")
    for label in labels:
        if not _LABEL_RE.match(label):
            raise ValidationError(
                f"invalid hostname {raw!r}: each label must be 1-63 letters, digits, '-' or '_'"
                " and not start or end with '-'"
            )
    return ("*." if wildcard else "") + ".".join(labels)


def normalize_service(service: object) -> str:
    """Validate a service URL and return its canonical form (ssh gets its default port 22)."""
    if not isinstance(service, str) or not service.strip():
        raise ValidationError("service must not be empty (e.g. tcp://127.0.0.1:5432)")
    s = service.strip()
    hint = "expected tcp://host:port, ssh://host[:port] or http_status:NNN"
    if s.lower().startswith("http_status:"):
        code = s[len("http_status:") :]
        if not code.isdigit() or not 100 <= int(code) <= 999:
            raise ValidationError(f"invalid service {s!r}: http_status needs a code from 100 to 999")
        return f"http_status:{int(code)}"
    if "://" not in s:
        raise ValidationError(f"invalid service {s!r}: {hint}")
    try:
        u = urlsplit(s)
        port = u.port
    except ValueError:
        raise ValidationError(f"invalid service {s!r}: bad port ({hint})") from None
    scheme = u.scheme.lower()
    if scheme not in ("tcp", "ssh"):
        raise ValidationError(f"unsupported service scheme {scheme + '://'!r} in {s!r}: {hint}")
    if u.username is not None or u.password is not None:
        raise ValidationError(f"invalid service {s!r}: credentials do not belong in the service URL")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValidationError(f"invalid service {s!r}: a service URL has no path, query or fragment")
    host = u.hostname
    if not host:
        raise ValidationError(f"invalid service {s!r}: missing host ({hint})")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        if not _HOST_RE.match(host):
            raise ValidationError(f"invalid service {s!r}: bad host {host!r}") from None
    if port is None:
        if scheme == "tcp":
            raise ValidationError(f"invalid service {s!r}: tcp:// needs a port (tcp://host:port)")
        port = 22
    if not 1 <= port <= 65535:
        raise ValidationError(f"invalid service {s!r}: port must be 1-65535")
    host_part = f"[{host}]" if ip is not None and ip.version == 6 else host
    return f"{scheme}://{host_part}:{port}"


def validate_connect_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError("connect_timeout must be a number of seconds")
    v = float(value)
    if not math.isfinite(v) or v <= 0 or v > MAX_CONNECT_TIMEOUT:
        raise ValidationError(f"connect_timeout must be more than 0 and at most {MAX_CONNECT_TIMEOUT:g} seconds")
    return v


def _rule_order(hostname: str) -> tuple:
    # exact names first; wildcards after, the most specific (longest suffix) first
    if hostname.startswith("*."):
        return (1, -len(hostname), hostname)
    return (0, 0, hostname)


# --- the store ------------------------------------------------------------------------------
class Store:
    def __init__(self, path: Path, box: SecretBox, *, clock: Callable[[], float] = time.time) -> None:
        self._box = box
        self._clock = clock
        # check_same_thread=False + a lock: the edge uses it from one loop thread, but tests and
        # tools may open it elsewhere; the lock keeps any such use safe.
        self._lock = threading.RLock()
        if str(path) != ":memory:" and not Path(path).exists():
            # created private; SQLite gives its -wal/-shm files the database file's mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA busy_timeout = 5000")
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # schema
    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self._lock, self._tx():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"the database schema (version {current}) is newer than this program understands "
                    f"(version {len(MIGRATIONS)}); upgrade hd"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for stmt in _split_sql(MIGRATIONS[version - 1]):
                    self._db.execute(stmt)
            if current == 0:
                self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))
            elif current < len(MIGRATIONS):
                self._db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))

    def _tx(self) -> "_Tx":
        return _Tx(self._db)

    # tunnels
    def _tunnel_from_row(self, row: sqlite3.Row) -> Tunnel:
        secret = self._box.decrypt(row["secret"], aad=row["id"].encode())
        return Tunnel(
            id=row["id"],
            name=row["name"],
            secret=secret,
            created_at=row["created_at"],
            config_version=row["config_version"],
        )

    def create_tunnel(self, name: str) -> Tunnel:
        name = validate_tunnel_name(name)
        tunnel_id = str(uuid.uuid4())
        secret = secrets.token_bytes(TUNNEL_SECRET_BYTES)
        now = self._clock()
        with self._lock, self._tx():
            if self._db.execute("SELECT 1 FROM tunnels WHERE name = ?", (name,)).fetchone():
                raise ConflictError(f"a tunnel named {name!r} already exists")
            self._db.execute(
                "INSERT INTO tunnels (id, name, secret, created_at, config_version) VALUES (?, ?, ?, ?, 1)",
                (tunnel_id, name, self._box.encrypt(secret, aad=tunnel_id.encode()), now),
            )
        return Tunnel(id=tunnel_id, name=name, secret=secret, created_at=now, config_version=1)

    def get_tunnel(self, id_or_name: str) -> Tunnel | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tunnels WHERE id = ?", (id_or_name,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT * FROM tunnels WHERE name = ?", (id_or_name,)).fetchone()
            return self._tunnel_from_row(row) if row else None

    def require_tunnel(self, id_or_name: str) -> Tunnel:
        tunnel = self.get_tunnel(id_or_name)
        if tunnel is None:
            raise NotFoundError(f"no tunnel named or with id {id_or_name!r}")
        return tunnel

    def list_tunnels(self) -> list[Tunnel]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tunnels ORDER BY created_at, name").fetchall()
            return [self._tunnel_from_row(r) for r in rows]

    def delete_tunnel(self, id_or_name: str) -> Tunnel | None:
        with self._lock:
            tunnel = self.get_tunnel(id_or_name)
            if tunnel is None:
                return None
            with self._tx():
                self._db.execute("DELETE FROM routes WHERE tunnel_id = ?", (tunnel.id,))
                self._db.execute("DELETE FROM tunnels WHERE id = ?", (tunnel.id,))
            return tunnel

    # routes
    @staticmethod
    def _route_from_row(row: sqlite3.Row) -> Route:
        return Route(
            hostname=row["hostname"],
            tunnel_id=row["tunnel_id"],
            service=row["service"],
            public=bool(row["public"]),
            connect_timeout=row["connect_timeout"],
            created_at=row["created_at"],
        )

    def _bump(self, tunnel_id: str) -> None:
        self._db.execute("UPDATE tunnels SET config_version = config_version + 1 WHERE id = ?", (tunnel_id,))

    def add_route(
        self,
        tunnel_id: str,
        hostname: str,
        service: str,
        public: bool,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> Route:
        """Route `hostname` to `service` through the tunnel (id or name), replacing any existing
        route for that hostname. Bumps the config version of every tunnel whose rules changed."""
        hostname = normalize_hostname(hostname)
        service = normalize_service(service)
        if not isinstance(public, bool):
            raise ValidationError("public must be true or false")
        connect_timeout = validate_connect_timeout(connect_timeout)
        with self._lock:
            tunnel = self.require_tunnel(tunnel_id)
            now = self._clock()
            with self._tx():
                old = self._db.execute("SELECT * FROM routes WHERE hostname = ?", (hostname,)).fetchone()
                if old is not None:
                    prev = self._route_from_row(old)
                    if (prev.tunnel_id, prev.service, prev.public, prev.connect_timeout) == (
                        tunnel.id, service, public, connect_timeout
                    ):
                        return prev  # nothing changed: no new config version to push
                    self._db.execute(
                        "UPDATE routes SET tunnel_id = ?, service = ?, public = ?, connect_timeout = ?,"
                        " created_at = ? WHERE hostname = ?",
                        (tunnel.id, service, int(public), connect_timeout, now, hostname),
                    )
                    if prev.tunnel_id != tunnel.id:
                        self._bump(prev.tunnel_id)
                else:
                    self._db.execute(
                        "INSERT INTO routes (hostname, tunnel_id, service, public, connect_timeout, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (hostname, tunnel.id, service, int(public), connect_timeout, now),
                    )
                self._bump(tunnel.id)
            return Route(hostname, tunnel.id, service, public, connect_timeout, now)

    def get_route(self, hostname: str) -> Route | None:
        """The route for a requested hostname: exact match first, then the longest wildcard."""
        h = (hostname or "").strip().lower()
        name, sep, port = h.rpartition(":")
        if sep and port.isdigit() and ":" not in name:
            h = name  # a Host-style "name:port": the port plays no part in routing
        h = h.rstrip(".")
        if not h:
            return None
        labels = h.split(".")
        candidates = [h] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
        marks = ",".join("?" * len(candidates))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM routes WHERE hostname IN ({marks})", candidates).fetchall()
        if not rows:
            return None
        by_name = {r["hostname"]: r for r in rows}
        for c in candidates:  # ordered: exact, then longest suffix first
            if c in by_name:
                return self._route_from_row(by_name[c])
        return None

    def get_route_exact(self, hostname: str) -> Route | None:
        """The route stored under exactly this hostname (a wildcard only matches itself)."""
        h = (hostname or "").strip().lower().rstrip(".")
        with self._lock:
            row = self._db.execute("SELECT * FROM routes WHERE hostname = ?", (h,)).fetchone()
        return self._route_from_row(row) if row else None

    def routes_for(self, tunnel_id: str) -> list[Route]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM routes WHERE tunnel_id = ?", (tunnel_id,)).fetchall()
        return sorted((self._route_from_row(r) for r in rows), key=lambda r: _rule_order(r.hostname))

    def list_routes(self) -> list[Route]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM routes").fetchall()
        return sorted((self._route_from_row(r) for r in rows), key=lambda r: _rule_order(r.hostname))

    def delete_route(self, hostname: str) -> Route | None:
        with self._lock:
            route = self.get_route_exact(hostname)
            if route is None:
                return None
            h = route.hostname
            with self._tx():
                self._db.execute("DELETE FROM routes WHERE hostname = ?", (h,))
                self._bump(route.tunnel_id)
            return route

    def ingress_config(self, tunnel_id: str) -> tuple[int, list[dict]]:
        """(config_version, ingress rules) to push to the tunnel's connectors."""
        with self._lock:
            row = self._db.execute("SELECT config_version FROM tunnels WHERE id = ?", (tunnel_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no tunnel with id {tunnel_id!r}")
            rules = [
                {
                    "hostname": r.hostname,
                    "service": r.service,
                    "originRequest": {"connectTimeout": r.connect_timeout},
                }
                for r in self.routes_for(tunnel_id)
            ]
            return int(row[0]), rules + [dict(CATCH_ALL_RULE)]


class _Tx:
    """BEGIN IMMEDIATE … COMMIT/ROLLBACK; nests by doing nothing when already inside one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._outer:
            return
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


def _split_sql(script: str) -> list[str]:
    # Migrations contain no literal semicolons inside strings; comments are stripped first.
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
