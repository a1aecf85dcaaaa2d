"""When the proxy's call for one request is over: once the response's END went out and the
request body ended, whichever event sends that END. A call that is not taken out of
``ProxyService.calls`` then keeps a stopping proxy draining (``draining N requests``) for
calls the forwarder finished long ago.

On a Clock, with the real ProxyService and UpstreamCall, a forwarder on the in-memory bus and
an upstream whose response the test delivers piece by piece.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ppbridge.proxy import ProxyService
from ppbridge.streams import COALESCE
from ppbridge.upstream import UpstreamCall
from ppbridge.wire import FLAG_END, OVERHEAD, MsgType, RequestHead, encode_window, unpack_header
from tests.test_negotiation import Bridge, proxy_settings

STREAM = b"\x07" * 16


@implementer(IPushProducer)
class UpstreamConnection:
    """The upstream's side of a response body, as the proxy sees it (pause, resume, stop)."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Response:
    """An IResponse whose body the test delivers: ``body(data)``, then ``end()``."""

    version = (b"HTTP", 1, 1)
    code = 200
    phrase = b"OK"

    def __init__(self, length: int) -> None:
        self.length = length
        self.headers = Headers({b"Content-Type": [b"application/octet-stream"]})
        self.connection = UpstreamConnection()
        self.receiver: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.receiver = protocol
        protocol.makeConnection(self.connection)  # type: ignore[arg-type]

    def body(self, data: bytes) -> None:
        if self.receiver is None:
            raise RuntimeError("the proxy has not asked for the body")
        self.receiver.dataReceived(data)

    def end(self) -> None:
        if self.receiver is None:
            raise RuntimeError("the proxy has not asked for the body")
        self.receiver.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class OneAnswerAgent:
    """An upstream that answers each request when the test calls ``answer``."""

    def __init__(self) -> None:
        self.requests: list[Deferred[Any]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append(d)
        return d

    def answer(self, response: Response) -> None:
        if len(self.requests) != 1:
            raise RuntimeError(f"{len(self.requests)} upstream requests, expected one")
        self.requests[0].callback(response)


class ResponseEnd(TestCase):
    """A download whose last frame waits for credit, then for the coalescing timer."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)
        self.forwarder = self.bridge.forwarder()
        self.agent = OneAnswerAgent()
        self.proxy = ProxyService(replace(proxy_settings(), stream_idle_timeout=300.0), self.bridge.broker.client(),
                                  self.bridge.clock, reactor=self.bridge.clock, agent=self.agent)
        self.proxy.startService()
        self.addCleanup(lambda: self.proxy.stopService() if self.proxy.running else None)
        [self.entry] = self.forwarder.candidates("alpha")
        self.frames: list[tuple[MsgType, int, bool]] = []  # what the proxy sent on the stream
        self.bridge.broker.drop = self.tap

    def tap(self, channel: bytes, data: bytes) -> bool:
        """Keep (type, payload size, END) of each message of the proxy on our reply channel,
        delivered to nobody (the forwarder has no stream of that id)."""
        if channel != self.forwarder.reply_channel:
            return False
        header = unpack_header(data)
        self.frames.append((header.type, len(data) - OVERHEAD, header.end))
        return True

    def send(self, mtype: MsgType, payload: bytes, flags: int = 0) -> None:
        self.forwarder.node.send(self.entry, self.forwarder.data_channel(self.entry), mtype, STREAM, 0, payload,
                                 flags)

    def test_call_ends_when_the_coalescing_timer_sends_the_last_frame(self) -> None:
        """A 200 of the forwarder's window + 1000 bytes: the window's worth goes out, the
        upstream ends with 1000 bytes still waiting for credit; a WINDOW gives credit, and the
        1000 bytes (a partial frame) go out with END on the coalescing timer, COALESCE s
        later. Asserts that the call is still open just before the timer, and that once the
        END frame went out the call is gone from ``proxy.calls`` and the active-streams gauge
        is back to 0 (so a stopping proxy has nothing to drain), with no RESET sent."""
        clock = self.bridge.clock
        window = self.proxy.peer_window(self.forwarder.id)
        head = RequestHead(b"GET", b"/big.bin", [(b"Host", b"public.example")], self.forwarder.reply_channel,
                           None, deadline_ms=int((clock.seconds() + 30) * 1000))
        self.send(MsgType.REQ_HEAD, head.encode(), FLAG_END)
        response = Response(window + 1000)
        self.agent.answer(response)
        response.body(b"x" * (window + 1000))
        response.end()
        sent = sum(size for mtype, size, _ in self.frames if mtype is MsgType.RESP_DATA)
        if sent != window:
            raise AssertionError(f"{sent} bytes sent before credit ran out (expected {window})")
        if len(self.proxy.calls) != 1:
            raise AssertionError("the call ended before its last 1000 bytes were sent")

        self.send(MsgType.WINDOW, encode_window(window // 2))
        clock.advance(COALESCE / 2)
        if len(self.proxy.calls) != 1 or self.frames[-1][2]:
            raise AssertionError("the last frame went out before the coalescing timer")
        clock.advance(COALESCE)
        last_type, last_size, last_end = self.frames[-1]
        if (last_type, last_size, last_end) != (MsgType.RESP_DATA, 1000, True):
            raise AssertionError(f"last frame {self.frames[-1]}, expected RESP_DATA of 1000 bytes with END")
        self.assertEqual(self.proxy.calls, {}, "the call outlived its response's END")
        self.assertEqual(self.proxy.metrics.registry.get_sample_value("ppbridge_active_streams"), 0)
        self.assertNotIn(MsgType.RESET, [mtype for mtype, _, _ in self.frames])


class BodyProtocol(TestCase):
    def test_a_subclass_override_is_what_the_body_calls(self) -> None:
        """A subclass of UpstreamCall that overrides body_started, body_data and body_end has
        its overrides called through IProtocol's makeConnection, dataReceived and
        connectionLost (the names Response.deliverBody uses), and UpstreamCall's own aliases
        still name its own methods."""
        seen: list[object] = []

        class Watching(UpstreamCall):
            def body_started(self, transport: Any) -> None:
                seen.append(("started", transport))

            def body_data(self, data: bytes) -> None:
                seen.append(("data", data))

            def body_end(self, reason: Failure) -> None:
                seen.append(("end", reason.type))

        call = Watching.__new__(Watching)  # only the protocol's three calls are made
        call.makeConnection("transport")
        call.dataReceived(b"x")
        call.connectionLost(Failure(ResponseDone()))
        self.assertEqual(seen, [("started", "transport"), ("data", b"x"), ("end", ResponseDone)])
        self.assertEqual((UpstreamCall.makeConnection, UpstreamCall.dataReceived, UpstreamCall.connectionLost),
                         (UpstreamCall.body_started, UpstreamCall.body_data, UpstreamCall.body_end))
