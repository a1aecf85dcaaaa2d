"""Stream ids: unpredictable, cut from a block of ``os.urandom`` kept in the process.

Each request the forwarder sends gets a random 16-byte stream id, and nobody may be able to
name a stream before its head is published: that is part of how one client's stream is kept
apart from another's (a reply is matched to its stream by the id, besides the channel and the
proxy process it came from). Drawing each id with its own ``os.urandom`` call costs a
``getrandom`` system call per request; :class:`RandomIds` draws ``BLOCK`` bytes at once and
hands them out 16 at a time.

Why the block is as safe as a call per id: ``os.urandom`` is the kernel's CSPRNG, whose
output is unpredictable however it is sliced; bytes of one call tell nothing of the bytes
next to them, so knowing every id handed out so far tells nothing of the next. Each id is
handed out once (taken off the block). The bytes not yet handed out sit in this process's
memory, beside the session keys, which are worth more to whoever could read it. A child made
by ``fork`` starts with an empty block (``os.register_at_fork``), so two processes never
hand out the same ids.
"""

from __future__ import annotations

import os

from ppbridge.wire import STREAM_ID_SIZE

BLOCK = 4096  # bytes per os.urandom call: 256 stream ids


class RandomIds:
    """Unpredictable ids of ``size`` bytes, taken from ``os.urandom`` ``block`` bytes at a time."""

    __slots__ = ("_size", "_block", "_ids")

    def __init__(self, size: int, block: int = BLOCK) -> None:
        if size <= 0 or block < size:
            raise ValueError("an id needs a positive size, and a block at least one id")
        self._size = size
        self._block = block - block % size
        self._ids: list[bytes] = []

    def take(self) -> bytes:
        """A new id, never handed out before."""
        ids = self._ids
        if not ids:
            self._refill()
        return ids.pop()

    def _refill(self) -> None:
        size, block = self._size, os.urandom(self._block)
        self._ids[:] = [block[at : at + size] for at in range(0, len(block), size)]

    def forget(self) -> None:
        """Drop the ids not handed out (a forked child must not hand out its parent's)."""
        self._ids.clear()


stream_ids = RandomIds(STREAM_ID_SIZE)
os.register_at_fork(after_in_child=stream_ids.forget)
