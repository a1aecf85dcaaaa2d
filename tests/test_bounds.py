"""Every bound and every refusal of the sans-I/O core, probed just inside and just outside.

Issue 14. Each test sends the value at the edge of a limit (accepted) and the one next to it
(refused with the exact ``BusMessageError`` reason, or the exact exception), so flipping a
comparison, negating a condition, moving a constant by one or turning a ``raise`` into
``pass`` makes a test here fail. Limits are written as the published numbers
(docs/PROTOCOL.md, or the wire format both sides of one version must share), not read from
the modules: a changed limit is a protocol change and must fail a test.

Bounds that test_wire, test_envelope, test_negotiation, test_keyring, test_streams and
test_rekey already probe exactly at the edge are not repeated here; :class:`PublishedLimitsTests`
pins the constants those tests read from the modules, so together they catch a limit moved by one.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import TestCase

from ppbridge import envelope, keys, negotiation, wire
from ppbridge.channels import Channels
from ppbridge.errors import BusMessageError
from ppbridge.httpheaders import forwarded_request_headers
from ppbridge.keyring import Keyring
from ppbridge.negotiation import (
    ANY_FORWARDER,
    LABEL_REQUEST,
    ForwarderNegotiator,
    NewSession,
    ProxyNegotiator,
    _grant_signed_data,
)
from ppbridge.rekey import FixedPolicy, RekeySchedule
from ppbridge.streams import RecentlyClosed
from ppbridge.wire import (
    KeyGrant,
    KeyRequest,
    MsgType,
    Reader,
    RequestHead,
    ResponseHead,
    Role,
    Writer,
    decode_signed,
    encode_signed,
    unpack_header,
)
from tests.test_envelope import CHANNEL, STREAM, open_message, pair, session_keys
from tests.test_keyring import PROXY_A, session
from tests.test_negotiation import (
    CHANNELS,
    FORWARDER_ID,
    FRAME,
    INSTANCE,
    SKEW,
    T0,
    WINDOW,
    forwarder_negotiator,
    private,
    proxy_negotiator,
    public,
    reason,
)
from tests.test_streams import Consumer, inbound
from tests.test_wire import key_grant, key_request, raw_request_head, raw_response_head, signed

# The published numbers (docs/PROTOCOL.md sections 3 and 4, and the wire format).
UNKNOWN = 2**64 - 1  # Content-Length "none/unknown"
PENDING = 10.0  # seconds a key request accepts grants; an unconfirmed key waits for its CONFIRM
MIN_LIFETIME_MS = 1000
ANSWER_WAIT = 3.0


def raw_blob16(payload: bytes, declared: int | None = None) -> bytes:
    """A u16 length (``declared``, default the real one) followed by ``payload``."""
    return struct.pack(">H", len(payload) if declared is None else declared) + payload


def raw_blob32(payload: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if declared is None else declared) + payload


def fresh_x25519() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def signed_request(channels: Channels = CHANNELS, **changes: Any) -> bytes:
    """A KEY_REQUEST from proxy alpha, validly signed, with any field changed (a fresh nonce
    and X25519 key each time, timestamp T0, addressed to every forwarder)."""
    fields: dict[str, Any] = {
        "proxy": "alpha", "instance": INSTANCE, "reply_channel": channels.negotiation_temp("alpha"),
        "nonce": os.urandom(16), "timestamp_ms": int(T0 * 1000), "ephemeral": fresh_x25519(),
        "frame_size": FRAME, "window": WINDOW, "target": ANY_FORWARDER,
    }
    fields.update(changes)
    body = KeyRequest(**fields).encode_body()
    return encode_signed(body, keys.sign(private("alpha"), LABEL_REQUEST + channels.negotiate + body))


def granted(result: tuple[bytes, bytes, NewSession] | None) -> tuple[KeyGrant, NewSession]:
    """The decoded grant and the forwarder's session of a handle_request result."""
    assert result is not None, "the request was ignored"
    grant, _, _ = decode_signed(result[1], KeyGrant)
    return grant, result[2]


def grant_on(channel: bytes, request: KeyRequest, secret: bytes = b"s" * 32, **changes: Any) -> bytes:
    """A grant answering ``request`` on ``channel``, signed with the pinned forwarder key,
    wrapping ``secret`` for the requesting proxy, with any grant field changed."""
    fields: dict[str, Any] = {
        "forwarder": FORWARDER_ID, "request_nonce": request.nonce, "key_id": os.urandom(8),
        "wrapped": keys.wrap(public(request.proxy), secret), "ephemeral": fresh_x25519(),
        "frame_size": FRAME, "window": WINDOW, "timestamp_ms": request.timestamp_ms,
    }
    fields.update(changes)
    body = KeyGrant(**fields).encode_body()
    return encode_signed(body, keys.sign(private("forwarder"), _grant_signed_data(channel, request, body)))


