"""The proxy inside `hd edge`: the Postgres and MySQL listeners, one pool per config, the one
tunnel session all tunnel origins share, and the hooks the control plane calls."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import replace
from typing import Any, Mapping

from proxy.cache.catalog import CATALOG_SQL
from proxy.cache.metrics import Gauge, MetricsRegistry
from proxy.cache.store import DEFAULT_MAX_BYTES, Fill, Namespace, QueryCache
from proxy.configs import origin_spec
from proxy.mysql.origin import connect_mysql_origin
from proxy.mysql.origin import probe_mysql as _probe_mysql
from proxy.pg.caching import CacheContext, CachePolicy
from proxy.pg.listener import StartupProtocol
from proxy.pg.oneshot import NullTransport, prepare_settings, run_query
from proxy.pg.origin import DirectDialer, OriginSpec, TunnelDialer, cancel_request, connect_origin, probe
from proxy.pg.pooling import ClientCore
from proxy.pg.settings import SessionSettings
from proxy.pg.session import ClientSession
from proxy.pg.statements import StatementRegistry
from proxy.pool import Pool
from tunnel.client import EdgeSession, Endpoint

log = logging.getLogger("proxy")

REAP_INTERVAL = 30.0
CATALOG_TIMEOUT = 20.0  # a catalog snapshot (clients wait for it at most this long)
WELCOME_CATALOG_WAIT = 5.0  # a config's first client waits this long at most for the first snapshot


# Session settings that cannot change a query's rows, left out of cache keys so that clients that
# differ only in them (application_name above all) share entries. Every other setting counts.
RESULT_NEUTRAL_SETTINGS = frozenset({
    "application_name", "fallback_application_name", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "idle_session_timeout", "client_min_messages",
    "log_min_duration_statement", "log_statement", "tcp_keepalives_idle", "tcp_keepalives_interval",
    "tcp_keepalives_count", "tcp_user_timeout",
})


class _Pending:
    """A running catalog load, as something a session can wait on."""

    timeout = CATALOG_TIMEOUT + 1.0

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def add_callback(self, fn: Any) -> None:
        self.task.add_done_callback(lambda _t: fn())
# The edge's statement limit: enforced by the proxy (proxy/pg/session.py), never set at the origin,
# so that a client can neither lift it nor see it.
DEFAULT_STATEMENT_TIMEOUT_MS = 60_000
MAX_SETTINGS_SEEN = 4096  # per config: startup settings the origin has judged (see session_settings)


class ProxyService:
    supports_mysql = True  # control/api.py accepts mysql configs only from a proxy that says so

    def __init__(self, store: Any, *, edge: Endpoint | None, ssl_context: ssl.SSLContext | None,
                 edge_session: Any = None,
                 statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS, idle_timeout: float = 600.0,
                 connect_timeout: float = 15.0, cache_max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Any = None, wall_clock: Any = None) -> None:
        self.store = store
        self.ssl_context = ssl_context
        # Inside the edge the relay hands out connector streams directly (relay.server.LocalEdgeSession);
        # elsewhere one multiplexed EdgeSession to the relay carries every tunnel origin.
        self.edge_session = edge_session or (EdgeSession(edge) if edge is not None else None)
        self.statement_timeout_ms = statement_timeout_ms
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._pools: dict[str, Pool] = {}
        self._mysql_pools: dict[str, Pool] = {}  # config id -> pool of MySQLServerConn (mysql configs)
        self._mysql_server: asyncio.AbstractServer | None = None
        self._mysql_rsa_key: Any = None
        self._registries: dict[str, StatementRegistry] = {}
        self._users: dict[str, Any] = {}
        self._sessions: dict[tuple[int, bytes], Any] = {}
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._direct = DirectDialer()
        # The query cache (one for every origin), per-config cache settings and metrics.
        self.cache = QueryCache(cache_max_bytes, clock=clock or time.monotonic)
        self.metrics = MetricsRegistry(clock=wall_clock or time.time)
        self._policies: dict[str, CachePolicy] = {}
        self._ns_of: dict[str, Namespace] = {}  # config id -> the namespace its policy counts in
        self._refreshing: dict[str, int] = {}  # config id -> background refreshes running
        # config id -> startup settings -> (the session's values as the origin spells them, the
        # ParameterStatus values a client with them is told): each set is judged once.
        self._settings_seen: dict[str, dict[frozenset[tuple[str, str]], tuple[dict[str, str], dict[bytes, bytes]]]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: StartupProtocol(self, self.ssl_context), host, port)
        self._reaper = loop.create_task(self._reap_forever())
        log.info("postgres proxy listening on %s:%d", host, self.port)

    async def start_mysql(self, host: str, port: int) -> None:
        """The MySQL listener (`hd edge --mysql-listen`); `start` (Postgres) may run or not."""
        from proxy.mysql.session import MySQLClientProtocol  # imported late: Postgres-only use stays light

        loop = asyncio.get_running_loop()
        self._mysql_server = await loop.create_server(lambda: MySQLClientProtocol(self, self.ssl_context),
                                                      host, port)
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap_forever())
        log.info("mysql proxy listening on %s:%d", host, self.mysql_port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def mysql_port(self) -> int:
        assert self._mysql_server is not None
        return int(self._mysql_server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._mysql_server is not None:
            self._mysql_server.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for pool in [*self._pools.values(), *self._mysql_pools.values()]:
            pool.close()
        if self.edge_session is not None:
            await self.edge_session.close()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            for pool in [*self._pools.values(), *self._mysql_pools.values()]:
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
        # Nothing of the proxy's own shows through to clients: no application_name, no
        # statement_timeout (the proxy enforces the edge's limit itself, see ClientSession);
        # UTF8 is the baseline encoding (a client's own is carried like any setting).
        spec = origin_spec(config, self.store)
        params = dict(spec.startup_params)
        params["client_encoding"] = "UTF8"
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

            metrics = self.metrics.for_config(config.id)
            pool = Pool(config.name, connect, limit=config.origin_connection_limit,
                        idle_timeout=self.idle_timeout, acquire_timeout=self.connect_timeout,
                        on_connect=metrics.connection)
            self._pools[config.id] = pool
        return pool

    # ------------------------------------------------------------------ mysql configs
    def mysql_spec_for(self, config: Any) -> OriginSpec:
        """How to reach a mysql config's origin (no Postgres startup parameters)."""
        return replace(origin_spec(config, self.store), connect_timeout=self.connect_timeout)

    def mysql_pool_for(self, config: Any) -> Pool:
        pool = self._mysql_pools.get(config.id)
        if pool is None:
            from proxy.mysql.pool import POOL_CAPABILITIES, MySQLServerConn

            config_id = config.id

            async def connect() -> Any:
                spec = self.mysql_spec_for(self._current(config_id))  # always the latest settings
                return await connect_mysql_origin(spec, self.dialer_for(spec), capabilities=POOL_CAPABILITIES)

            metrics = self.metrics.for_config(config.id)
            pool = Pool(config.name, connect, limit=config.origin_connection_limit,
                        idle_timeout=self.idle_timeout, acquire_timeout=self.connect_timeout,
                        on_connect=metrics.connection, wrap=MySQLServerConn)
            self._mysql_pools[config.id] = pool
        return pool

    @property
    def mysql_rsa_key(self) -> Any:
        """The RSA key pair (cryptography RSAPrivateKey, 2048 bits) clients use for full
        caching_sha2_password authentication without TLS; made once, on first use."""
        if self._mysql_rsa_key is None:
            from cryptography.hazmat.primitives.asymmetric import rsa

            self._mysql_rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._mysql_rsa_key

    def registry_for(self, config: Any) -> StatementRegistry:
        reg = self._registries.get(config.id)
        if reg is None:
            reg = self._registries[config.id] = StatementRegistry()
        return reg

    # ------------------------------------------------------------------ the query cache
    def policy_for(self, config: Any) -> CachePolicy:
        policy = self._policies.get(config.id)
        if policy is None:
            policy = self._policies[config.id] = CachePolicy()
        # `hd edge --cache-size 0` turns caching off for every config.
        policy.disabled = bool(config.caching_disabled) or self.cache.max_bytes <= 0
        policy.max_age, policy.swr = float(config.max_age), float(config.swr)
        ns = self.namespace_for(config)
        old = self._ns_of.get(config.id)
        if old is not None and old is not ns:
            old.cached_by.discard(config.id)  # the config now points elsewhere
        self._ns_of[config.id] = ns
        if policy.disabled:
            ns.cached_by.discard(config.id)
        else:
            ns.cached_by.add(config.id)
        return policy

    def namespace_for(self, config: Any) -> Namespace:
        """Configs that reach the same origin database share one namespace: a write through
        any of them invalidates the cached reads of all."""
        return self.cache.namespace((config.scheme, config.host.lower(), config.port, config.database))

    def cache_context(self, config: Any) -> CacheContext:
        ns = self.namespace_for(config)
        user, database = config.user, config.database

        def prefix_for(settings: Mapping[str, str]) -> int:
            # The key covers everything that can change an answer besides the statement: the
            # origin database (namespace), the role, and the settings the session runs under
            # now (carried SETs included; role and search_path above all).
            return self.cache.prefix(ns, user, database, tuple(sorted(
                (k, v) for k, v in settings.items() if k not in RESULT_NEUTRAL_SETTINGS)))

        config_id = config.id

        def refresh(request: bytes, fill: Fill, settings: dict[str, str]) -> None:
            self._refresh(config_id, settings, request, fill)

        def reload_catalog(now: float, names: frozenset[str]) -> Any:
            return self._reload_catalog(ns, config_id, now, names)

        return CacheContext(ns, self.policy_for(config), prefix_for, self.metrics.for_config(config.id),
                            self.cache.clock, refresh, reload_catalog)

    async def catalog_ready(self, config: Any) -> None:
        """Load the origin's catalog for the cache once, before a config's first client runs
        queries (bounded; on failure the cache fails closed and retries later)."""
        # Configs with caching off need it too: their writes invalidate the others' reads.
        ns = self.namespace_for(config)
        if ns.catalog.loaded:
            return
        pending = self._reload_catalog(ns, config.id, self.cache.clock(), frozenset())
        if pending is not None:
            # A huge catalog may take longer: the client goes on, the load continues.
            await asyncio.wait({pending.task}, timeout=WELCOME_CATALOG_WAIT)

    def _reload_catalog(self, ns: Namespace, config_id: str, now: float, names: frozenset[str]) -> Any:
        """Start (or join) a catalog load for `ns`; None when it would not help (see
        OriginCatalog.may_reload) and no DDL went through since the last one."""
        if ns.catalog_loading is not None:
            return ns.catalog_loading
        if not ns.catalog_stale and not ns.catalog.may_reload(now, names):
            return None
        ns.catalog_stale = False
        ns.catalog.reloading_for(now, names)
        task = asyncio.get_running_loop().create_task(self._load_catalog(ns, config_id))
        pending = _Pending(task)

        def done(_t: asyncio.Task[None]) -> None:
            if ns.catalog_loading is pending:
                ns.catalog_loading = None

        task.add_done_callback(done)  # first, so waiters see it finished
        ns.catalog_loading = pending
        return pending

    async def _load_catalog(self, ns: Namespace, config_id: str) -> None:
        config = self.store.get_hyperdrive(config_id)
        if config is None:
            return
        started = time.monotonic()
        try:
            results = await run_query(self.pool_for(config), CATALOG_SQL, CATALOG_TIMEOUT)
            ns.catalog.load(results)
        except Exception as exc:  # fail closed: unknown names stay volatile/uncacheable
            log.warning("could not read the catalog of %s for the query cache: %s", config.name, exc)
            return
        log.info("query cache: catalog of %s loaded (%.0f ms)", config.name, (time.monotonic() - started) * 1000)

    def _refresh(self, config_id: str, settings: dict[str, str], request: bytes, fill: Fill) -> None:
        """Stale-while-revalidate: run the entry's query again in the background."""
        config = self.store.get_hyperdrive(config_id)
        pool = self._pools.get(config_id)
        running = self._refreshing.get(config_id, 0)
        # Refreshes never take more than a quarter of the pool from clients.
        if config is None or pool is None or running >= max(1, pool.limit // 4):
            fill.ns.abort_fill(fill)
            return
        self._refreshing[config_id] = running + 1
        core = ClientCore(self.registry_for(config), settings=SessionSettings(settings, login_user=config.user),
                          cache=self.cache_context(config))
        core.refresh_fill = fill
        session = ClientSession(NullTransport(), pool, core, cancel=self.cancel_server_for(config),
                                statement_timeout=self.statement_timeout_ms / 1000.0)

        def finished() -> None:
            self._refreshing[config_id] = max(0, self._refreshing.get(config_id, 1) - 1)
            asyncio.get_running_loop().call_soon(session.transport.close)

        fill.add_callback(finished)
        session.data_received(request)

    async def session_settings(self, config: Any, settings: dict[str, str]
                               ) -> tuple[dict[str, str], dict[bytes, bytes] | None]:
        """A new client's startup settings as the origin judges them: raises SettingsRejected
        (the origin's error) when it refuses them, else (the session's values, what the client
        is told; None: the connections' own ParameterStatus values)."""
        if not settings:
            return {}, None
        seen = self._settings_seen.setdefault(config.id, {})
        key = frozenset(settings.items())
        found = seen.get(key)
        if found is None:
            found = await prepare_settings(self.pool_for(config), settings, config.user, self.connect_timeout)
            if len(seen) >= MAX_SETTINGS_SEEN:
                seen.clear()
            seen[key] = found
        return dict(found[0]), dict(found[1])

    def cancel_server_for(self, config: Any) -> Any:
        """What a session calls to cancel what its server connection is running at the origin."""
        config_id = config.id

        def cancel(server: Any) -> None:
            current = self.store.get_hyperdrive(config_id)
            if current is None:
                return
            spec = self.spec_for(current)
            asyncio.get_running_loop().create_task(self._cancel(spec, server.pid, server.secret_key))

        return cancel

    async def server_parameters(self, config: Any) -> dict[str, str]:
        """The origin's ParameterStatus values, shown to clients at startup."""
        pool = self.pool_for(config)
        if not pool.parameters:
            conn = await pool.acquire()
            pool.release(conn)
        return pool.parameters

    async def probe(self, spec: OriginSpec, *, scheme: str = "postgresql") -> dict[str, Any]:
        if scheme == "mysql":
            return await self.probe_mysql(spec)
        return await probe(spec, self.dialer_for(spec))

    async def probe_mysql(self, spec: OriginSpec) -> dict[str, Any]:
        """The create/update test of a mysql config: connect, SELECT 1 (raises OriginError)."""
        return await _probe_mysql(spec, self.dialer_for(spec))

    def config_changed(self, config_id: str) -> None:
        self._users.clear()
        self._settings_seen.pop(config_id, None)  # maybe another origin now: judge settings again
        config = self.store.get_hyperdrive(config_id)
        if config is not None:
            # A config switched between postgresql and mysql: the other protocol's pool is useless.
            stale = (self._pools if config.scheme == "mysql" else self._mysql_pools).pop(config_id, None)
            if stale is not None:
                stale.close()
        for pool in (self._pools.get(config_id), self._mysql_pools.get(config_id)):
            if pool is not None and config is not None:
                pool.settings_changed(config.origin_connection_limit)
        if config is not None and config_id in self._policies:
            self.policy_for(config)  # in place: sessions see the new cache settings at once

    def config_deleted(self, config_id: str) -> None:
        self._users.clear()
        self._settings_seen.pop(config_id, None)
        pool = self._pools.pop(config_id, None)
        mysql_pool = self._mysql_pools.pop(config_id, None)
        self._registries.pop(config_id, None)
        self._policies.pop(config_id, None)
        ns = self._ns_of.pop(config_id, None)
        if ns is not None:
            ns.cached_by.discard(config_id)
        self.metrics.drop(config_id)
        for p in (pool, mysql_pool):
            if p is not None:
                p.close()

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

    # ------------------------------------------------------------------ metrics
    def metrics_summary(self, config_id: str, since_s: float | None) -> dict[str, Any]:
        out = self.metrics.for_config(config_id).summary(since_s)
        config = self.store.get_hyperdrive(config_id)
        pool = self._pools.get(config_id) or self._mysql_pools.get(config_id)
        out["pool"] = pool.info() if pool is not None else None
        if config is not None:
            ns = self.namespace_for(config)
            out["cache"] = {"entries": ns.entries, "stores": ns.stats["stores"],
                            "invalidations": ns.stats["invalidations"],
                            "invalidated_entries": ns.stats["invalidated_entries"],
                            "full_invalidations": ns.stats["full_invalidations"],
                            "races_not_stored": ns.stats["store_races"],
                            "process_bytes": self.cache.bytes, "process_max_bytes": self.cache.max_bytes}
        return out

    def prometheus_text(self) -> str:
        names = {c.id: c.name for c in self.store.list_hyperdrives()}
        pool_samples: list[tuple[dict[str, str], float]] = []
        waiting: list[tuple[dict[str, str], float]] = []
        for cid, pool in [*self._pools.items(), *self._mysql_pools.items()]:
            info = pool.info()
            labels = {"config_id": cid, "config_name": names.get(cid, cid)}
            pool_samples += [({**labels, "state": "open"}, info["open"]), ({**labels, "state": "idle"}, info["idle"])]
            waiting.append((labels, info["waiting"]))
        gauges = [
            Gauge("hd_hyperdrive_pool_connections", "Origin connections per config (open; idle of those).",
                  pool_samples),
            Gauge("hd_hyperdrive_pool_waiting_clients", "Clients waiting for an origin connection, per config.",
                  waiting),
            Gauge("hd_hyperdrive_cache_entries", "Query cache entries in this process.", [({}, len(self.cache))]),
            Gauge("hd_hyperdrive_cache_bytes", "Bytes held by the query cache in this process.",
                  [({}, self.cache.bytes)]),
        ]
        return self.metrics.render_prometheus(names, gauges)

    def stats(self) -> dict[str, Any]:
        return {"sessions": len(self._sessions),
                "pools": {cid: p.info() for cid, p in [*self._pools.items(), *self._mysql_pools.items()]},
                "time": time.time()}
