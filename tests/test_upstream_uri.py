"""Tests for the proxy's Agent (ppbridge.oneorigin.OneOriginAgent): the URI and request path
it builds itself for a plain URL are exactly what Twisted's ``Agent.request`` builds, and any
other URL is left to ``Agent.request``; a pooled connection is handed the same Request as
Twisted's Agent hands it."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from twisted.web import _newclient
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from ppbridge.oneorigin import OneOriginAgent
from ppbridge.upstreamclient import Upstream

PLAIN = [b"/", b"/small.txt", b"/a/b/c", b"/a?q=1", b"/a?", b"/a?b?c", b"/?x", b"/a:b@c!$&'()*+,=~-._",
         b"/%2F%20x", b"/a/?q=%00", b"/" + b"x" * 5000]
OTHER = [b"/a;p", b"/a;p?q", b"/a#frag", b"/a?q#f", b"//evil.example/x", b"/a b", b"/a\tb", b"/a\x7f", b"/\xc3\xa9",
         b"", b"x", b"?q"]


class _Recording(OneOriginAgent):
    """Records what reaches ``_requestWithEndpoint`` instead of connecting."""

    calls: list[tuple[Any, ...]]

    def _requestWithEndpoint(self, *args: Any) -> Any:  # type: ignore[override]
        self.calls.append(args)
        return None


def _agent(base: str) -> _Recording:
    upstream = Upstream(base, MemoryReactorClock(), 5.0)
    agent = _Recording.for_origin(cast(OneOriginAgent, upstream.agent).prefix, MemoryReactorClock(),
                                  cast(Any, upstream.endpoint), upstream.pool)
    agent.calls = []
    return agent


def _shown(call: tuple[Any, ...]) -> tuple[Any, ...]:
    key, _, method, uri, headers, producer, path = call
    return key, method, vars(uri), headers, producer, path


class OneOriginAgentTests(TestCase):
    """The Agent's own URL split against Twisted's."""

    def test_private_names_still_there(self) -> None:
        """The Agent methods the fast path calls exist (a newer Twisted must fail here first)."""
        for name in ("_requestWithEndpoint", "_getEndpoint"):
            self.assertTrue(callable(getattr(Agent, name, None)), name)
        self.assertIsInstance(Agent(MemoryReactorClock())._pool, HTTPConnectionPool)
        self.assertTrue(callable(_newclient.Request._construct))
        self.assertEqual(_newclient._ensureValidMethod(b"GET"), b"GET")

    def test_upstream_uses_it(self) -> None:
        """The proxy's Upstream calls through a OneOriginAgent of its origin."""
        agent = Upstream("http://127.0.0.1:8080/base", MemoryReactorClock(), 5.0).agent
        self.assertIsInstance(agent, OneOriginAgent)
        self.assertEqual(agent.prefix, b"http://127.0.0.1:8080")  # type: ignore[attr-defined,union-attr]

    def test_plain_urls_as_twisted_splits_them(self) -> None:
        """For plain targets under several bases, the fast path hands _requestWithEndpoint the
        same key, URI (every part) and request path as Agent.request does."""
        for base in ("http://127.0.0.1:8080", "http://intranet.example/app", "https://[::1]:8443/a/b/"):
            agent = _agent(base)
            upstream_base = base.rstrip("/").encode("ascii")
            for target in PLAIN:
                url = upstream_base + target
                self.assertIsNotNone(agent.plain(url), url)
                agent.request(b"GET", url, None, None)
                Agent.request(agent, b"GET", url, None, None)
                fast, twisted = agent.calls[-2:]
                self.assertEqual(_shown(fast), _shown(twisted), url)
                parsed = URI.fromBytes(url)
                self.assertEqual(fast[-1], parsed.originForm, url)

    def test_other_urls_left_to_twisted(self) -> None:
        """Params, fragments, a second leading slash, bytes Agent.request refuses, another origin
        or a base path with ';': not split here."""
        agent = _agent("http://127.0.0.1:8080")
        for target in OTHER:
            self.assertIsNone(agent.plain(b"http://127.0.0.1:8080" + target), target)
        self.assertIsNone(agent.plain(b"http://127.0.0.1:8081/a"))
        self.assertIsNone(agent.plain(b"https://127.0.0.1:8080/a"))
        self.assertIsNone(_agent("http://127.0.0.1:8080/x;y").plain(b"http://127.0.0.1:8080/x;y/a"))

    def test_refused_urls_still_refused(self) -> None:
        """A URL Agent.request refuses (a space) fails the same way through this agent."""
        agent = _agent("http://127.0.0.1:8080")
        self.assertRaises(ValueError, agent.request, b"GET", b"http://127.0.0.1:8080/a b")
        self.assertRaises(ValueError, Agent.request, agent, b"GET", b"http://127.0.0.1:8080/a b")
        self.assertEqual(agent.calls, [])


