"""control/certs.py: the edge's CA, its listener certificate, the pinned relay certificate and the
operator's own certificate, checked with real TLS handshakes (OpenSSL, as drivers verify) and with
cryptography's strict (webpki) verifier."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as v

from control.certs import (
    CertError,
    connection_params,
    covers,
    handshake_check,
    issue_server_cert,
    load_edge_tls,
    make_ca,
    normalize_names,
)
from tunnel.tls import cert_pin, ensure_edge_certificate, server_ssl_context

NOW = dt.datetime.now(dt.timezone.utc)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(d: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    c, k = d / f"{stem}.crt", d / f"{stem}.key"
    c.write_bytes(_pem(cert))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def _served_der(ctx: ssl.SSLContext) -> bytes:
    """The certificate a server context presents, read by a client that verifies nothing."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1])
    s = ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(6):
        for end in (c, s):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    return c.getpeercert(binary_form=True)


def _refused(ctx: ssl.SSLContext, cafile: Path, host: str) -> str:
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        handshake_check(ctx, cafile, host)
    return e.value.verify_message


# --- the edge's own CA -------------------------------------------------------------------------

def test_first_start_makes_a_ca_and_certificates_drivers_accept_for_every_name(tmp_path) -> None:
    tls = load_edge_tls(tmp_path, ["edge.example.com", "10.1.2.3"])
    assert tls.ca_path == tmp_path / "ca-cert.pem" and not tls.operator
    for name, mode in {"ca-key.pem": 0o600, "listener-key.pem": 0o600, "edge-key.pem": 0o600,
                       "ca-cert.pem": 0o644, "listener-cert.pem": 0o644, "edge-cert.pem": 0o644}.items():
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
    for host in ("localhost", "127.0.0.1", "::1", "edge.example.com", "10.1.2.3"):
        handshake_check(tls.listener_context, tls.ca_path, host)  # chain + host name, as verify-full
        handshake_check(tls.relay_context(), tls.ca_path, host)  # on a fresh dir the relay's too
    assert "mismatch" in _refused(tls.listener_context, tls.ca_path, "other.example.com")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(_pem(make_ca()[0]))
    assert "unable to get local issuer" in _refused(tls.listener_context, other, "localhost")
    assert tls.pin == cert_pin(tmp_path / "edge-cert.pem")


