"""TLS to Redis: the client options a :class:`RedisSettings` asks for, and an endpoint that hands
the Redis protocol a connection only once the server has accepted this client.

* Trust: every certificate of ``ca_file`` (a PEM bundle: old and new CA during a rotation),
  else the platform's store. The server name is always checked (DNS name or IP address).
* Mutual TLS: ``cert_file`` (the client certificate, optionally followed by its intermediate
  CAs) and ``key_file``. The files are read again for every connection attempt, so a renewed
  certificate is used from the next reconnection on, without a restart.
* A failed TLS setup is a failed connection attempt (:class:`RedisTLSEndpoint`), never a
  connection the Redis protocol sees: txredisapi 1.6.0 would otherwise send AUTH/SELECT over
  it, report "could not set dbid" when the link drops and stop reconnecting for good. Instead
  one line names the cause (``on_failure``) and the reconnecting service retries with its
  backoff. With TLS 1.3 a server that refuses the client certificate says so only after the
  client's handshake has finished, so the endpoint also waits for the answer to one PING
  (any reply line, ``-NOAUTH`` included) before the connection counts as made.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (IDelayedCall, IHandshakeListener, IOpenSSLClientConnectionCreator,
                                         IProtocol, IProtocolFactory, IReactorTime, IStreamClientEndpoint)
from twisted.internet.ssl import (Certificate, KeyPair, PrivateCertificate, optionsForClientTLS, platformTrust,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ppbridge.logsafe import escape
from ppbridge.redisconfig import RedisSettings

if TYPE_CHECKING:  # the interface is public in Twisted's documentation, its module is not
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger()

TLS_TIMEOUT = 10.0  # seconds for the TLS handshake and the PING answer together
PING = b"*1\r\n$4\r\nPING\r\n"
MAX_PING_REPLY = 1024  # "+PONG" or an error line ("-NOAUTH ..."); nothing legitimate is longer
_NOT_TLS = ("wrong version number", "packet length too long", "record layer failure", "unknown protocol")
_CLIENT_CERT_ALERTS = ("alert certificate required", "alert handshake failure", "alert unknown ca",
                       "alert bad certificate", "alert certificate unknown", "alert certificate expired",
                       "alert certificate revoked", "alert unsupported certificate", "alert access denied")


class RedisTLSError(Exception):
    """TLS to Redis could not be set up; the message names the cause, for one log line."""


# --- options --------------------------------------------------------------------------------


def _pem_certificates(raw: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError:
        return []


def trust_root(settings: RedisSettings) -> IOpenSSLTrustRoot:
    """Every certificate of ``ca_file`` (not only the first), else the platform's trust store."""
    if settings.ca_file is None:
        return platformTrust()
    certificates = _pem_certificates(settings.ca_file.read_bytes())
    if not certificates:
        raise RedisTLSError(f"redis.ca_file {settings.ca_file}: no PEM certificate in it")
    return trustRootFromCertificates([Certificate(X509.from_cryptography(c)) for c in certificates])


def client_certificate(settings: RedisSettings) -> tuple[PrivateCertificate, list[X509]] | None:
    """The client certificate with its key, and the intermediate CAs that follow it in
    ``cert_file``; None without ``cert_file``."""
    if settings.cert_file is None or settings.key_file is None:
        return None
    chain = _pem_certificates(settings.cert_file.read_bytes())
    if not chain:
        raise RedisTLSError(f"redis.cert_file {settings.cert_file}: no PEM certificate in it")
    try:
        key = KeyPair.load(settings.key_file.read_bytes(), SSL.FILETYPE_PEM)
    except Exception as e:  # pyOpenSSL raises its own Error, or ValueError/TypeError
        raise RedisTLSError(f"redis.key_file {settings.key_file}: not an unencrypted PEM private key ({e})") from e
    leaf = PrivateCertificate.fromCertificateAndKeyPair(Certificate(X509.from_cryptography(chain[0])), key)
    return leaf, [X509.from_cryptography(c) for c in chain[1:]]


def client_tls_options(settings: RedisSettings, hostname: str | None = None) -> IOpenSSLClientConnectionCreator:
    """``optionsForClientTLS`` for ``settings``: its trust, its client certificate (if any),
    and the server name checked against ``hostname`` (default: the URL's host)."""
    mine = client_certificate(settings)
    extra: dict[str, Any] = {"extraCertChain": mine[1]} if mine and mine[1] else {}
    options: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        hostname or settings.host, trustRoot=trust_root(settings), clientCertificate=mine[0] if mine else None,
        extraCertificateOptions=extra)
    return options


# --- what went wrong --------------------------------------------------------------------------


def _openssl_reasons(failure: Failure) -> list[str]:
    """The reason strings of an OpenSSL error ("certificate verify failed", ...)."""
    value = failure.value
    if not isinstance(value, SSL.Error) or not value.args or not isinstance(value.args[0], list):
        return []
    return [str(item[2]) for item in value.args[0] if isinstance(item, tuple) and len(item) == 3]


