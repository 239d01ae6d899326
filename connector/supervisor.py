"""The connector's edge connections: dial, register, take config, serve streams, reconnect.

Each of the `ha_connections` loops keeps one link to the edge, over the transport the
`ProtocolSelector` picks (connector/protocol.py), and waits between attempts as its
`ReconnectPolicy` says (connector/backoff.py): every failed attempt counts, whichever transport
it was on. A permanent registration failure (bad secret, deleted tunnel) — an error message
marked permanent, or a link the edge closed with a "registration refused" reason — or a
certificate that does not match the token's pin is final on either transport: `FatalError`
ends the whole process with a clear message instead of a retry storm.

A link leaves service by draining, never by being cut: it unregisters (the relay stops
sending it new streams), its in-flight streams finish, then it closes. That is how a
protocol switch moves connections back to the preferred transport and how SIGTERM ends
the process (bounded by the grace period).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from websockets.exceptions import InvalidHandshake, WebSocketException

from access.assertion import AssertionRejected, AssertionVerifier, JwksCache
from connector.backoff import Backoff, ReconnectPolicy
from connector.ingress import EMPTY, IngressConfig, IngressError, apply_tcp_keepalive
from connector.jwks import fetch_jwks
from connector.metrics import ConnectorMetrics
from connector.protocol import ProtocolSelector
from tunnel.link import Link, StreamInbox, refuse
from tunnel.messages import RST_PROTOCOL, ConnectRequest, ConnectResponse, MessageError
from tunnel.quiclink import QuicHandshakeError, dial_quic_link
from tunnel.splice import TcpStreamSplice
from tunnel.token import TunnelToken
from tunnel.wslink import PinMismatch, dial_link

log = logging.getLogger("connector")

VERSION = "0.2.0"
REGISTER_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0
QUIC_DIAL_TIMEOUT = 5.0  # UDP black-holed: fall back within this (cloudflared: 5 s idle timeout)
WS_DIAL_TIMEOUT = 10.0
MIGRATE_DRAIN_LIMIT = 3600.0  # a link moved off a transport keeps its streams this long at most
# A registered link lost with one of these reasons says the transport itself is failing.
_TRANSPORT_LOSS = ("no packets from the peer", "keepalive ping timeout")
# A link the edge closed with this in its reason was refused for good (relay/server.py), even
# if the error message that came before the close was lost with the connection.
_FINAL_CLOSE = "registration refused"


class FatalError(Exception):
    """Stops the connector: retrying cannot help."""


class DialFailed(Exception):
    """The transport could not be established (a reason to try the other one on `auto`)."""


class Orchestrator:
    """Holds the applied ingress config; a version not newer than the current one is ignored.

    A local `--config` file is version -1 (as in cloudflared), so any pushed config replaces
    it — but the edge pushes only for remotely-managed tunnels (a route names a service).
    """

    def __init__(self, local: IngressConfig | None = None) -> None:
        self.config: IngressConfig = local or EMPTY
        self.ready = asyncio.Event()  # set once a config has been applied
        if local is not None:
            self.ready.set()

    def update(self, version: int, rules: list[dict[str, Any]]) -> bool:
        if version <= self.config.version:
            return False
        self.config = IngressConfig.parse(version, rules)
        self.ready.set()
        return True

    async def current(self, timeout: float = 5.0) -> IngressConfig:
        """The applied config; a stream that races the first push waits for it (bounded)."""
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.config


@dataclass(eq=False)
class EdgeConnection:
    """One link to the edge, from dial to close."""

    index: int
    protocol: str
    edge: str
    link: Link
    runner: asyncio.Task[None]
    control: StreamInbox | None = None
    registered: bool = False
    draining: bool = False
    since: float = field(default_factory=time.time)

    @property
    def data_streams(self) -> int:
        return max(0, self.link.stream_count - (1 if self.control is not None else 0))


class Supervisor:
    def __init__(
        self,
        token: TunnelToken,
        *,
        ha_connections: int = 4,
        protocol: str = "auto",
        prefer: str | None = None,
        reprobe_interval: float | None = None,
        local_config: IngressConfig | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.token = token
        self.ha_connections = max(1, ha_connections)
        self._clock = clock
        self._sleep = sleep  # between dial attempts (tests inject it instead of waiting)
        kwargs: dict[str, Any] = {"now": clock()}
        if prefer is not None:
            kwargs["prefer"] = prefer
        if reprobe_interval is not None:
            kwargs["reprobe_interval"] = reprobe_interval
        self.selector = ProtocolSelector(protocol, **kwargs)
        self.connector_id = str(uuid.uuid4())
        self.version = VERSION
        self.orchestrator = Orchestrator(local_config)
        self.metrics = ConnectorMetrics()
        self.conns: dict[int, EdgeConnection] = {}  # the serving connection of each HA slot
        self.retiring: set[EdgeConnection] = set()  # unregistered, finishing their streams
        self.shutting_down = False
        self._migrate = [asyncio.Event() for _ in range(self.ha_connections)]
        self._rand = rand
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._fatal: asyncio.Future[str] | None = None
        self._first_registered = asyncio.Event()
        self._splices: set[TcpStreamSplice] = set()
        # Assertions are verified against the keys the (pinned) edge publishes.
        self.jwks = JwksCache(self._fetch_jwks)
        self._verifiers: dict[str, AssertionVerifier] = {}

    # ------------------------------------------------------------------ state for metrics
    @property
    def streams_active(self) -> int:
        return len(self._splices)

    def ready_connections(self) -> int:
        return sum(1 for c in self.conns.values() if c.registered and not c.draining and not c.link.is_closed)

    def connections_by_protocol(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in [*self.conns.values(), *self.retiring]:
            if c.registered and not c.link.is_closed:
                out[c.protocol] = out.get(c.protocol, 0) + 1
        return out

    def stream_bytes(self) -> tuple[int, int]:
        m = self.metrics
        return (m.bytes_in_closed + sum(s.bytes_down for s in self._splices),
                m.bytes_out_closed + sum(s.bytes_up for s in self._splices))

    def verifier(self, issuer: str | None) -> AssertionVerifier:
        issuer = issuer or f"https://{self.token.edge[0]}"
        v = self._verifiers.get(issuer)
        if v is None:
            v = self._verifiers[issuer] = AssertionVerifier(self.jwks, issuer)
        return v

    async def _fetch_jwks(self) -> dict[str, Any]:
        """GET /cdn-cgi/access/certs from the edge, pinned like the tunnel, size- and time-bounded."""
        return await fetch_jwks(self.token.edge, self.token.pin)

    # ------------------------------------------------------------------ process lifetime
    async def run(self) -> None:
        """Run until a fatal error (raised as FatalError) or cancellation."""
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        for index in range(self.ha_connections):
            self._loops.append(asyncio.create_task(self._connection_loop(index)))
            if index == 0:
                # Connection 0 first, as cloudflared does: its outcome (e.g. a bad token) decides.
                first = asyncio.ensure_future(self._first_registered.wait())
                await asyncio.wait([first, self._fatal], timeout=REGISTER_TIMEOUT + QUIC_DIAL_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
                first.cancel()
                if self._fatal.done():
                    break
        if self.selector.mode == "auto":
            self._spawn(self._reprobe_loop())
        # Cancellation leaves the links up: shutdown() drains them (or the process exits).
        message = await self._fatal
        self._stop_loops()
        await self.close()
        raise FatalError(message)

    def _stop_loops(self) -> None:
        for t in self._loops:
            t.cancel()

    async def shutdown(self, grace: float) -> None:
        """Graceful stop: unregister everywhere, refuse new streams, let in-flight streams
        finish for up to `grace` seconds, then close."""
        self.shutting_down = True
        self._stop_loops()
        for conn in list(self.conns.values()):
            self._unregister(conn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        busy = self._busy_streams()
        if busy:
            log.info("draining %d in-flight stream(s) for up to %.0fs", busy, grace)
        while self._busy_streams() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        left = self._busy_streams()
        if left:
            log.warning("grace period over: closing %d stream(s) still in flight", left)
        else:
            log.info("all streams finished")
        await self.close()

    def _busy_streams(self) -> int:
        return sum(c.data_streams for c in [*self.conns.values(), *self.retiring] if not c.link.is_closed)

    async def close(self) -> None:
        self.shutting_down = True
        conns = [*self.conns.values(), *self.retiring]
        for conn in conns:
            self._unregister(conn)
        await asyncio.gather(*(c.link.close(1001, "connector shutting down") for c in conns),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()

    def _unregister(self, conn: EdgeConnection) -> None:
        if conn.registered and not conn.draining and conn.control is not None and not conn.link.is_closed:
            conn.draining = True
            try:
                conn.control.send_message({"type": "unregister"})
            except MessageError:
                pass

    def _die(self, message: str) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one HA connection
    async def _connection_loop(self, index: int) -> None:
        policy = ReconnectPolicy(Backoff(rand=self._rand))
        edges = self.token.edge
        attempt = 0
        while not self.shutting_down:
            protocol = self.selector.current
            edge = edges[(index + attempt) % len(edges)]
            attempt += 1
            switched: str | None = None
            verb = "failed"  # to connect; "lost" once a link had been up
            try:
                moved = await self._connect_once(index, protocol, edge, policy)
                if moved:
                    continue  # re-dial at once over the transport the selector now wants
                reason, verb = "connection closed", "lost"
            except FatalError as exc:
                self._die(str(exc))
                return
            except DialFailed as exc:
                reason = str(exc)
                switched = self.selector.failed(protocol, reason, self._clock())
            except (OSError, asyncio.TimeoutError, TimeoutError, WebSocketException, MessageError,
                    EOFError, ConnectionResetError) as exc:
                reason, verb = _describe(exc), "lost"
            if self.shutting_down:
                return
            self.metrics.reconnect(self.selector.current)
            # Every failed attempt counts, whichever transport it was on (an alternation of two
            # dead transports must back off like one); one log line per attempt.
            delay = policy.failed(switched is not None)
            if switched is None:
                log.warning("connection %d to %s over %s %s (%s); reconnecting in %.1fs",
                            index, edge, protocol, verb, reason, delay)
            elif switched == self.selector.preferred:
                log.warning("connection %d to %s over %s failed (%s); switching back to %s; reconnecting in %.1fs",
                            index, edge, protocol, reason, switched, delay)
            else:
                log.warning("connection %d to %s over %s failed (%s); falling back to %s (will re-probe %s "
                            "every %.0fs); reconnecting in %.1fs", index, edge, protocol, reason, switched,
                            self.selector.preferred, self.selector.reprobe_interval, delay)
            await self._sleep(delay)

    async def _dial(self, protocol: str, edge: str) -> Link:
        host, _, port = edge.rpartition(":")
        host = host.strip("[]")
        try:
            if protocol == "quic":
                return await dial_quic_link(host, int(port), self.token.pin, timeout=QUIC_DIAL_TIMEOUT)
            return await dial_link(f"wss://{edge}", self.token.pin, "/tunnel", timeout=WS_DIAL_TIMEOUT)
        except PinMismatch as exc:
            raise FatalError(f"the edge at {edge} is not the one this token was issued by: {exc}") from None
        except QuicHandshakeError as exc:
            raise DialFailed(str(exc)) from None
        except InvalidHandshake as exc:
            raise DialFailed(f"the edge refused the WebSocket upgrade: {exc}") from None
        except (OSError, asyncio.TimeoutError, TimeoutError, ConnectionError) as exc:
            raise DialFailed(_describe(exc)) from None

    async def _connect_once(self, index: int, protocol: str, edge: str, policy: ReconnectPolicy) -> bool:
        """Dial, register and serve one link until it is lost (raises) or must move to another
        transport (returns True; the old link keeps draining in the background)."""
        link = await self._dial(protocol, edge)
        link.on_stream = lambda s: self._spawn(self._serve_stream(StreamInbox(s), conn))
        runner = asyncio.create_task(link.run())
        conn = EdgeConnection(index, protocol, edge, link, runner)
        self.conns[index] = conn
        control_task: asyncio.Task[None] | None = None
        migrate = self._migrate[index]
        moved = False
        try:
            control = conn.control = StreamInbox(link.open_stream())
            control.send_message({
                "type": "register",
                "tunnel_id": self.token.tunnel_id,
                "secret": base64.b64encode(self.token.secret).decode(),
                "connector_id": self.connector_id,
                "conn_index": index,
                "version": VERSION,
                "protocol": protocol,
                "hostname": socket.gethostname(),
            })
            msg = await _first_of(control.read_message(REGISTER_TIMEOUT), runner, link)
            if msg.get("type") == "error":
                text = str(msg.get("message", "registration refused"))
                if msg.get("permanent", True):
                    raise FatalError(f"the edge refused this tunnel token: {text}")
                raise OSError(f"registration refused: {text}")
            if msg.get("type") != "registered":
                raise OSError(f"unexpected registration answer {msg.get('type')!r}")
            if msg.get("remotely_managed") is False:
                self.orchestrator.ready.set()  # no push is coming: serve the local file (or refuse)
            policy.succeeded()
            conn.registered = True
            self._first_registered.set()
            log.info("connection %d registered with %s over %s (connection id %s)", index, edge, protocol,
                     msg.get("connection_id"))
            control_task = asyncio.create_task(self._control_loop(conn))
            migrate.clear()
            waiter = asyncio.create_task(migrate.wait())
            try:
                await asyncio.wait([runner, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not runner.done() and migrate.is_set():
                moved = True
                migrate.clear()
                self._spawn(self._retire(conn, control_task, f"moving to {self.selector.current}"))
                control_task = None
                return True
            if control_task.done() and not control_task.cancelled() and control_task.exception():
                raise control_task.exception()  # type: ignore[misc]
        finally:
            # On shutdown the link stays up: shutdown() drains and closes it.
            if not moved and not self.shutting_down:
                if self.conns.get(index) is conn:
                    del self.conns[index]
                if control_task is not None:
                    control_task.cancel()
                if not runner.done():
                    await link.close(1000, "")
                    runner.cancel()
                try:
                    await runner
                except (asyncio.CancelledError, Exception):
                    pass
        reason = link.close_reason
        final = _final_refusal(reason)
        if final is not None:  # e.g. the tunnel was deleted and its error message was lost
            raise FatalError(f"the edge refused this tunnel: {final}")
        if reason and any(reason.startswith(r) for r in _TRANSPORT_LOSS):
            raise DialFailed(reason)  # the transport went silent: on auto, try the other one
        if reason:
            raise OSError(reason)
        return False

    async def _retire(self, conn: EdgeConnection, control_task: asyncio.Task[None] | None, why: str) -> None:
        """Unregister a link that is being replaced, let its streams finish, close it."""
        self.retiring.add(conn)
        self._unregister(conn)
        log.info("connection %d over %s: %s; draining %d stream(s)", conn.index, conn.protocol, why,
                 conn.data_streams)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATE_DRAIN_LIMIT
        try:
            while conn.data_streams and not conn.link.is_closed and loop.time() < deadline:
                await asyncio.sleep(0.2)
            await conn.link.close(1000, why)
        finally:
            if control_task is not None:
                control_task.cancel()
            self.retiring.discard(conn)

    async def _reprobe_loop(self) -> None:
        """On fallback, try the preferred transport every reprobe interval; when it answers,
        move each connection back, one at a time, without cutting streams."""
        sel = self.selector
        while not self.shutting_down:
            due = sel.reprobe_at()
            now = self._clock()
            if due is None or now < due:
                await self._sleep(min(1.0, due - now) if due is not None else 1.0)
                continue
            edge = self.token.edge[0]
            try:
                probe = await self._dial(sel.preferred, edge)
            except DialFailed as exc:
                log.info("re-probe: %s to %s still fails (%s); staying on %s", sel.preferred, edge, exc, sel.current)
                sel.probe_failed(self._clock())
                continue
            except FatalError as exc:
                self._die(str(exc))
                return
            await probe.close(1000, "probe")
            previous = sel.current
            sel.recovered(self._clock())
            log.warning("re-probe: %s to %s works again; moving connections back from %s",
                        sel.preferred, edge, previous)
            for index in range(self.ha_connections):
                conn = self.conns.get(index)
                if conn is None or conn.protocol == sel.current or self.shutting_down:
                    continue
                self._migrate[index].set()
                # One at a time: the others keep serving while this one re-registers.
                for _ in range(int((REGISTER_TIMEOUT + 5) / 0.1)):
                    new = self.conns.get(index)
                    if new is not None and new is not conn and new.registered:
                        break
                    await asyncio.sleep(0.1)

    async def _control_loop(self, conn: EdgeConnection) -> None:
        control = conn.control
        assert control is not None
        while True:
            try:
                msg = await control.read_message(3600)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except (EOFError, ConnectionResetError):
                return
            kind = msg.get("type")
            if kind == "config":
                version = msg.get("version")
                rules = (msg.get("config") or {}).get("ingress") or []
                if not isinstance(version, int):
                    continue
                try:
                    if self.orchestrator.update(version, rules):
                        log.info("applied ingress config version %d (%d rules)", version, len(rules))
                except IngressError as exc:
                    log.error("ignoring ingress config version %d: %s", version, exc)
                    continue
                control.send_message({"type": "config_ack", "version": self.orchestrator.config.version})
            elif kind == "keys":
                jwks = msg.get("jwks")
                if isinstance(jwks, dict):
                    self.jwks.load(jwks)
            elif kind == "error":
                text = str(msg.get("message", "the edge closed this connection"))
                if msg.get("permanent"):
                    self._die(f"the edge refused this tunnel: {text}")
                return

    # ------------------------------------------------------------------ data streams
    async def _serve_stream(self, inbox: StreamInbox, conn: EdgeConnection) -> None:
        stream = inbox.stream
        try:
            req = ConnectRequest.from_dict(await inbox.read_message(REQUEST_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError, EOFError, ConnectionResetError, MessageError) as exc:
            if not stream.closed:
                stream.reset(RST_PROTOCOL, f"expected a ConnectRequest: {exc}")
            return
        m = self.metrics
        if self.shutting_down or conn.draining:
            # Raced our unregister: the relay tries another connection (nothing was dialled).
            m.streams_refused += 1
            refuse(inbox, ConnectResponse.fail(
                503, "connector_draining", "this connector connection is shutting down").to_dict())
            return
        rule = (await self.orchestrator.current()).match(req.hostname)
        service = rule.service
        if service.kind == "http_status":
            m.streams_refused += 1
            refuse(inbox, ConnectResponse.fail(
                service.status, "no_ingress_rule",
                f"the connector has no ingress rule for {req.hostname} (status {service.status})").to_dict())
            return
        if rule.access is not None and rule.access.required:
            try:
                await self.verifier(rule.access.issuer).verify(req.assertion, list(rule.access.aud_tags))
            except (AssertionRejected, OSError) as exc:
                m.streams_refused += 1
                log.warning("refused a stream to %s: %s", req.hostname, exc)
                refuse(inbox, ConnectResponse.fail(
                    403, "access_denied", f"the connector refused the stream: {exc}").to_dict())
                return
        origin = f"{service.host}:{service.port}"
        splice = TcpStreamSplice(on_close=self._stream_closed)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: splice, service.host, service.port), rule.connect_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            m.streams_refused += 1
            m.dial_error("timeout")
            log.warning("origin %s for %s did not answer within %.1fs", origin, req.hostname, rule.connect_timeout)
            refuse(inbox, ConnectResponse.fail(
                504, "origin_timeout",
                f"origin {origin} did not accept the connection within {rule.connect_timeout:g}s").to_dict())
            return
        except OSError as exc:
            m.streams_refused += 1
            m.dial_error("unreachable")
            log.warning("origin %s for %s unreachable: %s", origin, req.hostname, exc.strerror or exc)
            refuse(inbox, ConnectResponse.fail(
                502, "origin_unreachable",
                f"origin {origin} is unreachable: {exc.strerror or exc}").to_dict())
            return
        elapsed = time.monotonic() - started
        m.origin_dial.observe(elapsed)
        if stream.closed:
            transport.abort()
            return
        if rule.tcp_keepalive:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                apply_tcp_keepalive(sock, rule.tcp_keepalive)
        m.streams_total += 1
        self._splices.add(splice)
        log.debug("stream %d → %s in %.1f ms", stream.id, origin, elapsed * 1000)
        inbox.send_message(ConnectResponse(ok=True).to_dict())
        splice.stream = stream
        inbox.hand_over(splice)
        splice.activate()

    def _stream_closed(self, splice: TcpStreamSplice) -> None:
        if splice in self._splices:
            self._splices.discard(splice)
            self.metrics.bytes_in_closed += splice.bytes_down
            self.metrics.bytes_out_closed += splice.bytes_up


async def _first_of(coro: Any, runner: asyncio.Task[None], link: Link) -> dict[str, Any]:
    """Await a control message, but fail at once if the link dies first. A link the edge closed
    as refused for good raises FatalError, whether or not its error message got through."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task, runner], return_when=asyncio.FIRST_COMPLETED)
    try:
        if task in done:
            return task.result()
        # The link is gone, but a message that arrived just before its end is still buffered (the
        # inbox hands out what it holds before reporting the reset): the edge's refusal, typically.
        return await asyncio.wait_for(task, 1.0)
    except (EOFError, ConnectionResetError, asyncio.TimeoutError, TimeoutError):
        # No answer: when the link is ending too, its close reason may say why.
        if not runner.done():
            await asyncio.wait([runner], timeout=1.0)
        final = _final_refusal(link.close_reason)
        if final is not None:
            raise FatalError(f"the edge refused this tunnel token: {final}") from None
        if runner.done():
            raise OSError(link.close_reason or "the edge closed the connection during registration") from None
        raise


def _final_refusal(close_reason: str) -> str | None:
    """The edge's message when a link's close reason says it refused this connector for good
    ("registration refused: <message>", possibly wrapped as "closed by peer (<code> <reason>)")."""
    at = close_reason.find(_FINAL_CLOSE)
    if at < 0:
        return None
    text = close_reason[at + len(_FINAL_CLOSE):]
    if close_reason.startswith("closed by peer (") and text.endswith(")"):
        text = text[:-1]
    return text.lstrip(":").strip() or _FINAL_CLOSE


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, InvalidHandshake):
        return f"WebSocket handshake failed: {exc}"
    text = str(exc)
    return text or type(exc).__name__
