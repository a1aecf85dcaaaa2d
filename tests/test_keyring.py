"""Tests for ppbridge.keyring: current keys, confirmation, retirement after a grace window."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from ppbridge.envelope import Envelope, derive_keys
from ppbridge.keyring import Keyring
from ppbridge.negotiation import PENDING_LIFETIME, NewSession, proxy_peer
from ppbridge.wire import Role

T0 = 1_700_000_000.0
GRACE = 60.0
INSTANCE_A, INSTANCE_B = b"A" * 8, b"B" * 8
PROXY_A, PROXY_B = proxy_peer("alpha", INSTANCE_A), proxy_peer("alpha", INSTANCE_B)  # the forwarder's peers
FORWARDER = b"F" * 8


def session(instance: bytes = INSTANCE_A, role: Role = Role.FORWARDER, forwarder: bytes = FORWARDER,
            lifetime: float = 86400.0, max_messages: int = 1_000_000) -> NewSession:
    """A fresh session as the forwarder (default) or a proxy holds it."""
    keys = derive_keys(os.urandom(32), os.urandom(32), b"salt")
    return NewSession("alpha", instance, forwarder, Envelope(os.urandom(8), keys, role), 262144, 1048576,
                      lifetime, max_messages)


class KeyringTests(TestCase):
    """One Keyring as the forwarder uses it (peers are proxy instances)."""

    def setUp(self) -> None:
        self.ring = Keyring(GRACE, lambda: T0)

    def test_confirmed_key_is_current(self) -> None:
        """A key added as confirmed is at once the one used to seal, and opens messages."""
        entry = self.ring.add(session(), PROXY_A, T0, confirmed=True)
        self.assertIs(self.ring.current(PROXY_A), entry)
        self.assertIs(self.ring.get(entry.key_id, T0), entry)
        self.assertEqual(self.ring.peers(), [PROXY_A])

    def test_unconfirmed_never_current(self) -> None:
        """An unconfirmed key opens messages but is never chosen to seal."""
        entry = self.ring.add(session(), PROXY_A, T0, confirmed=False)
        self.assertIsNone(self.ring.current(PROXY_A))
        self.assertEqual(self.ring.peers(), [])
        self.assertIs(self.ring.get(entry.key_id, T0 + 1), entry)

    def test_confirm(self) -> None:
        """Confirming a key makes it current; confirming it again, or an unknown key, is refused."""
        entry = self.ring.add(session(), PROXY_A, T0, confirmed=False)
        self.assertTrue(self.ring.confirm(entry.key_id, PROXY_A, T0 + 1))
        self.assertIs(self.ring.current(PROXY_A), entry)
        self.assertFalse(self.ring.confirm(entry.key_id, PROXY_A, T0 + 2))
        self.assertFalse(self.ring.confirm(b"unknown!", PROXY_A, T0 + 2))

    def test_unconfirmed_does_not_displace_current(self) -> None:
        """A newer key that is not confirmed yet leaves the current key current and unretired."""
        old = self.ring.add(session(), PROXY_A, T0, confirmed=True)
        self.ring.add(session(), PROXY_A, T0 + 10, confirmed=False)
        self.assertIs(self.ring.current(PROXY_A), old)
        self.assertIs(self.ring.get(old.key_id, T0 + 10 + 10 * GRACE), old)

    def test_rotation_with_grace(self) -> None:
        """A newer confirmed key becomes current; the old one still opens within the grace window, not after."""
        old = self.ring.add(session(), PROXY_A, T0, confirmed=True)
        new = self.ring.add(session(), PROXY_A, T0 + 100, confirmed=False)
        self.ring.confirm(new.key_id, PROXY_A, T0 + 110)
        self.assertIs(self.ring.current(PROXY_A), new)
        self.assertIs(self.ring.get(old.key_id, T0 + 110), old)
        self.assertIs(self.ring.get(old.key_id, T0 + 110 + GRACE - 0.1), old)
        self.assertIsNone(self.ring.get(old.key_id, T0 + 110 + GRACE))
        self.assertIs(self.ring.get(new.key_id, T0 + 110 + 10 * GRACE), new)

    def test_expire_drops_retired(self) -> None:
        """expire() forgets a retired key once its grace window is over, and only then."""
        old = self.ring.add(session(), PROXY_A, T0, confirmed=True)
        self.ring.add(session(), PROXY_A, T0 + 100, confirmed=True)
        self.assertEqual(self.ring.expire(T0 + 100 + GRACE - 1), 0)
        self.assertEqual(len(self.ring), 2)
        self.assertEqual(self.ring.expire(T0 + 100 + GRACE), 1)
        self.assertEqual(len(self.ring), 1)
        self.assertIsNone(self.ring.get(old.key_id, T0 + 100))

    def test_unconfirmed_expire(self) -> None:
        """A key whose confirmation never came is dropped after the pending lifetime."""
        entry = self.ring.add(session(), PROXY_A, T0, confirmed=False)
        self.assertEqual(self.ring.expire(T0 + PENDING_LIFETIME - 1), 0)
        self.assertIs(self.ring.get(entry.key_id, T0 + PENDING_LIFETIME - 1), entry)
        self.assertEqual(self.ring.expire(T0 + PENDING_LIFETIME + 1), 1)
        self.assertIsNone(self.ring.get(entry.key_id, T0 + PENDING_LIFETIME + 1))
        self.assertFalse(self.ring.confirm(entry.key_id, PROXY_A, T0 + PENDING_LIFETIME + 2))

    def test_current_key_lives_until_its_hard_lifetime(self) -> None:
        """A current key is current and opens until its lifetime ends; from then on it neither
        seals (not current, no peer) nor opens (expired), and expire() drops it."""
        now = [T0]
        ring = Keyring(GRACE, lambda: now[0])
        entry = ring.add(session(lifetime=100.0), PROXY_A, T0, confirmed=True)
        now[0] = T0 + 99.9
        self.assertEqual(ring.expire(now[0]), 0)
        self.assertIs(ring.current(PROXY_A), entry)
        self.assertFalse(entry.expired(now[0]))
        now[0] = T0 + 100
        self.assertIsNone(ring.current(PROXY_A))
        self.assertEqual(ring.peers(), [])
        self.assertTrue(entry.expired(now[0]))
        self.assertEqual(ring.expire(now[0]), 1)
        self.assertIsNone(ring.get(entry.key_id, now[0]))

    def test_current_key_stops_at_its_message_budget(self) -> None:
        """A key that has protected max_messages messages is no longer current nor usable."""
        entry = self.ring.add(session(max_messages=3), PROXY_A, T0, confirmed=True)
        entry.session.envelope.sent = 2
        self.assertIs(self.ring.current(PROXY_A), entry)
        entry.session.envelope.received = 1
        self.assertIsNone(self.ring.current(PROXY_A))
        self.assertTrue(entry.expired(T0))

    def test_peers_are_independent(self) -> None:
        """Rotating one proxy instance's key retires nothing of another's."""
        a = self.ring.add(session(INSTANCE_A), PROXY_A, T0, confirmed=True)
        b = self.ring.add(session(INSTANCE_B), PROXY_B, T0, confirmed=True)
        self.ring.add(session(INSTANCE_A), PROXY_A, T0 + 10, confirmed=True)
        self.assertIs(self.ring.current(PROXY_B), b)
        self.assertIs(self.ring.get(b.key_id, T0 + 10 * GRACE), b)
        self.assertIsNone(self.ring.get(a.key_id, T0 + 10 + GRACE))

    def test_drop_peer(self) -> None:
        """drop_peer forgets every key of that peer (current, retiring, unconfirmed) and nothing else."""
        old = self.ring.add(session(INSTANCE_A), PROXY_A, T0, confirmed=True)
        current = self.ring.add(session(INSTANCE_A), PROXY_A, T0 + 1, confirmed=True)
        pending = self.ring.add(session(INSTANCE_A), PROXY_A, T0 + 2, confirmed=False)
        other = self.ring.add(session(INSTANCE_B), PROXY_B, T0, confirmed=True)
        self.ring.drop_peer(PROXY_A)
        self.assertIsNone(self.ring.current(PROXY_A))
        for entry in (old, current, pending):
            self.assertIsNone(self.ring.get(entry.key_id, T0 + 3))
        self.assertNotIn(PROXY_A, self.ring.stats)
        self.assertEqual(self.ring.peers(), [PROXY_B])
        self.assertIs(self.ring.get(other.key_id, T0 + 3), other)
        self.assertEqual(len(self.ring), 1)

    def test_drop_peer_on_proxy_side(self) -> None:
        """On a proxy the peers are forwarders: drop_peer forgets that forwarder's keys only."""
        ring = Keyring(GRACE, lambda: T0)
        other_forwarder = b"G" * 8
        gone = ring.add(session(role=Role.PROXY), FORWARDER, T0, confirmed=True)
        kept = ring.add(session(role=Role.PROXY, forwarder=other_forwarder), other_forwarder, T0, confirmed=True)
        ring.drop_peer(FORWARDER)
        self.assertIsNone(ring.get(gone.key_id, T0))
        self.assertIs(ring.current(other_forwarder), kept)

    def test_rotation_stats(self) -> None:
        """Stats count rotations and record when the current key started and the last period."""
        self.ring.add(session(), PROXY_A, T0, confirmed=True)
        stats = self.ring.stats[PROXY_A]
        self.assertEqual((stats.rotations, stats.current_since, stats.period), (0, T0, None))
        self.ring.add(session(), PROXY_A, T0 + 100, confirmed=True)
        self.assertEqual((stats.rotations, stats.current_since, stats.period), (1, T0 + 100, 100))
        pending = self.ring.add(session(), PROXY_A, T0 + 200, confirmed=False)
        self.assertEqual(stats.rotations, 1)  # not a rotation until confirmed
        self.ring.confirm(pending.key_id, PROXY_A, T0 + 205)
        self.assertEqual((stats.rotations, stats.current_since, stats.period), (2, T0 + 205, 105))
