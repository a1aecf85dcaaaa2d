"""PUBLISH pipelined: the bus's publisher connection writes each PUBLISH at once and matches
Redis's replies to them itself.

txredisapi 1.6.0 pays, per command, a reply-queue Deferred, a result Deferred and two
callbacks between them; the services publish about one message per request each way.
:class:`PipelinedPublish` (a base of the bus's publisher protocol,
:class:`ppbridge.redisconn._Publisher`) writes each PUBLISH to the transport as it is made and
gives its caller one Deferred, fired from its own reply. What is written in one reactor turn
leaves with one ``send`` when the turn ends, so several publishes of a turn leave in one write,
in order, and no later than before (a publish is never held back behind anything else the
process writes in that turn); they wait in the transport's buffer without registering it for
writing (:class:`ppbridge.sendnow.HeldWrites`: no ``epoll_ctl`` pair per turn). Every
``SEND_EVERY``-th PUBLISH sends what the transport holds at once: under load, Redis and the
peer start on the first messages of a turn while this process goes on with the rest, instead
of waiting for the whole turn. Redis answers commands in the
order they were written, so one FIFO of "who waits for the next reply" covers both kinds: an
entry per pipelined PUBLISH, ``None`` per command txredisapi sent itself (AUTH, SELECT, PING,
PUBSUB...), whose reply goes on to txredisapi's own queue.

Checked against txredisapi 1.6.0: ``execute_command`` writes at once (pipelining off) and waits
on ``replyQueue``; ``replyReceived(reply)`` is the only way replies come in (an error reply is
an exception instance); ``connectionLost`` fails its waiters through ``replyReceived``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ppbridge.sendnow import HeldWrites

SEND_EVERY = 8
"""PUBLISHes written between two sends before the reactor's own: at c16, 8 cut a turn's batch
of sixteen in two (bench, c16: +40 % req/s for the same CPU per request; every PUBLISH sent
alone cost a quarter more CPU per request for less gain)."""


_PUBLISH = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n"  # then the message and CRLF


class PipelinedPublish:
    """The pipelining half of a txredisapi protocol (a base class before it in the MRO)."""

    transport: Any
    connected: int
    _waiters: deque[tuple[Deferred[int], bytes] | None] | None = None  # per command written: who takes its reply
    _written = 0  # PUBLISHes written, counting to SEND_EVERY
    _held: HeldWrites | None = None  # the PUBLISHes of this turn, sent at its end
    check_reply: Callable[[object], None]  # looks at every reply first (the publisher's -READONLY check)

    def _fifo(self) -> deque[tuple[Deferred[int], bytes] | None]:
        if self._waiters is None:
            self._waiters = deque()
        return self._waiters

    def publish_pipelined(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        """PUBLISH ``channel`` ``message`` now; fires with its receiver count, or fails with
        :meth:`publish_error` of its error reply, or of ``txredisapi.ConnectionError`` when the
        link is lost first."""
        if not self.connected:
            return defer.fail(self.publish_error(txredisapi.ConnectionError("Not connected"), channel))
        held = self._held
        if held is None:
            held = self._held = HeldWrites(self.transport)
        held.write(b"".join((_PUBLISH % (len(channel), channel, len(message)), message, b"\r\n")))
        waiter: Deferred[int] = Deferred()
        self._fifo().append((waiter, channel))
        self._written += 1
        if self._written >= SEND_EVERY:
            self._written = 0
            held.send()
        return waiter

    def publish_error(self, error: Exception, channel: bytes) -> Failure:
        """The failure a PUBLISH on ``channel`` fails with, for its error reply or a lost
        link: ``error`` as it is here; the bus's publisher says what it means (a refusal for
        want of a permission, a lost link), once, without an errback of its own per PUBLISH."""
        return Failure(error)

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.connected:  # else txredisapi raises and writes nothing
            self._fifo().append(None)
        return super().execute_command(*args, **kwargs)  # type: ignore[misc, no-any-return]

    def replyReceived(self, reply: object) -> None:
        entry = self._waiters.popleft() if self._waiters else None
        if entry is None:  # txredisapi's own command: on to its reply queue
            super().replyReceived(reply)  # type: ignore[misc]
            return
        waiter, channel = entry
        self.check_reply(reply)
        if isinstance(reply, Exception):
            waiter.errback(self.publish_error(reply, channel))
        else:
            waiter.callback(reply)  # type: ignore[arg-type]

    def connectionLost(self, why: object) -> None:
        if self._held is not None:
            self._held.cancel()
        written = [w for w in (self._waiters or ()) if w is not None]
        self._waiters = None  # txredisapi's own waiters are failed by its connectionLost
        super().connectionLost(why)  # type: ignore[misc]
        for waiter, channel in written:
            waiter.errback(self.publish_error(txredisapi.ConnectionError("Lost connection"), channel))
