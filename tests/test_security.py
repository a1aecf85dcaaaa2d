"""What a party with full Redis access can and cannot do, tried against the real thing.

The attacker here is a plain Redis client on the test's Redis: it subscribes to everything,
republishes what it captured (as is, or altered), and publishes its own messages.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ppbridge import keys, negotiation
from ppbridge.errors import BusMessageError
from ppbridge.negotiation import ANY_FORWARDER, ForwarderNegotiator
from ppbridge.redis_server import RawRedisClient
from ppbridge.wire import HEADER_SIZE, KeyRequest, MsgType, decode_signed, unpack_header
from tests.support import Client, Stack, error_of


class DropWatcher:
    """Counts a service's dropped bus messages by reason; lets a test await a condition."""

    def __init__(self, service: Any) -> None:
        self.reasons: Counter[str] = Counter()
        self._waiters: list[tuple[Any, defer.Deferred[None]]] = []
        original = service.node.drop

        def drop(err: BusMessageError, channel: bytes) -> None:
            original(err, channel)
            self.reasons[err.reason] += 1
            for waiter in list(self._waiters):
                if waiter[0]():
                    self._waiters.remove(waiter)
                    waiter[1].callback(None)

        service.node.drop = drop

    def until(self, predicate: Any) -> defer.Deferred[None]:
        """Fires once ``predicate()`` holds, checked at each drop."""
        d: defer.Deferred[None] = defer.Deferred()
        if predicate():
            d.callback(None)
        else:
            self._waiters.append((predicate, d))
        return d.addTimeout(10, reactor)

    def wait(self, reason: str, count: int = 1) -> defer.Deferred[None]:
        return self.until(lambda: self.reasons[reason] >= count)

    def total(self) -> int:
        return sum(self.reasons.values())


def when_sent(service: Any, mtype: MsgType) -> defer.Deferred[None]:
    """Fires when ``service`` has published (and Redis has taken) its next ``mtype`` message."""
    d: defer.Deferred[None] = defer.Deferred()
    original = service.node.send

    def send(entry: Any, channel: bytes, kind: MsgType, *args: Any, **kwargs: Any) -> Any:
        result = original(entry, channel, kind, *args, **kwargs)
        if kind is mtype and not d.called:
            result.addCallback(lambda n: (d.callback(None) if not d.called else None, n)[1])
        return result

    service.node.send = send
    return d.addTimeout(10, reactor)


def when_published(service: Any, channel: bytes) -> defer.Deferred[None]:
    """Fires when ``service`` has published (and Redis has taken) a message on ``channel``."""
    d: defer.Deferred[None] = defer.Deferred()
    original = service.bus.publish

    def publish(ch: bytes, message: bytes) -> Any:
        result = original(ch, message)
        if ch == channel and not d.called:
            result.addCallback(lambda n: (d.callback(None) if not d.called else None, n)[1])
        return result

    service.bus.publish = publish
    return d.addTimeout(10, reactor)


def spy(stack: Stack, case: TestCase, *patterns: bytes) -> RawRedisClient:
    """A raw Redis subscriber on ``patterns``: the eavesdropper."""
    client = RawRedisClient("127.0.0.1", stack.redis.port)
    case.addCleanup(client.close)
    client.psubscribe(*patterns)
    return client


def drain(client: RawRedisClient) -> list[tuple[bytes, bytes]]:
    """Everything the spy has received so far: (channel, message)."""
    out = []
    while (msg := client.read_message(timeout=0.3)) is not None:
        out.append((msg[1], msg[2]))
    return out


def of_type(captured: list[tuple[bytes, bytes]], mtype: MsgType) -> list[tuple[bytes, bytes]]:
    found = []
    for channel, data in captured:
        try:
            if unpack_header(data).type is mtype:
                found.append((channel, data))
        except BusMessageError:
            pass
    return found


def with_counter(data: bytes, counter: int) -> bytes:
    """The message with its header's counter field replaced (bytes 12..20)."""
    return data[:12] + struct.pack(">Q", counter) + data[20:]


