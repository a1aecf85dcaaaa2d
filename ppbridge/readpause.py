"""The proxy's upstream connections: a pause asked while a read is handled waits for that read's end.

When a response's headers are parsed, Twisted's HTTP client pauses the connection (it stops
reading: an ``epoll_ctl``) until someone takes the body, and ``Response.deliverBody`` resumes
it (another ``epoll_ctl``). The proxy takes every body at once, inside the same read: each
request paid a pause and a resume that undid each other, two system calls and the reactor's
bookkeeping for them. On a :class:`UpstreamConnection`, a pause asked of the response's
producer while the connection handles a read is only noted; a resume before the read is over
cancels it, and one still owed when the read is over takes effect then. Nothing is read in
between either way (reads are what the pause stops, and the read being handled goes on
regardless), so the bytes each side sees, and when, are the same. A pause asked outside a read
(the proxy's own backpressure on a slow forwarder) takes effect at once, as before.

Twisted's private names used here, checked against Twisted 26.10: ``_HTTP11ClientFactory``
(and its ``_quiescentCallback``), ``HTTP11ClientProtocol._parser`` and ``._transportProxy``
(the parser and the per-request ``TransportProxyProducer`` it pauses),
``TransportProxyProducer._producer``. tests/test_readpause.py fails if they go.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.web._newclient import HTTP11ClientProtocol, TransportProxyProducer
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.iweb import IResponse


class ReadTurnProducer(TransportProxyProducer):
    """One request's view of its connection as a producer (what the parser and the
    ``Response`` pause and resume), whose pause during a read of the connection is owed."""

    def __init__(self, producer: Any, connection: UpstreamConnection) -> None:
        self._producer = producer  # as TransportProxyProducer.__init__ (not called: a call less per request)
        self._connection = connection
        self.owed = False

    def pauseProducing(self) -> None:
        connection = self._connection
        if connection.reading and self._producer is not None:
            self.owed = True
            connection.owed = self
        else:
            super().pauseProducing()

    def resumeProducing(self) -> None:
        if self.owed:
            self.owed = False  # the pause never took effect
        else:
            super().resumeProducing()

    def pause_owed(self) -> None:
        """The read is over: a pause still owed takes effect now."""
        if self.owed:
            self.owed = False
            super().pauseProducing()


class UpstreamConnection(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client connection, whose requests' producers are :class:`ReadTurnProducer`."""

    reading = False  # handling a read (dataReceived)
    owed: ReadTurnProducer | None = None  # whose pause waits for the read's end

    def request(self, request: Any) -> Deferred[IResponse]:
        answer: Deferred[IResponse] = super().request(request)
        parser = self._parser
        if parser is not None:
            producer = ReadTurnProducer(self.transport, self)
            self._transportProxy = producer
            parser.transport = cast(ITransport, producer)  # its Response is given this one too
        return answer

    def dataReceived(self, data: bytes) -> None:
        self.reading = True
        try:
            super().dataReceived(data)
        finally:
            self.reading = False
            owed = self.owed
            if owed is not None:
                self.owed = None
                owed.pause_owed()


class UpstreamConnectionFactory(_HTTP11ClientFactory):
    """The pool's factory of :class:`UpstreamConnection` (quiet: no log lines per connection)."""

    noisy = False

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._quiescentCallback)
