"""A throwaway MariaDB server for tests (the MySQL-protocol counterpart of ``pg.PgCluster``).

    server = MariaDbServer(tls=True).start()
    server.create_user("app", "s3cret")                 # mysql_native_password, host '%'
    server.create_database("app", owner="app")
    pymysql.connect(**server.conninfo("app", database="app"), ssl={"ca": str(server.ca_cert_path)})
    server.connection_count("app")                      # rows of information_schema.PROCESSLIST
    server.stop()            # also runs at exit / when garbage collected

How it works:
- ``mariadb-install-db --no-defaults`` runs once into a template data dir cached in /tmp across runs
  (keyed by the server version and the options); every server is a copy of it (≈0.05 s instead of
  ≈1.5 s). The copy lives in its own temp dir, which also holds the unix socket, the pid file, the
  error log, a tmpdir and the TLS files.
- Nothing is read from /etc/mysql (``--no-defaults`` everywhere), so the machine's own MariaDB
  (if any) and its settings are neither used nor touched. Options that the distribution's my.cnf
  would set and that tests care about are given explicitly (utf8mb4 server charset).
- Accounts: ``root@localhost`` has no password (unix socket, used by the helpers here);
  ``root@127.0.0.1`` and ``root@::1`` use mysql_native_password with ``ROOT_PASSWORD`` (so
  ``dsn()``/``url`` for root work over TCP). No anonymous users, no test database.
- As root: mariadbd refuses to run as root unless told ``--user=root``, which we pass (the server
  then keeps running as root — no setuid, so the parent-death signal below stays in force and the
  temp dir needs no chown). Not as root: it runs as the current user.
- ``mariadbd`` is started directly (not via mariadbd-safe) on a free port of 127.0.0.1; readiness
  is polled (a PyMySQL connection over the unix socket) with a 30 s deadline; on failure the error
  carries the tail of the error log. Port races are retried.
- ``stop()`` sends SIGTERM (normal shutdown), escalates to SIGKILL after a deadline and removes the
  temp dir. The server gets a parent-death signal (SIGKILL: the data is throwaway) so a killed test
  run leaves no servers behind.
- Startup is tuned for tests, not durability: small InnoDB log, no binlog, no doublewrite,
  flush_log_at_trx_commit=2, no performance_schema, no native AIO (io_uring/libaio need memlock
  limits that containers may not grant), and a huge ``max_connect_errors`` so pool tests that
  abort many handshakes never get 127.0.0.1 blocked.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from .pg import LocalCertificates, find_binary
from .procs import WaitTimeout, free_port, pdeathsig_prefix, poll_until

BIN_CANDIDATES = ("/usr/sbin", "/usr/bin")
ROOT_USER = "root"
ROOT_PASSWORD = "hd-root-pw-5b1d"  # root@127.0.0.1 / root@::1 (TCP); root@localhost (socket) has none
AUTH_PLUGINS = ("mysql_native_password", "ed25519")
READY_TIMEOUT = 30.0
INNODB_LOG_FILE_SIZE = "8M"  # the same for install-db and the server, so no log resize at startup


class MariaDbError(RuntimeError):
    pass


def _find_bin(name: str) -> str:
    return find_binary(name, "HD_MARIADB_BIN", BIN_CANDIDATES, MariaDbError,
                       "install mariadb-server (scripts/bootstrap.sh does as root)")


def _user_args() -> list[str]:
    """mariadbd/install-db refuse to run as root without an explicit ``--user=root``."""
    return ["--user=root"] if os.geteuid() == 0 else []


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C", "TZ": "UTC",
            "HOME": os.environ.get("HOME", "/tmp")}


def _ident(name: str) -> str:
    """A backquoted SQL identifier."""
    return "`" + name.replace("`", "``") + "`"


# ---------------------------------------------------------------------------------------------
# mariadb-install-db template (once per process, cached across runs)

_template_lock = threading.Lock()
_template_data: str | None = None
_TEMPLATE_FORMAT = 1  # bump when the install options or the extra SQL below change

_TEMPLATE_SQL = f"""
FLUSH PRIVILEGES;
DELETE FROM mysql.global_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');
DELETE FROM mysql.proxies_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');
FLUSH PRIVILEGES;
ALTER USER 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD('{ROOT_PASSWORD}');
ALTER USER 'root'@'::1' IDENTIFIED VIA mysql_native_password USING PASSWORD('{ROOT_PASSWORD}');
"""


def _install_args(datadir: str, extra_file: str) -> list[str]:
    return [_find_bin("mariadb-install-db"), "--no-defaults", *_user_args(), f"--datadir={datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
            f"--extra-file={extra_file}",
            # passed through to the bootstrap mariadbd:
            f"--innodb-log-file-size={INNODB_LOG_FILE_SIZE}", "--innodb-use-native-aio=0", "--skip-log-bin"]


def _template() -> str:
    """The data dir of an installed template, shared by every MariaDbServer.

    Cached across test runs in ``$HD_MARIADB_TEMPLATE_DIR`` or
    ``/tmp/hd-mariadb-template-<uid>-<key>``, where the key covers the server version and options.
    Built in a scratch dir and renamed into place, so concurrent test processes never see a
    half-made template; never modified after.
    """
    global _template_data
    with _template_lock:
        if _template_data and os.path.isdir(os.path.join(_template_data, "mysql")):
            return _template_data
        mariadbd = _find_bin("mariadbd")
        version = subprocess.run([mariadbd, "--version"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL).stdout.strip()
        key_src = f"{_TEMPLATE_FORMAT}|{version}|{mariadbd}|{_install_args('D', 'F')}|{_TEMPLATE_SQL}"
        key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
        root = os.environ.get("HD_MARIADB_TEMPLATE_DIR") or os.path.join(
            tempfile.gettempdir(), f"hd-mariadb-template-{os.geteuid()}-{key}")
        data = os.path.join(root, "data")
        if os.path.exists(os.path.join(root, "complete")):
            _template_data = data
            return data
        scratch = tempfile.mkdtemp(prefix="hd-mariadb-install-")
        try:
            sdata = os.path.join(scratch, "data")
            extra = os.path.join(scratch, "extra.sql")
            Path(extra).write_text(_TEMPLATE_SQL)
            proc = subprocess.run(_install_args(sdata, extra), capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL, env=_env(), cwd=scratch)
            if proc.returncode != 0 or not os.path.isdir(os.path.join(sdata, "mysql")):
                raise MariaDbError(f"mariadb-install-db failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            os.unlink(extra)
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

_live: "weakref.WeakSet[MariaDbServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for s in list(_live):
        try:
            s.stop()
        except Exception:
            pass


class _PortInUse(Exception):
    pass


def _stop_server(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM (normal shutdown) → SIGKILL, each with a deadline."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cleanup(base_dir: Path, box: dict) -> None:
    _stop_server(box.get("proc"), 15.0)
    shutil.rmtree(base_dir, ignore_errors=True)


class MariaDbServer(LocalCertificates):
    """A throwaway MariaDB server on 127.0.0.1 (see module doc).

    tls:             --ssl-cert/--ssl-key/--ssl-ca with a certificate for 127.0.0.1/::1/localhost
                     signed by a throwaway CA (``ca_cert_path``, ``server_cert_path``).
    ssl_only:        ``require_secure_transport=ON``: TCP connections without TLS are refused (the
                     unix socket counts as secure).
    max_connections: the server's limit (500 by default; the admin helpers need one slot).
    settings:        extra server options, ``{"wait_timeout": 5}`` -> ``--wait-timeout=5``.
    """

    _harness_error = MariaDbError
    _ca_name = "hd-test-mariadb-ca"

    def __init__(self, *, tls: bool = False, ssl_only: bool = False, max_connections: int = 500,
                 settings: dict[str, object] | None = None, host: str = "127.0.0.1"):
        if host not in ("127.0.0.1", "::1"):
            raise ValueError("tests bind only to loopback")
        self.tls = tls or ssl_only
        self.ssl_only = ssl_only
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.host = host
        self.port: int | None = None
        self.passwords: dict[str, str | None] = {ROOT_USER: ROOT_PASSWORD}
        self.user_hosts: dict[str, str] = {}
        self.base_dir: Path | None = None
        self.data_dir: Path | None = None
        self.socket_path: Path | None = None
        self.log_path: Path | None = None
        self.pid_path: Path | None = None
        self.tls_dir: Path | None = None
        self.ca_cert_path: Path | None = None
        self.server_cert_path: Path | None = None
        self._ca = None
        self._proc: subprocess.Popen | None = None
        self._box: dict = {}
        self._log_file = None
        self._finalizer = None
        self.startup_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> "MariaDbServer":
        if self.running():
            return self
        t0 = time.monotonic()
        template = _template()
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="hd-mariadb-"))
            self.data_dir = self.base_dir / "data"
            self.socket_path = self.base_dir / "mysqld.sock"
            self.log_path = self.base_dir / "server.log"
            self.pid_path = self.base_dir / "mariadbd.pid"
            shutil.copytree(template, self.data_dir, symlinks=True)
            os.chmod(self.data_dir, 0o700)
            (self.base_dir / "tmp").mkdir()
            if self.tls:
                self._make_tls()
            self._finalizer = weakref.finalize(self, _cleanup, self.base_dir, self._box)
            _live.add(self)

        last_err = None
        for _attempt in range(5):
            self.port = free_port(self.host)
            try:
                self._launch(timeout)
                self.startup_seconds = time.monotonic() - t0
                return self
            except _PortInUse as e:  # another process took the port between free_port() and bind()
                last_err = e
                self._terminate()
                continue
        raise MariaDbError(f"could not start mariadbd: {last_err}")

    def _args(self) -> list[str]:
        b = self.base_dir
        args = [_find_bin("mariadbd"), "--no-defaults", *_user_args(),
                f"--datadir={self.data_dir}", f"--socket={self.socket_path}", f"--port={self.port}",
                f"--bind-address={self.host}", "--skip-name-resolve",
                f"--log-error={self.log_path}", f"--pid-file={self.pid_path}", f"--tmpdir={b / 'tmp'}",
                f"--max-connections={self.max_connections}", "--max-connect-errors=1000000000",
                "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci",
                "--innodb-buffer-pool-size=64M", f"--innodb-log-file-size={INNODB_LOG_FILE_SIZE}",
                "--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0", "--innodb-use-native-aio=0",
                "--innodb-buffer-pool-load-at-startup=0", "--innodb-buffer-pool-dump-at-shutdown=0",
                "--skip-log-bin", "--performance-schema=0", "--skip-external-locking", "--skip-symbolic-links"]
        if self.tls:
            args += [f"--ssl-cert={self.tls_dir / 'server.crt'}", f"--ssl-key={self.tls_dir / 'server.key'}",
                     f"--ssl-ca={self.tls_dir / 'ca.crt'}"]
        if self.ssl_only:
            args.append("--require-secure-transport=ON")
        for k, v in self.settings.items():
            args.append(f"--{k.replace('_', '-')}={v}")
        return args

    def _launch(self, timeout: float) -> None:
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        log_offset = self._log_file.tell()
        # stdout/stderr go to the error log too (mariadbd reopens stderr onto --log-error; anything
        # printed before that lands in the same file).
        self._proc = subprocess.Popen(pdeathsig_prefix("KILL") + self._args(), stdin=subprocess.DEVNULL,
                                      stdout=self._log_file, stderr=self._log_file, env=_env(),
                                      cwd=self.base_dir, start_new_session=True)
        self._box["proc"] = self._proc

        def ready() -> bool:
            if self._proc.poll() is not None:
                text = self._log_since(log_offset)
                if "Address already in use" in text or "Bind on TCP/IP port" in text:
                    raise _PortInUse(text[-500:])
                raise MariaDbError(f"mariadbd exited with {self._proc.returncode} during startup\n"
                                   f"--- error log tail ({self.log_path}):\n{self._log_tail(text)}")
            return self._probe()

        try:
            poll_until(ready, timeout, interval=0.01, max_interval=0.1, what="mariadbd to accept connections",
                       on_timeout=lambda: f"--- error log tail ({self.log_path}):\n{self._log_tail()}")
        except WaitTimeout as e:
            self._terminate()
            raise MariaDbError(str(e)) from None

    def _probe(self) -> bool:
        import pymysql
        if not self.socket_path.exists():
            return False
        try:
            conn = pymysql.connect(unix_socket=str(self.socket_path), user=ROOT_USER, connect_timeout=2)
        except pymysql.err.OperationalError:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        finally:
            conn.close()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def _log_tail(self, text: str | None = None, lines: int = 30) -> str:
        if text is None:
            text = self._log_since(0)
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self._log_since(0)

    def diagnostics(self, lines: int = 40) -> str:
        return f"{self!r}\n--- error log tail ({self.log_path}):\n{self._log_tail(lines=lines)}"

    @property
    def pid(self) -> int | None:
        """The pid of mariadbd itself (the Popen child is ``setpriv`` exec'ing into it: same pid)."""
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _terminate(self, timeout: float = 15.0) -> None:
        _stop_server(self._proc, timeout)
        self._proc = None
        self._box.pop("proc", None)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def restart(self, timeout: float = READY_TIMEOUT) -> "MariaDbServer":
        """Normal shutdown and start again on the same port and data (e.g. after changing settings)."""
        self._terminate()
        self._launch(timeout)
        return self

    def kill(self) -> None:
        """Crash the server (SIGKILL) without cleaning up: for origin-failure tests. ``restart()``
        brings it back (InnoDB recovers)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def stop(self) -> None:
        """Normal shutdown (SIGTERM), SIGKILL after a deadline, remove the temp dir. Idempotent."""
        self._terminate()
        if self._finalizer is not None:
            self._finalizer()
        self._finalizer = None
        _live.discard(self)

    def __enter__(self) -> "MariaDbServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- SQL -----------------------------------------------------------------------------------

    def connect(self, user: str = ROOT_USER, password: str | None = None, database: str | None = None, *,
                unix: bool | None = None, **kw):
        """A PyMySQL connection, autocommit. Over the unix socket for root (no password) unless
        ``unix=False``; over TCP to host:port for everyone else (``password`` defaults to the one
        given to ``create_user``). Extra keyword arguments go to ``pymysql.connect`` (``ssl=``...)."""
        import pymysql
        if unix is None:
            unix = user == ROOT_USER
        if password is None and not (unix and user == ROOT_USER):
            password = self.passwords.get(user)
        kw.setdefault("connect_timeout", 10)
        kw.setdefault("autocommit", True)
        kw.setdefault("charset", "utf8mb4")
        where = {"unix_socket": str(self.socket_path)} if unix else {"host": self.host, "port": self.port}
        return pymysql.connect(user=user, password=password or "", database=database, **where, **kw)

    def query(self, sql: str, params=None, *, database: str | None = None) -> list[tuple]:
        """Run SQL as root over the unix socket; returns the rows of the last result that has rows
        (or []). Several statements separated by ';' are allowed."""
        from pymysql.constants import CLIENT
        conn = self.connect(database=database, client_flag=CLIENT.MULTI_STATEMENTS)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                rows: list[tuple] = []
                while True:
                    if cur.description:
                        rows = list(cur.fetchall())
                    if not cur.nextset():
                        return rows
        finally:
            conn.close()

    execute = query  # the PgCluster spelling

    def client(self, *args: str, user: str = ROOT_USER, database: str | None = None,
               input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run the ``mariadb`` command-line client as root over the unix socket (``--batch``)."""
        cmd = [_find_bin("mariadb"), "--no-defaults", f"--socket={self.socket_path}", f"--user={user}", "--batch"]
        if database:
            cmd.append(f"--database={database}")
        cmd += args
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=_env(),
                              stdin=None if input is not None else subprocess.DEVNULL)

    def create_user(self, name: str, password: str | None = None, plugin: str = "mysql_native_password", *,
                    host: str = "%", require: str | None = None, max_user_connections: int | None = None) -> None:
        """CREATE USER name@host authenticated by ``plugin`` (mysql_native_password or ed25519;
        MariaDB has no caching_sha2_password/sha256_password server plugin). ``password=None``: no
        password. ``require``: None, "SSL" or "X509" (TLS / a client certificate of our CA)."""
        if plugin not in AUTH_PLUGINS:
            raise ValueError(f"plugin must be one of {AUTH_PLUGINS} (MariaDB {plugin!r} is not available)")
        if require not in (None, "SSL", "X509"):
            raise ValueError("require must be None, 'SSL' or 'X509'")
        if plugin == "ed25519":
            self._ensure_plugin("ed25519", "auth_ed25519")
        sql, params = "CREATE USER %s@%s", [name, host]
        if password is not None:
            sql += f" IDENTIFIED VIA {plugin} USING PASSWORD(%s)"
            params.append(password)
        if require:
            sql += f" REQUIRE {require}"
        if max_user_connections is not None:
            sql += f" WITH MAX_USER_CONNECTIONS {int(max_user_connections)}"
        self.query(sql, params)
        self.passwords[name] = password
        self.user_hosts[name] = host

    def set_password(self, name: str, password: str, plugin: str = "mysql_native_password") -> None:
        if plugin not in AUTH_PLUGINS:
            raise ValueError(f"plugin must be one of {AUTH_PLUGINS}")
        if plugin == "ed25519":
            self._ensure_plugin("ed25519", "auth_ed25519")
        self.query(f"ALTER USER %s@%s IDENTIFIED VIA {plugin} USING PASSWORD(%s)",
                   (name, self.user_hosts.get(name, "%"), password))
        self.passwords[name] = password

    def _ensure_plugin(self, name: str, soname: str) -> None:
        if not self.query("SELECT 1 FROM information_schema.PLUGINS WHERE PLUGIN_NAME = %s AND PLUGIN_STATUS = 'ACTIVE'",
                          (name,)):
            self.query(f"INSTALL SONAME '{soname}'")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE (utf8mb4); ``owner`` gets ALL PRIVILEGES on it."""
        self.query(f"CREATE DATABASE {_ident(name)}")
        if owner:
            self.query(f"GRANT ALL PRIVILEGES ON {_ident(name)}.* TO %s@%s", (owner, self.user_hosts.get(owner, "%")))

    # -- connections (pool-limit tests) --------------------------------------------------------

    _CLIENTS_WHERE = "ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump') AND USER <> 'system user'"

    def connections(self, user: str | None = None) -> list[dict]:
        """Client connections from information_schema.PROCESSLIST (without the one asking, nor
        server threads): dicts with id, user, host, db, command, time, state, info. Without
        ``user``, connections still in the handshake ('unauthenticated user') are included."""
        sql = f"SELECT ID, USER, HOST, DB, COMMAND, TIME, STATE, INFO FROM information_schema.PROCESSLIST WHERE {self._CLIENTS_WHERE}"
        params: tuple = ()
        if user is not None:
            sql += " AND USER = %s"
            params = (user,)
        keys = ("id", "user", "host", "db", "command", "time", "state", "info")
        return [dict(zip(keys, r)) for r in self.query(sql + " ORDER BY ID", params)]

    def connection_count(self, user: str | None = None) -> int:
        """How many client connections the server has (of ``user``, if given), not counting the
        admin connection that asks."""
        sql = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE {self._CLIENTS_WHERE}"
        if user is not None:
            return int(self.query(sql + " AND USER = %s", (user,))[0][0])
        return int(self.query(sql)[0][0])

    def wait_connection_count(self, expected: int | Callable[[int], bool], user: str | None = None, timeout: float = 10.0) -> int:
        """Poll until ``connection_count(user)`` equals ``expected`` (or, if ``expected`` is a
        callable, until it returns true for the count); returns the count."""
        check = expected if callable(expected) else (lambda n: n == expected)
        last: list[int] = []

        def ok():
            n = self.connection_count(user)
            last[:] = [n]
            return check(n)

        poll_until(ok, timeout, what=f"connection_count({user!r}) to be {expected!r}",
                   on_timeout=lambda: f"last count {last}; connections: {self.connections(user)}")
        return last[0]

    def kill_connections(self, user: str) -> int:
        """KILL CONNECTION every connection of ``user`` (the origin dropping them). Returns how many."""
        n = 0
        for c in self.connections(user):
            try:
                self.query(f"KILL CONNECTION {int(c['id'])}")
                n += 1
            except Exception as e:  # noqa: BLE001 - gone meanwhile (1094 Unknown thread id)
                if "1094" not in str(e):
                    raise
        return n

    # -- addresses -----------------------------------------------------------------------------

    def dsn(self, user: str = ROOT_USER, password: str | None = None, db: str | None = None,
            host: str | None = None, **params: object) -> str:
        """A mysql:// URL for TCP. ``password`` defaults to the one given to ``create_user`` (root:
        ``ROOT_PASSWORD``); extra keyword arguments become query parameters."""
        host = host or self.host
        if password is None:
            password = self.passwords.get(user)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        hostpart = f"[{host}]" if ":" in host else host
        url = f"mysql://{auth}@{hostpart}:{self.port}/{quote(db or '', safe='')}"
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in params.items())
        return url

    @property
    def url(self) -> str:
        """root over TCP: ``mysql://root:ROOT_PASSWORD@127.0.0.1:PORT/``."""
        return self.dsn()

    def conninfo(self, user: str = ROOT_USER, password: str | None = None, database: str | None = None,
                 host: str | None = None) -> dict:
        """Keyword form for ``pymysql.connect(**...)`` over TCP."""
        return {"host": host or self.host, "port": self.port, "user": user,
                "password": password if password is not None else (self.passwords.get(user) or ""),
                "database": database}

    def __repr__(self) -> str:
        return (f"<MariaDbServer {self.host}:{self.port} tls={self.tls} ssl_only={self.ssl_only} "
                f"running={self.running()}>")
