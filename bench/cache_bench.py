"""Query cache benchmark: cache hits of the proxy in `hd edge` against PostgreSQL directly and PgBouncer.

    .venv/bin/python -m bench.cache_bench            # full run (~7 min) → bench/results/cache.json
    .venv/bin/python -m bench.cache_bench --quick    # smoke run (~2 min) → bench/results/cache-quick.json

Everything runs on 127.0.0.1, each part in its own OS process, started and stopped here; every hop is
TLS + SCRAM:

    pgbench ──TLS──────────────────────────────────────────────> postgres   direct
    pgbench ──TLS──> pgbouncer (transaction, pool 20) ──TLS──────> postgres   PgBouncer
    pgbench ──TLS──> hd edge (proxy, pool 20, cache off) ──TLS───> postgres   cache off  (config cb-nocache)
    pgbench ──TLS──> hd edge (proxy, pool 20, cache on) ──TLS────> postgres   cache on   (config cb-cache)

* postgres   tests/harness/pg.py PgCluster: scram-sha-256, TLS on, shared_buffers 256MB; user and
             database `bench`; `pgbench -i -s 1` by default: 100,000 accounts, so the whole key space of
             `pgbench -S` fits the cache (~200,000 entries, simple and prepared keys differ).
* pgbouncer  transaction pooling, default_pool_size 20 (bench.common.PgBouncer). 1.18 (Debian 12) cannot
             run `-M prepared` in transaction mode: its prepared rows run `-M extended` (marked `ext`).
* hd edge    configs made with the CLI, `--origin-connection-limit 20`: `cb-nocache`
             (`--caching-disabled true`) and `cb-cache` (`--max-age 3600 --swr 15`: max_age at its
             maximum, so no entry expires during the run).

Part 1, cache-hit latency: a pgbench script with ONE fixed key
(`SELECT abalance FROM pgbench_accounts WHERE aid = 42;`), so through cb-cache every query after the
first is a hit; `-c 1`, `-M simple` and `-M prepared`, per-transaction latency logs (`pgbench -l`)
→ p50 / p99 / mean per target, --duration seconds each after an untimed warm-up. Target (issue 5):
a hit is faster than going to the database directly (hit p50 / direct p50 < 1). The hit ratio of
the timed run comes from `hd hyperdrive metrics cb-cache --json` deltas.

Part 2, throughput: `pgbench -n -S -M simple|prepared -c 1|16|64` (`-j 2` above one client) for every
target, --duration seconds per cell. Before each protocol's cells the cache is warmed by untimed
`pgbench -S -c 16` runs until one run's hit ratio (metrics deltas) is ≥ 0.98 or --warm-cap seconds
have passed; every cb-cache cell reports the hit ratio measured during it. tps and average latency;
target (issue 5): cache on ≥ 1.5 × PgBouncer, PASS/MISS per row; cache on / direct and cache off /
PgBouncer for context. CPU µs per transaction per process, as proxy_bench.

Exit status 0 when the run completed (a missed target is reported, not a failure).
"""

from __future__ import annotations

import argparse
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
    fmt_num,
    log,
    percentile,
    pgbench_arg_defaults,
    pgbench_arg_parser,
    run_bench,
    run_pgbench,
    uses_uvloop,
)

