"""proxy.cache.metrics: per-config query metrics, time windows, percentiles, Prometheus text."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from proxy.cache.metrics import (
    BOUNDS,
    CACHE_STATUSES,
    EVENT_STATUSES,
    ConfigMetrics,
    Gauge,
    MetricsRegistry,
)

T0 = 1_700_000_000.0  # a whole minute


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- a small parser of the Prometheus text format 0.0.4 (prometheus_client is not a dependency) ---
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)\Z")


def _parse_labels(text: str) -> dict[str, str]:
    """`{a="x",b="y\\"z"}` -> dict, undoing the escapes (\\\\, \\", \\n)."""
    assert text.startswith("{") and text.endswith("}"), text
    body, labels, i = text[1:-1], {}, 0
    while i < len(body):
        m = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="').match(body, i)
        assert m, body[i:]
        i, value = m.end(), []
        while body[i] != '"':
            if body[i] == "\\":
                value.append({"\\": "\\", '"': '"', "n": "\n"}[body[i + 1]])
                i += 2
            else:
                assert body[i] != "\n"
                value.append(body[i])
                i += 1
        assert m.group(1) not in labels, "duplicate label"
        labels[m.group(1)] = "".join(value)
        i += 1
        if i < len(body):
            assert body[i] == ",", body[i:]
            i += 1
    return labels


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Families (name -> type) and samples; checks HELP/TYPE come once per family, before its samples."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"HELP twice for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and name in helps, f"TYPE for {name}"
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.group(1), _parse_labels(m.group(2)) if m.group(2) else {}, m.group(3)
            family = re.sub(r"_(bucket|sum|count)\Z", "", name)
            assert name in types or (family in types and types[family] == "histogram"), name
            samples.append((name, labels, float(value)))
    return types, samples


def pick(samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [(lab, v) for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]


def value(samples, name: str, **labels: str) -> float:
    [(_, v)] = pick(samples, name, **labels)
    return v


# --- recording and windows ------------------------------------------------------------------------

@pytest.mark.parametrize("status", CACHE_STATUSES)
def test_every_cache_status_is_accepted_and_counted(status: str) -> None:
    m = ConfigMetrics("c1", Clock())
    m.query(status, True, 0.002, 10, 100)
    m.query(status, False, 0.004, 20, 0)
    s = m.summary()
    assert s["queries"]["total"] == 2
    assert s["queries"]["by_cache_status"] == {x: (2 if x == status else 0) for x in CACHE_STATUSES}
    assert s["queries"]["by_event_status"] == {"complete": 1, "error": 1}
    assert s["queries"]["by_status"] == [{"cache_status": status, "event_status": e, "count": 1}
                                         for e in EVENT_STATUSES]
    assert (s["query_bytes"], s["result_bytes"]) == (30, 100)


@pytest.mark.parametrize("bad", ["HIT", "", "stale", None])
def test_an_unknown_cache_status_is_refused_and_not_counted(bad) -> None:
    m = ConfigMetrics("c1", Clock())
    with pytest.raises(ValueError, match="unknown cache status"):
        m.query(bad, True, 0.001, 1, 1)
    assert m.summary()["queries"]["total"] == 0


def test_the_empty_summary_has_every_key() -> None:
    s = ConfigMetrics("c1", Clock()).summary(3600)
    assert s == {
        "config_id": "c1",
        "since": "2023-11-14T21:13:20Z",
        "until": "2023-11-14T22:13:20Z",
        "window_seconds": 3600,
        "retained_seconds": 86400,
        "queries": {"total": 0, "by_cache_status": {x: 0 for x in CACHE_STATUSES},
                    "by_event_status": {"complete": 0, "error": 0}, "by_status": []},
        "cache_hit_ratio": None,
        "query_bytes": 0,
        "result_bytes": 0,
        "query_latency_ms": {"count": 0, "p50": None, "p90": None, "p99": None, "max": None},
        "connection_latency_ms": {"count": 0, "errors": 0, "p50": None, "p90": None, "p99": None, "max": None},
        "refreshes": {"complete": 0, "error": 0},
    }
    json.dumps(s)


def test_hit_ratio_is_hits_over_hits_and_misses() -> None:
    m = ConfigMetrics("c1", Clock())
    m.query("uncacheable", True, 0.001, 1, 1)
    assert m.summary()["cache_hit_ratio"] is None
    for status in ("hit", "hit", "hit", "miss"):
        m.query(status, True, 0.001, 1, 1)
    assert m.summary()["cache_hit_ratio"] == 0.75


def test_windows_count_only_the_minutes_they_cover() -> None:
    clock = Clock()
    m = ConfigMetrics("c1", clock)
    m.query("miss", True, 0.100, 10, 10)  # 2 h before the summaries
    clock.t += 3600
    m.query("hit", True, 0.001, 1, 1)  # 1 h before
    clock.t += 3570
    m.query("hit", False, 0.002, 1, 1)  # 30 s before
    clock.t += 30
    assert m.summary(60)["queries"]["total"] == 1
    last_hour = m.summary(3600)
    assert last_hour["queries"]["by_cache_status"]["hit"] == 2 and last_hour["queries"]["total"] == 2
    assert last_hour["query_latency_ms"]["max"] == 2.0  # the 100 ms query is 2 h old
    assert last_hour["since"] == "2023-11-14T23:13:20Z" and last_hour["until"] == "2023-11-15T00:13:20Z"
    assert m.summary(3 * 3600)["queries"]["total"] == 3
    assert m.summary()["queries"]["total"] == 3 and m.summary()["window_seconds"] == 86400
    with pytest.raises(ValueError):
        m.summary(0)


def test_a_window_longer_than_the_retention_is_cut_to_it() -> None:
    clock = Clock()
    m = ConfigMetrics("c1", clock, retention_s=7200)
    m.query("hit", True, 0.001, 1, 1)
    s = m.summary(7 * 86400)
    assert (s["window_seconds"], s["retained_seconds"]) == (7200, 7200)
    assert s["since"] == "2023-11-14T20:13:20Z" and s["queries"]["total"] == 1


def test_retention_drops_old_minutes_but_lifetime_totals_stay() -> None:
    clock = Clock()
    m = ConfigMetrics("c1", clock, retention_s=3600)
    for _ in range(3):
        m.query("miss", True, 0.01, 5, 50)
    m.connection(0.003, True)
    m.refresh(True)
    clock.t += 1800
    m.query("hit", True, 0.001, 1, 1)
    assert len(m._minutes) == 2
    clock.t += 3600  # the first minute is now older than the retention
    m.query("hit", True, 0.001, 1, 1)
    assert sorted(m._minutes) == [int((T0 + 1800) // 60), int((T0 + 5400) // 60)]
    s = m.summary()
    assert s["queries"]["total"] == 2 and s["connection_latency_ms"]["count"] == 0
    assert s["refreshes"] == {"complete": 0, "error": 0}
    clock.t += 7200  # idle: a summary prunes too (never the current minute, folded later)
    assert m.summary()["queries"]["total"] == 0
    assert list(m._minutes) == [int((T0 + 5400) // 60)]
    t = m.totals()  # Prometheus counters never go down
    assert t["queries"][("miss", "complete")] == 3 and t["queries"][("hit", "complete")] == 2
    assert (t["query_bytes"], t["result_bytes"]) == (17, 152)
    assert t["query_latency"]["count"] == 5 and t["connection_latency"]["count"] == 1
    assert t["refreshes"] == {"complete": 1, "error": 0}
    assert math.isclose(t["query_latency"]["sum"], 0.032)


def test_a_clock_that_steps_back_keeps_counting_in_the_current_minute() -> None:
    clock = Clock()
    m = ConfigMetrics("c1", clock)
    m.query("hit", True, 0.001, 1, 1)
    clock.t -= 600
    m.query("hit", True, 0.001, 1, 1)
    clock.t += 1200
    m.query("hit", True, 0.001, 1, 1)
    assert len(m._minutes) == 2
    assert m.totals()["queries"][("hit", "complete")] == 3 and m.summary()["queries"]["total"] == 3


def test_connections_and_refreshes() -> None:
    m = ConfigMetrics("c1", Clock())
    m.connection(0.004, True)
    m.connection(0.008, True)
    m.connection(15.0, False)  # a failed attempt: an error, not a latency
    m.refresh(True)
    m.refresh(False)
    s = m.summary()
    c = s["connection_latency_ms"]
    assert (c["count"], c["errors"], c["max"]) == (2, 1, 8.0)
    assert 4.0 <= c["p50"] <= 8.0
    assert s["refreshes"] == {"complete": 1, "error": 1} and s["queries"]["total"] == 0


def test_bad_latencies_do_not_poison_the_numbers() -> None:
    m = ConfigMetrics("c1", Clock())
    m.query("hit", True, -0.5, 1, 1)
    m.query("hit", True, float("nan"), 1, 1)
    s = m.summary()
    assert s["query_latency_ms"]["max"] == 0.0 and m.totals()["query_latency"]["sum"] == 0.0


# --- percentiles ----------------------------------------------------------------------------------

def _true_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@pytest.mark.parametrize("draw", [
    lambda rng: rng.uniform(0.001, 0.250),                 # uniform 1–250 ms
    lambda rng: 10 ** rng.uniform(-4.5, 0.5),              # log-uniform 30 µs – 3 s
    lambda rng: rng.expovariate(1 / 0.020),                # exponential, mean 20 ms
])
def test_percentiles_are_within_ten_percent_of_the_truth(draw) -> None:
    rng = random.Random(7)
    clock = Clock()
    m = ConfigMetrics("c1", clock)
    values = []
    for i in range(20000):
        v = draw(rng)
        values.append(v)
        m.query("miss", True, v, 1, 1)
        if i % 1000 == 999:
            clock.t += 60  # spread over minutes: the window merges their histograms
    lat = m.summary()["query_latency_ms"]
    assert lat["count"] == len(values)
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        truth = _true_quantile(values, q) * 1000
        assert abs(lat[key] - truth) <= 0.10 * truth, (key, lat[key], truth)
    assert lat["max"] == round(max(values) * 1000, 3)


def test_percentiles_are_clamped_to_what_was_observed() -> None:
    m = ConfigMetrics("c1", Clock())
    for _ in range(10):
        m.query("hit", True, 0.0123, 1, 1)
    lat = m.summary()["query_latency_ms"]
    assert lat["p50"] == lat["p90"] == lat["p99"] == lat["max"] == 12.3
    m.query("hit", True, 500.0, 1, 1)  # beyond the last bucket
    m.query("hit", True, 0.000001, 1, 1)  # below the first
    lat = m.summary()["query_latency_ms"]
    assert lat["max"] == 500000.0 and 0.001 <= lat["p50"] <= lat["max"]


# --- Prometheus -----------------------------------------------------------------------------------

def _registry_with_traffic() -> tuple[MetricsRegistry, Clock, list[float]]:
    clock = Clock()
    reg = MetricsRegistry(clock)
    rng = random.Random(3)
    latencies = []
    a = reg.for_config("id-a")
    for i in range(500):
        v = 10 ** rng.uniform(-5.5, 2.5)  # past both ends of the buckets
        latencies.append(v)
        a.query(CACHE_STATUSES[i % len(CACHE_STATUSES)], i % 7 != 0, v, 100, 1000)
        if i % 100 == 99:
            clock.t += 61  # some minutes folded into the lifetime totals, one still current
    for v in latencies[:4] + [latencies[0]]:  # exactly on a boundary too
        a.query("hit", True, v, 1, 1)
    a.query("hit", True, BOUNDS[8], 1, 1)
    latencies += latencies[:4] + [latencies[0], BOUNDS[8]]
    a.connection(0.002, True)
    a.connection(0.5, False)
    a.refresh(True)
    a.refresh(False)
    a.refresh(False)
    reg.for_config("id-b").query("hit", True, 0.001, 1, 2)
    return reg, clock, latencies


def test_prometheus_text_parses_back_and_matches_the_counts() -> None:
    reg, _, latencies = _registry_with_traffic()
    names = {"id-a": 'shop "main"\\db\nprod'}  # id-b has no name: its id stands in
    gauges = [
        Gauge("hd_hyperdrive_pool_connections", "Origin connections by state.",
              [({"config_id": "id-a", "state": "idle"}, 3), ({"config_id": "id-a", "state": "busy"}, 1)]),
        Gauge("hd_hyperdrive_cache_entries", "Cached results.", [({}, 12)]),
        Gauge("hd_hyperdrive_cache_bytes", "Bytes of cached results."),
    ]
    types, samples = parse_prometheus(reg.render_prometheus(names, gauges))
    assert types == {
        "hd_hyperdrive_queries_total": "counter",
        "hd_hyperdrive_query_bytes_total": "counter",
        "hd_hyperdrive_result_bytes_total": "counter",
        "hd_hyperdrive_query_latency_seconds": "histogram",
        "hd_hyperdrive_connection_latency_seconds": "histogram",
        "hd_hyperdrive_connection_errors_total": "counter",
        "hd_hyperdrive_cache_refreshes_total": "counter",
        "hd_hyperdrive_pool_connections": "gauge",
        "hd_hyperdrive_cache_entries": "gauge",
        "hd_hyperdrive_cache_bytes": "gauge",
    }
    # label escaping round-trips; a config without a name is named by its id
    a = {"config_id": "id-a", "config_name": names["id-a"]}
    b = {"config_id": "id-b", "config_name": "id-b"}
    queries = pick(samples, "hd_hyperdrive_queries_total", **a)
    assert len(queries) == len(CACHE_STATUSES) * len(EVENT_STATUSES)  # zeros too: rate() works from the start
    assert sum(v for _, v in queries) == len(latencies)
    assert value(samples, "hd_hyperdrive_queries_total", **a, cache_status="hit", event_status="complete") == (
        a_hit_complete := reg.get("id-a").totals()["queries"][("hit", "complete")])
    assert a_hit_complete > 0
    assert value(samples, "hd_hyperdrive_queries_total", **b, cache_status="hit", event_status="complete") == 1
    assert value(samples, "hd_hyperdrive_query_bytes_total", **a) == 500 * 100 + 6
    assert value(samples, "hd_hyperdrive_result_bytes_total", **b) == 2
    assert value(samples, "hd_hyperdrive_connection_errors_total", **a) == 1
    assert value(samples, "hd_hyperdrive_cache_refreshes_total", **a, outcome="complete") == 1
    assert value(samples, "hd_hyperdrive_cache_refreshes_total", **a, outcome="error") == 2
    # histograms: cumulative, non-decreasing, +Inf == _count, each bucket exactly the observations <= le
    buckets = pick(samples, "hd_hyperdrive_query_latency_seconds_bucket", **a)
    les = [lab["le"] for lab, _ in buckets]
    assert les[-1] == "+Inf" and les[:3] == ["1e-05", "2e-05", "4e-05"] and len(les) == 25
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == value(samples, "hd_hyperdrive_query_latency_seconds_count", **a) == len(latencies)
    for le, n in zip(les[:-1], counts):
        assert n == sum(1 for x in latencies if x <= float(le)), le
    assert math.isclose(value(samples, "hd_hyperdrive_query_latency_seconds_sum", **a), sum(latencies))
    conn = pick(samples, "hd_hyperdrive_connection_latency_seconds_bucket", **a)
    assert conn[-1][1] == value(samples, "hd_hyperdrive_connection_latency_seconds_count", **a) == 1
    assert (conn[7], conn[8]) == (({**a, "le": "0.00128"}, 0.0), ({**a, "le": "0.00256"}, 1.0))  # 2 ms
    # gauges: a config_id label brings the config's name along
    assert value(samples, "hd_hyperdrive_pool_connections", **a, state="idle") == 3
    assert pick(samples, "hd_hyperdrive_cache_entries") == [({}, 12.0)]


def test_prometheus_counters_are_monotonic_across_minutes_and_retention() -> None:
    clock = Clock()
    reg = MetricsRegistry(clock, retention_s=120)
    m = reg.for_config("c")
    seen = 0.0
    for step in range(10):
        m.query("hit", True, 0.001, 1, 1)
        _, samples = parse_prometheus(reg.render_prometheus({}))
        total = value(samples, "hd_hyperdrive_queries_total", config_id="c", cache_status="hit",
                      event_status="complete")
        assert total == step + 1 and total > seen
        assert value(samples, "hd_hyperdrive_query_latency_seconds_count", config_id="c") == step + 1
        seen = total
        clock.t += 90
    assert len(m._minutes) <= 3  # retention kept the windows small meanwhile


def test_only_configs_with_metrics_are_rendered_and_drop_forgets() -> None:
    reg = MetricsRegistry(Clock())
    types, samples = parse_prometheus(reg.render_prometheus({"x": "named"}))
    assert samples == [] and "hd_hyperdrive_queries_total" in types  # families still described
    reg.for_config("x")
    assert {lab["config_name"] for _, lab, _ in parse_prometheus(reg.render_prometheus({"x": "named"}))[1]} == {
        "named"}
    assert reg.for_config("x") is reg.for_config("x")
    reg.drop("x")
    reg.drop("never-there")
    assert parse_prometheus(reg.render_prometheus({}))[1] == [] and reg.config_ids() == []


@pytest.mark.parametrize("gauges, message", [
    ([Gauge("bad name", "h")], "invalid metric name"),
    ([Gauge("hd_hyperdrive_queries_total", "h")], "rendered twice"),
    ([Gauge("g", "h", [({"bad-label": "x"}, 1)])], "invalid label name"),
])
def test_programming_errors_in_gauges_are_loud(gauges, message) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsRegistry(Clock()).render_prometheus({}, gauges)


def test_special_values_and_help_escaping() -> None:
    reg = MetricsRegistry(Clock())
    text = reg.render_prometheus({}, [Gauge("g", "line one\nback\\slash", [({"k": "a"}, float("inf")),
                                                                         ({"k": "b"}, float("nan")),
                                                                         ({"k": "c"}, 0.25)])])
    assert "# HELP g line one\\nback\\\\slash\n" in text
    assert 'g{k="a"} +Inf\n' in text and 'g{k="b"} NaN\n' in text and 'g{k="c"} 0.25\n' in text
