"""What an operator relies on and no other test covers: Redis link health checks, TLS and ACL
users on the Redis link, key rotation by message budget and by traffic at service level, timers
and drop logs that survive floods and failures, the admin pages, key-size and command-line
checks, ``ppbridge check`` on good configs, and the example configs against the schema.

Real parts wherever the behaviour is about I/O: a private redis-server (the one on PATH; a
missing one fails setUp, never skips), real HTTP over loopback, the installed programs as
child processes. Unit-level where it is about time: a ``Clock``, never sleeping.
"""

from __future__ import annotations

import datetime
import html
import io
import ipaddress
import json
import os
import re
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge import bus as bus_module
from ppbridge.accessconfig import ACCESS_KEYS
from ppbridge import config as config_module
from ppbridge import forwarder_tap, keys, node, proxy_tap, timers
from ppbridge.admin import admin_site
from ppbridge.bus import RedisBus
from ppbridge.config import RedisSettings, load_forwarder_config, load_proxy_config
from ppbridge.errors import BusMessageError, BusUnavailable, ConfigError
from ppbridge.logsafe import BURST, PERIOD
from ppbridge.metrics import Metrics
from ppbridge.node import DropLog
from ppbridge.redis_server import RedisServer, free_port
from ppbridge.scaffold import toml_text, write_forwarder_config, write_proxy_config
from ppbridge.timers import Periodic
from tests.processes import ERR, OUT, PPBRIDGE, TWISTD, awaited, refuses_connections, run, spawn
from tests.redisclient import client_for
from tests.support import Client, Stack, key_pair, listen, poll, redis_clients, start_redis, temp_folder

CONF = Path(__file__).resolve().parent.parent / "conf"
CHANNEL = b"ppbridge:p:ops:0123456789abcdef"  # a main-subscriber channel (not a public one)
WAIT = 10.0  # bound on a wait for something expected within about a second (>= 10x)


# --- helpers -------------------------------------------------------------------------------------


class BusWatch:
    """A RedisBus on ``settings`` with what it reported, in order: state changes and messages.
    ``until(predicate)`` fires once the record satisfies it (checked at every report)."""

    def __init__(self, case: TestCase, settings: RedisSettings, *channels: bytes) -> None:
        self.bus = RedisBus(settings, reactor)
        self.stopped = False
        self.events: list[Any] = []  # True/False for on_state, ("message", channel, data), markers
        self._waits: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self.bus.on_state = self._report
        self.bus.on_message = lambda channel, data: self._report(("message", channel, data))
        for channel in channels:
            self.bus.subscribe(channel)
        self.bus.start()
        case.addCleanup(self.stop)

    def stop(self) -> Deferred[None]:
        """Stop the bus once. (A second RedisBus.stop() run from the callbacks of the first
        can find txredisapi's ClientService mid-transition and raise; the services never
        stop a bus twice.)"""
        if self.stopped:
            return defer.succeed(None)
        self.stopped = True
        return self.bus.stop()

    @property
    def states(self) -> list[bool]:
        return [e for e in self.events if isinstance(e, bool)]

    def mark(self, label: str) -> None:
        """Put a marker (what the test did) into the record, between the bus's reports."""
        self.events.append(label)

    def _report(self, event: Any) -> None:
        self.events.append(event)
        for entry in list(self._waits):
            if entry[0]():
                self._waits.remove(entry)
                entry[1].callback(None)

    def until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> Deferred[None]:
        if predicate():
            return defer.succeed(None)
        waiting: Deferred[None] = Deferred()
        return awaited(self._waits, (predicate, waiting), waiting, timeout,
                       lambda s: f"not within {s} s: {what}; the bus reported {self.events!r}")

    def states_are(self, *states: bool) -> Callable[[], bool]:
        return lambda: self.states == list(states)

    @defer.inlineCallbacks
    def round_trip(self, data: bytes):  # type: ignore[no-untyped-def]
        """Publish ``data`` on CHANNEL through the bus's own publisher and await its delivery
        to the bus's subscriber: both connections carry traffic."""
        receivers = yield self.bus.publish(CHANNEL, data)
        yield self.until(lambda: ("message", CHANNEL, data) in self.events, f"{data!r} delivered")
        return receivers


class LogWatch:
    """Events from the global log publisher matching ``match``; ``wait(n)`` fires once n came."""

    def __init__(self, case: TestCase, match: Callable[[dict[str, Any]], bool]) -> None:
        self.match = match
        self.seen: list[dict[str, Any]] = []
        self._waits: list[tuple[int, Deferred[None]]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if self.match(event):
            self.seen.append(event)
            for entry in list(self._waits):
                if len(self.seen) >= entry[0]:
                    self._waits.remove(entry)
                    entry[1].callback(None)

    def wait(self, count: int, what: str, timeout: float = WAIT) -> Deferred[None]:
        if len(self.seen) >= count:
            return defer.succeed(None)
        waiting: Deferred[None] = Deferred()

        def message(seconds: float) -> str:
            lines = [formatEvent(e) for e in self.seen]
            return f"not within {seconds} s: {what} (saw {len(lines)}: {lines})"

        return awaited(self._waits, (count, waiting), waiting, timeout, message)


def proxy_redis_settings(folder: Path, redis: dict[str, Any]) -> RedisSettings:
    """The [redis] settings of a proxy config file with table ``redis``, loaded as the services
    load it (paths relative to the file, password file permissions checked)."""
    key_pair(folder, "forwarder")
    key_pair(folder, "alpha")
    path = folder / "proxy.toml"
    path.write_text(toml_text({
        "redis": redis,
        "proxy": {"name": "alpha", "private_key": "keys/alpha.key", "forwarder_key": "keys/forwarder.pub",
                  "upstream": "http://127.0.0.1:9/"},
    }))
    return load_proxy_config(path).redis


def write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)


