"""Tests for ppbridge.readpause: a response whose body is taken in the read that brought its
headers costs its connection no pause and resume; one taken later still pauses the connection
until then; a pause outside a read takes effect at once."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase
from twisted.web._newclient import HTTP11ClientProtocol, Request, TransportProxyProducer
from twisted.web.client import Response, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from ppbridge.readpause import ReadTurnProducer, UpstreamConnection, UpstreamConnectionFactory
from ppbridge.upstreamclient import Upstream

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"


class _Transport(StringTransport):
    """Records each pause and resume asked of the connection's transport."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def pauseProducing(self) -> None:
        self.asked.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.asked.append("resume")
        super().resumeProducing()


class _Body:
    """A body protocol recording what it is given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: list[Any] = []
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.ended.append(reason)


def _connection() -> tuple[UpstreamConnection, _Transport, list[Any]]:
    quiescent: list[Any] = []
    connection = UpstreamConnection(quiescent.append)
    transport = _Transport()
    connection.makeConnection(transport)
    return connection, transport, quiescent


def _get(connection: UpstreamConnection) -> list[Response]:
    responses: list[Response] = []
    connection.request(Request(b"GET", b"/", Headers({b"Host": [b"upstream"]}), None, persistent=True)).addCallback(
        responses.append)
    return responses


class ReadPauseTests(TestCase):
    """What the connection's transport is asked, per response."""

    def test_private_names_still_there(self) -> None:
        """The Twisted names this module relies on exist (a newer Twisted must fail here first)."""
        connection, _, _ = _connection()
        _get(connection)
        self.assertIsInstance(connection._transportProxy, ReadTurnProducer)
        self.assertIs(connection._parser.transport, connection._transportProxy)  # type: ignore[union-attr]
        self.assertIsNone(TransportProxyProducer(None)._producer)
        self.assertEqual(_HTTP11ClientFactory(print, "x")._quiescentCallback, print)
        self.assertIsInstance(UpstreamConnectionFactory(print, "x").buildProtocol(None), UpstreamConnection)
        self.assertTrue(issubclass(UpstreamConnection, HTTP11ClientProtocol))

    def test_upstream_pool_uses_it(self) -> None:
        """The proxy's upstream pool makes its connections with this factory."""
        self.assertIs(Upstream("http://127.0.0.1:8080", MemoryReactorClock(), 5.0).pool._factory,
                      UpstreamConnectionFactory)

    def test_body_taken_in_the_same_read(self) -> None:
        """Headers and body in one read, the body taken as the response comes: the transport
        is asked no pause (and no resume but the one Twisted makes when the connection is
        idle again); the body arrives whole and the connection goes back to the pool."""
        connection, transport, quiescent = _connection()
        body = _Body()
        connection.request(Request(b"GET", b"/", Headers({b"Host": [b"upstream"]}), None, persistent=True)) \
            .addCallback(lambda response: response.deliverBody(body))
        connection.dataReceived(ANSWER)
        self.assertEqual((transport.asked, body.data, len(body.ended), quiescent),
                         (["resume"], [b"hello"], 1, [connection]))
        self.assertEqual(transport.producerState, "producing")

    def test_body_taken_later(self) -> None:
        """Headers in a read, the body not taken then: the transport is paused at the end of
        that read and resumed when the body is taken, as with Twisted's own connection."""
        connection, transport, _ = _connection()
        responses = _get(connection)
        connection.dataReceived(ANSWER[:-5])
        self.assertEqual((transport.asked, transport.producerState), (["pause"], "paused"))
        body = _Body()
        responses[0].deliverBody(body)
        self.assertEqual((transport.asked, transport.producerState), (["pause", "resume"], "producing"))
        connection.dataReceived(b"hello")
        self.assertEqual((body.data, len(body.ended)), ([b"hello"], 1))

    def test_pause_outside_a_read_is_at_once(self) -> None:
        """The body's producer paused and resumed outside a read (backpressure) pauses and
        resumes the transport at once."""
        connection, transport, _ = _connection()
        body = _Body()
        connection.request(Request(b"GET", b"/", Headers({b"Host": [b"upstream"]}), None, persistent=True)) \
            .addCallback(lambda response: response.deliverBody(body))
        connection.dataReceived(ANSWER[:-5])
        body.transport.pauseProducing()
        self.assertEqual((transport.asked[-1], transport.producerState), ("pause", "paused"))
        body.transport.resumeProducing()
        self.assertEqual((transport.asked[-1], transport.producerState), ("resume", "producing"))

    def test_finished_response_cannot_pause_the_connection(self) -> None:
        """Once its response is over, a request's producer no longer reaches the connection
        (which may serve the next request)."""
        connection, transport, _ = _connection()
        body = _Body()
        connection.request(Request(b"GET", b"/", Headers({b"Host": [b"upstream"]}), None, persistent=True)) \
            .addCallback(lambda response: response.deliverBody(body))
        connection.dataReceived(ANSWER)
        asked = list(transport.asked)
        body.transport.pauseProducing()
        self.assertEqual((transport.asked, transport.producerState), (asked, "producing"))
