"""Tests for ppbridge.httpheaders: hop-by-hop removal and the headers added on the way."""

from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web import http_headers
from twisted.web.http_headers import Headers, InvalidHeaderName

import ipaddress

from ppbridge import httpheaders
from ppbridge.httpheaders import (end_to_end, end_to_end_of, end_to_end_of_raw, forwarded_request_headers, trusted_peer,
                                  upgrade_headers, upgrade_token, upstream_request_headers)
from ppbridge.upgradecall import is_upgrade
from ppbridge.webrequest import response_headers
from ppbridge.wire import RequestHead

FRONT = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))  # a trusted load balancer


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


class EndToEndTests(TestCase):
    """Which headers survive a hop."""

    def test_hop_by_hop_removed(self) -> None:
        """Every hop-by-hop header is removed, whatever its case; the rest keep their order and duplicates."""
        headers = [
            (b"Content-Type", b"text/plain"), (b"connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Authenticate", b"Basic"), (b"Proxy-Authorization", b"Basic xyz"),
            (b"Proxy-Connection", b"close"), (b"te", b"trailers"), (b"Trailer", b"X-Sum"), (b"Trailers", b"x"),
            (b"TRANSFER-ENCODING", b"chunked"), (b"Upgrade", b"websocket"), (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"), (b"Authorization", b"Bearer t"),
        ]
        self.assertEqual(end_to_end(headers), [(b"Content-Type", b"text/plain"), (b"Set-Cookie", b"a=1"),
                                               (b"Set-Cookie", b"b=2"), (b"Authorization", b"Bearer t")])

    def test_headers_named_in_connection_removed(self) -> None:
        """Headers listed in Connection (any case, spaces, several Connection headers) are removed too."""
        headers = [
            (b"Connection", b"close, X-Secret-Hop"), (b"CONNECTION", b" x-other ,X-Third"),
            (b"X-Secret-Hop", b"1"), (b"x-other", b"2"), (b"X-THIRD", b"3"), (b"X-Kept", b"4"),
        ]
        self.assertEqual(end_to_end(headers), [(b"X-Kept", b"4")])

    def test_without_connection_nothing_extra_removed(self) -> None:
        """Without Connection, ordinary headers named like Connection tokens are kept."""
        headers = [(b"Close", b"x"), (b"X-Secret-Hop", b"1")]
        self.assertEqual(end_to_end(headers), headers)

    def test_grouped_as_flat(self) -> None:
        """end_to_end_of headers grouped by name (as Twisted's Headers hold them) gives what
        end_to_end gives the same headers flattened in that order, for each case above."""
        for grouped in ([(b"Content-Type", [b"text/plain"]), (b"Keep-Alive", [b"timeout=5"]),
                         (b"Set-Cookie", [b"a=1", b"b=2"]), (b"Transfer-Encoding", [b"chunked"])],
                        [(b"Connection", [b"close, X-Secret-Hop", b" x-other ,X-Third"]), (b"X-Secret-Hop", [b"1"]),
                         (b"X-Other", [b"2"]), (b"X-Third", [b"3"]), (b"X-Kept", [b"4", b"5"])],
                        [(b"Close", [b"x"]), (b"X-Secret-Hop", [b"1"])], []):
            flat = [(name, value) for name, values in grouped for value in values]
            self.assertEqual(end_to_end_of(iter(grouped)), end_to_end(flat), grouped)

    def test_raw_of_twisted_headers_as_flat(self) -> None:
        """end_to_end_of_raw of a twisted.web Headers (names filed in any case, as an upstream
        sends them: Twisted's spelling of hop-by-hop names is what it looks up) gives what
        end_to_end gives the same headers flattened, twice in a row (the second time from
        the remembered drop sets): keep-alive, Connection naming more (any case), none."""
        for flat in ([(b"server", b"x"), (b"connection", b"keep-alive"), (b"KEEP-ALIVE", b"timeout=5"),
                      (b"te", b"trailers"), (b"transfer-encoding", b"chunked"), (b"proxy-connection", b"close"),
                      (b"x-a", b"1"), (b"X-A", b"2"), (b"upgrade", b"h2c"), (b"TRAILER", b"x")],
                     [(b"Connection", b"close, X-Secret-Hop"), (b"CONNECTION", b" x-other ,X-Third"),
                      (b"x-secret-hop", b"1"), (b"X-Other", b"2"), (b"x-third", b"3"), (b"X-Kept", b"4")],
                     [(b"Connection", b"Keep-Alive"), (b"X-Kept", b"4")], [(b"Close", b"x"), (b"Etag", b'"e"')], []):
            headers = Headers()
            for name, value in flat:
                headers.addRawHeader(name, value)
            grouped = [(n, v) for n, vs in headers.getAllRawHeaders() for v in vs]
            for _ in range(2):
                self.assertEqual(end_to_end_of_raw(dict(headers.getAllRawHeaders())), end_to_end(grouped), flat)

    def test_remembered_drop_sets_are_bounded(self) -> None:
        """Distinct Connection values are remembered up to a bound only, and a long value not
        at all; each still drops what it names."""
        self.patch(httpheaders, "_CONNECTION_DROPS", {})
        for i in range(3 * httpheaders._REMEMBER):
            name = b"X-Hop-%d" % i
            self.assertEqual(end_to_end([(b"Connection", name), (name, b"1"), (b"X-Kept", b"2")]), [(b"X-Kept", b"2")])
            self.assertEqual(end_to_end_of([(b"Connection", [name]), (name, [b"1"]), (b"X-Kept", [b"2"])]),
                             [(b"X-Kept", b"2")])
        long = b"X-" + b"a" * httpheaders._REMEMBER
        self.assertEqual(upstream_request_headers([(b"Connection", long), (long, b"1")], b"h"), [(b"Host", b"h")])
        self.assertEqual(len(httpheaders._CONNECTION_DROPS), httpheaders._REMEMBER)
        self.assertNotIn(long.lower(), {n for drop in httpheaders._CONNECTION_DROPS.values() for n in drop})


class ForwardedTests(TestCase):
    """What the forwarder sends on to the proxy."""

    def test_new_chain(self) -> None:
        """Without an incoming X-Forwarded-For, the chain is the client address."""
        out = forwarded_request_headers([(b"Accept", b"*/*")], b"203.0.113.7", b"public.example", b"https")
        self.assertEqual(values(out, b"X-Forwarded-For"), [b"203.0.113.7"])
        self.assertEqual(values(out, b"X-Forwarded-Host"), [b"public.example"])
        self.assertEqual(values(out, b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(values(out, b"Accept"), [b"*/*"])

    def test_untrusted_chain_replaced(self) -> None:
        """By default (no trusted proxies) a client's own X-Forwarded-For (one or several
        headers) is dropped: the upstream sees only the address the forwarder saw."""
        headers = [(b"X-Forwarded-For", b"198.51.100.1, 10.0.0.1"), (b"x-forwarded-for", b"10.0.0.2")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"h", b"http")
        self.assertEqual(values(out, b"X-Forwarded-For"), [b"203.0.113.7"])

    def test_untrusted_client_cannot_spoof_any_forwarding_header(self) -> None:
        """From a peer outside trusted_proxies, X-Forwarded-For, Forwarded, X-Forwarded-Host
        and X-Forwarded-Proto (any case) are all replaced by the forwarder's own values."""
        headers = [(b"forwarded", b"for=127.0.0.1;proto=https;host=admin.internal"),
                   (b"X-FORWARDED-FOR", b"127.0.0.1"), (b"X-Forwarded-Host", b"admin.internal"),
                   (b"X-Forwarded-Proto", b"https"), (b"Accept", b"*/*")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"public.example", b"http", FRONT)
        self.assertEqual(out, [(b"Accept", b"*/*"), (b"X-Forwarded-For", b"203.0.113.7"),
                               (b"X-Forwarded-Host", b"public.example"), (b"X-Forwarded-Proto", b"http")])

    def test_trusted_proxy_chain_appended_and_headers_kept(self) -> None:
        """From a peer inside trusted_proxies, the X-Forwarded-For chain (one or several
        headers) is extended with the peer, and Forwarded, X-Forwarded-Host and
        X-Forwarded-Proto are kept as they came, not duplicated."""
        headers = [(b"X-Forwarded-For", b"198.51.100.1, 10.9.9.9"), (b"x-forwarded-for", b"10.0.0.2"),
                   (b"Forwarded", b"for=198.51.100.1;proto=https"), (b"X-Forwarded-Host", b"www.example"),
                   (b"X-Forwarded-Proto", b"https")]
        out = forwarded_request_headers(headers, b"10.1.2.3", b"forwarder.internal", b"http", FRONT)
        self.assertEqual(values(out, b"X-Forwarded-For"), [b"198.51.100.1, 10.9.9.9, 10.0.0.2, 10.1.2.3"])
        self.assertEqual(values(out, b"Forwarded"), [b"for=198.51.100.1;proto=https"])
        self.assertEqual(values(out, b"X-Forwarded-Host"), [b"www.example"])
        self.assertEqual(values(out, b"X-Forwarded-Proto"), [b"https"])

    def test_trusted_proxy_without_host_or_proto_gets_ours(self) -> None:
        """A trusted proxy that sent no X-Forwarded-Host/-Proto gets the forwarder's, as any client does."""
        out = forwarded_request_headers([], b"2001:db8::5", b"forwarder.internal", b"https", FRONT)
        self.assertEqual(out, [(b"X-Forwarded-For", b"2001:db8::5"), (b"X-Forwarded-Host", b"forwarder.internal"),
                               (b"X-Forwarded-Proto", b"https")])

    def test_trusted_peer(self) -> None:
        """Trust is by the peer's address in a network, IPv4 or IPv6; an IPv4-mapped IPv6 peer
        (a dual-stack listener) counts as its IPv4 address; no networks, or a peer that is not
        an IP address, is never trusted."""
        for peer in (b"10.0.0.1", b"10.255.255.255", b"2001:db8::1", b"::ffff:10.1.2.3"):
            self.assertTrue(trusted_peer(peer, FRONT), peer)
        for peer in (b"11.0.0.1", b"127.0.0.1", b"2001:db9::1", b"::ffff:11.0.0.1", b"unknown", b"", b"10.0.0.1/8"):
            self.assertFalse(trusted_peer(peer, FRONT), peer)
        self.assertFalse(trusted_peer(b"10.0.0.1", ()))

    def test_host_header_is_the_routing_host(self) -> None:
        """The Host passed on is the host the request was routed by (an absolute-form target's
        authority), once, in the Host header's place; X-Forwarded-Host says the same."""
        headers = [(b"Accept", b"*/*"), (b"Host", b"a.example"), (b"host", b"c.example"), (b"X-A", b"1")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"b.example", b"http")
        self.assertEqual(out[:3], [(b"Accept", b"*/*"), (b"Host", b"b.example"), (b"X-A", b"1")])
        self.assertEqual(values(out, b"X-Forwarded-Host"), [b"b.example"])

    def test_client_cannot_set_host_or_proto(self) -> None:
        """Client-sent X-Forwarded-Host/-Proto are replaced by what the forwarder saw, not duplicated."""
        headers = [(b"X-Forwarded-Host", b"evil.example"), (b"x-forwarded-proto", b"https")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"public.example", b"http")
        self.assertEqual(values(out, b"X-Forwarded-Host"), [b"public.example"])
        self.assertEqual(values(out, b"X-Forwarded-Proto"), [b"http"])

    def test_no_host(self) -> None:
        """Without a Host there is no X-Forwarded-Host, not even the client's."""
        out = forwarded_request_headers([(b"X-Forwarded-Host", b"evil.example")], b"203.0.113.7", None, b"http")
        self.assertEqual(values(out, b"X-Forwarded-Host"), [])

    def test_hop_by_hop_removed(self) -> None:
        """Hop-by-hop headers of the client's connection are not forwarded."""
        headers = [(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"Transfer-Encoding", b"chunked"),
                   (b"Cookie", b"s=1")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"h", b"http")
        self.assertEqual(names(out), [b"cookie", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"])


class UpstreamTests(TestCase):
    """What the proxy sends to its upstream."""

    def test_host_replaced(self) -> None:
        """The client's Host (any case, even repeated) is replaced by exactly one Host: the upstream's."""
        headers = [(b"Host", b"public.example"), (b"host", b"evil.example"), (b"Accept", b"*/*")]
        out = upstream_request_headers(headers, b"intranet.example:8000")
        self.assertEqual(values(out, b"Host"), [b"intranet.example:8000"])
        self.assertEqual(values(out, b"Accept"), [b"*/*"])

    def test_host_added(self) -> None:
        """A request without Host still reaches the upstream with its Host."""
        self.assertEqual(upstream_request_headers([], b"intranet.example"), [(b"Host", b"intranet.example")])

    def test_hop_by_hop_removed_rest_kept(self) -> None:
        """Hop-by-hop headers are removed; end-to-end ones, forwarding headers included, are kept in order."""
        headers = [(b"Keep-Alive", b"5"), (b"Connection", b"X-Hop"), (b"X-Hop", b"1"),
                   (b"X-Forwarded-For", b"203.0.113.7"), (b"Authorization", b"Bearer t")]
        for _ in range(2):  # the second time from the remembered drop sets
            out = upstream_request_headers(headers, b"intranet.example")
            self.assertEqual(out, [(b"X-Forwarded-For", b"203.0.113.7"), (b"Authorization", b"Bearer t"),
                                   (b"Host", b"intranet.example")])


    def test_also_drop(self) -> None:
        """Names in also_drop (lower-case) are left out too, whatever their case; Host is still added."""
        headers = [(b"Content-Length", b"5"), (b"content-length", b"5"), (b"Accept", b"*/*")]
        out = upstream_request_headers(headers, b"intranet.example", frozenset((b"content-length",)))
        self.assertEqual(out, [(b"Accept", b"*/*"), (b"Host", b"intranet.example")])


class TwistedHeadersTests(TestCase):
    """twisted_headers: a twisted.web Headers filled in one pass, as addRawHeader fills it."""

    def test_private_name_still_there(self) -> None:
        """The private names it uses exist (a newer Twisted must fail here first)."""
        self.assertIn("_rawHeaders", Headers.__slots__)
        self.assertEqual(Headers()._rawHeaders, {})
        self.assertEqual(http_headers._nameEncoder.encode(b"www-authenticate"), b"WWW-Authenticate")

    def test_as_add_raw_header(self) -> None:
        """The same names (Twisted's spelling: te, etag, www-authenticate, any case), values
        grouped by name in their order, line breaks made spaces; twice, the second time from
        the spellings Twisted remembered."""
        for pairs in ([(b"host", b"a"), (b"x-a", b"1\r\n2"), (b"X-A", b"3"), (b"te", b"trailers"), (b"Accept", b"")],
                      [(b"etag", b'"e"'), (b"WWW-AUTHENTICATE", b"Basic"), (b"x-b", b"a\rb\nc"), (b"Etag", b"x")],
                      []):
            expected = Headers()
            for name, value in pairs:
                expected.addRawHeader(name, value)
            for _ in range(2):
                self.assertEqual(list(httpheaders.twisted_headers(pairs).getAllRawHeaders()),
                                 list(expected.getAllRawHeaders()), pairs)

    def test_bad_name_raises(self) -> None:
        """A name that is not a token raises InvalidHeaderName, as addRawHeader does."""
        with self.assertRaises(InvalidHeaderName):
            httpheaders.twisted_headers([(b"bad name", b"1")])


class UpgradeTokenTests(TestCase):
    """Which requests ppbridge carries as upgrades (``upgrade_token``)."""

    def test_websocket_and_other_tokens(self) -> None:
        """``Connection: keep-alive, Upgrade`` (any case) with one Upgrade header gives its value as it came."""
        self.assertEqual(upgrade_token([(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket")]),
                         b"websocket")
        self.assertEqual(upgrade_token([(b"connection", b"upgrade"), (b"upgrade", b"x-raw/2")]), b"x-raw/2")

    def test_not_an_upgrade(self) -> None:
        """No upgrade without ``upgrade`` in Connection, without an Upgrade header, with two
        Upgrade headers or an empty one (ambiguous: carried as an ordinary request), or for h2c
        (answered as HTTP/1.1, RFC 9110 §7.8)."""
        for headers in ([(b"Upgrade", b"websocket")],
                        [(b"Connection", b"upgrade")],
                        [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Upgrade", b"x")],
                        [(b"Connection", b"upgrade"), (b"Upgrade", b"")],
                        [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")],
                        [(b"Connection", b"close"), (b"Upgrade", b"websocket")]):
            self.assertIsNone(upgrade_token(headers), headers)

    def test_is_upgrade_agrees(self) -> None:
        """is_upgrade (which looks for an Upgrade header first) says yes exactly where
        upgrade_token finds a token, for the cases above and requests without Upgrade."""
        for headers in ([(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket")],
                        [(b"connection", b"upgrade"), (b"UPGRADE", b"x-raw/2")],
                        [(b"Upgrade", b"websocket")], [(b"Connection", b"upgrade")], [],
                        [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Upgrade", b"x")],
                        [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")],
                        [(b"Host", b"h"), (b"Accept", b"*/*")]):
            head = RequestHead(b"GET", b"/", headers, b"reply", None)
            self.assertEqual(is_upgrade(head), upgrade_token(headers) is not None, headers)

    def test_upgrade_headers_are_the_hop_pair(self) -> None:
        """What each hop of an upgrade carries: ``Connection: Upgrade`` and the token."""
        self.assertEqual(upgrade_headers(b"websocket"), [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])


class ResponseHeadersTests(TestCase):
    """The forwarder's client response headers, filed without addRawHeader (ppbridge.webrequest)."""

    def test_same_as_end_to_end_through_add_raw_header(self) -> None:
        """response_headers() gives exactly the Headers that end_to_end() plus addRawHeader per
        pair give: canonical names (lower, odd and special-cased ones), repeated names in order,
        empty values, hop-by-hop headers and those named in Connection dropped."""
        headers = [
            (b"content-type", b"text/html"), (b"Set-Cookie", b"a=1"), (b"x-MiXeD-case", b"v"),
            (b"set-cookie", b"b=2"), (b"etag", b'"x"'), (b"WWW-Authenticate", b"Basic"), (b"X-Empty", b""),
            (b"Connection", b"close, X-Drop"), (b"x-drop", b"gone"), (b"Transfer-Encoding", b"chunked"),
            (b"Content-MD5", b"abc"), (b"te", b"trailers"), (b"Dnt", b"1"),
        ]
        expected = Headers()
        for name, value in end_to_end(headers):
            expected.addRawHeader(name, value)
        got = response_headers(headers)
        self.assertEqual(list(got.getAllRawHeaders()), list(expected.getAllRawHeaders()))
        self.assertEqual(response_headers([])._rawHeaders, {})
