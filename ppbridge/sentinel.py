"""Redis Sentinel: where the master is, whether a server still is it, and when it moves.

With ``[redis] sentinels`` every connection attempt of the bus goes through
:class:`MasterEndpoint`: it asks the sentinels (:meth:`Sentinels.master`, ``SENTINEL
GET-MASTER-ADDR-BY-NAME``, one after the other, the last that answered first) and connects
where they say, over TLS with ``rediss://``. After AUTH/SELECT, :meth:`Failover.check` asks
the server's role (``ROLE``, else ``INFO replication``); the bus keeps only a master. What
sentinels and servers say is parsed and checked in :mod:`ppbridge.sentinelreply`. It
follows a failover from three signs: the connection is lost (the master died); the server
says it is a replica now (the health check asks ROLE; a ``-READONLY`` reply,
:func:`~ppbridge.sentinelreply.is_readonly`, counts the same, though pub/sub never gets
one: PUBLISH is no write command, so a demoted master, which keeps its clients, takes it
silently); a sentinel publishes ``+switch-master`` (one subscriber connection to one sentinel at a time):
``follow(master, True)`` at once, and ``follow(master, False)`` after each resubscription
(an event may have been missed meanwhile).

txredisapi 1.6.0's ``Sentinel``, ``SentinelConnectionFactory``, ``SentinelRedisProtocol``
and ``_SentinelEndpoint`` cannot host the bus's connections (read in its source), so only
its factories, protocols, commands and ``MasterNotFoundError`` are used here:
``SentinelRedisProtocol`` compares ROLE's first element with the str ``"master"``, which a
binary-safe connection (``charset=None``, the bus's) never returns, so it refuses every
master; it is a command protocol only (no subscriber) and would replace the bus's guarded,
named protocols; ``_SentinelEndpoint`` reaches the master over plain TCP whatever the
scheme; ``Sentinel`` gives all sentinels the same connection arguments (one TLS context,
so one server name), uses the global reactor, asks all at once with ``SENTINEL MASTERS``
and ignores ``+switch-master``. Commands go to a sentinel's live protocol, never through
txredisapi's lazy ``ConnectionHandler``: one issued while disconnected waits on
``PeekableQueue.peek()``, whose Deferred has no canceller, so a timeout there leaves a
Deferred that raises AlreadyCalledError once the connection comes.
"""

from __future__ import annotations

from typing import Any, Callable

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ppbridge.logsafe import Throttle, escape
from ppbridge.redisconfig import RedisSettings
from ppbridge.redisconn import GuardedReader, _gave_up
from ppbridge.respguard import RespGuard, RespProtocolError
from ppbridge.sentinelreply import Address, parse_master_reply, parse_switch, role_of

log = Logger()

EndpointFor = Callable[[str, int], Any]  # (host, port) -> an IStreamClientEndpoint
QUERY_TIMEOUT = 2.0  # per sentinel asked; a sentinel is on a LAN, or it is no help in a failover
SWITCH_CHANNEL = b"+switch-master"


# --- connections to the sentinels ----------------------------------------------------------


class _Guarded(GuardedReader):
    """A :class:`~ppbridge.redisconn.GuardedReader` with general limits (a sentinel sends
    nothing big); a refused reply costs the connection, which reconnects."""

    def connectionMade(self):  # type: ignore[no-untyped-def]
        self.guard = RespGuard()
        return super().connectionMade()  # type: ignore[misc]

    def refused(self, err: RespProtocolError) -> None:
        log.warn("Redis sentinel: refusing its reply ({err}); reconnecting", err=err)


class _Link(_Guarded, txredisapi.RedisProtocol):
    """A command connection to one sentinel."""


class _LinkFactory(txredisapi.RedisFactory):
    """One sentinel's command connection, reconnecting by itself; ``live`` is its protocol
    while it is usable (AUTH passed), else None."""

    protocol = _Link
    noisy = False
    initialDelay = 0.5
    maxDelay = 10.0

    def __init__(self, on_up: Callable[[], None], password: str | None) -> None:
        txredisapi.RedisFactory.__init__(self, None, None, 1, isLazy=True, charset=None, password=password,
                                         convertNumbers=False)
        self.on_up = on_up
        self.live: Any = None

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn.connected and not self.disconnectCalled:
            self.live = conn
            self.on_up()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if self.live is conn:
            self.live = None