# --- TLS material, made with the cryptography package ------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(folder: Path, common_name: str) -> tuple[Path, Any, x509.Certificate]:
    """A self-signed CA: (its certificate's PEM file, its key, its certificate)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = folder / f"{common_name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(folder: Path, ca_key: Any, ca_cert: x509.Certificate) -> tuple[Path, Path]:
    """A server certificate for localhost and 127.0.0.1 signed by the CA: (cert file, key file)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / "redis-server.crt", folder / "redis-server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_secret(key_path, _pem_key(key).decode("ascii"))
    return cert_path, key_path


def start_tls_redis(case: TestCase, folder: Path) -> tuple[RedisServer, int, Path]:
    """A private redis-server with a TLS port as well as its plain one (RedisServer needs the
    plain port to see it ready; the test uses it to look at the server). Server certificate
    for 127.0.0.1/localhost from a fresh CA; clients are not asked for certificates.
    Returns (server, TLS port, the CA's PEM file)."""
    ca_path, ca_key, ca_cert = make_ca(folder, "ppbridge test CA")
    cert_path, key_path = make_server_cert(folder, ca_key, ca_cert)
    last: Exception | None = None
    for _attempt in range(3):  # free_port() is a guess; another process may take it first
        tls_port = free_port()
        server = RedisServer(extra_args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert_path),
                                         "--tls-key-file", str(key_path), "--tls-ca-cert-file", str(ca_path),
                                         "--tls-auth-clients", "no"])
        try:
            server.start()
        except RuntimeError as err:
            server.kill()
            if "in use" not in str(err):
                raise
            last = err
            continue
        case.addCleanup(server.kill)
        return server, tls_port, ca_path
    raise AssertionError(f"no free TLS port for redis-server: {last}")


# --- 1. health checks ----------------------------------------------------------------------------


class HealthCheckTests(TestCase):
    """RedisBus's watchdog PING against a Redis that stops answering without closing anything."""

    @defer.inlineCallbacks
    def test_frozen_redis_is_noticed_and_reconnected_after_it_thaws(self):
        """A Redis frozen with SIGSTOP keeps every TCP connection open and answers nothing;
        only the watchdog's PING with a timeout can notice. With HEALTH_INTERVAL and
        HEALTH_TIMEOUT patched to 0.5 s (the defaults are 5 s each), the bus reports, in this
        order: connected, then (after SIGSTOP) disconnected, and only after SIGCONT connected
        again; after that a message published through the bus reaches its subscriber. Each
        wait is bounded by WAIT = 10 s, >= 10x the ~1 s expected."""
        self.patch(bus_module, "HEALTH_INTERVAL", 0.5)
        self.patch(bus_module, "HEALTH_TIMEOUT", 0.5)
        server = start_redis(self)
        pid = server.pid
        assert pid is not None
        settings = RedisSettings(url=server.url, host="127.0.0.1", port=server.port)
        watch = BusWatch(self, settings, CHANNEL)
        self.addCleanup(lambda: server.pid and os.kill(server.pid, signal.SIGCONT))  # first: never leave it frozen
        yield watch.until(watch.states_are(True), "connected at first")
        yield watch.round_trip(b"before")

        watch.mark("SIGSTOP")
        os.kill(pid, signal.SIGSTOP)
        yield watch.until(watch.states_are(True, False), "the frozen Redis noticed (on_state False)")
        self.assertFalse(watch.bus.connected)
        yield self.assertFailure(watch.bus.publish(CHANNEL, b"while frozen"), BusUnavailable)

        watch.mark("SIGCONT")
        os.kill(pid, signal.SIGCONT)
        yield watch.until(watch.states_are(True, False, True), "reconnected after SIGCONT (on_state True)")
        receivers = yield watch.round_trip(b"after")
        self.assertEqual(receivers, 1)
        order = [e for e in watch.events if isinstance(e, (bool, str))]
        self.assertEqual(order, [True, "SIGSTOP", False, "SIGCONT", True])


# --- 2. TLS --------------------------------------------------------------------------------------


class TlsTests(TestCase):
    """``rediss://`` with ``[redis] ca_file`` against a redis-server listening with TLS."""

    @defer.inlineCallbacks
    def test_rediss_with_ca_file_connects_and_carries_pub_sub(self):
        """A bus configured with ``url = "rediss://127.0.0.1:<tls port>/0"`` and ``ca_file`` naming
        the CA that signed the server's certificate connects (on_state True), and a message it
        publishes comes back to its subscriber. CLIENT LIST (asked on the plain port) shows both
        of its connections arrived on the TLS port, which speaks nothing but TLS."""
        folder = temp_folder(self)
        server, tls_port, ca_path = start_tls_redis(self, folder)
        settings = proxy_redis_settings(folder, {"url": f"rediss://127.0.0.1:{tls_port}/0",
                                                 "ca_file": ca_path.name})
        self.assertTrue(settings.tls)
        self.assertEqual(settings.ca_file, ca_path)
        watch = BusWatch(self, settings, CHANNEL)
        yield watch.until(watch.states_are(True), "connected over TLS")
        receivers = yield watch.round_trip(b"over tls")
        self.assertEqual(receivers, 1)
        admin = client_for(server)
        self.addCleanup(admin.close)
        named = redis_clients(admin)
        for name in ("ppbridge-publisher", "ppbridge-subscriber"):
            self.assertIn(name, named)
            self.assertEqual(named[name]["laddr"], f"127.0.0.1:{tls_port}", named[name])

    @defer.inlineCallbacks
    def test_rediss_with_a_wrong_ca_or_the_system_store_never_connects(self):
        """The same TLS server, with ``ca_file`` naming another CA, and then with no ca_file at
        all (the system's store, which does not hold the test CA): the server refuses each TLS
        handshake (its log says "Error accepting a client connection"), the bus warns "Redis
        TLS to ... failed" (ppbridge.redistls names the cause), retries (the watchdog replaces the factories that gave
        up; HEALTH_INTERVAL patched to 0.2 s) and fails again, and never reports on_state True,
        never counts as connected and never shows in CLIENT LIST: no silent fallback to an
        unverified link."""
        self.patch(bus_module, "HEALTH_INTERVAL", 0.2)
        folder = temp_folder(self)
        server, tls_port, _ = start_tls_redis(self, folder)
        wrong_ca, _, _ = make_ca(folder, "someone else CA")
        admin = client_for(server)
        self.addCleanup(admin.close)
        url = f"rediss://127.0.0.1:{tls_port}/0"
        for redis in ({"url": url, "ca_file": wrong_ca.name}, {"url": url}):
            refused = LogWatch(self, lambda e: e.get("log_namespace") == "ppbridge.bus"
                               and "Redis TLS to" in (e.get("log_format") or ""))
            log_start = Path(server.logfile).stat().st_size
            watch = BusWatch(self, proxy_redis_settings(folder, redis), CHANNEL)
            # first attempts of the publisher and the subscriber, then the watchdog's retries
            yield refused.wait(4, f"{redis}: the bus's refused connections and retries")
            yield poll(lambda: Path(server.logfile).read_bytes()[log_start:].count(
                b"Error accepting a client connection") >= 2, WAIT, "the server refusing the handshakes")
            self.assertEqual(watch.states, [], redis)
            self.assertFalse(watch.bus.connected, redis)
            self.assertEqual(redis_clients(admin), {}, redis)
            yield watch.stop()


