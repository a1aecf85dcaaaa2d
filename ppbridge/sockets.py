"""Socket reads sized for frames, not for Twisted's default.

Twisted's TCP transports read at most ``bufferSize`` bytes (64 KiB) per ``recv``, one read per
reactor wake-up: a 256 KiB frame (the default ``frame_size``) costs its receiver four reads,
each through the whole protocol stack (TLS, the RESP guard, hiredis, twisted.web's parser) and
the reactor's dispatch. ``bufferSize`` is a plain attribute read through ``self``, so one
transport can have its own (checked against Twisted 26.10: ``tcp.Connection.doRead``;
``tests/test_sockets.py`` fails if it is renamed). :func:`widen` sets it on a connection's TCP
transport, below a TLS layer if there is one. Sends are left as Twisted makes them: a larger
``SEND_LIMIT`` made Twisted join the data waiting to be sent more often, and measured no better.
"""

from __future__ import annotations

from typing import Any

READ_SIZE = 256 * 1024  # the default frame_size: one read can hold a whole frame


def widen(transport: Any) -> None:
    """Let ``transport`` (or the TCP transport under its TLS layer) read a frame per ``recv``;
    anything else is left alone."""
    layers: tuple[Any, ...] = (transport, getattr(transport, "transport", None))
    for layer in layers:
        if hasattr(layer, "bufferSize"):
            layer.bufferSize = READ_SIZE
            return
