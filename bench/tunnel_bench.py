"""Tunnel benchmark: the direct path vs the tunnel path over each connector transport, in one run.

    .venv/bin/python -m bench.tunnel_bench             # full run (~6 min), table + bench/results/tunnel.json
    .venv/bin/python -m bench.tunnel_bench --quick     # smoke run (~25 s), bench/results/tunnel-quick.json
    .venv/bin/python -m bench.tunnel_bench --protocols quic      # only one connector transport
    .venv/bin/python -m bench.tunnel_bench --profile /tmp/prof   # + py-spy stacks of the hd processes
    .venv/bin/python -m bench.tunnel_bench --hold      # start everything, print ports/pids, wait for Ctrl-C

Everything runs on 127.0.0.1, each part in its own OS process, started and stopped here:

    loadgen ──TCP──> origin                                                (direct path)
    loadgen ──TCP──> hd access tcp ══WSS══> hd edge (relay) ══WSS or QUIC══> hd-connector ──TCP──> origin
                                                                           (tunnel path)

* origin   `python -m bench.origin`: uvloop asyncio Protocol echo server and byte-counting sink.
* edge     `python -m cli.main edge --state-dir TMP --api-listen 127.0.0.1:0 --tunnel-listen 127.0.0.1:0`
           (the relay takes WebSocket connections on that TCP port and QUIC ones on the same UDP port)
* tunnel   `hd tunnel create bench`, `hd tunnel route bench echo.bench|sink.bench|pg.bench --public`,
           `python -m connector.main --token-file F --ha-connections 1 --protocol P`
* access   `python -m cli.main access tcp --hostname echo.bench --url 127.0.0.1:PORT` (and sink, pg)
* loadgen  `python -m bench.loadgen`: uvloop, Protocol callbacks only; driven phase by phase over a pipe.

The tunnel path is measured once per connector transport in --protocols (default websocket,quic):
only the connector⇄relay hop changes (`hd access tcp` always reaches the relay over WebSocket). One
connector runs at a time; it is restarted with the other `--protocol` between paths, and a path is
measured only once `hd tunnel info` shows its single connection on that transport.

Measured per path (direct, then each transport), --repeat times (default 3): every round measures the
direct path, then each transport (the one already running first, so rounds alternate the order and the
connector restarts once per round); the median run of each figure is reported with its min–max:
  1. round trip of 64-byte messages on one connection: p50/p99 over --rtt-count after --rtt-warmup;
  2. requests/s, 64-byte ping-pong, one outstanding request per connection, 1/10/100 connections,
     --duration seconds each (after a short warm-up);
  3. bulk: --bulk-mib MiB one way into the sink, timed until the sink confirms the byte count;
  4. (extra) connection set-up: new TCP connection + one echo + close, p50/p99.
Then, when `pgbench` is installed: `pgbench -S -c 10 -j 2 -T D` against a throwaway PostgreSQL
(tests/harness/pg.py), directly, through `hd access tcp` over each transport, and through PgBouncer
(transaction pooling) when `pgbouncer` is installed.

Around every phase the CPU time (utime+stime from /proc/PID/stat) of every process is read, so the
tables show which process is CPU-bound on which path, the CPU cost per round trip / transaction / GiB
of each process, and the kernel share of it; box-wide busy/softirq/steal comes from /proc/stat, and
"other" is box CPU not charged to our processes (other programs on a shared box: a noise warning).
Targets (issue): tunnel bulk >= 1 Gbit/s, added p50 round trip <= 1 ms, 100-connection rate >= 10k/s.
JSON: paths.direct.FIGURE, paths.tunnel.PROTOCOL.FIGURE, pgbench.{direct,tunnel.PROTOCOL,pgbouncer},
summary.tunnel.PROTOCOL (ratios to direct, targets, busiest processes); summary.targets are those of
the transport `--protocol auto` starts with (connector/protocol.py AUTO_PREFERS) when it was measured.
Exit status 0 when the run completed (targets missed or not), 1 when it failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from connector.protocol import AUTO_PREFERS, PROTOCOLS  # noqa: E402
from tests.harness.procs import (  # noqa: E402
    Proc,
    WaitTimeout,
    base_env,
    connector_argv,
    free_port,
    hd_argv,
    pdeathsig_prefix,
    poll_until,
    run,
    wait_listening,
)

HOST = "127.0.0.1"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "bulk_gbit_s": 1.0,  # tunnel bulk >= 1 Gbit/s
    "added_rtt_p50_us": 1000.0,  # tunnel p50 - direct p50 <= 1 ms
    "rps_100": 10_000.0,  # tunnel, 100 connections >= 10k req/s
}


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    # fields after "pid (comm) ": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    return s[s.rindex(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            kids.setdefault(int(f[1]), []).append(int(name))
    return kids


def proc_cpu(pid: int, tree: bool = False, kids: dict[int, list[int]] | None = None) -> tuple[float, float] | None:
    """(user, system) CPU seconds, all threads, of `pid`; with `tree`, plus its reaped children
    (cutime/cstime) and its live descendants (e.g. PostgreSQL backends)."""
    f = _stat_fields(pid)
    if f is None:
        return None
    user, sys_ = int(f[11]), int(f[12])
    if tree:
        user += int(f[13])
        sys_ += int(f[14])
        stack = list((kids or {}).get(pid, ()))
        while stack:
            c = stack.pop()
            cf = _stat_fields(c)
            if cf is not None:
                user += int(cf[11])
                sys_ += int(cf[12])
            stack.extend((kids or {}).get(c, ()))
    return user / CLK_TCK, sys_ / CLK_TCK


def box_cpu() -> tuple[int, int, int, int]:
    """(busy, steal, softirq, total) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, softirq, busy + steal + idle + iowait


