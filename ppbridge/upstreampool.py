"""The proxy's pool of upstream connections: Twisted's ``HTTPConnectionPool`` whose idle
connections time out by one timer for the whole pool.

Twisted's pool arms a ``callLater(cachedConnectionTimeout)`` each time a connection goes back
to the pool and cancels it when the connection is taken again: a timer made and cancelled per
request (about 2 % of the proxy's instructions per small request). :class:`UpstreamPool`
notes when each connection went back instead, and one timer per pool closes, when it fires,
every connection idle for ``cachedConnectionTimeout`` seconds, then waits for the next one.
A connection still closes ``cachedConnectionTimeout`` seconds after it went back unused.

Twisted's private names used here, checked against Twisted 26.10: the pool's
``_connections`` (key -> list of connections, the oldest first), ``_putConnection`` (called
when a connection is free again), ``_newConnection``, ``_timeouts`` (left empty here) and
``_RetryingHTTP11ClientProtocol`` (the wrapper that retries an idempotent request once on a
connection the server had closed). tests/test_upstreampool.py fails if they go.
"""

from __future__ import annotations

from typing import Any, Hashable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.web.client import HTTPConnectionPool, _RetryingHTTP11ClientProtocol


class UpstreamPool(HTTPConnectionPool):
    """A persistent connection pool with one idle timer for all its connections."""

    def __init__(self, reactor: Any, persistent: bool = True) -> None:
        super().__init__(reactor, persistent)
        self._idle_since: dict[Any, float] = {}  # connection in the pool -> when it went back
        self._sweep: IDelayedCall | None = None

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """As Twisted's, without a timer to cancel: a pooled connection still open, else a new one."""
        connection = self.pooled(key, endpoint)
        return self._newConnection(key, endpoint) if connection is None else succeed(connection)

    def pooled(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Any:
        """A pooled connection still open (wrapped to retry once as Twisted's are), or None."""
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            del self._idle_since[connection]
            if connection.state == "QUIESCENT":
                if self.retryAutomatically:
                    connection = _RetryingHTTP11ClientProtocol(
                        connection, lambda: self._newConnection(key, endpoint))
                return connection
        return None

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        """As Twisted's: a free connection back into the pool (dropping the oldest when it is
        full), noting the time; the pool's timer runs while any connection waits."""
        if connection.state != "QUIESCENT":
            super()._putConnection(key, connection)  # logs the bug, pools nothing
            return
        connections = self._connections.setdefault(key, [])
        if len(connections) == self.maxPersistentPerHost:
            dropped = connections.pop(0)
            dropped.transport.loseConnection()
            del self._idle_since[dropped]
        connections.append(connection)
        self._idle_since[connection] = self._reactor.seconds()
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.cachedConnectionTimeout, self._expire)

    def _expire(self) -> None:
        """Close every connection idle for ``cachedConnectionTimeout`` seconds; wait for the next."""
        self._sweep = None
        now = self._reactor.seconds()
        limit = self.cachedConnectionTimeout
        next_due: float | None = None
        for connections in self._connections.values():
            while connections and self._idle_since[connections[0]] + limit <= now:
                connection = connections.pop(0)
                del self._idle_since[connection]
                connection.transport.loseConnection()
            if connections:
                due = self._idle_since[connections[0]] + limit
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self._reactor.callLater(next_due - now, self._expire)

    def closeCachedConnections(self) -> Deferred[None]:
        """As Twisted's, and the pool's timer stops."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        self._idle_since.clear()
        closed: Deferred[None] = super().closeCachedConnections()
        return closed
