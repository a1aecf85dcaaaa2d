"""Attacker-chosen text made safe to log: no control characters, bounded length.

Channel names, and anything else a hostile Redis or client chooses, may hold CR, LF, ANSI
escapes or NULs that would forge or garble log lines; they are shown escaped instead.
"""

from __future__ import annotations

MAX_SHOWN = 96


def escape(value: bytes | str, limit: int = MAX_SHOWN) -> str:
    """Printable ASCII as is; everything else (controls, DEL, non-ASCII, backslash) as a
    ``\\xNN`` escape; cut to ``limit`` characters of input with ``...`` appended."""
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else bytes(value)
    cut = data[:limit]
    shown = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in cut)
    return shown + ("..." if len(data) > limit else "")
