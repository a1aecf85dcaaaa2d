"""Sending a connection's buffered writes before the reactor turn ends (a workaround, here only).

Twisted's TCP transports buffer every ``write`` and send when the reactor next polls, so
everything a process writes in one turn leaves together at its end. Under load that turns a
pipeline of processes into a convoy: the forwarder reads sixteen requests in one turn and
publishes all sixteen at its end, the proxy then works on all sixteen while the forwarder
waits, and so on: the two processes take turns instead of working at the same time (c16
req/s was the inverse of their *summed* CPU per request). :func:`send_now` sends what a
transport holds at once, through ``doWrite`` (``IWriteDescriptor``, what the reactor itself
calls when the socket is writable); what the socket does not take stays buffered for the
reactor, as usual. A transport being closed is left to the reactor (its ``doWrite`` would
finish the close), and one without ``doWrite`` (another reactor's) is left as it is; a TLS
connection is sent through the TCP transport under it (TLS hands its records on at once).
"""

from __future__ import annotations

from typing import Any


def send_now(transport: Any) -> bool:
    """Send what ``transport`` holds now, as far as its socket takes it; True if it could try."""
    for _ in range(2):  # the transport itself, or the TCP transport under a TLS one
        if hasattr(transport, "doWrite"):
            if not transport.connected or transport.disconnecting:
                return False
            transport.doWrite()  # a failed send stays buffered; the reactor sees it next poll
            return True
        transport = getattr(transport, "transport", None)
    return False
