"""The pub/sub bus: the interface, RedisBus (txredisapi) and MemoryBus (unit tests).

This is the only module that imports txredisapi. Everything that works around txredisapi
1.6.0 lives here, each in one clearly named place:

* binary safety: ``charset=None, convertNumbers=False`` on both connections
  (:func:`_binary_safe`), or payloads come back as str/int;
* no automatic resubscription: :class:`_Subscriber` resubscribes on every connection;
* subscribe/unsubscribe replies can be mismatched when fired concurrently: they are
  serialised with a lock (:meth:`RedisBus._subscription`);
* a failed AUTH/SELECT during a reconnect stops reconnecting for good: the watchdog
  (:meth:`RedisBus._watch`) replaces a factory that gave up;
* commands issued while disconnected wait instead of failing: :meth:`RedisBus.publish`
  fails at once when the link is down, and a health-check PING with a timeout detects a
  dead link that TCP has not noticed.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from typing import Any, Callable, Protocol

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge.channels import Channels
from ppbridge.config import MAX_FRAME_SIZE, RedisSettings
from ppbridge.errors import BusUnavailable
from ppbridge.respguard import RespGuard, RespProtocolError
from ppbridge.timers import Periodic
from ppbridge.wire import OVERHEAD

log = Logger()

MessageHandler = Callable[[bytes, bytes], None]
StateHandler = Callable[[bool], None]
OversizedHandler = Callable[[bytes, int], None]
HEALTH_INTERVAL = 5.0
HEALTH_TIMEOUT = 5.0
SMALL_MESSAGE = 64 * 1024  # the limit on the negotiation and announcement channels


class Bus(Protocol):
    """What the services need from pub/sub."""

    on_message: MessageHandler
    on_state: StateHandler
    on_oversized: OversizedHandler  # (channel, size) of a message refused for its size, unread
    max_message: int  # the longest message accepted (the negotiation channels: 64 KiB at most)

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...

    def publish(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]: ...

    def subscribe(self, channel: bytes) -> Deferred[None]: ...

    def unsubscribe(self, channel: bytes) -> Deferred[None]: ...

    def psubscribe(self, pattern: bytes) -> Deferred[None]: ...

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]: ...


def _ignore(*args: object) -> None:
    return None


def _as_unavailable(failure: Failure) -> Failure:
    """txredisapi's ConnectionError (link lost mid-command) as our BusUnavailable."""
    if failure.check(txredisapi.ConnectionError):
        return Failure(BusUnavailable(f"ppbridge: Redis connection lost ({failure.getErrorMessage()})"))
    return failure


# --- Redis --------------------------------------------------------------------------------


def _binary_safe(factory: txredisapi.RedisFactory, settings: RedisSettings) -> None:
    """txredisapi decodes UTF-8 and numbers by default; we need bytes in, bytes out."""
    factory.charset = None
    factory.convertNumbers = False
    factory.password = settings.password
    factory.username = settings.username
    factory.dbid = settings.db


class _Backoff:
    """Reconnect quickly: 0.1 s doubling to 2 s, with txredisapi's jitter."""

    initialDelay = 0.1
    factor = 2.0
    maxDelay = 2.0


class _Guarded:
    """A :class:`~ppbridge.respguard.RespGuard` in front of txredisapi's reply reader, which
    (hiredis or not) buffers any bulk string whole: a reply the guard refuses costs one log
    line and the connection, which the factory re-establishes. Checked against txredisapi
    1.6.0: ``dataReceived(data, unpause)`` is the reader's only entry, and its non-hiredis
    reader calls it again with ``unpause=True`` for bytes it has already been given."""

    guard: RespGuard | None = None  # None before the connection and after a refusal
    transport: Any  # the protocol's; declared for the type checker
    name = "connection"

    def new_guard(self) -> RespGuard:
        return RespGuard()

    def connectionMade(self):  # type: ignore[no-untyped-def]
        self.guard = self.new_guard()
        return super().connectionMade()  # type: ignore[misc]

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if not unpause:
            if self.guard is None:
                return  # refused already; the connection is going
            try:
                data = self.guard.feed(data)
            except RespProtocolError as err:
                log.warn("Redis {name}: refusing the server's reply ({err}); reconnecting",
                         name=self.name, err=err)
                self.guard = None
                self.transport.abortConnection()
                return
        if data or unpause:
            super().dataReceived(data, unpause)  # type: ignore[misc]


