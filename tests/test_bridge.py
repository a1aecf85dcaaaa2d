"""End to end through a real Redis and real HTTP: methods, concurrency, big bodies, routing,
HTTP transparency and the errors ppbridge answers itself."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import time
import weakref
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.server import version as twisted_web_version

from ppbridge import clientstream
from ppbridge.clientstream import ClientStream
from ppbridge.negotiation import proxy_peer
from ppbridge.upstream import UpstreamCall
from ppbridge.pattern import pattern_sha256
from ppbridge.sampleapp import GZIP_BODY, make_site
from ppbridge.webface import BridgeRequest
from tests.support import Client, Stack, error_of, listen
from tests.test_streaming import raw_exchange, split_response

MiB = 1 << 20


def echo(body: bytes) -> dict:
    return json.loads(body)


class Methods(TestCase):
    @defer.inlineCallbacks
    def test_every_method_reaches_the_upstream_unchanged(self):
        """GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS and an extension method arrive at the
        upstream as sent, with their query string and body, and their answers come back."""
        stack = yield Stack(self).start()
        client = Client(self)
        for method in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"PROPFIND"):
            body = b"payload of " + method if method not in (b"GET", b"OPTIONS") else None
            response, data = yield client.fetch(method, stack.url + "/echo/x?q=%20a&b=1", body=body)
            self.assertEqual(response.code, 200, method)
            seen = echo(data)
            self.assertEqual(seen["method"], method.decode())
            self.assertEqual(seen["uri"], "/echo/x?q=%20a&b=1")
            self.assertEqual(seen["body_sha256"], hashlib.sha256(body or b"").hexdigest())
        response, data = yield client.fetch(b"HEAD", stack.url + "/bytes?n=1234&seed=3")
        self.assertEqual((response.code, data), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"1234"])


class Freeing(TestCase):
    @defer.inlineCallbacks
    def test_finished_streams_need_no_cyclic_collection(self):
        """With the cyclic garbage collector off, every ClientStream and every UpstreamCall of
        requests answered normally (inline and streamed bodies) is freed once its answer is in:
        nothing it made (the request's link, its timers, its flow control) keeps it, its request
        and their headers in a reference cycle until the next collection."""
        stack = yield Stack(self).start()
        client = Client(self)
        yield client.fetch(b"GET", stack.url + "/echo/warm")  # keys, pools and connections first
        made: list[weakref.ref[Any]] = []

        def recording(cls: type) -> None:
            original = cls.__init__

            def init(obj: Any, *args: Any) -> None:
                original(obj, *args)
                made.append(weakref.ref(obj))

            self.patch(cls, "__init__", init)

        recording(ClientStream)
        recording(UpstreamCall)
        gc.disable()
        self.addCleanup(gc.enable)
        for path in ("/echo/a", "/bytes?n=100", "/bytes?n=300000", "/echo/b"):
            response, _ = yield client.fetch(b"GET", stack.url + path)
            self.assertEqual(response.code, 200)
        yield deferLater(reactor, 0.05, lambda: None)  # the last PUBLISH replies
        self.assertEqual(len(made), 8)
        self.assertEqual([ref() for ref in made], [None] * 8)


class WholeAnswers(TestCase):
    @defer.inlineCallbacks
    def test_a_response_whole_in_its_head_skips_flow_control(self):
        """A small response (its body inside its head, END set) reaches the client byte-exact
        without an Inbound or a producer registered on the client's request; a response of
        several frames still gets both."""
        stack = yield Stack(self).start()
        client = Client(self)
        yield client.fetch(b"GET", stack.url + "/echo/warm")
        inbounds: list[object] = []
        producers: list[object] = []
        original_inbound = clientstream.Inbound
        original_register = BridgeRequest.registerProducer

        def inbound(*args: Any) -> Any:
            inbounds.append(args)
            return original_inbound(*args)

        def register(request: Any, producer: Any, streaming: bool) -> None:
            producers.append(producer)
            original_register(request, producer, streaming)

        self.patch(clientstream, "Inbound", inbound)
        self.patch(BridgeRequest, "registerProducer", register)
        response, digest, n = yield client.digest(f"{stack.url}/bytes?n=1000&seed=5")
        self.assertEqual((response.code, n, digest), (200, 1000, pattern_sha256(5, 1000)))
        self.assertEqual((inbounds, producers), ([], []))
        response, digest, n = yield client.digest(f"{stack.url}/bytes?n=300000&seed=6")
        self.assertEqual((response.code, n, digest), (200, 300000, pattern_sha256(6, 300000)))
        self.assertEqual((len(inbounds), len(producers)), (1, 1))


class Concurrency(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_200_concurrent_requests_each_get_their_own_answer(self):
        """200 requests in flight at once, uploads and downloads of mixed sizes (inline and
        streamed), each get exactly their own body back."""
        stack = yield Stack(self).start()
        client = Client(self)
        rng = random.Random(7)

        @defer.inlineCallbacks
        def one(i: int):  # type: ignore[no-untyped-def]
            size = rng.choice([0, 10, 1000, 70_000, 300_000, 1_500_000])
            if i % 2:
                body = rng.randbytes(size)
                response, data = yield client.fetch(b"POST", f"{stack.url}/echo?i={i}", body=body)
                seen = echo(data)
                self.assertEqual((response.code, seen["uri"]), (200, f"/echo?i={i}"))
                self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())
            else:
                response, digest, n = yield client.digest(f"{stack.url}/bytes?n={size}&seed={i}")
                self.assertEqual((response.code, n, digest), (200, size, pattern_sha256(i, size)))

        yield defer.gatherResults([one(i) for i in range(200)], consumeErrors=True)


class BigBodies(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_64_mib_down_and_up_byte_exact(self):
        """A 64 MiB download and a 64 MiB upload arrive byte-exact (hashes compared)."""
        stack = yield Stack(self).start()
        client = Client(self)
        size = 64 * MiB
        response, digest, n = yield client.digest(f"{stack.url}/bytes?n={size}&seed=11")
        self.assertEqual((response.code, n, digest), (200, size, pattern_sha256(11, size)))
        body = os.urandom(size)
        response, data = yield client.fetch(b"PUT", stack.url + "/upload", body=body)
        self.assertEqual(response.code, 200)
        self.assertEqual(echo(data), {"body_sha256": hashlib.sha256(body).hexdigest(), "body_length": size})

    @defer.inlineCallbacks
    def test_chunked_upload_and_chunked_download(self):
        """Bodies without Content-Length (chunked both ways) stream through intact."""
        stack = yield Stack(self).start()
        client = Client(self)
        body = os.urandom(3 * MiB + 17)
        producer = FileBodyProducer(io.BytesIO(body))
        producer.length = -1  # unknown: the client sends chunked
        from twisted.web.iweb import UNKNOWN_LENGTH

        producer.length = UNKNOWN_LENGTH
        response, data = yield client.fetch(b"POST", stack.url + "/upload", body=producer)
        self.assertEqual(echo(data)["body_sha256"], hashlib.sha256(body).hexdigest())
        response, digest, n = yield client.digest(f"{stack.url}/bytes?n={5 * MiB}&seed=2&chunked=1")
        self.assertEqual((n, digest), (5 * MiB, pattern_sha256(2, 5 * MiB)))
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))


class SmallFrames(TestCase):
    @defer.inlineCallbacks
    def test_inline_sized_bodies_that_do_not_fit_one_frame(self):
        """With the smallest frame size, a 64 KiB body (inline-sized) no longer fits in one
        message with its head; it follows in frames, both ways, intact."""
        stack = yield Stack(self).start(forwarder={"frame_size": 65536}, proxy={"frame_size": 65536})
        client = Client(self)
        body = os.urandom(65536)
        response, data = yield client.fetch(b"POST", stack.url + "/upload", body=body)
        self.assertEqual(echo(data)["body_sha256"], hashlib.sha256(body).hexdigest())
        response, digest, n = yield client.digest(f"{stack.url}/bytes?n=65536&seed=5")
        self.assertEqual((n, digest), (65536, pattern_sha256(5, 65536)))


class EarlyAnswer(Protocol):
    """An upstream that answers 401 as soon as it has the request headers, without reading
    the body (like a server refusing an unauthenticated upload), and drops the rest."""

    def connectionMade(self) -> None:
        self.seen = b""

    def connectionLost(self, reason: object) -> None:
        self.factory.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self.seen is not None:
            self.seen += data
            if b"\r\n\r\n" in self.seen:
                self.seen = None
                self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope!")


class EarlyAnswers(TestCase):
    @defer.inlineCallbacks
    def test_answer_before_the_upload_is_read(self):
        """An upstream that answers before reading an 8 MiB upload: the client can finish
        sending and gets that answer (nothing stalls on flow control)."""
        from twisted.internet.protocol import Factory

        closed: defer.Deferred[None] = defer.Deferred()
        factory = Factory.forProtocol(EarlyAnswer)
        factory.closed = closed
        upstream = yield listen(self, factory)
        stack = yield Stack(self).start(upstreams={"alpha": upstream})
        response, data = yield Client(self).fetch(b"POST", stack.url + "/upload", body=os.urandom(8 * MiB))
        self.assertEqual((response.code, data), (401, b"nope!"))
        yield closed.addTimeout(10, reactor)  # and the proxy let go of that connection


class RetryRuleInMemory(TestCase):
    @defer.inlineCallbacks
    def test_retry_rule_on_the_in_memory_bus(self):
        """A unit test of the forwarder's retry rule, on the in-memory bus (MemoryBroker:
        publish is delivered synchronously and its receiver count is exact; no Redis). Two
        processes of one proxy; one stops listening (its PUBLISH reaches nobody) and the
        forwarder's liveness check is off, so only that count can tell. A GET without a body
        sent its way is retried on the live instance and answered 200 (one upstream hit),
        and the silent instance is evicted; put back first in line, a POST with a body is
        not retried (the count may be a lie and the first instance may run it): 503
        proxy-unavailable, no upstream hit, and it is evicted again.

        The same rule against a real Redis, with a hostile Redis in the middle lying about
        the count to a live replica: tests/test_attacks.py::AtMostOnce::
        test_executed_twice_with_replicas."""
        from ppbridge.memorybus import MemoryBroker
        from ppbridge.config import load_forwarder_config, load_proxy_config
        from ppbridge.forwarder import ForwarderService
        from ppbridge.proxy import ProxyService
        from ppbridge.scaffold import write_forwarder_config, write_proxy_config
        from ppbridge.webface import BridgeSite
        from tests.support import key_pair, poll, temp_folder

        folder = temp_folder(self)
        for name in ("forwarder", "alpha"):
            key_pair(folder, name)
        site, app = make_site()
        upstream = yield listen(self, site)
        redis_url = "redis://127.0.0.1:9/0"  # never contacted: the bus is in memory
        broker = MemoryBroker()
        forwarder = ForwarderService(load_forwarder_config(write_forwarder_config(
            folder, redis_url, "tcp:0", {"alpha": {"path_prefix": "/"}})), broker.client(), reactor)
        settings = load_proxy_config(write_proxy_config(folder, "alpha", redis_url, upstream))
        live, silent = (ProxyService(settings, broker.client(), reactor, reactor) for _ in range(2))
        for service in (forwarder, live, silent):
            service.startService()
            self.addCleanup(lambda s=service: s.stopService() if s.running else None)
        url = yield listen(self, BridgeSite(forwarder))
        yield poll(lambda: len(forwarder.candidates("alpha")) == 2, 10, "both instances keyed")
        forwarder._loops[1].stop()  # no liveness check: only PUBLISH can tell the instance is gone
        silent.bus.set_connected(False)
        client = Client(self)
        silent_peer = proxy_peer("alpha", silent.instance)

        def silent_first() -> None:
            forwarder.instances["alpha"] = [silent_peer, proxy_peer("alpha", live.instance)]
            forwarder._turns["alpha"] = 0  # round robin starts at the first

        silent_first()
        response, data = yield client.fetch(b"GET", url + "/echo")
        self.assertEqual(response.code, 200)
        self.assertEqual(app.hits["/echo"], 1)
        self.assertEqual(forwarder.instances["alpha"], [proxy_peer("alpha", live.instance)])
        silent_first()  # as if a heartbeat had brought it back
        response, data = yield client.fetch(b"POST", url + "/upload", body=os.urandom(MiB))
        self.assertEqual((response.code, error_of(response)), (503, b"proxy-unavailable"))
        self.assertEqual(app.hits["/upload"], 0)
        self.assertEqual(forwarder.instances["alpha"], [proxy_peer("alpha", live.instance)])


class Routing(TestCase):
    @defer.inlineCallbacks
    def test_two_proxies_by_prefix_and_by_host(self):
        """Two proxies with their own keys and upstreams: one routed by path prefix (which is
        stripped), one by Host; each request reaches the right upstream."""
        site_b, app_b = make_site()
        upstream_b = yield listen(self, site_b)
        stack = yield Stack(self).start(
            routes={"alpha": {"path_prefix": "/a"}, "beta": {"hosts": ["beta.test"]}},
            upstreams={"beta": upstream_b},
        )
        client = Client(self)
        response, data = yield client.fetch(b"GET", stack.url + "/a/echo?via=prefix")
        self.assertEqual(echo(data)["uri"], "/echo?via=prefix")
        response, data = yield client.fetch(b"GET", stack.url + "/echo?via=host", {b"Host": [b"beta.test"]})
        self.assertEqual(echo(data)["uri"], "/echo?via=host")
        self.assertEqual((stack.app.hits["/echo"], app_b.hits["/echo"]), (1, 1))
        fp_a = stack.proxies["alpha"].keyring.current(stack.forwarder.id).session.envelope.fingerprint
        fp_b = stack.proxies["beta"].keyring.current(stack.forwarder.id).session.envelope.fingerprint
        self.assertNotEqual(fp_a, fp_b)


class Transparency(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = yield Stack(self).start()
        self.client = Client(self)

    @defer.inlineCallbacks
    def test_repeated_headers_pass_through(self):
        """Two Set-Cookie headers the upstream sent come back as two, in their order, and the
        sample's X-MiXeD-Case header comes back with its value."""
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/cookies")
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; Path=/"])
        self.assertEqual(response.headers.getRawHeaders(b"x-mixed-case"), [b"v"])

    @defer.inlineCallbacks
    def test_binary_body_and_query_byte_exact(self):
        """Every byte value survives in both directions, and an odd query string is kept."""
        body = bytes(range(256)) * 64
        response, data = yield self.client.fetch(b"POST", self.stack.url + "/echo?a=%00%ff&a=2&&x", body=body)
        seen = echo(data)
        self.assertEqual(seen["uri"], "/echo?a=%00%ff&a=2&&x")
        self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())

    @defer.inlineCallbacks
    def test_hop_by_hop_removed_and_forwarded_headers_set(self):
        """Hop-by-hop headers (and those named in Connection) are not passed on; the
        upstream sees X-Forwarded-For/-Host/-Proto and its own Host (a client's own
        X-Forwarded-For is replaced: no trusted_proxies here)."""
        headers = {b"Connection": [b"X-Drop-Me"], b"X-Drop-Me": [b"1"], b"Proxy-Authorization": [b"x"],
                   b"X-Forwarded-For": [b"10.0.0.9"], b"Host": [b"public.example"], b"X-Keep": [b"k"]}
        response, data = yield self.client.fetch(b"GET", self.stack.url + "/echo", headers)
        seen = {name.lower(): value for name, value in echo(data)["headers"]}
        self.assertNotIn("x-drop-me", seen)
        self.assertNotIn("proxy-authorization", seen)
        self.assertEqual(seen["x-keep"], "k")
        self.assertEqual(seen["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(seen["x-forwarded-host"], "public.example")
        self.assertEqual(seen["x-forwarded-proto"], "http")
        self.assertEqual(seen["host"], self.stack.upstream.removeprefix("http://"))

    @defer.inlineCallbacks
    def test_content_encoding_untouched_and_nothing_added(self):
        """A gzip body comes back compressed and unchanged; the proxy adds no Accept-Encoding
        upstream and keeps no cookie jar between clients."""
        response, data = yield self.client.fetch(b"GET", self.stack.url + "/gzip")
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(data, GZIP_BODY)
        yield self.client.fetch(b"GET", self.stack.url + "/cookies")
        response, data = yield self.client.fetch(b"GET", self.stack.url + "/echo")
        names = {name.lower() for name, _ in echo(data)["headers"]}
        self.assertNotIn("accept-encoding", names)
        self.assertNotIn("cookie", names)

    @defer.inlineCallbacks
    def test_redirects_are_passed_back_not_followed(self):
        """A 302 reaches the client with its Location; the proxy does not follow it."""
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/redirect")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/echo"])
        self.assertEqual(self.stack.app.hits["/echo"], 0)


