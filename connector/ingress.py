"""Ingress rules: which origin a hostname is carried to.

Rules are matched in order (exact hostname or a `*.suffix` wildcard); the last rule must be a
catch-all. A new config replaces the current one only when its version is newer.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from control.durations import parse_duration

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TCP_KEEPALIVE = 30.0  # cloudflared's default
MAX_TCP_KEEPALIVE = 7200.0  # beyond 2h a keepalive no longer keeps NAT/firewall state alive
KEEPALIVE_PROBES = 9  # unanswered probes before the origin connection is declared dead (Linux default)
DEFAULT_PORTS = {"ssh": 22, "tcp": None}
# The originRequest options this connector understands; a local file may use no other (typos must not pass).
ORIGIN_REQUEST_KEYS = ("connectTimeout", "tcpKeepAlive", "noTLSVerify", "access")
NO_TLS_VERIFY_NOTE = (
    "noTLSVerify has no effect on tcp:// and ssh:// services (the connector passes bytes through;"
    " TLS, if any, is end to end)"
)


class IngressError(ValueError):
    """An ingress rule or config that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Service:
    kind: str  # "tcp" (also for ssh://) or "http_status"
    host: str = ""
    port: int = 0
    status: int = 0

    @classmethod
    def parse(cls, text: str) -> Service:
        if text.startswith("http_status:"):
            code = text.split(":", 1)[1]
            if not code.isdigit() or not 100 <= int(code) <= 999:
                raise IngressError(f"bad status in service {text!r} (want http_status:100..999)")
            return cls("http_status", status=int(code))
        parts = urlsplit(text)
        if parts.scheme not in ("tcp", "ssh"):
            raise IngressError(f"unsupported service {text!r} (use tcp://HOST:PORT, ssh://HOST[:PORT] or http_status:NNN)")
        if parts.path not in ("", "/"):
            raise IngressError(f"service {text!r} must not have a path")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise IngressError(f"bad port in service {text!r}") from None
        if not parts.hostname or not port:
            raise IngressError(f"service {text!r} needs a host and a port")
        return cls("tcp", host=parts.hostname, port=port)


@dataclass(frozen=True, slots=True)
class AccessRequirement:
    """`access: {required, audTag}`: verify the relay's assertion before dialing the origin."""

    required: bool
    aud_tags: tuple[str, ...]
    issuer: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> AccessRequirement | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise IngressError(f"{where}: access must be a mapping like {{required: true, audTag: [TAG]}}")
        required = raw.get("required", False)
        tags = raw.get("audTag", [])
        tags = [tags] if isinstance(tags, str) else tags
        if not isinstance(required, bool) or not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise IngressError(f"{where}: access.required must be true/false and access.audTag a list of tags")
        if required and not tags:
            raise IngressError(f"{where}: access.required needs at least one audTag")
        issuer = raw.get("issuer")
        if issuer is not None and not isinstance(issuer, str):
            raise IngressError(f"{where}: access.issuer must be a URL")
        return cls(required, tuple(tags), issuer)


@dataclass(frozen=True, slots=True)
class Rule:
    hostname: str | None  # None: catch-all
    service: Service
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    access: AccessRequirement | None = None
    tcp_keepalive: float | None = DEFAULT_TCP_KEEPALIVE  # seconds of idle before probing; None: off
    no_tls_verify: bool = False  # accepted for cloudflared compatibility; see NO_TLS_VERIFY_NOTE

    def matches(self, hostname: str) -> bool:
        h = self.hostname
        if h is None or h == "*":
            return True
        if h.startswith("*."):
            return hostname.endswith(h[1:]) and len(hostname) > len(h) - 1
        return hostname == h