def pinned_grant(proxy: ProxyNegotiator, now: float = T0, **changes: Any) -> tuple[bytes, bytes]:
    """(channel, grant) for a fresh request of ``proxy`` made at ``now`` (see grant_on)."""
    channel, request_data = proxy.make_request(now)
    request, _, _ = decode_signed(request_data, KeyRequest)
    return channel, grant_on(channel, request, **changes)


class PublishedLimitsTests(TestCase):
    """The limits other tests read from the modules are the published numbers."""

    def test_wire_limits(self) -> None:
        """wire's limits are those of protocol version 3: 32-byte methods, 64 KiB targets and
        values, 500 headers, 256-byte header names and channels, proxy names of 1 to 63 characters, 1 KiB reasons and signatures, 256 KiB
        header blocks, 2**64-1 for an unknown length, 40-byte headers and 16-byte tags."""
        self.assertEqual(
            (wire.VERSION, wire.MAX_METHOD, wire.MAX_TARGET, wire.MAX_HEADERS, wire.MAX_HEADER_NAME,
             wire.MAX_HEADER_VALUE, wire.MAX_CHANNEL, wire.MAX_REASON, wire.MAX_HEADER_BLOCK, wire.MAX_SIGNATURE,
             wire.UNKNOWN_LENGTH, wire.HEADER_SIZE, wire.TAG_SIZE, wire.NAME_RE),
            (3, 32, 65536, 500, 256, 65536, 256, 1024, 262144, 1024, UNKNOWN, 40, 16,
             r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"),
        )

    def test_crypto_and_negotiation_limits(self) -> None:
        """Counters run up to 2**64-1 (exclusive), secrets are 32 bytes, a request accepts grants
        for 10 s and holds back a repeat for 3 s, and a key lives at least 1000 ms."""
        self.assertEqual(
            (envelope.MAX_COUNTER, negotiation.SECRET_SIZE, negotiation.PENDING_LIFETIME,
             negotiation.ANSWER_WAIT, negotiation.MIN_LIFETIME_MS),
            (2**64 - 1, 32, PENDING, ANSWER_WAIT, MIN_LIFETIME_MS),
        )


class ReaderBoundsTests(TestCase):
    """wire.Reader's length-prefixed reads: a length at its limit is read, one over is refused
    before anything is read, and a length past the end of the data is refused."""

    def test_blob16_at_and_over_its_limit(self) -> None:
        """blob16(limit) returns a field of exactly ``limit`` bytes (and of none with limit 0);
        a length of limit+1 is malformed even when that many bytes follow."""
        self.assertEqual(Reader(raw_blob16(b"x" * 10)).blob16(10), b"x" * 10)
        self.assertEqual(Reader(raw_blob16(b"")).blob16(0), b"")
        for data, limit in ((raw_blob16(b"x" * 11), 10), (raw_blob16(b"x"), 0)):
            self.assertEqual(self.assertRaises(BusMessageError, Reader(data).blob16, limit).reason, "malformed")

    def test_blob32_at_and_over_its_limit(self) -> None:
        """blob32(limit) returns a field of exactly ``limit`` bytes (and of none with limit 0);
        a length of limit+1 is malformed even when that many bytes follow."""
        self.assertEqual(Reader(raw_blob32(b"y" * 10)).blob32(10), b"y" * 10)
        self.assertEqual(Reader(raw_blob32(b"")).blob32(0), b"")
        for data, limit in ((raw_blob32(b"y" * 11), 10), (raw_blob32(b"y"), 0)):
            self.assertEqual(self.assertRaises(BusMessageError, Reader(data).blob32, limit).reason, "malformed")

    def test_length_past_the_end(self) -> None:
        """A blob whose length names one byte more than follows is malformed (both widths); one
        that ends exactly at the end of the data is read, and done() then accepts it."""
        for make, read in ((raw_blob16, Reader.blob16), (raw_blob32, Reader.blob32)):
            short = Reader(make(b"z" * 5, declared=6))
            self.assertEqual(self.assertRaises(BusMessageError, read, short, 100).reason, "malformed")
            exact = Reader(make(b"z" * 5))
            self.assertEqual(read(exact, 100), b"z" * 5)
            exact.done()

    def test_fixed_reads_up_to_the_last_byte(self) -> None:
        """u8/u16/u32/u64 and raw() read a field ending on the last byte; one byte further is malformed."""
        data = Writer().u8(1).u16(2).u32(3).u64(4).raw(b"end").bytes()
        r = Reader(data)
        self.assertEqual((r.u8(), r.u16(), r.u32(), r.u64(), r.raw(3)), (1, 2, 3, 4, b"end"))
        r.done()
        self.assertEqual(self.assertRaises(BusMessageError, r.u8).reason, "malformed")
        self.assertEqual(self.assertRaises(BusMessageError, Reader(data[:-1], 15).raw, 3).reason, "malformed")


class HeadBoundsTests(TestCase):
    """Request and response heads: the bounds test_wire does not probe at the edge."""

    @staticmethod
    def _big_head(last_value: int) -> bytes:
        """A request head whose four headers make a block of 262136 + ``last_value`` bytes
        (names A..D, values of 65536, 65536, 65536 and ``last_value`` bytes, 7 NULs)."""
        headers = [(b"A", b"a" * 65536), (b"B", b"b" * 65536), (b"C", b"c" * 65536), (b"D", b"d" * last_value)]
        return raw_request_head(headers=headers)

    def test_header_block_at_and_over_256_kib(self) -> None:
        """A header block of exactly 256 KiB (262144 bytes) decodes to its four headers; one of
        262145 bytes, every header in it within its own limits, is malformed."""
        head, body = RequestHead.decode(self._big_head(65525))
        self.assertEqual([(n, len(v)) for n, v in head.headers], [(b"A", 65536), (b"B", 65536), (b"C", 65536),
                                                                 (b"D", 65525)])
        self.assertEqual(body, b"")
        err = self.assertRaises(BusMessageError, RequestHead.decode, self._big_head(65526))
        self.assertEqual(err.reason, "malformed")
        self.assertIn("over its limit", str(err))

    def test_target_characters_at_the_control_bounds(self) -> None:
        """Target bytes next to the refused ranges are accepted ('!' 0x21, '~' 0x7e, 0x80 and
        0xff); the edges of those ranges (0x1f, space 0x20, DEL 0x7f) are malformed; the
        shortest target, "/", is accepted."""
        for target in (b"/", b"/a!b", b"/a~b", b"/a\x80b", b"/a\xffb"):
            self.assertEqual(RequestHead.decode(raw_request_head(target=target))[0].target, target)
        for target in (b"/a\x1fb", b"/a b", b"/a\x7fb"):
            err = self.assertRaises(BusMessageError, RequestHead.decode, raw_request_head(target=target))
            self.assertEqual(err.reason, "malformed", target)

    def test_unknown_length_is_exactly_two_to_the_64_minus_one(self) -> None:
        """In both heads, a Content-Length of 2**64-1 means unknown (None) and 2**64-2 is a
        length like any other; encoding None gives 2**64-1 back."""
        self.assertIsNone(RequestHead.decode(raw_request_head(length=UNKNOWN))[0].content_length)
        self.assertEqual(RequestHead.decode(raw_request_head(length=UNKNOWN - 1))[0].content_length, UNKNOWN - 1)
        self.assertIsNone(ResponseHead.decode(raw_response_head(length=UNKNOWN))[0].content_length)
        self.assertEqual(ResponseHead.decode(raw_response_head(length=UNKNOWN - 1))[0].content_length, UNKNOWN - 1)
        encoded = ResponseHead(200, b"OK", [], None).encode()
        self.assertEqual(struct.unpack_from(">Q", encoded, 8)[0], UNKNOWN)

    def test_encoder_nul_and_count(self) -> None:
        """The encoder refuses a NUL in a header name or value (ValueError, before anything is
        sent) and accepts names and values without one, an empty value, no headers at all and
        exactly 500 headers (501 are refused, see test_wire)."""
        for headers in ([(b"X\0Y", b"v")], [(b"X", b"v\0")], [(b"A", b"1"), (b"\0", b"2")], [(b"X", b"\0")]):
            self.assertRaises(ValueError, ResponseHead(200, b"OK", headers, 0).encode)
        for headers in ([], [(b"X", b"")], [(b"X", b"v")] * 500):
            decoded, _ = ResponseHead.decode(ResponseHead(200, b"OK", headers, 0).encode())
            self.assertEqual(decoded.headers, headers)


class SignedBoundsTests(TestCase):
    """Negotiation messages: the field limits test_wire checks only from one side."""

    def test_proxy_name_of_63_characters(self) -> None:
        """A proxy name of 63 characters (the longest the name rules allow) and of one are
        accepted; 64 are refused (test_wire)."""
        for name in ("a" * 63, "a", "A0_.-" + "z" * 58):
            decoded, _, _ = decode_signed(signed(key_request(proxy=name)), KeyRequest)
            self.assertEqual(decoded.proxy, name)

    def test_reply_channel_of_256_bytes(self) -> None:
        """A key request whose reply channel has 256 bytes decodes (257 are refused, see test_wire)."""
        decoded, _, _ = decode_signed(signed(key_request(reply_channel=b"c" * 256)), KeyRequest)
        self.assertEqual(decoded.reply_channel, b"c" * 256)

    def test_wrapped_secret_field_at_and_over_1024_bytes(self) -> None:
        """A grant's wrapped-secret field of 1024 bytes (an 8192-bit RSA key) decodes; 1025 bytes
        are malformed."""
        decoded, _, _ = decode_signed(signed(key_grant(wrapped=b"w" * 1024)), KeyGrant)
        self.assertEqual(decoded.wrapped, b"w" * 1024)
        err = self.assertRaises(BusMessageError, decode_signed, signed(key_grant(wrapped=b"w" * 1025)), KeyGrant)
        self.assertEqual(err.reason, "malformed")


class EnvelopeBoundsTests(TestCase):
    """The nonce layout and the last counter of a key."""

    def test_nonce_is_role_three_zeros_and_counter(self) -> None:
        """A sealed message opens with plain AES-GCM under the sender's direction key with the
        12-byte nonce role byte || 00 00 00 || 8-byte big-endian counter, and the 40 header
        bytes || channel as associated data (forwarder: role 0; proxy: role 1)."""
        direction_keys = session_keys()
        forwarder, proxy = pair(direction_keys)
        for sealer, role in ((forwarder, 0), (proxy, 1)):
            sealer.sent = 0x0102030405060708
            data = bytes(sealer.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, b"known answer"))
            nonce = bytes([role, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
            aead = AESGCM(direction_keys[Role(role)])
            self.assertEqual(aead.decrypt(nonce, data[40:], data[:40] + CHANNEL), b"known answer")

    def test_last_counter_seals_then_none(self) -> None:
        """Counter 2**64-2 is the last one sealed (and it opens at the peer); the next seal
        raises RuntimeError and consumes no counter."""
        forwarder, proxy = pair()
        forwarder.sent = 2**64 - 2
        data = bytes(forwarder.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, b"last"))
        self.assertEqual(unpack_header(data).counter, 2**64 - 2)
        self.assertEqual(open_message(proxy, data), b"last")
        self.assertRaises(RuntimeError, forwarder.seal, MsgType.REQ_DATA, STREAM, 2, CHANNEL, b"one more")
        self.assertEqual(forwarder.sent, 2**64 - 1)


class RequestCheckBoundsTests(TestCase):
    """The forwarder's checks of a key request: clock skew, nonce memory, reply channel, X25519 key."""

    def setUp(self) -> None:
        self.forwarder = forwarder_negotiator()

    def test_skew_exactly_at_max_clock_skew(self) -> None:
        """A request timestamped exactly max_clock_skew (300 s) before or after the forwarder's
        clock is granted; one millisecond further either way it is stale."""
        # The float arithmetic below lands on whole milliseconds (no truncation surprises):
        self.assertEqual([int((T0 + d) * 1000) - int(T0 * 1000) for d in (300.001, -300.001)], [300_001, -300_001])
        for offset in (300.0, -300.0):
            self.assertIsNotNone(self.forwarder.handle_request(signed_request(), T0 + offset))
        for offset in (300.001, -300.001):
            self.assertEqual(reason(self, self.forwarder.handle_request, signed_request(), T0 + offset), "stale")

    def test_announce_skew_exactly_at_max_clock_skew(self) -> None:
        """An announcement exactly 300 s old or early is accepted; a millisecond further it is stale."""
        proxy = proxy_negotiator()
        for offset in (300.0, -300.0):
            self.assertEqual(proxy.verify_announce(self.forwarder.announce(T0), T0 + offset).forwarder, FORWARDER_ID)
        for offset in (300.001, -300.001):
            self.assertEqual(reason(self, proxy.verify_announce, self.forwarder.announce(T0), T0 + offset), "stale")

    def test_nonce_remembered_while_its_request_can_be_fresh(self) -> None:
        """A proxy whose clock runs 300 s ahead sends a request the forwarder grants at T0 (skew
        exactly 300 s). At T0+600 that request is still fresh (it is 300 s behind now), and
        although another request accepted at T0+600 made the forwarder tidy its nonces, a
        replay then is refused as "replay". A millisecond later the replay is stale, and the
        next accepted request forgets its nonce (the memory stays bounded)."""
        first = signed_request(timestamp_ms=int((T0 + 300) * 1000))
        first_nonce = decode_signed(first, KeyRequest)[0].nonce
        self.assertIsNotNone(self.forwarder.handle_request(first, T0))
        later = signed_request(timestamp_ms=int((T0 + 900) * 1000))
        self.assertIsNotNone(self.forwarder.handle_request(later, T0 + 600))
        self.assertEqual(reason(self, self.forwarder.handle_request, first, T0 + 600), "replay")
        self.assertEqual(reason(self, self.forwarder.handle_request, first, T0 + 600.001), "stale")
        self.assertIsNotNone(self.forwarder.handle_request(signed_request(timestamp_ms=int((T0 + 600) * 1000)),
                                                           T0 + 600.001))
        self.assertNotIn(first_nonce, self.forwarder._seen)

    def test_reply_channel_of_exactly_32_hex_digits_after_the_prefix(self) -> None:
        """The reply channel must be ``ppbridge:n:alpha:`` (the requesting proxy's name) and
        exactly 32 more lowercase hex digits: 32 are granted (on that channel); 31 or 33, an
        upper-case or non-hex digit, the bare prefix, no proxy name (the version 2 layout), or
        the prefix of another namespace, are malformed; another proxy's prefix is
        ``bad-reply-channel``."""
        good = b"ppbridge:n:alpha:" + b"0" * 32
        result = self.forwarder.handle_request(signed_request(reply_channel=good), T0)
        self.assertEqual(result and result[0], good)
        for bad in (b"ppbridge:n:alpha:" + b"0" * 31, b"ppbridge:n:alpha:" + b"0" * 33,
                    b"ppbridge:n:alpha:" + b"A" * 32, b"ppbridge:n:alpha:" + b"g" * 32, b"ppbridge:n:alpha:",
                    b"ppbridge:n:" + b"0" * 32, b"staging:n:alpha:" + b"0" * 32, b"ppbridge:x:alpha:" + b"0" * 32):
            self.assertEqual(reason(self, self.forwarder.handle_request, signed_request(reply_channel=bad), T0),
                             "malformed", bad)
        self.assertEqual(reason(self, self.forwarder.handle_request,
                                signed_request(reply_channel=b"ppbridge:n:beta:" + b"0" * 32), T0), "bad-reply-channel")
        # The check follows the namespace.
        staging = ForwarderNegotiator(FORWARDER_ID, private("forwarder"), {"alpha": public("alpha")},
                                      Channels("staging"), FRAME, WINDOW, SKEW)
        request = signed_request(Channels("staging"), reply_channel=b"staging:n:alpha:" + b"1" * 32)
        self.assertIsNotNone(staging.handle_request(request, T0))

    def test_unusable_x25519_key_in_request(self) -> None:
        """A validly signed request whose X25519 key is all zeros, or another low-order point
        (u = 1), gets no grant: "bad-ephemeral" (not an exception of another kind)."""
        for point in (bytes(32), b"\x01" + bytes(31)):
            self.assertEqual(reason(self, self.forwarder.handle_request, signed_request(ephemeral=point), T0),
                             "bad-ephemeral")


class GrantTermsBoundsTests(TestCase):
    """What the forwarder grants: lifetime clamped to [1000 ms, its cap], budget at least 1."""

    def setUp(self) -> None:
        self.forwarder = ForwarderNegotiator(FORWARDER_ID, private("forwarder"), {"alpha": public("alpha")},
                                             CHANNELS, FRAME, WINDOW, SKEW, max_lifetime=100.0)

    def terms(self, **changes: Any) -> tuple[int, int, float, int]:
        """(lifetime_ms, max_messages) of the grant and (lifetime, max_messages) of the session."""
        grant, session = granted(self.forwarder.handle_request(signed_request(**changes), T0))
        return grant.lifetime_ms, grant.max_messages, session.lifetime, session.max_messages

    def test_lifetime_floor_of_1000_ms(self) -> None:
        """A request for 999 ms gets 1000 ms; 1000 ms and 1001 ms are granted as asked."""
        self.assertEqual(self.terms(lifetime_ms=999)[::2], (1000, 1.0))
        self.assertEqual(self.terms(lifetime_ms=1000)[::2], (1000, 1.0))
        self.assertEqual(self.terms(lifetime_ms=1001)[::2], (1001, 1.001))
        self.assertEqual(self.terms(lifetime_ms=0)[::2], (1000, 1.0))

    def test_lifetime_capped_by_the_forwarder(self) -> None:
        """With a 100 s cap, 99999 ms and 100000 ms are granted as asked; 100001 ms (or the
        most a u32 holds) gets 100000 ms."""
        self.assertEqual(self.terms(lifetime_ms=99_999)[::2], (99_999, 99.999))
        self.assertEqual(self.terms(lifetime_ms=100_000)[::2], (100_000, 100.0))
        self.assertEqual(self.terms(lifetime_ms=100_001)[::2], (100_000, 100.0))
        self.assertEqual(self.terms(lifetime_ms=2**32 - 1)[::2], (100_000, 100.0))

    def test_message_budget_at_least_one(self) -> None:
        """A budget of 0 is granted as 1; 1 and 2 are granted as asked."""
        for asked, given in ((0, 1), (1, 1), (2, 2)):
            _, messages, _, session_messages = self.terms(max_messages=asked)
            self.assertEqual((messages, session_messages), (given, given), asked)


class GrantCheckBoundsTests(TestCase):
    """The proxy's checks of a grant: request lifetime, secret size, X25519 key, agreed limits."""

    def setUp(self) -> None:
        self.proxy = ProxyNegotiator("alpha", INSTANCE, private("alpha"), public("forwarder"), CHANNELS, FRAME,
                                     WINDOW, SKEW, lifetime=100.0, max_messages=1000)

    def test_grant_exactly_at_the_end_of_the_pending_lifetime(self) -> None:
        """A grant for a request sent at T0 is accepted at T0+10 s; at T0+10.001 s it is an
        "unexpected-grant"."""
        channel, grant = pinned_grant(self.proxy)
        self.assertEqual(self.proxy.expire(T0 + PENDING), [])
        self.assertEqual(self.proxy.handle_grant(channel, grant, T0 + PENDING).forwarder, FORWARDER_ID)
        channel, grant = pinned_grant(self.proxy)
        self.assertEqual(reason(self, self.proxy.handle_grant, channel, grant, T0 + PENDING + 0.001),
                         "unexpected-grant")

    def test_expire_exactly_at_the_end_of_the_pending_lifetime(self) -> None:
        """expire() at T0+10 s keeps a request sent at T0 (still pending); at T0+10.001 s it
        returns its channel and forgets it."""
        channel, _ = self.proxy.make_request(T0)
        self.assertEqual(self.proxy.expire(T0 + PENDING), [])
        self.assertTrue(self.proxy.is_pending(channel))
        self.assertEqual(self.proxy.expire(T0 + PENDING + 0.001), [channel])
        self.assertFalse(self.proxy.is_pending(channel))

    def test_grant_on_a_channel_without_request(self) -> None:
        """A validly signed grant on a channel with no pending request is an "unexpected-grant"."""
        _, grant = pinned_grant(self.proxy)
        self.assertEqual(reason(self, self.proxy.handle_grant, CHANNELS.negotiation_temp("alpha"), grant, T0),
                         "unexpected-grant")

    def test_wrapped_secret_of_exactly_32_bytes(self) -> None:
        """A secret of 31 or 33 bytes, validly wrapped and signed, is "bad-wrap"; 32 bytes open."""
        for size in (31, 33, 0):
            channel, grant = pinned_grant(self.proxy, secret=b"s" * size)
            self.assertEqual(reason(self, self.proxy.handle_grant, channel, grant, T0), "bad-wrap", size)
        channel, grant = pinned_grant(self.proxy, secret=b"s" * 32)
        self.proxy.handle_grant(channel, grant, T0)

    def test_unusable_x25519_key_in_grant(self) -> None:
        """A grant signed with the pinned key whose X25519 key is all zeros (or u = 1) is
        "bad-ephemeral"; the refusal does not count as that forwarder's grant, so its usable
        grant on the same channel, for the same request, is accepted afterwards."""
        channel, request_data = self.proxy.make_request(T0)
        request, _, _ = decode_signed(request_data, KeyRequest)
        for point in (bytes(32), b"\x01" + bytes(31)):
            grant = grant_on(channel, request, ephemeral=point)
            self.assertEqual(reason(self, self.proxy.handle_grant, channel, grant, T0), "bad-ephemeral")
        self.assertEqual(self.proxy.handle_grant(channel, grant_on(channel, request), T0).forwarder, FORWARDER_ID)

    def test_session_limits_are_the_smaller_of_asked_and_granted(self) -> None:
        """The proxy asked for 100 s and 1000 messages: a grant of 100.001 s and 1001 messages
        gives a session of 100 s and 1000; a grant of 99.999 s and 999 gives exactly those."""
        channel, grant = pinned_grant(self.proxy, lifetime_ms=100_001, max_messages=1001)
        session = self.proxy.handle_grant(channel, grant, T0)
        self.assertEqual((session.lifetime, session.max_messages), (100.0, 1000))
        channel, grant = pinned_grant(self.proxy, lifetime_ms=99_999, max_messages=999)
        session = self.proxy.handle_grant(channel, grant, T0)
        self.assertEqual((session.lifetime, session.max_messages), (99.999, 999))

    def test_answer_wait_bound(self) -> None:
        """An unanswered request holds back another to the same target for less than 3 s: it is
        listed at T0+2.999 s and no longer at T0+3 s; a granted one is never listed."""
        self.proxy.make_request(T0)
        self.assertEqual(self.proxy.unanswered_targets(T0 + 2.999), {ANY_FORWARDER})
        self.assertEqual(self.proxy.unanswered_targets(T0 + ANSWER_WAIT), set())
        proxy = proxy_negotiator()
        channel, grant = pinned_grant(proxy)
        proxy.handle_grant(channel, grant, T0)
        self.assertEqual(proxy.unanswered_targets(T0), set())


class KeyringBoundsTests(TestCase):
    """Keyring.expire at the end of the confirmation wait."""

    def test_unconfirmed_key_exactly_at_the_pending_lifetime(self) -> None:
        """An unconfirmed key added at T0 survives expire(T0+10 s) and is dropped by
        expire(T0+10.001 s)."""
        ring = Keyring(60.0, lambda: T0)
        entry = ring.add(session(), PROXY_A, T0, confirmed=False)
        self.assertEqual(ring.expire(T0 + PENDING), 0)
        self.assertIs(ring.get(entry.key_id, T0 + PENDING), entry)
        self.assertEqual(ring.expire(T0 + PENDING + 0.001), 1)
        self.assertEqual(len(ring), 0)

    def test_confirmed_and_unretired_keys_outlive_the_pending_lifetime(self) -> None:
        """A confirmed, current key that was never retired is not dropped by expire() long after
        the confirmation wait (only unconfirmed keys are, and only retired keys by retire_at)."""
        ring = Keyring(60.0, lambda: T0)
        entry = ring.add(session(), PROXY_A, T0, confirmed=True)
        self.assertIsNone(entry.retire_at)
        self.assertEqual(ring.expire(T0 + 1000 * PENDING), 0)
        self.assertIs(ring.current(PROXY_A), entry)


    def test_confirmation_after_the_pending_lifetime_is_refused(self) -> None:
        """A CONFIRM for a key granted at T0 is accepted at T0+10 s and refused at T0+10.001 s,
        without waiting for the next expire()."""
        ring = Keyring(60.0, lambda: T0)
        on_time = ring.add(session(), PROXY_A, T0, confirmed=False)
        late = ring.add(session(), PROXY_A, T0, confirmed=False)
        self.assertFalse(ring.confirm(late.key_id, PROXY_A, T0 + PENDING + 0.001))
        self.assertIsNone(ring.current(PROXY_A))
        self.assertTrue(ring.confirm(on_time.key_id, PROXY_A, T0 + PENDING))
        self.assertIs(ring.current(PROXY_A), on_time)


class ReasonPhraseTests(TestCase):
    """The reason phrase of a response head: RFC 9112's HTAB, SP, VCHAR and obs-text only."""

    def test_control_bytes_refused_tab_and_obs_text_accepted(self) -> None:
        """NUL, \\x01, \\x08, \\x0b, \\x1f and DEL in a reason are malformed; HTAB, space,
        printable ASCII and bytes 0x80-0xff decode as sent; clean_reason removes exactly the
        refused bytes."""
        for bad in (b"O\x00K", b"\x01", b"a\x08", b"\x0b", b"\x1f", b"x\x7f"):
            err = self.assertRaises(BusMessageError, wire.ResponseHead.decode, raw_response_head(reason=bad))
            self.assertEqual(err.reason, "malformed", bad)
        for good in (b"OK\tfine", b"Not Found", b"caf\xc3\xa9 \x80\xff", b"~!"):
            head, _ = wire.ResponseHead.decode(raw_response_head(reason=good))
            self.assertEqual(head.reason, good)
        self.assertEqual(wire.clean_reason(b"O\x00K\x0b\x7f \tfine\x80"), b"OK \tfine\x80")


class RecentlyClosedTests(TestCase):
    """The bounded memory of ended streams."""

    def test_membership(self) -> None:
        """An added id is a member; an id never added is not."""
        closed = RecentlyClosed(size=3)
        self.assertNotIn(b"a", closed)
        closed.add(b"a")
        self.assertIn(b"a", closed)
        self.assertNotIn(b"b", closed)

    def test_holds_exactly_size_ids(self) -> None:
        """With size 3, three ids are all kept; a fourth pushes out the oldest, and only it."""
        closed = RecentlyClosed(size=3)
        for key in (b"a", b"b", b"c"):
            closed.add(key)
        self.assertEqual([k in closed for k in (b"a", b"b", b"c")], [True, True, True])
        closed.add(b"d")
        self.assertEqual([k in closed for k in (b"a", b"b", b"c", b"d")], [False, True, True, True])

    def test_adding_again_takes_no_second_place(self) -> None:
        """An id added twice occupies one place: with size 3, a, a, b, c keeps all three, and d
        then pushes out a."""
        closed = RecentlyClosed(size=3)
        for key in (b"a", b"a", b"b", b"c"):
            closed.add(key)
        self.assertEqual([k in closed for k in (b"a", b"b", b"c")], [True, True, True])
        closed.add(b"d")
        self.assertEqual([k in closed for k in (b"a", b"b", b"c", b"d")], [False, True, True, True])

    def test_default_size_is_4096(self) -> None:
        """By default 4096 stream ids are remembered: the first survives 4095 more, not 4096."""
        closed = RecentlyClosed()
        for i in range(4096):
            closed.add(i)
        self.assertIn(0, closed)
        closed.add(4096)
        self.assertNotIn(0, closed)
        self.assertIn(1, closed)


class WindowUpdateBoundsTests(TestCase):
    """Inbound returns credit once the consumer has taken half a window."""

    def test_update_at_exactly_half_the_window(self) -> None:
        """With a window of 101 bytes (half is 50, rounded down), 49 bytes taken send no WINDOW
        and the 50th sends one of 50."""
        stream, updates = inbound(101)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"x" * 49, False)
        self.assertEqual(updates, [])
        stream.data(b"x", False)
        self.assertEqual(updates, [50])


