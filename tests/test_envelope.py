"""Tests for ppbridge.envelope: AES-GCM sealing with the header and channel bound, and replay checks."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from ppbridge.envelope import KEY_SIZE, Envelope, derive_keys
from ppbridge.errors import BusMessageError
from ppbridge.wire import FLAG_END, HEADER_SIZE, OVERHEAD, MsgType, Role, unpack_header

KEY_ID = b"K" * 8
STREAM = b"S" * 16
CHANNEL = b"ppbridge:p:alpha:0102030405060708"
OTHER_CHANNEL = b"ppbridge:p:beta:0102030405060708"


def session_keys(seed: bytes = b"") -> dict[Role, bytes]:
    secret = (seed + os.urandom(32))[:32]
    return derive_keys(secret, os.urandom(32), os.urandom(24))


def pair(keys: dict[Role, bytes] | None = None) -> tuple[Envelope, Envelope]:
    """(forwarder's envelope, proxy's envelope) of one session."""
    keys = keys or session_keys()
    return Envelope(KEY_ID, keys, Role.FORWARDER), Envelope(KEY_ID, keys, Role.PROXY)


def open_message(envelope: Envelope, data: bytes, channel: bytes = CHANNEL) -> bytes:
    return envelope.open(unpack_header(data), data, channel)


class DeriveKeysTests(TestCase):
    """HKDF: one key per direction."""

    def test_distinct_per_direction(self) -> None:
        """The two directions get different 32-byte keys."""
        keys = derive_keys(b"s" * 32, b"x" * 32, b"salt")
        self.assertEqual(set(keys), {Role.FORWARDER, Role.PROXY})
        self.assertEqual({len(k) for k in keys.values()}, {KEY_SIZE})
        self.assertNotEqual(keys[Role.FORWARDER], keys[Role.PROXY])

    def test_deterministic(self) -> None:
        """Both sides derive the same keys from the same inputs."""
        self.assertEqual(derive_keys(b"s" * 32, b"x" * 32, b"salt"), derive_keys(b"s" * 32, b"x" * 32, b"salt"))

    def test_every_input_matters(self) -> None:
        """Changing the secret, the X25519 shared secret or the salt changes both keys."""
        base = derive_keys(b"s" * 32, b"x" * 32, b"salt")
        for other in (derive_keys(b"t" * 32, b"x" * 32, b"salt"), derive_keys(b"s" * 32, b"y" * 32, b"salt"),
                      derive_keys(b"s" * 32, b"x" * 32, b"pepper")):
            for role in Role:
                self.assertNotEqual(base[role], other[role])


class SealOpenTests(TestCase):
    """Round trips between the forwarder's and the proxy's envelopes of one session."""

    def test_sizes_around_the_frame_path(self) -> None:
        """Payloads just under, at and over freshbuf.FRESH_MIN (small messages decrypt with
        cryptography's own buffer, frames into one not zero-filled first) open to exactly
        what was sealed, as bytes; a frame with one flipped ciphertext bit fails as bad-tag
        and leaves the counter where it was, so the untouched next frame still opens."""
        from ppbridge.freshbuf import FRESH_MIN
        fwd, proxy = pair()
        for size in (0, 1, FRESH_MIN - 1, FRESH_MIN, 256 * 1024 - OVERHEAD):
            payload = os.urandom(size)
            sealed = bytes(fwd.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, payload))
            opened = open_message(proxy, sealed)
            self.assertEqual((type(opened), opened), (bytes, payload))
        frame = os.urandom(256 * 1024 - OVERHEAD)
        bad = bytearray(fwd.seal(MsgType.REQ_DATA, STREAM, 2, CHANNEL, frame))
        bad[HEADER_SIZE + 1000] ^= 1
        good = bytes(fwd.seal(MsgType.REQ_DATA, STREAM, 3, CHANNEL, frame))
        with self.assertRaises(BusMessageError) as caught:
            open_message(proxy, bytes(bad))
        self.assertEqual(caught.exception.reason, "bad-tag")
        self.assertEqual(open_message(proxy, good), frame)

    def test_round_trip_both_directions(self) -> None:
        """What one side seals the other opens, in both directions, with the header as sealed."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"GET / please")
        header = unpack_header(data)
        self.assertEqual((header.type, header.sender, header.key_id, header.stream_id, header.seq),
                         (MsgType.REQ_HEAD, Role.FORWARDER, KEY_ID, STREAM, 0))
        self.assertEqual(proxy.open(header, data, CHANNEL), b"GET / please")
        reply = proxy.seal(MsgType.RESP_DATA, STREAM, 7, CHANNEL, b"200 OK body", FLAG_END)
        reply_header = unpack_header(reply)
        self.assertTrue(reply_header.end)
        self.assertEqual(reply_header.sender, Role.PROXY)
        self.assertEqual(forwarder.open(reply_header, reply, CHANNEL), b"200 OK body")

    def test_empty_and_large_payloads(self) -> None:
        """An empty payload and a 1 MiB payload both round trip; overhead is header plus tag."""
        forwarder, proxy = pair()
        for payload in (b"", os.urandom(1 << 20)):
            data = forwarder.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, payload)
            self.assertEqual(len(data), len(payload) + OVERHEAD)
            self.assertEqual(open_message(proxy, data), payload)

    def test_ciphertext_hides_payload(self) -> None:
        """The payload does not appear in the sealed bytes, and sealing it twice gives different bytes."""
        forwarder, _ = pair()
        payload = b"Authorization: Bearer secret-token-value"
        one = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, payload)
        two = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, payload)
        self.assertNotIn(b"secret-token", one)
        self.assertNotEqual(one[HEADER_SIZE:], two[HEADER_SIZE:])

    def test_fingerprint_shared(self) -> None:
        """Both envelopes of a session show the same fingerprint; another session shows another."""
        forwarder, proxy = pair()
        other, _ = pair()
        self.assertEqual(forwarder.fingerprint, proxy.fingerprint)
        self.assertNotEqual(forwarder.fingerprint, other.fingerprint)


