"""Ingress rules: which origin a hostname is carried to.

Rules are matched in order (exact hostname or a `*.suffix` wildcard); the last rule must be a
catch-all. A new config replaces the current one only when its version is newer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_PORTS = {"ssh": 22, "tcp": None}


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

    def match(self, hostname: str) -> Rule:
        host = hostname.lower().rstrip(".").split(":", 1)[0]
        for rule in self.rules:
            if rule.matches(host):
                return rule
        return self.rules[-1]

    @classmethod
    def parse(cls, version: int, rules: list[dict[str, Any]]) -> IngressConfig:
        if not rules:
            return cls(version, (Rule(None, Service("http_status", status=503)),))
        parsed: list[Rule] = []
        for i, raw in enumerate(rules):
            if not isinstance(raw, dict) or not isinstance(raw.get("service"), str):
                raise IngressError(f"ingress rule #{i + 1} needs a service")
            hostname = raw.get("hostname") or None
            if hostname is not None:
                if not isinstance(hostname, str) or ":" in hostname or "/" in hostname:
                    raise IngressError(f"ingress rule #{i + 1}: bad hostname {hostname!r}")
                if "*" in hostname and not (hostname.startswith("*.") and hostname.count("*") == 1):
                    raise IngressError(f"ingress rule #{i + 1}: a wildcard must be the first label (*.example.com)")
                hostname = hostname.lower()
            options = raw.get("originRequest") or {}
            timeout = options.get("connectTimeout", DEFAULT_CONNECT_TIMEOUT)
            if not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
                raise IngressError(f"ingress rule #{i + 1}: connectTimeout must be 0-300 seconds")
            access = AccessRequirement.parse(raw.get("access", options.get("access")), f"ingress rule #{i + 1}")
            parsed.append(Rule(hostname, Service.parse(raw["service"]), float(timeout), access))
        for i, rule in enumerate(parsed[:-1]):
            if rule.hostname in (None, "*"):
                raise IngressError(f"ingress rule #{i + 1} is a catch-all but only the last rule may be")
        if parsed[-1].hostname not in (None, "*"):
            raise IngressError("the last ingress rule must be a catch-all (no hostname), e.g. service: http_status:404")
        return cls(version, tuple(parsed))


# Before the edge pushes anything: refuse every stream clearly.
EMPTY = IngressConfig(-1, (Rule(None, Service("http_status", status=503)),))