# --- 3. ACL users and database selection ---------------------------------------------------------


class AclTests(TestCase):
    """A user name in the URL with ``password_file``, and a database number in the URL."""

    @defer.inlineCallbacks
    def test_acl_user_from_url_and_password_file(self):
        """With ``ACL SETUSER alice on >pw ~* &* +@all``, ``url = "redis://alice@127.0.0.1:PORT/0"``
        and ``password_file`` holding pw: the bus connects, CLIENT LIST shows both its named
        connections with user=alice, and a message goes through it (pub/sub as alice). The
        default user has no password, so AUTH with pw alone would be refused: the name counts."""
        folder = temp_folder(self)
        server = start_redis(self)
        admin = client_for(server)
        self.addCleanup(admin.close)
        self.assertEqual(admin.command("ACL", "SETUSER", "alice", "on", ">pw-of-alice", "~*", "&*", "+@all"), "OK")
        write_secret(folder / "secrets" / "redis.password", "pw-of-alice\n")
        settings = proxy_redis_settings(folder, {"url": f"redis://alice@127.0.0.1:{server.port}/0",
                                                 "password_file": "secrets/redis.password"})
        self.assertEqual((settings.username, settings.password), ("alice", "pw-of-alice"))
        watch = BusWatch(self, settings, CHANNEL)
        yield watch.until(watch.states_are(True), "connected as alice")
        self.assertEqual((yield watch.round_trip(b"as alice")), 1)
        named = redis_clients(admin)
        for name in ("ppbridge-publisher", "ppbridge-subscriber"):
            self.assertIn(name, named)
            self.assertEqual(named[name]["user"], "alice", named[name])

    @defer.inlineCallbacks
    def test_database_number_from_url(self):
        """``url = "redis://127.0.0.1:PORT/3"``: CLIENT LIST shows the bus's named connections
        with db=3, and pub/sub works through it."""
        folder = temp_folder(self)
        server = start_redis(self)
        admin = client_for(server)
        self.addCleanup(admin.close)
        settings = proxy_redis_settings(folder, {"url": f"redis://127.0.0.1:{server.port}/3"})
        self.assertEqual(settings.db, 3)
        watch = BusWatch(self, settings, CHANNEL)
        yield watch.until(watch.states_are(True), "connected")
        self.assertEqual((yield watch.round_trip(b"db 3")), 1)
        named = redis_clients(admin)
        for name in ("ppbridge-publisher", "ppbridge-subscriber"):
            self.assertIn(name, named)
            self.assertEqual(named[name]["db"], "3", named[name])


# --- 4. rotation by message budget, adaptive period ----------------------------------------------


def fingerprints(stack: Stack) -> tuple[str | None, str | None]:
    """(the forwarder's fingerprint for alpha, alpha's own), from their status documents."""
    return (stack.forwarder.status()["proxies"]["alpha"].get("key_fingerprint"),
            stack.proxies["alpha"].status()["key_fingerprint"])


@defer.inlineCallbacks
def settled(stack: Stack):  # type: ignore[no-untyped-def]
    """Wait until start-up is over: alpha has no key request out unanswered (a start-up race
    may yield one spare key) and both sides use the same key."""
    proxy = stack.proxies["alpha"]
    yield poll(lambda: not proxy.negotiator.unanswered_targets(reactor.seconds())
               and fingerprints(stack)[0] == fingerprints(stack)[1] is not None, WAIT, "start-up settled")


