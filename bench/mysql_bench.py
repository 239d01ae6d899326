"""MySQL proxy benchmark (issue 7): queries per second through the MySQL proxy of `hd edge`, with query
caching off and on, against MariaDB directly, in one run.

    .venv/bin/python -m bench.mysql_bench            # full run (~4 min) → bench/results/mysql.json
    .venv/bin/python -m bench.mysql_bench --quick    # smoke run (~1 min) → bench/results/mysql-quick.json

Everything runs on 127.0.0.1, each part in its own OS process, started and stopped here:

    mariadb ×N ───────────────────────────────────────────────────> mariadbd   direct
    mariadb ×N ──> hd edge (MySQL proxy, pool 20, cache off) ─────> mariadbd   cache off  (config my-nocache)
    mariadb ×N ──> hd edge (MySQL proxy, pool 20, cache on) ──────> mariadbd   cache on   (config my-cache)

* mariadbd   tests/harness/mariadb.py MariaDbServer, tls=False: the origin hop is plaintext on loopback
             (the configs say `--sslmode disable`), and the clients connect without TLS too (`skip-ssl`), so
             direct and proxy compare like for like. (The Postgres benches run TLS on every hop: their
             figures are not comparable with these.) User and database `bench` (mysql_native_password),
             table `t (id INT PRIMARY KEY, v VARCHAR(100))` with 10,000 rows.
* hd edge    `--mysql-listen 127.0.0.1:0` (bench.tunnel_bench.Stack); configs made with the CLI
             (`hd hyperdrive create NAME --origin-scheme mysql --origin-host 127.0.0.1 --origin-port P
             --database bench --origin-user bench --sslmode disable --origin-connection-limit 20`, the
             origin password in HD_ORIGIN_PASSWORD): `my-nocache` with `--caching-disabled true`, `my-cache`
             with `--max-age 3600` (the maximum: no entry expires during the run). The clients log in with
             the user and password of `hd hyperdrive get NAME --connection-string`.
* clients    the load generator is the `mariadb` command-line client (C, libmariadb), N processes, one
             connection each, every process reading a file of K copies of the query on stdin
             (`--batch --skip-column-names`, output to /dev/null): one COM_QUERY per line, the result read
             in full (mysql_store_result) and printed, nothing else sent. Not `mariadb-slap`: it hard-codes
             the latin1 client character set (charset id 8) in its handshake, with no option to change it,
             and the proxy refuses non-UTF-8 connections (ERR 1115 "the proxy speaks UTF-8 only"); `mariadb`
             takes `--default-character-set=utf8mb4`. The client options (port, user, password) are in a
             0600 option file per target (`--defaults-file`), not on argv.

Cells: two reads — `point` (`SELECT v FROM t WHERE id = 42`, 1 row) and `range`
(`SELECT id, v FROM t WHERE id BETWEEN 100 AND 199`, 100 rows) — × clients 1|16|64 × the three
targets, the target order rotated per cell. Before the cells of a query, untimed warm-ups per target,
with the most clients and with one (a short run that fills the proxy's pools and, through my-cache,
caches the key; then runs of about min(1, duration / 3) s sized from the last one), give the qps
estimates that size each cell to about --duration seconds: K = qps × duration / N queries per client. qps = N × K / wall time from starting the first client to the last
one's exit, so each client's start and login are included: ~0.2 s for 64 clients (2 % of a 10 s cell),
measured at the start with clients that log in and quit (`login_cost`, printed with the table).

Checks per cell (a failed one is reported, and fails the run's `all_queries_completed`): every client
exits 0 with nothing on stderr (the `mariadb` client stops at the first error, e.g. a statement the
proxy refuses); through the proxy, the config's `hd hyperdrive metrics --json` deltas count exactly
N × K queries and no errors; direct and cache off, MariaDB's `Com_select` grows by N × K (cache on:
recorded as `origin_selects`; only misses reach MariaDB). Hit ratio = hit / (hit + miss) of my-cache during the cell, from the metrics deltas.

CPU time of mariadbd (all threads), `hd edge` and the clients (reaped children) is read around every
cell from /proc as the other benches do: µs of CPU per query per process, the cores each one kept
busy, and `other` (box CPU not charged to these processes: something else loaded the box).
Exit status 0 when the run completed.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.cache_bench import cache_delta  # noqa: E402
from bench.common import (  # noqa: E402
    DB,
    HOST,
    POOL,
    RESULTS_DIR,
    USER,
    BenchError,
    PgTargets,
    cpu_delta,
    fmt_num,
    log,
    run_bench,
    uses_uvloop,
)
from tests.harness.mariadb import MariaDbError, MariaDbServer, _find_bin  # noqa: E402
from tests.harness.procs import WaitTimeout, pdeathsig_prefix, poll_until  # noqa: E402

TARGETS = ("direct", "nocache", "cache")
LABELS = {"direct": "direct", "nocache": "cache off", "cache": "cache on"}
CONFIGS = {"nocache": "my-nocache", "cache": "my-cache"}
MAX_AGE = 3600  # the CLI's maximum: no entry expires during a run
ROWS = 10_000
QUERIES = {
    "point": "SELECT v FROM t WHERE id = 42",
    "range": "SELECT id, v FROM t WHERE id BETWEEN 100 AND 199",
}
QUERY_ROWS = {"point": 1, "range": 100}
DESCRIPTIONS = {
    "direct": "mariadb clients → mariadbd (no TLS)",
    "nocache": f"mariadb clients → hd edge MySQL proxy → mariadbd, config my-nocache (--caching-disabled true, "
               f"pool {POOL}; no TLS)",
    "cache": f"mariadb clients → hd edge MySQL proxy → mariadbd, config my-cache (--max-age {MAX_AGE}, pool {POOL}; "
             "no TLS)",
}
LOADGEN = ("`mariadb` CLI (C, libmariadb), one process and connection per client, each reading K copies of the "
           "query from a file (--batch --skip-column-names, output to /dev/null). Not mariadb-slap: it hard-codes "
           "the latin1 client charset (id 8) and the proxy refuses non-UTF-8 connections (ERR 1115).")
MIN_PER_CLIENT = 20
WARM_QUERIES = 2000  # per warm-up run, spread over its clients
PROCS = ("mariadbd", "edge", "clients")


# ------------------------------------------------------------------------------ set-up


def missing_tool() -> str | None:
    """What the benchmark needs and is not installed (mariadb-server and its client), or None."""
    try:
        _find_bin("mariadbd")
        _find_bin("mariadb")
    except MariaDbError as exc:
        return str(exc)
    return None


def _version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


class MySqlBench(PgTargets):
    """The PgTargets plumbing (a Stack with `hd edge`, `hd` CLI calls, configs made with the CLI,
    stopping everything) with a MariaDB origin instead of PostgreSQL (kept in `stack.pg`, so
    close() stops it). `targets` maps a target to the port/user/password the clients log in with."""

    def __init__(self, args: Any, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.client_exe = _find_bin("mariadb")  # run_bench checked it is there (missing_tool)
        self.option_files: dict[str, Path] = {}
        self.query_files: dict[tuple[str, int], Path] = {}
        self.estimates: dict[tuple[str, str], dict[int, float]] = {}  # qps net of start-up, to size runs
        self.login_s: dict[str, tuple[int, float]] = {}  # target -> (clients, wall s) of login_cost

    def setup(self) -> None:
        self.stack.pg = MariaDbServer(tls=False).start()
        m = self.cluster
        m.create_user(USER, self.password)
        m.create_database(DB, owner=USER)
        m.query("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(100) NOT NULL)", database=DB)
        m.query(f"INSERT INTO t SELECT seq, CONCAT('row-', seq, '-', MD5(seq)) FROM seq_1_to_{ROWS}", database=DB)
        m.query("ANALYZE TABLE t", database=DB)
        n = m.query("SELECT COUNT(*) FROM t", database=DB)[0][0]
        if n != ROWS:
            raise BenchError(f"table t has {n} rows, expected {ROWS}")
        self.stack.tracked.add("mariadbd", m.pid)
        log(f"mariadbd on port {m.port} (pid {m.pid}), table t with {ROWS:,} rows")
        self.targets["direct"] = {"port": m.port, "user": USER, "password": self.password}

        info = self.stack.start_edge()
        log(f"edge up: api {info['api_url']}, mysql proxy {info.get('mysql_listen')}")
        my_port = int(str(info.get("mysql_listen", "")).rpartition(":")[2] or 0)
        origin = ("--origin-scheme", "mysql", "--origin-host", HOST, "--origin-port", str(m.port), "--sslmode", "disable")
        for t, name in CONFIGS.items():
            caching = ("--caching-disabled", "true") if t == "nocache" else ("--max-age", str(MAX_AGE))
            u = urlsplit(self.create_config(name, *origin, caching=caching))
            if u.scheme != "mysql" or u.port != my_port or unquote(u.path[1:]) != DB:
                raise BenchError(f"{name}: connection string {u.scheme}://…@{u.hostname}:{u.port}{u.path} does not "
                                 f"point at the edge's MySQL listener {info.get('mysql_listen')}/{DB}")
            c = self.hd("hyperdrive", "get", name, "--json")
            self.targets[t] = {"port": u.port, "user": unquote(u.username or ""), "password": unquote(u.password or ""),
                               "config": name, "caching": c.get("caching"), "sslmode": c.get("sslmode"),
                               "origin_connection_limit": c.get("origin_connection_limit")}
        if self.targets["cache"]["caching"].get("disabled") or not self.targets["nocache"]["caching"].get("disabled"):
            raise BenchError(f"caching settings are not as asked: {[self.targets[t]['caching'] for t in CONFIGS]}")
        self.targets = {t: self.targets[t] for t in TARGETS}
        for t in TARGETS:
            self.option_files[t] = self._option_file(t)

    def _option_file(self, target: str) -> Path:
        """A client option file (0600) with where and as whom `target`'s clients log in."""
        t = self.targets[target]
        f = self.workdir / f"client-{target}.cnf"
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("[client]\n"
                     f"host={HOST}\nport={t['port']}\nuser={t['user']}\npassword=\"{t['password']}\"\n"
                     f"database={DB}\ndefault-character-set=utf8mb4\nskip-ssl\n")
        return f

    def query_file(self, query: str, copies: int) -> Path:
        key = (query, copies)
        if key not in self.query_files:
            f = self.workdir / f"q-{query}-{copies}.sql"
            f.write_text(f"{QUERIES[query]};\n" * copies)
            self.query_files[key] = f
        return self.query_files[key]

    def metrics(self, target: str) -> dict[str, Any]:
        """`hd hyperdrive metrics` of a target's config: everything retained (24 h), so deltas are exact."""
        return self.hd("hyperdrive", "metrics", CONFIGS[target], "--since", "24h", "--json")

    def com_select(self) -> int:
        """MariaDB's global Com_select (as root over the unix socket, which counts nothing itself)."""
        return int(self.cluster.query("SHOW GLOBAL STATUS LIKE 'Com_select'")[0][1])

    # -- cell sizing ---------------------------------------------------------------------------
    def login_estimate(self, target: str, clients: int) -> float:
        """Seconds that starting and logging in `clients` clients adds to a run (from login_cost)."""
        c, wall = self.login_s.get(target, (1, 0.0))
        return wall * clients / c

    def note_qps(self, target: str, query: str, clients: int, qps: float) -> None:
        self.estimates.setdefault((target, query), {})[clients] = qps

    def estimate(self, target: str, query: str, clients: int) -> float | None:
        """The qps last measured for (target, query) at the nearest client count (log scale)."""
        est = self.estimates.get((target, query))
        if not est:
            return None
        near = min(est, key=lambda c: abs(math.log(c) - math.log(clients)))
        return est[near]


