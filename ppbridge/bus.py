"""The pub/sub bus: the interface and RedisBus (txredisapi); MemoryBus is in ppbridge.memorybus.

This is the only module that imports txredisapi. Everything that works around txredisapi
1.6.0 lives here, each in one clearly named place:

* binary safety: ``charset=None, convertNumbers=False`` on both connections
  (:func:`_binary_safe`), or payloads come back as str/int;
* no automatic resubscription: :class:`_Subscriber` resubscribes on every connection;
* subscribe/unsubscribe replies can be mismatched when fired concurrently: they are
  serialised with a lock per subscriber connection (:meth:`RedisBus._subscription`);
* a failed AUTH/SELECT during a reconnect stops reconnecting for good: the watchdog
  (:meth:`RedisBus._watch`) replaces a factory that gave up;
* no CLIENT SETNAME option: :class:`_Guarded` names each connection (``ppbridge-publisher``,
  ``-subscriber``, ``-public``) so an operator can tell them apart in CLIENT LIST;
* Twisted's ClientService logs a line per reconnection, which a flood would turn into
  several a second for the public subscriber: :func:`_quiet_reconnects` silences that one;
* commands issued while disconnected wait instead of failing: :meth:`RedisBus.publish`
  fails at once when the link is down, and a health-check PING with a timeout detects a
  dead link that TCP has not noticed.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from ppbridge.channels import Channels
from ppbridge.config import MAX_FRAME_SIZE, RedisSettings
from ppbridge.errors import BusUnavailable
from ppbridge.logsafe import Throttle, escape
from ppbridge.respguard import RespGuard, RespProtocolError
from ppbridge.timers import Periodic, log_failure
from ppbridge.wire import OVERHEAD

log = Logger()

MessageHandler = Callable[[bytes, bytes], None]
StateHandler = Callable[[bool], None]
OversizedHandler = Callable[[bytes, int], None]
HEALTH_INTERVAL = 5.0
HEALTH_TIMEOUT = 5.0
SMALL_MESSAGE = 64 * 1024  # the limit on the negotiation and announcement channels
LOSS_LOG_PERIOD = 60.0  # seconds between log lines about the public subscriber's losses


class Bus(Protocol):
    """What the services need from pub/sub.

    ``connected``/``on_state`` say whether the bus can publish and receive what is addressed
    to this process. The public channels (``ns:negotiate``, ``ns:announce``: anyone may flood
    them) may be read on a connection of their own, whose loss loses only their messages and
    is counted in ``public_losses``, not reported as a state change."""

    on_message: MessageHandler
    on_state: StateHandler
    on_oversized: OversizedHandler  # (channel, size) of a message refused for its size, unread
    max_message: int  # the longest message accepted (the negotiation channels: 64 KiB at most)
    public_losses: int  # times the connection for ns:negotiate/ns:announce was lost (not "Redis down")
    on_public: Callable[[], None]  # that connection is (back) up and subscribed

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


_FactoryT = TypeVar("_FactoryT", bound=txredisapi.RedisFactory)


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
    reader calls it again with ``unpause=True`` for bytes it has already been given.

    Once AUTH/SELECT passed, the connection names itself (CLIENT SETNAME ``ppbridge-<role>``,
    sent ahead of anything else; a refusal, e.g. by an ACL, is ignored)."""

    guard: RespGuard | None = None  # None before the connection and after a refusal
    transport: Any  # the protocol's; declared for the type checker
    connected: int
    name = "connection"
    role = b"connection"

    def new_guard(self) -> RespGuard:
        return RespGuard()

    def connectionMade(self):  # type: ignore[no-untyped-def]
        self.guard = self.new_guard()
        return super().connectionMade().addCallback(self._set_name)  # type: ignore[misc]

    def _set_name(self, result: object) -> object:
        if self.connected:
            name = b"ppbridge-" + self.role
            self.execute_command(b"CLIENT", b"SETNAME", name).addErrback(_ignore)  # type: ignore[attr-defined]
        return result

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
    role = b"publisher"

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
    noisy = False  # no "Starting factory <..._PublisherFactory object at 0x...>" line

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


