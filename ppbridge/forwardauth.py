"""``forward_auth``: ask an external authentication service whether a request may pass.

The convention of nginx ``auth_request``, Traefik ForwardAuth, oauth2-proxy and Authelia. The
request sent follows Traefik's ForwardAuth: a ``GET`` to the configured URL, without a body,
carrying the client's end-to-end request headers (Cookie and Authorization among them; Host
is the auth service's own; those about the body or a conditional or partial fetch left out:
see :data:`NOT_SENT`) and, describing the client's request,

* ``X-Forwarded-Method``: its method;
* ``X-Forwarded-Proto``: ``https`` or ``http``, as the forwarder received it;
* ``X-Forwarded-Host``: its Host (or absolute-form authority);
* ``X-Forwarded-Uri``: its request target as sent (path and query, route prefix included);
* ``X-Forwarded-For``: the client's address.

The client's own X-Forwarded-*, Forwarded and X-Forwarded-Method/-Uri headers are dropped and
replaced, unless it is one of ``trusted_proxies``: then its X-Forwarded-For is extended and its
X-Forwarded-Host/-Proto are kept, exactly as for the upstream request
(:func:`ppbridge.httpheaders.forwarded_request_headers`).

The answer decides (:meth:`ForwardAuthCheck.verdict`):

* 2xx: the request passes. The answer's ``forward_auth_headers`` (default ``X-Auth-User``)
  are set on the upstream request; the client's own headers of those names never pass,
  whatever the verdict (a client cannot claim a user the service did not name).
* 401, 403 and 3xx: the answer goes back to the client as it is (:class:`~ppbridge.errors.
  AuthAnswer`): its status, ``Location``, ``WWW-Authenticate``, ``Set-Cookie``,
  ``Content-Type`` and ``Cache-Control`` and its body (at most :data:`MAX_BODY` bytes), so
  login redirects and session cookies work; ``X-PPBridge-Error`` is ``unauthorized`` (401,
  3xx) or ``forbidden`` (403). Refusal reasons: ``auth-service-401``, ``-403``, ``-redirect``.
* any other status, a refused connection, a body over :data:`MAX_BODY`, or no whole answer
  within ``forward_auth_timeout`` seconds: 503 ``auth-unavailable`` (a warning at most every
  :data:`LOG_EVERY` seconds per route).

With ``forward_auth_cache`` > 0, a 2xx verdict is remembered that many seconds per credential
and host: the SHA-256 of the request's Host, Cookie and Authorization values (never the
values). Requests with neither header are never cached, nor are refusals (a login redirect
names the URL asked for). Turn it on only when the service decides by who asks, not by what
is asked (oauth2-proxy does; Authelia with per-path rules does not).

All routes share one :class:`AuthClient` (an Agent on a persistent connection pool, closed
when the forwarder stops). Cookie and Authorization values are never logged, nor is any part
of the URL but its scheme, host and port.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ppbridge.accesscheck import Allow, Context, Facts, Verdict
from ppbridge.configfields import MISSING, Bound, Key, Reader, describe, split_url
from ppbridge.errors import AuthAnswer, AuthUnavailable, RequestError
from ppbridge.httpheaders import HOP_BY_HOP, forwarded_request_headers
from ppbridge.logsafe import escape

log = Logger()

MAX_BODY = 65536  # bytes of an auth answer's body read (a login page or a short error)
MAX_CACHED = 10000  # verdicts the cache of one route holds at most; the oldest go first
MAX_POOLED = 32  # idle connections kept open to one auth service
PASSED_BACK = (b"location", b"www-authenticate", b"set-cookie", b"content-type", b"cache-control")
# Not sent to the service: what describes the body or the resource, not the client (an
# encoded or partial or "not modified" answer could not be passed back as it is), and the
# X-Forwarded-* headers ppbridge sets itself.
NOT_SENT = frozenset((b"host", b"content-length", b"transfer-encoding", b"expect", b"accept-encoding", b"range",
                      b"if-range", b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since",
                      b"x-forwarded-method", b"x-forwarded-uri"))
EVERYWHERE = (ip_network("0.0.0.0/0"), ip_network("::/0"))  # "the peer is trusted", already decided
LOG_EVERY = 10.0  # seconds between two "auth service unavailable" warnings of one route
FORWARD_AUTH_KEYS = ("forward_auth", "forward_auth_headers", "forward_auth_timeout", "forward_auth_cache")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # an HTTP field name (RFC 9110 §5.1)
_NOT_COPIED = HOP_BY_HOP | {b"host", b"content-length", b"cookie", b"set-cookie"}


@dataclass(frozen=True)
class ForwardAuthSettings:
    """One access table's forward_auth: the service's URL, the answer headers set upstream,
    the seconds it has to answer, and the seconds a 2xx verdict is cached (0: no cache)."""

    url: str
    headers: tuple[str, ...] = ("X-Auth-User",)
    timeout: float = 5.0
    cache: float = 0.0


def read_forward_auth(r: Reader, key: Key) -> ForwardAuthSettings | None:
    """The forward_auth keys of the access table at ``key``; None without ``forward_auth``."""
    if r.get(key + ("forward_auth",)) is MISSING:
        for name in FORWARD_AUTH_KEYS[1:]:
            if r.get(key + (name,)) is not MISSING:
                r.fail(key + (name,), "only goes with forward_auth")
        return None
    url = r.string(key + ("forward_auth",))
    parts, _ = split_url(r, key + ("forward_auth",), url, ("http", "https"), 80)
    if "@" in parts.netloc:
        r.fail(key + ("forward_auth",), "must not contain a user name or password")
    defaults = ForwardAuthSettings(url)
    return ForwardAuthSettings(
        url=url,
        headers=_header_names(r, key + ("forward_auth_headers",), defaults.headers),
        timeout=r.number(key + ("forward_auth_timeout",), defaults.timeout, Bound(0, 300, above=True)),
        cache=r.number(key + ("forward_auth_cache",), defaults.cache, Bound(0, 86400)),
    )


def _header_names(r: Reader, key: Key, default: tuple[str, ...]) -> tuple[str, ...]:
    """An array of at most 32 header names, none hop-by-hop or otherwise not copyable."""
    value = r.get(key)
    if value is MISSING:
        return default
    if not isinstance(value, list) or len(value) > 32:
        r.fail(key, f"expected an array of at most 32 header names, got {describe(value)}")
    for i, item in enumerate(value, 1):
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            r.fail(key, f"item {i}: expected a header name like \"X-Auth-User\", got {describe(item)}")
        if item.lower().encode("ascii") in _NOT_COPIED:
            r.fail(key, f"item {i}: {item} cannot be copied onto the upstream request")
    return tuple(value)


class AuthClient:
    """The HTTP client every forward_auth check asks through: an Agent on a persistent pool
    (no redirects followed, no cookie jar, no content decoding)."""

    def __init__(self, reactor: Any) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_POOLED
        self.agent = Agent(reactor, pool=self.pool)

    def close(self) -> Deferred[Any]:
        """Close the idle connections (at the forwarder's stop)."""
        closing: Deferred[Any] = self.pool.closeCachedConnections()
        return closing


def auth_request_headers(facts: Facts) -> Headers:
    """The headers of the GET sent to the auth service (Traefik's ForwardAuth convention)."""
    peer = facts.peer.encode("ascii", "replace")
    forwarded = forwarded_request_headers(facts.headers, peer, facts.host, b"https" if facts.secure else b"http",
                                          EVERYWHERE if facts.trusted else ())
    headers = Headers()
    for name, value in forwarded:
        if name.lower() not in NOT_SENT:
            headers.addRawHeader(name, value)
    headers.setRawHeaders(b"X-Forwarded-Method", [facts.method])
    headers.setRawHeaders(b"X-Forwarded-Uri", [facts.target])
    return headers


def credential_key(facts: Facts) -> bytes | None:
    """The cache key of a request's credential (a digest, never the values); None without one."""
    wanted = sorted((n.lower(), v) for n, v in facts.headers if n.lower() in (b"cookie", b"authorization"))
    if not wanted:
        return None
    digest = hashlib.sha256(facts.host or b"")
    for name, value in wanted:
        digest.update(b"\0" + name + b"\0" + value)
    return digest.digest()


class _CappedBody(Protocol):
    """Collects a response body of at most MAX_BODY bytes into ``done``; more fails it."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_BODY:
            self.parts.append(data)
            return
        self.parts = []
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()  # the response body's transport aborts
        if not self.done.called:
            self.done.errback(AuthUnavailable(f"ppbridge: the authentication service's answer is over {MAX_BODY} bytes"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_capped(response: IResponse) -> Deferred[tuple[IResponse, bytes]]:
    """(response, body) once the body is in; cancelling aborts the connection."""
    protocol: _CappedBody

    def cancel(_: Deferred[bytes]) -> None:
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    protocol = _CappedBody(done)
    response.deliverBody(protocol)
    return done.addCallback(lambda body: (response, body))


class ForwardAuthCheck:
    """One route's forward-auth check: owns its settings and its cache of 2xx verdicts."""

    name = "forward_auth"

    def __init__(self, settings: ForwardAuthSettings, client: AuthClient, clock: IReactorTime) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.url = settings.url.encode("ascii")
        self.strips = frozenset(name.lower().encode("ascii") for name in settings.headers)
        self.service = _shown(settings.url)
        self._cache: OrderedDict[bytes, tuple[float, Allow]] = OrderedDict()
        self._last_warning: float | None = None

    @classmethod
    def build(cls, settings: ForwardAuthSettings, route: str, context: Context) -> ForwardAuthCheck:
        """The check for ``route``, keeping its cache across a reload that leaves its settings
        as they were; the AuthClient is shared by all routes."""
        client = context.keep(("forward_auth client",), lambda: AuthClient(context.reactor))
        return context.keep(("forward_auth", route, settings), lambda: cls(settings, client, context.clock))

    def check(self, facts: Facts) -> Verdict:
        """A cached Allow at once; else a Deferred of the verdict, which fails only when
        cancelled (the client left, or the policy's own deadline)."""
        key = credential_key(facts) if self.settings.cache > 0 else None
        cached = self._cached(key)
        if cached is not None:
            return cached
        asked: Deferred[Any] = self.client.agent.request(b"GET", self.url, auth_request_headers(facts), None)
        asked.addCallback(read_capped)
        asked.addTimeout(self.settings.timeout, self.clock)
        d: Deferred[Allow | RequestError] = asked.addCallbacks(lambda answer: self.verdict(*answer), self._failed)
        if key is not None:
            d.addCallback(self._remember, key)
        return d

    def verdict(self, response: IResponse, body: bytes) -> Allow | RequestError:
        """What the auth service's answer means."""
        code = response.code
        if 200 <= code < 300:
            copied = tuple((name, value) for name, values in response.headers.getAllRawHeaders()
                           if name.lower() in self.strips for value in values)
            return Allow(copied)
        if code in (401, 403) or 300 <= code < 400:
            passed = tuple((name, value) for name, values in response.headers.getAllRawHeaders()
                           if name.lower() in PASSED_BACK for value in values)
            reason = "auth-service-redirect" if code not in (401, 403) else f"auth-service-{code}"
            return AuthAnswer(code, reason, passed, body)
        return self._unavailable(f"it answered {code}")

    def _failed(self, failure: Failure) -> RequestError | Failure:
        if failure.check(CancelledError):
            return failure  # not ours to answer: the client left, or the policy's deadline passed
        err = failure.value
        if isinstance(err, RequestError):
            return self._unavailable(err.detail)
        return self._unavailable(failure.getErrorMessage() or repr(failure.value))

    def _unavailable(self, why: str) -> AuthUnavailable:
        now = self.clock.seconds()
        if self._last_warning is None or now - self._last_warning >= LOG_EVERY:
            self._last_warning = now
            log.warn("authentication service {service} unavailable: {why}", service=escape(self.service),
                     why=escape(why, 200))
        return AuthUnavailable()

    def _cached(self, key: bytes | None) -> Allow | None:
        found = self._cache.get(key) if key is not None else None
        if found is None:
            return None
        if found[0] <= self.clock.seconds():
            del self._cache[key]  # type: ignore[arg-type]
            return None
        return found[1]

    def _remember(self, verdict: Allow | RequestError, key: bytes) -> Allow | RequestError:
        if isinstance(verdict, Allow):
            self._cache[key] = (self.clock.seconds() + self.settings.cache, verdict)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return verdict


def _shown(url: str) -> str:
    """scheme://host[:port] of ``url``: all that logs may say of it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
