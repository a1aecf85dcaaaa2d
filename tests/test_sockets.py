"""ppbridge.sockets: frame-sized reads on a connection's TCP transport."""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from ppbridge.sockets import READ_SIZE, widen


class _Tcp:
    """Stands for a TCP transport: Twisted's attribute, at its default."""

    bufferSize = tcp.Connection.bufferSize


class _Tls:
    """Stands for a TLS layer: no such attribute, the TCP transport under it."""

    def __init__(self) -> None:
        self.transport = _Tcp()


class WidenTests(TestCase):
    def test_twisted_still_has_the_attribute(self) -> None:
        """Twisted's TCP transports still read bufferSize bytes at a time, 64 KiB by default,
        below ours: if this fails, widen() has silently stopped working."""
        self.assertEqual(tcp.Connection.bufferSize, 64 * 1024)
        self.assertLess(tcp.Connection.bufferSize, READ_SIZE)

    def test_tcp_transport(self) -> None:
        """A TCP transport gets frame-sized reads, on itself only."""
        transport = _Tcp()
        widen(transport)
        self.assertEqual(transport.bufferSize, READ_SIZE)
        self.assertEqual(_Tcp.bufferSize, 64 * 1024)

    def test_under_tls(self) -> None:
        """Under a TLS layer, the TCP transport beneath it is widened."""
        tls = _Tls()
        widen(tls)
        self.assertEqual(tls.transport.bufferSize, READ_SIZE)

    def test_other_transports_left_alone(self) -> None:
        """A transport without that attribute (a test's StringTransport) is left as it is."""
        transport = StringTransport()
        widen(transport)
        self.assertFalse(hasattr(transport, "bufferSize"))
