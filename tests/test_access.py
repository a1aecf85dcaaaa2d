"""Who may come in (issue 13): access policies per route, checked at the forwarder.

The attackers here are internet clients of the forwarder: one without a password, one guessing
passwords, one at an address the route does not take, one forging X-Forwarded-For or the
identity headers a check sets. What each must observe: a refusal (401 with the Basic
challenge, 403, 429 with Retry-After) that cost no bus message (PUBLISH calls counted with
``INFO commandstats`` of the test's own Redis) and reached no upstream.

Integration tests run a real Redis, forwarder, proxy and sample upstream (tests/support.py's
Stack) over loopback, with htpasswd files of real bcrypt hashes made here (cost 4, to be
quick). A second client address is 127.0.0.2 (Linux routes all of 127/8 to lo). The
forwarders announce hourly here, so that no background PUBLISH falls into a count.
Unit tests of the parts (limiter, file parsing, policy order) use no sockets and a Clock.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any, cast

import bcrypt
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent

from ppbridge.access import Grant, Policy
from ppbridge.accesscheck import ALLOW, Allow, Facts
from ppbridge.basicauth import MALFORMED, basic_credentials
from ppbridge.bruteforce import FailureLimiter
from ppbridge.config import load_forwarder_config
from ppbridge.errors import ConfigError, Forbidden, RequestError, Unauthorized
from ppbridge.htpasswd import RECHECK, HtpasswdError, HtpasswdFile, parse
from ppbridge.httpheaders import believed_client
from ppbridge.pattern import pattern_bytes
from ppbridge.scaffold import write_forwarder_config
from tests.redisclient import client_for
from tests.support import Client, Stack, error_of, key_pair, poll, temp_folder
from tests.test_edge import echoed_headers
from tests.test_streaming import PatternBody, raw_exchange, split_response

QUIET = {"announce_interval": 3600.0}  # no announcement or heartbeat PUBLISH during a test
WAIT = 15


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file of bcrypt hashes (what ``htpasswd -B`` writes), ``{user: password}``."""
    path.write_text("".join(f"{user}:{hashed(password)}\n" for user, password in users.items()))
    return path


def basic(user: str, password: str) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Basic " + base64.b64encode(f"{user}:{password}".encode())]}


def publishes(stack: Stack) -> int:
    """PUBLISH calls the stack's Redis has served so far (``INFO commandstats``)."""
    redis = client_for(stack.redis)
    try:
        stats = redis.info("commandstats").get("cmdstat_publish", "calls=0")
    finally:
        redis.close()
    return int(dict(part.split("=") for part in stats.split(","))["calls"])


@defer.inlineCallbacks
def settled_publishes(stack: Stack):  # type: ignore[no-untyped-def]
    """The PUBLISH count once the stack's start-up messages are over: unchanged for 1.5 s (a
    new instance makes the forwarder announce again within a second, which the proxy answers
    with a heartbeat and the forwarder acknowledges; then, with QUIET, nothing for an hour)."""
    last, still = publishes(stack), 0.0
    while still < 1.5:
        yield deferLater(reactor, 0.25, lambda: None)
        now = publishes(stack)
        still, last = (still + 0.25 if now == last else 0.0), now
    return last


def refused_count(stack: Stack, reason: str, proxy: str = "alpha") -> float:
    value = stack.forwarder.metrics.registry.get_sample_value(
        "ppbridge_access_refused_total", {"proxy": proxy, "reason": reason})
    return value or 0.0


class ClientFrom(Client):
    """A plain client whose connections come from ``address`` (e.g. 127.0.0.2)."""

    def __init__(self, case: TestCase, address: str) -> None:
        super().__init__(case)
        self.agent = Agent(reactor, pool=self.pool, bindAddress=(address, 0))


