"""The forwarder's HTTP/1.1 connection: twisted.web's parser, with its head limits answered.

twisted.web's :class:`~twisted.web.http.HTTPChannel` enforces a line length, a total head
size and a header count, but drops a client over the first without a word and answers the
others with a bare "400 Bad Request". :class:`EdgeChannel` keeps the parser and checks the
same limits itself, just before twisted.web would, so each refusal is a proper answer:

* a line over ``max_header_line``, or a head over :func:`total_head_size`: 431 header-too-large;
* more than ``max_headers`` header lines: 431 too-many-headers (RFC 6585 §5: the fields,
  collectively, are too large);
* a head not complete ``header_timeout`` seconds after the connection opened (or after the
  first byte of a later request's head on a kept-alive connection): 408 header-timeout.

Each answer carries ``X-PPBridge-Error``, a short text body and ``Connection: close``; then
the connection stops being parsed, lingers (reading and dropping) so the client can read the
answer, and closes. Every refusal is counted, access-logged and gets a warning (throttled per
cause, client address escaped): see ``BridgeSite``.

:class:`Edge` holds one site's connections: the limits new connections take (a reload
replaces them), and the drain on SIGTERM (idle keep-alive connections close at once, busy ones
answer ``Connection: close`` and close after their response).

Checked against Twisted 26.10.0: this module relies on HTTPChannel's private
``_receivedHeaderSize``/``_receivedHeaderCount`` counters and on ``_GenericHTTPChannelProtocol``
(the wrapper ``Site.protocol`` builds); tests/test_edge_limits.py fails loudly if they change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ppbridge.errors import HeaderTimeout, HeaderTooLarge, RequestError, TooManyHeaders
from ppbridge.logsafe import escape
from ppbridge.sendlimit import SEND_LIMIT, raise_send_limit
from ppbridge.sendnow import write_now
from ppbridge.wire import FRAME_PAYLOAD

MIN_TOTAL_HEAD = 16384  # twisted.web's totalHeadersSize
LINGER = 2.0  # seconds a refused client may go on sending (dropped) before we close
REASONS = {**RESPONSES, 431: b"Request Header Fields Too Large"}  # RFC 6585; twisted.web lacks 431


@dataclass(frozen=True)
class EdgeLimits:
    """What a client's request head may be: longest line, header lines, seconds to send it."""

    max_header_line: int = 16384
    max_headers: int = 100
    header_timeout: float = 10.0

    @property
    def total_head_size(self) -> int:
        """Bytes a request line plus all header lines may total (twisted.web's 16 KiB, or one
        line's worth when max_header_line is larger, so a single allowed line always fits)."""
        return max(MIN_TOTAL_HEAD, self.max_header_line)


def error_bytes(err: RequestError) -> bytes:
    """The whole HTTP/1.1 answer (status line to body) for ``err``, closing the connection."""
    body = (err.detail + "\n").encode("utf-8")
    reason = REASONS.get(err.status, err.cause.encode("ascii"))
    lines = [
        b"HTTP/1.1 %d %s" % (err.status, reason),
        b"X-PPBridge-Error: " + err.cause.encode("ascii"),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        b"",
        b"",
    ]
    return b"\r\n".join(lines) + body


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes]:
    """Method and URI of the request whose head or body ``channel`` is reading (``b"-"`` before
    its request line). twisted.web keeps them on the channel (private ``_command``/``_path``)
    until the body is complete: this is the one place that reads them."""
    return getattr(channel, "_command", None) or b"-", getattr(channel, "_path", None) or b"-"


