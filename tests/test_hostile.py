"""The hostile Redis fixture itself: it must relay faithfully when told to, and lie, withhold,
reorder, forge and flood exactly as told. The clients are our own ``RedisBus`` (txredisapi,
binary-safe settings) pointed at the attacker's port, and a raw RESP socket for the flood; the
server behind the attacker is a real ``redis-server``.
"""

from __future__ import annotations

import os
from typing import Any

import hiredis
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ppbridge.bus import RedisBus
from ppbridge.config import RedisSettings
from ppbridge.redisraw import encode_command
from tests.hostile import HostileRedis
from tests.support import start_redis

CHANNEL = b"ppbridge:test:\x00\xff"
WAIT = 10.0  # seconds any single wait may take before the test fails


class Inbox:
    """Everything one bus received, in order; a test awaits a count of messages."""

    def __init__(self, bus: RedisBus) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self._waits: list[tuple[int, defer.Deferred[list[bytes]]]] = []
        bus.on_message = self._got

    def _got(self, channel: bytes, message: bytes) -> None:
        self.messages.append((channel, message))
        for entry in list(self._waits):
            if len(self.messages) >= entry[0]:
                self._waits.remove(entry)
                entry[1].callback(self.bodies())

    def bodies(self) -> list[bytes]:
        """The message bodies received so far."""
        return [message for _, message in self.messages]

    def wait(self, count: int) -> defer.Deferred[list[bytes]]:
        """Fires with the bodies once ``count`` messages have arrived."""
        if len(self.messages) >= count:
            return defer.succeed(self.bodies())
        waiting: defer.Deferred[list[bytes]] = defer.Deferred()
        self._waits.append((count, waiting))
        return waiting.addTimeout(WAIT, reactor)


@defer.inlineCallbacks
def attacked_redis(case: TestCase, **redis_options: Any):  # type: ignore[no-untyped-def]
    """A real redis-server and a HostileRedis in front of it, both gone after the test."""
    redis = start_redis(case, **redis_options)
    hostile = yield HostileRedis(redis.host, redis.port).start()
    case.addCleanup(hostile.stop)
    return hostile


@defer.inlineCallbacks
def bus_via(case: TestCase, hostile: HostileRedis, *channels: bytes,
            password: str | None = None):  # type: ignore[no-untyped-def]
    """A RedisBus connected through ``hostile`` (both of its connections up), subscribed to
    ``channels``; (bus, inbox). Stopped at cleanup, before the hostile Redis is."""
    settings = RedisSettings(url=hostile.url, host="127.0.0.1", port=hostile.port, password=password)
    bus = RedisBus(settings, reactor)
    inbox = Inbox(bus)
    up: defer.Deferred[None] = defer.Deferred()
    bus.on_state = lambda connected: up.callback(None) if connected and not up.called else None
    bus.start()
    case.addCleanup(bus.stop)
    yield up.addTimeout(WAIT, reactor)
    for channel in channels:
        yield bus.subscribe(channel)
    return bus, inbox


class RawSubscriber(Protocol):
    """A bare RESP client that subscribes and keeps every parsed reply, for checking the wire
    format of what the attacker pushes (no client library in between)."""

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self.reader = hiredis.Reader()
        self.replies: list[Any] = []
        self.received_bytes = 0
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waits: list[tuple[int, defer.Deferred[list[Any]]]] = []

    def connectionMade(self) -> None:
        self.transport.write(encode_command([b"SUBSCRIBE", self.channel]))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.replies.append(reply)
        for entry in list(self._waits):
            if len(self.replies) >= entry[0]:
                self._waits.remove(entry)
                entry[1].callback(self.replies)

    def wait(self, count: int) -> defer.Deferred[list[Any]]:
        """Fires with all replies once ``count`` have been parsed."""
        if len(self.replies) >= count:
            return defer.succeed(self.replies)
        waiting: defer.Deferred[list[Any]] = defer.Deferred()
        self._waits.append((count, waiting))
        return waiting.addTimeout(WAIT, reactor)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.callback(None)


