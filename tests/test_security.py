"""What a party with full Redis access can and cannot do, tried against the real thing.

The attacker here is a plain Redis client on the test's Redis: it subscribes to everything,
republishes what it captured (as is, or altered), and publishes its own messages. Where it must
also hold a message back (so that its counter is still unseen), it is the hostile Redis of
tests/hostile.py in the middle of the proxy's connection.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ppbridge import keys, negotiation
from ppbridge.errors import BusMessageError
from ppbridge.negotiation import ANY_FORWARDER, ForwarderNegotiator
from ppbridge.wire import HEADER_SIZE, KeyRequest, MsgType, decode_signed, unpack_header
from tests.hostile import HOLD, PASS, HostileRedis
from tests.redisclient import RawRedisClient
from tests.support import Client, Stack, error_of

WAIT = 10.0  # seconds any single wait for an event may take before the test fails


class DropWatcher:
    """Counts a service's dropped bus messages by reason (and records the channel of each);
    lets a test await a condition."""

    def __init__(self, service: Any) -> None:
        self.reasons: Counter[str] = Counter()
        self.dropped: list[tuple[str, bytes]] = []  # (reason, channel), in order
        self._waiters: list[tuple[Any, defer.Deferred[None]]] = []
        original = service.node.drop

        def drop(err: BusMessageError, channel: bytes) -> None:
            original(err, channel)
            self.reasons[err.reason] += 1
            self.dropped.append((err.reason, bytes(channel)))
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

    def on(self, channel: bytes) -> list[str]:
        """The reasons of the drops of messages that arrived on ``channel``, in order."""
        return [reason for reason, where in self.dropped if where == channel]


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


class Spy(RawRedisClient):
    """The eavesdropper: a raw Redis subscriber on some patterns, plus a channel of its own
    (``barrier``) that nothing else uses, so that :func:`drain` can tell when it has read
    everything Redis had taken before a given moment."""

    def __init__(self, port: int, patterns: tuple[bytes, ...]) -> None:
        super().__init__("127.0.0.1", port)
        self.barrier = b"ppbridge-test-barrier:" + os.urandom(8).hex().encode("ascii")
        self._publisher = RawRedisClient("127.0.0.1", port)
        self.psubscribe(*patterns)
        self.subscribe(self.barrier)

    def close(self) -> None:
        self._publisher.close()
        super().close()


def spy(stack: Stack, case: TestCase, *patterns: bytes) -> Spy:
    """A raw Redis subscriber on ``patterns``: the eavesdropper."""
    client = Spy(stack.redis.port, patterns)
    case.addCleanup(client.close)
    return client


def drain(client: Spy, timeout: float = WAIT) -> list[tuple[bytes, bytes]]:
    """Everything Redis delivered to the spy before now: (channel, message), in order.

    "Now" is a marker published on the spy's own barrier channel: Redis queues pub/sub messages
    for a subscriber in the order it runs the PUBLISHes, so once the marker is read, every
    message Redis took before it has been read too. No quiet period is waited for; the read
    blocks only until the marker, which Redis has already queued (fails after ``timeout``)."""
    marker = os.urandom(16)
    client._publisher.publish(client.barrier, marker)
    deadline = time.monotonic() + timeout
    out = []
    while True:
        remaining = deadline - time.monotonic()
        msg = client.read_message(timeout=remaining) if remaining > 0 else None
        if msg is None:
            raise AssertionError(f"the spy's barrier did not come back within {timeout} s")
        _, channel, data = msg
        if channel == client.barrier:  # our markers (a '*' pattern also gets a second copy)
            if data == marker:
                return out
            continue
        out.append((channel, data))


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
        the proxy's public key but not the forwarder's signing key, published on the
        temporary channel the proxy is waiting on (the proxy is its one plain subscriber and
        still has the request pending), reaches the proxy and is dropped there as
        bad-signature; the proxy holds no entry for the forged key id and no key from the
        forger's forwarder id."""
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
        self.assertTrue(self.proxy.negotiator.is_pending(channel), "the proxy no longer waits on that channel")
        self.assertEqual(self.attacker.command("PUBSUB", "NUMSUB", channel), [channel, 1],
                         "the proxy is not subscribed to the channel the forged grant goes to")
        self.attacker.publish(channel, grant)
        yield self.proxy_drops.until(lambda: self.proxy_drops.on(channel))
        self.assertEqual(self.proxy_drops.on(channel), ["bad-signature"])
        self.assertIsNone(self.proxy.keyring.get(forged.envelope.key_id, reactor.seconds()))
        self.assertNotIn(forger_id, self.proxy.keyring.peers())

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
        """While a request waits for its answer, three responses published on its reply
        channel are dropped: one forged with the request's stream id and the proxy's key id
        and a fresh counter (random ciphertext: bad-tag), a captured real response of an
        earlier request with its counter raised so it is no replay (the header is
        authenticated, and the channel differs too: bad-tag), and that captured response
        unchanged (its counter was seen: replay). The client gets 504 timeout, never an
        answer. (A response moved to another channel and changed in nothing else:
        MovedMessage.)"""
        drain(self.spy)
        response, _ = yield self.client.fetch(b"GET", self.stack.url + "/echo")
        self.assertEqual(response.code, 200)
        (_, real_response), = of_type(drain(self.spy), MsgType.RESP_HEAD)
        sent = when_sent(self.stack.forwarder, MsgType.REQ_HEAD)
        pending = self.client.fetch(b"GET", self.stack.url + "/hang")
        yield sent
        stream, = self.stack.forwarder.streams.values()
        forged = (real_response[:12] + struct.pack(">Q", 1 << 40) + stream.id + real_response[36:HEADER_SIZE]
                  + os.urandom(200))
        self.attacker.publish(stream.reply_channel, forged)
        self.attacker.publish(stream.reply_channel, with_counter(real_response, 1 << 41))
        yield self.forwarder_drops.until(lambda: len(self.forwarder_drops.on(stream.reply_channel)) >= 2)
        self.attacker.publish(stream.reply_channel, real_response)
        yield self.forwarder_drops.until(lambda: len(self.forwarder_drops.on(stream.reply_channel)) >= 3)
        self.assertEqual(self.forwarder_drops.on(stream.reply_channel), ["bad-tag", "bad-tag", "replay"])
        response, _ = yield pending
        self.assertEqual((response.code, error_of(response)), (504, b"timeout"))

    @defer.inlineCallbacks
    def test_garbage_and_oversized_messages_on_every_channel(self):
        """Garbage, truncated, wrong-version and oversized messages on every channel either
        side listens to (the forwarder: ns:negotiate, its control channel and its reply
        channel; the proxy: ns:announce and its data channel) are each
        dropped exactly once by that side, on that channel (the oversized one as
        "oversized"); neither side counts an internal error (a handler raising something
        other than a drop), and a request afterwards is served."""
        forwarder = self.stack.forwarder
        listeners = {
            b"ppbridge:negotiate": self.forwarder_drops, b"ppbridge:announce": self.proxy_drops,
            self.proxy.data_channel: self.proxy_drops,
            forwarder.channels.forwarder_control(forwarder.id): self.forwarder_drops,
            forwarder.channels.reply(forwarder.id): self.forwarder_drops,
        }
        payloads = [b"", b"\x01", os.urandom(100), bytes([1, 1]) + os.urandom(42), bytes([99, 1]) + os.urandom(100),
                    os.urandom(2 << 20)]
        for channel in listeners:
            for payload in payloads:
                self.attacker.publish(channel, payload)
        for channel, drops in listeners.items():
            yield drops.until(lambda c=channel, d=drops: len(d.on(c)) >= len(payloads))
        for channel, drops in listeners.items():
            reasons = drops.on(channel)
            self.assertEqual(len(reasons), len(payloads), (channel, reasons))
            self.assertEqual(reasons.count("oversized"), 1, (channel, reasons))
        for service in (forwarder, self.proxy):  # a handler raising anything else is counted so
            internal = service.metrics.registry.get_sample_value("ppbridge_bus_dropped_total",
                                                                 {"reason": "internal-error"})
            self.assertIn(internal, (None, 0.0), f"{type(service).__name__} counted {internal} internal errors")
        response, data = yield self.client.fetch(b"GET", self.stack.url + "/echo?after")
        self.assertEqual(response.code, 200)


