"""Twisted's per-send() cap, raised for connections that carry frames (a workaround, here only).

Twisted 26.10's ``abstract.FileDescriptor`` sends at most ``SEND_LIMIT`` (128 KiB) per
``send()`` and joins what is left with the writes that follow: every ~256 KiB frame (a
PUBLISH on the proxy's publisher, a decrypted frame written to a client by the forwarder) was
copied once more. :func:`raise_send_limit` lifts the cap on one transport; ``bufferSize``, the
write-pause threshold, is left alone, so memory stays as flat as before. A transport without
the attribute (TLS, another reactor) is left as it is.
"""

from __future__ import annotations

from typing import Any

SEND_LIMIT = 1024 * 1024  # bytes per send() on a frame-carrying connection (Twisted: 128 KiB)


def raise_send_limit(transport: Any, limit: int = SEND_LIMIT) -> None:
    """Let ``transport`` send up to ``limit`` bytes per ``send()`` (when it has such a cap)."""
    if hasattr(transport, "SEND_LIMIT"):
        transport.SEND_LIMIT = limit
