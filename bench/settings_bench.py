"""What carrying session settings costs (issue 12): pgbench through the proxy and PgBouncer when
clients set nothing, when they bring startup settings, when clients with different settings share
one pool, and when every transaction runs a session-level SET.

    .venv/bin/python -m bench.settings_bench            # ~2 min → bench/results/settings.json
    .venv/bin/python -m bench.settings_bench --quick    # ~40 s

Everything on 127.0.0.1 in its own process (as bench/proxy_bench.py): postgres (TLS, SCRAM,
`pgbench -i -s 10`), PgBouncer (transaction pool 20), `hd edge` with config `pb-direct` (pool 20,
caching off). Cells, `pgbench -n -M simple -c 16 -j 2` for --duration seconds each, every target in turn:

* `none`      `-S`; the clients set nothing (the carried-settings machinery must cost nothing here)
* `startup`   `-S`, every client with `application_name=bench-a` (one set: applied once per origin
              connection; PgBouncer tracks application_name too, and refuses `options`)
* `mixed`     two pgbench processes at once, 8 clients each, with different application_names: a
              client's server was often last used by the other kind, so the difference is applied
              (pipelined; PgBouncer sends a SET too) on many transactions
* `set-each`  a script whose every transaction is `SET search_path = public` then the `-S` select:
              a session-level SET per transaction, so a readback per transaction

PgBouncer 1.18 tracks only client_encoding, DateStyle, TimeZone, standard_conforming_strings and
application_name: its `mixed` and `set-each` rows run, but its clients may run under each other's
search_path. It is the speed anchor, not a correctness one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    HOST,
    BenchError,
    PgTargets,
    cpu_delta,
    fmt_num,
    log,
    parse_pgbench,
    pgbench_arg_defaults,
    pgbench_arg_parser,
    pgbench_argv,
    pgbench_env,
    run_bench,
    run_pgbench,
)

CELLS = ("none", "startup", "mixed", "set-each")
SET_EACH = "\\set aid random(1, 100000 * :scale)\nSET search_path = public;\n" \
           "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"


def with_param(dsn: str, name: str, value: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}{name}={quote(value)}"


class SettingsBench(PgTargets):
    def setup(self) -> None:
        self.start_postgres()
        self.start_pgbouncer()
        self.start_edge()
        self.targets["proxy"] = {"dsn": self.create_config("pb-direct", "--origin-host", HOST,
                                                           "--origin-port", str(self.cluster.port))}
        self.script = self.workdir / "set-each.sql"
        self.script.write_text(SET_EACH)


def run_mixed(b: SettingsBench, target: str, duration: float) -> dict[str, Any]:
    """Two pgbench processes at once (8 clients each), each kind with its own application_name."""
    dsn = b.targets[target]["dsn"]
    argvs = [pgbench_argv(with_param(dsn, "application_name", name), mode="simple", clients=8,
                          duration=duration) for name in ("bench-a", "bench-b")]
    before = b.stack.tracked.snapshot()
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=pgbench_env(),
                              stdin=subprocess.DEVNULL) for a in argvs]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=duration + 90)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            raise BenchError(f"pgbench ({target}, mixed) did not finish") from None
    after = b.stack.tracked.snapshot()
    parsed = [parse_pgbench(o) for o in outs]
    if any("tps" not in p for p in parsed) or any(p.returncode for p in procs):
        raise BenchError(f"pgbench ({target}, mixed) failed: {outs[0][-500:]} {outs[1][-500:]}")
    res: dict[str, Any] = {"target": target, "clients": 16, "tps": sum(p["tps"] for p in parsed),
                           "latency_avg_ms": sum(p["latency_avg_ms"] for p in parsed) / 2}
    cpu = cpu_delta(before, after)
    cpu.pop("reaped_children_cpu_s", None)
    res["cpu"] = cpu
    return res


def body(b: SettingsBench, res: dict[str, Any]) -> None:
    b.setup()
    a = b.args
    rows: list[dict[str, Any]] = []
    for target in ("proxy", "pgbouncer"):  # warm the pools
        run_pgbench(b, target, "simple", 16, 2)
    for cell in CELLS:
        for target in ("pgbouncer", "proxy"):
            log(f"{cell}: {target}")
            if cell == "none":
                r = run_pgbench(b, target, "simple", 16, a.duration)
            elif cell == "startup":
                saved = b.targets[target]["dsn"]
                b.targets[target]["dsn"] = with_param(saved, "application_name", "bench-a")
                try:
                    r = run_pgbench(b, target, "simple", 16, a.duration)
                finally:
                    b.targets[target]["dsn"] = saved
            elif cell == "mixed":
                r = run_mixed(b, target, a.duration)
            else:
                r = run_pgbench(b, target, "simple", 16, a.duration, select_only=False,
                                extra=["-f", str(b.script)])
            if "error" in r:
                raise BenchError(f"{cell} {target}: {r['error'][-300:]}")
            r["cell"] = cell
            rows.append(r)
            time.sleep(0.5)
    res["rows"] = rows


def report(res: dict[str, Any]) -> None:
    by = {(r["cell"], r["target"]): r for r in res["rows"]}
    print()
    print("| cell (pgbench -M simple, 16 clients) | PgBouncer tps | proxy tps | proxy/PgBouncer | proxy / own `none` |")
    print("|---|---|---|---|---|")
    base = by[("none", "proxy")]["tps"]
    for cell in CELLS:
        pb, px = by[(cell, "pgbouncer")]["tps"], by[(cell, "proxy")]["tps"]
        print(f"| {cell} | {fmt_num(pb)} | {fmt_num(px)} | {px / pb:.2f}× | {px / base:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    ap = pgbench_arg_parser("bench.settings_bench", __doc__ or "", quick_help="smoke run: 3 s cells",
                            quick_duration=3.0, scale=10)
    args = pgbench_arg_defaults(ap, ap.parse_args(argv))
    return run_bench("bench.settings_bench", args, argv, SettingsBench, body, report,
                     header={"cells": list(CELLS), "script": SET_EACH})


if __name__ == "__main__":
    sys.exit(main())
