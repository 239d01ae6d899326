"""Postgres proxy benchmark: the pooling proxy in `hd edge` against PgBouncer and a direct connection.

    .venv/bin/python -m bench.proxy_bench            # full run (~8 min) → bench/results/proxy.json
    .venv/bin/python -m bench.proxy_bench --quick    # smoke run (~1 min) → bench/results/proxy-quick.json
    .venv/bin/python -m bench.proxy_bench --profile /tmp/prof   # + py-spy stacks of edge/connectors

Everything runs on 127.0.0.1, each part in its own OS process, started and stopped here:

    pgbench ──TLS──────────────────────────────────────────────────────────> postgres   direct
    pgbench ──TLS──> pgbouncer (transaction, pool 20) ──TLS──────────────────> postgres   pgbouncer
    pgbench ──TLS──> hd edge (proxy, pool 20) ──TLS───────────────────────────> postgres   proxy
    pgbench ──TLS──> hd edge (proxy ══WSS══ relay) ══WSS══> hd-connector ──TCP──> postgres  tunnel
                     (the proxy's TLS to the origin runs inside the tunnel stream)

* postgres   tests/harness/pg.py PgCluster: scram-sha-256, TLS on, shared_buffers 256MB; user and
             database `bench`; `pgbench -i -s 10`.
* pgbouncer  transaction pooling, default_pool_size 20, SCRAM + TLS to the client and to the server;
             `max_prepared_statements = 200` when the version has it (1.21+). Older versions (Debian
             12 ships 1.18) cannot run `-M prepared` in transaction mode: their prepared row uses
             `-M extended` (unnamed statements: a Parse per transaction) and the table marks it `ext`.
* hd edge    `--pg-listen 127.0.0.1:0`; Hyperdrive configs made with the CLI, query caching off,
             `--origin-connection-limit 20`: `pb-direct` (origin 127.0.0.1:PORT), `pb-tunnel`
             (tunnel `pb4`, `hd-connector` with the default 4 HA connections), `pb-tunnel-ha1`
             (tunnel `pb1`, `--ha-connections 1`); each tunnel has a route, a service token and an
             Access app. pgbench uses `hd hyperdrive get NAME --connection-string` (sslmode=require).

Part 1, throughput: `pgbench -n -S -M simple|prepared -c 1|16|64` (`-j 2` above one client), --duration
seconds each, every target in turn per cell (after an untimed warm-up that fills the pools). tps and
average latency; ratios to PgBouncer and to direct; targets (issue 4): proxy ≥ 0.6 × PgBouncer,
tunnel ≥ 0.3 × PgBouncer, PASS/MISS per row.

Part 2, the Hyperdrive case: `bench/delay_forwarder.py` puts --delay-ms (default 25 ms one way, so a
50 ms round trip; the TCP handshake round trip is simulated too) in front of the database. psycopg
`connect()` + `select 1` (autocommit), timed from before connect to after the result, --connects
times (alternating): (a) directly to the far database through the forwarder (TCP, TLS, SCRAM,
query: every round trip pays 50 ms), (b) to the proxy whose config `pb-far` reaches the database
through the forwarder, its pool warm (one query first). p50/p99, ratio a/b; target b ≥ 4× faster.
Also shown: the local connect floor (proxy, PgBouncer and postgres with no delay), and psycopg's
default mode (not autocommit: BEGIN, then select 1).

CPU time of every process (utime+stime from /proc) is read around every phase as tunnel_bench does:
µs of CPU per transaction per process, and `other` (box CPU not charged to these processes: other
programs on a shared box — a noise warning). Exit status 0 when the run completed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    HOST,
    POOL,
    BenchError,
    PgTargets,
    Profiler,
    cpu_delta,
    fmt_num,
    format_profile_summary,
    log,
    percentile,
    pgbench_arg_defaults,
    pgbench_arg_parser,
    run_bench,
    summarize_raw_profile,
    uses_uvloop,
)
from bench.common import run_pgbench as common_run_pgbench  # noqa: E402
from tests.harness.procs import base_env, connector_argv, poll_until  # noqa: E402

ALL_TARGETS = ("direct", "pgbouncer", "proxy", "tunnel", "tunnel-ha1")
LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "proxy": "proxy", "tunnel": "tunnel",
          "tunnel-ha1": "tunnel ha1"}
DESCRIPTIONS = {
    "direct": "pgbench → postgres (TLS, SCRAM)",
    "pgbouncer": "pgbench → PgBouncer (TLS, SCRAM, transaction pool 20) → postgres (TLS)",
    "proxy": "pgbench → hd edge proxy (TLS, SCRAM) → postgres (TLS), config pb-direct",
    "tunnel": "pgbench → hd edge proxy → relay → hd-connector (4 HA conns) → postgres, config pb-tunnel",
    "tunnel-ha1": "same as tunnel, hd-connector --ha-connections 1, config pb-tunnel-ha1",
}
#: tps ratio to PgBouncer each proxied target must reach (issue 4)
GOALS = {"proxy": 0.6, "tunnel": 0.3, "tunnel-ha1": 0.3}
HYPERDRIVE_GOAL = 4.0  # (a) connect + first query directly to the far origin / (b) through the proxy
PRODUCT = ("edge", "connector", "connector-ha1")


# ------------------------------------------------------------------------------ set-up


class ProxyBench(PgTargets):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.connectors: dict[str, Any] = {}
        self.forwarder_port: int | None = None

    def start_tunnel(self, tunnel: str, hostname: str, ha: int, proc_name: str, token: dict[str, Any]) -> None:
        t = self.hd("tunnel", "create", tunnel, "--json")
        self.hd("tunnel", "route", tunnel, hostname, "--service", f"tcp://{HOST}:{self.cluster.port}", "--json")
        self.hd("access", "app", "create", f"{tunnel}-db", "--domain", hostname, "--service-token", token["name"],
                "--json")
        tf = self.workdir / f"{tunnel}.token"
        tf.write_text(t["token"])
        os.chmod(tf, 0o600)
        argv = connector_argv("--token-file", str(tf), "--loglevel", "warning")
        if ha != 4:
            argv += ["--ha-connections", str(ha)]
        p = self.stack.start_proc(proc_name, argv)

        def connected() -> bool:
            p.check_alive()
            info = self.hd("tunnel", "info", tunnel, "--json")
            return len(info.get("connections") or []) >= ha

        poll_until(connected, 60.0, interval=0.1, what=f"{ha} connector connection(s) of {tunnel}",
                   on_timeout=p.diagnostics)
        self.stack.tracked.add(proc_name, p.pid)
        self.connectors[proc_name] = p
        log(f"tunnel {tunnel}: connector with {ha} connection(s) registered")

    def setup(self) -> None:
        want = self.args.targets
        self.start_postgres()
        self.targets["direct"] = {"dsn": self.direct_dsn(self.cluster.port)}
        if "pgbouncer" in want:
            self.start_pgbouncer()
        self.start_edge()
        self.targets["proxy"] = {"dsn": self.create_config("pb-direct", "--origin-host", HOST,
                                                           "--origin-port", str(self.cluster.port))}
        if "tunnel" in want or "tunnel-ha1" in want:
            token = self.hd("access", "service-token", "create", "pb-token", "--json")
            token.setdefault("name", "pb-token")
            access_env = {"HD_ACCESS_CLIENT_SECRET": token["client_secret"]}
            for target, tunnel, host, ha, proc in (("tunnel", "pb4", "pg4.bench.internal", 4, "connector"),
                                                   ("tunnel-ha1", "pb1", "pg1.bench.internal", 1, "connector-ha1")):
                if target not in want:
                    continue
                self.start_tunnel(tunnel, host, ha, proc, token)
                dsn = self.create_config(f"pb-{target}", "--origin-host", host,
                                         "--access-client-id", token["client_id"], env=access_env)
                self.targets[target] = {"dsn": dsn}
        self.targets = {k: v for k, v in self.targets.items() if k in want}

    def start_forwarder(self) -> int:
        p = self.stack.start_proc("forwarder", [sys.executable, "-m", "bench.delay_forwarder",
                                                "--target", f"{HOST}:{self.cluster.port}",
                                                "--delay-ms", str(self.args.delay_ms)])
        line = p.wait_for(lambda: p.stdout_text().partition("\n")[0] if "\n" in p.stdout_text() else None,
                          20.0, what="forwarder port")
        self.forwarder_port = int(json.loads(line)["port"])
        self.stack.tracked.add("forwarder", p.pid)
        log(f"delay forwarder on port {self.forwarder_port} ({self.args.delay_ms:g} ms each way)")
        return self.forwarder_port


# ------------------------------------------------------------------------------ part 1: pgbench


def run_pgbench(b: ProxyBench, target: str, mode: str, clients: int, duration: float,
                tag: str | None = None) -> dict[str, Any]:
    return common_run_pgbench(b, target, mode, clients, duration, tag,
                              profile=PRODUCT if target in ("proxy", "tunnel", "tunnel-ha1") else ())


def measure_pgbench(b: ProxyBench) -> list[dict[str, Any]]:
    args = b.args
    targets = list(b.targets)
    log("warm-up: fill the pools, prepare statements (untimed)")
    for target in targets:
        for mode in args.modes:
            r = run_pgbench(b, target, mode, max(args.clients), 1.0)
            if "error" in r:
                log(f"warm-up of {target} {mode} failed; the measured runs will show it")
    cells: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for mode in args.modes:
            for clients in args.clients:
                for i in range(len(targets)):
                    # rotate the order per cell so no target always runs first after a mode switch
                    target = targets[(i + rep) % len(targets)]
                    tag = f"{target}-{mode}-c{clients}" + (f"-r{rep + 1}" if args.repeat > 1 else "")
                    r = run_pgbench(b, target, mode, clients, args.duration, tag)
                    r["repeat"] = rep
                    cells.append(r)
    return cells


def median_cells(cells: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(target, mode, clients) → the median run by tps (lower middle), with the spread attached."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["target"], c["mode"], c["clients"]), []).append(c)
    out = {}
    for key, runs in groups.items():
        ok = [r for r in runs if "tps" in r and "error" not in r]
        if not ok:
            out[key] = runs[0]
            continue
        ok.sort(key=lambda r: r["tps"])
        chosen = dict(ok[(len(ok) - 1) // 2])
        chosen["tps_repeats"] = [r["tps"] for r in ok]
        out[key] = chosen
    return out


def rows_with_verdicts(b: ProxyBench, med: dict[tuple[str, str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mode in b.args.modes:
        for clients in b.args.clients:
            row: dict[str, Any] = {"mode": mode, "clients": clients, "tps": {}, "latency_avg_ms": {},
                                   "vs_pgbouncer": {}, "vs_direct": {}, "verdict": {}}
            for t in b.targets:
                c = med.get((t, mode, clients))
                if c and "tps" in c and "error" not in c:
                    row["tps"][t] = c["tps"]
                    row["latency_avg_ms"][t] = c.get("latency_avg_ms")
            pgb, d = row["tps"].get("pgbouncer"), row["tps"].get("direct")
            for t, v in row["tps"].items():
                if pgb:
                    row["vs_pgbouncer"][t] = round(v / pgb, 3)
                if d:
                    row["vs_direct"][t] = round(v / d, 3)
            for t, goal in GOALS.items():
                if t not in b.targets:
                    continue
                ratio = row["vs_pgbouncer"].get(t)
                row["verdict"][t] = None if ratio is None else ("PASS" if ratio >= goal else "MISS")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ part 2: connect + first query


def probe_main() -> int:
    """Child process (`--probe`, spec on stdin): psycopg connect + first query, timed, as JSON."""
    import psycopg

    spec = json.load(sys.stdin)
    out: dict[str, list[float]] = {k: [] for k in spec["order"]}
    errors: dict[str, str] = {}
    for name in spec.get("warm", []):  # untimed: fills the proxy's pool to the far origin
        with psycopg.connect(spec["dsns"][name], connect_timeout=15, autocommit=True) as conn:
            conn.execute("select 1").fetchone()
    for _ in range(spec["count"]):
        for name in spec["order"]:
            dsn, autocommit = spec["dsns"][name], spec["autocommit"][name]
            try:
                t0 = time.perf_counter()
                conn = psycopg.connect(dsn, connect_timeout=15, autocommit=autocommit)
                row = conn.execute("select 1").fetchone()
                t1 = time.perf_counter()
                conn.close()
                if row != (1,):
                    raise RuntimeError(f"select 1 returned {row!r}")
                out[name].append(round((t1 - t0) * 1000.0, 3))
            except Exception as exc:  # record and go on: the table shows how many failed
                errors[name] = f"{type(exc).__name__}: {exc}"
    json.dump({"ms": out, "errors": errors}, sys.stdout)
    return 0


def measure_hyperdrive(b: ProxyBench) -> dict[str, Any]:
    args = b.args
    fport = b.start_forwarder()
    t0 = time.monotonic()
    far_dsn = b.create_config("pb-far", "--origin-host", HOST, "--origin-port", str(fport))
    log(f"config pb-far created (its origin check through the forwarder took {time.monotonic() - t0:.2f}s)")
    dsns = {
        "far_direct": b.direct_dsn(fport),
        "far_proxy": far_dsn,
        "local_proxy": b.targets["proxy"]["dsn"] if "proxy" in b.targets else None,
        "local_direct": b.direct_dsn(b.cluster.port),
        "local_pgbouncer": b.direct_dsn(b.bouncer.port) if b.bouncer is not None else None,
        "far_direct_tx": b.direct_dsn(fport),
        "far_proxy_tx": far_dsn,
    }
    dsns = {k: v for k, v in dsns.items() if v}
    autocommit = {k: not k.endswith("_tx") for k in dsns}
    order = list(dsns)
    spec = {"dsns": dsns, "autocommit": autocommit, "order": order, "count": args.connects,
            "warm": ["far_proxy"] + [k for k in ("local_proxy", "local_pgbouncer") if k in dsns]}
    timeout = 60.0 + args.connects * len(order) * 20.0
    before = b.stack.tracked.snapshot()
    try:
        r = subprocess.run([sys.executable, "-m", "bench.proxy_bench", "--probe"], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=timeout, env=base_env(), cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        raise BenchError(f"the connect probe did not finish within {timeout:.0f}s") from None
    after = b.stack.tracked.snapshot()
    if r.returncode != 0:
        raise BenchError(f"connect probe failed ({r.returncode}):\n{r.stderr[-2000:]}")
    data = json.loads(r.stdout)
    cpu = cpu_delta(before, after)
    cpu["cpu_s"]["probe"] = cpu.pop("reaped_children_cpu_s")
    out: dict[str, Any] = {"delay_ms_one_way": args.delay_ms, "rtt_ms": 2 * args.delay_ms,
                           "tcp_handshake_simulated": True, "count": args.connects, "cases": {}, "cpu": cpu,
                           "errors": data.get("errors", {})}
    for name, ms in data["ms"].items():
        out["cases"][name] = {"ms": ms, "n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
                              "mean_ms": round(sum(ms) / len(ms), 3) if ms else None,
                              "autocommit": autocommit[name]}
    a, bb = out["cases"].get("far_direct", {}), out["cases"].get("far_proxy", {})
    if a.get("p50_ms") and bb.get("p50_ms"):
        out["speedup_p50"] = round(a["p50_ms"] / bb["p50_ms"], 2)
        out["speedup_p99"] = round(a["p99_ms"] / bb["p99_ms"], 2)
        out["target"] = f">= {HYPERDRIVE_GOAL:g}x (p50)"
        out["pass"] = out["speedup_p50"] >= HYPERDRIVE_GOAL
    at, bt = out["cases"].get("far_direct_tx", {}), out["cases"].get("far_proxy_tx", {})
    if at.get("p50_ms") and bt.get("p50_ms"):
        out["speedup_p50_tx"] = round(at["p50_ms"] / bt["p50_ms"], 2)
    log("connect + first query p50: " + ", ".join(f"{k}={v['p50_ms']:.1f} ms" for k, v in out["cases"].items()
                                                 if v.get("p50_ms") is not None))
    return out


# ------------------------------------------------------------------------------ report


def print_report(res: dict[str, Any]) -> None:
    P = lambda *a: print(*a, flush=True)  # noqa: E731
    cfg = res["config"]
    targets = res["targets_measured"]
    m = res["machine"]
    P()
    P(f"Proxy benchmark — {res['timestamp']} — {m['nproc']} CPUs ({m.get('cpu_model')}), Python {m['python']}, "
      f"{m.get('pgbouncer_version', 'no pgbouncer')}" + ("  [QUICK]" if cfg["quick"] else ""))
    P(f"pgbench -n -S, {cfg['duration']:g} s per cell, scale {cfg['scale']}, pool {POOL} everywhere, TLS + SCRAM "
      f"everywhere" + (f", median of {cfg['repeat']} runs" if cfg["repeat"] > 1 else ""))
    for t in targets:
        P(f"  {LABELS[t]:<11} {DESCRIPTIONS[t]}")
    for n in res.get("notes", []):
        P(f"  note: {n}")
    rows = res.get("pgbench", {}).get("rows", [])
    if rows:
        w = 10
        P()
        P("tps (avg latency ms)")
        P(f"{'mode':<9}{'c':>3} " + "".join(f"{LABELS[t]:>{w + 10}}" for t in targets))
        P("-" * (12 + (w + 10) * len(targets)))
        for r in rows:
            cells = []
            for t in targets:
                tps = r["tps"].get(t)
                lat = r["latency_avg_ms"].get(t)
                mark = "ext " if (t == "pgbouncer" and r["mode"] == "prepared"
                                  and not res.get("pgbouncer", {}).get("supports_prepared", True)) else ""
                cells.append(f"{mark}{fmt_num(tps)} ({fmt_num(lat, 3)})" if tps is not None else "error")
            P(f"{r['mode']:<9}{r['clients']:>3} " + "".join(f"{c:>{w + 10}}" for c in cells))
        P()
        P("ratios (tps) and targets: proxy ≥ 0.6× PgBouncer, tunnel ≥ 0.3× PgBouncer")
        prox = [t for t in targets if t in GOALS]
        hdr = f"{'mode':<9}{'c':>3} {'PgB/direct':>11}"
        for t in prox:
            hdr += f" {LABELS[t] + '/PgB':>15} {LABELS[t] + '/dir':>15} {'':>5}"
        P(hdr)
        P("-" * len(hdr))
        for r in rows:
            line = f"{r['mode']:<9}{r['clients']:>3} {fmt_num(r['vs_direct'].get('pgbouncer'), 2, '×'):>11}"
            for t in prox:
                v = r["verdict"].get(t)
                line += (f" {fmt_num(r['vs_pgbouncer'].get(t), 2, '×'):>15} {fmt_num(r['vs_direct'].get(t), 2, '×'):>15}"
                         f" {v or '—':>5}")
            P(line)
        s = res.get("summary", {})
        P()
        for t in prox:
            if t in s.get("pgbench", {}):
                x = s["pgbench"][t]
                P(f"  {LABELS[t]:<11} ≥ {GOALS[t]:g}× PgBouncer: {x['pass_rows']}/{x['rows']} rows PASS"
                  f" (ratio {x['min_ratio']:.2f}–{x['max_ratio']:.2f})")
    hd = res.get("hyperdrive")
    if hd:
        P()
        P(f"connect + first query (psycopg), origin {hd['rtt_ms']:g} ms RTT away (delay_forwarder, TCP handshake "
          f"simulated), {hd['count']} samples each, interleaved")
        P(f"{'case':<52} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'n':>4}")
        P("-" * 87)
        names = {"far_direct": "(a) direct to the far origin, autocommit",
                 "far_proxy": "(b) proxy (warm pool) → far origin, autocommit",
                 "local_proxy": "    proxy (warm pool) → local origin",
                 "local_pgbouncer": "    PgBouncer (warm pool) → local origin",
                 "local_direct": "    direct to the local origin (no delay)",
                 "far_direct_tx": "    direct to the far origin, default (BEGIN; select)",
                 "far_proxy_tx": "    proxy → far origin, default (BEGIN; select)"}
        for k, label in names.items():
            c = hd["cases"].get(k)
            if c:
                P(f"{label:<52} {fmt_num(c['p50_ms'], 1):>9} {fmt_num(c['p99_ms'], 1):>9} {fmt_num(c['mean_ms'], 1):>9} {c['n']:>4}")
        if "speedup_p50" in hd:
            P(f"speed-up (a)/(b): p50 {hd['speedup_p50']:.2f}×, p99 {hd['speedup_p99']:.2f}× — target ≥ "
              f"{HYPERDRIVE_GOAL:g}× — {'PASS' if hd['pass'] else 'MISS'}"
              + (f"; default mode p50 {hd['speedup_p50_tx']:.2f}×" if "speedup_p50_tx" in hd else ""))
        for k, e in hd.get("errors", {}).items():
            P(f"  errors in {k}: {e}")
    cells = res.get("pgbench", {}).get("cells", [])
    if cells:
        names: list[str] = []
        for c in cells:
            for n in c["cpu"].get("cost", {}):
                if n not in names:
                    names.append(n)
        order = [n for n in ("pgbench", "postgres", "pgbouncer", "edge", "connector", "connector-ha1", "forwarder")
                 if n in names]
        P()
        P("CPU µs per transaction per process (median-run cells); other = box CPU not charged to these processes,")
        P("in % of the cell's wall time × CPUs (large = something else loaded the box)")
        cw = 9
        short = {"connector": "conn", "connector-ha1": "conn-ha1", "pgbouncer": "pgbouncer"}
        P(f"{'cell':<26}" + "".join(f"{short.get(n, n)[:cw]:>{cw + 1}}" for n in order) + f"{'other %':>{cw + 1}}")
        for key in res["pgbench"]["median_keys"]:
            c = next((x for x in cells if x.get("tag_key") == key), None)
            if not c or "cost" not in c["cpu"]:
                continue
            cost = c["cpu"]["cost"]
            other = 100.0 * c["cpu"]["box_other_cpu_s"] / max(1e-9, c["cpu"]["wall_s"] * (m["nproc"] or 1))
            P(f"{key:<26}" + "".join(f"{fmt_num(cost.get(n), 0):>{cw + 1}}" for n in order) + f"{other:>{cw}.0f}%")
    P()
    P(f"JSON: {res['json_path']}")


def summarize(res: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"pgbench": {}}
    for t, goal in GOALS.items():
        ratios = [r["vs_pgbouncer"][t] for r in rows if t in r["vs_pgbouncer"]]
        verdicts = [r["verdict"].get(t) for r in rows if r["verdict"].get(t)]
        if ratios:
            s["pgbench"][t] = {"goal": goal, "rows": len(verdicts), "pass_rows": verdicts.count("PASS"),
                               "min_ratio": min(ratios), "max_ratio": max(ratios), "all_pass": all(
                                   v == "PASS" for v in verdicts)}
    hd = res.get("hyperdrive")
    if hd and "pass" in hd:
        s["hyperdrive"] = {"speedup_p50": hd["speedup_p50"], "goal": HYPERDRIVE_GOAL, "pass": hd["pass"]}
    return s


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = pgbench_arg_parser("bench.proxy_bench", __doc__, quick_duration=2.0, scale=10,
                            quick_help="smoke run: 2 s cells, clients 1 and 16, no ha1 tunnel, 5 connects")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=None,
                    help=f"subset of {','.join(ALL_TARGETS)} (default all; quick: no tunnel-ha1)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is reported (default 1)")
    ap.add_argument("--connects", type=int, default=None, help="connect + first query samples per case "
                                                                "(default 20; quick 5)")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay to the far origin (default 25)")
    ap.add_argument("--no-pgbench", action="store_true", help="skip part 1 (throughput)")
    ap.add_argument("--no-hyperdrive", action="store_true", help="skip part 2 (connect + first query)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy samples hd edge and the connectors during every proxy/tunnel cell (raw stacks "
                         "and a summary in DIR; figures are then a little lower: py-spy uses CPU too)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = pgbench_arg_defaults(ap, ap.parse_args(argv))
    q = a.quick
    if a.targets is None:
        a.targets = [t for t in ALL_TARGETS if not (q and t == "tunnel-ha1")]
    bad = [t for t in a.targets if t not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {ALL_TARGETS}")
    if "direct" not in a.targets:
        a.targets = ["direct", *a.targets]
    a.targets = [t for t in ALL_TARGETS if t in a.targets]
    if a.connects is None:
        a.connects = 5 if q else 20
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe_main()

    def body(b: ProxyBench, res: dict[str, Any]) -> None:
        if args.profile is not None:
            b.stack.profiler = Profiler(args.profile)
        b.setup()
        res["targets_measured"] = list(b.targets)
        res["pids"] = {n: pid for n, (pid, _) in b.stack.tracked.procs.items()}
        res["machine"]["uvloop_in_process"] = {n: uses_uvloop(pid) for n, pid in res["pids"].items()}
        if b.bouncer is not None:
            res["pgbouncer"] = b.bouncer.describe()
        if not args.no_pgbench:
            cells = measure_pgbench(b)
            med = median_cells(cells)
            for key, c in med.items():
                c["tag_key"] = f"{key[0]}/{key[1]}/c{key[2]}"
            rows = rows_with_verdicts(b, med)
            keys = [f"{t}/{mode}/c{c}" for mode in args.modes for c in args.clients for t in b.targets]
            res["pgbench"] = {"rows": rows, "cells": list(med.values()), "all_runs": cells if args.repeat > 1 else [],
                              "median_keys": keys}
        if not args.no_hyperdrive:
            res["hyperdrive"] = measure_hyperdrive(b)
        res["notes"] = b.notes
        res["summary"] = summarize(res, res.get("pgbench", {}).get("rows", []))

    def finish(b: ProxyBench, res: dict[str, Any], ok: bool) -> None:
        if b.stack.profiler is not None and ok:
            summaries = {}
            texts = []
            for phase, name, path in b.stack.profiler.files:
                s = summarize_raw_profile(path)
                if s:
                    summaries[f"{phase}/{name}"] = s
                    texts.append(format_profile_summary(f"{phase} / {name}", s))
            (args.profile / "summary.txt").write_text("\n\n".join(texts) + "\n")
            res["profile"] = {"dir": str(args.profile), "summaries": summaries}

    def report(res: dict[str, Any]) -> None:
        print_report(res)
        if args.profile is not None:
            print(f"py-spy summaries (product functions by inclusive time) in {args.profile}/summary.txt")

    return run_bench("bench.proxy_bench", args, argv, ProxyBench, body, report, finish=finish,
                     header={"goals": {"tps_vs_pgbouncer": GOALS, "hyperdrive_speedup_p50": HYPERDRIVE_GOAL},
                             "descriptions": DESCRIPTIONS})


if __name__ == "__main__":
    sys.exit(main())
