"""proxy/configs.py: origin specs, connection strings, parsing and the conflicting-flag rules.

Also home of `make_ca` / `make_leaf`, the throwaway certificates the store, API and CLI tests use.
"""

from __future__ import annotations

import datetime
import os
from urllib.parse import unquote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from control.secretbox import SecretBox
from control.store import Store
from proxy.configs import check_origin_flags, connection_string, origin_spec, parse_connection_string
from proxy.pg.auth import ScramSecret


# --- throwaway certificates -----------------------------------------------------------------
def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str = "Test CA") -> tuple[bytes, bytes, object, object]:
    """(cert PEM, key PEM, cert, key) of a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key


def make_leaf(ca_cert, ca_key, cn: str = "app") -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a client certificate signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db", SecretBox(os.urandom(32)))
    yield s
    s.close()


TOKEN_ID = "0123456789abcdef0123456789abcdef.access"


# --- origin_spec ------------------------------------------------------------------------------
def test_origin_spec_of_a_direct_config_with_certificates(store: Store) -> None:
    ca_pem, _, ca, ca_key = make_ca()
    leaf_pem, leaf_key = make_leaf(ca, ca_key)
    store.add_certificate("ca", "certificate-authority", ca_pem)
    store.add_certificate("client", "mtls-certificate", leaf_pem, leaf_key)
    c = store.create_hyperdrive(name="db", host="127.0.0.1", port=6543, database="app", user="app",
                                password="pw", sslmode="verify-full", ca_certificate_id="ca",
                                mtls_certificate_id="client")
    spec = origin_spec(c, store)
    assert (spec.host, spec.port, spec.database, spec.user, spec.password) == ("127.0.0.1", 6543, "app", "app", "pw")
    assert spec.sslmode == "verify-full"
    assert spec.ca_pem == ca_pem and spec.client_cert_pem == leaf_pem and spec.client_key_pem == leaf_key
    assert spec.access_client_id is None and spec.access_client_secret is None
    assert spec.connect_timeout == 15.0


def test_origin_spec_through_a_tunnel_has_no_port(store: Store) -> None:
    c = store.create_hyperdrive(name="db", host="db.internal.example", database="app", user="app", password="pw",
                                access_client_id=TOKEN_ID, access_client_secret="s3cret")
    spec = origin_spec(c, store)
    assert spec.port is None and spec.host == "db.internal.example"
    assert (spec.access_client_id, spec.access_client_secret) == (TOKEN_ID, "s3cret")
    assert spec.ca_pem is None and spec.client_cert_pem is None and spec.sslmode == "require"


# --- connection strings -----------------------------------------------------------------------
def test_connection_string_is_what_drivers_read(store: Store) -> None:
    c = store.create_hyperdrive(name="db", host="db.example", database="my db/ä", user="app", password="pw")
    url = connection_string(c, "127.0.0.1:6432")
    assert url.startswith(f"postgresql://{c.client_user}:") and url.endswith("?sslmode=require")
    u = urlsplit(url)
    assert (u.hostname, u.port, unquote(u.username), unquote(u.password)) == (
        "127.0.0.1", 6432, c.client_user, c.client_password)
    assert unquote(u.path[1:]) == "my db/ä" and "/" not in u.path[1:]
    assert ScramSecret.from_string(c.client_scram).verify_password(c.client_password)
    # libpq's own parser (through psycopg) reads it as meant
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(url)
    assert d["user"] == c.client_user and d["password"] == c.client_password
    assert d["host"] == "127.0.0.1" and str(d["port"]) == "6432" and d["dbname"] == "my db/ä"
    assert d["sslmode"] == "require"
    # and it parses back
    back = parse_connection_string(url)
    assert back == {"scheme": "postgresql", "user": c.client_user, "password": c.client_password,
                    "host": "127.0.0.1", "port": 6432, "database": "my db/ä", "sslmode": "require"}


@pytest.mark.parametrize("listen, netloc", [
    ("0.0.0.0:6432", "127.0.0.1:6432"),
    ("[::]:7000", "[::1]:7000"),
    ("[::1]:7000", "[::1]:7000"),
    ("edge.example:5432", "edge.example:5432"),
    (None, "127.0.0.1:6432"),
])
def test_connection_string_host(store: Store, listen, netloc) -> None:
    c = store.create_hyperdrive(name="db", host="db.example", database="app", user="app", password="pw")
    assert urlsplit(connection_string(c, listen)).netloc.endswith("@" + netloc)


# --- parse_connection_string ------------------------------------------------------------------
def test_parse_connection_string_variants() -> None:
    assert parse_connection_string("postgres://app:p%40ss%2Fw@db.example:6543/app") == {
        "scheme": "postgresql", "user": "app", "password": "p@ss/w", "host": "db.example", "port": 6543,
        "database": "app"}
    got = parse_connection_string("postgresql://app@[2001:db8::1]/my%20db?sslmode=verify-full&channel_binding=x")
    assert got == {"scheme": "postgresql", "user": "app", "password": None, "host": "2001:db8::1", "port": None,
                   "database": "my db", "sslmode": "verify-full"}
    assert parse_connection_string("mysql://root:pw@127.0.0.1:3306/shop")["scheme"] == "mysql"
    assert parse_connection_string(" postgres://a:b@h/d?sslmode=prefer ")["sslmode"] == "require"


@pytest.mark.parametrize("url, needle", [
    ("", "empty"),
    ("db.example:5432/app", "not a URL"),
    ("http://a:b@h/d", "unsupported connection string scheme 'http://'"),
    ("postgres://a:b@h:99999/d", "bad host or port"),
    ("postgres://a:b@h:xx/d", "bad host or port"),
    ("postgres://a:b@/d", "no host"),
    ("postgres://h:5432/d", "no user"),
    ("postgres://a:b@h:5432", "no database"),
    ("postgres://a:b@h:5432/", "no database"),
    ("postgres://a:b@h/d/e", "just the database name"),
    ("postgres://a:b@h1,h2/d", "several hosts"),
    ("postgres://a:p#w@h/d", "'#'"),
    ("postgres://a:b@h/d?sslmode=allow", "unsupported sslmode"),
])
def test_parse_connection_string_errors(url, needle) -> None:
    with pytest.raises(ValueError, match=None) as e:
        parse_connection_string(url)
    assert needle in str(e.value)
    assert "p#w" not in str(e.value)  # never echoes the password


# --- conflicting settings ---------------------------------------------------------------------
@pytest.mark.parametrize("fields, needle", [
    ({"connection_string": "postgres://a:b@h/d", "origin_host": "x"}, "connection_string conflicts with origin_host"),
    ({"connection_string": "postgres://a:b@h/d", "origin_port": 1, "database": "x"},
     "connection_string conflicts with origin_port, database"),
    ({"connection_string": "postgres://a:b@h/d", "origin_scheme": "mysql"}, "conflicts with origin_scheme"),
    ({"connection_string": "postgres://a:b@h/d", "origin_user": "u", "origin_password": "p"},
     "conflicts with origin_user, origin_password"),
    ({"origin_port": 5432, "access_client_id": TOKEN_ID, "access_client_secret": "s"},
     "origin_port conflicts with access_client_id"),
    ({"access_client_id": TOKEN_ID}, "access_client_id needs access_client_secret"),
    ({"access_client_secret": "s"}, "access_client_secret needs access_client_id"),
])
def test_conflicting_settings_are_named(fields, needle) -> None:
    with pytest.raises(ValueError) as e:
        check_origin_flags(fields, creating=True)
    assert needle in str(e.value)
    with pytest.raises(ValueError) as e:
        check_origin_flags(fields, creating=True, label=lambda k: "--" + k.replace("_", "-"))
    assert needle.replace("connection_string", "--connection-string").replace("origin_", "--origin-").replace(
        "access_client_", "--access-client-").replace("database", "--database") in str(e.value)


def test_settings_that_do_not_conflict() -> None:
    check_origin_flags({"connection_string": "postgres://a:b@h/d", "access_client_id": TOKEN_ID,
                        "access_client_secret": "s", "max_age": 5}, creating=True)
    check_origin_flags({"origin_host": "h", "origin_port": 5432, "access_client_id": None}, creating=True)
    check_origin_flags({"access_client_secret": "rotated"}, creating=False)  # update: only the secret
    check_origin_flags({"origin_port": 5432, "access_client_id": ""}, creating=False)  # "" clears