TARGETS = ("direct", "pgbouncer", "nocache", "cache")
LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "nocache": "cache off", "cache": "cache on"}
CONFIGS = {"nocache": "cb-nocache", "cache": "cb-cache"}
MAX_AGE = 3600  # the CLI's maximum: no entry expires during a run
SWR = 15
DESCRIPTIONS = {
    "direct": "pgbench → postgres (TLS, SCRAM)",
    "pgbouncer": f"pgbench → PgBouncer (TLS, SCRAM, transaction pool {POOL}) → postgres (TLS)",
    "nocache": f"pgbench → hd edge proxy → postgres, config cb-nocache (--caching-disabled true, pool {POOL})",
    "cache": f"pgbench → hd edge proxy → postgres, config cb-cache (--max-age {MAX_AGE} --swr {SWR}, pool {POOL})",
}
HIT_KEY = 42
HIT_SQL = f"SELECT abalance FROM pgbench_accounts WHERE aid = {HIT_KEY};\n"
# A read a little more like an application's: 100 rows by range (an index range scan at the origin).
RANGE_SQL = "SELECT aid, bid, abalance FROM pgbench_accounts WHERE aid BETWEEN 1001 AND 1100;\n"
HIT_GOAL = 1.0  # hit p50 / direct p50 must be below this
TPS_GOAL = 1.5  # cache-on tps / PgBouncer tps (issue 5)
WARM_RATIO = 0.98  # a warm-up run's hit ratio that ends the cache warm-up
WARM_CLIENTS = 16
PRODUCT = ("edge",)


# ------------------------------------------------------------------------------ set-up


class CacheBench(PgTargets):
    def setup(self) -> None:
        self.start_postgres()
        self.targets["direct"] = {"dsn": self.direct_dsn(self.cluster.port)}
        self.start_pgbouncer()
        self.start_edge()
        origin = ("--origin-host", HOST, "--origin-port", str(self.cluster.port))
        self.targets["nocache"] = {"dsn": self.create_config(CONFIGS["nocache"], *origin)}
        self.targets["cache"] = {"dsn": self.create_config(CONFIGS["cache"], *origin,
                                                           caching=("--max-age", str(MAX_AGE), "--swr", str(SWR)))}
        for t, name in CONFIGS.items():
            c = self.hd("hyperdrive", "get", name, "--json")
            self.targets[t]["caching"] = c.get("caching")
        if self.targets["cache"]["caching"].get("disabled"):
            raise BenchError(f"config cb-cache has caching off: {self.targets['cache']['caching']}")
        self.targets = {t: self.targets[t] for t in TARGETS}

    def metrics(self, target: str = "cache") -> dict[str, Any]:
        """`hd hyperdrive metrics` of a config: everything retained (24 h), so deltas are exact."""
        return self.hd("hyperdrive", "metrics", CONFIGS[target], "--since", "24h", "--json")


def cache_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Queries by cache status between two metrics snapshots, hit ratio = hit / (hit + miss)."""
    a, b = before["queries"]["by_cache_status"], after["queries"]["by_cache_status"]
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) - a.get(k, 0)}
    hits, misses = d.get("hit", 0), d.get("miss", 0)
    return {"by_cache_status": d, "queries": sum(d.values()),
            "hit_ratio": round(hits / (hits + misses), 5) if hits + misses else None,
            "entries_after": (after.get("cache") or {}).get("entries"),
            "cache_bytes_after": (after.get("cache") or {}).get("process_bytes")}


def run_cell(b: CacheBench, target: str, mode: str, clients: int, duration: float, tag: str | None = None,
             **kw: Any) -> dict[str, Any]:
    """run_pgbench, plus the cache statuses of the run from metrics deltas for cb-cache."""
    before = b.metrics() if target == "cache" else None
    r = run_pgbench(b, target, mode, clients, duration, tag, profile=PRODUCT if target in CONFIGS else (), **kw)
    if before is not None:
        r["cache"] = cache_delta(before, b.metrics())
        if tag:
            log(f"{tag}: hit ratio {fmt_num(r['cache']['hit_ratio'], 4)} of {r['cache']['queries']:,} queries")
    return r


# ------------------------------------------------------------------------------ part 1: hit latency


def read_latency_log(prefix: Path) -> list[int]:
    """Per-transaction latencies (µs) from `pgbench -l --log-prefix PREFIX` files (PREFIX.PID[.THREAD]):
    lines `client_id transaction_no time_us script_no time_epoch time_us_part`, the 3rd field is
    the transaction's latency."""
    out: list[int] = []
    for f in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                out.append(int(parts[2]))
    return out


