"""One edge per state dir, and a control API that holds against strangers (issue 13, items 4 and 1).

Real `hd edge` processes, raw sockets on loopback, the edge's file descriptors counted from
/proc/<pid>/fd before and after; every wait is a poll with a deadline.

* a second `hd edge` on a state dir in use exits at once naming the first one's pid and changes
  nothing (before: it failed to bind but deleted the running edge's edge.json, after which every
  `hd` command said no edge was running); a crashed edge's lock goes with it;
* connections that never finish their request head are closed after the header timeout (before:
  300 such connections were all still open after 90 s), also while they trickle bytes;
* malformed requests get a 4xx and never a traceback: deeply nested JSON, a bad or oversized gzip
  body, oversized bodies and heads, too many header fields, garbage request lines, bad escapes.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from control.api import HEADER_TIMEOUT, MAX_BODY, MAX_JSON_DEPTH
from tests.harness.edge import EdgeProc
from tests.harness.procs import hd_argv
from tests.harness.procstat import fd_count

ATTACKERS = 300


def poll(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def snapshot(state: Path) -> dict[str, tuple[int, bytes]]:
    """Every file the edge keeps in its state dir (not the harness's logs, not SQLite, which the
    running edge may write to), with its modification time and contents."""
    out = {}
    for p in sorted(state.iterdir()):
        if p.is_file() and not p.name.startswith("state.db"):
            out[p.name] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


# --- one edge per state dir --------------------------------------------------------------------

def test_a_second_edge_on_the_same_state_dir_exits_at_once_and_touches_nothing(tmp_path) -> None:
    state = tmp_path / "state"
    first = EdgeProc(state).start()
    try:
        before = snapshot(state)
        assert "edge.json" in before and "edge.lock" in before
        started = time.monotonic()
        second = subprocess.run(
            hd_argv("edge", "--state-dir", state, "--api-listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0",
                    "--pg-listen", "127.0.0.1:0", "--mysql-listen", "127.0.0.1:0"),
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("HD_")})
        took = time.monotonic() - started
        assert second.returncode == 1, second
        assert second.stderr.strip().endswith(
            f"another edge (pid {first.pid}) is using this state dir ({state}); stop it first, or give this"
            " one its own --state-dir"), second.stderr
        assert "Traceback" not in second.stderr and second.stdout == ""
        assert took < 25, f"the second edge took {took:.1f}s to give up"  # not waiting for the lock (generous)
        assert snapshot(state) == before  # edge.json and everything else untouched
        assert first.proc.alive()
        assert first.hd("tunnel", "list") == []  # the CLI still finds the running edge
    finally:
        first.stop()
    # the lock goes with its process, even one that cannot clean up
    crashed = EdgeProc(state).start()
    os.kill(crashed.pid, signal.SIGKILL)
    poll(lambda: not crashed.proc.alive(), 10, "the killed edge to exit")
    again = EdgeProc(state).start()
    try:
        assert again.hd("tunnel", "list") == []
    finally:
        again.stop()


# --- the control API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    e = EdgeProc(tmp_path_factory.mktemp("bounds")).start()
    try:
        yield e
    finally:
        e.cleanup()


def api_addr(edge: EdgeProc) -> tuple[str, int]:
    u = urlsplit(edge.api_url)
    return u.hostname, u.port


def raw_request(edge: EdgeProc, data: bytes, timeout: float = 20.0) -> tuple[int, bytes]:
    """Send `data` on a fresh connection; the status code and body of the answer."""
    with socket.create_connection(api_addr(edge), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything: the answer may still be there
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    assert answer.startswith(b"HTTP/1."), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(edge: EdgeProc, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {edge.admin_token}",
             "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_connections_with_unfinished_headers_are_closed(edge) -> None:
    pid = edge.pid
    base = fd_count(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(ATTACKERS):
            s = socket.create_connection(api_addr(edge), timeout=5)
            s.sendall(b"GET /v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never: ends")
            socks.append(s)
        # and one that keeps sending, a header byte at a time
        trickler = socket.create_connection(api_addr(edge), timeout=5)
        trickler.sendall(b"GET /v1/tunnels HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                try:
                    trickler.sendall(b"a")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        opened = poll(lambda: (n := fd_count(pid)) >= base + ATTACKERS and n, 60, "the edge to accept them all")
        started = time.monotonic()
        after = poll(lambda: (n := fd_count(pid)) <= base + 2 and n, HEADER_TIMEOUT + 20,
                     f"the edge to close {ATTACKERS + 1} connections without a complete request head")
        took = time.monotonic() - started
        stop.set()
        for s in socks + [trickler]:
            s.settimeout(5)
            try:
                assert s.recv(100) == b""  # closed by the edge, nothing sent
            except ConnectionResetError:
                pass
        print(f"edge fds: {base} before, {opened} with {ATTACKERS + 1} open heads, {after} {took:.1f}s later")
        assert took < HEADER_TIMEOUT + 20
        assert edge.hd("tunnel", "list") == []
    finally:
        for s in socks:
            s.close()


def test_malformed_requests_get_a_4xx_and_no_traceback(edge) -> None:
    cases: dict[str, tuple[bytes, set[int]]] = {
        "deeply nested JSON": (post(edge, "/v1/tunnels", b"[" * 200_000 + b"]" * 200_000), {400}),
        f"JSON nested past {MAX_JSON_DEPTH}": (
            post(edge, "/v1/tunnels", b'{"name": ' + b"[" * 40 + b"]" * 40 + b"}"), {400}),
        "a bad gzip body": (post(edge, "/v1/tunnels", b"this is not gzip", {"Content-Encoding": "gzip"}), {400}),
        "a gzip body over the size limit once inflated": (
            post(edge, "/v1/tunnels", gzip.compress(b'{"name": "' + b"a" * (4 * MAX_BODY) + b'"}'),
                 {"Content-Encoding": "gzip"}), {413}),
        "a body over the size limit": (post(edge, "/v1/tunnels", b" " * (MAX_BODY + 1)), {413}),
        "a header line over 8 KiB": (
            b"GET /v1/tunnels HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", {400, 431}),
        "a request line over 8 KiB": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {400, 414}),
        "too many header fields": (
            b"GET /v1/tunnels HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(64)) + b"\r\n",
            {400, 431}),
        "a garbage request line": (b"\x00\x01\x02 nonsense\r\n\r\n", {400}),
        "a bad percent escape": (b"GET /v1/tunnels/%ZZ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                 + edge.admin_token.encode() + b"\r\nConnection: close\r\n\r\n", {400, 404}),
        "a path that is not UTF-8": (b"GET /v1/tunnels/%FF%FE HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                     + edge.admin_token.encode() + b"\r\nConnection: close\r\n\r\n", {400, 404}),
        "a bad Content-Length": (b"POST /v1/tunnels HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", {400}),
        "a body that is a JSON string": (post(edge, "/v1/tunnels", json.dumps("vpc").encode()), {400}),
        "a name that is an object": (post(edge, "/v1/tunnels", b'{"name": {"a": 1}}'), {400}),
    }
    log_before = edge.log_text().count("Traceback")
    for what, (request, expected) in cases.items():
        status, body = raw_request(edge, request)
        assert status in expected, (what, status, body[:300])
    assert edge.log_text().count("Traceback") == log_before, edge.log_text()[-3000:]
    assert edge.proc.alive() and edge.hd("tunnel", "list") == []
