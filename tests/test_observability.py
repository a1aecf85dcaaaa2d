"""What operators see: the forwarder's access log, the warn lines of upstream failures, the
Prometheus metrics of both services and the JSON logs of ``twistd --logger``.

The access-log and metrics tests run a real bridge (Redis, HTTP over loopback) in this process
and read the log events themselves (their fields, as a JSON observer writes them) and the
``/metrics`` text of the admin sites; the JSON test runs the installed ``twistd`` as a child.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import Logger, eventAsJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge import __version__
from ppbridge.admin import admin_site
from ppbridge.bus import RedisBus
from ppbridge.config import RedisSettings
from ppbridge.logs import AccessLog
from ppbridge.logsafe import BURST, PERIOD
from ppbridge.metrics import DURATION_BUCKETS, UPPER_BOUNDS, Metrics
from ppbridge.redis_server import free_port
from ppbridge.sampleapp import make_site
from tests.processes import OUT, forwarder_child
from tests.support import Client, Stack, error_of, listen, poll
from tests.test_streaming import raw_exchange, split_response

WAIT = 10.0
SECRETS = (b"Bearer SECRET-AUTH-VALUE", b"sid=SECRET-COOKIE-VALUE", b"SECRET-QUERY-VALUE", b"SECRET-BODY-VALUE")
ACCESS_FIELDS = {"client", "method", "path", "code", "cause", "bytes_in", "bytes_out", "duration", "proxy", "instance"}


def capture(case: TestCase, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every global log event (of ``namespace``, if given) from now to the test's end."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if namespace is None or event.get("log_namespace") == namespace:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


class AccessLogUnitTests(TestCase):
    """AccessLog on its own: what one line holds, with no sockets."""

    def emit(self, log: AccessLog, uri: bytes) -> dict[str, Any]:
        events: list[dict[str, Any]] = []
        log.log = Logger(namespace="ppbridge.access", observer=events.append)
        log.emit(client="127.0.0.1", method=b"GET", uri=uri, code=200, cause="-", bytes_in=1, bytes_out=2,
                 duration=0.25, proxy="alpha", instance="ab12")
        self.assertEqual(len(events), 1)
        return events[0]

    def test_control_characters_in_the_path_are_escaped_and_the_query_dropped(self):
        """A path holding CR, LF, ESC, DEL, a backslash and a non-ASCII byte is logged as \\xNN
        escapes (the formatted line has no control character at all) and without its query;
        the event carries every access field, namespace ppbridge.access."""
        event = self.emit(AccessLog(), b"/a\r\nFAKE 200\x1b[31m\x7f\\\xff?token=SECRET-QUERY-VALUE")
        self.assertEqual(event["path"], "/a\\x0d\\x0aFAKE 200\\x1b[31m\\x7f\\x5c\\xff")
        self.assertEqual(event["log_namespace"], "ppbridge.access")
        self.assertLessEqual(ACCESS_FIELDS, set(event))
        line = formatEvent(event)
        self.assertEqual(line, "127.0.0.1 GET /a\\x0d\\x0aFAKE 200\\x1b[31m\\x7f\\x5c\\xff 200 - in=1 out=2 0.250s "
                               "proxy=alpha instance=ab12")
        self.assertFalse(any(ord(c) < 0x20 or ord(c) >= 0x7F for c in line), repr(line))
        self.assertNotIn("SECRET", eventAsJSON(event))

    def test_query_is_logged_only_when_asked(self):
        """With include_query=True the path field ends with the query (escaped); the default
        leaves it out."""
        uri = b"/p?x=1&y=\x7f"
        self.assertEqual(self.emit(AccessLog(include_query=True), uri)["path"], "/p?x=1&y=\\x7f")
        self.assertEqual(self.emit(AccessLog(), uri)["path"], "/p")

    def test_line_and_fields_are_those_of_the_ten_field_format(self):
        """For statuses given as int or text, causes empty or set, and durations that round
        (negative, sub-millisecond, large), access_line is exactly what the documented
        format "{client} {method} {path} {code} {cause} in={bytes_in} out={bytes_out}
        {duration:.3f}s proxy={proxy} instance={instance}" gives for the event's own fields,
        and the event's keys come in Logger.emit's order: access_line, the ten fields, the
        log_ keys."""
        documented = ("{client} {method} {path} {code} {cause} in={bytes_in} out={bytes_out} {duration:.3f}s "
                      "proxy={proxy} instance={instance}")
        for code, cause, duration in ((200, "", 0.0031), ("503", "proxy-unavailable", 0.0005), (499, "-", -1.0),
                                      (200, "", 1234.56789), (413, "body-too-large", 0.0004999)):
            events: list[dict[str, Any]] = []
            AccessLog(logger=Logger(namespace="ppbridge.access", observer=events.append)).emit(
                client="::1", method=b"POST", uri=b"/up?x", code=code, cause=cause, bytes_in=10, bytes_out=0,
                duration=duration, proxy="alpha", instance="ab12")
            [event] = events
            self.assertEqual(event["access_line"], documented.format(**event))
            self.assertEqual(list(event), ["access_line", "client", "method", "path", "code", "cause", "bytes_in",
                                           "bytes_out", "duration", "proxy", "instance", "log_logger", "log_level",
                                           "log_namespace", "log_source", "log_format", "log_time"])

    def test_disabled_access_log_writes_nothing(self):
        """AccessLog(enabled=False) emits no event."""
        events: list[dict[str, Any]] = []
        log = AccessLog(enabled=False, logger=Logger(observer=events.append))
        log.emit(client="c", method=b"GET", uri=b"/", code=200, cause="-", bytes_in=0, bytes_out=0, duration=0.0,
                 proxy="alpha", instance="-")
        self.assertEqual(events, [])


class AccessLogTests(TestCase):
    """The access log of a running forwarder (routes: alpha at /a, running; beta at /b, not)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_one_line_per_request_with_its_fields_and_no_secrets(self):
        """A GET with a query, Authorization and Cookie, a POST with a body, a bad-target path,
        a request for the stopped proxy beta and one matching no route each get exactly one
        access event, with client 127.0.0.1, method, path without the query, status code,
        cause ("-" for the answered ones), body bytes in and out, a duration and the proxy
        (alpha's instance id for the answered ones; the route's name on the early errors, "-"
        with no route); no event of the whole run (any namespace, as JSON; the upstream's own
        access log switched off) holds the Authorization or Cookie values, the query or the
        body."""
        events = capture(self)
        upstream_site, _ = make_site()
        upstream_site.log = lambda request: None  # the upstream's own access log is not ppbridge's
        upstream = yield listen(self, upstream_site)
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}, "beta": {"path_prefix": "/b"}},
                                        without=("beta",), upstreams={"alpha": upstream})
        client = Client(self)
        secret_headers = {b"Authorization": [SECRETS[0]], b"Cookie": [SECRETS[1]]}
        response, got = yield client.fetch(b"GET", stack.url + "/a/echo/x?token=" + SECRETS[2].decode(),
                                           secret_headers)
        self.assertEqual(response.code, 200)
        body = SECRETS[3] * 100
        response, posted = yield client.fetch(b"POST", stack.url + "/a/echo/y", secret_headers, body=body)
        self.assertEqual(response.code, 200)
        for path, code, cause in (("/a/x/%2e%2e/y", 400, b"bad-target"), ("/b/z", 503, b"proxy-unavailable"),
                                  ("/nowhere", 404, b"no-route")):
            response, _ = yield client.fetch(b"GET", stack.url + path)
            self.assertEqual((response.code, error_of(response)), (code, cause), path)
        access = [e for e in events if e.get("log_namespace") == "ppbridge.access"]
        shown = [(e["method"], e["path"], e["code"], e["cause"], e["proxy"]) for e in access]
        self.assertEqual(shown, [
            ("GET", "/a/echo/x", 200, "-", "alpha"),
            ("POST", "/a/echo/y", 200, "-", "alpha"),
            ("GET", "/a/x/%2e%2e/y", 400, "bad-target", "alpha"),
            ("GET", "/b/z", 503, "proxy-unavailable", "beta"),
            ("GET", "/nowhere", 404, "no-route", "-"),
        ])
        instance = stack.forwarder.instances["alpha"][0].rsplit(b":", 1)[1].decode()
        self.assertEqual([e["instance"] for e in access], [instance, instance, "-", "-", "-"])
        self.assertEqual([e["client"] for e in access], ["127.0.0.1"] * 5)
        self.assertEqual((access[0]["bytes_in"], access[0]["bytes_out"]), (0, len(got)))
        self.assertEqual((access[1]["bytes_in"], access[1]["bytes_out"]), (len(body), len(posted)))
        self.assertTrue(all(0 <= e["duration"] < WAIT for e in access), [e["duration"] for e in access])
        self.assertTrue(all(e["log_level"].name == "info" for e in access))
        everything = "\n".join(eventAsJSON(e) for e in events).encode("utf-8")
        for secret in SECRETS:
            self.assertNotIn(secret, everything)

    @defer.inlineCallbacks
    def test_path_with_a_delete_and_a_backslash_is_escaped(self):
        """twisted.web lets DEL and backslash through in a request line; the forwarder answers
        400 bad-request at once (no proxy would take a control byte in a target: it used to be
        published, dropped by the proxy, and the client waited for request_timeout); the
        access event shows the path as \\x7f and \\x5c with that status, and its formatted line
        holds no control character."""
        events = capture(self, "ppbridge.access")
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}}, forwarder={"request_timeout": 1.0})
        proto = yield raw_exchange(self, stack.url, b"GET /a/echo/x\x7f\\y HTTP/1.1\r\nHost: t\r\n"
                                                    b"Connection: close\r\n\r\n")
        raw = yield proto.closed.addTimeout(WAIT, reactor)
        status = split_response(raw)[0]
        yield poll(lambda: events, WAIT, "an access event")
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["path"], "/a/echo/x\\x7f\\x5cy")
        self.assertEqual(status.split()[1], b"400")
        self.assertEqual((events[0]["code"], events[0]["cause"]), (400, "bad-request"))
        self.assertFalse(any(ord(c) < 0x20 or ord(c) >= 0x7F for c in formatEvent(events[0])))


