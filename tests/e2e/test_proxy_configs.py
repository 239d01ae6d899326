"""Hyperdrive configs end to end, through the real `hd` CLI against a real `hd edge`:

* every configuration-time failure code of `hd hyperdrive create` (2008, 2010–2014, 2016),
  directly and through a tunnel, as one line on stderr with the code and a hint;
* conflicting flags refused with a message naming both;
* `psql "$(hd hyperdrive get NAME --connection-string)"` works as written in the README;
* origin auth md5 / password / scram-sha-256, TLS require / verify-ca / verify-full (and a
  wrong CA), client certificates;
* credential rotation with `hd hyperdrive update` keeps client connections and the warm pool.

One edge, one TLS cluster and one tunnel serve the whole module (starting them per test would
cost more than all the tests together); each test uses its own config names and roles.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from proxy.errors import TEST_QUERY_FAILED, OriginError
from proxy.pg.origin import DirectDialer, OriginSpec, probe
from tests.harness.edge import ConnectorProc, EdgeProc
from tests.harness.origins import BlackHole, RefusingPort
from tests.harness.pg import PgCluster, _gen_key, _make_cert, _write_cert
from tests.harness.procs import base_env, hd_argv, poll_until

DB = "app"
OWNER = "app"
OWNER_PW = "owner-pw-8d1f"
# roles of the TLS cluster and how pg_hba.conf makes the origin authenticate each one
MD5_USER, PW_USER, CERT_USER = "md5_user", "pw_user", "cert_user"
TUNNEL_HOST = "db.internal.example"


# --- module fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_pg():
    """TLS only (hostssl): md5 for md5_user (password stored as md5), cleartext password for
    pw_user, a client certificate for cert_user, scram-sha-256 for everyone else."""
    lines = []
    for user, method in ((MD5_USER, "md5"), (PW_USER, "password"), (CERT_USER, "cert"), ("all", "scram-sha-256")):
        lines.append(f"hostssl all {user} 127.0.0.1/32 {method}")
    cluster = PgCluster(auth="scram-sha-256", tls=True, ssl_only=True, hba_lines=lines).start()
    try:
        cluster.create_user(OWNER, OWNER_PW)
        cluster.create_database(DB, owner=OWNER)
        cluster.create_user(MD5_USER, "md5-pw-31", password_encryption="md5")
        cluster.create_user(PW_USER, "clear-pw-77")
        cluster.create_user(CERT_USER)
        for user in (MD5_USER, PW_USER, CERT_USER):
            cluster.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(DB), sql.Identifier(user)))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def medge(tmp_path_factory):
    e = EdgeProc(tmp_path_factory.mktemp("hd-state-configs"))
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
def tunnel(medge, tls_pg):
    """Tunnel `vpc` with routes to the TLS cluster, to a refusing port and to a black hole (1 s
    connect timeout, the product's per-route setting); tunnel `idle` (no connector) with a route;
    an Access application for *.internal.example allowing token `hd-ok` but not `hd-other`."""
    with RefusingPort() as refusing, BlackHole() as hole:
        t = medge.hd("tunnel", "create", "vpc")
        medge.hd("tunnel", "create", "idle")
        medge.hd("tunnel", "route", "vpc", TUNNEL_HOST, "--service", f"tcp://127.0.0.1:{tls_pg.port}")
        medge.hd("tunnel", "route", "vpc", "refused.internal.example", "--service",
                 f"tcp://127.0.0.1:{refusing.port}")
        medge.hd("tunnel", "route", "vpc", "hole.internal.example", "--service", f"tcp://127.0.0.1:{hole.port}",
                 "--connect-timeout", "1s")
        medge.hd("tunnel", "route", "idle", "offline.internal.example", "--service",
                 f"tcp://127.0.0.1:{tls_pg.port}")
        ok = medge.hd("access", "service-token", "create", "hd-ok")
        other = medge.hd("access", "service-token", "create", "hd-other")
        medge.hd("access", "app", "create", "dbs", "--domain", "*.internal.example", "--service-token", "hd-ok")
        conn = ConnectorProc(medge, t["token"], tunnel=t["id"]).start()
        try:
            yield {"ok": ok, "other": other, "connector": conn}
        finally:
            conn.stop()


# --- helpers --------------------------------------------------------------------------------------

def origin_args(cluster: PgCluster, user: str = OWNER, password: str | None = None, database: str = DB) -> list:
    return ["--origin-host", "127.0.0.1", "--origin-port", cluster.port, "--database", database,
            "--origin-user", user, "--origin-password", password if password is not None else cluster.passwords[user]]


def tunnel_args(token: dict, host: str = TUNNEL_HOST, *, secret: str | None = None, password: str = OWNER_PW) -> list:
    return ["--origin-host", host, "--database", DB, "--origin-user", OWNER, "--origin-password", password,
            "--access-client-id", token["client_id"], "--access-client-secret", secret or token["client_secret"]]


def create_fails(edge: EdgeProc, code: int, *args, name: str = "must-fail") -> str:
    """`hd hyperdrive create` must exit non-zero with exactly one stderr line carrying
    `[code]` and a hint; returns that line. The config must not have been stored."""
    rc, err = edge.hd_fail("hyperdrive", "create", name, *args, timeout=60)
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert "Traceback" not in err
    assert f"[{code}]" in line, line
    assert "hint:" in line, f"no hint in: {line}"
    assert name not in [c["name"] for c in edge.hd("hyperdrive", "list")]
    return line


def connect(url: str, **kw) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=10, autocommit=True, **kw)


def proxy_backends(cluster: PgCluster, user: str) -> set[int]:
    """pids of the proxy's origin connections for `user` (only the proxy logs in as that role)."""
    rows = cluster.execute("select pid from pg_stat_activity where usename = %s and backend_type = 'client backend'",
                           (user,))
    return {r[0] for r in rows}


# --- failure codes, direct origins ----------------------------------------------------------------

def test_create_failure_codes_direct(medge, tls_pg, pg_cluster):
    line = create_fails(medge, 2008, "--origin-host", "no-such-db.invalid", "--origin-port", "5432",
                        "--database", DB, "--origin-user", OWNER, "--origin-password", "x")
    assert "no-such-db.invalid" in line

    with RefusingPort() as refusing:
        line = create_fails(medge, 2011, "--origin-host", "127.0.0.1", "--origin-port", refusing.port,
                            "--database", DB, "--origin-user", OWNER, "--origin-password", "x")
    assert f"127.0.0.1:{refusing.port}" in line and "refused" in line
    # 2010 (black hole) for a direct origin would take the proxy's fixed 15 s connect timeout:
    # no shorter one is exposed for direct origins; it is covered through a tunnel route below.

    # the session cluster has ssl=off: the default sslmode (require) cannot be met
    line = create_fails(medge, 2012, *origin_args(pg_cluster, "app"))
    assert "TLS" in line

    line = create_fails(medge, 2013, *origin_args(tls_pg, OWNER, password="wrong-password"))
    assert "password authentication failed" in line and OWNER_PW not in line and "wrong-password" not in line

    line = create_fails(medge, 2014, *origin_args(tls_pg, OWNER, database="no_such_db"))
    assert "no_such_db" in line


def test_create_without_connect_privilege(medge, tls_pg):
    tls_pg.create_database("guarded")
    tls_pg.execute("revoke connect on database guarded from public")
    rc, err = medge.hd_fail("hyperdrive", "create", "guarded", *origin_args(tls_pg, MD5_USER, database="guarded"))
    line = err.strip()
    assert rc != 0 and len(line.splitlines()) == 1 and "permission denied" in line
    assert ("[2016]" in line or "[2015]" in line) and "hint:" in line, line


# --- failure codes, through a tunnel --------------------------------------------------------------

def test_create_failure_codes_through_a_tunnel(medge, tunnel):
    ok, other = tunnel["ok"], tunnel["other"]
    # a hostname no tunnel routes (one an Access app covers, and one nothing covers)
    line = create_fails(medge, 2008, *tunnel_args(ok, "nope.internal.example"))
    assert "nope.internal.example" in line
    create_fails(medge, 2008, *tunnel_args(ok, "db.elsewhere.example"))
    # a route whose tunnel has no connector running
    line = create_fails(medge, 2010, *tunnel_args(ok, "offline.internal.example"))
    assert "connector" in line
    # the connector runs but nothing listens at the route's service
    line = create_fails(medge, 2011, *tunnel_args(ok, "refused.internal.example"))
    assert "refused" in line.lower()
    # Access: a wrong secret (401) and a token the application's policy does not list (403)
    line = create_fails(medge, 2013, *tunnel_args(ok, secret="0" * 64))
    assert "401" in line and "0" * 64 not in line
    line = create_fails(medge, 2013, *tunnel_args(other))
    assert "403" in line and other["client_secret"] not in line
    # and the real thing works through the same tunnel
    c = medge.hd("hyperdrive", "create", "via-tunnel", *tunnel_args(ok))
    assert c["origin"]["port"] is None and c["origin"]["access_client_id"] == ok["client_id"]
    with connect(c["connection_string"]) as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == (OWNER, DB)


def test_create_black_hole_through_a_tunnel(medge, tunnel):
    started = time.monotonic()
    line = create_fails(medge, 2010, *tunnel_args(tunnel["ok"], "hole.internal.example"))
    assert time.monotonic() - started < 10  # the route's 1 s connect timeout, not the proxy's 15 s
    assert "hole.internal.example" in line


# --- 2016: the test query fails -------------------------------------------------------------------

class FailingTestQueryOrigin:
    """A minimal PostgreSQL origin on 127.0.0.1 (no TLS, trust auth) whose answer to every
    query — the proxy's test query `;` included — is `ERROR 42501 permission denied`.

    A real PostgreSQL cannot be made to fail `;` deterministically: the empty query takes no
    lock, touches no relation and checks no privilege; the only candidates are timers (an
    `idle_session_timeout` of 1 ms racing the proxy's `;`), which would make the test flaky."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FailingTestQueryOrigin":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)

    @staticmethod
    def _msg(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("!I", len(payload) + 4) + payload

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _recv(self, c: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _one(self, c: socket.socket) -> None:
        m = self._msg
        with c:
            c.settimeout(20)
            try:
                (length,) = struct.unpack("!I", self._recv(c, 4))
                self._recv(c, length - 4)  # StartupMessage (sslmode=disable: no SSLRequest)
                c.sendall(m(b"R", struct.pack("!I", 0)) + m(b"S", b"server_version\x0015.0\x00")
                          + m(b"K", struct.pack("!II", 4242, 7)) + m(b"Z", b"I"))
                while True:
                    kind = self._recv(c, 1)
                    (length,) = struct.unpack("!I", self._recv(c, 4))
                    body = self._recv(c, length - 4)
                    if kind == b"X":
                        return
                    if kind == b"Q":
                        self.queries.append(body)
                        c.sendall(m(b"E", b"SERROR\x00VERROR\x00C42501\x00Mpermission denied for database app\x00\x00")
                                  + m(b"Z", b"I"))
            except (OSError, ConnectionError):
                return


def test_create_2016_when_the_test_query_fails(medge):
    with FailingTestQueryOrigin() as origin:
        line = create_fails(medge, TEST_QUERY_FAILED, "--origin-host", "127.0.0.1", "--origin-port", origin.port,
                            "--database", DB, "--origin-user", OWNER, "--origin-password", "x",
                            "--sslmode", "disable")
    assert "permission denied" in line
    assert origin.queries == [b";\x00"]  # the proxy's test query reached the origin and failed there


def test_probe_2016_on_a_real_origin(tls_pg):
    """The same code path against a real PostgreSQL, with a test query the role may not run."""
    tls_pg.execute("create table if not exists locked_away (x int); revoke all on locked_away from public",
                   dbname=DB)
    spec = OriginSpec(host="127.0.0.1", port=tls_pg.port, database=DB, user=MD5_USER,
                      password=tls_pg.passwords[MD5_USER], connect_timeout=10)
    ok = asyncio.run(probe(spec, DirectDialer()))
    assert ok["tls"] is True and ok["auth"] == "md5"
    with pytest.raises(OriginError) as exc:
        asyncio.run(probe(spec, DirectDialer(), test_query="select * from locked_away"))
    assert exc.value.code == TEST_QUERY_FAILED and exc.value.sqlstate == "42501"
    assert "permission denied" in exc.value.message and exc.value.hint


# --- conflicting flags ----------------------------------------------------------------------------

def test_conflicting_flags_are_refused_naming_them(medge, tls_pg, tunnel):
    url = f"postgresql://{OWNER}:{OWNER_PW}@127.0.0.1:{tls_pg.port}/{DB}"
    rc, err = medge.hd_fail("hyperdrive", "create", "clash1", "--connection-string", url, "--origin-host", "127.0.0.1")
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--connection-string" in err and "--origin-host" in err and OWNER_PW not in err

    rc, err = medge.hd_fail("hyperdrive", "create", "clash2", *tunnel_args(tunnel["ok"]), "--origin-port", "5432")
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--origin-port" in err and "--access-client-id" in err

    names = [c["name"] for c in medge.hd("hyperdrive", "list")]
    assert "clash1" not in names and "clash2" not in names
    # the connection string alone is fine
    c = medge.hd("hyperdrive", "create", "from-url", "--connection-string", url)
    assert c["origin"]["port"] == tls_pg.port and c["origin"]["user"] == OWNER


# --- the README's psql line -----------------------------------------------------------------------

def test_psql_with_the_connection_string_from_get(medge, tls_pg):
    medge.hd("hyperdrive", "create", "for-psql", *origin_args(tls_pg))
    psql = shutil.which("psql")
    assert psql, "psql is needed"
    env = base_env(medge.cli_env(), drop=("HD_API_URL", "HD_API_TOKEN"))
    for k in [k for k in env if k.startswith("PG")]:
        env.pop(k)  # nothing but the connection string may steer psql
    hd = shlex.join(hd_argv("hyperdrive", "get", "for-psql", "--connection-string"))
    # exactly as in the README: psql "$(hd hyperdrive get NAME --connection-string)"
    cp = subprocess.run(["bash", "-c", f'{shlex.quote(psql)} -X "$({hd})" -Atc "select 1, current_user"'],
                        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"1|{OWNER}"
    # and with the string as one argument of our own
    url = medge.hd("hyperdrive", "get", "for-psql", "--connection-string", json=False)
    assert url.endswith("\n") and "\n" not in url.rstrip("\n")
    cp = subprocess.run([psql, "-X", url.rstrip("\n"), "-Atc", "select 41 + 1"], env=env, capture_output=True,
                        text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0 and cp.stdout.strip() == "42", cp.stderr


# --- origin authentication ------------------------------------------------------------------------

@pytest.mark.parametrize("user", [MD5_USER, PW_USER, OWNER], ids=["md5", "password", "scram-sha-256"])
def test_origin_auth_methods(medge, tls_pg, user):
    c = medge.hd("hyperdrive", "create", f"auth-{user}", *origin_args(tls_pg, user))
    with connect(c["connection_string"]) as conn:
        assert conn.execute("select current_user, 6 * 7").fetchone() == (user, 42)
        # the proxy's origin connection really is this role, over TLS
        row = conn.execute("select a.usename, s.ssl from pg_stat_activity a join pg_stat_ssl s using (pid)"
                           " where a.pid = pg_backend_pid()").fetchone()
        assert row == (user, True)
    create_fails(medge, 2013, *origin_args(tls_pg, user, password="not-it"), name=f"auth-{user}-bad")


# --- TLS ------------------------------------------------------------------------------------------

def _other_ca(directory: Path) -> Path:
    key = _gen_key()
    cert = _make_cert("some-other-ca", key, ca=True)
    path = directory / "other-ca.crt"
    _write_cert(path, cert)
    return path


def test_tls_modes_and_a_wrong_ca(medge, tls_pg, tmp_path):
    ca = medge.hd("cert", "upload", "certificate-authority", "--ca-cert", tls_pg.ca_cert_path, "--name", "pg-ca")
    wrong = medge.hd("cert", "upload", "certificate-authority", "--ca-cert", _other_ca(tmp_path), "--name", "other-ca")
    assert ca["id"] and wrong["id"]
    for mode, extra in (("require", []), ("verify-ca", ["--ca-certificate-id", ca["id"]]),
                        ("verify-full", ["--ca-certificate-id", ca["id"]])):
        c = medge.hd("hyperdrive", "create", f"tls-{mode}", *origin_args(tls_pg), "--sslmode", mode, *extra)
        assert c["sslmode"] == mode
        with connect(c["connection_string"]) as conn:
            assert conn.execute("select s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()").fetchone() == (True,)
    for mode in ("verify-ca", "verify-full"):
        rc, err = medge.hd_fail("hyperdrive", "create", f"tls-wrong-{mode}", *origin_args(tls_pg), "--sslmode", mode,
                                "--ca-certificate-id", wrong["id"])
        line = err.strip()
        assert rc != 0 and len(line.splitlines()) == 1 and "Traceback" not in err
        assert "[2015]" in line and "certificate" in line.lower() and "verif" in line.lower(), line
        assert "hint:" in line and "CA" in line


# --- client certificates --------------------------------------------------------------------------

def test_client_certificate(medge, tls_pg, tmp_path):
    cert, key = tls_pg.issue_client_cert(CERT_USER, tmp_path)
    up = medge.hd("cert", "upload", "mtls-certificate", "--cert", cert, "--key", key, "--name", "cert-user")
    assert up["id"] and "key_pem" not in up
    args = ["--origin-host", "127.0.0.1", "--origin-port", tls_pg.port, "--database", DB,
            "--origin-user", CERT_USER, "--origin-password", "unused"]
    c = medge.hd("hyperdrive", "create", "mtls", *args, "--mtls-certificate-id", up["id"])
    with connect(c["connection_string"]) as conn:
        assert conn.execute("select current_user, s.client_dn from pg_stat_ssl s where s.pid = pg_backend_pid()"
                            ).fetchone() == (CERT_USER, f"/CN={CERT_USER}")
    line = create_fails(medge, 2013, *args, name="mtls-missing")
    assert "certificate" in line


# --- credential rotation --------------------------------------------------------------------------

def test_update_password_keeps_connections_and_pool(medge, tls_pg):
    role, old_pw, new_pw = "rotating", "old-pw-1", "new-pw-2"
    tls_pg.create_user(role, old_pw)
    tls_pg.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(DB), sql.Identifier(role))
                   )
    c = medge.hd("hyperdrive", "create", "rotate", *origin_args(tls_pg, role), "--origin-connection-limit", "10")
    url = c["connection_string"]
    clients = [connect(url) for _ in range(3)]
    try:
        # warm three origin connections: three transactions open at once
        for k in clients:
            k.execute("begin")
            k.execute("select 1")
        for k in clients:
            k.execute("commit")
        before = proxy_backends(tls_pg, role)
        assert len(before) >= 3

        errors: list[BaseException] = []
        stop = threading.Event()
        done = [0]

        def keep_querying(k: psycopg.Connection) -> None:
            while not stop.is_set():
                try:
                    assert k.execute("select current_user").fetchone() == (role,)
                    done[0] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                time.sleep(0.005)

        # one client keeps running queries through the whole rotation
        worker = threading.Thread(target=keep_querying, args=(clients[0],), daemon=True)
        worker.start()
        tls_pg.set_password(role, new_pw)  # the origin now refuses the old password
        updated = medge.hd("hyperdrive", "update", "rotate", "--origin-password", new_pw)
        assert updated["id"] == c["id"]
        mark = done[0]  # the worker keeps going after the update: counts, not a fixed sleep
        poll_until(lambda: done[0] > mark or errors, 60, what="queries after the rotation")
        stop.set()
        worker.join(60)
        assert not errors, errors
        assert done[0] > 0

        for k in clients:  # every existing client connection still works
            assert k.execute("select current_user").fetchone() == (role,)
        # new clients work, and when the pool grows it logs in with the new password
        fresh = [connect(url) for _ in range(5)]
        try:
            for k in fresh + clients:
                k.execute("begin")
                k.execute("select 1")
            for k in fresh + clients:
                k.execute("commit")
        finally:
            for k in fresh:
                k.close()
        after = proxy_backends(tls_pg, role)
        assert before <= after, f"the pool was purged: before {before}, after {after}"
        assert len(after) > len(before)  # new origin connections (with the new password)
        assert medge.hd("hyperdrive", "get", "rotate", "--connection-string", json=False).strip() == url
    finally:
        for k in clients:
            k.close()
