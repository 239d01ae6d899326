"""One authenticated client connection: moves bytes between the client socket, its
`ClientCore` (the pooling logic) and whichever server connection it holds for now.

It also enforces the edge's statement timeout itself (the origin connections carry the
client's own settings, so a client could lift one set there): a request the server works on for
longer is cancelled at the origin, and the client gets SQLSTATE 57014. A client that vanishes
while the server works for it gets its request cancelled at the origin too, and the server
connection stays counted against the config's limit until the origin has answered (or a bound
passes and the connection is closed).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from proxy.pg.pooling import ClientCore, ClientProtocolError, error_message, message
from proxy.pool import Pool, PoolError, ServerConn

log = logging.getLogger("proxy.session")

CLIENT_HIGH_WATER = 1024 * 1024  # bytes queued towards the client before we stop reading the server
# Requests sent to the server and not answered yet, per session, before the client is no longer
# read (a client pipelining without reading would otherwise have the edge track millions); reading
# goes on below half of it. Well above any driver's pipeline depth between flushes.
MAX_OUTSTANDING = 8192
DRAIN_TIMEOUT = 30.0  # a vanished client's server: how long the origin may take to answer the cancel


class Timer:
    """What the session needs of a clock: call `fn` after `delay` seconds (cancellable)."""

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None

    def start(self, delay: float, fn: Callable[[], None]) -> None:
        self.cancel()
        self.handle = asyncio.get_running_loop().call_later(delay, fn)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    @property
    def running(self) -> bool:
        return self.handle is not None


class ClientSession:
    def __init__(self, transport: Any, pool: Pool, core: ClientCore,
                 on_close: Callable[[ClientSession], None] | None = None, *,
                 cancel: Optional[Callable[[ServerConn], None]] = None,
                 statement_timeout: float = 0.0) -> None:
        self.transport = transport
        self.pool = pool
        self.core = core
        # Sends a CancelRequest to the origin for what a server connection is running.
        self._cancel = cancel
        self.statement_timeout = statement_timeout  # seconds; 0: none
        self._timer = Timer()
        self._seen_readies = -1  # the core's ReadyForQuery count at the last tick
        self._stalled_ticks = 0  # ticks in a row with a request outstanding and no ReadyForQuery
        self._drain_timer = Timer()
        self._pauses: set[str] = set()  # why reading from the client is paused (empty: reading)
        self._client_write_paused = False
        self._continuing = False
        self.server: ServerConn | None = None
        self._acquiring = False
        self._closed = False
        self._on_close = on_close
        self._server_paused = False
        self.cancel_key: tuple[int, bytes] | None = None
        self._held_fatal: bytes | None = None
        self._waiting: Any = None  # what the core waits for (a cache fill, a catalog load)
        self._wait_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ client transport
    def data_received(self, data: bytes) -> None:
        if self._held_fatal is not None:
            # The origin ended this session while the client was idle: answer now, then close.
            self._closed = True
            self.transport.write(self._held_fatal)
            self.transport.close()
            return
        try:
            self.core.feed_client(data)
            self._pump()
        except ClientProtocolError as exc:
            self._fatal("08P01", f"protocol violation: {exc}")
        except Exception as exc:  # a proxy bug must reach the client as an error, not a cut
            self._internal_error(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._timer.cancel()
        self.core.gone = True
        server = self.server
        if server is not None and (self.core.expect or self.core.copy_in) and not server.closed \
                and self._cancel is not None:
            # The origin is still working for this client: cancel that (a COPY from the client
            # is failed instead), and keep the connection (counted against the limit) until the
            # origin has answered; then it is rolled back and reset like any other.
            if self.core.copy_in:
                server.write(message(b"f", b"the client disconnected\x00"))
            else:
                self._cancel(server)
            self._drain_timer.start(DRAIN_TIMEOUT, self._drain_over)
        else:
            self.server = None
            if server is not None:
                self._give_back(server, client_gone=True)
        self.core.abandon_all()
        if self._wait_timer is not None:
            self._wait_timer.cancel()
        if self._on_close is not None:
            self._on_close(self)

    def _drain_over(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            log.info("the origin did not answer a vanished client's cancelled request in %.0fs; "
                     "closing that connection", DRAIN_TIMEOUT)
            server.session = None
            server.close()

    # Back-pressure: a client that does not read its answers is not read either (nor its
    # server), whether the answers come from the origin or from the cache; a server that does not
    # read what the client sends stops the client too. Reading from the client is paused while
    # any reason holds (see _pause).
    def pause_writing(self) -> None:
        self._client_write_paused = True
        if self.server is not None:
            self.server.channel.pause_reading()
            self._server_paused = True
        self._pause("client-not-reading")

    def resume_writing(self) -> None:
        self._client_write_paused = False
        if self._server_paused and self.server is not None:
            self.server.channel.resume_reading()
        self._server_paused = False
        self._unpause("client-not-reading")
        self._continue()

    def _pause(self, reason: str) -> None:
        if not self._pauses and not self._closed:
            self.transport.pause_reading()
        self._pauses.add(reason)

    def _unpause(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self._closed:
                self.transport.resume_reading()

    def _server_write_paused(self) -> None:
        self._pause("server-not-reading")

    def _server_write_resumed(self) -> None:
        self._unpause("server-not-reading")

    def _continue(self) -> None:
        """Go on with client bytes the core left unprocessed (its output budget was spent)."""
        core = self.core
        if not core.backlog or self._client_write_paused or self._closed or self._continuing:
            return
        self._continuing = True
        asyncio.get_running_loop().call_soon(self._continue_now)

    def _continue_now(self) -> None:
        self._continuing = False
        if self._closed or self._client_write_paused:
            return
        try:
            self.core.feed_client(b"")
            self._pump()
        except ClientProtocolError as exc:
            self._fatal("08P01", f"protocol violation: {exc}")
        except Exception as exc:
            self._internal_error(exc)

    # ------------------------------------------------------------------ server side
    def server_data(self, data: bytes) -> None:
        try:
            self.core.feed_server(data)
            self._pump()
        except ClientProtocolError as exc:  # a client message that waited for this answer
            self._fatal("08P01", f"protocol violation: {exc}")
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        log.exception("internal proxy error; closing the client's connection: %s", exc)
        server, self.server = self.server, None
        if server is not None:
            server.session = None
            server.close()  # its state is unknown: never reuse it
        try:
            self.core.abandon_all()
        except Exception:
            log.exception("could not end the queries in flight")
        self._fatal("58000", f"Internal error in the proxy ({type(exc).__name__}); reconnect and retry")

    def server_lost(self, exc: Exception | None) -> None:
        self.server = None
        held = self.core.held_fatal
        if held is not None:
            awaiting = bool(self.core.expect)
            self.core.server_lost()
            if not awaiting:
                # The client awaits nothing: keep its connection and answer its next request
                # with the origin's FATAL (libpq cannot pair an unsolicited error with a request).
                self._held_fatal = held
                return
            if not self._closed:  # a request went out meanwhile: this FATAL is its answer
                self._closed = True
                self.transport.write(held)
                self.transport.close()
            return
        if self.core.fatal_forwarded:  # the origin already told the client why (e.g. 57P01)
            self.core.server_lost()
            self._closed = True
            self.transport.close()
            return
        self.core.server_lost()
        reason = f": {exc}" if exc else ""
        self._fatal("58000", f"the connection to the origin database was lost{reason}",
                    hint="the query may not have completed; reconnect and retry")

    # ------------------------------------------------------------------ the pump
    def _pump(self) -> None:
        core = self.core
        if core.wait is not None and self._waiting is not core.wait:
            self._watch(core.wait)
        if core.to_client:
            if not self._closed:
                self.transport.write(bytes(core.to_client))
            core.to_client.clear()
        if core.to_server:
            if self.server is not None:
                self.server.write(core.to_server)
            core.to_server.clear()
        if core.fatal is not None and not self._closed:
            # The client's session cannot go on (its settings could not be carried).
            self._closed = True
            self.transport.write(core.fatal)
            self.transport.close()
        if core.terminated and not self._closed:
            self._closed = True
            self.transport.close()  # connection_lost gives back (or drains) the server
            return
        if core.backlog:
            self._pause("backlog")
            self._continue()
        elif "backlog" in self._pauses:
            self._unpause("backlog")
        outstanding = len(core.expect)
        if outstanding > MAX_OUTSTANDING:
            self._pause("outstanding")
        elif outstanding <= MAX_OUTSTANDING // 2 and "outstanding" in self._pauses:
            self._unpause("outstanding")
        if self.server is not None and core.can_release:
            server, self.server = self.server, None
            core.detach()
            self._give_back(server, client_gone=self._closed)
        elif core.wants_server and not self._acquiring:
            server = self.pool.try_acquire()
            if server is not None:  # fast path: an idle connection, no task, no pause
                self._attach(server)
                return
            self._acquiring = True
            self._pause("acquire")
            asyncio.get_running_loop().create_task(self._acquire())

    # The edge's statement timeout. No work per query: while the session holds a server, a timer
    # ticks every TICKS-th of the timeout; a request still outstanding with no ReadyForQuery for
    # TICKS + 1 ticks in a row (so after between the timeout and 1 + 1/TICKS times it) is cancelled.
    TICKS = 4

    def _arm_statement_timer(self) -> None:
        if self.statement_timeout and not self._timer.running:
            self._seen_readies = self.core.readies
            self._stalled_ticks = 0
            self._timer.start(self.statement_timeout / self.TICKS, self._tick)

    def _tick(self) -> None:
        self._timer.handle = None
        server, core = self.server, self.core
        if server is None or self._closed:
            return  # armed again when a server is attached
        if not core.expect or core.readies != self._seen_readies:
            self._seen_readies = core.readies
            self._stalled_ticks = 0
        else:
            self._stalled_ticks += 1
            if self._stalled_ticks > self.TICKS and self._cancel is not None:
                self._stalled_ticks = 0
                log.info("a statement ran longer than the edge's statement timeout (%.0fs); cancelling it",
                         self.statement_timeout)
                core.timeout_cancelled = True
                self._cancel(server)
        self._timer.start(self.statement_timeout / self.TICKS, self._tick)

    def _watch(self, wait: Any) -> None:
        """The core waits (for another client's identical query, or a catalog load): stop
        reading from the client meanwhile, and go on when it is done or after a bound."""
        self._waiting = wait
        self._pause("wait")
        loop = asyncio.get_running_loop()
        self._wait_timer = loop.call_later(getattr(wait, "timeout", 30.0), self._wait_over, wait, True)
        wait.add_callback(lambda: loop.call_soon(self._wait_over, wait, False))

    def _wait_over(self, wait: Any, timed_out: bool) -> None:
        if self._waiting is not wait:
            return
        self._waiting = None
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if self._closed:
            return
        if timed_out:
            log.info("a cache wait took longer than %ss; going to the origin", getattr(wait, "timeout", 30.0))
        self._unpause("wait")
        try:
            self.core.resume(timed_out=timed_out)
            self._pump()
        except ClientProtocolError as exc:
            self._fatal("08P01", f"protocol violation: {exc}")
        except Exception as exc:
            self._internal_error(exc)

    async def _acquire(self) -> None:
        try:
            server = await self.pool.acquire()
        except PoolError as exc:
            self._acquiring = False
            self._error_and_drop_queue(str(exc))
            return
        except Exception as exc:  # origin down, tunnel down, auth changed…
            self._acquiring = False
            self._error_and_drop_queue(f"Server connection attempt failed: {getattr(exc, 'message', None) or exc}")
            return
        self._acquiring = False
        if self._closed:
            self.pool.release(server)
            return
        if server.closed:
            self._error_and_drop_queue("Server connection attempt failed: the connection closed")
            return
        self._unpause("acquire")
        self._attach(server)

    def _attach(self, server: ServerConn) -> None:
        self.server = server
        server.session = self
        server.channel.set_write_flow(self._server_write_paused, self._server_write_resumed)
        if self._client_write_paused:
            server.channel.pause_reading()
            self._server_paused = True
        if self._timer.handle is None:
            self._arm_statement_timer()
        try:
            self.core.attach(server.state)
            self._pump()
        except ClientProtocolError as exc:  # a client message that waited for a server
            self._fatal("08P01", f"protocol violation: {exc}")
        except Exception as exc:
            self._internal_error(exc)

    def _give_back(self, server: ServerConn, client_gone: bool = False) -> None:
        core = self.core
        if self._drain_timer.handle is not None:
            self._drain_timer.cancel()
        server.channel.set_write_flow(None, None)
        if self._server_paused:  # never hand a paused channel to the next client
            self._server_paused = False
            server.channel.resume_reading()
        self._unpause("server-not-reading")
        if client_gone and core.expect:
            # Requests still in flight for a client that is gone: the server connection is in
            # an unknown state, so it is not reused.
            server.session = None
            server.close()
            return
        self.pool.release(server, rollback=client_gone and core.txn != b"I")

    def _error_and_drop_queue(self, text: str) -> None:
        """No server for this client: answer its pending requests with one error."""
        out = self.core.fail_queued(error_message("58000", text))
        if not self._closed:
            self.transport.write(out)
        self._unpause("acquire")

    def _fatal(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.transport.write(error_message(sqlstate, text, severity="FATAL", hint=hint))
        finally:
            self.transport.close()