class UpstreamFailureTests(TestCase):
    """Failures of the proxy's upstream are warned about, a few a minute."""

    timeout = 120

    @defer.inlineCallbacks
    def test_refused_upstream_is_warned_with_its_reason_and_throttled(self):
        """With an upstream refusing connections, 12 requests get 502 upstream-unreachable;
        the proxy logs at warn level the first 10 (logsafe.BURST) with the cause and the
        refusal's reason and no more in the minute; the proxy's /metrics counts 12 requests
        {proxy=alpha, code=502, cause=upstream-unreachable}; the forwarder's access log shows
        12 lines with code 502 and that cause."""
        events = capture(self)
        stack = yield Stack(self).start(upstreams={"alpha": f"http://127.0.0.1:{free_port()}"})
        client = Client(self)
        for _ in range(12):
            response, _ = yield client.fetch(b"GET", stack.url + "/x")
            self.assertEqual((response.code, error_of(response)), (502, b"upstream-unreachable"))
        warned = [e for e in events if formatEvent(e).startswith("upstream call failed")]
        self.assertEqual(len(warned), 10, [formatEvent(e) for e in warned])
        self.assertTrue(all(e["log_level"].name == "warn" and e["cause"] == "upstream-unreachable" for e in warned))
        self.assertIn("refused", warned[0]["reason"].lower())
        access = [e for e in events if e.get("log_namespace") == "ppbridge.access"]
        self.assertEqual([(e["code"], e["cause"]) for e in access], [(502, "upstream-unreachable")] * 12)
        p_admin = yield listen(self, admin_site(stack.proxies["alpha"]))
        response, body = yield client.fetch(b"GET", p_admin + "/metrics")
        found = samples(body.decode("utf-8"))
        key = ("ppbridge_requests_total", labels(proxy="alpha", code="502", cause="upstream-unreachable"))
        self.assertEqual(found[key], 12.0)


