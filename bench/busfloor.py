"""The ``bus floor`` row: ppbridge's shape with none of its own work, to show what the shape
itself costs.

Two processes, as ppbridge runs: ``--role front`` is a twisted.web resource (behind a Site with
the forwarder's settings: bench/twfloor.py's :func:`floor_site`) that PUBLISHes each request
on a Redis channel and answers it when its reply comes back on another; ``--role back``
subscribes to the requests, fetches each from the upstream with the proxy's own client
(``ppbridge.upstreamclient.Upstream``: the Agent and pool the relay floor uses too) and PUBLISHes
the whole response. Both talk to Redis through ``ppbridge.bus.RedisBus``, ppbridge's own
connections (pipelined PUBLISH, the RESP guard, hiredis): the bus hop at the price ppbridge
pays for it.

What it leaves out is everything ppbridge adds to that shape: no sealing or opening (plain
bytes on Redis: never run this on a Redis anyone else can reach), no keys, no replay checks,
no streams or flow control (one message each way, so small requests only: the bench runs no
transfers through it), no timeouts, no header checks, no access log, no metrics. So the relay
floor (HTTP in plus HTTP out in one process) is what the HTTP work costs, and the bus floor
minus the relay floor is what splitting it across two processes with Redis between them
costs; ppbridge minus the bus floor is ppbridge's own work.

Messages: a request is an 8-byte id, then ``METHOD SP TARGET CRLF`` and the header lines
(``name: value CRLF`` each); a reply is the same id, then ``CODE CRLF``, the header lines, an
empty line and the body.
"""

from __future__ import annotations

import argparse
import itertools
import struct
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.protocol import Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ppbridge.bus import RedisBus
from ppbridge.httpheaders import end_to_end, upstream_request_headers
from ppbridge.redisconfig import RedisSettings
from ppbridge.upstreamclient import Upstream

from relayfloor import CONNECT_TIMEOUT
from twfloor import floor_site, listen

REQUESTS, REPLIES = b"busfloor:req", b"busfloor:rep"
ID = struct.Struct(">Q")


def settings(url: str) -> RedisSettings:
    """RedisSettings for a plain ``redis://host:port`` URL."""
    parts = urlsplit(url)
    return RedisSettings(url=url, host=parts.hostname or "127.0.0.1", port=parts.port or 6379, namespace="busfloor")


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % pair for pair in headers)


def parse_lines(block: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, _, v in (line.partition(b": ") for line in block.split(b"\r\n") if line)]


def start_bus(url: str, channel: bytes, handler: Any, reactor: Any) -> RedisBus:
    """ppbridge's RedisBus, started and subscribed to ``channel``, messages to ``handler``."""
    bus = RedisBus(settings(url), reactor)
    bus.on_message = handler
    bus.start()
    bus.subscribe(channel)
    return bus


class Front(Resource):
    """Every path, every method: published as one message, answered from the reply."""

    isLeaf = True

    def __init__(self, redis: str, reactor: Any) -> None:
        super().__init__()
        self.pending: dict[bytes, Any] = {}
        self.ids = itertools.count()
        self.bus = start_bus(redis, REPLIES, self.replied, reactor)

    def render(self, request: Any) -> Any:
        request.defaultContentType = None  # as the forwarder: no Content-Type the upstream did not send
        key = ID.pack(next(self.ids))
        raw = [(n, v) for n, values in request.requestHeaders.getAllRawHeaders() for v in values]
        self.pending[key] = request
        request.notifyFinish().addErrback(lambda _: self.pending.pop(key, None))
        d = self.bus.publish(REQUESTS, b"%s%s %s\r\n%s" % (key, request.method, request.uri, header_lines(raw)))
        d.addErrback(lambda _: self.replied(REPLIES, key + b"503\r\n\r\n"))
        return NOT_DONE_YET

    def replied(self, channel: bytes, message: bytes) -> None:
        request = self.pending.pop(message[:8], None)
        if request is None:
            return
        head, _, body = message[8:].partition(b"\r\n\r\n")
        code, _, lines = head.partition(b"\r\n")
        request.setResponseCode(int(code))
        request.responseHeaders = Headers()  # as the forwarder: the upstream's Server and Date
        for name, value in parse_lines(lines):
            request.responseHeaders.addRawHeader(name, value)
        if request.method != b"HEAD" and code not in (b"204", b"304"):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()


class _Collect(Protocol):
    """A small response body, whole, then published."""

    def __init__(self, back: Back, key: bytes, head: bytes) -> None:
        self.back, self.key, self.parts = back, key, [head]

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        whole = reason.check(ResponseDone, PotentialDataLoss)
        self.back.bus.publish(REPLIES, b"".join(self.parts) if whole else self.key + b"502\r\n\r\n")


class Back:
    """Requests from the bus, fetched from the upstream, answered on the bus."""

    def __init__(self, redis: str, upstream: Upstream, reactor: Any) -> None:
        self.upstream = upstream
        self.bus = start_bus(redis, REQUESTS, self.requested, reactor)

    def requested(self, channel: bytes, message: bytes) -> None:
        key = message[:8]
        line, _, lines = message[8:].partition(b"\r\n")
        method, _, target = line.partition(b" ")
        headers = Headers()
        for name, value in upstream_request_headers(parse_lines(lines), self.upstream.host):
            headers.addRawHeader(name, value)
        d = self.upstream.agent.request(method, self.upstream.url(target), headers, None)
        d.addCallback(self.got_response, key)
        d.addErrback(lambda f: self.bus.publish(REPLIES, key + b"502\r\n\r\n"))

    def got_response(self, response: Any, key: bytes) -> None:
        raw = [(n, v) for n, values in response.headers.getAllRawHeaders() for v in values]
        kept = [(n, v) for n, v in end_to_end(raw) if n.lower() != b"content-length"]
        head = b"%s%d\r\n%s\r\n" % (key, response.code, header_lines(kept))
        response.deliverBody(_Collect(self, key, head))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", required=True, choices=["front", "back"])
    parser.add_argument("--redis", required=True, help="redis://127.0.0.1:PORT")
    parser.add_argument("--listen", help="front: endpoint, e.g. tcp:8080:interface=127.0.0.1:backlog=1024")
    parser.add_argument("--upstream", help="back: base URL, e.g. http://127.0.0.1:8081")
    args = parser.parse_args()

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    if args.role == "front":
        if not args.listen:
            parser.error("--role front needs --listen")
        listen(reactor, args.listen, floor_site(Front(args.redis, reactor)), "bus floor front")
    else:
        if not args.upstream:
            parser.error("--role back needs --upstream")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])  # errors, as twistd -n shows them
        Back(args.redis, Upstream(args.upstream, reactor, CONNECT_TIMEOUT), reactor)
    reactor.run()


if __name__ == "__main__":
    main()