@defer.inlineCallbacks
def raw_subscriber(case: TestCase, hostile: HostileRedis, channel: bytes):  # type: ignore[no-untyped-def]
    """A RawSubscriber of ``channel`` through ``hostile``, subscribed; closed at cleanup."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", hostile.port)
    raw = yield connectProtocol(endpoint, RawSubscriber(channel))

    def close() -> defer.Deferred[None]:
        if not raw.lost.called:
            raw.transport.abortConnection()
        return raw.lost

    case.addCleanup(close)
    replies = yield raw.wait(1)
    case.assertEqual(replies[0], [b"subscribe", channel, 1])
    return raw


class RelayTests(TestCase):
    """Told to do nothing, the attacker is invisible, and sees everything."""

    @defer.inlineCallbacks
    def test_binary_messages_relayed_byte_identical(self):
        """Messages published and received by our RedisBus through the relay arrive in order
        and byte-identical (digits, empty, invalid UTF-8, NUL, 300 KiB random); each PUBLISH
        reports its one true receiver; the eavesdropper's log holds every PUBLISH in order;
        both of the bus's connections are relayed."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        payloads = [b"123", b"", b"\xff\xfe\xc3(\x00 not utf-8", b"-1", os.urandom(300 * 1024), b"OK"]
        counts = yield defer.gatherResults([bus.publish(CHANNEL, p) for p in payloads])
        received = yield inbox.wait(len(payloads))
        self.assertEqual(received, payloads)
        self.assertEqual(counts, [1] * len(payloads))
        self.assertEqual(hostile.publishes, [(CHANNEL, p) for p in payloads])
        self.assertEqual(hostile.connections(), 2)

    @defer.inlineCallbacks
    def test_auth_select_ping_numsub_through_relay(self):
        """Against a Redis with a password, the bus's AUTH and SELECT (status replies re-encoded
        as bulk strings) succeed through the relay, a health-check PING on both connections
        answers, and PUBSUB NUMSUB reports the true subscriber counts."""
        hostile = yield attacked_redis(self, password="s3cret")
        bus, _ = yield bus_via(self, hostile, CHANNEL, password="s3cret")
        yield bus._watch()  # PINGs both links; a dead link would be aborted
        self.assertTrue(bus.connected)
        counts = yield bus.numsub([CHANNEL, b"nobody"])
        self.assertEqual(counts, {CHANNEL: 1, b"nobody": 0})


