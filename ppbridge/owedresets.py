"""RESETs the proxy owes its forwarders: streams it ended while it could not publish.

A call that loses the bus (the proxy's Redis link drops, or a PUBLISH of its answer fails) is
cancelled at once, but its forwarder cannot be told then, and would make its client wait for
its own timeout (``request_timeout``, 30 s by default) for an answer the proxy knows will
never come. The proxy owes that stream a RESET instead, and publishes it as soon as it is
connected again (:meth:`ppbridge.proxy.ProxyService._pay_owed`), under the key it then holds
with that forwarder: the client gets 502 ``redis-connection-lost`` moments after the link is
back.

Best effort, and bounded: at most :data:`MAX_OWED` streams (the oldest give way), each kept
for at most the proxy's ``stream_idle_timeout`` (the longest a forwarder waits on a silent
stream with the default settings; after that it has answered its client itself). A forwarder
that has already ended the stream ignores the RESET quietly (it crossed the stream's end).
"""

from __future__ import annotations

from typing import NamedTuple

MAX_OWED = 4096
"""Streams owed a RESET at most (as many as a forwarder remembers as recently closed)."""


class Owed(NamedTuple):
    """A RESET owed: to ``forwarder``, on its reply ``channel``, for ``stream_id``."""

    forwarder: bytes
    channel: bytes
    stream_id: bytes
    payload: bytes  # the RESET's payload (wire.encode_reset)
    expires: float  # by the proxy's clock: not sent after this


class OwedResets:
    """The RESETs owed now, one per stream (the first cause owed stands), oldest first."""

    def __init__(self, limit: int = MAX_OWED) -> None:
        self._limit = limit
        self._owed: dict[tuple[bytes, bytes], Owed] = {}

    def __len__(self) -> int:
        return len(self._owed)

    def owe(self, owed: Owed) -> None:
        """Owe ``owed`` (nothing more if its stream is owed one already)."""
        key = (owed.forwarder, owed.stream_id)
        if key in self._owed:
            return
        if len(self._owed) >= self._limit:
            del self._owed[next(iter(self._owed))]
        self._owed[key] = owed

    def take(self, now: float) -> list[Owed]:
        """Every RESET still owed at ``now``, oldest first; none is owed afterwards."""
        owed, self._owed = self._owed, {}
        return [o for o in owed.values() if o.expires > now]

    def expire(self, now: float) -> None:
        """Forget the RESETs no forwarder can be waiting for any more."""
        self._owed = {k: o for k, o in self._owed.items() if o.expires > now}
