"""Who may come in (issue 13): ``forward_auth`` and ``client_ca_file``/``client_names``.

Forward auth: a small real twisted.web service plays the authentication service (oauth2-proxy,
Authelia...): by path it answers 200 with ``X-Auth-User``, 401 with a challenge, 403, a 302 to a
login page unless the session cookie is right, 500, or never. The attackers are internet
clients that forge the identity header the service sets, or the X-Forwarded-* headers it reads.

Mutual TLS: the forwarder also listens on an ``ssl:`` endpoint (through
:func:`ppbridge.clientcert.requesting_reactor`, as ``twistd ppforwarder`` does), with
certificates made here (tests/test_redis_tls.py's CA, other CA, server, client and
intermediate-CA client; one more with a DNS name). Clients are Twisted Agents presenting a
certificate from the CA, none, one from another CA, one via an intermediate, one whose name
is not in ``client_names``.

Everything runs for real over loopback: Redis, forwarder, proxy, the sample upstream (whose
``/echo`` shows the request headers that reached it). "Reached no upstream" is the sample
app's hit count; "published nothing" is ``INFO commandstats`` of the test's Redis.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from ppbridge.accesscheck import ALLOW, Facts
from ppbridge.clientcert import ClientCertCheck, ClientCertSettings, configured_authorities, requesting_reactor
from ppbridge.config import load_forwarder_config
from ppbridge.errors import AuthAnswer, AuthUnavailable, ConfigError
from ppbridge.redis_server import free_port
from ppbridge.scaffold import write_forwarder_config
from ppbridge.webface import BridgeSite
from tests.support import Client, Stack, error_of, key_pair, listen, poll, temp_folder
from tests.test_access import QUIET, publishes, refused_count, settled_publishes
from tests.test_edge import echoed_headers
from tests.test_redis_tls import _certificate, write_certificates

WAIT = 15


# --- the authentication service ---------------------------------------------------------------


class AuthService(Resource):
    """What an oauth2-proxy or Authelia does, by path. Records every request it gets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []  # (method, path, headers)
        self.abandoned = 0  # requests whose caller went away before an answer

    def render(self, request: Any) -> Any:
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method, request.path, headers))
        cookie = b"".join(headers.get(b"cookie", []))
        if request.path == b"/ok":
            for name, value in ((b"X-Auth-User", b"alice"), (b"X-Auth-Email", b"alice@example.org"),
                                (b"X-Internal", b"no")):
                request.responseHeaders.addRawHeader(name, value)
            return b"ok"
        if request.path == b"/session":
            if cookie == b"session=good":
                request.responseHeaders.addRawHeader(b"X-Auth-User", b"bob")
                request.setResponseCode(202)  # oauth2-proxy's /oauth2/auth answers 202
                return b""
            back = b"%s://%s%s" % (headers[b"x-forwarded-proto"][0], headers[b"x-forwarded-host"][0],
                                   headers[b"x-forwarded-uri"][0])
            request.setResponseCode(302)
            request.responseHeaders.addRawHeader(b"Location", b"https://login.example/start?rd=" + back)
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"csrf=1; HttpOnly")
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"flow=2; HttpOnly")
            request.responseHeaders.addRawHeader(b"X-Internal", b"no")
            request.responseHeaders.addRawHeader(b"Content-Type", b"text/html")
            return b"<a href='https://login.example/start'>log in</a>"
        if request.path == b"/deny":
            request.setResponseCode(401)
            request.responseHeaders.addRawHeader(b"WWW-Authenticate", b'Bearer realm="test"')
            request.responseHeaders.addRawHeader(b"Content-Type", b"text/plain")
            return b"who are you?"
        if request.path == b"/forbid":
            request.setResponseCode(403)
            return b"not you"
        if request.path == b"/broken":
            request.setResponseCode(500)
            return b"oops"
        if request.path == b"/huge":
            request.setResponseCode(401)
            return b"x" * 100_000
        if request.path == b"/hang":
            request.notifyFinish().addErrback(lambda _: setattr(self, "abandoned", self.abandoned + 1))
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"?"

    def asked(self, path: bytes) -> int:
        return sum(1 for _, p, _ in self.seen if p == path)


