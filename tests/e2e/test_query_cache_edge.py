"""The query cache in the real `hd edge` process: metrics through the CLI, the REST API and
Prometheus' /metrics, `hd hyperdrive update` keeping the cache, `--caching-disabled`, and the
golden path (tunnel + access + proxy + cache) as the README runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.harness.edge import EdgeProc
from tests.harness.pg import PgCluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack():
    pg = PgCluster(auth="scram-sha-256", tls=True).start()
    edge = EdgeProc().start()
    try:
        pg.create_user("app", "app-pw")
        pg.create_database("app", "app")
        pg.execute("create table kv (k int primary key, v text); insert into kv values (1, 'one')",
                   dbname="app", user="app")
        cfg = edge.hd("hyperdrive", "create", "cached", "--origin-host", "127.0.0.1", "--origin-port", str(pg.port),
                      "--database", "app", "--origin-user", "app", "--origin-password", "app-pw")
        yield pg, edge, cfg
    finally:
        edge.stop()
        edge.cleanup()
        pg.stop()


def statuses(edge: EdgeProc, name: str) -> dict[str, int]:
    m = edge.hd("hyperdrive", "metrics", name)
    return {k: v for k, v in m["queries"]["by_cache_status"].items() if v}


def prometheus(edge: EdgeProc) -> str:
    # no Authorization header: scrapers need no token
    with urllib.request.urlopen(edge.api_url.rstrip("/") + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_through_cli_rest_and_prometheus(stack):
    pg, edge, cfg = stack
    with psycopg.connect(cfg["connection_string"], autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute("select v from kv where k = %s", (1,)).fetchone() == ("one",)
        conn.execute("select now()")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from missing_table")
    assert statuses(edge, "cached") == {"miss": 1, "hit": 2, "volatile": 1, "uncacheable": 1}
    status, body = edge.api("GET", f"/v1/hyperdrive/configs/{cfg['id']}/metrics?since=5m")
    assert status == 200 and body["name"] == "cached" and body["window_seconds"] == 300
    assert body["queries"]["by_event_status"] == {"complete": 4, "error": 1}
    assert body["query_latency_ms"]["count"] == 5 and body["query_latency_ms"]["p50"] > 0
    assert body["connection_latency_ms"]["count"] >= 1
    assert body["result_bytes"] > 0 and body["query_bytes"] > 0
    text = prometheus(edge)
    assert sample(text, "hd_hyperdrive_queries_total", config_name="cached", cache_status="hit",
                  event_status="complete") == 2
    assert sample(text, "hd_hyperdrive_queries_total", config_name="cached", cache_status="uncacheable",
                  event_status="error") == 1
    assert sample(text, "hd_hyperdrive_query_latency_seconds_count", config_name="cached") == 5
    assert sample(text, "hd_hyperdrive_cache_entries") >= 1
    human = edge.hd("hyperdrive", "metrics", "cached", "--since", "1h", json=False)
    assert re.search(r"hit\s+2", human) and "cache hit ratio" in human


def test_update_keeps_the_cache_and_disabling_is_immediate(stack):
    pg, edge, cfg = stack
    sql = "select v || '!' from kv where k = 1"
    with psycopg.connect(cfg["connection_string"], autocommit=True) as conn:
        conn.execute(sql)
        before = statuses(edge, "cached").get("hit", 0)
        edge.hd("hyperdrive", "update", "cached", "--max-age", "120")  # neither purges nor tears down
        conn.execute(sql)
        assert statuses(edge, "cached").get("hit", 0) == before + 1
        edge.hd("hyperdrive", "update", "cached", "--caching-disabled", "true")
        conn.execute(sql)
        assert statuses(edge, "cached").get("disabled", 0) == 1
        edge.hd("hyperdrive", "update", "cached", "--caching-disabled", "false")


@pytest.mark.slow
def test_golden_path_runs_with_the_cache(tmp_path):
    """scripts/golden-path.sh's walk (without its bootstrap): edge, tunnel, access, connector,
    hyperdrive create, psql through the proxy, a cached read, `hd hyperdrive metrics`."""
    proc = subprocess.run([sys.executable, "-m", "examples.golden_path"], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "golden path OK" in proc.stdout
    assert re.search(r"hit\s+1\s", proc.stdout), proc.stdout[-2000:]
