"""The streaming guard in front of the Redis reply parser (:mod:`ppbridge.respguard`) and the
bus connections that use it.

The story: Redis, or anyone who can publish on it, pushes a subscriber a message far longer
than any frame. The guard must let the parser see only an empty stand-in, skip the real bytes
as they arrive, report the drop once, and keep the connection delivering what follows; what
only a broken or hostile server sends (over-long lines, huge replies, unknown types) costs the
connection instead.
"""

from __future__ import annotations

from typing import Any

import hiredis
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from ppbridge.bus import SMALL_MESSAGE, RedisBus, _PublisherFactory, _SubscriberFactory
from ppbridge.config import RedisSettings
from ppbridge.respguard import EMPTY_BULK, RespGuard, RespProtocolError
from tests.redisclient import RawRedisClient
from tests.support import start_redis

CHANNEL = b"ns:p:alpha:" + b"0" * 32
LIMIT = 1000


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n" + bulk(b"message") + bulk(channel) + bulk(payload)


def pmessage(pattern: bytes, channel: bytes, payload: bytes) -> bytes:
    return b"*4\r\n" + bulk(b"pmessage") + bulk(pattern) + bulk(channel) + bulk(payload)


def parse(stream: bytes) -> list[Any]:
    """Every reply hiredis (the parser behind the guard) reads from ``stream``."""
    reader = hiredis.Reader()
    reader.feed(stream)
    replies = []
    while (reply := reader.gets()) is not False:
        replies.append(reply)
    return replies


def through(guard: RespGuard, stream: bytes) -> list[Any]:
    """What a subscriber delivers from ``stream``: hiredis' replies of the pass-through, each
    with the payload the guard cut out put back, the dropped ones left out."""
    out = []
    for reply in parse(guard.feed(stream)):
        if guard.delivered():
            continue
        payload = guard.cut_payload()
        if payload is not None:
            reply[-1] = payload
        out.append(reply)
    return out


class Recorder:
    """A guard with a fixed limit that records what it reports."""

    def __init__(self, limit: int = LIMIT, **kwargs: Any) -> None:
        self.reports: list[tuple[bytes, int]] = []
        self.guard = RespGuard(lambda channel: limit, lambda ch, n: self.reports.append((ch, n)), **kwargs)

    def feed_all(self, pieces: list[bytes]) -> bytes:
        return b"".join(self.guard.feed(piece) for piece in pieces)

    def delivered(self, stream: bytes) -> list[Any]:
        """The replies hiredis reads from ``stream`` that the guard lets through."""
        return [reply for reply in parse(stream) if not self.guard.delivered()]


# Everything a subscriber connection sees, in one stream: confirmations, PING in subscribed
# mode, plain and pattern messages (one of them empty), a command reply with nested arrays,
# status, error, integer and null replies.
MIXED = b"".join([
    b"+OK\r\n",
    b"*3\r\n" + bulk(b"subscribe") + bulk(CHANNEL) + b":1\r\n",
    b"*3\r\n" + bulk(b"psubscribe") + bulk(b"ns:f:*") + b":2\r\n",
    message(CHANNEL, b"first"),
    b"*2\r\n" + bulk(b"pong") + bulk(b""),
    pmessage(b"ns:f:*", b"ns:f:ab:ctl", b"x" * LIMIT),
    message(CHANNEL, b""),
    b"*2\r\n*3\r\n:1\r\n$-1\r\n*0\r\n*-1\r\n",
    b"-ERR something\r\n:42\r\n$-1\r\n",
    message(CHANNEL, b"last"),
])
OVERSIZED = message(CHANNEL, b"y" * (LIMIT + 1))