def _client_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": os.environ.get("HOME", "/tmp")}


def _proxy_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    d = cache_delta(before, after)
    ea, eb = before["queries"].get("by_event_status", {}), after["queries"].get("by_event_status", {})
    d["by_event_status"] = {k: eb.get(k, 0) - ea.get(k, 0) for k in eb if eb.get(k, 0) - ea.get(k, 0)}
    return d


def _spawn_clients(b: MySqlBench, target: str, qfile: Path, clients: int) -> dict[str, Any]:
    """Start `clients` `mariadb` processes reading `qfile`, wait for all (bounded), with tracked CPU
    snapshots around them: t0 (before the first start), t1 (after the last exit), exit codes, stderr."""
    argv = [b.client_exe, f"--defaults-file={b.option_files[target]}", "--batch", "--skip-column-names"]
    timeout = 60.0 + 6 * b.args.duration
    procs: list[subprocess.Popen] = []
    with open(b.workdir / "clients.stderr", "w+b") as err:
        try:
            before = b.stack.tracked.snapshot()
            t0 = time.monotonic()
            for _ in range(clients):
                with open(qfile, "rb") as stdin:
                    procs.append(subprocess.Popen(pdeathsig_prefix("KILL") + argv, stdin=stdin,
                                                  stdout=subprocess.DEVNULL, stderr=err, env=_client_env(),
                                                  start_new_session=True))
            rcs = []
            for p in procs:
                try:
                    rcs.append(p.wait(max(0.1, t0 + timeout - time.monotonic())))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"{clients} clients ({target}) did not finish within {timeout:.0f}s") from None
            t1 = time.monotonic()
            after = b.stack.tracked.snapshot()
        finally:
            for p in procs:  # only on error or interrupt: the clients this call started
                if p.poll() is None:
                    p.kill()
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
        err.seek(0)
        errtext = err.read().decode("utf-8", "replace").strip()
    return {"argv": argv + ["< " + qfile.name], "t0": t0, "t1": t1, "rcs": rcs, "stderr": errtext,
            "before": before, "after": after}


