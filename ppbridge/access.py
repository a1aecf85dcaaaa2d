"""Who may come in: a policy per route, decided at the forwarder before anything is published.

How a check plugs in
--------------------
1. **The check**: a small object in a module of its own (``cidrs.py`` and ``basicauth.py``
   are the models) with one method::

       def check(self, facts: Facts) -> Verdict
       # Verdict: Allow | RequestError | Deferred[Allow | RequestError]

   :class:`~ppbridge.accesscheck.Facts` holds what the forwarder knows of the request: route
   name, ``client`` address (believed per ``trusted_proxies``), TCP ``peer``, the TLS peer
   ``certificate`` (cryptography, or None; read lazily), ``method``, ``target``, ``host``,
   ``headers`` (``values(name)``), ``secure``. Return :data:`~ppbridge.accesscheck.ALLOW`,
   or an :class:`~ppbridge.accesscheck.Allow` with ``headers`` to set on the upstream request,
   or a refusal: :class:`~ppbridge.errors.Unauthorized` (401), ``Forbidden`` (403) or
   ``TooManyAttempts`` (429), built as ``Forbidden(reason, note=..., headers=...)``
   (``reason``: a short fixed label for the metric ``ppbridge_access_refused_total{proxy,
   reason}`` and the log; ``note``: for the log only, never a credential; ``headers``: added to
   the answer, e.g. ``WWW-Authenticate``), or any other ``RequestError`` (a new cause goes
   into errors.py; it is answered as it is, with ``headers`` if it sets them). Return, do not
   raise: an exception, or a Deferred that fails, is logged and answered 500.
   **Return a Deferred only when you must wait** (a network call): a route whose checks all
   answer at once takes no Deferred and no extra turn of the reactor. A Deferred may take its
   time: the request's body is held meanwhile (a large or chunked one is not read until the
   decision), the wait is bounded by ``request_timeout`` (then 504 ``timeout``), and it is
   cancelled if the client leaves.
2. **Two attributes**: ``name`` (for logs) and ``strips``, a frozenset of lowercased request
   header names never forwarded as the client sent them, whatever the verdict: the
   credential the check consumed (``authorization`` unless ``pass_authorization``), and
   every header its ``Allow`` may set (so a client cannot forge ``X-Auth-User``).
3. **Its keys**: add them to ``ACCESS_KEYS``, fields to ``AccessSettings`` and their reading
   (errors through ``r.fail``, naming file, key and problem) to ``read_access`` in
   :mod:`ppbridge.accessconfig`.
4. **Build it**: one line in :func:`build_checks` below, at its place in the order (cheap,
   synchronous checks first: the first refusal answers and later checks do not run). Build
   from :class:`~ppbridge.accesscheck.Context`: ``clock``, ``reactor`` (e.g. for an HTTP
   client), ``run_blocking`` (a function to the reactor's thread pool) and ``keep(key,
   make)`` for state that must outlive a SIGHUP reload (a watched file, failure counts).

The rest
--------
:class:`Policy` runs one route's checks in order, all must pass; the first refusal is the
answer. Its yes is a :class:`Grant`: the headers the checks strip from the client's request
and those they set, applied where the request head is built
(:meth:`ppbridge.clientstream.ClientStream.open`). :class:`AccessControl` holds the
forwarder's policies (a route's ``[proxies.NAME.access]`` table, else
``[forwarder.access]``; a table naming no mechanism is no policy) and is what
:class:`~ppbridge.webface.BridgeRequest` asks, once the request head is in and routed: a
route without a policy costs a dict lookup. Refusals never reach Redis; they are counted in
``ppbridge_requests_total`` with their cause and in ``ppbridge_access_refused_total{proxy,
reason}``, access-logged, and logged (throttled per route and reason, never a credential).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge.accessconfig import AccessSettings
from ppbridge.accesscheck import Allow, Check, Context, Facts, Runner
from ppbridge.basicauth import BasicCheck
from ppbridge.cidrs import AddressCheck
from ppbridge.clientcert import ClientCertCheck
from ppbridge.errors import AccessRefused, ConfigError, GatewayTimeout, RequestError
from ppbridge.forwardauth import ForwardAuthCheck
from ppbridge.httpheaders import believed_client, trusted_peer
from ppbridge.logsafe import Throttle, escape
from ppbridge.wire import HeaderList

if TYPE_CHECKING:
    from ppbridge.config import ForwarderSettings
    from ppbridge.metrics import Metrics

log = Logger()


def build_checks(settings: AccessSettings, route: str, context: Context) -> list[Check]:
    """The checks one access table asks for, in the order they run."""
    checks: list[Check] = []
    if settings.allow_cidrs or settings.deny_cidrs:
        checks.append(AddressCheck(settings.allow_cidrs, settings.deny_cidrs))
    if settings.client_cert is not None:  # synchronous, before any password is checked
        checks.append(ClientCertCheck.build(settings.client_cert, route, context))
    if settings.htpasswd_file is not None:
        checks.append(BasicCheck.build(settings, route, context))
    if settings.forward_auth is not None:  # last: it costs a round trip
        checks.append(ForwardAuthCheck.build(settings.forward_auth, route, context))
    return checks


def blocking_runner(reactor: Any) -> Runner[Any]:
    """Run blocking work on ``reactor``'s thread pool; at once (in a Deferred) when it has
    none (a test's Clock)."""
    if IReactorThreads.providedBy(reactor):
        return lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)
    return lambda work: defer.maybeDeferred(work)