class SplittingTests(TestCase):
    """The pass-through does not depend on how the stream is cut into reads."""

    def test_mixed_stream_passes_unchanged(self) -> None:
        """A stream of confirmations, pushes, nested arrays and simple replies, none over a
        limit, comes out byte for byte as it went in, with nothing reported and every reply
        let through."""
        rec = Recorder()
        self.assertEqual(rec.feed_all([MIXED]), MIXED)
        self.assertEqual(rec.reports, [])
        self.assertEqual(len(rec.delivered(MIXED)), len(parse(MIXED)))
        self.assertEqual(rec.guard.replies, len(parse(MIXED)))

    def test_every_cut_gives_the_same_pass_through(self) -> None:
        """Cut into two reads at every possible byte, and also fed byte by byte, a stream
        holding an oversized message gives the same pass-through as fed whole, and reports
        the message exactly once."""
        stream = MIXED + OVERSIZED + message(CHANNEL, b"after")
        whole = Recorder()
        expected = whole.feed_all([stream])
        self.assertEqual(whole.reports, [(CHANNEL, LIMIT + 1)])
        for cut in range(len(stream) + 1):
            rec = Recorder()
            self.assertEqual(rec.feed_all([stream[:cut], stream[cut:]]), expected, f"cut at {cut}")
            self.assertEqual(rec.reports, [(CHANNEL, LIMIT + 1)], f"cut at {cut}")
        rec = Recorder()
        self.assertEqual(rec.feed_all([stream[i:i + 1] for i in range(len(stream))]), expected)
        self.assertEqual(rec.reports, [(CHANNEL, LIMIT + 1)])