class LieTests(TestCase):
    """The attacker misreports receiver counts."""

    @defer.inlineCallbacks
    def test_publish_count_lie_reaches_client(self):
        """With publish_count set, PUBLISH answers what it returns, computed from the channel,
        message and the true count (1); the message is still delivered."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        seen: list[tuple[bytes, bytes, int]] = []

        def lie(channel: bytes, message: bytes, real: int) -> int:
            seen.append((channel, message, real))
            return real + 41

        hostile.publish_count = lie
        count = yield bus.publish(CHANNEL, b"m")
        self.assertEqual(count, 42)
        self.assertEqual(seen, [(CHANNEL, b"m", 1)])
        self.assertEqual((yield inbox.wait(1)), [b"m"])

    @defer.inlineCallbacks
    def test_numsub_lie_reaches_client(self):
        """With numsub_count set, PUBSUB NUMSUB answers its value per channel (given the true
        counts 1 and 0), e.g. a live subscriber reported gone and a dead one alive."""
        hostile = yield attacked_redis(self)
        bus, _ = yield bus_via(self, hostile, CHANNEL)
        seen: list[tuple[bytes, int]] = []

        def lie(channel: bytes, real: int) -> int:
            seen.append((channel, real))
            return 1 - real

        hostile.numsub_count = lie
        counts = yield bus.numsub([CHANNEL, b"dead"])
        self.assertEqual(counts, {CHANNEL: 0, b"dead": 1})
        self.assertEqual(seen, [(CHANNEL, 1), (b"dead", 0)])


class WithholdingTests(TestCase):
    """The attacker drops, holds back, releases, reorders and duplicates publications."""

    @defer.inlineCallbacks
    def test_drop(self):
        """A dropped PUBLISH is answered with a made-up count (1, or publish_count(ch, msg, 1))
        but never reaches the subscriber: the next message is the first to arrive."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        hostile.on_publish = lambda channel, message: "drop" if message.startswith(b"lost") else "pass"
        self.assertEqual((yield bus.publish(CHANNEL, b"lost-1")), 1)
        hostile.publish_count = lambda channel, message, real: real * 100
        self.assertEqual((yield bus.publish(CHANNEL, b"lost-2")), 100)
        self.assertEqual((yield bus.publish(CHANNEL, b"kept")), 100)
        self.assertEqual((yield inbox.wait(1)), [b"kept"])
        self.assertEqual(hostile.held, [])
        self.assertEqual([m for _, m in hostile.publishes], [b"lost-1", b"lost-2", b"kept"])

    @defer.inlineCallbacks
    def test_hold_then_release_in_order(self):
        """Held PUBLISHes are answered at once (count 1) and kept in ``held``, undelivered
        while a later message passes; release(predicate) publishes the matching ones in their
        order and returns how many, leaving the rest held; release() publishes the rest."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        hostile.on_publish = lambda channel, message: "hold" if message.startswith(b"h") else "pass"
        counts = yield defer.gatherResults([bus.publish(CHANNEL, m) for m in (b"h1", b"h2", b"h3", b"now")])
        self.assertEqual(counts, [1, 1, 1, 1])
        self.assertEqual((yield inbox.wait(1)), [b"now"])
        self.assertEqual(hostile.held, [(CHANNEL, b"h1"), (CHANNEL, b"h2"), (CHANNEL, b"h3")])
        self.assertEqual(hostile.release(lambda channel, message: message != b"h2"), 2)
        yield hostile.wait_released()
        self.assertEqual((yield inbox.wait(3)), [b"now", b"h1", b"h3"])
        self.assertEqual(hostile.held, [(CHANNEL, b"h2")])
        self.assertEqual(hostile.release(), 1)
        self.assertEqual((yield inbox.wait(4)), [b"now", b"h1", b"h3", b"h2"])
        self.assertEqual(hostile.held, [])

    @defer.inlineCallbacks
    def test_release_reversed(self):
        """release_reversed() publishes every held message newest first and returns how many."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        hostile.on_publish = lambda channel, message: "hold"
        for message in (b"a", b"b", b"c"):
            yield bus.publish(CHANNEL, message)
        self.assertEqual(hostile.release_reversed(), 3)
        self.assertEqual((yield inbox.wait(3)), [b"c", b"b", b"a"])

    @defer.inlineCallbacks
    def test_duplicate(self):
        """A duplicated PUBLISH arrives twice; the client is told the first real count."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        hostile.on_publish = lambda channel, message: "duplicate" if message == b"twice" else "pass"
        self.assertEqual((yield bus.publish(CHANNEL, b"twice")), 1)
        yield bus.publish(CHANNEL, b"once")
        self.assertEqual((yield inbox.wait(3)), [b"twice", b"twice", b"once"])

    @defer.inlineCallbacks
    def test_pipelined_replies_keep_command_order(self):
        """Five PUBLISHes sent back to back (pass, drop, hold, duplicate, pass) with two real
        subscribers get their replies in command order: real counts (2) and made-up ones (1)
        each transformed by publish_count, so a misordered reply would show."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        yield bus_via(self, hostile, CHANNEL)
        decisions = {b"1": "pass", b"22": "drop", b"333": "hold", b"4444": "duplicate", b"55555": "pass"}
        hostile.on_publish = lambda channel, message: decisions[message]
        hostile.publish_count = lambda channel, message, real: real * 1000 + len(message)
        counts = yield defer.gatherResults([bus.publish(CHANNEL, m) for m in decisions])
        self.assertEqual(counts, [2001, 1002, 1003, 2004, 2005])
        self.assertEqual((yield inbox.wait(4)), [b"1", b"4444", b"4444", b"55555"])


