"""One client request through the bridge: :class:`ClientStream`, from its headers to its last byte.

A stream routes the request (:meth:`ClientStream.open`), seals its head and body into frames
for one proxy instance, with flow control both ways (:class:`~ppbridge.streams.Outbound` up,
:class:`~ppbridge.streams.Inbound` down), keeps the request and idle timers, and ends in one
place (:meth:`ClientStream._fail` / ``_done``) that answers or aborts the client, counts the
request and writes its access-log line. The twisted.web request that feeds it is
:class:`~ppbridge.webface.BridgeRequest`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ppbridge.errors import (
    CANCEL_CODE,
    RESET_CODES,
    BadRequest,
    BadTarget,
    BodyTooLarge,
    BusLost,
    BusMessageError,
    BusUnavailable,
    GatewayTimeout,
    ProtocolFailure,
    ProxyUnavailable,
    RedisPermission,
    RequestError,
)
from ppbridge.edge import request_line
from ppbridge.httpheaders import forwarded_request_headers
from ppbridge.keyring import KeyEntry
from ppbridge.logs import NO_CAUSE, AccessLog, client_address, instance_of, status_of
from ppbridge.streamids import stream_ids
from ppbridge.streams import INLINE_MAX, Chunk, Inbound, Outbound
from ppbridge.targets import confined
from ppbridge.webrequest import connection, refuse_early, render_error, response_headers, routed
from ppbridge.wire import (
    FLAG_END,
    OVERHEAD,
    Header,
    HeaderList,
    MsgType,
    RequestHead,
    ResponseHead,
    decode_reset,
    decode_window,
    encode_reset,
    encode_window,
)

if TYPE_CHECKING:
    from ppbridge.forwarder import ForwarderService
    from ppbridge.webface import BridgeRequest

log = Logger()
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))  # RFC 9110 §9.2.2


class ClientStream:
    """One client request through the bridge, from its headers to its last byte.

    States: ``sent`` (head published, waiting for the response head), ``responding``
    (streaming the response), ``done``. Acts as the push producer of the client response.
    """

    coalesce = True  # small body writes may wait up to streams.COALESCE to fill a frame
    answers_whole = True  # a response whole in its head skips Inbound (see _answer_whole)

    def __init__(self, bridge: ForwarderService, request: BridgeRequest, proxy: str, head: RequestHead,
                 chunked: bool) -> None:
        self.bridge = bridge
        self.request = request
        self.proxy = proxy
        self.head = head  # its deadline is set as it is published (_send_head)
        self.id = stream_ids.take()  # unpredictable (see ppbridge.streamids)
        self.reply_channel = head.reply_channel
        self.inline = not chunked and (head.content_length or 0) <= INLINE_MAX
        self.state = "new"
        self.rendered = False
        self.peer: bytes | None = None  # the proxy process (name:instance) the head went to
        self.seq = 0
        self.uploaded = 0
        self._held: list[bytes] = []
        self._outbound: Outbound | None = None
        self._inbound: Inbound | None = None
        self._response: ResponseHead | None = None
        self._timer = bridge.timers.deadline(self._timed_out)
        # for the access log and the metrics (the request line, before twisted.web sets it)
        self.started = bridge.clock.seconds()
        self.client = client_address(request)
        self.method, self.uri = request_line(request.channel)
        self.access: AccessLog = cast(Any, request.channel).site.access_log
        bridge.streams[self.id] = self
        bridge.metrics.active_streams.inc()  # a client that leaves: BridgeRequest.connectionLost

    @classmethod
    def open(cls, bridge: ForwarderService, request: BridgeRequest, method: bytes, uri: bytes,
             length: int | None) -> ClientStream:
        """Route and start a stream; raises the RequestError that answers the client otherwise."""
        limit = bridge.settings.max_body_size
        if limit and length is not None and length > limit:
            raise BodyTooLarge(f"ppbridge: request body of {length} bytes is over max_body_size ({limit})")
        host, route, target = routed(bridge, request, uri)
        if not confined(target):
            raise BadTarget()  # nothing is published: rejected, never normalised
        if not bridge.bus.connected:
            raise BusUnavailable()
        if not bridge.candidates(route.name):
            raise bridge.unavailable(route.name)
        raw = dict(request.requestHeaders.getAllRawHeaders())  # names in Headers' canonical case
        headers = [(name, value) for name, values in raw.items() for value in values]
        if request.grant is not None:  # what the route's access policy strips and sets (ppbridge.access)
            headers = request.grant.rewrite(headers)
        client = request.getClientAddress()
        headers = forwarded_request_headers(
            headers, str(getattr(client, "host", "unknown")).encode("ascii"), host,
            b"https" if request.isSecure() else b"http", bridge.settings.trusted_proxies,
        )
        # gotLength says 0 both for "Content-Length: 0" and for no body at all; only the
        # former is passed on as a length.
        declared = length if b"Content-Length" in raw else None
        headers += cls.extra_headers(request)
        head = RequestHead(method, target, headers, bridge.reply_channel, declared)
        stream = cls(bridge, request, route.name, head, b"Transfer-Encoding" in raw)
        if not stream.inline:
            stream._send_head(b"", end=False)
        return stream

    @classmethod
    def extra_headers(cls, request: BridgeRequest) -> HeaderList:
        """Headers this kind of stream adds to the forwarded ones (none: see tunnel.UpgradeStream)."""
        return []

    # client side

    def client_data(self, data: bytes) -> None:
        """A chunk of the request body from the client."""
        if self.state == "done":
            return
        self.uploaded += len(data)
        limit = self.bridge.settings.max_body_size
        if limit and self.uploaded > limit:
            self._fail(BodyTooLarge(f"ppbridge: request body is over max_body_size ({limit})"), notify=True)
        elif self.inline:
            self._held.append(data)
        elif self._outbound is not None:
            self._outbound.write(data)
            self.bridge.metrics.bytes_up.inc(len(data))

    def body_done(self) -> None:
        """The client finished sending (twisted.web is rendering the request now)."""
        self.rendered = True
        if self.state == "done":
            return
        if self.inline:
            body, self._held = b"".join(self._held), []
            self._send_head(body, end=True)
        elif self._outbound is not None:
            self._outbound.finish()
        if self._response is not None:
            self._start_response()

    def client_gone(self, reason: Failure) -> None:
        """The client's connection was lost (or it stopped reading) before the stream ended."""
        if self.state != "done":
            self.bridge.metrics.aborted.labels("client-gone").inc()
            self._cancel_upstream("client disconnected")
            self._done("client-gone")

    # IPushProducer for the client response

    def pauseProducing(self) -> None:
        if self._inbound is not None:
            self._inbound.pause()

    def resumeProducing(self) -> None:
        if self._inbound is not None:
            self._inbound.resume()

    def stopProducing(self) -> None:
        self.client_gone(Failure(ConnectionError("client stopped reading")))

    # toward the proxy

    def _send_head(self, body: bytes, end: bool) -> None:
        """Publish the request head, with ``body`` inside when both fit one frame; otherwise
        the body follows as DATA frames."""
        candidates = self.bridge.pick(self.proxy)
        if not candidates:
            self._fail(self.bridge.unavailable(self.proxy), notify=False)
            return
        entry = candidates[0]
        self.peer = entry.session.proxy_peer
        self.state = "sent"
        frame = entry.session.frame_size
        timeout = self.bridge.settings.request_timeout
        # The head carries the moment this stream answers 504 (the timer armed below): a proxy
        # refuses it after that, so a head Redis held back never runs late.
        head, deadline = self.head, int((self.bridge.clock.seconds() + timeout) * 1000)
        try:
            payload, rest = head.encode(body, deadline), b""
        except ValueError:  # more headers than wire.MAX_HEADERS (NULs never get past twisted.web)
            self._fail(BadRequest("ppbridge: too many request headers"), notify=False)
            return
        if len(payload) + OVERHEAD > frame and body:
            payload, rest = head.encode(b"", deadline), body
        if len(payload) + OVERHEAD > frame:
            self._fail(RequestError("ppbridge: request headers too large for one frame"), notify=False)
            return
        head_ends = end and not rest
        self._arm(timeout)
        d = self.bridge.node.send(entry, self.bridge.data_channel(entry), MsgType.REQ_HEAD, self.id, 0, payload,
                                  FLAG_END if head_ends else 0)
        d.addCallbacks(self._head_published, self._publish_failed, callbackArgs=(body, end))
        if not head_ends:
            self._outbound = Outbound(entry.session.peer_window, frame - OVERHEAD, self._send_frame,
                                      connection(self.request).pauseProducing, connection(self.request).resumeProducing,
                                      self.bridge.clock if self.coalesce else None)
            self._outbound.write(rest)
            if end:
                self._outbound.finish()

    def _head_published(self, receivers: int, body: bytes, end: bool) -> None:
        """PUBLISH said how many received the head. Zero may be a lie (Redis is untrusted;
        the head may have been delivered), so the request moves to another instance only
        when running it twice is harmless: an idempotent method (RFC 9110 §9.2.2) with no
        body. Anything else is answered 503: at most once."""
        if receivers or self.state != "sent" or self.peer is None:
            return
        dead, self.peer = self.peer, None  # detach first: eviction fails its streams
        self.bridge.evict(dead, "PUBLISH reached no subscriber")
        if not (self.head.method in IDEMPOTENT and end and not body and not self.uploaded):
            self._fail(ProxyUnavailable("ppbridge: the proxy instance may not have received the request; not "
                                        "retried elsewhere (only idempotent requests without a body are)"),
                       notify=False)
            return
        self._send_head(body, end)

    def _publish_failed(self, failure: Failure) -> None:
        if failure.check(RedisPermission):  # an ACL refusal: its own cause (the bus logged what to fix)
            self._fail(RedisPermission(), notify=False)
            return
        self._fail(BusUnavailable() if failure.check(BusUnavailable) else BusLost(), notify=False)

    def _current(self) -> KeyEntry | None:
        return self.bridge.keyring.current(self.peer) if self.peer is not None else None

    def _send(self, mtype: MsgType, seq: int, payload: Chunk, flags: int = 0) -> None:
        entry = self._current()
        if entry is None:
            if mtype is not MsgType.RESET:  # a RESET is best effort: the stream ends anyway
                self.instance_gone()
            return
        d = self.bridge.node.send(entry, self.bridge.data_channel(entry), mtype, self.id, seq, payload, flags)
        d.addErrback(lambda f: None)  # a lost link is handled by bus_lost()

    def _send_frame(self, chunk: Chunk, end: bool) -> None:
        self.seq += 1
        self._send(MsgType.REQ_DATA, self.seq, chunk, FLAG_END if end else 0)

    def _send_window(self, increment: int) -> None:
        self._send(MsgType.WINDOW, 0, encode_window(increment))

    def _cancel_upstream(self, why: str) -> None:
        if self.state not in ("new", "done"):  # the proxy has the head, and the stream is open
            self._send(MsgType.RESET, 0, encode_reset(CANCEL_CODE, why))

    # from the proxy

    def on_message(self, header: Header, payload: bytes) -> None:
        """A verified message for this stream; stream-level violations abort it (and re-raise)."""
        if self.state == "done":
            return
        try:
            self._dispatch(header, payload)
        except BusMessageError as err:
            self.bridge.metrics.aborted.labels(err.reason).inc()
            self._cancel_upstream("protocol error")
            self._fail(ProtocolFailure(), notify=False)
            raise

    def _dispatch(self, header: Header, payload: bytes) -> None:
        mtype = header.type
        if mtype is MsgType.RESP_HEAD:
            self._on_head(header, payload)
        elif mtype is MsgType.RESP_DATA:
            if self._inbound is None:
                raise BusMessageError("unexpected-frame", "data before the response head")
            self._inbound.check_seq(header.seq)
            self._inbound.data(payload, header.end)
            self.bridge.metrics.bytes_down.inc(len(payload))
            self._arm(self.bridge.settings.stream_idle_timeout)
        elif mtype is MsgType.WINDOW:
            if self._outbound is not None:
                self._outbound.grant(decode_window(payload))
            self._rearm()
        elif mtype is MsgType.RESET:
            code, message = decode_reset(payload)
            error = RESET_CODES.get(code, RequestError)
            self._fail(error(message or error.message), notify=False)
        else:
            raise BusMessageError("unexpected-type", f"{mtype.name} on a reply channel")

    def _on_head(self, header: Header, payload: bytes) -> None:
        if self.state != "sent" or header.seq != 0:
            raise BusMessageError("unexpected-head", "response head out of place")
        head, body = ResponseHead.decode(payload)
        self.state = "responding"
        self._response = head
        if header.end and self.rendered and self.answers_whole and not self.request.startedWriting:
            self._answer_whole(head, body)
            return
        self._inbound = Inbound(self.bridge.settings.window, self._send_window)
        self._inbound.data(body, header.end)
        self.bridge.metrics.bytes_down.inc(len(body))
        self._arm(self.bridge.settings.stream_idle_timeout)
        if self.rendered:
            self._start_response()

    def _answer_whole(self, head: ResponseHead, body: bytes) -> None:
        """A response whole in its head, for a request whose body is complete: answered at
        once, without the flow control and producer a body of frames needs (nothing more may
        come for it, and no WINDOW would be granted for it either)."""
        self.bridge.metrics.bytes_down.inc(len(body))
        self._apply_head(head)
        if body:
            self.request.write(body)
        self._finish_ok()

    def _apply_head(self, head: ResponseHead) -> None:
        """The upstream's status and end-to-end headers, on the client's response."""
        request = self.request
        request.setResponseCode(head.status, head.reason or None)
        request.responseHeaders = response_headers(head.headers)

    def _start_response(self) -> None:
        head, inbound, request = self._response, self._inbound, self.request
        if head is None or inbound is None or request.startedWriting:
            return
        self._apply_head(head)
        request.registerProducer(self, True)
        inbound.attach(request.write, self._finish_ok)

    def _finish_ok(self) -> None:
        if self.state == "done":
            return
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        request.finish()
        self._done(str(self._response.status if self._response else "ok"))
        # Ended normally (rendered, finished): what still points back at this stream lets go
        # (the request, flow control; the timer in _done), so the stream, its request and their
        # headers are freed at once instead of waiting for the cyclic garbage collector.
        request.stream = None
        self._inbound = self._outbound = None

    # ends

    def instance_gone(self, err: RequestError | None = None) -> None:
        """The proxy instance serving this stream was evicted (or lost its key). It is told
        to cancel while its key lasts: Redis may have lied, and it may be working on it."""
        self._fail(err or ProxyUnavailable("ppbridge: the proxy went away mid-request"), notify=True)

    def bus_lost(self) -> None:
        """This process lost its Redis link: answered 502 now; a proxy that has the head is
        told to cancel once the link is back (ppbridge.owedresets)."""
        if self.state not in ("new", "done") and self.peer is not None:
            self.bridge.owe_cancel(self.peer, self.id)
        self._fail(BusLost(), notify=False)

    def shutdown(self) -> None:
        self._cancel_upstream("forwarder stopping")
        self._fail(ProxyUnavailable("ppbridge: the forwarder is shutting down"), notify=False)

    def _rearm(self) -> None:
        if self.state == "sent":
            self._arm(self.bridge.settings.request_timeout)

    def _arm(self, seconds: float) -> None:
        if self.state != "done":  # the message that re-arms may also have finished the stream
            self._timer.arm(seconds)

    def _timed_out(self) -> None:
        if self.state == "sent":
            self._cancel_upstream("forwarder timed out")
            self._fail(GatewayTimeout(), notify=False)
        elif self.state == "responding":
            self.bridge.metrics.aborted.labels("idle-timeout").inc()
            self._cancel_upstream("stream idle")
            self._fail(GatewayTimeout("ppbridge: the response stalled"), notify=False)

    def _fail(self, err: RequestError, notify: bool) -> None:
        """End the stream with ``err``: an error answer if nothing was answered yet, else an abort."""
        if self.state == "done":
            return
        if notify:
            self._cancel_upstream(err.cause)
        request = self.request
        if request.startedWriting:
            log.warn("aborting a response to the client: {cause}", cause=err.cause)
            connection(request).abortConnection()
        elif self.rendered:
            if request.producer is not None:
                request.unregisterProducer()
            # An upstream head may have been applied already (no body byte went out): its
            # headers (Content-Encoding, Cache-Control...) must not dress our error.
            request.responseHeaders = Headers()
            render_error(request, err)
        else:
            refuse_early(request, err)
        self._done(err.cause)

    def _done(self, outcome: str) -> None:
        if self.state == "done":
            return
        self.state = "done"
        self._timer.close()  # it forgets this stream (see _finish_ok)
        if self._outbound is not None:
            self._outbound.stop()
        bridge, request, metrics = self.bridge, self.request, self.bridge.metrics
        bridge.streams.pop(self.id, None)
        bridge.closed.add(self.id)
        metrics.active_streams.dec()
        # ``outcome``: the upstream's status once answered, else the cause of the failure
        answered = outcome.isdigit()
        cause = NO_CAUSE if answered else outcome
        if answered or request.startedWriting:
            code = request.code  # an upstream answer (perhaps cut short), or render_error's
        else:
            code = status_of(cause)  # refuse_early writes its answer itself; or the client left (499)
        duration = bridge.clock.seconds() - self.started
        metrics.request_done(self.proxy, str(code), cause, duration)
        self.access.emit(client=self.client, method=self.method, uri=self.uri, code=code, cause=cause,
                         bytes_in=self.uploaded, bytes_out=request.sentLength, duration=duration,
                         proxy=self.proxy, instance=instance_of(self.peer))