def login_cost(b: MySqlBench, target: str, clients: int) -> dict[str, Any]:
    """Wall time of `clients` clients that start, log in and quit without a query: what every cell's
    wall time holds besides its queries."""
    empty = b.workdir / "q-empty.sql"
    empty.write_text("")
    r = _spawn_clients(b, target, empty, clients)
    bad = [rc for rc in r["rcs"] if rc != 0]
    out = {"target": target, "clients": clients, "wall_s": round(r["t1"] - r["t0"], 4)}
    if bad or r["stderr"]:
        out["error"] = f"{len(bad)} clients failed: {r['stderr'][-500:]}"
    log(f"start + login of {clients} clients, {target}: {1000 * out['wall_s']:.0f} ms")
    return out


def run_clients(b: MySqlBench, target: str, query: str, clients: int, per_client: int,
                tag: str | None = None) -> dict[str, Any]:
    """N `mariadb` clients, each sending `per_client` copies of the query over its own connection;
    qps over the wall time of the whole run, CPU per process, and the checks (see the module doc)."""
    qfile = b.query_file(query, per_client)
    n = clients * per_client
    m_before = b.metrics(target) if target in CONFIGS else None
    sel_before = b.com_select()
    r = _spawn_clients(b, target, qfile, clients)
    t0, t1, rcs, errtext, before, after = r["t0"], r["t1"], r["rcs"], r["stderr"], r["before"], r["after"]
    argv = r["argv"]
    wall = t1 - t0
    res: dict[str, Any] = {"target": target, "query": query, "sql": QUERIES[query], "clients": clients,
                           "per_client": per_client, "queries": n, "wall_s": round(wall, 3),
                           "qps": round(n / wall, 1), "latency_avg_us": round(clients * wall / n * 1e6, 1),
                           "argv": argv}
    problems: list[str] = []
    bad = [rc for rc in rcs if rc != 0]
    if bad or errtext:
        problems.append(f"{len(bad)} of {clients} clients failed; stderr: {errtext[-1000:]}")
    res["origin_selects"] = b.com_select() - sel_before
    if target in ("direct", "nocache") and res["origin_selects"] != n:
        problems.append(f"MariaDB Com_select grew by {res['origin_selects']}, expected {n}")
    if m_before is not None:
        last: dict[str, Any] = {}

        def counted() -> bool:
            last.update(_proxy_delta(m_before, b.metrics(target)))
            return last["queries"] >= n

        try:
            poll_until(counted, 5.0, interval=0.2, what="the proxy metrics to count the cell's queries")
        except WaitTimeout:
            pass
        res["proxy"] = dict(last)
        if last["queries"] != n or last["by_event_status"].get("error"):
            problems.append(f"proxy metrics: {last['queries']} queries ({last['by_cache_status']}), "
                            f"events {last['by_event_status']}; expected {n} complete")
    cpu = cpu_delta(before, after)
    cpu["cpu_s"]["clients"] = cpu.pop("reaped_children_cpu_s")
    cpu["cost_unit"] = "us_per_query"
    cpu["cost"] = {k: round(v * 1e6 / n, 1) + 0.0 for k, v in cpu["cpu_s"].items()}
    cpu["cores"] = {k: round(v / max(1e-9, wall), 2) + 0.0 for k, v in cpu["cpu_s"].items()}
    res["cpu"] = cpu
    if problems:
        res["error"] = "; ".join(problems)
        log(f"{tag or 'warm-up'}: {target} {query} c={clients}: CHECK FAILED: {res['error']}")
    if tag is not None or not problems:
        hr = (res.get("proxy") or {}).get("hit_ratio")
        log(f"{tag or 'warm-up'}: {target:<8} {query:<6} c={clients:<3} {n:>7,} queries in {wall:5.2f}s "
            f"qps={res['qps']:>9,.0f}" + (f" hit ratio {hr:.4f}" if hr is not None else ""))
    b.note_qps(target, query, clients, n / max(wall - b.login_estimate(target, clients), wall / 4))
    return res