class _Publisher(_Guarded, txredisapi.RedisProtocol):
    """txredisapi's command builder copies every argument about three times (bytearray
    extend, concatenation, bytes()); for a 256 KiB frame one join is enough. Replies are
    small (no bulk over 64 KiB: :class:`_Guarded`)."""

    name = "publisher"

    def _build_command(self, *args: bytes | bytearray | str | int, **kwargs: object) -> bytes:
        parts: list[bytes | bytearray] = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode("utf-8")
            elif isinstance(arg, int):
                arg = b"%d" % arg
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        return b"".join(parts)


class _PublisherFactory(_Backoff, txredisapi.RedisFactory):
    protocol = _Publisher

    def __init__(self, bus: RedisBus) -> None:
        txredisapi.RedisFactory.__init__(self, None, None, 1, isLazy=True)
        self.bus = bus

    def addConnection(self, conn: txredisapi.RedisProtocol) -> None:
        super().addConnection(conn)
        if conn.connected and not self.disconnectCalled:
            self.bus._publisher_up(conn)

    def delConnection(self, conn: txredisapi.RedisProtocol) -> None:
        super().delConnection(conn)
        self.bus._publisher_down(conn)


class _Subscriber(_Guarded, txredisapi.SubscriberProtocol):
    """Delivers messages to the bus and resubscribes after every (re)connection. A message
    over the bus's limit for its channel is skipped as it streams in and reported to
    ``bus.on_oversized``; the empty message the guard leaves in its place is not delivered."""

    factory: _SubscriberFactory
    name = "subscriber"

    def new_guard(self) -> RespGuard:
        return RespGuard(self.factory.bus.limit_for, self._oversized)

    def _oversized(self, channel: bytes, size: int) -> None:
        try:
            self.factory.bus.on_oversized(channel, size)
        except Exception:
            log.failure("reporting an oversized bus message failed")

    def replyReceived(self, reply: object) -> None:
        if self.guard is None or not self.guard.delivered():
            super().replyReceived(reply)

    @defer.inlineCallbacks
    def connectionMade(self):  # type: ignore[no-untyped-def]
        # Twisted ignores what connectionMade returns, so nothing may escape from here.
        try:
            yield super().connectionMade()  # AUTH and SELECT
            if self.connected and self._ready:
                yield self.factory.bus._subscriber_up(self)
        except Exception as err:
            log.info("Redis subscriber connection failed while starting: {err}", err=err)

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self.factory.bus.on_message(channel, message)

    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.bus._subscriber_down(self)


class _SubscriberFactory(_Backoff, txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, bus: RedisBus) -> None:
        txredisapi.SubscriberFactory.__init__(self, isLazy=True)
        self.bus = bus


