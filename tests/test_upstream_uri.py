"""Tests for the proxy's Agent (ppbridge.oneorigin.OneOriginAgent): the URI and request path
it builds itself for a plain URL are exactly what Twisted's ``Agent.request`` builds, and any
other URL is left to ``Agent.request``."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from twisted.web.client import URI, Agent

from ppbridge.oneorigin import OneOriginAgent
from ppbridge.upstream import Upstream

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
