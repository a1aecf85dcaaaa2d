"""Tests for ppbridge.rekey: fixed and traffic-adaptive periods, and when a rotation is due."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from ppbridge.config import RekeySettings
from ppbridge.rekey import SMOOTHING, AdaptivePolicy, FixedPolicy, RekeySchedule, make_policy

MIN, MAX, BUDGET = 60.0, 3600.0, 1_000_000
T0 = 1_700_000_000.0


class Traffic:
    """Feeds a policy a running message total at a given rate, second by second."""

    def __init__(self, policy: AdaptivePolicy, case: TestCase) -> None:
        self.policy = policy
        self.case = case
        self.now = T0
        self.total = 0.0
        policy.observe(self.now, 0)

    def run(self, rate: float, seconds: float, step: float = 1.0) -> list[float]:
        """Periods seen after each observation; each is checked to lie within the bounds."""
        periods = []
        for _ in range(int(seconds / step)):
            self.now += step
            self.total += rate * step
            self.policy.observe(self.now, int(self.total))
            period = self.policy.period()
            self.case.assertGreaterEqual(period, self.policy.min_period)
            self.case.assertLessEqual(period, self.policy.max_period)
            periods.append(period)
        return periods


def assert_close(case: TestCase, actual: float, expected: float, tolerance: float) -> None:
    """trial's assertAlmostEqual ignores ``delta``; this one honours an absolute tolerance."""
    case.assertLessEqual(abs(actual - expected), tolerance, f"{actual} is not within {tolerance} of {expected}")


def settled(rate: float) -> float:
    return BUDGET / (4 * rate)


class FixedPolicyTests(TestCase):
    """The preset period."""

    def test_period(self) -> None:
        """The period is the configured one, whatever the traffic."""
        policy = FixedPolicy(900.0)
        self.assertEqual(policy.period(), 900.0)
        for t in range(100):
            policy.observe(T0 + t, t * 100_000)
        self.assertEqual(policy.period(), 900.0)

    def test_made_from_settings(self) -> None:
        """mode="fixed" gives the configured period; mode="adaptive" gives bounded adaptive periods."""
        fixed = make_policy(RekeySettings(mode="fixed", period=1234.0))
        self.assertEqual(fixed.period(), 1234.0)
        adaptive = make_policy(RekeySettings(mode="adaptive", min_period=30.0, max_period=600.0,
                                             messages_per_key=1000))
        self.assertIsInstance(adaptive, AdaptivePolicy)
        self.assertEqual(adaptive.period(), 600.0)  # no traffic yet: the longest period
        adaptive.observe(T0, 0)
        adaptive.observe(T0 + 1000, 10_000_000)
        self.assertEqual(adaptive.period(), 30.0)


