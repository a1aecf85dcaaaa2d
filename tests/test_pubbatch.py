"""PUBLISH batched per reactor turn (ppbridge.pubbatch) on the bus's publisher connection.

The publisher protocol runs on a StringTransport and a Clock: what it writes is read back,
Redis's replies are fed in by hand, and ``Clock.advance(0)`` ends the reactor turn.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from ppbridge.bus import RedisBus, _PublisherFactory
from ppbridge.config import RedisSettings
from ppbridge.errors import BusUnavailable


def publish_command(channel: bytes, message: bytes) -> bytes:
    parts = (b"PUBLISH", channel, message)
    return b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Publisher:
    """A RedisBus (never started) on a Clock, and its publisher protocol past SELECT and
    CLIENT SETNAME, on a StringTransport counting its writes."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.bus = RedisBus(RedisSettings(namespace="ns"), self.clock)
        factory = _PublisherFactory(self.bus)
        factory.charset, factory.convertNumbers, factory.dbid = None, False, 0
        self.proto: Any = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.writes = 0
        write, write_sequence = self.transport.write, self.transport.writeSequence

        def counted_write(data: bytes) -> None:
            self.writes += 1
            write(data)

        def counted_sequence(parts: list[bytes]) -> None:
            self.writes += 1
            write_sequence(parts)

        self.transport.write = counted_write  # type: ignore[method-assign]
        self.transport.writeSequence = counted_sequence  # type: ignore[method-assign]
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(b"+OK\r\n")  # SELECT 0
        self.proto.dataReceived(b"+OK\r\n")  # CLIENT SETNAME
        self.bus._pub = self.proto
        self.transport.clear()
        self.writes = 0


class BatchTests(TestCase):
    """Several publishes in one turn: one write, order kept, each Deferred its own reply."""

    def test_one_write_per_turn_in_order(self) -> None:
        """Three publishes in one turn write nothing until the turn ends, then all three in
        one write, in the order they were made; each Deferred fires with its own receiver
        count as the replies come in."""
        pub = Publisher()
        results: list[tuple[int, int]] = []
        sent = [(b"ch:%d" % i, b"message %d" % i) for i in range(3)]
        for i, (channel, message) in enumerate(sent):
            pub.bus.publish(channel, message).addCallback(lambda n, i=i: results.append((i, n)))
        self.assertEqual((pub.writes, pub.transport.value()), (0, b""))
        pub.clock.advance(0)
        self.assertEqual(pub.writes, 1)
        self.assertEqual(pub.transport.value(), b"".join(publish_command(c, m) for c, m in sent))
        pub.proto.dataReceived(b":1\r\n:0\r\n")
        self.assertEqual(results, [(0, 1), (1, 0)])
        pub.proto.dataReceived(b":2\r\n")
        self.assertEqual(results, [(0, 1), (1, 0), (2, 2)])

    def test_next_turn_next_write(self) -> None:
        """A publish made after the turn ended goes out in a write of its own."""
        pub = Publisher()
        pub.bus.publish(b"a", b"1")
        pub.clock.advance(0)
        pub.bus.publish(b"b", b"2")
        pub.clock.advance(0)
        self.assertEqual(pub.writes, 2)

    def test_other_commands_keep_their_place(self) -> None:
        """A command txredisapi sends itself (PING) in the middle of a turn's publishes flushes
        the ones before it; every reply still reaches its own waiter, in order."""
        pub = Publisher()
        got: list[object] = []
        pub.bus.publish(b"a", b"1").addCallback(got.append)
        pub.proto.ping().addCallback(got.append)
        pub.bus.publish(b"b", b"2").addCallback(got.append)
        pub.clock.advance(0)
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
        pub.clock.advance(0)
        pub.proto.dataReceived(b"-ERR something\r\n:1\r\n")
        self.failureResultOf(failed, txredisapi.ResponseError)
        self.assertEqual(ok, [1])

    def test_lost_link_fails_written_and_queued(self) -> None:
        """When the link drops, publishes written and not answered, and publishes queued and
        not written yet, all fail as a lost link (BusUnavailable); nothing is written later."""
        pub = Publisher()
        written = pub.bus.publish(b"a", b"1")
        pub.clock.advance(0)
        queued = pub.bus.publish(b"b", b"2")
        pub.transport.clear()
        pub.proto.connectionLost(txredisapi.ConnectionError("gone"))
        self.failureResultOf(written, BusUnavailable)
        self.failureResultOf(queued, BusUnavailable)
        pub.clock.advance(0)
        self.assertEqual(pub.transport.value(), b"")
