"""Tests for ppbridge.timerpool: one-shot timers whose reactor calls are reused, on a Clock."""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from ppbridge.timerpool import PooledClock, TimerPool
from ppbridge.timers import CallTimers


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


class PooledClockTests(TestCase):
    """CallTimers on a PooledClock: the same deadlines, on reactor calls handed from one owner
    to the next."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pooled = PooledClock(TimerPool(self.clock))
        self.fired: list[str] = []

    def timers(self, name: str) -> CallTimers:
        return CallTimers(cast(IReactorTime, self.pooled), lambda: self.fired.append(name + " idle"),
                          lambda: self.fired.append(name + " wait"))

    def test_deadlines_fire_as_on_the_reactor(self) -> None:
        """The wait's end fires at its time, then the idle deadline at its own, pushed back
        once: the pooled clock's calls keep time and reset as the reactor's do."""
        timers = self.timers("a")
        timers.arm_both(10.0, 3.0)
        self.clock.advance(3.0)
        self.assertEqual(self.fired, ["a wait"])
        timers.arm_idle(10.0)
        self.clock.advance(9.9)
        self.assertEqual(self.fired, ["a wait"])
        self.clock.advance(0.1)
        self.assertEqual((self.fired, self.clock.getDelayedCalls()), (["a wait", "a idle"], []))

    def test_a_closed_owners_call_serves_the_next_and_never_the_old_owner(self) -> None:
        """A CallTimers closed before either deadline gives its reactor call back: the next
        one armed uses that very call, pushed back to its own time, and only the new owner's
        deadline fires."""
        first = self.timers("first")
        first.arm_both(10.0, 5.0)
        call = self.clock.getDelayedCalls()[0]
        self.clock.advance(1.0)
        first.close()
        second = self.timers("second")
        second.arm_both(10.0, 5.0)
        self.assertEqual((self.clock.getDelayedCalls(), call.getTime()), ([call], 6.0))
        self.clock.advance(20.0)
        self.assertEqual(self.fired, ["second wait", "second idle"])

    def test_a_handle_is_inactive_once_fired_or_cancelled(self) -> None:
        """A handle is active until it fires or is cancelled, then refuses getTime, reset and
        a second cancel (as a cancelled DelayedCall does), even if its call serves another."""
        fired = self.pooled.callLater(2.0, lambda: self.fired.append("fired"))
        cancelled = self.pooled.callLater(2.0, lambda: self.fired.append("cancelled"))
        self.assertEqual((fired.active(), fired.getTime()), (True, 2.0))
        cancelled.cancel()
        self.pooled.callLater(3.0, lambda: self.fired.append("next"))  # takes the cancelled one's call
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(3.0)
        self.assertEqual((self.fired, fired.active(), cancelled.active()), (["fired", "next"], False, False))
        for handle in (fired, cancelled):
            self.assertRaises(RuntimeError, handle.getTime)
            self.assertRaises(RuntimeError, handle.reset, 1.0)
            self.assertRaises(RuntimeError, handle.cancel)