class ReasonUpstream(Resource):
    """Answers ``/CODE`` with that status and the reason phrase ``Reason CODE As Sent`` (no
    standard one), ``X-Sample: yes`` and the body ``CODE``; a 204 with no body and no
    Content-Length."""

    isLeaf = True

    def render(self, request: Any) -> bytes | int:
        code = int(request.path.strip(b"/"))
        request.setResponseCode(code, b"Reason %d As Sent" % code)
        request.setHeader(b"X-Sample", b"yes")
        if code == 204:
            request.finish()  # returning b"" would add Content-Length: 0
            return NOT_DONE_YET
        return b"%d" % code


class StatusLines(TestCase):
    @defer.inlineCallbacks
    def test_status_and_reason_come_back_as_sent_and_no_body_on_a_204(self):
        """Statuses 201, 204, 404, 418, 500 and 503 with reason phrases no library would make
        up ("Reason 418 As Sent") reach the client as the upstream sent them: the same status
        and reason, the upstream's header, its body (none for the 204) and no
        X-PPBridge-Error. On the wire the 204's status line carries the reason, and it has
        no Content-Length, no Transfer-Encoding and no byte after its head before the
        connection closes: no body is added to it."""
        upstream = yield listen(self, Site(ReasonUpstream()))
        stack = yield Stack(self).start(upstreams={"alpha": upstream})
        client = Client(self)
        for code in (201, 204, 404, 418, 500, 503):
            response, data = yield client.fetch(b"GET", stack.url + f"/{code}")
            self.assertEqual((response.code, response.phrase), (code, b"Reason %d As Sent" % code))
            self.assertEqual(response.headers.getRawHeaders(b"x-sample"), [b"yes"], code)
            self.assertIsNone(error_of(response), code)
            self.assertEqual(data, b"" if code == 204 else b"%d" % code)
        # An HTTP client reads no body after a 204 whatever follows it; a raw one sees all.
        request = b"GET /204 HTTP/1.1\r\nHost: bridge.test\r\nConnection: close\r\n\r\n"
        proto = yield raw_exchange(self, stack.url, request)
        raw = yield proto.closed.addTimeout(10, reactor)
        status, headers, rest = split_response(raw)
        self.assertEqual(status, b"HTTP/1.1 204 Reason 204 As Sent", raw)
        self.assertNotIn(b"content-length", headers, raw)
        self.assertNotIn(b"transfer-encoding", headers, raw)
        self.assertEqual(rest, b"", raw)


