"""Sending a connection's writes before the reactor turn ends (workarounds, here only).

Twisted's TCP transports buffer every ``write`` and send when the reactor next polls, so
everything a process writes in one turn leaves together at its end. Under load that turns a
pipeline of processes into a convoy: the forwarder reads sixteen requests in one turn and
publishes all sixteen at its end, the proxy then works on all sixteen while the forwarder
waits, and so on: the two processes take turns instead of working at the same time (c16
req/s was the inverse of their *summed* CPU per request). :func:`send_now` sends what a
transport holds at once, through ``doWrite`` (``IWriteDescriptor``, what the reactor itself
calls when the socket is writable); what the socket does not take stays buffered for the
reactor, as usual. A transport being closed is left to the reactor (its ``doWrite`` would
finish the close), and one without ``doWrite`` (another reactor's) is left as it is; a TLS
connection is sent through the TCP transport under it (TLS hands its records on at once).

Each buffered ``write`` also costs two ``epoll_ctl`` calls: ``write`` registers the transport
for writing (``startWriting``, EPOLLOUT added) and the ``doWrite`` that empties the buffer
unregisters it (``stopWriting``), besides the reactor's dispatch of the writable event. A small
request cost about 2.5 such calls in the forwarder and 4.4 in the proxy. :func:`write_now`
writes around that: when a plain Twisted TCP transport holds nothing (so nothing written
earlier can be overtaken) and may be written to as usual, the bytes are sent on its socket at
once (``writeSomeData``, the one ``send()`` of Twisted's own ``doWrite``), and only what the
socket did not take goes to ``transport.write``, which buffers it, registers the transport and
pauses a producer as ever. Anything else, and any failed send (EAGAIN: nothing sent; another
error: the reactor's own send meets it again and loses the connection as usual), takes
``transport.write`` with all the bytes. Bytes written in one turn are no longer joined into one
``send()``: callers write through where one write per turn is the rule (a response whole in
one write, a request head).

A request of Twisted's HTTP client without a body (a GET) is one ``writeSequence`` of its head
lines; :class:`WriteNowRequest` writes it with :func:`write_now` instead, joined.

Where several writes of a turn should still leave in one ``send()`` (the publisher's
PUBLISHes: a send per message cost Redis a wake-up each), :class:`HeldWrites` puts them at the
end of the transport's own buffer without registering it for writing, and sends the lot when
the turn ends: a call due at once on the transport's reactor, which runs before the reactor
polls again (what Twisted's own TLS layer does with small writes, ``_AggregateSmallWrites``).
Since the bytes are in Twisted's buffer, a later ordinary write queues behind them and a
``loseConnection`` sends them before closing, as ever; what the socket does not take is left
to the reactor, registered. A :func:`write_now` sends the held bytes of every connection
first: bytes are not sent before others written earlier in the process. (An ordinary
``transport.write`` does not: made in a timed call, it leaves when the reactor polls next,
before bytes held in the same call, which go when the next turn begins.)

Twisted internals read here, checked against Twisted 26.10.0 (tests/test_sendnow.py fails if
they change): ``FileDescriptor._tempDataBuffer``, ``dataBuffer`` and ``offset`` (the buffer),
``_writeDisconnecting`` (a half-close asked for), ``_tempDataLen`` (written with
``_tempDataBuffer`` by :class:`HeldWrites`), and ``writeSomeData``, ``TLS``, ``producer``,
``streamingProducer``, ``producerPaused``, ``reactor`` of ``tcp.Server`` and ``tcp.Client``;
and that ``_newclient.Request.writeTo`` writes a request without a body with one
``writeSequence`` and nothing else.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web._newclient import Request

WRITE_NOW_MAX = 64 * 1024
"""The largest write :func:`write_now` sends at once. A larger one (a download's frames) takes
the ordinary path: the ``epoll_ctl`` pair is little beside it, and Twisted sends a buffer's
rest without copying it, where the rest of a partial send here is a copy."""

_PLAIN_TCP = (tcp.Server, tcp.Client)
"""Twisted's TCP transports (exactly these: a subclass may send otherwise, UNIX sockets pass
file descriptors with theirs)."""


def send_now(transport: Any) -> bool:
    """Send what ``transport`` holds now, as far as its socket takes it; True if it could try."""
    for _ in range(2):  # the transport itself, or the TCP transport under a TLS one
        if hasattr(transport, "doWrite"):
            if not transport.connected or transport.disconnecting:
                return False
            transport.doWrite()  # a failed send stays buffered; the reactor sees it next poll
            return True
        transport = getattr(transport, "transport", None)
    return False


class _HeadNow:
    """What a :class:`WriteNowRequest` without a body writes its head to: the transport's
    ``writeSequence``, joined and written at once. Anything else ``writeTo`` might ask of a
    transport is missing here, so a Twisted that asked for more fails loudly."""

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def writeSequence(self, data: Iterable[bytes]) -> None:
        write_now(self.transport, b"".join(data))


class WriteNowRequest(Request):
    """Twisted's HTTP client request (``_newclient.Request``; build it with ``_construct`` as
    the Agent does), whose head is written at once (:func:`write_now`) when it has no body.
    A request with a body producer is written as Twisted writes it."""

    def writeTo(self, transport: Any) -> Deferred[None]:
        if self.bodyProducer is None:
            return super().writeTo(_HeadNow(transport))
        return super().writeTo(transport)


def _plain_and_open(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP transport of Twisted's, open for writing, not TLS."""
    return (type(transport) in _PLAIN_TCP and transport.connected and not transport.disconnecting
            and not transport._writeDisconnecting and not transport.TLS)