class RedisBus:
    """Two Redis connections: one publishes, one subscribes; both reconnect with backoff."""

    def __init__(self, settings: RedisSettings, clock: IReactorTime, reactor: object = None) -> None:
        self.settings = settings
        self.on_message: MessageHandler = _ignore
        self.on_state: StateHandler = _ignore
        # A message longer than its channel's limit is skipped as it streams in and reported
        # here instead of reaching on_message. The services set max_message to their frame
        # limit; until then the largest frame the configuration allows.
        self.on_oversized: OversizedHandler = _ignore
        self.max_message = MAX_FRAME_SIZE + OVERHEAD
        channels = Channels(settings.namespace)
        self._small_channels = frozenset((channels.negotiate, channels.announce))
        self._clock = clock
        self._reactor = reactor if reactor is not None else clock
        self._channels: set[bytes] = set()
        self._patterns: set[bytes] = set()
        self._lock = defer.DeferredLock()
        self._pub: txredisapi.RedisProtocol | None = None
        self._sub: _Subscriber | None = None
        self._pub_factory: _PublisherFactory | None = None
        self._sub_factory: _SubscriberFactory | None = None
        self._watchdog = Periodic(clock, HEALTH_INTERVAL, self._watch, "Redis watchdog")
        self._running = False
        self._was_connected = False

    def limit_for(self, channel: bytes) -> int:
        """The longest message accepted on ``channel``."""
        return SMALL_MESSAGE if channel in self._small_channels else self.max_message

    # lifecycle

    def _endpoint(self) -> object:
        s = self.settings
        endpoint = HostnameEndpoint(self._reactor, s.host, s.port, timeout=10)
        if not s.tls:
            return endpoint
        trust = Certificate.loadPEM(s.ca_file.read_bytes()) if s.ca_file else platformTrust()
        return wrapClientTLS(optionsForClientTLS(s.host, trustRoot=trust), endpoint)

    def start(self) -> None:
        self._running = True
        self._pub_factory = self._connect(_PublisherFactory(self))
        self._sub_factory = self._connect(_SubscriberFactory(self))
        self._watchdog.start()

    def _connect(self, factory: txredisapi.RedisFactory) -> txredisapi.RedisFactory:
        _binary_safe(factory, self.settings)
        # The factory's first-connection Deferred fails when Redis refuses AUTH/SELECT; the
        # watchdog deals with that, this only keeps the failure from going unhandled.
        factory.deferred.addErrback(lambda f: log.warn("Redis refused the connection: {err}",
                                                       err=f.getErrorMessage()))
        factory.startConnecting(self._endpoint())
        return factory

    def stop(self) -> Deferred[None]:
        self._running = False
        self._watchdog.stop()
        factories = [f for f in (self._pub_factory, self._sub_factory) if f is not None]
        return defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True).addBoth(_ignore)

    @property
    def connected(self) -> bool:
        return self._pub is not None and self._sub is not None

    # connection events

    def _publisher_up(self, conn: txredisapi.RedisProtocol) -> None:
        self._pub = conn
        self._changed()

    def _publisher_down(self, conn: txredisapi.RedisProtocol) -> None:
        if self._pub is conn:
            self._pub = None
            self._changed()

    @defer.inlineCallbacks
    def _subscriber_up(self, proto: _Subscriber):  # type: ignore[no-untyped-def]
        try:
            with_lock = self._lock.run(self._resubscribe, proto)
            yield with_lock
        except Exception:
            log.failure("resubscribing failed; dropping the connection to retry")
            proto.transport.loseConnection()
            return
        if proto.connected:
            self._sub = proto
            self._changed()

    @defer.inlineCallbacks
    def _resubscribe(self, proto: _Subscriber):  # type: ignore[no-untyped-def]
        if self._channels:
            yield proto.subscribe(sorted(self._channels))
        if self._patterns:
            yield proto.psubscribe(sorted(self._patterns))

    def _subscriber_down(self, proto: _Subscriber) -> None:
        if self._sub is proto:
            self._sub = None
            self._changed()

    def _changed(self) -> None:
        now = self.connected
        if now != self._was_connected:
            self._was_connected = now
            log.info("Redis {state} ({host}:{port})", state="connected" if now else "disconnected",
                     host=self.settings.host, port=self.settings.port)
            self.on_state(now)

    # watchdog

    def _watch(self) -> Deferred[None]:
        """Replace factories that gave up (failed AUTH/SELECT) and PING both links."""
        for attr, make in (("_pub_factory", _PublisherFactory), ("_sub_factory", _SubscriberFactory)):
            factory = getattr(self, attr)
            if self._running and factory is not None and factory.stopped and not factory.disconnectCalled:
                log.warn("Redis refused the connection setup (AUTH/SELECT); retrying")
                factory.disconnect()
                setattr(self, attr, self._connect(make(self)))
        checks = [self._ping(p) for p in (self._pub, self._sub) if p is not None]
        return defer.gatherResults(checks, consumeErrors=True).addBoth(_ignore)

    def _ping(self, proto: txredisapi.BaseRedisProtocol) -> Deferred[None]:
        def dead(failure: object) -> None:
            log.warn("Redis did not answer a health check; reconnecting")
            if proto.transport is not None:
                proto.transport.abortConnection()

        d = proto.ping()
        d.addTimeout(HEALTH_TIMEOUT, self._clock)
        return d.addCallbacks(_ignore, dead)

    # pub/sub

    def publish(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        """PUBLISH; fires with the number of receivers. Fails at once when disconnected."""
        pub = self._pub
        if pub is None or not pub.connected:
            return defer.fail(BusUnavailable())
        return pub.execute_command(b"PUBLISH", channel, message).addErrback(_as_unavailable)

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]:
        """PUBSUB NUMSUB: plain subscribers per channel (pattern subscribers don't count, so a
        ``PSUBSCRIBE *`` onlooker cannot make a dead proxy look alive)."""
        pub = self._pub
        if pub is None or not pub.connected:
            return defer.fail(BusUnavailable())
        d = pub.execute_command(b"PUBSUB", b"NUMSUB", *channels).addErrback(_as_unavailable)
        return d.addCallback(lambda r: {bytes(r[i]): int(r[i + 1]) for i in range(0, len(r), 2)})

    def _subscription(self, command: str, name: bytes) -> Deferred[None]:
        def run() -> Deferred[None]:
            sub = self._sub
            if sub is None or not sub.connected:
                return defer.succeed(None)  # applied by _resubscribe on the next connection
            d: Deferred[None] = getattr(sub, command)([name]).addCallbacks(_ignore, _as_unavailable)
            return d

        return self._lock.run(run)

    def subscribe(self, channel: bytes) -> Deferred[None]:
        self._channels.add(channel)
        return self._subscription("subscribe", channel)

    def unsubscribe(self, channel: bytes) -> Deferred[None]:
        self._channels.discard(channel)
        return self._subscription("unsubscribe", channel)

    def psubscribe(self, pattern: bytes) -> Deferred[None]:
        self._patterns.add(pattern)
        return self._subscription("psubscribe", pattern)


