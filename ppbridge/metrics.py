"""Prometheus metrics, one registry per service (tests run several services in one process).

Names follow Prometheus conventions: counters end in ``_total`` (prometheus_client adds it),
durations are ``_seconds`` histograms. Every label's values are bounded: ``proxy`` takes only
configured proxy names (or ``-`` before a route is known), ``code`` HTTP statuses (499: the
client left before an answer, nginx's convention; ``-``: no answer), ``cause`` the
``X-PPBridge-Error`` causes of :mod:`ppbridge.errors` (``-`` when none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ppbridge import __version__

if TYPE_CHECKING:
    from ppbridge.forwarder import ForwarderService

NO_CAUSE = "-"
# Requests through the bridge range from a few milliseconds to streams of minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


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
        self.messages = Counter("ppbridge_bus_messages", "Session messages sealed or opened", ["direction"], registry=r)
        self.body_bytes = Counter("ppbridge_body_bytes", "Body bytes carried", ["direction"], registry=r)
        self.requests = Counter(
            "ppbridge_requests", "Requests finished, by proxy, HTTP status code and ppbridge cause (- for none)",
            ["proxy", "code", "cause"], registry=r,
        )
        self.request_duration = Histogram(
            "ppbridge_request_duration_seconds", "Time from a request's head to its end, by proxy and status code",
            ["proxy", "code"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.upstream_latency = Histogram(
            "ppbridge_upstream_latency_seconds", "Proxy: time from calling the upstream to its response headers",
            ["proxy"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.negotiations = Counter("ppbridge_negotiations", "Key negotiations, by result", ["result"], registry=r)
        self.aborted = Counter("ppbridge_streams_aborted", "Streams ended abnormally, by reason", ["reason"], registry=r)
        self.access_refused = Counter(
            "ppbridge_access_refused", "Forwarder: requests a route's access policy refused, by proxy and reason "
            "(ppbridge.access)", ["proxy", "reason"], registry=r,
        )
        self.active_streams = Gauge("ppbridge_active_streams", "Streams in flight", registry=r)
        self.upgraded_open = Gauge("ppbridge_upgraded_connections",
                                   "Forwarder: upgraded connections (WebSocket...) open, by proxy", ["proxy"], registry=r)
        self.redis_up = Gauge("ppbridge_redis_connected", "1 when the publishing and the main subscribing Redis connections are up", registry=r)
        self.public_losses = Gauge(
            "ppbridge_redis_public_subscriber_losses",
            "Times Redis dropped the connection reading the public channels (a flood there?)", registry=r
        )
        self.sealed = self.messages.labels("sealed")
        self.opened = self.messages.labels("opened")
        self.bytes_up = self.body_bytes.labels("up")  # client -> upstream
        self.bytes_down = self.body_bytes.labels("down")
        self._watching: Collector | None = None
        # Each request ends here; labels() validates and looks its child up under a lock every
        # time, so the children are kept per label set (bounded: see the module's docstring).
        self._done: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._latency: dict[str, Any] = {}

    def request_done(self, proxy: str, code: str, cause: str, seconds: float) -> None:
        """Count a finished request and observe how long it took."""
        key = (proxy, code, cause or NO_CAUSE)
        children = self._done.get(key)
        if children is None:
            children = self._done[key] = (self.requests.labels(*key), self.request_duration.labels(proxy, code))
        children[0].inc()
        children[1].observe(max(0.0, seconds))

    def upstream_latency_of(self, proxy: str) -> Any:
        """The upstream latency histogram of ``proxy`` (its labelled child, kept)."""
        child = self._latency.get(proxy)
        if child is None:
            child = self._latency[proxy] = self.upstream_latency.labels(proxy)
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
