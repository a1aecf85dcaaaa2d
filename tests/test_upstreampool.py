"""Tests for ppbridge.upstreampool.UpstreamPool: idle upstream connections close
``cachedConnectionTimeout`` seconds after they went back to the pool, by one timer per pool."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool, _RetryingHTTP11ClientProtocol

from ppbridge.upstreampool import UpstreamPool

KEY = ("http", b"upstream", 80)


class _Transport:
    def __init__(self) -> None:
        self.lost = False

    def loseConnection(self) -> None:
        self.lost = True


class _Connection:
    """What the pool sees of an HTTP11ClientProtocol: its state, transport and abort()."""

    def __init__(self, state: str = "QUIESCENT") -> None:
        self.state = state
        self.transport = _Transport()

    def abort(self) -> Deferred[None]:
        self.transport.lost = True
        return succeed(None)


class _Endpoint:
    """Records that a new connection was asked for."""

    def __init__(self) -> None:
        self.asked = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.asked += 1
        return Deferred()


class UpstreamPoolTests(TestCase):
    """The pool's connections, reuse and idle timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock)
        self.pool.cachedConnectionTimeout = 240
        self.pool.maxPersistentPerHost = 10

    def test_private_names_still_there(self) -> None:
        """The names of Twisted's pool this class overrides or uses exist (a newer Twisted must fail here first)."""
        pool = HTTPConnectionPool(Clock())
        for name in ("_connections", "_timeouts"):
            self.assertIsInstance(getattr(pool, name, None), dict, name)
        for name in ("_putConnection", "_newConnection", "_removeConnection"):
            self.assertTrue(callable(getattr(pool, name, None)), name)
        self.assertTrue(callable(_RetryingHTTP11ClientProtocol))

    def test_idle_connection_closes_after_the_timeout(self) -> None:
        """A connection put back stays open until cachedConnectionTimeout seconds later, then is
        closed and leaves the pool; no timer is left."""
        connection = _Connection()
        self.pool._putConnection(KEY, connection)
        self.clock.advance(239.5)
        self.assertFalse(connection.transport.lost)
        self.clock.advance(0.5)
        self.assertTrue(connection.transport.lost)
        self.assertEqual(self.pool._connections[KEY], [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer_for_many_connections(self) -> None:
        """Three connections put back at 0, 10 and 20 s share one timer, and each closes 240 s
        after it went back."""
        connections = [_Connection() for _ in range(3)]
        for connection in connections:
            self.pool._putConnection(KEY, connection)
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(10)
        self.clock.advance(200)  # to 230
        lost = []
        for _ in range(3):
            self.clock.advance(10)  # to 240, 250, 260
            lost.append([c.transport.lost for c in connections])
        self.assertEqual(lost, [[True, False, False], [True, True, False], [True, True, True]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reused_connection_gets_a_fresh_timeout(self) -> None:
        """A connection taken at 100 s (wrapped to retry once) and put back at 200 s is open at
        439 s and closed at 440 s: its idle time counts from when it went back."""
        connection = _Connection()
        endpoint = _Endpoint()
        self.pool._putConnection(KEY, connection)
        self.clock.advance(100)
        taken = self.successResultOf(self.pool.getConnection(KEY, endpoint))
        self.assertIsInstance(taken, _RetryingHTTP11ClientProtocol)
        self.assertIs(taken._clientProtocol, connection)
        self.clock.advance(100)
        self.pool._putConnection(KEY, connection)
        self.clock.advance(239)
        self.assertFalse(connection.transport.lost)
        self.clock.advance(1)
        self.assertTrue(connection.transport.lost)
        self.assertEqual(endpoint.asked, 0)

    def test_closed_connection_is_skipped(self) -> None:
        """A pooled connection that is no longer QUIESCENT (the server closed it) is dropped
        from the pool and a new connection is made instead."""
        connection = _Connection()
        endpoint = _Endpoint()
        self.pool._putConnection(KEY, connection)
        connection.state = "CONNECTION_LOST"
        self.assertNoResult(self.pool.getConnection(KEY, endpoint))
        self.assertEqual((endpoint.asked, self.pool._connections[KEY]), (1, []))

    def test_full_pool_drops_the_oldest(self) -> None:
        """With maxPersistentPerHost connections pooled, one more put back closes the oldest."""
        self.pool.maxPersistentPerHost = 2
        connections = [_Connection() for _ in range(3)]
        for connection in connections:
            self.pool._putConnection(KEY, connection)
        self.assertEqual([c.transport.lost for c in connections], [True, False, False])
        self.assertEqual(self.pool._connections[KEY], connections[1:])

    def test_close_stops_the_timer(self) -> None:
        """closeCachedConnections closes the pooled connections and leaves no timer."""
        connection = _Connection()
        self.pool._putConnection(KEY, connection)
        self.successResultOf(self.pool.closeCachedConnections())
        self.assertTrue(connection.transport.lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