class _Slot:
    """One subscriber connection of a :class:`RedisBus` and what it must be subscribed to;
    owns the lock that serialises its (un)subscriptions and its current factory and
    protocol (None while down). ``limit_for`` gives the longest message accepted per channel.
    """

    def __init__(self, name: str, role: bytes, limit_for: Callable[[bytes], int]) -> None:
        self.name = name
        self.role = role
        self.limit_for = limit_for
        self.channels: set[bytes] = set()
        self.patterns: set[bytes] = set()
        self.lock = defer.DeferredLock()
        self.factory: _SubscriberFactory | None = None
        self.proto: _Subscriber | None = None
        self.joining: _Subscriber | None = None  # connected, being resubscribed


class _Subscriber(_Guarded, txredisapi.SubscriberProtocol):
    """Delivers messages to the bus and resubscribes after every (re)connection. A message
    over the slot's limit for its channel is skipped as it streams in and reported to
    ``bus.on_oversized``; the empty message the guard leaves in its place is not delivered."""

    factory: _SubscriberFactory

    def new_guard(self) -> RespGuard:
        return RespGuard(self.factory.slot.limit_for, self._oversized)

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
            yield super().connectionMade()  # AUTH, SELECT, SETNAME
            if self.connected and self._ready:
                yield self.factory.bus._subscriber_up(self)
        except Exception as err:
            self.factory.bus._warn("setup", "Redis {name} connection failed while starting: {err}", name=self.name,
                                   err=escape(str(err), 200))

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self.factory.bus.on_message(channel, message)

    def connectionLost(self, why: object) -> None:
        super().connectionLost(why)
        self.factory.bus._subscriber_down(self)


class _SubscriberFactory(_Backoff, txredisapi.SubscriberFactory):
    protocol = _Subscriber
    noisy = False  # no "Starting factory <..._SubscriberFactory object at 0x...>" line

    def __init__(self, bus: RedisBus, slot: _Slot | None = None) -> None:
        txredisapi.SubscriberFactory.__init__(self, isLazy=True)
        self.bus = bus
        self.slot = slot if slot is not None else bus._main

    def buildProtocol(self, addr: object) -> _Subscriber:
        proto: _Subscriber = super().buildProtocol(addr)
        proto.name, proto.role = self.slot.name, self.slot.role
        return proto