class MovedMessage(TestCase):
    @defer.inlineCallbacks
    def test_response_moved_to_another_channel_fails_its_tag(self):
        """The channel is in the AEAD's associated data, shown with a message that differs
        from a valid one in its channel only.

        A copy of a message the receiver has already opened is dropped as a replay before
        its tag is checked (counters are per key), so the moved message must be one the
        forwarder has not seen: the attacker is a hostile Redis in the middle of the proxy's
        connection and holds back the proxy's response head to a request (and everything the
        proxy publishes after it, so no later counter of that key reaches the forwarder). It
        publishes that head unchanged on the other channel the forwarder opens under the same
        key, its control channel: the forwarder drops it there as bad-tag, its counter for the
        key has not moved, and the request is still waiting. The same bytes then published on
        the forwarder's reply channel are accepted: the client gets its 200 with its own body."""
        stack = Stack(self)
        hostile = yield HostileRedis(stack.redis.host, stack.redis.port).start()
        self.addCleanup(hostile.stop)  # after the services stop (cleanups run last-in first-out)
        yield stack.start(forwarder={"request_timeout": 5.0}, proxy_redis=hostile.url)
        forwarder = stack.forwarder
        drops = DropWatcher(forwarder)
        client = Client(self)

        held: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()

        def hold_from_the_first_response_head(channel: bytes, message: bytes) -> str:
            if hostile.held:
                return HOLD
            if forwarder.channels.is_reply_of(forwarder.id, channel):
                if unpack_header(message).type is MsgType.RESP_HEAD:
                    reactor.callLater(0, held.callback, (channel, message))
                    return HOLD
            return PASS

        hostile.on_publish = hold_from_the_first_response_head
        answer = client.fetch(b"GET", stack.url + "/echo?moved")
        channel, message = yield held.addTimeout(WAIT, reactor)
        header = unpack_header(message)
        self.assertEqual(channel, forwarder.streams[header.stream_id].reply_channel)
        envelope = forwarder.keyring.get(header.key_id, reactor.seconds()).session.envelope
        seen = envelope.last_received
        self.assertGreater(header.counter, seen, "the forwarder already saw this counter: a copy would be a replay")

        control = forwarder.channels.forwarder_control(forwarder.id)
        receivers = yield hostile.inject(control, message)
        self.assertEqual(receivers, 1)  # the forwarder
        yield drops.until(lambda: drops.on(control))
        self.assertEqual(drops.on(control), ["bad-tag"])
        self.assertEqual(envelope.last_received, seen)
        self.assertIn(header.stream_id, forwarder.streams, "the request stopped waiting")
        self.assertFalse(answer.called)

        hostile.on_publish = None
        yield hostile.inject(channel, message)  # the very same bytes, on their own channel
        hostile.release(lambda _, m: m is not message)  # whatever the proxy sent after it
        response, data = yield answer.addTimeout(WAIT, reactor)
        self.assertEqual(response.code, 200, data)
        self.assertEqual(json.loads(data)["uri"], "/echo?moved")
        self.assertEqual(drops.on(channel), [])


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
