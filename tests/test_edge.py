"""The forwarder's public edge, end to end through a real Redis and real HTTP: what a hostile
client can and cannot make the upstream see.

Attackers here are ordinary internet clients of the forwarder. They send request lines a
browser or an HTTP library would clean up first (dot-segments, encoded slashes, absolute-form
targets), so the requests go out byte for byte over a raw TCP connection.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ppbridge.sampleapp import make_site
from tests.support import Client, Stack, listen
from tests.test_streaming import raw_exchange, split_response


def parse_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """(status, {lowercase name: [values]}, body) of one HTTP/1.1 response (length or chunked)."""
    status_line, headers, body = split_response(raw)
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        chunks, rest = [], body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(chunks)
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"][0])]
    return int(status_line.split(b" ")[1]), headers, body


@defer.inlineCallbacks
def raw_request(case: TestCase, url: str, method: bytes, target: bytes,
                headers: list[tuple[bytes, bytes]]):  # type: ignore[no-untyped-def]
    """Send ``method target HTTP/1.1`` with ``headers`` (and Connection: close) to the server
    at ``url`` over a plain TCP connection: no client library normalises the target."""
    lines = [method + b" " + target + b" HTTP/1.1"] + [n + b": " + v for n, v in headers]
    request = b"\r\n".join(lines + [b"Connection: close", b"", b""])
    exchange = yield raw_exchange(case, url, request)
    raw = yield exchange.closed.addTimeout(15, reactor)
    return parse_response(raw)


def echoed_headers(body: bytes) -> dict[str, list[str]]:
    """The request headers the sample app's /echo saw, by lowercase name."""
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


# Each climbs out of /office (and so out of the upstream's /app) once an upstream removes
# dot-segments, decodes %2e/%2f/%5c first, or merges slashes.
ATTACKS = [
    b"/office/../admin/secret",
    b"/office/%2e%2e/admin",
    b"/office/%2E%2e/admin",
    b"/office/..%2fadmin",
    b"/office/..%5Cadmin",
    b"/office/%252e%252e/admin",
    b"/office/..;/admin",
    b"/office/x/../../admin",
    b"/office/./admin",
    b"/office//evil.example/x",
    b"/office/..",
]