@defer.inlineCallbacks
def password_stack(case: TestCase, **access: Any):  # type: ignore[no-untyped-def]
    """A stack whose route alpha (every path) needs alice's password ``right``, from a file in
    the stack's folder; ``access`` adds keys to [proxies.alpha.access]. (stack, file path)."""
    stack = Stack(case)
    path = write_htpasswd(stack.folder / "users.htpasswd", {"alice": "right", "bob": "bobs"})
    table = {"access.htpasswd_file": str(path), **{f"access.{k}": v for k, v in access.items()}}
    yield stack.start(routes={"alpha": {"path_prefix": "/", **table}}, forwarder=QUIET)
    return stack, path


class BasicLogIn(TestCase):
    """htpasswd_file on route alpha: alice / right."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def, override]
        self.stack, self.path = yield password_stack(self)
        self.client = Client(self)

    @defer.inlineCallbacks
    def test_right_password_is_200_and_authorization_stays_behind(self):  # type: ignore[no-untyped-def]
        """alice with her password gets the upstream's 200 /echo; the upstream saw no
        Authorization header (pass_authorization is false by default)."""
        response, body = yield self.client.fetch(b"GET", self.stack.url + "/echo", basic("alice", "right"))
        self.assertEqual((response.code, error_of(response)), (200, None), body)
        self.assertNotIn("authorization", echoed_headers(body))

    @defer.inlineCallbacks
    def test_wrong_and_no_password_are_401_with_challenge_and_publish_nothing(self):  # type: ignore[no-untyped-def]
        """No Authorization, a wrong password, an unknown user and a Bearer token each get 401
        unauthorized with ``WWW-Authenticate: Basic realm="ppbridge", charset="UTF-8"``; the
        Redis PUBLISH count does not move over all four, and the upstream saw none of them.
        The control: alice's right password afterwards moves it."""
        before = yield settled_publishes(self.stack)
        attempts = [{}, basic("alice", "wrong"), basic("mallory", "right"), {b"authorization": [b"Bearer abc"]}]
        for headers in attempts:
            response, body = yield self.client.fetch(b"GET", self.stack.url + "/echo", headers)
            self.assertEqual((response.code, error_of(response)), (401, b"unauthorized"), (headers, body))
            self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"),
                             [b'Basic realm="ppbridge", charset="UTF-8"'])
        self.assertEqual(publishes(self.stack), before)
        self.assertEqual(self.stack.app.hits["/echo"], 0)
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/echo", basic("alice", "right"))
        self.assertEqual(response.code, 200)
        self.assertGreater(publishes(self.stack), before)

    @defer.inlineCallbacks
    def test_refusals_are_counted_per_route_and_reason(self):  # type: ignore[no-untyped-def]
        """One request without credentials and two wrong passwords: the access metric counts
        1 no-credentials and 2 bad-credentials for proxy alpha, and the request metric 3
        answers 401 with cause unauthorized."""
        for headers in ({}, basic("alice", "x"), basic("alice", "y")):
            yield self.client.fetch(b"GET", self.stack.url + "/", headers)
        self.assertEqual(refused_count(self.stack, "no-credentials"), 1)
        self.assertEqual(refused_count(self.stack, "bad-credentials"), 2)
        requests = self.stack.forwarder.metrics.registry.get_sample_value(
            "ppbridge_requests_total", {"proxy": "alpha", "code": "401", "cause": "unauthorized"})
        self.assertEqual(requests, 3)

    @defer.inlineCallbacks
    def test_refusal_is_logged_without_the_credential(self):  # type: ignore[no-untyped-def]
        """A wrong password is logged as a refusal naming the proxy, the reason and the user,
        and no log event holds the password or the base64 credential."""
        events: list[str] = []

        def observe(event: Any) -> None:
            events.append(formatEvent(event) or "")

        watcher = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(watcher)
        self.addCleanup(globalLogPublisher.removeObserver, watcher)
        headers = basic("alice", "hunter2-secret")
        yield self.client.fetch(b"GET", self.stack.url + "/echo", headers)
        token = headers[b"authorization"][0].split(b" ")[1].decode()
        self.assertEqual([e for e in events if "hunter2-secret" in e or token in e], [])
        refusals = [e for e in events if e.startswith("refused GET /echo for proxy alpha")]
        self.assertEqual(len(refusals), 1, events)
        self.assertIn("bad-credentials", refusals[0])
        self.assertIn("alice", refusals[0])

    @defer.inlineCallbacks
    def test_file_changed_on_disk_is_honoured_without_restart(self):  # type: ignore[no-untyped-def]
        """alice's password changed in the file: within a few seconds her new password gets
        200 and the old one 401, with the same forwarder."""
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/", basic("alice", "right"))
        self.assertEqual(response.code, 200)
        write_htpasswd(self.path, {"alice": "new-right"})
        codes: list[int] = []
        for _ in range(50):  # the file is looked at once a second: try for up to ~10 s
            response, _ = yield self.client.fetch(b"GET", self.stack.url + "/", basic("alice", "new-right"))
            codes.append(response.code)
            if response.code == 200:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(codes[-1], 200, codes)
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/", basic("alice", "right"))
        self.assertEqual(response.code, 401)

    @defer.inlineCallbacks
    def test_uploads_are_held_while_the_password_is_checked(self):  # type: ignore[no-untyped-def]
        """The password is checked off the reactor thread, so the request waits for it: a
        10 KiB and a 300 KiB upload (one held in memory, one whose connection is paused) and a
        200 KiB chunked one reach the upstream whole (the SHA-256 and length /upload saw are
        those of the bytes sent)."""
        for size, chunked in ((10 * 1024, False), (300 * 1024, False), (200 * 1024, True)):
            expected = hashlib.sha256(b"".join(pattern_bytes(3, size))).hexdigest()
            response, answer = yield self.client.fetch(b"POST", self.stack.url + "/upload", basic("alice", "right"),
                                                       PatternBody(3, size, chunked=chunked))
            self.assertEqual(response.code, 200, answer)
            self.assertEqual(json.loads(answer), {"body_sha256": expected, "body_length": size})

    @defer.inlineCallbacks
    def test_large_upload_without_password_is_refused_before_its_body(self):  # type: ignore[no-untyped-def]
        """A POST declaring 10 MiB with no credentials, body withheld, is answered 401 with the
        challenge at once (not after the body) and the connection closes; nothing published."""
        before = yield settled_publishes(self.stack)
        request = b"POST /upload HTTP/1.1\r\nHost: bridge.test\r\nContent-Length: %d\r\n\r\n" % (10 << 20)
        proto = yield raw_exchange(self, self.stack.url, request)
        raw = yield proto.closed.addTimeout(WAIT, reactor)
        status, headers, _ = split_response(raw)
        self.assertTrue(status.startswith(b"HTTP/1.1 401"), raw[:300])
        self.assertEqual(headers.get(b"www-authenticate"), [b'Basic realm="ppbridge", charset="UTF-8"'])
        self.assertEqual(publishes(self.stack), before)