def latency_summary(us: list[int]) -> dict[str, Any]:
    """Percentiles of the logged latencies. pgbench 15 reads its clock lazily: on a loaded box a
    transaction whose answer is already there when it looks logs 0 µs (seen for direct and cache
    alike, from some point of a run on). Those are not latencies: they are left out and counted."""
    zeros = sum(1 for x in us if x <= 0)
    us = [x for x in us if x > 0]
    if not us:
        return {"n": 0, "zero_us": zeros}
    return {"n": len(us), "p50_us": percentile(us, 50), "p90_us": percentile(us, 90), "p99_us": percentile(us, 99),
            "p999_us": percentile(us, 99.9), "mean_us": round(sum(us) / len(us), 1), "min_us": min(us),
            "max_us": max(us), "zero_us": zeros}


def measure_hits(b: CacheBench, sql: str = HIT_SQL, name: str = "hit") -> dict[str, Any]:
    args = b.args
    script = b.workdir / f"{name}.sql"
    script.write_text(sql)
    logdir = b.workdir / "latency"
    logdir.mkdir(exist_ok=True)
    cells: list[dict[str, Any]] = []
    for mode in args.modes:
        for target in b.targets:
            w = run_cell(b, target, mode, 1, args.hit_warmup, extra=["-f", str(script)], select_only=False)
            if "error" in w:
                log(f"hit warm-up of {target} {mode} failed; the measured run will show it")
            prefix = logdir / f"{name}-{target}-{mode}"
            tag = f"{name}-{target}-{mode}"
            r = run_cell(b, target, mode, 1, args.duration, tag, select_only=False,
                         extra=["-f", str(script), "-l", f"--log-prefix={prefix}"])
            r["latency"] = latency_summary(read_latency_log(prefix))
            if not args.keep:
                for f in logdir.glob(prefix.name + ".*"):
                    f.unlink()
            lat = r["latency"]
            if lat["n"]:
                log(f"{tag}: p50 {lat['p50_us']:.0f} µs, p99 {lat['p99_us']:.0f} µs, mean {lat['mean_us']:.0f} µs "
                    f"({lat['n']:,} transactions)")
            if lat["zero_us"]:
                log(f"{tag}: pgbench logged 0 µs for {lat['zero_us']:,} transactions (its lazy clock on a busy "
                    "box): left out of the percentiles")
            cells.append(r)
    summary: dict[str, Any] = {}
    for mode in args.modes:
        by = {c["target"]: c for c in cells if c["mode"] == mode}
        d = by.get("direct", {}).get("latency", {}).get("p50_us")
        s: dict[str, Any] = {"p50_us": {t: c["latency"].get("p50_us") for t, c in by.items()},
                             "p99_us": {t: c["latency"].get("p99_us") for t, c in by.items()}}
        h = s["p50_us"].get("cache")
        if d and h:
            s["ratio_p50"] = round(h / d, 3)
            s["ratio_p99"] = round(s["p99_us"]["cache"] / by["direct"]["latency"]["p99_us"], 3)
            s["pass"] = s["ratio_p50"] < HIT_GOAL
        s["hit_ratio"] = by.get("cache", {}).get("cache", {}).get("hit_ratio")
        summary[mode] = s
    return {"sql": sql.strip(), "clients": 1, "duration_s": args.duration, "warmup_s": args.hit_warmup,
            "cells": cells, "summary": summary}


# ------------------------------------------------------------------------------ part 2: pgbench -S


