"""Errors of the proxy.

`OriginError` — why we could not use an origin database, with Hyperdrive's configuration-time
codes (2008–2016), so `hd hyperdrive create/update` can tell the user what to fix:

| code | meaning |
|------|---------|
| 2008 | bad hostname: DNS does not resolve it, or (tunnel) no route for it |
| 2009 | not a public IP (Hyperdrive's check for non-tunnel origins; we do not apply it) |
| 2010 | cannot connect to host:port (timeout, unreachable, no connector for the tunnel) |
| 2011 | connection refused (nothing listening, firewall, or the connector was refused) |
| 2012 | TLS not supported by the database (answered 'N' to SSLRequest) |
| 2013 | invalid credentials (password / role / client certificate; or tunnel access denied) |
| 2014 | the database does not exist |
| 2015 | anything else (the server's message is passed on) |
| 2016 | the test query failed (permissions) |

`ProxyError` — an error the proxy itself reports to a client as an ErrorResponse; Hyperdrive
uses SQLSTATE 58000 for its own errors that have no PostgreSQL equivalent.
"""

from __future__ import annotations

from typing import Any

BAD_HOSTNAME = 2008
NOT_PUBLIC_IP = 2009
CANNOT_CONNECT = 2010
CONNECTION_REFUSED = 2011
TLS_NOT_SUPPORTED = 2012
INVALID_CREDENTIALS = 2013
DATABASE_NOT_FOUND = 2014
GENERIC = 2015
TEST_QUERY_FAILED = 2016

CODE_NAMES = {
    BAD_HOSTNAME: "bad_hostname",
    NOT_PUBLIC_IP: "not_public_ip",
    CANNOT_CONNECT: "cannot_connect",
    CONNECTION_REFUSED: "connection_refused",
    TLS_NOT_SUPPORTED: "tls_not_supported",
    INVALID_CREDENTIALS: "invalid_credentials",
    DATABASE_NOT_FOUND: "database_not_found",
    GENERIC: "origin_error",
    TEST_QUERY_FAILED: "test_query_failed",
}


class OriginError(Exception):
    """Connecting to (or probing) an origin failed.

    code:     one of the 2008–2016 codes above
    message:  what happened, one sentence, never containing a secret
    hint:     what to do about it, or None
    sqlstate: the origin's SQLSTATE when the origin itself refused (e.g. "28P01"), else None
    """

    def __init__(self, code: int, message: str, hint: str | None = None, *,
                 sqlstate: str | None = None) -> None:
        if code not in CODE_NAMES:
            raise ValueError(f"unknown origin error code {code}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.sqlstate = sqlstate

    @property
    def name(self) -> str:
        return CODE_NAMES[self.code]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "name": self.name, "message": self.message}
        if self.hint:
            d["hint"] = self.hint
        if self.sqlstate:
            d["sqlstate"] = self.sqlstate
        return d

    def __str__(self) -> str:
        return f"{self.code} {self.message}" + (f" (hint: {self.hint})" if self.hint else "")

    def __repr__(self) -> str:
        return f"OriginError({self.code}, {self.message!r}, hint={self.hint!r})"

    # ---------------------------------------------------------------- the tunnel-specific cases
    @classmethod
    def no_tunnel_route(cls, hostname: str, detail: str = "") -> OriginError:
        return cls(BAD_HOSTNAME, f"no tunnel route for hostname {hostname}" + (f": {detail}" if detail else ""),
                   "add a route: hd tunnel route TUNNEL HOSTNAME --service tcp://DB_HOST:5432")

    @classmethod
    def no_connector(cls, hostname: str, detail: str = "") -> OriginError:
        return cls(CANNOT_CONNECT,
                   f"no connector is connected for the tunnel serving {hostname}" + (f" ({detail})" if detail else ""),
                   "start hd-connector with the tunnel's token on a machine that can reach the database")

    @classmethod
    def access_denied(cls, hostname: str, status: int, detail: str = "") -> OriginError:
        return cls(INVALID_CREDENTIALS,
                   f"access to {hostname} through the tunnel was denied ({status})" + (f": {detail}" if detail else ""),
                   "check the configuration's access client id and secret (a service token allowed by the "
                   "Access application covering this hostname)")


class ProxyError(Exception):
    """An error the proxy reports to a client as an ErrorResponse (fields S, V, C, M, H)."""

    def __init__(self, message: str, *, sqlstate: str = "58000", severity: str = "ERROR",
                 hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.severity = severity
        self.hint = hint
        self.detail = detail

    def fields(self) -> dict[str, str]:
        """ErrorResponse fields keyed by their one-letter code."""
        f = {"S": self.severity, "V": self.severity, "C": self.sqlstate, "M": self.message}
        if self.detail:
            f["D"] = self.detail
        if self.hint:
            f["H"] = self.hint
        return f

    @classmethod
    def fatal(cls, message: str, **kw: Any) -> ProxyError:
        return cls(message, severity="FATAL", **kw)

    @classmethod
    def from_origin(cls, err: OriginError) -> ProxyError:
        """How a client sees an origin failure: 'Server connection attempt failed: …' (FATAL)."""
        sqlstate = "08001" if err.code in (BAD_HOSTNAME, CANNOT_CONNECT, CONNECTION_REFUSED) else "58000"
        return cls(f"Server connection attempt failed: {err.name}: {err.message}", severity="FATAL",
                   sqlstate=sqlstate, hint=err.hint)

    @classmethod
    def pool_exhausted(cls) -> ProxyError:
        return cls("Failed to acquire a connection from the pool.",
                   hint="the pool's connections are all busy (long transactions?); retry or raise the limit")
