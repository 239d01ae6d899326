"""The SQLite store and secrets at rest."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from control.secretbox import SecretBox, SecretBoxError
from control.store import (
    ConflictError,
    NotFoundError,
    Route,
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
    assert s.schema_version == 1
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
    assert store.ingress_config(other.id) == (1, [{"service": "http_status:404"}])
    with pytest.raises(NotFoundError):
        store.ingress_config("missing")
