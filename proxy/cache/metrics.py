"""Per-config query metrics of the database proxy (sans-I/O: no asyncio, no locks).

The proxy calls `ConfigMetrics.query()` once per query on its hot path, so recording touches only
the current minute's bucket: a handful of list/int increments and one C-level bisect. Everything
else (lifetime totals, percentiles, Prometheus text) is derived when someone asks.

Two views of the same counts:
- time windows for `hd hyperdrive metrics --since 1h`: sparse per-minute buckets (only minutes with
  activity, sparse histograms), kept for `retention_s` and dropped lazily; minute resolution.
- lifetime counters for Prometheus (monotonic): a minute is folded into the lifetime totals when the
  next one starts, so lifetime = folded + current minute, always exactly.

Latency histograms use log-scale buckets of ratio 2^(1/4) (about 19% wide) from 10 µs to ~119 s;
percentiles interpolate inside the bucket and are clamped to the observed min/max, which keeps
them within a few percent for smooth distributions. Prometheus gets every 4th boundary (octaves)
as cumulative `le` buckets, computed from the same fine counts so the two never disagree.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

CACHE_STATUSES = ("disabled", "hit", "miss", "uncacheable", "multiplestatements", "notaquery",
                  "oversizedquery", "oversizedresult", "parseerror", "transaction", "volatile")
EVENT_STATUSES = ("complete", "error")

# slot of (cache status, event status) in the counts lists: status index * 2 + (0 ok, 1 error)
_SLOTS = len(CACHE_STATUSES) * len(EVENT_STATUSES)
_STATUS_SLOT: dict[str, int] = {s: 2 * i for i, s in enumerate(CACHE_STATUSES)}

# Fine histogram boundaries (seconds, upper bounds: bucket i holds bounds[i-1] < x <= bounds[i],
# as Prometheus' `le`); index len(BOUNDS) is the overflow bucket. 10 µs * 2^(k/4), k = 0..94.
_BASE = 1e-5
_STEPS_PER_OCTAVE = 4
BOUNDS: tuple[float, ...] = tuple(_BASE * 2.0 ** (k / _STEPS_PER_OCTAVE) for k in range(95))
_NBUCKETS = len(BOUNDS) + 1
# Prometheus buckets: every 4th boundary (exact powers of two times 10 µs, so short labels)
PROM_BOUNDS: tuple[int, ...] = tuple(range(0, len(BOUNDS), _STEPS_PER_OCTAVE))
_PROM_LE: tuple[str, ...] = tuple(repr(BOUNDS[i]) for i in PROM_BOUNDS)

_MINUTE = 60.0
_PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

_bisect_left = bisect.bisect_left


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


class _Latency:
    """One minute's latencies: a sparse histogram (most minutes see a few buckets only), the sum,
    the smallest and the largest."""

    __slots__ = ("hist", "sum", "min", "max")

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, latency_s: float) -> None:
        if not latency_s >= 0.0:  # negative or NaN: a caller's clock bug must not poison the sums
            latency_s = 0.0
        b = _bisect_left(BOUNDS, latency_s)
        h = self.hist
        h[b] = h.get(b, 0) + 1
        self.sum += latency_s
        if latency_s < self.min:
            self.min = latency_s
        if latency_s > self.max:
            self.max = latency_s


def _merged(lats: Iterable[_Latency]) -> tuple[dict[int, int], float, float]:
    """(histogram, min, max) of several minutes' latencies."""
    hist: dict[int, int] = {}
    lo, hi = math.inf, -math.inf
    for lat in lats:
        for b, n in lat.hist.items():
            hist[b] = hist.get(b, 0) + n
        lo, hi = min(lo, lat.min), max(hi, lat.max)
    return hist, lo, hi


class _Minute:
    """What happened in one minute (the unit of time windows and of retention)."""

    __slots__ = ("counts", "qbytes", "rbytes", "query", "connection", "cerrors", "refreshes")

    def __init__(self) -> None:
        self.counts = [0] * _SLOTS
        self.qbytes = 0
        self.rbytes = 0
        self.query = _Latency()
        self.connection = _Latency()
        self.cerrors = 0
        self.refreshes = [0, 0]  # complete, error