class Sentinels:
    """The sentinels of one master name: a command connection to each (opened by
    :meth:`start`, each reconnecting by itself) and the one question asked of them."""

    def __init__(self, settings: RedisSettings, clock: IReactorTime, endpoint_for: EndpointFor) -> None:
        self.name = settings.master_name or ""
        self.addresses = settings.sentinels
        self._password = settings.sentinel_password
        self._clock = clock
        self._endpoint_for = endpoint_for
        self._links: list[_LinkFactory | None] = [None] * len(self.addresses)
        self._first = 0  # the index of the sentinel that answered last: asked first
        self._waiting: list[Deferred[None]] = []
        self._failures = Throttle()

    def start(self) -> None:
        for i in range(len(self.addresses)):
            self._links[i] = self._open(i)

    def stop(self) -> Deferred[Any]:
        for waiter in list(self._waiting):
            waiter.cancel()
        links, self._links = [f for f in self._links if f is not None], [None] * len(self.addresses)
        return defer.gatherResults([f.disconnect() for f in links], consumeErrors=True).addErrback(lambda _: None)

    def _open(self, i: int) -> _LinkFactory:
        host, port = self.addresses[i]
        factory = _LinkFactory(self._link_up, self._password)
        factory.deferred.addErrback(lambda f: self.warn(
            "refused", "Redis sentinel {host}:{port} refused the connection: {err}", host=host, port=port,
            err=f.getErrorMessage()))
        factory.startConnecting(self._endpoint_for(host, port))
        return factory

    def _link_up(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _any_link(self) -> Deferred[None]:
        """Fires when a sentinel connection is up (at once when one is), within QUERY_TIMEOUT."""
        if any(f is not None and f.live is not None for f in self._links):
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(waiter)

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)  # then ask anyway: the answer names who is down

        return waiter.addTimeout(QUERY_TIMEOUT, self._clock).addErrback(timed_out)

    def _link(self, i: int) -> _LinkFactory | None:
        """Sentinel ``i``'s connection; one that gave up (a refused AUTH) is replaced."""
        factory = self._links[i]
        if factory is not None and _gave_up(factory):
            factory.disconnect().addErrback(lambda _: None)
            factory = self._links[i] = self._open(i)
        return factory

    @defer.inlineCallbacks
    def master(self):  # type: ignore[no-untyped-def]
        """Where the sentinels say the master is: (host, port). Asks one sentinel after the
        other (QUERY_TIMEOUT each), the last that answered first; a sentinel that is down,
        slow, refuses or does not know the name is skipped. Fails with txredisapi's
        MasterNotFoundError naming what each said."""
        yield self._any_link()
        problems: list[str] = []
        count = len(self.addresses)
        for k in range(count):
            i = (self._first + k) % count
            host, port = self.addresses[i]
            factory = self._link(i)
            if factory is None or factory.live is None:
                problems.append(f"{host}:{port} not connected")
                continue
            link = factory.live
            try:
                reply = yield link.sentinel_get_master_addr_by_name(self.name).addTimeout(QUERY_TIMEOUT, self._clock)
                found = parse_master_reply(reply)
            except defer.CancelledError:
                # The caller gave up (ClientService stopping): asking on would let a connection
                # be made that its stopped service cannot account for (automat NoTransition).
                raise
            except defer.TimeoutError:
                # A sentinel that does not answer may sit behind a link TCP has not yet found
                # dead: drop it (it reconnects by itself) rather than wait on it at every lookup.
                if link.transport is not None:
                    link.transport.abortConnection()
                problems.append(f"{host}:{port} did not answer within {QUERY_TIMEOUT:g} s")
                continue
            except Exception as err:  # a refusal, a lost link, a malformed reply
                problems.append(f"{host}:{port} {type(err).__name__}: {escape(str(err), 120)}")
                continue
            if found is None:
                problems.append(f"{host}:{port} does not know {self.name!r}")
                continue
            self._first = i
            return found
        message = f"no sentinel named the master {self.name!r} ({'; '.join(problems)})"
        self.warn("lookup", "Redis sentinels: {message}", message=message)
        raise txredisapi.MasterNotFoundError(message)

    def warn(self, kind: str, fmt: str, **fields: object) -> None:
        """A warning about the sentinels, at most logsafe.BURST lines a minute per ``kind``."""
        logged, unlogged = self._failures.allow(kind, self._clock.seconds())
        if logged:
            log.warn(fmt, **fields)
        if unlogged:
            log.warn("{n} more Redis sentinel failures ({kind}) were not logged", n=unlogged, kind=kind)


