"""The proxy's HTTP client for its one upstream origin: a Twisted ``Agent`` that does not
parse again, per request, the URL whose origin it always calls, and hands a request to a
pooled connection without the Agent's Deferred chain.

``Agent.request`` runs every URL through ``URI.fromBytes`` (urlparse) and rebuilds its request
path with ``URI.originForm`` (urlunparse). :class:`OneOriginAgent` splits the path and query
of a plain URL of its origin itself into exactly the same ``URI`` and request path, and hands
them to the Agent's own ``_requestWithEndpoint``; any other URL goes through ``Agent.request``.

``_requestWithEndpoint`` asks the pool for a connection as a Deferred, and chains the
connection's own Deferred for the response to it (a Deferred that waits on another, per
request). When the pool (:class:`~ppbridge.upstreampool.UpstreamPool`) has an idle connection,
:meth:`OneOriginAgent.request` does what ``_requestWithEndpoint`` does then — the same
``Request`` (a :class:`~ppbridge.sendnow.WriteNowRequest`: a head without a body is written
at once), handed to the same connection, wrapped to retry once as Twisted's pool wraps it
— and returns the connection's Deferred itself (cancelling it is what cancelling the chained
one did). Without a pooled connection, or without a Host header, ``_requestWithEndpoint`` runs.

Twisted's private names used here, checked against Twisted 26.10 (whose ``Agent.request`` is
``_ensureValidURI``, ``URI.fromBytes``, ``_getEndpoint`` and ``_requestWithEndpoint``):
``Agent._requestWithEndpoint``, ``Agent._getEndpoint``, ``Agent._pool`` and ``Request._construct``
(whose check of the method is ``_newclient._ensureValidMethod``, as _requestWithEndpoint's).
tests/test_upstream_uri.py fails if they go, and compares what the paths hand on, part by part.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse

from ppbridge.sendnow import WriteNowRequest
from ppbridge.upstreampool import UpstreamPool

# A URL's path and query as urlparse splits them without a params or fragment part: printable
# ASCII (what Agent.request accepts) without ";" or "#", not starting with "//".
_PLAIN_PATH = re.compile(rb"/(?!/)[\x21\x22\x24-\x3a\x3c-\x7e]*")
_Agent = TypeVar("_Agent", bound="OneOriginAgent")


class OneOriginAgent(Agent):
    """An Agent for URLs of one origin (``prefix``, parsed once as ``origin``)."""

    origin: URI  # scheme, netloc, host and port of every URL this agent is given
    prefix: bytes  # b"scheme://netloc"
    key: tuple[bytes, bytes, int]  # the pool's key for the origin's connections
    endpoint: Any  # the endpoint the factory gives for the origin

    @classmethod
    def for_origin(cls: type[_Agent], origin: bytes, reactor: Any, endpoints: IAgentEndpointFactory,
                   pool: HTTPConnectionPool) -> _Agent:
        """The agent for ``origin`` (``b"scheme://netloc"``), connecting through ``endpoints``."""
        agent = cls.usingEndpointFactory(reactor, endpoints, pool=pool)
        agent.origin, agent.prefix = URI.fromBytes(origin + b"/"), origin
        # The pool key and endpoint of every plain URL (the origin's): worked out once.
        agent.key = (agent.origin.scheme, agent.origin.host, agent.origin.port)
        agent.endpoint = agent._getEndpoint(agent.origin)
        return agent

    def plain(self, uri: bytes) -> tuple[URI, bytes] | None:
        """(URI, request path) for a plain URL of the origin, as Agent.request makes them; None otherwise."""
        prefix = self.prefix
        if not uri.startswith(prefix) or _PLAIN_PATH.fullmatch(uri, len(prefix)) is None:
            return None
        origin, request_path = self.origin, uri[len(prefix):]
        path, _, query = request_path.partition(b"?")
        if not query:
            request_path = path  # urlunparse drops an empty query's "?"
        return URI(origin.scheme, origin.netloc, origin.host, origin.port, path, b"", query, b""), request_path

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        split = self.plain(uri)
        if split is None:
            return super().request(method, uri, headers, bodyProducer)
        parsed, request_path = split
        key, endpoint, pool = self.key, self.endpoint, self._pool
        if isinstance(pool, UpstreamPool) and headers is not None and headers.hasHeader(b"Host"):
            # Made before a connection is taken: a bad method raises here (Request checks it, as
            # _requestWithEndpoint does first), and a plain URL's path always passes.
            request = WriteNowRequest._construct(method, request_path, headers, bodyProducer,
                                                 persistent=pool.persistent, parsedURI=parsed)
            connection = pool.pooled(key, endpoint)
            if connection is not None:
                try:  # what _requestWithEndpoint's callback does; what it raises is a failed Deferred
                    answer: Deferred[IResponse] = connection.request(request)
                except Exception:
                    return fail()
                return answer
        return self._requestWithEndpoint(key, endpoint, method, parsed, headers, bodyProducer, request_path)