class RekeyBoundsTests(TestCase):
    """Rotation by messages with odd and tiny budgets."""

    def test_odd_budget_rounds_half_down(self) -> None:
        """With messages_per_key 1001, 499 messages are not due and 500 are "messages"."""
        schedule = RekeySchedule(FixedPolicy(600.0), 1001, 86400.0)
        self.assertIsNone(schedule.due(T0, T0, 499))
        self.assertEqual(schedule.due(T0, T0, 500), "messages")

    def test_budget_of_one_is_due_after_one_message(self) -> None:
        """With messages_per_key 1 (half is 0) a fresh key is not due, one message makes it due."""
        schedule = RekeySchedule(FixedPolicy(600.0), 1, 86400.0)
        self.assertIsNone(schedule.due(T0, T0, 0))
        self.assertEqual(schedule.due(T0, T0, 1), "messages")


class ForwardedHostTests(TestCase):
    """forwarded_request_headers when there is no routing host."""

    def test_without_routing_host_the_clients_host_is_passed_once(self) -> None:
        """With ``host`` None, a Host header the client sent is passed on with its own value,
        once (the first), and no X-Forwarded-Host is added; with a routing host it is replaced."""
        headers = [(b"Host", b"client.example"), (b"host", b"second.example")]
        out = forwarded_request_headers(headers, b"203.0.113.7", None, b"http")
        self.assertEqual(out, [(b"Host", b"client.example"), (b"X-Forwarded-For", b"203.0.113.7"),
                               (b"X-Forwarded-Proto", b"http")])
        out = forwarded_request_headers(headers, b"203.0.113.7", b"routed.example", b"http")
        self.assertEqual(out[0], (b"Host", b"routed.example"))
