"""Tests for ppbridge.timerpool: one-shot timers whose reactor calls are reused, on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from ppbridge.timerpool import TimerPool


class PooledDeadlineTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = TimerPool(self.clock, keep=2)
        self.fired: list[str] = []

    def deadline(self, name: str):  # type: ignore[no-untyped-def]
        return self.pool.deadline(lambda: self.fired.append(name))

    def test_expires_once_and_can_be_pushed_back(self) -> None:
        """An armed timer calls its owner once when due; arming it again before then pushes
        the same call back."""
        timer = self.deadline("a")
        timer.arm(5.0)
        call = self.clock.getDelayedCalls()[0]
        self.clock.advance(4.0)
        timer.arm(5.0)
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.2)
        self.assertEqual((self.fired, timer.armed), (["a"], False))
        self.clock.advance(100.0)
        self.assertEqual(self.fired, ["a"])

    def test_a_closed_timers_call_serves_the_next_and_never_its_old_owner(self) -> None:
        """A timer closed before it expired gives its call back: the next timer armed uses that
        very call, pushed back to its own time, and the first owner is never called."""
        first = self.deadline("first")
        first.arm(5.0)
        call = self.clock.getDelayedCalls()[0]
        self.clock.advance(1.0)
        first.close()
        self.assertEqual(self.pool.free, 1)
        second = self.deadline("second")
        second.arm(5.0)
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.assertEqual(call.getTime(), 6.0)
        self.clock.advance(10.0)
        self.assertEqual(self.fired, ["second"])

    def test_a_free_call_that_comes_due_does_nothing_and_is_not_reused(self) -> None:
        """A call given back and never reused runs no one when due, and the pool then makes a
        new call for the next timer."""
        first = self.deadline("first")
        first.arm(5.0)
        first.cancel()
        self.clock.advance(6.0)
        self.assertEqual((self.fired, self.clock.getDelayedCalls(), self.pool.free), ([], [], 0))
        second = self.deadline("second")
        second.arm(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.fired, ["second"])

    def test_a_free_call_due_later_is_not_brought_forward(self) -> None:
        """A free call due after the new timer's time is cancelled, not moved earlier, and a
        new call made at the right time."""
        long = self.deadline("long")
        long.arm(60.0)
        old = self.clock.getDelayedCalls()[0]
        long.close()
        short = self.deadline("short")
        short.arm(5.0)
        self.assertTrue(old.cancelled)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [5.0])
        self.clock.advance(5.0)
        self.assertEqual(self.fired, ["short"])

    def test_keeps_at_most_keep_calls_and_stop_cancels_them(self) -> None:
        """Beyond ``keep`` free calls, a call given back is cancelled; stop() cancels every free
        call, so nothing is left scheduled."""
        timers = [self.deadline(str(i)) for i in range(3)]
        for timer in timers:
            timer.arm(5.0)
        for timer in timers:
            timer.close()
        self.assertEqual((self.pool.free, len(self.clock.getDelayedCalls())), (2, 2))
        self.pool.stop()
        self.assertEqual((self.pool.free, self.clock.getDelayedCalls()), (0, []))
        self.clock.advance(10.0)
        self.assertEqual(self.fired, [])