class RejectionTests(TestCase):
    """Tampering, wrong keys, wrong channels, reflection and replay are all rejected."""

    def test_flipped_byte_anywhere(self) -> None:
        """Flipping any bit of any byte (header, ciphertext or tag) makes the message fail to open."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.RESP_DATA, STREAM, 3, CHANNEL, b"some response body")
        for i in range(len(data)):
            for bit in (0x01, 0x80):
                bad = bytearray(data)
                bad[i] ^= bit
                with self.assertRaises(BusMessageError, msg=f"byte {i} bit {bit:#x}") as caught:
                    open_message(proxy, bytes(bad))
                if i >= HEADER_SIZE:
                    self.assertEqual(caught.exception.reason, "bad-tag", i)
        # Nothing forged advanced the replay counter: the genuine message still opens.
        self.assertEqual(open_message(proxy, data), b"some response body")

    def test_flipped_header_fields_fail_authentication(self) -> None:
        """A header changed in a field the parser accepts (flags, key id, counter, ids) fails the tag."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_DATA, STREAM, 3, CHANNEL, b"chunk")
        for offset in (2, 4, 12, 20, 40):  # flags, key id, counter, stream id, seq
            bad = bytearray(data)
            bad[offset] ^= 0x01
            err = self.assertRaises(BusMessageError, open_message, proxy, bytes(bad))
            self.assertEqual(err.reason, "bad-tag", offset)

    def test_changed_type_fails_authentication(self) -> None:
        """A DATA frame relabelled as another session type (e.g. setting END) fails the tag."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_DATA, STREAM, 3, CHANNEL, b"chunk")
        bad = data[:1] + bytes([MsgType.RESET]) + data[2:]
        self.assertEqual(self.assertRaises(BusMessageError, open_message, proxy, bad).reason, "bad-tag")

    def test_truncated_ciphertext(self) -> None:
        """A message with its last bytes cut off fails to open."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, b"0123456789")
        for n in (len(data) - 1, len(data) - 5, OVERHEAD):
            self.assertEqual(self.assertRaises(BusMessageError, open_message, proxy, data[:n]).reason, "bad-tag")

    def test_wrong_key(self) -> None:
        """A message sealed under one session does not open under another with the same key id."""
        forwarder, _ = pair()
        _, stranger = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"secret")
        self.assertEqual(self.assertRaises(BusMessageError, open_message, stranger, data).reason, "bad-tag")

    def test_wrong_channel(self) -> None:
        """A message republished on another channel than it was sealed for fails to open (channel is AAD)."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"for alpha only")
        for channel in (OTHER_CHANNEL, b"", CHANNEL + b"x", CHANNEL[:-1]):
            err = self.assertRaises(BusMessageError, open_message, proxy, data, channel)
            self.assertEqual(err.reason, "bad-tag")
        self.assertEqual(open_message(proxy, data, CHANNEL), b"for alpha only")

    def test_reflected_to_sender(self) -> None:
        """A message fed back to the envelope that sealed it is rejected as wrong-direction."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"x")
        self.assertEqual(self.assertRaises(BusMessageError, open_message, forwarder, data).reason, "wrong-direction")
        reply = proxy.seal(MsgType.RESP_HEAD, STREAM, 0, CHANNEL, b"y")
        self.assertEqual(self.assertRaises(BusMessageError, open_message, proxy, reply).reason, "wrong-direction")

    def test_reflected_with_forged_sender(self) -> None:
        """Rewriting the sender byte of a reflected message does not help: each direction has its own key."""
        forwarder, _ = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"x")
        forged = data[:3] + bytes([Role.PROXY]) + data[4:]
        self.assertEqual(self.assertRaises(BusMessageError, open_message, forwarder, forged).reason, "bad-tag")

    def test_replay(self) -> None:
        """The same message opened twice is rejected the second time as a replay."""
        forwarder, proxy = pair()
        data = forwarder.seal(MsgType.REQ_HEAD, STREAM, 0, CHANNEL, b"once")
        self.assertEqual(open_message(proxy, data), b"once")
        self.assertEqual(self.assertRaises(BusMessageError, open_message, proxy, data).reason, "replay")

    def test_older_after_newer(self) -> None:
        """A message with an older counter than one already opened is rejected as a replay."""
        forwarder, proxy = pair()
        first = forwarder.seal(MsgType.REQ_DATA, STREAM, 1, CHANNEL, b"1")
        second = forwarder.seal(MsgType.REQ_DATA, STREAM, 2, CHANNEL, b"2")
        self.assertEqual(open_message(proxy, second), b"2")
        self.assertEqual(self.assertRaises(BusMessageError, open_message, proxy, first).reason, "replay")

    def test_gap_accepted(self) -> None:
        """A lost message does not block later ones: counters may skip forward."""
        forwarder, proxy = pair()
        messages = [forwarder.seal(MsgType.REQ_DATA, STREAM, i, CHANNEL, b"%d" % i) for i in range(5)]
        self.assertEqual(open_message(proxy, messages[0]), b"0")
        self.assertEqual(open_message(proxy, messages[3]), b"3")
        self.assertEqual(open_message(proxy, messages[4]), b"4")
        self.assertEqual(proxy.last_received, 4)
        self.assertEqual(proxy.received, 3)

    def test_directions_have_independent_counters(self) -> None:
        """Opening the peer's messages never makes our own later messages look like replays to it."""
        forwarder, proxy = pair()
        for i in range(3):
            self.assertEqual(open_message(proxy, forwarder.seal(MsgType.REQ_DATA, STREAM, i, CHANNEL, b"f")), b"f")
        self.assertEqual(open_message(forwarder, proxy.seal(MsgType.RESP_DATA, STREAM, 0, CHANNEL, b"p")), b"p")


