"""RESETs owed to the other side of streams a process ended while it could not publish.

Whoever drops a stream for want of Redis tells the other side once it is connected again:

* **the proxy**: a call that loses the bus (its Redis link drops, or a PUBLISH of its answer
  fails) is cancelled at once, but its forwarder, perhaps still connected, cannot be told then,
  and would make its client wait for its own timeout (``request_timeout``, 30 s by default) for
  an answer that will never come. The proxy owes the stream a RESET (code 9); the client gets
  502 ``redis-connection-lost`` moments after the link is back.
* **the forwarder**: a stream it answers 502 ``redis-connection-lost`` when its own link drops
  may still be running at the proxy (holding an upstream connection, waiting for upload frames
  that will not come) until the proxy's timeouts. The forwarder owes it a RESET (cancel); the
  proxy closes the upstream connection when the link is back.

Each is published under the key the process then holds with that peer (:meth:`OwedResets.pay`).
Best effort, and bounded: at most :data:`MAX_OWED` streams (the oldest give way), each kept for
at most the owner's ``stream_idle_timeout`` (the longest the other side waits on a silent
stream with the default settings). A side that has already ended the stream ignores the RESET
quietly (it crossed the stream's end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from twisted.logger import Logger

from ppbridge.wire import MsgType

if TYPE_CHECKING:
    from ppbridge.keyring import Keyring
    from ppbridge.node import SessionNode

log = Logger()
MAX_OWED = 4096
"""Streams owed a RESET at most (as many as a forwarder remembers as recently closed)."""


class Owed(NamedTuple):
    """A RESET owed: to ``peer``, on ``channel`` (where the peer reads that stream), for ``stream_id``."""

    peer: bytes
    channel: bytes
    stream_id: bytes
    payload: bytes  # the RESET's payload (wire.encode_reset)
    expires: float  # by the owner's clock: not sent after this


class OwedResets:
    """The RESETs owed now, one per stream (the first cause owed stands), oldest first."""

    def __init__(self, peers: str = "peers", limit: int = MAX_OWED) -> None:
        self._peers = peers  # who they are owed to, for the log line ("forwarders", "proxies")
        self._limit = limit
        self._owed: dict[tuple[bytes, bytes], Owed] = {}

    def __len__(self) -> int:
        return len(self._owed)

    def owe(self, owed: Owed) -> None:
        """Owe ``owed`` (nothing more if its stream is owed one already)."""
        key = (owed.peer, owed.stream_id)
        if key in self._owed:
            return
        if len(self._owed) >= self._limit:
            del self._owed[next(iter(self._owed))]
        self._owed[key] = owed

    def take(self, now: float) -> list[Owed]:
        """Every RESET still owed at ``now``, oldest first; none is owed afterwards."""
        owed, self._owed = self._owed, {}
        return [o for o in owed.values() if o.expires > now]

    def pay(self, now: float, keyring: Keyring, node: SessionNode) -> int:
        """Publish every RESET still owed, sealed under the key held now with its peer (one
        without a key is forgotten), and say how many in one log line; how many were sent. One
        whose publish fails (the link dropped again) is owed again, for the next time, while it
        is still in time."""
        sent = 0
        for owed in self.take(now):
            entry = keyring.current(owed.peer)
            if entry is not None:
                d = node.send(entry, owed.channel, MsgType.RESET, owed.stream_id, 0, owed.payload)
                d.addErrback(self._lost_again, owed)
                sent += 1
        if sent:
            log.info("told the {peers} of {n} request(s) cut off while Redis was away", peers=self._peers, n=sent)
        return sent

    def _lost_again(self, failure: object, owed: Owed) -> None:
        self.owe(owed)

    def expire(self, now: float) -> None:
        """Forget the RESETs the other side can no longer be waiting for."""
        self._owed = {k: o for k, o in self._owed.items() if o.expires > now}
