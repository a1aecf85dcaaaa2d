"""``client_ca_file`` / ``client_names``: a route only for clients with a TLS certificate from a CA.

Two halves, as nginx's ``ssl_verify_client optional`` does it:

* **The TLS layer asks, and accepts whatever comes.** Twisted's ``ssl:`` endpoint string has no
  option to request client certificates (Twisted 26.10's ``_parseSSL`` takes ``privateKey``,
  ``certKey``, ``sslmethod``, ``interface``, ``backlog``, ``extraCertChain``, ``dhParameters``;
  ``caCertsDir`` exists only for client endpoints). The forwarder therefore wraps each ``ssl:``
  endpoint's TLS options in a :class:`CertificateRequest` (through :func:`requesting_reactor`)
  so that, while some route has a ``client_ca_file``, each handshake requests a certificate
  (naming those CAs' subjects as acceptable) and completes with or without one. The handshake
  is never refused: one listener serves routes with and without this check, the route is not
  known until the request arrives, and a refusal at the request is counted, logged and
  answered with a reason.
* **The route decides, per request** (:class:`ClientCertCheck`): the peer's certificate (and
  the intermediates it sent) must verify, at the forwarder's clock, against that route's
  ``client_ca_file`` with the ``cryptography`` X.509 client verifier (RFC 5280 path building;
  the leaf's extended key usage, if any, must allow clientAuth; a CA's key usage, if any, must
  allow certificate signing; subjectAltName and authorityKeyIdentifier may be absent, as they
  are in many private CAs' client certificates); with ``client_names``, its subject CN or one
  of its subjectAltName DNS names must be listed. No certificate, a certificate from another
  CA (or expired, or not for client use), or a name not listed: 403 ``forbidden``.

Plain ``tcp:`` listeners carry no certificate, so a route with ``client_ca_file`` answers
403 to every request that comes through one.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator, IReactorTime
from zope.interface import implementer

from ppbridge.accesscheck import ALLOW, Context, Facts, Verdict
from ppbridge.configfields import MISSING, Key, Reader, describe, has_bad_chars
from ppbridge.errors import Forbidden
from ppbridge.logsafe import escape

if TYPE_CHECKING:
    from ppbridge.config import ForwarderSettings

MAX_INTERMEDIATES = 8  # certificates a client's chain may hold besides its own
CLIENT_CERT_KEYS = ("client_ca_file", "client_names")
REFUSED = "ppbridge: this service does not accept that TLS client certificate"


@dataclass(frozen=True)
class ClientCertSettings:
    """One access table's client-certificate rule: the CA file, its certificates, the names
    allowed (casefolded; empty: any certificate from those CAs)."""

    ca_file: Path
    authorities: tuple[x509.Certificate, ...] = field(repr=False)
    names: frozenset[str] = frozenset()


def read_client_cert(r: Reader, key: Key) -> ClientCertSettings | None:
    """The client_ca_file and client_names of the access table at ``key``; None without
    ``client_ca_file``."""
    path = r.optional_path(key + ("client_ca_file",))
    if path is None:
        if r.get(key + ("client_names",)) is not MISSING:
            r.fail(key + ("client_names",), "only goes with client_ca_file")
        return None
    raw, _mode = r.read_file(key + ("client_ca_file",), path)
    try:
        authorities = tuple(x509.load_pem_x509_certificates(raw))
    except ValueError:
        r.fail(key + ("client_ca_file",), f"{path}: not a PEM bundle of CA certificates (none in it, or one "
               "that does not parse)")
    return ClientCertSettings(path, authorities, _names(r, key + ("client_names",)))


def _names(r: Reader, key: Key) -> frozenset[str]:
    value = r.get(key)
    if value is MISSING:
        return frozenset()
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty array of names (subject CN or DNS name), got {describe(value)}")
    for i, item in enumerate(value, 1):
        if not isinstance(item, str) or not 1 <= len(item) <= 255 or has_bad_chars(item):
            r.fail(key, f"item {i}: expected a name of 1 to 255 printable characters, got {describe(item)}")
    return frozenset(item.casefold() for item in value)


def configured_authorities(settings: ForwarderSettings) -> tuple[x509.Certificate, ...]:
    """Every CA certificate some access table of ``settings`` takes client certificates from."""
    found: list[x509.Certificate] = []
    for table in (settings.access, *(route.access for route in settings.proxies)):
        rule = table.client_cert if table is not None else None
        for ca in rule.authorities if rule is not None else ():
            if ca not in found:
                found.append(ca)
    return tuple(found)


def _key_cert_sign(policy: Any, cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("a CA whose key usage does not allow certificate signing")


_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.KeyUsage, verification.Criticality.AGNOSTIC, _key_cert_sign)
_EE_POLICY = (verification.ExtensionPolicy.webpki_defaults_ee()
              .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
              .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC, None))


def names_of(cert: x509.Certificate) -> list[str]:
    """The subject CNs, then the subjectAltName DNS names, of ``cert``, casefolded."""
    found = [str(a.value).casefold() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return found
    return found + [name.casefold() for name in san.get_values_for_type(x509.DNSName)]


class ClientCertCheck:
    """One route's client-certificate check: owns the route's trust store and allowed names."""

    name = "client_ca_file"
    strips: frozenset[bytes] = frozenset()

    def __init__(self, settings: ClientCertSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.store = verification.Store(list(settings.authorities))

    @classmethod
    def build(cls, settings: ClientCertSettings, route: str, context: Context) -> ClientCertCheck:
        return cls(settings, context.clock)

    def check(self, facts: Facts) -> Verdict:
        """ALLOW, or 403 ``forbidden`` with reason ``no-client-certificate``,
        ``bad-client-certificate`` or ``client-name-not-allowed``."""
        leaf = facts.certificate
        if leaf is None:
            return Forbidden("no-client-certificate", note="no TLS client certificate",
                             detail="ppbridge: this service needs a TLS client certificate")
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        verifier = (verification.PolicyBuilder().store(self.store).time(now)
                    .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY).build_client_verifier())
        names = names_of(leaf)
        shown = escape(names[0] if names else "(no name)", 100)
        try:
            verifier.verify(leaf, list(facts.intermediates[:MAX_INTERMEDIATES]))
        except verification.VerificationError as e:
            return Forbidden("bad-client-certificate", note=f"certificate {shown}: {escape(str(e), 200)}",
                             detail=REFUSED)
        if self.settings.names and not self.settings.names.intersection(names):
            return Forbidden("client-name-not-allowed", note=f"certificate {shown} is not in client_names",
                             detail=REFUSED)
        return ALLOW


@implementer(IOpenSSLServerConnectionCreator)
class CertificateRequest:
    """TLS options of a listener that request a client certificate while ``authorities()``
    names some CA, and accept the handshake whatever the client sends (routes decide)."""

    def __init__(self, inner: Any, authorities: Callable[[], Sequence[x509.Certificate]]) -> None:
        self.inner = inner
        self.authorities = authorities
        self._listed: tuple[x509.Certificate, ...] = ()

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        cas = tuple(self.authorities())
        self._list(cas)
        connection: SSL.Connection = self.inner.serverConnectionForTLS(protocol)
        if cas:
            connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _accept)
        return connection

    def _list(self, cas: tuple[x509.Certificate, ...]) -> None:
        """Name ``cas`` as acceptable issuers in the CertificateRequest (a hint browsers use to
        offer the right certificate). OpenSSL copies the list from the context into each new
        connection, so it goes on the shared context before the connection is made. Names are
        only added (pyOpenSSL's way to replace the list is deprecated): a CA a reload removed
        stays named, which changes nothing but the hint."""
        new = [ca for ca in cas if ca not in self._listed]
        context = getattr(self.inner, "getContext", lambda: None)() if new else None
        if isinstance(context, SSL.Context):
            for ca in new:
                context.add_client_ca(ca)
            self._listed += tuple(new)


def _accept(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    return True  # verified per route, by ClientCertCheck


class CertificateRequestingReactor:
    """Stands in for the reactor while Twisted's endpoints listen: ``listenSSL`` is the real
    reactor's, with the endpoint's TLS options wrapped in a :class:`CertificateRequest`; every
    other attribute is the real reactor's (``listenTCP`` for ``tcp:`` endpoints, among them)."""

    def __init__(self, reactor: Any, authorities: Callable[[], Sequence[x509.Certificate]]) -> None:
        self._reactor = reactor
        self._authorities = authorities

    def listenSSL(self, port: Any, factory: Any, contextFactory: Any, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        wrapped = CertificateRequest(contextFactory, self._authorities)
        listening: IListeningPort = self._reactor.listenSSL(port, factory, wrapped, backlog, interface)
        return listening

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def requesting_reactor(reactor: Any, authorities: Callable[[], Sequence[x509.Certificate]]) -> Any:
    """What to give Twisted's endpoint parser (``serverFromString``, ``strports.service``, the
    tap's ``Listener``) as the reactor so that its ``ssl:`` endpoints request client
    certificates while ``authorities()`` names some CA.

    Twisted's ``ssl:`` endpoint string cannot ask for client certificates, and its endpoint
    keeps the TLS options it parsed in a private attribute; but ``SSL4ServerEndpoint.listen``
    hands them to ``reactor.listenSSL(port, factory, contextFactory=..., ...)`` (Twisted 26.10),
    so this stand-in (the way :mod:`ppbridge.reuseport` sets SO_REUSEPORT) changes no Twisted
    class and reads no private attribute. tests/test_access_auth.py fails if Twisted stops
    passing them so: its mutual-TLS tests listen through this stand-in."""
    return CertificateRequestingReactor(reactor, authorities)