class RedisFailureLogTests(TestCase):
    """Losing Redis is a warning, a few a minute (no sockets: the bus's state is set by hand)."""

    def test_disconnects_are_warned_and_throttled(self):
        """Each loss of the Redis connection (connected, then not) logs "Redis disconnected"
        at warn level with host and port, BURST times in a PERIOD; the rest of that window is
        summed up in one warn line ("N more Redis failures (disconnected)") with the first
        loss after it; "Redis connected" stays at info."""
        events = capture(self, "ppbridge.bus")
        clock = Clock()
        bus = RedisBus(RedisSettings(namespace="ns", host="redis.test", port=6390), clock)
        for _ in range(BURST + 3):
            bus._was_connected = True  # as if connected: bus.connected is False (no connection)
            bus._changed()
            clock.advance(1)
        lines = [(e["log_level"].name, formatEvent(e)) for e in events]
        self.assertEqual(lines, [("warn", "Redis disconnected (redis.test:6390); reconnecting")] * BURST)
        clock.advance(PERIOD)
        bus._was_connected = True
        bus._changed()
        lines = [(e["log_level"].name, formatEvent(e)) for e in events[BURST:]]
        self.assertEqual(lines, [("warn", "Redis disconnected (redis.test:6390); reconnecting"),
                                 ("warn", "3 more Redis failures (disconnected) were not logged")])
        bus._pub, bus._main.proto = object(), object()  # both connections up
        bus._changed()
        self.assertEqual([(e["log_level"].name, formatEvent(e)) for e in events[BURST + 2:]],
                         [("info", "Redis connected (redis.test:6390)")])


