"""Prometheus metrics, one registry per service (tests run several services in one process).

Names follow Prometheus conventions: counters end in ``_total`` (prometheus_client adds it),
durations are ``_seconds`` histograms. Every label's values are bounded: ``proxy`` takes only
configured proxy names (or ``-`` before a route is known), ``code`` HTTP statuses (499: the
client left before an answer, nginx's convention; ``-``: no answer), ``cause`` the
``X-PPBridge-Error`` causes of :mod:`ppbridge.errors` (``-`` when none).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ppbridge import __version__

if TYPE_CHECKING:
    from ppbridge.forwarder import ForwarderService

NO_CAUSE = "-"
# Requests through the bridge range from a few milliseconds to streams of minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
UPPER_BOUNDS = (*(float(b) for b in DURATION_BUCKETS), math.inf)  # a histogram's buckets, as prometheus_client keeps them


class Tally:
    """A counter or gauge counted on the hot path in a plain int: prometheus_client's ``inc``
    checks its argument and takes a lock on every call, several times per request. What it
    holds is added to ``cell`` (the prometheus metric or child, by its own ``inc``) whenever
    the metric is collected, so a scrape, or anything reading the registry, sees every count."""

    __slots__ = ("pending", "_cell")

    def __init__(self, cell: Any) -> None:
        self.pending = 0
        self._cell = cell

    def inc(self, amount: int = 1) -> None:
        self.pending += amount

    def dec(self, amount: int = 1) -> None:
        self.pending -= amount

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, 0
            self._cell.inc(pending)


class HistogramTally:
    """A histogram child observed on the hot path into plain numbers, summed in the same order
    as prometheus_client would (so the same floats), and copied into the child's values at
    each collect. Those values are prometheus_client 0.26's private ``_sum`` and ``_buckets``
    (one per upper bound, not cumulative; tests/test_observability.py checks them)."""

    __slots__ = ("_child", "_sum", "_counts")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._sum: float = child._sum.get()
        self._counts: list[float] = [bucket.get() for bucket in child._buckets]

    def observe(self, amount: float) -> None:
        self._sum += amount
        if amount <= math.inf:  # as prometheus_client: a NaN goes to no bucket
            self._counts[bisect_left(UPPER_BOUNDS, amount)] += 1

    def flush(self) -> None:
        child = self._child
        child._sum.set(self._sum)
        for bucket, count in zip(child._buckets, self._counts):
            bucket.set(count)


class _Flushed:
    """A prometheus metric whose counts may wait in tallies: each collect copies them in first."""

    flush: Any = None  # Metrics.flush, set on the metric itself (not on its labelled children)

    def collect(self) -> Iterable[Metric]:
        if self.flush is not None:
            self.flush()
        return super().collect()  # type: ignore[misc,no-any-return]


class _Counter(_Flushed, Counter):
    pass


class _Gauge(_Flushed, Gauge):
    pass


class _Histogram(_Flushed, Histogram):
    pass


class Metrics:
    """Every metric a forwarder or a proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge("ppbridge_build_info", "The running ppbridge version (always 1)", ["version"],
                                registry=r)
        self.build_info.labels(__version__).set(1)
        self.dropped = Counter(
            "ppbridge_bus_dropped", "Bus messages dropped (malformed, forged, replayed, not for us)", ["reason"], registry=r
        )
        self.messages = _Counter("ppbridge_bus_messages", "Session messages sealed or opened", ["direction"], registry=r)
        self.body_bytes = _Counter("ppbridge_body_bytes", "Body bytes carried", ["direction"], registry=r)
        self.requests = _Counter(
            "ppbridge_requests", "Requests finished, by proxy, HTTP status code and ppbridge cause (- for none)",
            ["proxy", "code", "cause"], registry=r,
        )
        self.request_duration = _Histogram(
            "ppbridge_request_duration_seconds", "Time from a request's head to its end, by proxy and status code",
            ["proxy", "code"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.upstream_latency = _Histogram(
            "ppbridge_upstream_latency_seconds", "Proxy: time from calling the upstream to its response headers",
            ["proxy"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.negotiations = Counter("ppbridge_negotiations", "Key negotiations, by result", ["result"], registry=r)
        self.aborted = Counter("ppbridge_streams_aborted", "Streams ended abnormally, by reason", ["reason"], registry=r)
        self.access_refused = Counter(
            "ppbridge_access_refused", "Forwarder: requests a route's access policy refused, by proxy and reason "
            "(ppbridge.access)", ["proxy", "reason"], registry=r,
        )
        self._active_streams = _Gauge("ppbridge_active_streams", "Streams in flight", registry=r)
        self.upgraded_open = Gauge("ppbridge_upgraded_connections",
                                   "Forwarder: upgraded connections (WebSocket...) open, by proxy", ["proxy"], registry=r)
        self.redis_up = Gauge("ppbridge_redis_connected", "1 when the publishing and the main subscribing Redis connections are up", registry=r)
        self.public_losses = Gauge(
            "ppbridge_redis_public_subscriber_losses",
            "Times Redis dropped the connection reading the public channels (a flood there?)", registry=r
        )
        # Counted per message or per request: tallies, handed to prometheus_client when collected.
        self._tallies: list[Tally | HistogramTally] = []
        self.sealed = self._tally(self.messages.labels("sealed"))
        self.opened = self._tally(self.messages.labels("opened"))
        self.bytes_up = self._tally(self.body_bytes.labels("up"))  # client -> upstream
        self.bytes_down = self._tally(self.body_bytes.labels("down"))
        self.active_streams = self._tally(self._active_streams)
        for metric in (self.messages, self.body_bytes, self.requests, self.request_duration, self.upstream_latency,
                       self._active_streams):
            metric.flush = self.flush
        self._watching: Collector | None = None
        # Each request ends here; labels() validates and looks its child up under a lock every
        # time, so the children's tallies are kept per label set (bounded: see the module's docstring).
        self._done: dict[tuple[str, str, str], tuple[Tally, HistogramTally]] = {}
        self._durations: dict[tuple[str, str], HistogramTally] = {}
        self._latency: dict[str, HistogramTally] = {}

    def _tally(self, cell: Any) -> Tally:
        tally = Tally(cell)
        self._tallies.append(tally)
        return tally

    def _histogram_tally(self, child: Any) -> HistogramTally:
        tally = HistogramTally(child)
        self._tallies.append(tally)
        return tally

    def flush(self) -> None:
        """Hand every tally's counts to prometheus_client (done by each collect of those metrics)."""
        for tally in self._tallies:
            tally.flush()

    def request_done(self, proxy: str, code: str, cause: str, seconds: float) -> None:
        """Count a finished request and observe how long it took."""
        key = (proxy, code, cause or NO_CAUSE)
        children = self._done.get(key)
        if children is None:
            duration = self._durations.get((proxy, code))  # one tally per child: causes share it
            if duration is None:
                duration = self._durations[proxy, code] = self._histogram_tally(self.request_duration.labels(proxy, code))
            children = self._done[key] = (self._tally(self.requests.labels(*key)), duration)
        children[0].inc()
        children[1].observe(max(0.0, seconds))

    def upstream_latency_of(self, proxy: str) -> HistogramTally:
        """The upstream latency histogram of ``proxy`` (its labelled child's tally, kept)."""
        child = self._latency.get(proxy)
        if child is None:
            child = self._latency[proxy] = self._histogram_tally(self.upstream_latency.labels(proxy))
        return child

    def watch_forwarder(self, service: ForwarderService) -> None:
        """Export the per-proxy gauges of ``service`` (once, however often called)."""
        if self._watching is None:
            self._watching = ProxyGauges(service)
            self.registry.register(self._watching)


class ProxyGauges(Collector):
    """Forwarder, per configured proxy name (so the label stays bounded), read at each scrape:
    live instances, the age of the oldest current key (the one nearest its hard lifetime;
    no sample without a live instance) and the seconds since a key for that name last became
    current (a completed negotiation or rotation; no sample before the first)."""

    def __init__(self, service: ForwarderService) -> None:
        self.service = service
        self._last: dict[str, float] = {}

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        instances, ages, since = self._families()
        service = self.service
        now = service.clock.seconds()
        stats = service.keyring.stats
        for route in service.settings.proxies:
            name = route.name
            live = service.instances.get(name, [])
            instances.add_metric([name], len(live))
            entries = [e for e in (service.keyring.current(p) for p in live) if e is not None]
            if entries:
                ages.add_metric([name], now - min(e.created for e in entries))
            prefix = name.encode("ascii", "replace") + b":"
            seen = [s.current_since for p, s in stats.items() if p.startswith(prefix) and s.current_since]
            if seen:
                self._last[name] = max([self._last.get(name, 0.0), *seen])
            if name in self._last:
                since.add_metric([name], now - self._last[name])
        yield from (instances, ages, since)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("ppbridge_proxy_instances", "Live (routed to) instances of each proxy", labels=["proxy"]),
            GaugeMetricFamily("ppbridge_proxy_key_age_seconds", "Age of the oldest current key among a proxy's "
                              "live instances", labels=["proxy"]),
            GaugeMetricFamily("ppbridge_proxy_last_negotiation_seconds", "Seconds since a key for the proxy last "
                              "became current (negotiated or rotated)", labels=["proxy"]),
        )
