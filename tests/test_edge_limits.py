"""Edge limits answered, not dropped: over-long header lines, too many headers and slow heads
(slowloris) each get their status, X-PPBridge-Error, a short text body and Connection: close.

The attacker is an ordinary internet client of the forwarder. It sends request heads no HTTP
library would produce (a 60 KB line, 501 header lines, a head that never ends), so requests go
out byte for byte over raw TCP. What the victim must observe: the attacker gets a precise
answer, nothing reaches the upstream, and everyone else keeps being served.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web import http
from twisted.web.http_headers import Headers

from ppbridge import edge
from ppbridge.edge import EdgeChannel, EdgeLimits, error_bytes
from ppbridge.errors import HeaderTimeout, HeaderTooLarge, TooManyHeaders
from ppbridge.config import load_forwarder_config
from ppbridge.scaffold import write_forwarder_config
from tests.support import Client, Stack, poll
from tests.test_config import ConfigTestCase
from tests.test_observability import capture
from tests.test_streaming import RawHTTP, bounded, dechunk, raw_exchange, split_response

HEAD = b"GET /echo HTTP/1.1\r\nHost: bridge.test\r\n"


CODES = {"header-too-large": "431", "too-many-headers": "431", "header-timeout": "408"}


def refusals(stack: Stack, cause: str) -> float:
    """``ppbridge_requests_total{proxy="-", code=..., cause=cause}`` of the stack's forwarder."""
    value = stack.forwarder.metrics.registry.get_sample_value("ppbridge_requests_total",
                                                              {"proxy": "-", "code": CODES[cause], "cause": cause})
    return value or 0.0


class Answer:
    """A raw answer: status code, lowercase headers, body."""

    def __init__(self, raw: bytes) -> None:
        status, self.headers, self.body = split_response(raw)
        self.status = int(status.split(b" ")[1])

    def cause(self) -> bytes | None:
        values = self.headers.get(b"x-ppbridge-error")
        return values[0] if values else None


