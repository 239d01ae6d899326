"""Small origin servers for tests (all on 127.0.0.1).

Each server is an async context manager usable in the test's own event loop:

    async with EchoServer() as echo:
        r, w = await asyncio.open_connection(echo.host, echo.port)

or, for synchronous tests (or to keep the origin off the loop under test), in a background thread
with its own event loop:

    with in_thread(EchoServer()) as echo:
        ...

Servers:
- ``EchoServer``     echoes bytes; on the client's FIN it finishes echoing and half-closes back.
- ``SinkServer``     reads until EOF; records ``SinkResult(count, sha256)`` per connection.
- ``SourceServer``   sends N bytes of deterministic pseudo-random data (``seed``), then FIN;
                     ``.sha256`` is the digest of what it sends (``expected_sha256(n, seed)``).
- ``SlowReader``     accepts and reads ``chunk`` bytes every ``interval`` seconds, small receive
                     buffer: writers towards it hit back-pressure quickly.
- ``RefusingPort``   a port with nothing listening: connect() gets ECONNREFUSED at once.
- ``BlackHole``      a port where connect() hangs (SYNs are dropped) until the caller's timeout.

The black-hole trick (Linux): a listening socket with ``listen(0)`` that never calls accept().
Its accept queue holds ``backlog`` (0) + 1 connections — the kernel's "full" test is
``sk_ack_backlog > sk_max_ack_backlog``. We make one connection ourselves to fill it; from then on
the kernel drops every incoming SYN for that socket (``tcp_conn_request``: accept queue full →
drop, no RST, no SYN cookie). A client's connect() therefore sees no answer and keeps
retransmitting its SYN (1 s, 3 s, 7 s, … up to ``net.ipv4.tcp_syn_retries``, ≈127 s with the
default 6) — i.e. it hangs until its own connect timeout, like a firewalled or dead host. Loopback
only, no root, no iptables. ``BlackHole`` verifies the queue is really full by reading the listen
socket's accept-queue length (rx_queue) from /proc/net/tcp instead of by waiting on a probe.
(Verified on the CI kernel: a 1 s connect timeout to it times out after 1.0 s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from .procs import WaitTimeout, async_poll_until, poll_until

HOST = "127.0.0.1"
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# deterministic data


def deterministic_chunks(nbytes: int, seed: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
    """N bytes of pseudo-random data, reproducible from ``seed`` (chunks of ``chunk`` bytes)."""
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def deterministic_bytes(nbytes: int, seed: int = 0) -> bytes:
    return b"".join(deterministic_chunks(nbytes, seed))


def expected_sha256(nbytes: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for c in deterministic_chunks(nbytes, seed):
        h.update(c)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# base


class _Server:
    """Base: a TCP server on 127.0.0.1 (port 0 unless given) handling each connection in a task."""

    def __init__(self, host: str = HOST, port: int = 0):
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.connections_total = 0
        self.connections_active = 0
        self.errors: list[BaseException] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=CHUNK * 4)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections_total += 1
        self.connections_active += 1
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() cancels handlers; returning normally keeps asyncio's stream callback from
            # logging "exception was never retrieved" noise for a cancelled task (3.11)
            pass
        except BaseException as e:  # recorded so a test can assert there were none
            self.errors.append(e)
        finally:
            self.connections_active -= 1
            self._tasks.discard(task)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self):
        await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # waiting helpers usable from any thread/loop (they poll plain attributes)
    async def wait_connections(self, n: int, timeout: float = 10.0) -> None:
        await async_poll_until(lambda: self.connections_total >= n, timeout, what=f"{n} connections")

    def wait_connections_sync(self, n: int, timeout: float = 10.0) -> None:
        poll_until(lambda: self.connections_total >= n, timeout, what=f"{n} connections")


class EchoServer(_Server):
    """Echo every byte; when the client half-closes, half-close back after echoing all of it."""

    def __init__(self, host: str = HOST, port: int = 0):
        super().__init__(host, port)
        self.bytes_echoed = 0

    async def handle(self, reader, writer):
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            self.bytes_echoed += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()


@dataclass
class SinkResult:
    count: int
    sha256: str


class SinkServer(_Server):
    """Read until EOF; record count + sha256 per connection in ``results`` (in completion order).
    With ``reply=True`` it answers ``b"<count> <sha256>\\n"`` before closing."""

    def __init__(self, host: str = HOST, port: int = 0, *, reply: bool = False):
        super().__init__(host, port)
        self.reply = reply
        self.results: list[SinkResult] = []

    async def handle(self, reader, writer):
        h = hashlib.sha256()
        count = 0
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            h.update(data)
            count += len(data)
        result = SinkResult(count, h.hexdigest())
        self.results.append(result)
        if self.reply:
            writer.write(f"{result.count} {result.sha256}\n".encode())
            await writer.drain()

    async def wait_results(self, n: int = 1, timeout: float = 30.0) -> list[SinkResult]:
        await async_poll_until(lambda: len(self.results) >= n, timeout, what=f"{n} sink results")
        return list(self.results)

    def wait_results_sync(self, n: int = 1, timeout: float = 30.0) -> list[SinkResult]:
        poll_until(lambda: len(self.results) >= n, timeout, what=f"{n} sink results")
        return list(self.results)


class SourceServer(_Server):
    """Send ``nbytes`` of deterministic data (``seed``) to every connection, then FIN; then wait
    (bounded) for the client to close. ``sha256`` is the digest of the payload."""

    def __init__(self, nbytes: int, seed: int = 0, host: str = HOST, port: int = 0, *, linger: float = 30.0):
        super().__init__(host, port)
        self.nbytes = nbytes
        self.seed = seed
        self.linger = linger
        self._sha: str | None = None
        self.completed = 0

    @property
    def sha256(self) -> str:
        if self._sha is None:
            self._sha = expected_sha256(self.nbytes, self.seed)
        return self._sha

    async def handle(self, reader, writer):
        for c in deterministic_chunks(self.nbytes, self.seed):
            writer.write(c)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
        self.completed += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drain_reader(reader), self.linger)

    @staticmethod
    async def _drain_reader(reader):
        while await reader.read(CHUNK):
            pass


class SlowReader(_Server):
    """Accept and read ``chunk`` bytes every ``interval`` seconds (deliberate pacing, not a
    readiness wait). The listening socket has a small SO_RCVBUF, so the receive window stays
    small; note the *sender's* kernel send buffer (autotuned up to net.ipv4.tcp_wmem max, 4 MiB
    by default) still absorbs a few MiB before a writer sees back-pressure."""

    def __init__(self, host: str = HOST, port: int = 0, *, chunk: int = 1024, interval: float = 0.1,
                 rcvbuf: int = 4096):
        super().__init__(host, port)
        self.chunk = chunk
        self.interval = interval
        self.rcvbuf = rcvbuf
        self.received = 0

    async def _start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # inherited by accepted sockets
        sock.bind((self.host, self.port))
        sock.listen(16)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._client, sock=sock, limit=self.chunk)
        self.port = sock.getsockname()[1]

    async def handle(self, reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        while True:
            data = await reader.read(self.chunk)
            if not data:
                break
            self.received += len(data)
            await asyncio.sleep(self.interval)


# ---------------------------------------------------------------------------------------------
# ports that misbehave


class RefusingPort:
    """A port on 127.0.0.1 where connect() is refused (RST) at once.

    Holds a socket *bound* to the port but not listening: the kernel answers SYNs with RST, and
    no other process can take the port while we hold it (unlike "a port that was free a moment
    ago"). Usable as a sync or async context manager."""

    def __init__(self, host: str = HOST):
        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self.port = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


def _accept_queue(port: int) -> tuple[int, int] | None:
    """(queued, max backlog) of the LISTEN socket on 127.0.0.1:port from /proc/net/tcp."""
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    suffix = f":{port:04X}"
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[3] == "0A" and fields[1].endswith(suffix):
            tx, rx = fields[4].split(":")
            return int(rx, 16), int(tx, 16)  # for listeners: rx = accept queue, tx = max backlog
    return None


class BlackHole:
    """A port on 127.0.0.1 where connect() hangs until the caller's timeout (see module doc).

    Usable as a sync or async context manager. ``verify()`` asserts the trick works here."""

    def __init__(self, host: str = "127.0.0.1", timeout: float = 5.0):
        if host != "127.0.0.1":
            raise ValueError("BlackHole supports 127.0.0.1 (accept-queue check reads /proc/net/tcp)")
        self.host = host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._fillers: list[socket.socket] = []
        try:
            self._fill(timeout)
        except BaseException:
            self.close()
            raise

    def _fill(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if _accept_queue(self.port) is None:
            # no /proc/net/tcp: fill, then prove it with probes that must not complete
            for _ in range(4):
                self._fillers.append(socket.create_connection((self.host, self.port), timeout=timeout))
                if self._probe_hangs(0.3):
                    return
            raise RuntimeError(f"could not fill the accept queue of 127.0.0.1:{self.port}")
        while True:
            queued, backlog = _accept_queue(self.port)
            if queued > backlog:
                return  # full: the kernel now drops every SYN to this port
            if len(self._fillers) >= 8 or time.monotonic() >= deadline:
                raise RuntimeError(f"could not fill the accept queue of 127.0.0.1:{self.port} "
                                   f"(queued={queued}, backlog={backlog})")
            # the queue has room, so this connect completes at once
            self._fillers.append(socket.create_connection((self.host, self.port),
                                                          timeout=max(0.1, deadline - time.monotonic())))
            # the server side of the handshake may be accounted a moment after connect() returns
            n = len(self._fillers)
            with contextlib.suppress(WaitTimeout):
                poll_until(lambda: _accept_queue(self.port)[0] >= n,
                           max(0.05, min(1.0, deadline - time.monotonic())), interval=0.001,
                           max_interval=0.01, what="filler connection queued")

    def _probe_hangs(self, timeout: float) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((self.host, self.port))
        except socket.timeout:
            s.close()
            return True
        except OSError:
            s.close()
            return False
        self._fillers.append(s)  # it got queued: keep it as another filler
        return False

    def verify(self, timeout: float = 0.3) -> None:
        """Assert that a connect() really hangs (costs ``timeout`` seconds)."""
        assert self._probe_hangs(timeout), f"connect to black hole {self.port} did not hang"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._fillers.clear()
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# running an async server in a background thread


class _ThreadLoop:
    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise WaitTimeout("background event loop did not start")

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def in_thread(server, timeout: float = 30.0):
    """Run an async-context-manager server (EchoServer(), SinkServer(), SshServer()...) in a
    background thread with its own event loop; yields the entered server object.

    Attributes of the server (``port``, ``results``...) can be read from the test thread; to call
    its coroutines use ``server._harness_loop.run(coro)``."""
    tl = _ThreadLoop(f"origin-{type(server).__name__}")
    try:
        entered = tl.run(server.__aenter__(), timeout)
        entered._harness_loop = tl
        try:
            yield entered
        finally:
            tl.run(server.__aexit__(None, None, None), timeout)
    finally:
        tl.stop()


# ---------------------------------------------------------------------------------------------
# client helpers for tests


async def send_and_collect(host: str, port: int, payload: bytes | None = None, *, nbytes: int = 0, seed: int = 0,
                           timeout: float = 30.0) -> tuple[int, str]:
    """Connect, send ``payload`` (or ``nbytes`` deterministic bytes), half-close, read until EOF.
    Returns (bytes received, sha256 of them). Bounded by ``timeout``."""

    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        h = hashlib.sha256()
        got = 0

        async def send():
            if payload is not None:
                writer.write(payload)
                await writer.drain()
            else:
                for c in deterministic_chunks(nbytes, seed):
                    writer.write(c)
                    await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                h.update(data)
                got += len(data)
            await sender
        finally:
            sender.cancel()
            writer.close()
        return got, h.hexdigest()

    return await asyncio.wait_for(go(), timeout)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    async with EchoServer() as s:
        yield s