class PushTests(TestCase):
    """Which element is a push's channel and payload, and what happens to a long payload."""

    def test_oversized_payload_across_many_reads(self) -> None:
        """A payload one byte over the limit, fed 100 bytes at a time, is replaced by an empty
        bulk; the on_oversized call comes once, at its header, with the channel and size;
        the parser sees the message's head and ``$0``, and that reply is not delivered."""
        rec = Recorder()
        header_end = OVERSIZED.index(b"$%d\r\n" % (LIMIT + 1)) + 7
        out = []
        for start in range(0, len(OVERSIZED), 10):
            out.append(rec.guard.feed(OVERSIZED[start:start + 10]))
            expected = [(CHANNEL, LIMIT + 1)] if start + 10 >= header_end else []
            self.assertEqual(rec.reports, expected, f"after byte {start + 10}")
        passed = b"".join(out)
        self.assertEqual(passed, b"*3\r\n" + bulk(b"message") + bulk(CHANNEL) + EMPTY_BULK)
        self.assertEqual(rec.delivered(passed), [])

    def test_next_message_passes_intact(self) -> None:
        """After a dropped message, the next message on the same connection reaches the parser
        unchanged and is delivered."""
        rec = Recorder()
        rec.feed_all([OVERSIZED[:70], OVERSIZED[70:]])
        after = message(CHANNEL, b"z" * LIMIT)
        self.assertEqual(rec.guard.feed(after), after)
        passed = b"*3\r\n" + bulk(b"message") + bulk(CHANNEL) + EMPTY_BULK + after
        self.assertEqual(rec.delivered(passed), [[b"message", CHANNEL, b"z" * LIMIT]])

    def test_only_the_replaced_message_is_swallowed(self) -> None:
        """A genuine empty message read in the same chunk before a dropped one is delivered;
        the stand-in of the dropped one is not (the guard numbers replies, it does not just
        swallow the next empty payload)."""
        rec = Recorder()
        stream = message(b"ns:other", b"") + OVERSIZED + message(CHANNEL, b"ok")
        passed = rec.guard.feed(stream)
        self.assertEqual(rec.delivered(passed), [[b"message", b"ns:other", b""], [b"message", CHANNEL, b"ok"]])

    def test_pmessage_is_limited_by_its_channel(self) -> None:
        """In a pmessage the limit is looked up only for the channel (third element), never
        the pattern, and an oversized payload is reported with that channel."""
        asked: list[bytes] = []
        reports: list[tuple[bytes, int]] = []
        guard = RespGuard(lambda ch: asked.append(ch) or LIMIT, lambda ch, n: reports.append((ch, n)))
        big = pmessage(b"ns:f:*", b"ns:f:ab:r1", b"q" * 5000)
        passed = guard.feed(big)
        self.assertEqual(passed, b"*4\r\n" + bulk(b"pmessage") + bulk(b"ns:f:*") + bulk(b"ns:f:ab:r1") + EMPTY_BULK)
        self.assertEqual(set(asked), {b"ns:f:ab:r1"})
        self.assertEqual(reports, [(b"ns:f:ab:r1", 5000)])

    def test_small_pmessage_passes(self) -> None:
        """A pmessage within its limit passes unchanged, split or not."""
        small = pmessage(b"ns:f:*", b"ns:f:ab:r1", b"q" * LIMIT)
        rec = Recorder()
        self.assertEqual(rec.feed_all([small[:30], small[30:]]), small)
        self.assertEqual(rec.reports, [])

    def test_subscribe_confirmation_is_not_a_push(self) -> None:
        """A subscribe confirmation (``*3 subscribe <channel> :1``) and a PUBSUB NUMSUB-like
        reply pass unchanged; neither is reported, even with a limit of 0."""
        rec = Recorder(limit=0)
        stream = (b"*3\r\n" + bulk(b"subscribe") + bulk(CHANNEL) + b":1\r\n"
                  + b"*4\r\n" + bulk(b"a") + b":1\r\n" + bulk(b"b") + b":0\r\n")
        self.assertEqual(rec.feed_all([stream]), stream)
        self.assertEqual(rec.reports, [])

    def test_nested_arrays_count_as_one_reply(self) -> None:
        """An array holding arrays passes unchanged and counts as one reply; a push after it
        is still recognised by its position in the top-level array."""
        rec = Recorder()
        nested = b"*3\r\n*2\r\n" + bulk(b"message") + bulk(b"x") + b"*1\r\n*1\r\n:5\r\n" + bulk(b"y" * 2000)
        self.assertRaises(RespProtocolError, Recorder(max_bulk=1000).guard.feed, nested)
        self.assertEqual(rec.guard.feed(nested), nested)  # not a push: the inner "message" is nested
        self.assertEqual(rec.guard.replies, 1)
        self.assertEqual(rec.reports, [])
        rec.guard.feed(OVERSIZED)
        self.assertEqual(rec.reports, [(CHANNEL, LIMIT + 1)])

    def test_negotiation_channels_have_a_small_limit(self) -> None:
        """With the bus's limits (namespace ``ns``, frame limit 256 KiB + 60), a message of
        64 KiB + 1 on ``ns:negotiate`` or ``ns:announce`` is dropped, 64 KiB passes, and
        64 KiB + 1 on a data channel passes."""
        bus = RedisBus(RedisSettings(namespace="ns"), Clock())
        bus.max_message = 262144 + 60
        reports: list[tuple[bytes, int]] = []
        guard = RespGuard(bus.limit_for, lambda ch, n: reports.append((ch, n)))
        for channel in (b"ns:negotiate", b"ns:announce"):
            at_limit = b"n" * SMALL_MESSAGE
            self.assertEqual(through(guard, message(channel, at_limit)), [[b"message", channel, at_limit]])
            self.assertEqual(through(guard, message(channel, b"n" * (SMALL_MESSAGE + 1))), [])
        data = b"d" * (SMALL_MESSAGE + 1)
        self.assertEqual(through(guard, message(CHANNEL, data)), [[b"message", CHANNEL, data]])
        self.assertEqual(reports, [(b"ns:negotiate", SMALL_MESSAGE + 1), (b"ns:announce", SMALL_MESSAGE + 1)])

    def test_long_channel_name_is_dropped_not_fatal(self) -> None:
        """A push whose channel name is over 1 KiB (a pattern matches any name a publisher
        picks) is dropped, reported with the name's first 1 KiB, and not delivered; the
        connection's next message passes."""
        rec = Recorder()
        name = b"ns:f:ab:" + b"L" * 5000
        stream = message(name, b"small") + message(CHANNEL, b"next")
        passed = rec.feed_all([stream[:3000], stream[3000:]])
        self.assertEqual(rec.reports, [(name[:1024], 5)])
        self.assertEqual(rec.delivered(passed), [[b"message", CHANNEL, b"next"]])


