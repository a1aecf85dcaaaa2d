"""The forwarder's HTTP face: a twisted.web resource whose requests stream through the bridge.

twisted.web runs a resource only once the whole request body has arrived. To stream uploads,
:class:`BridgeRequest` starts its :class:`~ppbridge.clientstream.ClientStream` as soon as the
headers are in (``gotLength``) and feeds it each chunk (``handleContentChunk``);
:class:`BridgeResource` then only marks the body complete. Every error a client can get is
answered by :mod:`ppbridge.webrequest`, from the :class:`~ppbridge.errors.RequestError` that
names it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, cast

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ppbridge.clientstream import ClientStream
from ppbridge.tunnel import UpgradeStream, wants_upgrade
from ppbridge.edge import Edge, EdgeLimits, client_of, error_bytes, request_line
from ppbridge.errors import BadTarget, BodyTooLarge, RequestError
from ppbridge.logsafe import escape
from ppbridge.logs import NO_CAUSE, AccessLog, client_address
from ppbridge.streams import INLINE_MAX
from ppbridge.webrequest import bridge_of, error_response, refuse_early, render_error, routed

if TYPE_CHECKING:
    from ppbridge.config import ForwarderSettings
    from ppbridge.forwarder import ForwarderService

log = Logger()


class BridgeRequest(Request):
    """A twisted.web request that streams its body into a :class:`ClientStream`."""

    stream: ClientStream | None = None
    early_error: RequestError | None = None
    refused = False

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # never filled: the body streams to the proxy
        self.defaultContentType = None  # an upstream response without Content-Type stays so
        bridge = bridge_of(self)
        method, uri = request_line(self.channel)
        try:
            kind = UpgradeStream if wants_upgrade(self, length) else ClientStream
            self.stream = kind.open(bridge, self, method, uri, length)
        except RequestError as err:
            self.early_error = err
            try:  # the proxy label, known unless the route itself failed
                proxy = routed(bridge, self, uri)[1].name
            except RequestError:
                proxy = NO_CAUSE
            bridge.metrics.request_done(proxy, str(err.status), err.cause, 0.0)
            cast(Any, self.channel).site.access_log.emit(
                client=client_address(self), method=method, uri=uri, code=err.status, cause=err.cause, bytes_in=0,
                bytes_out=len(error_response(err)[2]), duration=0.0, proxy=proxy, instance="-")
            if isinstance(err, BadTarget) and bridge.refusals.allow(err.cause, bridge.clock.seconds())[0]:
                log.warn("refused a request path that would leave the upstream's base path, from {client}",
                         client=escape(str(getattr(self.getClientAddress(), "host", "?"))))
            if isinstance(err, BodyTooLarge) or (length is None or length > INLINE_MAX):
                refuse_early(self, err)  # don't read a body only to throw it away

    def handleContentChunk(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.client_data(data)

    def write(self, data: bytes) -> None:
        if not self.startedWriting and getattr(self.channel, "draining", False):
            # The forwarder is draining: this is the connection's last response (EdgeChannel.drain).
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().write(data)


class BridgeResource(Resource):
    """Every path: the stream started in ``gotLength`` now has the whole body."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        if request.refused:
            return NOT_DONE_YET
        if request.early_error is not None:
            render_error(request, request.early_error)
        elif request.stream is not None:
            request.stream.body_done()
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