class Eavesdropper(TestCase):
    @defer.inlineCallbacks
    def test_redis_sees_no_body_path_header_value_or_key(self):
        """A subscriber to every channel, watching negotiation and requests, finds no body,
        path, query, header value, cookie, token or session/private key bytes anywhere."""
        derived: list[bytes] = []
        original = negotiation.derive_keys

        def recording(secret: bytes, shared: bytes, salt: bytes) -> Any:
            result = original(secret, shared, salt)
            derived.extend([secret, shared, *result.values()])
            return result

        self.patch(negotiation, "derive_keys", recording)
        stack = Stack(self)
        watcher = spy(stack, self, b"*")
        yield stack.start()
        client = Client(self)
        secrets = [b"SECRET-BODY-7f3a", b"SECRET-PATH-19c2", b"SECRET-QUERY-d41e", b"SECRET-TOKEN-a9b0",
                   b"SECRET-COOKIE-5e6d", b"SECRET-HEADER-0c7b"]
        headers = {b"Authorization": [b"Bearer SECRET-TOKEN-a9b0"], b"Cookie": [b"s=SECRET-COOKIE-5e6d"],
                   b"X-Custom": [b"SECRET-HEADER-0c7b"]}
        for body in (b"SECRET-BODY-7f3a" * 3, b"SECRET-BODY-7f3a" * 20000):
            response, data = yield client.fetch(b"POST", stack.url + "/echo/SECRET-PATH-19c2?q=SECRET-QUERY-d41e",
                                                headers, body)
            self.assertIn(b"SECRET-TOKEN-a9b0", data)  # it did travel, both ways
        captured = drain(watcher)
        self.assertGreater(len(of_type(captured, MsgType.REQ_HEAD)), 1)
        self.assertGreater(len(of_type(captured, MsgType.RESP_HEAD)), 1)
        self.assertTrue(derived)
        private_der = [keys.load_private_key(stack.folder / "keys" / f"{n}.key").private_numbers().d.to_bytes(256, "big")
                       for n in ("alpha", "forwarder")]
        for channel, data in captured:
            for needle in secrets + derived + private_der:
                self.assertNotIn(needle, data, f"found in a message on {channel!r}")
                self.assertNotIn(needle, channel)


