"""The proxy's side of an upgraded connection (WebSocket, or any ``Upgrade`` token but h2c).

Twisted's ``Agent`` cannot hand over its connection after a ``101 Switching Protocols``, so an
upgrade request gets a connection of its own to the same configured upstream (same endpoint,
TLS included) and h11 writes its head and reads the answer:

* ``101``: the RESP_HEAD carries the status and the upstream's headers with ``Connection:
  Upgrade`` and its ``Upgrade`` token; from then on the stream carries raw bytes both ways,
  in the same sealed, sequenced, flow-controlled frames as bodies (without coalescing, so
  small messages leave at once). The upstream's EOF is the RESP END; the forwarder's REQ END
  half-closes the upstream connection. The proxy's idle timer stops: the forwarder owns the
  idle timeout of an upgraded connection (``upgrade_idle_timeout``) and a forwarder that
  goes silent has its calls cancelled anyway.
* anything else: an ordinary response, passed back as the Agent's would be; the connection
  is closed after it.

Only the configured base URL is called and the target is confined as for any call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import h11
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from zope.interface import implementer

from ppbridge.errors import BadTarget, UpstreamUnreachable
from ppbridge.httpheaders import end_to_end, upgrade_headers, upgrade_token, upstream_request_headers
from ppbridge.streams import INLINE_MAX
from ppbridge.targets import confined
from ppbridge.upstream import UpstreamCall, log
from ppbridge.upstreamclient import StreamBody
from ppbridge.wire import ResponseHead, clean_reason

if TYPE_CHECKING:
    from ppbridge.wire import RequestHead


def is_upgrade(head: RequestHead) -> bool:
    """Whether the forwarder sent ``head`` as an upgrade (it keeps those headers only then)."""
    return upgrade_token(head.headers) is not None


class UpgradeCall(UpstreamCall):
    """One upgrade request: its own upstream connection, then raw bytes both ways on a 101."""

    coalesce = False  # a WebSocket message must not wait for more bytes to fill a frame

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.switched = False
        self._upstream_gone = False
        self._protocol: _UpgradeProtocol | None = None

    def start(self, body: bytes, end: bool, left: float | None = None) -> None:
        """Connect to the upstream and send the upgrade request (``body``/``end``: whatever
        came with the head; bytes a client sent early wait in the inbound window)."""
        if not confined(self.head.target):
            log.warn("refused a request target outside the upstream's base path")
            self._reset(BadTarget())
            return
        endpoint = self.proxy.upstream.endpoint
        if endpoint is None:
            self._reset(UpstreamUnreachable("ppbridge: this proxy's upstream cannot take an upgrade"))
            return
        self.inbound.data(body, end)
        self._timers.arm_both(self.proxy.settings.stream_idle_timeout, self.proxy.settings.upstream_timeout)
        protocol = _UpgradeProtocol(self)
        d = endpoint.connect(Factory.forProtocol(lambda: protocol))
        self._request = d
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(self._bug)

    def _connected(self, protocol: _UpgradeProtocol) -> None:
        if self.done:
            protocol.transport.abortConnection()
            return
        self._protocol = protocol
        self._transport = cast(Any, protocol.transport)
        token = upgrade_token(self.head.headers) or b""
        headers = upstream_request_headers(self.head.headers, self.proxy.upstream.host) + upgrade_headers(token)
        try:
            protocol.send_head(self.head.method, self.proxy.upstream.base_path + self.head.target, headers)
        except h11.LocalProtocolError as err:
            self._reset(UpstreamUnreachable(f"ppbridge: the upgrade request cannot be sent ({err})"))

    def cancel(self, why: str) -> None:
        """As for any call, and the upstream connection is closed even after its EOF (the
        base class forgets the transport once the upstream's side has ended)."""
        protocol = self._protocol
        super().cancel(why)
        if protocol is not None and protocol.connected:
            protocol.transport.loseConnection()

    def _too_slow(self) -> None:
        self.timed_out = True
        if self._protocol is not None:
            self._protocol.transport.abortConnection()
        elif self._request is not None:
            self._request.cancel()

    def _arm(self) -> None:
        if not self.switched:
            super()._arm()

    # from the upstream connection

    def switched_protocols(self, event: h11.InformationalResponse) -> None:
        """101: answer it, then carry raw bytes both ways."""
        self._head_arrived()
        if self.done:
            return
        self.switched = True
        self._timers.stop_idle()
        raw = list(event.headers.raw_items())
        token = upgrade_token(raw) or upgrade_token(raw + [(b"Connection", b"upgrade")]) or b""
        self._response = ResponseHead(101, clean_reason(event.reason), end_to_end(raw) + upgrade_headers(token), None)
        self._send_head(b"", end=False)
        transport = cast(Any, self._transport)
        body = StreamBody(self.inbound, None)
        transport.registerProducer(body, True)
        body.startProducing(transport).addCallback(lambda _: self._client_ended(transport))

    def _client_ended(self, transport: Any) -> None:
        """The client half-closed (REQ END): so does the upstream connection."""
        if not self.done:
            transport.unregisterProducer()
            transport.loseWriteConnection()
            self._maybe_complete()

    def answered(self, event: h11.Response) -> None:
        """A final answer other than 101: an ordinary response."""
        self._head_arrived()
        if self.done:
            return
        raw = list(event.headers.raw_items())
        lengths = [v for n, v in raw if n.lower() == b"content-length"]
        length = int(lengths[0]) if lengths and self.head.method != b"HEAD" else None
        self._response = ResponseHead(event.status_code, clean_reason(event.reason), end_to_end(raw), length)
        if length is not None and length <= INLINE_MAX:
            self._buffer = []
        else:
            self._send_head(b"", end=False)

    def upstream_closed(self, reason: Failure) -> None:
        """The upstream connection is gone (after its answer, or a 101's EOF)."""
        self._upstream_gone = True
        self._transport = None
        if self._response is None and not self.done:
            self._failed(Failure(ResponseFailed([reason])))
        elif not self._responded:
            self.body_end(Failure(ResponseDone()) if self.switched else reason)
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        """As for any call; an upgraded one is also done once the upstream is gone and its
        END went out (the client's bytes have nowhere to go)."""
        sent = self._outbound is None or self._outbound.finished
        if self._responded and sent and (self.inbound.ended or self._upstream_gone):
            self._finish()


@implementer(IHalfCloseableProtocol)
class _UpgradeProtocol(Protocol):
    """The upstream connection of one :class:`UpgradeCall`: h11 until the answer's head, raw after a 101."""

    transport: Any  # a TCP (or TLS) transport: abortConnection, loseWriteConnection, producers

    def __init__(self, call: UpgradeCall) -> None:
        self.call = call
        self.h11 = h11.Connection(h11.CLIENT)
        self.raw = False

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def send_head(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        request = h11.Request(method=method, target=target, headers=headers)
        self.transport.write(self.h11.send(request) + (self.h11.send(h11.EndOfMessage()) or b""))

    def dataReceived(self, data: bytes) -> None:
        if self.raw:
            self.call.body_data(data)
            return
        self.h11.receive_data(data)
        self._events()

    def _events(self) -> None:
        while not self.raw:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as err:
                self.transport.abortConnection()
                self.call.refuse(UpstreamUnreachable(f"ppbridge: the upstream's answer is not HTTP/1.1 ({err})"))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                self.raw = True
                self.call.switched_protocols(event)
                rest, _ = self.h11.trailing_data
                if rest:
                    self.call.body_data(bytes(rest))
            elif isinstance(event, h11.Response):
                self.call.answered(event)
            elif isinstance(event, h11.Data):
                self.call.body_data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.call.body_end(Failure(ResponseDone()))
                self.transport.loseConnection()
                return

    def readConnectionLost(self) -> None:
        """The upstream's EOF: after a 101 it is the END of its direction; before, the end of
        a close-delimited answer."""
        if self.raw:
            self.call.body_end(Failure(ResponseDone()))
        else:
            self.h11.receive_data(b"")
            self._events()
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        return None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.call.upstream_closed(reason)
