"""`host:port` parsing shared by `hd edge`, the CLI and the access client options."""

from __future__ import annotations


def parse_hostport(text: str, *, what: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse "H:P", "[v6]:P", ":P" (meaning 127.0.0.1) or, given a default port, just "H".

    Raises ValueError with a message that starts with `what` (e.g. the flag name).
    """
    s = (text or "").strip()
    if not s:
        raise ValueError(f"{what}: empty address (expected host:port)")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: bad address {text!r} (expected [v6addr]:port)")
        port_s = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, _, port_s = s.partition(":")
    elif ":" not in s:
        host, port_s = s, None
    else:
        raise ValueError(f"{what}: bad address {text!r} (write IPv6 addresses as [addr]:port)")
    host = host or "127.0.0.1"
    if not port_s:
        if default_port is None:
            raise ValueError(f"{what}: address {text!r} needs a port (host:port)")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{what}: bad port in {text!r} (expected 0-65535)")
    return host, int(port_s)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
