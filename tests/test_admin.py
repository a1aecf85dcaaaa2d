"""The admin face: /livez, /readyz, /healthz?proxy=NAME, the last-minute request counts in
/status, and the status page at ``/``, rendered by a real headless Chromium.

The browser tests need the Debian package ``chromium`` on PATH; without it they are skipped,
naming the package. ``PPBRIDGE_SCREENSHOT=docs/status-page.png`` makes the two-proxy browser
test also save a screenshot there (how docs/status-page.png was made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

import ppbridge
from ppbridge.admin import RecentRequests, admin_site, is_error
from ppbridge.metrics import Metrics
from tests.processes import REPO, run
from tests.support import Client, Stack, listen, poll, temp_folder

WAIT = 15.0
TWO = {"alpha": {"path_prefix": "/a/"}, "beta": {"path_prefix": "/b/"}}
CHROMIUM_PACKAGE = "chromium"
HOSTILE_NAME = "<script>document.title='pwned'</script>"
HOSTILE_ERROR = "<img src=x onerror=\"document.title='pwned'\"> & more"


def count(metrics: Metrics, proxy: str, code: str, cause: str = "-", n: int = 1) -> None:
    """Count ``n`` finished requests the way the HTTP face does (either label scheme)."""
    for _ in range(n):
        if hasattr(metrics, "request_done"):
            metrics.request_done(proxy, code, cause, 0.01)
        else:
            metrics.requests.labels(proxy, code if cause == "-" else cause).inc()


class RecentRequestsTests(TestCase):
    """The per-proxy last-minute counters, on a fake clock (no sockets, no sleeping)."""

    def test_counts_only_the_last_minute(self) -> None:
        """Requests and errors per proxy are the increase over the last 60 one-second samples:
        a request counted between t=0 and t=1 is in the window until t=60 and out at t=61,
        requests refused before a route (proxy "-") belong to no proxy, and a proxy with no traffic counts (0, 0)."""
        clock, metrics = Clock(), Metrics()
        recent = RecentRequests(metrics.requests, clock)
        count(metrics, "alpha", "200", n=2)  # before the start: not in any window
        recent.start()
        self.addCleanup(recent.stop)
        count(metrics, "alpha", "200", n=3)
        count(metrics, "alpha", "503", "proxy-unavailable")
        count(metrics, "beta", "502")
        count(metrics, "-", "400", "bad-target", n=5)
        self.assertEqual(recent.of("alpha"), (0, 0), "nothing before the next sample")
        clock.advance(1)
        self.assertEqual(recent.of("alpha"), (4, 1))
        self.assertEqual(recent.of("beta"), (1, 1))
        self.assertEqual(recent.of("-"), (0, 0))
        self.assertEqual(recent.of("gamma"), (0, 0))
        clock.pump([1] * 30)
        count(metrics, "alpha", "404", n=2)
        clock.advance(1)
        self.assertEqual(recent.of("alpha"), (6, 1))
        clock.pump([1] * 28)  # t = 60: the window is (0, 60]
        self.assertEqual(recent.of("alpha"), (6, 1), "the first batch (in (0, 1]) still in")
        clock.advance(1)  # t = 61: the window is (1, 61]
        self.assertEqual(recent.of("alpha"), (2, 0), "the first batch left the window")
        self.assertEqual(recent.of("beta"), (0, 0))
        clock.pump([1] * 60)
        self.assertEqual(recent.of("alpha"), (0, 0))

    def test_what_counts_as_an_error(self) -> None:
        """A ppbridge cause or an upstream 5xx is an error; a 2xx-4xx answer or a client that
        left is not (both label schemes)."""
        cases = [
            ({"code": "200", "cause": "-"}, False), ({"code": "404", "cause": "-"}, False),
            ({"code": "499", "cause": "-"}, False), ({"code": "502", "cause": "-"}, True),
            ({"code": "503", "cause": "proxy-unavailable"}, True), ({"code": "-", "cause": "timeout"}, True),
            ({"outcome": "200"}, False), ({"outcome": "500"}, True), ({"outcome": "client-gone"}, False),
            ({"outcome": "ok"}, False), ({"outcome": "key-expired"}, True),
        ]
        for labels, expected in cases:
            self.assertEqual(is_error(labels), expected, labels)


class ProbeTests(TestCase):
    """The probes of a forwarder and a proxy over real HTTP, on a real Redis."""

    timeout = 120

    def setUp(self) -> None:
        self.client = Client(self)

    @defer.inlineCallbacks
    def get(self, url: str):  # type: ignore[no-untyped-def]
        response, body = yield self.client.fetch(b"GET", url).addTimeout(10, reactor)
        return response.code, body.decode("utf-8")

    @defer.inlineCallbacks
    def test_forwarder_ready_without_proxies_and_per_proxy_health(self):
        """A forwarder with no proxy up: /readyz 200 and /livez 200 (a load balancer keeps
        it), /healthz 503 as before, /healthz?proxy=alpha 503 saying there is no live instance,
        ?proxy=nope 404. Once alpha has a key: /healthz and ?proxy=alpha 200 ("1 live
        instance"), beta (still down) 503. Alpha's own admin: /readyz 200 once a forwarder
        acknowledged it, ?proxy=alpha 200, any other name 404."""
        stack = yield Stack(self).start(routes=TWO, without=("alpha", "beta"))
        admin = yield listen(self, admin_site(stack.forwarder))
        yield poll(lambda: stack.forwarder.bus.connected, WAIT, "the forwarder connected to Redis")
        self.assertEqual((yield self.get(admin + "/livez")), (200, "ok: started\n"))
        self.assertEqual((yield self.get(admin + "/readyz")), (200, "ready\n"))
        code, _ = yield self.get(admin + "/healthz")
        self.assertEqual(code, 503, "plain /healthz keeps its meaning")
        code, body = yield self.get(admin + "/healthz?proxy=alpha")
        self.assertEqual(code, 503)
        self.assertIn("alpha", body)
        self.assertIn("no live instance with a key", body)
        code, body = yield self.get(admin + "/healthz?proxy=nope")
        self.assertEqual((code, body), (404, "unknown proxy\n"))

        proxy = stack.add_proxy("alpha", stack.upstream)
        yield stack.ready("alpha")
        self.assertEqual((yield self.get(admin + "/healthz"))[0], 200)
        code, body = yield self.get(admin + "/healthz?proxy=alpha")
        self.assertEqual(code, 200, body)
        self.assertIn("1 live instance with a key", body)
        code, body = yield self.get(admin + "/healthz?proxy=beta")
        self.assertEqual(code, 503, body)

        p_admin = yield listen(self, admin_site(proxy))
        yield poll(proxy.healthy, WAIT, "alpha acknowledged by the forwarder")
        self.assertEqual((yield self.get(p_admin + "/readyz")), (200, "ready\n"))
        self.assertEqual((yield self.get(p_admin + "/livez")), (200, "ok: started\n"))
        self.assertEqual((yield self.get(p_admin + "/healthz?proxy=alpha"))[0], 200)
        self.assertEqual((yield self.get(p_admin + "/healthz?proxy=beta"))[0], 404)

    @defer.inlineCallbacks
    def test_redis_down_is_unready_but_live_and_stopped_is_not_live(self):
        """Redis killed: the forwarder's /readyz is 503 "not connected to Redis" while /livez
        stays 200 (the process works; restarting it would not help). The service stopped
        (the admin port still open): /livez 503."""
        stack = yield Stack(self).start()
        admin = yield listen(self, admin_site(stack.forwarder))
        self.assertEqual((yield self.get(admin + "/readyz"))[0], 200)
        stack.redis.kill()
        yield poll(lambda: not stack.forwarder.bus.connected, WAIT, "the forwarder noticed Redis is gone")
        self.assertEqual((yield self.get(admin + "/readyz")), (503, "not ready: not connected to Redis\n"))
        self.assertEqual((yield self.get(admin + "/livez"))[0], 200)
        code, body = yield self.get(admin + "/healthz?proxy=alpha")
        self.assertEqual(code, 503)
        self.assertIn("not connected to Redis", body)
        yield stack.forwarder.stopService()
        code, body = yield self.get(admin + "/livez")
        self.assertEqual(code, 503, body)

    @defer.inlineCallbacks
    def test_status_has_version_uptime_and_last_minute_counts(self):
        """/status carries ppbridge.__version__, the uptime, health, readiness and, per proxy,
        the requests and errors of the last minute: three GETs through alpha show up within
        two samples; beta, down, has none."""
        stack = yield Stack(self).start(routes=TWO, without=("beta",))
        admin = yield listen(self, admin_site(stack.forwarder))
        for _ in range(3):
            response, body = yield self.client.fetch(b"GET", stack.url + "/a/echo")
            self.assertEqual(response.code, 200, body)

        @defer.inlineCallbacks
        def status():  # type: ignore[no-untyped-def]
            code, body = yield self.get(admin + "/status")
            self.assertEqual(code, 200)
            return json.loads(body)

        for _ in range(20):  # the counts are sampled once a second
            doc = yield status()
            if doc["proxies"]["alpha"]["requests_1m"] >= 3:
                break
            yield deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(doc["version"], ppbridge.__version__)
        self.assertIsInstance(doc["uptime_s"], (int, float))
        self.assertGreaterEqual(doc["uptime_s"], 0)
        self.assertEqual((doc["healthy"], doc["ready"], doc["live"]), (True, True, True))
        self.assertEqual((doc["proxies"]["alpha"]["requests_1m"], doc["proxies"]["alpha"]["errors_1m"]), (3, 0))
        self.assertEqual((doc["proxies"]["beta"]["requests_1m"], doc["proxies"]["beta"]["errors_1m"]), (0, 0))


class _Links(HTMLParser):
    """Every src/href attribute value of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action")]


class _Dom(HTMLParser):
    """Per proxy section of the rendered page: its name, fingerprints, key ages, counts and
    last error, as text; plus every tag seen (to find injected elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._section: dict[str, list[str]] | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        classes = (a.get("class") or "").split()
        if tag == "section" and "proxy" in classes:
            self._section = self.sections.setdefault(a.get("data-proxy") or "", {})
        field = next((c for c in classes if c in ("name", "fp", "age", "requests", "errors", "last-error")), None)
        if field and self._section is not None:
            self._field = field
            self._section.setdefault(field, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "span"):
            self._field = None
        if tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._field and self._section is not None:
            self._section[self._field][-1] += data


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise SkipTest(f"SKIPPED LOUDLY: the status-page browser tests need headless Chromium: "
                       f"apt-get install -y {CHROMIUM_PACKAGE} (Debian package '{CHROMIUM_PACKAGE}')")
    return path


@defer.inlineCallbacks
def browse(case: TestCase, url: str, *extra: str):  # type: ignore[no-untyped-def]
    """Run headless Chromium on ``url`` as a child process; its stdout (with --dump-dom: the
    DOM after the page's scripts ran for 4 s of virtual time)."""
    binary = chromium()
    profile = temp_folder(case)
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", *extra, url]
    child = yield run(case, profile, args, timeout=90)
    case.assertEqual(child.exit_code, 0, child.describe())
    return child.text()


class FakeForwarder:
    """An admin-observable forwarder whose proxy name and last error are hostile HTML."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.clock = reactor
        self.running = 1

        class Bus:
            connected = True

        self.bus = Bus()

    def status(self) -> dict[str, Any]:
        instance = {"instance": "00ff", "key_fingerprint": "0123456789abcdef", "key_age_s": 12.5, "messages": 3,
                    "rotations": 1, "period_s": 600.0}
        return {"forwarder": "ab" * 8, "redis_connected": True, "streams": 0, "proxies": {
            HOSTILE_NAME: {**instance, "instances": [instance], "last_error": HOSTILE_ERROR}}}

    def healthy(self) -> bool:
        return True

    live = ready = healthy

    def proxy_health(self, name: str) -> tuple[bool, str]:
        raise KeyError(name)


class StatusPageTests(TestCase):
    """The status page as served, and as a real browser renders it."""

    timeout = 180

    @defer.inlineCallbacks
    def test_page_is_self_contained_and_relative(self):
        """The page references no external URL (no http(s):// src or href, no src at all):
        every link is relative, so it works behind a sub-path; it has a viewport meta tag for
        phones, and a Content-Security-Policy that allows only its own inline script (by
        hash) and fetches to its own origin."""
        url = yield listen(self, admin_site(FakeForwarder()))
        response, body = yield Client(self).fetch(b"GET", url + "/")
        self.assertEqual(response.code, 200)
        page = body.decode("utf-8")
        self.assertIsNone(re.search(r"https?://", page), "an absolute URL in the page")
        links = _Links()
        links.feed(page)
        self.assertEqual(sorted(links.urls), ["healthz", "livez", "metrics", "readyz", "status"])
        self.assertIn('<meta name=viewport content="width=device-width, initial-scale=1">', page)
        self.assertIn('fetch("status"', page)
        csp = response.headers.getRawHeaders(b"content-security-policy")[0].decode("ascii")
        self.assertIn("default-src 'none'", csp)
        self.assertIn("connect-src 'self'", csp)
        self.assertRegex(csp, r"script-src 'sha256-[A-Za-z0-9+/=]+';")

    @defer.inlineCallbacks
    def test_hostile_names_and_errors_are_text(self):
        """A proxy name that is a <script> element and a last error that is an <img onerror>
        element are shown as text: escaped in the served page, and in the DOM Chromium built
        after the script filled the table there is no such element, the title is unchanged and
        the section shows the name and the error verbatim."""
        url = yield listen(self, admin_site(FakeForwarder()))
        _, body = yield Client(self).fetch(b"GET", url + "/")
        self.assertNotIn(b"<script>document", body)
        self.assertNotIn(b"<img", body)
        dom = yield browse(self, url + "/", "--dump-dom")
        parsed = _Dom()
        parsed.feed(dom)
        self.assertNotIn("img", [t for t, _ in parsed.tags])
        scripts = [t for t in parsed.tags if t[0] == "script"]
        self.assertEqual(len(scripts), 1, "only the page's own script")
        self.assertIn("<title>ppbridge status</title>", dom)
        section = parsed.sections.get(HOSTILE_NAME)
        self.assertIsNotNone(section, dom[-3000:])
        self.assertEqual(section["name"], [HOSTILE_NAME])
        self.assertEqual(section["last-error"], [HOSTILE_ERROR])
        self.assertEqual(section["age"], ["12.5 s"])

    @defer.inlineCallbacks
    def test_browser_shows_each_proxy_with_its_key_age(self):
        """A forwarder with proxies alpha and beta, its admin site on 127.0.0.1: headless
        Chromium loads /, the inline script fetches the relative "status" and fills one section
        per proxy with its name, its key fingerprint (the forwarder's current one) and key age
        ("2.2 s", or "950 ms" under a second), and the last minute's requests (alpha: 2,
        beta: 1). Alpha's own admin page shows one section, alpha, with its key by the
        forwarder. With PPBRIDGE_SCREENSHOT set it also
        saves a screenshot of the forwarder's page there."""
        chromium()
        stack = yield Stack(self).start(routes=TWO)
        site = admin_site(stack.forwarder)
        url = yield listen(self, site)  # counting starts when the admin site listens
        client = Client(self)
        for _ in range(2):
            response, body = yield client.fetch(b"GET", stack.url + "/a/echo")
            self.assertEqual(response.code, 200, body)
        response, _ = yield client.fetch(b"GET", stack.url + "/b/echo")
        self.assertEqual(response.code, 200)
        yield poll(lambda: site.recent.of("alpha")[0] == 2, 5, "the requests sampled")
        dom = yield browse(self, url + "/", "--dump-dom")
        parsed = _Dom()
        parsed.feed(dom)
        status = stack.forwarder.status()["proxies"]
        self.assertEqual(sorted(parsed.sections), ["alpha", "beta"], dom[-3000:])
        for name in ("alpha", "beta"):
            section = parsed.sections[name]
            self.assertEqual(section["name"], [name])
            self.assertEqual(section["fp"], [status[name]["key_fingerprint"]], name)
            self.assertEqual(len(section["age"]), 1, name)
            self.assertRegex(section["age"][0], r"^(\d+\.\d s|\d+ ms)$", name)
        self.assertEqual(parsed.sections["alpha"]["requests"], ["2"])
        self.assertEqual(parsed.sections["beta"]["requests"], ["1"])
        self.assertIn("<h1 class=\"ok\">ppbridge: healthy</h1>", dom)

        alpha = stack.proxies["alpha"]
        yield poll(alpha.healthy, WAIT, "alpha acknowledged by the forwarder")
        p_url = yield listen(self, admin_site(alpha))
        parsed = _Dom()
        parsed.feed((yield browse(self, p_url + "/", "--dump-dom")))
        self.assertEqual(list(parsed.sections), ["alpha"], "a proxy's page: one section, itself")
        self.assertEqual(parsed.sections["alpha"]["fp"], [alpha.status()["key_fingerprint"]])
        self.assertRegex(parsed.sections["alpha"]["age"][0], r"^(\d+\.\d s|\d+ ms)$")
        shot = os.environ.get("PPBRIDGE_SCREENSHOT")
        if shot:
            target = (REPO / shot).resolve() if not Path(shot).is_absolute() else Path(shot)
            yield browse(self, url + "/", f"--screenshot={target}", "--window-size=1200,800",
                         "--hide-scrollbars")
            self.assertTrue(target.exists(), target)