class _Totals:
    """Lifetime totals of the minutes already folded (dense: one per config)."""

    __slots__ = ("counts", "qbytes", "rbytes", "qhist", "qsum", "chist", "csum", "cerrors", "refreshes")

    def __init__(self) -> None:
        self.counts = [0] * _SLOTS
        self.qbytes = 0
        self.rbytes = 0
        self.qhist = [0] * _NBUCKETS
        self.qsum = 0.0
        self.chist = [0] * _NBUCKETS
        self.csum = 0.0
        self.cerrors = 0
        self.refreshes = [0, 0]

    def fold(self, m: _Minute) -> None:
        for i, n in enumerate(m.counts):
            self.counts[i] += n
        self.qbytes += m.qbytes
        self.rbytes += m.rbytes
        for b, n in m.query.hist.items():
            self.qhist[b] += n
        self.qsum += m.query.sum
        for b, n in m.connection.hist.items():
            self.chist[b] += n
        self.csum += m.connection.sum
        self.cerrors += m.cerrors
        self.refreshes[0] += m.refreshes[0]
        self.refreshes[1] += m.refreshes[1]


def _percentile(hist: Mapping[int, int], total: int, q: float, lo: float, hi: float) -> float:
    """The q-quantile of a fine histogram: linear inside the bucket, clamped to [lo, hi] (the
    observed min/max, which also bound the first and the overflow bucket)."""
    rank = q * total
    seen = 0
    for b in sorted(hist):
        n = hist[b]
        if seen + n >= rank:
            lower = BOUNDS[b - 1] if b > 0 else lo
            upper = BOUNDS[b] if b < len(BOUNDS) else hi
            lower, upper = max(lower, lo), min(upper, hi)
            value = lower + (upper - lower) * ((rank - seen) / n)
            return min(max(value, lo), hi)
        seen += n
    return hi


def _latency_ms(hist: Mapping[int, int], lo: float, hi: float) -> dict:
    total = sum(hist.values())
    out: dict = {"count": total}
    for key, q in _PERCENTILES:
        out[key] = None if total == 0 else round(_percentile(hist, total, q, lo, hi) * 1000.0, 3)
    out["max"] = None if total == 0 else round(hi * 1000.0, 3)
    return out


