"""Step 3 of the method, without I/O: when a proxy renegotiates its keys.

Two policies decide the period:

* :class:`FixedPolicy`: every ``period`` seconds.
* :class:`AdaptivePolicy`: from the traffic. The proxy feeds it its running total of session
  messages; it keeps a smoothed rate ``r`` (an exponentially weighted moving average with time
  constant ``SMOOTHING`` seconds) and sets ``period = clamp(messages_per_key / (4 r),
  min_period, max_period)``: under a steady rate a key is rotated by time after about a quarter
  of its message budget, ten times the traffic gives a tenth of the period.

Independently of time, :class:`RekeySchedule` rotates as soon as a key has protected half of
``messages_per_key`` messages, or reached half of its hard lifetime: ``messages_per_key`` and
the lifetime are hard limits (past them the key neither seals nor opens, see
:mod:`ppbridge.keyring`), and the other half is the time a rotation has to complete.
Each key is judged by its own age, so a negotiation with one forwarder postpones no other.
"""

from __future__ import annotations

import math
from typing import Protocol

from ppbridge.config import RekeySettings

SMOOTHING = 30.0
BUDGET_SHARE = 4


class Policy(Protocol):
    def observe(self, now: float, total_messages: int) -> None: ...

    def period(self) -> float: ...


class FixedPolicy:
    """The same period whatever the traffic."""

    def __init__(self, period: float) -> None:
        self._period = period

    def observe(self, now: float, total_messages: int) -> None:
        return None

    def period(self) -> float:
        return self._period


class AdaptivePolicy:
    """A period inversely proportional to the smoothed message rate, within bounds."""

    def __init__(self, min_period: float, max_period: float, messages_per_key: int) -> None:
        self.min_period = min_period
        self.max_period = max_period
        self.messages_per_key = messages_per_key
        self.rate = 0.0
        self._last: tuple[float, int] | None = None

    def observe(self, now: float, total_messages: int) -> None:
        """Update the smoothed rate from a running total of messages."""
        if self._last is not None:
            then, before = self._last
            dt = now - then
            if dt <= 0:
                return
            instant = max(0, total_messages - before) / dt
            alpha = 1.0 - math.exp(-dt / SMOOTHING)
            self.rate += alpha * (instant - self.rate)
        self._last = (now, total_messages)

    def period(self) -> float:
        if self.rate <= 0:
            return self.max_period
        wanted = self.messages_per_key / (BUDGET_SHARE * self.rate)
        return min(self.max_period, max(self.min_period, wanted))


def make_policy(settings: RekeySettings) -> Policy:
    if settings.mode == "adaptive":
        return AdaptivePolicy(settings.min_period, settings.max_period, settings.messages_per_key)
    return FixedPolicy(settings.period)


class RekeySchedule:
    """Says when a key is due for rotation: by period (at most half its lifetime) or by
    messages (half its budget)."""

    def __init__(self, policy: Policy, messages_per_key: int, lifetime: float) -> None:
        self.policy = policy
        self.messages_per_key = messages_per_key
        self.lifetime = lifetime

    def period(self) -> float:
        """Seconds between rotations now."""
        return min(self.policy.period(), self.lifetime / 2)

    def due(self, now: float, keyed_at: float, messages_on_key: int) -> str | None:
        """Why the key made at ``keyed_at`` is due now ("period" or "messages"), or None."""
        if messages_on_key >= max(1, self.messages_per_key // 2):
            return "messages"
        if now - keyed_at >= self.period():
            return "period"
        return None
