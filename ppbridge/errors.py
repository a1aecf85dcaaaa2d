"""Every error ppbridge raises, in one small hierarchy.

Request errors carry the HTTP status and the short cause that the forwarder puts in the
``X-PPBridge-Error`` header; the mapping from error to HTTP lives here and nowhere else.
"""

from __future__ import annotations


class PPBridgeError(Exception):
    """Base of all ppbridge errors."""


class ConfigError(PPBridgeError):
    """A configuration problem; the message names the file, the key and what is wrong."""


class KeyFileError(PPBridgeError):
    """A key file that is missing, unreadable, too open or not the right kind of key."""


class BusMessageError(PPBridgeError):
    """A bus message that was dropped: malformed, forged, replayed or not for us.

    ``reason`` is a short, fixed label used in logs and as a metrics label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RequestError(PPBridgeError):
    """A client request that ppbridge answers itself, with ``status`` and a named ``cause``;
    ``headers`` are added to that answer (a challenge, a Retry-After); ``body``, when set,
    is the answer's body in place of ``detail`` (an auth service's page, see AuthAnswer)."""

    status = 500
    cause = "internal-error"
    message = "ppbridge: internal error"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.message)
        self.detail = detail or self.message


class BadRequest(RequestError):
    status, cause, message = 400, "bad-request", "ppbridge: the request target is not a path or an http(s) URL"


class BadTarget(RequestError):
    status, cause = 400, "bad-target"
    message = "ppbridge: the request path leaves the service's base path (dot-segments or empty segments)"


class NoRoute(RequestError):
    status, cause, message = 404, "no-route", "ppbridge: no proxy is configured for this host and path"


class ProxyUnavailable(RequestError):
    status, cause, message = 503, "proxy-unavailable", "ppbridge: the proxy is not connected or has no key yet"


class KeyExpired(ProxyUnavailable):
    status, cause, message = 503, "key-expired", "ppbridge: the proxy's session key expired before it was rotated"


class BusUnavailable(RequestError):
    status, cause, message = 503, "redis-unavailable", "ppbridge: the forwarder is not connected to Redis"


class RedisPermission(BusUnavailable):
    """Redis refused a command for want of a permission (NOPERM, NOAUTH, WRONGPASS): an ACL
    or password problem only an operator can fix (see :mod:`ppbridge.redisperm`)."""

    status, cause, message = 503, "redis-permission", "ppbridge: Redis refused a command (an ACL permission is missing)"


class BusLost(RequestError):
    status, cause, message = 502, "redis-connection-lost", "ppbridge: the Redis connection was lost mid-request"


class UpstreamUnreachable(RequestError):
    status, cause, message = 502, "upstream-unreachable", "ppbridge: the proxy could not reach its upstream service"


class UpstreamTimeout(RequestError):
    status, cause, message = 504, "upstream-timeout", "ppbridge: the upstream service did not answer in time"


class GatewayTimeout(RequestError):
    status, cause, message = 504, "timeout", "ppbridge: no answer from the proxy within request_timeout"


class BodyTooLarge(RequestError):
    status, cause, message = 413, "body-too-large", "ppbridge: request body over max_body_size"


class HeaderTooLarge(RequestError):
    status, cause = 431, "header-too-large"  # RFC 6585 §5
    message = "ppbridge: a request header line, or the request head, is over the forwarder's limit"


class TooManyHeaders(RequestError):
    status, cause = 431, "too-many-headers"  # RFC 6585 §5: the fields, collectively, are too large
    message = "ppbridge: more request header lines than max_headers"


class HeaderTimeout(RequestError):
    status, cause, message = 408, "header-timeout", "ppbridge: the request head was not complete within header_timeout"


class UpgradeLimit(RequestError):
    status, cause, message = 503, "upgrade-limit", "ppbridge: the proxy has max_upgraded upgraded connections open"


class AccessRefused(RequestError):
    """A client a route's access policy refuses (:mod:`ppbridge.access`). The answer says no
    more than its status; ``reason`` (a short fixed label: the metric's and the log's) and
    ``note`` (for the log only: never a credential) say why."""

    reason = "refused"
    client = ""  # the address the policy judged (ppbridge.access sets it), for the log

    def __init__(self, reason: str, note: str = "", headers: tuple[tuple[bytes, bytes], ...] = (),
                 detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.note = note
        self.headers = headers


class Unauthorized(AccessRefused):
    status, cause, message = 401, "unauthorized", "ppbridge: this service needs you to log in"


class Forbidden(AccessRefused):
    status, cause, message = 403, "forbidden", "ppbridge: this service may not be reached from here"


class TooManyAttempts(AccessRefused):
    status, cause = 429, "too-many-attempts"  # RFC 6585 §4
    message = "ppbridge: too many failed log-in attempts from this address; try again later"


class AuthAnswer(AccessRefused):
    """A route's forward_auth service said no (401, 403) or "log in first" (3xx): its answer
    goes to the client as it is (:mod:`ppbridge.forwardauth`): its ``status``, the ``headers``
    it passes back (Location, WWW-Authenticate, Set-Cookie...) and its ``body``."""

    status, cause, message = 401, "unauthorized", "ppbridge: the authentication service refused the request"

    def __init__(self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> None:
        super().__init__(reason, headers=headers)
        self.status = status
        self.cause = "forbidden" if status == 403 else "unauthorized"
        self.body = body


class AuthUnavailable(RequestError):
    status, cause = 503, "auth-unavailable"
    message = "ppbridge: the authentication service of this route did not answer usably"


class ProtocolFailure(RequestError):
    status, cause, message = 502, "protocol-error", "ppbridge: the proxy's answer failed integrity checks"


# Causes a proxy reports in a RESET frame, by wire code. Code 0 is reserved for "no error".
RESET_CODES: dict[int, type[RequestError]] = {
    1: UpstreamUnreachable,
    2: UpstreamTimeout,
    3: ProtocolFailure,
    4: BodyTooLarge,
    5: RequestError,
    7: BadTarget,  # the proxy refused a target outside its base path (see ppbridge.targets)
    8: GatewayTimeout,  # the proxy refused a request head past its deadline, or gave up at it
    9: BusLost,  # the proxy lost its Redis link with the request in flight (sent once it is back)
}
CANCEL_CODE = 6  # the sender gave up on the stream (client left, forwarder stopped waiting)


def reset_code(error: type[RequestError]) -> int:
    """Wire code of a request error class (5, internal error, for anything unlisted)."""
    for code, cls in RESET_CODES.items():
        if cls is error:
            return code
    return 5