class PassAuthorization(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_pass_authorization_forwards_the_header(self):  # type: ignore[no-untyped-def]
        """With pass_authorization = true and the realm "Team wiki", the upstream sees alice's
        Authorization header as she sent it, and a refusal's challenge names that realm."""
        stack, _ = yield password_stack(self, pass_authorization=True, realm="Team wiki")
        client = Client(self)
        headers = basic("alice", "right")
        response, body = yield client.fetch(b"GET", stack.url + "/echo", headers)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(echoed_headers(body)["authorization"], [headers[b"authorization"][0].decode()])
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"),
                         [b'Basic realm="Team wiki", charset="UTF-8"'])


class BruteForce(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_fifty_wrong_passwords_get_429_after_the_limit(self):  # type: ignore[no-untyped-def]
        """max_failures 10 (over an hour): of 50 wrong passwords from 127.0.0.1, the first 10
        are 401 and the other 40 are 429 too-many-attempts with a Retry-After of at least one
        second; then alice's right password from 127.0.0.2 gets 200 while from 127.0.0.1 it
        gets 429. The access metric counts 41 too-many-attempts (the 40 and that last one);
        none of the 50 was published."""
        stack, _ = yield password_stack(self, max_failures=10, failure_window=3600.0)
        client, other = Client(self), ClientFrom(self, "127.0.0.2")
        before = yield settled_publishes(stack)
        codes, retry = [], []
        for i in range(50):
            response, _ = yield client.fetch(b"GET", stack.url + "/", basic("alice", f"guess{i}"))
            codes.append(response.code)
            retry += response.headers.getRawHeaders(b"retry-after", [])
        self.assertEqual(codes, [401] * 10 + [429] * 40)
        self.assertEqual(len(retry), 40)
        self.assertTrue(all(int(value) >= 1 for value in retry), retry)
        self.assertEqual(publishes(stack), before)
        response, body = yield other.fetch(b"GET", stack.url + "/echo", basic("alice", "right"))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(echoed_headers(body)["x-forwarded-for"], ["127.0.0.2"])
        response, _ = yield client.fetch(b"GET", stack.url + "/echo", basic("alice", "right"))
        self.assertEqual((response.code, error_of(response)), (429, b"too-many-attempts"))
        self.assertEqual(refused_count(stack, "too-many-attempts"), 41)


class Addresses(TestCase):
    """allow_cidrs / deny_cidrs, from 127.0.0.1 and 127.0.0.2."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, forwarder: dict[str, Any] | None = None, **routes: dict[str, Any]):  # type: ignore[no-untyped-def]
        stack = yield Stack(self).start(routes=routes, forwarder={**QUIET, **(forwarder or {})})
        return stack

    @defer.inlineCallbacks
    def test_allowed_and_denied_from_127_0_0_1(self):  # type: ignore[no-untyped-def]
        """From 127.0.0.1: /in (allow 127.0.0.0/8) is 200; /out (allow 10.0.0.0/8 only) and
        /deny (deny 127.0.0.1/32) are 403 forbidden, with no PUBLISH for either; 127.0.0.2
        passes /deny."""
        stack = yield self.start(
            inner={"path_prefix": "/in", "access.allow_cidrs": ["127.0.0.0/8"]},
            outer={"path_prefix": "/out", "access.allow_cidrs": ["10.0.0.0/8"]},
            denied={"path_prefix": "/deny", "access.deny_cidrs": ["127.0.0.1/32"]})
        client = Client(self)
        response, _ = yield client.fetch(b"GET", stack.url + "/in/echo")
        self.assertEqual(response.code, 200)
        before = yield settled_publishes(stack)
        for path in ("/out/echo", "/deny/echo"):
            response, _ = yield client.fetch(b"GET", stack.url + path)
            self.assertEqual((response.code, error_of(response)), (403, b"forbidden"), path)
        self.assertEqual(publishes(stack), before)
        self.assertEqual(refused_count(stack, "address-not-allowed", "outer"), 1)
        self.assertEqual(refused_count(stack, "address-denied", "denied"), 1)
        response, _ = yield ClientFrom(self, "127.0.0.2").fetch(b"GET", stack.url + "/deny/echo")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_forwarded_for_is_believed_only_from_trusted_proxies(self):  # type: ignore[no-untyped-def]
        """trusted_proxies 127.0.0.1 and allow_cidrs 198.51.100.0/24: from 127.0.0.1 with
        X-Forwarded-For 198.51.100.7 it is 200, with 203.0.113.9 403; from 127.0.0.2 (not a
        trusted proxy) X-Forwarded-For 198.51.100.7 is not believed: 403."""
        stack = yield self.start({"trusted_proxies": ["127.0.0.1/32"]},
                                 alpha={"path_prefix": "/", "access.allow_cidrs": ["198.51.100.0/24"]})

        def xff(address: str) -> dict[bytes, list[bytes]]:
            return {b"x-forwarded-for": [address.encode()]}

        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo", xff("198.51.100.7"))
        self.assertEqual(response.code, 200)
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo", xff("203.0.113.9"))
        self.assertEqual(response.code, 403)
        response, _ = yield ClientFrom(self, "127.0.0.2").fetch(b"GET", stack.url + "/echo", xff("198.51.100.7"))
        self.assertEqual(response.code, 403)

    @defer.inlineCallbacks
    def test_default_applies_where_a_route_has_no_table(self):  # type: ignore[no-untyped-def]
        """[forwarder.access] allow_cidrs 10.0.0.0/8 refuses 127.0.0.1 on /a (no table of its
        own: 403), while /b, whose own table names no mechanism, is open (200)."""
        stack = yield self.start({"access.allow_cidrs": ["10.0.0.0/8"]},
                                 a={"path_prefix": "/a"}, b={"path_prefix": "/b", "access.pass_authorization": False})
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/a/echo")
        self.assertEqual(response.code, 403)
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/b/echo")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_reload_applies_a_new_policy(self):  # type: ignore[no-untyped-def]
        """A forwarder started open gets, by reload (SIGHUP's path), deny_cidrs 127.0.0.0/8 on
        alpha: the next request is 403."""
        stack = yield self.start(alpha={"path_prefix": "/"})
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 200)
        path = stack.forwarder_config({"alpha": {"path_prefix": "/", "access.deny_cidrs": ["127.0.0.0/8"]}}, QUIET)
        stack.forwarder.reload(load_forwarder_config(path))
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/echo")
        self.assertEqual(response.code, 403)


class Gate:
    """An asynchronous check the test decides by hand: each request's Deferred waits in
    ``waiting`` until the test fires it; ``cancelled`` counts those cancelled."""

    name = "gate"
    strips = frozenset((b"x-auth-user",))

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.cancelled = 0

    def check(self, facts: Facts) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.waiting.append(d)
        return d


class AsynchronousCheck(TestCase):
    """The framework's wait for a check that answers later (what forward_auth does)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def, override]
        self.stack = yield Stack(self).start(forwarder={**QUIET, "request_timeout": 3.0})
        self.gate = Gate()
        self.stack.forwarder.access.policies["alpha"] = Policy("alpha", [self.gate])

    @defer.inlineCallbacks
    def test_upload_waits_for_the_decision_then_streams_whole(self):  # type: ignore[no-untyped-def]
        """A 300 KiB upload waits, nothing published, until the check allows it with
        X-Auth-User alice; then the upstream gets the whole body (its SHA-256) and the header
        alice only (the client's forged X-Auth-User mallory removed)."""
        data = bytes(range(256)) * 1200
        before = yield settled_publishes(self.stack)
        answer = Client(self).fetch(b"POST", self.stack.url + "/echo", {b"x-auth-user": [b"mallory"]}, data)
        yield poll(lambda: self.gate.waiting, WAIT, "the check was asked")
        self.assertEqual(publishes(self.stack), before)
        self.gate.waiting[0].callback(Allow(((b"X-Auth-User", b"alice"),)))
        response, body = yield answer
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["body_sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(echoed_headers(body)["x-auth-user"], ["alice"])

    @defer.inlineCallbacks
    def test_refusal_after_the_wait_publishes_nothing(self):  # type: ignore[no-untyped-def]
        """A small POST the check refuses later (403) is answered 403 forbidden; no PUBLISH."""
        before = yield settled_publishes(self.stack)
        answer = Client(self).fetch(b"POST", self.stack.url + "/echo", body=b"x" * 1000)
        yield poll(lambda: self.gate.waiting, WAIT, "the check was asked")
        self.gate.waiting[0].callback(Forbidden("test"))
        response, _ = yield answer
        self.assertEqual((response.code, error_of(response)), (403, b"forbidden"))
        self.assertEqual(publishes(self.stack), before)

    @defer.inlineCallbacks
    def test_no_decision_within_request_timeout_is_504(self):  # type: ignore[no-untyped-def]
        """A check that never answers: 504 timeout after request_timeout (3 s), and the
        check's Deferred was cancelled."""
        response, _ = yield Client(self).fetch(b"GET", self.stack.url + "/echo").addTimeout(WAIT, reactor)
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))
        self.assertEqual(self.gate.cancelled, 1)

    @defer.inlineCallbacks
    def test_client_leaving_cancels_the_check(self):  # type: ignore[no-untyped-def]
        """A client that closes its connection while the check waits: the check's Deferred is
        cancelled and the request counted as 499 client-gone for alpha."""
        proto = yield raw_exchange(self, self.stack.url, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        yield poll(lambda: self.gate.waiting, WAIT, "the check was asked")
        proto.transport.loseConnection()
        yield poll(lambda: self.gate.cancelled, WAIT, "the check was cancelled")
        count = self.stack.forwarder.metrics.registry.get_sample_value(
            "ppbridge_requests_total", {"proxy": "alpha", "code": "499", "cause": "client-gone"})
        self.assertEqual(count, 1)


class WebSocketUpgrade(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_upgrade_requests_are_checked(self):  # type: ignore[no-untyped-def]
        """A WebSocket handshake to a route with htpasswd_file: without credentials it is
        refused 401 (no PUBLISH); with alice's password the connection opens and echoes."""
        from websockets.exceptions import InvalidStatus

        from tests.wsupport import WebSocketClient, start_upstream, websocket_stack, ws_url

        upstream = start_upstream(self)
        folder = temp_folder(self)
        path = write_htpasswd(folder / "users", {"alice": "right"})
        stack = yield websocket_stack(self, upstream, routes={"alpha": {"path_prefix": "/",
                                                                       "access.htpasswd_file": str(path)}},
                                      forwarder=QUIET)
        client = WebSocketClient(self)
        before = yield settled_publishes(stack)

        def echo(ws: Any) -> Any:
            ws.send("hello")
            return ws.recv(timeout=WAIT)

        refused = yield self.assertFailure(client.session(ws_url(stack.url, "/echo"), echo), InvalidStatus)
        self.assertEqual(refused.response.status_code, 401)
        self.assertEqual(publishes(stack), before)
        auth = basic("alice", "right")[b"authorization"][0].decode()
        got = yield client.session(ws_url(stack.url, "/echo"), echo, additional_headers={"Authorization": auth})
        self.assertEqual(got, "hello")


class Config(TestCase):
    """[forwarder.access] and [proxies.NAME.access] errors: one line naming file, key, problem."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")

    def load(self, route: dict[str, Any]) -> Any:
        path = write_forwarder_config(self.folder, "redis://127.0.0.1:6379/0", "tcp:0",
                                      {"alpha": {"path_prefix": "/", **route}})
        return load_forwarder_config(path), path

    def test_non_bcrypt_hash_is_a_config_error_naming_file_key_and_problem(self) -> None:
        """An htpasswd file whose second user has an Apache MD5 ($apr1$) hash: ConfigError
        naming the config file, proxies.alpha.access.htpasswd_file, the htpasswd file, line 2,
        user bob, the kind of hash and that only bcrypt is taken."""
        users = self.folder / "users.htpasswd"
        users.write_text(f"alice:{hashed('a')}\nbob:$apr1$abcdefgh$0123456789012345678901\n")
        config = self.folder / "forwarder.toml"
        with self.assertRaises(ConfigError) as caught:
            self.load({"access.htpasswd_file": str(users)})
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{config}: proxies.alpha.access.htpasswd_file: {users}: line 2 "
                                           "(user 'bob'): Apache MD5"), message)
        self.assertIn("bcrypt only", message)

    def test_other_access_errors(self) -> None:
        """A misspelt key (with a suggestion), a missing file, a bad network and a realm with a
        quote each give one line naming its key."""
        cases: list[tuple[dict[str, Any], str]] = [
            ({"access.allow_cidr": ["10.0.0.0/8"]}, "proxies.alpha.access.allow_cidr: unknown key (did you mean "
                                                    "allow_cidrs?)"),
            ({"access.htpasswd_file": "nope"}, "proxies.alpha.access.htpasswd_file: "),
            ({"access.deny_cidrs": ["10.0.0.300/8"]}, "proxies.alpha.access.deny_cidrs: item 1: not an IPv4"),
            ({"access.realm": 'a"b'}, "proxies.alpha.access.realm: must be"),
            ({"access.max_failures": 0}, "proxies.alpha.access.max_failures: must be between 1"),
        ]
        for route, expected in cases:
            with self.assertRaises(ConfigError) as caught:
                self.load(route)
            self.assertIn(expected, str(caught.exception))

    def test_settings_read(self) -> None:
        """A full table is read as written: networks, absolute file path, realm, flags, numbers."""
        users = write_htpasswd(self.folder / "users", {"alice": "a"})
        settings, _ = self.load({"access.allow_cidrs": ["10.0.0.0/8"], "access.deny_cidrs": ["10.9.0.0/16"],
                                 "access.htpasswd_file": "users", "access.realm": "Wiki",
                                 "access.pass_authorization": True, "access.max_failures": 5,
                                 "access.failure_window": 30})
        access = settings.proxies[0].access
        self.assertEqual([str(n) for n in access.allow_cidrs], ["10.0.0.0/8"])
        self.assertEqual([str(n) for n in access.deny_cidrs], ["10.9.0.0/16"])
        self.assertEqual(access.htpasswd_file, users)
        self.assertEqual((access.realm, access.pass_authorization, access.max_failures, access.failure_window),
                         ("Wiki", True, 5, 30.0))
        self.assertIsNone(settings.access)


# --- the parts, without sockets ---------------------------------------------------------------


class LimiterUnit(TestCase):
    def test_budget_refund_refill_and_retry_after(self) -> None:
        """3 failures per 60 s: three attempts pass, the fourth waits 20 s; a refunded attempt
        (right password) does not count; 20 s later one token is back."""
        limiter = FailureLimiter(3, 60.0)
        self.assertEqual([limiter.take("10.0.0.1", 0.0) for _ in range(3)], [None] * 3)
        self.assertEqual(limiter.take("10.0.0.1", 0.0), 20.0)
        limiter.refund("10.0.0.1")
        self.assertIsNone(limiter.take("10.0.0.1", 0.0))
        self.assertEqual(limiter.take("10.0.0.2", 0.0), None)  # another address is untouched
        self.assertIsNone(limiter.take("10.0.0.1", 20.0))
        self.assertEqual(limiter.take("10.0.0.1", 20.0), 20.0)

    def test_memory_is_bounded_and_ipv6_counts_per_64(self) -> None:
        """With room for 100 addresses, 1000 addresses leave 100 entries; two addresses of one
        IPv6 /64 share a budget, and an IPv4-mapped address counts as its IPv4."""
        limiter = FailureLimiter(1, 60.0, max_clients=100)
        for i in range(1000):
            limiter.take(f"10.0.{i // 256}.{i % 256}", 0.0)
        self.assertEqual(len(limiter), 100)
        self.assertIsNone(limiter.take("2001:db8::1", 0.0))
        self.assertIsNotNone(limiter.take("2001:db8::2", 0.0))
        self.assertIsNone(limiter.take("192.0.2.1", 0.0))
        self.assertIsNotNone(limiter.take("::ffff:192.0.2.1", 0.0))


class PartsUnit(TestCase):
    def test_believed_client(self) -> None:
        """Untrusted peer: itself, whatever X-Forwarded-For says; trusted peer: the rightmost
        untrusted entry; garbage stops the walk at the hop that added it."""
        trusted = [ipaddress.ip_network("10.0.0.0/8")]
        xff = [(b"X-Forwarded-For", b"198.51.100.1, 203.0.113.5, 10.0.0.7")]
        self.assertEqual(believed_client(b"192.0.2.9", xff, trusted), b"192.0.2.9")
        self.assertEqual(believed_client(b"10.0.0.1", xff, trusted), b"203.0.113.5")
        self.assertEqual(believed_client(b"10.0.0.1", [(b"X-Forwarded-For", b"junk, 10.0.0.3")], trusted),
                         b"10.0.0.3")
        self.assertEqual(believed_client(b"10.0.0.1", [], trusted), b"10.0.0.1")

    def test_htpasswd_parse(self) -> None:
        """Comments and blank lines are skipped; each kind of other hash is named; a duplicate
        user, a line without a colon and an empty file are errors."""
        good = hashed("x")
        self.assertEqual(parse(f"# users\n\nalice:{good}\r\n".encode()), {b"alice": good.encode()})
        for line, kind in (("{SHA}abc", "SHA-1"), ("$6$salt$hash", "SHA-512-crypt"), ("abcdefghijklm", "DES"),
                           ("secret", "plain text"), ("$2y$10$short", "malformed bcrypt")):
            with self.assertRaises(HtpasswdError) as caught:
                parse(f"bob:{line}\n".encode())
            self.assertIn(kind, str(caught.exception))
        for text, problem in ((f"a:{good}\na:{good}\n", "listed on line 1"), ("nocolon\n", "expected user:hash"),
                              ("# nobody\n", "holds no user")):
            with self.assertRaises(HtpasswdError) as caught:
                parse(text.encode())
            self.assertIn(problem, str(caught.exception))

    def test_htpasswd_file_rereads_and_keeps_the_last_good_version(self) -> None:
        """Changes are seen only once RECHECK seconds passed; a broken version leaves the last
        good one in force until a good one replaces it."""
        clock = Clock()
        path = write_htpasswd(temp_folder(self) / "users", {"alice": "a"})
        users = HtpasswdFile(path, clock)
        write_htpasswd(path, {"bob": "b"})
        self.assertEqual(list(users.current()), [b"alice"])
        clock.advance(RECHECK)
        self.assertEqual(list(users.current()), [b"bob"])
        path.write_text("carol:$apr1$x$y\n")
        clock.advance(RECHECK)
        self.assertEqual(list(users.current()), [b"bob"])
        write_htpasswd(path, {"dave": "d"})
        clock.advance(RECHECK)
        self.assertEqual((list(users.current()), users.generation), ([b"dave"], 2))

    def test_basic_credentials(self) -> None:
        """Basic parsing: other schemes are no credentials; bad base64, no colon, two headers
        are malformed; the password may hold colons."""
        token = base64.b64encode(b"al:ice:pw").decode()
        self.assertEqual(basic_credentials([f"basic {token}".encode()]), (b"al", b"ice:pw"))
        self.assertIsNone(basic_credentials([]))
        self.assertIsNone(basic_credentials([b"Bearer x"]))
        for values in ([b"Basic !!!"], [b"Basic " + base64.b64encode(b"nocolon")], [b"Basic eDp5", b"Basic eDp5"]):
            self.assertIs(basic_credentials(values), MALFORMED)

    def test_policy_order_first_refusal_and_deferred_continuation(self) -> None:
        """Checks run in order: a synchronous refusal stops the rest; a Deferred check's Allow
        goes on to the next check; added headers replace the client's (and stripped names go)."""
        ran: list[str] = []

        class Step:
            strips: frozenset[bytes] = frozenset((b"authorization",))

            def __init__(self, name: str, verdict: Any) -> None:
                self.name, self.verdict = name, verdict

            def check(self, facts: Facts) -> Any:
                ran.append(self.name)
                return self.verdict

        facts = Facts("alpha", "10.0.0.1", "10.0.0.1", b"GET", b"/", None, [], False)
        refusal = Unauthorized("no-credentials")
        self.assertIs(Policy("alpha", [Step("a", ALLOW), Step("b", refusal), Step("c", ALLOW)]).decide(facts),
                      refusal)
        self.assertEqual(ran, ["a", "b"])
        later: Deferred[Any] = Deferred()
        decided = Policy("alpha", [Step("d", later), Step("e", Allow(((b"X-User", b"a"),)))]).decide(facts)
        assert isinstance(decided, Deferred)
        self.assertEqual(ran, ["a", "b", "d"])
        later.callback(ALLOW)
        grant = self.successResultOf(decided)
        assert isinstance(grant, Grant)
        self.assertEqual(grant.rewrite([(b"Authorization", b"x"), (b"x-user", b"forged"), (b"Accept", b"*/*")]),
                         [(b"Accept", b"*/*"), (b"X-User", b"a")])
        self.assertIsInstance(Policy("alpha", [Step("f", RequestError())]).decide(facts), RequestError)