class RedisBus:
    """Three Redis connections: one publishes, one subscribes to everything addressed to this
    process, one to the namespace's public channels; each reconnects with backoff.

    Anyone who can publish on Redis can flood ``ns:negotiate`` and ``ns:announce``; at a rate
    beyond what this process reads, Redis drops the connection subscribed to them (its output
    buffer limit). Those channels therefore have a connection of their own (the *public*
    subscriber, opened once one of them is subscribed): losing it loses only their messages,
    is logged (one line a minute at most) and counted (:attr:`public_losses`), and is not
    "Redis down": :attr:`connected` and ``on_state`` follow the publisher and the main
    subscriber only.
    """

    def __init__(self, settings: RedisSettings, clock: IReactorTime, reactor: object = None) -> None:
        self.settings = settings
        self.on_message: MessageHandler = _ignore
        self.on_state: StateHandler = _ignore
        # A message longer than its channel's limit is skipped as it streams in and reported
        # here instead of reaching on_message. The services set max_message to their frame
        # limit; until then the largest frame the configuration allows.
        self.on_oversized: OversizedHandler = _ignore
        self.max_message = MAX_FRAME_SIZE + OVERHEAD
        self.public_losses = 0  # times the public subscriber's connection was lost
        self.on_public: Callable[[], None] = _ignore
        channels = Channels(settings.namespace)
        self.public_channels = frozenset((channels.negotiate, channels.announce))
        self._clock = clock
        self._reactor = reactor if reactor is not None else clock
        self._main = _Slot("subscriber", b"subscriber", self.limit_for)
        self._public = _Slot("public subscriber", b"public", lambda channel: SMALL_MESSAGE)
        self._pub: txredisapi.RedisProtocol | None = None
        self._pub_factory: _PublisherFactory | None = None
        self._watchdog = Periodic(clock, HEALTH_INTERVAL, self._watch, "Redis watchdog")
        self._running = False
        self._stopped: Deferred[Any] | None = None
        self._was_connected = False
        self._failures = Throttle()  # warn lines for lost or failed connections, per kind
        self._losses_logged = 0
        self._loss_log_at = float("-inf")

    def limit_for(self, channel: bytes) -> int:
        """The longest message accepted on ``channel``."""
        return SMALL_MESSAGE if channel in self.public_channels else self.max_message

    def _slot_for(self, channel: bytes) -> _Slot:
        return self._public if channel in self.public_channels else self._main

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
        self._main.factory = self._connect(_SubscriberFactory(self, self._main))
        self._open_public()
        self._watchdog.start()

    def _open_public(self) -> None:
        """Connect the public subscriber, once running and subscribed to a public channel."""
        if self._running and self._public.factory is None and self._public.channels:
            self._public.factory = self._connect(_SubscriberFactory(self, self._public))

    def _connect(self, factory: _FactoryT) -> _FactoryT:
        _binary_safe(factory, self.settings)
        # The factory's first-connection Deferred fails when Redis refuses AUTH/SELECT; the
        # watchdog deals with that, this only keeps the failure from going unhandled.
        factory.deferred.addErrback(lambda f: log.warn("Redis refused the connection: {err}",
                                                       err=f.getErrorMessage()))
        factory.startConnecting(self._endpoint())
        if isinstance(factory, _SubscriberFactory) and factory.slot is self._public:
            _quiet_reconnects(factory)  # its losses have a line of their own, once a minute
        return factory

    def stop(self) -> Deferred[None]:
        """Disconnect for good; a second call waits for the first (disconnecting a factory
        twice re-enters Twisted's reconnecting client and raises)."""
        if self._stopped is None:
            self._running = False
            self._watchdog.stop()
            factories = [f for f in (self._pub_factory, self._main.factory, self._public.factory) if f is not None]
            self._stopped = defer.gatherResults([f.disconnect() for f in factories], consumeErrors=True)
            self._stopped.addBoth(_ignore)
        waiter: Deferred[None] = Deferred()  # one per call: the first call's chain stays its own
        self._stopped.addBoth(lambda _: waiter.callback(None))
        return waiter

    @property
    def connected(self) -> bool:
        """The publisher and the main subscriber are up (the public subscriber does not count)."""
        return self._pub is not None and self._main.proto is not None

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
        slot = proto.factory.slot
        slot.joining = proto
        try:
            yield slot.lock.run(self._resubscribe, slot, proto)
        except txredisapi.ConnectionError:
            return  # lost while resubscribing: counted and retried like any loss
        except Exception:
            log.failure("resubscribing the Redis {name} failed; dropping the connection to retry", name=slot.name)
            proto.transport.loseConnection()
            return
        finally:
            if slot.joining is proto:
                slot.joining = None
        if proto.connected:
            slot.proto = proto
            if slot is self._main:
                self._changed()
            else:
                self.on_public()

    @defer.inlineCallbacks
    def _resubscribe(self, slot: _Slot, proto: _Subscriber):  # type: ignore[no-untyped-def]
        if slot.channels:
            yield proto.subscribe(sorted(slot.channels))
        if slot.patterns:
            yield proto.psubscribe(sorted(slot.patterns))

    def _subscriber_down(self, proto: _Subscriber) -> None:
        slot = proto.factory.slot
        if slot.proto is proto:
            slot.proto = None
            if slot is self._main:
                self._changed()
        if slot is self._public and not proto.factory.disconnectCalled:  # not by stop()
            self.public_losses += 1
            self._log_public_losses(self._clock.seconds())

    def _log_public_losses(self, now: float) -> None:
        """One line for the public subscriber's losses not yet logged, at most once a minute
        (a flood makes Redis drop it several times a second)."""
        new = self.public_losses - self._losses_logged
        if new and now - self._loss_log_at >= LOSS_LOG_PERIOD:
            log.warn("Redis dropped the public subscriber ({channels}) {n} time(s) since the last report"
                     " ({total} in all; a flood there? Redis closes a subscriber that reads slower than"
                     " the channel is published to); it reconnects by itself, other traffic is unaffected",
                     channels=b", ".join(sorted(self._public.channels)).decode("ascii", "replace"), n=new,
                     total=self.public_losses)
            self._losses_logged, self._loss_log_at = self.public_losses, now

    def _changed(self) -> None:
        now = self.connected
        if now != self._was_connected:
            self._was_connected = now
            if now:
                log.info("Redis connected ({host}:{port})", host=self.settings.host, port=self.settings.port)
            else:
                self._warn("disconnected", "Redis disconnected ({host}:{port}); reconnecting",
                           host=self.settings.host, port=self.settings.port)
            self.on_state(now)

    def _warn(self, kind: str, fmt: str, **fields: object) -> None:
        """A Redis failure at warn level, at most logsafe.BURST lines a minute per ``kind``."""
        logged, unlogged = self._failures.allow(kind, self._clock.seconds())
        if logged:
            log.warn(fmt, **fields)
        if unlogged:
            log.warn("{n} more Redis failures ({kind}) were not logged", n=unlogged, kind=kind)

    # watchdog

    def _watch(self) -> Deferred[None]:
        """Replace factories that gave up (failed AUTH/SELECT), PING every link that is up,
        and log public-subscriber losses left unreported."""
        if self._running and _gave_up(self._pub_factory):
            self._pub_factory = self._replace(self._pub_factory, _PublisherFactory(self))
        for slot in (self._main, self._public):
            if self._running and _gave_up(slot.factory):
                slot.factory = self._replace(slot.factory, _SubscriberFactory(self, slot))
        self._log_public_losses(self._clock.seconds())
        checks = [self._ping(p) for p in (self._pub, self._main.proto, self._public.proto) if p is not None]
        return defer.gatherResults(checks, consumeErrors=True).addBoth(_ignore)

    def _replace(self, old: Any, new: _FactoryT) -> _FactoryT:
        log.warn("Redis refused the {name} connection's setup (AUTH/SELECT); retrying",
                 name="publisher" if isinstance(new, _PublisherFactory) else new.slot.name)
        old.disconnect().addErrback(log_failure("closing a Redis factory that gave up failed"))
        return self._connect(new)

    def _ping(self, proto: txredisapi.BaseRedisProtocol) -> Deferred[None]:
        def dead(failure: Failure) -> None:
            if failure.check(txredisapi.ConnectionError):
                return  # lost meanwhile: it reconnects by itself
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

    def _subscription(self, slot: _Slot, command: str, name: bytes) -> Deferred[None]:
        def run() -> Deferred[None]:
            # A connection being resubscribed takes it too: its snapshot may predate the change.
            sub = slot.proto or slot.joining
            if sub is None or not sub.connected:
                return defer.succeed(None)  # applied by _resubscribe on the next connection
            d: Deferred[None] = getattr(sub, command)([name]).addCallbacks(_ignore, _as_unavailable)
            return d

        return slot.lock.run(run)

    def subscribe(self, channel: bytes) -> Deferred[None]:
        """SUBSCRIBE, now and after every reconnection; a public channel (``ns:negotiate``,
        ``ns:announce``) on the public subscriber."""
        slot = self._slot_for(channel)
        slot.channels.add(channel)
        self._open_public()
        return self._subscription(slot, "subscribe", channel)

    def unsubscribe(self, channel: bytes) -> Deferred[None]:
        slot = self._slot_for(channel)
        slot.channels.discard(channel)
        return self._subscription(slot, "unsubscribe", channel)

    def psubscribe(self, pattern: bytes) -> Deferred[None]:
        """PSUBSCRIBE, on the main subscriber (a pattern is never one of the public channels)."""
        self._main.patterns.add(pattern)
        return self._subscription(self._main, "psubscribe", pattern)


def _quiet_reconnects(factory: txredisapi.RedisFactory) -> None:
    """Silence the "Scheduling retry 1 to connect ..." line Twisted's ClientService logs each
    time ``factory``'s connection is lost. Checked against Twisted 26.10 (the line's Logger is
    the ``log`` field of the automat core of ``ClientService._machine``) and txredisapi 1.6.0
    (``factory.slots[i].service``); when they differ this does nothing, and
    ``tests/test_bus.py`` fails (it counts those lines)."""
    for slot in getattr(factory, "slots", ()):
        machine = getattr(getattr(slot, "service", None), "_machine", None)
        core: Any = getattr(machine, "__dict__", {}).get("__automat_core__")
        retry_log = getattr(core, "log", None)
        if isinstance(retry_log, Logger):
            core.log = Logger(namespace=retry_log.namespace, observer=LogPublisher())  # no observers


def _gave_up(factory: txredisapi.RedisFactory | None) -> bool:
    """A factory that stopped reconnecting on its own (failed AUTH/SELECT), not by stop()."""
    return factory is not None and factory.stopped and not factory.disconnectCalled
