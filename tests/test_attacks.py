"""Attacks by a hostile Redis in the middle, told as stories, against the real thing.

The attacker owns the network between one side (the forwarder, or a proxy) and a real
``redis-server`` (:class:`tests.hostile.HostileRedis`): it reads every PUBLISH, lies about
receiver and subscriber counts, and drops, holds back and later releases messages. It cannot
open or forge them: it picks its victims by the 40-byte cleartext header of each message
(type, stream id, seq). Everything else is real: HTTP over loopback, the sample upstream app,
the forwarder and proxy services as users configure them.

Each test is named after the finding it guards against and checks what the victim observes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from ppbridge.errors import BusMessageError
from ppbridge.negotiation import proxy_peer
from ppbridge.sampleapp import SampleApp, make_site
from ppbridge.wire import Header, MsgType, unpack_header
from tests.hostile import DROP, HOLD, PASS, HostileRedis
from tests.support import Client, Stack, error_of, listen, poll
from tests.test_security import DropWatcher
from tests.test_streaming import WatchedUpstream

WAIT = 10.0  # seconds any single wait may take before the test fails
MiB = 1 << 20


@defer.inlineCallbacks
def attacker_in_front_of(case: TestCase, stack: Stack):  # type: ignore[no-untyped-def]
    """A HostileRedis relaying to the stack's real Redis; stopped after the services are
    (cleanups run last-in first-out, and the services are started after this)."""
    hostile = yield HostileRedis(stack.redis.host, stack.redis.port).start()
    case.addCleanup(hostile.stop)
    return hostile


def app_of(stack: Stack) -> SampleApp:
    """The stack's sample upstream app (started by ``Stack.start``)."""
    if stack.app is None:
        raise RuntimeError("the stack was not started")
    return stack.app


def session_header(channel: bytes, message: bytes) -> Header | None:
    """The cleartext header of a session message on a proxy's data channel, as the attacker
    reads it; None for anything else (negotiation, announcements, reply channels)."""
    if b":p:" not in channel:
        return None
    try:
        return unpack_header(message)
    except BusMessageError:
        return None


def heads_of(hostile: HostileRedis, stream_id: bytes) -> list[bytes]:
    """The channels the forwarder published ``stream_id``'s request head on, in order."""
    found = []
    for channel, message in hostile.publishes:
        header = session_header(channel, message)
        if header is not None and header.type is MsgType.REQ_HEAD and header.stream_id == stream_id:
            found.append(channel)
    return found


class AtMostOnce(TestCase):
    @defer.inlineCallbacks
    def test_executed_twice_with_replicas(self):
        """Two processes of proxy "alpha" are keyed; the attacker sits between the forwarder
        and Redis. For the first head of each request it lets the PUBLISH through (the instance
        it was sent to gets it and runs it) but answers "0 receivers", hoping the forwarder
        sends the request again to the other instance.

        A POST with a body: the forwarder publishes its head once and only once, the upstream
        runs it exactly once (it was delivered: we wait for that hit, and for as many hits as
        heads were published), and the client gets 503 proxy-unavailable, not a second run.
        A GET without a body under the same lie is idempotent: it moves to the other instance
        (a second head, on the other data channel) and is answered 200."""
        stack = Stack(self)
        hostile = yield attacker_in_front_of(self, stack)
        # Announcing every second brings an evicted live instance back within a second.
        yield stack.start(forwarder={"announce_interval": 1.0}, forwarder_redis=hostile.url)
        stack.add_proxy("alpha", stack.upstream)
        forwarder, app = stack.forwarder, app_of(stack)

        def both() -> bool:
            return len(forwarder.candidates("alpha")) == 2

        yield poll(both, WAIT, "both instances of alpha keyed")
        lied_about: list[bytes] = []  # stream ids whose head was reported undelivered

        def first_head_reached_nobody(channel: bytes, message: bytes, real: int) -> int:
            header = session_header(channel, message)
            if header is None or header.type is not MsgType.REQ_HEAD or header.stream_id in lied_about:
                return real
            lied_about.append(header.stream_id)
            return 0

        hostile.publish_count = first_head_reached_nobody
        client = Client(self)

        response, _ = yield client.fetch(b"POST", stack.url + "/echo/pay", body=b"pay 100 coins, once")
        post, = lied_about
        heads = heads_of(hostile, post)
        yield poll(lambda: app.hits["/echo/pay"] >= len(heads), WAIT, "every head published was executed")
        self.assertEqual(app.hits["/echo/pay"], 1, "the upstream ran the POST more than once")
        self.assertEqual(len(heads), 1, "the POST's head was published to a second instance")
        self.assertEqual((response.code, error_of(response)), (503, b"proxy-unavailable"))

        # The instance the lie evicted is alive: its heartbeat brings it back by itself.
        yield poll(both, WAIT, "the evicted instance routed to again")
        response, body = yield client.fetch(b"GET", stack.url + "/echo/look")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["method"], "GET")
        get = lied_about[1]
        heads = heads_of(hostile, get)
        self.assertEqual(len(heads), 2, "the GET was not retried")
        self.assertNotEqual(heads[0], heads[1], "the GET was retried on the same instance")


