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

    def close(self) -> None:
        """Cancel for good: the owner's callback is forgotten (an owner whose bound method it
        is would otherwise be kept in a reference cycle, freed only by the cyclic collector);
        arming it later does nothing."""
        self.cancel()
        self._on_expiry = _nothing


def _nothing() -> None:
    return None