@defer.inlineCallbacks
def auth_stack(case: TestCase, path: str, **access: Any):  # type: ignore[no-untyped-def]
    """(stack, auth service, its base URL): one route ``alpha`` whose access table is
    ``forward_auth = <service><path>`` plus ``access`` (keys without the ``access.`` prefix)."""
    service = AuthService()
    base = yield listen(case, Site(service))
    table = {"access.forward_auth": base + path, **{f"access.{k}": v for k, v in access.items()}}
    stack = yield Stack(case).start(routes={"alpha": {"path_prefix": "/", **table}}, forwarder=QUIET)
    return stack, service, base


def logged(case: TestCase) -> list[str]:
    """Every log event from now to the end of the test, formatted."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) + repr(event.get("log_failure", "")))

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class ForwardAuth(TestCase):
    """forward_auth: what the service is told, what each of its answers does to the client."""

    @defer.inlineCallbacks
    def test_2xx_passes_and_sets_the_user_header_upstream(self):  # type: ignore[no-untyped-def]
        """A POST through a route whose service answers 200: the body reaches the upstream whole;
        the upstream sees ``X-Auth-User: alice`` from the service and not the ``mallory`` the
        client forged, and not the service's other headers (only X-Auth-User by default); the
        client's Cookie and Authorization reach it too. The service got one GET without a body,
        with the client's Cookie and Authorization, its own Host, and X-Forwarded-Method POST,
        -Uri (target as sent, query included), -Host, -Proto http and -For 127.0.0.1 in place
        of the client's forged X-Forwarded-For and X-Forwarded-Uri; not the client's
        Accept-Encoding or If-None-Match (an encoded or 304 answer could not be passed back)."""
        stack, service, base = yield auth_stack(self, "/ok")
        headers = {b"host": [b"app.example"], b"cookie": [b"session=s3cret"], b"authorization": [b"Bearer tok"],
                   b"x-auth-user": [b"mallory"], b"x-forwarded-for": [b"6.6.6.6"], b"x-forwarded-uri": [b"/evil"],
                   b"accept-encoding": [b"gzip"], b"if-none-match": [b'"v1"']}
        response, body = yield Client(self).fetch(b"POST", stack.url + "/echo/x?q=1", headers, b"hello")
        self.assertEqual(response.code, 200, body)
        echoed = echoed_headers(body)
        self.assertEqual(echoed["x-auth-user"], ["alice"])
        self.assertNotIn("x-auth-email", echoed)
        self.assertNotIn("x-internal", echoed)
        self.assertEqual(echoed["cookie"], ["session=s3cret"])
        self.assertEqual(echoed["authorization"], ["Bearer tok"])
        self.assertEqual(json.loads(body)["body_length"], 5)
        [(method, path, seen)] = service.seen
        self.assertEqual((method, path), (b"GET", b"/ok"))
        self.assertEqual(seen[b"x-forwarded-method"], [b"POST"])
        self.assertEqual(seen[b"x-forwarded-uri"], [b"/echo/x?q=1"])
        self.assertEqual(seen[b"x-forwarded-host"], [b"app.example"])
        self.assertEqual(seen[b"x-forwarded-proto"], [b"http"])
        self.assertEqual(seen[b"x-forwarded-for"], [b"127.0.0.1"])
        self.assertEqual(seen[b"cookie"], [b"session=s3cret"])
        self.assertEqual(seen[b"authorization"], [b"Bearer tok"])
        self.assertEqual(seen[b"host"], [base.removeprefix("http://").encode()])
        for name in (b"content-length", b"accept-encoding", b"if-none-match"):
            self.assertNotIn(name, seen)

    @defer.inlineCallbacks
    def test_a_trusted_proxys_forwarded_headers_are_kept(self):  # type: ignore[no-untyped-def]
        """With ``trusted_proxies = ["127.0.0.1/32"]`` (a TLS terminator in front), the service
        sees the client address that proxy names, followed by the proxy's, and the proto and
        host it says (https, wiki.example), as the upstream does."""
        service = AuthService()
        base = yield listen(self, Site(service))
        stack = yield Stack(self).start(routes={"alpha": {"path_prefix": "/", "access.forward_auth": base + "/ok"}},
                                        forwarder={**QUIET, "trusted_proxies": ["127.0.0.1/32"]})
        headers = {b"x-forwarded-for": [b"203.0.113.7"], b"x-forwarded-proto": [b"https"],
                   b"x-forwarded-host": [b"wiki.example"]}
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo", headers)
        self.assertEqual(response.code, 200, body)
        [(_, _, seen)] = service.seen
        self.assertEqual(seen[b"x-forwarded-for"], [b"203.0.113.7, 127.0.0.1"])
        self.assertEqual((seen[b"x-forwarded-proto"], seen[b"x-forwarded-host"]), ([b"https"], [b"wiki.example"]))
        self.assertEqual(echoed_headers(body)["x-forwarded-proto"], ["https"])

    @defer.inlineCallbacks
    def test_configured_headers_are_the_ones_copied(self):  # type: ignore[no-untyped-def]
        """With ``forward_auth_headers = ["X-Auth-Email"]`` the upstream gets the service's
        X-Auth-Email, and X-Auth-User no more (neither the service's nor the client's)."""
        stack, _, _ = yield auth_stack(self, "/ok", forward_auth_headers=["X-Auth-Email"])
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo", {b"x-auth-email": [b"evil@x"]})
        self.assertEqual(response.code, 200, body)
        echoed = echoed_headers(body)
        self.assertEqual(echoed["x-auth-email"], ["alice@example.org"])
        self.assertNotIn("x-auth-user", echoed)

    @defer.inlineCallbacks
    def test_401_goes_back_as_it_is_and_publishes_nothing(self):  # type: ignore[no-untyped-def]
        """The service's 401 reaches the client with its WWW-Authenticate, Content-Type and
        body, plus ``X-PPBridge-Error: unauthorized``; no PUBLISH was made, the upstream was
        not reached, and the refusal is counted with reason ``auth-service-401``."""
        stack, _, _ = yield auth_stack(self, "/deny")
        before = yield settled_publishes(stack)
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 401)
        self.assertEqual(body, b"who are you?")
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="test"'])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(error_of(response), b"unauthorized")
        self.assertEqual(publishes(stack), before)
        self.assertEqual(stack.app.hits["/echo"], 0)
        self.assertEqual(refused_count(stack, "auth-service-401"), 1)

    @defer.inlineCallbacks
    def test_403_goes_back_as_it_is(self):  # type: ignore[no-untyped-def]
        """The service's 403 reaches the client with its body and ``X-PPBridge-Error:
        forbidden``; the upstream was not reached."""
        stack, _, _ = yield auth_stack(self, "/forbid")
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, body, error_of(response)), (403, b"not you", b"forbidden"))
        self.assertEqual(stack.app.hits["/echo"], 0)

    @defer.inlineCallbacks
    def test_login_redirect_then_session_passes(self):  # type: ignore[no-untyped-def]
        """Without the session cookie the client gets the service's 302: its Location (built
        from X-Forwarded-Proto/-Host/-Uri, so it leads back to the URL asked for), both its
        Set-Cookie headers, its Content-Type and body, but not its other headers. With the
        cookie the request passes (the service's 202) and the upstream sees ``X-Auth-User: bob``."""
        stack, _, _ = yield auth_stack(self, "/session")
        client = Client(self)
        response, body = yield client.fetch(b"GET", stack.url + "/echo?page=2", {b"host": [b"wiki.example"]})
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"https://login.example/start?rd=http://wiki.example/echo?page=2"])
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"csrf=1; HttpOnly", b"flow=2; HttpOnly"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html"])
        self.assertIsNone(response.headers.getRawHeaders(b"x-internal"))
        self.assertIn(b"log in", body)
        self.assertEqual(error_of(response), b"unauthorized")
        response, body = yield client.fetch(b"GET", stack.url + "/echo", {b"cookie": [b"session=good"]})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(echoed_headers(body)["x-auth-user"], ["bob"])

    @defer.inlineCallbacks
    def test_hanging_service_is_503_after_the_timeout(self):  # type: ignore[no-untyped-def]
        """A service that never answers: after ``forward_auth_timeout`` (0.5 s) the client gets
        503 ``auth-unavailable`` (well before request_timeout), the call to the service is
        abandoned (its connection closed), and the upstream was not reached."""
        stack, service, _ = yield auth_stack(self, "/hang", forward_auth_timeout=0.5)
        started = reactor.seconds()
        response, body = yield Client(self).fetch(b"GET", stack.url + "/echo").addTimeout(WAIT, reactor)
        self.assertEqual((response.code, error_of(response)), (503, b"auth-unavailable"), body)
        self.assertTrue(0.4 < reactor.seconds() - started < 5, reactor.seconds() - started)
        yield poll(lambda: service.abandoned == 1, 5, "the call to the auth service abandoned")
        self.assertEqual(stack.app.hits["/echo"], 0)

    @defer.inlineCallbacks
    def test_unreachable_broken_or_oversized_service_is_503(self):  # type: ignore[no-untyped-def]
        """503 ``auth-unavailable`` when the service answers 500, when its 401's body is over
        64 KiB, and when nothing listens at its address; the upstream is never reached."""
        stack, service, base = yield auth_stack(self, "/broken")
        client = Client(self)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, error_of(response)), (503, b"auth-unavailable"))
        for url in (base + "/huge", f"http://127.0.0.1:{free_port()}/auth"):
            config = stack.forwarder_config({"alpha": {"path_prefix": "/", "access.forward_auth": url}}, QUIET)
            stack.forwarder.reload(load_forwarder_config(config))
            response, _ = yield client.fetch(b"GET", stack.url + "/echo")
            self.assertEqual((response.code, error_of(response)), (503, b"auth-unavailable"), url)
        self.assertEqual(service.asked(b"/huge"), 1)
        self.assertEqual(stack.app.hits["/echo"], 0)

    @defer.inlineCallbacks
    def test_cache_per_credential(self):  # type: ignore[no-untyped-def]
        """With ``forward_auth_cache = 60``: a second request with the same Cookie is not asked
        about again (and still carries X-Auth-User), another Cookie is, and requests without
        Cookie or Authorization are asked about every time."""
        stack, service, _ = yield auth_stack(self, "/ok", forward_auth_cache=60)
        client = Client(self)
        for cookie in (b"a=1", b"a=1", b"a=2"):
            response, body = yield client.fetch(b"GET", stack.url + "/echo", {b"cookie": [cookie]})
            self.assertEqual(echoed_headers(body)["x-auth-user"], ["alice"])
        self.assertEqual(service.asked(b"/ok"), 2)
        for _ in range(2):
            yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual(service.asked(b"/ok"), 4)

    @defer.inlineCallbacks
    def test_without_cache_every_request_is_asked_about(self):  # type: ignore[no-untyped-def]
        """By default (no cache) two requests with the same Cookie are both asked about."""
        stack, service, _ = yield auth_stack(self, "/ok")
        for _ in range(2):
            yield Client(self).fetch(b"GET", stack.url + "/echo", {b"cookie": [b"a=1"]})
        self.assertEqual(service.asked(b"/ok"), 2)

    @defer.inlineCallbacks
    def test_credentials_never_logged(self):  # type: ignore[no-untyped-def]
        """Across a 401, a login redirect and a 503 (service down), no log line holds the
        Cookie or Authorization value the client sent."""
        lines = logged(self)
        stack, _, base = yield auth_stack(self, "/deny")
        secret = {b"cookie": [b"session=TOPSECRETCOOKIE"], b"authorization": [b"Bearer TOPSECRETTOKEN"]}
        client = Client(self)
        yield client.fetch(b"GET", stack.url + "/echo", secret)
        for url in (base + "/session", f"http://127.0.0.1:{free_port()}/auth"):
            config = stack.forwarder_config({"alpha": {"path_prefix": "/", "access.forward_auth": url}}, QUIET)
            stack.forwarder.reload(load_forwarder_config(config))
            response, _ = yield client.fetch(b"GET", stack.url + "/echo", secret)
            self.assertIn(response.code, (302, 503))
        self.assertTrue(any("unavailable" in line for line in lines))
        self.assertFalse([line for line in lines if "TOPSECRET" in line])

    def test_answers_and_timeout_by_status(self) -> None:
        """Unit: 204 is an Allow with the configured headers; 401, 403, 301, 307 are
        AuthAnswers keeping their status; 404, 500 and 101 are AuthUnavailable (503)."""
        from twisted.web.http_headers import Headers

        from ppbridge.accesscheck import Allow
        from ppbridge.forwardauth import ForwardAuthCheck, ForwardAuthSettings

        check = ForwardAuthCheck(ForwardAuthSettings("http://auth.example/"), None, Clock())  # type: ignore[arg-type]

        class Answer:
            def __init__(self, code: int) -> None:
                self.code = code
                self.headers = Headers({b"X-Auth-User": [b"u"], b"Location": [b"/login"]})

        verdict = check.verdict(Answer(204), b"")  # type: ignore[arg-type]
        self.assertEqual(verdict, Allow(((b"X-Auth-User", b"u"),)))
        for code in (401, 403, 301, 307):
            answer = check.verdict(Answer(code), b"body")  # type: ignore[arg-type]
            self.assertIsInstance(answer, AuthAnswer)
            self.assertEqual((answer.status, answer.body), (code, b"body"))
        for code in (404, 500, 101):
            self.assertIsInstance(check.verdict(Answer(code), b""), AuthUnavailable)  # type: ignore[arg-type]


