"""The forwarder's client response headers filed from a remembered filing (ppbridge.webrequest)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from ppbridge import webrequest
from ppbridge.httpheaders import end_to_end
from ppbridge.webrequest import FILINGS_KEPT, response_headers

SMALL = [(b"content-type", b"text/plain"), (b"Content-Length", b"100"), (b"etag", b'"x"'), (b"Dnt", b"1")]
REPEATED = [(b"Set-Cookie", b"a=1"), (b"content-type", b"text/plain"), (b"set-cookie", b"b=2")]
CONNECTION = [(b"Connection", b"X-Drop"), (b"x-drop", b"gone"), (b"Server", b"s")]


def expected(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, list[bytes]]]:
    """What end_to_end() plus addRawHeader per pair file."""
    out = Headers()
    for name, value in end_to_end(headers):
        out.addRawHeader(name, value)
    return [(name, list(values)) for name, values in out.getAllRawHeaders()]


def filed(headers: Headers) -> list[tuple[bytes, list[bytes]]]:
    return [(name, list(values)) for name, values in headers.getAllRawHeaders()]


class FilingTests(TestCase):
    """response_headers with its filings remembered per list of names."""

    def setUp(self) -> None:
        self.patch(webrequest, "_FILINGS", {})

    def test_remembered_filing_files_as_add_raw_header(self) -> None:
        """The first and every later response with the same names are filed as addRawHeader
        files them: one to one, with repeated names, and with a Connection header naming
        another (whose value, not the names, decides what is dropped)."""
        for headers in (SMALL, REPEATED, CONNECTION):
            for _ in range(3):
                self.assertEqual(filed(response_headers(headers)), expected(headers), headers)
        other = [(b"Connection", b"close"), (b"x-drop", b"kept"), (b"Server", b"s")]  # CONNECTION's names
        self.assertEqual(filed(response_headers(other)), expected(other))

    def test_only_one_to_one_lists_are_filed_at_once(self) -> None:
        """A list of distinct end-to-end names is remembered with its canonical names; a list
        with a repeated or a hop-by-hop name is remembered as filed header by header (())."""
        for headers in (SMALL, REPEATED, CONNECTION):
            response_headers(headers)
        self.assertEqual(webrequest._FILINGS, {
            (b"content-type", b"Content-Length", b"etag", b"Dnt"): (b"Content-Type", b"Content-Length", b"ETag", b"DNT"),
            (b"Set-Cookie", b"content-type", b"set-cookie"): (),
            (b"Connection", b"x-drop", b"Server"): (),
        })

    def test_each_response_gets_its_own_value_lists(self) -> None:
        """Two responses filed the same way share no list: changing one leaves the other."""
        first, second = response_headers(SMALL), response_headers(SMALL)
        first.addRawHeader(b"Content-Type", b"more")
        first.setRawHeaders(b"Etag", [b"changed"])
        self.assertEqual(filed(second), expected(SMALL))

    def test_remembered_lists_are_bounded(self) -> None:
        """At most FILINGS_KEPT lists of names are remembered (an upstream chooses them); the
        rest are still filed right."""
        for n in range(FILINGS_KEPT + 10):
            headers = [(b"X-Name-%d" % n, b"v")]
            self.assertEqual(filed(response_headers(headers)), expected(headers))
        self.assertEqual(len(webrequest._FILINGS), FILINGS_KEPT)
