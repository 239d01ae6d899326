"""Helpers shared by the benchmarks.

The process launching (`Stack`, `Proc`), the per-process CPU accounting (`Tracked`, `cpu_delta`)
and the py-spy sampler (`Profiler`) were written for `bench/tunnel_bench.py` and are re-exported
from there unchanged, so both benchmarks measure the same way. What is new here is what the
proxy benchmark needs on top: PgBouncer with TLS and SCRAM on both sides, a pgbench runner for
any protocol mode and connection string, machine info, percentiles, and a py-spy summary that
keeps to the product's own modules; and the set-up both pgbench benchmarks (proxy_bench, cache_bench)
share: `PgTargets` (a TLS + SCRAM cluster, PgBouncer, `hd edge` and its Hyperdrive configs) and
`run_pgbench` (one pgbench run against one of its targets, with per-process CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bench.tunnel_bench import (  # noqa: F401  (re-exported)
    HOST,
    REPO_ROOT,
    RESULTS_DIR,
    BenchError,
    Profiler,
    Stack,
    Tracked,
    _children_map,
    _cpu_model,
    cpu_delta,
    log,
    uses_uvloop,
)
from tests.harness.procs import Proc, WaitTimeout, free_port, poll_until, wait_listening  # noqa: F401

__all__ = [
    # from bench.tunnel_bench
    "HOST", "REPO_ROOT", "RESULTS_DIR", "BenchError", "Profiler", "Stack", "Tracked", "_children_map",
    "cpu_delta", "log", "uses_uvloop",
    # new here
    "machine_info", "source_digest", "now_iso", "percentile", "pgbouncer_exe", "pgbouncer_version", "PgBouncer",
    "pgbench_exe", "pgbench_env", "pgbench_argv", "parse_pgbench", "redact", "summarize_raw_profile",
    "format_profile_summary", "DB", "USER", "POOL", "PgTargets", "run_pgbench", "fmt_num", "run_bench",
    "pgbench_arg_parser", "pgbench_arg_defaults",
]

# ------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "cpu_model": _cpu_model()}
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except ImportError:
        info["uvloop"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    for name, argv in (("pgbench", ["pgbench", "--version"]), ("postgres", ["postgres", "--version"]),
                       ("pgbouncer", [pgbouncer_exe() or "pgbouncer", "--version"])):
        exe = shutil.which(argv[0]) or (argv[0] if os.path.exists(argv[0]) else None)
        if exe is None and name == "postgres":
            from tests.harness.pg import _find_bin

            try:
                exe = _find_bin("postgres")
            except Exception:
                exe = None
        if exe is None:
            continue
        try:
            out = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=10)
            info[f"{name}_version"] = (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    return info


def source_digest(packages: tuple[str, ...] = ("proxy", "tunnel", "relay", "connector", "access", "control",
                                                "cli")) -> dict[str, Any]:
    """Which product code a run measured (others may be editing it; there is no git here):
    sha256 over the product's .py files (path + content), their count and the newest mtime."""
    import hashlib

    h = hashlib.sha256()
    newest = 0.0
    files = sorted(f for pkg in packages for f in (REPO_ROOT / pkg).rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0")
        h.update(f.read_bytes())
        newest = max(newest, f.stat().st_mtime)
    return {"sha256": h.hexdigest()[:16], "files": len(files),
            "newest_mtime": datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).isoformat(timespec="seconds")}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ------------------------------------------------------------------------------ PgBouncer


def pgbouncer_exe() -> str | None:
    return shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


def pgbouncer_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out.stdout + out.stderr)
    return tuple(int(x) for x in m.groups() if x is not None) if m else (0,)


