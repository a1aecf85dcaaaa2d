"""PUBLISH batched per reactor turn: the bus's publisher connection writes every PUBLISH of one
turn at once and matches Redis's replies to them itself.

txredisapi 1.6.0 pays, per command, a reply-queue Deferred, a result Deferred and two
callbacks between them; the services publish about one message per request each way, and at
concurrency several in one reactor turn. :class:`BatchedPublish` (a base of the bus's
publisher protocol, :class:`ppbridge.redisconn._Publisher`) queues each PUBLISH with the one
Deferred its caller gets, writes the turn's queue in one ``writeSequence`` when the turn ends
(``callLater(0)``: before the reactor polls again, so no later than the write would have gone
out), and fires each Deferred from its own reply, in order. Redis answers commands in the order
they were written, so one FIFO of "who waits for the next reply" covers both kinds: an entry per
batched PUBLISH, ``None`` per command txredisapi sent itself (AUTH, SELECT, PING, PUBSUB...),
whose reply goes on to txredisapi's own queue. Any such command flushes the batch first, so
the written order is the FIFO's order.

Checked against txredisapi 1.6.0: ``execute_command`` writes at once (pipelining off) and waits
on ``replyQueue``; ``replyReceived(reply)`` is the only way replies come in (an error reply is
an exception instance); ``connectionLost`` fails its waiters through ``replyReceived``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class BatchedPublish:
    """The batching half of a txredisapi protocol (a base class before it in the MRO)."""

    transport: Any
    connected: int
    _batch: list[bytes] | None = None  # PUBLISH commands built this turn, not yet written
    _batch_waiters: list[Deferred[int]]
    _flush_call: IDelayedCall | None = None
    _waiters: deque[Deferred[int] | None] | None = None  # per command written: who takes its reply
    check_reply: Callable[[object], None]  # looks at every reply first (the publisher's -READONLY check)

    def batch_clock(self) -> IReactorTime:
        """The clock that ends a reactor turn (the bus's)."""
        raise NotImplementedError

    def publish_batched(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        """Queue PUBLISH ``channel`` ``message``; fires with its receiver count, or fails with
        its error reply, or with ``txredisapi.ConnectionError`` when the link is lost first."""
        waiter: Deferred[int] = Deferred()
        if self._batch is None:
            self._batch, self._batch_waiters = [], []
            self._flush_call = self.batch_clock().callLater(0, self.flush_batch)
        self._batch.append(self._build_command(b"PUBLISH", channel, message))  # type: ignore[attr-defined]
        self._batch_waiters.append(waiter)
        return waiter

    def _take_batch(self) -> tuple[list[bytes], list[Deferred[int]]]:
        batch, waiters = self._batch or [], self._batch_waiters if self._batch is not None else []
        self._batch, self._batch_waiters = None, []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        return batch, waiters

    def flush_batch(self) -> None:
        """Write the queued PUBLISH commands now, in one write."""
        if self._batch is None:
            return
        batch, waiters = self._take_batch()
        if not self.connected:
            _fail_all(waiters)
            return
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.extend(waiters)
        self.transport.writeSequence(batch)

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.flush_batch()  # written before this command, as its replies come before this one's
        if self.connected:  # else txredisapi raises and writes nothing
            if self._waiters is None:
                self._waiters = deque()
            self._waiters.append(None)
        return super().execute_command(*args, **kwargs)  # type: ignore[misc, no-any-return]

    def replyReceived(self, reply: object) -> None:
        waiter = self._waiters.popleft() if self._waiters else None
        if waiter is None:  # txredisapi's own command: on to its reply queue
            super().replyReceived(reply)  # type: ignore[misc]
            return
        self.check_reply(reply)
        if isinstance(reply, Exception):
            waiter.errback(reply)
        else:
            waiter.callback(reply)  # type: ignore[arg-type]

    def connectionLost(self, why: object) -> None:
        written = [w for w in (self._waiters or ()) if w is not None]
        self._waiters = None  # txredisapi's own waiters are failed by its connectionLost
        waiters = written + self._take_batch()[1]
        super().connectionLost(why)  # type: ignore[misc]
        _fail_all(waiters)


def _fail_all(waiters: list[Deferred[int]]) -> None:
    for waiter in waiters:
        waiter.errback(txredisapi.ConnectionError("Lost connection"))