class Edge:
    """The client connections of one site: the limits each new one takes, the hook told of
    each refusal (``on_refused(channel, err, seconds)``, seconds since its head began), and
    the drain."""

    def __init__(self, limits: EdgeLimits, clock: IReactorTime,
                 on_refused: Callable[[EdgeChannel, RequestError, float], None]) -> None:
        self.limits = limits  # replaced on reload: connections opened afterwards take the new ones
        self.clock = clock
        self.on_refused = on_refused
        self.open: set[EdgeChannel] = set()
        self.draining = False

    def protocol(self) -> Any:
        """What ``Site.protocol`` returns: twisted.web's wrapper with an :class:`EdgeChannel` inside."""
        return _EdgeProtocol(EdgeChannel(self))

    def drain(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their response."""
        self.draining = True
        for channel in list(self.open):
            channel.drain()


CLIENT_SEND_LIMIT = SEND_LIMIT  # bytes per send() to a client (see ppbridge.sendlimit)
# Bytes per socket read while a big request body streams in (Twisted reads ``bufferSize``, 64
# KiB): a full read is one DATA frame's payload at the default frame_size, sent as it is
# instead of four reads joined into a frame. ``bufferSize`` is also Twisted's write-pause
# threshold, so it is raised only for the body's time (:meth:`EdgeChannel.read_body`).
UPLOAD_READ_SIZE = FRAME_PAYLOAD


class EdgeChannel(HTTPChannel):
    """One client connection. Owns the head limits and the head timer; the rest is twisted.web."""

    refused = False
    draining = False
    tunnel: IProtocol | None = None  # who has the connection after take_over
    _read_size: int | None = None  # the transport's own bufferSize while a body reads bigger
    _secure: bool | None = None  # isSecure(), once asked
    _host: IAddress | None = None  # getHost(), once asked
    _suspending = False  # in allContentReceived: twisted.web turning the idle timeout off
    _holding = False  # the response head waits for the body's first write (hold_head)
    _held_head: bytes | None = None

    def __init__(self, edge: Edge) -> None:
        super().__init__()
        self.edge = edge
        self.limits = limits = edge.limits
        self.clock = edge.clock
        self.MAX_LENGTH = limits.max_header_line
        self.maxHeaders = limits.max_headers
        self.totalHeadersSize = limits.total_head_size
        self._awaiting_head = True
        self._head_bytes = False  # a byte of the next request's head has arrived
        self._head_began = 0.0
        self._head_timer: IDelayedCall | None = None  # kept from head to head (reset, not remade)
        self._head_armed = False  # the head timer counts for the head being read
        self._linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        raise_send_limit(self.transport, CLIENT_SEND_LIMIT)  # frames of a download go out uncopied
        self.edge.open.add(self)
        self._arm_head_timer()
        if self.edge.draining:  # accepted in the turn the port closed
            self.drain()

    def dataReceived(self, data: bytes) -> Any:
        if self.refused:
            return None  # lingering: read and drop
        if self._awaiting_head and data:
            self._head_bytes = True
            if not self._head_armed:
                self._arm_head_timer()  # the first byte of a later request's head
        return super().dataReceived(data)

    def isSecure(self) -> bool:
        """twisted.web's answer (does the transport provide ISSLTransport?), asked once per
        connection: the transport does not change under it."""
        secure = self._secure
        if secure is None:
            secure = self._secure = bool(super().isSecure())
        return secure

    def getHost(self) -> IAddress:
        """The transport's local address, asked once per connection: twisted.web's Request
        asks for it on each request (a ``getsockname`` call and an address object each time)."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """twisted.web's status line and headers, the same bytes in one write: not about four
        pieces per header, each type-checked by the transport and joined there anyway. Held
        for the body's first bytes while :meth:`hold_head` says so."""
        if not isinstance(headers, Headers):  # twisted.web only passes Headers; the rest as it does
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if self._holding:
            self._held_head = b"".join(parts)
            return
        transport: Any = self.transport
        transport.write(b"".join(parts))

    def hold_head(self) -> None:
        """Keep the response head twisted.web writes next for the body's first write
        (:meth:`write`, :meth:`writeSequence`), until :meth:`release_head`: both leave in one
        write, so writing at once (:func:`~ppbridge.sendnow.write_now`) does not split them."""
        self._holding = True

    def release_head(self, chunked: bool) -> None:
        """Stop holding; a head still held (no body followed: HEAD, 204, 304, an empty body) is
        written now: at once, or the ordinary way for a ``chunked`` response (twisted.web's
        ``finish`` writes the last chunk next, which then leaves with it)."""
        self._holding = False
        head, self._held_head = self._held_head, None
        if head is not None:
            if chunked:
                cast(Any, self.transport).write(head)
            else:
                write_now(self.transport, head)

    def write(self, data: bytes) -> None:
        """A response's bytes (twisted.web's ``Request`` writes here, a chunked body's
        terminator too), after the head held for them: sent at once when the connection holds
        nothing (:func:`~ppbridge.sendnow.write_now`), else buffered as usual."""
        head = self._held_head
        if head is not None:
            self._held_head = None
            data = head + data
        write_now(self.transport, data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        """A chunked body's pieces (with the head held for them): the ordinary way, since
        twisted.web may write the terminator next, in the same turn."""
        head = self._held_head
        if head is not None:
            self._held_head = None
            iovec = [head, *iovec]
        cast(Any, self.transport).writeSequence(iovec)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """twisted.web's answer, but never kept alive while draining (``Connection: close``)."""
        keep: bool = super().checkPersistence(request, version)
        return keep and not self.draining

    def drain(self) -> None:
        """Serve what is in flight here, answer it with ``Connection: close``, then close;
        close at once when nothing is (an idle keep-alive connection)."""
        self.draining = True
        self.persistent = False  # twisted.web closes after the current response
        if not self.requests and not self._head_bytes and not self.refused:
            self.loseConnection()

    def lineReceived(self, line: bytes) -> Any:
        if self.refused:
            return True  # stops LineReceiver's loop over the rest of the buffer
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self.refuse(HeaderTooLarge(f"ppbridge: request head over {self.totalHeadersSize} bytes"))
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> Any:
        return self.refuse(HeaderTooLarge(f"ppbridge: a request header line is over {self.MAX_LENGTH} bytes"))

    def headerReceived(self, line: bytes) -> bool:
        if self.refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(TooManyHeaders(f"ppbridge: more than {self.maxHeaders} request header lines"))
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        self._awaiting_head = self._head_armed = False  # its call stays, for the next head
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._suspending = True
        try:
            super().allContentReceived()
        finally:
            self._suspending = False

    def setTimeout(self, period: float | None) -> float | None:
        """twisted.web's idle timeout (TimeoutMixin), but while a request is handled it is
        suspended, not cancelled: its call stays scheduled and does nothing if it fires
        (:meth:`timeoutConnection`); when the request is done twisted.web sets it again and
        the call is pushed back instead of made anew. Every other ``setTimeout(None)``
        (connection lost, taken over, refused) cancels it as TimeoutMixin does."""
        if period is None and self._suspending:
            previous, self.timeOut = self.timeOut, None
            return previous
        previous = super().setTimeout(period)
        return previous

    def timeoutConnection(self) -> None:
        if self.timeOut is None:
            return  # a call kept while the idle timeout was suspended (setTimeout)
        super().timeoutConnection()

    def requestDone(self, request: Any) -> None:
        self._awaiting_head = True  # the timer starts with the next head's first byte
        self._head_bytes = False
        self.read_body(False)
        super().requestDone(request)

    def read_body(self, big: bool) -> None:
        """Read ``UPLOAD_READ_SIZE`` bytes at a time while a big request body streams in
        (``big``), Twisted's ``bufferSize`` otherwise. A transport without one (TLS) is left
        as it is."""
        transport: Any = self.transport
        if not hasattr(transport, "bufferSize"):
            return
        if big and self._read_size is None:
            self._read_size, transport.bufferSize = transport.bufferSize, UPLOAD_READ_SIZE
        elif not big and self._read_size is not None:
            transport.bufferSize, self._read_size = self._read_size, None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.edge.open.discard(self)
        self._cancel(self._head_timer)
        self._cancel(self._linger)
        super().connectionLost(reason)

    def take_over(self, protocol: IProtocol) -> bytes:
        """Hand this connection to ``protocol`` for good (an upgrade answered 101): no more
        HTTP parsing, timers or drain; its bytes, its EOF (:meth:`read_ended`) and its loss go
        to ``protocol``. Returns the bytes the client sent after the request head.

        Uses twisted.web's private ``_protocolUpgradeForWebsockets`` (what Twisted's own
        WebSocket resource uses) and ``_dataBuffer`` (bytes read while the request was being
        handled), both checked against Twisted 26.10.0."""
        self.stand_down()
        self.read_body(False)  # the tunnel reads (and pauses writes) as Twisted does
        self.setTimeout(None)
        self.edge.open.discard(self)
        early, self._dataBuffer = b"".join(self._dataBuffer), []
        self.tunnel = protocol
        self._protocolUpgradeForWebsockets(protocol)
        cast(Any, self.transport).resumeProducing()  # twisted.web pauses reading when a client sends ahead
        return early

    def read_ended(self) -> None:
        """The client half-closed (EOF): a taken-over connection's protocol is told; otherwise
        the client has nothing more to ask, and the connection closes once answers are out."""
        half = IHalfCloseableProtocol(self.tunnel, None) if self.tunnel is not None else None
        if half is not None:
            half.readConnectionLost()
        elif self.transport is not None:
            self.transport.loseConnection()

    def stand_down(self) -> None:
        """Another protocol (HTTP/2) took the connection over: no more head timer."""
        self._awaiting_head = self._head_armed = False
        self._cancel(self._head_timer)
        self._head_timer = None

    def refuse(self, err: RequestError) -> bool:
        """Answer ``err`` now, stop parsing, and close after the client had time to read it."""
        if self.refused:
            return True
        self.refused = True
        self._cancel(self._head_timer)
        self.setTimeout(None)  # the linger timer closes from now on
        self.edge.on_refused(self, err, self.clock.seconds() - self._head_began)
        transport: Any = self.transport
        transport.write(error_bytes(err))
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()  # clients see EOF after the answer and close their side
        self._linger = self.clock.callLater(LINGER, transport.abortConnection)
        return True

    def _arm_head_timer(self) -> None:
        """Start the head timer: the call kept from the last head is pushed back (no new
        DelayedCall and no cancellation per request), or a new one made."""
        self._head_began = self.clock.seconds()
        self._head_armed = True
        call = self._head_timer
        if call is not None and call.active():
            call.reset(self.limits.header_timeout)
        else:
            self._head_timer = self.clock.callLater(self.limits.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_armed:
            return  # a call kept from an earlier head, while no head was being read
        self.refuse(HeaderTimeout(f"ppbridge: no complete request head within {self.limits.header_timeout:g} s"))

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


@implementer(IHalfCloseableProtocol)
class _EdgeProtocol(_GenericHTTPChannelProtocol):
    """twisted.web's wrapper, which replaces the channel by an H2Connection when TLS
    negotiates HTTP/2 (without telling the old one): the edge channel's head timer then stops.
    Half-closeable, so an upgraded connection can carry the client's EOF (:meth:`EdgeChannel.read_ended`)."""

    def readConnectionLost(self) -> None:
        channel = self._channel
        if isinstance(channel, EdgeChannel):
            channel.read_ended()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        return None

    def dataReceived(self, data: bytes) -> None:
        channel = self._channel
        super().dataReceived(data)
        if self._channel is not channel and isinstance(channel, EdgeChannel):
            channel.stand_down()


def client_of(channel: HTTPChannel) -> str:
    """The client's address, escaped for a log line."""
    peer = channel.transport.getPeer() if channel.transport is not None else None
    return escape(str(getattr(peer, "host", "?")))