# --- the bus's endpoint ----------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects the attempts of one reconnecting factory to wherever the sentinels say the
    master is, asking them each time; sets ``factory.master`` to that address first (the
    factory has one connection at a time: its protocols read it there)."""

    def __init__(self, sentinels: Sentinels, endpoint_for: EndpointFor, factory: Any) -> None:
        self._sentinels = sentinels
        self._endpoint_for = endpoint_for
        self._factory = factory

    @defer.inlineCallbacks
    def connect(self, protocolFactory):  # type: ignore[no-untyped-def]
        master = yield self._sentinels.master()
        self._factory.master = master
        proto = yield self._endpoint_for(*master).connect(protocolFactory)
        return proto


@implementer(IStreamClientEndpoint)
class _Rotating:
    """Connects to one of several endpoints: the same as last time until an attempt fails,
    then the next (the +switch-master listener moves on from a dead sentinel)."""

    def __init__(self, endpoints: list[IStreamClientEndpoint]) -> None:
        self._endpoints = endpoints
        self._i = 0

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self._i = (self._i + 1) % len(self._endpoints)
            return failure

        return self._endpoints[self._i].connect(protocolFactory).addErrback(failed)


# --- +switch-master ----------------------------------------------------------------------------


class _Listener(_Guarded, txredisapi.SubscriberProtocol):
    """Subscribes to +switch-master on every (re)connection; hands its messages on."""

    factory: _ListenerFactory

    @defer.inlineCallbacks
    def connectionMade(self):  # type: ignore[no-untyped-def]
        # Twisted ignores what connectionMade returns, so nothing may escape from here.
        try:
            yield super().connectionMade()  # AUTH
            if self.connected and self._ready:
                yield self.subscribe([SWITCH_CHANNEL])
                self.factory.failover._listening()
        except Exception as err:
            self.factory.failover.sentinels.warn("listen", "Redis sentinel: subscribing to +switch-master failed:"
                                                 " {err}", err=escape(str(err), 200))

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        if channel == SWITCH_CHANNEL:
            self.factory.failover._switched(message)


class _ListenerFactory(txredisapi.SubscriberFactory):
    protocol = _Listener
    noisy = False
    initialDelay = 0.5
    maxDelay = 5.0

    def __init__(self, failover: Failover, password: str | None) -> None:
        txredisapi.SubscriberFactory.__init__(self, isLazy=True)
        self.failover = failover
        self.charset, self.convertNumbers, self.password = None, False, password


class Failover:
    """What a RedisBus holds behind Sentinel: the :class:`Sentinels`, the endpoint its
    connections use (:meth:`endpoint`), the role check, and the +switch-master listener.
    ``follow(master, moved)`` is called with the master the sentinels name: after a switch
    (``moved`` true), and after each (re)subscription of the listener (false)."""

    def __init__(self, settings: RedisSettings, clock: IReactorTime, endpoint_for: EndpointFor,
                 follow: Callable[[Address, bool], None]) -> None:
        self.sentinels = Sentinels(settings, clock, endpoint_for)
        self._settings = settings
        self._endpoint_for = endpoint_for
        self._follow = follow
        self._listener: _ListenerFactory | None = None
        self._running = False
        self._blind = False  # a server refused ROLE and INFO (said once: the health check asks every 5 s)

    def start(self) -> None:
        self._running = True
        self.sentinels.start()
        self._listener = self._listen()

    def stop(self) -> Deferred[Any]:
        self._running = False
        listener, self._listener = self._listener, None
        waits = [self.sentinels.stop()] + ([listener.disconnect()] if listener is not None else [])
        return defer.gatherResults(waits, consumeErrors=True).addErrback(lambda _: None)

    def endpoint(self, factory: Any) -> MasterEndpoint:
        """The endpoint for ``factory``'s connections: to the master, found anew each time."""
        return MasterEndpoint(self.sentinels, self._endpoint_for, factory)

    def watch(self) -> None:
        """From the bus's watchdog: replace a listener that gave up (a refused AUTH)."""
        listener = self._listener
        if self._running and listener is not None and _gave_up(listener):
            listener.disconnect().addErrback(lambda _: None)
            self._listener = self._listen()

    def _listen(self) -> _ListenerFactory:
        factory = _ListenerFactory(self, self._settings.sentinel_password)
        factory.deferred.addErrback(lambda f: self.sentinels.warn(
            "refused", "Redis sentinel refused the +switch-master subscriber: {err}", err=f.getErrorMessage()))
        factory.startConnecting(_Rotating([self._endpoint_for(h, p) for h, p in self._settings.sentinels]))
        return factory

    def _switched(self, message: bytes) -> None:
        try:
            master = parse_switch(message, self.sentinels.name)
        except ValueError as err:
            self.sentinels.warn("switch", "Redis sentinel: ignoring a malformed +switch-master ({err})", err=err)
            return
        if master is not None:
            log.info("Redis sentinels switched the master {name} to {host}:{port}", name=self.sentinels.name,
                     host=master[0], port=master[1])
            self._follow(master, True)

    def _listening(self) -> None:
        """Subscribed again: a switch may have happened meanwhile, so ask."""
        self.sentinels.master().addCallbacks(self._follow, lambda _: None, (False,))  # master() logs a failure

    @defer.inlineCallbacks
    def check(self, proto: Any):  # type: ignore[no-untyped-def]
        """Whether ``proto``'s server says it is the master (ROLE, else INFO replication);
        logs (throttled) when it is not. A server that refuses both is taken on the
        sentinels' word, with one warning (allow the ACL user ROLE)."""
        role = yield role_of(proto)
        where = "%s:%d" % proto.master if getattr(proto, "master", None) else "?"
        if role is None:
            if not self._blind:
                self._blind = True
                log.warn("Redis at {where} refused ROLE and INFO: taking the sentinels' word that it is the master,"
                         " and a demoted master goes unnoticed until it drops us (allow ROLE to the ACL user)",
                         where=where)
            return True
        if role != b"master":
            self.sentinels.warn("replica", "Redis at {where} is not the master (its role: {role}); asking the"
                                " sentinels again", where=where, role=escape(role, 20))
            return False
        return True
