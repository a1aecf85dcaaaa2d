"""The ``relay floor`` row: HTTP in plus HTTP out in ppbridge's stack, with no bus, no Redis,
no crypto, in one process: what the forwarder and the proxy together cannot go below.

``python bench/relayfloor.py --upstream URL --listen ENDPOINT`` runs a twisted.web resource
(behind a Site with the forwarder's settings: bench/twfloor.py's :func:`floor_site`) that
fetches every request from URL with the proxy's own client, ``ppbridge.upstreamclient.Upstream``
(a ``twisted.web.client.Agent`` on a persistent ``HTTPConnectionPool`` with the proxy's
``maxPersistentPerHost``, its quiet client factory, and its endpoint built once with 256 KiB
socket reads), and streams the response back as it comes: the upstream connection is the
response's producer, paused while the client's socket buffer is full, so memory stays flat.

Headers are handled as the proxy does, with ppbridge's own functions: the request's
end-to-end headers with the upstream's Host (``upstream_request_headers``), the response's
end-to-end headers (``end_to_end``) with Content-Length put back (the Agent moves it into
``response.length``). A client that leaves cancels the upstream call. The installed ppbridge
is imported, the same code the measured ``twistd ppproxy`` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ppbridge.config import ProxySettings
from ppbridge.httpheaders import end_to_end, upstream_request_headers
from ppbridge.upstreamclient import Upstream

from twfloor import floor_site, listen

log = Logger()
CONNECT_TIMEOUT = {f.name: f.default for f in dataclasses.fields(ProxySettings)}["upstream_connect_timeout"]


class _Relay(Protocol):
    """The upstream's response body, written to the client as it arrives."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def connectionMade(self) -> None:
        self.call.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.call.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.call.body_end(reason)


class Call:
    """One client request relayed to the upstream."""

    def __init__(self, upstream: Upstream, request: Any) -> None:
        self.request = request
        self.gone = False  # the client left (or the request was finished)
        self.body_transport: Any = None
        request.defaultContentType = None  # as the forwarder: no Content-Type the upstream did not send
        raw = [(n, v) for n, values in request.requestHeaders.getAllRawHeaders() for v in values]
        headers = Headers()
        for name, value in upstream_request_headers(raw, upstream.host):
            if name.lower() != b"content-length":  # the Agent sets it from the producer
                headers.addRawHeader(name, value)
        body = None
        if request.requestHeaders.hasHeader(b"content-length") or request.requestHeaders.hasHeader(
                b"transfer-encoding"):
            request.content.seek(0)
            body = FileBodyProducer(request.content)
        self.method = request.method
        self.d = upstream.agent.request(request.method, upstream.url(request.uri), headers, body)
        self.d.addCallbacks(self.got_response, self.failed)
        self.d.addErrback(lambda f: log.failure("relay floor: error relaying a request", f))
        request.notifyFinish().addErrback(self.client_left)

    def got_response(self, response: Any) -> None:
        if self.gone:
            response.deliverBody(Protocol())
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        raw = [(n, v) for n, values in response.headers.getAllRawHeaders() for v in values]
        request.responseHeaders = Headers()  # as the forwarder: the upstream's Server and Date, not twisted.web's
        for name, value in end_to_end(raw):
            request.responseHeaders.addRawHeader(name, value)
        length = response.length
        if length is not UNKNOWN_LENGTH and self.method != b"HEAD" and response.code not in (204, 304):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        response.deliverBody(_Relay(self))

    def failed(self, failure: Failure) -> None:
        if self.gone:
            return
        log.warn("relay floor: upstream call failed: {err}", err=failure.getErrorMessage())
        self.request.setResponseCode(502)
        self.request.setHeader(b"content-type", b"text/plain")
        self.request.write(b"relay floor: the upstream call failed\n")
        self.finish()

    def body_started(self, transport: Any) -> None:
        self.body_transport = transport
        if self.gone:
            transport.stopProducing()
        else:
            self.request.registerProducer(transport, True)

    def body_end(self, reason: Failure) -> None:
        if self.gone:
            return
        self.request.unregisterProducer()
        self.body_transport = None
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finish()
        else:  # the upstream dropped the response mid-body: the client must not take it as whole
            self.gone = True
            self.request.channel.transport.abortConnection()

    def finish(self) -> None:
        self.gone = True
        self.request.finish()

    def client_left(self, failure: Failure) -> None:
        if self.gone:
            return
        self.gone = True
        if self.body_transport is not None:
            self.body_transport.stopProducing()
        else:
            self.d.cancel()


class RelayResource(Resource):
    """Every path, every method: relayed to the upstream."""

    isLeaf = True

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.upstream = upstream

    def render(self, request: Any) -> Any:
        Call(self.upstream, request)
        return NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8081")
    parser.add_argument("--listen", required=True, help="endpoint, e.g. tcp:8080:interface=127.0.0.1:backlog=1024")
    args = parser.parse_args()

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    upstream = Upstream(args.upstream, reactor, CONNECT_TIMEOUT)
    listen(reactor, args.listen, floor_site(RelayResource(upstream)), "relay floor")
    reactor.run()


if __name__ == "__main__":
    main()
