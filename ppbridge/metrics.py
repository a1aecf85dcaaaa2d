"""Prometheus metrics, one registry per service (tests run several services in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """Every metric a forwarder or a proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.dropped = Counter(
            "ppbridge_bus_dropped", "Bus messages dropped (malformed, forged, replayed, not for us)", ["reason"], registry=r
        )
        self.messages = Counter("ppbridge_bus_messages", "Session messages sealed or opened", ["direction"], registry=r)
        self.body_bytes = Counter("ppbridge_body_bytes", "Body bytes carried", ["direction"], registry=r)
        self.requests = Counter("ppbridge_requests", "Requests finished, by proxy and outcome", ["proxy", "outcome"], registry=r)
        self.negotiations = Counter("ppbridge_negotiations", "Key negotiations, by result", ["result"], registry=r)
        self.aborted = Counter("ppbridge_streams_aborted", "Streams ended abnormally, by reason", ["reason"], registry=r)
        self.active_streams = Gauge("ppbridge_active_streams", "Streams in flight", registry=r)
        self.redis_up = Gauge("ppbridge_redis_connected", "1 when the publishing and the main subscribing Redis connections are up", registry=r)
        self.public_losses = Gauge(
            "ppbridge_redis_public_subscriber_losses",
            "Times Redis dropped the connection reading the public channels (a flood there?)", registry=r
        )
        self.sealed = self.messages.labels("sealed")
        self.opened = self.messages.labels("opened")
        self.bytes_up = self.body_bytes.labels("up")  # client -> upstream
        self.bytes_down = self.body_bytes.labels("down")
