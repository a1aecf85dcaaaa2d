"""Tests for ppbridge.ratelimit: the token bucket and the negotiation gate, with injected time;
and the proxy's announcement budget, on the in-memory bus."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from ppbridge.channels import Channels
from ppbridge.errors import BusMessageError
from ppbridge.negotiation import ANY_FORWARDER
from ppbridge.ratelimit import ANNOUNCE_BURST, ANNOUNCE_RATE, NegotiationGate, TokenBucket, peek_proxy_name
from ppbridge.wire import VERSION, Announce, KeyRequest, MsgType, encode_signed

T0 = 1_700_000_000.0
CHANNELS = Channels("ppbridge")


def key_request(name: str, now: float = T0) -> bytes:
    """A KEY_REQUEST for ``name`` as the wire encodes it (its signature is never checked here)."""
    body = KeyRequest(proxy=name, instance=os.urandom(8), reply_channel=CHANNELS.negotiation_temp(name),
                      nonce=os.urandom(16), timestamp_ms=int(now * 1000), ephemeral=os.urandom(32),
                      frame_size=65536, window=1 << 20, target=ANY_FORWARDER).encode_body()
    return encode_signed(body, os.urandom(256))


def admitted(gate: NegotiationGate, data: bytes, now: float, times: int = 1) -> int:
    """How many of ``times`` checks of ``data`` at ``now`` the gate let through; every refusal
    must be a "rate-limited" BusMessageError."""
    passed = 0
    for _ in range(times):
        try:
            gate.check(data, now)
        except BusMessageError as err:
            if err.reason != "rate-limited":
                raise
        else:
            passed += 1
    return passed


class TokenBucketTests(TestCase):
    def test_starts_full_then_refuses(self) -> None:
        """A new bucket gives exactly ``burst`` tokens at one instant, then refuses."""
        bucket = TokenBucket(5, 20, T0)
        self.assertEqual(sum(bucket.take(T0) for _ in range(30)), 20)
        self.assertFalse(bucket.take(T0))

    def test_refills_at_its_rate(self) -> None:
        """Once empty, a bucket of 4/s gives one token after 0.25 s, not before, and ten after
        another 2.5 s."""
        bucket = TokenBucket(4, 20, T0)
        for _ in range(20):
            bucket.take(T0)
        self.assertFalse(bucket.take(T0 + 0.125))
        self.assertTrue(bucket.take(T0 + 0.25))
        self.assertFalse(bucket.take(T0 + 0.25))
        self.assertEqual(sum(bucket.take(T0 + 2.75) for _ in range(30)), 10)

    def test_refill_capped_at_burst(self) -> None:
        """After an hour idle, a bucket still holds only ``burst`` tokens."""
        bucket = TokenBucket(5, 20, T0)
        for _ in range(20):
            bucket.take(T0)
        self.assertEqual(sum(bucket.take(T0 + 3600) for _ in range(100)), 20)

    def test_clock_going_back_mints_nothing(self) -> None:
        """A ``now`` earlier than one already seen adds no tokens, and returning to the later
        time does not count the same interval twice."""
        bucket = TokenBucket(4, 20, T0)
        for _ in range(20):
            bucket.take(T0 + 10)
        self.assertFalse(bucket.take(T0))
        self.assertFalse(bucket.take(T0 + 10))
        self.assertTrue(bucket.take(T0 + 10.25))
        self.assertFalse(bucket.take(T0 + 10.25))

    def test_ready_takes_nothing(self) -> None:
        """``ready`` answers whether a token is there without taking it."""
        bucket = TokenBucket(1, 1, T0)
        self.assertTrue(bucket.ready(T0))
        self.assertTrue(bucket.ready(T0))
        self.assertTrue(bucket.take(T0))
        self.assertFalse(bucket.ready(T0))

    def test_rejects_useless_parameters(self) -> None:
        """A rate of zero or less, or a burst under one token, is a ValueError."""
        self.assertRaises(ValueError, TokenBucket, 0, 10, T0)
        self.assertRaises(ValueError, TokenBucket, -1, 10, T0)
        self.assertRaises(ValueError, TokenBucket, 5, 0.5, T0)


class PeekTests(TestCase):
    def test_name_of_an_encoded_key_request(self) -> None:
        """The peeked name of a KEY_REQUEST as wire.py encodes it is the proxy name (so the
        gate's fixed offsets follow the real layout)."""
        self.assertEqual(peek_proxy_name(key_request("alpha")), b"alpha")
        self.assertEqual(peek_proxy_name(key_request("a" * 63)), b"a" * 63)

    def test_not_a_key_request(self) -> None:
        """Too short, another version, another type, or a name length past the end: None."""
        good = key_request("alpha")
        self.assertIsNone(peek_proxy_name(b""))
        self.assertIsNone(peek_proxy_name(good[:3]))
        self.assertIsNone(peek_proxy_name(bytes([VERSION + 1]) + good[1:]))
        self.assertIsNone(peek_proxy_name(good[:1] + bytes([MsgType.ANNOUNCE]) + good[2:]))
        self.assertIsNone(peek_proxy_name(good[:4 + 4]))  # "alph": the length says 5
        announce = encode_signed(Announce(b"F" * 8, os.urandom(16), int(T0 * 1000)).encode_body(), b"")
        self.assertIsNone(peek_proxy_name(announce))


class NegotiationGateTests(TestCase):
    def gate(self, names: tuple[str, ...] = ("alpha", "beta"), **limits: float) -> NegotiationGate:
        return NegotiationGate(names, T0, **limits)

    def test_flood_under_one_name_spends_that_name_only(self) -> None:
        """1,000 requests for "alpha" at one instant: 20 (its burst) pass, the rest are refused
        as rate-limited; "beta" still gets its own 20."""
        gate = self.gate()
        self.assertEqual(admitted(gate, key_request("alpha"), T0, 1000), 20)
        self.assertEqual(admitted(gate, key_request("beta"), T0, 1000), 20)

    def test_refused_requests_do_not_spend_the_global_budget(self) -> None:
        """With a global burst of 30, a 10,000-request flood for "alpha" (20 admitted) leaves
        10 global tokens: exactly 10 of beta's requests pass."""
        gate = self.gate(global_rate=1, global_burst=30)
        self.assertEqual(admitted(gate, key_request("alpha"), T0, 10_000), 20)
        self.assertEqual(admitted(gate, key_request("beta"), T0, 100), 10)

    def test_global_budget_caps_all_names_together(self) -> None:
        """With 50 configured names of burst 20 each and a global burst of 400 (rate 200/s),
        no more than 400 requests pass at one instant, and 200 more a second later."""
        names = tuple(f"p{i}" for i in range(50))
        gate = self.gate(names)
        now = sum(admitted(gate, key_request(n), T0, 20) for n in names)
        self.assertEqual(now, 400)
        later = sum(admitted(gate, key_request(n), T0 + 1, 20) for n in names)
        self.assertEqual(later, 200)

    def test_global_refusal_keeps_the_name_token(self) -> None:
        """A request refused by the global budget takes nothing from its name's bucket: beta,
        with a burst of one and no refill to speak of, passes once the global bucket refills."""
        gate = self.gate(per_name_rate=0.001, per_name_burst=1, global_rate=8, global_burst=1)
        self.assertEqual(admitted(gate, key_request("alpha"), T0), 1)
        self.assertEqual(admitted(gate, key_request("beta"), T0), 0)
        self.assertEqual(admitted(gate, key_request("beta"), T0 + 0.125), 1)

    def test_unknown_names_share_one_bucket(self) -> None:
        """10,000 requests under 10,000 different unknown names (and malformed messages) pass
        20 in all, not 20 each: memory and verifies stay bounded; alpha is untouched."""
        gate = self.gate()
        passed = sum(admitted(gate, key_request(f"u{i}"), T0) for i in range(10_000))
        passed += admitted(gate, b"\x01", T0, 10)
        self.assertEqual(passed, 20)
        self.assertEqual(admitted(gate, key_request("alpha"), T0, 100), 20)

    def test_steady_legitimate_rate_always_passes(self) -> None:
        """A proxy name asking 4 times a second for 10 minutes is never refused."""
        gate = self.gate()
        data = key_request("alpha")
        self.assertEqual(sum(admitted(gate, data, T0 + i * 0.25) for i in range(2400)), 2400)

    def test_refusal_names_what_is_over_budget(self) -> None:
        """A refusal is BusMessageError reason "rate-limited" whose text names the proxy (or
        the global budget), so the drop log says which budget a flood used up."""
        gate = self.gate(global_rate=1, global_burst=20)
        admitted(gate, key_request("alpha"), T0, 20)
        err = self.assertRaises(BusMessageError, gate.check, key_request("alpha"), T0)
        self.assertEqual(err.reason, "rate-limited")
        self.assertIn("'alpha'", str(err))
        err = self.assertRaises(BusMessageError, gate.check, key_request("beta"), T0)
        self.assertIn("global", str(err))


class AnnounceBudgetTests(TestCase):
    """ProxyService takes a token per announcement before decoding it."""

    def test_forged_announcement_flood_costs_at_most_the_budget(self) -> None:
        """1,000 forged ANNOUNCEs (fresh, signed by a key that is not the forwarder's) at one
        instant cost a proxy 20 signature checks (the burst), the rest are dropped as
        "rate-limited"; a second later 10 more are checked. Two seconds after the flood the
        genuine forwarder's announcement is heard: the proxy asks it for a key."""
        from tests.test_negotiation import Bridge, dropped, forwarder_negotiator

        bridge = Bridge(self)
        proxy = bridge.proxy()
        attacker = bridge.broker.client()
        attacker.start()
        rogue = forwarder_negotiator(signing="rogue")
        now = bridge.clock.seconds()
        for _ in range(1000):
            attacker.publish(CHANNELS.announce, rogue.announce(now))
        self.assertEqual(dropped(proxy.metrics, "bad-signature"), ANNOUNCE_BURST)
        self.assertEqual(dropped(proxy.metrics, "rate-limited"), 1000 - ANNOUNCE_BURST)
        bridge.clock.advance(1)
        for _ in range(100):
            attacker.publish(CHANNELS.announce, rogue.announce(now + 1))
        self.assertEqual(dropped(proxy.metrics, "bad-signature"), ANNOUNCE_BURST + ANNOUNCE_RATE)
        bridge.clock.advance(2)
        genuine = forwarder_negotiator()
        before = len(bridge.published(MsgType.KEY_REQUEST))
        attacker.publish(CHANNELS.announce, genuine.announce(bridge.clock.seconds()))
        self.assertEqual(len(bridge.published(MsgType.KEY_REQUEST)), before + 1)