# ------------------------------------------------------------------------------ measuring


def measure(b: MySqlBench) -> dict[str, Any]:
    args = b.args
    cells: list[dict[str, Any]] = []
    warmups: list[dict[str, Any]] = []
    cmax = max(args.clients)
    logins = [login_cost(b, t, cmax) for t in TARGETS]
    b.login_s = {x["target"]: (x["clients"], x["wall_s"]) for x in logins}
    calibrate_s = min(1.0, args.duration / 3)
    for query in args.queries:
        log(f"warm-up {query}: fill the pools, cache the key, estimate qps (untimed)")
        for target in TARGETS:
            for c in dict.fromkeys((cmax, 1)):
                # a short run (fills the pools and the cache), then runs sized from the last estimate
                # until one lasts at least calibrate_s / 2 (start-up weighs less): the estimate sizes the cells
                per_client = max(MIN_PER_CLIENT, WARM_QUERIES // c)
                for _ in range(4):
                    w = run_clients(b, target, query, c, per_client)
                    warmups.append({k: w.get(k) for k in ("target", "query", "clients", "queries", "wall_s", "qps",
                                                          "error")})
                    if w["wall_s"] >= calibrate_s / 2:
                        break
                    per_client = max(MIN_PER_CLIENT, math.ceil(b.estimate(target, query, c) * calibrate_s / c))
        for clients in args.clients:
            for i in range(len(TARGETS)):
                target = TARGETS[(i + len(cells) // len(TARGETS)) % len(TARGETS)]  # rotate the order per cell
                est = b.estimate(target, query, clients) or 1000.0
                per_client = max(MIN_PER_CLIENT, math.ceil(est * args.duration / clients))
                cells.append(run_clients(b, target, query, clients, per_client, f"{target}-{query}-c{clients}"))
    rows = []
    for query in args.queries:
        for clients in args.clients:
            by = {c["target"]: c for c in cells if c["query"] == query and c["clients"] == clients}
            qps = {t: c["qps"] for t, c in by.items() if "error" not in c}

            def ratio(a: str, b_: str) -> float | None:
                return round(qps[a] / qps[b_], 3) if qps.get(a) and qps.get(b_) else None

            cache = by.get("cache", {})
            rows.append({"query": query, "clients": clients, "qps": qps,
                         "latency_avg_us": {t: c["latency_avg_us"] for t, c in by.items()},
                         "nocache_vs_direct": ratio("nocache", "direct"), "cache_vs_direct": ratio("cache", "direct"),
                         "cache_vs_nocache": ratio("cache", "nocache"),
                         "hit_ratio": (cache.get("proxy") or {}).get("hit_ratio"),
                         "cache_origin_selects": cache.get("origin_selects"),
                         "errors": [f"{t}: {c['error']}" for t, c in by.items() if "error" in c]})
    return {"rows": rows, "cells": cells, "warmups": warmups, "login_cost": logins,
            "cell_order": [f"{c['target']}/{c['query']}/c{c['clients']}" for c in cells]}


def summarize(m: dict[str, Any]) -> dict[str, Any]:
    rows = m["rows"]

    def span(key: str) -> list[float] | None:
        v = [r[key] for r in rows if r[key] is not None]
        return [min(v), max(v)] if v else None

    failed = [c for c in m["cells"] if "error" in c]
    return {"rows": [{k: r[k] for k in ("query", "clients", "qps", "nocache_vs_direct", "cache_vs_direct",
                                        "cache_vs_nocache", "hit_ratio")} for r in rows],
            "nocache_vs_direct": span("nocache_vs_direct"), "cache_vs_direct": span("cache_vs_direct"),
            "cache_vs_nocache": span("cache_vs_nocache"),
            "min_hit_ratio": min((r["hit_ratio"] for r in rows if r["hit_ratio"] is not None), default=None),
            "failed_cells": len(failed), "all_queries_completed": not failed}


# ------------------------------------------------------------------------------ report


def print_report(res: dict[str, Any]) -> None:
    P = lambda *a: print(*a, flush=True)  # noqa: E731
    cfg = res["config"]
    m = res["machine"]
    P()
    P(f"MySQL proxy benchmark — {res['timestamp']} — {m['nproc']} CPUs ({m.get('cpu_model')}), Python {m['python']}, "
      f"{m.get('mariadbd_version', 'mariadbd ?')}" + ("  [QUICK]" if cfg["quick"] else ""))
    P(f"table t: {ROWS:,} rows; ~{cfg['duration']:g} s per cell; proxy pool {POOL}; no TLS on any hop (loopback)")
    for t in TARGETS:
        P(f"  {LABELS[t]:<10} {DESCRIPTIONS[t]}")
    P(f"  load: {LOADGEN}")
    for q in cfg["queries"]:
        P(f"  {q:<6} {QUERIES[q]}  ({QUERY_ROWS[q]} row{'s' if QUERY_ROWS[q] > 1 else ''})")
    r = res["mysql"]
    P("  start + login of " + ", ".join(f"{x['clients']} clients {LABELS[x['target']]} {1000 * x['wall_s']:.0f} ms"
                                       for x in r["login_cost"]) + " (part of every cell's wall time)")
    P()
    P("queries per second (avg latency µs = clients / qps); hit ratio of the cache-on cell from metrics deltas")
    hdr = (f"{'query':<7}{'c':>3} " + "".join(f"{LABELS[t]:>18}" for t in TARGETS)
           + f"{'off/direct':>11}{'on/direct':>10}{'on/off':>8}{'hit ratio':>11}")
    P(hdr)
    P("-" * len(hdr))
    for row in r["rows"]:
        cells = [f"{fmt_num(row['qps'].get(t))} ({fmt_num(row['latency_avg_us'].get(t))})"
                 if row["qps"].get(t) is not None else "error" for t in TARGETS]
        hr = row["hit_ratio"]
        P(f"{row['query']:<7}{row['clients']:>3} " + "".join(f"{c:>18}" for c in cells)
          + f"{fmt_num(row['nocache_vs_direct'], 2, '×'):>11}{fmt_num(row['cache_vs_direct'], 2, '×'):>10}"
          + f"{fmt_num(row['cache_vs_nocache'], 2, '×'):>8}"
          + f"{(fmt_num(100 * hr, 2, '%') if hr is not None else '—'):>11}")
    for row in r["rows"]:
        for e in row["errors"]:
            P(f"  CHECK FAILED {row['query']} c{row['clients']}: {e}")
    s = res["summary"]
    verdict = "yes" if s["all_queries_completed"] else f"NO ({s['failed_cells']} cells)"
    P(f"  every query completed (exit 0, no stderr, proxy metrics count = sent, no errors, Com_select as expected): "
      f"{verdict}")
    P()
    nproc = m["nproc"] or 1
    P("CPU µs per query per process (cores kept busy); other = box CPU not charged to these processes, in % of")
    P("the cell's wall time × CPUs (large = something else loaded the box; slightly negative at one client, where")
    P("the box's busy time, counted per timer tick, comes out below the processes' exact times)")
    P(f"{'cell':<22}" + "".join(f"{n:>16}" for n in PROCS) + f"{'other %':>9}")
    for c in sorted(r["cells"], key=lambda c: (cfg["queries"].index(c["query"]), c["clients"], TARGETS.index(c["target"]))):
        cost, cores = c["cpu"]["cost"], c["cpu"]["cores"]
        other = 100.0 * c["cpu"]["box_other_cpu_s"] / max(1e-9, c["cpu"]["wall_s"] * nproc)
        cols = [f"{fmt_num(cost.get(n), 1)} ({fmt_num(cores.get(n), 2)})" if n in cost else "—" for n in PROCS]
        P(f"{c['target'] + '/' + c['query'] + '/c' + str(c['clients']):<22}" + "".join(f"{x:>16}" for x in cols)
          + f"{other:>8.0f}%")
    P()
    P(f"JSON: {res['json_path']}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.mysql_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): 3 s cells, clients 1 and 16")
    ap.add_argument("--duration", type=float, default=None, help="seconds per cell, about (default 10; quick 3)")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated client counts (default 1,16,64; quick 1,16)")
    ap.add_argument("--queries", type=lambda s: s.split(","), default=None,
                    help=f"comma-separated reads among {','.join(QUERIES)} (default all)")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="where to write JSON (default bench/results/mysql.json; quick: mysql-quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the process logs")
    a = ap.parse_args(argv)
    if a.duration is None:
        a.duration = 3.0 if a.quick else 10.0
    if a.clients is None:
        a.clients = [1, 16] if a.quick else [1, 16, 64]
    if a.queries is None:
        a.queries = list(QUERIES)
    bad = [q for q in a.queries if q not in QUERIES]
    if bad or any(c < 1 for c in a.clients):
        ap.error(f"unknown queries {bad}" if bad else "client counts must be ≥ 1")
    if a.json_out is None:
        a.json_out = RESULTS_DIR / ("mysql-quick.json" if a.quick else "mysql.json")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body(b: MySqlBench, res: dict[str, Any]) -> None:
        res["machine"]["mariadbd_version"] = _version(_find_bin("mariadbd"))
        res["machine"]["mariadb_client_version"] = _version(b.client_exe)
        b.setup()
        res["targets_measured"] = list(b.targets)
        res["configs"] = {CONFIGS[t]: {k: b.targets[t].get(k) for k in ("caching", "sslmode", "origin_connection_limit")}
                          for t in CONFIGS}
        res["pids"] = {n: pid for n, (pid, _) in b.stack.tracked.procs.items()}
        res["machine"]["uvloop_in_process"] = {"edge": uses_uvloop(res["pids"]["edge"])}
        res["mysql"] = measure(b)
        res["metrics_at_end"] = {CONFIGS[t]: b.metrics(t) for t in CONFIGS}
        res["summary"] = summarize(res["mysql"])

    return run_bench("bench.mysql_bench", args, argv, MySqlBench, body, print_report, missing_tool=missing_tool,
                     header={"descriptions": DESCRIPTIONS, "queries": QUERIES, "load_generator": LOADGEN,
                             "table": {"name": "t", "rows": ROWS,
                                       "ddl": "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(100) NOT NULL)"},
                             "tls": "none: origin hop --sslmode disable (plaintext MariaDB on loopback), clients "
                                    "skip-ssl to both the proxy and MariaDB"})


if __name__ == "__main__":
    sys.exit(main())
