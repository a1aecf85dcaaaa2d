"""Tests for ppbridge.timers.Deadline (armed, pushed back, cancelled, closed) and CallTimers
(an upstream call's idle deadline and its wait for the response head, on one delayed call)."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from ppbridge.timers import CallTimers, Deadline


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


class _Call:
    """Records when each of its two deadlines expired."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.fired: list[tuple[str, float]] = []
        self.timers = CallTimers(clock, self.on_idle, self.on_wait)

    def on_idle(self) -> None:
        self.fired.append(("idle", self.clock.seconds()))

    def on_wait(self) -> None:
        self.fired.append(("wait", self.clock.seconds()))

    def run(self, until: float) -> None:
        """Advance the clock a second at a time to ``until``, checking at most one delayed call is pending."""
        while self.clock.seconds() < until:
            self.clock.advance(1)
            if len(self.clock.getDelayedCalls()) > 1:
                raise AssertionError(f"{len(self.clock.getDelayedCalls())} delayed calls")


class CallTimersTests(TestCase):
    """Each deadline of CallTimers fires at its own time, whichever the delayed call stands for."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.call = _Call(self.clock)
        self.timers = self.call.timers

    def test_wait_then_idle(self) -> None:
        """Wait 5 s and idle 20 s: the wait expires at 5, the idle deadline at 20, once each."""
        self.timers.arm_both(20, 5)
        self.call.run(40)
        self.assertEqual(self.call.fired, [("wait", 5), ("idle", 20)])

    def test_idle_first(self) -> None:
        """Idle 3 s and wait 10 s: idle expires at 3, the wait still at 10."""
        self.timers.arm_both(3, 10)
        self.call.run(40)
        self.assertEqual(self.call.fired, [("idle", 3), ("wait", 10)])

    def test_tie_goes_to_idle_first(self) -> None:
        """Both due at 4 s: idle expires first, then the wait, both at 4."""
        self.timers.arm_both(4, 4)
        self.call.run(10)
        self.assertEqual(self.call.fired, [("idle", 4), ("wait", 4)])

    def test_idle_pushed_back_past_the_wait(self) -> None:
        """Idle 3 s, wait 6 s; idle pushed back at 2 and 4 s (to 5, then 7): the wait expires
        at 6, the idle deadline at 7."""
        self.timers.arm_both(3, 6)
        for at in (2, 4):
            self.call.run(at)
            self.timers.arm_idle(3)
        self.call.run(20)
        self.assertEqual(self.call.fired, [("wait", 6), ("idle", 7)])

    def test_idle_pushed_back_before_the_wait(self) -> None:
        """Wait 5 s, idle 20 s pushed back to 3 s from 1 s (due at 4): idle at 4, the wait at 5."""
        self.timers.arm_both(20, 5)
        self.call.run(1)
        self.timers.arm_idle(3)
        self.call.run(20)
        self.assertEqual(self.call.fired, [("idle", 4), ("wait", 5)])

    def test_end_wait(self) -> None:
        """Wait 5 s ended at 2 s: it never expires; the idle deadline (10 s) still does."""
        self.timers.arm_both(10, 5)
        self.call.run(2)
        self.timers.end_wait()
        self.call.run(30)
        self.assertEqual(self.call.fired, [("idle", 10)])

    def test_end_wait_then_shorter_idle(self) -> None:
        """Wait 10 s ended at 1 s, idle (20 s) armed again at 2 s for 3 s: idle expires at 5,
        before the time the wait would have ended."""
        self.timers.arm_both(20, 10)
        self.call.run(1)
        self.timers.end_wait()
        self.call.run(2)
        self.timers.arm_idle(3)
        self.call.run(30)
        self.assertEqual(self.call.fired, [("idle", 5)])

    def test_end_wait_then_idle_pushed_back(self) -> None:
        """Wait 10 s ended at 1 s, idle 20 s pushed back at 5 and 12 s by 20 s: idle expires at
        32 only."""
        self.timers.arm_both(20, 10)
        self.call.run(1)
        self.timers.end_wait()
        for at in (5, 12):
            self.call.run(at)
            self.timers.arm_idle(20)
        self.call.run(40)
        self.assertEqual(self.call.fired, [("idle", 32)])

    def test_stop_idle(self) -> None:
        """Idle (3 s) stopped at 1 s, wait 5 s: only the wait expires, at 5; the idle deadline
        armed again at 6 s for 2 s expires at 8."""
        self.timers.arm_both(3, 5)
        self.call.run(1)
        self.timers.stop_idle()
        self.call.run(6)
        self.timers.arm_idle(2)
        self.call.run(20)
        self.assertEqual(self.call.fired, [("wait", 5), ("idle", 8)])

    def test_close(self) -> None:
        """Closed, nothing expires even when armed again, no delayed call is left, and the owner
        (whose bound methods it held) is freed by reference counting alone."""
        self.timers.arm_both(3, 5)
        self.timers.close()
        self.timers.arm_idle(1)
        self.timers.arm_both(1, 1)
        self.call.run(10)
        self.assertEqual((self.call.fired, self.clock.getDelayedCalls()), ([], []))
        ref = weakref.ref(self.call)
        gc.disable()
        self.addCleanup(gc.enable)
        del self.call, self.timers
        self.assertIsNone(ref())