class Errors(TestCase):
    """Each failure is answered at once with its own status and X-PPBridge-Error cause."""

    @defer.inlineCallbacks
    def test_no_route_is_404(self):
        """A path no proxy is routed for gets 404 no-route."""
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}})
        response, data = yield Client(self).fetch(b"GET", stack.url + "/elsewhere")
        self.assertEqual((response.code, error_of(response)), (404, b"no-route"))
        self.assertIn(b"no proxy", data)

    @defer.inlineCallbacks
    def test_an_error_answered_before_any_stream_keeps_server_and_date(self):
        """An error answered before a stream opens (404 no-route) carries twisted.web's Server
        header and a Date within a second of now, in HTTP's format, as twisted.web sets them."""
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}})
        before = int(time.time())
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/elsewhere")
        after = int(time.time())
        self.assertEqual(response.headers.getRawHeaders(b"server"), [twisted_web_version])
        self.assertIn(response.headers.getRawHeaders(b"date"), [[datetimeToString(before)], [datetimeToString(after)]])
        self.assertEqual(error_of(response), b"no-route")

    @defer.inlineCallbacks
    def test_server_and_date_lead_an_error_answer_and_stay_off_a_proxied_one(self):
        """On the wire, an error answer of ppbridge's own (404 no-route) asked with Connection:
        close has Connection, Server, Date, X-PPBridge-Error, Content-Type, Content-Length in
        this order, as twisted.web sets them (Connection before it processes the request); a
        proxied answer carries the upstream's headers, not a second Server or Date of the
        forwarder's."""
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}})
        port = stack.url.rsplit(":", 1)[1]
        names = []
        for path in (b"/elsewhere", b"/a/echo"):
            proto = yield raw_exchange(self, stack.url, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\n"
                                       b"Connection: close\r\n\r\n" % (path, port.encode()))
            raw = yield proto.closed.addTimeout(10, reactor)
            head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
            names.append([line.partition(b":")[0].lower() for line in head])
        self.assertEqual(names[0], [b"connection", b"server", b"date", b"x-ppbridge-error", b"content-type",
                                    b"content-length"])
        self.assertEqual((names[1].count(b"server"), names[1].count(b"date")), (1, 1))

    @defer.inlineCallbacks
    def test_proxy_not_running_is_503_at_once(self):
        """A configured proxy that never connected gets 503 proxy-unavailable without waiting
        for any timeout."""
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/a"}, "ghost": {"path_prefix": "/g"}},
                                        forwarder={"request_timeout": 60.0}, without=("ghost",))
        started = time.monotonic()
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/g/echo")
        self.assertEqual((response.code, error_of(response)), (503, b"proxy-unavailable"))
        self.assertLess(time.monotonic() - started, 30)

    @defer.inlineCallbacks
    def test_proxy_gone_is_503_from_publish_count(self):
        """A proxy that held a key and then stopped gets 503 at once: PUBLISH reached nobody."""
        stack = yield Stack(self).start(forwarder={"request_timeout": 60.0})
        yield stack.proxies["alpha"].stopService()
        started = time.monotonic()
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, error_of(response)), (503, b"proxy-unavailable"))
        self.assertLess(time.monotonic() - started, 30)

    @defer.inlineCallbacks
    def test_upstream_refused_is_502(self):
        """An upstream that refuses connections gets 502 upstream-unreachable."""
        from ppbridge.redis_server import free_port

        stack = yield Stack(self).start(upstreams={"alpha": f"http://127.0.0.1:{free_port()}"})
        response, data = yield Client(self).fetch(b"GET", stack.url + "/anything")
        self.assertEqual((response.code, error_of(response)), (502, b"upstream-unreachable"))
        self.assertIn(b"refused", data)

    @defer.inlineCallbacks
    def test_no_answer_in_time_is_504(self):
        """An upstream that never answers gets 504 timeout after request_timeout, and the
        proxy's upstream call is cancelled (the upstream sees the disconnect)."""
        stack = yield Stack(self).start(forwarder={"request_timeout": 1.0})
        gone = defer.Deferred()
        stack.app.on_disconnect.append(lambda path: gone.callback(path) if not gone.called else None)
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/hang")
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))
        path = yield gone.addTimeout(10, reactor)
        self.assertEqual(path, "/hang")

    @defer.inlineCallbacks
    def test_upstream_too_slow_is_504_upstream_timeout(self):
        """An upstream that sends no headers within the proxy's upstream_timeout gets 504
        upstream-timeout (before the forwarder's own, longer, request_timeout)."""
        stack = yield Stack(self).start(forwarder={"request_timeout": 30.0}, proxy={"upstream_timeout": 1.0})
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/hang")
        self.assertEqual((response.code, error_of(response)), (504, b"upstream-timeout"))

    @defer.inlineCallbacks
    def test_declared_body_over_limit_is_413_before_upload(self):
        """A Content-Length over max_body_size is answered 413 without the body being read
        or anything reaching the upstream."""
        stack = yield Stack(self).start(forwarder={"max_body_size": 1000})
        response, _ = yield Client(self).fetch(b"POST", stack.url + "/upload", body=b"x" * 5000)
        self.assertEqual((response.code, error_of(response)), (413, b"body-too-large"))
        self.assertEqual(stack.app.hits["/upload"], 0)
