"""Run the project's own commands as real subprocesses, and small process/port helpers.

Everything here has a deadline; nothing sleeps to "give a process time to start".
Waiting is done by polling a condition with a bound (``poll_until``).

Commands are started through their module entry points so the tests do not depend on PATH:

    hd            -> [sys.executable, "-m", "cli.main", ...]        (``hd_argv``)
    hd-connector  -> [sys.executable, "-m", "connector.main", ...]  (``connector_argv``)
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

_SETPRIV = shutil.which("setpriv")


class WaitTimeout(AssertionError):
    """A bounded wait ran out. Subclass of AssertionError so pytest shows it as a test failure."""


# --------------------------------------------------------------------------------------------
# polling


def poll_until(predicate: Callable[[], object], timeout: float, *, interval: float = 0.02,
               max_interval: float = 0.25, what: str = "condition",
               on_timeout: Callable[[], str] | None = None):
    """Call ``predicate`` until it returns a truthy value; return that value.

    Polls with a growing interval (``interval`` doubling up to ``max_interval``) and raises
    ``WaitTimeout`` after ``timeout`` seconds. Exceptions from the predicate propagate.
    ``on_timeout`` may return extra diagnostic text (e.g. a log tail) for the error message.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            extra = on_timeout() if on_timeout else ""
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}" + (f"\n{extra}" if extra else ""))
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, max_interval)


async def async_poll_until(predicate: Callable[[], object], timeout: float, *, interval: float = 0.02,
                           max_interval: float = 0.25, what: str = "condition"):
    """``poll_until`` for coroutines: the predicate is a plain (non-blocking) callable."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(delay * 2, max_interval)


# --------------------------------------------------------------------------------------------
# ports


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on ``host`` a moment ago (bind to 0, read, close).

    There is an unavoidable race with other processes; callers that start a server on it
    should retry on "address in use". Use ``RefusingPort`` (origins.py) when you need a port
    that is guaranteed to have nothing listening.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def can_connect(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connection to host:port succeeds (the probe connection is closed at once)."""
    poll_until(lambda: can_connect(host, port, timeout=min(1.0, timeout)), timeout,
               what=f"{host}:{port} to accept connections")


async def async_wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host, port),
                                          timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            w.close()
            return
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {host}:{port}")
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)


_TCP_LISTEN = "0A"


def _proc_net_hex(host: str) -> tuple[str, str]:
    """(procfile, hex address as it appears in /proc/net/tcp{,6}) for a literal IP."""
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        # /proc prints the in6_addr as four host-order (little-endian here) 32-bit words
        words = [packed[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4)]
        return "/proc/net/tcp6", "".join(words)
    packed = socket.inet_aton(host)
    return "/proc/net/tcp", packed[::-1].hex().upper()


def is_listening(host: str, port: int) -> bool:
    """True when a TCP socket is in LISTEN state on host:port (or on the wildcard address).

    Reads /proc/net/tcp{,6} — it does *not* open a connection, so it does not disturb servers
    that act on every accepted connection (e.g. ``hd access tcp`` opens a tunnel stream per
    connection). Falls back to a connect probe where /proc is not available.
    """
    procfile, addr = _proc_net_hex(host)
    wildcard = "0" * len(addr)
    try:
        with open(procfile) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return can_connect(host, port)
    suffix = f":{port:04X}"
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _TCP_LISTEN:
            continue
        local = fields[1]
        if local.endswith(suffix) and local[: -len(suffix)] in (addr, wildcard):
            return True
    return False


def wait_listening(host: str, port: int, timeout: float = 10.0, *, proc: "Proc | None" = None) -> None:
    """Wait until host:port is in LISTEN state (no probe connection). Fails early if ``proc`` exits."""

    def ready():
        if proc is not None:
            proc.check_alive()
        return is_listening(host, port)

    poll_until(ready, timeout, what=f"{host}:{port} to be listening",
               on_timeout=(proc.diagnostics if proc is not None else None))


# --------------------------------------------------------------------------------------------
# /proc accounting


def open_fds(pid: int) -> int:
    """Number of open file descriptors of ``pid`` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_sockets(pid: int) -> int:
    """Number of open sockets of ``pid`` (fd links that read ``socket:[inode]``)."""
    n = 0
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}").startswith("socket:"):
                n += 1
        except OSError:  # fd closed while we were looking
            pass
    return n


# --------------------------------------------------------------------------------------------
# argv helpers


def hd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *map(str, args)]


def connector_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "connector.main", *map(str, args)]


def base_env(extra: Mapping[str, str] | None = None, *, drop: Iterable[str] = ()) -> dict[str, str]:
    """The environment for a child: ours, unbuffered Python, the repo root importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    for k in drop:
        env.pop(k, None)
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def pdeathsig_prefix(signame: str = "KILL") -> list[str]:
    """argv prefix that makes the child die with its parent (Linux ``setpriv --pdeathsig``).

    A crashed or SIGKILLed test run then leaves no orphaned servers behind. The parent-death
    signal is tied to the *thread* that forked, so it is used only from the main thread (a child
    started from a short-lived worker thread would otherwise be killed when that thread ends).
    """
    if _SETPRIV and sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return [_SETPRIV, f"--pdeathsig={signame}", "--"]
    return []


# --------------------------------------------------------------------------------------------
# Proc