class ServiceRotationTests(TestCase):
    """Both services in-process on a private Redis, requests over real HTTP."""

    timeout = 120

    @defer.inlineCallbacks
    def test_message_budget_rotates_at_half_of_it(self):
        """``[rekey] messages_per_key = 40`` (fixed period of an hour, so time plays no part).
        Requests go one at a time, and after each the test awaits the proxy's next rekey check
        of its key (its 0.25 s timer asking ``schedule.due``), so every count is looked at:
        below 20 messages (half the budget) the key is never due; the first "due" verdict is
        "messages", at 20 or more and under 40 (rotated, not expired); then a new key replaces
        it, with a new fingerprint the same on forwarder and proxy, one more rotation counted
        by the forwarder, and every request, before and after, answered 200."""
        stack = yield Stack(self).start(rekey={"mode": "fixed", "period": 3600.0, "messages_per_key": 40})
        yield settled(stack)
        proxy, forwarder = stack.proxies["alpha"], stack.forwarder
        old = proxy.keyring.current(forwarder.id)
        assert old is not None
        first, _ = fingerprints(stack)
        rotations_before = forwarder.status()["proxies"]["alpha"]["rotations"]
        verdicts: list[tuple[int, str | None]] = []  # (messages on the first key, due's verdict)
        checked: list[Deferred[None]] = []
        original = proxy.schedule.due

        def due(now: float, keyed_at: float, messages_on_key: int) -> str | None:
            verdict = original(now, keyed_at, messages_on_key)
            if keyed_at == old.created:
                verdicts.append((messages_on_key, verdict))
                waiting, checked[:] = list(checked), []
                for d in waiting:
                    d.callback(None)
            return verdict

        def next_check() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            checked.append(d)
            return d.addTimeout(WAIT, reactor)

        self.patch(proxy.schedule, "due", due)
        client = Client(self)
        for i in range(40):
            if any(verdict for _, verdict in verdicts):
                break
            response, body = yield client.fetch(b"GET", f"{stack.url}/echo?n={i}")
            self.assertEqual(response.code, 200, body)
            yield next_check()
        else:
            self.fail(f"never due after 40 requests: {verdicts}")
        due_at = [(n, verdict) for n, verdict in verdicts if verdict]
        self.assertEqual(due_at[0][1], "messages", verdicts)
        self.assertTrue(20 <= due_at[0][0] < 40, verdicts)
        self.assertEqual([v for n, v in verdicts if n < 20], [None] * sum(n < 20 for n, _ in verdicts))
        self.assertTrue(any(10 <= n < 20 for n, _ in verdicts), f"too few checks to tell: {verdicts}")
        yield poll(lambda: proxy.keyring.current(forwarder.id) is not old, WAIT, "a new key on the proxy")
        self.assertLess(old.session.envelope.messages, 40, "the old key reached its hard limit")
        yield poll(lambda: fingerprints(stack)[0] == fingerprints(stack)[1] != first, WAIT,
                   "both sides on the new key")
        self.assertGreater(forwarder.status()["proxies"]["alpha"]["rotations"], rotations_before)
        for i in range(3):
            response, body = yield client.fetch(b"GET", f"{stack.url}/echo?after={i}")
            self.assertEqual(response.code, 200, body)

    @defer.inlineCallbacks
    def test_adaptive_period_shortens_under_traffic(self):
        """``[rekey] mode = "adaptive"``, min_period 1, max_period 3600, messages_per_key
        100000: without traffic alpha's /status period_s is max_period; under a stream of
        requests (one at a time, each answered 200) it drops below max_period, not below
        min_period. Bounded at 30 s of requests; ~1 s is expected on loopback."""
        rekey = {"mode": "adaptive", "min_period": 1.0, "max_period": 3600.0, "messages_per_key": 100000}
        stack = yield Stack(self).start(rekey=rekey)
        yield settled(stack)
        proxy = stack.proxies["alpha"]
        self.assertEqual(proxy.status()["rekey_mode"], "adaptive")
        self.assertEqual(proxy.status()["period_s"], 3600.0)
        client = Client(self)
        deadline = reactor.seconds() + 30
        sent = 0
        while proxy.status()["period_s"] >= 3600.0:
            self.assertLess(reactor.seconds(), deadline,
                            f"period still {proxy.status()['period_s']} after {sent} requests")
            response, body = yield client.fetch(b"GET", f"{stack.url}/echo?n={sent}")
            self.assertEqual(response.code, 200, body)
            sent += 1
        period = proxy.status()["period_s"]
        self.assertLess(period, 3600.0)
        self.assertGreaterEqual(period, 1.0)


# --- 5. Periodic ---------------------------------------------------------------------------------


class PeriodicTests(TestCase):
    """timers.Periodic on a Clock."""

    def run_ticks(self, failing: Callable[[], Any]) -> list[Any]:
        """A Periodic every 10 s whose tick 2 does ``failing()``; advance 4 ticks. The record
        of ticks and log events, in order."""
        clock = Clock()
        record: list[Any] = []
        self.patch(timers, "log", Logger(observer=record.append))

        def job() -> Any:
            record.append(("tick", clock.seconds()))
            if clock.seconds() == 20:
                return failing()
            return None

        periodic = Periodic(clock, 10.0, job, "test job")
        periodic.start()
        self.addCleanup(periodic.stop)
        for _ in range(4):
            clock.advance(10)
        self.assertTrue(periodic.running)
        return record

    def test_a_tick_that_raises_is_logged_and_the_next_ticks_run(self):
        """A job raising ValueError on tick 2: one critical log event with the failure and the
        line "test job failed; it runs again next tick" right after tick 2, then ticks 3 and 4
        run on time."""
        def boom() -> None:
            raise ValueError("tick 2 broke")

        record = self.run_ticks(boom)
        self.assertEqual([r if isinstance(r, tuple) else "log" for r in record],
                         [("tick", 10), ("tick", 20), "log", ("tick", 30), ("tick", 40)])
        event = record[2]
        self.assertEqual(event["log_level"].name, "critical")
        self.assertTrue(event["log_failure"].check(ValueError))
        self.assertEqual(formatEvent(event), "test job failed; it runs again next tick")

    def test_a_tick_whose_deferred_fails_with_a_lost_link_is_one_warning(self):
        """A job whose tick 2 returns a Deferred failing with BusUnavailable (Redis gone, an
        expected event): one warning line naming the job and the error, no traceback event,
        and ticks 3 and 4 run."""
        record = self.run_ticks(lambda: defer.fail(BusUnavailable("Redis is away")))
        self.assertEqual([r if isinstance(r, tuple) else "log" for r in record],
                         [("tick", 10), ("tick", 20), "log", ("tick", 30), ("tick", 40)])
        event = record[2]
        self.assertEqual(event["log_level"].name, "warn")
        self.assertNotIn("log_failure", event)
        self.assertEqual(formatEvent(event), "test job failed; it runs again next tick: Redis is away")


