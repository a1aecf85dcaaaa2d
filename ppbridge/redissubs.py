"""What each subscriber connection of the bus must be subscribed to, and (re)subscribing it.

:class:`~ppbridge.bus.RedisBus` has two subscriber connections, each a :class:`_Slot`: the
main one (everything addressed to this process) and the public one (``ns:negotiate``,
``ns:announce``). txredisapi 1.6.0 does not resubscribe after a reconnection, and fires
subscribe/unsubscribe replies mismatched when they run concurrently: so every connection is
resubscribed from the slot's sets (:meth:`Subscriptions._subscriber_up`), and each slot's
(un)subscriptions are serialised by its lock (:meth:`Subscriptions._subscription`). A
subscription Redis refuses for want of a permission (:mod:`ppbridge.redisperm`) keeps the
connection up, unsubscribed, for the watchdog to retry (:meth:`Subscriptions._retry_refused`).
Log lines keep the namespace ``ppbridge.bus``.
"""

from __future__ import annotations

from typing import Callable

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge import redisperm
from ppbridge.redisconn import _ignore, _Subscriber, _SubscriberFactory
from ppbridge.timers import log_failure

log = Logger(namespace="ppbridge.bus")


class _Slot:
    """One subscriber connection of a :class:`~ppbridge.bus.RedisBus` and what it must be subscribed to;
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
        self.denied: _Subscriber | None = None  # connected, its subscriptions refused (ACL): the watchdog retries


class Subscriptions:
    """The subscription half of :class:`~ppbridge.bus.RedisBus` (a base class of it): the
    public commands (:meth:`subscribe`, :meth:`unsubscribe`, :meth:`psubscribe`) and what
    follows a subscriber connection's setup and loss; the attributes declared here are the bus's."""

    _main: _Slot
    _public: _Slot
    public_channels: frozenset[bytes]
    on_public: Callable[[], None]
    _running: bool
    _clock: IReactorTime
    _refusals: redisperm.Refusals
    _changed: Callable[[], None]  # the main subscriber's state changed
    _open_public: Callable[[], None]  # connect the public subscriber if it is due
    _command_refused: Callable[..., Failure]
    public_losses: int
    _log_public_losses: Callable[[float], None]  # one line, at most once a minute

    def _slot_for(self, channel: bytes) -> _Slot:
        return self._public if channel in self.public_channels else self._main

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
        """PSUBSCRIBE, on the main subscriber (a pattern is never one of the public channels).
        Not part of :class:`~ppbridge.bus.Bus`: the services subscribe to exact names only, which an ACL user
        can be allowed (see :mod:`ppbridge.channels`); kept for tests of the connections."""
        self._main.patterns.add(pattern)
        return self._subscription(self._main, "psubscribe", pattern)

    def _subscription(self, slot: _Slot, command: str, name: bytes) -> Deferred[None]:
        def run() -> Deferred[None]:
            # A connection being resubscribed takes it too: its snapshot may predate the change.
            sub = slot.proto or slot.joining
            if sub is None or not sub.connected:
                return defer.succeed(None)  # applied by _resubscribe on the next connection
            d: Deferred[None] = getattr(sub, command)([name]).addCallbacks(
                _ignore, self._command_refused, errbackArgs=(command.upper(), (name,), f"{slot.name} {command}"))
            return d

        return slot.lock.run(run)

    @defer.inlineCallbacks
    def _subscriber_up(self, proto: _Subscriber):  # type: ignore[no-untyped-def]
        slot = proto.factory.slot
        slot.joining = proto
        try:
            yield slot.lock.run(self._resubscribe, slot, proto)
        except txredisapi.ConnectionError:
            return  # lost while resubscribing: counted and retried like any loss
        except Exception as err:
            if self._subscriptions_refused(slot, proto, err):
                return  # kept up, unsubscribed: the watchdog retries once the backoff step is over
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

    def _subscriptions_refused(self, slot: _Slot, proto: _Subscriber, err: Exception) -> bool:
        """True when Redis refused ``proto``'s (re)subscription for want of a permission: then
        logged (once per backoff step) and ``proto`` kept up but unsubscribed, for the watchdog
        to try again (dropping it would only reconnect and be refused again, in a loop)."""
        code = redisperm.code_of(err)
        if code is None:
            return False
        slot.denied = proto
        what = redisperm.describe("SUBSCRIBE", sorted(slot.channels))
        if slot.patterns:
            what += " / " + redisperm.describe("PSUBSCRIBE", sorted(slot.patterns))
        self._refusals.note(slot.name, code, what, self._clock.seconds())
        return True

    def _retry_refused(self, slot: _Slot) -> None:
        """Subscribe ``slot``'s connection again once the backoff step of its refusal is over."""
        proto = slot.denied
        if proto is None or not self._refusals.due(slot.name, self._clock.seconds()):
            return
        slot.denied = None
        if self._running and proto.connected:
            self._subscriber_up(proto).addErrback(log_failure("resubscribing failed"))
