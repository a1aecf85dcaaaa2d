"""Admin endpoints of either service: probes, /metrics, /status and the status page.

Bound to localhost by default (``[admin] listen``). They show fingerprints, counts and ages,
never key bytes, bodies or header values.

* ``/livez``: 200 while the service is started and its timers run (a liveness probe).
* ``/readyz``: 200 when it can serve. A forwarder: connected to Redis, whether or not any
  proxy is up (give this to a load balancer). A proxy: connected and acknowledged by a
  forwarder.
* ``/healthz``: as before (a forwarder: connected and holding some proxy's key; a proxy: as
  ``/readyz``). ``/healthz?proxy=NAME``: 200 when that proxy has a live instance with a key,
  503 saying why, 404 for a name not configured.
* ``/status``: the service's JSON document, plus version, uptime, health, readiness and, per
  proxy on a forwarder, requests and errors in the last minute.
* ``/``: the status page (:mod:`ppbridge.statuspage`).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Site

import ppbridge
from ppbridge import statuspage
from ppbridge.metrics import Metrics
from ppbridge.timers import Periodic

WINDOW = 60  # seconds of "last minute"
NOT_ERRORS = frozenset({"-", "", "ok", "client-gone"})  # causes that are no failure of the bridge


class _Connected(Protocol):
    @property
    def connected(self) -> bool: ...


class Observable(Protocol):
    metrics: Metrics
    clock: IReactorTime
    running: int

    @property
    def bus(self) -> _Connected: ...

    def status(self) -> dict[str, Any]: ...

    def healthy(self) -> bool: ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def proxy_health(self, name: str) -> tuple[bool, str]: ...


def is_error(labels: dict[str, str]) -> bool:
    """Whether a finished request (the labels of its ``ppbridge_requests_total`` sample)
    counts as an error: a ppbridge cause (``proxy-unavailable``, ``timeout``...) or an
    upstream 5xx. A client that left is not the proxy's error. Reads both label schemes:
    ``code``/``cause``, and the older single ``outcome`` (a status or a cause)."""
    code, cause = labels.get("code", ""), labels.get("cause", "-")
    if "outcome" in labels:
        outcome = labels["outcome"]
        code, cause = (outcome, "-") if outcome.isdigit() else ("", outcome)
    if cause not in NOT_ERRORS:
        return True
    return code.isdigit() and int(code) >= 500


class RecentRequests:
    """Requests and errors per proxy over the last minute.

    Once a second it reads the requests counter and keeps the totals in a ring of
    ``WINDOW + 1`` samples; the last minute is the newest minus the oldest, computed then,
    so a /status request only looks it up. In the first minute it counts since the start.
    """

    def __init__(self, counter: Counter, clock: IReactorTime) -> None:
        self._counter = counter
        self._ring: deque[dict[str, tuple[float, float]]] = deque(maxlen=WINDOW + 1)
        self._recent: dict[str, tuple[int, int]] = {}
        self._loop = Periodic(clock, 1.0, self.sample, "sampling request counts")

    def start(self) -> None:
        self.sample()
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def sample(self) -> None:
        totals: dict[str, tuple[float, float]] = {}
        for metric in self._counter.collect():
            for s in metric.samples:
                proxy = s.labels.get("proxy", "-")
                if not s.name.endswith("_total") or proxy == "-":
                    continue  # *_created samples; requests refused before a route was found
                requests, errors = totals.get(proxy, (0.0, 0.0))
                totals[proxy] = (requests + s.value, errors + (s.value if is_error(s.labels) else 0))
        self._ring.append(totals)
        oldest = self._ring[0]
        self._recent = {
            p: (int(r - oldest.get(p, (0.0, 0.0))[0]), int(e - oldest.get(p, (0.0, 0.0))[1]))
            for p, (r, e) in totals.items()
        }

    def of(self, proxy: str) -> tuple[int, int]:
        """(requests, errors) of ``proxy`` in the last minute."""
        return self._recent.get(proxy, (0, 0))


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, site: AdminSite) -> None:
        super().__init__()
        self.site = site
        self.service = site.service


def _text(request: Any, ok: bool, body: str) -> bytes:
    request.setResponseCode(200 if ok else 503)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return body.encode("utf-8") + b"\n"


class MetricsPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.service.metrics.registry)


class HealthPage(_Leaf):
    """Without a query: 200 when healthy() (kept as it was). ``?proxy=NAME``: that proxy."""

    def render_GET(self, request: Any) -> bytes:
        names = request.args.get(b"proxy")
        if names:
            try:
                name = names[0].decode("utf-8")
                ok, why = self.service.proxy_health(name)
            except (UnicodeDecodeError, KeyError):
                request.setResponseCode(404)
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                return b"unknown proxy\n"
            return _text(request, ok, f"{'ok' if ok else 'unavailable'}: proxy {name!r}: {why}")
        ok = self.service.healthy()
        return _text(request, ok, "ok" if ok else "unhealthy: not connected to Redis or no key yet")


class LivePage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        ok = self.service.live()
        return _text(request, ok, "ok: started" if ok else "not live: not started, or its timers stopped")


class ReadyPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        if self.service.ready():
            return _text(request, True, "ready")
        if not self.service.bus.connected:
            return _text(request, False, "not ready: not connected to Redis")
        return _text(request, False, "not ready: no forwarder has acknowledged recently that it routes here")


class StatusPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return json.dumps(self.site.status(), indent=2, sort_keys=True).encode("utf-8") + b"\n"


class NoIcon(_Leaf):
    """``/favicon.ico``, which browsers ask for: 204, nothing."""

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(204)
        return b""


class IndexPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", statuspage.CONTENT_SECURITY_POLICY.encode("ascii"))
        return statuspage.render(self.site.status(), self.service.healthy())


class AdminSite(Site):
    """The admin web site of one service; samples its request counts while it listens."""

    def __init__(self, service: Observable) -> None:
        self.service = service
        self.started = service.clock.seconds()  # built with the service, at start-up
        self.recent = RecentRequests(service.metrics.requests, service.clock)
        root = Resource()
        for path, page in ((b"", IndexPage), (b"metrics", MetricsPage), (b"healthz", HealthPage),
                           (b"livez", LivePage), (b"readyz", ReadyPage), (b"status", StatusPage),
                           (b"favicon.ico", NoIcon)):
            root.putChild(path, page(self))
        super().__init__(root)
        self.noisy = False  # no "Starting factory <AdminSite object at 0x...>" line

    def log(self, request: Any) -> None:
        pass  # no access log for probes every few seconds

    def startFactory(self) -> None:
        super().startFactory()
        self.recent.start()

    def stopFactory(self) -> None:
        self.recent.stop()
        super().stopFactory()

    def status(self) -> dict[str, Any]:
        """The service's /status document with what the page shows besides."""
        doc = self.service.status()
        doc.update(version=ppbridge.__version__, uptime_s=round(self.service.clock.seconds() - self.started, 3),
                   healthy=self.service.healthy(), ready=self.service.ready(), live=self.service.live())
        for name, proxy in doc.get("proxies", {}).items():
            proxy["requests_1m"], proxy["errors_1m"] = self.recent.of(name)
        return doc


def admin_site(service: Observable) -> AdminSite:
    return AdminSite(service)
