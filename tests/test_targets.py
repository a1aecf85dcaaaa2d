"""Tests for ppbridge.targets (which request paths stay under the service's base path) and the
proxy's own use of it: a target that climbs is never called, whoever sealed the request."""

from __future__ import annotations

import random
import time
from dataclasses import fields, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ppbridge.errors import RESET_CODES, BadTarget, reset_code
from ppbridge.proxy import ProxyService
from ppbridge import targets
from ppbridge.targets import MAX_DECODE_ROUNDS, confined
from ppbridge.wire import FLAG_END, MsgType, RequestHead, decode_reset, unpack_header
from tests.test_negotiation import Bridge, proxy_settings

# Each of these, appended to a base path such as /app, reaches outside /app on a server that
# decodes and removes dot-segments, merges slashes or reads "\" as "/".
CLIMBING = [
    b"/../admin/secret",
    b"/..",
    b"/.",
    b"/a/../../admin",
    b"/a/./b",
    b"/a/.",
    b"/a/..?q=1",
    b"/%2e%2e/admin",
    b"/%2E%2E/admin",
    b"/%2e./admin",
    b"/.%2E/admin",
    b"/%2e/admin",
    b"/..%2fadmin",
    b"/..%2Fadmin",
    b"/%2e%2e%2fadmin",
    b"/x%2f..%2f..%2fadmin",
    b"/..%5cadmin",
    b"/..%5Cadmin",
    b"/..\\admin",
    b"/a\\..\\..\\admin",
    b"/%252e%252e/admin",
    b"/%252E%252E%252Fadmin",
    b"/..%252fadmin",
    b"/%25252e%25252e/admin",
    b"/..;/admin",
    b"/..;jsessionid=1/admin",
    b"/%2e%2e;x/admin",
    b"/%c0%ae%c0%ae/admin",
    b"/..%c0%afadmin",
    b"/%e0%80%ae%e0%80%ae/admin",
    b"//evil.example/x",
    b"//",
    b"/a//b",
    b"/a///",
    b"/a%2f%2fb",
    b"/a%2F/",
    b"/a/%2f",
    b"/\\\\evil.example/x",
    b"/%5c%5cevil.example/x",
    b"/;/b",
    b"/...",
    b"/.../admin",
    b"/..%20/admin",
    b"/.. /admin",
    b"/..%09/admin",
    b"/.%20./admin",
    b"/..%00/admin",
    b"/x%00y",
    b"/%2500",
]

# Legitimate paths that cannot climb, with encoded slashes, dots in names, trailing slashes.
CONFINED = [
    b"/",
    b"/x",
    b"/a/b/c",
    b"/a/",
    b"/api/v4/projects/group%2Fproject",
    b"/api/v4/projects/group%2fsub%2Fproject/repository/files/src%2Fmain.c/raw?ref=main",
    b"/a..b/file.tar.gz",
    b"/..a/b.",
    b"/.well-known/acme-challenge/token",
    b"/a/.hidden",
    b"/v1.2/..data",
    b"/files/100%25.txt",
    b"/files/a%20b",
    b"/a;jsessionid=1/b",
    b"/a/b;v=2",
    b"/a/;x",
    b"/search?q=../../etc/passwd",
    b"/search?next=//evil.example&p=%2e%2e",
    b"/?../..",
]


class ConfinedTests(TestCase):
    """Unit vectors for confined(): climbing paths rejected, legitimate ones kept."""

    def test_climbing_paths_rejected(self) -> None:
        """Every path with a dot-segment or a non-trailing empty segment, plain, percent-encoded
        in any case, double or triple encoded, with "\\" for "/", with ";params" on the
        dot-segment, as overlong UTF-8, or as dots with blanks that Windows trims, and every
        path with a NUL, is not confined."""
        for target in CLIMBING:
            self.assertFalse(confined(target), target)

    def test_legitimate_paths_pass(self) -> None:
        """Paths that cannot climb are confined: encoded slashes inside a segment (GitLab's
        group%2Fproject), dots inside names, a single trailing slash, escaped percent signs,
        path parameters on ordinary segments, and anything at all in the query."""
        for target in CONFINED:
            self.assertTrue(confined(target), target)

    def test_not_origin_form_rejected(self) -> None:
        """A target that does not start with "/" (which, appended to a base URL, could change its
        authority, e.g. "@evil.example/x") is not confined."""
        for target in (b"", b"@evil.example/x", b"x/y", b"?q=1", b"*", b"http://evil.example/x", b"%2f%2e%2e"):
            self.assertFalse(confined(target), target)

    def test_endless_encoding_rejected(self) -> None:
        """A path that still decodes to something new after MAX_DECODE_ROUNDS percent-decodings
        is refused rather than guessed about, even when it would end harmless ("/aA"); one
        that settles within them is judged on what it decodes to."""
        def encoded(times: int) -> bytes:  # "A" percent-encoded ``times`` times
            return b"/a%" + b"25" * (times - 1) + b"41"

        self.assertTrue(confined(encoded(MAX_DECODE_ROUNDS)))
        self.assertFalse(confined(encoded(MAX_DECODE_ROUNDS + 1)))
        self.assertTrue(confined(b"/a%2525b"))  # "/a%25b", then "/a%b", then stable

    def test_only_the_path_before_the_first_question_mark_is_checked(self) -> None:
        """An encoded question mark is part of the path, so dot-segments after it still count;
        a literal one starts the query, which is not checked."""
        self.assertFalse(confined(b"/a%3F/../b"))
        self.assertTrue(confined(b"/a?/../b"))

    def test_shortcut_never_admits_more_than_the_walk(self) -> None:
        """The regular expression that lets common paths through at once matches no climbing
        path, and on 200,000 random paths built from the bytes that matter (dots, blanks,
        slashes, backslashes, "%", ";", NUL, overlong UTF-8, hex digits) it never admits one the
        full walk refuses; paths it does not match are judged by the walk alone."""
        for target in CLIMBING:
            self.assertIsNone(targets._PLAIN.fullmatch(target.split(b"?", 1)[0]), target)
        alphabet = b"/./ \t%;\\\x00\xc0\xae\xe0\x80ab2e5cfAF"
        rnd = random.Random(12)
        admitted = 0
        for _ in range(200_000):
            path = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 14)))
            if targets._PLAIN.fullmatch(path) is not None:
                admitted += 1
                self.assertTrue(targets._walk(path), path)
            self.assertEqual(confined(path), targets._walk(path), path)
        self.assertGreater(admitted, 1000)  # the shortcut is exercised

    def test_shortcut_is_linear(self) -> None:
        """Long runs of dots or blanks that the shortcut finally refuses cost no backtracking."""
        for path in (b"/" + b"." * 200_000 + b"%", b"/a" + b" " * 200_000 + b"\\", b"/" + b". " * 100_000 + b"/"):
            started = time.perf_counter()
            targets._PLAIN.fullmatch(path)
            self.assertLess(time.perf_counter() - started, 0.5)


