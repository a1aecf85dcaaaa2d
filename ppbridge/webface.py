"""The forwarder's HTTP face: a twisted.web resource whose requests stream through the bridge.

twisted.web runs a resource only once the whole request body has arrived. To stream uploads,
:class:`BridgeRequest` starts its :class:`~ppbridge.clientstream.ClientStream` as soon as the
headers are in (``gotLength``), once the route's access policy let it in (before anything
is published), and feeds it each chunk (``handleContentChunk``);
:class:`BridgeResource` then only marks the body complete. Every error a client can get is
answered by :mod:`ppbridge.webrequest`, from the :class:`~ppbridge.errors.RequestError` that
names it.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site, version

from ppbridge.access import Grant, on_decision
from ppbridge.clientstream import ClientStream
from ppbridge.tunnel import UpgradeStream, wants_upgrade
from ppbridge.edge import Edge, EdgeChannel, EdgeLimits, client_of, error_bytes, request_line
from ppbridge.errors import AccessRefused, BadTarget, BodyTooLarge, RequestError
from ppbridge.logsafe import escape
from ppbridge.logs import CLIENT_CLOSED, NO_CAUSE, AccessLog, client_address
from ppbridge.streams import INLINE_MAX
from ppbridge.webrequest import bridge_of, connection, error_response, refuse_early, render_error, routed

if TYPE_CHECKING:
    from ppbridge.config import ForwarderSettings
    from ppbridge.forwarder import ForwarderService

log = Logger()


class BridgeRequest(Request):
    """A twisted.web request that streams its body into a :class:`ClientStream`, once its
    route's access policy (:mod:`ppbridge.access`), if it has one, let it in.

    A policy that decides at once costs nothing more. One that must wait (a Deferred) holds
    the request: the chunks of body read meanwhile are kept (a small body, at most
    ``INLINE_MAX``, is read; a larger or chunked one is not, its connection paused) and given
    to the stream when it opens; a refusal is answered as an early error is."""

    stream: ClientStream | None = None
    early_error: RequestError | None = None
    refused = False
    grant: Grant | None = None  # what the access policy strips from and sets on the forwarded headers
    deciding: Deferred[Any] | None = None  # the access decision awaited
    body_complete = False  # twisted.web rendered the request while the decision was awaited
    _held: list[bytes] | None = None  # body chunks read while it was
    _paused = False
    _began = 0.0
    _site: Any = None
    _bare: Headers | None = None  # the response headers process() left undressed (see _dress)
    _set_before: list[bytes] = []  # the names of those set before process() ran

    def process(self) -> None:
        """twisted.web's ``Request.process`` (checked against Twisted 26.10.0) for a site whose
        one resource is a leaf that takes every path: the same default headers (the Date
        formatted once a second; set by the first write, see :meth:`_dress`), no path segments
        unquoted into ``postpath`` and no resource tree walked, since none is used."""
        site: BridgeSite = cast(Any, self.channel).site
        self.site = site
        self._bare = headers = self.responseHeaders  # Server and Date go on at its first write (_dress)
        self._set_before = [name for name, _ in headers.getAllRawHeaders()]  # Connection: close, if asked
        self.prepath, self.postpath = [], []
        self.sitepath: list[bytes] = []
        if self.path == b"*":
            self._handleStar()
            return
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # never filled: the body streams to the proxy
        self.defaultContentType = None  # an upstream response without Content-Type stays so
        bridge = bridge_of(self)
        method, uri = request_line(self.channel)
        try:
            if bridge.access.policies:
                host, route, _ = routed(bridge, self, uri)
                decision = bridge.access.decide(self, route.name, host, method, uri)
                if isinstance(decision, Deferred):
                    self._await_access(bridge, decision, method, uri, length)
                    return
                self.grant = decision
            self.stream = self._open(bridge, method, uri, length)
            self._read_body(length)
        except RequestError as err:
            self._refuse(bridge, err, method, uri, length)

    def _open(self, bridge: ForwarderService, method: bytes, uri: bytes, length: int | None) -> ClientStream:
        # No Upgrade header, no upgrade (wants_upgrade would list and scan every header to say so).
        upgrade = self.requestHeaders.hasHeader(b"upgrade") and wants_upgrade(self, length)
        kind = UpgradeStream if upgrade else ClientStream
        return kind.open(bridge, self, method, uri, length)

    def _refuse(self, bridge: ForwarderService, err: RequestError, method: bytes, uri: bytes, length: int | None,
                seconds: float = 0.0) -> None:
        """Answer ``err`` instead of opening a stream: counted, access-logged, an access refusal
        or a bad target logged (throttled); early when the body is large or of unknown length
        (not read only to be thrown away), else once it has been read."""
        self.early_error = err
        try:  # the proxy label, known unless the route itself failed
            proxy = routed(bridge, self, uri)[1].name
        except RequestError:
            proxy = NO_CAUSE
        client = client_address(self)
        bridge.metrics.request_done(proxy, str(err.status), err.cause, seconds)
        cast(Any, self.channel).site.access_log.emit(
            client=client, method=method, uri=uri, code=err.status, cause=err.cause, bytes_in=0,
            bytes_out=len(error_response(err)[2]), duration=seconds, proxy=proxy, instance="-")
        if isinstance(err, AccessRefused):
            bridge.access.refused(proxy, err, client, method, uri)
        elif isinstance(err, BadTarget) and bridge.refusals.allow(err.cause, bridge.clock.seconds())[0]:
            log.warn("refused a request path that would leave the upstream's base path, from {client}",
                     client=escape(str(getattr(self.getClientAddress(), "host", "?"))))
        if self.body_complete:
            render_error(self, err)
        elif isinstance(err, BodyTooLarge) or (length is None or length > INLINE_MAX):
            refuse_early(self, err)  # don't read a body only to throw it away

    def _await_access(self, bridge: ForwarderService, decision: Deferred[Any], method: bytes, uri: bytes,
                      length: int | None) -> None:
        """Hold the request until ``decision`` (a Grant or a refusal); a client that leaves
        meanwhile cancels it."""
        self.deciding, self._held, self._began = decision, [], bridge.clock.seconds()
        self._site = cast(Any, self.channel).site
        if length is None or length > INLINE_MAX:
            self._paused = True
            connection(self).pauseProducing()
        self.notifyFinish().addErrback(self._left_deciding, bridge, method, uri)
        on_decision(decision, lambda result: self._decided(bridge, result, method, uri, length))

    def _decided(self, bridge: ForwarderService, result: Grant | RequestError, method: bytes, uri: bytes,
                 length: int | None) -> None:
        if self.deciding is None or self.channel is None:
            return  # the client left
        self.deciding = None
        held, self._held = self._held or [], None
        seconds = bridge.clock.seconds() - self._began
        if isinstance(result, RequestError):
            self._refuse(bridge, result, method, uri, length, seconds)
            return
        self.grant = result
        try:
            stream = self.stream = self._open(bridge, method, uri, length)
        except RequestError as err:
            self._refuse(bridge, err, method, uri, length, seconds)
            return
        if self._paused and not self.body_complete:
            connection(self).resumeProducing()  # before the held chunks: their flow control may pause again
        self._read_body(length)
        for chunk in held:
            stream.client_data(chunk)
        if self.body_complete:
            stream.body_done()

    def _left_deciding(self, reason: Failure, bridge: ForwarderService, method: bytes, uri: bytes) -> None:
        """The client left while the access decision was awaited: cancel it, count and log 499."""
        decision, self.deciding, self._held = self.deciding, None, None
        if decision is None:
            return  # decided: the stream, if one opened, saw the client leave
        decision.cancel()
        try:
            proxy = routed(bridge, self, uri)[1].name
        except RequestError:
            proxy = NO_CAUSE
        seconds = bridge.clock.seconds() - self._began
        bridge.metrics.request_done(proxy, str(CLIENT_CLOSED), "client-gone", seconds)
        self._site.access_log.emit(
            client=client_address(self), method=method, uri=uri, code=CLIENT_CLOSED, cause="client-gone",
            bytes_in=0, bytes_out=0, duration=seconds, proxy=proxy, instance="-")

    def _read_body(self, length: int | None) -> None:
        """A big or chunked body is read a frame at a time until it is complete
        (:meth:`~ppbridge.edge.EdgeChannel.read_body`)."""
        if (length is None or length > INLINE_MAX) and not self.body_complete and isinstance(self.channel, EdgeChannel):
            self.channel.read_body(True)

    def handleContentChunk(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.client_data(data)
        elif self._held is not None:
            self._held.append(data)

    def connectionLost(self, reason: Failure) -> None:
        """twisted.web's, then the stream is told (what a ``notifyFinish`` errback would do,
        without a Deferred per request)."""
        super().connectionLost(reason)
        if self.stream is not None:
            self.stream.client_gone(reason)

    def write(self, data: bytes) -> None:
        """twisted.web's; the first write's head and body leave together (EdgeChannel.hold_head)."""
        if not self.startedWriting:
            if self._bare is not None and self._bare is self.responseHeaders:
                self._dress()
            channel = self.channel
            if getattr(channel, "draining", False):
                # The forwarder is draining: this is the connection's last response (EdgeChannel.drain).
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            if isinstance(channel, EdgeChannel):
                channel.hold_head()
                try:
                    super().write(data)
                finally:
                    channel.release_head(bool(self.chunked))
                return
        super().write(data)

    def _dress(self) -> None:
        """The Server and Date headers twisted.web's ``process`` sets, where it sets them (after
        those set before it, such as Connection), on an answer of ppbridge's own. ``process``
        leaves them to this first write: a proxied answer replaces the response headers whole
        (the upstream's own are passed on), so setting them at once was lost work."""
        bare, self._bare = cast(Headers, self._bare), None
        pairs = [(n, v) for n, values in bare.getAllRawHeaders() for v in values]
        defaults = [(b"Server", version), (b"Date", cast(Any, self.site).date())]
        before = [p for p in pairs if p[0] in self._set_before]
        self.responseHeaders = dressed = Headers()
        for name, value in before + defaults + [p for p in pairs if p[0] not in self._set_before]:
            dressed.addRawHeader(name, value)


class BridgeResource(Resource):
    """Every path: the stream started in ``gotLength`` now has the whole body."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        if request.refused:
            return NOT_DONE_YET
        if isinstance(request.channel, EdgeChannel):
            request.channel.read_body(False)  # the body is complete
        if request.early_error is not None:
            render_error(request, request.early_error)
        elif request.stream is not None:
            request.stream.body_done()
        else:  # an access decision is awaited (BridgeRequest._decided goes on)
            request.body_complete = True
        return NOT_DONE_YET


class BridgeSite(Site):
    """The forwarder's public site. Its access log (:class:`~ppbridge.logs.AccessLog`, on unless
    ``[forwarder] access_log = false``) is written by each stream's end, not by :meth:`log`,
    so requests answered before their body was read, or aborted, get their line too; paths are
    shown without their query unless ``access_log_query``.
    Its connections are :class:`~ppbridge.edge.EdgeChannel` (request-head limits answered,
    drained on stop). The site registers itself with ``bridge``, which drains it on stop and
    passes it reloaded settings (:meth:`apply`)."""

    def __init__(self, bridge: ForwarderService, timeout: float = 60.0) -> None:
        super().__init__(BridgeResource(), requestFactory=BridgeRequest, timeout=timeout,
                         parsePOSTFormSubmission=False)
        self.bridge = bridge
        self.noisy = False  # no "Starting factory <BridgeSite object at 0x...>" line
        self.edge = Edge(EdgeLimits(), bridge.clock, self._head_refused)
        self.apply(bridge.settings)
        bridge.sites.append(self)

    _date_second = -1
    _date = b""

    def date(self) -> bytes:
        """The Date header's value for now: twisted.web's, formatted once per second."""
        second = int(time.time())
        if second != self._date_second:
            self._date_second, self._date = second, datetimeToString(second)
        return self._date

    def apply(self, settings: ForwarderSettings) -> None:
        """Take the access-log switches and head limits of ``settings`` (the limits apply to
        connections opened from now on)."""
        self.access_log = AccessLog(settings.access_log, settings.access_log_query)
        self.edge.limits = EdgeLimits(settings.max_header_line, settings.max_headers, settings.header_timeout)

    def protocol(self) -> Any:  # what Site.buildProtocol builds a connection from
        return self.edge.protocol()

    def _head_refused(self, channel: Any, err: RequestError, seconds: float) -> None:
        """Count, access-log and warn of (throttled per cause) a request head the edge answered itself."""
        self.bridge.metrics.request_done("-", str(err.status), err.cause, seconds)
        method, uri = request_line(channel)
        self.access_log.emit(client=client_of(channel), method=method, uri=uri, code=err.status, cause=err.cause,
                             bytes_in=0, bytes_out=len(error_bytes(err)), duration=seconds, proxy="-", instance="-")
        logged, unlogged = self.bridge.refusals.allow(err.cause, self.bridge.clock.seconds())
        if logged:
            log.warn("answered {status} {cause} to {client} ({unlogged} such answers unlogged in the last period)",
                     status=err.status, cause=err.cause, client=client_of(channel), unlogged=unlogged)

    def log(self, request: Any) -> None:
        """Twisted's combined-format line per finished request: replaced by the access log."""
        return None
