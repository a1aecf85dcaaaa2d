"""Tests for ``ppbridge.sampleapp``: the intranet service behind the demo, tests and bench.

The pattern helpers and ``PatternProducer`` are tested without sockets; every endpoint is
tested over real HTTP on 127.0.0.1 (treq with a pool closed at cleanup, or a raw TCP client
where the exact bytes matter). Time-driven endpoints run on a ``Clock`` where possible.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Generator
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request, Site

import ppbridge.sampleapp
from ppbridge.pattern import PatternProducer, pattern_bytes, pattern_sha256
from ppbridge.sampleapp import GZIP_BODY, SampleApp, make_site

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(ppbridge.sampleapp.__file__)))


def _reactor() -> Any:
    """The global reactor, imported late (pytest-twisted may install its own first)."""
    from twisted.internet import reactor

    return reactor


@inlineCallbacks
def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> Generator[Any, Any, None]:
    """Wait (polling every 5 ms of real time) until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(_reactor(), 0.005, lambda: None)


def _parse(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes, list[bytes]]:
    """Split a raw HTTP/1.1 response into status line, headers, body and header lines."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers.setdefault(name.lower(), []).append(value)
    return status, headers, body, lines


class _RawClient(Protocol):
    """Sends fixed request bytes and collects the response; ``wait_for`` a marker."""

    def __init__(self, request: bytes) -> None:
        self.request, self.data = request, b""
        self.closed: Deferred[bytes] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def wait_for(self, marker: bytes) -> Deferred[bytes]:
        """Fire with the data so far once ``marker`` has been received."""
        d: Deferred[bytes] = Deferred()
        self._waiting.append((marker, d))
        self._check()
        return d

    def _check(self) -> None:
        for marker, d in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, d))
                d.callback(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"connection closed; got {self.data[:300]!r}"))
        self._waiting = []
        self.closed.callback(self.data)


class _SlowReader(Protocol):
    """Reads a large response while counting and hashing its body; can stop reading."""

    def __init__(self, request: bytes) -> None:
        self.request, self.head, self.body_length = request, b"", 0
        self.digest = hashlib.sha256()
        self.first_body: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in self.head:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.head += b"\r\n\r\n"
        self.body_length += len(data)
        self.digest.update(data)
        if data and not self.first_body.called:
            self.first_body.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed.callback(None)


class _CountingProtocol(ProtocolWrapper):
    """Counts the bytes the server hands to the TCP transport."""

    def write(self, data: bytes) -> None:
        self.factory.sent += len(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self.factory.sent += sum(map(len, data))
        super().writeSequence(data)


class _ServerConnections(WrappingFactory):
    """Wraps the Site: counts bytes sent and can close every server connection."""

    protocol = _CountingProtocol

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.sent = 0

    @inlineCallbacks
    def close_all(self) -> Generator[Any, Any, None]:
        """Abort the server side of every connection and wait until all are gone."""
        for proto in list(self.protocols):
            proto.transport.abortConnection()
        yield _until(lambda: not self.protocols)


class _HTTPTestCase(unittest.TestCase):
    """Serves a fresh sample app on 127.0.0.1 for each test, with a treq client.

    ``clock`` is None for the real reactor, else a ``task.Clock`` the app schedules on.
    """

    use_clock = False

    @inlineCallbacks
    def setUp(self) -> Generator[Any, Any, None]:
        reactor = _reactor()
        self.clock: task.Clock | None = task.Clock() if self.use_clock else None
        site, self.app = make_site(cast("IReactorTime | None", self.clock))
        if self.clock is None:
            self.assertIs(self.app.clock, reactor)
        self.connections = _ServerConnections(site)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        port = yield endpoint.listen(self.connections)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.connections.close_all)
        self.port = port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.left: list[str] = []
        self.app.on_disconnect.append(self.left.append)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_disconnect(self) -> Deferred[str]:
        """Fire with the path of the next client disconnect the app records."""
        d: Deferred[str] = Deferred()

        def hook(path: str) -> None:
            self.app.on_disconnect.remove(hook)
            d.callback(path)

        self.app.on_disconnect.append(hook)
        return d

    @inlineCallbacks
    def raw(self, request: bytes, client: Protocol | None = None) -> Generator[Any, Any, Any]:
        """Connect a raw client (``_RawClient`` by default) that sends ``request``."""
        endpoint = TCP4ClientEndpoint(_reactor(), "127.0.0.1", self.port)
        proto = yield connectProtocol(endpoint, client or _RawClient(request))
        self.addCleanup(lambda: proto.closed)
        self.addCleanup(proto.transport.abortConnection)
        return proto


class PatternBytesTests(unittest.TestCase):
    """``pattern_bytes`` and ``pattern_sha256``."""

    def test_exact_length_and_chunking(self) -> None:
        """n bytes come in chunk-sized pieces, only the last one shorter."""
        pieces = list(pattern_bytes(5, 250_000, chunk=65536))
        self.assertEqual([len(p) for p in pieces], [65536, 65536, 65536, 53392])
        self.assertEqual(list(pattern_bytes(5, 0)), [])

    def test_same_stream_whatever_the_chunk(self) -> None:
        """The stream is the same for any chunk size, and shorter streams are prefixes."""
        whole = b"".join(pattern_bytes(9, 200_001))
        for chunk in (1, 7, 1000, 65535, 65536, 65537, 1 << 20):
            n = 200_001 if chunk > 100 else 70_000
            self.assertEqual(b"".join(pattern_bytes(9, n, chunk=chunk)), whole[:n], chunk)
        self.assertEqual(b"".join(pattern_bytes(9, 3)), whole[:3])

    def test_deterministic_per_seed(self) -> None:
        """Equal seeds give equal data, different seeds different data."""
        self.assertEqual(b"".join(pattern_bytes(1, 5000)), b"".join(pattern_bytes(1, 5000)))
        self.assertNotEqual(b"".join(pattern_bytes(1, 5000)), b"".join(pattern_bytes(2, 5000)))

    def test_sha256(self) -> None:
        """pattern_sha256 is the SHA-256 of the stream."""
        data = b"".join(pattern_bytes(4, 3_000_000))
        self.assertEqual(pattern_sha256(4, 3_000_000), hashlib.sha256(data).hexdigest())
        self.assertEqual(pattern_sha256(4, 0), hashlib.sha256(b"").hexdigest())

    def test_rejects_bad_arguments(self) -> None:
        """A negative length or a non-positive chunk is a ValueError."""
        self.assertRaises(ValueError, list, pattern_bytes(1, -1))
        self.assertRaises(ValueError, list, pattern_bytes(1, 10, chunk=0))


class _FakeRequest:
    """Records what a producer does to its request; can pause it after some writes."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.finished = False
        self.pause_after = pause_after

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.pause_after is not None and len(self.written) % self.pause_after == 0:
            self.producer.pauseProducing()

    def finish(self) -> None:
        self.finished = True