class BadTargetErrorTests(TestCase):
    """The error a refused target gives, on the wire and to the client."""

    def test_status_cause_and_reset_code(self) -> None:
        """BadTarget is a 400 bad-target, travels in a RESET as code 7, and code 7 maps back to it."""
        self.assertEqual((BadTarget.status, BadTarget.cause), (400, "bad-target"))
        self.assertIn("leaves the service's base path", BadTarget().detail)
        self.assertEqual(reset_code(BadTarget), 7)
        self.assertIs(RESET_CODES[7], BadTarget)


@implementer(IAgent)
class RecordingAgent:
    """An upstream client that records every URL it is asked for and never answers."""

    def __init__(self) -> None:
        self.urls: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.urls.append(uri)
        return Deferred()


class ProxyRefusesClimbingTargets(TestCase):
    """The story: the forwarder's check is bypassed (an older forwarder, a bug, or anyone who
    got hold of the forwarder's session key) and a sealed REQ_HEAD asks the proxy, whose
    upstream is http://intranet.example:8000/app, for /../admin. The proxy must not call it:
    it answers RESET bad-target and the upstream agent is never asked for anything."""

    def setUp(self) -> None:
        self.bridge = Bridge(self)
        self.forwarder = self.bridge.forwarder()
        self.agent = RecordingAgent()
        settings = replace(proxy_settings(), upstream="http://intranet.example:8000/app")
        self.proxy = ProxyService(settings, self.bridge.broker.client(), self.bridge.clock,
                                  reactor=self.bridge.clock, agent=self.agent)
        self.proxy.startService()
        self.addCleanup(lambda: self.proxy.stopService() if self.proxy.running else None)
        [self.entry] = self.forwarder.candidates("alpha")
        self.resets: dict[bytes, list[tuple[int, str]]] = {}
        self.bridge.broker.drop = self.tap

    def tap(self, channel: bytes, data: bytes) -> bool:
        """Decrypt (with the forwarder's session key) and keep every RESET the proxy publishes,
        instead of delivering it to the forwarder, which has no such stream."""
        if len(data) < 2 or data[1] != MsgType.RESET:
            return False
        header = unpack_header(data)
        payload = self.entry.session.envelope.open(header, data, channel)
        self.resets.setdefault(header.stream_id, []).append(decode_reset(payload))
        return True

    def send_head(self, target: bytes, stream_id: bytes) -> None:
        """Publish a REQ_HEAD for ``target`` sealed under the forwarder's real session key (with
        a deadline 30 s ahead when the wire format carries one, so only the target is wrong)."""
        head = RequestHead(b"GET", target, [(b"Host", b"public.example")],
                           self.forwarder.channels.reply(self.forwarder.id), None)
        if "deadline_ms" in {f.name for f in fields(RequestHead)}:
            head = replace(head, deadline_ms=int((self.bridge.clock.seconds() + 30) * 1000))
        self.forwarder.node.send(self.entry, self.forwarder.data_channel(self.entry), MsgType.REQ_HEAD,
                                 stream_id, 0, head.encode(), FLAG_END)

    def test_climbing_target_is_reset_and_never_called(self) -> None:
        """A sealed request for /../admin, /%2e%2e/admin or //evil.example/x gets a RESET with
        code 7 (bad-target), the agent is never called, and the call is over at once."""
        for i, target in enumerate((b"/../admin", b"/%2e%2e/admin", b"//evil.example/x")):
            stream_id = bytes([i + 1]) * 16
            self.send_head(target, stream_id)
            [(code, message)] = self.resets[stream_id]
            self.assertEqual(code, 7, target)
            self.assertIn("base path", message)
        self.assertEqual(self.agent.urls, [])
        self.assertEqual(self.proxy.calls, {})

    def test_confined_target_is_called_under_the_base(self) -> None:
        """The same proxy calls a confined target, under its base path, and resets nothing:
        the refusal above is about the path, not the way the request was sent."""
        stream_id = b"\x09" * 16
        self.send_head(b"/api/group%2Fproject", stream_id)
        self.assertEqual(self.agent.urls, [b"http://intranet.example:8000/app/api/group%2Fproject"])
        self.assertNotIn(stream_id, self.resets)
