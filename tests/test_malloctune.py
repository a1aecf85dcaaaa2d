"""ppbridge.malloctune: glibc's malloc keeps frame-sized buffers in the heap."""

from __future__ import annotations

import platform

from twisted.trial.unittest import TestCase

from ppbridge import malloctune


class FakeLibc:
    """Records mallopt calls; answers ``result`` (glibc: 1 for success, 0 for a refusal)."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


class TuneTests(TestCase):
    def test_sets_both_thresholds(self) -> None:
        """The mmap threshold goes above a frame-sized buffer and the trim threshold is set,
        in glibc's parameter numbers; True when glibc accepted both."""
        libc = FakeLibc()
        self.assertTrue(malloctune.tune(libc))
        self.assertEqual(libc.calls, [(-3, malloctune.MMAP_THRESHOLD), (-1, malloctune.TRIM_THRESHOLD)])
        self.assertGreater(malloctune.MMAP_THRESHOLD, 256 * 1024 + 1024)
        self.assertGreaterEqual(malloctune.TRIM_THRESHOLD, malloctune.MMAP_THRESHOLD)

    def test_refused_or_missing(self) -> None:
        """A libc without mallopt (not glibc) or one that refuses: False, nothing raised."""
        self.assertFalse(malloctune.tune(object()))
        self.assertFalse(malloctune.tune(FakeLibc(result=0)))

    def test_real_glibc_accepts(self) -> None:
        """On this machine's glibc the real call succeeds (a test process keeps the settings:
        harmless, they only keep freed memory mapped)."""
        if platform.libc_ver()[0] != "glibc":
            self.skipTest("not glibc")
        self.assertTrue(malloctune.tune())