# --- 6. DropLog ----------------------------------------------------------------------------------


class DropLogTests(TestCase):
    """node.DropLog (through logsafe.Throttle) on a Clock."""

    def test_a_flood_of_drops_gives_ten_lines_a_minute_then_a_summary(self):
        """100 drops of reason bad-tag within 50 s: 10 "dropped a bus message" lines and the
        counter ppbridge_bus_dropped_total{reason="bad-tag"} at 100. 15 drops of reason replay
        in the same minute get their own 10 lines. The first bad-tag drop after the minute
        gives one summary line "90 more bus messages dropped (bad-tag)" and its own line; the
        counter is then 101; replay's first drop of its next minute summarises its 5."""
        self.assertEqual((BURST, PERIOD), (10, 60.0))  # the budget this test is written for
        clock = Clock()
        clock.advance(1000)
        events: list[dict[str, Any]] = []
        self.patch(node, "log", Logger(observer=events.append))
        metrics = Metrics()
        drop = DropLog(metrics, clock, "proxy")
        channel = b"ppbridge:p:alpha:0123456789abcdef"

        def counted(reason: str) -> float:
            return metrics.registry.get_sample_value("ppbridge_bus_dropped_total", {"reason": reason}) or 0.0

        def lines() -> list[str]:
            return [formatEvent(e) for e in events]

        for _ in range(100):
            drop(BusMessageError("bad-tag", "authentication failed"), channel)
            clock.advance(0.5)
        self.assertEqual(counted("bad-tag"), 100)
        self.assertEqual(len(lines()), 10, lines())
        self.assertTrue(all(line.startswith("proxy: dropped a bus message on ppbridge:p:alpha:") and
                            line.endswith(": bad-tag: authentication failed") for line in lines()), lines())

        for _ in range(15):
            drop(BusMessageError("replay", "counter 1 after 2"), channel)
        self.assertEqual(counted("replay"), 15)
        self.assertEqual(sum("replay" in line for line in lines()), 10, lines())
        self.assertEqual(len(lines()), 20)
        self.assertFalse(any("more bus messages dropped" in line for line in lines()))

        clock.advance(1061 - clock.seconds())  # the bad-tag minute (from t=1000) is over
        drop(BusMessageError("bad-tag", "authentication failed"), channel)
        self.assertEqual(lines()[20:], ["proxy: 90 more bus messages dropped (bad-tag)",
                                        f"proxy: dropped a bus message on {channel.decode()}: bad-tag: "
                                        "authentication failed"])
        self.assertEqual(counted("bad-tag"), 101)
        clock.advance(60)
        drop(BusMessageError("replay", "counter 1 after 2"), channel)
        self.assertEqual(lines()[22], "proxy: 5 more bus messages dropped (replay)")
        self.assertEqual(len(lines()), 24)

    def test_a_flood_that_stops_still_gets_its_summary(self):
        """30 drops of reason bad-tag in 15 s, then none: 10 lines; flush() before the minute
        is over writes nothing more; flush() once it is over writes "20 more bus messages
        dropped (bad-tag)" once, and a later flush() nothing (the services flush on their
        timers, so the count reaches the log without another drop of that reason)."""
        clock = Clock()
        clock.advance(1000)
        events: list[dict[str, Any]] = []
        self.patch(node, "log", Logger(observer=events.append))
        drop = DropLog(Metrics(), clock, "forwarder")
        for _ in range(30):
            drop(BusMessageError("bad-tag", "authentication failed"), b"ppbridge:negotiate")
            clock.advance(0.5)
        drop.flush()
        self.assertEqual(len(events), 10)
        clock.advance(60)
        drop.flush()
        drop.flush()
        self.assertEqual([formatEvent(e) for e in events[10:]], ["forwarder: 20 more bus messages dropped (bad-tag)"])


# --- 7. admin pages ------------------------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def page_status(body: bytes) -> dict[str, Any]:
    """The status JSON inside the index page's <pre>, unescaped."""
    found = re.search(rb"<pre[^>]*>(.*)</pre>", body, re.S)
    assert found, body
    return json.loads(html.unescape(found.group(1).decode("utf-8")))


