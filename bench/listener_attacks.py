"""What strangers and broken clients on the database listeners cost a real client (issue 13).

    .venv/bin/python -m bench.listener_attacks            # ~2 min → bench/results/listener_attacks.json
    .venv/bin/python -m bench.listener_attacks --seconds 20 --attackers 8

Everything on 127.0.0.1, each part in its own process: a PostgreSQL cluster (scram + TLS), `hd edge`
(its Postgres proxy with config `la` pointing at that cluster, and its MySQL listener), and attacker
processes (this module's `attack` subcommand, under `nice -n 19`: a real attacker's CPU is on other
machines). This process is the real client: psycopg with the connection string `hd hyperdrive get`
prints (verify-full), `select 1` in a tight loop on one connection, each request timed.

Phases, each --seconds long, N = --attackers processes each:

  idle          no attack
  gssenc        connections sending 2,000 pipelined GSSENCRequests in one write, over and over
  sasl-1g       connections that know a config's username (no password), start SCRAM and send an
                authentication message claiming 1 GB, streaming its bytes
  mysql-16m     MySQL connections sending a 16 MiB packet before login, streamed
  no-reader     logged-in clients (plaintext, loopback) pipelining `select 1` without ever reading

For each phase: the client's p50/p99/max latency and rate, the edge's CPU (utime + stime from /proc)
as a share of one core, and its RSS (VmRSS) at the phase's end. Not a timed test: figures vary with
the box; the verdicts on memory are tests/e2e/test_listener_bounds.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import DB, HOST, RESULTS_DIR, log, machine_info, now_iso, source_digest  # noqa: E402
from bench.quic_flood import FloodBench, probe, rss_mib  # noqa: E402
from bench.quic_flood import measure as quic_flood_measure  # noqa: E402

GSSENC = struct.pack("!ii", 8, 80877104)
CHUNK = b"\0" * 65536


# ------------------------------------------------------------------ the attackers (subprocesses)
def _startup(user: str) -> bytes:
    body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0" + DB.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


def _recv_some(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except (socket.timeout, OSError):
        return b""


def _stream_until_closed(s: socket.socket, budget: int, end: float) -> int:
    sent = 0
    while sent < budget and time.monotonic() < end:
        try:
            sent += s.send(CHUNK)
        except (socket.timeout, BlockingIOError):
            continue  # the edge stopped reading: keep the socket (and its claim) open
        except OSError:
            break
    return sent


def attack_once(kind: str, host: str, port: int, user: str, dsn: str, end: float) -> str:
    if kind == "no-reader":
        import psycopg  # logged in by a real driver, then raw pipelined queries, never read

        conn = psycopg.connect(dsn, autocommit=True)
        s = socket.socket(fileno=os.dup(conn.pgconn.socket))
        s.settimeout(1.0)
        query = b"Q" + struct.pack("!i", 13) + b"select 1\0"
        batch = query * 4096
        try:
            while time.monotonic() < end:
                try:
                    s.send(batch)
                except socket.timeout:
                    pass
        finally:
            s.close()
            conn.close()
        return "ok"
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(1.0)
        if kind == "gssenc":
            s.sendall(GSSENC * 2000)
            while _recv_some(s):
                pass
        elif kind == "sasl-1g":
            s.sendall(_startup(user))
            if not _recv_some(s).startswith(b"R"):
                return "no SASL"
            s.sendall(b"p" + struct.pack("!i", 1 << 30) + b"SCRAM-SHA-256\0" + struct.pack("!i", (1 << 30) - 30))
            _stream_until_closed(s, 1 << 30, min(end, time.monotonic() + 20))
        elif kind == "mysql-16m":
            _recv_some(s)  # the greeting
            s.sendall(b"\xff\xff\xff\x01")
            _stream_until_closed(s, 16 << 20, min(end, time.monotonic() + 20))
    return "ok"


def attack_main(args: argparse.Namespace) -> int:
    end = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < end:
        try:
            attack_once(args.kind, args.host, args.port, args.user, args.dsn, end)
        except OSError:
            pass
        n += 1
    print(f"{args.kind}: {n} connections")
    return 0


# ------------------------------------------------------------------ the bench
def measure(conn: Any, edge_pid: int, seconds: float) -> dict[str, Any]:
    """bench.quic_flood's measurement (client latency, edge CPU) and the edge's RSS at its end."""
    return {**quic_flood_measure(conn, edge_pid, seconds), "edge_rss_mib": rss_mib(edge_pid)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import psycopg

    workdir = Path(tempfile.mkdtemp(prefix="hd-listener-attacks-"))
    b = FloodBench(args, workdir)
    res: dict[str, Any] = {"timestamp": now_iso(),
                           "command": [sys.executable, "-m", "bench.listener_attacks", *sys.argv[1:]],
                           "machine": machine_info(), "product_source": source_digest(),
                           "config": {k: v for k, v in vars(args).items() if k != "json_out"}}
    try:
        b.start_postgres()
        info = b.start_edge()
        edge_pid = b.stack.procs[0].pid
        pg_port = int(str(info["pg_listen"]).rpartition(":")[2])
        my_port = int(str(info["mysql_listen"]).rpartition(":")[2])
        dsn = b.create_config("la", "--origin-host", HOST, "--origin-port", str(b.cluster.port))
        u = urlsplit(dsn)
        plain = urlunsplit((u.scheme, u.netloc, u.path, "sslmode=disable", ""))
        log(f"edge pid {edge_pid}; client: {dsn.split('@')[1]}")
        conn = psycopg.connect(dsn, autocommit=True)
        probe(conn, 1.0)
        phases: dict[str, dict[str, Any]] = {}
        for kind in ("idle", "gssenc", "sasl-1g", "mysql-16m", "no-reader"):
            procs = []
            if kind != "idle":
                port = my_port if kind == "mysql-16m" else pg_port
                for i in range(args.attackers):
                    argv = ["nice", "-n", "19", sys.executable, "-m", "bench.listener_attacks", "attack", kind,
                            "--port", str(port), "--user", str(u.username), "--dsn", plain,
                            "--seconds", str(args.seconds + 2)]
                    procs.append(b.stack.start_proc(f"attack-{kind}-{i}", argv))
                time.sleep(1.0)  # let the attack reach its pace
            m = measure(conn, edge_pid, args.seconds)
            for p in procs:
                p.wait_for(lambda p=p: not p.alive(), args.seconds + 60, what="the attacker to end", allow_exit=True)
                m.setdefault("attackers", []).append(p.stdout_text().strip()[-200:])
                b.stack.procs.remove(p)
            phases[kind] = m
            log(f"{kind:10}: {m}")
        res["phases"] = phases
        conn.close()
    finally:
        b.close()
    return res


def report(res: dict[str, Any]) -> None:
    print("\n| phase | requests/s | p50 ms | p99 ms | max ms | edge CPU % of a core | edge RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, m in res["phases"].items():
        print(f"| {name} | {m['rps']:,} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['max_ms']:.1f} | "
              f"{m['edge_cpu_pct']:.1f} | {m['edge_rss_mib']} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attack"]:
        ap = argparse.ArgumentParser(prog="python -m bench.listener_attacks attack")
        ap.add_argument("kind", choices=["gssenc", "sasl-1g", "mysql-16m", "no-reader"])
        ap.add_argument("--host", default="127.0.0.1")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--user", default="")
        ap.add_argument("--dsn", default="")
        ap.add_argument("--seconds", type=float, default=10.0)
        return attack_main(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="python -m bench.listener_attacks", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    ap.add_argument("--attackers", type=int, default=8, help="attacker processes per phase")
    ap.add_argument("--json-out", type=Path, default=RESULTS_DIR / "listener_attacks.json")
    args = ap.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    res = run(args)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