class ConfigMetrics:
    """Counters and latency histograms of one Hyperdrive config."""

    def __init__(self, config_id: str, clock: Callable[[], float] = time.time, retention_s: float = 86400.0) -> None:
        if not retention_s > 0:
            raise ValueError("retention_s must be more than 0")
        self.config_id = config_id
        self.retention_s = float(retention_s)
        self._clock = clock
        self._minutes: dict[int, _Minute] = {}  # minute number -> bucket, ascending (insertion order)
        self._life = _Totals()
        self._cur: _Minute = _Minute()  # a detached placeholder until the first event
        self._cur_minute = -1  # number of the minute `_cur` is, -1: none yet

    # --- recording (hot path) -----------------------------------------------------------------
    def _minute(self, now: float) -> _Minute:
        """The bucket for `now`; called only when the minute changed (or the clock went back)."""
        minute = int(now // _MINUTE)
        if minute == self._cur_minute:
            return self._cur
        if minute < self._cur_minute:
            # the wall clock stepped back: keep counting in the current minute, so buckets stay
            # ascending and each is folded into the lifetime totals exactly once
            return self._cur
        if self._cur_minute >= 0:
            self._life.fold(self._cur)
        self._cur = cur = _Minute()
        self._cur_minute = minute
        self._minutes[minute] = cur
        self._prune(now)
        return cur

    def query(self, cache_status: str, ok: bool, latency_s: float, query_bytes: int, result_bytes: int) -> None:
        """One query answered to a client (from the cache or the origin), whatever its outcome."""
        try:
            slot = _STATUS_SLOT[cache_status]
        except KeyError:
            raise ValueError(f"unknown cache status {cache_status!r} (one of {', '.join(CACHE_STATUSES)})") from None
        if not ok:
            slot += 1
        now = self._clock()
        cur = self._cur
        if now // _MINUTE != self._cur_minute:
            cur = self._minute(now)
        cur.counts[slot] += 1
        cur.qbytes += query_bytes
        cur.rbytes += result_bytes
        cur.query.add(latency_s)

    def connection(self, latency_s: float, ok: bool) -> None:
        """A new origin connection: its setup latency when it worked; a failed attempt counts as an
        error only (a timeout's 15 s would say nothing about connection latency)."""
        now = self._clock()
        cur = self._cur
        if now // _MINUTE != self._cur_minute:
            cur = self._minute(now)
        if not ok:
            cur.cerrors += 1
            return
        cur.connection.add(latency_s)

    def refresh(self, ok: bool) -> None:
        """A background stale-while-revalidate refresh (not a client's query)."""
        now = self._clock()
        cur = self._cur
        if now // _MINUTE != self._cur_minute:
            cur = self._minute(now)
        cur.refreshes[0 if ok else 1] += 1

    # --- reading ------------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        """Drop minutes that ended before the retention horizon (never the current one)."""
        cutoff = int((now - self.retention_s) // _MINUTE)
        minutes = self._minutes
        while minutes:
            first = next(iter(minutes))
            if first >= cutoff or first == self._cur_minute:
                break
            del minutes[first]

    def summary(self, since_s: float | None = None) -> dict:
        """JSON-ready counts and percentiles of the last `since_s` seconds (None: all that is
        retained; more than the retention is cut to it, see window_seconds/retained_seconds).
        Minute resolution: every minute that overlaps the window counts whole."""
        if since_s is not None and not since_s > 0:
            raise ValueError("since_s must be more than 0")
        now = self._clock()
        self._prune(now)
        window = self.retention_s if since_s is None else min(float(since_s), self.retention_s)
        first = int((now - window) // _MINUTE)
        last = int(now // _MINUTE)
        counts = [0] * _SLOTS
        qbytes = rbytes = cerrors = 0
        refreshes = [0, 0]
        minutes = [m for minute, m in self._minutes.items() if first <= minute <= last]
        for m in minutes:
            for i, n in enumerate(m.counts):
                counts[i] += n
            qbytes += m.qbytes
            rbytes += m.rbytes
            cerrors += m.cerrors
            refreshes[0] += m.refreshes[0]
            refreshes[1] += m.refreshes[1]
        qhist, qmin, qmax = _merged(m.query for m in minutes)
        chist, cmin, cmax = _merged(m.connection for m in minutes)
        by_cache = {s: counts[2 * i] + counts[2 * i + 1] for i, s in enumerate(CACHE_STATUSES)}
        hits, misses = by_cache["hit"], by_cache["miss"]
        connection = _latency_ms(chist, cmin, cmax)
        return {
            "config_id": self.config_id,
            "since": _iso(now - window),
            "until": _iso(now),
            "window_seconds": _whole(window),
            "retained_seconds": _whole(self.retention_s),
            "queries": {
                "total": sum(counts),
                "by_cache_status": by_cache,
                "by_event_status": {"complete": sum(counts[0::2]), "error": sum(counts[1::2])},
                "by_status": [
                    {"cache_status": s, "event_status": e, "count": counts[2 * i + j]}
                    for i, s in enumerate(CACHE_STATUSES) for j, e in enumerate(EVENT_STATUSES)
                    if counts[2 * i + j]
                ],
            },
            "cache_hit_ratio": round(hits / (hits + misses), 6) if hits + misses else None,
            "query_bytes": qbytes,
            "result_bytes": rbytes,
            "query_latency_ms": _latency_ms(qhist, qmin, qmax),
            "connection_latency_ms": {"count": connection.pop("count"), "errors": cerrors, **connection},
            "refreshes": {"complete": refreshes[0], "error": refreshes[1]},
        }

    def totals(self) -> dict:
        """Lifetime totals (monotonic; what Prometheus gets), JSON-ready. Histograms are the fine
        buckets as non-cumulative counts, the last one being the overflow above BOUNDS[-1]."""
        t, m = self._life, self._cur
        live = self._cur_minute >= 0  # else `_cur` is the unused placeholder (all zeros anyway)
        qhist, chist = list(t.qhist), list(t.chist)
        if live:
            for b, n in m.query.hist.items():
                qhist[b] += n
            for b, n in m.connection.hist.items():
                chist[b] += n
        return {
            "queries": {(s, e): t.counts[2 * i + j] + m.counts[2 * i + j]
                        for i, s in enumerate(CACHE_STATUSES) for j, e in enumerate(EVENT_STATUSES)},
            "query_bytes": t.qbytes + m.qbytes,
            "result_bytes": t.rbytes + m.rbytes,
            "query_latency": {"buckets": qhist, "sum": t.qsum + m.query.sum, "count": sum(qhist)},
            "connection_latency": {"buckets": chist, "sum": t.csum + m.connection.sum, "count": sum(chist)},
            "connection_errors": t.cerrors + m.cerrors,
            "refreshes": {"complete": t.refreshes[0] + m.refreshes[0], "error": t.refreshes[1] + m.refreshes[1]},
        }


def _whole(seconds: float) -> float | int:
    return int(seconds) if seconds == int(seconds) else seconds


@dataclass(frozen=True)
class Gauge:
    """A gauge family the proxy adds to /metrics (pool and cache sizes): samples are (labels,
    value). A sample with a config_id label and no config_name gets the config's name."""

    name: str
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]] = ()


class MetricsRegistry:
    """The ConfigMetrics of every config, and their Prometheus text."""

    def __init__(self, clock: Callable[[], float] = time.time, retention_s: float = 86400.0) -> None:
        if not retention_s > 0:
            raise ValueError("retention_s must be more than 0")
        self._clock = clock
        self._retention_s = retention_s
        self._configs: dict[str, ConfigMetrics] = {}

    def for_config(self, config_id: str) -> ConfigMetrics:
        """The config's metrics, created on first use (the proxy may keep the object)."""
        m = self._configs.get(config_id)
        if m is None:
            m = self._configs[config_id] = ConfigMetrics(config_id, self._clock, self._retention_s)
        return m

    def get(self, config_id: str) -> ConfigMetrics | None:
        return self._configs.get(config_id)

    def drop(self, config_id: str) -> None:
        """Forget a deleted config (its series leave /metrics)."""
        self._configs.pop(config_id, None)

    def config_ids(self) -> list[str]:
        return sorted(self._configs)

    def render_prometheus(self, names: Mapping[str, str], gauges: Sequence[Gauge] = ()) -> str:
        """Prometheus text format 0.0.4: lifetime counters and histograms of every config that has
        metrics (`names`: config id -> name; a missing name is the id), then `gauges`."""
        w = _Writer()
        configs = [(cid, names.get(cid, cid), self._configs[cid].totals()) for cid in sorted(self._configs)]

        def base(cid: str, name: str) -> dict[str, str]:
            return {"config_id": cid, "config_name": name}

        w.family("hd_hyperdrive_queries_total", "counter",
                 "Queries answered per config, by cache status and event status (complete or error).")
        for cid, name, t in configs:
            for (cs, es), n in t["queries"].items():
                w.sample("hd_hyperdrive_queries_total", {**base(cid, name), "cache_status": cs, "event_status": es}, n)
        for key, metric, text in (
            ("query_bytes", "hd_hyperdrive_query_bytes_total", "Bytes of queries received from clients."),
            ("result_bytes", "hd_hyperdrive_result_bytes_total", "Bytes of results sent to clients."),
        ):
            w.family(metric, "counter", text)
            for cid, name, t in configs:
                w.sample(metric, base(cid, name), t[key])
        for key, metric, text in (
            ("query_latency", "hd_hyperdrive_query_latency_seconds",
             "Query latency as the client sees it (from the query to the end of its result)."),
            ("connection_latency", "hd_hyperdrive_connection_latency_seconds",
             "Setup latency of new origin connections that succeeded."),
        ):
            w.family(metric, "histogram", text)
            for cid, name, t in configs:
                h = t[key]
                cumulative, upto = 0, 0
                for le_index, le in zip(PROM_BOUNDS, _PROM_LE):
                    cumulative += sum(h["buckets"][upto:le_index + 1])
                    upto = le_index + 1
                    w.sample(metric + "_bucket", {**base(cid, name), "le": le}, cumulative)
                w.sample(metric + "_bucket", {**base(cid, name), "le": "+Inf"}, h["count"])
                w.sample(metric + "_sum", base(cid, name), h["sum"])
                w.sample(metric + "_count", base(cid, name), h["count"])
        w.family("hd_hyperdrive_connection_errors_total", "counter", "Failed attempts to open an origin connection.")
        for cid, name, t in configs:
            w.sample("hd_hyperdrive_connection_errors_total", base(cid, name), t["connection_errors"])
        w.family("hd_hyperdrive_cache_refreshes_total", "counter",
                 "Background stale-while-revalidate refreshes of cached results, by outcome.")
        for cid, name, t in configs:
            for outcome, n in t["refreshes"].items():
                w.sample("hd_hyperdrive_cache_refreshes_total", {**base(cid, name), "outcome": outcome}, n)
        for g in gauges:
            w.family(g.name, "gauge", g.help)
            for labels, value in g.samples:
                if "config_id" in labels and "config_name" not in labels:
                    labels = {**labels, "config_name": names.get(labels["config_id"], labels["config_id"])}
                w.sample(g.name, labels, value)
        return w.text()


# --- text format 0.0.4 ----------------------------------------------------------------------------
def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []
        self._families: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        if name in self._families:
            raise ValueError(f"metric family {name!r} rendered twice")
        self._families.add(name)
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self._lines.append(f"{name}{_labels(labels.items())} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _labels(items: Iterable[tuple[str, str]]) -> str:
    parts = []
    for k, v in items:
        if not _LABEL_NAME.match(k) or k.startswith("__"):
            raise ValueError(f"invalid label name {k!r}")
        parts.append(f'{k}="{escape_label_value(str(v))}"')
    return "{" + ",".join(parts) + "}" if parts else ""
