"""Tests for ppbridge.httpheaders: hop-by-hop removal and the headers added on the way."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from ppbridge.httpheaders import end_to_end, forwarded_request_headers, upstream_request_headers


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


class ForwardedTests(TestCase):
    """What the forwarder sends on to the proxy."""

    def test_new_chain(self) -> None:
        """Without an incoming X-Forwarded-For, the chain is the client address."""
        out = forwarded_request_headers([(b"Accept", b"*/*")], b"203.0.113.7", b"public.example", b"https")
        self.assertEqual(values(out, b"X-Forwarded-For"), [b"203.0.113.7"])
        self.assertEqual(values(out, b"X-Forwarded-Host"), [b"public.example"])
        self.assertEqual(values(out, b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(values(out, b"Accept"), [b"*/*"])

    def test_chain_appended(self) -> None:
        """An incoming X-Forwarded-For chain (one or several headers) is extended with the client address."""
        headers = [(b"X-Forwarded-For", b"198.51.100.1, 10.0.0.1"), (b"x-forwarded-for", b"10.0.0.2")]
        out = forwarded_request_headers(headers, b"203.0.113.7", b"h", b"http")
        self.assertEqual(values(out, b"X-Forwarded-For"), [b"198.51.100.1, 10.0.0.1, 10.0.0.2, 203.0.113.7"])

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
        out = upstream_request_headers(headers, b"intranet.example")
        self.assertEqual(out, [(b"X-Forwarded-For", b"203.0.113.7"), (b"Authorization", b"Bearer t"),
                               (b"Host", b"intranet.example")])