class AdminPageTests(TestCase):
    """admin_site of a forwarder and a proxy over real HTTP."""

    timeout = 120

    @defer.inlineCallbacks
    def test_metrics_and_index_page(self):
        """A forwarder whose proxy has not started: its index page says "ppbridge: UNHEALTHY".
        Once alpha runs and one GET went through: the forwarder's /metrics is Prometheus text
        with ppbridge_requests_total{proxy="alpha",code="200",cause="-"} 1, sealed and opened bus
        messages, ppbridge_redis_connected 1; alpha's /metrics counts a granted negotiation; and
        each index page is HTML saying "ppbridge: healthy", linking status, metrics and
        healthz (relative URLs), with the /status document HTML-escaped in it (alpha's key fingerprint, the
        same on both sides)."""
        stack = Stack(self)
        yield stack.start(without=("alpha",))
        client = Client(self)
        f_admin = yield listen(self, admin_site(stack.forwarder))
        yield poll(lambda: stack.forwarder.bus.connected, WAIT, "the forwarder connected to Redis")
        response, body = yield client.fetch(b"GET", f_admin + "/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<h1>ppbridge: UNHEALTHY</h1>", body)

        proxy = stack.add_proxy("alpha", stack.upstream)
        yield stack.ready("alpha")
        p_admin = yield listen(self, admin_site(proxy))
        response, body = yield client.fetch(b"GET", stack.url + "/echo?metrics")
        self.assertEqual(response.code, 200, body)

        response, body = yield client.fetch(b"GET", f_admin + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain;"))
        self.assertIn(b"# TYPE ppbridge_requests_total counter", body)
        samples = metric_samples(body.decode("utf-8"))
        self.assertEqual(samples[("ppbridge_requests_total", (("cause", "-"), ("code", "200"), ("proxy", "alpha")))], 1.0)
        self.assertGreaterEqual(samples[("ppbridge_bus_messages_total", (("direction", "sealed"),))], 1.0)
        self.assertGreaterEqual(samples[("ppbridge_bus_messages_total", (("direction", "opened"),))], 1.0)
        self.assertEqual(samples[("ppbridge_redis_connected", ())], 1.0)
        response, body = yield client.fetch(b"GET", p_admin + "/metrics")
        self.assertEqual(response.code, 200)
        samples = metric_samples(body.decode("utf-8"))
        self.assertGreaterEqual(samples[("ppbridge_negotiations_total", (("result", "granted"),))], 1.0)
        self.assertGreaterEqual(samples[("ppbridge_bus_messages_total", (("direction", "opened"),))], 1.0)

        yield poll(lambda: stack.forwarder.healthy() and proxy.healthy(), WAIT, "both healthy")
        docs = {}
        for name, url in (("forwarder", f_admin), ("proxy", p_admin)):
            response, body = yield client.fetch(b"GET", url + "/")
            self.assertEqual(response.code, 200, name)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"], name)
            self.assertTrue(body.startswith(b"<!doctype html>"), body[:60])
            self.assertIn(b"<title>ppbridge status</title>", body)
            self.assertIn(b"<h1>ppbridge: healthy</h1>", body)
            for link in (b"status", b"metrics", b"healthz"):  # relative: works behind a sub-path
                self.assertIn(b"<a href=" + link + b">", body)
            self.assertNotIn(b'"redis_connected"', body)  # quotes escaped
            self.assertIn(b"&quot;redis_connected&quot;: true", body)
            docs[name] = page_status(body)
        self.assertEqual(docs["proxy"]["proxy"], "alpha")
        self.assertEqual(docs["forwarder"]["forwarder"], stack.forwarder.id.hex())
        self.assertEqual(docs["forwarder"]["proxies"]["alpha"]["key_fingerprint"], docs["proxy"]["key_fingerprint"])
        self.assertRegex(docs["proxy"]["key_fingerprint"], r"^[0-9a-f]{16}$")


# --- 8. small RSA keys ---------------------------------------------------------------------------


class SmallKeyTests(TestCase):
    """Key files with RSA keys under keys.MIN_BITS, at config load."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        for name in ("forwarder", "alpha"):
            key_pair(self.folder, name)  # 2048 bits: accepted
        self.small = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    def shrink(self, name: str, suffix: str) -> Path:
        """Replace keys/NAME.SUFFIX by the 1024-bit key (private: 0600)."""
        path = self.folder / "keys" / f"{name}{suffix}"
        if suffix == ".key":
            write_secret(path, _pem_key(self.small).decode("ascii"))
        else:
            path.write_bytes(keys.public_pem(self.small.public_key()))
        return path

    def test_1024_bit_keys_refused_naming_file_and_key(self):
        """With 2048-bit keys both configs load. A 1024-bit key in any of the four key
        settings (proxy.private_key, proxy.forwarder_key, forwarder.signing_key,
        proxies.alpha.public_key) is a ConfigError of one line:
        ``<config>: <key>: <key file>: RSA key of 1024 bits; at least 2048 are required``."""
        self.assertEqual(keys.MIN_BITS, 2048)
        fconf = write_forwarder_config(self.folder, "redis://127.0.0.1:6390/0", "tcp:0", {"alpha": {"path_prefix": "/"}})
        pconf = write_proxy_config(self.folder, "alpha", "redis://127.0.0.1:6390/0", "http://127.0.0.1:9/")
        load_forwarder_config(fconf)
        load_proxy_config(pconf)
        cases = [(load_proxy_config, pconf, "proxy.private_key", "alpha", ".key"),
                 (load_proxy_config, pconf, "proxy.forwarder_key", "forwarder", ".pub"),
                 (load_forwarder_config, fconf, "forwarder.signing_key", "forwarder", ".key"),
                 (load_forwarder_config, fconf, "proxies.alpha.public_key", "alpha", ".pub")]
        for load, conf, key, name, suffix in cases:
            good = (self.folder / "keys" / f"{name}{suffix}").read_bytes()
            path = self.shrink(name, suffix)
            message = str(self.assertRaises(ConfigError, load, conf))
            self.assertEqual(message, f"{conf}: {key}: {path}: RSA key of 1024 bits; at least 2048 are required")
            path.write_bytes(good)


# --- 9. --admin and --upstream --------------------------------------------------------------------


class CommandLineOverrideTests(TestCase):
    """The twistd plugins' options classes, and ``twistd -n ppproxy`` itself."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        self.pconf = write_proxy_config(self.folder, "alpha", "redis://127.0.0.1:6390/0", "http://127.0.0.1:9/app",
                                        admin="tcp:9181:interface=127.0.0.1")
        self.fconf = write_forwarder_config(self.folder, "redis://127.0.0.1:6390/0", "tcp:8080",
                                            {"alpha": {"path_prefix": "/"}}, admin="tcp:9180:interface=127.0.0.1")

    def test_proxy_options_override_upstream_and_admin(self):
        """ppproxy's Options: without options the config's upstream and admin endpoint; with
        ``--upstream URL --admin ENDPOINT`` those two replace them (and nothing else changes);
        ``--admin ""`` turns the admin server off."""
        plain = proxy_tap.Options()
        plain.parseOptions(["--config", str(self.pconf)])
        self.assertEqual((plain["settings"].upstream, plain["settings"].admin_listen),
                         ("http://127.0.0.1:9/app", "tcp:9181:interface=127.0.0.1"))
        options = proxy_tap.Options()
        options.parseOptions(["--config", str(self.pconf), "--upstream", "https://intranet.example:8443/base",
                              "--admin", "tcp:19181:interface=127.0.0.1"])
        settings = options["settings"]
        self.assertEqual((settings.upstream, settings.admin_listen),
                         ("https://intranet.example:8443/base", "tcp:19181:interface=127.0.0.1"))
        self.assertEqual((settings.name, settings.redis.url), ("alpha", "redis://127.0.0.1:6390/0"))
        off = proxy_tap.Options()
        off.parseOptions(["--config", str(self.pconf), "--admin", ""])
        self.assertIsNone(off["settings"].admin_listen)

    def test_forwarder_options_override_admin(self):
        """ppforwarder's Options: ``--admin ENDPOINT`` replaces [admin] listen, ``--admin ""``
        turns it off; the config's own endpoint is used without the option."""
        plain = forwarder_tap.Options()
        plain.parseOptions(["--config", str(self.fconf)])
        self.assertEqual(plain["settings"].admin_listen, "tcp:9180:interface=127.0.0.1")
        options = forwarder_tap.Options()
        options.parseOptions(["--config", str(self.fconf), "--admin", "tcp:19180:interface=127.0.0.1"])
        self.assertEqual(options["settings"].admin_listen, "tcp:19180:interface=127.0.0.1")
        off = forwarder_tap.Options()
        off.parseOptions(["--config", str(self.fconf), "--admin", ""])
        self.assertIsNone(off["settings"].admin_listen)

    def test_bad_upstream_option_is_blamed_on_the_option(self):
        """``--upstream ftp://x`` stops with exit status 2 and one stderr line blaming
        ``command line --upstream`` (not the config file)."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        options = proxy_tap.Options()
        raised = self.assertRaises(SystemExit, options.parseOptions,
                                   ["--config", str(self.pconf), "--upstream", "ftp://intranet.example/"])
        self.assertEqual(raised.code, 2)
        self.assertEqual(stderr.getvalue(),
                         "ppproxy: command line --upstream: must be an http:// or https:// URL\n")

    @defer.inlineCallbacks
    def test_twistd_ppproxy_uses_upstream_and_admin_options(self):
        """``twistd -n ppproxy --config X --upstream URL --admin tcp:P`` (the config naming
        another upstream and admin port): its start line says it calls URL, its /status on
        port P answers for proxy alpha, and the config's admin port stays closed."""
        redis = start_redis(self)
        admin_port, config_admin_port = free_port(), free_port()
        pconf = write_proxy_config(self.folder, "alpha", redis.url, "http://127.0.0.1:9/from-config",
                                   admin=f"tcp:{config_admin_port}:interface=127.0.0.1")
        upstream = "http://127.0.0.1:9/from-command-line"
        proxy = spawn(self, temp_folder(self), [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(pconf),
                                                "--upstream", upstream,
                                                "--admin", f"tcp:{admin_port}:interface=127.0.0.1"], "proxy")
        line = yield proxy.wait_for(r"proxy alpha \(instance [0-9a-f]+\) calling (\S+)")
        self.assertEqual(line.group(1), upstream)
        yield proxy.wait_for(rf"starting on {admin_port}\b")
        client = Client(self)
        response, body = yield client.fetch(b"GET", f"http://127.0.0.1:{admin_port}/status")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["proxy"], "alpha")
        yield client.pool.closeCachedConnections()
        self.assertTrue(refuses_connections(config_admin_port), "the config's admin endpoint was used")
        self.assertNotIn("from-config", proxy.text(OUT))


