"""The proxy inside `hd edge`: the Postgres listener, one pool per config, the one tunnel
session all tunnel origins share, and the hooks the control plane calls."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import replace
from typing import Any

from proxy.configs import origin_spec
from proxy.pg.listener import StartupProtocol
from proxy.pg.origin import DirectDialer, OriginSpec, TunnelDialer, cancel_request, connect_origin, probe
from proxy.pg.statements import StatementRegistry
from proxy.pool import Pool
from tunnel.client import EdgeSession, Endpoint

log = logging.getLogger("proxy")

REAP_INTERVAL = 30.0
# The origin enforces the statement limit itself: sent as a startup option on every connection.
DEFAULT_STATEMENT_TIMEOUT_MS = 60_000


class ProxyService:
    def __init__(self, store: Any, *, edge: Endpoint | None, ssl_context: ssl.SSLContext | None,
                 edge_session: Any = None,
                 statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS, idle_timeout: float = 600.0,
                 connect_timeout: float = 15.0) -> None:
        self.store = store
        self.ssl_context = ssl_context
        # Inside the edge the relay hands out connector streams directly (relay.server.LocalEdgeSession);
        # elsewhere one multiplexed EdgeSession to the relay carries every tunnel origin.
        self.edge_session = edge_session or (EdgeSession(edge) if edge is not None else None)
        self.statement_timeout_ms = statement_timeout_ms
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._pools: dict[str, Pool] = {}
        self._registries: dict[str, StatementRegistry] = {}
        self._users: dict[str, Any] = {}
        self._sessions: dict[tuple[int, bytes], Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._direct = DirectDialer()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: StartupProtocol(self, self.ssl_context), host, port)
        self._reaper = loop.create_task(self._reap_forever())
        log.info("postgres proxy listening on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for pool in self._pools.values():
            pool.close()
        if self.edge_session is not None:
            await self.edge_session.close()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in list(self._pools.values()):
                pool.reap_idle()

    # ------------------------------------------------------------------ configs
    def config_for_user(self, user: str) -> Any:
        config = self._users.get(user)
        if config is None:
            config = self.store.hyperdrive_by_client_user(user)
            if config is not None:
                self._users[user] = config
        return config

    def _current(self, config_id: str) -> Any:
        config = self.store.get_hyperdrive(config_id)
        if config is None:
            raise LookupError("the configuration was deleted")
        return config

    def spec_for(self, config: Any) -> OriginSpec:
        spec = origin_spec(config, self.store)
        params = dict(spec.startup_params)
        params.setdefault("application_name", "hd-proxy")
        params["client_encoding"] = "UTF8"  # clients are held to UTF8 too (see listener)
        params.setdefault("options", f"-c statement_timeout={self.statement_timeout_ms}")
        return replace(spec, startup_params=params, connect_timeout=self.connect_timeout)

    def dialer_for(self, spec: OriginSpec) -> Any:
        if spec.via_tunnel:
            if self.edge_session is None:
                raise RuntimeError("this proxy has no tunnel session")
            return TunnelDialer(self.edge_session)
        return self._direct

    def pool_for(self, config: Any) -> Pool:
        pool = self._pools.get(config.id)
        if pool is None:
            config_id = config.id

            async def connect() -> Any:
                spec = self.spec_for(self._current(config_id))  # always the latest settings
                return await connect_origin(spec, self.dialer_for(spec))

            pool = Pool(config.name, connect, limit=config.origin_connection_limit,
                        idle_timeout=self.idle_timeout, acquire_timeout=self.connect_timeout)
            self._pools[config.id] = pool
        return pool

    def registry_for(self, config: Any) -> StatementRegistry:
        reg = self._registries.get(config.id)
        if reg is None:
            reg = self._registries[config.id] = StatementRegistry()
        return reg

    async def server_parameters(self, config: Any) -> dict[str, str]:
        """The origin's ParameterStatus values, shown to clients at startup."""
        pool = self.pool_for(config)
        if not pool.parameters:
            conn = await pool.acquire()
            pool.release(conn)
        return pool.parameters

    async def probe(self, spec: OriginSpec) -> dict[str, Any]:
        return await probe(spec, self.dialer_for(spec))

    def config_changed(self, config_id: str) -> None:
        self._users.clear()
        pool = self._pools.get(config_id)
        config = self.store.get_hyperdrive(config_id)
        if pool is not None and config is not None:
            pool.settings_changed(config.origin_connection_limit)

    def config_deleted(self, config_id: str) -> None:
        self._users.clear()
        pool = self._pools.pop(config_id, None)
        self._registries.pop(config_id, None)
        if pool is not None:
            pool.close()

    # ------------------------------------------------------------------ sessions and cancel
    def session_opened(self, session: Any) -> None:
        if session.cancel_key is not None:
            self._sessions[session.cancel_key] = session

    def session_closed(self, session: Any) -> None:
        if session.cancel_key is not None:
            self._sessions.pop(session.cancel_key, None)

    def cancel(self, pid: int, key: bytes) -> None:
        session = self._sessions.get((pid, bytes(key)))
        server = getattr(session, "server", None)
        if session is None or server is None:
            return  # unknown, or idle: nothing of this client's is running
        config = self._current_for_pool(session.pool)
        if config is None:
            return
        spec = self.spec_for(config)
        asyncio.get_running_loop().create_task(self._cancel(spec, server.pid, server.secret_key))

    async def _cancel(self, spec: OriginSpec, pid: int, key: bytes) -> None:
        try:
            await cancel_request(spec, self.dialer_for(spec), pid, key)
        except Exception as exc:
            log.info("could not forward a cancel request: %s", exc)

    def _current_for_pool(self, pool: Pool) -> Any:
        for config_id, p in self._pools.items():
            if p is pool:
                return self.store.get_hyperdrive(config_id)
        return None

    def stats(self) -> dict[str, Any]:
        return {"sessions": len(self._sessions), "pools": {cid: p.info() for cid, p in self._pools.items()},
                "time": time.time()}