class EdgeLimitsTests(TestCase):
    """Real HTTP on 127.0.0.1 through a whole stack (forwarder, Redis, proxy, upstream)."""

    timeout = 120

    @defer.inlineCallbacks
    def exchange(self, stack: Stack, request: bytes):  # type: ignore[no-untyped-def]
        """Send ``request`` raw; the whole answer, read until the forwarder closes."""
        proto = yield raw_exchange(self, stack.url, request)
        raw = yield bounded(proto.closed)
        return raw

    def assertRefused(self, raw: bytes, status: int, cause: bytes) -> Answer:
        """``raw`` is a closing error answer with ``status``, ``cause`` and a text body."""
        answer = Answer(raw)
        self.assertEqual((answer.status, answer.cause()), (status, cause), raw[:300])
        self.assertEqual(answer.headers.get(b"connection"), [b"close"])
        self.assertEqual(answer.headers.get(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertTrue(answer.body.startswith(b"ppbridge: "), answer.body)
        self.assertEqual(int(answer.headers[b"content-length"][0]), len(answer.body))
        return answer

    @defer.inlineCallbacks
    def test_long_header_line_is_431_header_too_large(self):
        """A 60 KB header line (over the default max_header_line of 16 KiB) is answered 431
        header-too-large, counted, and never reaches the upstream; a 15,000-byte one passes."""
        stack = yield Stack(self).start()
        raw = yield self.exchange(stack, HEAD + b"X-Big: " + b"v" * 60000 + b"\r\n\r\n")
        self.assertRefused(raw, 431, b"header-too-large")
        self.assertEqual(stack.app.hits["/echo"], 0)
        self.assertEqual(refusals(stack, "header-too-large"), 1)
        raw = yield self.exchange(stack, HEAD + b"X-Big: " + b"v" * 15000 + b"\r\nConnection: close\r\n\r\n")
        self.assertEqual(Answer(raw).status, 200)

    @defer.inlineCallbacks
    def test_long_request_line_is_431(self):
        """A request line over max_header_line is answered 431 header-too-large as well."""
        stack = yield Stack(self).start()
        raw = yield self.exchange(stack, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: bridge.test\r\n\r\n")
        self.assertRefused(raw, 431, b"header-too-large")

    @defer.inlineCallbacks
    def test_head_over_total_size_is_431(self):
        """50 header lines of 1.5 KB (each short, 75 KB in all: over the 16 KiB head) get 431
        header-too-large, not twisted.web's bare 400."""
        stack = yield Stack(self).start()
        lines = b"".join(b"X-Part-%d: %s\r\n" % (i, b"v" * 1500) for i in range(50))
        raw = yield self.exchange(stack, HEAD + lines + b"\r\n")
        self.assertRefused(raw, 431, b"header-too-large")
        self.assertEqual(stack.app.hits["/echo"], 0)

    @defer.inlineCallbacks
    def test_501_header_lines_are_431_too_many_headers(self):
        """501 header lines (over the default max_headers of 100) are answered 431
        too-many-headers; 100 lines pass."""
        stack = yield Stack(self).start()
        lines = b"".join(b"X-N: %d\r\n" % i for i in range(500))  # and Host: 501
        raw = yield self.exchange(stack, HEAD + lines + b"\r\n")
        self.assertRefused(raw, 431, b"too-many-headers")
        self.assertEqual(refusals(stack, "too-many-headers"), 1)
        lines = b"".join(b"X-N: %d\r\n" % i for i in range(98))  # Host, Connection: 100
        raw = yield self.exchange(stack, HEAD + lines + b"Connection: close\r\n\r\n")
        self.assertEqual(Answer(raw).status, 200)
        self.assertEqual(stack.app.hits["/echo"], 1)

    @defer.inlineCallbacks
    def test_configured_limits_apply(self):
        """max_header_line and max_headers from the config file are the limits enforced."""
        stack = yield Stack(self).start(forwarder={"max_header_line": 2048, "max_headers": 5})
        raw = yield self.exchange(stack, HEAD + b"X-Big: " + b"v" * 3000 + b"\r\n\r\n")
        self.assertRefused(raw, 431, b"header-too-large")
        lines = b"".join(b"X-N: %d\r\n" % i for i in range(5))  # and Host: 6
        raw = yield self.exchange(stack, HEAD + lines + b"\r\n")
        self.assertRefused(raw, 431, b"too-many-headers")
        lines = b"".join(b"X-N: %d\r\n" % i for i in range(3))  # Host, Connection: 5
        raw = yield self.exchange(stack, HEAD + lines + b"Connection: close\r\n\r\n")
        self.assertEqual(Answer(raw).status, 200)

    @defer.inlineCallbacks
    def test_unfinished_head_is_408_after_header_timeout(self):
        """A head that never completes is answered 408 header-timeout after header_timeout
        (0.5 s here; the bound is 10x), and a connection that sends nothing gets it too; each
        gets a warning naming the client and an access-log line (the request line when it
        arrived, else "-"; the time the head took, at least header_timeout)."""
        stack = yield Stack(self).start(forwarder={"header_timeout": 0.5})
        warnings = capture(self, "ppbridge.webface")
        access = capture(self, "ppbridge.access")
        partial = yield raw_exchange(self, stack.url, HEAD + b"X-Slow: 1")
        silent = yield raw_exchange(self, stack.url, b"")
        raw = yield bounded(partial.closed, 5.0)
        self.assertRefused(raw, 408, b"header-timeout")
        raw = yield bounded(silent.closed, 5.0)
        self.assertRefused(raw, 408, b"header-timeout")
        self.assertEqual(refusals(stack, "header-timeout"), 2)
        self.assertEqual(stack.app.hits["/echo"], 0)
        self.assertEqual([(e["status"], e["cause"], e["client"]) for e in warnings if "status" in e],
                         [(408, "header-timeout", "127.0.0.1")] * 2)
        self.assertEqual(sorted((e["method"], e["path"], e["code"], e["cause"], e["proxy"]) for e in access),
                         [("-", "-", 408, "header-timeout", "-"), ("GET", "/echo", 408, "header-timeout", "-")])
        self.assertTrue(all(0.5 <= e["duration"] < 5.0 for e in access), [e["duration"] for e in access])

    @defer.inlineCallbacks
    def test_head_timer_ends_with_the_head(self):
        """The head timer covers only the head: a response slower than header_timeout is
        still answered 200, and a kept-alive connection idle longer than header_timeout
        between two requests serves the second (its timer starts with its first byte)."""
        stack = yield Stack(self).start(forwarder={"header_timeout": 0.5})
        answers: list[bytes] = []
        second = b"GET /echo HTTP/1.1\r\nHost: bridge.test\r\nConnection: close\r\n\r\n"

        def on_data(proto: RawHTTP) -> None:
            if not answers and proto.data.endswith(b"\r\n0\r\n\r\n"):  # the chunked answer is complete
                answers.append(proto.data)
                reactor.callLater(1.0, proto.transport.write, second)

        proto = yield raw_exchange(self, stack.url, b"GET /slow?delay=1 HTTP/1.1\r\nHost: bridge.test\r\n\r\n",
                                   on_data)
        raw = yield bounded(proto.closed, 20.0)
        first, rest = raw[: len(answers[0])], raw[len(answers[0]) :]
        self.assertEqual(Answer(first).status, 200)
        self.assertEqual(Answer(rest).status, 200)
        self.assertEqual(refusals(stack, "header-timeout"), 0)

    @defer.inlineCallbacks
    def test_slowloris_does_not_starve_others(self):
        """200 slowloris connections (half send nothing, half a partial head one byte at a
        time) are held open while 40 ordinary requests are all answered 200; then every
        slowloris connection gets 408 header-timeout (header_timeout 6 s)."""
        stack = yield Stack(self).start(forwarder={"header_timeout": 6.0})
        port = int(stack.url.rsplit(":", 1)[1])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        slow: list[RawHTTP] = []
        trickles: list[Any] = []
        for batch in range(10):  # connect in batches: the test listener's backlog is 50
            protos = [RawHTTP(b"" if (batch * 20 + i) % 2 else HEAD[:5]) for i in range(20)]
            yield defer.gatherResults([connectProtocol(endpoint, p) for p in protos])
            slow.extend(protos)
        for proto in slow:
            self.addCleanup(lambda p=proto: p.transport.abortConnection() if not p.closed.called else None)
            if proto.request:
                def drip(p: RawHTTP = proto, rest: list[bytes] = [bytes([b]) for b in HEAD[5:]]) -> None:
                    if rest and not p.closed.called:
                        p.transport.write(rest.pop(0))
                        trickles.append(reactor.callLater(0.2, drip))
                drip()
        self.addCleanup(lambda: [c.cancel() for c in trickles if c.active()])
        client = Client(self)
        statuses = []
        for _ in range(4):
            batch = yield defer.gatherResults([client.fetch(b"GET", stack.url + "/echo") for _ in range(10)])
            statuses.extend(response.code for response, _ in batch)
        still_open = sum(1 for p in slow if not p.closed.called)
        self.assertEqual(statuses, [200] * 40)
        self.assertEqual(still_open, 200)  # the answers came while every slow connection was open
        raws = yield bounded(defer.gatherResults([p.closed for p in slow]), 60.0)
        for raw in raws:
            self.assertRefused(raw, 408, b"header-timeout")
        self.assertEqual(refusals(stack, "header-timeout"), 200)


class EdgeReloadTests(TestCase):
    """Head limits and access-log switches follow a reload (SIGHUP), with no restart."""

    timeout = 60

    @defer.inlineCallbacks
    def test_reload_applies_head_limits_and_access_log_switches(self):
        """A forwarder started with the defaults passes a 3,000-byte header line and writes an
        access-log line with no query; after its file sets max_header_line 2048 and
        access_log_query true and it reloads, a new connection's 3,000-byte line is answered
        431 and the next request's line shows its query; after access_log = false and another
        reload, a request writes no line."""
        stack = yield Stack(self).start()
        access = capture(self, "ppbridge.access")
        big = HEAD + b"X-Big: " + b"v" * 3000 + b"\r\nConnection: close\r\n\r\n"
        raw = yield self.exchange(stack, big)
        self.assertEqual(Answer(raw).status, 200)
        self.reload(stack, {"max_header_line": 2048, "access_log_query": True})
        raw = yield self.exchange(stack, big)
        self.assertEqual((Answer(raw).status, Answer(raw).cause()), (431, b"header-too-large"))
        raw = yield self.exchange(stack, b"GET /echo?q=1 HTTP/1.1\r\nHost: bridge.test\r\nConnection: close\r\n\r\n")
        self.assertEqual(Answer(raw).status, 200)
        self.assertEqual([(e["path"], e["code"]) for e in access], [("/echo", 200), ("/echo", 431), ("/echo?q=1", 200)])
        self.reload(stack, {"access_log": False})
        raw = yield self.exchange(stack, HEAD + b"Connection: close\r\n\r\n")
        self.assertEqual((Answer(raw).status, len(access)), (200, 3))

    def reload(self, stack: Stack, forwarder: dict[str, Any]) -> None:
        """Rewrite the stack's forwarder file with ``forwarder`` keys and reload it."""
        path = write_forwarder_config(stack.folder, stack.redis.url, "tcp:0", {"alpha": {"path_prefix": "/"}},
                                      forwarder={"drain_timeout": 0, **forwarder})
        stack.forwarder.reload(load_forwarder_config(path))

    @defer.inlineCallbacks
    def exchange(self, stack: Stack, request: bytes):  # type: ignore[no-untyped-def]
        proto = yield raw_exchange(self, stack.url, request)
        raw = yield bounded(proto.closed)
        return raw


def complete(raw: bytes) -> bool:
    """``raw`` holds a whole response with a Content-Length body."""
    if b"\r\n\r\n" not in raw:
        return False
    _, headers, body = split_response(raw)
    return len(body) >= int(headers[b"content-length"][0])


class EdgeDrainTests(TestCase):
    """Keep-alive connections when the forwarder drains (SIGTERM): real HTTP on 127.0.0.1."""

    timeout = 120

    @defer.inlineCallbacks
    def test_drain_closes_idle_keepalive_and_ends_busy_ones_after_their_answer(self):
        """With drain_timeout 20: a kept-alive connection that is idle when the forwarder
        starts draining is closed at once with nothing written on it; one with a request in
        flight (/slow, 1 s) gets its 200 with ``Connection: close`` and is then closed, and a
        request the client pipelined behind it is never served; the drain ends once both
        connections are gone (not at drain_timeout), and each answer has its access-log line."""
        stack = yield Stack(self).start(forwarder={"drain_timeout": 20})
        access = capture(self, "ppbridge.access")
        idle = yield raw_exchange(self, stack.url, HEAD + b"\r\n")
        yield poll(lambda: complete(idle.data), 10, "the first answer on the kept-alive connection")
        answered = len(idle.data)
        busy = yield raw_exchange(self, stack.url, b"GET /slow?delay=1 HTTP/1.1\r\nHost: bridge.test\r\n\r\n"
                                  + HEAD + b"\r\n")
        yield poll(lambda: stack.app.hits["/slow"] == 1, 10, "the /slow request reaching the upstream")
        stopping = stack.forwarder.stopService()
        raw_idle = yield bounded(idle.closed, 5.0)
        self.assertEqual(len(raw_idle), answered)  # closed, nothing more written
        self.assertFalse(busy.closed.called)
        raw_busy = yield bounded(busy.closed, 10.0)
        status, headers, body = split_response(raw_busy)
        self.assertEqual((status, headers.get(b"connection"), dechunk(body)),
                         (b"HTTP/1.1 200 OK", [b"close"], (b"slow\n", True)))
        self.assertEqual(stack.app.hits["/echo"], 1)  # the pipelined one was not served
        yield bounded(stopping, 10.0)
        self.assertEqual([(e["path"], e["code"]) for e in access], [("/echo", 200), ("/slow", 200)])


class EdgeChannelTests(TestCase):
    """The channel alone: a fake transport and a Clock, no sockets, no real time."""

    def channel(self, **limits: Any) -> tuple[EdgeChannel, StringTransport, Clock, list[Any]]:
        clock, refused = Clock(), []
        channel = EdgeChannel(edge.Edge(EdgeLimits(**limits), clock, lambda ch, err, s: refused.append(err.cause)))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport, clock, refused

    def test_head_timer_answers_408_then_lingers_and_closes(self):
        """Nothing sent for header_timeout seconds: 408 header-timeout is written, the write
        side is closed, further bytes are dropped, and the connection is closed LINGER s later."""
        channel, transport, clock, refused = self.channel(header_timeout=3.0)
        clock.advance(2.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertEqual(refused, ["header-timeout"])
        self.assertIn(b"\r\nX-PPBridge-Error: header-timeout\r\n", transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Time-out\r\n"))
        channel.dataReceived(b"GET / HTTP/1.1\r\n")  # dropped: no request is made
        self.assertEqual(channel.requests, [])
        self.assertFalse(transport.disconnecting)
        clock.advance(edge.LINGER)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])

    def timed_channel(self, idle: float, **limits: Any) -> tuple[EdgeChannel, StringTransport, Clock, list[Any]]:
        """A channel whose head timer and twisted.web idle timeout (``idle`` s) both run on a Clock."""
        clock, refused = Clock(), []
        channel = EdgeChannel(edge.Edge(EdgeLimits(**limits), clock, lambda ch, err, s: refused.append(err.cause)))
        channel.callLater = clock.callLater  # type: ignore[method-assign]
        channel.timeOut = idle  # type: ignore[assignment]
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport, clock, refused

    def test_timers_are_pushed_back_not_remade_per_request(self):
        """Two requests one after the other on a kept-alive connection: the head timer and the
        idle timeout are the same two DelayedCalls throughout (pushed back, never cancelled
        and made anew), and neither answers or closes anything meanwhile."""
        channel, transport, clock, refused = self.timed_channel(idle=60.0, header_timeout=3.0)
        calls = set(clock.getDelayedCalls())
        self.assertEqual(len(calls), 2)
        for _ in range(2):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: bridge.test\r\n\r\n")
            channel.requests[0].finish()
            self.assertEqual(set(clock.getDelayedCalls()), calls)
        self.assertEqual((refused, transport.disconnecting), ([], False))

    def test_local_address_asked_of_the_transport_once_per_connection(self):
        """Two requests on a kept-alive connection: each request's ``getHost()`` is the
        transport's local address, and the transport was asked for it once, not per request."""
        channel, transport, _, _ = self.timed_channel(idle=60.0, header_timeout=3.0)
        asked: list[object] = []
        local = transport.getHost()
        self.patch(transport, "getHost", lambda: asked.append(local) or local)
        hosts = []
        for _ in range(2):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: bridge.test\r\n\r\n")
            hosts.append(channel.requests[0].getHost())
            channel.requests[0].finish()
        self.assertEqual((hosts, asked), ([local, local], [local]))

    def test_head_timer_counts_each_head_from_its_first_byte(self):
        """A request handled for longer than header_timeout is not refused, nor is the
        connection kept alive idle after it; the next head, unfinished, is answered 408
        header_timeout after its first byte, not after the earlier head."""
        channel, transport, clock, refused = self.timed_channel(idle=60.0, header_timeout=3.0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: bridge.test\r\n\r\n")
        clock.advance(5.0)
        channel.requests[0].finish()
        clock.advance(10.0)
        self.assertEqual(refused, [])
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        clock.advance(2.9)
        self.assertEqual(refused, [])
        clock.advance(0.2)
        self.assertEqual(refused, ["header-timeout"])

    def test_idle_timeout_suspended_while_a_request_is_handled(self):
        """twisted.web's idle timeout does not close a connection whose request is handled for
        longer than it; once the answer is done it counts again, and an idle connection is
        closed after it."""
        channel, transport, clock, refused = self.timed_channel(idle=5.0, header_timeout=3.0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: bridge.test\r\n\r\n")
        clock.advance(12.0)
        self.assertFalse(transport.disconnecting)
        channel.requests[0].finish()
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(refused, [])

    def test_headers_written_as_twisted_web_writes_them_in_one_write(self):
        """writeHeaders gives the transport exactly the bytes twisted.web's HTTPChannel gives
        (status line, repeated and empty header values in order, blank line), in one write."""
        headers = Headers()
        for name, value in ((b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                            (b"X-Empty", b""), (b"Content-Length", b"0")):
            headers.addRawHeader(name, value)
        theirs, plain = StringTransport(), http.HTTPChannel()
        plain.makeConnection(theirs)
        plain.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        channel, ours, _, _ = self.channel()
        writes: list[bytes] = []
        self.patch(ours, "write", writes.append)
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        self.assertEqual(writes, [theirs.value()])
        self.assertTrue(theirs.value().endswith(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Empty: \r\n"
                                                b"Content-Length: 0\r\n\r\n"))
        plain.connectionLost(None)
        channel.connectionLost(None)

    def test_line_over_limit_answers_431_once(self):
        """A line past max_header_line is refused once, even if more data follows."""
        channel, transport, clock, refused = self.channel(max_header_line=1024)
        channel.dataReceived(b"GET /" + b"a" * 2000)
        channel.dataReceived(b" HTTP/1.1\r\n\r\n")
        self.assertEqual(refused, ["header-too-large"])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), edge.LINGER)  # the head timer is gone

    def test_http2_takeover_stops_the_head_timer(self):
        """When twisted.web's wrapper hands the connection to another channel (HTTP/2 over
        TLS: H2 is not installed here, so the swap is simulated), the edge channel's head
        timer stops: no 408 lands in the other protocol's byte stream."""
        clock, transport, other = Clock(), StringTransport(), http.HTTPChannel()
        wrapper = edge.Edge(EdgeLimits(header_timeout=1.0), clock, lambda ch, err, s: None).protocol()
        channel = wrapper._channel
        wrapper.makeConnection(transport)

        def negotiate_h2(self: Any, data: bytes) -> None:
            self._channel = other  # what _GenericHTTPChannelProtocol.dataReceived does for h2

        self.patch(http._GenericHTTPChannelProtocol, "dataReceived", negotiate_h2)
        wrapper.dataReceived(b"PRI * HTTP/2.0\r\n")
        clock.advance(5.0)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(channel.refused)

    def test_error_bytes(self):
        """An error answer names its cause, closes the connection and sizes its body."""
        raw = error_bytes(TooManyHeaders())
        status, headers, body = split_response(raw)
        self.assertEqual(status, b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertEqual(headers[b"x-ppbridge-error"], [b"too-many-headers"])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(int(headers[b"content-length"][0]), len(body))
        self.assertEqual((HeaderTooLarge.status, HeaderTimeout.status), (431, 408))

    def test_client_transport_sends_whole_frames(self):
        """A TCP transport's per-send() limit is raised to CLIENT_SEND_LIMIT, so a frame-sized
        write is not cut at Twisted's 128 KiB and its rest joined (copied) with the next; the
        attribute still exists on Twisted's transports (checked on Twisted 26.10)."""
        from twisted.internet import abstract, tcp
        self.assertEqual(abstract.FileDescriptor.SEND_LIMIT, 128 * 1024)
        self.assertTrue(issubclass(tcp.Server, abstract.FileDescriptor))

        class TCPLike(StringTransport):
            SEND_LIMIT = abstract.FileDescriptor.SEND_LIMIT

        channel = EdgeChannel(edge.Edge(EdgeLimits(), Clock(), lambda ch, err, s: None))
        transport = TCPLike()
        channel.makeConnection(transport)
        self.assertEqual(transport.SEND_LIMIT, edge.CLIENT_SEND_LIMIT)
        self.assertGreaterEqual(edge.CLIENT_SEND_LIMIT, 256 * 1024 + 64)
        channel.connectionLost(None)

    def test_twisted_internals_still_there(self):
        """The private parts of twisted.web this edge relies on (checked on Twisted 26.10)
        still exist: fail loudly here rather than silently lose the limits."""
        self.assertTrue(hasattr(http, "_GenericHTTPChannelProtocol"))
        channel = http.HTTPChannel()
        self.assertEqual((channel._receivedHeaderSize, channel._receivedHeaderCount), (0, 0))
        self.assertEqual((channel.MAX_LENGTH, channel.totalHeadersSize), (16384, 16384))
        for name in ("lineLengthExceeded", "headerReceived", "allHeadersReceived", "requestDone"):
            self.assertTrue(callable(getattr(channel, name)), name)


class EdgeConfigTests(ConfigTestCase):
    """[forwarder] max_header_line, max_headers and header_timeout."""

    def test_defaults(self) -> None:
        """Left out, the limits are 16 KiB a line, 100 header lines and 10 s for a head."""
        settings = self.forwarder()
        self.assertEqual((settings.max_header_line, settings.max_headers, settings.header_timeout),
                         (16384, 100, 10.0))

    def test_values_read(self) -> None:
        """Given values are used; header_timeout takes decimals."""
        settings = self.forwarder("max_header_line = 8192\nmax_headers = 496\nheader_timeout = 0.5\n")
        self.assertEqual((settings.max_header_line, settings.max_headers, settings.header_timeout),
                         (8192, 496, 0.5))

    def test_ranges(self) -> None:
        """Out-of-range or mistyped values are one-line errors naming the key and the range."""
        for line, key, fragment in [
            ("max_header_line = 1023", "forwarder.max_header_line", "between 1024 and 32768, got 1023"),
            ("max_header_line = 65536", "forwarder.max_header_line", "between 1024 and 32768"),
            ("max_header_line = 4096.0", "forwarder.max_header_line", "expected an integer"),
            ("max_headers = 0", "forwarder.max_headers", "between 1 and 496, got 0"),
            ("max_headers = 497", "forwarder.max_headers", "between 1 and 496, got 497"),
            ("header_timeout = 0", "forwarder.header_timeout", "greater than 0, got 0"),
            ("header_timeout = 3601", "forwarder.header_timeout", "between 0 and 3600"),
            ('header_timeout = "10s"', "forwarder.header_timeout", "expected a number"),
        ]:
            self.assertFileKeyError(self.fails(self.forwarder, line + "\n"), key, fragment)

    def test_example_file_shows_the_defaults(self) -> None:
        """conf/forwarder.example.toml spells out the three keys with their default values."""
        from tests.test_config import CONF

        text = (CONF / "forwarder.example.toml").read_text()
        for line in ("max_header_line = 16384", "max_headers = 100", "header_timeout = 10.0"):
            self.assertIn("\n" + line + "\n", text)


class BodyReadSizeTests(TestCase):
    """EdgeChannel.read_body: frame-sized reads only while a big request body streams in."""

    def channel(self, transport: Any) -> EdgeChannel:
        chan = EdgeChannel(edge.Edge(EdgeLimits(), Clock(), lambda *args: None))
        chan.makeConnection(transport)
        return chan

    def test_raised_for_the_body_then_restored(self) -> None:
        """The transport reads UPLOAD_READ_SIZE (one frame's payload) at a time while a body
        is read, and its own bufferSize (also its write-pause threshold) again afterwards,
        however often either is asked."""
        transport = StringTransport()
        transport.bufferSize = 65536  # type: ignore[attr-defined]
        chan = self.channel(transport)
        chan.read_body(True)
        chan.read_body(True)
        self.assertEqual(transport.bufferSize, edge.UPLOAD_READ_SIZE)  # type: ignore[attr-defined]
        self.assertEqual(edge.UPLOAD_READ_SIZE, 256 * 1024 - 56)
        chan.read_body(False)
        chan.read_body(False)
        self.assertEqual(transport.bufferSize, 65536)  # type: ignore[attr-defined]
        chan.connectionLost()

    def test_transport_without_buffer_size(self) -> None:
        """A transport without bufferSize (TLS) is left as it is."""
        transport = StringTransport()
        chan = self.channel(transport)
        chan.read_body(True)
        self.assertFalse(hasattr(transport, "bufferSize"))
        chan.connectionLost()
