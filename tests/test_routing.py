"""Tests for ppbridge.routing: which proxy serves a request, and the target it receives."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import TestCase

from ppbridge import keys
from ppbridge.config import Route
from ppbridge.routing import Router, origin_form, request_target

_KEY: list[rsa.RSAPublicKey] = []


def route(name: str, path_prefix: str = "", hosts: tuple[str, ...] = ()) -> Route:
    if not _KEY:
        _KEY.append(keys.generate_private_key(2048).public_key())
    return Route(name, _KEY[0], Path(f"/keys/{name}.pub"), path_prefix=path_prefix, hosts=hosts)


def chosen(router: Router, host: bytes | None, target: bytes) -> tuple[str, bytes] | None:
    found = router.match(host, target)
    return None if found is None else (found[0].name, found[1])


class RouterTests(TestCase):
    """Route precedence and prefix stripping."""

    def test_prefix_segment_boundaries(self) -> None:
        """A prefix matches itself, itself followed by '/' or '?', and nothing else; it is stripped."""
        router = Router([route("office", "/office")])
        self.assertEqual(chosen(router, None, b"/office"), ("office", b"/"))
        self.assertEqual(chosen(router, None, b"/office/"), ("office", b"/"))
        self.assertEqual(chosen(router, None, b"/office/x/y?z=1"), ("office", b"/x/y?z=1"))
        self.assertEqual(chosen(router, None, b"/office?q=1"), ("office", b"/?q=1"))
        for target in (b"/officex", b"/office-hr/x", b"/offic", b"/", b"/other/office"):
            self.assertIsNone(chosen(router, None, target), target)

    def test_empty_prefix_matches_everything_unchanged(self) -> None:
        """A route without prefix takes every path and passes it on as is."""
        router = Router([route("all")])
        for target in (b"/", b"/a/b?c=d", b"/office"):
            self.assertEqual(chosen(router, b"any.example", target), ("all", target))

    def test_longest_prefix_wins(self) -> None:
        """Of several matching prefixes, the longest one is chosen, whatever the configuration order."""
        routes = [route("root"), route("office", "/office"), route("hr", "/office/hr")]
        for order in (routes, routes[::-1]):
            router = Router(order)
            self.assertEqual(chosen(router, None, b"/office/hr/pay"), ("hr", b"/pay"))
            self.assertEqual(chosen(router, None, b"/office/hrx"), ("office", b"/hrx"))
            self.assertEqual(chosen(router, None, b"/office/x"), ("office", b"/x"))
            self.assertEqual(chosen(router, None, b"/elsewhere"), ("root", b"/elsewhere"))

    def test_host_route_beats_prefix_route(self) -> None:
        """A route naming the request's Host wins over prefix-only routes, even with longer prefixes."""
        router = Router([route("deep", "/office/deep/path"), route("intranet", "", ("intranet.example",))])
        self.assertEqual(chosen(router, b"intranet.example", b"/office/deep/path/x"),
                         ("intranet", b"/office/deep/path/x"))
        self.assertEqual(chosen(router, b"public.example", b"/office/deep/path/x"), ("deep", b"/x"))

    def test_host_routes_by_prefix(self) -> None:
        """Among Host routes the longest prefix wins; if none matches, prefix-only routes are tried."""
        router = Router([route("fallback"), route("api", "/api", ("intranet.example",)),
                         route("api-v2", "/api/v2", ("intranet.example",))])
        self.assertEqual(chosen(router, b"intranet.example", b"/api/v2/x"), ("api-v2", b"/x"))
        self.assertEqual(chosen(router, b"intranet.example", b"/api/v1"), ("api", b"/v1"))
        self.assertEqual(chosen(router, b"intranet.example", b"/web"), ("fallback", b"/web"))

    def test_host_case_and_port(self) -> None:
        """Host matching ignores case and a port, unless the route names a port."""
        router = Router([route("any-port", "", ("intranet.example",)), route("tls", "", ("secure.example:8443",))])
        for host in (b"intranet.example", b"INTRANET.Example", b"intranet.example:8080"):
            self.assertEqual(chosen(router, host, b"/"), ("any-port", b"/"), host)
        self.assertEqual(chosen(router, b"secure.example:8443", b"/"), ("tls", b"/"))
        self.assertEqual(chosen(router, b"SECURE.example:8443", b"/"), ("tls", b"/"))
        for host in (b"secure.example", b"secure.example:443", b"intranet.example.evil", b"evil.example"):
            self.assertIsNone(chosen(router, host, b"/"), host)

    def test_ipv6_hosts(self) -> None:
        """An IPv6 literal host matches with or without a port."""
        router = Router([route("v6", "", ("[::1]",))])
        self.assertEqual(chosen(router, b"[::1]", b"/"), ("v6", b"/"))
        self.assertEqual(chosen(router, b"[::1]:8080", b"/"), ("v6", b"/"))
        self.assertIsNone(chosen(router, b"[::2]", b"/"))

    def test_no_host_header(self) -> None:
        """A request without Host matches no Host route but can match prefix-only routes."""
        router = Router([route("named", "", ("intranet.example",))])
        self.assertIsNone(chosen(router, None, b"/"))
        router = Router([route("named", "", ("intranet.example",)), route("any", "/x")])
        self.assertEqual(chosen(router, None, b"/x/y"), ("any", b"/y"))

    def test_no_route(self) -> None:
        """With no matching route the answer is None (the forwarder's 404)."""
        self.assertIsNone(chosen(Router([]), b"h", b"/"))
        self.assertIsNone(chosen(Router([route("office", "/office")]), b"h", b"/public"))