# --- certificates and a TLS listener ----------------------------------------------------------


def issue(tls: Path, stem: str, names: tuple[str, ...]) -> None:
    """``tls/STEM.pem`` and ``.key``: a client certificate from ``ca`` with subject CN ``stem``
    and ``names`` as subjectAltName DNS names."""
    ca_cert = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(stem, key, (ca_cert, ca_key), names=names, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    (tls / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tls / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))


@implementer(IPolicyForHTTPS)
class _Options:
    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


def tls_client(case: TestCase, tls: Path, stem: str | None, chain: str | None = None) -> Client:
    """A client trusting ``ca.pem`` for the server, presenting certificate ``stem`` (none if
    None), followed by the CA certificate ``chain`` if given."""
    certificate = None
    if stem is not None:
        certificate = PrivateCertificate.loadPEM((tls / f"{stem}.pem").read_bytes() + (tls / f"{stem}.key").read_bytes())
    extra = {"extraCertChain": [Certificate.loadPEM((tls / f"{chain}.pem").read_bytes()).original]} if chain else {}
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM((tls / "ca.pem").read_bytes()),
                                  clientCertificate=certificate, extraCertificateOptions=extra)
    client = Client(case)
    client.agent = Agent(reactor, contextFactory=_Options(options), pool=client.pool)
    return client