class MetricsTests(TestCase):
    """/metrics of a running forwarder and proxy, parsed with prometheus_client.parser."""

    timeout = 120

    @defer.inlineCallbacks
    def test_names_and_labels_on_both_sides(self):
        """After 2 answered GETs, one bad-target, one request for the stopped proxy beta and
        one without a route, the forwarder exports: ppbridge_requests_total with separate code
        and cause labels (cause "-" when none; the route's proxy on early errors, "-" without
        a route); ppbridge_request_duration_seconds_count {proxy, code}; ppbridge_build_info
        {version} 1; process_* and python_info samples; ppbridge_proxy_instances 1 for alpha and
        0 for beta; a key age and seconds since the last negotiation for alpha only; and no
        sample with the old outcome label. The proxy exports its own requests counter,
        ppbridge_upstream_latency_seconds_count 2 and ppbridge_build_info."""
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}, "beta": {"path_prefix": "/b"}},
                                        without=("beta",))
        client = Client(self)
        for path in ("/a/echo", "/a/echo?x", "/a/%2e%2e/etc", "/b/x", "/zzz"):
            yield client.fetch(b"GET", stack.url + path)
        f_admin = yield listen(self, admin_site(stack.forwarder))
        p_admin = yield listen(self, admin_site(stack.proxies["alpha"]))
        response, body = yield client.fetch(b"GET", f_admin + "/metrics")
        text = body.decode("utf-8")
        f = samples(text)
        requests = {k[1]: v for k, v in f.items() if k[0] == "ppbridge_requests_total"}
        self.assertEqual(requests, {
            labels(proxy="alpha", code="200", cause="-"): 2.0,
            labels(proxy="alpha", code="400", cause="bad-target"): 1.0,
            labels(proxy="beta", code="503", cause="proxy-unavailable"): 1.0,
            labels(proxy="-", code="404", cause="no-route"): 1.0,
        })
        self.assertEqual(f[("ppbridge_request_duration_seconds_count", labels(proxy="alpha", code="200"))], 2.0)
        self.assertEqual(f[("ppbridge_request_duration_seconds_count", labels(proxy="-", code="404"))], 1.0)
        self.assertIn("# TYPE ppbridge_request_duration_seconds histogram", text)
        self.assertEqual(f[("ppbridge_build_info", labels(version=__version__))], 1.0)
        self.assertIn(("process_cpu_seconds_total", ()), f)
        self.assertIn(("process_resident_memory_bytes", ()), f)
        self.assertTrue(any(name == "python_info" for name, _ in f))
        self.assertEqual(f[("ppbridge_proxy_instances", labels(proxy="alpha"))], 1.0)
        self.assertEqual(f[("ppbridge_proxy_instances", labels(proxy="beta"))], 0.0)
        self.assertGreaterEqual(f[("ppbridge_proxy_key_age_seconds", labels(proxy="alpha"))], 0.0)
        self.assertLess(f[("ppbridge_proxy_key_age_seconds", labels(proxy="alpha"))], 120.0)
        self.assertGreaterEqual(f[("ppbridge_proxy_last_negotiation_seconds", labels(proxy="alpha"))], 0.0)
        self.assertNotIn(("ppbridge_proxy_key_age_seconds", labels(proxy="beta")), f)
        self.assertNotIn(("ppbridge_proxy_last_negotiation_seconds", labels(proxy="beta")), f)
        self.assertNotIn("outcome=", text)

        response, body = yield client.fetch(b"GET", p_admin + "/metrics")
        p = samples(body.decode("utf-8"))
        self.assertEqual(p[("ppbridge_requests_total", labels(proxy="alpha", code="200", cause="-"))], 2.0)
        self.assertEqual(p[("ppbridge_upstream_latency_seconds_count", labels(proxy="alpha"))], 2.0)
        self.assertEqual(p[("ppbridge_build_info", labels(version=__version__))], 1.0)
        self.assertIn(("process_cpu_seconds_total", ()), p)


