"""Graceful drain on SIGTERM: the installed ``twistd -n ppforwarder`` / ``twistd -n ppproxy``
as child processes (see tests/processes.py and tests/test_faults.py's ChildBridge).

A forwarder told to stop closes its listening port at once, answers the requests in flight,
then exits. A proxy told to stop tells the forwarders it is leaving (a CONFIRM with the
LEAVING stream id, PROTOCOL.md §3.1), answers its calls in flight, then exits; the forwarder
sends new requests to the other instance, so no request fails.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ppbridge.config import RekeySettings
from ppbridge.forwarder import ForwarderService
from ppbridge.keyring import KeyEntry
from ppbridge.negotiation import proxy_peer
from ppbridge.proxy import ProxyService
from ppbridge.webface import BridgeSite
from ppbridge.wire import LEAVING, KeyGrant, KeyRequest, MsgType, decode_signed, unpack_header
from tests.processes import Child, refuses_connections
from tests.support import Client, poll, sequential_load
from tests.test_faults import CONFIRMED, REQUEST_LIMIT, ChildBridge, assert_clean, elapsed_since
from tests.test_negotiation import CHANNELS, Bridge, forwarder_settings, proxy_settings

DRAIN = 20.0  # drain_timeout in these tests: far more than the requests in flight need
SLOW = 3.0  # seconds the upstream takes for the request in flight
EXIT_BOUND = DRAIN + 10.0  # a draining process is gone by then (generous: it needs SLOW)
NOTHING_TO_DRAIN = 10.0  # a proxy with no call in flight is gone by then (drain_timeout is 30 s)
# Rekeying while draining (unit tests): keys live 4 s and rotate every 2 s; the call takes 12 s.
SHORT_KEYS = RekeySettings(period=2.0, max_key_age=4.0)
LONG_CALL = 12.0
SLOW_ANSWER = b"slow answer\n"


def confirmed_instances(bridge: ChildBridge) -> set[str]:
    """The proxy instances the forwarder child has logged as confirmed."""
    assert bridge.forwarder is not None
    return {m.group(1) for m in map(re.compile(CONFIRMED).search, bridge.forwarder.lines[1]) if m}


def assert_stopped(case: TestCase, child: Child) -> None:
    """``child`` ended as twistd ends on SIGTERM once its services have stopped: it re-raises
    the signal (exit by SIGTERM, no exit status)."""
    case.assertEqual((child.exit_code, child.exit_signal), (None, signal.SIGTERM), child.describe())


class ForwarderDrain(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_sigterm_refuses_new_connections_and_finishes_requests_in_flight(self):
        """A GET /slow (3 s) is in flight when the forwarder child gets SIGTERM (drain_timeout
        20 s): its port refuses new connections at once, the slow request is still answered
        200 with the upstream's body, the forwarder logs "draining 1 requests" and "drained",
        and exits (as twistd does on SIGTERM, no traceback) well within drain_timeout."""
        bridge = yield ChildBridge(self, forwarder={"drain_timeout": DRAIN}).start()
        client = Client(self)
        slow = client.fetch(b"GET", f"{bridge.url}/slow?delay={SLOW}").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: bridge.app.hits["/slow"] == 1, 10, "the /slow request reaching the upstream")
        signalled = reactor.seconds()
        bridge.forwarder.signal("TERM")
        yield bridge.forwarder.wait_for(r"draining 1 requests \(up to 20(\.0)? s\)", timeout=10)
        self.assertTrue(refuses_connections(bridge.port), "the forwarder still accepts connections while draining")

        response, body = yield slow
        self.assertEqual((response.code, body), (200, b"slow\n"))
        yield bridge.forwarder.wait_for(r"\bdrained\b", timeout=10)
        yield bridge.forwarder.wait_end(EXIT_BOUND)
        took = elapsed_since(signalled)
        self.assertLess(took, EXIT_BOUND, f"the forwarder took {took:.1f} s to exit")
        assert_stopped(self, bridge.forwarder)
        assert_clean(self, bridge.forwarder)

    @defer.inlineCallbacks
    def test_drain_timeout_zero_stops_at_once(self):
        """With drain_timeout 0, SIGTERM ends the request in flight at once as before (503
        proxy-unavailable, "the forwarder is shutting down"): the process does not wait for
        the upstream's 3 s."""
        bridge = yield ChildBridge(self, forwarder={"drain_timeout": 0}).start()
        client = Client(self)
        slow = client.fetch(b"GET", f"{bridge.url}/slow?delay={SLOW * 10}").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: bridge.app.hits["/slow"] == 1, 10, "the /slow request reaching the upstream")
        bridge.forwarder.signal("TERM")
        response, body = yield slow
        self.assertEqual(response.code, 503)
        self.assertIn(b"the forwarder is shutting down", body)
        yield bridge.forwarder.wait_end(EXIT_BOUND)
        self.assertNotIn("draining", bridge.forwarder.text())
        assert_clean(self, bridge.forwarder)