def test_listener_certificate_passes_the_strict_webpki_verifier(tmp_path) -> None:
    tls = load_edge_tls(tmp_path, ["edge.example.com"])
    ca = x509.load_pem_x509_certificate(tls.ca_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(tls.listener_cert.read_bytes())
    store = v.Store([ca])
    for subject in (v.DNSName("edge.example.com"), v.DNSName("localhost"),
                    v.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        v.PolicyBuilder().store(store).build_server_verifier(subject).verify(leaf, [])
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0


def test_restart_keeps_everything_and_a_new_name_reissues_only_the_listener_certificate(tmp_path) -> None:
    first = load_edge_tls(tmp_path, ["a.example"])
    files = {n: (tmp_path / n).read_bytes() for n in ("ca-cert.pem", "edge-cert.pem", "listener-cert.pem")}
    again = load_edge_tls(tmp_path, ["a.example"])
    assert {n: (tmp_path / n).read_bytes() for n in files} == files and again.pin == first.pin
    grown = load_edge_tls(tmp_path, ["a.example", "b.example"])
    assert (tmp_path / "listener-cert.pem").read_bytes() != files["listener-cert.pem"]
    assert (tmp_path / "ca-cert.pem").read_bytes() == files["ca-cert.pem"]  # apps keep trusting the edge
    assert grown.pin == first.pin  # tokens keep working: the relay's certificate is never replaced
    handshake_check(grown.listener_context, grown.ca_path, "b.example")


def test_a_state_dir_from_before_the_ca_keeps_its_pinned_relay_certificate(tmp_path) -> None:
    ensure_edge_certificate(tmp_path, ["edge.example"])  # the old self-signed one
    pin = cert_pin(tmp_path / "edge-cert.pem")
    tls = load_edge_tls(tmp_path, ["edge.example"])
    assert tls.pin == pin and cert_pin(tls.relay_cert) == pin
    handshake_check(tls.listener_context, tls.ca_path, "edge.example")


def test_a_damaged_or_foreign_listener_certificate_is_replaced(tmp_path) -> None:
    load_edge_tls(tmp_path, [])
    (tmp_path / "listener-cert.pem").write_text("not a certificate")
    tls = load_edge_tls(tmp_path, [])
    handshake_check(tls.listener_context, tls.ca_path, "localhost")
    ca, ca_key = make_ca()  # signed by someone else: replaced too
    _write_pair(tmp_path, "x", *issue_server_cert(ca, ca_key, ["localhost"]))
    os.replace(tmp_path / "x.crt", tmp_path / "listener-cert.pem")
    os.replace(tmp_path / "x.key", tmp_path / "listener-key.pem")
    tls = load_edge_tls(tmp_path, [])
    handshake_check(tls.listener_context, tls.ca_path, "localhost")


def test_own_listener_certificate_is_renewed_in_place_before_it_expires(tmp_path) -> None:
    tls = load_edge_tls(tmp_path, ["a.example"], now=NOW)
    before = tls.listener_cert.read_bytes()
    assert tls.refresh(NOW + dt.timedelta(days=300)) is False  # far from expiry: nothing to do
    assert tls.refresh(NOW + dt.timedelta(days=380)) is True  # within 30 days of 397
    after = x509.load_pem_x509_certificate(tls.listener_cert.read_bytes())
    assert tls.listener_cert.read_bytes() != before and "a.example" in {
        n for n in after.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        .get_values_for_type(x509.DNSName)}
    # the live context (the listeners hold it) serves the new certificate to new clients
    assert _served_der(tls.listener_context) == after.public_bytes(serialization.Encoding.DER)


def test_names_and_coverage() -> None:
    assert normalize_names(["Edge.Example.", "0.0.0.0", "::", "[::1]", "10.0.0.1", "localhost"]) == [
        "localhost", "127.0.0.1", "::1", "edge.example", "10.0.0.1"]
    with pytest.raises(CertError, match="neither a DNS name"):
        normalize_names(["http://x"])
    ca, key = make_ca()
    cert, _ = issue_server_cert(ca, key, ["*.db.example", "10.0.0.1"])
    assert covers(cert, "a.db.example") and covers(cert, "A.DB.example.") and covers(cert, "10.0.0.1")
    assert not covers(cert, "db.example") and not covers(cert, "a.b.db.example") and not covers(cert, "10.0.0.2")


def test_connection_params_per_protocol() -> None:
    assert connection_params("postgresql", "/s/ca.pem") == {"sslmode": "verify-full", "sslrootcert": "/s/ca.pem"}
    assert connection_params("mysql", "/s/ca.pem") == {"ssl-mode": "VERIFY_IDENTITY", "ssl-ca": "/s/ca.pem"}
    assert connection_params("postgresql", None) == {"sslmode": "verify-full"}  # the clients' trust store


# --- the operator's certificate ----------------------------------------------------------------

@pytest.fixture
def operator(tmp_path):
    """A private CA (as an operator's) and a certificate of it for localhost and 127.0.0.1."""
    d = tmp_path / "operator"
    d.mkdir()
    (tmp_path / "state").mkdir()
    ca, ca_key = make_ca()
    (d / "ca.pem").write_bytes(_pem(ca))
    cert, key = _write_pair(d, "server", *issue_server_cert(ca, ca_key, ["localhost", "127.0.0.1"]))
    return d, ca, ca_key, cert, key


def test_operator_certificate_serves_the_listeners_and_the_relay_keeps_its_pin(tmp_path, operator) -> None:
    d, _, _, cert, key = operator
    state = tmp_path / "state"
    own = load_edge_tls(state, [])
    tls = load_edge_tls(state, [], tls_cert=cert, tls_key=key, tls_ca=d / "ca.pem")
    assert tls.operator and tls.ca_path == d / "ca.pem" and tls.listener_cert == cert
    assert tls.pin == own.pin  # connectors keep their tokens
    assert _served_der(tls.listener_context) == _served_der(server_ssl_context(cert, key))
    handshake_check(tls.listener_context, d / "ca.pem", "127.0.0.1")
    assert tls.connection_params("postgresql") == {"sslmode": "verify-full", "sslrootcert": str(d / "ca.pem")}
    system = load_edge_tls(state, [], tls_cert=cert, tls_key=key)  # a public CA: the system bundle
    assert system.ca_path is None or system.ca_path.is_file()


def test_operator_mistakes_are_clear_errors(tmp_path, operator) -> None:
    d, ca, ca_key, cert, key = operator
    other_cert, other_key = _write_pair(d, "other", *issue_server_cert(ca, ca_key, ["localhost"]))
    expired, expired_key = _write_pair(d, "expired", *issue_server_cert(
        ca, ca_key, ["localhost"], days=1, now=NOW - dt.timedelta(days=3)))
    foreign = d / "foreign-ca.pem"
    foreign.write_bytes(_pem(make_ca()[0]))
    cases = [
        (dict(tls_cert=cert), "go together"),
        (dict(tls_cert=cert, tls_key=other_key), "cannot use the certificate"),
        (dict(tls_cert=d / "missing.crt", tls_key=key), "no such file"),
        (dict(tls_cert=expired, tls_key=expired_key), "expired on"),
        (dict(tls_cert=cert, tls_key=key, tls_ca=foreign), "does not verify the certificate"),
        (dict(tls_ca=d / "ca.pem"), "--tls-cert"),
    ]
    for kw, message in cases:
        with pytest.raises(CertError, match=message):
            load_edge_tls(tmp_path / "state", [], **kw)


def test_operator_certificate_is_reloaded_when_renewed_and_kept_when_the_new_files_are_bad(tmp_path, operator) -> None:
    d, ca, ca_key, cert, key = operator
    tls = load_edge_tls(tmp_path / "state", [], tls_cert=cert, tls_key=key, tls_ca=d / "ca.pem")
    first = _served_der(tls.listener_context)
    assert tls.refresh() is False  # unchanged files
    # an ACME client writes a renewed pair in place
    new_cert, new_key = issue_server_cert(ca, ca_key, ["localhost", "127.0.0.1"])
    _write_pair(d, "server", new_cert, new_key)
    assert tls.refresh() is True
    assert _served_der(tls.listener_context) == new_cert.public_bytes(serialization.Encoding.DER) != first
    # half-written renewal: a certificate whose key is not there yet; the previous pair stays served
    third, _ = issue_server_cert(ca, ca_key, ["localhost"])
    cert.write_bytes(_pem(third))
    with pytest.raises(CertError, match="cannot use the certificate"):
        tls.refresh()
    assert _served_der(tls.listener_context) == new_cert.public_bytes(serialization.Encoding.DER)
