"""Shared fixtures. Everything binds to 127.0.0.1 and is started by the tests themselves; nothing
relies on services already running on the machine.

Fixtures:
  pg_cluster          session   PgCluster, TCP auth scram-sha-256, role ``app`` (password
                                ``pg_cluster.passwords["app"]``) owning database ``app``
  pg_cluster_factory  function  make(**PgCluster kwargs) -> started PgCluster, stopped at teardown
  mariadb             session   MariaDbServer (tests/harness/mariadb.py), started on first use; user
                                ``app`` (mysql_native_password, ``mariadb.passwords["app"]``) owning
                                database ``app``
  mariadb_factory     function  make(**MariaDbServer kwargs) -> started MariaDbServer (tls=True...),
                                stopped at teardown
  tmp_state_dir       function  an empty 0700 directory for an edge's state
  edge                function  EdgeProc started on tmp_state_dir, stopped at teardown
  edge_factory        function  make(state_dir=None, **EdgeProc kwargs) -> started EdgeProc
  sshd                function  SshServer (async) on 127.0.0.1
  echo_server         function  EchoServer (async) in the test's loop
  black_hole          function  BlackHole: connect() hangs until the caller's timeout
  refusing_port       function  RefusingPort: connect() is refused at once
On failure, the edge fixtures print the tail of the edge's logs into the test report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness.edge import EdgeProc
from tests.harness.mariadb import MariaDbServer
from tests.harness.origins import BlackHole, EchoServer, RefusingPort
from tests.harness.pg import PgCluster
from tests.harness.sshd import SshServer

APP_USER = "app"
APP_PASSWORD = "app-pw-3f9c1e"
APP_DB = "app"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


# --- PostgreSQL ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_cluster():
    cluster = PgCluster(auth="scram-sha-256").start()
    try:
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_cluster_factory():
    made: list[PgCluster] = []

    def make(**kwargs) -> PgCluster:
        c = PgCluster(**kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


# --- MariaDB ------------------------------------------------------------------------------------

MARIADB_APP_PASSWORD = "app-pw-7d2a90"


@pytest.fixture(scope="session")
def mariadb():
    server = MariaDbServer().start()
    try:
        server.create_user(APP_USER, MARIADB_APP_PASSWORD)
        server.create_database(APP_DB, owner=APP_USER)
        yield server
    finally:
        server.stop()


@pytest.fixture
def mariadb_factory(request):
    made: list[MariaDbServer] = []

    def make(**kwargs) -> MariaDbServer:
        s = MariaDbServer(**kwargs)
        made.append(s)
        return s.start()

    try:
        yield make
    finally:
        if _failed(request):
            for s in made:
                print(f"\n===== {s.diagnostics()}")
        for s in made:
            s.stop()


# --- the edge -----------------------------------------------------------------------------------

@pytest.fixture
def tmp_state_dir(tmp_path) -> Path:
    d = tmp_path / "hd-state"
    d.mkdir(mode=0o700)
    return d


def _report_edge(request, edges) -> None:
    if _failed(request):
        for e in edges:
            print(f"\n===== edge {e.state_dir} (and its connectors/access clients) =====\n{e.diagnostics(80)}")


@pytest.fixture
def edge(request, tmp_state_dir):
    e = EdgeProc(tmp_state_dir)
    try:
        e.start()
        yield e
    finally:
        e.stop_children()
        e.stop()
        _report_edge(request, [e])


@pytest.fixture
def edge_factory(request, tmp_path):
    made: list[EdgeProc] = []

    def make(state_dir=None, **kwargs) -> EdgeProc:
        if state_dir is None:
            state_dir = tmp_path / f"hd-state-{len(made)}"
            state_dir.mkdir(mode=0o700)
        e = EdgeProc(state_dir, **kwargs)
        made.append(e)
        return e.start()

    try:
        yield make
    finally:
        for e in made:
            e.stop_children()
            e.stop()
        _report_edge(request, made)


# --- origins ------------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def sshd():
    async with SshServer() as s:
        yield s


@pytest_asyncio.fixture
async def echo_server():
    async with EchoServer() as s:
        yield s


@pytest.fixture
def black_hole():
    with BlackHole() as b:
        yield b


@pytest.fixture
def refusing_port():
    with RefusingPort() as r:
        yield r