class Attacker(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        self.spy = spy(self.stack, self, b"ppbridge:*")
        yield self.stack.start(forwarder={"request_timeout": 3.0})
        self.proxy = self.stack.proxies["alpha"]
        self.proxy_drops = DropWatcher(self.proxy)
        self.forwarder_drops = DropWatcher(self.stack.forwarder)
        self.client = Client(self)
        self.attacker = RawRedisClient("127.0.0.1", self.stack.redis.port)
        self.addCleanup(self.attacker.close)

    @defer.inlineCallbacks
    def test_grant_signed_by_another_key_is_ignored(self):
        """A grant for the proxy's real key request, made and signed by an attacker who has
        the proxy's public key but not the forwarder's signing key, is dropped; the proxy
        holds no key from the attacker."""
        drain(self.spy)
        published = when_published(self.proxy, b"ppbridge:negotiate")
        self.proxy._negotiate(ANY_FORWARDER)
        yield published
        requests = [d for ch, d in drain(self.spy) if ch == b"ppbridge:negotiate"]
        self.assertTrue(requests)
        request, _, _ = decode_signed(requests[-1], KeyRequest)
        # The forger answers as whichever forwarder the request names (any id will do).
        forger_id = request.target if request.target != ANY_FORWARDER else os.urandom(8)
        forger = ForwarderNegotiator(forger_id, keys.generate_private_key(2048),
                                     {"alpha": self.proxy.settings.private_key.public_key()},
                                     self.proxy.channels, 262144, 1 << 20, 300.0)
        channel, grant, forged = forger.handle_request(requests[-1], reactor.seconds())
        self.assertEqual(channel, request.reply_channel)
        self.attacker.publish(channel, grant)
        yield self.proxy_drops.wait("bad-signature")
        held = self.proxy.keyring.current(forger_id)
        self.assertTrue(held is None or held.session.envelope.fingerprint != forged.envelope.fingerprint)

    @defer.inlineCallbacks
    def test_replayed_or_altered_request_is_not_executed(self):
        """A captured request republished as is (replay), with a newer counter (the header is
        authenticated) or with a flipped ciphertext byte is dropped; the upstream ran it once."""
        drain(self.spy)
        response, _ = yield self.client.fetch(b"POST", self.stack.url + "/echo?once", body=b"x")
        self.assertEqual(response.code, 200)
        (channel, head), = of_type(drain(self.spy), MsgType.REQ_HEAD)
        self.attacker.publish(channel, head)
        yield self.proxy_drops.wait("replay")
        self.attacker.publish(channel, with_counter(head, 1 << 40))
        yield self.proxy_drops.wait("bad-tag")
        flipped = bytearray(with_counter(head, 1 << 41))
        flipped[HEADER_SIZE + 3] ^= 0x01
        self.attacker.publish(channel, bytes(flipped))
        yield self.proxy_drops.wait("bad-tag", 2)
        self.assertEqual(self.stack.app.hits["/echo"], 1)

    @defer.inlineCallbacks
    def test_forged_response_to_a_pending_request_is_rejected(self):
        """While a request waits for its answer, responses forged with the right stream id and
        key id, or moved over from another request's reply channel, are dropped; the client
        gets the 504, never a forged answer."""
        drain(self.spy)
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/echo")
        (_, real_response), = of_type(drain(self.spy), MsgType.RESP_HEAD)
        sent = when_sent(self.stack.forwarder, MsgType.REQ_HEAD)
        pending = self.client.fetch(b"GET", self.stack.url + "/hang")
        yield sent
        stream, = self.stack.forwarder.streams.values()
        header = unpack_header(real_response)
        forged = (real_response[:12] + struct.pack(">Q", 1 << 40) + stream.id + real_response[36:HEADER_SIZE]
                  + os.urandom(200))
        self.attacker.publish(stream.reply_channel, forged)
        self.attacker.publish(stream.reply_channel, with_counter(real_response, 1 << 41))
        yield self.forwarder_drops.wait("bad-tag", 2)
        self.attacker.publish(stream.reply_channel, real_response)
        yield self.forwarder_drops.wait("replay")
        self.assertEqual(header.type, MsgType.RESP_HEAD)
        response, _ = yield pending
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))

    @defer.inlineCallbacks
    def test_garbage_and_oversized_messages_on_every_channel(self):
        """Garbage, truncated, wrong-version and oversized messages on every channel either
        side listens to are dropped and counted, nothing crashes, and traffic goes on."""
        forwarder = self.stack.forwarder
        channels = [
            b"ppbridge:negotiate", b"ppbridge:announce", self.proxy.data_channel,
            forwarder.channels.forwarder_control(forwarder.id), forwarder.channels.reply(forwarder.id),
        ]
        payloads = [b"", b"\x01", os.urandom(100), bytes([1, 1]) + os.urandom(42), bytes([99, 1]) + os.urandom(100),
                    os.urandom(2 << 20)]
        for channel in channels:
            for payload in payloads:
                self.assertGreaterEqual(self.attacker.publish(channel, payload), 1)
        # Each side drops every payload on each channel it listens to (the forwarder two
        # channels plus its pattern, the proxy two).
        yield self.forwarder_drops.until(lambda: self.forwarder_drops.total() >= 3 * len(payloads))
        yield self.proxy_drops.until(lambda: self.proxy_drops.total() >= 2 * len(payloads))
        self.assertNotIn("internal-error", self.forwarder_drops.reasons + self.proxy_drops.reasons)
        self.assertGreaterEqual(self.proxy_drops.reasons["oversized"], 1)
        response, data = yield self.client.fetch(b"GET", self.stack.url + "/echo?after")
        self.assertEqual(response.code, 200)


class Isolation(TestCase):
    @defer.inlineCallbacks
    def test_one_proxy_key_opens_nothing_of_another(self):
        """Proxy A's request republished on proxy B's channel is dropped by B (unknown key),
        and B's key cannot open it even when the key id is rewritten to B's."""
        stack = Stack(self)
        watcher = spy(stack, self, b"ppbridge:p:*")
        yield stack.start(routes={"alpha": {"path_prefix": "/a"}, "beta": {"path_prefix": "/b"}})
        beta = stack.proxies["beta"]
        drops = DropWatcher(beta)
        response, _ = yield Client(self).fetch(b"GET", stack.url + "/a/echo")
        self.assertEqual(response.code, 200)
        (_, head), = of_type(drain(watcher), MsgType.REQ_HEAD)
        attacker = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(attacker.close)
        attacker.publish(beta.data_channel, head)
        yield drops.wait("unknown-key")
        entry = beta.keyring.current(stack.forwarder.id)
        rewritten = head[:4] + entry.key_id + head[12:]
        attacker.publish(beta.data_channel, rewritten)
        yield drops.wait("bad-tag")
        self.assertEqual(stack.app.hits["/echo"], 1)