@defer.inlineCallbacks
def mtls_stack(case: TestCase, **access: Any):  # type: ignore[no-untyped-def]
    """(stack, its https:// URL, certificate folder): routes ``alpha`` (prefix /) with
    ``client_ca_file = ca.pem`` plus ``access``, and ``open`` (prefix /open) with no policy; the
    forwarder listens on plain HTTP as usual and on ``ssl:`` with the server certificate."""
    tls = write_certificates(temp_folder(case))
    issue(tls, "svc", ("svc.example",))
    table = {"access.client_ca_file": str(tls / "ca.pem"), **{f"access.{k}": v for k, v in access.items()}}
    stack = yield Stack(case).start(routes={"alpha": {"path_prefix": "/", **table}, "open": {"path_prefix": "/open"}},
                                    forwarder=QUIET)
    listening = requesting_reactor(reactor, lambda: configured_authorities(stack.forwarder.settings))
    endpoint = serverFromString(listening, f"ssl:0:interface=127.0.0.1:privateKey={tls / 'server.key'}"
                                           f":certKey={tls / 'server.pem'}")
    url = yield listen(case, BridgeSite(stack.forwarder), endpoint)
    return stack, url, tls


class MutualTLS(TestCase):
    """client_ca_file and client_names on an ``ssl:`` listener, with real TLS handshakes."""

    @defer.inlineCallbacks
    def test_certificate_from_the_ca_passes(self):  # type: ignore[no-untyped-def]
        """A client with a certificate from ca.pem gets 200 from the upstream (which sees
        X-Forwarded-Proto https); so does one whose certificate comes from an intermediate CA
        it sends along (chain verified to ca.pem)."""
        stack, url, tls = yield mtls_stack(self)
        response, body = yield tls_client(self, tls, "client").fetch(b"GET", url + "/echo")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(echoed_headers(body)["x-forwarded-proto"], ["https"])
        response, body = yield tls_client(self, tls, "sub-client", chain="sub-ca").fetch(b"GET", url + "/echo")
        self.assertEqual(response.code, 200, body)

    @defer.inlineCallbacks
    def test_no_certificate_is_refused_403(self):  # type: ignore[no-untyped-def]
        """A client with no certificate completes the handshake but gets 403 ``forbidden``
        (reason ``no-client-certificate``), publishing nothing and reaching no upstream; the
        same client reaches the route without a policy (/open) on the same listener: the TLS
        handshake is never what refuses."""
        stack, url, tls = yield mtls_stack(self)
        before = yield settled_publishes(stack)
        client = tls_client(self, tls, None)
        response, _ = yield client.fetch(b"GET", url + "/echo")
        self.assertEqual((response.code, error_of(response)), (403, b"forbidden"))
        self.assertEqual(publishes(stack), before)
        self.assertEqual(stack.app.hits["/echo"], 0)
        self.assertEqual(refused_count(stack, "no-client-certificate"), 1)
        response, body = yield client.fetch(b"GET", url + "/open/echo")
        self.assertEqual(response.code, 200, body)

    @defer.inlineCallbacks
    def test_certificate_from_another_ca_is_refused_403(self):  # type: ignore[no-untyped-def]
        """A certificate from other-ca.pem, and one from the intermediate CA sent without that
        CA, get 403 ``forbidden`` (reason ``bad-client-certificate``); no upstream reached."""
        stack, url, tls = yield mtls_stack(self)
        for stem in ("foreign-client", "sub-client"):
            response, _ = yield tls_client(self, tls, stem).fetch(b"GET", url + "/echo")
            self.assertEqual((response.code, error_of(response)), (403, b"forbidden"), stem)
        self.assertEqual(refused_count(stack, "bad-client-certificate"), 2)
        self.assertEqual(stack.app.hits["/echo"], 0)

    @defer.inlineCallbacks
    def test_client_names(self):  # type: ignore[no-untyped-def]
        """With ``client_names = ["SVC.example"]``: the certificate whose subjectAltName DNS
        name is svc.example passes (names compare without case); the one with CN "client" and
        no such name gets 403 ``forbidden``, reason ``client-name-not-allowed``."""
        stack, url, tls = yield mtls_stack(self, client_names=["SVC.example"])
        response, body = yield tls_client(self, tls, "svc").fetch(b"GET", url + "/echo")
        self.assertEqual(response.code, 200, body)
        response, _ = yield tls_client(self, tls, "client").fetch(b"GET", url + "/echo")
        self.assertEqual((response.code, error_of(response)), (403, b"forbidden"))
        self.assertEqual(refused_count(stack, "client-name-not-allowed"), 1)

    @defer.inlineCallbacks
    def test_plain_http_listener_is_refused(self):  # type: ignore[no-untyped-def]
        """The same route through the forwarder's plain-HTTP listener: 403 (no certificate
        can come that way)."""
        stack, _, _ = yield mtls_stack(self)
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, error_of(response)), (403, b"forbidden"))

    def test_verification_time_is_the_forwarders_clock(self) -> None:
        """Unit: the client certificate (valid for a day from an hour ago) passes at the
        clock's now and is refused (bad-client-certificate) two days later."""
        tls = write_certificates(temp_folder(self))
        ca = tuple(x509.load_pem_x509_certificates((tls / "ca.pem").read_bytes()))
        leaf = x509.load_pem_x509_certificate((tls / "client.pem").read_bytes())
        clock = Clock()
        clock.advance(datetime.datetime.now(datetime.timezone.utc).timestamp())
        check = ClientCertCheck(ClientCertSettings(tls / "ca.pem", ca), clock)

        class Presented(Facts):
            certificate = leaf  # type: ignore[assignment]
            intermediates: list[x509.Certificate] = []  # type: ignore[assignment]

        facts = Presented("alpha", "127.0.0.1", "127.0.0.1", b"GET", b"/", None, [], True)
        self.assertIs(check.check(facts), ALLOW)
        clock.advance(2 * 86400)
        refusal = check.check(facts)
        self.assertEqual(getattr(refusal, "reason", None), "bad-client-certificate")