class PathConfinement(TestCase):
    """A route /office to an upstream http://host/app: no request reaches outside /app."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        site, self.office_app = make_site()
        office_upstream = yield listen(self, site)
        self.stack = yield Stack(self).start(
            routes={"office": {"path_prefix": "/office"}, "gitlab": {"path_prefix": "/gitlab"}},
            upstreams={"office": office_upstream + "/app"},
        )

    @defer.inlineCallbacks
    def test_climbing_paths_are_400_bad_target_and_reach_nobody(self):
        """Every attack path (plain, %2e, %2f, %5c, double-encoded, ;params, empty segments)
        is answered 400 with X-PPBridge-Error: bad-target, and neither upstream app saw any
        request at all."""
        for target in ATTACKS:
            status, headers, body = yield raw_request(self, self.stack.url, b"GET", target,
                                                      [(b"Host", b"public.example")])
            self.assertEqual((status, headers.get(b"x-ppbridge-error")), (400, [b"bad-target"]), target)
            self.assertIn(b"base path", body)
        self.assertEqual(sum(self.office_app.hits.values()), 0, dict(self.office_app.hits))
        self.assertEqual(sum(self.stack.app.hits.values()), 0, dict(self.stack.app.hits))

    @defer.inlineCallbacks
    def test_climbing_upload_is_refused_before_its_body(self):
        """A POST with a 1 MiB body to a climbing path is answered 400 bad-target (the body is
        not carried anywhere) and the upstream sees nothing."""
        body = b"x" * (1 << 20)
        lines = (b"POST /office/%2e%2e/admin HTTP/1.1\r\nHost: public.example\r\n"
                 b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\nConnection: close\r\n\r\n")
        exchange = yield raw_exchange(self, self.stack.url, lines + body)
        status, headers, _ = parse_response((yield exchange.closed.addTimeout(15, reactor)))
        self.assertEqual((status, headers.get(b"x-ppbridge-error")), (400, [b"bad-target"]))
        self.assertEqual(sum(self.office_app.hits.values()), 0)

    @defer.inlineCallbacks
    def test_encoded_slash_and_dots_in_names_still_pass(self):
        """GitLab-style encoded slashes (group%2Fproject), a trailing slash and dots inside a
        name reach the upstream unchanged and get 200."""
        for target, seen in [(b"/gitlab/echo/api/v4/projects/group%2Fproject", "/echo/api/v4/projects/group%2Fproject"),
                             (b"/gitlab/echo/dir/", "/echo/dir/"),
                             (b"/gitlab/echo/a..b/file.tar.gz?x=../y", "/echo/a..b/file.tar.gz?x=../y")]:
            status, _, body = yield raw_request(self, self.stack.url, b"GET", target, [(b"Host", b"public.example")])
            self.assertEqual(status, 200, target)
            self.assertEqual(json.loads(body)["uri"], seen)


SPOOFED = {
    b"X-Forwarded-For": [b"198.51.100.1"],
    b"Forwarded": [b"for=198.51.100.1;proto=https;host=admin.internal"],
    b"X-Forwarded-Host": [b"admin.internal"],
    b"X-Forwarded-Proto": [b"https"],
}


class ForwardingHeaders(TestCase):
    """A client claims, in forwarding headers, to be someone else, coming over HTTPS for
    another host: believed only when it is a configured trusted proxy."""

    @defer.inlineCallbacks
    def fetch_echo(self, forwarder: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
        stack = yield Stack(self).start(forwarder=forwarder)
        headers = {**SPOOFED, b"Host": [b"public.example"]}
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo", headers)
        self.assertEqual(response.code, 200)
        return echoed_headers(body)

    @defer.inlineCallbacks
    def test_untrusted_client_cannot_spoof(self):
        """By default the upstream sees X-Forwarded-For 127.0.0.1 (the real peer) only, no
        Forwarded, and the host and proto the forwarder itself received."""
        seen = yield self.fetch_echo()
        self.assertEqual(seen["x-forwarded-for"], ["127.0.0.1"])
        self.assertNotIn("forwarded", seen)
        self.assertEqual(seen["x-forwarded-host"], ["public.example"])
        self.assertEqual(seen["x-forwarded-proto"], ["http"])

    @defer.inlineCallbacks
    def test_trusted_proxy_is_believed_and_extended(self):
        """With trusted_proxies = ["127.0.0.1/32"] the chain is extended with the peer and the
        other forwarding headers arrive as the trusted proxy sent them."""
        seen = yield self.fetch_echo({"trusted_proxies": ["127.0.0.1/32"]})
        self.assertEqual(seen["x-forwarded-for"], ["198.51.100.1, 127.0.0.1"])
        self.assertEqual(seen["forwarded"], ["for=198.51.100.1;proto=https;host=admin.internal"])
        self.assertEqual(seen["x-forwarded-host"], ["admin.internal"])
        self.assertEqual(seen["x-forwarded-proto"], ["https"])


class AbsoluteForm(TestCase):
    """RFC 9112 section 3.2.2: a request with an absolute-form target is routed by the
    target's authority, and its Host header is ignored."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        site, self.b_app = make_site()
        b_upstream = yield listen(self, site)
        self.stack = yield Stack(self).start(
            routes={"a": {"hosts": ["a.example"]}, "b": {"hosts": ["b.example"]}}, upstreams={"b": b_upstream})

    @defer.inlineCallbacks
    def test_routed_by_authority_not_host(self):
        """GET http://b.example/echo with Host: a.example reaches b's upstream, not a's, with
        X-Forwarded-Host b.example."""
        status, _, body = yield raw_request(self, self.stack.url, b"GET", b"http://b.example/echo",
                                            [(b"Host", b"a.example")])
        self.assertEqual(status, 200)
        self.assertEqual((self.b_app.hits["/echo"], self.stack.app.hits["/echo"]), (1, 0))
        self.assertEqual(echoed_headers(body)["x-forwarded-host"], ["b.example"])

    @defer.inlineCallbacks
    def test_unrouted_authority_is_404_whatever_the_host(self):
        """An absolute-form target for a host no route names gets 404 no-route, even though
        its Host header names a routed host."""
        status, headers, _ = yield raw_request(self, self.stack.url, b"GET", b"http://c.example/echo",
                                               [(b"Host", b"a.example")])
        self.assertEqual((status, headers.get(b"x-ppbridge-error")), (404, [b"no-route"]))
        self.assertEqual(sum(self.stack.app.hits.values()) + sum(self.b_app.hits.values()), 0)
