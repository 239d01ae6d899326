"""MySQL Hyperdrive configs end to end, through the real `hd` CLI against a real `hd edge`
(which the harness starts with `--mysql-listen 127.0.0.1:0`) and a real MariaDB:

* `hd hyperdrive create` with a `mysql://` connection string or `--origin-scheme mysql`: the origin
  is tested with the MySQL handshake, the config's connection string points at the edge's MySQL
  listener (the bound port, as in edge.json);
* the configuration-time failure codes for MySQL origins (2011, 2012, 2013, 2014), one stderr
  line with the code and a hint, nothing stored; `hd hyperdrive update` is tested the same way;
* TLS to the origin (sslmode require against a TLS MariaDB);
* PyMySQL through the proxy (plaintext and TLS to the listener): SELECT 1;
* the Postgres listener refuses a mysql config's credentials; `hd edge --mysql-listen` on a
  busy port fails clearly.
"""

from __future__ import annotations

import json
import socket
from collections import deque
import ssl
import subprocess
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql
import pytest

from tests.harness.edge import EdgeProc
from tests.harness.mariadb import MariaDbServer
from tests.harness.origins import RefusingPort
from tests.harness.procs import base_env, hd_argv

DB = "app"
USER = "app"
PASSWORD = "my-app-pw-61c2"


# --- module fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def medge(tmp_path_factory):
    e = EdgeProc(tmp_path_factory.mktemp("hd-state-mysql"))
    try:
        e.start()
        yield e
    finally:
        e.stop_children()
        e.stop()


@pytest.fixture(autouse=True)
def _edge_logs_on_failure(request, medge):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n===== edge {medge.state_dir} =====\n{medge.diagnostics(80)}")


@pytest.fixture(scope="module")
def maria():
    """Plaintext MariaDB (so configs use sslmode=disable: a direct loopback origin)."""
    server = MariaDbServer().start()
    try:
        server.create_user(USER, PASSWORD)
        server.create_database(DB, owner=USER)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_maria():
    server = MariaDbServer(tls=True).start()
    try:
        server.create_user(USER, PASSWORD)
        server.create_database(DB, owner=USER)
        yield server
    finally:
        server.stop()


# --- helpers --------------------------------------------------------------------------------------

def url_for(server: MariaDbServer, *, user: str = USER, password: str = PASSWORD, database: str = DB,
            sslmode: str | None = "disable") -> str:
    query = f"?sslmode={sslmode}" if sslmode else ""
    return f"mysql://{user}:{password}@127.0.0.1:{server.port}/{database}{query}"


