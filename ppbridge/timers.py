"""Periodic jobs that never die, and errbacks that never drop a failure silently.

A bare ``LoopingCall`` stops for good the first time its function raises; every periodic job
of ppbridge (announcements, negotiation retries, rekeying, expiry, Redis health checks) runs
through :class:`Periodic`, which logs a failed tick and keeps the timer going.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge.errors import BusUnavailable

log = Logger()


def log_failure(message: str) -> Callable[[Failure], None]:
    """An errback that logs ``message`` and swallows the failure.

    A lost Redis link is an expected event (it reconnects by itself): one warning line.
    Anything else is a bug and is logged with its traceback.
    """

    def errback(failure: Failure) -> None:
        if failure.check(BusUnavailable, CancelledError):
            log.warn("{message}: {error}", message=message, error=failure.getErrorMessage())
        else:
            log.failure(message, failure)

    return errback


class Periodic:
    """Runs ``job`` every ``interval`` seconds on ``clock``; a failing tick is logged only."""

    def __init__(self, clock: IReactorTime, interval: float, job: Callable[[], Any], name: str) -> None:
        self.interval = interval
        self.name = name
        self._job = job
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def _tick(self) -> Deferred[Any]:
        return maybeDeferred(self._job).addErrback(log_failure(f"{self.name} failed; it runs again next tick"))

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self, now: bool = False) -> None:
        self._loop.start(self.interval, now=now).addErrback(log_failure(f"{self.name} stopped"))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()


def wait_until(clock: IReactorTime, done: Callable[[], bool], timeout: float, interval: float = 0.05) -> Deferred[bool]:
    """Fires True as soon as ``done()`` holds (checked now, then every ``interval`` seconds),
    or False once ``timeout`` seconds have passed without it."""
    end = clock.seconds() + timeout
    result: Deferred[bool] = Deferred()

    def check() -> None:
        if done():
            result.callback(True)
        elif clock.seconds() >= end:
            result.callback(False)
        else:
            clock.callLater(min(interval, end - clock.seconds()), check)

    check()
    return result


class Deadline:
    """A one-shot timer that can be pushed back: ``arm(seconds)`` (re)starts it, ``cancel()``
    stops it; when it expires it calls ``on_expiry`` once."""

    def __init__(self, clock: IReactorTime, on_expiry: Callable[[], None]) -> None:
        self._clock = clock
        self._on_expiry = on_expiry
        self._call: IDelayedCall | None = None

    def arm(self, seconds: float) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(seconds)
        else:
            self._call = self._clock.callLater(seconds, self._on_expiry)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def armed(self) -> bool:
        """Whether it will expire unless pushed back or stopped."""
        return self._call is not None and self._call.active()

    def close(self) -> None:
        """Cancel for good: the owner's callback is forgotten (an owner whose bound method it
        is would otherwise be kept in a reference cycle, freed only by the cyclic collector);
        arming it later does nothing."""
        self.cancel()
        self._on_expiry = _nothing


def _nothing() -> None:
    return None


class CallTimers:
    """An upstream call's two deadlines on one timer of the clock: the idle deadline
    (``arm_idle``, pushed back at every sign of progress) and the wait for the response head
    (armed with it by ``arm_both``; ``end_wait`` when the head came). Whichever is due first
    expires, calling ``on_idle`` or ``on_wait``; on a tie the idle deadline wins (as when two
    timers were armed idle first). Two Deadlines cost a timer made and cancelled more per call.

    The one delayed call stands for the earlier deadline. Which one that is, is remembered,
    not found again by comparing times when it fires, so no deadline goes missing by a float
    rounding. Armed, a deadline is set ``seconds`` from now exactly as a Deadline's; one that
    takes the timer over from the other is set by the difference of two times, which may
    round its last bit (as pushing back a Deadline may)."""

    def __init__(self, clock: IReactorTime, on_idle: Callable[[], None], on_wait: Callable[[], None]) -> None:
        self._clock = clock
        self._on_idle = on_idle
        self._on_wait = on_wait
        self._call: IDelayedCall | None = None
        self._for_wait = False  # what _call stands for: the wait (else the idle deadline)
        self._idle_due: float | None = None
        self._wait_due: float | None = None
        self._due = 0.0  # when _call is due (by this clock, when it was set): not asked of the call

    def arm_both(self, idle: float, wait: float) -> None:
        """Both deadlines at once: idle in ``idle`` seconds, the wait's end in ``wait``."""
        now = self._clock.seconds()
        idle_due, wait_due = self._idle_due, self._wait_due = now + idle, now + wait
        if wait_due < idle_due:
            self._set(True, wait, wait_due)
        else:
            self._set(False, idle, idle_due)

    def arm_idle(self, seconds: float) -> None:
        """The idle deadline is ``seconds`` from now (armed or pushed back)."""
        now = self._clock.seconds()
        due = self._idle_due = now + seconds
        wait_due, call = self._wait_due, self._call
        if call is not None and self._for_wait:
            # The call stands for the wait, or for where the wait ended (then it only moves on)
            if due <= (self._due if wait_due is None else wait_due):
                self._set(False, seconds, due)
        elif wait_due is not None and wait_due < due:
            self._set(True, wait_due - now, wait_due)
        else:
            self._set(False, seconds, due)

    def stop_idle(self) -> None:
        """No idle deadline any more (until armed again)."""
        self._idle_due = None
        if self._call is not None and not self._for_wait:
            self._reschedule()

    def end_wait(self) -> None:
        """The response head came (or the call failed): the wait's deadline is gone. A call
        standing for it is left to fire, when it moves on to the idle deadline: most calls are
        over before, and then no reset was needed."""
        self._wait_due = None

    def close(self) -> None:
        """Cancel for good, forgetting the owner's callbacks (no reference cycle through them);
        arming it later does nothing."""
        self._on_idle = self._on_wait = _nothing
        self._idle_due = self._wait_due = None
        self._cancel()

    def _set(self, for_wait: bool, delay: float, due: float) -> None:
        """The delayed call fires in ``delay`` seconds (at ``due``), for the wait or the idle deadline."""
        if self._on_idle is _nothing:
            return  # closed
        call = self._call
        if call is not None and call.active():
            call.reset(max(0.0, delay))
        else:
            self._call = self._clock.callLater(max(0.0, delay), self._expired)
        self._for_wait = for_wait
        self._due = due

    def _reschedule(self) -> None:
        """Point the delayed call at the earlier deadline left, or cancel it."""
        idle, wait = self._idle_due, self._wait_due
        if idle is None and wait is None:
            self._cancel()
            return
        for_wait = idle is None or (wait is not None and wait < idle)
        due: float = wait if for_wait else idle  # type: ignore[assignment]
        self._set(for_wait, due - self._clock.seconds(), due)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _expired(self) -> None:
        self._call = None
        if self._for_wait and self._wait_due is None:
            pass  # where the wait would have ended: on to the idle deadline
        elif self._for_wait:
            self._wait_due = None
            self._on_wait()
        else:
            self._idle_due = None
            self._on_idle()
        if self._call is None:
            self._reschedule()