_live_procs: "weakref.WeakSet[Proc]" = weakref.WeakSet()


def _kill_all_at_exit() -> None:
    for p in list(_live_procs):
        try:
            p.stop(timeout=3.0)
        except Exception:
            pass


atexit.register(_kill_all_at_exit)


class ProcExited(AssertionError):
    """The process under test exited while we were waiting for it."""


class Proc:
    """A subprocess with stdout/stderr captured to files.

        p = Proc(hd_argv("edge", ...), env={...}, name="edge")
        p.wait_for_log(r"listening on", timeout=10)
        p.stop()            # SIGTERM, then SIGKILL after the timeout
        p.returncode, p.log_text()

    The process runs in its own session (so a Ctrl-C of pytest does not reach it first) and,
    when started from the main thread on Linux, dies with the test process (pdeathsig).
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, name: str | None = None,
                 log_dir: str | os.PathLike | None = None, stdin: int | None = subprocess.DEVNULL,
                 inherit_env: bool = True, die_with_parent: bool = True, drop_env: Iterable[str] = ()):
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        if log_dir is None:
            self._own_log_dir = tempfile.mkdtemp(prefix=f"hdproc-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-")
            log_dir = self._own_log_dir
        else:
            self._own_log_dir = None
            os.makedirs(log_dir, exist_ok=True)
        self.log_dir = Path(log_dir)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)
        self.stdout_path = self.log_dir / f"{safe}.stdout.log"
        self.stderr_path = self.log_dir / f"{safe}.stderr.log"
        full_env = base_env(env, drop=drop_env) if inherit_env else dict(env or {})
        prefix = pdeathsig_prefix("KILL") if die_with_parent else []
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        try:
            self.popen = subprocess.Popen(prefix + self.argv, env=full_env, cwd=cwd, stdin=stdin,
                                          stdout=self._out, stderr=self._err, start_new_session=True)
        except BaseException:
            self._out.close()
            self._err.close()
            raise
        self.started_at = time.monotonic()
        _live_procs.add(self)

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            raise ProcExited(f"{self.name} (pid {self.pid}) exited with {rc}\n{self.diagnostics()}")

    # -- logs --------------------------------------------------------------------------------

    def stdout_text(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", "replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")

    def log_text(self) -> str:
        """stdout followed by stderr (each is a separate file, so order between them is lost)."""
        return self.stdout_text() + self.stderr_text()

    def diagnostics(self, lines: int = 40) -> str:
        def tail(text: str) -> str:
            return "\n".join(text.splitlines()[-lines:])
        return (f"--- {self.name} argv: {' '.join(self.argv)}\n"
                f"--- stdout tail ({self.stdout_path}):\n{tail(self.stdout_text())}\n"
                f"--- stderr tail ({self.stderr_path}):\n{tail(self.stderr_text())}")

    # -- waiting -----------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0, *,
                 what: str = "condition", allow_exit: bool = False):
        """Poll ``predicate`` until truthy (returns its value). Fails early if the process exits
        (unless ``allow_exit``), and on timeout with the log tails in the message."""

        def check():
            value = predicate()
            if value:
                return value
            if not allow_exit:
                self.check_alive()
            return value

        return poll_until(check, timeout, what=f"{what} ({self.name})", on_timeout=self.diagnostics)

    def wait_for_log(self, regex: str | re.Pattern, timeout: float = 10.0, *,
                     stream: str = "both", allow_exit: bool = False) -> re.Match:
        """Wait until ``regex`` matches the process output; returns the match.
        ``stream``: "stdout", "stderr" or "both"."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        reader = {"stdout": self.stdout_text, "stderr": self.stderr_text, "both": self.log_text}[stream]
        return self.wait_for(lambda: pattern.search(reader()), timeout,
                             what=f"log /{pattern.pattern}/", allow_exit=allow_exit)

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} did not exit within {timeout:.1f}s\n{self.diagnostics()}") from None

    # -- stopping ----------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, signal: int = _signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``signal``; after ``timeout`` SIGKILL the whole process group. Returns the exit code."""
        try:
            if self.popen.poll() is None:
                try:
                    self.popen.send_signal(signal)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
            return self.popen.returncode
        finally:
            self._reap_group()
            self._close_files()
            _live_procs.discard(self)

    def kill(self) -> int:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, _signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    self.popen.kill()
                except ProcessLookupError:
                    pass
        rc = self.popen.wait(10)
        self._reap_group()
        return rc

    def _reap_group(self) -> None:
        # children the command left behind in its session
        try:
            os.killpg(self.popen.pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            try:
                f.close()
            except Exception:
                pass

    def cleanup(self) -> None:
        """Stop and remove the log directory if we created it (keep it when you want the logs)."""
        self.stop()
        if self._own_log_dir:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60.0,
        input: str | bytes | None = None, cwd: str | os.PathLike | None = None,
        inherit_env: bool = True) -> subprocess.CompletedProcess:
    """Run a short command to completion with a deadline; text output."""
    full_env = base_env(env) if inherit_env else dict(env or {})
    if isinstance(input, bytes):
        input = input.decode()
    try:
        return subprocess.run([str(a) for a in argv], env=full_env, cwd=cwd, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise WaitTimeout(f"command timed out after {timeout:.1f}s: {' '.join(map(str, argv))}\n"
                          f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
