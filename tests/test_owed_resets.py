"""Whoever drops a stream for want of Redis tells the other side once its link is back
(:mod:`ppbridge.owedresets`): a proxy tells the forwarder, whose client is then answered 502
``redis-connection-lost`` at once instead of 504 ``timeout`` at ``request_timeout``; a
forwarder tells the proxy, which then closes the upstream call instead of holding it until
its own timeouts.

The end-to-end tests run a forwarder and a proxy in this process on a real Redis, and drop
only one side's publisher connection (``CLIENT KILL ADDR``, as a network blip or a Redis
operator would); the other side's connections are left alone, so it keeps waiting on the
stream, which is the case that used to hang.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ppbridge.errors import BusLost, BusUnavailable, reset_code
from ppbridge.forwarder import ForwarderService
from ppbridge.owedresets import Owed, OwedResets
from ppbridge.proxy import ProxyService
from ppbridge.wire import MsgType, Role, decode_reset, unpack_header
from tests.redisclient import RawRedisClient
from tests.support import Client, Stack, error_of, poll
from tests.test_upstream_timers import _ProxyOnClock

REQUEST_TIMEOUT = 60.0  # the forwarder's: a request the proxy dropped unsaid would be answered 504 then
REQUEST_LIMIT = 90.0  # no request of these tests waits longer
UPSTREAM_TIMEOUT = 600.0  # the proxy's: an upstream call nobody cancels is held this long
WAIT = 15.0  # for the proxy to notice a killed connection, or reconnect: well under a second each


def owed(stream: bytes, expires: float = 10.0, payload: bytes = b"p") -> Owed:
    return Owed(b"F" * 8, b"reply", stream, payload, expires)


class OwedResetsUnit(TestCase):
    def test_one_per_stream_first_cause_stands(self) -> None:
        """A stream owed twice is owed once, with the payload owed first."""
        resets = OwedResets()
        resets.owe(owed(b"s1", payload=b"first"))
        resets.owe(owed(b"s1", payload=b"second"))
        self.assertEqual([o.payload for o in resets.take(0.0)], [b"first"])

    def test_take_empties_and_leaves_out_the_expired(self) -> None:
        """take() gives the owed RESETs whose expiry is after ``now``, oldest first, and owes
        nothing afterwards."""
        resets = OwedResets()
        resets.owe(owed(b"s1", expires=5.0))
        resets.owe(owed(b"s2", expires=20.0))
        resets.owe(owed(b"s3", expires=30.0))
        self.assertEqual([o.stream_id for o in resets.take(5.0)], [b"s2", b"s3"])
        self.assertEqual((len(resets), resets.take(0.0)), (0, []))

    def test_expire_forgets_only_the_expired(self) -> None:
        """expire(now) forgets the entries expiring at or before ``now`` and keeps the rest."""
        resets = OwedResets()
        resets.owe(owed(b"s1", expires=5.0))
        resets.owe(owed(b"s2", expires=6.0))
        resets.expire(5.0)
        self.assertEqual([o.stream_id for o in resets.take(0.0)], [b"s2"])

    def test_bounded_oldest_give_way(self) -> None:
        """At the limit, owing one more forgets the oldest."""
        resets = OwedResets(limit=2)
        for stream in (b"s1", b"s2", b"s3"):
            resets.owe(owed(stream))
        self.assertEqual([o.stream_id for o in resets.take(0.0)], [b"s2", b"s3"])


class LostWithTheLink(_ProxyOnClock):
    """A proxy on a Clock and an in-memory bus whose PUBLISH of a RESET is left in flight."""

    def tap(self, channel: bytes, data: bytes) -> bool:
        """Keep every RESET the proxy publishes, opened by the forwarder under whichever key
        sealed it (the proxy renegotiates when the bus comes back)."""
        if data[1] != MsgType.RESET or unpack_header(data).sender is not Role.PROXY:
            return False
        _, _, plaintext = self.forwarder.node.open(channel, data)
        code, message = decode_reset(plaintext)
        self.resets.append((self.bridge.clock.seconds() - self.sent_at, code, message))
        return True

    def hold_resets(self) -> list[Deferred[int]]:
        """From now on the proxy's RESETs are written but left unacknowledged (in flight, as
        when the link drops before Redis replies): their Deferreds, in order."""
        bus: Any = self.proxy.bus
        real, in_flight = self.real_publish, []

        def publish(channel: bytes, message: bytes) -> Deferred[int]:
            if message[1] != MsgType.RESET:
                return real(channel, message)  # type: ignore[no-any-return]
            d: Deferred[int] = Deferred()
            in_flight.append(d)
            return d

        bus.publish = publish
        return in_flight

    def link_lost_with(self, in_flight: list[Deferred[int]]) -> None:
        """The link drops with ``in_flight`` unacknowledged: the bus says so, then they fail."""
        self.proxy.bus.set_connected(False)  # type: ignore[attr-defined]
        for d in in_flight:
            d.errback(BusUnavailable())

    def start_holding(self) -> list[Deferred[int]]:
        """A call whose upstream never answers; its RESET (upstream_timeout, at 5 s) held in flight."""
        self.start(upstream_timeout=5.0)
        self.real_publish = self.proxy.bus.publish
        in_flight = self.hold_resets()
        self.send_head(30.0)
        self.advance_to(5.0)
        self.assertEqual((len(in_flight), self.resets), (1, []))
        return in_flight

    def assert_told_once(self) -> None:
        self.assertEqual([(code, message) for _, code, message in self.resets],
                         [(reset_code(BusLost), "ppbridge: the proxy lost its Redis connection mid-request")])

    def test_publish_lost_with_the_link_is_owed(self) -> None:
        """The call's RESET (upstream_timeout, at 5 s) is written, but the link drops before
        Redis acknowledges it, so the forwarder may never have it: nothing more is published
        while the bus is down, and once it is back the proxy publishes one RESET for the stream,
        code 9 (502 redis-connection-lost), saying the connection was lost mid-request."""
        self.link_lost_with(self.start_holding())
        self.proxy.bus.publish = self.real_publish  # type: ignore[method-assign]
        self.assertEqual(self.resets, [])
        self.proxy.bus.set_connected(True)  # type: ignore[attr-defined]
        self.assert_told_once()

    def test_owed_reset_lost_again_is_owed_again(self) -> None:
        """The owed RESET, published when the bus came back, is itself lost with the link
        dropping again before Redis acknowledged it: it is owed again, and published (once)
        when the bus is back the second time."""
        self.link_lost_with(self.start_holding())
        in_flight = self.hold_resets()
        self.proxy.bus.set_connected(True)  # type: ignore[attr-defined]
        self.assertEqual(len(in_flight), 1)  # the owed RESET, in flight
        self.link_lost_with(in_flight)
        self.proxy.bus.publish = self.real_publish  # type: ignore[method-assign]
        self.proxy.bus.set_connected(True)  # type: ignore[attr-defined]
        self.assert_told_once()


def kill_publisher(admin: RawRedisClient, service: ProxyService | ForwarderService) -> None:
    """CLIENT KILL of ``service``'s publisher connection only (by its address as Redis sees it)."""
    pub: Any = service.bus._pub  # type: ignore[attr-defined]
    here = pub.transport.getHost()
    if admin.command("CLIENT", "KILL", "ADDR", f"{here.host}:{here.port}") != 1:
        raise AssertionError("the publisher was not found")


