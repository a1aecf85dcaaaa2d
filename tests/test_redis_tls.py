"""TLS between ppbridge and Redis (issue 11, item 2), against a real ``redis-server`` with a
``tls-port``, with certificates made here: a CA, an "other" CA, server certificates for
127.0.0.1/localhost (and one for another name), client certificates from both CAs.

What it must do: server-only TLS and mutual TLS carry requests end to end; every certificate of
a ``ca_file`` bundle is trusted; a wrong CA, a certificate for another name, a missing or
foreign client certificate each give one warn line naming the cause and are retried with the
bus's backoff while the service stays up and says it is not connected; ``ppbridge check``
names the file, the key and the problem of a bad certificate, key or bundle.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
from pathlib import Path
from typing import Any

import hiredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge.redis_server import free_port
from ppbridge.redisconfig import RedisSettings
from ppbridge.redistls import RedisTLSEndpoint, RedisTLSError
from tests.support import Client, Stack, key_pair, poll, temp_folder
from tests.test_cli import call

_PEM = serialization.Encoding.PEM


# --- certificates -----------------------------------------------------------------------------


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None,
                 ca: bool = False, names: tuple[str, ...] = (), usage: Any = None,
                 expired: bool = False) -> x509.Certificate:
    """A certificate valid from an hour ago for a day (``expired``: from two days ago for a
    day), signed by ``issuer`` (self-signed if None)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2 if expired else 0, hours=1)
    builder = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key())
               .issuer_name(issuer[0].subject if issuer else name).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    alt: list[x509.GeneralName] = []
    for value in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            alt.append(x509.DNSName(value))
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


_MADE: dict[str, tuple[bytes, bytes]] = {}  # stem -> (certificate PEM, key PEM), made once per run