# --- 10. ppbridge check on valid configs -----------------------------------------------------------


class CheckCommandTests(TestCase):
    """``ppbridge check`` (the installed command, as a child process) on configs that are fine."""

    @defer.inlineCallbacks
    def test_check_prints_what_it_understood_and_exits_0(self):
        """A forwarder config with two routes (one by host and prefix) and a proxy config:
        each check exits 0, prints nothing on stderr and one stdout line:
        ``<file>: ok: forwarder on <endpoint>; routes: alpha (/a a.example), beta (/)`` and
        ``<file>: ok: proxy 'alpha' -> <upstream>, key <fingerprint of alpha.key>``. Nothing
        contacts the (absent) Redis."""
        folder = temp_folder(self)
        for name in ("forwarder", "alpha", "beta"):
            key_pair(folder, name)
        dead = f"redis://127.0.0.1:{free_port()}/0"
        fconf = write_forwarder_config(folder, dead, "tcp:8080:interface=127.0.0.1",
                                       {"alpha": {"path_prefix": "/a/", "hosts": ["A.example"]},
                                        "beta": {"path_prefix": "/"}})
        pconf = write_proxy_config(folder, "alpha", dead, "http://127.0.0.1:8000/base")
        fingerprint = keys.fingerprint(keys.load_private_key(folder / "keys" / "alpha.key"))
        expected = {
            fconf: f"{fconf}: ok: forwarder on tcp:8080:interface=127.0.0.1; routes: alpha (/a a.example), beta (/)",
            pconf: f"{pconf}: ok: proxy 'alpha' -> http://127.0.0.1:8000/base, key {fingerprint}",
        }
        for path, line in expected.items():
            child = yield run(self, temp_folder(self), [PPBRIDGE, "check", str(path)])
            self.assertEqual((child.exit_code, child.exit_signal), (0, None), child.describe())
            self.assertEqual([x for x in child.lines[OUT] if x], [line], child.describe())
            self.assertEqual([x for x in child.lines[ERR] if x], [], child.describe())

    @defer.inlineCallbacks
    def test_check_accepts_the_example_configs(self):
        """conf/forwarder.example.toml and conf/proxy.example.toml, copied next to the key files
        they name, pass ``ppbridge check`` (exit 0, one "ok" line each: the forwarder's routes
        intranet and wiki, the proxy intranet calling http://127.0.0.1:8000)."""
        folder = temp_folder(self)
        for name in ("forwarder", "intranet", "wiki"):
            key_pair(folder, name)
        expected = {"forwarder.example.toml": "ok: forwarder on tcp:8080:interface=127.0.0.1:backlog=1024; "
                                              "routes: intranet (/ intranet.example.com), wiki (/wiki)",
                    "proxy.example.toml": "ok: proxy 'intranet' -> http://127.0.0.1:8000, key SHA256:"}
        for name, text in expected.items():
            path = folder / name
            path.write_bytes((CONF / name).read_bytes())
            child = yield run(self, folder, [PPBRIDGE, "check", str(path)])
            self.assertEqual((child.exit_code, child.exit_signal), (0, None), child.describe())
            [line] = [x for x in child.lines[OUT] if x]
            self.assertTrue(line.startswith(f"{path}: {text}"), line)


