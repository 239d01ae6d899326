"""A small stdlib client for the control API, and how the CLI finds it.

Lookup order: `--api-url`/`HD_API_URL` with `--api-token`/`HD_API_TOKEN`; whatever is missing comes
from the local edge's state directory (`--state-dir`/`HD_STATE_DIR`, default ~/.hd): `edge.json`
for the URL, `admin-token` for the token.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = "~/.hd"
EDGE_JSON = "edge.json"
ADMIN_TOKEN_FILE = "admin-token"
TIMEOUT = 15.0


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def default_state_dir(state_dir: str | os.PathLike | None = None) -> Path:
    return Path(state_dir or os.environ.get("HD_STATE_DIR") or DEFAULT_STATE_DIR).expanduser()


def read_edge_json(state_dir: Path) -> dict | None:
    path = state_dir / EDGE_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise CliError(f"cannot read {path}: permission denied") from None
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{path} is not a JSON object; restart `hd edge` to rewrite it")
    return doc


def _read_token(state_dir: Path) -> str | None:
    path = state_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except PermissionError:
        raise CliError(f"cannot read {path}: permission denied (pass --api-token or set HD_API_TOKEN)") from None


class ApiClient:
    def __init__(self, base_url: str, token: str, *, timeout: float = TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # Never send the admin token through an HTTP proxy for a local edge.
        handlers = [urllib.request.ProxyHandler({})] if _is_local(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r}, token=<hidden>)"

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> Any:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise CliError(self._http_error(e)) from None
        except urllib.error.URLError as e:
            raise CliError(self._unreachable(e.reason)) from None
        except (OSError, socket.timeout) as e:
            raise CliError(self._unreachable(e)) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CliError(f"the edge API at {self.base_url} sent a response that is not JSON") from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, (socket.timeout, TimeoutError)):
            why = f"no answer within {self.timeout:g}s"
        elif isinstance(reason, socket.gaierror):
            why = "unknown host"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        else:
            why = str(reason)
        return f"cannot reach the edge API at {self.base_url}: {why} — is `hd edge` running?"

    def _http_error(self, e: urllib.error.HTTPError) -> str:
        try:
            message = json.loads(e.read()).get("error")
        except Exception:
            message = None
        message = " ".join(str(message or e.reason or f"HTTP {e.code}").split())
        if e.code == 401:
            return (
                f"the edge API rejected the admin token ({message}); check --api-token/HD_API_TOKEN"
                " or the state directory's admin-token"
            )
        return message


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api(
    api_url: str | None = None, api_token: str | None = None, state_dir: str | os.PathLike | None = None
) -> ApiClient:
    """Build a client from flags/env values, filling gaps from the state directory."""
    sdir = default_state_dir(state_dir)
    if not api_url:
        edge = read_edge_json(sdir)
        if edge is None or not edge.get("api_url"):
            raise CliError(
                f"no edge found in {sdir} (no edge.json): start one with `hd edge`,"
                " or pass --api-url and --api-token (HD_API_URL, HD_API_TOKEN)"
            )
        api_url = str(edge["api_url"])
    if not api_url.startswith(("http://", "https://")):
        raise CliError(f"--api-url must start with http:// or https:// (got {api_url!r})")
    if not api_token:
        api_token = _read_token(sdir)
        if not api_token:
            raise CliError(
                f"no admin token: pass --api-token or set HD_API_TOKEN (or run the CLI where {sdir}/admin-token is readable)"
            )
    return ApiClient(api_url, api_token)


def quote(segment: str) -> str:
    """Quote one path segment (hostnames may be "*.example.com")."""
    return urllib.parse.quote(segment, safe="")
