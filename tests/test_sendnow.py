"""ppbridge.sendnow: which transports are sent at once and which are left to the reactor.

``send_now`` is checked on stand-ins (it only calls ``doWrite``). ``write_now`` and
``HeldWrites`` are checked on real TCP connections over 127.0.0.1 under the real reactor: what
leaves at once or at the turn's end without registering the transport for writing, what is
buffered (and registered) as Twisted does, and that no byte is lost or reordered; then the
forwarder's answers through a whole bridge. The Twisted internals the module relies on are
pinned by :class:`TwistedInternalsTests`.
"""

from __future__ import annotations

import io
import socket
from typing import Any, Callable

from twisted.internet import reactor, ssl
from twisted.internet import tcp as twisted_tcp
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web._newclient import Request
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ppbridge.sendnow import WRITE_NOW_MAX, HeldWrites, WriteNowRequest, send_now, write_now, writes_through
from ppbridge.upstreamclient import Upstream
from tests.support import Stack, listen

WAIT = 10.0  # seconds any awaited event may take before the test fails


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


class Collector(Protocol):
    """One end of a test connection: keeps what it reads; ``made`` fires when connected,
    ``ended`` with all it read when the connection is gone; :meth:`wait_for` awaits a count."""

    def __init__(self, on_made: Callable[[Collector], None] = lambda proto: None) -> None:
        self.received = bytearray()
        self.made: Deferred[Collector] = Deferred()
        self.ended: Deferred[bytes] = Deferred()
        self._waits: list[tuple[Callable[[bytearray], bool], Deferred[bytes]]] = []
        self._on_made = on_made

    def connectionMade(self) -> None:
        self._on_made(self)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        due = [(test, d) for test, d in self._waits if test(self.received)]
        self._waits = [(test, d) for test, d in self._waits if not test(self.received)]
        for _, waiter in due:
            waiter.callback(bytes(self.received))

    def wait_until(self, test: Callable[[bytearray], bool]) -> Deferred[bytes]:
        """Fires with everything read so far once ``test`` of it is true."""
        if test(self.received):
            return succeed(bytes(self.received))
        waiter: Deferred[bytes] = Deferred()
        self._waits.append((test, waiter))
        return waiter.addTimeout(WAIT, reactor)

    def wait_for(self, count: int) -> Deferred[bytes]:
        """Fires with everything read so far once ``count`` bytes have been read."""
        return self.wait_until(lambda received: len(received) >= count)

    def connectionLost(self, reason: Failure = Failure(Exception("lost"))) -> None:
        self.ended.callback(bytes(self.received))


@inlineCallbacks
def connected_pair(case: TestCase, tls: bool = False, listen_socket: Callable[[Any], None] = lambda port: None,
                   server_made: Callable[[Collector], None] = lambda proto: None):  # type: ignore[no-untyped-def]
    """(server end, client end) of a fresh loopback connection, both connected; plain TCP or
    TLS; ``listen_socket`` may set options on the listening port first (accepted sockets
    inherit them). Both ends are aborted and the port closed at cleanup."""
    server = Collector(server_made)
    factory = Factory.forProtocol(lambda: server)
    if tls:
        key = ssl.KeyPair.generate(size=2048)
        certificate = key.selfSignedCert(1, CN="localhost")
        port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    listen_socket(port)
    client = Collector()
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    if tls:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, ssl.CertificateOptions())
    yield connectProtocol(endpoint, client).addTimeout(WAIT, reactor)
    yield server.made.addTimeout(WAIT, reactor)

    def close() -> Deferred[Any]:
        for end in (server, client):
            if end.transport.connected:
                end.transport.abortConnection()
        return server.ended.addCallback(lambda _: client.ended)

    case.addCleanup(close)
    return server, client