# --- 11. example configs against the schema ----------------------------------------------------------


_TABLE_LINE = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*$")
_KEY_LINE = re.compile(r"^(?:# ?)?([a-z_]+) = ")


def mentioned_keys(text: str) -> dict[str, set[str]]:
    """Keys set or shown commented out (``# key = ...``) per table header of an example file.
    ``[proxies.NAME]`` tables are gathered under ``proxies.``; an ``[X.access]`` table is key
    ``access`` of ``X`` and its keys are gathered under ``X.access`` (``proxies..access``)."""
    found: dict[str, set[str]] = {}
    table = ""

    def group(name: str) -> str:
        return "proxies." if name.startswith("proxies.") else name

    for line in text.splitlines():
        header = _TABLE_LINE.match(line)
        if header:
            parent, _, leaf = header.group(1).rpartition(".")
            if parent and leaf == "access":
                found.setdefault(group(parent), set()).add("access")
                table = group(parent) + ".access"
            else:
                table = group(header.group(1))
            found.setdefault(table, set())
            continue
        key = _KEY_LINE.match(line)
        if key:
            found.setdefault(table, set()).add(key.group(1))
    return found


class ExampleSchemaTests(TestCase):
    """conf/*.example.toml against ppbridge.config's schema, not a list kept by hand."""

    def check(self, name: str, schema: Any, numbers: dict[str, dict[str, Any]]) -> None:
        text = (CONF / name).read_text()
        mentioned = mentioned_keys(text)
        self.assertNotIn("", mentioned, f"{name}: keys before the first table")
        expected = {(table if keys_ is not None else f"{table}."): set(keys_ if keys_ is not None
                                                                       else config_module._ROUTE_KEYS)
                    for table, keys_ in schema.items()}
        expected.update({f"{table}.access": set(ACCESS_KEYS) for table, keys_ in list(expected.items())
                         if "access" in keys_})  # [forwarder.access], [proxies.NAME.access]
        for table, table_numbers in numbers.items():
            self.assertLessEqual(set(table_numbers), expected[table], f"{table}: numbers not in the schema")
        self.assertEqual(set(mentioned), set(expected), f"{name}: tables")
        for table, wanted in expected.items():
            if table != "proxies..access":  # a route's table shows a few ("same keys as [forwarder.access]")
                self.assertEqual(wanted - mentioned[table], set(), f"{name}: [{table}] keys of the schema missing")
            self.assertEqual(mentioned[table] - wanted, set(), f"{name}: [{table}] keys not in the schema")
        parsed = tomllib.loads(text)  # what is really set is in the schema too (no typo in a real key)
        for table, values in parsed.items():
            for key, value in values.items():
                if schema[table] is None:
                    self.assertLessEqual(set(value), set(config_module._ROUTE_KEYS), f"{name}: [{table}.{key}]")
                else:
                    self.assertIn(key, schema[table], f"{name}: [{table}] {key}")

    def test_forwarder_example_matches_the_schema(self):
        """Every table and key of _FORWARDER_SCHEMA (the [forwarder] numbers, the route keys
        of [proxies.NAME] and every access key in [forwarder.access] included) appears in
        conf/forwarder.example.toml, set or commented out, and every key there, commented or
        not, is in the schema ([proxies.NAME.access] may show only some)."""
        self.check("forwarder.example.toml", config_module._FORWARDER_SCHEMA,
                   {"forwarder": config_module._FORWARDER_NUMBERS})

    def test_proxy_example_matches_the_schema(self):
        """Every table and key of _PROXY_SCHEMA (the [proxy] and [rekey] numbers included)
        appears in conf/proxy.example.toml, set or commented out, and every key there is in
        the schema."""
        self.check("proxy.example.toml", config_module._PROXY_SCHEMA,
                   {"proxy": config_module._PROXY_NUMBERS, "rekey": config_module._REKEY_NUMBERS})

    def test_the_reader_finds_commented_and_misspelt_keys(self):
        """The check can fail: mentioned_keys sees ``# ca_file = ...`` as a [redis] key and
        ``timeuot = 1`` as a key the schema does not have."""
        found = mentioned_keys("[redis]\n# ca_file = \"x\"\nurl = \"redis://h\"\n[forwarder]\ntimeuot = 1\n"
                               "[proxies.a]\nhosts = []\n# Prose: not = a key\n")
        self.assertEqual(found, {"redis": {"ca_file", "url"}, "forwarder": {"timeuot"}, "proxies.": {"hosts"}})