def _holds(transport: Any) -> bool:
    """Whether a plain TCP transport has bytes not yet sent."""
    return bool(transport._tempDataBuffer) or len(transport.dataBuffer) != transport.offset


def writes_through(transport: Any) -> bool:
    """Whether :func:`write_now` may send on ``transport`` at once now: a plain TCP transport
    of Twisted's, open for writing, not TLS, holding nothing, with no pull producer (which is
    asked for more by the reactor's ``doWrite``) and no paused push producer."""
    if not _plain_and_open(transport) or _holds(transport):
        return False
    producer = transport.producer
    return producer is None or (transport.streamingProducer and not transport.producerPaused)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent on the socket at once when :func:`writes_through`
    (and ``data`` is bytes of at most ``WRITE_NOW_MAX``): what the socket did not take, or all
    of it when the send failed, is left to ``transport.write``."""
    if _HOLDING:
        _send_earlier()
    if type(data) is bytes and 0 < len(data) <= WRITE_NOW_MAX and writes_through(transport):
        sent = transport.writeSomeData(data)  # an int, or an exception for a lost connection
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


_HOLDING: list[HeldWrites] = []
"""The HeldWrites of this process holding bytes now, first held first: :func:`write_now` sends
them before its own bytes, so a write never overtakes one made before it on another
connection (the forwarder's RESET to the proxy, then its 504 to the client, leave in that
order, as when both waited for the reactor)."""


def _send_earlier() -> None:
    for held in list(_HOLDING):
        held.send()


class HeldWrites:
    """One connection's writes of a reactor turn, held in its transport's buffer unregistered
    and sent with one ``send()`` when the turn ends, before any :func:`write_now` of the
    process, or at :meth:`send`. Other transports (TLS, another reactor's, a test's) are
    written to and sent (:func:`send_now`) as before."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._due: IDelayedCall | None = None  # the turn's end, once something is held
        self._holding = False  # in _HOLDING

    def write(self, data: bytes) -> None:
        """``transport.write(data)``, held without registering the transport for writing when
        it is a plain TCP transport of Twisted's, open for writing, without a producer."""
        transport = self.transport
        if type(data) is not bytes or not _plain_and_open(transport) or transport.producer is not None:
            transport.write(data)
            return
        if data:
            transport._tempDataBuffer.append(data)
            transport._tempDataLen += len(data)
            if not self._holding:
                self._holding = True
                _HOLDING.append(self)
            if self._due is None:
                self._due = transport.reactor.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._due = None
        self.send()

    def send(self) -> None:
        """Send what the transport holds now, if anything (:func:`send_now`); what its socket
        does not take stays buffered, and the transport is registered for it."""
        self._let_go()
        transport = self.transport
        if type(transport) not in _PLAIN_TCP:
            send_now(transport)
            return
        if _holds(transport) and send_now(transport) and _holds(transport) and transport.connected:
            transport.startWriting()

    def cancel(self) -> None:
        """The connection is gone: nothing is to be sent at the turn's end."""
        self._let_go()
        due, self._due = self._due, None
        if due is not None and due.active():
            due.cancel()

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            _HOLDING.remove(self)
