"""The proxy's timeouts for one upstream call, on a Clock: the wait for the upstream's
response head (upstream_timeout, or the request's deadline when that comes first), and the
stream's idle timeout (stream_idle_timeout), each ending the call with its own RESET; and a
bug of ours while handling the answer."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ppbridge import upstream
from ppbridge.errors import CANCEL_CODE, GatewayTimeout, ProtocolFailure, RequestError, UpstreamTimeout, reset_code
from ppbridge.proxy import ProxyService
from ppbridge.wire import FLAG_END, MsgType, RequestHead, Role, decode_reset, encode_reset, unpack_header
from tests.test_negotiation import Bridge, proxy_settings

STREAM = b"\x05" * 16


@implementer(IAgent)
class HangingAgent:
    """An upstream that never answers; it records each request and whether it was cancelled."""

    def __init__(self) -> None:
        self.requests: list[Deferred[Any]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self._cancel())
        self.requests.append(d)
        return d

    def _cancel(self) -> None:
        self.cancelled += 1


class _ProxyOnClock(TestCase):
    """A proxy on a Clock whose upstream answers only when a test says so; the RESETs it sends."""

    def start(self, **settings: Any) -> None:
        self.bridge = Bridge(self)
        self.forwarder = self.bridge.forwarder()
        self.agent = HangingAgent()
        self.proxy = ProxyService(replace(proxy_settings(), **settings), self.bridge.broker.client(),
                                  self.bridge.clock, reactor=self.bridge.clock, agent=self.agent)
        self.proxy.startService()
        self.addCleanup(lambda: self.proxy.stopService() if self.proxy.running else None)
        [self.entry] = self.forwarder.candidates("alpha")
        self.resets: list[tuple[float, int, str]] = []
        self.bridge.broker.drop = self.tap

    def tap(self, channel: bytes, data: bytes) -> bool:
        """Keep every RESET the proxy publishes (opened with the forwarder's key) with its time."""
        if len(data) < 2 or data[1] != MsgType.RESET:
            return False
        header = unpack_header(data)
        if header.sender is not Role.PROXY:
            return False  # a RESET of the forwarder's (a test cancelling a call)
        code, message = decode_reset(self.entry.session.envelope.open(header, data, channel))
        self.resets.append((self.bridge.clock.seconds() - self.sent_at, code, message))
        return True

    def send(self, mtype: MsgType, payload: bytes, flags: int = 0, seq: int = 0) -> None:
        self.forwarder.node.send(self.entry, self.forwarder.data_channel(self.entry), mtype, STREAM, seq, payload,
                                 flags)

    def send_head(self, deadline_in: float, end: bool = True) -> None:
        """A GET whose deadline is ``deadline_in`` seconds ahead, its body ended with it (or not)."""
        self.sent_at = self.bridge.clock.seconds()
        head = RequestHead(b"GET", b"/slow", [(b"Host", b"public.example")],
                           self.forwarder.channels.reply(self.forwarder.id), None,
                           deadline_ms=int((self.sent_at + deadline_in) * 1000))
        self.send(MsgType.REQ_HEAD, head.encode(), FLAG_END if end else 0)

    def advance_to(self, seconds: float) -> None:
        """Move the clock to ``seconds`` after the head was sent."""
        self.bridge.clock.advance(self.sent_at + seconds - self.bridge.clock.seconds())


class UpstreamCallTimeouts(_ProxyOnClock):
    """An upstream that never answers: what the forwarder is told, and when."""

    def test_upstream_timeout(self) -> None:
        """upstream_timeout 5 s, deadline 30 s: nothing at 4.9 s; at 5 s one RESET
        upstream-timeout, the upstream request cancelled and the call gone."""
        self.start(upstream_timeout=5.0)
        self.send_head(30.0)
        self.advance_to(4.9)
        self.assertEqual((self.resets, self.agent.cancelled), ([], 0))
        self.advance_to(5.0)
        self.assertEqual([(r[0], r[1]) for r in self.resets], [(5.0, reset_code(UpstreamTimeout))])
        self.assertEqual((self.agent.cancelled, self.proxy.calls), (1, {}))

    def test_deadline_before_upstream_timeout(self) -> None:
        """upstream_timeout 60 s, a request whose deadline is 3 s ahead (body complete): the
        wait ends at the deadline with a RESET gateway-timeout ("before the deadline")."""
        self.start(upstream_timeout=60.0)
        self.send_head(3.0)
        self.advance_to(2.9)
        self.assertEqual(self.resets, [])
        self.advance_to(3.0)
        [(when, code, message)] = self.resets
        self.assertEqual((when, code), (3.0, reset_code(GatewayTimeout)))
        self.assertIn("before the deadline", message)
        self.assertEqual(self.agent.cancelled, 1)

    def test_deadline_ignored_while_the_body_streams(self) -> None:
        """A request whose body has not ended is not bound by its deadline (3 s) but by
        upstream_timeout (8 s), with forwarder traffic keeping it from idling (idle 5 s)."""
        self.start(upstream_timeout=8.0, stream_idle_timeout=5.0)
        self.send_head(3.0, end=False)
        self.advance_to(4.0)
        self.send(MsgType.REQ_DATA, b"x", seq=1)  # progress at 4 s: idle until 9 s
        self.advance_to(7.9)
        self.assertEqual(self.resets, [])
        self.advance_to(8.0)
        self.assertEqual([(r[0], r[1]) for r in self.resets], [(8.0, reset_code(UpstreamTimeout))])

    def test_idle_before_upstream_timeout(self) -> None:
        """stream_idle_timeout 2 s, upstream_timeout 60 s: a call with no traffic either way is
        reset at 2 s as stalled (upstream-timeout, "stalled"), the upstream request cancelled."""
        self.start(upstream_timeout=60.0, stream_idle_timeout=2.0)
        self.send_head(30.0)
        self.advance_to(1.9)
        self.assertEqual(self.resets, [])
        self.advance_to(2.0)
        [(when, code, message)] = self.resets
        self.assertEqual((when, code), (2.0, reset_code(UpstreamTimeout)))
        self.assertIn("stalled", message)
        self.assertEqual((self.agent.cancelled, self.proxy.calls), (1, {}))

    def test_idle_pushed_back_by_forwarder_messages(self) -> None:
        """stream_idle_timeout 2 s: REQ_DATA frames at 1.5 and 3 s push the idle timeout to
        5 s; upstream_timeout 4.5 s then comes first."""
        self.start(upstream_timeout=4.5, stream_idle_timeout=2.0)
        self.send_head(30.0, end=False)
        for seq, at in ((1, 1.5), (2, 3.0)):
            self.advance_to(at)
            self.send(MsgType.REQ_DATA, b"x", seq=seq)
        self.advance_to(4.4)
        self.assertEqual(self.resets, [])
        self.advance_to(4.5)
        [(when, code, message)] = self.resets
        self.assertEqual((when, code), (4.5, reset_code(UpstreamTimeout)))
        self.assertNotIn("stalled", message)

    def test_idle_after_upstream_timeout_pushed_back(self) -> None:
        """stream_idle_timeout 2 s, upstream_timeout 3 s: a frame at 1.5 s moves the idle
        timeout to 3.5 s, after the headers wait, which ends the call at 3 s; nothing else
        comes after it."""
        self.start(upstream_timeout=3.0, stream_idle_timeout=2.0)
        self.send_head(30.0, end=False)
        self.advance_to(1.5)
        self.send(MsgType.REQ_DATA, b"x", seq=1)
        self.advance_to(2.9)
        self.assertEqual(self.resets, [])
        self.advance_to(3.0)
        self.advance_to(10.0)
        [(when, code, message)] = self.resets
        self.assertEqual((when, code), (3.0, reset_code(UpstreamTimeout)))
        self.assertNotIn("stalled", message)


class AnswerHandlingBug(_ProxyOnClock):
    """An error of ours while handling the upstream's answer still ends the call properly."""

    def test_bug_answering_is_reset_internal_error(self) -> None:
        """An answer the call cannot handle (here an object without a response's attributes)
        gets one RESET internal-error (code 5), the traceback logged, and the call over."""
        self.start()
        self.send_head(30.0)
        self.agent.requests[0].callback(object())
        self.assertEqual([(r[0], r[1]) for r in self.resets], [(0.0, reset_code(RequestError))])
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.proxy.calls, {})