class CutTests(TestCase):
    """Big push payloads spread over reads are cut out of the stream and delivered whole."""

    def deliver(self, rec: Recorder, pieces: list[bytes]) -> list[Any]:
        """What a subscriber delivers: hiredis' replies of the pass-through, each with the
        payload the guard cut out put back, the dropped ones left out."""
        out = []
        for reply in parse(rec.feed_all(pieces)):
            if rec.guard.delivered():
                continue
            payload = rec.guard.cut_payload()
            if payload is not None:
                self.assertEqual(reply[-1], b"")
                reply[-1] = payload
            out.append(reply)
        return out

    def test_every_cut_delivers_the_same(self) -> None:
        """Cut into two reads at every byte, or fed byte by byte, a stream of small and big
        messages (plain and pattern, one oversized) delivers exactly the replies hiredis reads
        from it whole, minus the oversized one; the big ones split over reads are cut out
        (hiredis never holds their bodies) and nothing is left over in the guard."""
        big, other = b"B" * 60, b"P" * 45
        stream = MIXED + message(CHANNEL, big) + OVERSIZED + pmessage(b"ns:f:*", b"ns:f:ab:ctl", other) + message(
            CHANNEL, b"tail")
        expected = [repr(r) for r in parse(stream) if r != [b"message", CHANNEL, b"y" * (LIMIT + 1)]]
        splits = [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
        splits.append([stream[i:i + 1] for i in range(len(stream))])
        for pieces in splits:
            rec = Recorder(cut_min=20)
            self.assertEqual([repr(r) for r in self.deliver(rec, pieces)], expected, f"pieces of {len(pieces[0])}")
            self.assertEqual(rec.reports, [(CHANNEL, LIMIT + 1)])
            self.assertEqual(len(rec.guard.cut), 0)
            self.assertIsNone(rec.guard.cut_payload())
        rec = Recorder(cut_min=20)
        passed = rec.feed_all([stream[i:i + 1] for i in range(len(stream))])
        self.assertNotIn(big, passed)
        self.assertNotIn(other, passed)

    def test_small_payloads_pass_through(self) -> None:
        """A payload under ``cut_min`` goes through the parser as before, whole or split."""
        rec = Recorder(cut_min=20)
        stream = message(CHANNEL, b"s" * 19) + message(CHANNEL, b"t" * 19)
        self.assertEqual(rec.feed_all([stream]), stream)
        cut = len(stream) - 5
        self.assertEqual(rec.feed_all([stream[:cut], stream[cut:]]), stream)
        self.assertEqual(len(rec.guard.cut), 0)

    def test_big_payload_in_one_read_is_cut_too(self) -> None:
        """A big payload all in one read is cut out as well (hiredis would copy it twice)."""
        rec = Recorder(cut_min=20)
        stream = message(CHANNEL, b"B" * 60) + message(CHANNEL, b"s")
        passed = rec.feed_all([stream])
        self.assertEqual(passed, message(CHANNEL, b"") + message(CHANNEL, b"s"))
        self.assertEqual(self.deliver(rec, [b""]), [])
        self.assertEqual(list(rec.guard.cut), [(0, b"B" * 60)])

    def test_header_waits_for_the_body(self) -> None:
        """The parser gets no part of a message being cut out until its body is complete, so
        the reply is never produced before its payload is known."""
        rec = Recorder(cut_min=20)
        stream = message(CHANNEL, b"B" * 60)
        first = rec.guard.feed(stream[:-10])
        self.assertEqual(parse(first), [])
        rest = rec.guard.feed(stream[-10:])
        self.assertEqual(parse(first + rest), [[b"message", CHANNEL, b""]])

    def test_payload_not_ended_by_crlf(self) -> None:
        """A cut-out payload whose body is not followed by CRLF is a protocol error."""
        rec = Recorder(cut_min=20)
        stream = message(CHANNEL, b"B" * 60)[:-2] + b"XY"
        rec.guard.feed(stream[:-20])
        self.assertRaises(RespProtocolError, rec.guard.feed, stream[-20:])


class RefusalTests(TestCase):
    """What no well-behaved Redis sends raises RespProtocolError (the caller drops the link)."""

    def test_line_without_end(self) -> None:
        """A status line growing past 64 KiB without CRLF, in 1 KiB reads, raises when byte
        64 KiB + 2 arrives (before, a CRLF could still end it at 64 KiB); 64 KiB with its CRLF
        passes."""
        ok = b"+" + b"a" * (64 * 1024 - 1) + b"\r\n"
        self.assertEqual(Recorder().feed_all([ok[:10], ok[10:]]), ok)
        guard = Recorder().guard
        guard.feed(b"+" + b"b" * 1023)
        for _ in range(63):
            self.assertEqual(guard.feed(b"b" * 1024), b"")
        self.assertEqual(guard.feed(b"b"), b"")
        self.assertRaises(RespProtocolError, guard.feed, b"b")

    def test_bad_type_byte(self) -> None:
        """A reply starting with a byte that is not a RESP2 type (here RESP3's ``%`` map and
        ``>`` push, and a stray ``x``) raises."""
        for bad in (b"%1\r\n:1\r\n:2\r\n", b">3\r\n", b"x\r\n"):
            self.assertRaises(RespProtocolError, Recorder().guard.feed, b"+OK\r\n" + bad)

    def test_lengths_hiredis_refuses(self) -> None:
        """Lengths with a sign, space, leading zero or below -1 raise (hiredis refuses them
        too, so guard and parser never disagree on where a bulk ends)."""
        for bad in (b"$+3\r\nabc\r\n", b"$ 3\r\nabc\r\n", b"$03\r\nabc\r\n", b"$-2\r\n", b"*1_0\r\n"):
            self.assertRaises(RespProtocolError, Recorder().guard.feed, bad)

    def test_big_bulk_outside_a_payload(self) -> None:
        """A bulk over 64 KiB that is not a push payload (a command reply, a channel-count
        element, anything on the publisher) raises at its header, before its body arrives."""
        header = b"$%d\r\n" % (64 * 1024 + 1)
        self.assertRaises(RespProtocolError, Recorder().guard.feed, header)
        self.assertRaises(RespProtocolError, RespGuard().feed, b"*2\r\n:1\r\n" + header)
        self.assertRaises(RespProtocolError, RespGuard().feed, OVERSIZED.replace(b"$1001", header[:-2]))
        fits = bulk(b"f" * 64 * 1024)
        self.assertEqual(RespGuard().feed(fits), fits)

    def test_big_arrays(self) -> None:
        """An array declaring over 65536 elements (which hiredis would allocate at once), a
        reply over 1 MiB, and arrays nested 9 deep raise."""
        self.assertRaises(RespProtocolError, RespGuard().feed, b"*65537\r\n")
        self.assertRaises(RespProtocolError, RespGuard().feed, b"*2\r\n*40000\r\n" + b":1\r\n" * 40000 + b"*30000\r\n")
        self.assertRaises(RespProtocolError, RespGuard().feed, b"*20\r\n" + bulk(b"m" * 60000) * 18)
        self.assertEqual(RespGuard().feed(b"*1\r\n" * 8 + b":1\r\n"), b"*1\r\n" * 8 + b":1\r\n")
        self.assertRaises(RespProtocolError, RespGuard().feed, b"*1\r\n" * 9)

    def test_push_payload_must_be_a_bulk(self) -> None:
        """A push whose payload is an integer or a null bulk raises (Redis always sends a
        bulk string, and a stand-in could not replace anything else)."""
        head = b"*3\r\n" + bulk(b"message") + bulk(CHANNEL)
        for bad in (b":1\r\n", b"$-1\r\n", b"*0\r\n"):
            self.assertRaises(RespProtocolError, Recorder().guard.feed, head + bad)


# --- the bus connections ------------------------------------------------------------------


class Connections:
    """A RedisBus (never started) and one subscriber and one publisher protocol of it, each on
    a StringTransport, past their SELECT; records what the bus reports."""

    def __init__(self) -> None:
        self.bus = RedisBus(RedisSettings(namespace="ns"), Clock())
        self.bus.max_message = LIMIT
        self.messages: list[tuple[bytes, bytes]] = []
        self.oversized: list[tuple[bytes, int]] = []
        self.states: list[bool] = []
        self.bus.on_message = lambda ch, data: self.messages.append((ch, data))
        self.bus.on_oversized = lambda ch, n: self.oversized.append((ch, n))
        self.bus.on_state = self.states.append
        self.sub = self._connect(_SubscriberFactory(self.bus))
        self.pub = self._connect(_PublisherFactory(self.bus))

    def _connect(self, factory: Any) -> Any:
        factory.charset, factory.convertNumbers, factory.dbid = None, False, 0
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"+OK\r\n")  # SELECT 0
        return proto


