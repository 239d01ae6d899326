"""Benchmark load generator process (client side), driven by the orchestrator over stdin/stdout.

    python -m bench.loadgen

Reads one JSON command per line on stdin, runs it, writes one JSON result line on stdout:

    {"op": "latency", "host": H, "port": P, "warmup": 300, "count": 3000, "size": 64}
    {"op": "rps", "host": H, "port": P, "conns": 100, "duration": 5.0, "warmup_s": 1.0, "size": 64}
    {"op": "bulk", "host": H, "port": P, "mib": 512}
    {"op": "connect", "host": H, "port": P, "count": 200, "size": 64}
    {"op": "quit"}

The client is written with asyncio Protocols on uvloop and does all its work in callbacks (no
coroutine per request), so it costs a few µs per message and is not the bottleneck. Every phase is
bounded by a timeout; a failure is reported as {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import sys
import time
import traceback
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

perf_ns = time.perf_counter_ns


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def lat_summary(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "p50_us": percentile(s, 50) / 1e3,
        "p90_us": percentile(s, 90) / 1e3,
        "p99_us": percentile(s, 99) / 1e3,
        "max_us": s[-1] / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
    }


# ------------------------------------------------------------------------------- ping-pong


class Run:
    """Shared state of the connections of one ping-pong phase."""

    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.count = 0  # round trips inside the measurement window
        self.total = 0  # all round trips of the phase (warm-up included), to normalise CPU time
        self.samples: list[int] = []


class PingPong(asyncio.Protocol):
    """One connection, one outstanding fixed-size message at a time, everything in callbacks.

    `go(limit)` sends messages until `limit` round trips completed (0 = until run.stopping);
    `idle` resolves when it stops (or fails when the connection is lost first).
    """

    def __init__(self, run: Run, size: int) -> None:
        self.run = run
        self.size = size
        self.msg = b"\x5a" * size
        self.transport: asyncio.Transport | None = None
        self.got = 0
        self.t_sent = 0
        self.done_here = 0
        self.limit = 0
        self.idle: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def go(self, limit: int) -> asyncio.Future[None]:
        self.limit = limit
        self.done_here = 0
        self.idle = asyncio.get_running_loop().create_future()
        if self.closed:
            self.idle.set_exception(ConnectionError("connection already closed"))
            return self.idle
        self.t_sent = perf_ns()
        self.transport.write(self.msg)
        return self.idle

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got < self.size:
            return
        if self.got > self.size:
            self._fail(ConnectionError(f"got {self.got} bytes for a {self.size}-byte echo"))
            return
        self.got = 0
        now = perf_ns()
        run = self.run
        run.total += 1
        if run.measuring:
            run.count += 1
            run.samples.append(now - self.t_sent)
        self.done_here += 1
        if run.stopping or (self.limit and self.done_here >= self.limit):
            if self.idle is not None and not self.idle.done():
                self.idle.set_result(None)
            return
        self.t_sent = now
        self.transport.write(self.msg)

    def _fail(self, exc: Exception) -> None:
        if self.idle is not None and not self.idle.done():
            self.idle.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle is not None and not self.idle.done():
            self.idle.set_exception(ConnectionError(
                f"connection closed by the server after {self.done_here} round trips"
                + (f": {exc}" if exc else "")))


async def _open_many(host: str, port: int, n: int, factory, parallel: int = 50) -> list[Any]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(parallel)
    out: list[Any] = [None] * n

    async def one(i: int) -> None:
        async with sem:
            _, proto = await loop.create_connection(factory, host, port)
            out[i] = proto

    await asyncio.gather(*(one(i) for i in range(n)))
    return out


def _close_all(protos: list[Any]) -> None:
    for p in protos:
        if p is not None and p.transport is not None:
            p.transport.close()


async def op_latency(cmd: dict[str, Any]) -> dict[str, Any]:
    run = Run()
    size = int(cmd.get("size", 64))
    (proto,) = await _open_many(cmd["host"], cmd["port"], 1, lambda: PingPong(run, size))
    try:
        await proto.go(int(cmd.get("warmup", 300)) or 1)
        run.measuring = True
        t0 = perf_ns()
        await proto.go(int(cmd["count"]))
        wall = (perf_ns() - t0) / 1e9
        run.measuring = False
    finally:
        _close_all([proto])
    return {"wall_s": wall, "round_trips": run.count, "total_round_trips": run.total, **lat_summary(run.samples)}


async def op_rps(cmd: dict[str, Any]) -> dict[str, Any]:
    run = Run()
    size = int(cmd.get("size", 64))
    n = int(cmd["conns"])
    duration = float(cmd["duration"])
    warmup_s = float(cmd.get("warmup_s", min(1.0, 0.2 * duration)))
    t_open = perf_ns()
    protos = await _open_many(cmd["host"], cmd["port"], n, lambda: PingPong(run, size))
    try:
        # one round trip on every connection first: through a tunnel, this opens the stream
        await asyncio.gather(*(p.go(1) for p in protos))
        setup_s = (perf_ns() - t_open) / 1e9
        idles = [p.go(0) for p in protos]
        await asyncio.sleep(warmup_s)
        run.measuring = True
        c0, t0 = run.count, perf_ns()
        waiter = asyncio.gather(*idles)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), duration)
        except asyncio.TimeoutError:
            pass
        c1, t1 = run.count, perf_ns()
        run.measuring = False
        run.stopping = True
        if waiter.done():
            waiter.result()  # a connection failed during the run
            raise RuntimeError("all connections stopped before the end of the run")
        await asyncio.wait_for(waiter, 30.0)
    finally:
        _close_all(protos)
    wall = (t1 - t0) / 1e9
    return {"conns": n, "requests": c1 - c0, "total_round_trips": run.total, "wall_s": wall, "rps": (c1 - c0) / wall,
            "setup_s": setup_s, **lat_summary(run.samples)}


async def op_connect(cmd: dict[str, Any]) -> dict[str, Any]:
    """New connection + one 64-byte echo + close, repeated: the per-connection set-up cost."""
    loop = asyncio.get_running_loop()
    size = int(cmd.get("size", 64))
    samples: list[int] = []
    t_start = perf_ns()
    for _ in range(int(cmd["count"])):
        run = Run()
        t0 = perf_ns()
        _, proto = await loop.create_connection(lambda: PingPong(run, size), cmd["host"], cmd["port"])
        try:
            await proto.go(1)
        finally:
            proto.transport.close()
        samples.append(perf_ns() - t0)
    return {"wall_s": (perf_ns() - t_start) / 1e9, **lat_summary(samples)}


# ------------------------------------------------------------------------------- bulk

CHUNK = 256 * 1024


class BulkSender(asyncio.Protocol):
    def __init__(self, total: int, payload: bytes) -> None:
        self.total = total
        self.payload = memoryview(payload)
        self.sent = 0
        self.paused = False
        self.reply = bytearray()
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.t0 = 0
        self.t_last_write = 0
        self.t1 = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.transport.set_write_buffer_limits(high=1 << 20, low=256 * 1024)

    def start(self) -> None:
        self.t0 = perf_ns()
        self._pump()

    def _pump(self) -> None:
        t = self.transport
        while not self.paused and self.sent < self.total:
            n = min(CHUNK, self.total - self.sent)
            t.write(self.payload[:n] if n < CHUNK else self.payload)
            self.sent += n
        if self.sent >= self.total and not self.t_last_write:
            self.t_last_write = perf_ns()
            t.write_eof()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.sent < self.total:
            self._pump()

    def data_received(self, data: bytes) -> None:
        self.reply += data
        if len(self.reply) >= 8 and not self.done.done():
            self.t1 = perf_ns()
            self.done.set_result(int.from_bytes(self.reply[:8], "big"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(
                f"sink connection lost after {self.sent} bytes sent, reply {bytes(self.reply)!r}"
                + (f": {exc}" if exc else "")))


async def op_bulk(cmd: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    total = int(float(cmd["mib"]) * (1 << 20))
    payload = os.urandom(CHUNK)
    _, proto = await loop.create_connection(lambda: BulkSender(total, payload), cmd["host"], cmd["port"])
    try:
        proto.start()
        count = await proto.done
    finally:
        proto.transport.close()
    if count != total:
        raise RuntimeError(f"sink confirmed {count} bytes, sent {total}")
    secs = (proto.t1 - proto.t0) / 1e9
    return {"bytes": total, "wall_s": secs, "gbit_s": total * 8 / secs / 1e9,
            "send_s": (proto.t_last_write - proto.t0) / 1e9}


OPS = {"latency": op_latency, "rps": op_rps, "bulk": op_bulk, "connect": op_connect}


async def run_op(cmd: dict[str, Any]) -> dict[str, Any]:
    timeout = float(cmd.get("timeout", 120.0))
    try:
        return await asyncio.wait_for(OPS[cmd["op"]](cmd), timeout)
    except asyncio.TimeoutError:
        return {"error": f"{cmd['op']}: timed out after {timeout:g}s"}
    except Exception as exc:
        return {"error": f"{cmd['op']}: {type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5)}


def main() -> None:
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "uvloop": uvloop is not None}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        result = loop.run_until_complete(run_op(cmd))
        out.write(json.dumps(result) + "\n")
        out.flush()
    loop.close()


if __name__ == "__main__":
    main()
