"""PUBLISH pipelined (ppbridge.pubpipeline) on the bus's publisher connection.

Unit tests run the publisher protocol on a StringTransport: what it writes is read back and
Redis's replies are fed in by hand. One test runs a bus against a real redis-server and counts
the publisher socket's sends.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from ppbridge.bus import RedisBus, _PublisherFactory
from ppbridge.config import RedisSettings
from ppbridge.errors import BusUnavailable, RedisPermission
from tests.support import poll, start_redis


def publish_command(channel: bytes, message: bytes) -> bytes:
    parts = (b"PUBLISH", channel, message)
    return b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Publisher:
    """A RedisBus (never started) and its publisher protocol past SELECT and CLIENT SETNAME,
    on a StringTransport."""

    def __init__(self) -> None:
        self.bus = RedisBus(RedisSettings(namespace="ns"), Clock())
        factory = _PublisherFactory(self.bus)
        factory.charset, factory.convertNumbers, factory.dbid = None, False, 0
        self.proto: Any = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(b"+OK\r\n")  # SELECT 0
        self.proto.dataReceived(b"+OK\r\n")  # CLIENT SETNAME
        self.bus._pub = self.proto
        self.transport.clear()


class PipelineTests(TestCase):
    """Several publishes: written at once and in order, each Deferred gets its own reply."""

    def test_written_at_once_in_order(self) -> None:
        """Three publishes are written as they are made, in that order; each Deferred fires
        with its own receiver count as the replies come in."""
        pub = Publisher()
        results: list[tuple[int, int]] = []
        sent = [(b"ch:%d" % i, b"message %d" % i) for i in range(3)]
        for i, (channel, message) in enumerate(sent):
            pub.bus.publish(channel, message).addCallback(lambda n, i=i: results.append((i, n)))
        self.assertEqual(pub.transport.value(), b"".join(publish_command(c, m) for c, m in sent))
        pub.proto.dataReceived(b":1\r\n:0\r\n")
        self.assertEqual(results, [(0, 1), (1, 0)])
        pub.proto.dataReceived(b":2\r\n")
        self.assertEqual(results, [(0, 1), (1, 0), (2, 2)])

    def test_other_commands_keep_their_place(self) -> None:
        """A command txredisapi sends itself (PING) between publishes: every reply still
        reaches its own waiter, in order."""
        pub = Publisher()
        got: list[object] = []
        pub.bus.publish(b"a", b"1").addCallback(got.append)
        pub.proto.ping().addCallback(got.append)
        pub.bus.publish(b"b", b"2").addCallback(got.append)
        self.assertEqual(pub.transport.value(), publish_command(b"a", b"1") + b"*1\r\n$4\r\nPING\r\n"
                         + publish_command(b"b", b"2"))
        pub.proto.dataReceived(b":3\r\n+PONG\r\n:4\r\n")
        self.assertEqual(got, [3, b"PONG", 4])

    def test_error_reply_fails_its_own_publish(self) -> None:
        """An error reply fails only the publish it answers."""
        pub = Publisher()
        ok: list[int] = []
        failed = pub.bus.publish(b"a", b"1")
        pub.bus.publish(b"b", b"2").addCallback(ok.append)
        pub.proto.dataReceived(b"-ERR something\r\n:1\r\n")
        self.failureResultOf(failed, txredisapi.ResponseError)
        self.assertEqual(ok, [1])

    def test_permission_refusal_fails_as_redis_permission(self) -> None:
        """A -NOPERM reply to a PUBLISH fails that publish with RedisPermission (the bus's
        meaning of it), not with txredisapi's ResponseError; a bytearray message is written as
        the same bytes as a bytes one."""
        pub = Publisher()
        refused = pub.bus.publish(b"ns:p:x", bytearray(b"sealed"))
        self.assertEqual(pub.transport.value(), publish_command(b"ns:p:x", b"sealed"))
        pub.proto.dataReceived(b"-NOPERM this user has no permissions to access the 'ns:p:x' channel\r\n")
        self.failureResultOf(refused, RedisPermission)

    def test_lost_link_fails_what_is_unanswered(self) -> None:
        """When the link drops, publishes written and not answered fail as a lost link
        (BusUnavailable); one already answered keeps its result."""
        pub = Publisher()
        answered, unanswered = pub.bus.publish(b"a", b"1"), pub.bus.publish(b"b", b"2")
        pub.proto.dataReceived(b":1\r\n")
        pub.proto.connectionLost(txredisapi.ConnectionError("gone"))
        self.assertEqual(self.successResultOf(answered), 1)
        self.failureResultOf(unanswered, BusUnavailable)


class SendLimitTests(TestCase):
    """The publisher's transport sends a frame-sized PUBLISH whole."""

    def test_send_limit_raised(self) -> None:
        """On a transport with Twisted's per-send() limit (128 KiB, checked on Twisted 26.10),
        the publisher raises it to PUBLISH_SEND_LIMIT, above a 256 KiB frame's PUBLISH: the
        rest of a cut PUBLISH is joined (copied) with the next ones otherwise."""
        from twisted.internet import abstract, tcp

        from ppbridge.redisconn import PUBLISH_SEND_LIMIT
        self.assertEqual(abstract.FileDescriptor.SEND_LIMIT, 128 * 1024)
        self.assertTrue(issubclass(tcp.Client, abstract.FileDescriptor))

        class TCPLike(StringTransport):
            SEND_LIMIT = abstract.FileDescriptor.SEND_LIMIT

        factory = _PublisherFactory(RedisBus(RedisSettings(namespace="ns"), Clock()))
        factory.charset, factory.convertNumbers, factory.dbid = None, False, 0
        proto: Any = factory.buildProtocol(None)
        transport = TCPLike()
        proto.makeConnection(transport)
        self.assertEqual(transport.SEND_LIMIT, PUBLISH_SEND_LIMIT)
        self.assertGreaterEqual(PUBLISH_SEND_LIMIT, 256 * 1024 + 1024)
        self.assertIn(b"SELECT", transport.value())  # txredisapi's own setup still runs