class OneSideLinkLost(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        stack = yield Stack(self).start(forwarder={"request_timeout": REQUEST_TIMEOUT},
                                        proxy={"upstream_timeout": UPSTREAM_TIMEOUT})
        admin = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(admin.close)
        return stack, admin, stack.proxies["alpha"]

    @defer.inlineCallbacks
    def test_request_in_flight_is_answered_once_the_proxy_is_back(self):
        """The proxy's publisher killed while GET /hang waits on the upstream: the proxy cancels
        the call, and once it has reconnected by itself it tells the forwarder, whose client
        gets 502 redis-connection-lost saying the proxy lost its connection mid-request (not
        504 timeout at request_timeout, 60 s); the forwarder stayed connected throughout, and
        the next request is served."""
        stack, admin, proxy = yield self.start()
        client = Client(self)
        in_flight = client.fetch(b"GET", stack.url + "/hang").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: stack.app.hits["/hang"] == 1, WAIT, "the /hang request reaching the upstream")
        kill_publisher(admin, proxy)
        response, body = yield in_flight
        self.assertEqual((response.code, error_of(response)), (502, b"redis-connection-lost"), body)
        self.assertIn(b"the proxy lost its Redis connection mid-request", body)
        self.assertTrue(stack.forwarder.bus.connected)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo?after")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_request_while_the_proxy_cannot_publish_is_not_called(self):
        """The proxy's publisher killed and kept out (CONFIG SET maxclients: Redis refuses its
        reconnections) while its subscriber stays up: a GET sent meanwhile reaches the proxy,
        which does not call the upstream (it could not answer); once Redis takes connections
        again the client gets 502 redis-connection-lost saying the request was not sent to the
        upstream, the upstream never saw it, and the next request is served."""
        stack, admin, proxy = yield self.start()
        clients = int(admin.command("INFO", "clients").split(b"connected_clients:")[1].split(b"\r\n")[0])
        _, before = admin.command("CONFIG", "GET", "maxclients")  # type: ignore[misc]
        admin.command("CONFIG", "SET", "maxclients", str(clients - 1))  # the publisher's place is taken away
        restored = [False]

        def restore() -> None:
            if not restored[0]:
                restored[0] = True
                admin.command("CONFIG", "SET", "maxclients", before)

        self.addCleanup(restore)
        kill_publisher(admin, proxy)
        yield poll(lambda: not proxy.bus.connected, WAIT, "the proxy noticing its publisher is gone")
        client = Client(self)
        answer = client.fetch(b"GET", stack.url + "/echo?meanwhile").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: len(proxy.owed) == 1, WAIT, "the request reaching the proxy")
        self.assertFalse(proxy.bus.connected)  # still kept out: the proxy could not have answered
        restore()
        response, body = yield answer
        self.assertEqual((response.code, error_of(response)), (502, b"redis-connection-lost"), body)
        self.assertIn(b"it was not sent to the upstream", body)
        self.assertEqual(stack.app.hits["/echo"], 0)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo?after")
        self.assertEqual((response.code, stack.app.hits["/echo"]), (200, 1))

    @defer.inlineCallbacks
    def test_forwarder_link_lost_cancels_the_upstream_call(self):
        """The forwarder's publisher killed while GET /hang waits on the upstream: the client
        is answered 502 redis-connection-lost at once, and once the forwarder has reconnected
        by itself it tells the proxy, which closes its upstream connection (the upstream sees
        its client leave /hang) rather than holding it until upstream_timeout (600 s); the
        proxy stayed connected throughout, and the next request is served."""
        stack, admin, proxy = yield self.start()
        client = Client(self)
        in_flight = client.fetch(b"GET", stack.url + "/hang").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: stack.app.hits["/hang"] == 1, WAIT, "the /hang request reaching the upstream")
        kill_publisher(admin, stack.forwarder)
        response, body = yield in_flight
        self.assertEqual((response.code, error_of(response)), (502, b"redis-connection-lost"), body)
        yield poll(lambda: stack.app.disconnects == 1, WAIT, "the proxy closing the upstream call")
        self.assertEqual(proxy.calls, {})
        self.assertTrue(proxy.bus.connected)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo?after")
        self.assertEqual(response.code, 200)
