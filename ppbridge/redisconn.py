"""The bus's Redis connections: txredisapi's protocols and factories, adapted.

:class:`~ppbridge.bus.RedisBus` holds three: a publisher (:class:`_Publisher`) and two
subscribers (:class:`_Subscriber`, one per :class:`~ppbridge.redissubs._Slot`), each made by
a reconnecting factory. What they work around in txredisapi 1.6.0, each in one place:

* binary safety: ``charset=None, convertNumbers=False`` on every connection
  (:func:`_binary_safe`), or payloads come back as str/int;
* no automatic resubscription: :class:`_Subscriber` hands every (re)connection to the bus,
  which resubscribes it (:mod:`ppbridge.redissubs`);
* the reply reader buffers any bulk string whole: :class:`_Guarded` puts a
  :class:`~ppbridge.respguard.RespGuard` in front of it, which also cuts frame-sized payloads
  out of the stream (one join instead of hiredis' two copies): :meth:`_Subscriber.replyReceived`
  puts them back;
* no CLIENT SETNAME option: :class:`_Guarded` names each connection (``ppbridge-publisher``,
  ``-subscriber``, ``-public``) so an operator can tell them apart in CLIENT LIST;
* the command builder copies every argument about three times: :meth:`_Publisher._build_command`;
* each command costs two Deferreds and their callbacks: PUBLISH is pipelined and its replies
  matched by :class:`~ppbridge.pubpipeline.PipelinedPublish`;
* ClientService forgets failed attempts once a transport is made: :class:`_Backoff` counts a
  server that was not the master (behind sentinels) as one;
* Twisted's ClientService logs a line per reconnection, which a flood would turn into
  several a second for the public subscriber: :func:`_quiet_reconnects` silences that one;
* a failed AUTH/SELECT stops reconnecting for good: :func:`_gave_up` tells the bus's
  watchdog which factory to replace.

Their log lines keep the namespace ``ppbridge.bus``: they are the bus's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from ppbridge.config import RedisSettings
from ppbridge.logsafe import escape
from ppbridge.pubpipeline import PipelinedPublish
from ppbridge.respguard import RespGuard, RespProtocolError
from ppbridge.sendlimit import SEND_LIMIT, raise_send_limit
from ppbridge.sentinelreply import Address, is_readonly

if TYPE_CHECKING:
    from ppbridge.bus import RedisBus
    from ppbridge.redissubs import _Slot

log = Logger(namespace="ppbridge.bus")
PUBLISH_SEND_LIMIT = SEND_LIMIT  # bytes per send() on the publisher connection (see ppbridge.sendlimit)


def _ignore(*args: object) -> None:
    return None


def _binary_safe(factory: txredisapi.RedisFactory, settings: RedisSettings) -> None:
    """txredisapi decodes UTF-8 and numbers by default; we need bytes in, bytes out."""
    factory.charset = None
    factory.convertNumbers = False
    factory.password = settings.password
    factory.username = settings.username
    factory.dbid = settings.db


class _Backoff:
    """Reconnect quickly: 0.1 s doubling to 2 s, with txredisapi's jitter. A connection
    dropped because its server was not the master (behind sentinels) counts as a failed
    attempt: txredisapi's ClientService forgets failures once a transport is made."""

    initialDelay = 0.1
    factor = 2.0
    maxDelay = 2.0
    refusals = 0  # connections in a row whose server was not the master

    def retryDelay(self, attempt: int) -> float:
        delay: float = super().retryDelay(attempt + self.refusals)  # type: ignore[misc]
        return delay


class GuardedReader:
    """A :class:`~ppbridge.respguard.RespGuard` in front of txredisapi's reply reader, which
    (hiredis or not) buffers any bulk string whole: a reply the guard refuses costs one log
    line (:meth:`refused`) and the connection, which the factory re-establishes. Checked
    against txredisapi 1.6.0: ``dataReceived(data, unpause)`` is the reader's only entry, and
    its non-hiredis reader calls it again with ``unpause=True`` for bytes it has already been
    given. The base of the bus's connections and of those to sentinels (:mod:`ppbridge.sentinel`)."""

    guard: RespGuard | None = None  # None before the connection and after a refusal
    transport: Any  # the protocol's; declared for the type checker

    def refused(self, err: RespProtocolError) -> None:
        """Log that the guard refused a reply (the connection is then dropped)."""
        raise NotImplementedError

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if not unpause:
            if self.guard is None:
                return  # refused already; the connection is going
            try:
                data = self.guard.feed(data)
            except RespProtocolError as err:
                self.refused(err)
                self.guard = None
                self.transport.abortConnection()
                return
        if data or unpause:
            super().dataReceived(data, unpause)  # type: ignore[misc]


