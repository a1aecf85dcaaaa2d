"""Tests for ppbridge.timers.Deadline: armed, pushed back, cancelled, closed."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from ppbridge.timers import Deadline


class _Owner:
    def __init__(self, clock: Clock) -> None:
        self.expired = 0
        self.timer = Deadline(clock, self.on_expiry)  # a bound method: owner -> timer -> owner

    def on_expiry(self) -> None:
        self.expired += 1


class DeadlineTests(TestCase):
    """A Deadline calls its callback once when it expires, never after cancel or close."""

    def test_arm_push_back_expire(self) -> None:
        """Armed for 10 s and pushed back to 10 s from t=5, it fires at t=15, once."""
        clock = Clock()
        owner = _Owner(clock)
        owner.timer.arm(10)
        clock.advance(5)
        owner.timer.arm(10)
        clock.advance(9.5)
        self.assertEqual(owner.expired, 0)
        clock.advance(0.5)
        self.assertEqual(owner.expired, 1)
        clock.advance(100)
        self.assertEqual(owner.expired, 1)

    def test_cancel_then_rearm(self) -> None:
        """A cancelled deadline does not fire, and can be armed again."""
        clock = Clock()
        owner = _Owner(clock)
        owner.timer.arm(1)
        owner.timer.cancel()
        clock.advance(2)
        self.assertEqual(owner.expired, 0)
        owner.timer.arm(1)
        clock.advance(1)
        self.assertEqual(owner.expired, 1)

    def test_close_forgets_the_owner(self) -> None:
        """After close the callback never runs, not even if armed again, and the owner (whose
        bound method it was) is freed by reference counting alone."""
        clock = Clock()
        owner = _Owner(clock)
        owner.timer.arm(1)
        owner.timer.close()
        owner.timer.arm(1)
        clock.advance(5)
        self.assertEqual(owner.expired, 0)
        ref = weakref.ref(owner)
        gc.disable()
        self.addCleanup(gc.enable)
        del owner
        self.assertIsNone(ref())
