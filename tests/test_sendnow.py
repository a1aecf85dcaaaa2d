"""ppbridge.sendnow: which transports are sent at once and which are left to the reactor."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from ppbridge.sendnow import send_now


class FakeTCP:
    """The attributes of a Twisted TCP transport send_now looks at; counts doWrite calls."""

    def __init__(self, connected: bool = True, disconnecting: bool = False) -> None:
        self.connected, self.disconnecting = connected, disconnecting
        self.writes = 0

    def doWrite(self) -> None:
        self.writes += 1


class Wrapper:
    """A TLS-like wrapper: no doWrite of its own, the TCP transport under it."""

    def __init__(self, transport: object) -> None:
        self.transport = transport


class SendNowTests(TestCase):
    def test_open_transport_sent(self) -> None:
        """A connected TCP transport gets one doWrite (what the reactor calls when writable)."""
        tcp = FakeTCP()
        self.assertTrue(send_now(tcp))
        self.assertEqual(tcp.writes, 1)

    def test_closing_transport_left_to_the_reactor(self) -> None:
        """A transport being closed, or not connected, is not touched: its doWrite would
        finish a close the reactor must see."""
        for tcp in (FakeTCP(disconnecting=True), FakeTCP(connected=False)):
            self.assertFalse(send_now(tcp))
            self.assertEqual(tcp.writes, 0)

    def test_tls_sent_through_its_tcp_transport(self) -> None:
        """A wrapper without doWrite (TLS) is sent through the TCP transport under it; a
        transport with neither is left alone."""
        tcp = FakeTCP()
        self.assertTrue(send_now(Wrapper(tcp)))
        self.assertEqual(tcp.writes, 1)
        self.assertFalse(send_now(Wrapper(Wrapper(tcp))))
        self.assertFalse(send_now(object()))
        self.assertEqual(tcp.writes, 1)
