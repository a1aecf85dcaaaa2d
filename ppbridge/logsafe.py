"""Logging what an attacker controls: its text escaped, its volume throttled.

Channel names, and anything else a hostile Redis or client chooses, may hold CR, LF, ANSI
escapes or NULs that would forge or garble log lines; they are shown escaped instead. And an
attacker decides how often we refuse something, so refusals are logged through a
:class:`Throttle`: a few lines per reason per minute, then a count.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # anything but printable ASCII other than backslash
MAX_SHOWN = 96
BURST = 10  # log lines per reason per PERIOD
PERIOD = 60.0


def escape(value: bytes | str, limit: int = MAX_SHOWN) -> str:
    """Printable ASCII as is; everything else (controls, DEL, non-ASCII, backslash) as a
    ``\\xNN`` escape; cut to ``limit`` characters of input with ``...`` appended."""
    # The common case, several times per access-log line: short printable ASCII, shown as is.
    text = value if isinstance(value, str) else value.decode("ascii") if type(value) is bytes and value.isascii() else None
    if text is not None and len(text) <= limit and text.isascii() and text.isprintable() and "\\" not in text:
        return text  # 0x20-0x7e only
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else bytes(value)
    cut = data[:limit]
    if _UNSAFE.search(cut) is None:  # the common case, once per access-log field: no per-byte loop
        shown = cut.decode("ascii")
    else:
        shown = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in cut)
    return shown + ("..." if len(data) > limit else "")


class Throttle:
    """Which refusals of a reason get a log line: the first ``BURST`` per ``PERIOD`` seconds."""

    def __init__(self, burst: int = BURST, period: float = PERIOD) -> None:
        self._burst = burst
        self._period = period
        self._window: dict[str, tuple[float, int]] = {}

    def allow(self, reason: str, now: float) -> tuple[bool, int]:
        """(log this one?, how many went unlogged in the window that just closed)."""
        start, count = self._window.get(reason, (now, 0))
        unlogged = 0
        if now - start > self._period:
            unlogged = max(0, count - self._burst)
            start, count = now, 0
        count += 1
        self._window[reason] = (start, count)
        return count <= self._burst, unlogged

    def flush(self, now: float) -> list[tuple[str, int]]:
        """(reason, how many went unlogged) for each window that has closed with some left
        unlogged, so a summary is written even when no refusal of that reason follows."""
        closed = [(r, count - self._burst) for r, (start, count) in self._window.items()
                  if now - start > self._period and count > self._burst]
        for reason, _ in closed:
            del self._window[reason]
        return closed