class WholeRequest(_ProxyOnClock):
    """A request whose head came with END and no body (most GETs): no flow control is made
    for it, and its timers' reactor call serves the next call."""

    def test_no_inbound_and_data_after_it_is_refused(self) -> None:
        """No Inbound is made for a whole GET; a REQ_DATA frame for it afterwards is dropped
        as stream-closed (as the Inbound of an ended body would), the upstream request
        cancelled and the forwarder sent a RESET protocol-failure."""
        made: list[object] = []
        original = upstream.Inbound
        self.patch(upstream, "Inbound", lambda *args: made.append(args) or original(*args))
        self.start()
        self.send_head(30.0)
        self.assertEqual((made, len(self.agent.requests)), ([], 1))
        self.send(MsgType.REQ_DATA, b"x", FLAG_END, seq=1)
        self.assertEqual(len(made), 1)
        self.assertEqual(self.proxy.metrics.registry.get_sample_value(
            "ppbridge_bus_dropped_total", {"reason": "stream-closed"}), 1.0)
        self.assertEqual([r[1] for r in self.resets], [reset_code(ProtocolFailure)])
        self.assertEqual((self.agent.cancelled, self.proxy.calls), (1, {}))

    def test_a_cancelled_calls_reactor_call_serves_the_next_until_stop(self) -> None:
        """A call the forwarder cancels gives its timers' reactor call back: the next call's
        timers use that same delayed call (no new one), which expires for the new call
        only (one RESET, at its upstream_timeout); stopping the proxy cancels the reactor
        call of the call then in flight."""
        self.start(upstream_timeout=5.0)
        before = set(self.bridge.clock.getDelayedCalls())
        self.send_head(30.0)
        [timer] = set(self.bridge.clock.getDelayedCalls()) - before
        self.send(MsgType.RESET, encode_reset(CANCEL_CODE))
        self.assertEqual(self.proxy.calls, {})
        self.patch(sys.modules[__name__], "STREAM", b"\x06" * 16)
        self.send_head(30.0)
        self.assertEqual(set(self.bridge.clock.getDelayedCalls()) - before, {timer})
        self.advance_to(5.0)
        self.assertEqual([(r[0], r[1]) for r in self.resets], [(5.0, reset_code(UpstreamTimeout))])
        self.patch(sys.modules[__name__], "STREAM", b"\x07" * 16)
        before = set(self.bridge.clock.getDelayedCalls())
        self.send_head(30.0)
        [last] = set(self.bridge.clock.getDelayedCalls()) - before
        self.proxy.stopService()
        self.assertFalse(last.active())