def _names(certificate: x509.Certificate) -> str:
    """The DNS names and IP addresses a certificate is valid for (server-chosen text: escaped)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no DNS name or IP address"
    names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return escape(", ".join(names[:8]), 200) or "no DNS name or IP address"


def _unverified(settings: RedisSettings, chain: list[x509.Certificate], now: datetime) -> str:
    """Why the server's chain did not verify, as far as the chain tells."""
    trusted = f"redis.ca_file {settings.ca_file}" if settings.ca_file else "the system's CA store"
    for certificate in chain:
        subject = escape(certificate.subject.rfc4514_string(), 120)
        if now > certificate.not_valid_after_utc:
            return f"certificate verify failed: {subject!r} in the server's chain expired on " \
                   f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if now < certificate.not_valid_before_utc:
            return f"certificate verify failed: {subject!r} in the server's chain is not valid before " \
                   f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if not chain:
        return f"certificate verify failed: the server's certificate is not signed by a CA in {trusted}"
    issuer = escape(chain[0].issuer.rfc4514_string(), 120)
    return f"certificate verify failed: the server's certificate (issued by {issuer!r}) is not signed by a CA " \
           f"in {trusted}"


def describe_failure(failure: Failure, settings: RedisSettings, chain: list[x509.Certificate], now: datetime,
                     hostname: str | None = None, handshake_done: bool = False) -> str:
    """One phrase for a TLS setup that failed with ``failure``; ``chain`` is what the server
    presented (empty if nothing), ``handshake_done`` whether the client's handshake had finished."""
    host = hostname or settings.host
    if failure.check(VerificationError):
        names = _names(chain[0]) if chain else "no certificate"
        return f"certificate verify failed: the server's certificate is not valid for {host!r} (it names " \
               f"{names}); the server name is checked against the host in redis.url"
    reasons = _openssl_reasons(failure)
    text = ", ".join(reasons) or escape(failure.getErrorMessage(), 200)
    if "certificate verify failed" in reasons:
        return _unverified(settings, chain, now)
    if any(alert in text for alert in _CLIENT_CERT_ALERTS):
        if settings.cert_file is None:
            return f"handshake failure ({text}): the server requires a client certificate; set redis.cert_file " \
                   "and redis.key_file"
        return f"handshake failure ({text}): the server refused the client certificate in redis.cert_file " \
               f"{settings.cert_file}"
    if any(sign in text for sign in _NOT_TLS):
        return f"handshake failure ({text}): the server does not speak TLS on that port; is it Redis's tls-port?"
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        when = "right after" if handshake_done else "during"
        return f"handshake failure: the server closed the connection {when} the TLS handshake"
    return f"handshake failure: {text}"


# --- the endpoint -----------------------------------------------------------------------------


@implementer(IProtocol, IHandshakeListener)
class _Gate:
    """Sits between the TLS layer and the Redis protocol: connects the latter only once the
    handshake is done and the server has answered a PING; reports anything else to its attempt."""

    def __init__(self, inner: IProtocol, attempt: _Attempt) -> None:
        self.inner = inner
        self.attempt = attempt
        self.transport: Any = None
        self.handshake_done = False
        self.open = False  # the Redis protocol is connected; from now on this only forwards
        self._reply = b""

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        self.attempt.connected(self)

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:  # a failed check aborts from inside the handshake
            return
        self.handshake_done = True
        self.transport.write(PING)

    def dataReceived(self, data: bytes) -> None:
        if self.open:
            self.inner.dataReceived(data)
            return
        self._reply += data
        end = self._reply.find(b"\r\n")
        if end < 0:
            if len(self._reply) > MAX_PING_REPLY:
                self.attempt.abort(f"the server's answer to PING is not a Redis reply ({len(self._reply)} bytes"
                                   " without a line end)")
            return
        line, rest = self._reply[:end], self._reply[end + 2:]
        if line[:1] not in (b"+", b"-"):
            self.attempt.abort(f"the server's answer to PING is not a Redis reply ({escape(line, 40)!r})")
            return
        self.open, self._reply = True, b""
        self.inner.makeConnection(self.transport)
        self.attempt.succeeded(self.inner)
        if rest and self.transport.connected:
            self.inner.dataReceived(rest)

    def connectionLost(self, reason: Failure) -> None:
        if self.open:
            self.inner.connectionLost(reason)
            return
        self.attempt.lost(reason, self._peer_chain(), self.handshake_done)

    def _peer_chain(self) -> list[x509.Certificate]:
        """The certificates the server presented, for the diagnosis (the TLS layer keeps its
        connection until this protocol has been told of the loss)."""
        try:
            chain = self.transport.getHandle().get_peer_cert_chain(as_cryptography=True)
        except Exception:
            return []
        return list(chain or [])


@implementer(IProtocolFactory)
class _GateFactory:
    """Builds the caller's protocol and puts a :class:`_Gate` in front of it."""

    def __init__(self, wrapped: IProtocolFactory, attempt: _Attempt) -> None:
        self.wrapped = wrapped
        self.attempt = attempt

    def buildProtocol(self, addr: Any) -> _Gate | None:
        inner = self.wrapped.buildProtocol(addr)
        return None if inner is None else _Gate(inner, self.attempt)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()


