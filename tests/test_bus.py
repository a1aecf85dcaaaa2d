"""RedisBus's connections: the publisher, the main subscriber and the public subscriber.

The story: anyone who can publish on Redis floods ``ns:negotiate`` or ``ns:announce`` faster
than a process reads, and Redis drops the connection subscribed to them. That connection is
the public subscriber, on its own: losing it must not look like "Redis down" to the services
(``connected``, ``on_state``), must not touch the main subscriber (replies, data), and it must
come back by itself, also after a refused AUTH, and deliver again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ppbridge import bus as bus_module
from ppbridge.bus import HEALTH_INTERVAL, LOSS_LOG_PERIOD, RedisBus, _SubscriberFactory
from ppbridge.config import RedisSettings
from ppbridge.redis_server import RedisServer
from tests.redisclient import RawRedisClient
from tests.support import poll, redis_clients, start_redis

PUBLIC = b"ns:negotiate"
MAIN = b"ns:p:alpha:" + b"0" * 16
PATTERN = b"ns:f:00:*"
WAIT = 10.0


class Watched:
    """A RedisBus on a real Redis, with what it reported: messages and state changes."""

    def __init__(self, case: TestCase, server: RedisServer, *channels: bytes, password: str | None = None) -> None:
        settings = RedisSettings(url=server.url, host="127.0.0.1", port=server.port, password=password,
                                 namespace="ns")
        self.bus = RedisBus(settings, reactor)
        self.messages: list[tuple[bytes, bytes]] = []
        self.states: list[bool] = []
        self.publics = 0  # times the public subscriber said it is up and subscribed
        self.bus.on_message = lambda channel, data: self.messages.append((channel, data))
        self.bus.on_state = self.states.append
        self.bus.on_public = self._public_up
        for channel in channels:
            self.bus.subscribe(channel)
        self.bus.psubscribe(PATTERN)
        self.bus.start()
        case.addCleanup(self.bus.stop)

    def _public_up(self) -> None:
        self.publics += 1

    def got(self, channel: bytes, data: bytes) -> bool:
        return (channel, data) in self.messages


@defer.inlineCallbacks
def delivered(admin: RawRedisClient, watched: Watched, channel: bytes, data: bytes):  # type: ignore[no-untyped-def]
    """Publish ``data`` on ``channel`` until a subscriber takes it, then wait for the bus to
    hand it to on_message (a subscription being restored reaches nobody meanwhile)."""
    yield poll(lambda: admin.publish(channel, data) == 1, WAIT, f"a subscriber of {channel!r}", interval=0.1)
    yield poll(lambda: watched.got(channel, data), WAIT, f"{data!r} delivered on {channel!r}")


class PublicSubscriberTests(TestCase):
    """Against a real redis-server."""

    @defer.inlineCallbacks
    def test_connections_named_and_public_channels_apart(self):
        """A bus subscribed to ``ns:negotiate``, a data channel and a pattern has three
        connections, named ppbridge-publisher, -subscriber and -public in CLIENT LIST; the
        public one holds only ``ns:negotiate``, the main one the rest. A bus with no public
        channel opens no public connection."""
        server = start_redis(self)
        admin = RawRedisClient("127.0.0.1", server.port)
        self.addCleanup(admin.close)
        watched = Watched(self, server, PUBLIC, MAIN)
        yield delivered(admin, watched, PUBLIC, b"one")
        yield delivered(admin, watched, MAIN, b"two")
        named = redis_clients(admin)
        self.assertEqual(sorted(named), ["ppbridge-public", "ppbridge-publisher", "ppbridge-subscriber"])
        self.assertEqual((named["ppbridge-public"]["sub"], named["ppbridge-public"]["psub"]), ("1", "0"))
        self.assertEqual((named["ppbridge-subscriber"]["sub"], named["ppbridge-subscriber"]["psub"]), ("1", "1"))
        yield watched.bus.stop()
        yield poll(lambda: not redis_clients(admin), WAIT, "the bus's connections closed")
        private = Watched(self, server, MAIN)
        yield delivered(admin, private, MAIN, b"three")
        self.assertEqual(sorted(redis_clients(admin)), ["ppbridge-publisher", "ppbridge-subscriber"])

    @defer.inlineCallbacks
    def test_losing_the_public_subscriber_is_not_redis_down(self):
        """CLIENT KILL of just the public subscriber (found by its name): the bus counts one
        loss, ``connected`` stays true and ``on_state`` is never called again; the main
        subscriber, untouched, keeps delivering; the public one reconnects by itself and
        delivers ``ns:negotiate`` again, without Twisted's "Scheduling retry" line (which a
        flood would repeat several times a second); ``on_public`` said it was up once at the
        start and once more when it was back (a forwarder announces itself again then)."""
        retries: list[dict[str, Any]] = []

        def observer(event: dict[str, Any]) -> None:
            if "Scheduling retry" in (event.get("log_format") or ""):
                retries.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        server = start_redis(self)
        admin = RawRedisClient("127.0.0.1", server.port)
        self.addCleanup(admin.close)
        watched = Watched(self, server, PUBLIC, MAIN)
        yield delivered(admin, watched, PUBLIC, b"before")
        before = redis_clients(admin)
        self.assertEqual(admin.command("CLIENT", "KILL", "ID", before["ppbridge-public"]["id"]), 1)
        yield poll(lambda: watched.bus.public_losses == 1, WAIT, "the loss counted")
        self.assertTrue(watched.bus.connected)
        yield delivered(admin, watched, MAIN, b"meanwhile")
        yield delivered(admin, watched, PUBLIC, b"after")
        after = redis_clients(admin)
        self.assertNotEqual(after["ppbridge-public"]["id"], before["ppbridge-public"]["id"])
        self.assertEqual(after["ppbridge-subscriber"]["id"], before["ppbridge-subscriber"]["id"])
        self.assertEqual(watched.states, [True])
        self.assertTrue(watched.bus.connected)
        self.assertEqual(watched.bus.public_losses, 1)
        self.assertEqual(retries, [])
        self.assertEqual(watched.publics, 2)

    @defer.inlineCallbacks
    def test_public_subscriber_back_after_refused_auth(self):
        """The public subscriber dropped while Redis has another password: its reconnect fails
        AUTH (txredisapi then stops reconnecting for good), the bus stays connected; once the
        password is right again, the watchdog (every 5 s) brings the public subscriber back
        and ``ns:negotiate`` is delivered again."""
        right, wrong = "right-password-1", "other-password-2"
        server = start_redis(self, password=right)
        admin = RawRedisClient("127.0.0.1", server.port, right)
        self.addCleanup(admin.close)
        watched = Watched(self, server, PUBLIC, MAIN, password=right)
        yield delivered(admin, watched, PUBLIC, b"before")
        admin.command("CONFIG", "SET", "requirepass", wrong)
        admin.command("CLIENT", "KILL", "ID", redis_clients(admin)["ppbridge-public"]["id"])
        factory = watched.bus._public.factory
        yield poll(lambda: factory is not None and factory.stopped, WAIT, "the public factory giving up on AUTH")
        self.assertTrue(watched.bus.connected)
        admin.command("CONFIG", "SET", "requirepass", right)
        yield poll(lambda: admin.publish(PUBLIC, b"after") == 1, HEALTH_INTERVAL + WAIT, "the public subscriber back",
                   interval=0.2)
        yield poll(lambda: watched.got(PUBLIC, b"after"), WAIT, "delivered again")
        self.assertEqual(watched.states, [True])


class StopTests(TestCase):
    @defer.inlineCallbacks
    def test_stop_twice_even_from_the_first_stops_callback(self):
        """stop() called again while the first stop() is firing (from its callback) and once
        more afterwards: each call's Deferred fires, nothing raises (disconnecting a factory
        twice used to re-enter Twisted's reconnecting client: RuntimeError)."""
        server = start_redis(self)
        watched = Watched(self, server, PUBLIC, MAIN)
        yield poll(lambda: watched.bus.connected, WAIT, "the bus connected")
        second: list[Deferred[None]] = []
        first = watched.bus.stop().addCallback(lambda _: second.append(watched.bus.stop()))
        yield first
        yield second[0]
        yield watched.bus.stop()
        self.assertFalse(watched.bus.connected)


