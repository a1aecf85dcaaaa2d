"""One-shot timers for many short-lived owners that reuse their reactor calls.

Each of the forwarder's streams keeps a timer (504 when the proxy does not answer in time, or
the response stalls) that is nearly always stopped long before it expires. A
:class:`~ppbridge.timers.Deadline` makes a DelayedCall per stream and cancels it at the
stream's end, and the reactor later sweeps the cancelled calls out of its heap. On a
:class:`TimerPool`'s :class:`PooledClock` (``TimerPool.deadline`` makes such a Deadline), a
cancelled call goes back to the pool instead, still scheduled and now owned by no one, and the
next timer armed pushes that call back (``DelayedCall.reset`` to a later time moves nothing in
the heap) instead of making one. A call that comes due with no owner does nothing and is
dropped from the pool.

The proxy's upstream calls keep their timers in :class:`~ppbridge.timers.CallTimers` on the
same kind of clock.
"""

from __future__ import annotations

from typing import Callable, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ppbridge.timers import Deadline

KEEP = 1024  # calls kept for reuse at most; beyond that they are cancelled


def _nothing() -> None:
    return None


class _Call:
    """What one reactor call runs: its current owner's expiry, if it has an owner."""

    __slots__ = ("delayed", "owner")

    def __init__(self) -> None:
        self.delayed: IDelayedCall | None = None  # None once it has run
        self.owner: Callable[[], None] | None = None

    def fire(self) -> None:
        owner, self.owner, self.delayed = self.owner, None, None
        if owner is not None:
            owner()


class TimerPool:
    """The reactor calls free for reuse, on one clock; :meth:`stop` cancels them."""

    def __init__(self, clock: IReactorTime, keep: int = KEEP) -> None:
        self.clock = clock
        self.keep = keep
        self._free: list[_Call] = []
        self.pooled_clock = PooledClock(self)  # a clock for owners: its calls come from here

    def deadline(self, on_expiry: Callable[[], None]) -> Deadline:
        """A :class:`~ppbridge.timers.Deadline` calling ``on_expiry`` once, when armed and not
        pushed back or stopped in time, on this pool's calls (:class:`PooledClock`)."""
        return Deadline(cast(IReactorTime, self.pooled_clock), on_expiry)

    def _take(self, seconds: float) -> _Call:
        """A call due in ``seconds``: a free one pushed back to then (never brought forward:
        that would search the reactor's heap), or a new one."""
        due = self.clock.seconds() + seconds
        free = self._free
        while free:
            call = free.pop()
            delayed = call.delayed
            if delayed is None:
                continue  # it ran meanwhile
            if delayed.getTime() <= due:
                delayed.reset(seconds)
                return call
            call.delayed = None
            delayed.cancel()
        call = _Call()
        call.delayed = self.clock.callLater(seconds, call.fire)
        return call

    def _give(self, call: _Call) -> None:
        """Take back a pending call whose owner is done with it."""
        call.owner = None
        if len(self._free) < self.keep:
            self._free.append(call)
        elif call.delayed is not None:
            call.delayed.cancel()
            call.delayed = None

    def stop(self) -> None:
        """Cancel every free call (a stopping service leaves nothing scheduled)."""
        free, self._free = self._free, []
        for call in free:
            if call.delayed is not None:
                call.delayed.cancel()
                call.delayed = None

    @property
    def free(self) -> int:
        """Pending calls waiting for reuse."""
        return sum(1 for call in self._free if call.delayed is not None)


class PooledClock:
    """A clock whose ``callLater`` hands out a pool's reactor calls: for an owner that makes
    one call per short life and cancels it at the end (:class:`~ppbridge.timers.CallTimers`
    of each upstream call), the cancelled call goes back to the pool for the next owner.
    Its calls give what that owner uses: ``active``, ``getTime``, ``reset``, ``cancel``."""

    def __init__(self, pool: TimerPool) -> None:
        self.pool = pool
        self.seconds = pool.clock.seconds

    def callLater(self, delay: float, f: Callable[[], None]) -> _Handle:
        call = self.pool._take(delay)
        handle = _Handle(self.pool, call, f)
        call.owner = handle.fire
        return handle


class _Handle:
    """One owner's use of a pooled call, until it fires or is cancelled (then it is inactive
    for good, whoever uses the call next)."""

    __slots__ = ("_pool", "_call", "_f")

    def __init__(self, pool: TimerPool, call: _Call, f: Callable[[], None]) -> None:
        self._pool = pool
        self._call: _Call | None = call
        self._f = f

    def fire(self) -> None:
        f, self._f, self._call = self._f, _nothing, None
        f()

    def active(self) -> bool:
        return self._call is not None

    def getTime(self) -> float:
        if self._call is None or self._call.delayed is None:
            raise RuntimeError("not active")
        return self._call.delayed.getTime()

    def reset(self, seconds: float) -> None:
        if self._call is None or self._call.delayed is None:
            raise RuntimeError("not active")
        self._call.delayed.reset(seconds)

    def cancel(self) -> None:
        call, self._call, self._f = self._call, None, _nothing
        if call is None:
            raise RuntimeError("not active")
        if call.delayed is not None:
            self._pool._give(call)
