"""The pub/sub bus: the interface and RedisBus (txredisapi); MemoryBus is in ppbridge.memorybus.

RedisBus holds three connections (:mod:`ppbridge.redisconn`: txredisapi's protocols and
factories, binary-safe, guarded, named) and what each subscriber must be subscribed to
(:mod:`ppbridge.redissubs`); behind Redis Sentinel it follows the master
(:mod:`ppbridge.sentinel`, :mod:`ppbridge.sentinelreply`); only these modules import txredisapi.
What it works around in txredisapi 1.6.0, besides theirs:

* a failed AUTH/SELECT during a reconnect stops reconnecting for good: the watchdog
  (:meth:`RedisBus._watch`) replaces a factory that gave up;
* a refusal for want of a permission (NOPERM, NOAUTH, WRONGPASS: an ACL user or password
  problem) is not retried at once: one line per backoff step says what to fix, and the
  watchdog retries the refused setup or subscription when the step is over
  (:mod:`ppbridge.redisperm`, :meth:`RedisBus._command_refused`);
* commands issued while disconnected wait instead of failing: :meth:`RedisBus.publish`
  fails at once when the link is down, and a health-check PING with a timeout detects a
  dead link that TCP has not noticed.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge import redisperm
from ppbridge.redistls import RedisTLSEndpoint
from ppbridge.channels import Channels
from ppbridge.config import MAX_FRAME_SIZE, RedisSettings
from ppbridge.errors import BusUnavailable, RedisPermission
from ppbridge.logsafe import Throttle
from ppbridge.redisconn import _binary_safe, _gave_up, _ignore, _PublisherFactory, _quiet_reconnects, _SubscriberFactory
from ppbridge.redissubs import Subscriptions, _Slot
from ppbridge.sentinel import Failover
from ppbridge.sentinelreply import Address, is_readonly
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

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]: ...


def _as_unavailable(failure: Failure) -> Failure:
    """txredisapi's ConnectionError (link lost mid-command), or a ``-READONLY`` (the server
    is a replica now: the bus is reconnecting to the master), as our BusUnavailable."""
    if failure.check(txredisapi.ConnectionError) or is_readonly(failure.value):
        return Failure(BusUnavailable(f"ppbridge: Redis connection lost ({failure.getErrorMessage()})"))
    return failure


_FactoryT = TypeVar("_FactoryT", bound=txredisapi.RedisFactory)


class RedisBus(Subscriptions):
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
        # Behind sentinels every connection finds the master through them (ppbridge.sentinel).
        self._failover = Failover(settings, clock, self._endpoint, self._follow) if settings.sentinels else None
        self._main = _Slot("subscriber", b"subscriber", self.limit_for)
        self._public = _Slot("public subscriber", b"public", lambda channel: SMALL_MESSAGE)
        self._pub: txredisapi.RedisProtocol | None = None
        self._pub_factory: _PublisherFactory | None = None
        self._watchdog = Periodic(clock, HEALTH_INTERVAL, self._watch, "Redis watchdog")
        self._running = False
        self._stopped: Deferred[Any] | None = None
        self._was_connected = False
        self._failures = Throttle()  # warn lines for lost or failed connections, per kind
        self._refusals = redisperm.Refusals(settings.username)  # permission refusals: a line, a retry per step
        self._losses_logged = 0
        self._loss_log_at = float("-inf")

    def limit_for(self, channel: bytes) -> int:
        """The longest message accepted on ``channel``."""
        return SMALL_MESSAGE if channel in self.public_channels else self.max_message

    # lifecycle

    def _endpoint(self, host: str | None = None, port: int | None = None) -> object:
        """TCP, or TLS (:mod:`ppbridge.redistls`): a failed TLS setup is one warn line naming
        its cause and a failed attempt, retried with the backoff; never a failed SELECT. To
        ``host``:``port`` when given (a sentinel, or the master they named), else the URL's."""
        s = self.settings
        where = f"{host}:{port}" if host is not None else s.where
        endpoint = HostnameEndpoint(self._reactor, host or s.host, port or s.port, timeout=10)
        if not s.tls:
            return endpoint
        return RedisTLSEndpoint(endpoint, s, self._clock, lambda cause: self._warn(
            "tls", "Redis TLS to {where} failed: {cause}; retrying", where=where, cause=cause), hostname=host, port=port)

    def start(self) -> None:
        self._running = True
        if self._failover is not None:
            self._failover.start()
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
        factory.deferred.addErrback(self._setup_failed, factory)
        factory.startConnecting(self._endpoint() if self._failover is None else self._failover.endpoint(factory))
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
            waits = [f.disconnect() for f in factories] + ([self._failover.stop()] if self._failover else [])
            self._stopped = defer.gatherResults(waits, consumeErrors=True)
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
                log.info("Redis connected ({where})", where=self._where(), host=self.settings.host,
                         port=self.settings.port)
            else:
                self._warn("disconnected", "Redis disconnected ({where}); reconnecting", where=self._where(),
                           host=self.settings.host, port=self.settings.port)
            self.on_state(now)

    def _where(self) -> str:
        """Where Redis is, for a log line: host:port, or behind sentinels the master in use."""
        if self._failover is None:
            return f"{self.settings.host}:{self.settings.port}"
        master = getattr(self._pub, "master", None)
        return self.settings.where + (f"; master at {master[0]}:{master[1]}" if master else "")

    # following a failover (behind sentinels: ppbridge.sentinel)

    def _connections(self) -> list[Any]:
        """Every connection that is up and past its setup."""
        slots = (self._main, self._public)
        found = [self._pub] + [getattr(s, a) for s in slots for a in ("proto", "joining", "denied")]
        return [p for i, p in enumerate(found) if p is not None and p not in found[:i]]

    def _leave(self, master: Address, why: str) -> None:
        """``master`` is no longer the master (``why``): drop every connection to it; each
        comes back through the sentinels, resubscribes, and the services renegotiate."""
        gone = [p for p in self._connections() if p.master == master and p.transport is not None]
        if gone:
            self._warn("not-master", "Redis at {host}:{port} is no longer the master ({why}); reconnecting through"
                       " the sentinels", host=master[0], port=master[1], why=why)
        for proto in gone:
            proto.transport.abortConnection()

    def _follow(self, master: Address, moved: bool) -> None:
        """The sentinels name ``master``: leave every other server. When they have just
        moved it (+switch-master), a connection waiting out its backoff, or still trying the
        old address (a dead host: up to the connect timeout), starts over at once."""
        for old in {p.master for p in self._connections() if p.master not in (None, master)}:
            self._leave(old, f"the sentinels name {master[0]}:{master[1]}")
        if not (moved and self._running):
            return
        if self._pub_factory is not None and not self._pub_factory.pool and not _gave_up(self._pub_factory):
            self._pub_factory = self._restart(self._pub_factory, _PublisherFactory(self))
        for slot in (self._main, self._public):
            if slot.factory is not None and not slot.factory.pool and not _gave_up(slot.factory):
                slot.factory = self._restart(slot.factory, _SubscriberFactory(self, slot))

    def _role_check(self, proto: Any) -> Deferred[bool]:
        """Whether ``proto``'s server is the master (ROLE), within HEALTH_TIMEOUT: redisconn's check."""
        if self._failover is None:  # no sentinels: the one server is the master
            return defer.succeed(True)
        return self._failover.check(proto).addTimeout(HEALTH_TIMEOUT, self._clock)

    def _restart(self, old: Any, new: _FactoryT) -> _FactoryT:
        old.disconnect().addErrback(log_failure("closing a Redis factory failed"))
        return self._connect(new)

    def _warn(self, kind: str, fmt: str, **fields: object) -> None:
        """A Redis failure at warn level, at most logsafe.BURST lines a minute per ``kind``."""
        logged, unlogged = self._failures.allow(kind, self._clock.seconds())
        if logged:
            log.warn(fmt, **fields)
        if unlogged:
            log.warn("{n} more Redis failures ({kind}) were not logged", n=unlogged, kind=kind)

    # permission refusals (ACL users, passwords): see ppbridge.redisperm

    def _setup_failed(self, failure: Failure, factory: Any) -> None:
        """The first connection of ``factory`` failed its AUTH/SELECT: txredisapi stops trying
        for good and the watchdog replaces the factory, after a backoff step when Redis refused
        for want of a permission (then marked ``factory.refused``)."""
        code = redisperm.code_of(failure)
        if code is None:
            log.warn("Redis refused the connection: {err}", err=failure.getErrorMessage())
            return
        factory.refused = code
        name = "publisher" if isinstance(factory, _PublisherFactory) else factory.slot.name
        what = f"SELECT {self.settings.db} (the {name} connection)" if code == "NOPERM" else f"the {name} connection"
        self._refusals.note(name, code, what, self._clock.seconds())

    def _command_refused(self, failure: Failure, command: str, channels: tuple[bytes, ...] = (),
                         key: str | None = None) -> Failure:
        """The errback of a command: a refusal for want of a permission becomes RedisPermission
        (logged once per backoff step per ``key``, by default the command); a lost link
        BusUnavailable (:func:`_as_unavailable`)."""
        code = redisperm.code_of(failure)
        if code is None:
            return _as_unavailable(failure)
        self._refusals.note(key or command, code, redisperm.describe(command, channels), self._clock.seconds(),
                            retry=False)
        return Failure(RedisPermission(f"ppbridge: Redis refused {command} ({code})"))

    # watchdog

    def _watch(self) -> Deferred[None]:
        """Replace factories that gave up (failed AUTH/SELECT), subscribe again connections whose
        subscriptions Redis refused (both once their backoff step is over, when the refusal was
        for want of a permission), PING every link that is up, and log public-subscriber losses
        left unreported."""
        if self._failover is not None:
            self._failover.watch()
        if self._running and _gave_up(self._pub_factory):
            self._pub_factory = self._replace(self._pub_factory, _PublisherFactory(self))
        for slot in (self._main, self._public):
            if self._running and _gave_up(slot.factory):
                slot.factory = self._replace(slot.factory, _SubscriberFactory(self, slot))
            self._retry_refused(slot)
        self._log_public_losses(self._clock.seconds())
        checks = [self._ping(p) for p in (self._pub, self._main.proto, self._public.proto) if p is not None]
        return defer.gatherResults(checks, consumeErrors=True).addBoth(_ignore)

    def _replace(self, old: Any, new: _FactoryT) -> _FactoryT:
        name = "publisher" if isinstance(new, _PublisherFactory) else new.slot.name
        if not self._refusals.due(name, self._clock.seconds()):
            return old  # refused for want of a permission: not before its backoff step is over
        if getattr(old, "refused", None) is None:  # a permission refusal had its line (_setup_failed)
            log.warn("Redis refused the {name} connection's setup (AUTH/SELECT); retrying", name=name)
        old.disconnect().addErrback(log_failure("closing a Redis factory that gave up failed"))
        return self._connect(new)

    def _ping(self, proto: txredisapi.BaseRedisProtocol) -> Deferred[None]:
        def dead(failure: Failure) -> None:
            if failure.check(txredisapi.ConnectionError):
                return  # lost meanwhile: it reconnects by itself
            code = redisperm.code_of(failure)
            if code is not None:  # it did answer: an ACL without PING
                self._refusals.note("PING", code, "PING (the health check)", self._clock.seconds(), retry=False)
                return
            log.warn("Redis did not answer a health check; reconnecting")
            if proto.transport is not None:
                proto.transport.abortConnection()

        if self._failover is None or proto is not self._pub:
            d = proto.ping()
        else:  # ROLE: alive, and still the master (a demoted one keeps its clients)
            where: Address | None = getattr(proto, "master", None)

            def judged(master: bool) -> None:
                if not master and where is not None:
                    self._leave(where, "its role changed")

            d = self._failover.check(proto).addCallback(judged)
        d.addTimeout(HEALTH_TIMEOUT, self._clock)
        return d.addCallbacks(_ignore, dead)

    # pub/sub

    def publish(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        """PUBLISH (pipelined: :mod:`ppbridge.pubpipeline`); fires with the number of receivers.
        Fails at once when disconnected."""
        pub = self._pub
        if pub is None or not pub.connected:
            return defer.fail(BusUnavailable())
        return pub.publish_pipelined(channel, message)  # failures as _command_refused says (redisconn)

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]:
        """PUBSUB NUMSUB: plain subscribers per channel (pattern subscribers don't count, so a
        ``PSUBSCRIBE *`` onlooker cannot make a dead proxy look alive)."""
        pub = self._pub
        if pub is None or not pub.connected:
            return defer.fail(BusUnavailable())
        d = pub.execute_command(b"PUBSUB", b"NUMSUB", *channels).addErrback(self._command_refused, "PUBSUB NUMSUB")
        return d.addCallback(lambda r: {bytes(r[i]): int(r[i + 1]) for i in range(0, len(r), 2)})