@dataclass(frozen=True)
class Grant:
    """An allowed request's changes: ``strips`` removed from the client's headers, then
    ``headers`` added (their names removed first as well)."""

    strips: frozenset[bytes]
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def rewrite(self, headers: HeaderList) -> HeaderList:
        gone = self.strips | {name.lower() for name, _ in self.headers}
        return [(n, v) for n, v in headers if n.lower() not in gone] + list(self.headers)


class Policy:
    """One route's checks, run in order; all must pass."""

    def __init__(self, route: str, checks: Sequence[Check]) -> None:
        self.route = route
        self.checks = tuple(checks)
        self.strips = frozenset().union(*(check.strips for check in self.checks))
        self._plain = Grant(self.strips)

    def decide(self, facts: Facts) -> Grant | RequestError | Deferred[Grant | RequestError]:
        """The Grant, the first refusal, or a Deferred of either once a check must wait."""
        return self._run(facts, 0, ())

    def _run(self, facts: Facts, start: int, added: tuple[tuple[bytes, bytes], ...]
             ) -> Grant | RequestError | Deferred[Grant | RequestError]:
        for i in range(start, len(self.checks)):
            check = self.checks[i]
            try:
                verdict = check.check(facts)
            except Exception:
                log.failure("access check {check} of proxy {proxy} raised", check=check.name, proxy=self.route)
                return RequestError("ppbridge: an access check failed")
            if isinstance(verdict, Deferred):
                return verdict.addCallback(self._resume, facts, i + 1, added)
            if not isinstance(verdict, Allow):
                return verdict
            added += verdict.headers
        return Grant(self.strips, added) if added else self._plain

    def _resume(self, verdict: Allow | RequestError, facts: Facts, start: int,
                added: tuple[tuple[bytes, bytes], ...]) -> Any:
        if not isinstance(verdict, Allow):
            return verdict
        return self._run(facts, start, added + verdict.headers)


