"""The Postgres proxy in the test's own event loop, with an injected clock.

For behaviour that depends on time (max_age, stale-while-revalidate), the proxy runs in-process
so a test can move its clock instead of sleeping; everything else is real: a real origin
cluster, real drivers, real sockets on 127.0.0.1.

    clock = FakeClock()
    stack = await ProxyStack.start(tmp_path, clock)
    cfg = stack.add_config("c1", pg, user="app", password="pw", database="app", max_age=60, swr=15)
    async with await psycopg.AsyncConnection.connect(stack.dsn(cfg), autocommit=True) as conn: ...
    clock.advance(61)
    await stack.close()
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from control.secretbox import SecretBox
from control.store import Store
from proxy.service import ProxyService


class FakeClock:
    """Monotonic seconds that move only when told (starts at the real monotonic time)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ProxyStack:
    def __init__(self, store: Store, service: ProxyService) -> None:
        self.store = store
        self.service = service

    @classmethod
    async def start(cls, state_dir: Path, clock: Any = None, **service_kw: Any) -> "ProxyStack":
        box = SecretBox.load_or_create(Path(state_dir) / "secret.key")
        store = Store(Path(state_dir) / "state.db", box)
        service = ProxyService(store, edge=None, ssl_context=None, clock=clock, **service_kw)
        await service.start("127.0.0.1", 0)
        return cls(store, service)

    def add_config(self, name: str, pg: Any, *, user: str, password: str, database: str,
                   **fields: Any) -> Any:
        fields.setdefault("sslmode", "require")
        config = self.store.insert_hyperdrive(self.store.new_hyperdrive(
            name=name, host="127.0.0.1", port=pg.port, database=database, user=user, password=password,
            origin_connection_limit=fields.pop("origin_connection_limit", 5), **fields))
        self.service.config_changed(config.id)
        return config

    def update_config(self, config: Any, **fields: Any) -> Any:
        updated = self.store.update_hyperdrive(config.id, **fields)
        self.service.config_changed(config.id)
        return updated

    def dsn(self, config: Any, **params: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return (f"postgresql://{config.client_user}:{config.client_password}@127.0.0.1:{self.service.port}"
                f"/{config.database}?sslmode=disable{extra}")

    def metrics(self, config: Any) -> dict[str, Any]:
        return self.service.metrics_summary(config.id, None)

    def statuses(self, config: Any) -> dict[str, int]:
        """Non-zero query counts by cache status."""
        by = self.metrics(config)["queries"]["by_cache_status"]
        return {k: v for k, v in by.items() if v}

    async def close(self) -> None:
        await self.service.close()