class _Attempt:
    """One connection attempt: its result Deferred (fires with the caller's protocol, or fails
    with :class:`RedisTLSError`), the deadline of its TLS setup (TCP has the plain endpoint's
    own timeout), and cancellation."""

    def __init__(self, endpoint: RedisTLSEndpoint) -> None:
        self.endpoint = endpoint
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self.gate: _Gate | None = None
        self.cause: str | None = None  # set when we abort: the timeout, a reply that is not Redis's
        self.timer: IDelayedCall | None = None
        self.tcp: Deferred[Any] | None = None

    def start(self, options: IOpenSSLClientConnectionCreator, factory: IProtocolFactory) -> None:
        tls = wrapClientTLS(options, self.endpoint.plain)
        self.tcp = tls.connect(_GateFactory(factory, self))
        self.tcp.addErrback(self._not_connected)

    def connected(self, gate: _Gate) -> None:
        """TCP is up and the handshake starting: from now on the TLS deadline runs."""
        self.gate = gate
        self.timer = self.endpoint.clock.callLater(self.endpoint.timeout, self._timed_out)

    def _not_connected(self, failure: Failure) -> None:
        """TCP did not connect (refused, unreachable, timed out): not TLS's business to report."""
        self._stop_timer()
        if not self.result.called:
            self.result.errback(failure)

    def succeeded(self, protocol: IProtocol) -> None:
        self._stop_timer()
        if not self.result.called:
            self.result.callback(protocol)

    def abort(self, cause: str) -> None:
        self.cause = self.cause or cause
        if self.gate is not None and self.gate.transport is not None:
            self.gate.transport.abortConnection()

    def lost(self, reason: Failure, chain: list[x509.Certificate], handshake_done: bool) -> None:
        self._stop_timer()
        if self.result.called:
            return  # cancelled
        now = datetime.fromtimestamp(self.endpoint.clock.seconds(), timezone.utc)
        cause = self.cause or describe_failure(reason, self.endpoint.settings, chain, now, self.endpoint.hostname,
                                               handshake_done)
        self.endpoint.report(cause)
        if not self.result.called:  # the report's observers may have stopped the caller: cancelled
            self.result.errback(RedisTLSError(cause))

    def _timed_out(self) -> None:
        self.timer = None
        done = self.gate is not None and self.gate.handshake_done
        cause = (f"no answer to PING within {self.endpoint.timeout:g} s of the TLS handshake" if done
                 else f"handshake failure: no TLS handshake within {self.endpoint.timeout:g} s (is that port "
                      "Redis's tls-port?)")
        self.abort(cause)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        """The caller gave up (a reconnecting service being stopped): close without a report."""
        self._stop_timer()
        if self.gate is not None and self.gate.transport is not None:
            self.gate.transport.abortConnection()
        elif self.tcp is not None:
            self.tcp.cancel()


@implementer(IStreamClientEndpoint)
class RedisTLSEndpoint:
    """TLS over ``plain`` (a TCP endpoint to the server) with the options of ``settings``, built
    anew for each attempt. An attempt succeeds once the handshake is done and the server answered
    a PING; a TLS failure calls ``on_failure`` with one phrase naming the cause and fails the
    attempt with :class:`RedisTLSError`. ``hostname``: the name to check the server's certificate
    against, when not the URL's host (e.g. a master found through Sentinel); ``port``: the port
    ``plain`` connects to, when not the URL's (shown in ``repr``, which Twisted's retry lines use)."""

    def __init__(self, plain: IStreamClientEndpoint, settings: RedisSettings, clock: IReactorTime,
                 on_failure: Callable[[str], None] | None = None, hostname: str | None = None,
                 timeout: float = TLS_TIMEOUT, port: int | None = None) -> None:
        self.plain = plain
        self.settings = settings
        self.clock = clock
        self.on_failure = on_failure
        self.hostname = hostname
        self.timeout = timeout
        self.port = port or settings.port

    @property
    def where(self) -> str:
        """host:port this endpoint connects to."""
        return f"{self.hostname or self.settings.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<Redis TLS to {self.where}>"

    def report(self, cause: str) -> None:
        if self.on_failure is None:
            log.warn("Redis TLS to {where} failed: {cause}; retrying", where=self.where, cause=cause)
            return
        try:
            self.on_failure(cause)
        except Exception:
            log.failure("reporting a Redis TLS failure failed")

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = _Attempt(self)
        try:
            options = client_tls_options(self.settings, self.hostname)
        except (OSError, RedisTLSError) as e:
            cause = str(e) if isinstance(e, RedisTLSError) else f"cannot read a TLS file: {e}"
            self.report(cause)
            attempt.result.errback(RedisTLSError(cause))
            return attempt.result
        attempt.start(options, protocolFactory)
        return attempt.result