class CounterTests(TestCase):
    """Counters: the nonce sequence and the message count the rekey cap uses."""

    def test_counters_increase(self) -> None:
        """Each sealed message carries the next counter, starting at 0."""
        forwarder, _ = pair()
        counters = [unpack_header(forwarder.seal(MsgType.REQ_DATA, STREAM, 0, CHANNEL, b"")).counter for _ in range(4)]
        self.assertEqual(counters, [0, 1, 2, 3])
        self.assertEqual(forwarder.sent, 4)

    def test_messages_counts_both_directions(self) -> None:
        """``messages`` is sealed plus successfully opened messages; rejected ones do not count."""
        forwarder, proxy = pair()
        for _ in range(3):
            open_message(proxy, forwarder.seal(MsgType.REQ_DATA, STREAM, 0, CHANNEL, b"a"))
        reply = proxy.seal(MsgType.RESP_DATA, STREAM, 0, CHANNEL, b"b")
        open_message(forwarder, reply)
        self.assertRaises(BusMessageError, open_message, forwarder, reply)  # replay
        forged = bytearray(proxy.seal(MsgType.RESP_DATA, STREAM, 1, CHANNEL, b"c"))
        forged[-1] ^= 0x01
        self.assertRaises(BusMessageError, open_message, forwarder, bytes(forged))  # bad tag
        self.assertEqual((forwarder.sent, forwarder.received, forwarder.messages), (3, 1, 4))
        self.assertEqual((proxy.sent, proxy.received, proxy.messages), (2, 3, 5))

    def test_exhausted_counter_refuses_to_seal(self) -> None:
        """When the counter space is used up the envelope refuses to seal rather than reuse a nonce."""
        forwarder, _ = pair()
        forwarder.sent = (1 << 64) - 1
        self.assertRaises(RuntimeError, forwarder.seal, MsgType.REQ_DATA, STREAM, 0, CHANNEL, b"")
