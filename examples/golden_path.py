"""The golden path of PRODUCT.md, as far as it exists, run for real on this machine.

    python -m examples.golden_path [--pg postgresql://user:pass@127.0.0.1:5432/db] [--keep]

Without --pg a throwaway PostgreSQL cluster is started (and removed at the end). Every `hd`
command is printed before it runs, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
import urllib.request
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOSTNAME = "db.internal.example"


def say(text: str) -> None:
    print(f"\033[1m{text}\033[0m" if sys.stdout.isatty() else text, flush=True)


def tool(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else name


def run(argv: list[str], env: dict[str, str], *, show: str | None = None) -> Any:
    say("$ " + (show or " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]])))
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"golden path failed at: {' '.join(argv[:4])}\n{out.stderr.strip()}")
    if "--json" in argv:
        return json.loads(out.stdout)
    print(out.stdout, end="")
    return out.stdout


def psql_query(conn_string: str, query: str, env: dict[str, str]) -> None:
    """`psql "$(hd hyperdrive get my-db --connection-string)" -c QUERY` (psycopg without psql)."""
    psql = shutil.which("psql")
    if psql:
        say(f'$ psql "$(hd hyperdrive get my-db --connection-string)" -c "{query}"')
        out = subprocess.run([psql, conn_string, "-c", query], env=env, capture_output=True, text=True, timeout=60)
        print(out.stdout or out.stderr, end="")
        if out.returncode != 0:
            raise SystemExit("psql through the proxy failed")
    else:
        import psycopg

        with psycopg.connect(conn_string, connect_timeout=15, autocommit=True) as conn:
            print(conn.execute(query).fetchone())


def wait(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a background process exited early (code {p.returncode})")
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", help="an existing PostgreSQL URL to reach through the tunnel")
    ap.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hd-golden-"))
    state = work / "state"
    env = dict(os.environ, HD_STATE_DIR=str(state))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = None
    try:
        if args.pg:
            origin = urlsplit(args.pg)
            pg_host, pg_port = origin.hostname or "127.0.0.1", origin.port or 5432
            user, password, db = origin.username or "postgres", origin.password or "", origin.path.lstrip("/") or "postgres"
        else:
            sys.path.insert(0, str(ROOT))
            from tests.harness.pg import PgCluster

            say("# starting a throwaway PostgreSQL (pass --pg URL to use your own)")
            cluster = PgCluster(auth="scram-sha-256", tls=True).start()  # Hyperdrive origins use TLS
            cluster.create_user("app", "app-password")
            cluster.create_database("app", "app")
            pg_host, pg_port, user, password, db = "127.0.0.1", cluster.port, "app", "app-password", "app"
            say(f"#   PostgreSQL on {pg_host}:{pg_port}, database app, user app")

        say("$ hd edge &")
        edge_log = open(work / "edge.log", "wb")
        procs.append(subprocess.Popen(
            [tool("hd"), "edge", "--api-listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0",
             "--pg-listen", "127.0.0.1:0", "--mysql-listen", "127.0.0.1:0"],
            env=env, stdout=edge_log, stderr=subprocess.STDOUT))
        wait(lambda: (state / "edge.json").exists(), 30, "the edge to start", procs)

        tunnel = run([tool("hd"), "tunnel", "create", "vpc-01", "--json"], env, show="hd tunnel create vpc-01")
        print(f"tunnel {tunnel['id']} created")
        run([tool("hd"), "tunnel", "route", "vpc-01", HOSTNAME, "--service", f"tcp://{pg_host}:{pg_port}"], env)
        token = run([tool("hd"), "access", "service-token", "create", "hyperdrive-vpc-01", "--json"], env,
                    show="hd access service-token create hyperdrive-vpc-01")
        print(f"client id {token['client_id']} (the secret is shown once; kept for the next step)")
        run([tool("hd"), "access", "app", "create", "vpc-01-db", "--domain", HOSTNAME,
             "--service-token", "hyperdrive-vpc-01"], env)

        token_file = work / "tunnel.token"
        token_file.touch(mode=0o600)
        token_file.write_text(tunnel["token"])
        metrics_at = f"127.0.0.1:{free_port()}"
        say(f"$ hd-connector --token-file tunnel.token --metrics {metrics_at} &"
            "     # same as --token TOKEN, kept off the process list")
        conn_log = open(work / "connector.log", "wb")
        procs.append(subprocess.Popen([tool("hd-connector"), "--token-file", str(token_file), "--metrics", metrics_at],
                                      env=env, stdout=conn_log, stderr=subprocess.STDOUT))

        def connected() -> bool:
            out = subprocess.run([tool("hd"), "tunnel", "info", "vpc-01", "--json"], env=env,
                                 capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and bool(json.loads(out.stdout).get("connections"))

        wait(connected, 30, "the connector to register", procs)
        run([tool("hd"), "tunnel", "info", "vpc-01"], env)
        say(f"$ curl http://{metrics_at}/ready")
        with urllib.request.urlopen(f"http://{metrics_at}/ready", timeout=5) as r:
            ready = json.loads(r.read())
        print(json.dumps(ready))
        if ready.get("status") != 200 or ready.get("readyConnections", 0) < 1:
            raise SystemExit(f"golden path: the connector is not ready: {ready}")

        # The origin password and access secret go through the environment, not the command line.
        run([tool("hd"), "hyperdrive", "create", "my-db", "--origin-host", HOSTNAME, "--database", db,
             "--origin-user", user, "--access-client-id", token["client_id"]],
            dict(env, HD_ORIGIN_PASSWORD=password, HD_ACCESS_CLIENT_SECRET=token["client_secret"]),
            show=f"hd hyperdrive create my-db --origin-host {HOSTNAME} --database {db} --origin-user {user} "
                 f"--origin-password … --access-client-id {token['client_id']} --access-client-secret …")
        conn_string = run([tool("hd"), "hyperdrive", "get", "my-db", "--connection-string"], env).strip()
        query = "select 'hello through the proxy and the tunnel' as greeting, current_database(), current_user"
        psql_query(conn_string, query, env)
        # A read without volatile functions is cached: the second run never reaches the origin.
        cached = "select 'the second run comes from the cache' as note, 6 * 7 as answer"
        for _ in range(2):
            psql_query(conn_string, cached, env)
        metrics = run([tool("hd"), "hyperdrive", "metrics", "my-db", "--json"], env)
        by_status = metrics["queries"]["by_cache_status"]
        if by_status["hit"] < 1:
            raise SystemExit(f"the repeated read was not served from the cache: {by_status}")
        run([tool("hd"), "hyperdrive", "metrics", "my-db"], env)
        say("golden path OK")
        if args.keep:
            say(f"everything is running (state in {state}); Ctrl-C to stop")
            signal.pause()
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
