"""A throwaway PostgreSQL cluster for tests.

    cluster = PgCluster(auth="scram-sha-256", tls=True).start()
    cluster.create_user("app", "s3cret")
    cluster.create_database("app", owner="app")
    psycopg.connect(cluster.dsn("app", dbname="app", sslmode="require"))
    cluster.stop()           # also runs at exit / when garbage collected

How it works:
- ``initdb`` runs once into a template directory cached in /tmp across runs (``-A trust``, ``-N``);
  every cluster is a copy of it (≈0.1 s instead of ≈0.6 s). The copy lives in its own temp dir, which
  also holds the unix socket directory, the server log and the TLS files.
- Runs as root too: initdb/postgres refuse root, so the processes run as the ``postgres`` OS user
  (``subprocess`` ``user=``/``group=``), the temp dir is chowned to it. The superuser role is always
  ``postgres``; local (unix socket) connections are ``trust`` and TCP ones use ``auth``.
- ``postgres`` is started directly (not via pg_ctl) on a free port of 127.0.0.1 and the unix socket
  in the temp dir; readiness is polled (a connection over the socket) with a 30 s deadline; on
  failure the error carries the tail of the server log. Port races are retried.
- ``stop()`` sends SIGINT (fast shutdown), escalates to SIGQUIT/SIGKILL after a deadline and removes
  the temp dir. The server also gets a parent-death signal (SIGQUIT) so a killed test run leaves
  no servers behind.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from urllib.parse import quote

from .procs import free_port, pdeathsig_prefix, poll_until, WaitTimeout

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin",)
AUTH_METHODS = ("trust", "scram-sha-256", "md5", "password", "reject")
SUPERUSER = "postgres"
READY_TIMEOUT = 30.0


class PgError(RuntimeError):
    pass


def find_binary(name: str, env_var: str, candidates: tuple[str, ...], error: type[Exception], install: str) -> str:
    """A server binary: from $env_var's directory, the usual package directories, or PATH."""
    env_dir = os.environ.get(env_var)
    dirs = ([env_dir] if env_dir else []) + list(candidates)
    for d in dirs:
        p = Path(d) / name
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    raise error(f"binary {name!r} not found (looked in {dirs} and PATH); {install} or set {env_var}")


def _find_bin(name: str) -> str:
    return find_binary(name, "HD_PG_BIN", PG_BIN_CANDIDATES, PgError, "install postgresql-15")


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) of the ``postgres`` OS user when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PgError("running as root but there is no 'postgres' OS user to run the server as") from None
    return pw.pw_uid, pw.pw_gid


def _chown_tree(path: Path, ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    uid, gid = ids
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), uid, gid)


def _popen_user_kwargs(ids: tuple[int, int] | None) -> dict:
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": []}


# ---------------------------------------------------------------------------------------------
# initdb template (once per process)

_template_lock = threading.Lock()
_template_data: str | None = None
_TEMPLATE_FORMAT = 1  # bump when the initdb options below change


