"""The edge's certificates: the one place that makes, loads, checks and renews them.

Three identities, in the state directory (docs/ARCHITECTURE.md, "Control plane"):

- `ca-cert.pem` / `ca-key.pem` (0600): the edge's own certificate authority, made on first start.
  Applications verify the database listeners with it (libpq's `sslrootcert`, Node's `ca`, PyMySQL's
  `ssl_ca`); `hd edge ca` prints it.
- `listener-cert.pem` / `listener-key.pem` (0600): what the Postgres and MySQL listeners present,
  signed by that CA, for every name the edge is reached by (`--advertise`, `--tls-name`, the listen
  addresses, localhost/127.0.0.1/::1). Reissued at start when a name is missing, and renewed while
  running before it expires (nothing pins it, so replacing it costs nobody anything).
- `edge-cert.pem` / `edge-key.pem` (0600): the relay's certificate (WebSocket and QUIC). Tunnel
  tokens carry its pin (tunnel/tls.py), so it is made once and never replaced; on a fresh state dir
  it is signed by the CA too.

With `hd edge --tls-cert F --tls-key F` the operator's certificate (e.g. from an ACME client)
replaces the listener certificate and is reloaded when the files change; `--tls-ca F` names the
bundle applications verify it with (default: this machine's system bundle, for a public CA). The
relay keeps its pinned certificate either way: an ACME renewal every 60-90 days must not strand
every connector.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.tls import CERT_FILE as RELAY_CERT_FILE
from tunnel.tls import KEY_FILE as RELAY_KEY_FILE
from tunnel.tls import cert_pin, server_ssl_context, write_private_file

log = logging.getLogger("hd.certs")

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
LISTENER_CERT_FILE = "listener-cert.pem"
LISTENER_KEY_FILE = "listener-key.pem"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
RELAY_DAYS = 3650
LISTENER_DAYS = 397  # what public CAs may issue; renewed automatically, so short costs nothing
RENEW_BEFORE = _dt.timedelta(days=30)
_SKEW = _dt.timedelta(minutes=5)  # not-before in the past: tolerate small clock differences


class CertError(Exception):
    """A certificate problem the operator can fix (unreadable file, key mismatch, expired)."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def normalize_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """DNS names (lower-cased) and IP addresses (canonical), defaults first, no duplicates; wildcard
    and empty addresses (0.0.0.0, ::) are not names anyone connects to, so they are dropped."""
    out: list[str] = []
    for raw in (*DEFAULT_NAMES, *names):
        name = (raw or "").strip().strip("[]")
        if not name:
            continue
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            name = name.lower().rstrip(".")
            if not name or any(c.isspace() or c in "/:@" for c in name):
                raise CertError(f"{raw!r} is neither a DNS name nor an IP address") from None
        else:
            if ip.is_unspecified:
                continue
            name = str(ip)
        if name not in out:
            out.append(name)
    return out


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def cert_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses of a certificate's subjectAltName (normalised as above)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


def covers(cert: x509.Certificate, name: str) -> bool:
    """Whether a client doing hostname verification accepts `cert` for `name` (one-label wildcards)."""
    names = cert_names(cert)
    try:
        return str(ipaddress.ip_address(name.strip("[]"))) in names
    except ValueError:
        pass
    name = name.lower().rstrip(".")
    if name in names:
        return True
    head, _, rest = name.partition(".")
    return bool(rest) and f"*.{rest}" in names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(now: _dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new CA (EC P-256, path length 0: it signs only the edge's own certificates). The random
    suffix in its name keeps two edges' CAs apart in a client's trust store."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"hd edge CA {secrets.token_hex(4)}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + _dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(_ski(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str], *,
                      days: int = LISTENER_DAYS, now: _dt.datetime | None = None,
                      ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for `names` (the first is also the common name), signed by the CA,
    with the extensions strict verifiers (OpenSSL's X509_STRICT, webpki) require."""
    if not names:
        raise CertError("a server certificate needs at least one name")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_ski(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # damaged: made afresh by the caller


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # ValueError, TypeError or InvalidSignature: not ours
        return False
    return True


def _load_or_make_ca(state_dir: Path, now: _dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    cert_path, key_path = state_dir / CA_CERT_FILE, state_dir / CA_KEY_FILE
    cert = _load_cert(cert_path)
    key = None
    if cert is not None and key_path.exists():
        try:
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError):
            loaded = None
        if isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.public_key() == cert.public_key():
            key = loaded
    if cert is not None and key is not None and cert.not_valid_after_utc - now > RENEW_BEFORE:
        return cert, key, False
    cert, key = make_ca(now)
    write_private_file(key_path, _key_pem(key))
    write_private_file(cert_path, _pem(cert), mode=0o644)
    log.info("edge certificate authority made: %s (%s)", cert.subject.rfc4514_string(), cert_path)
    return cert, key, True


def _write_pair(state_dir: Path, cert_file: str, key_file: str, cert: x509.Certificate,
                key: ec.EllipticCurvePrivateKey) -> None:
    # the key first: a reader that sees the new certificate finds its key already there
    write_private_file(state_dir / key_file, _key_pem(key))
    write_private_file(state_dir / cert_file, _pem(cert), mode=0o644)


def connection_params(scheme: str, ca_path: str | os.PathLike | None) -> dict[str, str]:
    """Query parameters of a connection string that make a driver verify the edge.

    Postgres: libpq's `sslmode=verify-full` + `sslrootcert` (read as such by psql/psycopg, asyncpg
    and node-postgres). MySQL: the MySQL client's `ssl-mode=VERIFY_IDENTITY` + `ssl-ca` spelling
    (`mysql --ssl-mode --ssl-ca`, MySQL Shell URIs); MySQL drivers take the CA as an option
    (README, "TLS"). Without a CA file the clients' own trust store decides."""
    ca = None if ca_path is None else str(ca_path)
    if scheme == "mysql":
        return {"ssl-mode": "VERIFY_IDENTITY", **({"ssl-ca": ca} if ca else {})}
    return {"sslmode": "verify-full", **({"sslrootcert": ca} if ca else {})}


def _system_bundle() -> Path | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class EdgeTls:
    """The edge's TLS material, loaded (see `load_edge_tls`)."""

    state_dir: Path
    names: list[str]  # the names the listener certificate must carry
    relay_cert: Path
    relay_key: Path
    pin: str  # of the relay certificate: what tunnel tokens carry
    listener_cert: Path
    listener_key: Path
    ca_path: Path | None  # what applications verify the listeners with (None: their own trust store)
    operator: bool  # the listener certificate is the operator's (--tls-cert/--tls-key)
    listener_context: ssl.SSLContext = field(repr=False, default=None)  # type: ignore[assignment]
    _stamp: tuple = field(repr=False, default=())

    # --- what applications are told -------------------------------------------------------------
    def connection_params(self, scheme: str) -> dict[str, str]:
        return connection_params(scheme, self.ca_path)

    def ca_pem(self) -> str:
        """The PEM text applications verify the edge with (`hd edge ca`)."""
        if self.ca_path is None:
            raise CertError("this edge's certificate is verified with the clients' own trust store (no CA file)")
        try:
            return self.ca_path.read_text()
        except OSError as e:
            raise CertError(f"cannot read {self.ca_path}: {e.strerror or e}") from None

    def listener_covers(self, name: str) -> bool:
        cert = _load_cert(self.listener_cert)
        return cert is not None and covers(cert, name)

    def relay_context(self) -> ssl.SSLContext:
        return server_ssl_context(self.relay_cert, self.relay_key)

    # --- renewal --------------------------------------------------------------------------------
    def refresh(self, now: _dt.datetime | None = None) -> bool:
        """Keep the listener certificate current, in place (the live context serves new handshakes
        with it): the operator's files are reloaded when they change; our own certificate is
        renewed within RENEW_BEFORE of its expiry. Returns whether anything changed. Raises
        CertError when the operator's new files do not load (the previous certificate stays)."""
        now = now or _now()
        if self.operator:
            stamp = _file_stamp(self.listener_cert, self.listener_key)
            if stamp == self._stamp:
                return False
            _check_operator_pair(self.listener_cert, self.listener_key, now)  # before touching the live one
            self.listener_context.load_cert_chain(str(self.listener_cert), str(self.listener_key))
            self._stamp = stamp
            log.info("listener certificate reloaded from %s", self.listener_cert)
            return True
        cert = _load_cert(self.listener_cert)
        if cert is not None and cert.not_valid_after_utc - now > RENEW_BEFORE:
            return False
        ca, ca_key, _ = _load_or_make_ca(self.state_dir, now)
        self.ca_path = self.state_dir / CA_CERT_FILE
        new, key = issue_server_cert(ca, ca_key, self.names, now=now)
        _write_pair(self.state_dir, LISTENER_CERT_FILE, LISTENER_KEY_FILE, new, key)
        self.listener_context.load_cert_chain(str(self.listener_cert), str(self.listener_key))
        log.info("listener certificate renewed, valid until %s", new.not_valid_after_utc.date())
        return True


def _file_stamp(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _check_operator_pair(cert_path: Path, key_path: Path, now: _dt.datetime) -> x509.Certificate:
    """Load the operator's certificate and key as a server would; the leaf must not be expired."""
    for path in (cert_path, key_path):  # OpenSSL's errors do not say which file
        if not path.is_file():
            raise CertError(f"cannot read {path}: no such file")
        if not os.access(path, os.R_OK):
            raise CertError(f"cannot read {path}: permission denied")
    try:
        server_ssl_context(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        raise CertError(f"cannot use the certificate {cert_path} with the key {key_path}: {e}") from None
    leaf = _load_cert(cert_path)
    if leaf is None:
        raise CertError(f"{cert_path} holds no PEM certificate")
    if leaf.not_valid_after_utc <= now:
        raise CertError(f"the certificate in {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    return leaf


def handshake_check(server_context: ssl.SSLContext, cafile: Path, hostname: str) -> None:
    """A TLS handshake in memory between `server_context` and a client that verifies as drivers
    do (OpenSSL, CA file `cafile`, hostname check). Raises ssl.SSLCertVerificationError if a
    driver would refuse the certificate."""
    client_context = ssl.create_default_context(cafile=str(cafile))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_context.wrap_bio(bios[0], bios[1], server_hostname=hostname)
    server = server_context.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(8):  # TLS 1.3 needs 2 flights, 1.2 needs 3
        for i, end in enumerate((client, server)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if i == 0:
                        raise
                    done[i] = True  # the server's side of an alert the client already raised
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            return
    raise ssl.SSLError("the TLS handshake did not complete")


def _check_bundle_verifies(bundle: Path, cert_path: Path, key_path: Path, leaf: x509.Certificate) -> None:
    """`--tls-ca` must verify `--tls-cert` as served, or every driver would fail later."""
    names = sorted(cert_names(leaf), key=lambda n: n.startswith("*."))  # a concrete name first
    if not names:
        raise CertError(f"the certificate in {cert_path} names no host (no subjectAltName)")
    host = "hd-check." + names[0][2:] if names[0].startswith("*.") else names[0]
    try:
        handshake_check(server_ssl_context(cert_path, key_path), bundle, host)
    except FileNotFoundError:
        raise CertError(f"cannot read --tls-ca {bundle}: no such file") from None
    except ssl.SSLCertVerificationError as e:
        raise CertError(f"--tls-ca {bundle} does not verify the certificate in {cert_path}:"
                        f" {e.verify_message}") from None
    except (ssl.SSLError, OSError) as e:
        raise CertError(f"cannot check --tls-cert {cert_path} against --tls-ca {bundle}: {e}") from None


def load_edge_tls(state_dir: Path, names: list[str], *, tls_cert: Path | None = None,
                  tls_key: Path | None = None, tls_ca: Path | None = None,
                  now: _dt.datetime | None = None) -> EdgeTls:
    """Make or load every certificate of the edge in `state_dir` (see the module docstring).

    `names`: the extra names the listener certificate must carry (defaults are added). Raises
    CertError for the operator's mistakes, OSError when the state dir cannot be written."""
    state_dir = Path(state_dir)
    now = now or _now()
    if (tls_cert is None) != (tls_key is None):
        raise CertError("--tls-cert and --tls-key go together: give both")
    if tls_ca is not None and tls_cert is None:
        raise CertError("--tls-ca names the CA of your own certificate: give it with --tls-cert/--tls-key")
    wanted = normalize_names(names)
    if tls_cert is not None:  # the operator's files first: a mistake there changes nothing here
        assert tls_key is not None
        # absolute, not resolved: an ACME client swaps the target of a symlink (certbot's live/) on renewal
        tls_cert, tls_key = Path(tls_cert).expanduser().absolute(), Path(tls_key).expanduser().absolute()
        leaf = _check_operator_pair(tls_cert, tls_key, now)
        bundle = Path(tls_ca).expanduser().absolute() if tls_ca is not None else _system_bundle()
        if tls_ca is not None:
            _check_bundle_verifies(bundle, tls_cert, tls_key, leaf)

    ca, ca_key, new_ca = _load_or_make_ca(state_dir, now)

    # The relay's pinned certificate: made once (tokens carry its pin), kept whatever it is.
    relay_cert, relay_key = state_dir / RELAY_CERT_FILE, state_dir / RELAY_KEY_FILE
    if not (relay_cert.exists() and relay_key.exists()):
        cert, key = issue_server_cert(ca, ca_key, wanted, days=RELAY_DAYS, now=now)
        _write_pair(state_dir, RELAY_CERT_FILE, RELAY_KEY_FILE, cert, key)

    if tls_cert is not None:
        assert tls_key is not None
        tls = EdgeTls(state_dir, wanted, relay_cert, relay_key, cert_pin(relay_cert), tls_cert, tls_key,
                      bundle, True, _stamp=_file_stamp(tls_cert, tls_key))
    else:
        listener = _load_cert(state_dir / LISTENER_CERT_FILE)
        fresh = (listener is not None and not new_ca and (state_dir / LISTENER_KEY_FILE).exists()
                 and _issued_by(listener, ca) and set(wanted) <= cert_names(listener)
                 and listener.not_valid_after_utc - now > RENEW_BEFORE)
        if not fresh:
            cert, key = issue_server_cert(ca, ca_key, wanted, now=now)
            _write_pair(state_dir, LISTENER_CERT_FILE, LISTENER_KEY_FILE, cert, key)
            log.info("listener certificate issued for %s", ", ".join(wanted))
        tls = EdgeTls(state_dir, wanted, relay_cert, relay_key, cert_pin(relay_cert),
                      state_dir / LISTENER_CERT_FILE, state_dir / LISTENER_KEY_FILE,
                      (state_dir / CA_CERT_FILE).absolute(), False)
    tls.listener_context = server_ssl_context(tls.listener_cert, tls.listener_key)
    return tls