class Freshness(TestCase):
    @defer.inlineCallbacks
    def test_executed_after_the_client_got_504(self):
        """The attacker between the forwarder and Redis holds back everything the forwarder
        sends to the proxy's data channel (the request head, the RESET that cancels it, and
        any acknowledgement, whose later counter would get the head refused as a replay
        instead) until the client has been answered 504 timeout (request_timeout 1 s). Then it
        publishes only the held POST head, with its body inline, and keeps the rest to itself,
        so the head's deadline is all that stands between it and the upstream.

        The proxy receives the late head and refuses it: it drops it as "expired" and the
        upstream is never called (no hit on the path, no call left open), so a client told
        "timeout" can trust the request did not run."""
        stack = Stack(self)
        hostile = yield attacker_in_front_of(self, stack)
        yield stack.start(forwarder={"request_timeout": 1.0}, forwarder_redis=hostile.url)
        proxy, app = stack.proxies["alpha"], app_of(stack)
        drops = DropWatcher(proxy)

        def withhold_what_goes_to_the_proxy(channel: bytes, message: bytes) -> str:
            return HOLD if session_header(channel, message) is not None else PASS

        hostile.on_publish = withhold_what_goes_to_the_proxy
        response, _ = yield Client(self).fetch(b"POST", stack.url + "/echo/transfer", body=b"transfer 100 coins")
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))
        kinds = [session_header(channel, message).type for channel, message in hostile.held]  # type: ignore[union-attr]
        self.assertEqual([k for k in kinds if k is not MsgType.CONFIRM], [MsgType.REQ_HEAD, MsgType.RESET])

        hostile.on_publish = None
        released = hostile.release(lambda channel, message: session_header(channel, message).type  # type: ignore[union-attr]
                                   is MsgType.REQ_HEAD)
        self.assertEqual(released, 1)
        yield hostile.wait_released()
        yield poll(lambda: drops.reasons["expired"] or app.hits["/echo/transfer"], WAIT,
                   "the proxy received the late head")
        self.assertEqual(app.hits["/echo/transfer"], 0, "the upstream ran a request whose client got 504")
        yield drops.wait("expired")
        self.assertEqual(proxy.calls, {})