def warm_cache(b: CacheBench, mode: str) -> dict[str, Any]:
    """Untimed `pgbench -S -c 16` runs through cb-cache until one run's hit ratio is ≥ WARM_RATIO or
    the cap is reached (coupon collector: ~4-5 × the number of keys queries give ≥ 98 %)."""
    args = b.args
    runs: list[dict[str, Any]] = []
    spent = 0.0
    t0 = time.monotonic()
    while True:
        chunk = min(args.warm_chunk, max(1.0, args.warm_cap - spent))
        r = run_cell(b, "cache", mode, WARM_CLIENTS, chunk)
        spent += chunk
        c = r.get("cache", {})
        runs.append({"seconds": chunk, "transactions": r.get("transactions"), "tps": r.get("tps"),
                     "hit_ratio": c.get("hit_ratio"), "by_cache_status": c.get("by_cache_status"),
                     "entries_after": c.get("entries_after"), "error": r.get("error")})
        log(f"cache warm-up {mode}: {spent:.0f} s, run hit ratio {fmt_num(c.get('hit_ratio'), 4)}, "
            f"{c.get('entries_after')} entries")
        if "error" in r or (c.get("hit_ratio") or 0) >= WARM_RATIO or spent >= args.warm_cap:
            break
    last = runs[-1]
    return {"mode": mode, "clients": WARM_CLIENTS, "pgbench_seconds": spent, "wall_s": round(time.monotonic() - t0, 1),
            "queries": sum(x["transactions"] or 0 for x in runs), "last_run_hit_ratio": last["hit_ratio"],
            "reached": (last["hit_ratio"] or 0) >= WARM_RATIO, "entries": last["entries_after"], "runs": runs}


