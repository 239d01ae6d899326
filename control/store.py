"""The edge's configuration store: tunnels, routes, Access state, Hyperdrive configs and origin
certificates, in SQLite.

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

# (cryptography is imported where certificates are parsed: the rest of the store does without it)

TUNNEL_SECRET_BYTES = 32
TOKEN_HASH_LABEL = b"service-token-hash"  # SecretBox.derive_key label of the service-token hash key
SIGNING_KEY_AAD = b"signing-key"
SIGNING_KEYS_KEPT = 2  # current + previous (both published in the JWKS)
ACCESS_LOG_MAX_ROWS = 100_000
ACCESS_LOG_KEYS = ("time", "decision", "status", "client_id", "token_id", "token_name", "app", "hostname",
                   "reason", "source")
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_CONNECT_TIMEOUT = 3600.0
CATCH_ALL_RULE = {"service": "http_status:404"}
LOCAL_SERVICE = ""  # a route's service when the connector's local --config decides where the hostname goes


class StoreError(Exception):
    """Base class; the message is meant for users."""


class NotFoundError(StoreError):
    pass


class ConflictError(StoreError):
    pass


class ValidationError(StoreError):
    pass


# --- Hyperdrive configs and origin certificates --------------------------------------------
HYPERDRIVE_FIELDS = (
    "name", "scheme", "host", "port", "database", "user", "password", "access_client_id",
    "access_client_secret", "sslmode", "ca_certificate_id", "mtls_certificate_id", "caching_disabled",
    "max_age", "swr", "origin_connection_limit",
)
HYPERDRIVE_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql"}
DEFAULT_ORIGIN_PORTS = {"postgresql": 5432, "mysql": 3306}
# "disable" (no TLS to the origin) goes beyond Hyperdrive, for local development only; never the default.
SSLMODES = ("require", "verify-ca", "verify-full", "disable")
DEFAULT_SSLMODE = "require"
DEFAULT_MAX_AGE = 60
MAX_MAX_AGE = 3600
DEFAULT_SWR = 15
MAX_SWR = 86400
DEFAULT_ORIGIN_CONNECTION_LIMIT = 20
MIN_ORIGIN_CONNECTION_LIMIT = 5
MAX_ORIGIN_CONNECTION_LIMIT = 1000
MAX_IDENTIFIER_BYTES = 63  # Postgres NAMEDATALEN - 1: user and database names
MAX_SECRET_CHARS = 1024
CLIENT_USER_PREFIX = "hd_"
CERT_KINDS = ("certificate-authority", "mtls-certificate")
MAX_PEM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class HyperdriveConfig:
    """A Hyperdrive configuration: the origin, how to reach it, caching and pool settings, and the
    generated credentials clients log in to the proxy with (the proxy finds the config by
    `client_user`). Secrets are decrypted on read; `client_scram` is the SCRAM-SHA-256 secret of
    `client_password` (the form Postgres keeps in pg_authid.rolpassword)."""

    id: str
    name: str
    scheme: str
    host: str
    port: int | None  # None: through a tunnel (access credentials), the route decides the port
    database: str
    user: str
    password: str = field(repr=False)
    access_client_id: str | None
    access_client_secret: str | None = field(repr=False)
    sslmode: str
    ca_certificate_id: str | None
    mtls_certificate_id: str | None
    caching_disabled: bool
    max_age: int
    swr: int
    origin_connection_limit: int
    client_user: str
    client_password: str = field(repr=False)
    client_scram: str = field(repr=False)
    created_at: float
    updated_at: float

    @property
    def via_tunnel(self) -> bool:
        return self.access_client_id is not None


@dataclass(frozen=True)
class Certificate:
    id: str
    name: str
    kind: str  # "certificate-authority" | "mtls-certificate"
    cert_pem: bytes
    key_pem: bytes | None = field(repr=False)  # mTLS only; encrypted at rest
    subject: str
    issuer: str
    expires_on: float
    created_at: float


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
    service: str  # LOCAL_SERVICE ("") when the connector's local config decides
    public: bool
    connect_timeout: float
    created_at: float


@dataclass(frozen=True)
class ServiceToken:
    id: str
    name: str
    client_id: str
    secret_hash: str = field(repr=False)
    prev_secret_hash: str | None = field(repr=False)
    prev_expires_at: float | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class AccessApp:
    id: str
    name: str
    aud: str
    domains: tuple[str, ...]
    token_ids: tuple[str, ...]
    any_token: bool
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
    # 2: Access: service tokens, applications, signing keys, access log
    """
    CREATE TABLE service_tokens (
        id               TEXT PRIMARY KEY,
        name             TEXT NOT NULL UNIQUE,
        client_id        TEXT NOT NULL UNIQUE,
        secret_hash      TEXT NOT NULL,        -- keyed hash (access.tokens.SecretHasher), never the secret
        prev_secret_hash TEXT,                 -- the secret before the last rotation
        prev_expires_at  REAL,                 -- until when prev_secret_hash is accepted
        created_at       REAL NOT NULL,
        expires_at       REAL,                 -- NULL: non-expiring
        revoked_at       REAL
    );
    CREATE TABLE access_apps (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        aud        TEXT NOT NULL UNIQUE,       -- fixed for the application's lifetime
        any_token  INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE access_app_domains (
        domain TEXT PRIMARY KEY,               -- lower-case; exact or "*.suffix"; one app per domain
        app_id TEXT NOT NULL REFERENCES access_apps(id) ON DELETE CASCADE
    );
    CREATE INDEX access_app_domains_by_app ON access_app_domains(app_id);
    CREATE TABLE access_app_tokens (
        app_id   TEXT NOT NULL REFERENCES access_apps(id) ON DELETE CASCADE,
        token_id TEXT NOT NULL REFERENCES service_tokens(id) ON DELETE CASCADE,
        PRIMARY KEY (app_id, token_id)
    );
    CREATE INDEX access_app_tokens_by_token ON access_app_tokens(token_id);
    CREATE TABLE signing_keys (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        pem        BLOB NOT NULL,              -- SecretBox ciphertext of the private PEM, aad = "signing-key"
        created_at REAL NOT NULL
    );
    CREATE TABLE access_log (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        time       REAL NOT NULL,
        decision   TEXT NOT NULL,              -- allow or deny
        status     INTEGER NOT NULL,
        client_id  TEXT,
        token_id   TEXT,
        token_name TEXT,
        app        TEXT,
        hostname   TEXT NOT NULL,
        reason     TEXT NOT NULL,
        source     TEXT NOT NULL
    );
    CREATE INDEX access_log_by_time ON access_log(time);
    """,
    # 3: Hyperdrive configs and the certificates they use for origin TLS
    """
    CREATE TABLE certificates (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        kind       TEXT NOT NULL,              -- certificate-authority | mtls-certificate
        cert_pem   BLOB NOT NULL,
        key_pem    BLOB,                       -- SecretBox ciphertext, aad = "certificate:<id>:key"
        subject    TEXT NOT NULL,
        issuer     TEXT NOT NULL,
        expires_on REAL NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE hyperdrive_configs (
        id                      TEXT PRIMARY KEY,  -- 32 hex
        name                    TEXT NOT NULL UNIQUE,
        scheme                  TEXT NOT NULL,
        origin_host             TEXT NOT NULL,
        origin_port             INTEGER,           -- NULL: through a tunnel
        origin_database         TEXT NOT NULL,
        origin_user             TEXT NOT NULL,
        origin_password         BLOB NOT NULL,     -- SecretBox ciphertext, aad = "hyperdrive:<id>:password"
        access_client_id        TEXT,
        access_client_secret    BLOB,              -- ciphertext, aad = "hyperdrive:<id>:access_client_secret"
        sslmode                 TEXT NOT NULL,
        ca_certificate_id       TEXT REFERENCES certificates(id),
        mtls_certificate_id     TEXT REFERENCES certificates(id),
        caching_disabled        INTEGER NOT NULL,
        max_age                 INTEGER NOT NULL,
        swr                     INTEGER NOT NULL,
        origin_connection_limit INTEGER NOT NULL,
        client_user             TEXT NOT NULL UNIQUE,
        client_password         BLOB NOT NULL,     -- ciphertext, aad = "hyperdrive:<id>:client_password"
        client_scram            TEXT NOT NULL,     -- SCRAM-SHA-256 secret of client_password
        created_at              REAL NOT NULL,
        updated_at              REAL NOT NULL
    );
    CREATE INDEX hyperdrive_by_ca ON hyperdrive_configs(ca_certificate_id);
    CREATE INDEX hyperdrive_by_mtls ON hyperdrive_configs(mtls_certificate_id);
    """,
]


# --- validation ---------------------------------------------------------------------------
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


_CLIENT_ID_LIKE_RE = re.compile(r"[0-9a-fA-F]{32}\.access")  # used with fullmatch


def _validate_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"{what} name must not be empty")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise ValidationError(
            f"invalid {what} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if _UUID_RE.match(name):
        # names and ids share one namespace on the command line
        raise ValidationError(f"invalid {what} name {name!r}: a name must not look like {_article(what)} id")
    return name


def _article(what: str) -> str:
    return ("an " if what[:1] in "aeiou" else "a ") + what


def validate_tunnel_name(name: object) -> str:
    return _validate_name(name, "tunnel")


def validate_token_name(name: object) -> str:
    name = _validate_name(name, "service token")
    if _CLIENT_ID_LIKE_RE.fullmatch(name):
        raise ValidationError(f"invalid service token name {name!r}: a name must not look like a client id")
    return name


def validate_app_name(name: object) -> str:
    return _validate_name(name, "application")


_HEX32_RE = re.compile(r"[0-9a-fA-F]{32}")  # a Hyperdrive config id (used with fullmatch)


def validate_hyperdrive_name(name: object) -> str:
    name = _validate_name(name, "Hyperdrive config")
    if _HEX32_RE.fullmatch(name):
        raise ValidationError(f"invalid Hyperdrive config name {name!r}: a name must not look like a config id")
    return name


def validate_certificate_name(name: object) -> str:
    return _validate_name(name, "certificate")


def normalize_origin_host(host: object) -> str:
    """An origin host: a DNS name (lower-cased) or an IP address (IPv6 without brackets)."""
    if not isinstance(host, str) or not host.strip():
        raise ValidationError("origin host must not be empty")
    raw = host.strip()
    h = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    h = h.lower().rstrip(".")
    if "://" in h:
        raise ValidationError(f"invalid origin host {raw!r}: give just the host name, without a scheme"
                              " (or use a connection string)")
    if "/" in h or ":" in h or "@" in h:
        raise ValidationError(f"invalid origin host {raw!r}: give just the host name (the port, user and"
                              " database are separate settings)")
    if not h or len(h) > 253 or not all(_LABEL_RE.match(label) for label in h.split(".")):
        raise ValidationError(f"invalid origin host {raw!r}: expected a DNS name or an IP address")
    return h


def _identifier(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValidationError(f"{what} must not contain a NUL character")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValidationError(f"{what} {value!r} is longer than {MAX_IDENTIFIER_BYTES} bytes")
    return value


def _secret(value: object, what: str, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string")
    if not value and not allow_empty:
        raise ValidationError(f"{what} must not be empty")
    if "\x00" in value or len(value) > MAX_SECRET_CHARS:
        raise ValidationError(f"{what} must be at most {MAX_SECRET_CHARS} characters, without NUL")
    return value


def _int_setting(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(f"{what} must be a whole number")
    if not lo <= value <= hi:
        raise ValidationError(f"{what} must be from {lo} to {hi} (got {value})")
    return value


def _normalize_hyperdrive(v: dict) -> dict:
    """Validate a complete set of Hyperdrive fields (HYPERDRIVE_FIELDS); certificate references
    are checked by the store. Raises ValidationError naming the field."""
    out: dict = {"name": validate_hyperdrive_name(v["name"])}
    scheme = v["scheme"]
    if not isinstance(scheme, str) or scheme.strip().lower() not in HYPERDRIVE_SCHEMES:
        raise ValidationError(f"unsupported origin scheme {scheme!r}: expected postgresql (or postgres) or mysql")
    out["scheme"] = HYPERDRIVE_SCHEMES[scheme.strip().lower()]
    out["host"] = normalize_origin_host(v["host"])
    out["database"] = _identifier(v["database"], "database name")
    out["user"] = _identifier(v["user"], "origin user name")
    if v["password"] is None:
        raise ValidationError("the origin password is missing (give origin_password or a connection string with one)")
    out["password"] = _secret(v["password"], "origin password", allow_empty=True)

    cid, csecret = v["access_client_id"], v["access_client_secret"]
    if (cid is None) != (csecret is None):
        raise ValidationError(
            "access_client_id and access_client_secret go together: give both (an origin through a tunnel)"
            " or neither (a direct origin)"
        )
    if cid is not None:
        if not isinstance(cid, str) or not _CLIENT_ID_LIKE_RE.fullmatch(cid.strip()):
            raise ValidationError(f"invalid access_client_id {cid!r}: a service token client id is 32 hex digits"
                                  " followed by '.access'")
        cid = cid.strip()
        csecret = _secret(csecret, "access_client_secret", allow_empty=False)
    out["access_client_id"], out["access_client_secret"] = cid, csecret

    port = v["port"]
    if port is not None:
        if cid is not None:
            raise ValidationError(
                "origin_port conflicts with access_client_id: an origin reached through a tunnel has no port"
                " (the tunnel route's service decides it); leave the port out"
            )
        port = _int_setting(port, "origin port", 1, 65535)
    elif cid is None:
        port = DEFAULT_ORIGIN_PORTS[out["scheme"]]
    out["port"] = port

    sslmode = v["sslmode"]
    if not isinstance(sslmode, str) or sslmode.strip().lower() not in SSLMODES + ("prefer",):
        raise ValidationError(f"invalid sslmode {sslmode!r}: expected require, verify-ca or verify-full")
    sslmode = sslmode.strip().lower()
    out["sslmode"] = "require" if sslmode == "prefer" else sslmode  # as Hyperdrive: prefer means require
    ca, mtls = v["ca_certificate_id"] or None, v["mtls_certificate_id"] or None
    if out["sslmode"] == "disable":
        if cid is not None or not _is_loopback(out["host"]):
            raise ValidationError(
                "sslmode disable (no TLS) is only allowed for a direct origin on a loopback address (local"
                " development); use require, verify-ca or verify-full"
            )
        if ca is not None or mtls is not None:
            raise ValidationError("sslmode disable conflicts with ca_certificate_id / mtls_certificate_id:"
                                  " certificates need TLS to the origin")
    out["ca_certificate_id"], out["mtls_certificate_id"] = ca, mtls

    if not isinstance(v["caching_disabled"], bool):
        raise ValidationError("caching_disabled must be true or false")
    out["caching_disabled"] = v["caching_disabled"]
    out["max_age"] = _int_setting(v["max_age"], "max_age (seconds)", 1, MAX_MAX_AGE)
    out["swr"] = _int_setting(v["swr"], "swr (stale-while-revalidate seconds)", 0, MAX_SWR)
    out["origin_connection_limit"] = _int_setting(
        v["origin_connection_limit"], "origin_connection_limit", MIN_ORIGIN_CONNECTION_LIMIT,
        MAX_ORIGIN_CONNECTION_LIMIT,
    )
    return out


def scram_secret(password: str) -> str:
    """The SCRAM-SHA-256 secret of `password` in Postgres' rolpassword format
    (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), made by the proxy's own
    SCRAM module, which verifies client logins against it."""
    from proxy.pg.auth import ScramSecret  # imported late: the store stands without the proxy otherwise

    return ScramSecret.from_password(password).to_string()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pem_bytes(value: object, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray)) or not bytes(value).strip():
        raise ValidationError(f"{what} must not be empty")
    value = bytes(value)
    if len(value) > MAX_PEM_BYTES:
        raise ValidationError(f"{what} is larger than {MAX_PEM_BYTES // 1024} KiB")
    if b"-----BEGIN" not in value:
        raise ValidationError(f"{what} is not PEM (expected a '-----BEGIN ...-----' block)")
    return value


def _parse_certificates(pem: bytes, what: str) -> list:
    from cryptography import x509

    if b"PRIVATE KEY-----" in pem:
        raise ValidationError(f"{what} contains a private key: upload only the certificate(s) there")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValidationError(f"{what} is not a valid PEM certificate ({e})") from None
    if not certs:
        raise ValidationError(f"{what} holds no certificate")
    return certs


def _parse_private_key(pem: bytes, what: str):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValidationError(
            f"{what} is encrypted with a passphrase; upload it unencrypted (e.g. openssl pkey -in KEY -out PLAIN)"
        ) from None
    except Exception as e:  # ValueError, or UnsupportedAlgorithm for an exotic key type
        raise ValidationError(f"{what} is not a valid PEM private key ({e})") from None


def _host_candidates(hostname: str) -> list[str]:
    """The stored names that could match a requested hostname, best first: the name itself,
    then "*.suffix" from the longest suffix to the shortest ("*.a.b" never matches "a.b")."""
    h = (hostname or "").strip().lower()
    name, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        h = name  # a Host-style "name:port": the port plays no part in matching
    h = h.rstrip(".")
    if not h:
        return []
    labels = h.split(".")
    return [h] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]


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
        raise ValidationError(
            "service must not be empty (e.g. tcp://127.0.0.1:5432); leave it out to let the connector's"
            " local --config decide"
        )
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
        service: str | None,
        public: bool,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> Route:
        """Route `hostname` to `service` through the tunnel (id or name), replacing any existing
        route for that hostname. Bumps the config version of every tunnel whose rules changed.
        `service` None: the connector's local --config decides (stored as LOCAL_SERVICE)."""
        hostname = normalize_hostname(hostname)
        service = LOCAL_SERVICE if service is None else normalize_service(service)
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
        candidates = _host_candidates(hostname)
        if not candidates:
            return None
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

    def ingress_config(self, tunnel_id: str) -> tuple[int, list[dict]] | None:
        """(config_version, ingress rules) to push to the tunnel's connectors, or None when the
        tunnel is locally managed (no route names a service): as in cloudflared, nothing is pushed
        then, so each connector's --config file applies. Once a route names a service, the pushed
        config (version >= 0) replaces any file (version -1), and service-less routes fall to the
        catch-all."""
        with self._lock:
            row = self._db.execute("SELECT config_version FROM tunnels WHERE id = ?", (tunnel_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no tunnel with id {tunnel_id!r}")
            routes = [r for r in self.routes_for(tunnel_id) if r.service != LOCAL_SERVICE]
            if not routes:
                return None
            rules = []
            for r in routes:
                rule: dict = {
                    "hostname": r.hostname,
                    "service": r.service,
                    "originRequest": {"connectTimeout": r.connect_timeout},
                }
                if not r.public:
                    app = self.app_for_hostname(r.hostname)
                    if app is not None:
                        # defence in depth: the connector also checks the relay's assertion
                        rule["access"] = {"required": True, "audTag": [app.aud]}
                rules.append(rule)
            return int(row[0]), rules + [dict(CATCH_ALL_RULE)]

    # --- Access: service tokens ---------------------------------------------------------------
    @staticmethod
    def _token_from_row(row: sqlite3.Row) -> ServiceToken:
        return ServiceToken(
            id=row["id"],
            name=row["name"],
            client_id=row["client_id"],
            secret_hash=row["secret_hash"],
            prev_secret_hash=row["prev_secret_hash"],
            prev_expires_at=row["prev_expires_at"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
        )

    def create_service_token(
        self, name: str, client_id: str, secret_hash: str, expires_at: float | None
    ) -> ServiceToken:
        name = validate_token_name(name)
        if not isinstance(client_id, str) or not _CLIENT_ID_LIKE_RE.fullmatch(client_id):
            raise ValidationError("a client id is 32 hex digits followed by '.access'")
        if not isinstance(secret_hash, str) or not secret_hash:
            raise ValidationError("secret_hash must not be empty")
        if expires_at is not None:
            if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not math.isfinite(
                expires_at
            ):
                raise ValidationError("expires_at must be a time in seconds or null")
            expires_at = float(expires_at)
        token_id = str(uuid.uuid4())
        now = self._clock()
        with self._lock, self._tx():
            if self._db.execute("SELECT 1 FROM service_tokens WHERE name = ?", (name,)).fetchone():
                raise ConflictError(f"a service token named {name!r} already exists")
            if self._db.execute("SELECT 1 FROM service_tokens WHERE client_id = ?", (client_id,)).fetchone():
                raise ConflictError("a service token with this client id already exists")
            self._db.execute(
                "INSERT INTO service_tokens (id, name, client_id, secret_hash, prev_secret_hash, prev_expires_at,"
                " created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, NULL, NULL, ?, ?, NULL)",
                (token_id, name, client_id, secret_hash, now, expires_at),
            )
        return ServiceToken(token_id, name, client_id, secret_hash, None, None, now, expires_at, None)

    def get_service_token(self, id_or_name_or_client_id: str) -> ServiceToken | None:
        key = id_or_name_or_client_id
        with self._lock:
            for column in ("id", "name", "client_id"):
                row = self._db.execute(f"SELECT * FROM service_tokens WHERE {column} = ?", (key,)).fetchone()
                if row is not None:
                    return self._token_from_row(row)
        return None

    def require_service_token(self, id_or_name_or_client_id: str) -> ServiceToken:
        token = self.get_service_token(id_or_name_or_client_id)
        if token is None:
            raise NotFoundError(f"no service token named or with id {id_or_name_or_client_id!r}")
        return token

    def token_by_client_id(self, client_id: str) -> ServiceToken | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM service_tokens WHERE client_id = ?", (client_id,)).fetchone()
        return self._token_from_row(row) if row else None

    def list_service_tokens(self) -> list[ServiceToken]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM service_tokens ORDER BY created_at, name").fetchall()
        return [self._token_from_row(r) for r in rows]

    def rotate_service_token(self, id: str, new_secret_hash: str, prev_expires_at: float) -> ServiceToken:
        """Give the token a new secret; the current one stays valid until `prev_expires_at`
        (pass now for no grace). A secret from before an earlier rotation is dropped."""
        if not isinstance(new_secret_hash, str) or not new_secret_hash:
            raise ValidationError("new_secret_hash must not be empty")
        if isinstance(prev_expires_at, bool) or not isinstance(prev_expires_at, (int, float)) or not math.isfinite(
            prev_expires_at
        ):
            raise ValidationError("prev_expires_at must be a time in seconds")
        with self._lock, self._tx():
            token = self.require_service_token(id)
            if token.revoked_at is not None:
                raise ConflictError(f"service token {token.name!r} is revoked; create a new one instead")
            self._db.execute(
                "UPDATE service_tokens SET secret_hash = ?, prev_secret_hash = ?, prev_expires_at = ? WHERE id = ?",
                (new_secret_hash, token.secret_hash, float(prev_expires_at), token.id),
            )
            row = self._db.execute("SELECT * FROM service_tokens WHERE id = ?", (token.id,)).fetchone()
            return self._token_from_row(row)

    def revoke_service_token(self, id: str) -> ServiceToken:
        """Revoke at once (idempotent: a revoked token keeps its first revocation time)."""
        with self._lock, self._tx():
            token = self.require_service_token(id)
            if token.revoked_at is None:
                self._db.execute("UPDATE service_tokens SET revoked_at = ? WHERE id = ?", (self._clock(), token.id))
            row = self._db.execute("SELECT * FROM service_tokens WHERE id = ?", (token.id,)).fetchone()
            return self._token_from_row(row)

    # --- Access: applications -----------------------------------------------------------------
    def _app_from_row(self, row: sqlite3.Row) -> AccessApp:
        domains = self._db.execute(
            "SELECT domain FROM access_app_domains WHERE app_id = ? ORDER BY rowid", (row["id"],)
        ).fetchall()
        tokens = self._db.execute(
            "SELECT token_id FROM access_app_tokens WHERE app_id = ? ORDER BY rowid", (row["id"],)
        ).fetchall()
        return AccessApp(
            id=row["id"],
            name=row["name"],
            aud=row["aud"],
            domains=tuple(d[0] for d in domains),
            token_ids=tuple(t[0] for t in tokens),
            any_token=bool(row["any_token"]),
            created_at=row["created_at"],
        )

    def _access_map(self) -> dict[str, tuple[str, str | None]]:
        """hostname -> (tunnel id, aud of the covering app or None) for every non-public route:
        what ingress_config derives from apps, to tell which tunnels an app change touches."""
        out = {}
        for r in self.list_routes():
            if not r.public:
                app = self.app_for_hostname(r.hostname)
                out[r.hostname] = (r.tunnel_id, app.aud if app else None)
        return out

    def _bump_changed(self, before: dict[str, tuple[str, str | None]]) -> None:
        after = self._access_map()
        changed = {tid for h, (tid, aud) in after.items() if before.get(h, (tid, None))[1] != aud}
        changed |= {tid for h, (tid, aud) in before.items() if after.get(h, (tid, None))[1] != aud}
        for tunnel_id in sorted(changed):
            self._bump(tunnel_id)

    def create_app(self, name: str, domains: list[str], token_ids: list[str], any_token: bool) -> AccessApp:
        """An Access application (Service Auth policy) on `domains`: reachable with one of
        `token_ids`, or with any valid service token when `any_token`. Bumps the config version of
        every tunnel whose pushed rules change (their routes gain the app's aud tag)."""
        name = validate_app_name(name)
        if isinstance(domains, str) or not isinstance(domains, (list, tuple)) or not domains:
            raise ValidationError("an Access application needs at least one domain")
        normalized: list[str] = []
        for d in domains:
            h = normalize_hostname(d)
            if h not in normalized:
                normalized.append(h)
        if isinstance(token_ids, str) or not isinstance(token_ids, (list, tuple)):
            raise ValidationError("token_ids must be a list of service token ids")
        if not isinstance(any_token, bool):
            raise ValidationError("any_token must be true or false")
        ids: list[str] = []
        for t in token_ids:
            if isinstance(t, str) and t not in ids:
                ids.append(t)
            elif not isinstance(t, str):
                raise ValidationError("token_ids must be a list of service token ids")
        if not ids and not any_token:
            raise ValidationError(
                "an Access application needs a policy: name at least one service token, or allow any service token"
            )
        app_id = str(uuid.uuid4())
        aud = secrets.token_hex(32)
        now = self._clock()
        with self._lock, self._tx():
            if self._db.execute("SELECT 1 FROM access_apps WHERE name = ?", (name,)).fetchone():
                raise ConflictError(f"an Access application named {name!r} already exists")
            for h in normalized:
                other = self._db.execute(
                    "SELECT a.name FROM access_app_domains d JOIN access_apps a ON a.id = d.app_id WHERE d.domain = ?",
                    (h,),
                ).fetchone()
                if other is not None:
                    raise ConflictError(f"domain {h} already belongs to Access application {other[0]!r}")
            for tid in ids:
                row = self._db.execute("SELECT name, revoked_at FROM service_tokens WHERE id = ?", (tid,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no service token with id {tid!r}")
                if row["revoked_at"] is not None:
                    raise ValidationError(f"service token {row['name']!r} is revoked")
            before = self._access_map()
            self._db.execute(
                "INSERT INTO access_apps (id, name, aud, any_token, created_at) VALUES (?, ?, ?, ?, ?)",
                (app_id, name, aud, int(any_token), now),
            )
            self._db.executemany(
                "INSERT INTO access_app_domains (domain, app_id) VALUES (?, ?)", [(h, app_id) for h in normalized]
            )
            self._db.executemany(
                "INSERT INTO access_app_tokens (app_id, token_id) VALUES (?, ?)", [(app_id, t) for t in ids]
            )
            self._bump_changed(before)
        return AccessApp(app_id, name, aud, tuple(normalized), tuple(ids), any_token, now)

    def get_app(self, id_or_name: str) -> AccessApp | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM access_apps WHERE id = ?", (id_or_name,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT * FROM access_apps WHERE name = ?", (id_or_name,)).fetchone()
            return self._app_from_row(row) if row else None

    def list_apps(self) -> list[AccessApp]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM access_apps ORDER BY created_at, name").fetchall()
            return [self._app_from_row(r) for r in rows]

    def delete_app(self, id_or_name: str) -> AccessApp | None:
        with self._lock, self._tx():
            app = self.get_app(id_or_name)
            if app is None:
                return None
            before = self._access_map()
            self._db.execute("DELETE FROM access_apps WHERE id = ?", (app.id,))
            self._bump_changed(before)
            return app

    def app_for_hostname(self, hostname: str) -> AccessApp | None:
        """The application protecting a hostname: an exact domain first, then the longest
        "*.suffix" (a wildcard never covers its bare domain)."""
        candidates = _host_candidates(hostname)
        if not candidates:
            return None
        marks = ",".join("?" * len(candidates))
        with self._lock:
            rows = self._db.execute(
                f"SELECT domain, app_id FROM access_app_domains WHERE domain IN ({marks})", candidates
            ).fetchall()
            if not rows:
                return None
            by_domain = {r["domain"]: r["app_id"] for r in rows}
            for c in candidates:
                if c in by_domain:
                    row = self._db.execute("SELECT * FROM access_apps WHERE id = ?", (by_domain[c],)).fetchone()
                    return self._app_from_row(row) if row else None
        return None

    # --- Access: signing keys -----------------------------------------------------------------
    def add_signing_key(self, pem: bytes, created_at: float) -> None:
        """Store a private key (PEM, encrypted at rest); only the newest SIGNING_KEYS_KEPT stay."""
        if not isinstance(pem, (bytes, bytearray)) or not pem:
            raise ValidationError("a signing key must be PEM bytes")
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO signing_keys (pem, created_at) VALUES (?, ?)",
                (self._box.encrypt(bytes(pem), aad=SIGNING_KEY_AAD), float(created_at)),
            )
            self._db.execute(
                "DELETE FROM signing_keys WHERE id NOT IN"
                " (SELECT id FROM signing_keys ORDER BY created_at DESC, id DESC LIMIT ?)",
                (SIGNING_KEYS_KEPT,),
            )

    def signing_keys(self) -> list[tuple[bytes, float]]:
        """(private PEM, created_at), newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pem, created_at FROM signing_keys ORDER BY created_at DESC, id DESC"
            ).fetchall()
        return [(self._box.decrypt(r["pem"], aad=SIGNING_KEY_AAD), r["created_at"]) for r in rows]

    # --- Access: decision log -----------------------------------------------------------------
    def add_access_logs(self, entries: list[dict]) -> None:
        """Append decisions (keys: ACCESS_LOG_KEYS); the log keeps the newest ACCESS_LOG_MAX_ROWS."""
        if not entries:
            return
        rows = []
        for e in entries:
            rows.append((
                float(e["time"]),
                str(e["decision"]),
                int(e["status"]),
                _opt_str(e.get("client_id")),
                _opt_str(e.get("token_id")),
                _opt_str(e.get("token_name")),
                _opt_str(e.get("app")),
                str(e.get("hostname") or ""),
                str(e.get("reason") or ""),
                str(e.get("source") or ""),
            ))
        with self._lock, self._tx():
            self._db.executemany(
                "INSERT INTO access_log (time, decision, status, client_id, token_id, token_name, app, hostname,"
                " reason, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # Ids only grow and only the oldest rows are ever deleted, so they are contiguous: keeping
            # the last ACCESS_LOG_MAX_ROWS ids keeps the newest rows, with two index lookups.
            lo, hi = self._db.execute("SELECT MIN(id), MAX(id) FROM access_log").fetchone()
            if hi - lo + 1 > ACCESS_LOG_MAX_ROWS:
                self._db.execute("DELETE FROM access_log WHERE id <= ?", (hi - ACCESS_LOG_MAX_ROWS,))

    def access_logs(self, limit: int = 100) -> list[dict]:
        """The newest `limit` decisions, newest first (keys: "id" and ACCESS_LOG_KEYS)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("limit must be a positive whole number")
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM access_log ORDER BY time DESC, id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [{"id": r["id"], **{k: r[k] for k in ACCESS_LOG_KEYS}} for r in rows]

    # --- origin certificates --------------------------------------------------------------------
    def _cert_from_row(self, row: sqlite3.Row) -> Certificate:
        key = row["key_pem"]
        return Certificate(
            id=row["id"],
            name=row["name"],
            kind=row["kind"],
            cert_pem=bytes(row["cert_pem"]),
            key_pem=None if key is None else self._box.decrypt(key, aad=f"certificate:{row['id']}:key".encode()),
            subject=row["subject"],
            issuer=row["issuer"],
            expires_on=row["expires_on"],
            created_at=row["created_at"],
        )

    def add_certificate(self, name: str, kind: str, cert_pem: bytes | str,
                        key_pem: bytes | str | None = None) -> Certificate:
        """Store a certificate for origin TLS. A "certificate-authority" is one or more PEM
        certificates (the origin's certificate must chain to one of them), without a key; an
        "mtls-certificate" is the client certificate (chain) and its private key (encrypted at rest)."""
        from cryptography.hazmat.primitives import serialization

        name = validate_certificate_name(name)
        if kind not in CERT_KINDS:
            raise ValidationError(f"invalid certificate kind {kind!r}: expected {' or '.join(CERT_KINDS)}")
        cert_pem = _pem_bytes(cert_pem, "the certificate")
        certs = _parse_certificates(cert_pem, "the certificate")
        if kind == "certificate-authority":
            if key_pem is not None and key_pem not in (b"", ""):
                raise ValidationError("a certificate authority is uploaded without a private key")
            key_pem = None
        else:
            if key_pem is None or key_pem in (b"", ""):
                raise ValidationError("an mTLS certificate needs its private key")
            key_pem = _pem_bytes(key_pem, "the private key")
            key = _parse_private_key(key_pem, "the private key")
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
                raise ValidationError(
                    "the private key does not match the certificate (the first certificate in the file must be"
                    " the client certificate, and the key its own)"
                )
        leaf = certs[0]
        cert_id = str(uuid.uuid4())
        now = self._clock()
        with self._lock, self._tx():
            if self._db.execute("SELECT 1 FROM certificates WHERE name = ?", (name,)).fetchone():
                raise ConflictError(f"a certificate named {name!r} already exists")
            self._db.execute(
                "INSERT INTO certificates (id, name, kind, cert_pem, key_pem, subject, issuer, expires_on, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cert_id, name, kind, cert_pem,
                 None if key_pem is None else self._box.encrypt(key_pem, aad=f"certificate:{cert_id}:key".encode()),
                 leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string(),
                 leaf.not_valid_after_utc.timestamp(), now),
            )
        return Certificate(cert_id, name, kind, cert_pem, key_pem, leaf.subject.rfc4514_string(),
                           leaf.issuer.rfc4514_string(), leaf.not_valid_after_utc.timestamp(), now)

    def get_certificate(self, id_or_name: str) -> Certificate | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM certificates WHERE id = ?", (id_or_name,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT * FROM certificates WHERE name = ?", (id_or_name,)).fetchone()
            return self._cert_from_row(row) if row else None

    def require_certificate(self, id_or_name: str) -> Certificate:
        cert = self.get_certificate(id_or_name)
        if cert is None:
            raise NotFoundError(f"no certificate named or with id {id_or_name!r}")
        return cert

    def list_certificates(self) -> list[Certificate]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM certificates ORDER BY created_at, name").fetchall()
            return [self._cert_from_row(r) for r in rows]

    def delete_certificate(self, id_or_name: str) -> Certificate | None:
        """Delete a certificate; refused (ConflictError) while a Hyperdrive config uses it."""
        with self._lock, self._tx():
            cert = self.get_certificate(id_or_name)
            if cert is None:
                return None
            users = self._db.execute(
                "SELECT name FROM hyperdrive_configs WHERE ca_certificate_id = ? OR mtls_certificate_id = ?"
                " ORDER BY name",
                (cert.id, cert.id),
            ).fetchall()
            if users:
                names = ", ".join(r[0] for r in users)
                raise ConflictError(
                    f"certificate {cert.name!r} is used by Hyperdrive config(s) {names}: update or delete them first"
                )
            self._db.execute("DELETE FROM certificates WHERE id = ?", (cert.id,))
            return cert

    def _cert_ref(self, ref: str | None, kind: str, what: str) -> str | None:
        if ref is None:
            return None
        if not isinstance(ref, str):
            raise ValidationError(f"{what} must be a certificate id or name")
        cert = self.get_certificate(ref)
        if cert is None:
            raise NotFoundError(f"{what}: no certificate named or with id {ref!r} (see hd cert list)")
        if cert.kind != kind:
            raise ValidationError(f"{what}: certificate {cert.name!r} is a {cert.kind}, not a {kind}")
        return cert.id

    # --- Hyperdrive configs -------------------------------------------------------------------
    @staticmethod
    def _hd_aad(config_id: str, what: str) -> bytes:
        return f"hyperdrive:{config_id}:{what}".encode()

    def _hyperdrive_from_row(self, row: sqlite3.Row) -> HyperdriveConfig:
        hid = row["id"]
        secret = row["access_client_secret"]
        return HyperdriveConfig(
            id=hid,
            name=row["name"],
            scheme=row["scheme"],
            host=row["origin_host"],
            port=row["origin_port"],
            database=row["origin_database"],
            user=row["origin_user"],
            password=self._box.decrypt(row["origin_password"], aad=self._hd_aad(hid, "password")).decode(),
            access_client_id=row["access_client_id"],
            access_client_secret=None if secret is None else self._box.decrypt(
                secret, aad=self._hd_aad(hid, "access_client_secret")).decode(),
            sslmode=row["sslmode"],
            ca_certificate_id=row["ca_certificate_id"],
            mtls_certificate_id=row["mtls_certificate_id"],
            caching_disabled=bool(row["caching_disabled"]),
            max_age=row["max_age"],
            swr=row["swr"],
            origin_connection_limit=row["origin_connection_limit"],
            client_user=row["client_user"],
            client_password=self._box.decrypt(
                row["client_password"], aad=self._hd_aad(hid, "client_password")).decode(),
            client_scram=row["client_scram"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def _checked(self, values: dict) -> dict:
        out = _normalize_hyperdrive(values)
        out["ca_certificate_id"] = self._cert_ref(out["ca_certificate_id"], "certificate-authority",
                                                  "ca_certificate_id")
        out["mtls_certificate_id"] = self._cert_ref(out["mtls_certificate_id"], "mtls-certificate",
                                                    "mtls_certificate_id")
        return out

    def _check_name_free(self, name: str, config_id: str) -> None:
        row = self._db.execute("SELECT id FROM hyperdrive_configs WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] != config_id:
            raise ConflictError(f"a Hyperdrive config named {name!r} already exists")

    def new_hyperdrive(self, **fields: object) -> HyperdriveConfig:
        """A validated Hyperdrive config with a fresh id and client credentials, NOT stored yet
        (the API tests the origin first; `insert_hyperdrive` stores it). Fields: HYPERDRIVE_FIELDS;
        name, host, database, user and password are required."""
        unknown = sorted(set(fields) - set(HYPERDRIVE_FIELDS))
        if unknown:
            raise ValidationError(f"unknown Hyperdrive field(s): {', '.join(unknown)}")
        for key in ("name", "host", "database", "user"):
            if fields.get(key) is None:
                raise ValidationError(f"missing field: {key}")
        values = {
            "scheme": "postgresql", "port": None, "password": None, "access_client_id": None,
            "access_client_secret": None, "sslmode": DEFAULT_SSLMODE, "ca_certificate_id": None,
            "mtls_certificate_id": None, "caching_disabled": False, "max_age": DEFAULT_MAX_AGE, "swr": DEFAULT_SWR,
            "origin_connection_limit": DEFAULT_ORIGIN_CONNECTION_LIMIT,
        }
        values.update({k: v for k, v in fields.items() if v is not None})  # None: the default
        with self._lock:
            v = self._checked(values)
            self._check_name_free(v["name"], "")
        client_password = secrets.token_urlsafe(24)  # 32 URL-safe characters
        now = self._clock()
        return HyperdriveConfig(
            id=uuid.uuid4().hex,
            client_user=CLIENT_USER_PREFIX + secrets.token_hex(6),
            client_password=client_password,
            client_scram=scram_secret(client_password),
            created_at=now,
            updated_at=now,
            **v,
        )

    def insert_hyperdrive(self, config: HyperdriveConfig) -> HyperdriveConfig:
        """Store a config made by `new_hyperdrive` (checked again: names may have been taken since)."""
        if not isinstance(config, HyperdriveConfig):
            raise ValidationError("insert_hyperdrive needs a HyperdriveConfig from new_hyperdrive")
        if not _HEX32_RE.fullmatch(config.id) or not re.fullmatch(r"hd_[0-9a-f]{12}", config.client_user):
            raise ValidationError("insert_hyperdrive needs a HyperdriveConfig from new_hyperdrive")
        with self._lock, self._tx():
            v = self._checked({k: getattr(config, k) for k in HYPERDRIVE_FIELDS})
            self._check_name_free(v["name"], config.id)
            if self._db.execute("SELECT 1 FROM hyperdrive_configs WHERE id = ?", (config.id,)).fetchone():
                raise ConflictError(f"a Hyperdrive config with id {config.id} already exists")
            client_user = config.client_user
            while self._db.execute("SELECT 1 FROM hyperdrive_configs WHERE client_user = ?",
                                   (client_user,)).fetchone():
                client_user = CLIENT_USER_PREFIX + secrets.token_hex(6)  # 48 bits: a clash is rare
            hid = config.id
            self._db.execute(
                "INSERT INTO hyperdrive_configs (id, name, scheme, origin_host, origin_port, origin_database,"
                " origin_user, origin_password, access_client_id, access_client_secret, sslmode, ca_certificate_id,"
                " mtls_certificate_id, caching_disabled, max_age, swr, origin_connection_limit, client_user,"
                " client_password, client_scram, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (hid, v["name"], v["scheme"], v["host"], v["port"], v["database"], v["user"],
                 self._box.encrypt(v["password"].encode(), aad=self._hd_aad(hid, "password")),
                 v["access_client_id"],
                 None if v["access_client_secret"] is None else self._box.encrypt(
                     v["access_client_secret"].encode(), aad=self._hd_aad(hid, "access_client_secret")),
                 v["sslmode"], v["ca_certificate_id"], v["mtls_certificate_id"], int(v["caching_disabled"]),
                 v["max_age"], v["swr"], v["origin_connection_limit"], client_user,
                 self._box.encrypt(config.client_password.encode(), aad=self._hd_aad(hid, "client_password")),
                 config.client_scram, config.created_at, config.updated_at),
            )
            row = self._db.execute("SELECT * FROM hyperdrive_configs WHERE id = ?", (hid,)).fetchone()
            return self._hyperdrive_from_row(row)

    def create_hyperdrive(self, **fields: object) -> HyperdriveConfig:
        """Validate and store a Hyperdrive config (see `new_hyperdrive` for the fields)."""
        return self.insert_hyperdrive(self.new_hyperdrive(**fields))

    def merged_hyperdrive(self, id_or_name: str, **changes: object) -> HyperdriveConfig:
        """The config as it would be after `update_hyperdrive(id_or_name, **changes)`, validated but
        NOT stored. Only the given fields change; the client credentials never do. Giving access
        credentials without a port drops the old direct port; clearing them (None) without a port
        brings back the scheme's default port."""
        unknown = sorted(set(changes) - set(HYPERDRIVE_FIELDS))
        if unknown:
            raise ValidationError(f"unknown Hyperdrive field(s): {', '.join(unknown)}")
        with self._lock:
            current = self.require_hyperdrive(id_or_name)
            values = {k: getattr(current, k) for k in HYPERDRIVE_FIELDS}
            if "access_client_id" in changes:
                via_tunnel = changes["access_client_id"] not in (None, "")
                if via_tunnel != current.via_tunnel and "port" not in changes:
                    values["port"] = None  # the port belonged to the old mode (direct or through a tunnel)
                if not via_tunnel and "access_client_secret" not in changes:
                    values["access_client_secret"] = None  # clearing the id clears its secret
            values.update(changes)
            v = self._checked(values)
            self._check_name_free(v["name"], current.id)
        return HyperdriveConfig(
            id=current.id, client_user=current.client_user, client_password=current.client_password,
            client_scram=current.client_scram, created_at=current.created_at, updated_at=self._clock(), **v,
        )

    def update_hyperdrive(self, id_or_name: str, **changes: object) -> HyperdriveConfig:
        """Change the given fields (see `merged_hyperdrive`); returns the stored result."""
        with self._lock, self._tx():
            m = self.merged_hyperdrive(id_or_name, **changes)
            hid = m.id
            self._db.execute(
                "UPDATE hyperdrive_configs SET name = ?, scheme = ?, origin_host = ?, origin_port = ?,"
                " origin_database = ?, origin_user = ?, origin_password = ?, access_client_id = ?,"
                " access_client_secret = ?, sslmode = ?, ca_certificate_id = ?, mtls_certificate_id = ?,"
                " caching_disabled = ?, max_age = ?, swr = ?, origin_connection_limit = ?, updated_at = ?"
                " WHERE id = ?",
                (m.name, m.scheme, m.host, m.port, m.database, m.user,
                 self._box.encrypt(m.password.encode(), aad=self._hd_aad(hid, "password")),
                 m.access_client_id,
                 None if m.access_client_secret is None else self._box.encrypt(
                     m.access_client_secret.encode(), aad=self._hd_aad(hid, "access_client_secret")),
                 m.sslmode, m.ca_certificate_id, m.mtls_certificate_id, int(m.caching_disabled), m.max_age, m.swr,
                 m.origin_connection_limit, m.updated_at, hid),
            )
            row = self._db.execute("SELECT * FROM hyperdrive_configs WHERE id = ?", (hid,)).fetchone()
            return self._hyperdrive_from_row(row)

    def get_hyperdrive(self, id_or_name: str) -> HyperdriveConfig | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM hyperdrive_configs WHERE id = ?", (id_or_name,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT * FROM hyperdrive_configs WHERE name = ?", (id_or_name,)).fetchone()
            return self._hyperdrive_from_row(row) if row else None

    def require_hyperdrive(self, id_or_name: str) -> HyperdriveConfig:
        config = self.get_hyperdrive(id_or_name)
        if config is None:
            raise NotFoundError(f"no Hyperdrive config named or with id {id_or_name!r}")
        return config

    def hyperdrive_by_client_user(self, user: str) -> HyperdriveConfig | None:
        """The config a client logging in to the proxy as `user` means (None: no such config)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM hyperdrive_configs WHERE client_user = ?", (user,)).fetchone()
            return self._hyperdrive_from_row(row) if row else None

    def list_hyperdrives(self) -> list[HyperdriveConfig]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM hyperdrive_configs ORDER BY created_at, name").fetchall()
            return [self._hyperdrive_from_row(r) for r in rows]

    def delete_hyperdrive(self, id_or_name: str) -> HyperdriveConfig | None:
        with self._lock, self._tx():
            config = self.get_hyperdrive(id_or_name)
            if config is None:
                return None
            self._db.execute("DELETE FROM hyperdrive_configs WHERE id = ?", (config.id,))
            return config

    def service_token_hash_key(self) -> bytes:
        """The key for access.tokens.SecretHasher (derived from secret.key, never stored)."""
        return self._box.derive_key(TOKEN_HASH_LABEL)


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


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _split_sql(script: str) -> list[str]:
    # Migrations contain no literal semicolons inside strings; comments are stripped first.
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
