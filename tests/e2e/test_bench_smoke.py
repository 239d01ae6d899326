"""The benchmarks must keep running: a short smoke run of each (figures are not asserted —
benchmarks are measurements, not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tunnel_bench_quick_run(tmp_path):
    out = tmp_path / "tunnel.json"
    proc = subprocess.run([sys.executable, "-m", "bench.tunnel_bench", "--quick", "--no-pg", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"direct", "tunnel"} <= set(doc["paths"])
    assert doc["summary"]["targets"]["rps_100"]["value"] > 0


@pytest.mark.slow
def test_proxy_bench_quick_run(tmp_path):
    out = tmp_path / "proxy.json"
    proc = subprocess.run([sys.executable, "-m", "bench.proxy_bench", "--quick", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["hyperdrive"]["speedup_p50"] > 0


@pytest.mark.slow
def test_cache_bench_quick_run(tmp_path):
    out = tmp_path / "cache.json"
    proc = subprocess.run([sys.executable, "-m", "bench.cache_bench", "--quick", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for mode in ("simple", "prepared"):
        assert doc["summary"]["hit_latency"][mode]["p50_us"]["cache"] > 0
        assert doc["summary"]["hit_latency"][mode]["ratio_p50"] > 0
    assert doc["summary"]["pgbench"]["min_ratio"] > 0
    assert all(tps > 0 for tps in doc["summary"]["pgbench"]["tps_cache"].values())


@pytest.mark.slow
def test_mysql_bench_quick_run(tmp_path):
    out = tmp_path / "mysql.json"
    proc = subprocess.run([sys.executable, "-m", "bench.mysql_bench", "--quick", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    # every query went through: clients exited 0, proxy metrics and MariaDB's Com_select counted them all
    assert summary["all_queries_completed"], [c.get("error") for c in doc["mysql"]["cells"] if "error" in c]
    assert {r["query"] for r in summary["rows"]} == {"point", "range"}
    for row in summary["rows"]:
        assert all(row["qps"][t] > 0 for t in ("direct", "nocache", "cache")), row
        assert row["cache_vs_nocache"] > 0 and row["hit_ratio"] is not None, row


@pytest.mark.slow
def test_settings_bench_quick_run(tmp_path):
    out = tmp_path / "settings.json"
    proc = subprocess.run([sys.executable, "-m", "bench.settings_bench", "--quick", "--duration", "1",
                           "--json-out", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {(r["cell"], r["target"]) for r in doc["rows"]} == {
        (c, t) for c in ("none", "startup", "mixed", "set-each") for t in ("pgbouncer", "proxy")}
    assert all(r["tps"] > 0 for r in doc["rows"])