class PatternProducerTests(unittest.TestCase):
    """``PatternProducer`` against a fake request and a ``Clock`` (no sockets)."""

    def start(self, n: int, pause_after: int | None = None) -> tuple[_FakeRequest, task.Clock]:
        request, clock = _FakeRequest(pause_after), task.Clock()
        PatternProducer(cast(Request, request), 3, n, clock).start()
        return request, clock

    def test_yields_to_reactor_and_finishes(self) -> None:
        """It writes CHUNKS_PER_TURN chunks per reactor turn, then the whole stream, then
        unregisters and finishes."""
        turn = PatternProducer.CHUNKS_PER_TURN
        n = 65536 * turn * 2 + 10
        request, clock = self.start(n)
        self.assertTrue(request.streaming)
        self.assertEqual(len(request.written), turn)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.pump([0, 0, 0])
        self.assertEqual(b"".join(request.written), b"".join(pattern_bytes(3, n)))
        self.assertTrue(request.finished)
        self.assertIsNone(request.producer)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pause_and_resume(self) -> None:
        """Once paused it writes nothing and schedules nothing until resumed."""
        request, clock = self.start(65536 * 10, pause_after=3)
        self.assertEqual(len(request.written), 3)
        self.assertEqual(clock.getDelayedCalls(), [])
        producer = request.producer
        producer.resumeProducing()
        self.assertEqual(len(request.written), 6)
        producer.resumeProducing()
        producer.resumeProducing()
        producer.resumeProducing()
        self.assertEqual(b"".join(request.written), b"".join(pattern_bytes(3, 65536 * 10)))
        self.assertTrue(request.finished)

    def test_stop(self) -> None:
        """After stopProducing it writes nothing more, cancels its turn and never finishes."""
        request, clock = self.start(65536 * 100)
        producer = request.producer
        producer.stopProducing()
        self.assertEqual(clock.getDelayedCalls(), [])
        producer.resumeProducing()
        self.assertEqual(len(request.written), PatternProducer.CHUNKS_PER_TURN)
        self.assertFalse(request.finished)

    def test_empty(self) -> None:
        """n=0 finishes at once without writing."""
        request, clock = self.start(0)
        self.assertEqual((request.written, request.finished), ([], True))