class AdaptivePolicyTests(TestCase):
    """A period inversely proportional to the smoothed message rate, within bounds."""

    def setUp(self) -> None:
        self.policy = AdaptivePolicy(MIN, MAX, BUDGET)
        self.traffic = Traffic(self.policy, self)

    def test_no_traffic_is_max_period(self) -> None:
        """Before any traffic, and with none, the period is the maximum."""
        self.assertEqual(AdaptivePolicy(MIN, MAX, BUDGET).period(), MAX)
        self.traffic.run(0, 300)
        self.assertEqual(self.policy.period(), MAX)

    def test_steady_rate_settles(self) -> None:
        """Under a steady rate the period settles at messages_per_key / (4 * rate)."""
        self.traffic.run(100, 10 * SMOOTHING)
        assert_close(self, self.policy.period(), settled(100), settled(100) * 0.01)

    def test_observation_interval_does_not_matter(self) -> None:
        """The same rate observed every 1 s or every 10 s settles at the same period."""
        other = AdaptivePolicy(MIN, MAX, BUDGET)
        Traffic(other, self).run(100, 10 * SMOOTHING, step=10.0)
        self.traffic.run(100, 10 * SMOOTHING)
        assert_close(self, other.period(), self.policy.period(), settled(100) * 0.01)

    def test_tenfold_rate_shrinks_period_tenfold(self) -> None:
        """Ten times the traffic gives (once smoothed) a tenth of the period, and it grows back after."""
        self.traffic.run(100, 10 * SMOOTHING)
        slow = self.policy.period()
        periods = self.traffic.run(1000, 10 * SMOOTHING)
        fast = self.policy.period()
        assert_close(self, slow / fast, 10.0, 0.2)
        self.assertEqual(periods, sorted(periods, reverse=True))  # shrinks steadily, never overshoots up
        periods = self.traffic.run(100, 10 * SMOOTHING)
        assert_close(self, self.policy.period(), slow, slow * 0.01)
        self.assertEqual(periods, sorted(periods))

    def test_smoothing(self) -> None:
        """A one-second burst does not collapse the period: the rate is a moving average."""
        self.traffic.run(100, 10 * SMOOTHING)
        before = self.policy.period()
        self.traffic.run(100_000, 1)
        self.assertGreater(self.policy.period(), before / 100)
        self.assertLess(self.policy.period(), before)

    def test_bounds(self) -> None:
        """A very high rate gives min_period, a trickle gives max_period, and every step stays within."""
        self.traffic.run(1_000_000, 10 * SMOOTHING)
        self.assertEqual(self.policy.period(), MIN)
        self.traffic.run(0.5, 20 * SMOOTHING)
        self.assertEqual(self.policy.period(), MAX)

    def test_counter_going_backwards(self) -> None:
        """A running total that drops (a restarted counter) never yields a negative rate or an out-of-bounds period."""
        self.traffic.run(1000, 10 * SMOOTHING)
        self.policy.observe(self.traffic.now + 1, 0)
        self.assertGreaterEqual(self.policy.rate, 0)
        self.assertGreaterEqual(self.policy.period(), MIN)
        self.assertLessEqual(self.policy.period(), MAX)

    def test_time_not_advancing(self) -> None:
        """An observation at the same (or an earlier) time changes nothing and does not divide by zero."""
        self.traffic.run(100, 10 * SMOOTHING)
        before = self.policy.period()
        self.policy.observe(self.traffic.now, int(self.traffic.total) + 1_000_000)
        self.policy.observe(self.traffic.now - 5, int(self.traffic.total) + 2_000_000)
        self.assertEqual(self.policy.period(), before)


class RekeyScheduleTests(TestCase):
    """When a key is due for rotation: by period, by half its lifetime, by half its budget."""

    def setUp(self) -> None:
        self.schedule = RekeySchedule(FixedPolicy(600.0), 1000, 86400.0)

    def test_period(self) -> None:
        """Rotation is due "period" once the period has passed since the key was made, not before."""
        self.assertIsNone(self.schedule.due(T0, T0, 0))
        self.assertIsNone(self.schedule.due(T0 + 599.9, T0, 499))
        self.assertEqual(self.schedule.due(T0 + 600, T0, 0), "period")
        self.assertEqual(self.schedule.due(T0 + 5000, T0, 0), "period")

    def test_messages_at_half_the_budget(self) -> None:
        """At half of messages_per_key (the hard budget) rotation is due "messages" at once,
        whatever the time; one message fewer is not due."""
        self.assertIsNone(self.schedule.due(T0, T0, 499))
        self.assertEqual(self.schedule.due(T0, T0, 500), "messages")
        self.assertEqual(self.schedule.due(T0 + 10_000, T0, 5000), "messages")

    def test_each_key_by_its_own_age(self) -> None:
        """The period counts from the key judged: a newer key is not due when an older one is."""
        self.assertEqual(self.schedule.due(T0 + 700, T0, 0), "period")
        self.assertIsNone(self.schedule.due(T0 + 700, T0 + 500, 0))

    def test_half_the_lifetime_caps_the_period(self) -> None:
        """A hard lifetime shorter than twice the period brings rotation forward to half of it."""
        schedule = RekeySchedule(FixedPolicy(600.0), 1000, 100.0)
        self.assertEqual(schedule.period(), 50.0)
        self.assertIsNone(schedule.due(T0 + 49.9, T0, 0))
        self.assertEqual(schedule.due(T0 + 50, T0, 0), "period")

    def test_follows_adaptive_policy(self) -> None:
        """With an adaptive policy the period used is the one the traffic gives."""
        policy = AdaptivePolicy(MIN, MAX, BUDGET)
        schedule = RekeySchedule(policy, BUDGET, 86400.0)
        Traffic(policy, self).run(1000, 10 * SMOOTHING)  # period about 250 s
        self.assertIsNone(schedule.due(T0 + 200, T0, 0))
        self.assertEqual(schedule.due(T0 + 300, T0, 0), "period")
