"""TLS helpers shared by the edge and its dialers.

The edge uses a self-signed certificate made on first start. Dialers (connector, access
client) do not verify it against a CA; they check its SHA-256 pin, which travels inside the
tunnel token or `edge.json`, before sending anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "edge-cert.pem"
KEY_FILE = "edge-key.pem"
VALIDITY_DAYS = 3650
_DEFAULT_NAMES = ["localhost", "127.0.0.1", "::1"]
PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class PinMismatch(Exception):
    """The peer's certificate does not match the expected pin."""


def ensure_edge_certificate(state_dir: Path, hostnames: list[str]) -> tuple[Path, Path]:
    """Return (cert_path, key_path), making a self-signed EC P-256 pair on first call.

    An existing pair is kept as is: the pin is in every issued token, so regenerating it
    would strand every connector.
    """
    state_dir = Path(state_dir)
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[str] = []
    for name in _DEFAULT_NAMES + list(hostnames):
        if name and name not in names:
            names.append(name)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hd edge")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + _dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_path, key_pem)
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` atomically, with `mode` set before any byte lands on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def pin_of_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def cert_pin(cert_pem_path: Path) -> str:
    """The pin of a PEM certificate file: "sha256:" + hex SHA-256 of its DER form."""
    cert = x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes())
    return pin_of_der(cert.public_bytes(serialization.Encoding.DER))


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def pinned_client_ssl_context() -> ssl.SSLContext:
    """A client context that accepts any certificate: the caller MUST call `verify_pin`
    on the connection before sending anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verify_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket, pin: str) -> None:
    """Raise PinMismatch unless the peer certificate's pin equals `pin`."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PinMismatch("the edge presented no TLS certificate; refusing to continue")
    verify_pin_der(der, pin)


def verify_pin_der(der: bytes, pin: str) -> None:
    """Raise PinMismatch unless the DER certificate's pin equals `pin` (TLS and QUIC links)."""
    actual = pin_of_der(der)
    if not hmac.compare_digest(actual.encode(), pin.strip().lower().encode()):
        raise PinMismatch(
            f"the edge's TLS certificate does not match the pin (expected {pin}, got {actual}); "
            "refusing to connect — is the token or edge URL for this edge?"
        )
