"""Admin endpoints of either service: /metrics, /healthz, /status and a small status page.

Bound to localhost by default (``[admin] listen``). They show fingerprints, counts and ages,
never key bytes, bodies or header values.
"""

from __future__ import annotations

import html
import json
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site

from ppbridge.metrics import Metrics


class Observable(Protocol):
    metrics: Metrics

    def status(self) -> dict[str, Any]: ...

    def healthy(self) -> bool: ...


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, service: Observable) -> None:
        super().__init__()
        self.service = service


class MetricsPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.service.metrics.registry)


class HealthPage(_Leaf):
    """200 when connected to Redis and holding a key, 503 otherwise."""

    def render_GET(self, request: Any) -> bytes:
        ok = self.service.healthy()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n" if ok else b"unhealthy: not connected to Redis or no key yet\n"


class StatusPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.service.status(), indent=2, sort_keys=True).encode("utf-8") + b"\n"


class IndexPage(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        status = html.escape(json.dumps(self.service.status(), indent=2, sort_keys=True))
        health = "healthy" if self.service.healthy() else "UNHEALTHY"
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        page = (
            "<!doctype html><meta charset=utf-8><title>ppbridge status</title>"
            f"<h1>ppbridge: {health}</h1><p><a href=/status>/status</a> · <a href=/metrics>/metrics</a> · "
            f"<a href=/healthz>/healthz</a></p><pre>{status}</pre>"
        )
        return page.encode("utf-8")


def admin_site(service: Observable) -> Site:
    root = Resource()
    root.putChild(b"", IndexPage(service))
    root.putChild(b"metrics", MetricsPage(service))
    root.putChild(b"healthz", HealthPage(service))
    root.putChild(b"status", StatusPage(service))
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