def _template() -> str:
    """The data dir of an initdb'd template cluster, shared by every PgCluster.

    Cached across test runs in ``$HD_PG_TEMPLATE_DIR`` or ``/tmp/hd-pg-template-<uid>-<key>``,
    where the key covers the initdb version and options. Built in a scratch dir and renamed into
    place, so concurrent test processes never see a half-made template; never modified after.
    """
    global _template_data
    with _template_lock:
        if _template_data and os.path.exists(os.path.join(_template_data, "PG_VERSION")):
            return _template_data
        ids = _run_as()
        initdb = _find_bin("initdb")
        version = subprocess.run([initdb, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        key = hashlib.sha256(f"{_TEMPLATE_FORMAT}|{version}|{initdb}".encode()).hexdigest()[:12]
        root = os.environ.get("HD_PG_TEMPLATE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                   f"hd-pg-template-{os.geteuid()}-{key}")
        data = os.path.join(root, "data")
        if os.path.exists(os.path.join(root, "complete")):
            _template_data = data
            return data
        scratch = tempfile.mkdtemp(prefix="hd-pg-initdb-")
        try:
            if ids:
                os.chown(scratch, *ids)
            sdata = os.path.join(scratch, "data")
            cmd = [initdb, "-D", sdata, "-U", SUPERUSER, "-A", "trust", "--auth-local=trust",
                   "-E", "UTF8", "--locale=C", "-N", "--no-instructions"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                                  env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                                  cwd=scratch, **_popen_user_kwargs(ids))
            if proc.returncode != 0:
                raise PgError(f"initdb failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            Path(scratch, "complete").write_text(version + "\n")
            try:
                os.rename(scratch, root)  # atomic; fails if another process got there first
            except OSError:
                if not os.path.exists(os.path.join(root, "complete")):
                    # a stale, incomplete template from a crashed run: replace it
                    shutil.rmtree(root, ignore_errors=True)
                    os.rename(scratch, root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _template_data = data
        return data


# ---------------------------------------------------------------------------------------------
# TLS material


def _gen_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_cert(subject_cn: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False,
               sans: list[str] = (), client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        alt = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------

_live: "weakref.WeakSet[PgCluster]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for c in list(_live):
        try:
            c.stop()
        except Exception:
            pass


class LocalCertificates:
    """A throwaway CA and a localhost server certificate for a test server started with TLS, and
    client certificates it signs (shared by PgCluster and MariaDbServer)."""

    base_dir: Path
    tls_dir: Path | None
    _ca: tuple | None
    _harness_error: type[Exception] = RuntimeError
    _ca_name = "hd-test-ca"

    def _make_tls(self) -> None:
        self.tls_dir = self.base_dir / "tls"
        self.tls_dir.mkdir()
        ca_key = _gen_key()
        ca_cert = _make_cert(self._ca_name, ca_key, ca=True)
        srv_key = _gen_key()
        srv_cert = _make_cert("localhost", srv_key, ca_cert, ca_key, sans=["localhost", "127.0.0.1", "::1"])
        self._ca = (ca_cert, ca_key)
        _write_cert(self.tls_dir / "ca.crt", ca_cert)
        _write_cert(self.tls_dir / "server.crt", srv_cert)
        _write_key(self.tls_dir / "server.key", srv_key)
        self.ca_cert_path = self.tls_dir / "ca.crt"
        self.server_cert_path = self.tls_dir / "server.crt"

    def issue_client_cert(self, common_name: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
        """A client certificate/key (PEM files, key mode 0600) for ``common_name`` signed by the
        server's CA (needs ``tls``). Returns (cert_path, key_path)."""
        if not self._ca:
            raise self._harness_error("issue_client_cert needs a server started with tls")
        ca_cert, ca_key = self._ca
        key = _gen_key()
        cert = _make_cert(common_name, key, ca_cert, ca_key, client=True)
        d = Path(directory) if directory else self.base_dir / "clients"
        d.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = d / f"{common_name}.crt", d / f"{common_name}.key"
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        return cert_path, key_path


class PgCluster(LocalCertificates):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (see module doc).

    auth:        method for TCP connections in pg_hba.conf: trust, scram-sha-256, md5, password.
    tls:         ssl=on with a certificate for 127.0.0.1/::1/localhost signed by a throwaway CA
                 (``ca_cert_path``, ``server_cert_path``).
    ssl_only:    TCP only over TLS (``hostssl``; plain TCP is rejected).
    client_cert: TCP only over TLS with client certificates (``hostssl ... cert``): the role name
                 must equal the certificate CN; make one with ``issue_client_cert(user)``.
    password_encryption: how role passwords are stored (default md5 when auth == "md5" so the md5
                 exchange really happens; otherwise scram-sha-256).
    hba_lines:   replace the TCP lines of pg_hba.conf entirely (the local trust line stays).
    settings:    extra postgresql.conf settings.
    """

    _harness_error = PgError
    _ca_name = "hd-test-ca"

    def __init__(self, *, auth: str = "trust", tls: bool = False, ssl_only: bool = False,
                 client_cert: bool = False, password_encryption: str | None = None,
                 hba_lines: list[str] | None = None, settings: dict[str, object] | None = None,
                 host: str = "127.0.0.1", max_connections: int = 300):
        if auth not in AUTH_METHODS:
            raise ValueError(f"auth must be one of {AUTH_METHODS}")
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("tests bind only to loopback")
        self.auth = auth
        self.tls = tls or ssl_only or client_cert
        self.ssl_only = ssl_only or client_cert
        self.client_cert = client_cert
        self.password_encryption = password_encryption or ("md5" if auth == "md5" else "scram-sha-256")
        self.hba_lines = hba_lines
        self.settings = dict(settings or {})
        self.host = host
        self.max_connections = max_connections
        self.port: int | None = None
        self.passwords: dict[str, str] = {}
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self.log_path: Path | None = None
        self.tls_dir: Path | None = None
        self.ca_cert_path: Path | None = None
        self.server_cert_path: Path | None = None
        self._ca = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._ids = None
        self._finalizer = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> "PgCluster":
        if self._proc is not None and self._proc.poll() is None:
            return self
        self._ids = _run_as()
        template = _template()
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="hd-pg-"))
            self.data_dir = self.base_dir / "data"
            self.socket_dir = self.base_dir / "sock"
            self.log_path = self.base_dir / "server.log"
            shutil.copytree(template, self.data_dir, symlinks=True)
            self.socket_dir.mkdir()
            os.chmod(self.data_dir, 0o700)
            if self.tls:
                self._make_tls()
            self._write_hba()
            _chown_tree(self.base_dir, self._ids)
            self._finalizer = weakref.finalize(self, PgCluster._cleanup_static, self.base_dir)
            _live.add(self)

        last_err = None
        for _attempt in range(5):
            self.port = free_port(self.host)
            try:
                self._launch(timeout)
                return self
            except _PortInUse as e:  # another process took the port between free_port() and bind()
                last_err = e
                self._terminate()
                self._proc = None
                continue
        raise PgError(f"could not start postgres: {last_err}")

    def _write_hba(self) -> None:
        lines = ["local all all trust"]
        if self.hba_lines is not None:
            lines += self.hba_lines
        else:
            kind = "hostssl" if self.ssl_only else "host"
            method = "cert" if self.client_cert else self.auth
            for net in ("127.0.0.1/32", "::1/128"):
                lines.append(f"{kind} all all {net} {method}")
        (self.data_dir / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _conf(self) -> dict[str, object]:
        conf: dict[str, object] = {
            "port": self.port,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "shared_buffers": "32MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": self.password_encryption,
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "dynamic_shared_memory_type": "posix",
            "max_wal_senders": 0,
            "wal_level": "minimal",
            "ssl": "on" if self.tls else "off",
        }
        if self.tls:
            conf["ssl_cert_file"] = str(self.tls_dir / "server.crt")
            conf["ssl_key_file"] = str(self.tls_dir / "server.key")
            conf["ssl_ca_file"] = str(self.tls_dir / "ca.crt")
        conf.update(self.settings)
        return conf

    def _launch(self, timeout: float) -> None:
        args = [_find_bin("postgres"), "-D", str(self.data_dir)]
        for k, v in self._conf().items():
            args += ["-c", f"{k}={v}"]
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        log_offset = self._log_file.tell()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        self._proc = subprocess.Popen(pdeathsig_prefix("QUIT") + args, stdin=subprocess.DEVNULL,
                                      stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                      cwd=str(self.base_dir), start_new_session=True,
                                      **_popen_user_kwargs(self._ids))
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, PgCluster._cleanup_static, self.base_dir, self._proc)

        def ready():
            if self._proc.poll() is not None:
                text = self._log_since(log_offset)
                if "Address already in use" in text or "could not create any TCP/IP sockets" in text:
                    raise _PortInUse(text[-500:])
                raise PgError(f"postgres exited with {self._proc.returncode} during startup\n"
                              f"--- server log tail ({self.log_path}):\n{self._log_tail(text)}")
            return self._probe()

        try:
            poll_until(ready, timeout, interval=0.01, max_interval=0.1, what="postgres to accept connections",
                       on_timeout=lambda: f"--- server log tail ({self.log_path}):\n{self._log_tail()}")
        except WaitTimeout as e:
            self._terminate()
            raise PgError(str(e)) from None

    def _probe(self) -> bool:
        import psycopg
        try:
            with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname="postgres",
                                 connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _log_tail(self, text: str | None = None, lines: int = 30) -> str:
        if text is None:
            text = self._log_since(0)
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self._log_since(0)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None:
            return
        _stop_postmaster(proc, timeout)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def restart(self, timeout: float = READY_TIMEOUT) -> "PgCluster":
        """Fast shutdown and start again on the same port and data (e.g. after changing settings)."""
        self._terminate()
        self._write_hba()
        _chown_tree(self.base_dir / "data", self._ids)
        self._launch(timeout)
        return self

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster) without cleaning up: for origin-failure tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), escalate on a deadline, remove the temp dir. Idempotent."""
        self._terminate()
        self._proc = None
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        _live.discard(self)

    @staticmethod
    def _cleanup_static(base_dir: Path, proc: subprocess.Popen | None = None) -> None:
        if proc is not None:
            _stop_postmaster(proc, 15.0)
        shutil.rmtree(base_dir, ignore_errors=True)

    def __enter__(self) -> "PgCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- SQL -----------------------------------------------------------------------------------

    def connect(self, dbname: str = "postgres", user: str = SUPERUSER, **kw):
        """A psycopg connection over the unix socket (trust), autocommit."""
        import psycopg
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=user, dbname=dbname,
                               autocommit=True, connect_timeout=10, **kw)

    def execute(self, sql: str, params=None, *, dbname: str = "postgres", user: str = SUPERUSER) -> list[tuple]:
        """Run SQL as the superuser over the unix socket; returns the rows of the last result that
        has rows (or []). Several statements separated by ';' are allowed when there are no params."""
        with self.connect(dbname=dbname, user=user) as conn:
            cur = conn.execute(sql, params)
            rows: list[tuple] = []
            while True:
                if cur.description:
                    rows = cur.fetchall()
                if not cur.nextset():
                    return rows

    def psql(self, *args: str, dbname: str = "postgres", user: str = SUPERUSER,
             input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run the ``psql`` binary over the unix socket (``-X -v ON_ERROR_STOP=1``)."""
        cmd = [shutil.which("psql") or _find_bin("psql"), "-X", "-v", "ON_ERROR_STOP=1",
               "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname, *args]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def create_user(self, name: str, password: str | None = None, superuser: bool = False,
                    password_encryption: str | None = None) -> None:
        from psycopg import sql
        stmt = sql.SQL("CREATE ROLE {} LOGIN {}").format(
            sql.Identifier(name), sql.SQL("SUPERUSER" if superuser else "NOSUPERUSER"))
        with self.connect() as conn:
            conn.execute(sql.SQL("SET password_encryption = {}").format(
                sql.Literal(password_encryption or self.password_encryption)))
            conn.execute(stmt)
            if password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        if password is not None:
            self.passwords[name] = password

    def set_password(self, name: str, password: str, password_encryption: str | None = None) -> None:
        from psycopg import sql
        with self.connect() as conn:
            conn.execute(sql.SQL("SET password_encryption = {}").format(
                sql.Literal(password_encryption or self.password_encryption)))
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
        self.passwords[name] = password

    def create_database(self, name: str, owner: str | None = None) -> None:
        from psycopg import sql
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner:
            stmt = sql.SQL("{} OWNER {}").format(stmt, sql.Identifier(owner))
        with self.connect() as conn:
            conn.execute(stmt)

    # -- addresses -----------------------------------------------------------------------------

    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str | None = None,
            host: str | None = None, **params: object) -> str:
        """A postgresql:// URL for TCP. ``password`` defaults to the one given to ``create_user``;
        extra keyword arguments become query parameters (``sslmode="require"``...)."""
        host = host or self.host
        if password is None:
            password = self.passwords.get(user)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        hostpart = f"[{host}]" if ":" in host else host
        url = f"postgresql://{auth}@{hostpart}:{self.port}/{quote(dbname or user, safe='')}"
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in params.items())
        return url

    def conninfo(self, user: str = SUPERUSER, password: str | None = None, dbname: str | None = None,
                 host: str | None = None) -> dict:
        """Keyword form (for asyncpg/pg8000/psycopg kwargs)."""
        return {"host": host or self.host, "port": self.port, "user": user,
                "password": password if password is not None else self.passwords.get(user),
                "dbname": dbname or user}

    @property
    def unix_dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname=postgres"

    def __repr__(self) -> str:
        return f"<PgCluster {self.host}:{self.port} auth={self.auth} tls={self.tls} running={self.running()}>"


class _PortInUse(Exception):
    pass


def _stop_postmaster(proc: subprocess.Popen, timeout: float) -> None:
    """SIGINT (fast shutdown) → SIGQUIT (immediate) → SIGKILL, each with a deadline."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
