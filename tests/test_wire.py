"""Tests for ppbridge.wire: round trips of every message and strict, total decoding."""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from typing import Any, Callable

from twisted.trial.unittest import TestCase

from ppbridge.errors import BusMessageError
from ppbridge.wire import (
    FLAG_END,
    HEADER_SIZE,
    MAX_CHANNEL,
    MAX_HEADER_NAME,
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    MAX_METHOD,
    MAX_REASON,
    MAX_SIGNATURE,
    MAX_TARGET,
    OVERHEAD,
    TAG_SIZE,
    VERSION,
    Announce,
    Header,
    KeyGrant,
    KeyRequest,
    MsgType,
    RequestHead,
    ResponseHead,
    Role,
    Writer,
    decode_reset,
    decode_signed,
    decode_window,
    encode_reset,
    encode_signed,
    encode_window,
    pack_header,
    peek_type,
    unpack_header,
)

KEY_ID = bytes(range(1, 9))
STREAM_ID = bytes(range(16, 32))
TAG = b"T" * TAG_SIZE


def session_message(mtype: MsgType = MsgType.REQ_DATA, flags: int = FLAG_END, sender: Role = Role.PROXY) -> bytes:
    """A header with recognisable fields followed by a tag-sized tail."""
    return pack_header(mtype, flags, sender, KEY_ID, 0x0102030405060708, STREAM_ID, 0xA0B0C0D) + TAG


def request_head(**changes: Any) -> RequestHead:
    fields: dict[str, Any] = {
        "method": b"POST",
        "target": b"/office/report?year=2024&q=a%20b",
        "headers": [(b"Content-Type", b"application/json"), (b"X-Empty", b""), (b"Set-Cookie", b"a=1"),
                    (b"Set-Cookie", b"b=2")],
        "reply_channel": b"ppbridge:f:0102030405060708:r" + b"ab" * 16,
        "content_length": 12345,
    }
    fields.update(changes)
    return RequestHead(**fields)


def response_head(**changes: Any) -> ResponseHead:
    fields: dict[str, Any] = {
        "status": 201,
        "reason": b"Created",
        "headers": [(b"Location", b"/things/1"), (b"Content-Length", b"5")],
        "content_length": 5,
    }
    fields.update(changes)
    return ResponseHead(**fields)


def key_request(**changes: Any) -> KeyRequest:
    fields: dict[str, Any] = {
        "proxy": "office-1.intranet",
        "instance": b"I" * 8,
        "reply_channel": b"ppbridge:n:" + b"cd" * 16,
        "nonce": bytes(range(16)),
        "timestamp_ms": 1_700_000_000_123,
        "ephemeral": b"E" * 32,
        "frame_size": 262144,
        "window": 1048576,
        "target": bytes(8),
    }
    fields.update(changes)
    return KeyRequest(**fields)


def key_grant(**changes: Any) -> KeyGrant:
    fields: dict[str, Any] = {
        "forwarder": b"F" * 8,
        "request_nonce": bytes(range(16)),
        "key_id": KEY_ID,
        "wrapped": os.urandom(256),
        "ephemeral": b"G" * 32,
        "frame_size": 65536,
        "window": 131072,
        "timestamp_ms": 1_700_000_000_456,
    }
    fields.update(changes)
    return KeyGrant(**fields)


def announce(**changes: Any) -> Announce:
    fields: dict[str, Any] = {"forwarder": b"F" * 8, "nonce": b"N" * 16, "timestamp_ms": 1_700_000_000_789}
    fields.update(changes)
    return Announce(**fields)


SIGNATURE = b"S" * 256


def signed(message: KeyRequest | KeyGrant | Announce, signature: bytes = SIGNATURE) -> bytes:
    return encode_signed(message.encode_body(), signature)