# --- in memory ----------------------------------------------------------------------------


class MemoryBroker:
    """A pub/sub broker in memory with Redis's ordering: FIFO, delivered to each subscriber.

    For unit tests of the sans-I/O core. ``published`` records everything (an eavesdropper);
    ``drop`` can be set to a predicate that loses chosen messages.
    """

    def __init__(self) -> None:
        self.clients: list[MemoryBus] = []
        self.published: list[tuple[bytes, bytes]] = []
        self.drop: Callable[[bytes, bytes], bool] | None = None
        self._queue: deque[tuple[MemoryBus, bytes, bytes]] = deque()
        self._delivering = False

    def client(self) -> MemoryBus:
        bus = MemoryBus(self)
        self.clients.append(bus)
        return bus

    def publish(self, channel: bytes, message: bytes) -> int:
        self.published.append((channel, message))
        receivers = [c for c in self.clients if c.connected and c.wants(channel)]
        if self.drop is not None and self.drop(channel, message):
            return len(receivers)
        for client in receivers:
            self._queue.append((client, channel, message))
        if not self._delivering:
            self._delivering = True
            try:
                while self._queue:
                    client, ch, msg = self._queue.popleft()
                    if len(msg) > client.max_message:  # as RedisBus: refused unread
                        client.on_oversized(ch, len(msg))
                    else:
                        client.on_message(ch, msg)
            finally:
                self._delivering = False
        return len(receivers)


class MemoryBus:
    """One client of a :class:`MemoryBroker`; same interface as :class:`RedisBus`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self.on_message: MessageHandler = _ignore
        self.on_state: StateHandler = _ignore
        self.on_oversized: OversizedHandler = _ignore
        self.max_message = MAX_FRAME_SIZE + OVERHEAD
        self.channels: set[bytes] = set()
        self.patterns: set[bytes] = set()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        self.set_connected(True)

    def stop(self) -> Deferred[None]:
        self.set_connected(False)
        return defer.succeed(None)

    def set_connected(self, up: bool) -> None:
        """Simulate the link going down or coming back."""
        if up != self._connected:
            self._connected = up
            self.on_state(up)

    def wants(self, channel: bytes) -> bool:
        text = channel.decode("latin-1")
        return channel in self.channels or any(
            fnmatch.fnmatchcase(text, p.decode("latin-1")) for p in self.patterns
        )

    def publish(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        if not self._connected:
            return defer.fail(BusUnavailable())
        return defer.succeed(self._broker.publish(channel, bytes(message)))

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]:
        if not self._connected:
            return defer.fail(BusUnavailable())
        live = [c for c in self._broker.clients if c.connected]
        return defer.succeed({ch: sum(ch in c.channels for c in live) for ch in channels})

    def subscribe(self, channel: bytes) -> Deferred[None]:
        self.channels.add(channel)
        return defer.succeed(None)

    def unsubscribe(self, channel: bytes) -> Deferred[None]:
        self.channels.discard(channel)
        return defer.succeed(None)

    def psubscribe(self, pattern: bytes) -> Deferred[None]:
        self.patterns.add(pattern)
        return defer.succeed(None)
