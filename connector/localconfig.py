"""`hd-connector --config FILE`: a locally-managed ingress config in cloudflared's YAML shape.

    originRequest: {connectTimeout: 5s}        # optional defaults, inherited key by key
    ingress:
      - hostname: db.internal.example
        service: tcp://127.0.0.1:5432
        originRequest: {tcpKeepAlive: 30s}
        access: {required: true, audTag: [TAG]}
      - service: http_status:404               # the required catch-all

The file is version -1, as cloudflared's orchestrator starts at -1: any config the edge pushes
(version >= 0, only for a remotely-managed tunnel) replaces it. Unlike a pushed config, unknown
keys are refused, so a typo cannot silently drop an option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from connector.ingress import ORIGIN_REQUEST_KEYS, IngressConfig, IngressError

LOCAL_VERSION = -1
TOP_LEVEL_KEYS = ("ingress", "originRequest")
RULE_KEYS = ("hostname", "service", "originRequest", "access")
ACCESS_KEYS = ("required", "audTag", "issuer")
# cloudflared config keys that name the tunnel: here the token does, and two sources could disagree.
TOKEN_KEYS = ("tunnel", "credentials-file")


def load_local_config(path: Path) -> IngressConfig:
    """The validated ingress config in `path`; IngressError says what is wrong, where."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IngressError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise IngressError(f"{path}: cannot read the config file: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        hint = " (quote wildcard hostnames: \"*.example.com\")" if "alias" in str(e) else ""
        raise IngressError(f"{path}: invalid YAML{hint}: {e}") from None
    try:
        return _parse(doc)
    except IngressError as e:
        raise IngressError(f"{path}: {e}") from None


def _parse(doc: Any) -> IngressConfig:
    if not isinstance(doc, dict):
        raise IngressError("the config must be a mapping with an ingress list (ingress: [...])")
    for key in doc:
        if key in TOKEN_KEYS:
            raise IngressError(f"{key!r} is not used: the tunnel and its credentials come from --token or"
                               " --token-file; remove it")
        if key not in TOP_LEVEL_KEYS:
            raise IngressError(f"unknown key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)};"
                               " connector settings are hd-connector flags)")
    defaults = doc.get("originRequest")
    _check_options(defaults, "originRequest")
    rules = doc.get("ingress")
    if not isinstance(rules, list) or not rules:
        raise IngressError("ingress must be a non-empty list of rules ending with a catch-all"
                           " (- service: http_status:404)")
    for i, rule in enumerate(rules):
        where = f"ingress rule #{i + 1}"
        if not isinstance(rule, dict):
            raise IngressError(f"{where} must be a mapping (hostname, service, ...)")
        for key in rule:
            _check_known(key, RULE_KEYS, "key", where)
        _check_options(rule.get("originRequest"), f"{where}: originRequest")
        _check_access(rule.get("access"), where)
    return IngressConfig.parse(LOCAL_VERSION, rules, defaults)


def _check_options(options: Any, where: str) -> None:
    if options is None:
        return
    if not isinstance(options, dict):
        raise IngressError(f"{where} must be a mapping of options")
    for key in options:
        _check_known(key, ORIGIN_REQUEST_KEYS, "originRequest key", where.removesuffix(": originRequest"))
    _check_access(options.get("access"), where)


def _check_access(access: Any, where: str) -> None:
    if isinstance(access, dict):  # other shapes: AccessRequirement.parse says what is expected
        for key in access:
            _check_known(key, ACCESS_KEYS, "access key", where)


def _check_known(key: Any, allowed: tuple[str, ...], what: str, where: str) -> None:
    if key not in allowed:
        raise IngressError(f"{where}: unknown {what} {key!r} (allowed: {', '.join(allowed)})")