def _made() -> dict[str, tuple[bytes, bytes]]:
    if not _MADE:
        made: dict[str, tuple[x509.Certificate, Any]] = {}

        def add(stem: str, issuer: str | None, **kwargs: Any) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            made[stem] = (_certificate(stem, key, made[issuer] if issuer else None, **kwargs), key)

        add("ca", None, ca=True)
        add("other-ca", None, ca=True)
        add("server", "ca", names=("localhost", "127.0.0.1"), usage=ExtendedKeyUsageOID.SERVER_AUTH)
        add("elsewhere", "ca", names=("redis.example",), usage=ExtendedKeyUsageOID.SERVER_AUTH)
        add("expired", "ca", names=("127.0.0.1",), usage=ExtendedKeyUsageOID.SERVER_AUTH, expired=True)
        add("client", "ca", usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        add("foreign-client", "other-ca", usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        add("sub-ca", "ca", ca=True)
        add("sub-client", "sub-ca", usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        for stem, (cert, key) in made.items():
            _MADE[stem] = (cert.public_bytes(_PEM), key.private_bytes(_PEM, pkcs8, none))
    return _MADE


def write_certificates(folder: Path) -> Path:
    """``folder/tls``: STEM.pem and STEM.key (0600) for each certificate above, ``bundle.pem``
    holding the other CA first and the server's CA second, and ``chain.pem``: a client
    certificate from an intermediate CA (``sub-ca``, signed by ``ca``) followed by that CA."""
    tls = folder / "tls"
    tls.mkdir()
    for stem, (cert, key) in _made().items():
        (tls / f"{stem}.pem").write_bytes(cert)
        (tls / f"{stem}.key").write_bytes(key)
        (tls / f"{stem}.key").chmod(0o600)
    (tls / "bundle.pem").write_bytes(_made()["other-ca"][0] + _made()["ca"][0])
    (tls / "chain.pem").write_bytes(_made()["sub-client"][0] + _made()["sub-ca"][0])
    return tls


# --- a TLS redis-server, and what it and ppbridge say -------------------------------------------


def tls_stack(case: TestCase, server: str = "server", auth_clients: str = "no") -> tuple[Stack, Path, int]:
    """A Stack whose redis-server also listens with TLS (``server`` certificate, clients checked
    against ``ca.pem`` when ``auth_clients`` is "yes"); its plain port stays for the test's own
    queries. (stack, certificate folder, TLS port)."""
    tls, port = write_certificates(temp_folder(case)), free_port()
    stack = Stack(case, extra_args=["--tls-port", str(port), "--tls-cert-file", str(tls / f"{server}.pem"),
                                    "--tls-key-file", str(tls / f"{server}.key"),
                                    "--tls-ca-cert-file", str(tls / "ca.pem"), "--tls-auth-clients", auth_clients])
    return stack, tls, port


def redis_command(port: int, *args: str) -> Any:
    """One command to the redis-server's plain port; its reply (read by hiredis)."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args]))
        reply = False
        while reply is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            reader.feed(data)
            reply = reader.gets()
    return reply


def tls_clients(port: int, tls_port: int) -> list[str]:
    """Names of the ppbridge connections (CLIENT SETNAME) the server accepted on ``tls_port``."""
    listing = redis_command(port, "CLIENT", "LIST").decode().splitlines()
    fields = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in listing]
    return sorted(f["name"] for f in fields if f.get("laddr", "").endswith(f":{tls_port}") and f.get("name"))


class LogLines:
    """Every log event from now to the end of the test, as (level, text, is a failure)."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") in (LogLevel.warn, LogLevel.error,
                                                                              LogLevel.critical)]

    def tls_lines(self) -> list[str]:
        return [line for line in self.warnings() if line.startswith("Redis TLS to ")]

    def failures(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "log_failure" in e or e.get("isError")]

    def texts(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    def retries(self) -> list[float]:
        """The delays of the retries Twisted's ClientService scheduled ("Scheduling retry N to
        connect ... in D seconds", logged for the publisher and the main subscriber)."""
        return [float(e["delay"]) for e in self.events
                if "Scheduling retry" in str(e.get("log_format")) and isinstance(e.get("delay"), (int, float))]


ROUTES = {"alpha": {"path_prefix": "/"}}


@defer.inlineCallbacks
def echo_through(case: TestCase, stack: Stack):  # type: ignore[no-untyped-def]
    """GET /echo/tls through the stack's forwarder: (status, body)."""
    response, body = yield Client(case).fetch(b"GET", stack.url + "/echo/tls?q=1")
    return response.code, body


# --- it works ------------------------------------------------------------------------------------


class Works(TestCase):
    """Server-only TLS, mutual TLS and a CA bundle carry requests end to end."""

    @defer.inlineCallbacks
    def test_server_only_tls_end_to_end(self):
        """With ``rediss://127.0.0.1:TLSPORT/0`` and ``ca_file`` = the CA on both sides, the
        forwarder and the proxy connect (the server's IP address SAN is checked), a GET through
        the bridge answers 200 with the upstream's echo of the path, and every ppbridge
        connection Redis lists (publisher, subscribers) arrived on the TLS port."""
        stack, tls, port = tls_stack(self)
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem")}
        url = f"rediss://127.0.0.1:{port}/0"
        yield stack.start(ROUTES, forwarder_redis=url, proxy_redis=url)
        code, body = yield echo_through(self, stack)
        self.assertEqual(code, 200)
        self.assertIn(b'"/echo/tls?q=1"', body)
        names = tls_clients(stack.redis.port, port)
        self.assertEqual(set(names), {"ppbridge-publisher", "ppbridge-subscriber", "ppbridge-public"}, names)
        self.assertEqual(len(names), 6, names)  # three connections for each side

    @defer.inlineCallbacks
    def test_mutual_tls(self):
        """A Redis that requires client certificates (``tls-auth-clients yes``), reached as
        ``rediss://localhost`` (the DNS name SAN is checked) with ``cert_file``/``key_file`` of a
        client certificate from the same CA: the bridge connects and carries a GET (200)."""
        stack, tls, port = tls_stack(self, auth_clients="yes")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem"), "redis.cert_file": str(tls / "client.pem"),
                            "redis.key_file": str(tls / "client.key")}
        url = f"rediss://localhost:{port}/0"
        yield stack.start(ROUTES, forwarder_redis=url, proxy_redis=url)
        code, _ = yield echo_through(self, stack)
        self.assertEqual(code, 200)
        self.assertEqual(len(tls_clients(stack.redis.port, port)), 6)

    @defer.inlineCallbacks
    def test_mutual_tls_with_an_intermediate_ca(self):
        """A Redis that trusts only the root CA for clients, and ``cert_file`` holding a client
        certificate from an intermediate CA followed by that intermediate: the chain is sent and
        accepted, the bridge carries a GET (200). (Sending the leaf alone fails this test.)"""
        stack, tls, port = tls_stack(self, auth_clients="yes")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem"), "redis.cert_file": str(tls / "chain.pem"),
                            "redis.key_file": str(tls / "sub-client.key")}
        url = f"rediss://127.0.0.1:{port}/0"
        yield stack.start(ROUTES, forwarder_redis=url, proxy_redis=url)
        code, _ = yield echo_through(self, stack)
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_bundle_with_the_servers_ca_second(self):
        """``ca_file`` holding two CA certificates, the one that signed the server's
        certificate second (a CA rotation): the bridge connects and carries a GET (200).
        (Trusting only a bundle's first certificate fails this test.)"""
        stack, tls, port = tls_stack(self)
        stack.redis_keys = {"redis.ca_file": str(tls / "bundle.pem")}
        url = f"rediss://127.0.0.1:{port}/0"
        yield stack.start(ROUTES, forwarder_redis=url, proxy_redis=url)
        code, _ = yield echo_through(self, stack)
        self.assertEqual(code, 200)


