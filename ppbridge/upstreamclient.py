"""The proxy's HTTP client for its one upstream service: the base URL, the Agent, its pool.

The HTTP client is a ``twisted.web.client.Agent`` (:class:`~ppbridge.oneorigin.OneOriginAgent`)
on a persistent connection pool, called directly: treq's ``HTTPClient.request`` always wraps a
cookie jar and gzip decoding around its agent (treq 26.7), and a proxy must be transparent — no
Accept-Encoding added, Content-Encoding untouched, no cookies remembered between clients,
redirects passed back and not followed.
Tests drive the calls (:mod:`ppbridge.upstream`) with ``treq.testing.RequestTraversalAgent``.

Only the configured base URL is ever called: the request target from the forwarder is an
origin-form path appended to it (:meth:`Upstream.url`), so nothing a message says can point the
proxy elsewhere.

Also what the client is handed and what it hands back: the request body as it arrives in frames
(:class:`StreamBody`, the Agent's body producer) and the request error each of its failures
means for the client (:func:`classify`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from ppbridge.errors import RequestError, UpstreamTimeout, UpstreamUnreachable
from ppbridge.logsafe import Throttle
from ppbridge.oneorigin import OneOriginAgent
from ppbridge.readpause import UpstreamConnectionFactory
from ppbridge.sendlimit import raise_send_limit
from ppbridge.streams import Inbound
from ppbridge.upstreampool import UpstreamPool
from ppbridge.wire import FRAME_PAYLOAD

POOL_SIZE = 64
# A full upstream read is one DATA frame's payload at the default frame_size: the frame is the
# read itself, neither sliced nor joined (a 256 KiB read split a frame's worth off and joined
# the 56 bytes left with the next read: two copies of every byte downloaded).
READ_SIZE = FRAME_PAYLOAD


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """The upstream's endpoint, built once: an Agent would build a HostnameEndpoint (with
    IDNA processing of the host name) for every request, and the proxy only has one."""

    def __init__(self, reactor: Any, scheme: str, host: str, port: int, connect_timeout: float) -> None:
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        if scheme == "https":
            tls = BrowserLikePolicyForHTTPS().creatorForNetloc(host.encode("idna"), port)
            endpoint = wrapClientTLS(tls, endpoint)
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        """Connect, and let each socket read take up to a frame (Twisted reads 64 KiB), and
        each send() a whole frame of an upload's body (ppbridge.sendlimit: Twisted sends
        128 KiB and joins the rest of each frame with the next one, a copy)."""

        def bigger_reads(protocol: Any) -> Any:
            if hasattr(protocol.transport, "bufferSize"):
                protocol.transport.bufferSize = READ_SIZE
            raise_send_limit(protocol.transport)
            return protocol

        return self._endpoint.connect(factory).addCallback(bigger_reads)


class Upstream:
    """The one base URL this proxy may call, and the agent that calls it."""

    def __init__(self, base_url: str, reactor: Any, connect_timeout: float, agent: IAgent | None = None) -> None:
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}".encode("ascii")
        self.host = parts.netloc.encode("ascii")
        self.base_path = parts.path.rstrip("/").encode("ascii")
        self.pool = UpstreamPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = POOL_SIZE
        self.pool._factory = UpstreamConnectionFactory  # quiet, and no pause and resume per response
        self.failures = Throttle()  # warn lines for failed upstream calls, per cause
        # Upgrade calls connect here themselves (None with an injected agent: tests of the calls)
        self.endpoint: _OneEndpoint | None = None
        if agent is None:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            self.endpoint = _OneEndpoint(reactor, parts.scheme, parts.hostname or "", port, connect_timeout)
            agent = OneOriginAgent.for_origin(self.origin, reactor, self.endpoint, self.pool)
        self.agent = agent

    def url(self, target: bytes) -> bytes:
        """The URL for an origin-form target: always under the configured base."""
        return self.origin + self.base_path + target

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()


@implementer(IBodyProducer)
class StreamBody:
    """The request body as it arrives in frames, produced into the upstream connection."""

    def __init__(self, inbound: Inbound, length: int | None) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._inbound = inbound
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._inbound.attach(self._write, self._finished)
        return self._done

    def _write(self, data: bytes) -> None:
        if not self.stopped and self._consumer is not None:
            self._consumer.write(data)

    def _finished(self) -> None:
        # After stopProducing the Deferred must never fire (IBodyProducer).
        if not self._done.called and not self.stopped:
            self._done.callback(None)

    def pauseProducing(self) -> None:
        self._inbound.pause()

    def resumeProducing(self) -> None:
        self._inbound.resume()

    def stopProducing(self) -> None:
        # The upstream answered or failed before taking the whole body: keep accepting (and
        # dropping) frames so the forwarder can finish and read the answer.
        self.stopped = True
        self._inbound.resume()


def classify(failure: Failure) -> RequestError:
    """The request error an upstream failure means for the client."""
    if failure.check(TimeoutError):  # a connect timeout
        return UpstreamTimeout()
    if failure.check(ConnectionRefusedError):
        return UpstreamUnreachable("ppbridge: the upstream service refused the connection")
    if failure.check(DNSLookupError):
        return UpstreamUnreachable("ppbridge: the upstream host name does not resolve")
    if failure.check(ConnectError, ResponseFailed):
        return UpstreamUnreachable("ppbridge: the upstream connection failed or was reset")
    return UpstreamUnreachable(f"ppbridge: upstream error ({type(failure.value).__name__})")