class PageTests(_HTTPTestCase):
    """``/``: the friendly HTML page."""

    @inlineCallbacks
    def test_page_shows_request(self) -> Generator[Any, Any, None]:
        """The page greets, shows method and path, and the X-Forwarded-* values escaped."""
        response = yield self.http.post(
            self.url("/"),
            headers={
                "X-Forwarded-For": "<script>10.0.0.1",
                "X-Forwarded-Host": "public.example",
                "X-Forwarded-Proto": "https",
            },
        )
        body = (yield response.text()).replace("\n", " ")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        self.assertIn("Hello from the intranet", body)
        self.assertIn("ppbridge", body)
        self.assertIn("<td>POST</td>", body)
        self.assertIn("<td>/</td>", body)
        self.assertIn("<td>&lt;script&gt;10.0.0.1</td>", body)
        self.assertNotIn("<script>", body)
        self.assertIn("<td>public.example</td>", body)
        self.assertIn("<td>https</td>", body)

    @inlineCallbacks
    def test_page_without_forwarding_headers(self) -> Generator[Any, Any, None]:
        """Missing X-Forwarded-* headers are shown as "(none)"."""
        response = yield self.http.get(self.url("/"))
        body = yield response.text()
        self.assertEqual(body.count("<td>(none)</td>"), 3)


