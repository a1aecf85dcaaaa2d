"""The sample app's deterministic bytes: ``pattern_bytes(seed, n)``, its SHA-256, and a push
producer that writes them into a twisted.web request (``/bytes``, the big transfers of the
tests and the demo), so a test can check every byte that crossed without storing them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.web.server import Request
from zope.interface import implementer

_BLOCK = 65536
"""``pattern_bytes`` always draws this many bytes at a time, so its stream is fixed."""


def pattern_bytes(seed: int, n: int, chunk: int = 65536) -> Iterator[bytes]:
    """Yield exactly ``n`` deterministic bytes for ``seed``, in pieces of ``chunk`` bytes.

    The stream depends only on ``seed`` (never on ``chunk``): it is made of
    ``random.Random(seed).randbytes(65536)`` blocks, the last one cut short, so the data
    for a smaller ``n`` is a prefix of the data for a larger one. Only the last piece is
    shorter than ``chunk``.
    """
    if n < 0 or chunk <= 0:
        raise ValueError("n must be >= 0 and chunk > 0")
    rng = random.Random(seed)
    block, pos, remaining = b"", 0, n
    while remaining > 0:
        size = min(chunk, remaining)
        if pos + size <= len(block):
            piece, pos = block[pos : pos + size], pos + size
        else:
            parts, need = [block[pos:]], size - (len(block) - pos)
            while need > 0:
                block = rng.randbytes(_BLOCK)
                pos = min(need, _BLOCK)
                parts.append(block[:pos])
                need -= pos
            piece = b"".join(parts)
        remaining -= size
        yield piece


def pattern_sha256(seed: int, n: int) -> str:
    """Return the hex SHA-256 of ``pattern_bytes(seed, n)``."""
    digest = hashlib.sha256()
    for piece in pattern_bytes(seed, n, chunk=1 << 20):
        digest.update(piece)
    return digest.hexdigest()


@implementer(IPushProducer)
class PatternProducer:
    """Writes ``pattern_bytes(seed, n)`` into a request as a push producer.

    It writes while the transport accepts data, stops when paused and goes on when
    resumed, so at most a few chunks are in memory. It yields to the reactor every
    ``CHUNKS_PER_TURN`` chunks even if nothing pauses it. It finishes the request after
    the last byte, and drops everything once stopped (the client left).
    """

    CHUNKS_PER_TURN = 16

    def __init__(self, request: Request, seed: int, n: int, clock: IReactorTime) -> None:
        self._request = request
        self._chunks = pattern_bytes(seed, n)
        self._clock = clock
        self._paused = self._stopped = self._producing = False
        self._later: IDelayedCall | None = None

    def start(self) -> None:
        """Register with the request and write until paused or done."""
        self._request.registerProducer(self, True)
        self._produce()

    def pauseProducing(self) -> None:
        """Stop writing until ``resumeProducing``."""
        self._paused = True
        self._cancel_later()

    def resumeProducing(self) -> None:
        """Write again."""
        self._paused = False
        self._produce()

    def stopProducing(self) -> None:
        """Stop for good: the connection is gone."""
        self._stopped = True
        self._cancel_later()

    def _cancel_later(self) -> None:
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None

    def _produce(self) -> None:
        """Write up to ``CHUNKS_PER_TURN`` chunks; finish, or schedule the next turn."""
        self._cancel_later()
        if self._producing or self._stopped:
            return
        self._producing = True
        try:
            for _ in range(self.CHUNKS_PER_TURN):
                if self._paused or self._stopped:
                    return
                piece = next(self._chunks, None)
                if piece is None:
                    self._stopped = True
                    self._request.unregisterProducer()
                    self._request.finish()
                    return
                self._request.write(piece)
            if not (self._paused or self._stopped):
                self._later = self._clock.callLater(0, self._produce)
        finally:
            self._producing = False