# --- it fails clearly, and keeps trying -----------------------------------------------------------


class Failures(TestCase):
    """A TLS setup the server or the client refuses: one warn line naming the cause per attempt
    (throttled like every Redis failure), no traceback, no "failed SELECT", retried with backoff;
    the service stays up and reports itself not connected."""

    timeout = 60

    @defer.inlineCallbacks
    def failing_forwarder(self, stack: Stack, port: int, host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
        """A forwarder on ``rediss://HOST:PORT``; fires with the log once it has logged a TLS line."""
        lines = LogLines(self)
        yield stack.add_forwarder(ROUTES, redis_url=f"rediss://{host}:{port}/0")
        yield poll(lambda: lines.tls_lines(), 10, "a 'Redis TLS to' warn line")
        return lines

    def assert_only(self, lines: LogLines, stack: Stack, *parts: str) -> None:
        """Every warn line so far is a TLS line holding ``parts`` (or the throttle's count of
        unlogged ones); nothing logged a failure, and no event speaks of AUTH/SELECT; the
        forwarder runs, disconnected and not ready."""
        for line in lines.warnings():
            if "more Redis failures (tls) were not logged" in line:
                continue
            self.assertTrue(line.startswith("Redis TLS to 127.0.0.1:") and line.endswith("; retrying"), line)
            for part in parts:
                self.assertIn(part, line)
        self.assertEqual(lines.failures(), [])
        for text in lines.texts():
            self.assertNotIn("dbid", text)
            self.assertNotIn("AUTH/SELECT", text)
        self.assertTrue(stack.forwarder.running)
        self.assertFalse(stack.forwarder.bus.connected)
        self.assertFalse(stack.forwarder.ready())

    @defer.inlineCallbacks
    def test_wrong_ca_is_one_line_retried_with_backoff_then_recovers(self):
        """``ca_file`` = a CA that did not sign the server's certificate: each attempt logs
        "Redis TLS to 127.0.0.1:PORT failed: certificate verify failed: the server's
        certificate (issued by 'CN=ca') is not signed by a CA in redis.ca_file PATH; retrying".
        In the 4 s after the first line the reconnecting services schedule between 4 and 30
        retries (backoff 0.1 s doubling to 2 s; a loop without backoff schedules hundreds) and the
        delay grows past 1 s; the forwarder stays up, disconnected and not ready. Once the file
        holds the right CA, a later attempt (files are read per attempt) connects, no restart."""
        stack, tls, port = tls_stack(self)
        ca_file = tls / "redis-ca.pem"
        shutil.copyfile(tls / "other-ca.pem", ca_file)
        stack.redis_keys = {"redis.ca_file": str(ca_file)}
        lines = yield self.failing_forwarder(stack, port)
        before = len(lines.retries())
        yield deferLater(reactor, 4, lambda: None)
        delays = lines.retries()[before:]
        self.assertTrue(4 <= len(delays) <= 30, delays)
        self.assertGreater(max(delays), 1.0)
        self.assert_only(lines, stack, "failed: certificate verify failed: the server's certificate (issued by "
                                       f"'CN=ca') is not signed by a CA in redis.ca_file {ca_file}")
        shutil.copyfile(tls / "ca.pem", ca_file)
        yield poll(lambda: stack.forwarder.bus.connected, 10, "the forwarder connected with the right CA")
        self.assertEqual(lines.failures(), [])

    @defer.inlineCallbacks
    def test_certificate_for_another_name(self):
        """A server certificate from the trusted CA that names only ``redis.example``, reached
        as 127.0.0.1: the line says "certificate verify failed: the server's certificate is not
        valid for '127.0.0.1' (it names redis.example)"; not connected, no traceback."""
        stack, tls, port = tls_stack(self, server="elsewhere")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem")}
        lines = yield self.failing_forwarder(stack, port)
        self.assert_only(lines, stack, "certificate verify failed: the server's certificate is not valid for "
                                       "'127.0.0.1' (it names redis.example)")

    @defer.inlineCallbacks
    def test_expired_server_certificate(self):
        """A server certificate from the trusted CA that expired yesterday: the line says
        "certificate verify failed: 'CN=expired' in the server's chain expired on DATE UTC"."""
        stack, tls, port = tls_stack(self, server="expired")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem")}
        lines = yield self.failing_forwarder(stack, port)
        self.assert_only(lines, stack, "certificate verify failed: 'CN=expired' in the server's chain expired on ")

    @defer.inlineCallbacks
    def test_missing_client_certificate(self):
        """A Redis that requires client certificates and a config without ``cert_file``: the
        line says "handshake failure (...certificate required...): the server requires a client
        certificate; set redis.cert_file and redis.key_file"; not connected, no traceback."""
        stack, tls, port = tls_stack(self, auth_clients="yes")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem")}
        lines = yield self.failing_forwarder(stack, port)
        self.assert_only(lines, stack, "handshake failure (", "the server requires a client certificate; set "
                                       "redis.cert_file and redis.key_file")

    @defer.inlineCallbacks
    def test_client_certificate_from_another_ca(self):
        """A Redis that requires client certificates from its CA, and a client certificate from
        another CA: the line says "handshake failure (... unknown ca): the server refused the
        client certificate in redis.cert_file PATH"; not connected, no traceback."""
        stack, tls, port = tls_stack(self, auth_clients="yes")
        stack.redis_keys = {"redis.ca_file": str(tls / "ca.pem"), "redis.cert_file": str(tls / "foreign-client.pem"),
                            "redis.key_file": str(tls / "foreign-client.key")}
        lines = yield self.failing_forwarder(stack, port)
        self.assert_only(lines, stack, "handshake failure (", "unknown ca): the server refused the client "
                                       f"certificate in redis.cert_file {tls / 'foreign-client.pem'}")

    @defer.inlineCallbacks
    def test_plain_port_times_out_as_not_tls(self):
        """The endpoint pointed at Redis's plain port (which never answers a TLS hello): after
        its timeout (0.5 s here) the attempt fails with RedisTLSError "handshake failure: no TLS
        handshake within 0.5 s (is that port Redis's tls-port?)", reported once through
        ``on_failure``, and the protocol was never connected."""
        stack, tls, _ = tls_stack(self)
        plain = stack.redis.port
        settings = RedisSettings(url=f"rediss://127.0.0.1:{plain}/0", port=plain, tls=True, ca_file=tls / "ca.pem")
        causes: list[str] = []
        made: list[Protocol] = []

        class Made(Protocol):
            def connectionMade(self) -> None:
                made.append(self)

        endpoint = RedisTLSEndpoint(HostnameEndpoint(reactor, "127.0.0.1", plain), settings, reactor, causes.append,
                                    timeout=0.5)
        failure = yield self.assertFailure(endpoint.connect(Factory.forProtocol(Made)), RedisTLSError)
        expected = "handshake failure: no TLS handshake within 0.5 s (is that port Redis's tls-port?)"
        self.assertEqual((str(failure), causes, made), (expected, [expected], []))

    @defer.inlineCallbacks
    def test_cancelled_attempt_is_not_reported(self):
        """An attempt cancelled while its handshake waits (what a reconnecting service does when
        stopped) fails with CancelledError at once, calls ``on_failure`` never, and its TCP
        connection is closed: Redis no longer lists a client on its plain port."""
        stack, tls, _ = tls_stack(self)
        plain = stack.redis.port
        settings = RedisSettings(url=f"rediss://127.0.0.1:{plain}/0", port=plain, tls=True, ca_file=tls / "ca.pem")
        causes: list[str] = []
        endpoint = RedisTLSEndpoint(HostnameEndpoint(reactor, "127.0.0.1", plain), settings, reactor, causes.append)
        attempt = endpoint.connect(Factory.forProtocol(Protocol))
        yield poll(lambda: len(redis_command(plain, "CLIENT", "LIST").splitlines()) == 2, 5, "the attempt's TCP link")
        attempt.cancel()
        yield self.assertFailure(attempt, defer.CancelledError)
        yield poll(lambda: len(redis_command(plain, "CLIENT", "LIST").splitlines()) == 1, 5, "the link closed")
        self.assertEqual(causes, [])


# --- ppbridge check ------------------------------------------------------------------------------


class Check(TestCase):
    """``ppbridge check`` on a proxy config whose TLS files are wrong: exit 2 and one stderr line
    naming the config, the key, the file and the problem."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        self.tls = write_certificates(self.folder)
        key_pair(self.folder, "alpha")
        key_pair(self.folder, "forwarder")

    def config(self, **redis: str) -> Path:
        """A proxy config on ``rediss://127.0.0.1:6390/0`` with these [redis] keys."""
        lines = [f'{key} = "{value}"' for key, value in redis.items()]
        text = "\n".join(['[redis]', 'url = "rediss://127.0.0.1:6390/0"', *lines, '[proxy]', 'name = "alpha"',
                          'private_key = "keys/alpha.key"', 'forwarder_key = "keys/forwarder.pub"',
                          'upstream = "http://127.0.0.1:9/"', ''])
        path = self.folder / "proxy.toml"
        path.write_text(text)
        return path

    def test_good_tls_files_pass(self):
        """The fixture's files themselves (the two-CA bundle, the client certificate and its
        0600 key) pass: exit 0 and the "ok" line."""
        path = self.config(ca_file=str(self.tls / "bundle.pem"), cert_file=str(self.tls / "client.pem"),
                           key_file=str(self.tls / "client.key"))
        status, out, err = call("check", str(path))
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith(f"{path}: ok: proxy 'alpha'"), out)

    def test_bad_files_are_one_line_each(self):
        """Each bad file gives exit 2 and exactly one stderr line "ppbridge check: CONFIG:
        redis.KEY: FILE: PROBLEM": a cert_file that is not PEM, a key_file that belongs to
        another certificate, a key_file readable by others (0644), a key_file that is not a key,
        a bundle whose second certificate is cut short, a missing ca_file, and a cert_file
        without key_file."""
        tls = self.tls
        (tls / "garbage.pem").write_text("not a certificate\n")
        (tls / "garbage.key").write_text("not a key\n")
        (tls / "garbage.key").chmod(0o600)
        (tls / "open.key").write_bytes((tls / "client.key").read_bytes())
        (tls / "open.key").chmod(0o644)
        (tls / "cut.pem").write_bytes(_made()["ca"][0] + _made()["other-ca"][0][:200] + b"\n-----END CERTIFICATE-----\n")
        client = {"cert_file": str(tls / "client.pem")}
        cases = [
            (dict(client, key_file=str(tls / "garbage.key")), "redis.key_file", tls / "garbage.key",
             "not an unencrypted PEM private key"),
            (dict(cert_file=str(tls / "garbage.pem"), key_file=str(tls / "client.key")), "redis.cert_file",
             tls / "garbage.pem", "not a PEM certificate"),
            (dict(client, key_file=str(tls / "foreign-client.key")), "redis.key_file", tls / "foreign-client.key",
             "does not belong to the certificate in redis.cert_file"),
            (dict(client, key_file=str(tls / "open.key")), "redis.key_file", tls / "open.key",
             "permissions 0644 are too open for a private key; chmod 600 it"),
            ({"ca_file": str(tls / "cut.pem")}, "redis.ca_file", tls / "cut.pem", "not a PEM bundle of CA certificates"),
            ({"ca_file": str(tls / "nowhere.pem")}, "redis.ca_file", tls / "nowhere.pem", "no such file"),
            (client, "redis.key_file", None, "a client certificate needs both redis.cert_file and redis.key_file"),
        ]
        for redis, key, file, problem in cases:
            path = self.config(**redis)
            status, out, err = call("check", str(path))
            self.assertEqual((status, out), (2, ""), (redis, err))
            self.assertEqual(err.count("\n"), 1, err)
            prefix = f"ppbridge check: {path}: {key}: " + (f"{file}: " if file else "")
            self.assertTrue(err.startswith(prefix), (err, prefix))
            self.assertIn(problem, err)