class EchoTests(_HTTPTestCase):
    """``/echo`` and ``/echo/...``."""

    @inlineCallbacks
    def test_echo_raw_request(self) -> Generator[Any, Any, None]:
        """It reports the method, the raw URI, every header line in order with repeats
        kept apart, and the body's digest and length."""
        proto = yield self.raw(
            b"PATCH /echo/deep/x?q=%41&a=b+c HTTP/1.1\r\nHost: h\r\nX-Rep: 1\r\n"
            b"X-Other: z\r\nX-Rep: 2\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        status, headers, body, _ = _parse((yield proto.closed))
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(
            json.loads(body),
            {
                "method": "PATCH",
                "uri": "/echo/deep/x?q=%41&a=b+c",
                "headers": [
                    ["Host", "h"],
                    ["X-Rep", "1"],
                    ["X-Rep", "2"],
                    ["X-Other", "z"],
                    ["Content-Length", "5"],
                    ["Connection", "close"],
                ],
                "body_sha256": hashlib.sha256(b"hello").hexdigest(),
                "body_length": 5,
            },
        )
        self.assertEqual(self.app.hits["/echo/deep/x"], 1)

    @inlineCallbacks
    def test_echo_uri_is_not_decoded(self) -> Generator[Any, Any, None]:
        """Percent-escapes and odd query forms come back exactly as sent; no body is
        length 0."""
        uri = b"/echo/%E9%2F/?a=%41&b=c+d&&e=&=f"
        proto = yield self.raw(b"GET %s HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % uri)
        echo = json.loads(_parse((yield proto.closed))[2])
        self.assertEqual((echo["method"], echo["uri"]), ("GET", uri.decode("ascii")))
        self.assertEqual(echo["body_length"], 0)
        self.assertEqual(echo["body_sha256"], hashlib.sha256(b"").hexdigest())
        self.assertEqual(self.app.hits["/echo/%E9%2F/"], 1)


class BytesTests(_HTTPTestCase):
    """``/bytes``: deterministic streamed data."""

    @inlineCallbacks
    def test_content_length(self) -> Generator[Any, Any, None]:
        """n pattern bytes for the seed, with Content-Length and an octet-stream type."""
        response = yield self.http.get(self.url("/bytes?n=3000017&seed=7"))
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, 3000017)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/octet-stream"])
        self.assertEqual(len(body), 3000017)
        self.assertEqual(hashlib.sha256(body).hexdigest(), pattern_sha256(7, 3000017))

    @inlineCallbacks
    def test_chunked(self) -> Generator[Any, Any, None]:
        """With chunked=1 the same bytes come chunked, without Content-Length."""
        proto = yield self.raw(
            b"GET /bytes?n=100&seed=7&chunked=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        _, headers, body, _ = _parse((yield proto.closed))
        self.assertEqual(headers[b"transfer-encoding"], [b"chunked"])
        self.assertNotIn(b"content-length", headers)
        response = yield self.http.get(self.url("/bytes?seed=7&chunked=1&n=1000003"))
        data = yield response.content()
        self.assertEqual(data, b"".join(pattern_bytes(7, 1000003)))
        self.assertEqual(response.length, UNKNOWN_LENGTH)

    @inlineCallbacks
    def test_empty_and_head(self) -> Generator[Any, Any, None]:
        """n=0 (the default) is an empty body; HEAD gets the length but no data."""
        response = yield self.http.get(self.url("/bytes"))
        self.assertEqual((yield response.content()), b"")
        self.assertEqual(response.length, 0)
        proto = yield self.raw(b"HEAD /bytes?n=1000 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        _, headers, body, _ = _parse((yield proto.closed))
        self.assertEqual((headers[b"content-length"], body), ([b"1000"], b""))

    @inlineCallbacks
    def test_bad_query(self) -> Generator[Any, Any, None]:
        """A malformed or too large n, or a bad seed, is a 400."""
        for query in ("n=abc", "n=-1", f"n={(1 << 30) + 1}", "n=1&seed=x", "n=1e3"):
            response = yield self.http.get(self.url(f"/bytes?{query}"))
            yield response.content()
            self.assertEqual(response.code, 400, query)

    @inlineCallbacks
    def test_backpressure(self) -> Generator[Any, Any, None]:
        """A client that stops reading stops the server from producing: the bytes handed
        to the transport stay far below n; once it reads again, it gets all the data."""
        n = 256 << 20
        reader = yield self.raw(
            b"", _SlowReader(b"GET /bytes?n=%d&seed=2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % n)
        )
        yield reader.first_body
        reader.transport.pauseProducing()
        history = [-1]

        def settled() -> bool:
            history.append(self.connections.sent)
            return len(history) > 40 and history[-40] == history[-1]

        yield _until(settled, timeout=30)
        self.assertLess(self.connections.sent, n // 4)
        reader.transport.resumeProducing()
        yield reader.closed
        self.assertEqual(reader.body_length, n)
        self.assertEqual(reader.digest.hexdigest(), pattern_sha256(2, n))

    @inlineCallbacks
    def test_client_leaves(self) -> Generator[Any, Any, None]:
        """A client that leaves mid-stream is counted, and the producer stops (trial
        would fail the test on a leftover timer)."""
        left = self.next_disconnect()
        reader = yield self.raw(b"", _SlowReader(b"GET /bytes?n=1073741824 HTTP/1.1\r\nHost: h\r\n\r\n"))
        yield reader.first_body
        reader.transport.loseConnection()
        self.assertEqual((yield left), "/bytes")
        self.assertEqual(self.app.disconnects, 1)


class UploadTests(_HTTPTestCase):
    """``/upload``."""

    @inlineCallbacks
    def test_post_and_put(self) -> Generator[Any, Any, None]:
        """POST and PUT bodies are answered with their SHA-256 and length as JSON."""
        data = b"".join(pattern_bytes(8, 3 << 20))
        for method in ("POST", "PUT"):
            response = yield self.http.request(method, self.url("/upload"), data=data)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            self.assertEqual(
                (yield response.json()),
                {"body_sha256": hashlib.sha256(data).hexdigest(), "body_length": len(data)},
            )

    @inlineCallbacks
    def test_other_methods(self) -> Generator[Any, Any, None]:
        """Other methods get 405 with an Allow header."""
        response = yield self.http.get(self.url("/upload"))
        yield response.content()
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST, PUT"])


class StatusTests(_HTTPTestCase):
    """``/status/CODE``."""

    @inlineCallbacks
    def test_codes(self) -> Generator[Any, Any, None]:
        """The code from the path is answered with X-Sample: yes and a short body."""
        cases = [(200, b"200 OK\n"), (418, b"418 I'm a teapot\n"), (503, b"503 Service Unavailable\n")]
        for code, body in cases:
            response = yield self.http.delete(self.url(f"/status/{code}"))
            self.assertEqual((response.code, (yield response.content())), (code, body))
            self.assertEqual(response.headers.getRawHeaders("x-sample"), ["yes"])

    @inlineCallbacks
    def test_no_body_codes(self) -> Generator[Any, Any, None]:
        """204 and 304 carry no body and no Content-Length."""
        for code in (204, 304):
            proto = yield self.raw(b"GET /status/%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % code)
            status, headers, body, _ = _parse((yield proto.closed))
            self.assertTrue(status.startswith(b"HTTP/1.1 %d " % code), status)
            self.assertEqual((body, headers[b"x-sample"]), (b"", [b"yes"]))
            self.assertNotIn(b"content-length", headers)

    @inlineCallbacks
    def test_bad_codes(self) -> Generator[Any, Any, None]:
        """Codes that are not three digits in 200..599 are a 400."""
        for text in ("abc", "99", "199", "600", "2000", "200/x", ""):
            response = yield self.http.get(self.url(f"/status/{text}"))
            yield response.content()
            self.assertEqual(response.code, 400, text)


class HeaderTests(_HTTPTestCase):
    """``/cookies``, ``/redirect`` and ``/gzip``."""

    @inlineCallbacks
    def test_cookies_on_the_wire(self) -> Generator[Any, Any, None]:
        """Two separate Set-Cookie lines, and X-MiXeD-Case spelled exactly so."""
        proto = yield self.raw(b"GET /cookies HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        status, headers, _, lines = _parse((yield proto.closed))
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"set-cookie"], [b"a=1; Path=/", b"b=2; Path=/"])
        self.assertIn(b"X-MiXeD-Case: v", lines)

    @inlineCallbacks
    def test_cookies_through_agent(self) -> Generator[Any, Any, None]:
        """An HTTP client sees both cookies and the mixed-case header."""
        response = yield self.http.get(self.url("/cookies"))
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders("set-cookie"), ["a=1; Path=/", "b=2; Path=/"])
        self.assertEqual(response.headers.getRawHeaders("x-mixed-case"), ["v"])

    @inlineCallbacks
    def test_redirect(self) -> Generator[Any, Any, None]:
        """/redirect is a 302 to /echo."""
        response = yield self.http.get(self.url("/redirect"), allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/echo"])

    @inlineCallbacks
    def test_gzip(self) -> Generator[Any, Any, None]:
        """/gzip sends GZIP_BODY, the fixed gzip of "hello gzip\\n", as Content-Encoding."""
        self.assertEqual(GZIP_BODY, gzip.compress(b"hello gzip\n", mtime=0))
        self.assertEqual(GZIP_BODY[4:8], b"\0\0\0\0")
        proto = yield self.raw(b"GET /gzip HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        _, headers, body, _ = _parse((yield proto.closed))
        self.assertEqual(headers[b"content-encoding"], [b"gzip"])
        self.assertEqual(body, GZIP_BODY)
        self.assertEqual(gzip.decompress(body), b"hello gzip\n")


class RealTimeTests(_HTTPTestCase):
    """``/sse`` and ``/slow`` on the real reactor, with short intervals."""

    @inlineCallbacks
    def test_sse(self) -> Generator[Any, Any, None]:
        """n events "data: i time" come interval apart as text/event-stream, then the
        response ends; it has no Content-Length."""
        response = yield self.http.get(self.url("/sse?n=3&interval=0.05"))
        body = (yield response.content()).decode("ascii")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertTrue(body.endswith("\n\n"))
        events = [e.split(" ") for e in body[:-2].split("\n\n")]
        self.assertEqual([e[:2] for e in events], [["data:", "0"], ["data:", "1"], ["data:", "2"]])
        times = [float(e[2]) for e in events]
        self.assertLess(abs(times[0] - time.time()), 60)
        self.assertGreater(times[1] - times[0], 0.03)
        self.assertGreater(times[2] - times[1], 0.03)

    @inlineCallbacks
    def test_slow(self) -> Generator[Any, Any, None]:
        """/slow answers "slow" after its delay."""
        started = time.monotonic()
        response = yield self.http.get(self.url("/slow?delay=0.1"))
        self.assertEqual((yield response.content()), b"slow\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.09)

    @inlineCallbacks
    def test_bad_query(self) -> Generator[Any, Any, None]:
        """Bad delay, interval or n values are a 400."""
        for path in ("/slow?delay=x", "/slow?delay=-1", "/slow?delay=nan", "/slow?delay=1e9",
                     "/sse?interval=inf", "/sse?n=-3"):
            response = yield self.http.get(self.url(path))
            yield response.content()
            self.assertEqual(response.code, 400, path)


class ClockTests(_HTTPTestCase):
    """``/sse``, ``/slow`` and ``/hang`` with the app on a ``Clock``: no real waiting."""

    use_clock = True

    @inlineCallbacks
    def test_sse_defaults(self) -> Generator[Any, Any, None]:
        """Without arguments /sse sends 10 events 0.1 s apart (clock time), then ends."""
        assert self.clock is not None
        response = yield self.http.get(self.url("/sse"))
        self.clock.pump([0.1] * 9)
        body = (yield response.content()).decode("ascii")
        self.assertEqual(body.count("data: "), 10)
        times = [float(line.split(" ")[2]) for line in body.split("\n\n") if line]
        self.assertEqual([round(t, 6) for t in times], [round(i * 0.1, 6) for i in range(10)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_sse_client_leaves(self) -> Generator[Any, Any, None]:
        """When the client leaves, the event loop stops and the disconnect is counted."""
        assert self.clock is not None
        left = self.next_disconnect()
        proto = yield self.raw(b"GET /sse?n=100&interval=5 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield proto.wait_for(b"data: 0 0.0\n\n")
        self.clock.advance(5)
        yield proto.wait_for(b"data: 1 5.0\n\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.transport.loseConnection()
        self.assertEqual((yield left), "/sse")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.app.disconnects, 1)

    @inlineCallbacks
    def test_slow_on_clock(self) -> Generator[Any, Any, None]:
        """The answer comes when the clock reaches the delay."""
        assert self.clock is not None
        d = self.http.get(self.url("/slow?delay=30"))
        yield _until(lambda: self.app.hits["/slow"] == 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [30.0])
        self.assertNoResult(d)
        self.clock.advance(30)
        response = yield d
        self.assertEqual((yield response.content()), b"slow\n")
        self.assertEqual(self.app.disconnects, 0)

    @inlineCallbacks
    def test_slow_client_leaves(self) -> Generator[Any, Any, None]:
        """/slow cancels its timer when the client leaves, and counts the disconnect."""
        assert self.clock is not None
        left = self.next_disconnect()
        proto = yield self.raw(b"GET /slow?delay=30 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield _until(lambda: self.app.hits["/slow"] == 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.transport.loseConnection()
        self.assertEqual((yield left), "/slow")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_hang(self) -> Generator[Any, Any, None]:
        """/hang never answers; a client that gives up is counted and the hooks run."""
        assert self.clock is not None
        left = self.next_disconnect()
        d = self.http.get(self.url("/hang?x=1"))
        yield _until(lambda: self.app.hits["/hang"] == 1)
        self.clock.advance(3600)
        self.assertNoResult(d)
        d.cancel()
        yield self.assertFailure(d, ResponseNeverReceived)
        self.assertEqual((yield left), "/hang")
        self.assertEqual((self.app.disconnects, self.left), (1, ["/hang"]))


class CounterTests(_HTTPTestCase):
    """``hits``, ``disconnects`` and 404s."""

    @inlineCallbacks
    def test_hits_per_path_without_query(self) -> Generator[Any, Any, None]:
        """hits counts requests per path, the query left off; finished requests are not
        disconnects."""
        for path in ("/echo?a=1", "/echo?b=2", "/", "/gzip", "/nope?z"):
            response = yield self.http.get(self.url(path))
            yield response.content()
        self.assertEqual(self.app.hits, {"/echo": 2, "/": 1, "/gzip": 1, "/nope": 1})
        self.assertEqual((self.app.disconnects, self.left), (0, []))

    @inlineCallbacks
    def test_not_found(self) -> Generator[Any, Any, None]:
        """Paths are matched exactly; anything else is a 404."""
        for path in ("/nope", "/echox", "/bytes/1", "/status", "/index.html", "/gzip/"):
            response = yield self.http.get(self.url(path))
            yield response.content()
            self.assertEqual(response.code, 404, path)

    @inlineCallbacks
    def test_failing_hook_is_logged(self) -> Generator[Any, Any, None]:
        """A hook that raises is logged and the hooks after it still run."""
        def failing(path: str) -> None:
            raise ZeroDivisionError(path)

        self.app.on_disconnect.insert(0, failing)
        left = self.next_disconnect()
        d = self.http.get(self.url("/hang"))
        yield _until(lambda: self.app.hits["/hang"] == 1)
        d.cancel()
        yield self.assertFailure(d, ResponseNeverReceived)
        self.assertEqual((yield left), "/hang")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class _Output(ProcessProtocol):
    """Collects a child's output; ``ended`` fires with the exit reason."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[Exception] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(cast(Exception, reason.value))


class MainTests(_HTTPTestCase):
    """``python -m ppbridge.sampleapp``."""

    def test_make_site_default_clock(self) -> None:
        """make_site() without a clock schedules on the global reactor."""
        site, app = make_site()
        self.assertIsInstance(app, SampleApp)
        self.assertIs(site.resource, app)
        self.assertIs(app.clock, _reactor())

    @inlineCallbacks
    def test_main_serves(self) -> Generator[Any, Any, None]:
        """The module run as a program serves the app on 127.0.0.1:PORT until TERM."""
        reactor = _reactor()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        child = _Output()
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "ppbridge.sampleapp", "--port", str(port)],
            env=dict(os.environ), path=_REPO,
        )
        self.addCleanup(lambda: child.ended)
        self.addCleanup(lambda: process.pid and process.signalProcess("KILL"))
        yield _until(lambda: b"Site starting on" in child.output, timeout=30)
        response = yield self.http.get(f"http://127.0.0.1:{port}/status/201")
        self.assertEqual((response.code, (yield response.content())), (201, b"201 Created\n"))
        process.signalProcess("TERM")
        reason = yield child.ended
        self.assertIsInstance(reason, ProcessDone)
        self.assertIn(b"Main loop terminated", child.output)
