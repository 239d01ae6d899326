"""What a QUIC handshake flood costs `hd edge`'s database proxies (issue 13).

    .venv/bin/python -m bench.quic_flood                 # ~3 min → bench/results/quic_flood.json
    .venv/bin/python -m bench.quic_flood --seconds 10 --rounds 1 --abandon 3000

Everything on 127.0.0.1, each part in its own process: a PostgreSQL cluster (tests/harness/pg.py,
scram + TLS), `hd edge` (its Postgres proxy with config `qf` pointing at that cluster, and its
relay's QUIC listener on the tunnel port), and flood processes (tests/harness/quicflood.py).
This process is the real client: psycopg through the edge's proxy, `select 1` in a tight loop
(autocommit, one connection), each request timed.

Flood processes run under `nice -n 19`: a real attacker's CPU is on other machines, so here
they get only what the edge, PostgreSQL and the client leave idle.

Phases, each --seconds long, every round in the same order:

  idle       no flood
  loop×N     N processes completing QUIC handshakes one after the other (wrong pin: each closes
             right after the TLS handshake) — the issue's "four handshake loops"
  spray      one process sending R Initials/s (200 client connection ids round robin) that
             never answer anything

then once: `abandon` — A handshakes from 200 loopback source addresses, each Retry answered like
a real client, then silence; the edge's RSS (/proc/PID/status VmRSS) before, right after, and
--settle seconds later (past the old code's 30 s idle timeout by default).

For each phase: the client's p50/p99/max latency and request rate, and the edge's CPU (utime +
stime from /proc) as a share of one core. Not a timed test: figures vary with the box.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    DB,
    HOST,
    RESULTS_DIR,
    USER,
    PgTargets,
    log,
    machine_info,
    now_iso,
    percentile,
    source_digest,
)
from bench.tunnel_bench import proc_cpu  # noqa: E402
from tests.harness.procstat import rss_mib as _rss_mib  # noqa: E402


def rss_mib(pid: int) -> float:
    return round(_rss_mib(pid), 1)


def cpu_s(pid: int) -> float:
    u = proc_cpu(pid)
    assert u is not None
    return u[0] + u[1]


class FloodBench(PgTargets):
    def start_postgres(self) -> None:  # no pgbench tables needed: only `select 1`
        from tests.harness.pg import PgCluster

        self.stack.pg = PgCluster(auth="scram-sha-256", tls=True).start()
        self.cluster.create_user(USER, self.password)
        self.cluster.create_database(DB, USER)
        log(f"postgres on port {self.cluster.port}")


def flood_procs(b: FloodBench, kind: str, n: int, port: int, args: argparse.Namespace) -> list[Any]:
    procs = []
    for i in range(n):
        # nice 19: the attackers' own CPU would be on other machines; here they get only what
        # the edge, postgres and the client leave idle, so the client measures the edge's cost.
        argv = ["nice", "-n", "19", sys.executable, "-m", "tests.harness.quicflood", kind, "--port", str(port)]
        if kind == "loop":
            argv += ["--seconds", str(args.seconds + 2)]
        elif kind == "spray":
            argv += ["--seconds", str(args.seconds + 2), "--rate", str(args.spray_rate)]
        else:
            argv += ["--count", str(args.abandon), "--sources", "200"]
        procs.append(b.stack.start_proc(f"flood-{kind}-{i}", argv))
    return procs


def probe(conn: Any, seconds: float) -> list[float]:
    lat = []
    cur = conn.cursor()
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        cur.execute("select 1")
        cur.fetchone()
        lat.append(time.perf_counter() - t0)
    return lat


def measure(conn: Any, edge_pid: int, seconds: float) -> dict[str, Any]:
    c0, w0 = cpu_s(edge_pid), time.monotonic()
    lat = probe(conn, seconds)
    c1, w1 = cpu_s(edge_pid), time.monotonic()
    ms = [x * 1000 for x in lat]
    return {"requests": len(ms), "rps": round(len(ms) / (w1 - w0)),
            "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 1), "edge_cpu_pct": round(100 * (c1 - c0) / (w1 - w0), 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import psycopg

    workdir = Path(tempfile.mkdtemp(prefix="hd-quic-flood-"))
    b = FloodBench(args, workdir)
    res: dict[str, Any] = {"timestamp": now_iso(), "command": [sys.executable, "-m", "bench.quic_flood", *sys.argv[1:]],
                           "machine": machine_info(), "product_source": source_digest(),
                           "config": {k: v for k, v in vars(args).items() if k != "json_out"}}
    try:
        b.start_postgres()
        info = b.start_edge()
        edge_pid = b.stack.procs[0].pid
        udp_port = int(str(info["tunnel_address"]).rpartition(":")[2])
        dsn = b.create_config("qf", "--origin-host", HOST, "--origin-port", str(b.cluster.port))
        log(f"edge pid {edge_pid}, QUIC on udp {udp_port}; client: {dsn.split('@')[1]}")
        conn = psycopg.connect(dsn, autocommit=True)
        probe(conn, 1.0)  # warm-up: the pool has its server connection
        phases: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for name, kind, n in (("idle", None, 0), (f"loop×{args.loops}", "loop", args.loops),
                                  ("spray", "spray", 1)):
                procs = flood_procs(b, kind, n, udp_port, args) if kind else []
                time.sleep(1.0 if procs else 0)  # let the flood reach its pace before measuring
                m = measure(conn, edge_pid, args.seconds)
                for p in procs:  # each ends by itself ~1 s after the measurement
                    p.wait_for(lambda p=p: not p.alive(), args.seconds + 30, what="the flood to end", allow_exit=True)
                    m.setdefault("flood", []).append(p.stdout_text().strip()[-300:])
                    b.stack.procs.remove(p)
                phases.setdefault(name, []).append(m)
                log(f"round {r + 1} {name:8}: {m}")
        res["phases"] = phases
        # abandoned handshakes: memory
        before = rss_mib(edge_pid)
        c0 = cpu_s(edge_pid)
        procs = flood_procs(b, "abandon", 1, udp_port, args)
        procs[0].wait_for(lambda: not procs[0].alive(), 300.0, what="the abandon flood to finish", allow_exit=True)
        after = rss_mib(edge_pid)
        cpu = cpu_s(edge_pid) - c0
        flood = procs[0].stdout_text().strip()
        time.sleep(args.settle)
        settled = rss_mib(edge_pid)
        m = measure(conn, edge_pid, min(args.seconds, 5.0))
        res["abandon"] = {"handshakes": args.abandon, "rss_before_mib": before, "rss_after_mib": after,
                          "rss_settled_mib": settled, "settle_s": args.settle, "edge_cpu_s": round(cpu, 2),
                          "flood": flood, "client_after": m}
        log(f"abandon {args.abandon}: RSS {before} → {after} MiB, {settled} MiB {args.settle:g}s later; "
            f"edge CPU {cpu:.2f}s; {flood}")
        conn.close()
    finally:
        b.close()
    return res


def report(res: dict[str, Any]) -> None:
    print("\n| phase | requests/s | p50 ms | p99 ms | max ms | edge CPU % of a core |")
    print("|---|---|---|---|---|---|")
    for name, ms in res["phases"].items():
        for m in ms:
            print(f"| {name} | {m['rps']:,} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['max_ms']:.1f} | "
                  f"{m['edge_cpu_pct']:.1f} |")
    a = res["abandon"]
    print(f"\n{a['handshakes']} abandoned handshakes: edge RSS {a['rss_before_mib']} → {a['rss_after_mib']} MiB, "
          f"{a['rss_settled_mib']} MiB after {a['settle_s']:g}s; edge CPU {a['edge_cpu_s']} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quic_flood", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loops", type=int, default=4, help="handshake-loop processes")
    ap.add_argument("--spray-rate", type=float, default=2000.0, help="Initials per second of the spray phase")
    ap.add_argument("--abandon", type=int, default=3000, help="abandoned handshakes")
    ap.add_argument("--settle", type=float, default=35.0, help="seconds before the last RSS reading")
    ap.add_argument("--json-out", type=Path, default=RESULTS_DIR / "quic_flood.json")
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
