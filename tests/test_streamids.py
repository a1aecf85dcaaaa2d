"""Stream ids drawn from a block of os.urandom (ppbridge.streamids)."""

from __future__ import annotations

import os

from twisted.trial import unittest

from ppbridge.streamids import BLOCK, RandomIds, stream_ids
from ppbridge.wire import STREAM_ID_SIZE


class RandomIdsTests(unittest.TestCase):
    def test_ids_are_distinct_and_of_their_size(self) -> None:
        """Ids over several blocks are all of the asked size and never repeat."""
        ids = RandomIds(16, block=64)
        taken = [ids.take() for _ in range(1000)]
        self.assertEqual({len(i) for i in taken}, {16})
        self.assertEqual(len(set(taken)), len(taken))

    def test_one_urandom_call_per_block(self) -> None:
        """A block of os.urandom serves block // size ids before the next call."""
        calls: list[int] = []
        real = os.urandom

        def counting(n: int) -> bytes:
            calls.append(n)
            return real(n)

        self.patch(os, "urandom", counting)
        ids = RandomIds(16, block=4096)
        for _ in range(256):
            ids.take()
        self.assertEqual(calls, [4096])
        ids.take()
        self.assertEqual(calls, [4096, 4096])

    def test_ids_are_the_block_cut_in_pieces(self) -> None:
        """Every byte of a block is handed out once, in ids of the asked size (nothing reused)."""
        block = bytes(range(256)) * 4
        self.patch(os, "urandom", lambda n: block[:n])
        ids = RandomIds(16, block=1024)
        taken = [ids.take() for _ in range(64)]
        self.assertEqual(sorted(taken), sorted(block[at:at + 16] for at in range(0, 1024, 16)))

    def test_forget_drops_what_is_left(self) -> None:
        """After forget (what a forked child does), the next id comes from a new block."""
        blocks = [b"a" * 64, b"b" * 64]
        self.patch(os, "urandom", lambda n: blocks.pop(0))
        ids = RandomIds(16, block=64)
        self.assertEqual(ids.take(), b"a" * 16)
        ids.forget()
        self.assertEqual(ids.take(), b"b" * 16)

    def test_bad_sizes_are_refused(self) -> None:
        """A size of zero, or a block smaller than one id, is a ValueError."""
        self.assertRaises(ValueError, RandomIds, 0)
        self.assertRaises(ValueError, RandomIds, 16, 8)

    def test_forked_child_starts_a_new_block(self) -> None:
        """A forked child does not hand out the ids its parent has still to hand out."""
        stream_ids.take()  # the parent holds a block now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its next id, to the parent
            try:
                os.write(write, stream_ids.take())
            finally:
                os._exit(0)
        os.close(write)
        child = os.read(read, 64)
        os.close(read)
        os.waitpid(pid, 0)
        self.assertEqual(len(child), STREAM_ID_SIZE)
        parents = {stream_ids.take() for _ in range(BLOCK // STREAM_ID_SIZE)}
        self.assertNotIn(child, parents)