class PgBouncer:
    """PgBouncer in transaction mode with TLS and SCRAM on both sides.

    Clients: `client_tls_sslmode = require` with the cluster's server certificate, SCRAM against
    a plain-text userlist entry. Server: `server_tls_sslmode = require`, SCRAM with the same
    password. `max_prepared_statements` is set when the version has it (1.21+); older versions
    cannot serve `pgbench -M prepared` in transaction mode (`supports_prepared` is False).
    """

    def __init__(self, log_dir: Path, *, pg_port: int, dbname: str, user: str, password: str,
                 cert: Path, key: Path, pool_size: int = 20, max_prepared: int = 200,
                 max_client_conn: int = 300) -> None:
        exe = pgbouncer_exe()
        if exe is None:
            raise BenchError("pgbouncer is not installed (scripts/bootstrap.sh installs it)")
        self.version = pgbouncer_version(exe)
        self.supports_prepared = self.version >= (1, 21)
        self.dir = Path(tempfile.mkdtemp(prefix="hd-bench-pgbouncer-"))
        self.port = free_port(HOST)
        shutil.copyfile(cert, self.dir / "server.crt")
        shutil.copyfile(key, self.dir / "server.key")
        os.chmod(self.dir / "server.key", 0o600)
        (self.dir / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        os.chmod(self.dir / "userlist.txt", 0o600)
        lines = [
            "[databases]",
            f"{dbname} = host={HOST} port={pg_port} dbname={dbname}",
            "",
            "[pgbouncer]",
            f"listen_addr = {HOST}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.dir}/userlist.txt",
            "pool_mode = transaction",
            f"max_client_conn = {max_client_conn}",
            f"default_pool_size = {pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "ignore_startup_parameters = extra_float_digits",
            "client_tls_sslmode = require",
            f"client_tls_cert_file = {self.dir}/server.crt",
            f"client_tls_key_file = {self.dir}/server.key",
            "server_tls_sslmode = require",
            f"logfile = {self.dir}/pgbouncer.log",
            "pidfile =",
            "log_connections = 0",
            "log_disconnections = 0",
            "log_stats = 0",
        ]
        if self.supports_prepared:
            lines.append(f"max_prepared_statements = {max_prepared}")
        self.config_text = "\n".join(lines) + "\n"
        (self.dir / "pgbouncer.ini").write_text(self.config_text)
        argv = [exe, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: let it drop to the postgres OS user
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            for f in self.dir.iterdir():
                os.chown(f, pw.pw_uid, pw.pw_gid)
            argv = [exe, "-u", "postgres", str(self.dir / "pgbouncer.ini")]
        self.proc = Proc(argv, name="pgbouncer", log_dir=log_dir)
        wait_listening(HOST, self.port, 20.0, proc=self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe(self) -> dict[str, Any]:
        # the config without the auth file's path contents (the password lives only in userlist.txt)
        return {"version": ".".join(map(str, self.version)), "supports_prepared": self.supports_prepared,
                "config": self.config_text}

    def stop(self) -> None:
        try:
            self.proc.stop(timeout=5.0)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ pgbench

_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
_LAT = re.compile(r"latency average = ([0-9.]+) ms")
_LAT_SD = re.compile(r"latency stddev = ([0-9.]+) ms")
_CONN = re.compile(r"initial connection time = ([0-9.]+) ms")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_XACTS = re.compile(r"number of transactions actually processed: (\d+)")


def pgbench_exe() -> str | None:
    return shutil.which("pgbench")


def pgbench_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "PGCONNECT_TIMEOUT": "15",
            "HOME": os.environ.get("HOME", "/tmp")}


def pgbench_argv(dsn: str, *, mode: str, clients: int, duration: float, select_only: bool = True,
                 extra: Sequence[str] = ()) -> list[str]:
    """pgbench argv; `extra` (e.g. `-f script`, `-l --log-prefix P`) goes before the connection string."""
    exe = pgbench_exe()
    if exe is None:
        raise BenchError("pgbench is not installed")
    argv = [exe, "-n", "-M", mode, "-c", str(clients), "-j", str(2 if clients > 1 else 1),
            "-T", str(int(max(1, round(duration))))]
    if select_only:
        argv.insert(1, "-S")
    return argv + list(extra) + [dsn]


def parse_pgbench(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, rx, conv in (("tps", _TPS, float), ("latency_avg_ms", _LAT, float), ("latency_sd_ms", _LAT_SD, float),
                          ("connect_ms", _CONN, float), ("failed", _FAILED, int), ("transactions", _XACTS, int)):
        m = rx.search(text)
        if m:
            out[key] = conv(m.group(1))
    return out


def redact(argv: list[str]) -> list[str]:
    """argv with passwords in connection URIs replaced by '…' (for logs and JSON)."""
    return [re.sub(r"(postgres(?:ql)?://[^:/@]+:)[^@]*@", r"\1…@", a) for a in argv]


def fmt_num(v: Any, nd: int = 0, suffix: str = "") -> str:
    """'12,345' / '0.087' for tables; '—' for a missing figure."""
    if v is None:
        return "—"
    return f"{v:,.{nd}f}{suffix}"


# ------------------------------------------------------------------------------ pgbench targets

DB = "bench"
USER = "bench"
POOL = 20  # PgBouncer's default_pool_size and the proxy's --origin-connection-limit


class PgTargets:
    """What the pgbench benchmarks run against, started in their own processes by a `Stack`:
    one PostgreSQL cluster (tests/harness/pg.py: scram-sha-256, TLS on, shared_buffers 256MB; user and
    database `bench`, `pgbench -i -s args.scale`), PgBouncer in front of it, `hd edge` and its
    Hyperdrive configs (made with the CLI). `targets` maps a target name to {"dsn": …}."""

    def __init__(self, args: Any, workdir: Path) -> None:
        self.args = args
        self.stack = Stack(workdir)
        self.workdir = workdir
        self.password = secrets.token_urlsafe(16)
        self.bouncer: PgBouncer | None = None
        self.targets: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    @property
    def cluster(self) -> Any:
        return self.stack.pg

    def hd(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Any:
        from tests.harness.procs import hd_argv, run

        r = run(hd_argv(*args), env={**self.stack.env, **(env or {})}, timeout=timeout, cwd=str(REPO_ROOT))
        if r.returncode != 0:
            raise BenchError(f"`hd {' '.join(args[:3])} …` failed ({r.returncode}):\n{r.stderr.strip()}")
        return json.loads(r.stdout) if "--json" in args else r.stdout

    def direct_dsn(self, port: int) -> str:
        return f"postgresql://{USER}:{self.password}@{HOST}:{port}/{DB}?sslmode=require"

    def start_postgres(self) -> None:
        from tests.harness.pg import PgCluster

        self.stack.pg = PgCluster(auth="scram-sha-256", tls=True,
                                  settings={"shared_buffers": "256MB", "max_connections": 300}).start()
        self.cluster.create_user(USER, self.password)
        self.cluster.create_database(DB, USER)
        log(f"postgres on port {self.cluster.port}; pgbench -i -s {self.args.scale}")
        t0 = time.monotonic()
        r = subprocess.run([pgbench_exe(), "-i", "-q", "-s", str(self.args.scale), self.direct_dsn(self.cluster.port)],
                           capture_output=True, text=True, timeout=600, env=pgbench_env(), stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise BenchError(f"pgbench -i failed:\n{r.stderr[-2000:]}")
        log(f"pgbench -i done in {time.monotonic() - t0:.1f}s")
        self.stack.tracked.add("postgres", self.cluster.pid, True)

    def start_pgbouncer(self) -> None:
        c = self.cluster
        self.bouncer = PgBouncer(self.stack.log_dir, pg_port=c.port, dbname=DB, user=USER, password=self.password,
                                 cert=c.server_cert_path, key=c.tls_dir / "server.key", pool_size=POOL)
        self.stack.tracked.add("pgbouncer", self.bouncer.pid)
        log(f"pgbouncer {'.'.join(map(str, self.bouncer.version))} on port {self.bouncer.port}")
        self.targets["pgbouncer"] = {"dsn": self.direct_dsn(self.bouncer.port)}
        if not self.bouncer.supports_prepared:
            self.notes.append(f"PgBouncer {'.'.join(map(str, self.bouncer.version))} has no max_prepared_statements "
                              "(1.21+): its `prepared` rows ran `-M extended` (marked ext).")

    def pgbench_mode(self, target: str, mode: str) -> str:
        """The -M mode a target runs for `mode`: an old PgBouncer runs `prepared` as `extended`."""
        if target == "pgbouncer" and mode == "prepared" and self.bouncer is not None \
                and not self.bouncer.supports_prepared:
            return "extended"
        return mode

    def start_edge(self) -> dict[str, Any]:
        info = self.stack.start_edge()
        log(f"edge up: api {info['api_url']}, postgres proxy {info.get('pg_listen')}")
        return info

    def create_config(self, name: str, *flags: str, env: dict[str, str] | None = None,
                      caching: Sequence[str] = ("--caching-disabled", "true")) -> str:
        """`hd hyperdrive create NAME` (origin connection limit POOL; `caching`: the cache flags,
        default off) → its connection string."""
        self.hd("hyperdrive", "create", name, "--database", DB, "--origin-user", USER,
                "--origin-connection-limit", str(POOL), *caching, *flags, "--json",
                env={"HD_ORIGIN_PASSWORD": self.password, **(env or {})}, timeout=90.0)
        dsn = self.hd("hyperdrive", "get", name, "--connection-string").strip()
        if not dsn.startswith(("postgres", "mysql://")):
            raise BenchError(f"hd hyperdrive get {name} --connection-string printed {dsn!r}")
        return dsn

    def close(self) -> None:
        if self.stack.profiler is not None:
            self.stack.profiler.stop()
        for p in reversed(self.stack.procs):
            try:
                p.stop(timeout=5.0)
            except Exception as exc:
                log(f"stopping {p.name}: {exc}")
        self.stack.procs.clear()
        if self.bouncer is not None:
            try:
                self.bouncer.stop()
            except Exception as exc:
                log(f"stopping pgbouncer: {exc}")
        if self.stack.pg is not None:
            try:
                self.stack.pg.stop()
            except Exception as exc:
                log(f"stopping postgres: {exc}")


def _backends(pm: int) -> int:
    return len(_children_map().get(pm, ()))


def run_pgbench(b: PgTargets, target: str, mode: str, clients: int, duration: float, tag: str | None = None, *,
                select_only: bool = True, extra: Sequence[str] = (), profile: Iterable[str] = ()) -> dict[str, Any]:
    """One pgbench run against `b.targets[target]`, with the CPU every tracked process spent in it
    (pgbench as the reaped child; postgres with its backends): `cpu.cost` is µs per transaction.
    `profile`: names of tracked processes py-spy samples during a tagged run (needs b.stack.profiler)."""
    dsn = b.targets[target]["dsn"]
    eff_mode = b.pgbench_mode(target, mode)
    argv = pgbench_argv(dsn, mode=eff_mode, clients=clients, duration=duration, select_only=select_only, extra=extra)
    pm = b.cluster.pid
    base = _backends(pm)
    profile = set(profile)
    prof = b.stack.profiler if (tag is not None and profile) else None
    if prof is not None:
        prof.start(tag, {n: pid for n, (pid, _) in b.stack.tracked.procs.items() if n in profile})
    timeout = duration + 90.0
    try:
        before = b.stack.tracked.snapshot()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=pgbench_env(),
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"pgbench ({target}, {mode}, c={clients}) did not finish within {timeout:.0f}s") from None
        if target == "direct":  # let postgres reap pgbench's backends so their CPU lands in cutime
            try:
                poll_until(lambda: _backends(pm) <= base, 3.0, what="postgres backends to exit")
            except WaitTimeout:
                pass
        after = b.stack.tracked.snapshot()
    finally:
        if prof is not None:
            prof.stop()
    text = r.stdout + r.stderr
    res: dict[str, Any] = {"target": target, "mode": mode, "pgbench_mode": eff_mode, "clients": clients,
                           "argv": redact(argv), "rc": r.returncode}
    res.update(parse_pgbench(text))
    if r.returncode != 0 or "tps" not in res:
        res["error"] = text.strip()[-1500:]
        log(f"pgbench {target} {mode} c={clients} FAILED ({r.returncode}): {text.strip()[-300:]}")
    cpu = cpu_delta(before, after)
    cpu["cpu_s"]["pgbench"] = cpu.pop("reaped_children_cpu_s")
    res["cpu"] = cpu
    n = res.get("transactions")
    if n:
        cpu["cost_unit"] = "us_per_transaction"
        cpu["cost"] = {k: round(v * 1e6 / n, 1) + 0.0 for k, v in cpu["cpu_s"].items()}
    if "tps" in res:
        log(f"{tag or 'warm-up'}: {target:<10} {mode:<8} c={clients:<3} tps={res['tps']:>9,.0f} "
            f"lat={res.get('latency_avg_ms', 0):.3f} ms")
    return res


def pgbench_arg_parser(module: str, doc: str, *, quick_help: str, quick_duration: float,
                       scale: int) -> argparse.ArgumentParser:
    """The options every pgbench benchmark has (--quick, --duration, --clients, --modes, --scale,
    --json-out, --keep); the benchmark adds its own, then calls `pgbench_arg_defaults`."""
    name = module.rpartition(".")[2].removesuffix("_bench")
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--duration", type=float, default=None,
                    help=f"pgbench -T seconds per cell (default 10; quick {quick_duration:g})")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated client counts (default 1,16,64; quick 1,16)")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=None,
                    help="pgbench -M modes (default simple,prepared; extended is allowed too)")
    ap.add_argument("--scale", type=int, default=scale, help=f"pgbench -i -s (default {scale})")
    ap.add_argument("--json-out", type=Path, default=None,
                    help=f"where to write JSON (default bench/results/{name}.json; quick: {name}-quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the process logs")
    ap.set_defaults(_quick_duration=quick_duration, _results_name=name)
    return ap


def pgbench_arg_defaults(ap: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults of the common options (they depend on --quick) and check --modes."""
    q = a.quick
    if a.duration is None:
        a.duration = a._quick_duration if q else 10.0
    if a.clients is None:
        a.clients = [1, 16] if q else [1, 16, 64]
    if a.modes is None:
        a.modes = ["simple", "prepared"]
    bad = [m for m in a.modes if m not in ("simple", "extended", "prepared")]
    if bad:
        ap.error(f"unknown pgbench mode(s) {bad}")
    if a.json_out is None:
        a.json_out = RESULTS_DIR / (f"{a._results_name}-quick.json" if q else f"{a._results_name}.json")
    del a._quick_duration, a._results_name
    return a


def run_bench(module: str, args: Any, argv: list[str] | None, make: Callable[[Any, Path], PgTargets],
              body: Callable[[PgTargets, dict[str, Any]], None], report: Callable[[dict[str, Any]], None], *,
              header: dict[str, Any], finish: Callable[[PgTargets, dict[str, Any], bool], None] | None = None,
              missing_tool: Callable[[], str | None] | None = None) -> int:
    """The frame of a pgbench benchmark's main(): SIGTERM/Ctrl-C stop everything, `body(bench, res)`
    fills `res` (its own set-up included), every process is stopped on any outcome, the JSON goes to
    args.json_out (also on failure, with `error`), and `report(res)` prints the tables. `header`
    (goals, descriptions) follows timestamp/command/machine/product_source/config in the JSON;
    `finish(bench, res, ok)` runs after everything is stopped, before the JSON is written.
    `missing_tool()` says what the benchmark needs and is not installed (None: all there); by
    default it checks for pgbench. Returns the exit status: 0 when the run completed."""
    cmdline = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    missing = missing_tool() if missing_tool is not None else (None if pgbench_exe() else "pgbench is not installed")
    if missing:
        log(missing)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix=f"hd-{module.rpartition('.')[2].replace('_', '-')}-"))
    b = make(args, workdir)
    started = time.monotonic()
    res: dict[str, Any] = {
        "timestamp": now_iso(),
        "command": cmdline,
        "machine": machine_info(),
        "product_source": source_digest(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "probe"},
        **header,
    }
    ok = False
    try:
        log(f"workdir {workdir}")
        body(b, res)
        ok = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        res["error"] = "interrupted"
    except (BenchError, WaitTimeout, AssertionError, OSError, subprocess.SubprocessError) as exc:
        log(f"FAILED: {exc}")
        res["error"] = str(exc)
    except Exception as exc:  # a bug here: still stop everything and say what happened
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(exc).__name__}: {exc}")
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        b.close()
        if args.keep or not ok:
            log(f"logs kept in {b.stack.log_dir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    res["json_path"] = str(args.json_out)
    if finish is not None:
        finish(b, res, ok)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    if ok:
        report(res)
        log(f"done in {res['elapsed_s']:.0f}s")
    return 0 if ok else 1


# ------------------------------------------------------------------------------ py-spy summary

PRODUCT_DIRS = ("proxy/", "tunnel/", "relay/", "connector/", "access/", "control/", "cli/")


def _frame_parts(frame: str) -> tuple[str, str]:
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group(1), m.group(2)


def product_relpath(path: str) -> str | None:
    """'proxy/pg/protocol.py' for a frame file inside the repo's product packages, else None."""
    root = str(REPO_ROOT) + "/"
    rel = path[len(root):] if path.startswith(root) else path
    for d in PRODUCT_DIRS:
        if rel.startswith(d):
            return rel
    return None


def summarize_raw_profile(path: Path, top: int = 15) -> dict[str, Any] | None:
    """From a py-spy `raw` (collapsed stacks) file: total samples, the hottest functions by self
    time (any module, shortened), and the product functions (proxy/, tunnel/, …) by inclusive
    time and by self time, each as % of all samples."""
    try:
        text = path.read_text()
    except OSError:
        return None
    total = 0
    self_t: dict[str, int] = {}
    prod_self: dict[str, int] = {}
    prod_incl: dict[str, int] = {}
    idle = 0
    for line in text.splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not stack or not cnt.isdigit():
            continue
        n = int(cnt)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        fn, fpath = _frame_parts(frames[-1])
        short = "/".join(fpath.split("/")[-2:]) if fpath else ""
        leaf = f"{fn} ({short})"
        self_t[leaf] = self_t.get(leaf, 0) + n
        if fn in ("select", "poll", "epoll_wait", "run_forever", "_run_once") and "selectors" in fpath:
            idle += n
        seen: set[str] = set()
        last_prod: str | None = None
        for f in frames:
            fn2, p2 = _frame_parts(f)
            rel = product_relpath(p2)
            if rel is None:
                continue
            key = f"{fn2} ({rel})"
            last_prod = key
            if key not in seen:
                seen.add(key)
                prod_incl[key] = prod_incl.get(key, 0) + n
        if last_prod is not None:  # time below the innermost product frame is charged to it
            prod_self[last_prod] = prod_self.get(last_prod, 0) + n
    if not total:
        return None

    def top_of(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": top_of(self_t), "product_incl": top_of(prod_incl),
            "product_self_incl_callees": top_of(prod_self)}


def format_profile_summary(name: str, s: dict[str, Any]) -> str:
    lines = [f"== {name}: {s['samples']} samples (% of all samples)"]
    lines.append("  self time, any module:")
    lines += [f"    {pct:5.1f}  {fn}" for fn, pct in s["self"]]
    lines.append("  product functions, inclusive:")
    lines += [f"    {pct:5.1f}  {fn}" for fn, pct in s["product_incl"]]
    lines.append("  innermost product frame (its own time + library calls it makes):")
    lines += [f"    {pct:5.1f}  {fn}" for fn, pct in s["product_self_incl_callees"]]
    return "\n".join(lines)