def mysql_listen_port(edge: EdgeProc) -> int:
    host, _, port = edge.info["mysql_listen"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, edge.info
    return int(port)


def create_fails(edge: EdgeProc, code: int, *args, name: str = "must-fail") -> str:
    """`hd hyperdrive create` must exit non-zero with one stderr line carrying `[code]` and a
    hint, and store nothing; returns that line."""
    rc, err = edge.hd_fail("hyperdrive", "create", name, *args, timeout=60)
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert f"[{code}]" in lines[0], lines[0]
    assert "hint:" in lines[0], f"no hint in: {lines[0]}"
    assert name not in [c["name"] for c in edge.hd("hyperdrive", "list")]
    return lines[0]


def client_args(url: str) -> dict:
    u = urlsplit(url)
    assert u.scheme == "mysql"
    return {"host": u.hostname, "port": u.port, "user": unquote(u.username), "password": unquote(u.password),
            "database": unquote(u.path[1:]), "connect_timeout": 10, "read_timeout": 20, "write_timeout": 20}


# --- creating configs -----------------------------------------------------------------------------

def test_edge_json_has_the_bound_mysql_listener(medge):
    port = mysql_listen_port(medge)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    on_disk = json.loads((medge.state_dir / "edge.json").read_text())
    assert on_disk["mysql_listen"] == medge.info["mysql_listen"]


def test_create_with_a_mysql_connection_string(medge, maria):
    c = medge.hd("hyperdrive", "create", "my-url", "--connection-string", url_for(maria))
    assert c["origin"]["scheme"] == "mysql" and c["origin"]["port"] == maria.port
    port = mysql_listen_port(medge)
    url = c["connection_string"]
    ca = medge.state_dir / "ca-cert.pem"
    assert url.startswith("mysql://hd_"), url
    assert url.endswith(f"@127.0.0.1:{port}/{DB}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"), url
    assert PASSWORD not in url
    got = medge.hd("hyperdrive", "get", "my-url", "--connection-string", json=False).strip()
    assert got == url


def test_create_with_origin_scheme_flags(medge, maria):
    c = medge.hd("hyperdrive", "create", "my-flags", "--origin-scheme", "mysql", "--origin-host", "127.0.0.1",
                 "--origin-port", maria.port, "--database", DB, "--origin-user", USER,
                 "--origin-password", PASSWORD, "--sslmode", "disable")
    assert c["origin"]["scheme"] == "mysql"
    assert c["connection_string"].endswith(f"@127.0.0.1:{mysql_listen_port(medge)}/{DB}"
                                           f"?ssl-mode=VERIFY_IDENTITY&ssl-ca={medge.state_dir / 'ca-cert.pem'}")


def test_create_over_tls_to_the_origin(medge, tls_maria):
    c = medge.hd("hyperdrive", "create", "my-tls", "--connection-string", url_for(tls_maria, sslmode=None))
    assert c["origin"]["scheme"] == "mysql" and c["connection_string"].startswith("mysql://")


# --- failure codes --------------------------------------------------------------------------------

def test_create_failure_codes(medge, maria):
    line = create_fails(medge, 2013, "--connection-string", url_for(maria, password="wrong-password"))
    assert "wrong-password" not in line and PASSWORD not in line

    line = create_fails(medge, 2014, "--connection-string", url_for(maria, database="no_such_db"))
    assert "no_such_db" in line

    with RefusingPort() as refusing:
        line = create_fails(medge, 2011, "--connection-string",
                            f"mysql://{USER}:{PASSWORD}@127.0.0.1:{refusing.port}/{DB}?sslmode=disable")
    assert f"127.0.0.1:{refusing.port}" in line

    # a plaintext server cannot meet the default sslmode (require)
    line = create_fails(medge, 2012, "--connection-string", url_for(maria, sslmode=None))
    assert "TLS" in line or "SSL" in line


def test_update_is_tested_with_the_mysql_probe(medge, maria):
    c = medge.hd("hyperdrive", "create", "my-upd", "--connection-string", url_for(maria))
    rc, err = medge.hd_fail("hyperdrive", "update", c["id"], "--origin-password", "nope-nope")
    assert rc != 0 and "[2013]" in err and "hint:" in err, err
    # the stored config is unchanged: clients still get through with it
    with pymysql.connect(**client_args(c["connection_string"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0].startswith(f"{USER}@")


# --- clients through the proxy --------------------------------------------------------------------

def test_pymysql_select_1_through_the_proxy(medge, maria):
    c = medge.hd("hyperdrive", "create", "my-smoke", "--connection-string", url_for(maria))
    args = client_args(c["connection_string"])
    with pymysql.connect(**args) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchall() == ((1,),)
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == (DB,)
    # TLS between the client and the proxy (the edge's self-signed certificate)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pymysql.connect(**args, ssl=ctx) as conn, conn.cursor() as cur:
        assert isinstance(conn._sock, ssl.SSLSocket)  # PyMySQL would fall back to plaintext silently
        cur.execute("SELECT 1 + 1")
        assert cur.fetchone() == (2,)
    # a wrong password is refused by the proxy itself
    with pytest.raises(pymysql.err.OperationalError) as exc:
        pymysql.connect(**{**args, "password": "not-the-password"})
    assert exc.value.args[0] == 1045


def test_pg_listener_refuses_a_mysql_config(medge, maria):
    c = medge.hd("hyperdrive", "create", "my-not-pg", "--connection-string", url_for(maria))
    args = client_args(c["connection_string"])
    pg_host, _, pg_port = medge.info["pg_listen"].rpartition(":")
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(host=pg_host, port=int(pg_port), user=args["user"], password=args["password"],
                        dbname=DB, sslmode="disable", connect_timeout=10)
    assert "MySQL" in str(exc.value)


# --- hd edge --mysql-listen -----------------------------------------------------------------------

def test_edge_fails_clearly_when_the_mysql_port_is_taken(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cp = subprocess.run(hd_argv("edge", "--state-dir", tmp_path / "state", "--api-listen", "127.0.0.1:0",
                                    "--tunnel-listen", "127.0.0.1:0", "--pg-listen", "127.0.0.1:0",
                                    "--mysql-listen", f"127.0.0.1:{port}"),
                            env=base_env(), capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0
    assert f"cannot listen for MySQL clients on 127.0.0.1:{port}" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr


# --- the proxy service's MySQL hooks, in process ----------------------------------------------------

async def test_service_mysql_pools_and_probe(tmp_path, maria):
    from control.secretbox import SecretBox
    from control.store import Store
    from proxy.service import ProxyService

    store = Store(tmp_path / "state.db", SecretBox.load_or_create(tmp_path / "secret.key"))
    service = ProxyService(store, edge=None, ssl_context=None, connect_timeout=5.0)
    try:
        await service.start_mysql("127.0.0.1", 0)
        assert service.supports_mysql and service.mysql_port > 0
        config = store.insert_hyperdrive(store.new_hyperdrive(
            name="svc", scheme="mysql", host="127.0.0.1", port=maria.port, database=DB, user=USER,
            password=PASSWORD, sslmode="disable"))
        spec = service.mysql_spec_for(config)
        assert spec.startup_params == {} and spec.connect_timeout == 5.0
        info = await service.probe_mysql(spec)
        assert info["flavor"] == "mariadb"
        assert (await service.probe(spec, scheme="mysql"))["flavor"] == "mariadb"

        pool = service.mysql_pool_for(config)
        assert service.mysql_pool_for(config) is pool and config.id not in service._pools
        conn = await pool.acquire()
        assert maria.connection_count(USER) >= 1
        pool.release(conn)
        store.update_hyperdrive(config.id, origin_connection_limit=7)
        service.config_changed(config.id)
        assert service.mysql_pool_for(config) is pool and pool.limit == 7
        assert service.metrics_summary(config.id, None)["pool"]["open"] == 1

        key = service.mysql_rsa_key
        assert key.key_size == 2048 and service.mysql_rsa_key is key

        # switched to postgresql: the MySQL pool goes
        store.update_hyperdrive(config.id, scheme="postgresql", port=5432, sslmode="disable")
        service.config_changed(config.id)
        assert config.id not in service._mysql_pools
        store.update_hyperdrive(config.id, scheme="mysql", port=maria.port)
        service.config_changed(config.id)
        service.mysql_pool_for(config)
        service.config_deleted(config.id)
        assert config.id not in service._mysql_pools
    finally:
        await service.close()
        store.close()


# --- caching_sha2_password at the listener ----------------------------------------------------------
# No stock client here logs in with caching_sha2_password unless the server asks for it (the
# listener greets with mysql_native_password), so a raw client built on our own sans-I/O pieces
# picks the plugin in its HandshakeResponse41, as MySQL 8 clients do.

def _sha2_login(url: str, password: str, *, tls: bool) -> tuple[bool, list[bytes]]:
    """Log in with caching_sha2_password; returns (ok, the AuthMoreData payloads seen)."""
    from proxy.mysql import protocol as P
    from proxy.mysql.auth import CACHING_SHA2_PASSWORD, CachingSha2Client, Done, parse_nonce

    args = client_args(url)
    sock: socket.socket | ssl.SSLSocket = socket.create_connection((args["host"], args["port"]), timeout=10)
    reader = P.PacketReader()

    pending: deque[tuple[int, bytes]] = deque()

    def read() -> tuple[int, bytes]:
        while not pending:
            data = sock.recv(65536)
            assert data, "the listener closed the connection"
            pending.extend((seq, bytes(payload)) for seq, payload in reader.read(data))
        return pending.popleft()

    try:
        seq, payload = read()
        hello = P.parse_handshake_v10(payload)
        caps = int(P.Capability.CLIENT_PROTOCOL_41 | P.Capability.CLIENT_SECURE_CONNECTION
                   | P.Capability.CLIENT_PLUGIN_AUTH | P.Capability.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                   | P.Capability.CLIENT_CONNECT_WITH_DB | P.Capability.CLIENT_TRANSACTIONS)
        seq = P.next_seq(seq)
        if tls:
            caps |= int(P.Capability.CLIENT_SSL)
            sock.sendall(P.frame(P.SslRequest(caps).build(), seq))
            seq = P.next_seq(seq)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        client = CachingSha2Client(password, parse_nonce(hello.auth_data), tls=tls)
        response = P.HandshakeResponse41(caps, args["user"], client.start(), database=args["database"],
                                         auth_plugin=CACHING_SHA2_PASSWORD)
        sock.sendall(P.frame(response.build(), seq))
        more: list[bytes] = []
        while True:
            seq, payload = read()
            if payload[:1] == b"\x01":
                more.append(payload)
            step = client.receive(payload)
            if isinstance(step, Done):
                return step.ok, more
            if step is not None:
                seq = P.next_seq(seq)
                sock.sendall(P.frame(step, seq))
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["rsa", "tls"])
def test_caching_sha2_password_full_then_fast_path_at_the_listener(medge, maria, tls):
    cfg = medge.hd("hyperdrive", "create", f"sha2-{'tls' if tls else 'rsa'}",
                   "--connection-string", url_for(maria))
    url = medge.hd("hyperdrive", "get", cfg["id"], "--connection-string", json=False).strip()
    password = unquote(urlsplit(url).password)
    # First login of this config since the edge started: full authentication (the listener's
    # RSA key without TLS, the cleartext password inside TLS).
    ok, more = _sha2_login(url, password, tls=tls)
    assert ok, more
    assert more[0] == b"\x01\x04"
    if not tls:
        assert any(m.startswith(b"\x01-----BEGIN PUBLIC KEY-----") for m in more)
    # Then the fast path: the digest is cached.
    ok, more = _sha2_login(url, password, tls=tls)
    assert ok and more == [b"\x01\x03"]
    # A wrong password fails on either path.
    ok, _ = _sha2_login(url, password + "x", tls=tls)
    assert not ok