def uses_uvloop(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "uvloop" in f.read()
    except OSError:
        return None


class Tracked:
    """The processes whose CPU is read around every phase (name -> pid, tree?)."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[int, bool]] = {}

    def add(self, name: str, pid: int, tree: bool = False) -> None:
        self.procs[name] = (pid, tree)

    def snapshot(self) -> dict[str, Any]:
        kids = _children_map() if any(t for _, t in self.procs.values()) else None
        cpu = {name: proc_cpu(pid, tree, kids) for name, (pid, tree) in self.procs.items()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"t": time.monotonic(), "cpu": cpu, "box": box_cpu(), "children": ru.ru_utime + ru.ru_stime}


PRODUCT_PROCS = ("edge", "connector", "access-echo", "access-sink", "access-pg")
# frames every sample has (entry points, the event loop itself): left out of the inclusive list
_BOILERPLATE = ("(click/", "<frozen runpy>", "(cli/main.py)", "(connector/main.py)", "(uvloop/__init__.py)",
                "Runner.run ", "run_until_complete ", "run_forever ", "_run_once ", "Handle._run ")


class Profiler:
    """Optional (`--profile DIR`): py-spy samples the product processes during each tunnel phase.

    Writes DIR/PHASE--PROC.txt (py-spy "raw" collapsed stacks) and, at the end, a self-time /
    inclusive-time summary per process and phase (DIR/summary.txt; also printed, abridged).
    Sampling is --nonblocking (the target is not paused), but py-spy itself costs CPU on a small box,
    so figures measured with --profile are a little lower than without.
    """

    def __init__(self, out_dir: Path, rate: int = 200) -> None:
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(self.exe):
            raise BenchError("--profile needs py-spy (pip install py-spy into the venv; not a project dependency)")
        self.dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.running: list[tuple[subprocess.Popen, Path]] = []
        self.files: list[tuple[str, str, Path]] = []

    def start(self, phase: str, pids: dict[str, int]) -> None:
        for name, pid in pids.items():
            out = self.dir / f"{phase.replace('/', '_')}--{name}.txt"
            p = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--nonblocking",
                                  "--format", "raw", "--output", str(out)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            self.running.append((p, out))
            self.files.append((phase, name, out))
        time.sleep(0.3)  # py-spy attaches asynchronously

    def stop(self) -> None:
        for p, _ in self.running:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p, _ in self.running:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.running.clear()

    @staticmethod
    def _frame_name(frame: str) -> str:
        # "func (path/to/file.py:123)" -> "func (file.py)"
        m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
        if not m:
            return frame.strip()
        path = m.group(2)
        parts = path.split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 else path
        return f"{m.group(1)} ({short})"

    def summarize(self, top: int = 12) -> str:
        lines: list[str] = []
        for phase, name, path in self.files:
            try:
                text = path.read_text()
            except OSError:
                continue
            self_t: dict[str, int] = {}
            incl: dict[str, int] = {}
            total = 0
            for line in text.splitlines():
                stack, _, cnt = line.rpartition(" ")
                if not stack or not cnt.isdigit():
                    continue
                n = int(cnt)
                total += n
                frames = [self._frame_name(f) for f in stack.split(";") if f]
                if frames and frames[0].startswith("process "):
                    frames = frames[1:]
                if frames and frames[0].startswith("thread "):
                    frames = frames[1:]
                if not frames:
                    continue
                self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
                for f in set(frames):
                    incl[f] = incl.get(f, 0) + n
            if not total:
                continue
            lines.append(f"== {phase} / {name}: {total} samples")
            lines.append("   self%  function")
            for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {100 * n / total:5.1f}  {f}")
            lines.append("   incl%  function")
            shown = [(f, n) for f, n in incl.items() if not any(b in f for b in _BOILERPLATE)]
            for f, n in sorted(shown, key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {100 * n / total:5.1f}  {f}")
        return "\n".join(lines)


def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    wall = b["t"] - a["t"]
    per, per_sys = {}, {}
    for name, v1 in b["cpu"].items():
        v0 = a["cpu"].get(name)
        if v0 is not None and v1 is not None:
            per[name] = round(v1[0] + v1[1] - v0[0] - v0[1], 3) + 0.0  # + 0.0: no "-0.00"
            per_sys[name] = round(v1[1] - v0[1], 3) + 0.0
    busy0, steal0, sirq0, tot0 = a["box"]
    busy1, steal1, sirq1, tot1 = b["box"]
    dt = max(1, tot1 - tot0)
    children = b["children"] - a["children"]
    # busy CPU time of the whole box not charged to a tracked process (other programs on the
    # box, kernel threads, ksoftirqd, and reaped children such as pgbench)
    other = (busy1 - busy0) / CLK_TCK - sum(per.values()) - children
    return {"wall_s": round(wall, 3), "cpu_s": per, "cpu_sys_s": per_sys,
            "box_busy_pct": round(100.0 * (busy1 - busy0) / dt, 1),
            "box_softirq_pct": round(100.0 * (sirq1 - sirq0) / dt, 1),
            "box_steal_pct": round(100.0 * (steal1 - steal0) / dt, 1),
            "box_other_cpu_s": round(other, 3),
            "reaped_children_cpu_s": round(children, 3)}


# ------------------------------------------------------------------------------ processes


class LoadGen:
    """`python -m bench.loadgen` with a JSON-lines pipe; every read has a deadline."""

    def __init__(self, log_dir: Path) -> None:
        self.stderr = open(log_dir / "loadgen.stderr.log", "wb")
        self.popen = subprocess.Popen(
            pdeathsig_prefix("KILL") + [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=base_env(),
            cwd=str(REPO_ROOT), start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.popen.stdout, selectors.EVENT_READ)
        self.buf = b""
        hello = self._read_line(30.0)
        self.uvloop = bool(hello.get("uvloop"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read_line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"loadgen did not answer within {timeout:.0f}s")
            if self.sel.select(min(left, 1.0)):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(f"loadgen exited (rc={self.popen.poll()}); see its stderr log")
                self.buf += chunk
            elif self.popen.poll() is not None:
                raise BenchError(f"loadgen exited with {self.popen.returncode}; see its stderr log")
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        timeout = float(cmd.setdefault("timeout", 120.0))
        self.popen.stdin.write((json.dumps(cmd) + "\n").encode())
        self.popen.stdin.flush()
        return self._read_line(timeout + 15.0)

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.write(b'{"op": "quit"}\n')
                self.popen.stdin.flush()
                self.popen.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.stderr.close()


class Stack:
    """Everything the bench starts; `close()` stops it all (bounded), in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.procs: list[Proc] = []
        self.loadgen: LoadGen | None = None
        self.pg: Any = None
        self.bouncer: Proc | None = None
        self.tracked = Tracked()
        self.profiler: Profiler | None = None
        self.env = {"HD_STATE_DIR": str(self.state_dir), "HD_LOG_LEVEL": "WARNING"}
        self.token = ""
        self.connector: Proc | None = None
        self.protocol: str | None = None  # the running connector's --protocol
        self.connectors: list[dict[str, Any]] = []  # every connector started: protocol, pid, its connection

    def start_proc(self, name: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> Proc:
        p = Proc(argv, env=env, name=name, log_dir=self.log_dir, cwd=str(REPO_ROOT), **kw)
        self.procs.append(p)
        return p

    def hd(self, *args: str, timeout: float = 30.0) -> Any:
        r = run(hd_argv(*args), env=self.env, timeout=timeout, cwd=str(REPO_ROOT))
        if r.returncode != 0:
            raise BenchError(f"`hd {' '.join(args)}` failed ({r.returncode}):\n{r.stderr.strip()}\n{r.stdout.strip()}")
        return json.loads(r.stdout) if "--json" in args else r.stdout

    # -- origin / loadgen ----------------------------------------------------------------------
    def start_origin(self) -> dict[str, Any]:
        p = self.start_proc("origin", [sys.executable, "-m", "bench.origin"])
        line = p.wait_for(lambda: p.stdout_text().partition("\n")[0] if "\n" in p.stdout_text() else None,
                          20.0, what="origin ports")
        info = json.loads(line)
        self.tracked.add("origin", p.pid)
        return info

    def start_loadgen(self) -> LoadGen:
        self.loadgen = LoadGen(self.log_dir)
        self.tracked.add("loadgen", self.loadgen.pid)
        return self.loadgen

    # -- tunnel ----------------------------------------------------------------------------------
    def start_edge(self) -> dict[str, Any]:
        p = self.start_proc("edge", hd_argv("edge", "--state-dir", str(self.state_dir),
                                            "--api-listen", f"{HOST}:0", "--tunnel-listen", f"{HOST}:0",
                                            "--pg-listen", f"{HOST}:0", "--mysql-listen", f"{HOST}:0"),
                            env=self.env)
        edge_json = self.state_dir / "edge.json"

        def ready() -> dict[str, Any] | None:
            try:
                info = json.loads(edge_json.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("api_url") else None

        info = p.wait_for(ready, 30.0, what="edge.json")
        self.tracked.add("edge", p.pid)
        return info

    def start_connector(self, token: str, protocol: str | None = None) -> Proc:
        """Start the connector (`--protocol protocol`; None: the connector's default, auto) and
        wait until the relay lists its one connection, on `protocol` when given."""
        tf = self.workdir / "tunnel.token"
        tf.write_text(token)
        os.chmod(tf, 0o600)
        self.token = token
        extra = ("--protocol", protocol) if protocol else ()
        p = self.start_proc(f"connector-{len(self.connectors) + 1}-{protocol or 'auto'}",
                            connector_argv("--token-file", str(tf), "--ha-connections", "1",
                                           "--loglevel", "warning", *extra))
        self.tracked.add("connector", p.pid)
        conn: dict[str, Any] = {}

        def connected() -> bool:
            p.check_alive()
            conns = self.hd("tunnel", "info", "bench", "--json").get("connections") or []
            if len(conns) != 1 or (protocol and conns[0].get("protocol") != protocol):
                return False  # not yet, or the previous connector's connection is still listed
            conn.update(conns[0])
            return True

        poll_until(connected, 30.0, interval=0.05, what=f"the connector to register over {protocol or 'auto'}",
                   on_timeout=p.diagnostics)
        self.connector, self.protocol = p, protocol
        self.connectors.append({"protocol": protocol, "pid": p.pid, "connection": conn})
        return p

    def use_protocol(self, protocol: str) -> bool:
        """Make the running connector one started with `--protocol protocol` (restart it when it
        is not). True when it was (re)started."""
        if self.connector is not None and self.protocol == protocol and self.connector.alive():
            return False
        if self.connector is not None:
            self.connector.stop(timeout=10.0)  # SIGTERM: drains (no streams are open between phases)
            self.procs.remove(self.connector)
            self.connector = None
        log(f"connector: --protocol {protocol}")
        self.start_connector(self.token, protocol)
        return True

    def start_access(self, name: str, hostname: str) -> int:
        port = free_port(HOST)
        p = self.start_proc(name, hd_argv("access", "tcp", "--hostname", hostname, "--url", f"{HOST}:{port}"),
                            env=self.env)
        wait_listening(HOST, port, 20.0, proc=p)
        self.tracked.add(name, p.pid)
        return port

    # -- shutdown --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
        if self.loadgen is not None:
            self.loadgen.stop()
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5.0)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {p.name}: {exc}")
        if self.bouncer is not None:
            try:
                self.bouncer.stop(timeout=5.0)
            except Exception as exc:
                log(f"stopping pgbouncer: {exc}")
        if self.pg is not None:
            try:
                self.pg.stop()
            except Exception as exc:
                log(f"stopping postgres: {exc}")


def wait_echo(port: int, timeout: float) -> None:
    """One 64-byte echo through `port`, retried until it works (config push, stream open)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=5.0) as s:
                s.sendall(b"x" * 64)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        raise ConnectionError("closed before the echo")
                    got += chunk
                return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise BenchError(f"no echo through 127.0.0.1:{port} within {timeout:.0f}s: {last}")


# ------------------------------------------------------------------------------ phases


def _profiled_pids(stack: Stack) -> dict[str, int]:
    return {n: pid for n, (pid, _) in stack.tracked.procs.items() if n in PRODUCT_PROCS}


def run_phase(stack: Stack, name: str, cmd: dict[str, Any]) -> dict[str, Any]:
    assert stack.loadgen is not None
    prof = stack.profiler if not name.startswith("direct/") else None
    if prof is not None:
        prof.start(name, _profiled_pids(stack))
    try:
        before = stack.tracked.snapshot()
        res = stack.loadgen.call(cmd)
        after = stack.tracked.snapshot()
    finally:
        if prof is not None:
            prof.stop()
    if "error" in res:
        raise BenchError(f"phase {name}: {res['error']}\n{res.get('traceback', '')}")
    res["cpu"] = cpu_delta(before, after)
    add_cost(res, cmd)
    log(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()
                                 if isinstance(v, (int, float)) and k in ("p50_us", "p99_us", "rps", "gbit_s")))
    return res


def add_cost(res: dict[str, Any], cmd: dict[str, Any]) -> None:
    """CPU time per unit of work, per process: µs per round trip / connection / transaction,
    or CPU seconds per GiB for bulk. Normalises phases of different length and rate."""
    op = cmd.get("op")
    if op in ("rps", "latency"):
        units, unit, scale = res.get("total_round_trips"), "us_per_round_trip", 1e6
    elif op == "connect":
        units, unit, scale = cmd.get("count"), "us_per_connection", 1e6
    elif op == "bulk":
        units, unit, scale = res.get("bytes", 0) / (1 << 30), "cpu_s_per_gib", 1.0
    elif op == "pgbench":
        units, unit, scale = res.get("transactions"), "us_per_transaction", 1e6
    else:
        return
    if not units:
        return
    res["cpu"]["cost_unit"] = unit
    res["cpu"]["cost"] = {n: round(v * scale / units, 3) + 0.0 for n, v in res["cpu"]["cpu_s"].items()}


KEY_METRIC = {"latency": "p50_us", "rps_1": "rps", "rps_10": "rps", "rps_100": "rps", "bulk": "gbit_s",
              "connect": "p50_us", "pgbench": "tps"}


def pick_median(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (lower middle for an even count), with the spread of
    `key` over all runs attached; its CPU figures stay consistent with its own numbers."""
    ordered = sorted(runs, key=lambda r: r[key])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    values = [r[key] for r in runs]
    chosen["repeats"] = {"key": key, "values": values, "min": min(values), "max": max(values)}
    return chosen


def round_order(stack: Stack, protocols: list[str]) -> list[str]:
    """The transports in the order one round measures them: the running connector's first (so
    rounds alternate the order, and the connector restarts once per round)."""
    return sorted(protocols, key=lambda p: p != stack.protocol)


def switch_to(stack: Stack, protocol: str, echo_port: int) -> None:
    """The connector on `protocol`, answering, and warmed up (untimed: imports, first streams)."""
    if stack.use_protocol(protocol):
        wait_echo(echo_port, 30.0)
        stack.loadgen.call({"op": "latency", "host": HOST, "port": echo_port, "warmup": 50, "count": 50})


def measure(stack: Stack, args: argparse.Namespace, ports: dict[str, dict[str, int]],
            protocols: list[str]) -> dict[str, Any]:
    """Every figure --repeat times: each round measures the direct path, then the tunnel path over
    each transport (so slow drift of a shared box hits all alike); the median run of each figure
    is reported. Returns {"direct": figures, "tunnel": {protocol: figures}}."""
    t = float(args.duration)
    stack.loadgen.call({"op": "latency", "host": HOST, "port": ports["direct"]["echo"], "warmup": 50, "count": 50})
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("latency", "echo", {"op": "latency", "warmup": args.rtt_warmup, "count": args.rtt_count, "size": 64,
                             "timeout": 120.0}),
    ]
    for c in (1, 10, 100):
        steps.append((f"rps_{c}", "echo", {"op": "rps", "conns": c, "duration": t, "size": 64,
                                            "warmup_s": min(1.0, 0.2 * t), "timeout": t + 90.0}))
    steps.append(("bulk", "sink", {"op": "bulk", "mib": args.bulk_mib, "timeout": 300.0}))
    steps.append(("connect", "echo", {"op": "connect", "count": args.connect_count, "size": 64, "timeout": 120.0}))
    labels = ["direct", *protocols]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p: {f: [] for f, _, _ in steps} for p in labels}
    for rep in range(args.repeat):
        for label in ["direct", *round_order(stack, protocols)]:
            path = "direct" if label == "direct" else "tunnel"
            if path == "tunnel":
                switch_to(stack, label, ports[path]["echo"])
            for figure, server, cmd in steps:
                tag = f"{label}/{figure}" + (f" #{rep + 1}" if args.repeat > 1 else "")
                runs[label][figure].append(run_phase(stack, tag, {**cmd, "host": HOST, "port": ports[path][server]}))
    medians = {label: {fig: pick_median(rs, KEY_METRIC[fig]) for fig, rs in figs.items()}
               for label, figs in runs.items()}
    return {"direct": medians.pop("direct"), **({"tunnel": medians} if protocols else {})}