class OriginFormTests(TestCase):
    """Reducing request targets to origin-form."""

    def test_origin_form_kept(self) -> None:
        """An origin-form target is returned unchanged."""
        for target in (b"/", b"/a/b?c=d&e=%20", b"/office"):
            self.assertEqual(origin_form(target), target)

    def test_absolute_form_reduced(self) -> None:
        """An http(s) absolute-form URI is reduced to its path and query, scheme case ignored."""
        self.assertEqual(origin_form(b"http://intranet.example/a/b?c=d"), b"/a/b?c=d")
        self.assertEqual(origin_form(b"https://intranet.example:8443/x"), b"/x")
        self.assertEqual(origin_form(b"HTTP://intranet.example/x"), b"/x")
        self.assertEqual(origin_form(b"http://intranet.example"), b"/")
        self.assertEqual(origin_form(b"http://user@intranet.example/x"), b"/x")

    def test_absolute_form_with_query_and_no_path(self) -> None:
        """An absolute URI with a query but no path keeps its query, under the root path."""
        self.assertEqual(origin_form(b"http://intranet.example?q=1"), b"/?q=1")

    def test_slash_in_query_is_not_the_path(self) -> None:
        """A '/' inside the query of a path-less absolute URI is not taken for the start of the path
        (http://h?next=/admin is a request for '/', not for '/admin')."""
        self.assertEqual(origin_form(b"http://intranet.example?next=/admin"), b"/?next=/admin")

    def test_other_forms_rejected(self) -> None:
        """Asterisk-form, authority-form, other schemes and relative paths give None."""
        for target in (b"*", b"intranet.example:443", b"ftp://intranet.example/x", b"a/b", b"", b"http:/x"):
            self.assertIsNone(origin_form(target), target)


class RequestTargetTests(TestCase):
    """The authority of an absolute-form target, which routes the request (RFC 9112 section 3.2.2)."""

    def test_origin_form_has_no_authority(self) -> None:
        """An origin-form target gives no authority (the Host header routes it) and itself."""
        self.assertEqual(request_target(b"/a/b?c=d"), (None, b"/a/b?c=d"))

    def test_absolute_form_gives_its_authority(self) -> None:
        """An absolute-form target gives host[:port] exactly as written (case kept: matching
        ignores it), without user info, and its path and query."""
        self.assertEqual(request_target(b"http://b.example/echo"), (b"b.example", b"/echo"))
        self.assertEqual(request_target(b"HTTPS://B.Example:8443/x?y=1"), (b"B.Example:8443", b"/x?y=1"))
        self.assertEqual(request_target(b"http://user:pw@b.example/x"), (b"b.example", b"/x"))
        self.assertEqual(request_target(b"http://a@b@c.example/x"), (b"c.example", b"/x"))
        self.assertEqual(request_target(b"http://[::1]:8080/x"), (b"[::1]:8080", b"/x"))
        self.assertEqual(request_target(b"http://b.example"), (b"b.example", b"/"))
        self.assertEqual(request_target(b"http://b.example?next=/admin"), (b"b.example", b"/?next=/admin"))
        self.assertEqual(request_target(b"http://b.example#frag/x"), (b"b.example", b"/"))

    def test_empty_host_rejected(self) -> None:
        """An http(s) URI with an empty host is invalid (RFC 9110 section 4.2.1): None, so the
        forwarder answers 400 bad-request instead of routing it by the Host header."""
        for target in (b"http:///x", b"http://user@/x", b"http://:80/x", b"https://?q", b"http://"):
            self.assertIsNone(request_target(target), target)
            self.assertIsNone(origin_form(target), target)

    def test_authority_routes_not_host(self) -> None:
        """Routed with the authority of an absolute-form target, a request whose Host names
        another route goes where its authority says."""
        router = Router([route("a", "", ("a.example",)), route("b", "", ("b.example",))])
        authority, target = request_target(b"http://b.example/echo")  # sent with Host: a.example
        self.assertEqual(chosen(router, authority, target), ("b", b"/echo"))
