"""Helpers shared by the benchmarks.

The process launching (`Stack`, `Proc`), the per-process CPU accounting (`Tracked`, `cpu_delta`)
and the py-spy sampler (`Profiler`) were written for `bench/tunnel_bench.py` and are re-exported
from there unchanged, so both benchmarks measure the same way. What is new here is what the
proxy benchmark needs on top: PgBouncer with TLS and SCRAM on both sides, a pgbench runner for
any protocol mode and connection string, machine info, percentiles, and a py-spy summary that
keeps to the product's own modules.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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
from tests.harness.procs import Proc, free_port, wait_listening  # noqa: F401

__all__ = [
    # from bench.tunnel_bench
    "HOST", "REPO_ROOT", "RESULTS_DIR", "BenchError", "Profiler", "Stack", "Tracked", "_children_map",
    "cpu_delta", "log", "uses_uvloop",
    # new here
    "machine_info", "source_digest", "now_iso", "percentile", "pgbouncer_exe", "pgbouncer_version", "PgBouncer",
    "pgbench_exe", "pgbench_env", "pgbench_argv", "parse_pgbench", "redact", "summarize_raw_profile",
    "format_profile_summary",
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


def pgbench_argv(dsn: str, *, mode: str, clients: int, duration: float, select_only: bool = True) -> list[str]:
    exe = pgbench_exe()
    if exe is None:
        raise BenchError("pgbench is not installed")
    argv = [exe, "-n", "-M", mode, "-c", str(clients), "-j", str(2 if clients > 1 else 1),
            "-T", str(int(max(1, round(duration))))]
    if select_only:
        argv.insert(1, "-S")
    return argv + [dsn]


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
