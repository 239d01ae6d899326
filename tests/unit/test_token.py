"""Tunnel token encoding and the TLS/pinning helpers it carries the pin for."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tunnel.tls import (
    PinMismatch,
    cert_pin,
    ensure_edge_certificate,
    pinned_client_ssl_context,
    server_ssl_context,
    verify_pin,
)
from tunnel.token import InvalidToken, TunnelToken

PIN = "sha256:" + "ab" * 32
SECRET = bytes(range(32))


def make(**kw) -> TunnelToken:
    args = dict(tunnel_id="0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10", secret=SECRET, edge=["127.0.0.1:7844"], pin=PIN)
    args.update(kw)
    return TunnelToken(**args)


def b64json(doc) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_round_trip() -> None:
    tok = make(edge=["127.0.0.1:7844", "[::1]:7844", "edge.example:443"])
    assert TunnelToken.decode(tok.encode()) == tok


def test_encoding_is_std_base64_of_compact_json() -> None:
    text = make().encode()
    raw = base64.b64decode(text, validate=True)
    assert b" " not in raw  # compact separators
    doc = json.loads(raw)
    assert doc == {
        "t": "0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10",
        "s": base64.b64encode(SECRET).decode(),
        "e": ["127.0.0.1:7844"],
        "p": PIN,
    }


def test_whitespace_around_and_inside_is_tolerated() -> None:
    text = make().encode()
    wrapped = "\n  " + text[:20] + "\n" + text[20:] + " \t\n"
    assert TunnelToken.decode(wrapped) == make()


def test_secret_is_not_in_repr() -> None:
    assert repr(SECRET) not in repr(make())
    assert "secret" not in repr(make())


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("not base64 at all!", "base64"),
        (base64.b64encode(b"\xff\xfe garbage").decode(), "JSON"),
        (b64json(["t", "s"]), "JSON object"),
        (b64json({"t": "x", "s": base64.b64encode(SECRET).decode(), "e": ["h:1"]}), "missing field(s) p"),
        (b64json({}), "missing field(s) t, s, e, p"),
        (b64json({"t": "", "s": base64.b64encode(SECRET).decode(), "e": ["h:1"], "p": PIN}), "tunnel id"),
        (b64json({"t": "x", "s": base64.b64encode(b"short").decode(), "e": ["h:1"], "p": PIN}), "too short"),
        (b64json({"t": "x", "s": "%%%", "e": ["h:1"], "p": PIN}), "secret is not valid base64"),
        (b64json({"t": "x", "s": 7, "e": ["h:1"], "p": PIN}), "secret is not text"),
        (b64json({"t": "x", "s": base64.b64encode(SECRET).decode(), "e": [], "p": PIN}), "no edge address"),
        (b64json({"t": "x", "s": base64.b64encode(SECRET).decode(), "e": ["nohost"], "p": PIN}), "host:port"),
        (b64json({"t": "x", "s": base64.b64encode(SECRET).decode(), "e": ["h:99999"], "p": PIN}), "host:port"),
        (b64json({"t": "x", "s": base64.b64encode(SECRET).decode(), "e": ["h:1"], "p": "md5:00"}), "pin"),
    ],
)
def test_malformed_tokens_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidToken, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        TunnelToken.decode(text)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_error_messages_never_contain_the_secret() -> None:
    secret_b64 = base64.b64encode(b"s" * 10).decode()
    with pytest.raises(InvalidToken) as info:
        TunnelToken.decode(b64json({"t": "x", "s": secret_b64, "e": ["h:1"], "p": PIN}))
    assert secret_b64 not in str(info.value)


# --- TLS helpers ----------------------------------------------------------------------------

def test_tls_certificate_made_once_with_sans_validity_and_private_key(tmp_path) -> None:
    cert_path, key_path = ensure_edge_certificate(tmp_path, ["edge.example", "10.1.2.3"])
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "edge.example"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3649)
    assert cert.public_key().curve.name == "secp256r1"

    pin = cert_pin(cert_path)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pin == "sha256:" + hashlib.sha256(der).hexdigest()
    # second start keeps the pair (the pin is baked into every token)
    assert ensure_edge_certificate(tmp_path, ["other.example"]) == (cert_path, key_path)
    assert cert_pin(cert_path) == pin


async def _handshake(tmp_path, pin: str):
    cert, key = ensure_edge_certificate(tmp_path, [])
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ssl_context(cert, key))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=pinned_client_ssl_context()), 5
        )
        try:
            verify_pin(writer.get_extra_info("ssl_object"), pin)
            return writer.get_extra_info("ssl_object").version()
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_pinned_handshake_accepts_the_right_pin(tmp_path) -> None:
    ensure_edge_certificate(tmp_path, [])
    version = await _handshake(tmp_path, cert_pin(tmp_path / "edge-cert.pem"))
    assert version in ("TLSv1.2", "TLSv1.3")


async def test_tls_pinned_handshake_refuses_another_pin(tmp_path) -> None:
    with pytest.raises(PinMismatch, match="does not match the pin"):
        await _handshake(tmp_path, "sha256:" + "00" * 32)


def test_tls_client_context_is_tls12_plus_without_ca_checks() -> None:
    import ssl

    ctx = pinned_client_ssl_context()
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname is False and ctx.verify_mode == ssl.CERT_NONE


def test_tls_verify_pin_without_certificate() -> None:
    with pytest.raises(PinMismatch, match="no TLS certificate"):
        verify_pin(None, PIN)  # type: ignore[arg-type]