class AccessControl:
    """The forwarder's policies by route name, and the accounting of their refusals."""

    def __init__(self, settings: ForwarderSettings, reactor: Any, metrics: Metrics,
                 run_blocking: Runner[Any] | None = None) -> None:
        self.reactor = reactor
        self.metrics = metrics
        self.run_blocking = run_blocking or blocking_runner(reactor)
        self.policies: dict[str, Policy] = {}
        self.throttle = Throttle()
        self._kept: dict[Any, Any] = {}
        self.configure(settings)

    def configure(self, settings: ForwarderSettings) -> None:
        """Build the policies of ``settings`` (at start and on reload), all or nothing:
        ConfigError when a file they name no longer loads (the running ones then stay)."""
        context = Context(self.reactor, self.reactor, self.run_blocking, previous=self._kept)
        policies: dict[str, Policy] = {}
        for route in settings.proxies:
            table = route.access if route.access is not None else settings.access
            if table is None:
                continue
            try:
                checks = build_checks(table, route.name, context)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{settings.source}: access of proxies.{route.name}: {e}") from None
            if checks:
                policies[route.name] = Policy(route.name, checks)
        self.policies, self._kept = policies, context.kept
        self.timeout, self.trusted = settings.request_timeout, settings.trusted_proxies

    def stop(self) -> Deferred[Any]:
        """At the forwarder's stop: close what the checks keep open (the connection pool of
        forward_auth's AuthClient: whatever kept object has a ``close()``)."""
        closing = [defer.maybeDeferred(kept.close) for kept in self._kept.values()
                   if callable(getattr(kept, "close", None))]
        return defer.gatherResults(closing, consumeErrors=True)

    def decide(self, request: Any, route: str, host: bytes | None, method: bytes, target: bytes
               ) -> Grant | None | Deferred[Grant | RequestError]:
        """None when ``route`` has no policy; else its Grant, or a Deferred of the Grant or the
        refusal (bounded by ``request_timeout``; never failing). A refusal decided at once is
        raised."""
        policy = self.policies.get(route)
        if policy is None:
            return None
        facts = self.facts(request, route, host, method, target)
        verdict = policy.decide(facts)
        if isinstance(verdict, Deferred):
            d = verdict.addTimeout(self.timeout, self.reactor).addErrback(self._broken, route)
            return d.addCallback(_judged, facts)
        if isinstance(verdict, RequestError):
            raise _judged(verdict, facts)
        return verdict

    def facts(self, request: Any, route: str, host: bytes | None, method: bytes, target: bytes) -> Facts:
        """What the checks of ``route`` are given about ``request``."""
        headers = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
        peer = str(getattr(request.getClientAddress(), "host", ""))
        client = believed_client(peer.encode("ascii", "replace"), headers, self.trusted).decode("ascii", "replace")
        transport = request.channel.transport if request.channel is not None else None
        return Facts(route, client, peer, method, target, host, headers, request.isSecure(), transport,
                     trusted_peer(peer.encode("ascii", "replace"), self.trusted))

    def _broken(self, failure: Failure, route: str) -> RequestError:
        if failure.check(defer.TimeoutError):
            return GatewayTimeout("ppbridge: the access check did not decide within request_timeout")
        if not failure.check(defer.CancelledError):  # cancelled: the client left, nobody is answered
            log.failure("access check of proxy {proxy} failed", failure, proxy=route)
        return RequestError("ppbridge: an access check failed")

    def refused(self, proxy: str, err: AccessRefused, client: str, method: bytes, target: bytes) -> None:
        """Count a refusal and log it (the first few per route and reason in each period) with
        the address it judged (``client`` when the policy did not say)."""
        client = err.client or client
        self.metrics.access_refused.labels(proxy, err.reason).inc()
        logged, unlogged = self.throttle.allow(f"{proxy} {err.reason}", self.reactor.seconds())
        if logged:
            log.info("refused {method} {path} for proxy {proxy} from {client}: {status} {reason}{note} "
                     "({unlogged} such refusals unlogged in the last period)", method=escape(method),
                     path=escape(target.split(b"?", 1)[0]), proxy=proxy, client=escape(client), status=err.status,
                     reason=err.reason, note=f" ({err.note})" if err.note else "", unlogged=unlogged)


def _judged(verdict: Any, facts: Facts) -> Any:
    """``verdict``, a refusal marked with the client address it judged (for its log line)."""
    if isinstance(verdict, AccessRefused):
        verdict.client = facts.client
    return verdict


def on_decision(d: Deferred[Any], callback: Callable[[Any], None]) -> None:
    """Call ``callback`` with the decision, logging (never dropping) whatever it raises."""
    d.addCallback(callback).addErrback(lambda f: log.failure("acting on an access decision failed", f))
