"""One request at the forwarder's HTTP face: what it is routed by, and the error answer it gets.

Shared by :mod:`ppbridge.webface` (the request class, resource and site) and
:mod:`ppbridge.clientstream` (the request's stream through the bridge), and importing neither
at run time: the bridge and the client connection behind a request, the proxy route its target
picks, and its error answers, rendered from the :class:`~ppbridge.errors.RequestError` that
names them, once the body is read (:func:`render_error`) or early, while the client is still
sending it (:func:`refuse_early`, with a lingering close).
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any, cast

from twisted.logger import Logger
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.server import Request

from ppbridge.errors import BadRequest, RequestError
from ppbridge.httpheaders import HOP_BY_HOP, hop_names
from ppbridge.routing import request_target
from ppbridge.wire import HeaderList, is_origin_form

if TYPE_CHECKING:
    from ppbridge.config import Route
    from ppbridge.forwarder import ForwarderService
    from ppbridge.webface import BridgeRequest

log = Logger()
LINGER = 5.0  # seconds a refused upload may go on being sent (and dropped) before we close


def connection(request: Request) -> Any:
    """The client's TCP (or TLS) transport: it can pause, resume and abort."""
    return request.channel.transport


def bridge_of(request: Request) -> ForwarderService:
    """The ForwarderService behind the site that made ``request`` (see BridgeSite)."""
    bridge: ForwarderService = cast(Any, request.channel).site.bridge
    return bridge


def error_response(err: RequestError) -> tuple[int, HeaderList, bytes]:
    """Status, headers and body of the answer ppbridge gives for ``err``: ``detail`` as
    plain text, or ``err.body`` as it is (with the Content-Type ``err.headers`` give, if any)."""
    body = (err.detail + "\n").encode("utf-8") if err.body is None else err.body
    headers = [(b"X-PPBridge-Error", err.cause.encode("ascii"))]
    if err.body is None:
        headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
    headers += [(b"Content-Length", str(len(body)).encode("ascii")), *err.headers]
    return err.status, headers, body


def response_headers(headers: HeaderList) -> Headers:
    """The end-to-end ``headers`` of an upstream response as twisted.web's Headers, filed as
    ``addRawHeader`` files them: names canonicalised, values in order. ``addRawHeader`` would
    also replace CR and LF in values, which :mod:`ppbridge.wire` refused already. Fills the
    private ``_rawHeaders`` with the private ``_nameEncoder`` (checked against Twisted 26.10.0;
    tests/test_httpheaders.py compares the result with addRawHeader's).

    An upstream answers with the same names, in the same order, time after time: how a list of
    names is filed is worked out once (:func:`_filing`), and when each name is its own header
    and none is dropped, the values are filed under the remembered names in one step."""
    out = Headers()
    names = tuple(map(_first, headers))
    keys = _FILINGS.get(names)
    if keys is None:
        keys = _filing(names)
    if keys:
        out._rawHeaders = {key: [value] for key, (_, value) in zip(keys, headers)}
        return out
    raw = out._rawHeaders
    canonical = _nameEncoder.encode
    drop = hop_names(headers)
    for name, value in headers:
        if name.lower() in drop:
            continue
        key = canonical(name)
        values = raw.get(key)
        if values is None:
            raw[key] = [value]
        else:
            values.append(value)
    return out


_first = itemgetter(0)
FILINGS_KEPT = 256  # lists of response header names remembered (an upstream chooses them: bounded)
_FILINGS: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}


def _filing(names: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The canonical names ``names`` are filed under when each is its own header and none is
    hop-by-hop; ``()`` otherwise (a repeated name, or one dropped: filed header by header).
    Remembered, up to FILINGS_KEPT lists."""
    keys = tuple(_nameEncoder.encode(name) for name in names)
    if len(set(keys)) < len(keys) or any(name.lower() in HOP_BY_HOP for name in names):
        keys = ()
    if len(_FILINGS) < FILINGS_KEPT:
        _FILINGS[names] = keys
    return keys


def render_error(request: Request, err: RequestError) -> None:
    """Answer a request whose body has been read with ``err``."""
    status, headers, body = error_response(err)
    request.setResponseCode(status)
    for name, value in headers:
        request.responseHeaders.addRawHeader(name, value)  # Set-Cookie may come more than once
    request.write(body)
    request.finish()


def refuse_early(request: BridgeRequest, err: RequestError) -> None:
    """Answer ``err`` while the client is still sending its body, then close the connection.

    twisted.web cannot write a response before the body is complete, so this writes the few
    lines itself. Closing at once would make the kernel reset the connection (unread data
    is pending) and the client, still writing, would lose the answer; so the connection
    lingers, reading and dropping what comes, until the client closes or LINGER seconds
    pass (nginx's lingering close).
    """
    if request.refused:
        return
    request.refused = True
    log.info("answering {status} ({cause}) before the request body was read", status=err.status, cause=err.cause)
    status, headers, body = error_response(err)
    lines = [b"HTTP/1.1 %d %s" % (status, err.cause.encode("ascii"))]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Connection: close", b"", b""]
    transport = connection(request)
    transport.write(b"\r\n".join(lines) + body)
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is not None:
        half_close()  # the answer is complete: clients see EOF and close their side
    transport.resumeProducing()  # keep reading (and dropping) if an upload had paused it
    closer = bridge_of(request).clock.callLater(LINGER, transport.loseConnection)
    request.notifyFinish().addBoth(lambda _: closer.cancel() if closer.active() else None)


def routed(bridge: ForwarderService, request: Request, uri: bytes) -> tuple[bytes | None, Route, bytes]:
    """(host, route, target with the route's prefix stripped) of a request; BadRequest or
    NoRoute otherwise. An absolute-form target is routed by its authority, not by Host
    (RFC 9112 §3.2.2)."""
    parsed = request_target(uri)
    if parsed is None:
        raise BadRequest()
    authority, target = parsed
    host = authority or request.requestHeaders.getRawHeaders(b"host", [None])[0]
    if not is_origin_form(target):  # a DEL or another control byte: no proxy would take it
        raise BadRequest("ppbridge: the request target holds a control character")
    route, stripped = bridge.route(host, target)
    return host, route, stripped