class RealRedisTests(TestCase):
    """Against a real redis-server, on the real reactor."""

    @defer.inlineCallbacks
    def connected_bus(self, channel: bytes):  # type: ignore[no-untyped-def]
        """A started bus on a fresh redis-server, subscribed to ``channel`` (Redis counts it),
        and the list its messages go to."""
        server = start_redis(self)
        bus = RedisBus(RedisSettings(url=server.url, host="127.0.0.1", port=server.port, namespace="ns"), reactor)
        received: list[tuple[bytes, bytes]] = []
        bus.on_message = lambda channel, data: received.append((channel, data))
        yield bus.subscribe(channel)
        bus.start()
        self.addCleanup(bus.stop)
        yield poll(lambda: bus.connected, 10, "the bus connected")
        for _ in range(200):  # until Redis counts the subscription
            counts = yield bus.numsub([channel])
            if counts.get(channel) == 1:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        return bus, received

    @staticmethod
    def count_sends(bus: RedisBus) -> list[int]:
        """The sizes of the publisher socket's sends from now on, in a list kept up to date."""
        transport = bus._pub.transport
        sends: list[int] = []
        write_some = transport.writeSomeData

        def counted(data: bytes) -> int:
            sends.append(len(data))
            return write_some(data)

        transport.writeSomeData = counted
        return sends

    @defer.inlineCallbacks
    def test_one_send_for_a_turns_publishes(self):  # type: ignore[no-untyped-def]
        """Three publishes made in one reactor turn leave in one send on the publisher's
        socket; they arrive in order, and each Deferred fires with its own receiver count."""
        bus, received = yield self.connected_bus(b"ns:one")
        sends = self.count_sends(bus)
        done = defer.gatherResults([bus.publish(channel, b"m%d" % i)
                                    for i, channel in enumerate((b"ns:one", b"ns:none", b"ns:one"))])
        counts = yield done
        self.assertEqual(counts, [1, 0, 1])
        self.assertEqual(len(sends), 1, sends)
        yield poll(lambda: len(received) == 2, 10, "both messages delivered")
        self.assertEqual(received, [(b"ns:one", b"m0"), (b"ns:one", b"m2")])

    @defer.inlineCallbacks
    def test_every_eighth_publish_sent_before_the_turn_ends(self):  # type: ignore[no-untyped-def]
        """Twenty publishes made in one reactor turn: the eighth and the sixteenth send what is
        buffered before the turn ends (SEND_EVERY), so two sends of eight PUBLISHes each have
        happened by the time the loop is done; the last four leave with the reactor. All
        twenty arrive, in order."""
        from ppbridge.pubpipeline import SEND_EVERY
        self.assertEqual(SEND_EVERY, 8)
        bus, received = yield self.connected_bus(b"ns:many")
        sends = self.count_sends(bus)
        one = len(publish_command(b"ns:many", b"m00"))
        done = [bus.publish(b"ns:many", b"m%02d" % i) for i in range(20)]
        self.assertEqual(sends, [8 * one, 8 * one])  # before the reactor has run
        counts = yield defer.gatherResults(done)
        self.assertEqual(counts, [1] * 20)
        self.assertEqual(sends, [8 * one, 8 * one, 4 * one])
        yield poll(lambda: len(received) == 20, 10, "all twenty delivered")
        self.assertEqual(received, [(b"ns:many", b"m%02d" % i) for i in range(20)])
