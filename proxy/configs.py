"""Hyperdrive configs between the control plane and the proxy.

- `origin_spec(config, store)`: what `proxy.pg.origin.connect_origin` needs to reach the origin of a
  `control.store.HyperdriveConfig` (with the PEMs of its CA / mTLS certificates loaded).
- `connection_string(config, pg_listen)`: the URL applications use to reach the config through the
  proxy, with the config's generated client credentials.
- `parse_connection_string(url)`: `--connection-string` / `connection_string` into origin fields.
- `check_origin_flags(fields)`: the conflicting-settings rules of PRODUCT.md, shared by the API
  (messages name the JSON fields) and the CLI (messages name the flags).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from control.addr import parse_hostport

if TYPE_CHECKING:  # pragma: no cover
    from control.store import HyperdriveConfig, Store
    from proxy.pg.origin import OriginSpec

DEFAULT_PG_LISTEN = "127.0.0.1:6432"
CONNECTION_STRING_SCHEMES = {"postgres": "postgresql", "postgresql": "postgresql", "mysql": "mysql"}
# Settings a connection string carries: giving one of them besides it is a conflict.
URL_FIELDS = ("origin_scheme", "origin_host", "origin_port", "origin_user", "origin_password", "database")
_SSLMODES_IN_URL = {"require": "require", "prefer": "require", "verify-ca": "verify-ca",
                    "verify-full": "verify-full", "disable": "disable"}
_URL_HINT = "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


# --- the origin -------------------------------------------------------------------------------
def origin_spec(config: "HyperdriveConfig", store: "Store") -> "OriginSpec":
    """How to reach the config's origin. Through a tunnel (access credentials) the port is None and
    `host` is the tunnel hostname. Raises control.store.NotFoundError if a certificate is gone."""
    from proxy.pg.origin import OriginSpec

    ca_pem = client_cert_pem = client_key_pem = None
    if config.ca_certificate_id:
        ca_pem = store.require_certificate(config.ca_certificate_id).cert_pem
    if config.mtls_certificate_id:
        cert = store.require_certificate(config.mtls_certificate_id)
        client_cert_pem, client_key_pem = cert.cert_pem, cert.key_pem
    return OriginSpec(
        host=config.host,
        port=config.port,
        database=config.database,
        user=config.user,
        password=config.password,
        sslmode=config.sslmode,
        ca_pem=ca_pem,
        client_cert_pem=client_cert_pem,
        client_key_pem=client_key_pem,
        access_client_id=config.access_client_id,
        access_client_secret=config.access_client_secret,
    )


# --- what applications use --------------------------------------------------------------------
def _reachable(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def connection_string(config: "HyperdriveConfig", pg_listen: str | None = None) -> str:
    """`postgresql://CLIENT_USER:CLIENT_PASSWORD@HOST:PORT/DATABASE?sslmode=require` for the proxy
    listening on `pg_listen` ("H:P"; a wildcard address becomes loopback). Every part is
    percent-encoded, so libpq/psql, psycopg, asyncpg, node-postgres and Postgres.js all read it.
    A mysql config gets `mysql://…` (pass the MySQL listener's address)."""
    host, port = parse_hostport(pg_listen or DEFAULT_PG_LISTEN, what="pg_listen")
    host = _reachable(host)
    netloc_host = f"[{host}]" if ":" in host else host
    scheme = "mysql" if config.scheme == "mysql" else "postgresql"
    url = (f"{scheme}://{quote(config.client_user, safe='')}:{quote(config.client_password, safe='')}"
           f"@{netloc_host}:{port}/{quote(config.database, safe='')}")
    return url + ("?sslmode=require" if scheme == "postgresql" else "")


def parse_connection_string(url: object) -> dict[str, Any]:
    """Origin fields from a connection string: postgres://, postgresql:// or mysql://
    USER[:PASSWORD]@HOST[:PORT]/DATABASE (percent-encoded parts are decoded).

    Returns {"scheme" ("postgresql"|"mysql"), "user", "password" (None when absent), "host",
    "port" (None when absent), "database"}, plus "sslmode" when the query has one. Other query
    parameters (channel_binding, application_name, …) are ignored. Raises ValueError with a
    message meant for users (it never contains the password)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"the connection string is empty ({_URL_HINT})")
    text = url.strip()
    scheme_part, sep, _ = text.partition("://")
    if not sep:
        raise ValueError(f"the connection string is not a URL ({_URL_HINT})")
    scheme = CONNECTION_STRING_SCHEMES.get(scheme_part.lower())
    if scheme is None:
        raise ValueError(f"unsupported connection string scheme {scheme_part + '://'!r}: expected postgres://,"
                         " postgresql:// or mysql://")
    if "#" in text:
        raise ValueError("the connection string has a '#' in it: percent-encode '#' in the password as %23")
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError:
        raise ValueError(f"the connection string has a bad host or port ({_URL_HINT}; percent-encode special"
                         " characters in the user and password, e.g. %40 for @)") from None
    if "," in u.netloc.rpartition("@")[2]:
        raise ValueError("the connection string names several hosts: give exactly one origin host")
    if not u.hostname:
        raise ValueError(f"the connection string has no host ({_URL_HINT})")
    if port == 0:
        raise ValueError("the connection string's port must be from 1 to 65535")
    if not u.username:
        raise ValueError(f"the connection string has no user ({_URL_HINT})")
    raw_db = u.path[1:] if u.path.startswith("/") else u.path
    if "/" in raw_db:
        raise ValueError("the connection string's path must be just the database name (percent-encode '/' as %2F)")
    database = unquote(raw_db)
    if not database:
        raise ValueError(f"the connection string has no database name ({_URL_HINT})")
    out: dict[str, Any] = {
        "scheme": scheme,
        "user": unquote(u.username),
        "password": None if u.password is None else unquote(u.password),
        "host": u.hostname,
        "port": port,
        "database": database,
    }
    for key, value in parse_qsl(u.query, keep_blank_values=True):
        if key == "sslmode":
            mode = _SSLMODES_IN_URL.get(value.strip().lower())
            if mode is None:
                raise ValueError(f"unsupported sslmode {value!r} in the connection string: expected require,"
                                 " verify-ca or verify-full")
            out["sslmode"] = mode
    return out


# --- conflicting settings ---------------------------------------------------------------------
def _given(fields: Mapping[str, Any], key: str) -> bool:
    value = fields.get(key)
    if key in ("access_client_id", "access_client_secret"):
        return value not in (None, "")  # "" / null clear them on update
    return value is not None


def check_origin_flags(fields: Mapping[str, Any], *, creating: bool,
                       label: Callable[[str], str] = lambda key: key) -> None:
    """Refuse settings that contradict each other, naming them (via `label`: the API passes the
    field names through, the CLI turns them into flags). `fields` uses the API's field names:
    connection_string, origin_scheme, origin_host, origin_port, origin_user, origin_password,
    database, access_client_id, access_client_secret, … Raises ValueError."""
    if _given(fields, "connection_string"):
        clashing = [label(k) for k in URL_FIELDS if _given(fields, k)]
        if clashing:
            raise ValueError(
                f"{label('connection_string')} conflicts with {', '.join(clashing)}: give the origin either as a"
                " connection string or as separate settings, not both"
            )
    if _given(fields, "origin_port") and _given(fields, "access_client_id"):
        raise ValueError(
            f"{label('origin_port')} conflicts with {label('access_client_id')}: an origin reached through a"
            " tunnel has no port (the tunnel route's service decides it); leave the port out"
        )
    if creating:
        cid, secret = _given(fields, "access_client_id"), _given(fields, "access_client_secret")
        if cid and not secret:
            raise ValueError(f"{label('access_client_id')} needs {label('access_client_secret')}: give both to reach"
                             " the origin through a tunnel")
        if secret and not cid:
            raise ValueError(f"{label('access_client_secret')} needs {label('access_client_id')}: give both to"
                             " reach the origin through a tunnel")