class AdapterTests(TestCase):
    """The guard as the bus's two connections use it (txredisapi with hiredis, no socket)."""

    def test_subscriber_drops_and_keeps_going(self) -> None:
        """An oversized message reaches on_oversized with its channel and size, not
        on_message; the following message is delivered; the connection stays open."""
        conn = Connections()
        conn.sub.dataReceived(OVERSIZED[:50])
        conn.sub.dataReceived(OVERSIZED[50:] + message(CHANNEL, b"next"))
        self.assertEqual(conn.oversized, [(CHANNEL, LIMIT + 1)])
        self.assertEqual(conn.messages, [(CHANNEL, b"next")])
        self.assertFalse(conn.sub.transport.disconnecting or conn.sub.transport.disconnected)

    def test_subscriber_delivers_cut_payload(self) -> None:
        """A payload the guard cut out of the stream reaches on_message whole, in order
        between the messages around it."""
        conn = Connections()
        conn.sub.guard.cut_min = 100
        big = bytes(range(256)) * 3
        stream = message(CHANNEL, b"a") + message(CHANNEL, big[:LIMIT - 300]) + message(CHANNEL, b"b")
        for at in range(0, len(stream), 97):
            conn.sub.dataReceived(stream[at:at + 97])
        self.assertEqual(conn.messages, [(CHANNEL, b"a"), (CHANNEL, big[:LIMIT - 300]), (CHANNEL, b"b")])

    def test_subscriber_aborts_on_protocol_error(self) -> None:
        """A bad type byte aborts the subscriber's connection and nothing after it is read."""
        conn = Connections()
        conn.sub.dataReceived(b"%1\r\n" + message(CHANNEL, b"lost"))
        self.assertTrue(conn.sub.transport.disconnected)
        conn.sub.dataReceived(message(CHANNEL, b"lost"))
        self.assertEqual(conn.messages, [])

    def test_publisher_aborts_on_big_reply(self) -> None:
        """A reply bulk over 64 KiB aborts the publisher's connection at its header; a
        pushed pub/sub message there gets no payload allowance."""
        conn = Connections()
        conn.pub.dataReceived(message(CHANNEL, b"s"))
        self.assertFalse(conn.pub.transport.disconnected)
        conn.pub.dataReceived(b"$%d\r\n" % (64 * 1024 + 1))
        self.assertTrue(conn.pub.transport.disconnected)


