"""A small intranet HTTP service: what ``ppbridge demo`` shows and what the tests call.

``make_site`` returns a twisted.web ``Site`` and the ``SampleApp`` resource behind it. The
app answers a fixed set of paths (see ``SampleApp``) and counts what it saw, so tests can
check what reached the upstream and await client disconnects instead of sleeping.

Nothing here schedules on the global reactor: the clock is passed in, and only
``make_site(None)`` and ``main`` resolve the real reactor.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import cast
from urllib.parse import parse_qs

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from ppbridge.pattern import PatternProducer

log = Logger()

GZIP_BODY: bytes = gzip.compress(b"hello gzip\n", mtime=0)
"""The exact body ``/gzip`` sends (``Content-Encoding: gzip`` of ``b"hello gzip\\n"``)."""

MAX_BYTES = 1 << 30
"""Largest ``n`` that ``/bytes`` accepts (1 GiB)."""

class _BadQuery(ValueError):
    """A query argument that is missing its form or its range; answered with 400."""


def _query(request: Request) -> dict[str, list[str]]:
    """Parse the query string from the raw request URI (latin-1, blank values kept)."""
    raw = request.uri.partition(b"?")[2]
    return parse_qs(raw.decode("latin-1"), keep_blank_values=True)


def _number(query: dict[str, list[str]], name: str, default: float, top: float) -> float:
    """Return query argument ``name`` as a finite number in ``[0, top]``, else raise."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = float(values[-1]) if len(values[-1]) <= 32 else math.nan
    except ValueError:
        raise _BadQuery(f"{name} must be a number") from None
    if not 0 <= value <= top:
        raise _BadQuery(f"{name} must be between 0 and {top:g}")
    return value


def _integer(query: dict[str, list[str]], name: str, default: int, top: int) -> int:
    """Return query argument ``name`` as an integer in ``[0, top]``, else raise."""
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(top))):
        raise _BadQuery(f"{name} must be a whole number")
    if int(text) > top:
        raise _BadQuery(f"{name} must be at most {top}")
    return int(text)


def _body_digest(request: Request) -> tuple[str, int]:
    """Return the hex SHA-256 and length of the (already buffered) request body."""
    digest, length = hashlib.sha256(), 0
    content = request.content
    if content is not None:
        content.seek(0)
        while piece := content.read(1 << 20):
            digest.update(piece)
            length += len(piece)
    return digest.hexdigest(), length


def _plain(request: Request, code: int, text: str) -> bytes:
    """Set ``code`` and a plain-text type; return ``text`` encoded for the body."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return text.encode("utf-8")


def _json(request: Request, value: object) -> bytes:
    """Set a JSON content type and return ``value`` serialized."""
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value).encode("utf-8")


class _EventStream:
    """Sends ``n`` server-sent events, one every ``interval`` seconds, then finishes.

    The time in each event is ``clock.seconds()``, which for the real reactor is
    ``time.time()``. The stream stops when the client leaves.
    """

    def __init__(self, request: Request, n: int, interval: float, clock: IReactorTime):
        self._request, self._n, self._sent, self._gone = request, n, 0, False
        self._interval, self._clock = interval, clock
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        """Send the first event now and the rest on the clock."""
        self._request.notifyFinish().addErrback(self._client_left)
        if self._n == 0:
            self._request.write(b"")
            self._request.finish()
            return
        self._loop.start(self._interval, now=True).addCallbacks(self._done, self._failed)

    def _tick(self) -> None:
        now = self._clock.seconds()
        self._request.write(f"data: {self._sent} {now!r}\n\n".encode("ascii"))
        self._sent += 1
        if self._sent >= self._n:
            self._loop.stop()

    def _client_left(self, reason: Failure) -> None:
        self._gone = True
        if self._loop.running:
            self._loop.stop()

    def _done(self, _: object) -> None:
        if not (self._gone or self._request.finished):
            self._request.finish()

    def _failed(self, failure: Failure) -> None:
        log.failure("event stream failed", failure)
        self._done(None)


class _ExactCaseHeaders(Headers):
    """Response headers that put chosen names on the wire in exactly the case given.

    twisted.web canonicalizes header names (``X-Mixed-Case``); ``exact`` maps such a
    canonical name to the spelling to send, so ``/cookies`` can send ``X-MiXeD-Case``.
    """

    def __init__(self, exact: dict[bytes, bytes], source: Headers) -> None:
        super().__init__()
        self._exact = exact
        for name, values in source.getAllRawHeaders():
            self.setRawHeaders(name, list(values))

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        """Yield the headers, with names in ``exact`` respelled."""
        for name, values in super().getAllRawHeaders():
            yield self._exact.get(name, name), list(values)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Hello from the intranet</title></head>
<body>
<h1>Hello from the intranet</h1>
<p>You reached a web service that runs inside a private network. ppbridge carried your
request here: the public forwarder published it on Redis, and the proxy inside the
network picked it up and called this service for you.</p>
<table>
{rows}</table>
<p>Try <a href="echo">echo</a>, <a href="bytes?n=1048576">1 MiB of bytes</a> or
<a href="sse?n=5&amp;interval=1">server-sent events</a>.</p>
</body></html>
"""


