"""The relay: accepts connector links and client links, routes client streams by hostname.

Data path: a client (e.g. `hd access tcp`) opens a stream on its `/client` link and sends a
ConnectRequest → the relay resolves the route, asks `access` for a decision, picks a live
connector connection of the route's tunnel, opens a stream there with its own ConnectRequest
and waits (bounded) for the connector's ConnectResponse → relays the response to the client →
bridges the two streams byte for byte with credit back-pressure.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response

from access.assertion import AssertionMinter, SigningKey, jwks_document
from access.gatekeeper import Gatekeeper
from access.tokens import SecretHasher
from relay.registry import ConnectorConnection, Registry
from tunnel.client import StreamRefused
from tunnel.link import Link, MuxLink, StreamInbox, refuse
from tunnel.quiclink import QuicLink, serve_quic_links
from tunnel.wslink import WsLinkProtocol, http_response
from tunnel.messages import (
    RST_PROTOCOL,
    RST_SHUTDOWN,
    ConnectRequest,
    ConnectResponse,
    MessageError,
)
from tunnel.splice import StreamBridge

if TYPE_CHECKING:
    from control.store import Route, Store

log = logging.getLogger("relay")

REGISTER_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0  # client must send its ConnectRequest within this
RESPONSE_MARGIN = 5.0  # connector answers within the route's connect timeout + this
PICK_ATTEMPTS = 3  # connector connections tried for one stream (see _open_upstream)
# Open streams one client link (`hd access tcp/ssh` session) may hold: each bridged one is an
# origin socket at the connector, so one session must not be able to open thousands.
MAX_CLIENT_STREAMS = 1024
# A refused connector gets its error message, then this long to read it and hang up itself
# before the relay closes the link (closing at once can drop the message over QUIC).
REFUSAL_LINGER = 2.0
# Close reasons that tell a connector its refusal is final even when the error message itself
# was lost (connector/supervisor.py reads them): "registration refused: <message>".
REFUSED_CLOSE_REASON = "registration refused"


class Relay:
    def __init__(self, store: Store, ssl_context: ssl.SSLContext | None, *, hash_key: bytes | None = None,
                 issuer: str = "", quic_cert: tuple[Path, Path] | None = None,
                 max_client_streams: int = MAX_CLIENT_STREAMS) -> None:
        self.store = store
        self.ssl_context = ssl_context
        self.quic_cert = quic_cert  # (cert, key): also accept connectors over QUIC on the same port
        self._quic_server: Any = None
        self.registry = Registry()
        self.gatekeeper = Gatekeeper(store, SecretHasher(hash_key or os.urandom(32)), None)
        self._issuer = issuer
        self._jwks: bytes = b'{"keys":[]}'
        self.keys_rotated()
        self._server: asyncio.AbstractServer | None = None
        self._client_links: set[MuxLink] = set()
        self._pending_links: set[MuxLink] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._route_cache: dict[str, Route | None] = {}
        self._started = time.time()
        self.streams_total = 0
        self.streams_failed = 0
        self.bridges_active = 0
        self.max_client_streams = max_client_streams
        self.streams_over_cap = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: WsLinkProtocol(client=False, on_open=self._on_open, on_http=self._http),
            host, port, ssl=self.ssl_context, ssl_handshake_timeout=15)
        self._spawn(self._flush_logs_periodically())
        log.info("relay listening on %s:%d (WebSocket over TLS)", host, self.port)
        if self.quic_cert is not None:
            await self.start_quic(host)

    async def start_quic(self, host: str) -> None:
        """Listen for QUIC connector links on UDP, on the same port number as the TCP listener."""
        assert self.quic_cert is not None
        try:
            self._quic_server = await serve_quic_links(host, self.port, *self.quic_cert, self._on_quic_link)
        except OSError as exc:
            # Connectors on `auto` fall back to WebSocket; say why QUIC is missing.
            log.error("QUIC disabled: cannot listen on UDP %s:%d: %s", host, self.port, exc.strerror or exc)
            return
        log.info("relay listening on %s:%d/udp (QUIC)", host, self.port)

    def stop_quic(self) -> None:
        if self._quic_server is not None:
            for conn in self.registry.all():
                if isinstance(conn.link, QuicLink):
                    conn.link.abort("relay stopped its QUIC listener")
            self._quic_server.close()
            self._quic_server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        for sock in self._server.sockets:
            return int(sock.getsockname()[1])
        raise RuntimeError("relay is not listening")

    async def close(self) -> None:
        # Safe to call even when start() failed.
        if self._server is not None:
            self._server.close()
            self.stop_quic()
            for conn in self.registry.all():
                conn.link.abort("relay shutting down")
            for link in list(self._client_links):
                link.abort("relay shutting down")
            try:
                await asyncio.wait_for(self._server.wait_closed(), 10)
            except asyncio.TimeoutError:
                pass
        for t in list(self._tasks):
            t.cancel()
        try:
            self.gatekeeper.flush()
        except Exception as exc:
            log.error("cannot write the access log: %s", exc)

    @property
    def issuer(self) -> str:
        return self._issuer

    @issuer.setter
    def issuer(self, value: str) -> None:
        # Set by the edge once the advertised tunnel address is known (after start()).
        self._issuer = value
        if self.gatekeeper.minter is not None:
            self.gatekeeper.minter.issuer = value
            self.gatekeeper.minter.set_key(self.gatekeeper.minter.key)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ control-plane hooks
    def config_changed(self, tunnel_id: str) -> None:
        self._route_cache.clear()
        for conn in self.registry.connections(tunnel_id):
            self._push_config(conn)

    def tunnel_deleted(self, tunnel_id: str) -> None:
        self._route_cache.clear()
        for conn in self.registry.connections(tunnel_id):
            self.registry.remove(conn)
            message = "the tunnel was deleted on the edge"
            try:
                conn.control.send_message(
                    {"type": "error", "code": "tunnel_not_found", "permanent": True, "message": message}
                )
            except MessageError:
                pass
            self._spawn(self._close_refused(conn.link, conn.control, conn.runner, message))

    def access_changed(self) -> None:
        """A token or application changed: forget cached decisions (revocation is immediate)."""
        self.gatekeeper.invalidate()
        self._route_cache.clear()

    def keys_rotated(self) -> None:
        """Load the newest signing key for new assertions; publish current + previous keys."""
        keys = [SigningKey.from_pem(pem, created) for pem, created in self.store.signing_keys()]
        if not keys:
            return
        if self.gatekeeper.minter is None:
            self.gatekeeper.minter = AssertionMinter(keys[0], self._issuer)
        else:
            self.gatekeeper.minter.set_key(keys[0])
        doc = jwks_document(keys[:2])
        self._jwks = json.dumps(doc).encode()
        # Connectors verify assertions with these keys: push them so a rotation never leaves
        # a connector with only the old key (its own refetch is rate-limited).
        for conn in self.registry.all():
            self._push_keys(conn)

    def _push_keys(self, conn: ConnectorConnection) -> None:
        try:
            conn.control.send_message({"type": "keys", "jwks": {"keys": json.loads(self._jwks)["keys"]}})
        except MessageError as exc:
            log.error("cannot push signing keys to tunnel %s: %s", conn.tunnel_id, exc)

    def flush_access_logs(self) -> None:
        self.gatekeeper.flush()

    async def _flush_logs_periodically(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self.gatekeeper.flush()
            except Exception as exc:  # the log must never take the relay down
                log.error("cannot write the access log: %s", exc)

    def connections_info(self, tunnel_id: str) -> list[dict[str, Any]]:
        return [c.info() for c in self.registry.connections(tunnel_id)]

    def stats(self) -> dict[str, Any]:
        conns = self.registry.all()
        return {
            "connector_connections": len(conns),
            "client_links": len(self._client_links),
            "connector_streams": sum(c.link.stream_count for c in conns),
            "client_streams": sum(link.stream_count for link in self._client_links),
            "bridges_active": self.bridges_active,
            "streams_over_cap": self.streams_over_cap,
            "streams_total": self.streams_total,
            "streams_failed": self.streams_failed,
            "uptime": time.time() - self._started,
        }

    # ------------------------------------------------------------------ WebSocket entry
    def _http(self, request: Request) -> Response | None:
        """Plain HTTP on the tunnel port: the JWKS, or 404 for anything but the two upgrades."""
        if request.path == "/cdn-cgi/access/certs":
            return http_response(200, self._jwks, "application/json")
        if request.path not in ("/tunnel", "/client"):
            return http_response(404, b"not found: connect to /tunnel or /client\n")
        return None

    def _on_open(self, proto: WsLinkProtocol) -> None:
        assert proto.link is not None and proto.request is not None
        remote = f"{proto.remote_address[0]}:{proto.remote_address[1]}"
        link = proto.link
        # Handlers are attached now, synchronously: the peer's first frames may arrive in the
        # same read as the end of the handshake, before any task would run.
        if proto.request.path == "/tunnel":
            self._accept_connector(link, remote)
        else:
            link.on_stream = lambda stream: self._client_stream_opened(link, stream, remote)
            self._spawn(self._serve_client(link, remote))

    def _on_quic_link(self, link: QuicLink) -> None:
        # Only connectors speak QUIC to the relay (clients use the WebSocket /client link).
        host, port = link.remote_address
        self._accept_connector(link, f"{host}:{port}")

    def _accept_connector(self, link: Link, remote: str) -> None:
        registered: asyncio.Future[StreamInbox] = asyncio.get_running_loop().create_future()

        def on_stream(stream: Any) -> None:
            # The first stream a connector opens is its control stream; it opens no others.
            if registered.done():
                stream.reset(RST_PROTOCOL, "connectors may open only the control stream")
                return
            registered.set_result(StreamInbox(stream))

        link.on_stream = on_stream
        self._spawn(self._serve_connector(link, remote, registered))

    # ------------------------------------------------------------------ connectors
    async def _serve_connector(self, link: Link, remote: str,
                               registered: asyncio.Future[StreamInbox]) -> None:
        runner = asyncio.create_task(link.run())
        conn: ConnectorConnection | None = None
        try:
            try:
                control = await asyncio.wait_for(asyncio.shield(registered), REGISTER_TIMEOUT)
                msg = await control.read_message(REGISTER_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError, EOFError, ConnectionResetError, MessageError) as exc:
                log.warning("connector %s did not register: %s", remote, exc or type(exc).__name__)
                await link.close(1002, "registration expected")
                return
            outcome = self._register(link, control, msg, remote)
            if isinstance(outcome, str):
                await self._close_refused(link, control, runner, outcome)
                return
            conn = outcome
            conn.runner = runner
            self._spawn(self._control_loop(conn, control))
            await runner
        finally:
            if conn is not None:
                self.registry.remove(conn)
                log.info(
                    "connector %s conn %d of tunnel %s disconnected: %s",
                    conn.connector_id, conn.conn_index, conn.tunnel_id, link.close_reason or "closed",
                )
            if not runner.done():
                runner.cancel()
            try:
                await runner
            except (asyncio.CancelledError, Exception):
                pass

    async def _close_refused(self, link: Link, control: StreamInbox, runner: asyncio.Task[None] | None,
                             message: str) -> None:
        """End a link whose connector was just sent a final error: FIN the control stream, give the
        connector REFUSAL_LINGER to read the error and hang up itself, then close with a reason
        that says the refusal is final (in case the message was lost with the connection)."""
        if not control.stream.closed:
            control.stream.write_eof()
        if runner is not None and not runner.done():
            try:
                await asyncio.wait_for(asyncio.shield(runner), REFUSAL_LINGER)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            except Exception:  # the runner's own failure is the link's end, reported elsewhere
                pass
        await link.close(1008, _close_reason(f"{REFUSED_CLOSE_REASON}: {message}"))

    def _register(
        self, link: Link, control: StreamInbox, msg: dict[str, Any], remote: str
    ) -> ConnectorConnection | str:
        """A registered connection, or the message of the error sent to the connector."""
        def fail(code: str, message: str, permanent: bool = True) -> str:
            log.warning("refused connector registration from %s: %s", remote, message)
            control.send_message({"type": "error", "code": code, "message": message, "permanent": permanent})
            return message

        if msg.get("type") != "register":
            return fail("bad_request", "the first control message must be a registration")
        tunnel_id = msg.get("tunnel_id")
        secret_b64 = msg.get("secret")
        if not isinstance(tunnel_id, str) or not isinstance(secret_b64, str):
            return fail("bad_request", "registration needs tunnel_id and secret")
        if not _PRINTABLE_ID.fullmatch(tunnel_id):  # it is echoed in logs and messages
            return fail("tunnel_not_found", "the tunnel id in this token is malformed")
        try:
            secret = base64.b64decode(secret_b64, validate=True)
        except ValueError:
            return fail("unauthorized", "the tunnel secret is not valid base64")
        tunnel = self.store.get_tunnel(tunnel_id)
        if tunnel is None or tunnel.id != tunnel_id:
            return fail("tunnel_not_found", f"tunnel {tunnel_id} does not exist (was it deleted?)")
        if not hmac.compare_digest(tunnel.secret, secret):
            return fail("unauthorized", "the tunnel secret is wrong (is the token current?)")
        conn = ConnectorConnection(
            tunnel_id=tunnel.id,
            connector_id=str(msg.get("connector_id", ""))[:64],
            conn_index=int(msg.get("conn_index", 0)) if str(msg.get("conn_index", "0")).isdigit() else 0,
            version=str(msg.get("version", ""))[:32],
            protocol="quic" if isinstance(link, QuicLink) else "websocket",
            hostname=str(msg.get("hostname", ""))[:255],
            link=link,
            control=control,
            remote=remote,
        )
        # Locally-managed tunnels (no route names a service) get no config push: the
        # connector then serves its own --config file at once instead of waiting for one.
        remote_config = self.store.ingress_config(tunnel.id) is not None
        control.send_message({"type": "registered", "connection_id": conn.connection_id,
                              "remotely_managed": remote_config})
        self.registry.add(conn)
        self._push_keys(conn)
        self._push_config(conn)
        log.info(
            "connector %s conn %d registered for tunnel %s (%s) from %s",
            conn.connector_id, conn.conn_index, tunnel.name, tunnel.id, remote,
        )
        return conn

    def _push_config(self, conn: ConnectorConnection) -> None:
        config = self.store.ingress_config(conn.tunnel_id)
        if config is None:  # locally managed: the connector's own file decides
            return
        version, rules = config
        if version <= conn.config_version:
            return
        conn.config_version = version
        try:
            conn.control.send_message(
                {"type": "config", "version": version, "config": {"ingress": rules}}
            )
        except MessageError as exc:
            log.error("cannot push config version %d to tunnel %s: %s", version, conn.tunnel_id, exc)

    async def _control_loop(self, conn: ConnectorConnection, control: StreamInbox) -> None:
        while not conn.link.is_closed:
            try:
                msg = await control.read_message(3600)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except (EOFError, ConnectionResetError, MessageError):
                return
            kind = msg.get("type")
            if kind == "config_ack":
                v = msg.get("version")
                if isinstance(v, int):
                    conn.acked_version = max(conn.acked_version, v)
            elif kind == "unregister":
                conn.draining = True
                log.info("connector %s conn %d unregistered (draining)", conn.connector_id, conn.conn_index)

    # ------------------------------------------------------------------ clients
    async def _serve_client(self, link: MuxLink, remote: str) -> None:
        self._client_links.add(link)
        try:
            await link.run()
        finally:
            self._client_links.discard(link)

    async def open_local(self, hostname: str, headers: dict[str, str]) -> tuple[StreamInbox, ConnectResponse]:
        """A stream to `hostname` for a client inside this process (the proxy): the same access
        check and ConnectRequest, but the caller gets the connector's stream itself — no
        in-memory link and no bridge in between. Raises StreamRefused like EdgeSession.open."""
        req = ConnectRequest(hostname=hostname.lower().rstrip("."), headers=headers)
        self.streams_total += 1
        try:
            return await self._open_upstream(req, "in-process:0")
        except _Refused as r:
            self.streams_failed += 1
            log.info("stream to %s from the proxy refused: %d %s: %s", req.hostname, r.status, r.code, r.error)
            raise StreamRefused(ConnectResponse.fail(r.status, r.code, r.error)) from None

    async def _open_upstream(self, req: ConnectRequest, remote: str) -> tuple[StreamInbox, ConnectResponse]:
        """Route, access decision, pick a connector connection, ConnectRequest → ConnectResponse."""
        route = self._route(req.hostname)
        if route is None:
            raise _Refused(404, "no_route", f"no tunnel route for hostname {req.hostname}")
        verdict = self.gatekeeper.check(route, req.headers, remote)
        decision = verdict.decision
        if not decision.allowed:
            raise _Refused(decision.status, decision.code, decision.reason)
        if route.service.startswith("http_status:"):
            code = int(route.service.split(":", 1)[1])
            raise _Refused(code, "http_status", f"{req.hostname} answers with status {code}")
        # A connection that dies (SIGKILLed replica) or is draining (SIGTERM) before the
        # connector answered never dialled the origin for us, or its origin socket died with
        # it: the stream is safe to try once more on another live connection.
        tried: list[ConnectorConnection] = []
        retry: _Refused | None = None
        for _ in range(PICK_ATTEMPTS):
            conn = self.registry.pick(route.tunnel_id, exclude=tried)
            if conn is None:
                break
            tried.append(conn)
            try:
                return await self._ask_connector(conn, route, req, verdict.assertion, remote)
            except _Retry as r:
                retry = r.refusal
                log.info("stream to %s: connector %s conn %d could not take it (%s); trying another connection",
                         req.hostname, conn.connector_id, conn.conn_index, r.refusal.error)
        if retry is not None:
            raise retry
        raise _Refused(503, "no_connector", f"no connector is connected for the tunnel serving {req.hostname}")

    async def _ask_connector(self, conn: ConnectorConnection, route: Route, req: ConnectRequest,
                             assertion: str | None, remote: str) -> tuple[StreamInbox, ConnectResponse]:
        try:
            upstream = conn.link.open_stream()
        except Exception as exc:  # link died between pick and open
            raise _Retry(_Refused(503, "no_connector", f"connector connection unavailable: {exc}")) from None
        conn.streams_total += 1
        up = StreamInbox(upstream)
        up.send_message(ConnectRequest(hostname=req.hostname, type=req.type, metadata={"src": remote},
                                       assertion=assertion).to_dict())
        try:
            resp = ConnectResponse.from_dict(await up.read_message(route.connect_timeout + RESPONSE_MARGIN))
        except (TimeoutError, asyncio.TimeoutError):
            upstream.reset(RST_SHUTDOWN, "no ConnectResponse in time")
            raise _Refused(504, "origin_timeout", f"the connector did not answer for {req.hostname} in time") from None
        except (EOFError, ConnectionResetError, MessageError) as exc:
            if not upstream.closed:
                upstream.reset(RST_PROTOCOL, "bad ConnectResponse")
            refusal = _Refused(502, "connector_error", f"the connector dropped the stream: {exc}")
            if conn.link.is_closed:
                raise _Retry(refusal) from None
            raise refusal from None
        if not resp.ok:
            if not upstream.closed:
                upstream.reset(RST_SHUTDOWN, "refused")
            refusal = _Refused(resp.status, resp.code, resp.error)
            if resp.code == "connector_draining":
                conn.draining = True  # the unregister may still be in flight
                raise _Retry(refusal)
            raise refusal
        return up, resp

    def _route(self, hostname: str) -> Route | None:
        try:
            return self._route_cache[hostname]
        except KeyError:
            route = self.store.get_route(hostname)
            if len(self._route_cache) > 10000:
                self._route_cache.clear()
            self._route_cache[hostname] = route
            return route

    def _client_stream_opened(self, link: MuxLink, stream: Any, remote: str) -> None:
        inbox = StreamInbox(stream)
        # stream_count includes this stream and every one not yet finished on our side.
        if link.stream_count > self.max_client_streams:
            self.streams_total += 1
            self.streams_failed += 1
            self.streams_over_cap += 1
            if self.streams_over_cap % 1000 == 1:  # one line per burst, not one per stream
                log.warning("client %s opened more than %d streams on one link: refusing the excess "
                            "(%d refused so far)", remote, self.max_client_streams, self.streams_over_cap)
            refuse(inbox, ConnectResponse.fail(
                429, "too_many_streams",
                f"this client session already has {self.max_client_streams} open streams, the most the "
                "edge allows per session; close some, or open another session").to_dict())
            return
        self._spawn(self._client_stream(inbox, remote))

    async def _client_stream(self, inbox: StreamInbox, remote: str) -> None:
        self.streams_total += 1
        try:
            req = ConnectRequest.from_dict(await inbox.read_message(REQUEST_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError, EOFError, ConnectionResetError, MessageError) as exc:
            self.streams_failed += 1
            if not inbox.stream.closed:
                inbox.stream.reset(RST_PROTOCOL, f"expected a ConnectRequest: {exc}")
            return

        try:
            up, resp = await self._open_upstream(req, remote)
        except _Refused as r:
            self.streams_failed += 1
            log.info("stream to %s from %s refused: %d %s: %s", req.hostname, remote, r.status, r.code, r.error)
            refuse(inbox, ConnectResponse.fail(r.status, r.code, r.error).to_dict())
            return
        upstream = up.stream
        if inbox.stream.closed:  # client went away meanwhile
            upstream.reset(RST_SHUTDOWN, "client went away")
            return

        inbox.send_message(resp.to_dict())
        self.bridges_active += 1

        def done() -> None:
            self.bridges_active -= 1

        bridge = StreamBridge(inbox.stream, upstream, on_done=done)
        inbox.hand_over(bridge.end_a)
        up.hand_over(bridge.end_b)


_PRINTABLE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _close_reason(text: str, limit: int = 120) -> str:
    """A close reason both transports carry: at most `limit` UTF-8 bytes, one line."""
    raw = " ".join(text.split()).encode()[:limit]
    return raw.decode("utf-8", "ignore")


class _Refused(Exception):
    def __init__(self, status: int, code: str, error: str) -> None:
        super().__init__(error)
        self.status, self.code, self.error = status, code, error


class _Retry(Exception):
    """The picked connection could not take the stream, and another one may."""

    def __init__(self, refusal: _Refused) -> None:
        super().__init__(refusal.error)
        self.refusal = refusal


class LocalEdgeSession:
    """What the in-process proxy uses instead of an EdgeSession: streams straight from the relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def open(self, hostname: str, headers: dict[str, str]) -> tuple[StreamInbox, ConnectResponse]:
        return await self.relay.open_local(hostname, headers)

    async def close(self) -> None:
        pass