class RealRedisTests(TestCase):
    """The guard between a RedisBus and a real redis-server."""

    @defer.inlineCallbacks
    def test_oversized_message_from_real_redis(self):  # type: ignore[no-untyped-def]
        """A publisher sends max_message + 1 bytes, then a normal message, to a channel a
        RedisBus subscribes: on_oversized fires with the channel and size, on_message gets
        only the normal message, and the bus never reports a disconnection."""
        server = start_redis(self)
        settings = RedisSettings(url=f"redis://127.0.0.1:{server.port}/0", host="127.0.0.1",
                                 port=server.port, namespace="ns")
        bus = RedisBus(settings, reactor)
        bus.max_message = 262144 + 60
        states: list[bool] = []
        oversized: list[tuple[bytes, int]] = []
        received: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()
        up: defer.Deferred[None] = defer.Deferred()
        bus.on_state = lambda now: (states.append(now), now and not up.called and up.callback(None))
        bus.on_oversized = lambda ch, n: oversized.append((ch, n))
        bus.on_message = lambda ch, data: received.callback((ch, data))
        bus.subscribe(CHANNEL)
        bus.start()
        self.addCleanup(bus.stop)
        yield up.addTimeout(10, reactor)
        client = RawRedisClient("127.0.0.1", server.port)
        self.addCleanup(client.close)
        self.assertEqual(client.publish(CHANNEL, b"o" * (bus.max_message + 1)), 1)
        self.assertEqual(client.publish(CHANNEL, b"normal"), 1)
        got = yield received.addTimeout(10, reactor)
        self.assertEqual(got, (CHANNEL, b"normal"))
        self.assertEqual(oversized, [(CHANNEL, bus.max_message + 1)])
        self.assertEqual(states, [True])
        self.assertTrue(bus.connected)