def _block(headers: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    parts = [part for pair in headers for part in pair] if count is None else [b"X", b"v"] * count
    return b"\0".join(parts)


def raw_request_head(reply: bytes = b"ch", method: bytes = b"GET", target: bytes = b"/",
                     headers: list[tuple[bytes, bytes]] | None = None, count: int | None = None,
                     length: int = 0) -> bytes:
    """A request head encoded by hand, so it can break rules the encoder would not."""
    block = _block(headers or [], count)
    fixed = struct.pack(">HBIIQQ", len(reply), len(method), len(target), len(block), length, 0)
    return fixed + reply + method + target + block


def raw_response_head(status: int = 200, reason: bytes = b"OK", headers: list[tuple[bytes, bytes]] | None = None,
                      length: int = 0) -> bytes:
    block = _block(headers or [])
    return struct.pack(">HHIQ", status, len(reason), len(block), length) + reason + block


DECODERS: dict[str, Callable[[bytes], object]] = {
    "peek_type": peek_type,
    "unpack_header": unpack_header,
    "RequestHead": RequestHead.decode,
    "ResponseHead": ResponseHead.decode,
    "window": decode_window,
    "reset": decode_reset,
    "KeyRequest": lambda data: decode_signed(data, KeyRequest),
    "KeyGrant": lambda data: decode_signed(data, KeyGrant),
    "Announce": lambda data: decode_signed(data, Announce),
}


class HeaderTests(TestCase):
    """The 40-byte cleartext header of session messages."""

    def test_round_trip(self) -> None:
        """Every field packed by pack_header comes back from unpack_header unchanged."""
        header = unpack_header(session_message())
        self.assertEqual(header, Header(VERSION, MsgType.REQ_DATA, FLAG_END, Role.PROXY, KEY_ID,
                                        0x0102030405060708, STREAM_ID, 0xA0B0C0D))
        self.assertTrue(header.end)
        self.assertIs(header.type, MsgType.REQ_DATA)
        self.assertIs(header.sender, Role.PROXY)

    def test_pack_matches_pack_header(self) -> None:
        """Header.pack reproduces the exact bytes it was parsed from (the AAD both sides compute)."""
        data = session_message(MsgType.WINDOW, 0, Role.FORWARDER)
        header = unpack_header(data)
        self.assertEqual(header.pack(), data[:HEADER_SIZE])
        self.assertEqual(len(header.pack()), HEADER_SIZE)
        self.assertFalse(header.end)

    def test_every_session_type(self) -> None:
        """Each session message type survives the round trip, for both senders."""
        for mtype in (MsgType.REQ_HEAD, MsgType.REQ_DATA, MsgType.RESP_HEAD, MsgType.RESP_DATA, MsgType.WINDOW,
                      MsgType.RESET, MsgType.CONFIRM):
            for role in Role:
                header = unpack_header(session_message(mtype, 0, role))
                self.assertEqual((header.type, header.sender), (mtype, role))

    def test_extreme_values(self) -> None:
        """The largest counter and sequence number survive the round trip."""
        data = pack_header(MsgType.RESP_DATA, 0, Role.FORWARDER, KEY_ID, (1 << 64) - 1, STREAM_ID, (1 << 32) - 1)
        header = unpack_header(data + TAG)
        self.assertEqual((header.counter, header.seq), ((1 << 64) - 1, (1 << 32) - 1))

    def test_truncated_everywhere(self) -> None:
        """A session message shorter than header plus tag is malformed, at every length."""
        data = session_message()
        self.assertEqual(len(data), OVERHEAD)
        for n in range(len(data)):
            err = self.assertRaises(BusMessageError, unpack_header, data[:n])
            self.assertEqual(err.reason, "malformed")

    def test_bad_version(self) -> None:
        """A header of another protocol version (the one before and after this one too) is
        rejected as bad-version."""
        for version in (0, VERSION - 1, VERSION + 1, 255):
            data = bytes([version]) + session_message()[1:]
            self.assertEqual(self.assertRaises(BusMessageError, unpack_header, data).reason, "bad-version")

    def test_bad_type(self) -> None:
        """Negotiation types and unknown types are not session messages."""
        for mtype in (0, 8, MsgType.KEY_REQUEST, MsgType.KEY_GRANT, MsgType.ANNOUNCE, 255):
            data = session_message()
            data = data[:1] + bytes([mtype]) + data[2:]
            self.assertEqual(self.assertRaises(BusMessageError, unpack_header, data).reason, "bad-type")

    def test_bad_sender_or_flags(self) -> None:
        """A sender that is neither role, or an unknown flag bit, is malformed."""
        data = session_message()
        for sender in (2, 255):
            bad = data[:3] + bytes([sender]) + data[4:]
            self.assertEqual(self.assertRaises(BusMessageError, unpack_header, bad).reason, "malformed")
        for flags in (0x02, 0x80, 0xFF):
            bad = data[:2] + bytes([flags]) + data[3:]
            self.assertEqual(self.assertRaises(BusMessageError, unpack_header, bad).reason, "malformed")

    def test_peek_type(self) -> None:
        """peek_type reads version and type of any message and rejects fewer than two bytes."""
        self.assertEqual(peek_type(session_message(MsgType.RESET)), (VERSION, MsgType.RESET))
        self.assertEqual(peek_type(signed(announce())), (VERSION, MsgType.ANNOUNCE))
        for data in (b"", b"\x01"):
            self.assertEqual(self.assertRaises(BusMessageError, peek_type, data).reason, "malformed")


class RequestHeadTests(TestCase):
    """Request heads: method, origin-form target, headers, reply channel, length."""

    def test_round_trip_with_inline_body(self) -> None:
        """Every field and the inline body bytes after the head come back unchanged."""
        head = request_head()
        decoded, body = RequestHead.decode(head.encode(b"first bytes of the body"))
        self.assertEqual(decoded, head)
        self.assertEqual(body, b"first bytes of the body")

    def test_with_deadline_is_replace(self) -> None:
        """with_deadline gives what dataclasses.replace gives: every other field kept (a field
        added to RequestHead and not copied there fails this)."""
        head = request_head()
        self.assertEqual(head.with_deadline(1_234_567), dataclasses.replace(head, deadline_ms=1_234_567))
        self.assertNotEqual(head.with_deadline(1_234_567), head)

    def test_round_trip_unknown_length_no_body(self) -> None:
        """An unknown content length (chunked upload) stays None; no inline body is empty bytes."""
        head = request_head(content_length=None, headers=[])
        decoded, body = RequestHead.decode(head.encode())
        self.assertEqual(decoded, head)
        self.assertIsNone(decoded.content_length)
        self.assertEqual(body, b"")

    def test_zero_length_is_not_unknown(self) -> None:
        """A content length of 0 is kept as 0, distinct from unknown."""
        decoded, _ = RequestHead.decode(request_head(content_length=0).encode())
        self.assertEqual(decoded.content_length, 0)

    def test_binary_and_large_values(self) -> None:
        """Header values may carry any byte but CR, LF and NUL, up to the limit."""
        value = bytes(b for b in range(256) if b not in (0, 10, 13)) * 10
        big = b"v" * MAX_HEADER_VALUE
        head = request_head(headers=[(b"X-Bin", value), (b"X-Big", big)])
        decoded, _ = RequestHead.decode(head.encode(b"x"))
        self.assertEqual(decoded.headers, [(b"X-Bin", value), (b"X-Big", big)])

    def test_limits_accepted(self) -> None:
        """Fields exactly at their limits are accepted."""
        data = raw_request_head(reply=b"c" * MAX_CHANNEL, method=b"M" * MAX_METHOD,
                                target=b"/" + b"t" * (MAX_TARGET - 1),
                                headers=[(b"N" * MAX_HEADER_NAME, b"v")] + [(b"H", b"")] * (MAX_HEADERS - 1))
        head, body = RequestHead.decode(data)
        self.assertEqual(len(head.headers), MAX_HEADERS)
        self.assertEqual(body, b"")

    def test_truncated_everywhere(self) -> None:
        """A head cut at any byte raises BusMessageError (never IndexError or struct.error)."""
        data = request_head().encode()
        for n in range(len(data)):
            err = self.assertRaises(BusMessageError, RequestHead.decode, data[:n])
            self.assertEqual(err.reason, "malformed")

    def test_header_value_with_cr_lf_nul(self) -> None:
        """A header value containing CR, LF or NUL (header injection) is rejected."""
        for value in (b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"a\0b", b"\n"):
            data = raw_request_head(headers=[(b"X-Test", value)])
            self.assertEqual(self.assertRaises(BusMessageError, RequestHead.decode, data).reason, "malformed")

    def test_header_name_not_a_token(self) -> None:
        """A header name that is not an HTTP token (empty, spaces, colon, CR/LF) is rejected."""
        for name in (b"", b"X Test", b"X-Test:", b"X-Test\r\n", b"\nX", b"X\0", b"X\xff"):
            data = raw_request_head(headers=[(name, b"v")])
            self.assertRaises(BusMessageError, RequestHead.decode, data)

    def test_header_name_with_trailing_newline(self) -> None:
        """A header name ending in LF is not a token and is rejected (a regex '$' must not let it through)."""
        data = raw_request_head(headers=[(b"X-Test\n", b"v")])
        self.assertEqual(self.assertRaises(BusMessageError, RequestHead.decode, data).reason, "malformed")

    def test_bad_method(self) -> None:
        """A method that is empty or not a token (spaces, CR/LF, a trailing newline) is rejected."""
        for method in (b"", b"GE T", b"GET\r\n", b"G/T", b"GET\0"):
            data = raw_request_head(method=method)
            self.assertRaises(BusMessageError, RequestHead.decode, data)

    def test_method_with_trailing_newline(self) -> None:
        """A method ending in LF is not a token and is rejected (a regex '$' must not let it through)."""
        data = raw_request_head(method=b"GET\n")
        self.assertEqual(self.assertRaises(BusMessageError, RequestHead.decode, data).reason, "malformed")

    def test_non_origin_form_targets(self) -> None:
        """Only origin-form targets are accepted: no absolute URL, '*', authority, spaces or controls."""
        for target in (b"", b"*", b"http://evil.example/", b"evil.example:80",
                       b"/a b", b"/a\tb", b"/a\r\nHost: x", b"/a\x00", b"/a\x7f", b"path"):
            data = raw_request_head(target=target)
            err = self.assertRaises(BusMessageError, RequestHead.decode, data)
            self.assertEqual(err.reason, "malformed", target)

    def test_oversized_fields(self) -> None:
        """Every field one byte over its limit, or too many headers, is rejected."""
        cases = {
            "reply channel": raw_request_head(reply=b"c" * (MAX_CHANNEL + 1)),
            "method": raw_request_head(method=b"M" * (MAX_METHOD + 1)),
            "target": raw_request_head(target=b"/" * (MAX_TARGET + 1)),
            "header name": raw_request_head(headers=[(b"N" * (MAX_HEADER_NAME + 1), b"v")]),
            "header value": raw_request_head(headers=[(b"N", b"v" * (MAX_HEADER_VALUE + 1))]),
            "header count": raw_request_head(count=MAX_HEADERS + 1),
        }
        for what, data in cases.items():
            err = self.assertRaises(BusMessageError, RequestHead.decode, data)
            self.assertEqual(err.reason, "malformed", what)

    def test_encoder_refuses_too_many_headers(self) -> None:
        """The encoder refuses more headers than the decoder accepts, rather than sending junk."""
        head = request_head(headers=[(b"X", b"y")] * (MAX_HEADERS + 1))
        self.assertRaises(ValueError, head.encode)


class ResponseHeadTests(TestCase):
    """Response heads: status, reason, headers, length, and an inline body."""

    def test_round_trip_with_inline_body(self) -> None:
        """Status, reason, headers and length come back, followed by the inline body bytes."""
        head = response_head()
        decoded, body = ResponseHead.decode(head.encode(b"hello"))
        self.assertEqual(decoded, head)
        self.assertEqual(body, b"hello")

    def test_round_trip_unknown_length(self) -> None:
        """An unknown length survives as None and an empty reason as empty bytes."""
        head = response_head(reason=b"", content_length=None, headers=[])
        decoded, body = ResponseHead.decode(head.encode())
        self.assertEqual((decoded, body), (head, b""))

    def test_status_range(self) -> None:
        """Statuses 100..999 are accepted; anything else is malformed."""
        for status in (100, 204, 599, 999):
            self.assertEqual(ResponseHead.decode(raw_response_head(status=status))[0].status, status)
        for status in (0, 99, 1000, 65535):
            err = self.assertRaises(BusMessageError, ResponseHead.decode, raw_response_head(status=status))
            self.assertEqual(err.reason, "malformed")

    def test_reason_with_cr_lf(self) -> None:
        """A reason phrase with CR or LF (response splitting) is rejected."""
        for reason in (b"OK\r\nX: y", b"OK\n", b"\rOK"):
            self.assertRaises(BusMessageError, ResponseHead.decode, raw_response_head(reason=reason))

    def test_oversized_reason(self) -> None:
        """A reason at the limit is accepted; one byte over is rejected."""
        ResponseHead.decode(raw_response_head(reason=b"r" * MAX_REASON))
        self.assertRaises(BusMessageError, ResponseHead.decode, raw_response_head(reason=b"r" * (MAX_REASON + 1)))

    def test_header_value_with_cr_lf(self) -> None:
        """Response header values containing CR or LF are rejected."""
        data = raw_response_head(headers=[(b"Set-Cookie", b"a=1\r\nSet-Cookie: admin=1")])
        self.assertRaises(BusMessageError, ResponseHead.decode, data)

    def test_truncated_everywhere(self) -> None:
        """A response head cut at any byte raises BusMessageError."""
        data = response_head().encode()
        for n in range(len(data)):
            self.assertRaises(BusMessageError, ResponseHead.decode, data[:n])


class WindowAndResetTests(TestCase):
    """Flow-control and reset payloads."""

    def test_window_round_trip(self) -> None:
        """A window increment survives the round trip, up to 2**32-1."""
        for n in (1, 65536, (1 << 32) - 1):
            self.assertEqual(decode_window(encode_window(n)), n)

    def test_window_zero_rejected(self) -> None:
        """A zero increment is meaningless and rejected."""
        self.assertEqual(self.assertRaises(BusMessageError, decode_window, encode_window(0)).reason, "malformed")

    def test_window_wrong_length(self) -> None:
        """A window payload of any length but four bytes is rejected (truncated or trailing bytes)."""
        data = encode_window(100)
        for bad in (data[:0], data[:1], data[:3], data + b"\0", data + data):
            self.assertRaises(BusMessageError, decode_window, bad)

    def test_reset_round_trip(self) -> None:
        """A reset code and its (UTF-8) message survive the round trip."""
        self.assertEqual(decode_reset(encode_reset(2, "upstream timed out — 30 s")), (2, "upstream timed out — 30 s"))
        self.assertEqual(decode_reset(encode_reset(6)), (6, ""))

    def test_reset_long_message_cut_to_limit(self) -> None:
        """A long reset message is cut to the limit on encoding, so it always decodes."""
        code, message = decode_reset(encode_reset(1, "x" * (MAX_REASON * 3)))
        self.assertEqual((code, len(message)), (1, MAX_REASON))

    def test_reset_invalid_utf8_is_not_an_exception(self) -> None:
        """A reset message that is not UTF-8 decodes with replacement characters, never UnicodeError."""
        data = Writer().u16(3).blob16(b"\xff\xfe bad").bytes()
        code, message = decode_reset(data)
        self.assertEqual(code, 3)
        self.assertIn("bad", message)

    def test_reset_truncated_and_trailing(self) -> None:
        """A reset cut at any byte, or followed by trailing bytes, is rejected."""
        data = encode_reset(4, "too big")
        for n in range(len(data)):
            self.assertRaises(BusMessageError, decode_reset, data[:n])
        self.assertRaises(BusMessageError, decode_reset, data + b"x")

    def test_reset_oversized_message(self) -> None:
        """A hand-made reset whose message exceeds the limit is rejected."""
        data = Writer().u16(1).blob16(b"m" * (MAX_REASON + 1)).bytes()
        self.assertRaises(BusMessageError, decode_reset, data)


class SignedMessageTests(TestCase):
    """Key requests, grants and announcements: signed bodies with strict decoding."""

    def test_key_request_round_trip(self) -> None:
        """A key request decodes to the same fields; the signed part is exactly its body."""
        message = key_request()
        body = message.encode_body()
        decoded, signed_body, signature = decode_signed(encode_signed(body, SIGNATURE), KeyRequest)
        self.assertEqual((decoded, signed_body, signature), (message, body, SIGNATURE))

    def test_key_grant_round_trip(self) -> None:
        """A key grant decodes to the same fields, wrapped key included."""
        message = key_grant()
        decoded, body, signature = decode_signed(signed(message), KeyGrant)
        self.assertEqual((decoded, body, signature), (message, message.encode_body(), SIGNATURE))

    def test_announce_round_trip(self) -> None:
        """An announcement decodes to the same fields."""
        message = announce()
        decoded, body, signature = decode_signed(signed(message, b"sig"), Announce)
        self.assertEqual((decoded, body, signature), (message, message.encode_body(), b"sig"))

    def test_truncated_everywhere(self) -> None:
        """Each signed message cut at any byte raises BusMessageError."""
        for kind, message in ((KeyRequest, key_request()), (KeyGrant, key_grant()), (Announce, announce())):
            data = signed(message)
            for n in range(len(data)):
                self.assertRaises(BusMessageError, decode_signed, data[:n], kind)

    def test_trailing_bytes_rejected(self) -> None:
        """Bytes after the signature are rejected: the message is exactly body + signature."""
        for kind, message in ((KeyRequest, key_request()), (KeyGrant, key_grant()), (Announce, announce())):
            err = self.assertRaises(BusMessageError, decode_signed, signed(message) + b"\0", kind)
            self.assertEqual(err.reason, "malformed")

    def test_wrong_type(self) -> None:
        """A message of one kind offered to the decoder of another is bad-type."""
        messages = {KeyRequest: signed(key_request()), KeyGrant: signed(key_grant()), Announce: signed(announce())}
        for kind in messages:
            for other, data in messages.items():
                if other is not kind:
                    self.assertEqual(self.assertRaises(BusMessageError, decode_signed, data, kind).reason, "bad-type")

    def test_session_message_is_not_signed_message(self) -> None:
        """A session message fed to decode_signed is bad-type, whatever it contains."""
        err = self.assertRaises(BusMessageError, decode_signed, session_message(MsgType.CONFIRM), KeyGrant)
        self.assertEqual(err.reason, "bad-type")

    def test_bad_version(self) -> None:
        """A signed message of another version (the one before and after this one too) is bad-version."""
        data = signed(announce())
        for version in (0, VERSION - 1, VERSION + 1):
            err = self.assertRaises(BusMessageError, decode_signed, bytes([version]) + data[1:], Announce)
            self.assertEqual(err.reason, "bad-version")

    @staticmethod
    def _with_proxy_name(name: bytes) -> bytes:
        body = key_request().encode_body()
        # Replace the name field (u16 length + ascii) right after version and type.
        old = 2 + 2 + len("office-1.intranet")
        return encode_signed(body[:2] + struct.pack(">H", len(name)) + name + body[old:], SIGNATURE)

    def test_bad_proxy_names(self) -> None:
        """A key request naming a proxy that breaks the name rules is rejected, never UnicodeError."""
        for name in (b"", b"-leading-dash", b"has space", b"caf\xc3\xa9", b"\xff\xfe", b"a" * 64, b"a/b",
                     b"alpha\r\n"):
            err = self.assertRaises(BusMessageError, decode_signed, self._with_proxy_name(name), KeyRequest)
            self.assertEqual(err.reason, "malformed", name)

    def test_proxy_name_with_trailing_newline(self) -> None:
        """A proxy name ending in LF breaks the name rules and is rejected (a regex '$' must not let it through)."""
        err = self.assertRaises(BusMessageError, decode_signed, self._with_proxy_name(b"alpha\n"), KeyRequest)
        self.assertEqual(err.reason, "malformed")

    def test_oversized_fields(self) -> None:
        """A wrapped key, reply channel or signature over its limit is rejected."""
        self.assertRaises(BusMessageError, decode_signed, signed(key_grant(wrapped=b"w" * 1025)), KeyGrant)
        self.assertRaises(BusMessageError, decode_signed,
                          signed(key_request(reply_channel=b"c" * (MAX_CHANNEL + 1))), KeyRequest)
        self.assertRaises(BusMessageError, decode_signed, signed(announce(), b"s" * (MAX_SIGNATURE + 1)), Announce)
        decode_signed(signed(announce(), b"s" * MAX_SIGNATURE), Announce)


class FuzzTests(TestCase):
    """Arbitrary bytes never make a decoder raise anything but BusMessageError."""

    SEED = 20240601

    def _feed(self, data: bytes) -> None:
        for name, decode in DECODERS.items():
            try:
                decode(data)
            except BusMessageError:
                pass
            except Exception as e:  # noqa: BLE001 - the point of the test
                self.fail(f"{name} raised {type(e).__name__}: {e} on {data!r}")

    def test_random_bytes(self) -> None:
        """Several hundred random strings (fixed seed) raise only BusMessageError in every decoder."""
        rng = random.Random(self.SEED)
        for _ in range(400):
            self._feed(rng.randbytes(rng.randrange(0, 300)))

    def test_random_bytes_with_valid_prefixes(self) -> None:
        """Random tails after a valid version and type reach deep into each decoder, harmlessly."""
        rng = random.Random(self.SEED + 1)
        prefixes = [bytes([VERSION, t]) for t in MsgType]
        for _ in range(400):
            self._feed(rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 400)))

    def test_mutated_valid_messages(self) -> None:
        """Valid messages with random bytes changed, cut or appended raise only BusMessageError."""
        rng = random.Random(self.SEED + 2)
        valid = [session_message(), request_head().encode(b"body"), response_head().encode(b"body"),
                 encode_window(10), encode_reset(1, "x"), signed(key_request()), signed(key_grant()),
                 signed(announce())]
        for _ in range(300):
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                del data[rng.randrange(len(data)):]
            if rng.random() < 0.2:
                data += rng.randbytes(rng.randrange(1, 10))
            self._feed(bytes(data))
