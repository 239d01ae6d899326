"""The connector's backoff with the edge down (issue 13), as an operator would see it: a real
`hd-connector` with the default `--protocol auto`, started before the edge, measured for 20 s —
its log lines and its CPU time (from /proc/<pid>/stat) — then the edge comes up and it
registers by itself. Before the fix: "reconnecting in 0.0s", ~4,500 lines and ~80 % of a core
in 20 s. The thresholds are far from both behaviours, so a loaded machine cannot flip the verdict.
"""

from __future__ import annotations

import time

from tests.harness.edge import count_connections
from tests.harness.procs import Proc, connector_argv, free_port, poll_until
from tests.harness.procstat import cpu_seconds

WINDOW = 20.0
MAX_LINES = 25  # expected ~13: 6-7 attempts of connection 0, then 2 of each other connection
MAX_CPU = 1.5  # seconds of CPU in the window; waiting should cost next to nothing


def test_auto_with_the_edge_down_backs_off_quietly_then_connects(edge_factory):
    # Fixed ports: the token carries the edge's address, which must be the same when it returns.
    edge = edge_factory(tunnel_listen=f"127.0.0.1:{free_port()}", api_listen=f"127.0.0.1:{free_port()}")
    t = edge.hd("tunnel", "create", "early-bird")
    edge.stop()  # nothing listens on the tunnel port now, neither TCP nor UDP

    conn = Proc(connector_argv("--token", t["token"]), name="connector", log_dir=edge.state_dir / "logs")
    edge.children.append(conn)
    conn.wait_for_log(r"reconnecting in", 30, stream="stderr")  # its first failed attempt
    lines0, cpu0 = len(conn.stderr_text().splitlines()), cpu_seconds(conn.pid)
    started = time.monotonic()
    time.sleep(WINDOW)  # the measurement window itself; the verdict is on counts, not on timing
    elapsed = time.monotonic() - started
    conn.check_alive()
    log = conn.stderr_text().splitlines()
    lines, cpu = len(log) - lines0, cpu_seconds(conn.pid) - cpu0
    print(f"edge down for {elapsed:.1f}s: {lines} log lines, {cpu:.2f}s CPU")
    assert lines <= MAX_LINES, "\n".join(log[-40:])
    assert cpu <= MAX_CPU, f"{cpu:.2f}s of CPU in {elapsed:.1f}s"
    # one line per attempt, each saying what it waits, and the waits grow
    assert all("reconnecting in" in line for line in log), "\n".join(log)
    waits = [float(line.rsplit("reconnecting in ", 1)[1].rstrip("s")) for line in log]
    assert max(waits) >= 4.0, waits

    edge.start()  # same state dir and ports: the connector registers on its next attempt (<= 32 s)
    poll_until(lambda: count_connections(edge.hd("tunnel", "info", t["id"])) >= 1, 60,
               what="the connector to register once the edge is up", on_timeout=lambda: conn.stderr_text()[-3000:])
    assert conn.alive()