class ForgeryTests(TestCase):
    """The attacker publishes and floods on its own."""

    @defer.inlineCallbacks
    def test_inject_reaches_subscriber(self):
        """inject() publishes on the real Redis (true count 1); the subscriber gets it; it is
        not a client PUBLISH, so the eavesdropper's log does not list it."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        self.assertEqual((yield hostile.inject(CHANNEL, b"forged\xff")), 1)
        self.assertEqual((yield inbox.wait(1)), [b"forged\xff"])
        self.assertEqual(hostile.publishes, [])

    @defer.inlineCallbacks
    def test_oversized_message_is_well_formed_between_relayed_ones(self):
        """An 8 MiB oversized push reaches a raw subscriber as one well-formed pub/sub message
        of exactly that size (zero bytes), among relayed messages published just before it
        (64 KiB each) and while it streams, which all arrive whole and in order (the push is
        never spliced into a relayed reply, nor a reply into the push)."""
        hostile = yield attacked_redis(self)
        raw = yield raw_subscriber(self, hostile, CHANNEL)
        bus, _ = yield bus_via(self, hostile)
        size = 8 << 20
        before = [bytes([i]) * 65536 for i in range(8)]
        after = [b"after-%d" % i for i in range(3)]
        published = [bus.publish(CHANNEL, m) for m in before]
        pushed = hostile.send_oversized(CHANNEL, size, chunk=256 * 1024)
        published += [bus.publish(CHANNEL, m) for m in after]  # relayed while the push streams
        yield defer.gatherResults(published)
        yield pushed
        replies = yield raw.wait(1 + len(before) + 1 + len(after))
        messages = replies[1:]
        self.assertTrue(all(m[:2] == [b"message", CHANNEL] and len(m) == 3 for m in messages))
        bodies = [m[2] for m in messages]
        huge = [b for b in bodies if len(b) == size]
        self.assertEqual(len(huge), 1)
        self.assertEqual(huge[0], bytes(size))
        self.assertEqual([b for b in bodies if len(b) != size], before + after)
        self.assertEqual(bodies[-len(after):], after)

    @defer.inlineCallbacks
    def test_oversized_push_honours_backpressure(self):
        """A 1 GiB push to a subscriber that stops reading does not complete (the producer
        waits on the client's TCP window instead of buffering); it fires once that client
        closes, and the fixture is still serving."""
        hostile = yield attacked_redis(self)
        raw = yield raw_subscriber(self, hostile, CHANNEL)
        raw.transport.pauseProducing()
        pushed = hostile.send_oversized(CHANNEL, 1 << 30)
        yield deferLater(0.3)
        self.assertFalse(pushed.called)
        self.assertLess(raw.received_bytes, 64 << 20)
        raw.transport.abortConnection()
        yield pushed.addTimeout(WAIT, reactor)
        yield raw.lost
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        yield bus.publish(CHANNEL, b"still serving")
        self.assertEqual((yield inbox.wait(1)), [b"still serving"])

    @defer.inlineCallbacks
    def test_oversized_without_subscriber_fails(self):
        """send_oversized fails with LookupError when no relayed connection subscribes to the
        channel (a flood that reaches no victim is a mistake in the test)."""
        hostile = yield attacked_redis(self)
        yield bus_via(self, hostile, b"other")
        yield self.assertFailure(hostile.send_oversized(CHANNEL, 1024), LookupError)


def deferLater(seconds: float) -> defer.Deferred[None]:
    """Wait ``seconds`` of reactor time (for a check that something does NOT happen)."""
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class LifecycleTests(TestCase):
    """Network cuts and shutdown."""

    @defer.inlineCallbacks
    def test_drop_connections_cuts_and_clients_reconnect(self):
        """drop_connections() closes both relayed connections of the bus (it reports
        disconnected); the bus reconnects through the attacker and works again."""
        hostile = yield attacked_redis(self)
        bus, inbox = yield bus_via(self, hostile, CHANNEL)
        states: list[bool] = []
        back: defer.Deferred[None] = defer.Deferred()

        def state(connected: bool) -> None:
            states.append(connected)
            if connected and not back.called:
                back.callback(None)

        bus.on_state = state
        hostile.drop_connections()
        yield back.addTimeout(WAIT, reactor)
        self.assertEqual(states, [False, True])
        self.assertEqual(hostile.connections(), 2)
        yield bus.publish(CHANNEL, b"again")
        self.assertEqual((yield inbox.wait(1)), [b"again"])

    @defer.inlineCallbacks
    def test_stop_leaves_nothing(self):
        """stop(), with relayed connections open, an attacker connection open and a 1 GiB push
        in progress, closes all of them, ends the push and stops listening: no connection is
        counted and a new connection to the port is refused (trial then checks that no socket
        or timer is left in the reactor)."""
        hostile = yield attacked_redis(self)
        raw = yield raw_subscriber(self, hostile, CHANNEL)
        raw.transport.pauseProducing()
        yield bus_via(self, hostile, CHANNEL)
        yield hostile.inject(CHANNEL, b"x")
        pushed = hostile.send_oversized(CHANNEL, 1 << 30)
        self.assertEqual(hostile.connections(), 3)
        yield hostile.stop()
        self.assertEqual(hostile.connections(), 0)
        yield pushed.addTimeout(WAIT, reactor)
        raw.transport.resumeProducing()  # a client that does not read never sees the cut
        yield raw.lost.addTimeout(WAIT, reactor)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", hostile.port)
        yield self.assertFailure(connectProtocol(endpoint, Protocol()), ConnectionRefusedError)
