"""ppbridge.gctune: the collector after start-up."""

from __future__ import annotations

import gc

from twisted.trial.unittest import TestCase

from ppbridge import gctune


class TuneTests(TestCase):
    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_frozen_and_young_generation_larger(self) -> None:
        """What exists is moved out of the collected generations (the permanent one), the
        young generation's threshold is raised, the older ones' kept, and collection stays on."""
        _, older, oldest = gc.get_threshold()
        gctune.tune()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), (gctune.YOUNG, older, oldest))
        self.assertTrue(gc.isenabled())