@inlineCallbacks
def stalled_pair(case: TestCase):  # type: ignore[no-untyped-def]
    """(server end, the client's transport) of a connection whose server does not read yet
    (paused) and whose socket buffers are small (4 KiB asked: the server's receive buffer,
    inherited from the listening socket, and the client's send buffer): a large write from
    the client is only partly taken by its socket. Resume the server to read."""

    def small_receive_buffer(port: Any) -> None:
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    server, client = yield connected_pair(case, listen_socket=small_receive_buffer,
                                          server_made=lambda proto: proto.transport.pauseProducing())
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return server, client.transport


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds, not yet sent."""
    return len(transport.dataBuffer) - transport.offset + sum(len(part) for part in transport._tempDataBuffer)


class TwistedInternalsTests(TestCase):
    """What ppbridge.sendnow reads of Twisted's TCP transports (checked against 26.10.0): a
    change here must fail loudly before write_now misjudges a transport."""

    @inlineCallbacks
    def test_buffer_and_state_attributes(self):  # type: ignore[no-untyped-def]
        """Both ends are tcp.Server/tcp.Client, whose send is Connection.writeSomeData; an idle
        transport shows an empty ``dataBuffer``/``_tempDataBuffer`` at ``offset`` 0, no TLS and no
        half-close; an ordinary write lands in ``_tempDataBuffer`` and
        registers the transport for writing; ``writeSomeData`` sends and returns the count;
        ``loseWriteConnection`` sets ``_writeDisconnecting``; ``_tempDataLen`` counts what
        ``_tempDataBuffer`` holds, and ``reactor`` is the reactor the transport runs on."""
        server, client = yield connected_pair(self)
        self.assertIs(type(server.transport), twisted_tcp.Server)
        self.assertIs(type(client.transport), twisted_tcp.Client)
        for transport in (server.transport, client.transport):
            self.assertIs(type(transport).writeSomeData, twisted_tcp.Connection.writeSomeData)
            self.assertEqual((transport.dataBuffer, transport.offset, transport._tempDataBuffer), (b"", 0, []))
            self.assertEqual((transport.TLS, transport._writeDisconnecting), (False, False))
            self.assertEqual((transport.producerPaused, transport.streamingProducer), (False, False))
            self.assertEqual((transport._tempDataLen, transport.reactor), (0, reactor))
            self.assertTrue(writes_through(transport))
        transport = server.transport
        transport.write(b"x")
        self.assertEqual((transport._tempDataBuffer, transport._tempDataLen), ([b"x"], 1))
        self.assertIn(transport, reactor.getWriters())
        self.assertFalse(writes_through(transport))
        self.assertEqual(client.transport.writeSomeData(b"yz"), 2)
        received = yield server.wait_for(2)
        self.assertEqual(received, b"yz")
        client.transport.loseWriteConnection()
        self.assertTrue(client.transport._writeDisconnecting)
        self.assertFalse(writes_through(client.transport))


class WriteNowTests(TestCase):
    """write_now on real loopback connections under the real reactor."""

    @inlineCallbacks
    def test_idle_transport_sends_at_once_unregistered(self):  # type: ignore[no-untyped-def]
        """With nothing buffered, the bytes leave at once: the transport holds nothing after
        the call, is not registered with the reactor for writing, and the peer reads them."""
        server, client = yield connected_pair(self)
        write_now(server.transport, b"hello")
        self.assertEqual(buffered(server.transport), 0)
        self.assertNotIn(server.transport, reactor.getWriters())
        received = yield client.wait_for(5)
        self.assertEqual(received, b"hello")

    @inlineCallbacks
    def test_bytes_after_buffered_ones_keep_their_order(self):  # type: ignore[no-untyped-def]
        """Bytes written while earlier ones are still buffered take the ordinary path behind
        them (both in the transport's buffer, registered for writing); the peer reads them in
        the order written."""
        server, client = yield connected_pair(self)
        server.transport.write(b"first ")
        write_now(server.transport, b"second")
        self.assertEqual(server.transport._tempDataBuffer, [b"first ", b"second"])
        self.assertIn(server.transport, reactor.getWriters())
        received = yield client.wait_for(12)
        self.assertEqual(received, b"first second")

    @inlineCallbacks
    def test_partial_send_leaves_the_rest_buffered(self):  # type: ignore[no-untyped-def]
        """The peer does not read and both socket buffers are small: of a 60,000-byte write
        the socket takes only a part, the rest is buffered and registered for writing; a
        later write goes behind it. Once the peer reads, every byte arrives, in order."""
        server, writer = yield stalled_pair(self)
        data = bytes(i % 251 for i in range(60_000))
        tail = b"tail" * 1000
        write_now(writer, data)
        left = buffered(writer)
        self.assertGreater(left, 0)
        self.assertLess(left, len(data))
        self.assertIn(writer, reactor.getWriters())
        write_now(writer, tail)
        self.assertEqual(buffered(writer), left + len(tail))
        server.transport.resumeProducing()
        received = yield server.wait_for(len(data) + len(tail))
        self.assertEqual(received, data + tail)

    @inlineCallbacks
    def test_large_write_takes_the_ordinary_path(self):  # type: ignore[no-untyped-def]
        """A write over WRITE_NOW_MAX (64 KiB) is buffered and registered as usual, nothing
        sent at once; the peer reads it all."""
        self.assertEqual(WRITE_NOW_MAX, 64 * 1024)
        server, client = yield connected_pair(self)
        data = bytes(i % 251 for i in range(WRITE_NOW_MAX + 1))
        write_now(server.transport, data)
        self.assertEqual(server.transport._tempDataBuffer, [data])
        self.assertIn(server.transport, reactor.getWriters())
        received = yield client.wait_for(len(data))
        self.assertEqual(received, data)

    @inlineCallbacks
    def test_closing_transports_take_the_ordinary_path(self):  # type: ignore[no-untyped-def]
        """After loseConnection, and after loseWriteConnection, a write is buffered as usual
        (Twisted then sends it before it closes): nothing is sent at once, and the peer reads
        the bytes before the connection ends."""
        for close in ("loseConnection", "loseWriteConnection"):
            server, client = yield connected_pair(self)
            getattr(server.transport, close)()
            write_now(server.transport, b"late")
            self.assertEqual(server.transport._tempDataBuffer, [b"late"], close)
            if close == "loseConnection":
                received = yield client.ended.addTimeout(WAIT, reactor)
            else:
                received = yield client.wait_for(4)
            self.assertEqual(received, b"late", close)

    @inlineCallbacks
    def test_tls_takes_the_ordinary_path(self):  # type: ignore[no-untyped-def]
        """On a TLS connection (the protocol's transport is the TLS layer) the plaintext goes
        through TLS as usual: right after the call its records sit in the TCP transport's
        buffer, registered for writing (that transport held nothing and was not registered
        just before); the peer reads the plaintext. The write is over the 64,000 bytes that
        Twisted's TLS layer keeps for the next reactor turn, so it reaches TCP at once."""
        server, client = yield connected_pair(self, tls=True)
        client.transport.write(b"ping")
        yield server.wait_for(4)  # the handshake is done
        server.transport.write(b"pong")
        yield client.wait_for(4)  # and what the server wrote so far has left
        client.transport.write(b"go")
        yield server.wait_for(6)
        tcp_transport = server.transport.transport
        self.assertIs(type(tcp_transport), twisted_tcp.Server)
        self.assertEqual(buffered(tcp_transport), 0)
        self.assertNotIn(tcp_transport, reactor.getWriters())
        self.assertFalse(writes_through(server.transport))
        secret = bytes(i % 253 for i in range(70_000))
        write_now(server.transport, secret)
        self.assertGreater(buffered(tcp_transport), len(secret))
        self.assertIn(tcp_transport, reactor.getWriters())
        received = yield client.wait_for(4 + len(secret))
        self.assertEqual(received, b"pong" + secret)


def counted(transport: Any) -> tuple[list[bytes], list[bool]]:
    """The sends (``writeSomeData``) of a transport from now on, and its ``startWriting`` calls
    (True for one that registered it for writing), in lists kept up to date."""
    sends: list[bytes] = []
    registered: list[bool] = []
    write_some, start_writing = transport.writeSomeData, transport.startWriting
    transport.writeSomeData = lambda data: (sends.append(bytes(data)), write_some(data))[1]
    transport.startWriting = lambda: (registered.append(transport not in reactor.getWriters()), start_writing())[1]
    return sends, registered


class HeldWritesTests(TestCase):
    """HeldWrites on real loopback connections under the real reactor."""

    @inlineCallbacks
    def test_a_turns_writes_leave_in_one_send_unregistered(self):  # type: ignore[no-untyped-def]
        """Three writes are held in the transport's buffer, nothing sent and the transport not
        registered for writing; when the turn ends they leave in one send, in order, and the
        transport was never registered."""
        server, client = yield connected_pair(self)
        sends, registered = counted(server.transport)
        held = HeldWrites(server.transport)
        for part in (b"one ", b"two ", b"three"):
            held.write(part)
        self.assertEqual(server.transport._tempDataBuffer, [b"one ", b"two ", b"three"])
        self.assertEqual(sends, [])
        self.assertNotIn(server.transport, reactor.getWriters())
        received = yield client.wait_for(13)
        self.assertEqual(received, b"one two three")
        self.assertEqual(sends, [b"one two three"])
        self.assertEqual(registered, [])

    @inlineCallbacks
    def test_send_before_the_turn_ends(self):  # type: ignore[no-untyped-def]
        """``send`` sends what is held at once (one send, nothing left); a write after it is
        held again and leaves when the turn ends."""
        server, client = yield connected_pair(self)
        sends, registered = counted(server.transport)
        held = HeldWrites(server.transport)
        held.write(b"a")
        held.write(b"b")
        held.send()
        self.assertEqual((sends, buffered(server.transport)), ([b"ab"], 0))
        held.write(b"c")
        self.assertEqual(sends, [b"ab"])
        received = yield client.wait_for(3)
        self.assertEqual(received, b"abc")
        self.assertEqual((sends, registered), ([b"ab", b"c"], []))

    @inlineCallbacks
    def test_ordinary_write_and_close_keep_held_bytes(self):  # type: ignore[no-untyped-def]
        """An ordinary write after held bytes queues behind them, and loseConnection in the
        same turn still sends the held bytes before the connection closes: the peer reads
        everything, in order, then the end."""
        server, client = yield connected_pair(self)
        held = HeldWrites(server.transport)
        held.write(b"held ")
        server.transport.write(b"ordinary")
        server.transport.loseConnection()
        received = yield client.ended.addTimeout(WAIT, reactor)
        self.assertEqual(received, b"held ordinary")

    @inlineCallbacks
    def test_rest_left_registered_when_the_socket_takes_part(self):  # type: ignore[no-untyped-def]
        """The peer does not read and both socket buffers are small: of 120,000 held bytes the
        turn's send takes a part, the rest stays buffered and the transport is registered for
        it; once the peer reads, every byte arrives, in order."""
        server, writer = yield stalled_pair(self)
        sends, registered = counted(writer)
        data = bytes(i % 251 for i in range(120_000))
        held = HeldWrites(writer)
        held.write(data)
        held.send()
        self.assertEqual(len(sends), 1)
        self.assertGreater(buffered(writer), 0)
        self.assertLess(buffered(writer), len(data))
        self.assertEqual(registered, [True])
        server.transport.resumeProducing()
        received = yield server.wait_for(len(data))
        self.assertEqual(received, data)

    @inlineCallbacks
    def test_write_now_sends_bytes_held_before_it_first(self):  # type: ignore[no-untyped-def]
        """Bytes held on one connection, then a write_now on another: the held bytes are sent
        first (the two sends in that order, both before the turn ends), so no write overtakes
        one made before it; both peers read theirs."""
        first_server, first_client = yield connected_pair(self)
        second_server, second_client = yield connected_pair(self)
        order: list[bytes] = []
        for transport in (first_server.transport, second_server.transport):
            write_some = transport.writeSomeData
            transport.writeSomeData = lambda data, write_some=write_some: (order.append(bytes(data)),
                                                                          write_some(data))[1]
        HeldWrites(first_server.transport).write(b"reset")
        write_now(second_server.transport, b"504")
        self.assertEqual(order, [b"reset", b"504"])
        self.assertEqual((yield first_client.wait_for(5)), b"reset")
        self.assertEqual((yield second_client.wait_for(3)), b"504")

    def test_other_transports_written_as_usual(self) -> None:
        """A transport that is not Twisted's plain TCP (here a test's StringTransport) gets an
        ordinary write at once, and nothing is scheduled."""
        transport = StringTransport()
        held = HeldWrites(transport)
        held.write(b"now")
        self.assertEqual(transport.value(), b"now")
        self.assertIsNone(held._due)


def body_producer(body: bytes) -> FileBodyProducer:
    """A producer of ``body`` that writes it as soon as it is started (no reactor turn)."""
    return FileBodyProducer(io.BytesIO(body), cooperator=Cooperator(scheduler=lambda work: work()))


class WriteNowRequestTests(TestCase):
    """The proxy's requests to its upstream (Twisted's HTTP client request, WriteNowRequest)."""

    @staticmethod
    def twisted_bytes(method: bytes, body: bytes | None) -> bytes:
        """What Twisted's own Request writes for ``method /x`` (Host h), with ``body`` if any."""
        transport = StringTransport()
        producer = body_producer(body) if body is not None else None
        Request._construct(method, b"/x", Headers({b"Host": [b"h"]}), producer).writeTo(transport)
        return transport.value()

    @inlineCallbacks
    def test_head_without_body_written_at_once(self):  # type: ignore[no-untyped-def]
        """A GET, and a POST without a body (Content-Length: 0), are written as Twisted's own
        Request writes them, in one send at once, without registering the transport; the
        Deferred writeTo returns has fired."""
        for method in (b"GET", b"POST"):
            server, client = yield connected_pair(self)
            sends, registered = counted(client.transport)
            request = WriteNowRequest._construct(method, b"/x", Headers({b"Host": [b"h"]}), None)
            done = request.writeTo(client.transport)
            self.assertIsNone(self.successResultOf(done))
            expected = self.twisted_bytes(method, None)
            self.assertEqual((sends, registered), ([expected], []), method)
            received = yield server.wait_for(len(expected))
            self.assertEqual(received, expected, method)

    @inlineCallbacks
    def test_request_with_a_body_written_as_twisted_does(self):  # type: ignore[no-untyped-def]
        """A request with a body producer is written the ordinary way (buffered, the transport
        registered for writing), the same bytes as Twisted's own Request."""
        server, client = yield connected_pair(self)
        sends, registered = counted(client.transport)
        request = WriteNowRequest._construct(b"POST", b"/x", Headers({b"Host": [b"h"]}), body_producer(b"body"))
        yield request.writeTo(client.transport)
        self.assertEqual(registered.count(True), 1)
        expected = self.twisted_bytes(b"POST", b"body")
        received = yield server.wait_for(len(expected))
        self.assertEqual(received, expected)

    def test_proxy_hands_its_pooled_connections_one(self) -> None:
        """The proxy's agent hands an idle pooled connection a WriteNowRequest."""
        upstream = Upstream("http://127.0.0.1:8080", MemoryReactorClock(), 5.0)
        handed: list[Any] = []

        class Pooled:
            state = "QUIESCENT"

            def request(self, request: Any) -> Deferred[Any]:
                handed.append(request)
                return Deferred()

        upstream.pool._putConnection((b"http", b"127.0.0.1", 8080), Pooled())
        upstream.agent.request(b"GET", upstream.url(b"/x"), Headers({b"Host": [b"h"]}), None)
        self.assertEqual([type(request) for request in handed], [WriteNowRequest])


def answered(received: bytearray, count: int, head_only: bool = False) -> bool:
    """Whether ``received`` holds ``count`` whole responses, one after the other: each with a
    Content-Length or chunked, or (``head_only``, answers to HEAD) a head alone."""
    rest = bytes(received)
    for _ in range(count):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        if head_only:
            continue
        lines = head.lower().split(b"\r\n")
        if b"transfer-encoding: chunked" in lines:
            end = rest.find(b"\r\n0\r\n\r\n")
            if end < 0:
                return False
            rest = rest[end + 7:]
        else:
            length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:"))
            if len(rest) < length:
                return False
            rest = rest[length:]
    return not rest


class Chunked(Resource):
    """An upstream answering every request with a 100-byte body written at once, without a
    Content-Length (so chunked from the upstream, and again by the forwarder)."""

    isLeaf = True

    def render(self, request: Any) -> int:
        request.write(b"c" * 100)
        request.finish()
        return NOT_DONE_YET


class ForwarderAnswerTests(TestCase):
    """The forwarder's answer to a client (EdgeChannel and BridgeRequest, through a whole
    bridge): the head is held for the body's first bytes, so a whole response still leaves in
    one send, and without registering the connection for writing unless chunked."""

    @inlineCallbacks
    def second_answer(self, target: bytes, method: bytes = b"GET",
                      upstream: Resource | None = None):  # type: ignore[no-untyped-def]
        """Send ``method target`` twice on one keep-alive connection to a fresh bridge (to the
        sample app, or ``upstream``); the second answer's bytes, the sends the forwarder's end
        of the connection made for it, and its ``startWriting`` calls (True for one that
        registered the connection for writing)."""
        stack = Stack(self)
        url = (yield listen(self, Site(upstream))) if upstream is not None else None
        yield stack.start(upstreams={"alpha": url} if url else None)
        client = Collector()
        port = int(stack.url.rsplit(":", 1)[1])
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client).addTimeout(WAIT, reactor)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        request = method + b" " + target + b" HTTP/1.1\r\nHost: example\r\n\r\n"
        head_only = method == b"HEAD"
        client.transport.write(request)
        first = yield client.wait_until(lambda received: answered(received, 1, head_only))
        (channel,) = stack.forwarder.sites[0].edge.open
        sends, registered = counted(channel.transport)
        client.transport.write(request)
        both = yield client.wait_until(lambda received: answered(received, 2, head_only))
        return both[len(first):], sends, registered

    @inlineCallbacks
    def test_whole_answer_is_one_send_unregistered(self):  # type: ignore[no-untyped-def]
        """A small GET answered with a Content-Length: head and body leave in one send, which
        is all the client read, and the connection is never registered for writing."""
        answer, sends, registered = yield self.second_answer(b"/echo")
        self.assertIn(b"\r\ncontent-length: ", answer.lower())
        self.assertEqual(sends, [answer])
        self.assertEqual(registered, [])

    @inlineCallbacks
    def test_head_answer_is_one_send_unregistered(self):  # type: ignore[no-untyped-def]
        """An answer to HEAD (a head, no body follows) leaves in one send, unregistered."""
        answer, sends, registered = yield self.second_answer(b"/bytes?n=100", b"HEAD")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "))
        self.assertEqual(sends, [answer])
        self.assertEqual(registered, [])

    @inlineCallbacks
    def test_chunked_whole_answer_stays_one_send(self):  # type: ignore[no-untyped-def]
        """A small answer the forwarder chunks (the upstream gave no Content-Length): head,
        chunk and last chunk (written by twisted.web's finish) still leave in one send, the
        ordinary way (registered once), not as a send written through plus a second one."""
        answer, sends, registered = yield self.second_answer(b"/", upstream=Chunked())
        self.assertIn(b"\r\ntransfer-encoding: chunked\r\n", answer.lower())
        self.assertTrue(answer.endswith(b"\r\n" + b"c" * 100 + b"\r\n0\r\n\r\n"))
        self.assertEqual(sends, [answer])
        self.assertEqual(registered.count(True), 1)