# --- configuration ----------------------------------------------------------------------------


class Config(TestCase):
    """The keys' errors name the file, the key and the problem."""

    def load(self, **access: Any) -> Any:
        folder = temp_folder(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        route = {"path_prefix": "/", **{f"access.{k}": v for k, v in access.items()}}
        return load_forwarder_config(write_forwarder_config(folder, "redis://127.0.0.1:6379/0", "tcp:0",
                                                           {"alpha": route}))

    def assertConfigError(self, fragment: str, **access: Any) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load(**access)
        self.assertIn(fragment, str(caught.exception))

    def test_defaults_and_values(self) -> None:
        """forward_auth alone gets the defaults (X-Auth-User, 5 s, no cache); set keys are kept."""
        route = self.load(forward_auth="https://auth.example/oauth2/auth").proxies[0]
        fa = route.access.forward_auth
        self.assertEqual((fa.headers, fa.timeout, fa.cache), (("X-Auth-User",), 5.0, 0.0))
        route = self.load(forward_auth="http://127.0.0.1:4180/", forward_auth_headers=["X-Auth-Request-User"],
                          forward_auth_timeout=2, forward_auth_cache=30).proxies[0]
        fa = route.access.forward_auth
        self.assertEqual((fa.headers, fa.timeout, fa.cache), (("X-Auth-Request-User",), 2.0, 30.0))

    def test_errors(self) -> None:
        """Refused: a forward_auth_* key without forward_auth, a URL with a password or of
        another scheme, a header name that is not a token or is Cookie, a timeout of 0;
        client_names without client_ca_file, a CA file that is missing or holds no
        certificate, an empty client_names."""
        self.assertConfigError("access.forward_auth_timeout: only goes with forward_auth", forward_auth_timeout=1)
        self.assertConfigError("must not contain a user name", forward_auth="https://u:p@auth.example/")
        self.assertConfigError("must be an http:// or https:// URL", forward_auth="ftp://auth.example/")
        self.assertConfigError("item 1: expected a header name", forward_auth="http://a.example/",
                               forward_auth_headers=["X Auth"])
        self.assertConfigError("item 1: Cookie cannot be copied", forward_auth="http://a.example/",
                               forward_auth_headers=["Cookie"])
        self.assertConfigError("forward_auth_timeout: must be greater than 0", forward_auth="http://a.example/",
                               forward_auth_timeout=0)
        self.assertConfigError("access.client_names: only goes with client_ca_file", client_names=["x"])
        folder = temp_folder(self)
        self.assertConfigError("no such file", client_ca_file=str(folder / "none.pem"))
        (folder / "empty.pem").write_text("nothing here\n")
        self.assertConfigError("not a PEM bundle", client_ca_file=str(folder / "empty.pem"))
        tls = write_certificates(folder)
        self.assertConfigError("client_names: expected a non-empty array", client_ca_file=str(tls / "ca.pem"),
                               client_names=[])

    def test_configured_authorities(self) -> None:
        """The CAs an ssl: listener names to clients: those of every access table, once each."""
        tls = write_certificates(temp_folder(self))
        settings = self.load(client_ca_file=str(tls / "bundle.pem"))
        self.assertEqual(len(configured_authorities(settings)), 2)
        self.assertEqual(configured_authorities(self.load()), ())