class MetricTallyTests(TestCase):
    """The hot metrics count in plain numbers (ppbridge.metrics.Tally, HistogramTally) and are
    handed to prometheus_client when collected: what is exported is what prometheus_client's
    own counters, gauges and histograms would have exported."""

    def reference(self) -> tuple[Any, Any, Any, Any]:
        """Plain prometheus_client metrics with the same names, labels and buckets."""
        registry = CollectorRegistry()
        return (registry, Counter("ppbridge_requests", "x", ["proxy", "code", "cause"], registry=registry),
                Histogram("ppbridge_request_duration_seconds", "x", ["proxy", "code"], buckets=DURATION_BUCKETS,
                          registry=registry),
                Gauge("ppbridge_active_streams", "x", registry=registry))

    def test_private_values_still_there(self) -> None:
        """The prometheus_client internals HistogramTally writes into exist as it expects (a
        newer prometheus_client must fail here first): one value per upper bound, our bounds."""
        child = Metrics().request_duration.labels("alpha", "200")
        self.assertEqual(tuple(child._upper_bounds), UPPER_BOUNDS)
        self.assertEqual(len(child._buckets), len(UPPER_BOUNDS))
        self.assertTrue(callable(child._sum.set) and callable(child._sum.get))

    def test_same_samples_as_prometheus_client(self) -> None:
        """Requests of mixed causes, codes and durations (negative, exact bucket bounds, beyond
        the last, NaN) and streams opening and closing, read between and after them through the
        registry: every sample value equals that of plain prometheus_client metrics."""
        metrics = Metrics()
        registry, counter, histogram, gauge = self.reference()
        durations = [0.0, 0.005, 0.0051, 0.3, 300.0, 301.0, -2.0, 1e-9, 59.99, float("nan"), 7.0]
        for i in range(300):
            proxy, code, cause = ("alpha", "-")[i % 2], ("200", "502", "404")[i % 3], ("-", "upstream-timeout")[i % 5 // 4]
            seconds = durations[i % len(durations)] * (1 if i % 4 < 2 else 1 + i / 1000)
            metrics.request_done(proxy, code, cause, seconds)
            counter.labels(proxy, code, cause).inc()
            histogram.labels(proxy, code).observe(max(0.0, seconds))
            (metrics.active_streams.inc, metrics.active_streams.dec)[i % 3 == 2]()
            (gauge.inc, gauge.dec)[i % 3 == 2]()
            if i % 97 == 0 or i == 299:
                ours = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect()
                        for s in m.samples if not s.name.endswith("_created")}
                theirs = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect()
                          for s in m.samples if not s.name.endswith("_created")}
                self.assertEqual({k: v for k, v in ours.items() if k in theirs}, theirs)
                self.assertEqual(metrics.registry.get_sample_value("ppbridge_active_streams"), gauge._value.get())

    def test_counts_reach_a_direct_collect(self) -> None:
        """Collecting one metric alone (as the admin page's request sampler does) hands the
        waiting counts over too; so does get_sample_value."""
        metrics = Metrics()
        metrics.request_done("alpha", "200", "-", 0.01)
        metrics.sealed.inc()
        metrics.bytes_down.inc(100)
        [family] = metrics.requests.collect()
        self.assertEqual([s.value for s in family.samples if s.name.endswith("_total")], [1.0])
        self.assertEqual(metrics.registry.get_sample_value("ppbridge_bus_messages_total", {"direction": "sealed"}), 1.0)
        self.assertEqual(metrics.registry.get_sample_value("ppbridge_body_bytes_total", {"direction": "down"}), 100.0)


class JsonLogTests(TestCase):
    """``twistd --logger ppbridge.logs.json_logger -n ppforwarder``, the installed program."""

    timeout = 120

    @defer.inlineCallbacks
    def test_twistd_json_logger_writes_json_lines_with_access_fields(self):
        """Every line the child writes on stdout is one JSON object; a request for a proxy
        that is not running gives one with log_namespace "ppbridge.access", a log_time, and
        the fields method GET, path "/q" (no query), code 503, cause "proxy-unavailable",
        proxy "alpha"; no line holds the Authorization value or the query, and none is
        Twisted's "Starting factory" noise."""
        child, port, _ = forwarder_child(self, "--logger", "ppbridge.logs.json_logger")
        yield child.wait_for(r"serving proxies", OUT)
        yield child.wait_for(r"Redis connected", OUT)
        response, _ = yield Client(self).fetch(b"GET", f"http://127.0.0.1:{port}/q?k=SECRET-QUERY-VALUE",
                                               {b"Authorization": [SECRETS[0]]})
        self.assertEqual(response.code, 503)
        yield child.wait_for(r'"log_namespace": "ppbridge\.access"', OUT)
        records = [json.loads(line) for line in child.lines[OUT] if line.strip()]
        access = [r for r in records if r.get("log_namespace") == "ppbridge.access"]
        self.assertEqual(len(access), 1)
        shown = {k: access[0][k] for k in ("method", "path", "code", "cause", "proxy")}
        self.assertEqual(shown, {"method": "GET", "path": "/q", "code": 503, "cause": "proxy-unavailable",
                                 "proxy": "alpha"})
        self.assertIsInstance(access[0]["log_time"], float)
        text = child.text(OUT)
        self.assertNotIn("SECRET", text)
        self.assertNotIn("Starting factory", text)