class LossLogTests(TestCase):
    """No sockets: public-subscriber protocols on StringTransports, time on a Clock."""

    def test_losses_counted_and_logged_once_a_minute(self):
        """100 losses of the public subscriber within 30 s (a flood) are all counted, but
        logged in one line; the watchdog tick a minute after it logs one more line for the
        other 99; the main state is never reported."""
        clock = Clock()
        events: list[dict[str, Any]] = []
        self.patch(bus_module, "log", Logger(observer=events.append))
        bus = RedisBus(RedisSettings(namespace="ns"), clock)
        states: list[bool] = []
        bus.on_state = states.append
        bus.subscribe(PUBLIC)
        factory = _SubscriberFactory(bus, bus._public)
        factory.charset, factory.convertNumbers, factory.dbid = None, False, 0
        for _ in range(100):
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(b"+OK\r\n+OK\r\n")  # SELECT, CLIENT SETNAME
            proto.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$12\r\nns:negotiate\r\n:1\r\n")
            self.assertIs(bus._public.proto, proto)
            proto.connectionLost(Failure(ConnectionDone()))
            clock.advance(0.3)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(bus.public_losses, 100)
        self.assertEqual([e["n"] for e in warnings], [1])
        clock.advance(LOSS_LOG_PERIOD - 30)
        bus._watch()
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual([(e["n"], e["total"]) for e in warnings], [(1, 1), (99, 100)])
        self.assertEqual(states, [])
        self.assertFalse(bus.connected)
