"""The connector's edge connections: dial, register, take config, serve streams, reconnect.

Each of the `ha_connections` loops keeps one link to the edge. A permanent registration
failure (bad secret, deleted tunnel) or a certificate that does not match the token's pin is
final: `FatalError` ends the whole process with a clear message instead of a retry storm.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import time
import uuid
from typing import Any, Callable

from websockets.exceptions import InvalidHandshake, WebSocketException

import aiohttp

from access.assertion import AssertionRejected, AssertionVerifier, JwksCache
from connector.backoff import Backoff
from connector.ingress import EMPTY, IngressConfig, IngressError
from tunnel.wslink import PinMismatch, dial_link
from tunnel.link import MuxLink, StreamInbox, refuse
from tunnel.messages import RST_PROTOCOL, ConnectRequest, ConnectResponse, MessageError
from tunnel.splice import TcpStreamSplice
from tunnel.token import TunnelToken

log = logging.getLogger("connector")

VERSION = "0.1.0"
REGISTER_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0


class FatalError(Exception):
    """Stops the connector: retrying cannot help."""


class Orchestrator:
    """Holds the applied ingress config; a version not newer than the current one is ignored."""

    def __init__(self) -> None:
        self.config: IngressConfig = EMPTY
        self.ready = asyncio.Event()  # set once a config has been applied

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


class Supervisor:
    def __init__(
        self,
        token: TunnelToken,
        *,
        ha_connections: int = 4,
        protocol: str = "websocket",
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.token = token
        self.ha_connections = max(1, ha_connections)
        self.protocol = protocol
        self.connector_id = str(uuid.uuid4())
        self.orchestrator = Orchestrator()
        self.links: dict[int, MuxLink] = {}
        self.registered: set[int] = set()
        self.controls: dict[int, StreamInbox] = {}
        self._rand = rand
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fatal: asyncio.Future[str] | None = None
        self._first_registered = asyncio.Event()
        self.streams_active = 0
        self.streams_total = 0
        self.streams_refused = 0
        # Assertions are verified against the keys the (pinned) edge publishes.
        self.jwks = JwksCache(self._fetch_jwks)
        self._verifiers: dict[str, AssertionVerifier] = {}

    def verifier(self, issuer: str | None) -> AssertionVerifier:
        issuer = issuer or f"https://{self.token.edge[0]}"
        v = self._verifiers.get(issuer)
        if v is None:
            v = self._verifiers[issuer] = AssertionVerifier(self.jwks, issuer)
        return v

    async def _fetch_jwks(self) -> dict[str, Any]:
        """GET /cdn-cgi/access/certs from the edge, over TLS pinned like the tunnel itself."""
        pin = bytes.fromhex(self.token.pin.split(":", 1)[1])
        timeout = aiohttp.ClientTimeout(total=10)
        errors: list[str] = []
        for edge in self.token.edge:
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    async with http.get(f"https://{edge}/cdn-cgi/access/certs", ssl=aiohttp.Fingerprint(pin)) as r:
                        if r.status != 200:
                            raise OSError(f"HTTP {r.status}")
                        doc = await r.json(content_type=None)
                        if isinstance(doc, dict):
                            return doc
                        raise OSError("not a JWKS document")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                errors.append(f"{edge}: {exc or type(exc).__name__}")
        raise OSError("cannot fetch the edge's signing keys: " + "; ".join(errors))

    # ------------------------------------------------------------------ process lifetime
    async def run(self) -> None:
        """Run until a fatal error (raised as FatalError) or cancellation."""
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        loops = []
        for index in range(self.ha_connections):
            loops.append(asyncio.create_task(self._connection_loop(index)))
            if index == 0:
                # Connection 0 first, as cloudflared does: its outcome (e.g. a bad token) decides.
                first = asyncio.ensure_future(self._first_registered.wait())
                await asyncio.wait([first, self._fatal], timeout=REGISTER_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
                first.cancel()
                if self._fatal.done():
                    break
        try:
            message = await self._fatal
        finally:
            for t in loops:
                t.cancel()
            await self.close()
        raise FatalError(message)

    async def close(self) -> None:
        for index, link in list(self.links.items()):
            control = self.controls.get(index)
            if index in self.registered and control is not None:
                control.send_message({"type": "unregister"})
            await link.close(1001, "connector shutting down")
        for t in list(self._tasks):
            t.cancel()

    def _die(self, message: str) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one HA connection
    async def _connection_loop(self, index: int) -> None:
        backoff = Backoff(rand=self._rand)
        edges = self.token.edge
        attempt = 0
        while True:
            edge = edges[(index + attempt) % len(edges)]
            attempt += 1
            try:
                await self._connect_once(index, f"wss://{edge}", backoff)
                reason = "connection closed"
            except FatalError as exc:
                self._die(str(exc))
                return
            except (OSError, asyncio.TimeoutError, TimeoutError, WebSocketException, MessageError,
                    EOFError, ConnectionResetError) as exc:
                reason = _describe(exc)
            self.registered.discard(index)
            delay = backoff.next_delay()
            log.warning("connection %d to %s lost (%s); reconnecting in %.1fs", index, edge, reason, delay)
            await asyncio.sleep(delay)

    async def _connect_once(self, index: int, url: str, backoff: Backoff) -> None:
        try:
            link = await dial_link(url, self.token.pin, "/tunnel")
        except PinMismatch as exc:
            raise FatalError(f"the edge at {url} is not the one this token was issued by: {exc}") from None
        except InvalidHandshake as exc:
            raise OSError(f"the edge refused the WebSocket upgrade: {exc}") from None
        link.on_stream = lambda s: self._spawn(self._serve_stream(StreamInbox(s)))
        runner = asyncio.create_task(link.run())
        self.links[index] = link
        control_task: asyncio.Task[None] | None = None
        try:
            control = StreamInbox(link.open_stream())
            self.controls[index] = control
            control.send_message({
                "type": "register",
                "tunnel_id": self.token.tunnel_id,
                "secret": base64.b64encode(self.token.secret).decode(),
                "connector_id": self.connector_id,
                "conn_index": index,
                "version": VERSION,
                "protocol": "websocket",
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
            backoff.reset()
            self.registered.add(index)
            self._first_registered.set()
            log.info("connection %d registered with %s (connection id %s)", index, url,
                     msg.get("connection_id"))
            control_task = asyncio.create_task(self._control_loop(index, control))
            await runner
            if control_task.done() and not control_task.cancelled() and control_task.exception():
                raise control_task.exception()  # type: ignore[misc]
        finally:
            self.links.pop(index, None)
            self.controls.pop(index, None)
            if control_task is not None:
                control_task.cancel()
            if not runner.done():
                await link.close(1000, "")
                runner.cancel()
            try:
                await runner
            except (asyncio.CancelledError, Exception):
                pass
        if link.close_reason:
            raise OSError(link.close_reason)

    async def _control_loop(self, index: int, control: StreamInbox) -> None:
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
    async def _serve_stream(self, inbox: StreamInbox) -> None:
        stream = inbox.stream
        try:
            req = ConnectRequest.from_dict(await inbox.read_message(REQUEST_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError, EOFError, ConnectionResetError, MessageError) as exc:
            if not stream.closed:
                stream.reset(RST_PROTOCOL, f"expected a ConnectRequest: {exc}")
            return
        rule = (await self.orchestrator.current()).match(req.hostname)
        service = rule.service
        if service.kind == "http_status":
            refuse(inbox, ConnectResponse.fail(
                service.status, "no_ingress_rule",
                f"the connector has no ingress rule for {req.hostname} (status {service.status})").to_dict())
            return
        if rule.access is not None and rule.access.required:
            try:
                await self.verifier(rule.access.issuer).verify(req.assertion, list(rule.access.aud_tags))
            except (AssertionRejected, OSError) as exc:
                self.streams_refused += 1
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
            log.warning("origin %s for %s did not answer within %.1fs", origin, req.hostname, rule.connect_timeout)
            refuse(inbox, ConnectResponse.fail(
                504, "origin_timeout",
                f"origin {origin} did not accept the connection within {rule.connect_timeout:g}s").to_dict())
            return
        except OSError as exc:
            log.warning("origin %s for %s unreachable: %s", origin, req.hostname, exc.strerror or exc)
            refuse(inbox, ConnectResponse.fail(
                502, "origin_unreachable",
                f"origin {origin} is unreachable: {exc.strerror or exc}").to_dict())
            return
        if stream.closed:
            transport.abort()
            return
        self.streams_active += 1
        self.streams_total += 1
        log.debug("stream %d → %s in %.1f ms", stream.id, origin, (time.monotonic() - started) * 1000)
        inbox.send_message(ConnectResponse(ok=True).to_dict())
        splice.stream = stream
        inbox.hand_over(splice)
        splice.activate()

    def _stream_closed(self, splice: TcpStreamSplice) -> None:
        if splice.stream is not None:
            self.streams_active -= 1


async def _first_of(coro: Any, runner: asyncio.Task[None], link: MuxLink) -> dict[str, Any]:
    """Await a control message, but fail at once if the link dies first."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task, runner], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    raise OSError(link.close_reason or "the edge closed the connection during registration")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, InvalidHandshake):
        return f"WebSocket handshake failed: {exc}"
    text = str(exc)
    return text or type(exc).__name__
