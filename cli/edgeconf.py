"""Where `hd access tcp/ssh` dials: the edge's WebSocket URL and its certificate pin.

Lookup: `--edge-url`/`--edge-pin` flags, then `HD_EDGE_URL`/`HD_EDGE_PIN`; then, if the API was
named explicitly (`--api-url`/`HD_API_URL`), `GET /v1/edge` there (a remote edge outranks a
stale local state directory); then the state directory's edge.json; then `GET /v1/edge` through
the API found from the state directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from cli.apiclient import CliError, default_state_dir, read_edge_json, resolve_api

_PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class EdgeEndpoint:
    url: str  # wss://host:port (the client appends its path, e.g. /client)
    pin: str  # sha256:<hex of SHA-256 over the DER certificate>


def _check(url: str, pin: str, source: str) -> EdgeEndpoint:
    url = url.strip()
    if "://" not in url:
        url = "wss://" + url  # accept a bare host:port as in tokens
    parts = urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname:
        raise CliError(f"edge URL from {source} must look like wss://HOST:PORT (got {url!r})")
    try:
        parts.port
    except ValueError:
        raise CliError(f"edge URL from {source} has a bad port (got {url!r})") from None
    pin = pin.strip().lower()
    if not _PIN_RE.match(pin):
        raise CliError(f"edge pin from {source} must look like sha256:<64 hex digits> (got {pin!r})")
    return EdgeEndpoint(url=url.rstrip("/"), pin=pin)


def resolve_edge(
    edge_url: str | None = None,
    edge_pin: str | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    api_url: str | None = None,
    api_token: str | None = None,
) -> EdgeEndpoint:
    edge_url = edge_url or os.environ.get("HD_EDGE_URL") or None
    edge_pin = edge_pin or os.environ.get("HD_EDGE_PIN") or None
    if edge_url or edge_pin:
        if not (edge_url and edge_pin):
            raise CliError("--edge-url and --edge-pin go together (or HD_EDGE_URL and HD_EDGE_PIN): give both")
        return _check(edge_url, edge_pin, "--edge-url/--edge-pin")

    api_url = api_url or os.environ.get("HD_API_URL") or None
    if api_url:
        return _from_api(api_url, api_token, state_dir)

    sdir = default_state_dir(state_dir)
    doc = read_edge_json(sdir)
    if doc is not None and doc.get("tunnel_url") and doc.get("cert_pin"):
        return _check(str(doc["tunnel_url"]), str(doc["cert_pin"]), f"{sdir}/edge.json")
    if doc is None:
        raise CliError(
            f"cannot find the edge: no {sdir}/edge.json; pass --edge-url and --edge-pin"
            " (or HD_EDGE_URL/HD_EDGE_PIN), or --api-url/--api-token"
        )
    return _from_api(None, api_token, state_dir)


def _from_api(api_url: str | None, api_token: str | None, state_dir: str | os.PathLike | None) -> EdgeEndpoint:
    client = resolve_api(api_url, api_token, state_dir)
    info = client.get("/v1/edge") or {}
    if not info.get("tunnel_url") or not info.get("cert_pin"):
        raise CliError(f"the edge API at {client.base_url} did not say where its tunnel endpoint is")
    return _check(str(info["tunnel_url"]), str(info["cert_pin"]), f"{client.base_url}/v1/edge")
