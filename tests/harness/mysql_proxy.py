"""The MySQL proxy of a real `hd edge` in front of a throwaway MariaDB, for the isolation tests.

    stack = MySQLProxyStack(tmp_dir).start()
    cfg = stack.config("iso", limit=5)                 # a mysql config reaching MariaDB directly
    c = stack.connect(cfg)                             # PyMySQL through the proxy, DEFAULT modes
    d = stack.direct()                                 # PyMySQL straight to MariaDB, same modes
    stack.origin_sessions()                            # the origin user's sessions (PROCESSLIST)
    stack.stop()

The origin user is `app` (database `app`); `stack.db.query(...)` runs SQL as root over the unix
socket, which the origin counts are taken without (it is another user).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql

from tests.harness.edge import EdgeProc
from tests.harness.mariadb import MariaDbServer

ORIGIN_USER, ORIGIN_PASSWORD, DB = "app", "app-origin-pw-77", "app"


class MySQLProxyStack:
    def __init__(self, state_dir: Path, **mariadb_kw: Any) -> None:
        self.state_dir = Path(state_dir)
        self.db = MariaDbServer(**mariadb_kw)
        self.edge: EdgeProc | None = None
        self.configs: dict[str, dict] = {}

    def start(self) -> "MySQLProxyStack":
        try:
            self.db.start()
            self.db.create_user(ORIGIN_USER, ORIGIN_PASSWORD)
            self.db.create_database(DB, ORIGIN_USER)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir.chmod(0o700)
            self.edge = EdgeProc(self.state_dir).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.edge is not None:
            self.edge.stop_children()
            self.edge.stop()
            self.edge = None
        self.db.stop()

    def config(self, name: str, *, limit: int = 5, caching: bool = False, **flags: str) -> dict:
        """A mysql config (direct, plaintext loopback origin), made once per name."""
        if name not in self.configs:
            assert self.edge is not None
            args = ["hyperdrive", "create", name, "--origin-scheme", "mysql", "--origin-host", "127.0.0.1",
                    "--origin-port", str(self.db.port), "--database", DB, "--origin-user", ORIGIN_USER,
                    "--origin-password", ORIGIN_PASSWORD, "--sslmode", "disable",
                    "--origin-connection-limit", str(limit)]
            if not caching:
                args += ["--caching-disabled", "true"]
            for k, v in flags.items():
                args += [f"--{k.replace('_', '-')}", str(v)]
            self.configs[name] = self.edge.hd(*args)
        return self.configs[name]

    @staticmethod
    def args(cfg: dict) -> dict:
        u = urlsplit(cfg["connection_string"])
        return dict(host=u.hostname, port=u.port, user=unquote(u.username or ""),
                    password=unquote(u.password or ""), database=u.path.lstrip("/"))

    def connect(self, cfg: dict, **kw: Any) -> pymysql.connections.Connection:
        """PyMySQL through the proxy with the driver's defaults (autocommit off, utf8mb4)."""
        args = self.args(cfg)
        args.update(connect_timeout=10, read_timeout=60, write_timeout=60)
        args.update(kw)
        return pymysql.connect(**args)

    def direct(self, **kw: Any) -> pymysql.connections.Connection:
        """PyMySQL straight to MariaDB as the origin user, the same defaults."""
        args = dict(host=self.db.host, port=self.db.port, user=ORIGIN_USER, password=ORIGIN_PASSWORD,
                    database=DB, connect_timeout=10, read_timeout=60, write_timeout=60)
        args.update(kw)
        return pymysql.connect(**args)

    def origin_sessions(self) -> list[dict]:
        """The origin user's sessions, from information_schema.PROCESSLIST (as root)."""
        return self.db.connections(ORIGIN_USER)

    def origin_count(self) -> int:
        return self.db.connection_count(ORIGIN_USER)

    def mysql_url(self, cfg: dict) -> str:
        return cfg["connection_string"]
