"""The SQLite store and secrets at rest."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from control.secretbox import SecretBox, SecretBoxError
import control.store as store_mod
from control.store import (
    MIGRATIONS,
    AccessApp,
    Certificate,
    ConflictError,
    HyperdriveConfig,
    NotFoundError,
    Route,
    ServiceToken,
    Store,
    StoreError,
    ValidationError,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


@pytest.fixture
def box(tmp_path) -> SecretBox:
    return SecretBox.load_or_create(tmp_path / "secret.key")


@pytest.fixture
def store(tmp_path, box) -> Store:
    s = Store(tmp_path / "state.db", box, clock=Clock())
    yield s
    s.close()


# --- secretbox ------------------------------------------------------------------------------

def test_secret_key_file_is_private_and_reused(tmp_path) -> None:
    path = tmp_path / "secret.key"
    a = SecretBox.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    blob = a.encrypt(b"hello", aad=b"row-1")
    assert SecretBox.load_or_create(path).decrypt(blob, aad=b"row-1") == b"hello"


def test_secretbox_refuses_wrong_key_wrong_aad_and_garbage() -> None:
    a, b = SecretBox(os.urandom(32)), SecretBox(os.urandom(32))
    blob = a.encrypt(b"s3cret", aad=b"x")
    assert b"s3cret" not in blob
    with pytest.raises(SecretBoxError, match="does not match"):
        b.decrypt(blob, aad=b"x")
    with pytest.raises(SecretBoxError):
        a.decrypt(blob, aad=b"y")
    with pytest.raises(SecretBoxError, match="malformed"):
        a.decrypt(b"\x01short")
    assert "key" in repr(a) and repr(a).count("\\x") == 0


# --- tunnels --------------------------------------------------------------------------------

def test_create_get_list_delete_tunnel(store: Store) -> None:
    t = store.create_tunnel("vpc-01")
    assert len(t.secret) == 32 and t.config_version == 1
    assert store.get_tunnel(t.id) == t
    assert store.get_tunnel("vpc-01") == t
    assert store.get_tunnel("nope") is None
    u = store.create_tunnel("vpc-02")
    assert [x.name for x in store.list_tunnels()] == ["vpc-01", "vpc-02"]
    assert u.secret != t.secret
    assert store.delete_tunnel("vpc-01") == t
    assert store.delete_tunnel("vpc-01") is None
    assert [x.name for x in store.list_tunnels()] == ["vpc-02"]
    assert "secret" not in repr(t)


def test_duplicate_tunnel_name_conflicts(store: Store) -> None:
    store.create_tunnel("a")
    with pytest.raises(ConflictError, match="already exists"):
        store.create_tunnel("a")
    assert isinstance(ConflictError("x"), StoreError)


@pytest.mark.parametrize("name", ["", "  ", "-lead", "has space", "a/b", "x" * 64,
                                  "0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10"])
def test_invalid_tunnel_names(store: Store, name: str) -> None:
    with pytest.raises(ValidationError):
        store.create_tunnel(name)


def test_tunnel_secret_is_encrypted_at_rest_and_survives_reopen(tmp_path, box) -> None:
    s = Store(tmp_path / "state.db", box)
    t = s.create_tunnel("t")
    s.close()
    raw = b"".join(
        bytes(r[0]) for r in sqlite3.connect(tmp_path / "state.db").execute("SELECT secret FROM tunnels")
    )
    assert t.secret not in raw
    s2 = Store(tmp_path / "state.db", box)
    assert s2.get_tunnel("t").secret == t.secret
    s2.close()
    wrong = Store(tmp_path / "state.db", SecretBox(os.urandom(32)))
    with pytest.raises(SecretBoxError):
        wrong.get_tunnel("t")
    wrong.close()


def test_schema_is_versioned_and_refuses_a_newer_one(tmp_path, box) -> None:
    s = Store(tmp_path / "state.db", box)
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) == 0o600
    assert s.schema_version == 3 == len(MIGRATIONS)
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "state.db", box)


# --- routes ---------------------------------------------------------------------------------

def test_add_and_get_route(store: Store) -> None:
    t = store.create_tunnel("t")
    r = store.add_route(t.id, "DB.Internal.Example.", "tcp://127.0.0.1:5432", False)
    assert r == Route("db.internal.example", t.id, "tcp://127.0.0.1:5432", False, 10.0, r.created_at)
    assert store.get_route("db.internal.example") == r
    assert store.get_route("DB.internal.example") == r
    assert store.get_route("other.example") is None
    assert store.get_route("db.internal.example:443") == r  # a port plays no part in routing
    assert store.routes_for(t.id) == [r]
    assert store.get_tunnel(t.id).config_version == 2


def test_add_route_accepts_tunnel_name_and_unknown_tunnel_is_not_found(store: Store) -> None:
    t = store.create_tunnel("named")
    assert store.add_route("named", "a.example", "tcp://h:1", True).tunnel_id == t.id
    with pytest.raises(NotFoundError):
        store.add_route("missing", "b.example", "tcp://h:1", True)


@pytest.mark.parametrize(
    "hostname, message",
    [
        ("", "empty"),
        ("https://db.example", "scheme"),
        ("db.example:5432", "port"),
        ("db.example/path", "path"),
        ("*", "suffix"),
        ("*.", "suffix"),
        ("a.*.example", "first label"),
        ("*foo.example", "first label"),
        ("bad_-.exa mple", "label"),
        ("-a.example", "label"),
        ("a..example", "label"),
        ("a" * 64 + ".example", "label"),
    ],
)
def test_bad_hostnames(store: Store, hostname: str, message: str) -> None:
    t = store.create_tunnel("t")
    with pytest.raises(ValidationError, match=message):
        store.add_route(t.id, hostname, "tcp://127.0.0.1:1", False)


@pytest.mark.parametrize(
    "service, canonical",
    [
        ("tcp://127.0.0.1:5432", "tcp://127.0.0.1:5432"),
        ("TCP://db.local:5432/", "tcp://db.local:5432"),
        ("tcp://[::1]:5432", "tcp://[::1]:5432"),
        ("ssh://127.0.0.1", "ssh://127.0.0.1:22"),
        ("ssh://127.0.0.1:2222", "ssh://127.0.0.1:2222"),
        ("http_status:404", "http_status:404"),
        ("http_status:999", "http_status:999"),
    ],
)
def test_good_services_are_canonicalised(store: Store, service: str, canonical: str) -> None:
    t = store.create_tunnel("t")
    assert store.add_route(t.id, "a.example", service, False).service == canonical


@pytest.mark.parametrize(
    "service, message",
    [
        ("", "empty"),
        ("127.0.0.1:5432", "expected tcp://"),
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:0", "1-65535"),
        ("tcp://127.0.0.1:99999", "port"),
        ("tcp://:5432", "missing host"),
        ("tcp://h:5432/db", "no path"),
        ("tcp://u:p@h:5432", "credentials"),
        ("http://127.0.0.1:80", "unsupported service scheme"),
        ("http_status:99", "100 to 999"),
        ("http_status:1000", "100 to 999"),
        ("http_status:abc", "100 to 999"),
    ],
)
def test_bad_services(store: Store, service: str, message: str) -> None:
    t = store.create_tunnel("t")
    with pytest.raises(ValidationError, match=message):
        store.add_route(t.id, "a.example", service, False)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), 100000, "10", True])
def test_bad_connect_timeouts(store: Store, timeout) -> None:
    t = store.create_tunnel("t")
    with pytest.raises(ValidationError, match="connect_timeout"):
        store.add_route(t.id, "a.example", "tcp://h:1", False, timeout)


def test_public_must_be_bool(store: Store) -> None:
    t = store.create_tunnel("t")
    with pytest.raises(ValidationError, match="public"):
        store.add_route(t.id, "a.example", "tcp://h:1", "yes")  # type: ignore[arg-type]


def test_wildcards_match_subdomains_longest_suffix_wins_exact_first(store: Store) -> None:
    t = store.create_tunnel("t")
    store.add_route(t.id, "*.example.com", "tcp://h:1", False)
    store.add_route(t.id, "*.db.example.com", "tcp://h:2", False)
    store.add_route(t.id, "pg.db.example.com", "tcp://h:3", False)
    assert store.get_route("pg.db.example.com").service == "tcp://h:3"
    assert store.get_route("my.db.example.com").service == "tcp://h:2"
    assert store.get_route("a.b.db.example.com").service == "tcp://h:2"
    assert store.get_route("www.example.com").service == "tcp://h:1"
    assert store.get_route("db.example.com").service == "tcp://h:1"
    assert store.get_route("example.com") is None  # a wildcard does not cover its apex
    assert store.get_route("") is None
    assert store.get_route_exact("my.db.example.com") is None
    assert store.get_route_exact("*.db.example.com").service == "tcp://h:2"


def test_rerouting_replaces_and_bumps_both_owners(store: Store) -> None:
    a, b = store.create_tunnel("a"), store.create_tunnel("b")
    store.add_route(a.id, "x.example", "tcp://h:1", False)
    assert store.get_tunnel("a").config_version == 2
    # same route again: nothing to push
    store.add_route(a.id, "x.example", "tcp://h:1", False)
    assert store.get_tunnel("a").config_version == 2
    # new service on the same tunnel
    store.add_route(a.id, "x.example", "tcp://h:2", False)
    assert store.get_tunnel("a").config_version == 3
    # moved to another tunnel
    r = store.add_route(b.id, "x.example", "tcp://h:2", True, 5)
    assert (r.tunnel_id, r.public, r.connect_timeout) == (b.id, True, 5.0)
    assert store.get_tunnel("a").config_version == 4
    assert store.get_tunnel("b").config_version == 2
    assert store.routes_for(a.id) == [] and [x.hostname for x in store.routes_for(b.id)] == ["x.example"]


def test_delete_route_and_tunnel_cascade(store: Store) -> None:
    t = store.create_tunnel("t")
    store.add_route(t.id, "a.example", "tcp://h:1", False)
    store.add_route(t.id, "b.example", "tcp://h:1", False)
    v = store.get_tunnel("t").config_version
    assert store.delete_route("A.example").hostname == "a.example"
    assert store.delete_route("a.example") is None
    assert store.get_tunnel("t").config_version == v + 1
    store.delete_tunnel("t")
    assert store.get_route("b.example") is None
    assert store.list_routes() == []


def test_ingress_config_orders_rules_and_ends_with_catch_all(store: Store) -> None:
    t = store.create_tunnel("t")
    store.add_route(t.id, "*.example.com", "tcp://h:1", False)
    store.add_route(t.id, "zz.example.com", "tcp://h:2", False, 3)
    store.add_route(t.id, "*.db.example.com", "ssh://h", False)
    store.add_route(t.id, "aa.example.com", "http_status:503", True)
    version, rules = store.ingress_config(t.id)
    assert version == store.get_tunnel(t.id).config_version == 5
    assert [r.get("hostname") for r in rules] == [
        "aa.example.com", "zz.example.com", "*.db.example.com", "*.example.com", None
    ]
    assert rules[1] == {"hostname": "zz.example.com", "service": "tcp://h:2", "originRequest": {"connectTimeout": 3.0}}
    assert rules[-1] == {"service": "http_status:404"}
    other = store.create_tunnel("other")
    assert store.ingress_config(other.id) is None  # no route names a service: nothing to push
    with pytest.raises(NotFoundError):
        store.ingress_config("missing")


def test_a_route_without_service_leaves_the_tunnel_to_the_connectors_local_config(store: Store) -> None:
    t = store.create_tunnel("t")
    r = store.add_route(t.id, "db.example", None, False)
    assert r.service == "" and store.get_route("db.example").service == ""
    assert store.ingress_config(t.id) is None  # locally managed: the relay pushes nothing
    assert store.add_route(t.id, "db.example", None, False) == r  # unchanged: no new version
    v = store.get_tunnel("t").config_version

    # one route naming a service makes the tunnel remotely managed; service-less routes are left out
    store.add_route(t.id, "*.ssh.example", "ssh://h", True)
    version, rules = store.ingress_config(t.id)
    assert version == v + 1
    assert rules == [{"hostname": "*.ssh.example", "service": "ssh://h:22", "originRequest": {"connectTimeout": 10.0}},
                     {"service": "http_status:404"}]

    store.delete_route("*.ssh.example")
    assert store.ingress_config(t.id) is None
    store.add_route(t.id, "db.example", "tcp://h:1", False)  # a local route given a service
    assert store.ingress_config(t.id)[1][0]["service"] == "tcp://h:1"
    store.add_route(t.id, "db.example", None, False)  # and back
    assert store.ingress_config(t.id) is None


def test_an_empty_service_is_refused_with_the_way_to_leave_it_out(store: Store) -> None:
    t = store.create_tunnel("t")
    for service in ("", "  "):
        with pytest.raises(ValidationError, match="leave it out to let the connector's local --config decide"):
            store.add_route(t.id, "a.example", service, False)


# --- schema migration -----------------------------------------------------------------------

def test_a_version_1_database_migrates_to_the_latest_keeping_its_data(tmp_path, box) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(MIGRATIONS[0])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute(
        "INSERT INTO tunnels VALUES (?, 'old', ?, 1.0, 3)",
        ("0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10",
         box.encrypt(b"s" * 32, aad=b"0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10")),
    )
    db.commit()
    db.close()
    s = Store(tmp_path / "state.db", box)
    try:
        assert s.schema_version == len(MIGRATIONS)
        assert s.get_tunnel("old").config_version == 3
        assert s.list_service_tokens() == [] and s.list_apps() == [] and s.signing_keys() == []
    finally:
        s.close()


def test_secretbox_derive_key_is_stable_per_label_and_not_the_key(tmp_path) -> None:
    key = os.urandom(32)
    a, b = SecretBox(key), SecretBox(key)
    assert a.derive_key(b"service-token-hash") == b.derive_key(b"service-token-hash")
    assert len(a.derive_key(b"x")) == 32 and a.derive_key(b"x") != a.derive_key(b"y")
    assert a.derive_key(b"x") != key
    assert SecretBox(os.urandom(32)).derive_key(b"x") != a.derive_key(b"x")
    with pytest.raises(ValueError):
        a.derive_key(b"")


# --- service tokens -------------------------------------------------------------------------

CID = "0123456789abcdef0123456789abcdef.access"
CID2 = "fedcba9876543210fedcba9876543210.access"


def test_create_and_find_service_tokens(store: Store) -> None:
    t = store.create_service_token("hyperdrive-vpc-01", CID, "hash-1", 1_800_000_000.0)
    assert isinstance(t, ServiceToken)
    assert (t.name, t.client_id, t.secret_hash, t.prev_secret_hash, t.prev_expires_at, t.expires_at,
            t.revoked_at) == ("hyperdrive-vpc-01", CID, "hash-1", None, None, 1_800_000_000.0, None)
    assert store.get_service_token(t.id) == t
    assert store.get_service_token("hyperdrive-vpc-01") == t
    assert store.get_service_token(CID) == t
    assert store.token_by_client_id(CID) == t
    assert store.token_by_client_id("hyperdrive-vpc-01") is None  # only the client id
    assert store.get_service_token("nope") is None
    forever = store.create_service_token("forever", CID2, "hash-2", None)
    assert forever.expires_at is None and store.get_service_token("forever").expires_at is None
    assert [x.name for x in store.list_service_tokens()] == ["hyperdrive-vpc-01", "forever"]
    assert "hash-1" not in repr(t)  # hashes stay out of logs and tracebacks


def test_service_token_name_conflicts_and_validation(store: Store) -> None:
    store.create_service_token("a", CID, "h", None)
    with pytest.raises(ConflictError, match="already exists"):
        store.create_service_token("a", CID2, "h", None)
    with pytest.raises(ConflictError, match="client id"):
        store.create_service_token("b", CID, "h", None)
    for bad in ("", "has space", "0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10", CID2):
        with pytest.raises(ValidationError, match="service token name"):
            store.create_service_token(bad, CID2, "h", None)
    with pytest.raises(ValidationError, match="client id"):
        store.create_service_token("c", "not-a-client-id", "h", None)
    with pytest.raises(ValidationError, match="client id"):
        store.create_service_token("c", CID2 + "\n", "h", None)


def test_rotate_keeps_the_previous_hash_until_its_expiry(store: Store) -> None:
    t = store.create_service_token("a", CID, "hash-1", None)
    r = store.rotate_service_token(t.id, "hash-2", 1_700_086_400.0)
    assert (r.secret_hash, r.prev_secret_hash, r.prev_expires_at) == ("hash-2", "hash-1", 1_700_086_400.0)
    assert (r.id, r.client_id, r.created_at) == (t.id, t.client_id, t.created_at)  # same token, same client id
    assert store.token_by_client_id(CID) == r
    # a second rotation drops the oldest secret
    r2 = store.rotate_service_token("a", "hash-3", 5.0)
    assert (r2.secret_hash, r2.prev_secret_hash, r2.prev_expires_at) == ("hash-3", "hash-2", 5.0)
    with pytest.raises(NotFoundError):
        store.rotate_service_token("ghost", "x", 1.0)


def test_revoke_sets_revoked_at_once_and_blocks_rotation(store: Store) -> None:
    t = store.create_service_token("a", CID, "hash-1", None)
    r = store.revoke_service_token(t.id)
    assert r.revoked_at is not None and r.revoked_at > t.created_at
    assert store.revoke_service_token("a").revoked_at == r.revoked_at  # idempotent
    with pytest.raises(ConflictError, match="revoked"):
        store.rotate_service_token(t.id, "hash-2", 1.0)
    with pytest.raises(NotFoundError):
        store.revoke_service_token("ghost")


# --- applications ---------------------------------------------------------------------------

def test_create_get_list_delete_app(store: Store) -> None:
    tok = store.create_service_token("tok", CID, "h", None)
    app = store.create_app("vpc-01-db", ["DB.Internal.Example", "db.internal.example"], [tok.id, tok.id], False)
    assert isinstance(app, AccessApp)
    assert app.domains == ("db.internal.example",) and app.token_ids == (tok.id,) and app.any_token is False
    assert len(app.aud) == 64 and int(app.aud, 16) >= 0
    assert store.get_app(app.id) == app == store.get_app("vpc-01-db")
    other = store.create_app("any", ["*.other.example"], [], True)
    assert other.aud != app.aud
    assert [a.name for a in store.list_apps()] == ["vpc-01-db", "any"]
    assert store.delete_app("vpc-01-db") == app
    assert store.delete_app("vpc-01-db") is None
    assert store.get_app(app.id) is None and store.app_for_hostname("db.internal.example") is None
    assert [a.name for a in store.list_apps()] == ["any"]


def test_app_aud_is_fixed_forever(tmp_path, box) -> None:
    s = Store(tmp_path / "state.db", box)
    s.create_service_token("tok", CID, "h", None)
    aud = s.create_app("a", ["a.example"], [s.get_service_token("tok").id], False).aud
    s.rotate_service_token("tok", "h2", 1.0)
    s.close()
    s = Store(tmp_path / "state.db", box)
    assert s.get_app("a").aud == aud
    s.close()


def test_app_validation_and_conflicts(store: Store) -> None:
    tok = store.create_service_token("tok", CID, "h", None)
    store.create_app("first", ["db.example", "*.w.example"], [tok.id], False)
    with pytest.raises(ConflictError, match="already exists"):
        store.create_app("first", ["x.example"], [tok.id], False)
    with pytest.raises(ConflictError, match="db.example already belongs to Access application 'first'"):
        store.create_app("second", ["x.example", "DB.example"], [tok.id], False)
    with pytest.raises(ConflictError, match="'first'"):
        store.create_app("second", ["*.w.example"], [tok.id], False)
    assert store.get_app("second") is None  # nothing half-created
    # an exact name under another app's wildcard is a different domain: allowed (exact wins)
    store.create_app("third", ["pg.w.example"], [], True)
    with pytest.raises(ValidationError, match="policy"):
        store.create_app("x", ["y.example"], [], False)
    with pytest.raises(ValidationError, match="domain"):
        store.create_app("x", [], [tok.id], False)
    with pytest.raises(ValidationError, match="port"):
        store.create_app("x", ["y.example:5432"], [tok.id], False)
    with pytest.raises(ValidationError, match="first label"):
        store.create_app("x", ["a.*.example"], [tok.id], False)
    with pytest.raises(NotFoundError):
        store.create_app("x", ["y.example"], ["0b6c3c8e-5a43-4a86-8d3e-2b1b0c2f2d10"], False)
    store.revoke_service_token(tok.id)
    with pytest.raises(ValidationError, match="revoked"):
        store.create_app("x", ["y.example"], [tok.id], False)
    with pytest.raises(ValidationError, match="application name"):
        store.create_app("bad name", ["y.example"], [], True)


def test_app_for_hostname_exact_first_then_longest_wildcard(store: Store) -> None:
    a = store.create_app("a", ["*.example.com"], [], True)
    b = store.create_app("b", ["*.db.example.com"], [], True)
    c = store.create_app("c", ["pg.db.example.com"], [], True)
    assert store.app_for_hostname("pg.db.example.com") == c
    assert store.app_for_hostname("PG.db.example.com.") == c
    assert store.app_for_hostname("pg.db.example.com:5432") == c
    assert store.app_for_hostname("my.db.example.com") == b
    assert store.app_for_hostname("a.b.db.example.com") == b
    assert store.app_for_hostname("db.example.com") == a
    assert store.app_for_hostname("www.example.com") == a
    assert store.app_for_hostname("example.com") is None  # a wildcard never covers its bare domain
    assert store.app_for_hostname("other.org") is None
    assert store.app_for_hostname("") is None
    # a wildcard route hostname is covered by the same or a shorter wildcard
    assert store.app_for_hostname("*.db.example.com") == b
    assert store.app_for_hostname("*.x.example.com") == a


# --- ingress config with Access ---------------------------------------------------------------

def test_ingress_config_requires_access_only_on_covered_non_public_routes(store: Store) -> None:
    t = store.create_tunnel("t")
    store.add_route(t.id, "db.example", "tcp://h:1", False)
    store.add_route(t.id, "open.example", "tcp://h:2", True)
    store.add_route(t.id, "free.example", "tcp://h:3", False)  # no app: refused by the relay, no access key
    store.add_route(t.id, "*.w.example", "tcp://h:4", False)
    v0 = store.get_tunnel("t").config_version
    app = store.create_app("app", ["db.example", "open.example", "*.w.example"], [], True)
    assert store.get_tunnel("t").config_version == v0 + 1  # one bump per change
    version, rules = store.ingress_config(t.id)
    assert version == v0 + 1
    by_host = {r.get("hostname"): r for r in rules}
    assert by_host["db.example"]["access"] == {"required": True, "audTag": [app.aud]}
    assert by_host["*.w.example"]["access"] == {"required": True, "audTag": [app.aud]}
    assert "access" not in by_host["open.example"]  # public: no assertion to check
    assert "access" not in by_host["free.example"]
    assert rules[-1] == {"service": "http_status:404"}
    store.delete_app("app")
    version, rules = store.ingress_config(t.id)
    assert version == v0 + 2 and not any("access" in r for r in rules)


def test_app_changes_bump_only_the_tunnels_they_touch(store: Store) -> None:
    a, b, c = store.create_tunnel("a"), store.create_tunnel("b"), store.create_tunnel("c")
    store.add_route(a.id, "db.example", "tcp://h:1", False)
    store.add_route(b.id, "x.w.example", "tcp://h:1", False)
    store.add_route(c.id, "public.w.example", "tcp://h:1", True)
    store.add_route(c.id, "other.example", "tcp://h:1", False)
    versions = {t: store.get_tunnel(t).config_version for t in "abc"}
    store.create_app("wild", ["*.w.example", "db.example"], [], True)
    assert {t: store.get_tunnel(t).config_version for t in "abc"} == {
        "a": versions["a"] + 1, "b": versions["b"] + 1, "c": versions["c"]}
    # an exact app shadowing the wildcard changes b's aud tag again; a is untouched
    store.create_app("exact", ["x.w.example"], [], True)
    assert store.get_tunnel("a").config_version == versions["a"] + 1
    assert store.get_tunnel("b").config_version == versions["b"] + 2
    # an app no route uses bumps nobody
    store.create_app("unused", ["nothing.example"], [], True)
    store.delete_app("unused")
    assert {t: store.get_tunnel(t).config_version for t in "abc"} == {
        "a": versions["a"] + 1, "b": versions["b"] + 2, "c": versions["c"]}
    store.delete_app("wild")
    assert store.get_tunnel("a").config_version == versions["a"] + 2
    assert store.get_tunnel("b").config_version == versions["b"] + 2  # still covered by "exact"


# --- signing keys ---------------------------------------------------------------------------

def test_signing_keys_are_encrypted_at_rest_and_only_two_are_kept(tmp_path, box) -> None:
    from access.assertion import SigningKey

    s = Store(tmp_path / "state.db", box)
    keys = [SigningKey.generate(now=1000.0 + i) for i in range(3)]
    for k in keys:
        s.add_signing_key(k.private_pem(), k.created_at)
    got = s.signing_keys()
    assert [created for _, created in got] == [1002.0, 1001.0]  # newest first, oldest dropped
    assert [SigningKey.from_pem(pem, c).kid for pem, c in got] == [keys[2].kid, keys[1].kid]
    s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("state.db"))
    assert b"PRIVATE KEY" not in raw and b"-----BEGIN" not in raw
    assert all(k.private_pem()[40:100] not in raw for k in keys)
    s2 = Store(tmp_path / "state.db", box)
    assert [c for _, c in s2.signing_keys()] == [1002.0, 1001.0]
    s2.close()
    wrong = Store(tmp_path / "state.db", SecretBox(os.urandom(32)))
    with pytest.raises(SecretBoxError):
        wrong.signing_keys()
    wrong.close()


# --- access log -----------------------------------------------------------------------------

def _entry(i: int, **kw) -> dict:
    e = {"time": 1000.0 + i, "decision": "allow" if i % 2 else "deny", "status": 200 if i % 2 else 401,
         "client_id": CID, "token_id": None, "token_name": "tok", "app": "app", "hostname": "db.example",
         "reason": f"r{i}", "source": "127.0.0.1"}
    e.update(kw)
    return e


def test_access_log_is_newest_first_with_limit(store: Store) -> None:
    assert store.access_logs() == []
    store.add_access_logs([_entry(i) for i in range(5)])
    store.add_access_logs([])
    store.add_access_logs([_entry(9, client_id=None, token_name=None, app=None)])
    rows = store.access_logs(limit=3)
    assert [r["reason"] for r in rows] == ["r9", "r4", "r3"]
    assert set(rows[0]) == {"id", "time", "decision", "status", "client_id", "token_id", "token_name", "app",
                            "hostname", "reason", "source"}
    assert rows[0]["client_id"] is None and rows[0]["app"] is None and rows[0]["status"] == 200
    assert rows[1] == {"id": rows[1]["id"], **_entry(4)}
    assert len(store.access_logs()) == 6
    # ordered by time even when a batch arrives late
    store.add_access_logs([_entry(-10, reason="late")])
    assert store.access_logs(100)[-1]["reason"] == "late"
    with pytest.raises(ValidationError):
        store.access_logs(0)


def test_access_log_keeps_only_the_newest_rows(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "ACCESS_LOG_MAX_ROWS", 10)
    store.add_access_logs([_entry(i) for i in range(7)])
    store.add_access_logs([_entry(i) for i in range(7, 14)])
    rows = store.access_logs(1000)
    assert len(rows) == 10 and [r["reason"] for r in rows] == [f"r{i}" for i in range(13, 3, -1)]
    store.add_access_logs([_entry(14)])
    assert [r["reason"] for r in store.access_logs(1000)][-1] == "r5"


# --- Hyperdrive configs ---------------------------------------------------------------------
from tests.unit.test_hyperdrive_configs import make_ca, make_leaf  # noqa: E402

TOKEN_ID = "0123456789abcdef0123456789abcdef.access"
ORIGIN = {"host": "db.example", "database": "app", "user": "app", "password": "origin-pw-1"}


def test_a_version_2_database_migrates_to_version_3(tmp_path, box) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(MIGRATIONS[0] + MIGRATIONS[1])
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (2)")
    db.commit()
    db.close()
    s = Store(tmp_path / "state.db", box)
    try:
        assert s.schema_version == 3
        assert s.list_hyperdrives() == [] and s.list_certificates() == []
        s.create_hyperdrive(name="db", **ORIGIN)
    finally:
        s.close()


def test_create_hyperdrive_defaults_and_generated_credentials(store: Store) -> None:
    from proxy.pg.auth import ScramSecret

    c = store.create_hyperdrive(name="my-db", **ORIGIN)
    assert isinstance(c, HyperdriveConfig)
    assert len(c.id) == 32 and int(c.id, 16) >= 0
    assert (c.scheme, c.host, c.port, c.database, c.user, c.password) == (
        "postgresql", "db.example", 5432, "app", "app", "origin-pw-1")
    assert (c.access_client_id, c.access_client_secret, c.sslmode) == (None, None, "require")
    assert (c.ca_certificate_id, c.mtls_certificate_id) == (None, None)
    assert (c.caching_disabled, c.max_age, c.swr, c.origin_connection_limit) == (False, 60, 15, 20)
    assert c.client_user.startswith("hd_") and len(c.client_user) == 15 and int(c.client_user[3:], 16) >= 0
    assert len(c.client_password) == 32
    assert ScramSecret.from_string(c.client_scram).verify_password(c.client_password)
    assert c.created_at == c.updated_at
    assert "origin-pw-1" not in repr(c) and c.client_password not in repr(c)
    assert store.get_hyperdrive("my-db") == c == store.get_hyperdrive(c.id)
    assert store.hyperdrive_by_client_user(c.client_user) == c
    assert store.hyperdrive_by_client_user("hd_000000000000") is None
    other = store.create_hyperdrive(name="other", **ORIGIN)
    assert other.client_user != c.client_user and other.client_password != c.client_password
    assert [x.name for x in store.list_hyperdrives()] == ["my-db", "other"]
    assert store.delete_hyperdrive("my-db") == c
    assert store.get_hyperdrive(c.id) is None and store.delete_hyperdrive("my-db") is None
    assert store.hyperdrive_by_client_user(c.client_user) is None


def test_create_hyperdrive_through_a_tunnel_and_all_settings(store: Store) -> None:
    c = store.create_hyperdrive(name="t", scheme="postgres", host="DB.Internal.Example.", database="app",
                                user="app", password="", access_client_id=TOKEN_ID,
                                access_client_secret="sec", caching_disabled=True, max_age=3600, swr=0,
                                origin_connection_limit=5, sslmode="prefer")
    assert (c.scheme, c.host, c.port, c.password) == ("postgresql", "db.internal.example", None, "")
    assert (c.access_client_id, c.access_client_secret, c.via_tunnel) == (TOKEN_ID, "sec", True)
    assert (c.caching_disabled, c.max_age, c.swr, c.origin_connection_limit, c.sslmode) == (
        True, 3600, 0, 5, "require")
    m = store.create_hyperdrive(name="m", scheme="mysql", host="[::1]", database="shop", user="root", password="x")
    assert (m.scheme, m.host, m.port) == ("mysql", "::1", 3306)


def test_hyperdrive_names_are_unique_and_not_id_like(store: Store) -> None:
    store.create_hyperdrive(name="db", **ORIGIN)
    with pytest.raises(ConflictError, match="already exists"):
        store.create_hyperdrive(name="db", **ORIGIN)
    with pytest.raises(ValidationError, match="must not look like a config id"):
        store.create_hyperdrive(name="0123456789abcdef0123456789abcdef", **ORIGIN)
    with pytest.raises(ValidationError, match="invalid Hyperdrive config name"):
        store.create_hyperdrive(name="no spaces", **ORIGIN)


@pytest.mark.parametrize("changes, message", [
    ({"port": 0}, "origin port must be from 1 to 65535"),
    ({"port": 5432, "access_client_id": TOKEN_ID, "access_client_secret": "s"},
     "origin_port conflicts with access_client_id"),
    ({"access_client_id": TOKEN_ID}, "access_client_id and access_client_secret go together"),
    ({"access_client_secret": "s"}, "access_client_id and access_client_secret go together"),
    ({"access_client_id": "nope", "access_client_secret": "s"}, "invalid access_client_id"),
    ({"user": "u" * 64}, "longer than 63 bytes"),
    ({"database": "é" * 32}, "longer than 63 bytes"),
    ({"database": ""}, "database name must not be empty"),
    ({"user": "a\x00b"}, "NUL"),
    ({"host": "postgres://db.example"}, "without a scheme"),
    ({"host": "db.example:5432"}, "just the host name"),
    ({"host": "bad host"}, "invalid origin host"),
    ({"scheme": "oracle"}, "unsupported origin scheme"),
    ({"sslmode": "allow"}, "invalid sslmode"),
    ({"sslmode": "disable"}, "only allowed for a direct origin on a loopback address"),
    ({"max_age": 3601}, "max_age (seconds) must be from 1 to 3600"),
    ({"max_age": 0}, "max_age (seconds) must be from 1 to 3600"),
    ({"max_age": "60"}, "must be a whole number"),
    ({"swr": -1}, "swr (stale-while-revalidate seconds) must be from 0"),
    ({"origin_connection_limit": 4}, "origin_connection_limit must be from 5"),
    ({"caching_disabled": "yes"}, "caching_disabled must be true or false"),
    ({"password": None}, "origin password is missing"),
    ({"ca_certificate_id": "missing"}, "no certificate named or with id 'missing'"),
    ({"color": "blue"}, "unknown Hyperdrive field(s): color"),
])
def test_hyperdrive_validation(store: Store, changes: dict, message: str) -> None:
    fields = {"name": "db", **ORIGIN, **changes}
    if changes.get("password", "") is None:
        del fields["password"]
    with pytest.raises((ValidationError, NotFoundError)) as e:
        store.create_hyperdrive(**fields)
    assert message in str(e.value)
    assert store.list_hyperdrives() == []


def test_sslmode_disable_only_for_a_direct_loopback_origin(store: Store) -> None:
    c = store.create_hyperdrive(name="local", host="127.0.0.1", port=5433, database="app", user="app",
                                password="pw", sslmode="disable")
    assert c.sslmode == "disable"
    with pytest.raises(ValidationError, match="loopback"):
        store.update_hyperdrive("local", host="db.example")
    ca_pem, _, _, _ = make_ca()
    store.add_certificate("ca", "certificate-authority", ca_pem)
    with pytest.raises(ValidationError, match="certificates need TLS"):
        store.update_hyperdrive("local", ca_certificate_id="ca")


def test_update_changes_only_the_given_fields_and_never_the_client_credentials(store: Store) -> None:
    c = store.create_hyperdrive(name="db", **ORIGIN)
    u = store.update_hyperdrive("db", max_age=120, password="new-pw", name="renamed")
    assert (u.max_age, u.password, u.name) == (120, "new-pw", "renamed")
    assert (u.id, u.client_user, u.client_password, u.client_scram, u.created_at) == (
        c.id, c.client_user, c.client_password, c.client_scram, c.created_at)
    assert u.updated_at > c.updated_at
    assert (u.host, u.port, u.database, u.user, u.swr, u.sslmode) == (c.host, c.port, c.database, c.user, 15, "require")
    assert store.get_hyperdrive(c.id) == u and store.get_hyperdrive("db") is None
    with pytest.raises(ValidationError, match="unknown Hyperdrive field"):
        store.update_hyperdrive(c.id, client_password="x")
    with pytest.raises(NotFoundError):
        store.update_hyperdrive("missing", max_age=5)
    store.create_hyperdrive(name="other", **ORIGIN)
    with pytest.raises(ConflictError):
        store.update_hyperdrive(c.id, name="other")
    assert store.get_hyperdrive(c.id) == u  # failed updates change nothing


def test_update_switches_between_direct_and_tunnel(store: Store) -> None:
    c = store.create_hyperdrive(name="db", port=6543, **ORIGIN)
    # clearing credentials that are not there changes no port
    assert store.update_hyperdrive("db", access_client_id=None, max_age=9).port == 6543
    # access credentials without a port: the direct port goes
    t = store.update_hyperdrive("db", access_client_id=TOKEN_ID, access_client_secret="s1")
    assert (t.port, t.access_client_id, t.access_client_secret) == (None, TOKEN_ID, "s1")
    # rotating the secret alone
    assert store.update_hyperdrive("db", access_client_secret="s2").access_client_secret == "s2"
    # another token, still through the tunnel
    t2 = store.update_hyperdrive("db", access_client_id="f" * 32 + ".access", access_client_secret="s3")
    assert (t2.port, t2.access_client_secret) == (None, "s3")
    # a port while the credentials stay: refused, nothing changes
    with pytest.raises(ValidationError, match="origin_port conflicts with access_client_id"):
        store.update_hyperdrive("db", port=5432)
    # clearing the id clears its secret and brings back the default port
    d = store.update_hyperdrive("db", access_client_id=None)
    assert (d.port, d.access_client_id, d.access_client_secret) == (5432, None, None)
    assert store.merged_hyperdrive("db", port=7000).port == 7000
    assert store.get_hyperdrive("db").port == 5432  # merged_hyperdrive stores nothing
    assert c.client_user == d.client_user


def test_new_hyperdrive_is_not_stored_until_inserted(store: Store) -> None:
    candidate = store.new_hyperdrive(name="db", **ORIGIN)
    assert store.get_hyperdrive("db") is None
    stored = store.insert_hyperdrive(candidate)
    assert stored == candidate
    with pytest.raises(ConflictError):
        store.insert_hyperdrive(candidate)


def test_hyperdrive_secrets_are_encrypted_at_rest(tmp_path, box) -> None:
    s = Store(tmp_path / "state.db", box)
    ca_pem, _, ca, ca_key = make_ca()
    leaf_pem, leaf_key = make_leaf(ca, ca_key)
    s.add_certificate("client", "mtls-certificate", leaf_pem, leaf_key)
    c = s.create_hyperdrive(name="db", host="db.example", database="app", user="app",
                            password="ORIGIN-PASSWORD-7f3a", access_client_id=TOKEN_ID,
                            access_client_secret="ACCESS-SECRET-91bc", mtls_certificate_id="client")
    s.update_hyperdrive("db", password="ORIGIN-PASSWORD-8e2d")
    s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("state.db"))
    key_body = b"".join(leaf_key.splitlines()[1:-1])
    for needle in (b"ORIGIN-PASSWORD-7f3a", b"ORIGIN-PASSWORD-8e2d", b"ACCESS-SECRET-91bc",
                   c.client_password.encode(), key_body[:40], b"PRIVATE KEY"):
        assert needle not in raw, needle
    assert c.client_user.encode() in raw  # (the lookup key is not secret)
    s2 = Store(tmp_path / "state.db", box)
    got = s2.get_hyperdrive("db")
    assert (got.password, got.access_client_secret, got.client_password) == (
        "ORIGIN-PASSWORD-8e2d", "ACCESS-SECRET-91bc", c.client_password)
    assert s2.get_certificate("client").key_pem == leaf_key
    s2.close()
    wrong = Store(tmp_path / "state.db", SecretBox(os.urandom(32)))
    with pytest.raises(SecretBoxError):
        wrong.get_hyperdrive("db")
    wrong.close()
    # a ciphertext moved to another config does not decrypt (the aad names the config and field)
    s3 = Store(tmp_path / "state.db", box)
    other = s3.create_hyperdrive(name="other", **ORIGIN)
    s3._db.execute("UPDATE hyperdrive_configs SET origin_password = (SELECT origin_password FROM hyperdrive_configs"
                   " WHERE name = 'db') WHERE id = ?", (other.id,))
    with pytest.raises(SecretBoxError):
        s3.get_hyperdrive("other")
    s3.close()


# --- origin certificates --------------------------------------------------------------------

def test_certificates_add_get_list_delete(store: Store) -> None:
    ca_pem, _, ca, ca_key = make_ca("Origin CA")
    ca2_pem, _, _, _ = make_ca("Second CA")
    leaf_pem, leaf_key = make_leaf(ca, ca_key, "client-1")
    a = store.add_certificate("ca", "certificate-authority", (ca_pem + ca2_pem).decode())  # a bundle, as text
    assert isinstance(a, Certificate) and a.kind == "certificate-authority" and a.key_pem is None
    assert a.subject == "CN=Origin CA" == a.issuer and a.expires_on > a.created_at
    m = store.add_certificate("client", "mtls-certificate", leaf_pem + ca_pem, leaf_key)  # leaf then chain
    assert m.subject == "CN=client-1" and m.issuer == "CN=Origin CA" and m.key_pem == leaf_key
    assert "PRIVATE" not in repr(m)
    assert store.get_certificate("ca") == a == store.get_certificate(a.id)
    assert [c.name for c in store.list_certificates()] == ["ca", "client"]
    with pytest.raises(ConflictError, match="already exists"):
        store.add_certificate("ca", "certificate-authority", ca_pem)
    c1 = store.create_hyperdrive(name="db1", sslmode="verify-full", ca_certificate_id="ca", **ORIGIN)
    assert c1.ca_certificate_id == a.id
    store.create_hyperdrive(name="db2", mtls_certificate_id=m.id, **ORIGIN)
    store.create_hyperdrive(name="db3", ca_certificate_id=a.id, mtls_certificate_id="client", **ORIGIN)
    with pytest.raises(ConflictError, match="used by Hyperdrive config\\(s\\) db1, db3"):
        store.delete_certificate("ca")
    with pytest.raises(ValidationError, match="is a certificate-authority, not a mtls-certificate"):
        store.create_hyperdrive(name="db4", mtls_certificate_id="ca", **ORIGIN)
    with pytest.raises(ValidationError, match="is a mtls-certificate, not a certificate-authority"):
        store.create_hyperdrive(name="db4", ca_certificate_id="client", **ORIGIN)
    store.update_hyperdrive("db1", ca_certificate_id=None)
    store.delete_hyperdrive("db3")
    assert store.delete_certificate("ca") == a
    assert store.get_certificate("ca") is None and store.delete_certificate("ca") is None


def test_certificate_errors(store: Store) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_pem, ca_key_pem, ca, ca_key = make_ca()
    leaf_pem, leaf_key = make_leaf(ca, ca_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    encrypted = other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"pass"))
    cases = [
        (("x", "certificate-authority", b""), "must not be empty"),
        (("x", "certificate-authority", b"hello"), "is not PEM"),
        (("x", "certificate-authority", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
         "not a valid PEM certificate"),
        (("x", "certificate-authority", ca_pem + ca_key_pem), "contains a private key"),
        (("x", "certificate-authority", ca_pem, ca_key_pem), "without a private key"),
        (("x", "client-cert", ca_pem), "invalid certificate kind"),
        (("x", "mtls-certificate", leaf_pem), "needs its private key"),
        (("x", "mtls-certificate", leaf_pem, b"junk"), "the private key is not PEM"),
        (("x", "mtls-certificate", leaf_pem, ca_key_pem), "does not match the certificate"),
        (("x", "mtls-certificate", leaf_pem, encrypted), "encrypted with a passphrase"),
        (("bad name", "certificate-authority", ca_pem), "invalid certificate name"),
    ]
    for args, message in cases:
        with pytest.raises(ValidationError) as e:
            store.add_certificate(*args)
        assert message in str(e.value), (args[1:2], str(e.value))
    assert store.list_certificates() == []