@dataclass(frozen=True, slots=True)
class IngressConfig:
    version: int
    rules: tuple[Rule, ...]
    warnings: tuple[str, ...] = ()  # valid but pointless settings, for the connector to log at start

    def match(self, hostname: str) -> Rule:
        host = hostname.lower().rstrip(".").split(":", 1)[0]
        for rule in self.rules:
            if rule.matches(host):
                return rule
        return self.rules[-1]

    @classmethod
    def parse(
        cls, version: int, rules: list[dict[str, Any]], defaults: dict[str, Any] | None = None
    ) -> IngressConfig:
        """`defaults` is the top-level `originRequest`: every rule inherits it key by key."""
        if not rules:
            return cls(version, (Rule(None, Service("http_status", status=503)),))
        if defaults is not None and not isinstance(defaults, dict):
            raise IngressError("originRequest must be a mapping of options")
        defaults = defaults or {}
        _origin_options(defaults, "originRequest")  # so a bad default is reported where it is written
        warnings: list[str] = []
        if defaults.get("noTLSVerify") is True:
            warnings.append(f"originRequest: {NO_TLS_VERIFY_NOTE}")
        parsed: list[Rule] = []
        for i, raw in enumerate(rules):
            where = f"ingress rule #{i + 1}"
            if not isinstance(raw, dict) or not isinstance(raw.get("service"), str):
                raise IngressError(f"{where} needs a service")
            hostname = raw.get("hostname") or None
            if hostname is not None:
                if not isinstance(hostname, str) or ":" in hostname or "/" in hostname:
                    raise IngressError(f"{where}: bad hostname {hostname!r}")
                if "*" in hostname and not (hostname.startswith("*.") and hostname.count("*") == 1):
                    raise IngressError(f"{where}: a wildcard must be the first label (*.example.com)")
                hostname = hostname.lower()
            own = raw.get("originRequest") or {}
            if not isinstance(own, dict):
                raise IngressError(f"{where}: originRequest must be a mapping of options")
            options = {**defaults, **own}
            service = Service.parse(raw["service"])
            timeout, keepalive, no_verify = _origin_options(options, where)
            if own.get("noTLSVerify") is True and service.kind == "tcp":
                warnings.append(f"{where}: {NO_TLS_VERIFY_NOTE}")
            access = AccessRequirement.parse(raw.get("access", options.get("access")), where)
            parsed.append(Rule(hostname, service, timeout, access, keepalive, no_verify))
        for i, rule in enumerate(parsed[:-1]):
            if rule.hostname in (None, "*"):
                raise IngressError(f"ingress rule #{i + 1} is a catch-all but only the last rule may be")
        if parsed[-1].hostname not in (None, "*"):
            raise IngressError("the last ingress rule must be a catch-all (no hostname), e.g. service: http_status:404")
        return cls(version, tuple(parsed), tuple(warnings))


def _origin_options(options: dict[str, Any], where: str) -> tuple[float, float | None, bool]:
    """(connectTimeout, tcpKeepAlive or None when off, noTLSVerify), validated."""
    timeout = _duration(options.get("connectTimeout", DEFAULT_CONNECT_TIMEOUT), where, "connectTimeout")
    if not 0 < timeout <= 300:
        raise IngressError(f"{where}: connectTimeout must be more than 0 and at most 300s (5m)")
    keepalive = options.get("tcpKeepAlive", DEFAULT_TCP_KEEPALIVE)
    keepalive = None if keepalive is None else _duration(keepalive, where, "tcpKeepAlive")
    if keepalive is not None and keepalive != 0 and not 1 <= keepalive <= MAX_TCP_KEEPALIVE:
        raise IngressError(f"{where}: tcpKeepAlive must be 0 (off) or from 1s to 2h")
    no_verify = options.get("noTLSVerify", False)
    if not isinstance(no_verify, bool):
        raise IngressError(f"{where}: noTLSVerify must be true or false")
    return timeout, keepalive or None, no_verify


def _duration(value: Any, where: str, key: str) -> float:
    """Seconds from a number or a duration string (500ms, 5s, 1m30s)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise IngressError(f"{where}: {key} must be a duration like 500ms, 5s or 1m30s (or a number of seconds)")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise IngressError(f"{where}: {key}: {e}") from None


class _SockOpts(Protocol):
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def apply_tcp_keepalive(sock: _SockOpts, seconds: float | None) -> None:
    """Set a rule's `tcpKeepAlive` on a connected origin socket: probe after `seconds` idle, then
    every `seconds` (Go's SetKeepAlivePeriod, which cloudflared's dialer uses), KEEPALIVE_PROBES
    times. None or 0 turns keepalive off. Accepts asyncio's TransportSocket too."""
    if not seconds:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    period = max(1, round(seconds))  # the kernel counts whole seconds
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)  # macOS: KEEPALIVE
    for option, value in ((idle, period), (getattr(socket, "TCP_KEEPINTVL", None), period),
                          (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES)):
        if option is not None:  # missing on some platforms: the OS defaults then apply
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


# Before the edge pushes anything: refuse every stream clearly.
EMPTY = IngressConfig(-1, (Rule(None, Service("http_status", status=503)),))