class _Pooled:
    """A pooled connection as the pool sees one: QUIESCENT; it records each Request it is
    handed and answers with a Deferred that records its cancellation."""

    state = "QUIESCENT"

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.cancelled = 0

    def request(self, request: Any) -> Deferred[Any]:
        self.requests.append(request)
        return Deferred(lambda _: self._cancel())

    def _cancel(self) -> None:
        self.cancelled += 1


def _request_parts(request: Any) -> dict[str, Any]:
    parts = dict(vars(request))
    parts["_parsedURI"] = vars(parts["_parsedURI"])
    return parts


class PooledConnectionTests(TestCase):
    """With an idle pooled connection the Agent skips _requestWithEndpoint's Deferred chain."""

    def test_same_request_as_twisted(self) -> None:
        """For several targets and methods, the Request a pooled connection is handed (method,
        path, headers, body producer, persistence, parsed URI) equals the one Twisted's Agent
        hands a connection from its own pool; the Deferred returned is the connection's own,
        and cancelling it cancels the request."""
        reactor = MemoryReactorClock()
        upstream = Upstream("http://127.0.0.1:8080/app", reactor, 5.0)
        ours = cast(OneOriginAgent, upstream.agent)
        twisted_pool = HTTPConnectionPool(reactor, persistent=True)
        twisted_agent = Agent.usingEndpointFactory(reactor, cast(Any, upstream.endpoint), pool=twisted_pool)
        key = (b"http", b"127.0.0.1", 8080)
        for method, target in ((b"GET", b"/"), (b"POST", b"/a/b?q=1"), (b"DELETE", b"/a?")):
            headers = Headers({b"Host": [b"127.0.0.1:8080"], b"X-Test": [b"1"]})
            url = upstream.url(target)
            mine, theirs = _Pooled(), _Pooled()
            upstream.pool._putConnection(key, mine)
            twisted_pool._putConnection(key, theirs)
            answer = ours.request(method, url, headers, None)
            twisted_agent.request(method, url, headers, None)
            [request], [expected] = mine.requests, theirs.requests
            self.assertEqual(_request_parts(request), _request_parts(expected), (method, target))
            answer.cancel()
            self.failureResultOf(answer, CancelledError)
            self.assertEqual(mine.cancelled, 1)
        twisted_pool.closeCachedConnections()

    def test_bad_method_raises_and_keeps_the_connection(self) -> None:
        """A method that is not a token raises ValueError at once, as Twisted's Agent does, and
        the idle connection stays in the pool for the next request."""
        upstream = Upstream("http://127.0.0.1:8080", MemoryReactorClock(), 5.0)
        key = (b"http", b"127.0.0.1", 8080)
        pooled = _Pooled()
        upstream.pool._putConnection(key, pooled)
        headers = Headers({b"Host": [b"127.0.0.1:8080"]})
        self.assertRaises(ValueError, upstream.agent.request, b"G(T", upstream.url(b"/x"), headers, None)
        self.assertEqual((pooled.requests, upstream.pool._connections[key]), ([], [pooled]))
        upstream.agent.request(b"GET", upstream.url(b"/x"), headers, None)
        self.assertEqual(len(pooled.requests), 1)

    def test_without_pooled_connection_connects(self) -> None:
        """With no idle connection the request goes through _requestWithEndpoint, which connects."""
        reactor = MemoryReactorClock()
        upstream = Upstream("http://127.0.0.1:8080", reactor, 5.0)
        self.assertNoResult(upstream.agent.request(b"GET", upstream.url(b"/x"), Headers({b"Host": [b"h"]}), None))
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 8080)])