class SampleApp(Resource):
    """The intranet service: one resource that answers every path itself.

    Paths: ``/`` (HTML page), ``/echo[/...]``, ``/bytes``, ``/upload``, ``/status/CODE``,
    ``/cookies``, ``/redirect``, ``/gzip``, ``/sse``, ``/slow``, ``/hang``; else 404.

    It owns the counters tests rely on: ``hits`` (requests per path, query left off),
    ``disconnects`` (clients that left before their response finished) and
    ``on_disconnect`` (hooks called with the path at each such disconnect, after the
    endpoint has cancelled its own timers, so a hook may check that none are left).
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.hits: Counter[str] = Counter()
        self.disconnects = 0
        self.on_disconnect: list[Callable[[str], None]] = []
        self._routes: dict[bytes, Callable[[Request], bytes | int]] = {
            b"/": self._page,
            b"/echo": self._echo,
            b"/bytes": self._bytes,
            b"/upload": self._upload,
            b"/cookies": self._cookies,
            b"/redirect": self._redirect,
            b"/gzip": self._gzip,
            b"/sse": self._sse,
            b"/slow": self._slow,
            b"/hang": self._hang,
        }

    def render(self, request: Request) -> bytes | int:
        """Count the request, answer it, and watch for the client leaving early."""
        raw_path = request.path
        path = raw_path.decode("latin-1")
        self.hits[path] += 1
        try:
            result = self._route(raw_path)(request)
        except _BadQuery as e:
            result = _plain(request, 400, f"bad request: {e}\n")
        if not request.finished:
            request.notifyFinish().addErrback(self._client_left, path)
        return result

    def _route(self, path: bytes) -> Callable[[Request], bytes | int]:
        """Return the handler for ``path``."""
        if path.startswith(b"/echo/"):
            return self._echo
        if path.startswith(b"/status/"):
            return self._status
        return self._routes.get(path, self._not_found)

    def _client_left(self, reason: Failure, path: str) -> None:
        """Count a client that left before its response finished; call the hooks."""
        self.disconnects += 1
        log.debug("client left {path} early", path=path)
        for hook in list(self.on_disconnect):
            try:
                hook(path)
            except Exception:
                log.failure("on_disconnect hook failed for {path}", path=path)

    def _not_found(self, request: Request) -> bytes:
        return _plain(request, 404, "not found\n")

    def _page(self, request: Request) -> bytes:
        """The friendly HTML page, showing what the request looked like here."""

        shown = [("Method", request.method), ("Path", request.path)]
        for name in ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"):
            values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
            shown.append((name, b", ".join(values or [b"(none)"])))
        rows = "".join(
            f"<tr><th>{name}</th><td>{html.escape(value.decode('latin-1'))}</td></tr>\n"
            for name, value in shown
        )
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return _PAGE.format(rows=rows).encode("utf-8")

    def _echo(self, request: Request) -> bytes:
        """Describe the request as JSON: method, raw URI, headers, body digest."""
        headers = [
            [name.decode("latin-1"), value.decode("latin-1")]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        sha, length = _body_digest(request)
        return _json(
            request,
            {
                "method": request.method.decode("latin-1"),
                "uri": request.uri.decode("latin-1"),
                "headers": headers,
                "body_sha256": sha,
                "body_length": length,
            },
        )

    def _bytes(self, request: Request) -> int:
        """Stream ``n`` pattern bytes for ``seed``; chunked when ``chunked=1``."""
        query = _query(request)
        n = _integer(query, "n", 0, MAX_BYTES)
        seed = _integer(query, "seed", 0, 2**64 - 1)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        if query.get("chunked", ["0"])[-1] != "1":
            request.setHeader(b"Content-Length", b"%d" % n)
        if request.method == b"HEAD":
            request.finish()
            return NOT_DONE_YET
        producer = PatternProducer(request, seed, n, self.clock)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        producer.start()
        return NOT_DONE_YET

    def _upload(self, request: Request) -> bytes:
        """Digest the uploaded body (POST or PUT only)."""
        if request.method not in (b"POST", b"PUT"):
            request.setHeader(b"Allow", b"POST, PUT")
            return _plain(request, 405, "use POST or PUT\n")
        sha, length = _body_digest(request)
        return _json(request, {"body_sha256": sha, "body_length": length})

    def _status(self, request: Request) -> bytes | int:
        """Answer the status code named in the path, with ``X-Sample: yes``."""
        text = request.path[len(b"/status/") :]
        if not (len(text) == 3 and text.isdigit() and 200 <= int(text) <= 599):
            raise _BadQuery("status code must be 200..599")
        code = int(text)
        request.setHeader(b"X-Sample", b"yes")
        if code in NO_BODY_CODES:
            request.setResponseCode(code)
            request.finish()  # returning b"" would add Content-Length: 0
            return NOT_DONE_YET
        reason = RESPONSES.get(code, b"Unknown").decode("ascii")
        return _plain(request, code, f"{code} {reason}\n")

    def _cookies(self, request: Request) -> bytes:
        """Two ``Set-Cookie`` lines and a header sent as ``X-MiXeD-Case``."""
        request.addCookie(b"a", b"1", path=b"/")
        request.addCookie(b"b", b"2", path=b"/")
        request.setHeader(b"X-MiXeD-Case", b"v")
        request.responseHeaders = _ExactCaseHeaders(
            {b"X-Mixed-Case": b"X-MiXeD-Case"}, request.responseHeaders
        )
        return _plain(request, 200, "cookies set\n")

    def _redirect(self, request: Request) -> bytes:
        request.setHeader(b"Location", b"/echo")
        return _plain(request, 302, "see /echo\n")

    def _gzip(self, request: Request) -> bytes:
        request.setHeader(b"Content-Encoding", b"gzip")
        _plain(request, 200, "")
        return GZIP_BODY

    def _sse(self, request: Request) -> int:
        """Server-sent events: ``n`` events (10) every ``interval`` seconds (0.1)."""
        query = _query(request)
        n = _integer(query, "n", 10, 1_000_000)
        interval = _number(query, "interval", 0.1, 3600.0)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        _EventStream(request, n, interval, self.clock).start()
        return NOT_DONE_YET

    def _slow(self, request: Request) -> int:
        """Answer ``slow`` after ``delay`` seconds (1); cancel if the client leaves."""
        delay = _number(_query(request), "delay", 1.0, 3600.0)

        def answer() -> None:
            request.write(_plain(request, 200, "slow\n"))
            request.finish()

        call = self.clock.callLater(delay, answer)

        def client_left(reason: Failure) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(client_left)
        return NOT_DONE_YET

    def _hang(self, request: Request) -> int:
        """Never answer; ``render`` counts the disconnect when the client gives up."""
        return NOT_DONE_YET


def make_site(clock: IReactorTime | None = None) -> tuple[Site, SampleApp]:
    """Return a ``Site`` serving a new ``SampleApp``, and the app.

    ``clock`` drives the app's own timers (``/sse``, ``/slow``, producer turns) and
    defaults to the global reactor, resolved here and not at import. The ``Site`` keeps
    its connection timers on the global reactor, which owns the sockets, so a test's
    ``Clock`` holds only the app's timers.
    """
    if clock is None:
        from twisted.internet import reactor

        clock = cast(IReactorTime, reactor)
    app = SampleApp(clock)
    return Site(app, parsePOSTFormSubmission=False), app


def main(argv: list[str] | None = None) -> None:
    """Serve the sample app on 127.0.0.1: ``python -m ppbridge.sampleapp --port 8000``."""
    parser = argparse.ArgumentParser(description="ppbridge sample intranet service")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    args = parser.parse_args(argv)

    from twisted.internet import endpoints, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site, _ = make_site(cast(IReactorTime, reactor))
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")

    def failed(failure: Failure) -> None:
        log.failure("cannot listen on port {port}", failure, port=args.port)
        reactor.stop()

    endpoint.listen(site).addErrback(failed)
    reactor.run()


if __name__ == "__main__":
    main()