def measure_pgbench(b: CacheBench) -> dict[str, Any]:
    args = b.args
    targets = list(b.targets)
    cells: list[dict[str, Any]] = []
    warmups: dict[str, Any] = {}
    for mode in args.modes:
        log(f"warm-up {mode}: fill the pools, prepare statements (untimed)")
        for target in targets:
            if target != "cache":
                r = run_cell(b, target, mode, max(args.clients), 1.0)
                if "error" in r:
                    log(f"warm-up of {target} {mode} failed; the measured runs will show it")
        warmups[mode] = warm_cache(b, mode)
        for clients in args.clients:
            for i in range(len(targets)):
                # rotate the order per cell so no target always runs first
                target = targets[(i + len(cells) // len(targets)) % len(targets)]
                cells.append(run_cell(b, target, mode, clients, args.duration, f"{target}-{mode}-c{clients}"))
    rows = []
    for mode in args.modes:
        for clients in args.clients:
            by = {c["target"]: c for c in cells if c["mode"] == mode and c["clients"] == clients}
            row: dict[str, Any] = {"mode": mode, "clients": clients, "tps": {}, "latency_avg_ms": {}}
            for t, c in by.items():
                if "tps" in c and "error" not in c:
                    row["tps"][t] = c["tps"]
                    row["latency_avg_ms"][t] = c.get("latency_avg_ms")
            tps = row["tps"]

            def ratio(a: str, b_: str) -> float | None:
                return round(tps[a] / tps[b_], 3) if tps.get(a) and tps.get(b_) else None

            row["cache_vs_pgbouncer"] = ratio("cache", "pgbouncer")
            row["cache_vs_direct"] = ratio("cache", "direct")
            row["cache_vs_nocache"] = ratio("cache", "nocache")
            row["nocache_vs_pgbouncer"] = ratio("nocache", "pgbouncer")
            row["pgbouncer_vs_direct"] = ratio("pgbouncer", "direct")
            v = row["cache_vs_pgbouncer"]
            row["verdict"] = None if v is None else ("PASS" if v >= TPS_GOAL else "MISS")
            row["hit_ratio"] = by.get("cache", {}).get("cache", {}).get("hit_ratio")
            rows.append(row)
    keys = [(t, mode, c) for mode in args.modes for c in args.clients for t in targets]
    return {"rows": rows, "cells": cells, "warmup": warmups,
            "cell_order": [f"{t}/{m}/c{c}" for t, m, c in keys]}


# ------------------------------------------------------------------------------ report


def _ext(res: dict[str, Any], target: str, mode: str) -> str:
    return "ext " if (target == "pgbouncer" and mode == "prepared"
                      and not res.get("pgbouncer", {}).get("supports_prepared", True)) else ""


def _cpu_table(P: Any, res: dict[str, Any], cells: list[dict[str, Any]], key: Any) -> None:
    nproc = res["machine"]["nproc"] or 1
    order = [n for n in ("pgbench", "postgres", "pgbouncer", "edge") if any(n in c["cpu"].get("cost", {}) for c in cells)]
    P(f"{'cell':<28}" + "".join(f"{n:>10}" for n in order) + f"{'other %':>10}")
    modes = res["config"]["modes"]
    for c in sorted(cells, key=lambda c: (modes.index(c["mode"]), c["clients"], TARGETS.index(c["target"]))):
        if "cost" not in c["cpu"]:
            continue
        cost = c["cpu"]["cost"]
        other = 100.0 * c["cpu"]["box_other_cpu_s"] / max(1e-9, c["cpu"]["wall_s"] * nproc)
        P(f"{key(c):<28}" + "".join(f"{fmt_num(cost.get(n), 0):>10}" for n in order) + f"{other:>9.0f}%")


def _print_hits(P: Any, res: dict[str, Any], hits: dict[str, Any], what: str) -> None:
    cfg = res["config"]
    P()
    P(f"Part 1 — cache-hit latency: `{hits['sql']}` ({what}), pgbench -c 1, {hits['duration_s']:g} s per "
      f"cell after {hits['warmup_s']:g} s untimed; per-transaction latency (pgbench -l), µs")
    P(f"{'mode':<9}{'target':<14}{'p50':>8}{'p99':>8}{'mean':>8}{'tps':>9}  {'vs direct p50':>13}  hit ratio")
    P("-" * 96)
    for mode in cfg["modes"]:
        d = hits["summary"][mode]["p50_us"].get("direct")
        for c in (x for x in hits["cells"] if x["mode"] == mode):
            lat = c["latency"]
            hr = c.get("cache", {})
            hit_txt = (f"{100 * hr['hit_ratio']:.2f}% ({hr['by_cache_status'].get('hit', 0):,} hits / "
                       f"{hr['queries']:,})") if hr.get("hit_ratio") is not None else ""
            rel = fmt_num(lat["p50_us"] / d, 2, "×") if d and lat.get("p50_us") else "—"
            P(f"{mode:<9}{_ext(res, c['target'], mode) + LABELS[c['target']]:<14}{fmt_num(lat.get('p50_us')):>8}"
              f"{fmt_num(lat.get('p99_us')):>8}{fmt_num(lat.get('mean_us')):>8}{fmt_num(c.get('tps')):>9}"
              f"  {rel:>13}  {hit_txt}")
    P()
    for mode in cfg["modes"]:
        s = hits["summary"][mode]
        if "ratio_p50" in s:
            P(f"  {mode:<9} hit p50 / direct p50 = {s['ratio_p50']:.2f}× (p99 {s['ratio_p99']:.2f}×) — target < 1 "
              f"(a hit is faster than the database directly) — {'PASS' if s['pass'] else 'MISS'}")


def print_report(res: dict[str, Any]) -> None:
    P = lambda *a: print(*a, flush=True)  # noqa: E731
    cfg = res["config"]
    m = res["machine"]
    P()
    P(f"Query cache benchmark — {res['timestamp']} — {m['nproc']} CPUs ({m.get('cpu_model')}), Python "
      f"{m['python']}, {m.get('postgres_version', 'postgres ?')}, {m.get('pgbouncer_version', 'no pgbouncer')}"
      + ("  [QUICK]" if cfg["quick"] else ""))
    P(f"pgbench -i -s {cfg['scale']}: {100000 * cfg['scale']:,} accounts, {cfg['duration']:g} s per cell, pool {POOL} "
      "everywhere, TLS + SCRAM on every hop")
    fit = res.get("cache_at_end") or {}
    if fit:
        P(f"  the whole key space fits the cache: {fit['fits']} (cb-cache at the end: {fmt_num(fit['entries'])} entries, "
          f"{fit['bytes'] / 2**20:.0f} MiB of the edge's {fit['max_bytes'] / 2**20:.0f} MiB cache; "
          f"{fit['stored_not_held']} stored entries evicted or replaced)")
    for t in TARGETS:
        P(f"  {LABELS[t]:<10} {DESCRIPTIONS[t]}")
    P(f"  cb-cache max_age {MAX_AGE} s is the maximum: no entry expires during the run")
    for n in res.get("notes", []):
        P(f"  note: {n}")
    for key, what in (("hit_latency", "one fixed key"), ("hit_latency_range", "100 rows by range")):
        if res.get(key):
            _print_hits(P, res, res[key], what)
    pg = res.get("pgbench")
    if pg:
        P()
        P(f"Part 2 — pgbench -n -S, {cfg['duration']:g} s per cell: tps (avg latency ms); hit ratio of the cache-on "
          "cell from metrics deltas")
        for mode, w in pg["warmup"].items():
            P(f"  cache warm-up {mode}: {w['pgbench_seconds']:g} s of pgbench -S -c {w['clients']} ({w['queries']:,} "
              f"queries), last run's hit ratio {fmt_num(w['last_run_hit_ratio'], 4)}"
              f"{'' if w['reached'] else f' (cap reached before {WARM_RATIO})'}, {fmt_num(w['entries'])} entries")
        P(f"{'mode':<9}{'c':>3} " + "".join(f"{LABELS[t]:>20}" for t in TARGETS) + f"{'hit ratio':>11}")
        P("-" * 104)
        for r in pg["rows"]:
            cells = [f"{_ext(res, t, r['mode'])}{fmt_num(r['tps'].get(t))} ({fmt_num(r['latency_avg_ms'].get(t), 3)})"
                     if r["tps"].get(t) is not None else "error" for t in TARGETS]
            hr = r.get("hit_ratio")
            P(f"{r['mode']:<9}{r['clients']:>3} " + "".join(f"{c:>20}" for c in cells)
              + f"{(fmt_num(100 * hr, 2, '%') if hr is not None else '—'):>11}")
        P()
        P(f"ratios (tps); target: cache on ≥ {TPS_GOAL:g}× PgBouncer")
        hdr = f"{'mode':<9}{'c':>3} {'on/PgB':>8} {'':>5} {'on/direct':>10} {'on/off':>8} {'off/PgB':>8} {'PgB/direct':>11}"
        P(hdr)
        P("-" * len(hdr))
        for r in pg["rows"]:
            P(f"{r['mode']:<9}{r['clients']:>3} {fmt_num(r['cache_vs_pgbouncer'], 2, '×'):>8} {r['verdict'] or '—':>5}"
              f" {fmt_num(r['cache_vs_direct'], 2, '×'):>10} {fmt_num(r['cache_vs_nocache'], 2, '×'):>8}"
              f" {fmt_num(r['nocache_vs_pgbouncer'], 2, '×'):>8} {fmt_num(r['pgbouncer_vs_direct'], 2, '×'):>11}")
        s = res["summary"].get("pgbench")
        if s:
            P(f"  cache on ≥ {TPS_GOAL:g}× PgBouncer: {s['pass_rows']}/{s['rows']} rows PASS "
              f"(ratio {s['min_ratio']:.2f}–{s['max_ratio']:.2f})")
    P()
    P("CPU µs per transaction per process; other = box CPU not charged to these processes, in % of the cell's")
    P("wall time × CPUs (large = something else loaded the box)")
    for key, name in (("hit_latency", "hit"), ("hit_latency_range", "range")):
        if res.get(key):
            P(f"part 1 ({'one fixed key' if name == 'hit' else '100 rows by range'}, -c 1):")
            _cpu_table(P, res, res[key]["cells"], lambda c, name=name: f"{name}/{c['target']}/{c['mode']}")
    if pg:
        P("part 2 (pgbench -S):")
        _cpu_table(P, res, pg["cells"], lambda c: f"{c['target']}/{c['mode']}/c{c['clients']}")
    P()
    P(f"JSON: {res['json_path']}")


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if "hit_latency" in res:
        for key in ("hit_latency", "hit_latency_range"):
            if key in res:
                s[key] = {mode: {k: v for k, v in x.items() if k in ("ratio_p50", "ratio_p99", "pass", "hit_ratio")}
                          | {"p50_us": x["p50_us"]} for mode, x in res[key]["summary"].items()}
    rows = res.get("pgbench", {}).get("rows", [])
    ratios = [r["cache_vs_pgbouncer"] for r in rows if r["cache_vs_pgbouncer"] is not None]
    if ratios:
        verdicts = [r["verdict"] for r in rows if r["verdict"]]
        s["pgbench"] = {"goal": TPS_GOAL, "rows": len(verdicts), "pass_rows": verdicts.count("PASS"),
                        "min_ratio": min(ratios), "max_ratio": max(ratios),
                        "tps_cache": {f"{r['mode']}/c{r['clients']}": r["tps"].get("cache") for r in rows},
                        "hit_ratios": {f"{r['mode']}/c{r['clients']}": r["hit_ratio"] for r in rows}}
    return s


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = pgbench_arg_parser("bench.cache_bench", __doc__, quick_duration=3.0, scale=1,
                            quick_help="smoke run: 3 s cells, clients 1 and 16, a few seconds of cache warm-up")
    ap.add_argument("--warm-cap", type=float, default=None,
                    help="at most this many seconds of cache warm-up per protocol (default 60; quick 4)")
    ap.add_argument("--no-hits", action="store_true", help="skip part 1 (hit latency)")
    ap.add_argument("--no-pgbench", action="store_true", help="skip part 2 (throughput)")
    a = pgbench_arg_defaults(ap, ap.parse_args(argv))
    q = a.quick
    if a.warm_cap is None:
        a.warm_cap = 4.0 if q else 60.0
    a.warm_chunk = 2.0 if q else 5.0
    a.hit_warmup = 1.0 if q else 2.0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(b: CacheBench, res: dict[str, Any]) -> None:
        b.setup()
        res["targets_measured"] = list(b.targets)
        res["configs"] = {CONFIGS[t]: b.targets[t].get("caching") for t in CONFIGS}
        res["pids"] = {n: pid for n, (pid, _) in b.stack.tracked.procs.items()}
        res["machine"]["uvloop_in_process"] = {n: uses_uvloop(pid) for n, pid in res["pids"].items()}
        res["pgbouncer"] = b.bouncer.describe() if b.bouncer is not None else None
        if not args.no_hits:
            res["hit_latency"] = measure_hits(b)
            res["hit_latency_range"] = measure_hits(b, RANGE_SQL, "range")
        if not args.no_pgbench:
            res["pgbench"] = measure_pgbench(b)
        final = b.metrics()
        res["metrics_at_end"] = {"cb-cache": final, "cb-nocache": b.metrics("nocache")}
        cache = final.get("cache") or {}
        # stored but no longer held: evicted (LRU over max_bytes) or replaced by a later store of its key
        dropped = cache.get("stores", 0) - cache.get("entries", 0) - cache.get("invalidated_entries", 0)
        res["cache_at_end"] = {"entries": cache.get("entries"), "stores": cache.get("stores"),
                               "bytes": cache.get("process_bytes", 0), "max_bytes": cache.get("process_max_bytes", 0),
                               "stored_not_held": dropped,
                               "fits": bool(cache.get("process_max_bytes")) and dropped == 0
                               and cache.get("process_bytes", 0) < cache["process_max_bytes"]}
        res["notes"] = b.notes
        res["summary"] = summarize(res)

    return run_bench("bench.cache_bench", args, argv, CacheBench, body, print_report,
                     header={"goals": {"hit_p50_vs_direct_below": HIT_GOAL, "tps_cache_vs_pgbouncer": TPS_GOAL,
                                       "warmup_hit_ratio": WARM_RATIO},
                             "descriptions": DESCRIPTIONS,
                             "cache_config": {"name": CONFIGS["cache"], "max_age_s": MAX_AGE, "swr_s": SWR,
                                              "why": "max_age at its maximum so no entry expires during the run"}})


if __name__ == "__main__":
    sys.exit(main())
