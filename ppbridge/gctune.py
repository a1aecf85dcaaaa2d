"""The cyclic garbage collector, tuned for a long-running twistd process.

CPython's default thresholds (700, 10, 10) run a young collection every 700 container
allocations; a request through the bridge makes hundreds (Deferreds, headers, frames), so the
collector ran every request or two, and every older collection walked everything the process
built at start (Twisted, cryptography, prometheus_client, the configuration): about 5 % of the
CPU of both services under load (perf, c16 small requests). After start-up,
:func:`tune` moves what exists into the permanent generation (``gc.freeze``: never traversed
again; it lives as long as the process anyway) and lets the young generation grow to
:data:`YOUNG` objects first. Cycles are still collected: later, in larger batches.
"""

from __future__ import annotations

import gc

YOUNG = 20_000  # container allocations (minus frees) between young collections


def tune() -> None:
    """Freeze what start-up built and raise the young generation's threshold (once the
    services are built: called by both twistd plugins' ``makeService``)."""
    gc.collect()  # what start-up left as garbage is not kept for ever
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG, older, oldest)