class ProxyDrain(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_sigterm_to_one_of_two_proxies_fails_no_request(self):
        """Two proxy children serve alpha: two GET /slow (3 s) in a row (round robin: one on each
        instance), then steady load (GET /echo one after the other). One proxy gets SIGTERM: it
        logs "draining N requests" (its slow one, perhaps an /echo), the forwarder logs that the
        instance is leaving, the slow requests and every request of the load are answered 200
        (the forwarder sends nothing new to the draining instance and that one finishes its
        call); the proxy logs "drained" and exits as twistd does on SIGTERM, no traceback on
        any side."""
        bridge = yield ChildBridge(self, forwarder={"drain_timeout": DRAIN}).start()
        first = bridge.proxy
        second = bridge.spawn_proxy()
        yield poll(lambda: len(confirmed_instances(bridge)) == 2, 30, "both proxy instances confirmed")
        client = Client(self)
        # Two in a row, before the load starts: round robin puts one on each instance.
        slow = [client.fetch(b"GET", f"{bridge.url}/slow?delay={SLOW}&i={i}").addTimeout(REQUEST_LIMIT, reactor)
                for i in range(2)]
        yield poll(lambda: bridge.app.hits["/slow"] == 2, 10, "both /slow requests reaching the upstream")
        running, codes = [True], []
        load = sequential_load(client, f"{bridge.url}/echo", running, codes)
        self.addCleanup(lambda: running.__setitem__(0, False) or load)

        signalled = reactor.seconds()
        first.signal("TERM")
        yield first.wait_for(r"draining [12] requests", timeout=10)  # its slow one, and perhaps an /echo
        yield bridge.forwarder.wait_for(r"proxy instance alpha:[0-9a-f]+ is leaving", timeout=10)
        answers = yield defer.gatherResults(slow)
        self.assertEqual([(r.code, body) for r, body in answers], [(200, b"slow\n")] * 2)
        yield first.wait_for(r"\bdrained\b", timeout=10)
        yield first.wait_end(EXIT_BOUND)
        self.assertLess(elapsed_since(signalled), EXIT_BOUND)
        assert_stopped(self, first)

        served = len(codes)  # and after it is gone, the load still goes to the other instance
        yield poll(lambda: len(codes) >= served + 20, 30, "requests served after the proxy exited")
        running[0] = False
        yield load
        self.assertGreater(len(codes), 40)
        self.assertEqual([c for c in codes if c != 200], [], "some requests failed")
        for child in (first, second, bridge.forwarder):
            assert_clean(self, child)

    @defer.inlineCallbacks
    def test_sigterm_after_finished_downloads_has_nothing_to_drain(self):
        """Thirty downloads of 4 MiB + 1000 bytes (several credit windows each, ending in a
        partial frame) through the twistd children, each read whole (200, that many bytes); then
        SIGTERM to the proxy: it logs no "draining" line (every call ended with its response:
        before the fix, a call whose last frame went out on the coalescing timer stayed open
        until stream_idle_timeout) and exits as twistd does on SIGTERM within NOTHING_TO_DRAIN
        seconds, no traceback on either side."""
        bridge = yield ChildBridge(self).start()
        proxy = bridge.proxy
        client = Client(self)
        size = 4 * 1024 * 1024 + 1000
        for i in range(30):
            response, _, n = yield client.digest(f"{bridge.url}/bytes?n={size}&seed={i}")
            self.assertEqual((response.code, n), (200, size), bridge.describe())
        signalled = reactor.seconds()
        proxy.signal("TERM")
        yield proxy.wait_end(NOTHING_TO_DRAIN)
        self.assertLess(elapsed_since(signalled), NOTHING_TO_DRAIN)
        self.assertNotIn("draining", proxy.text(), proxy.describe())
        assert_stopped(self, proxy)
        for child in (proxy, bridge.forwarder):
            assert_clean(self, child)


class FakeStream:
    """A request in flight on the forwarder, as far as draining sees it."""

    peer = b"alpha:00"

    def __init__(self, streams: dict[bytes, Any]) -> None:
        self.ended = False
        self.streams = streams
        streams[b"s" * 16] = self

    def shutdown(self) -> None:
        """As ClientStream.shutdown: answered or aborted, and gone from the forwarder's streams."""
        self.ended = True
        del self.streams[b"s" * 16]


class DrainUnits(TestCase):
    """The drain logic on a Clock and the in-memory bus (no process, no socket)."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)

    def forwarder_with_listener(self, drain: float) -> tuple[Any, Any]:
        forwarder = self.bridge.forwarder(forwarder_settings(drain_timeout=drain))
        listener = Service()
        listener.setServiceParent(forwarder)
        listener.startService()
        forwarder.listeners.append(listener)
        return forwarder, listener

    def test_forwarder_closes_listeners_then_waits_for_streams(self) -> None:
        """stopService stops the listening services at once, waits while a stream is in flight
        (the bus and timers keep running: not ready, still live), and finishes as soon as the
        stream is gone, without ending it."""
        forwarder, listener = self.forwarder_with_listener(10.0)
        stream = FakeStream(forwarder.streams)
        stopping = forwarder.stopService()
        self.assertFalse(listener.running)
        self.assertNotIn(listener, list(forwarder))
        self.bridge.clock.advance(5)
        self.assertNoResult(stopping)
        self.assertTrue(forwarder.live())
        self.assertFalse(forwarder.ready())
        del forwarder.streams[b"s" * 16]
        self.bridge.clock.advance(0.1)
        self.successResultOf(stopping)
        self.assertFalse(stream.ended)
        self.assertFalse(forwarder.live())

    def test_forwarder_ends_streams_past_drain_timeout(self) -> None:
        """A stream still in flight after drain_timeout is ended as stopService always did."""
        forwarder, _ = self.forwarder_with_listener(2.0)
        stream = FakeStream(forwarder.streams)
        stopping = forwarder.stopService()
        self.bridge.clock.advance(1.9)
        self.assertNoResult(stopping)
        self.bridge.clock.advance(0.2)
        self.successResultOf(stopping)
        self.assertTrue(stream.ended)

    def test_proxy_leaving_is_routed_around_and_keeps_its_keys(self) -> None:
        """Of two instances of alpha, one stops (drain_timeout 5, no call in flight): it sends
        the forwarder a CONFIRM with stream id LEAVING on its control channel and is done at
        once; the forwarder routes only to the other instance, keeps the leaving one's key,
        announces nothing because of it, and does not route to it again later."""

        forwarder = self.bridge.forwarder()
        leaving = self.bridge.proxy(proxy_settings(drain_timeout=5.0))
        staying = self.bridge.proxy()
        self.bridge.advance(2)
        self.assertEqual(len(forwarder.candidates("alpha")), 2)
        control = CHANNELS.forwarder_control(forwarder.id)
        before = (len(self.bridge.published(MsgType.CONFIRM, control)),
                  len(self.bridge.published(MsgType.ANNOUNCE)))
        self.successResultOf(leaving.stopService())
        confirms = self.bridge.published(MsgType.CONFIRM, control)[before[0]:]
        self.assertEqual([unpack_header(m).stream_id for _, m in confirms], [LEAVING])
        self.assertEqual(len(self.bridge.published(MsgType.ANNOUNCE)), before[1])
        peer = proxy_peer("alpha", leaving.instance)
        self.assertEqual(forwarder.instances["alpha"], [proxy_peer("alpha", staying.instance)])
        self.assertIsNotNone(forwarder.keyring.current(peer))
        self.bridge.advance(20)
        self.assertEqual([e.session.instance for e in forwarder.candidates("alpha")], [staying.instance])


class SlowIntranet(Resource):
    """The proxy's upstream: answers each GET ``delay`` seconds later on ``clock``."""

    isLeaf = True

    def __init__(self, clock: Clock, delay: float) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> Any:
        self.paths.append(request.path)

        def answer() -> None:
            request.setHeader(b"content-length", b"%d" % len(SLOW_ANSWER))
            request.write(SLOW_ANSWER)
            request.finish()

        self.clock.callLater(self.delay, answer)
        return NOT_DONE_YET


def client_get(forwarder: ForwarderService, clock: Clock, path: bytes) -> StringTransport:
    """A client connection to the forwarder's site (no socket) that has sent ``GET path``;
    the transport collects what the forwarder answers."""
    site = BridgeSite(forwarder)
    site.reactor = clock  # the connection's timers on the test's clock
    client = IPv4Address("TCP", "203.0.113.7", 40000)
    protocol = site.buildProtocol(client)
    transport = StringTransport(peerAddress=client)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: public.example\r\n\r\n")
    return transport


def key_request_targets(bridge: Bridge, since: int) -> list[bytes]:
    """The target forwarder of each KEY_REQUEST published after the first ``since``."""
    requests = bridge.published(MsgType.KEY_REQUEST)[since:]
    return [decode_signed(m, KeyRequest)[0].target for _, m in requests]


def grantors(bridge: Bridge, since: int) -> list[bytes]:
    """The forwarder of each KEY_GRANT published after the first ``since``."""
    return [decode_signed(m, KeyGrant)[0].forwarder for _, m in bridge.published(MsgType.KEY_GRANT)[since:]]


class RekeyWhileDraining(TestCase):
    """A draining proxy keeps the keys of its calls in flight alive (PROTOCOL.md §8), on a
    Clock and the in-memory bus."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)
        self.upstream = SlowIntranet(self.bridge.clock, LONG_CALL)
        self.agent = RequestTraversalAgent(self.upstream)
        settings = proxy_settings(drain_timeout=30.0, rekey=SHORT_KEYS)
        self.proxy = ProxyService(settings, self.bridge.broker.client(), self.bridge.clock,
                                  reactor=self.bridge.clock, agent=self.agent)
        self.peer = proxy_peer("alpha", self.proxy.instance)

    def start_proxy(self) -> None:
        self.proxy.startService()
        self.addCleanup(lambda: self.proxy.stopService() if self.proxy.running else None)

    def run_for(self, seconds: int, each: Any = None) -> None:
        """Advance the clock a second at a time, passing the upstream's answer on, and call
        ``each()`` after every second."""
        for _ in range(seconds):
            self.bridge.clock.advance(1)
            self.agent.flush()
            if each is not None:
                each()

    def current_key(self, forwarder: ForwarderService) -> KeyEntry:
        """The forwarder's current key for the proxy instance (there must be one)."""
        entry = forwarder.keyring.current(self.peer)
        assert entry is not None, "the forwarder holds no current key for the leaving instance"
        return entry

    def test_call_longer_than_the_key_lifetime_is_answered(self) -> None:
        """Keys live 4 s (rotated every 2 s); a GET whose upstream takes 12 s is in flight when
        the proxy is stopped (drain_timeout 30). Asserted: the client gets 200 with the
        upstream's body and the proxy's stop completes; the forwarder's current key for that
        instance has another fingerprint than at the start of the drain, and the answer was
        sealed under it; every second of the drain the instance is out of routing, and the
        forwarder acknowledges nothing on its data channel; every key request of the drain is
        addressed to that forwarder, and there are no more than the schedule asks (one per
        2 s period, 7 in 13 s), not one per tick."""
        forwarder = self.bridge.forwarder(forwarder_settings(request_timeout=60.0))
        self.start_proxy()
        self.bridge.clock.advance(1)
        client = client_get(forwarder, self.bridge.clock, b"/alpha/slow")
        self.assertEqual(self.upstream.paths, [b"/slow"])
        before = self.current_key(forwarder).session.envelope.fingerprint
        requests = len(self.bridge.published(MsgType.KEY_REQUEST))
        data_channel = CHANNELS.proxy_data("alpha", self.proxy.instance)
        acks = len(self.bridge.published(MsgType.CONFIRM, data_channel))
        stopping = self.proxy.stopService()
        routed: list[bool] = []
        self.run_for(int(LONG_CALL) + 1, lambda: routed.append(self.peer in forwarder.instances["alpha"]))

        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 "), client.value()[:200])
        self.assertTrue(client.value().endswith(b"\r\n\r\n" + SLOW_ANSWER), client.value()[-200:])
        self.successResultOf(stopping)
        self.assertNotEqual(self.current_key(forwarder).session.envelope.fingerprint, before)
        [(_, answer)] = self.bridge.published(MsgType.RESP_HEAD)
        self.assertEqual(unpack_header(answer).key_id, self.current_key(forwarder).key_id)
        self.assertEqual(routed, [False] * (int(LONG_CALL) + 1))
        self.assertEqual(len(self.bridge.published(MsgType.CONFIRM, data_channel)), acks)
        targets = key_request_targets(self.bridge, requests)
        self.assertEqual(set(targets), {forwarder.id})
        self.assertLessEqual(len(targets), (LONG_CALL + 1) / SHORT_KEYS.period + 1)

    def test_no_key_for_forwarders_without_calls_in_flight(self) -> None:
        """Two forwarders hold keys with the proxy; a 12 s GET is in flight through the first
        when the proxy is stopped, and a third forwarder starts (and announces itself) during
        the drain. Asserted: the call is answered 200 and the proxy stops; the proxy rekeyed
        during the drain, every key request then addressed to the first forwarder (none to the
        second or third, no broadcast), and only the first granted keys; the second
        forwarder's key for the instance was never rotated."""
        busy = self.bridge.forwarder(forwarder_settings(request_timeout=60.0))
        idle = self.bridge.forwarder()
        self.start_proxy()
        self.bridge.clock.advance(1)
        self.assertEqual(sorted(self.proxy.keyring.peers()), sorted([busy.id, idle.id]))
        client = client_get(busy, self.bridge.clock, b"/alpha/slow")
        idle_rotations = idle.keyring.stats[self.peer].rotations
        requests, grants = (len(self.bridge.published(t)) for t in (MsgType.KEY_REQUEST, MsgType.KEY_GRANT))
        stopping = self.proxy.stopService()
        self.bridge.clock.advance(1)
        self.bridge.forwarder()  # announces itself at once
        self.run_for(int(LONG_CALL))

        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 "), client.value()[:200])
        self.successResultOf(stopping)
        targets = key_request_targets(self.bridge, requests)
        self.assertTrue(targets, "the proxy never rekeyed with the forwarder of its call")
        self.assertEqual(set(targets), {busy.id})
        self.assertEqual(idle.keyring.stats[self.peer].rotations, idle_rotations)
        self.assertEqual(set(grantors(self.bridge, grants)), {busy.id})