class _Guarded(GuardedReader):
    """A :class:`GuardedReader` with the bus's limits. Once AUTH/SELECT passed, the connection
    names itself (CLIENT SETNAME ``ppbridge-<role>``, sent ahead of anything else; a refusal,
    e.g. by an ACL, is ignored). Behind sentinels (:mod:`ppbridge.sentinel`) it then asks the
    server's role and is kept (``checked``) only if it is the master; a ``-READONLY`` reply
    later on means it no longer is."""

    factory: Any
    connected: int
    name = "connection"
    role = b"connection"
    checked = True  # the server is the master (behind sentinels: once ROLE said so)

    def new_guard(self) -> RespGuard:
        return RespGuard()

    @property
    def master(self) -> Address | None:
        """Behind sentinels: the address they gave for this connection (None without them)."""
        return getattr(self.factory, "master", None)

    def connectionMade(self):  # type: ignore[no-untyped-def]
        self.guard = self.new_guard()
        d = super().connectionMade().addCallback(self._set_name)  # type: ignore[misc]
        if self.factory.bus._failover is not None:
            self.checked = False
            d.addCallback(lambda result: self._check().addCallback(lambda _: result))
        return d

    def _check(self) -> Deferred[None]:
        if not (self.connected and self._ready):  # type: ignore[attr-defined]
            return defer.succeed(None)  # AUTH/SELECT failed
        d = self.factory.bus._role_check(self)  # ROLE, within the bus's HEALTH_TIMEOUT
        return d.addCallbacks(self._judged, self._not_judged)

    def _judged(self, master: bool) -> None:
        if master:
            self.checked, self.factory.refusals = True, 0
            self.master_confirmed()
        else:  # logged by failover.check; the next attempt asks the sentinels again
            self.factory.refusals += 1
            self.transport.abortConnection()

    def _not_judged(self, failure: Failure) -> None:
        if not failure.check(txredisapi.ConnectionError):
            self.factory.bus._warn("role", "Redis {name}: no answer to ROLE ({err}); reconnecting", name=self.name,
                                   err=escape(failure.getErrorMessage(), 200))
            self.transport.abortConnection()

    def master_confirmed(self) -> None:
        """Behind sentinels, once ROLE said the server is the master."""

    def check_reply(self, reply: object) -> None:
        if self.master is not None and is_readonly(reply):
            self.factory.bus._leave(self.master, "it answered -READONLY")
            self.transport.abortConnection()  # already, unless it was still being set up

    def replyReceived(self, reply: object) -> None:
        self.check_reply(reply)
        super().replyReceived(reply)  # type: ignore[misc]

    def tryConvertData(self, data: object) -> object:
        """Every reply as it came: on a binary-safe connection (:func:`_binary_safe`)
        txredisapi's conversion returns each value unchanged, after copying every list
        recursively (four calls per pub/sub message)."""
        if self.charset is None and not self.convertNumbers:  # type: ignore[attr-defined]
            return data
        return super().tryConvertData(data)  # type: ignore[misc]

    def _set_name(self, result: object) -> object:
        if self.connected:
            name = b"ppbridge-" + self.role
            self.execute_command(b"CLIENT", b"SETNAME", name).addErrback(_ignore)  # type: ignore[attr-defined]
        return result

    def refused(self, err: RespProtocolError) -> None:
        log.warn("Redis {name}: refusing the server's reply ({err}); reconnecting", name=self.name, err=err)


class _Publisher(PipelinedPublish, _Guarded, txredisapi.RedisProtocol):
    """txredisapi's command builder copies every argument about three times (bytearray
    extend, concatenation, bytes()); for a 256 KiB frame one join is enough. Replies are
    small (no bulk over 64 KiB: :class:`_Guarded`). PUBLISH is pipelined, its replies matched
    here (:class:`~ppbridge.pubpipeline.PipelinedPublish`)."""

    name = "publisher"
    role = b"publisher"

    def master_confirmed(self) -> None:
        if self in self.factory.pool and not self.factory.disconnectCalled:
            self.factory.bus._publisher_up(self)  # else addConnection() does, once it runs

    def connectionMade(self):  # type: ignore[no-untyped-def]
        # Each PUBLISH sent whole: the next one is then usually alone in the buffer and goes
        # uncopied (a bytes join of one item is that item).
        raise_send_limit(self.transport, PUBLISH_SEND_LIMIT)
        return super().connectionMade()

    def publish_error(self, error: Exception, channel: bytes) -> Failure:
        return self.factory.bus._command_refused(Failure(error), "PUBLISH", (channel,))  # type: ignore[no-any-return]

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
        if conn.connected and not self.disconnectCalled and conn.checked:
            self.bus._publisher_up(conn)

    def delConnection(self, conn: txredisapi.RedisProtocol) -> None:
        super().delConnection(conn)
        self.bus._publisher_down(conn)


class _Subscriber(_Guarded, txredisapi.SubscriberProtocol):
    """Delivers messages to the bus and resubscribes after every (re)connection. A message
    over the slot's limit for its channel is skipped as it streams in and reported to
    ``bus.on_oversized``; the empty message the guard leaves in its place is not delivered.
    A big payload the guard cut out of the stream is put back into its reply here."""

    factory: _SubscriberFactory

    def new_guard(self) -> RespGuard:
        return RespGuard(self.factory.slot.limit_for, self._oversized)

    def _oversized(self, channel: bytes, size: int) -> None:
        try:
            self.factory.bus.on_oversized(channel, size)
        except Exception:
            log.failure("reporting an oversized bus message failed")

    def replyReceived(self, reply: object) -> None:
        guard = self.guard
        if guard is not None:
            if guard.delivered():
                return  # a dropped message
            payload = guard.cut_payload()
            if payload is not None and isinstance(reply, list) and reply:
                reply[-1] = payload  # the parser read it as empty: the guard cut it out
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            # A message (SUBSCRIBE): straight to the bus, as txredisapi's replyReceived and
            # messageReceived would pass it; no check_reply, which looks only at errors.
            self.factory.bus.on_message(reply[1], reply[2])
            return
        super().replyReceived(reply)

    @defer.inlineCallbacks
    def connectionMade(self):  # type: ignore[no-untyped-def]
        # Twisted ignores what connectionMade returns, so nothing may escape from here.
        try:
            yield super().connectionMade()  # AUTH, SELECT, SETNAME; behind sentinels ROLE
            if self.connected and self._ready and self.checked:
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
    """A factory that stopped reconnecting on its own (failed AUTH/SELECT), not by stop() or
    disconnect(); the bus's and the sentinels' (:mod:`ppbridge.sentinel`)."""
    return factory is not None and factory.stopped and not factory.disconnectCalled
