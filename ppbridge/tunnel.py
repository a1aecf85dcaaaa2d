"""An upgraded connection at the forwarder (WebSocket, or any ``Upgrade`` token but h2c).

:class:`UpgradeStream` is a :class:`~ppbridge.clientstream.ClientStream` whose request
direction stays open after the head: it carries ``Connection: Upgrade`` and the client's
``Upgrade`` token to the proxy (only such streams do), sends no END with its head, and waits
for the answer. On ``101`` it takes the client connection over from twisted.web
(:meth:`~ppbridge.edge.EdgeChannel.take_over`), writes the 101 head itself and from then on
carries raw bytes both ways through the same sealed, sequenced frames and credit windows as
bodies — without coalescing, so a small message leaves at once — each frame sealed under the
proxy's current key, so rotations do not touch the connection. Any other answer is an
ordinary response (the request direction is then ended).

Ends: the upstream's EOF (RESP END) half-closes the client's side; the client's EOF (REQ
END) half-closes the upstream's; the client closing its connection resets the stream (the
proxy closes the upstream connection); ``upgrade_idle_timeout`` with no byte either way, a
proxy or Redis failure and the end of a drain close the client connection. Open connections
count in ``ppbridge_upgraded_connections`` and are bounded by ``max_upgraded`` per proxy
(503 ``upgrade-limit`` over it). Each gets one access-log line when it closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ppbridge.clientstream import ClientStream
from ppbridge.errors import RequestError, UpgradeLimit
from ppbridge.httpheaders import end_to_end, upgrade_headers, upgrade_token
from ppbridge.streams import Inbound
from ppbridge.webrequest import routed
from ppbridge.wire import HeaderList

if TYPE_CHECKING:
    from ppbridge.forwarder import ForwarderService
    from ppbridge.webface import BridgeRequest

SWITCHED = "switched"  # the state after the 101: raw bytes both ways


def wants_upgrade(request: BridgeRequest, length: int | None) -> bool:
    """An upgrade request ppbridge carries: ``Connection: upgrade``, one ``Upgrade`` token (not
    h2c) and no body."""
    if length or request.requestHeaders.hasHeader(b"transfer-encoding"):
        return False
    return upgrade_token(_raw_headers(request)) is not None


def _raw_headers(request: BridgeRequest) -> HeaderList:
    return [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]


class UpgradeStream(ClientStream):
    """One upgrade request: an ordinary stream until a 101, raw bytes both ways after it."""

    coalesce = False  # a WebSocket message must not wait for more bytes to fill a frame
    answers_whole = False  # every response goes through _start_response (a 101 switches)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.inline = False  # the head goes at once, without END: the request direction stays open
        self.downloaded = 0
        self._transport: Any = None
        self._client_ended = False

    @classmethod
    def open(cls, bridge: ForwarderService, request: BridgeRequest, method: bytes, uri: bytes,
             length: int | None) -> ClientStream:
        """As :meth:`ClientStream.open`, refused (503 upgrade-limit) when the proxy has
        ``max_upgraded`` upgraded connections open already."""
        limit = bridge.settings.max_upgraded
        if limit:
            name = routed(bridge, request, uri)[1].name
            if sum(1 for s in bridge.streams.values() if isinstance(s, UpgradeStream) and s.proxy == name) >= limit:
                raise UpgradeLimit(f"ppbridge: proxy {name} has max_upgraded ({limit}) upgraded connections open")
        return super().open(bridge, request, method, uri, length)

    @classmethod
    def extra_headers(cls, request: BridgeRequest) -> HeaderList:
        return upgrade_headers(upgrade_token(_raw_headers(request)) or b"")

    def body_done(self) -> None:
        """twisted.web rendered the request: the request direction stays open regardless."""
        self.rendered = True
        if self._response is not None and self.state == "responding":
            self._start_response()

    def _start_response(self) -> None:
        head = self._response
        if head is None or self._inbound is None or self.request.startedWriting:
            return
        if head.status != 101:
            if self._outbound is not None:
                self._outbound.finish()  # no upgrade: the request had no body
            super()._start_response()
            return
        self._switch(self._inbound, head.reason, end_to_end(head.headers) + upgrade_headers(
            upgrade_token(head.headers) or upgrade_token(self.head.headers) or b""))

    def _switch(self, inbound: Inbound, reason: bytes, headers: HeaderList) -> None:
        """Take the connection from twisted.web, answer 101, then carry raw bytes."""
        request = self.request
        channel: Any = request.channel
        early = channel.take_over(_ClientSide(self))
        self._transport = channel.transport
        self.state = SWITCHED
        request.code, request.startedWriting = 101, True  # for _fail and the access log
        lines = [b"HTTP/1.1 101 " + (reason or b"Switching Protocols")]
        lines += [name + b": " + value for name, value in headers]
        self._transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        channel.registerProducer(self, True)  # a slow client pauses the credit we grant
        self.bridge.count_upgraded(self.proxy, +1)
        self._arm_idle()
        if early:
            self.client_bytes(early)
        inbound.attach(self._to_client, self._upstream_ended)

    # raw bytes

    def client_bytes(self, data: bytes) -> None:
        if self.state == SWITCHED and self._outbound is not None:
            self.uploaded += len(data)
            self._outbound.write(data)
            self.bridge.metrics.bytes_up.inc(len(data))
            self._arm_idle()

    def _to_client(self, data: bytes) -> None:
        self.downloaded += len(data)
        self.request.sentLength += len(data)
        self._transport.write(data)
        self._arm_idle()

    def client_eof(self) -> None:
        """The client half-closed: END upstream; done if the upstream had ended too."""
        if self.state == SWITCHED and self._outbound is not None and not self._client_ended:
            self._client_ended = True
            self._outbound.finish()
            self._maybe_done()

    def _upstream_ended(self) -> None:
        getattr(self._transport, "loseWriteConnection", self._transport.loseConnection)()
        self._maybe_done()

    def stopProducing(self) -> None:
        """The client connection is gone (its transport tells its producer first)."""
        if self.state == SWITCHED:
            self.client_closed(Failure(ConnectionDone()))
        else:
            super().stopProducing()

    def client_closed(self, reason: Failure) -> None:
        if self.state == SWITCHED:
            if not (self._inbound is not None and self._inbound.ended and self._client_ended):
                self._cancel_upstream("client closed")
            self._done("101")

    def _maybe_done(self) -> None:
        if self._client_ended and self._inbound is not None and self._inbound.ended:
            self._transport.loseConnection()

    # timers and ends

    def _arm(self, seconds: float) -> None:
        if self.state != SWITCHED:
            super()._arm(seconds)

    def _arm_idle(self) -> None:
        idle = self.bridge.settings.upgrade_idle_timeout
        if idle and self.state == SWITCHED:
            self._timer.arm(idle)

    def _rearm(self) -> None:
        if self.state != SWITCHED:
            super()._rearm()

    def _timed_out(self) -> None:
        if self.state == SWITCHED:
            self.bridge.metrics.aborted.labels("idle-timeout").inc()
            self._close("idle-timeout", "connection idle")
        else:
            super()._timed_out()

    def shutdown(self) -> None:
        if self.state == SWITCHED:
            self._close("shutting-down", "forwarder stopping")
        else:
            super().shutdown()

    def _close(self, cause: str, why: str) -> None:
        """End a switched connection cleanly: the proxy is told, the client's connection closed."""
        self._cancel_upstream(why)
        self._transport.loseConnection()
        self._done(cause)

    def _fail(self, err: RequestError, notify: bool) -> None:
        if self.state == SWITCHED:  # a proxy or Redis failure: the client must not hang
            if notify:
                self._cancel_upstream(err.cause)
            self._transport.abortConnection()
            self._done(err.cause)
        else:
            super()._fail(err, notify)

    def _done(self, outcome: str) -> None:
        switched = self.state == SWITCHED
        super()._done(outcome)
        if switched:
            self.bridge.count_upgraded(self.proxy, -1)


@implementer(IHalfCloseableProtocol)
class _ClientSide(Protocol):
    """The client connection once taken over: its bytes and its ends go to the stream."""

    def __init__(self, stream: UpgradeStream) -> None:
        self.stream = stream

    def dataReceived(self, data: bytes) -> None:
        self.stream.client_bytes(data)

    def readConnectionLost(self) -> None:
        self.stream.client_eof()

    def writeConnectionLost(self) -> None:
        return None

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.stream.client_closed(reason)