# ------------------------------------------------------------------------------ pgbench


_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
_LAT = re.compile(r"latency average = ([0-9.]+) ms")
_CONN = re.compile(r"initial connection time = ([0-9.]+) ms")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_XACTS = re.compile(r"number of transactions actually processed: (\d+)")


def pgbench(stack: Stack, label: str, port: int, duration: float, extra_track: dict[str, tuple[int, bool]],
            profile: bool = False) -> dict[str, Any]:
    exe = shutil.which("pgbench")
    argv = [exe, "-S", "-n", "-c", "10", "-j", "2", "-T", str(int(max(1, duration))),
            "-h", HOST, "-p", str(port), "-U", "postgres", "postgres"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGSSLMODE": "disable", "LC_ALL": "C"}
    saved = dict(stack.tracked.procs)
    for k, v in extra_track.items():
        stack.tracked.add(k, *v)
    backends0 = len(_children_map().get(stack.pg.pid, ()))
    prof = stack.profiler if profile else None
    if prof is not None:
        prof.start(f"pgbench/{label}", _profiled_pids(stack))
    try:
        before = stack.tracked.snapshot()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, env=env,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchError(f"pgbench ({label}) did not finish within {duration + 60:.0f}s") from None
        # let the server reap pgbench's backends so their CPU time lands in the postmaster's cutime
        # (PgBouncer keeps its pooled server connections: those stay, and are read live)
        pm = stack.pg.pid
        if label != "pgbouncer":
            try:
                poll_until(lambda: len(_children_map().get(pm, ())) <= backends0, 2.0,
                           what="postgres backends to exit")
            except WaitTimeout:
                pass
        after = stack.tracked.snapshot()
    finally:
        stack.tracked.procs = saved
        if prof is not None:
            prof.stop()
    text = r.stdout + r.stderr
    m = _TPS.search(text)
    if r.returncode != 0 or not m:
        raise BenchError(f"pgbench ({label}) failed ({r.returncode}):\n{text[-2000:]}")
    cpu = cpu_delta(before, after)
    cpu["cpu_s"]["pgbench"] = cpu.pop("reaped_children_cpu_s")
    res: dict[str, Any] = {"argv": argv, "tps": float(m.group(1)), "cpu": cpu}
    for key, rx, conv in (("latency_avg_ms", _LAT, float), ("connect_ms", _CONN, float),
                          ("failed", _FAILED, int), ("transactions", _XACTS, int)):
        mm = rx.search(text)
        if mm:
            res[key] = conv(mm.group(1))
    add_cost(res, {"op": "pgbench"})
    log(f"pgbench/{label}: tps={res['tps']:.0f} latency={res.get('latency_avg_ms')} ms")
    return res


def start_pgbouncer(stack: Stack, pg_port: int) -> int | None:
    exe = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if exe is None:
        return None
    d = Path(tempfile.mkdtemp(prefix="hd-bench-pgbouncer-"))
    port = free_port(HOST)
    (d / "userlist.txt").write_text('"postgres" ""\n')
    (d / "pgbouncer.ini").write_text(f"""[databases]
postgres = host={HOST} port={pg_port} dbname=postgres user=postgres

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {d}/userlist.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
logfile = {d}/pgbouncer.log
pidfile =
log_connections = 0
log_disconnections = 0
""")
    kw: dict[str, Any] = {}
    argv = [exe, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root: let it drop to the postgres OS user
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        for f in d.iterdir():
            os.chown(f, pw.pw_uid, pw.pw_gid)
        argv = [exe, "-u", "postgres", str(d / "pgbouncer.ini")]
    p = Proc(argv, name="pgbouncer", log_dir=stack.log_dir, **kw)
    stack.bouncer = p
    stack.workdir_pgbouncer = d  # type: ignore[attr-defined]
    wait_listening(HOST, port, 20.0, proc=p)
    return port


def measure_pg(stack: Stack, args: argparse.Namespace, ports: dict[str, dict[str, int]],
               protocols: list[str]) -> dict[str, Any]:
    """pgbench directly, through `hd access tcp` over each transport, and through PgBouncer; rounds
    as in measure(). Returns {"direct": r, "tunnel": {protocol: r}, "pgbouncer": r} (medians)."""
    cluster = stack.pg
    out: dict[str, Any] = {}
    init = subprocess.run([shutil.which("pgbench"), "-i", "-q", "-s", "1", "-h", HOST, "-p", str(cluster.port),
                           "-U", "postgres", "postgres"], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGSSLMODE": "disable"},
                          stdin=subprocess.DEVNULL)
    if init.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{init.stderr[-2000:]}")
    pg_track = {"postgres": (cluster.pid, True)}
    d = float(args.pg_duration)
    bport: int | None = None
    if args.no_pgbouncer:
        out["pgbouncer_note"] = "skipped (--no-pgbouncer)"
    else:
        bport = start_pgbouncer(stack, cluster.port)
        if bport is None:
            out["pgbouncer_note"] = "pgbouncer not installed (scripts/bootstrap.sh installs it)"
            log("pgbouncer not installed: skipping the PgBouncer anchor")
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for label in ["direct", *round_order(stack, protocols), *(["pgbouncer"] if bport else [])]:
            if label == "direct":
                port, track = cluster.port, pg_track
            elif label == "pgbouncer":
                port, track = bport, {**pg_track, "pgbouncer": (stack.bouncer.pid, False)}
            else:
                switch_to(stack, label, ports["tunnel"]["echo"])
                port, track = ports["tunnel"]["pg"], pg_track
            runs.setdefault(label, []).append(pgbench(stack, label, port, d, track, profile=label in protocols))
    medians = {label: pick_median(rs, "tps") for label, rs in runs.items()}
    out["direct"] = medians.pop("direct")
    if "pgbouncer" in medians:
        out["pgbouncer"] = medians.pop("pgbouncer")
    if protocols:
        out["tunnel"] = {proto: medians[proto] for proto in protocols}
    return out


# ------------------------------------------------------------------------------ report


def _fmt(v: Any, unit: str = "", nd: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and v != v:
        return "nan"
    if nd == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{nd}f}{unit}"


def _ratio(t: Any, d: Any) -> str:
    if t is None or d is None or not d:
        return "—"
    r = t / d
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"  # small ratios (bulk) keep two significant digits


# (figure, metric) pairs compared with the direct path in summary.tunnel.PROTOCOL.ratio_to_direct
RATIO_FIGURES = (("latency", "p50_us"), ("latency", "p99_us"), ("rps_1", "rps"), ("rps_10", "rps"),
                 ("rps_100", "rps"), ("bulk", "gbit_s"), ("connect", "p50_us"), ("connect", "p99_us"))
SHORT = {"websocket": "ws", "quic": "quic"}


def busiest(cpu: dict[str, Any], top: int = 2) -> list[dict[str, Any]]:
    """The `top` processes with the most CPU in a phase, as % of one core (~100 %: CPU-bound)."""
    wall = cpu["wall_s"] or 1e-9
    ranked = sorted(cpu["cpu_s"].items(), key=lambda kv: -kv[1])[:top]
    return [{"proc": n, "cpu_pct": round(100 * v / wall)} for n, v in ranked]


def pg_rows(pg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """pgbench results in table order: direct, each transport, pgbouncer."""
    rows = [("direct", pg["direct"])] if "direct" in pg else []
    rows += list((pg.get("tunnel") or {}).items())
    return rows + ([("pgbouncer", pg["pgbouncer"])] if "pgbouncer" in pg else [])


def cpu_phases(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, cpu) of every phase, grouped by figure: direct/F, PROTOCOL/F for each transport, ...;
    then pgbench/LABEL."""
    d, tunnel = res["paths"].get("direct", {}), res["paths"].get("tunnel", {})
    phases: list[tuple[str, dict[str, Any]]] = []
    for fig in dict.fromkeys([*d, *(f for figs in tunnel.values() for f in figs)]):
        for label, figs in (("direct", d), *tunnel.items()):
            if fig in figs:
                phases.append((f"{label}/{fig}", figs[fig]["cpu"]))
    phases += [(f"pgbench/{label}", r["cpu"]) for label, r in pg_rows(res.get("pgbench") or {})]
    return phases


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    d, tunnel = res["paths"].get("direct", {}), res["paths"].get("tunnel", {})
    pg = res.get("pgbench") or {}
    per: dict[str, Any] = {}
    for proto, t in tunnel.items():
        added50 = t["latency"]["p50_us"] - d["latency"]["p50_us"]
        ratios = {f"{fig}.{m}": round(t[fig][m] / d[fig][m], 4) for fig, m in RATIO_FIGURES if d[fig].get(m)}
        tps = (pg.get("tunnel") or {}).get(proto, {}).get("tps")
        if tps and pg.get("direct", {}).get("tps"):
            ratios["pgbench.tps"] = round(tps / pg["direct"]["tps"], 4)
        per[proto] = {
            "added_rtt_p50_us": added50,
            "added_rtt_p99_us": t["latency"]["p99_us"] - d["latency"]["p99_us"],
            "ratio_to_direct": ratios,
            "busiest": {fig: busiest(r["cpu"]) for fig, r in t.items()}
                       | ({"pgbench": busiest(pg["tunnel"][proto]["cpu"])} if tps else {}),
            "targets": {
                "bulk_gbit_s": {"value": t["bulk"]["gbit_s"], "target": f">= {TARGETS['bulk_gbit_s']}",
                                "pass": t["bulk"]["gbit_s"] >= TARGETS["bulk_gbit_s"]},
                "added_rtt_p50_us": {"value": added50, "target": f"<= {TARGETS['added_rtt_p50_us']:.0f}",
                                     "pass": added50 <= TARGETS["added_rtt_p50_us"]},
                "rps_100": {"value": t["rps_100"]["rps"], "target": f">= {TARGETS['rps_100']:.0f}",
                            "pass": t["rps_100"]["rps"] >= TARGETS["rps_100"]},
            },
        }
    s: dict[str, Any] = {"auto_prefers": AUTO_PREFERS}
    if per:
        # the headline figures: those of the transport a default (`--protocol auto`) connector uses
        default = AUTO_PREFERS if AUTO_PREFERS in per else next(iter(per))
        s.update({"targets_protocol": default, "targets": per[default]["targets"],
                  "added_rtt_p50_us": per[default]["added_rtt_p50_us"],
                  "added_rtt_p99_us": per[default]["added_rtt_p99_us"], "tunnel": per})
        if len(per) == 2:
            a, b = per
            s[f"{b}_over_{a}"] = {k: round(per[b]["ratio_to_direct"][k] / v, 4)
                                  for k, v in per[a]["ratio_to_direct"].items()
                                  if v and k in per[b]["ratio_to_direct"]}
    return s


def print_report(res: dict[str, Any]) -> None:
    P = lambda *a: print(*a, flush=True)  # noqa: E731
    d, tunnel = res["paths"].get("direct", {}), res["paths"].get("tunnel", {})
    protos = list(tunnel)
    per = res["summary"].get("tunnel", {})

    def verdicts(key: str) -> str:
        if not key or not per:
            return ""
        first = next(iter(per.values()))["targets"][key]
        marks = "  ".join(f"{SHORT.get(pr, pr)} {'PASS' if per[pr]['targets'][key]['pass'] else 'MISS'}"
                          for pr in protos)
        return f"{first['target']:>9}  {marks}"

    P()
    P(f"Tunnel benchmark — {res['timestamp']} — {res['machine']['nproc']} CPUs, Python "
      f"{res['machine']['python']}, uvloop {'yes' if res['machine']['uvloop'] else 'no'}"
      f" — median of {res['config']['repeat']} run(s) per figure" + ("  [QUICK]" if res["config"]["quick"] else ""))
    P(f"connector transports: {', '.join(protos) or 'none'}; `--protocol auto` prefers {AUTO_PREFERS}"
      " (connector/protocol.py)")
    if "product_source_at_end" in res:
        P(f"WARNING: the product source changed during the run (newest file "
          f"{res['product_source_at_end']['newest_mtime']}): the figures mix code versions; run it again")
    P()
    rows: list[tuple[str, str, str, str, str]] = []  # label, figure, metric, kind, target key
    rows.append(("RTT 64 B p50 (µs)", "latency", "p50_us", "lat", ""))
    rows.append(("RTT 64 B p99 (µs)", "latency", "p99_us", "lat", ""))
    for c in (1, 10, 100):
        rows.append((f"req/s, {c} conn{'s' if c > 1 else ''}", f"rps_{c}", "rps", "rps", "rps_100" if c == 100 else ""))
        rows.append(("  p50 / p99 under load (µs)", f"rps_{c}", "", "pair", ""))
    rows.append((f"bulk {res['config']['bulk_mib']:g} MiB (Gbit/s)", "bulk", "gbit_s", "gbit", "bulk_gbit_s"))
    rows.append(("new conn + echo p50 (µs)", "connect", "p50_us", "lat", ""))
    rows.append(("new conn + echo p99 (µs)", "connect", "p99_us", "lat", ""))

    def spread(path: dict, fig: str, metric: str, nd: int) -> str:
        rep = path.get(fig, {}).get("repeats")
        if not rep or rep["key"] != metric or len(rep["values"]) < 2:
            return ""
        return f"{_fmt(rep['min'], nd=nd)}–{_fmt(rep['max'], nd=nd)}"

    def pair(x: dict) -> str:
        return f"{_fmt(x.get('p50_us'))}/{_fmt(x.get('p99_us'))}" if x else "—"

    cmp = f"{SHORT.get(protos[1], protos[1])}/{SHORT.get(protos[0], protos[0])}" if len(protos) == 2 else ""
    w = 30
    P(f"{'figure':<{w}} {'direct':>12}" + "".join(f" │ {pr:>12} {'×direct':>8} {'min–max':>15}" for pr in protos)
      + (f" │ {cmp:>8}" if cmp else "") + (f" │ {'target':>9}" if protos else ""))
    P("-" * (w + 13 + 40 * len(protos) + (11 if cmp else 0) + 25))
    for label, fig, metric, kind, key in rows:
        df = d.get(fig, {})
        if kind == "pair":
            P(f"{label:<{w}} {pair(df):>12}" + "".join(f" │ {pair(tunnel[pr].get(fig, {})):>12} {'':>8} {'':>15}"
                                                       for pr in protos))
            continue
        nd = 2 if kind == "gbit" else 0
        dv = df.get(metric)
        line = f"{label:<{w}} {_fmt(dv, nd=nd):>12}"
        vals = [tunnel[pr].get(fig, {}).get(metric) for pr in protos]
        for pr, tv in zip(protos, vals):
            line += f" │ {_fmt(tv, nd=nd):>12} {_ratio(tv, dv):>8} {spread(tunnel[pr], fig, metric, nd):>15}"
        if cmp:
            line += f" │ {_ratio(vals[1], vals[0]):>8}"
        P(line + (f" │ {verdicts(key)}" if key else ""))
    if protos:
        line = f"{'added RTT p50 / p99 (µs)':<{w}} {'':>12}"
        for pr in protos:
            line += f" │ {_fmt(per[pr]['added_rtt_p50_us']) + ' / ' + _fmt(per[pr]['added_rtt_p99_us']):>12} {'':>8} {'':>15}"
        P(line + (f" │ {'':>8}" if cmp else "") + f" │ {verdicts('added_rtt_p50_us')}")
    else:
        P(f"(tunnel path not measured: {res.get('tunnel_note', '')})")

    pg = res.get("pgbench")
    if pg:
        P()
        P(f"pgbench -S -c 10 -j 2 -T {res['config']['pg_duration']:g} (select-only, scale 1)")
        P(f"{'path':<{w}} {'tps':>12} {'lat avg (ms)':>14} {'tps/direct':>12} {'tps min–max':>16}")
        P("-" * (w + 58))
        dt = pg.get("direct", {}).get("tps")
        for label, x in pg_rows(pg):
            rep = x.get("repeats", {})
            rng = f"{_fmt(rep['min'])}–{_fmt(rep['max'])}" if len(rep.get("values", [])) > 1 else ""
            name = f"tunnel, {label}" if label in protos else label
            P(f"{name:<{w}} {_fmt(x['tps']):>12} {_fmt(x.get('latency_avg_ms'), nd=3):>14}"
              f" {_ratio(x['tps'], dt):>12} {rng:>16}")
        if "pgbouncer_note" in pg:
            P(f"(pgbouncer: {pg['pgbouncer_note']})")
    elif res.get("pgbench_note"):
        P()
        P(f"(pgbench: {res['pgbench_note']})")

    if per:
        P()
        P("Busiest processes per tunnel phase, % of one core (about 100 % = that process is CPU-bound)")
        cw = 34
        P(f"{'phase':<10} " + " ".join(f"{pr:<{cw}}" for pr in protos))
        for fig in dict.fromkeys(f for pr in protos for f in per[pr]["busiest"]):
            cells = [", ".join(f"{b['proc']} {b['cpu_pct']}%" for b in per[pr]["busiest"].get(fig, [])) or "—"
                     for pr in protos]
            P(f"{fig:<10} " + " ".join(f"{c:<{cw}}" for c in cells))

    # CPU per phase and process
    phases = cpu_phases(res)
    if phases:
        names: list[str] = []
        for _, c in phases:
            for n in c["cpu_s"]:
                if n not in names:
                    names.append(n)
        P()
        P("CPU seconds per process per phase (% of one core). other = box CPU not charged to these")
        P("processes (other programs, kernel threads); box = busy/softirq/steal % of all CPUs")
        cw = 12
        P(f"{'phase':<18} {'wall s':>6} " + " ".join(f"{n[:cw]:>{cw}}" for n in names + ['other'])
          + f" {'box %':>14}")
        P("-" * (18 + 8 + (cw + 1) * (len(names) + 1) + 15))
        for label, c in phases:
            wall = c["wall_s"] or 1e-9
            cells = []
            for n in names + ["other"]:
                v = c["box_other_cpu_s"] if n == "other" else c["cpu_s"].get(n)
                cells.append(f"{'—' if v is None else f'{v:.2f} {100 * v / wall:3.0f}%':>{cw}}")
            box = f"{c['box_busy_pct']:.0f}/{c['box_softirq_pct']:.0f}/{c['box_steal_pct']:.0f}"
            P(f"{label:<18} {c['wall_s']:>6.2f} " + " ".join(cells) + f" {box:>14}")
        P()
        P("CPU cost per unit of work and process: µs per round trip (latency, req/s), per connection (connect),")
        P("per transaction (pgbench); CPU seconds per GiB (bulk). Warm-up is included in both CPU and units.")
        P(f"{'phase':<18} {'unit':>9} " + " ".join(f"{n[:cw]:>{cw}}" for n in names)
          + f" {'all':>{cw}} {'hd procs':>{cw}}")
        P("-" * (18 + 11 + (cw + 1) * (len(names) + 2)))
        short = {"us_per_round_trip": "µs/RT", "us_per_connection": "µs/conn", "us_per_transaction": "µs/xact",
                 "cpu_s_per_gib": "s/GiB"}
        for label, c in phases:
            cost = c.get("cost")
            if not cost:
                continue
            cells = [f"{'—' if cost.get(n) is None else f'{cost[n]:,.1f}':>{cw}}" for n in names]
            P(f"{label:<18} {short.get(c['cost_unit'], c['cost_unit']):>9} " + " ".join(cells)
              + f" {sum(v for v in cost.values()):>{cw},.1f}"
              + f" {sum(v for n, v in cost.items() if n in PRODUCT_PROCS):>{cw},.1f}")
        P()
        P("Kernel share of each process's CPU (system time / total), tunnel phases; '·' = under 0.05 s of CPU")
        hd_names = [n for n in names if n in PRODUCT_PROCS]
        P(f"{'phase':<18} " + " ".join(f"{n[:cw]:>{cw}}" for n in hd_names))
        for label, c in phases:
            head, _, tail = label.partition("/")
            if (tail if head == "pgbench" else head) not in protos:
                continue
            cells = []
            for n in hd_names:
                tot, sy = c["cpu_s"].get(n), c.get("cpu_sys_s", {}).get(n)
                cells.append(f"{'·' if not tot or tot < 0.05 or sy is None else f'{100 * sy / tot:.0f}%':>{cw}}")
            P(f"{label:<18} " + " ".join(cells))
    P()
    P(f"JSON: {res['json_path']}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.tunnel_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run: small counts, 1 s durations")
    ap.add_argument("--duration", type=float, default=None, help="seconds per requests/s phase (default 5; quick 1)")
    ap.add_argument("--bulk-mib", type=float, default=None, help="MiB per bulk transfer (default 512; quick 16)")
    ap.add_argument("--rtt-count", type=int, default=None, help="measured round trips (default 3000; quick 300)")
    ap.add_argument("--rtt-warmup", type=int, default=None, help="warm-up round trips (default 300; quick 30)")
    ap.add_argument("--connect-count", type=int, default=None, help="new-connection samples (default 200; quick 20)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of every figure; the median run is reported (default 3; quick 1)")
    ap.add_argument("--pg-duration", type=float, default=None, help="pgbench -T seconds (default: --duration)")
    ap.add_argument("--no-pg", action="store_true", help="skip the pgbench part")
    ap.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer anchor")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), metavar="P[,P]",
                    help="connector transports to measure the tunnel path over, in this order, one connector "
                         f"at a time (`hd-connector --protocol P`); default {','.join(PROTOCOLS)}")
    ap.add_argument("--direct-only", action="store_true", help="measure only the direct path (no edge/connector)")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="where to write JSON (default bench/results/tunnel.json; quick: tunnel-quick.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the process logs")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="sample the product processes with py-spy during every tunnel phase; stacks and a "
                         "summary go to DIR (figures are then slightly lower: py-spy uses CPU too)")
    ap.add_argument("--hold", action="store_true",
                    help="start everything, print the ports and pids, wait for Ctrl-C (for profiling by hand)")
    a = ap.parse_args(argv)
    q = a.quick
    defaults = {"duration": 1.0 if q else 5.0, "bulk_mib": 16.0 if q else 512.0, "rtt_count": 300 if q else 3000,
                "rtt_warmup": 30 if q else 300, "connect_count": 20 if q else 200, "repeat": 1 if q else 3}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.pg_duration is None:
        a.pg_duration = a.duration
    if a.json_out is None:
        a.json_out = RESULTS_DIR / ("tunnel-quick.json" if q else "tunnel.json")
    a.protocols = list(dict.fromkeys(x.strip() for x in a.protocols.split(",") if x.strip()))
    unknown = [x for x in a.protocols if x not in PROTOCOLS]
    if unknown or not a.protocols:
        ap.error(f"--protocols: {', '.join(unknown) or 'none given'}; choose from {', '.join(PROTOCOLS)}")
    if a.direct_only:
        a.protocols = []
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = [sys.executable, "-m", "bench.tunnel_bench", *(sys.argv[1:] if argv is None else argv)]

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    from bench.common import source_digest  # (bench.common imports this module: not at the top)

    workdir = Path(tempfile.mkdtemp(prefix="hd-bench-"))
    stack = Stack(workdir)
    have_uvloop = importlib.util.find_spec("uvloop") is not None
    res: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": cmdline,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "uvloop": have_uvloop,
                    "platform": platform.platform(), "cpu_model": _cpu_model()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "product_source": source_digest(),  # which product code was measured (others may be editing it)
        "paths": {},
    }
    ok = False
    try:
        log(f"workdir {workdir}")
        if args.profile is not None:
            stack.profiler = Profiler(args.profile)
        origin = stack.start_origin()
        ports: dict[str, dict[str, int]] = {"direct": {"echo": origin["echo"], "sink": origin["sink"]}}
        want_pg = not args.no_pg and shutil.which("pgbench") is not None
        if not args.no_pg and not want_pg:
            res["pgbench_note"] = "pgbench not installed: skipped"
            log(res["pgbench_note"])
        if want_pg:
            from tests.harness.pg import PgCluster

            stack.pg = PgCluster(auth="trust").start()
            log(f"postgres on port {stack.pg.port}")
        if args.direct_only:
            res["tunnel_note"] = "--direct-only"
        else:
            edge = stack.start_edge()
            log(f"edge up: api {edge['api_url']}, tunnels {edge['tunnel_url']}")
            tun = stack.hd("tunnel", "create", "bench", "--json")
            for host, port in (("echo.bench", origin["echo"]), ("sink.bench", origin["sink"])) + (
                    (("pg.bench", stack.pg.port),) if want_pg else ()):
                stack.hd("tunnel", "route", "bench", host, "--service", f"tcp://{HOST}:{port}", "--public", "--json")
            stack.start_connector(tun["token"], args.protocols[0])
            log(f"connector registered over {args.protocols[0]}")
            ports["tunnel"] = {"echo": stack.start_access("access-echo", "echo.bench"),
                               "sink": stack.start_access("access-sink", "sink.bench")}
            if want_pg:
                ports["tunnel"]["pg"] = stack.start_access("access-pg", "pg.bench")
            wait_echo(ports["tunnel"]["echo"], 30.0)
            log("tunnel path answers")
        if args.hold:
            print(json.dumps({"paths": ports, "pg": getattr(stack.pg, "port", None), "protocol": stack.protocol,
                              "pids": {n: pid for n, (pid, _) in stack.tracked.procs.items()},
                              "logs": str(stack.log_dir), "env": stack.env}, indent=2), flush=True)
            log("holding; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        stack.start_loadgen()
        res["machine"]["uvloop_in_process"] = {n: uses_uvloop(pid) for n, (pid, _) in stack.tracked.procs.items()}
        res["pids"] = {n: pid for n, (pid, _) in stack.tracked.procs.items()}
        res["paths"] = measure(stack, args, ports, args.protocols)
        if want_pg:
            res["pgbench"] = measure_pg(stack, args, ports, args.protocols)
        res["summary"] = summarize(res)
        end_source = source_digest()
        if end_source["sha256"] != res["product_source"]["sha256"]:
            # processes started (or restarted) after the change run other code than the edge did
            res["product_source_at_end"] = end_source
            log(f"WARNING: the product source changed during the run ({end_source['newest_mtime']}): run it again")
        ok = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        res["error"] = "interrupted"
    except (BenchError, WaitTimeout, AssertionError, OSError) as exc:
        log(f"FAILED: {exc}")
        res["error"] = str(exc)
    except Exception as exc:  # a bug here: still stop everything and say what happened
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(exc).__name__}: {exc}")
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["connectors"] = stack.connectors  # every connector started: protocol, pid, its connection
        stack.close()
        if args.keep or not ok:
            log(f"logs kept in {stack.log_dir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        d = getattr(stack, "workdir_pgbouncer", None)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
    if args.hold:
        return 0
    res.setdefault("summary", {})
    res["json_path"] = str(args.json_out)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    if ok:
        print_report(res)
        if stack.profiler is not None:
            summary = stack.profiler.summarize()
            (args.profile / "summary.txt").write_text(summary + "\n")
            print()
            print(f"py-spy profiles (self and inclusive time per function) in {args.profile}/summary.txt")
    return 0 if ok else 1


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