class RecoveryFromLies(TestCase):
    @defer.inlineCallbacks
    def test_one_lie_evicts_a_live_proxy(self):
        """The attacker between the forwarder and Redis cuts the forwarder's connection; the
        forwarder reconnects and announces itself. In the very next PUBSUB NUMSUB (the
        forwarder's once-a-second liveness check, less than a second after that announcement,
        so its next scheduled one is a whole announce interval, 15 s, away) the attacker
        answers 0 for alpha's data channel, which has its subscriber, and tells the truth from
        then on.

        The forwarder believes it and evicts the live instance (no candidate left for alpha),
        but within 5 s (in practice milliseconds: an announcement goes out at once, and the
        proxy's heartbeat under its key reinstates it) alpha is routed to again and a GET
        through the forwarder answers 200."""
        stack = Stack(self)
        hostile = yield attacker_in_front_of(self, stack)
        yield stack.start(forwarder_redis=hostile.url)
        forwarder, proxy = stack.forwarder, stack.proxies["alpha"]
        evicted: defer.Deferred[list[Any]] = defer.Deferred()
        evict = forwarder.evict

        def evict_and_tell(peer: bytes, reason: str) -> None:
            evict(peer, reason)
            if not evicted.called:
                evicted.callback(forwarder.candidates("alpha"))

        forwarder.evict = evict_and_tell  # type: ignore[method-assign]
        announced: list[float] = []  # when the attacker saw the forwarder announce itself
        told: list[int] = []  # the true count the attacker lied about

        def watch_for_announcements(channel: bytes, message: bytes) -> str:
            if channel == forwarder.channels.announce:
                announced.append(reactor.seconds())
            return PASS

        def one_lie_after_an_announcement(channel: bytes, real: int) -> int:
            if channel != proxy.data_channel or told or not announced:
                return real
            told.append(real)
            return 0

        hostile.on_publish = watch_for_announcements
        hostile.numsub_count = one_lie_after_an_announcement
        hostile.drop_connections()
        left = yield evicted.addTimeout(WAIT, reactor)
        since = reactor.seconds()
        self.assertEqual(told, [1], "the lie was not about a channel with its subscriber")
        self.assertLess(since - announced[0], 1.0, "the lie did not follow the announcement closely")
        self.assertEqual(left, [], "the lie did not evict the instance")

        yield poll(lambda: forwarder.candidates("alpha"), 5.0, "alpha routed to again after one lie")
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 200, body)
        self.assertLess(reactor.seconds() - since, 5.0)

    @defer.inlineCallbacks
    def test_wrongly_evicted_proxy_says_so_in_healthz(self):
        """The attacker sits between the proxy and Redis; the forwarder announces every second.
        The forwarder evicts the healthy proxy (the test calls its evict(), as a false report
        would) while the attacker drops everything the proxy publishes to the forwarder's
        control channel (its heartbeats) and every key request it publishes on the negotiation
        channel, so the forwarder never hears it is alive.

        The proxy notices no forwarder acknowledges it any more: healthy() (what /healthz
        reports) turns False within 10 s (three announce intervals and margin). Once the
        attacker stops dropping, the proxy is healthy and serving again (GET 200) within 40 s
        (its renegotiation backs off 1, 2, 4, 8... s)."""
        stack = Stack(self)
        hostile = yield attacker_in_front_of(self, stack)
        yield stack.start(forwarder={"announce_interval": 1.0}, proxy_redis=hostile.url)
        forwarder, proxy = stack.forwarder, stack.proxies["alpha"]
        yield poll(proxy.healthy, WAIT, "the proxy healthy before the attack")
        control, negotiate = forwarder.channels.forwarder_control(forwarder.id), forwarder.channels.negotiate
        dropped: list[bytes] = []

        def silence_the_proxy(channel: bytes, message: bytes) -> str:
            if channel in (control, negotiate):
                dropped.append(channel)
                return DROP
            return PASS

        hostile.on_publish = silence_the_proxy
        forwarder.evict(proxy_peer("alpha", proxy.instance), "a false report (the test)")
        yield poll(lambda: not proxy.healthy(), 10.0, "the wrongly evicted proxy reports itself unhealthy")
        self.assertIn(control, dropped, "no heartbeat was withheld")

        hostile.on_publish = None
        yield poll(proxy.healthy, 40.0, "the proxy healthy again once the attacker stopped")
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 200, body)


class PromptAbort(TestCase):
    @defer.inlineCallbacks
    def test_proxy_stream_violation_aborts_upstream(self):
        """The attacker between the forwarder and Redis drops the second REQ_DATA frame of a
        2 MiB upload (frames are 256 KiB; request_timeout 30 s).

        The proxy sees frame 3 where 2 was due: it drops it as a "stream-gap", counts an
        aborted stream and stops the upstream call at once: no call stays open, no connection
        to the upstream stays open (or it was never opened, when the gap came first) and the
        upstream never gets a complete body. The client gets 502 protocol-error within 10 s,
        long before request_timeout."""
        site, app = make_site()
        watched = WatchedUpstream(site)
        upstream = yield listen(self, watched)
        stack = Stack(self)
        hostile = yield attacker_in_front_of(self, stack)
        yield stack.start(forwarder={"request_timeout": 30.0}, upstreams={"alpha": upstream},
                          forwarder_redis=hostile.url)
        proxy = stack.proxies["alpha"]
        drops = DropWatcher(proxy)
        lost: list[bytes] = []

        def lose_second_frame(channel: bytes, message: bytes) -> str:
            header = session_header(channel, message)
            if header is not None and header.type is MsgType.REQ_DATA and header.seq == 2 and not lost:
                lost.append(header.stream_id)
                return DROP
            return PASS

        hostile.on_publish = lose_second_frame
        started = reactor.seconds()
        answer = Client(self).fetch(b"POST", stack.url + "/upload", body=os.urandom(2 * MiB))
        try:
            response, body = yield answer.addTimeout(10.0, reactor)
        except ResponseNeverReceived as err:  # what the Agent makes of addTimeout's cancel
            self.fail(f"no answer after {reactor.seconds() - started:.1f} s (request_timeout is 30 s): {err}")
        self.assertEqual((response.code, error_of(response)), (502, b"protocol-error"), body)
        self.assertEqual(len(lost), 1)
        yield drops.wait("stream-gap")
        aborted = proxy.metrics.registry.get_sample_value("ppbridge_streams_aborted_total", {"reason": "stream-gap"})
        self.assertEqual(aborted, 1.0)
        self.assertEqual(proxy.calls, {})
        yield poll(lambda: not watched.protocols, WAIT, "no upstream connection left open")
        self.assertEqual(app.hits["/upload"], 0, "the upstream got a complete body")
