"""The proxy's calls to its one upstream service (step 4, inside the private network).

Each request from a forwarder is an :class:`UpstreamCall` through the proxy's client
(:class:`ppbridge.upstreamclient.Upstream`: the Agent and pool, only ever the configured base
URL), answered in frames. A target that would climb out of the base path (``/../``,
``%2e%2e``, ``//``) is refused (:func:`ppbridge.targets.confined`) and never called.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ppbridge.errors import (
    CANCEL_CODE,
    BadTarget,
    BusMessageError,
    GatewayTimeout,
    RequestError,
    UpstreamTimeout,
    UpstreamUnreachable,
    reset_code,
)
from ppbridge.httpheaders import end_to_end_of_raw, twisted_headers, upstream_request_headers
from ppbridge.logs import CAUSES, NO_CAUSE, status_of
from ppbridge.logsafe import escape
from ppbridge.streams import INLINE_MAX, Chunk, Inbound, Outbound
from ppbridge.targets import confined
from ppbridge.timers import CallTimers
from ppbridge.upstreamclient import StreamBody, classify
from ppbridge.wire import (FLAG_END, OVERHEAD, Header, MsgType, RequestHead, ResponseHead, clean_reason,
                           decode_reset, decode_window, encode_reset, encode_window)

if TYPE_CHECKING:
    from ppbridge.proxy import ProxyService

log = Logger()
_AGENT_SETS = frozenset((b"content-length",))  # from the body producer: not passed to the Agent
# IProtocol's calls a call answers as its response body's protocol, and the methods they are.
_BODY_PROTOCOL = (("makeConnection", "body_started"), ("dataReceived", "body_data"), ("connectionLost", "body_end"))


def _window_sender(call: UpstreamCall) -> Callable[[int], None]:
    """``call._send_window``, called only while the call lives: the request body's Inbound
    (which the Agent's body producer may keep) holds no reference back to its call, so a call
    that ended is freed by reference counting, not by the cyclic collector. A call that ended
    sends no WINDOW anyway."""
    ref = weakref.ref(call)

    def send(increment: int) -> None:
        alive = ref()
        if alive is not None:
            alive._send_window(increment)

    return send


class UpstreamCall:
    """One request from a forwarder, executed against the upstream and answered in frames."""

    coalesce = True  # small response writes may wait up to streams.COALESCE to fill a frame

    def __init__(self, proxy: ProxyService, forwarder: bytes, stream_id: bytes, head: RequestHead) -> None:
        self.proxy = proxy
        self.forwarder = forwarder
        self.stream_id = stream_id
        self.head = head
        self.seq = 0
        self.done = False
        self._inbound: Inbound | None = None  # made when needed: see inbound
        self._whole = False  # the request came whole with its head (END, no body)
        self._request: Deferred[IResponse] | None = None
        self._transport: IPushProducer | None = None
        self._outbound: Outbound | None = None
        self._buffer: list[bytes] | None = None
        self._response: ResponseHead | None = None
        self._responded = False  # the upstream's response is complete
        self._timers = CallTimers(proxy.call_clock, self._idle, self._too_slow)  # idle, and the wait for the head
        self.timed_out = False
        self._at_deadline = False  # the headers wait ends at the request's deadline (504 gateway-timeout)
        self.started = proxy.clock.seconds()  # for the metrics: upstream latency, request duration

    @property
    def inbound(self) -> Inbound:
        """The request body's flow control, made when needed: not for a request that came whole."""
        if self._inbound is None:
            self._inbound = Inbound(self.proxy.settings.window, _window_sender(self))
            self._inbound.ended = self._whole  # the head said END: a DATA frame now breaks the rules
        return self._inbound

    def start(self, body: bytes, end: bool, left: float | None = None) -> None:
        """Call the upstream; ``body``/``end`` are what came inline with the head, ``left``
        the seconds until the request's deadline (by the forwarder's clock).

        A request whose body came whole with its head is given up at its deadline: the
        forwarder answers its client 504 then, so the upstream call must not go on.

        A target that would leave the upstream's base path is refused with a RESET (bad-target)
        and the upstream is never called: the forwarder checks this too, but the proxy does
        not trust what it is told to call.
        """
        head = self.head
        if not confined(head.target):
            log.warn("refused a request target outside the upstream's base path")  # the path itself is not logged
            self._reset(BadTarget())
            return
        producer = None
        if head.content_length is not None or not end or body:
            producer = StreamBody(self.inbound, head.content_length)
            self.inbound.data(body, end)
        else:
            self._whole = True
        # Not addTimeout: the Agent turns the cancellation into ResponseNeverReceived, which
        # addTimeout does not recognise; the flag says it was our timeout.
        limit = self.proxy.settings.upstream_timeout
        if end and left is not None and left < limit:
            limit = left
            self._at_deadline = True
        self._timers.arm_both(self.proxy.settings.stream_idle_timeout, limit)
        headers = twisted_headers(upstream_request_headers(head.headers, self.proxy.upstream.host, _AGENT_SETS))
        d = self.proxy.upstream.agent.request(head.method, self.proxy.upstream.url(head.target), headers, producer)
        self._request = d
        d.addCallbacks(self._answered, self._not_answered)

    # from the forwarder

    def on_message(self, header: Header, payload: bytes) -> None:
        mtype = header.type
        if mtype is MsgType.REQ_DATA:
            self.inbound.check_seq(header.seq)
            self.inbound.data(payload, header.end)
            self.proxy.metrics.bytes_up.inc(len(payload))
            self._maybe_complete()
        elif mtype is MsgType.WINDOW:
            if self._outbound is not None:
                self._outbound.grant(decode_window(payload))
                self._maybe_complete()
        elif mtype is MsgType.RESET:
            code, _ = decode_reset(payload)
            self.cancel("forwarder cancelled" if code == CANCEL_CODE else "forwarder reset")
        else:
            raise BusMessageError("unexpected-type", f"{mtype.name} on a data channel")
        self._arm()

    def cancel(self, why: str) -> None:
        """Stop the upstream call now (the upstream sees its connection closed)."""
        if self.done:
            return
        log.debug("cancelling upstream call: {why}", why=why)
        self._finish(why)
        if self._transport is not None:
            self._transport.stopProducing()
        elif self._request is not None:
            # No check of .called: a Deferred waiting on the Agent's inner Deferred reports
            # called=True, and cancel() on one that really fired does nothing.
            self._request.cancel()

    # from the upstream

    def _too_slow(self) -> None:
        self.timed_out = True
        if self._request is not None:
            self._request.cancel()

    def _answered(self, response: IResponse) -> None:
        """The response head came: answer (a bug of ours is logged: one callback, not two)."""
        try:
            self._head_arrived()
            if self.done:
                response.deliverBody(_Discard())
                return
            headers = end_to_end_of_raw(dict(response.headers.getAllRawHeaders()))
            length = None if response.length is UNKNOWN_LENGTH else response.length
            if length is not None and self.head.method != b"HEAD" and response.code not in (204, 304):
                # The Agent moves Content-Length out of response.headers into response.length
                # (except for HEAD, where it describes the entity); put it back.
                headers.append((b"Content-Length", b"%d" % length))
            self._response = ResponseHead(response.code, clean_reason(response.phrase), headers, length)
            if length is not None and length <= INLINE_MAX:
                self._buffer = []
            else:
                self._send_head(b"", end=False)
            response.deliverBody(cast(IProtocol, self))  # the call is the body's protocol: see makeConnection
        except Exception:
            self._bug(Failure())

    def _not_answered(self, failure: Failure) -> None:
        try:
            self._failed(failure)
        except Exception:
            self._bug(Failure())

    def _head_arrived(self) -> None:
        """The upstream's response head came: the wait for it ends, its latency is observed."""
        self._timers.end_wait()
        self.proxy.upstream_latency.observe(max(0.0, self.proxy.clock.seconds() - self.started))

    def _failed(self, failure: Failure) -> None:
        self._timers.end_wait()
        if self.done:
            return
        error = self._timeout_error() if self.timed_out else classify(failure)
        logged, unlogged = self.proxy.upstream.failures.allow(error.cause, self.proxy.clock.seconds())
        if logged:
            log.warn("upstream call failed ({cause}): {reason}", cause=error.cause,
                     reason=escape(failure.getErrorMessage(), 200), unlogged=unlogged)
        if unlogged:
            log.warn("{n} more upstream call failures ({cause}) were not logged", n=unlogged, cause=error.cause)
        if not failure.check(defer.CancelledError, TimeoutError, ConnectError, DNSLookupError, ResponseFailed,
                             RequestTransmissionFailed):
            log.failure("upstream request failed", failure)
        self._reset(error)

    def _timeout_error(self) -> RequestError:
        """What the client is told when the headers wait timed out (made only then)."""
        if self._at_deadline:
            return GatewayTimeout("ppbridge: the upstream did not answer before the deadline")
        return UpstreamTimeout()

    def _bug(self, failure: Failure) -> None:
        log.failure("proxy: error answering a request", failure)
        self._reset(RequestError())

    def body_started(self, transport: IPushProducer) -> None:
        self._transport = transport

    def _pause_upstream(self) -> None:
        if self._transport is not None:
            self._transport.pauseProducing()

    def _resume_upstream(self) -> None:
        if self._transport is not None:
            self._transport.resumeProducing()

    def body_data(self, data: bytes) -> None:
        if self.done:
            return
        if self._buffer is not None:
            self._buffer.append(data)
        elif self._outbound is not None:
            self._outbound.write(data)
        self.proxy.metrics.bytes_down.inc(len(data))
        self._arm()  # the upstream is making progress: a slow response (SSE, long poll) is not idle

    def body_end(self, reason: Failure) -> None:
        if self.done:
            return
        self._transport = None
        if not isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # not Failure.check: per request
            log.warn("upstream dropped the response mid-body: {err}", err=reason.getErrorMessage())
            self.proxy.metrics.aborted.labels("upstream-dropped").inc()
            self._reset(UpstreamUnreachable("ppbridge: the upstream connection dropped mid-body"))
        else:
            self._responded = True
            if self._buffer is not None:
                self._send_head(b"".join(self._buffer), end=True)
            elif self._outbound is not None:
                self._outbound.finish()
            self._maybe_complete()

    def _maybe_complete(self) -> None:
        """Done once the response's END went out (its last frames may wait for credit) and
        the request body has ended too: an upstream that answers before reading the whole
        upload still lets the client finish sending (the rest is dropped here, and credited),
        so the forwarder can deliver the answer."""
        sent = self._outbound is None or self._outbound.finished
        if self._responded and sent and (self._whole or self.inbound.ended):
            self._finish()

    # toward the forwarder

    def _send(self, mtype: MsgType, seq: int, payload: Chunk, flags: int = 0) -> None:
        d = self.proxy.send(self.forwarder, self.head.reply_channel, mtype, self.stream_id, seq, payload, flags)
        if d is None:
            self.cancel("no key for the forwarder any more")
            return
        d.addCallbacks(self._published, self._lost_bus)

    def _published(self, receivers: int) -> None:
        if receivers == 0 and not self.done:
            # Most likely the forwarder gave up on the stream; but Redis may have lied about
            # the count, so the forwarder is told too (reaching nobody costs nothing).
            self._reset(UpstreamUnreachable("ppbridge: the proxy's answer reached no forwarder"))

    def _lost_bus(self, failure: Failure) -> None:
        self.proxy.owe_reset(self)  # the forwarder may be waiting: told once the proxy is back (owedresets)
        self.cancel("lost the bus")

    def _send_head(self, body: bytes, end: bool) -> None:
        """Publish the response head, with ``body`` inside when both fit one frame; otherwise
        the body follows as DATA frames."""
        if self._response is None:
            return
        frame = self.proxy.frame_size(self.forwarder)
        try:
            payload, rest = self._response.encode(body), b""
        except ValueError:  # a NUL in a header, or more than wire.MAX_HEADERS of them
            self._reset(UpstreamUnreachable("ppbridge: the upstream sent headers that cannot be carried"))
            return
        if len(payload) + OVERHEAD > frame and body:
            payload, rest = self._response.encode(), body
        if len(payload) + OVERHEAD > frame:
            self._reset(UpstreamUnreachable("ppbridge: upstream response headers too large"))
            return
        head_ends = end and not rest
        self._send(MsgType.RESP_HEAD, 0, payload, FLAG_END if head_ends else 0)
        if not head_ends:
            credit = self.proxy.peer_window(self.forwarder)
            # Told when its END went out: the coalescing timer may send it, after the last
            # WINDOW (or body_end) checked whether the call is complete.
            self._outbound = Outbound(credit, frame - OVERHEAD, self._send_frame, self._pause_upstream,
                                      self._resume_upstream, self.proxy.clock if self.coalesce else None,
                                      self._maybe_complete)
            self._outbound.write(rest)
            if end:
                self._outbound.finish()

    def _send_frame(self, chunk: Chunk, end: bool) -> None:
        self.seq += 1
        self._send(MsgType.RESP_DATA, self.seq, chunk, FLAG_END if end else 0)

    def _send_window(self, increment: int) -> None:
        if not self.done:
            self._send(MsgType.WINDOW, 0, encode_window(increment))

    # The response body's protocol (IProtocol's three calls, as Response.deliverBody makes
    # them) is the call itself: not an object more per request handing each call on.
    makeConnection = body_started
    dataReceived = body_data
    connectionLost = body_end

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides ``body_started``, ``body_data`` or ``body_end`` has its
        override called as the body's protocol too (the aliases above name this class's)."""
        super().__init_subclass__(**kwargs)
        for alias, method in _BODY_PROTOCOL:
            if method in cls.__dict__ and alias not in cls.__dict__:
                setattr(cls, alias, cls.__dict__[method])

    def refuse(self, error: RequestError) -> None:
        """End the call with ``error``: the forwarder gets a RESET naming it, the upstream
        connection (if any) is closed at once."""
        self._reset(error)

    def _reset(self, error: RequestError) -> None:
        if self.done:
            return
        self._send(MsgType.RESET, 0, encode_reset(reset_code(type(error)), error.detail))
        self.cancel(error.cause)

    # life

    def _arm(self) -> None:
        if not self.done:
            self._timers.arm_idle(self.proxy.settings.stream_idle_timeout)

    def _idle(self) -> None:
        self.proxy.metrics.aborted.labels("idle-timeout").inc()
        self._reset(UpstreamTimeout("ppbridge: the stream stalled"))

    def _finish(self, why: str = NO_CAUSE) -> None:
        """End the call; ``why``: the cause of an error (a free-text reason counts as "cancelled")."""
        if self.done:
            return
        self.done = True
        cause = why if why == NO_CAUSE or why in CAUSES else "cancelled"
        if self._response is not None:
            code = str(self._response.status)  # the upstream answered (perhaps cut short after)
        else:
            code = "-" if cause == "cancelled" else str(status_of(cause))
        elapsed = self.proxy.clock.seconds() - self.started
        self.proxy.metrics.request_done(self.proxy.settings.name, code, cause, elapsed)
        self._timers.close()  # it forgets this call: no reference cycle through it
        if self._outbound is not None:
            self._outbound.stop()
            self._outbound = None  # nor through the response's flow control
        self.proxy.call_done(self)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        return None
