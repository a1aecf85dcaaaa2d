"""WebSocket through the bridge (issue 10), with a real WebSocket library on both ends.

The upstream is a ``websockets`` server (``tests/wsupport.py``), configured as the proxy's
``upstream``; the client is ``websockets``' synchronous client, run in a reactor thread so the
bridge (forwarder and proxy in-process on the reactor, a private redis-server) keeps running
while the client blocks. Every wait is an awaited Deferred: a client session that ends, or
the server reporting a connection's end; there are no sleeps.

The core tests run twice: :class:`DirectToUpstream` connects the client to the upstream
itself (the control: the fixtures and the assertions hold without the bridge), and
:class:`ThroughBridge` connects it to the forwarder. Then, separately: a session across key
rotations, failures, memory, visibility, limits, drain, other upgrades and attacks:
tests/test_websocket_ops.py.
Timings are printed (``pytest -rP`` or ``-s`` shows them) and logged.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection

from tests.support import Client
from tests.wsupport import (FORBIDDEN_BODY, PLAIN_BODY, SUBPROTOCOL, WAIT, MiB, WebSocketClient, browser_dom_result,
                            push_block, start_upstream, websocket_stack, ws_url)

log = Logger()
SMALL_COUNT = 10_000
SMALL_SIZE = 100
PROMPT = 1.0  # issue 10: a close reaches the other end within a second ...
PROMPT_LIMIT = 10 * PROMPT  # ... asserted with the usual 10x margin for a loaded machine
ROUND_TRIPS = 1000
LATENCY_P50_LIMIT = 0.025  # s: far above a few hops on loopback, below a 40 ms delayed-ACK stall


def report(what: str, **figures: Any) -> None:
    """A measured figure, on stdout (shown by ``pytest -rP``) and in the test log."""
    text = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"{what}: {text}")
    log.info("{what}: {text}", what=what, text=text)


def small_message(i: int) -> bytes:
    """The ``i``-th of the small messages: 100 bytes that name their place."""
    return f"{i:010d}".encode().ljust(SMALL_SIZE, b".")


if TYPE_CHECKING:
    _Mixin = TestCase
else:
    _Mixin = object  # not a TestCase itself: only its subclasses below are collected


class _WebSocketBehaviour(_Mixin):
    """The tests; a subclass's ``reach`` says where the client connects (``self.base``)."""

    timeout = 120
    upstream: Any
    client: WebSocketClient
    base: str

    def reach(self) -> defer.Deferred[str]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def, override]
        self.upstream = start_upstream(self)
        self.client = WebSocketClient(self)
        self.base = yield self.reach()

    def url(self, path: str) -> str:
        return ws_url(self.base, path)

    # --- messages ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_text_and_binary_echo(self):  # type: ignore[no-untyped-def]
        """Text messages come back as the same ``str`` (non-ASCII and empty included) and
        binary ones as the same ``bytes`` (all 256 byte values, and empty), in order."""
        sent: list[str | bytes] = ["hello", "héllo wörld ✓ 🚀", "", bytes(range(256)) * 4, b"", b"\x00\xff" * 10]

        def run(ws: ClientConnection) -> list[str | bytes]:
            got = []
            for message in sent:
                ws.send(message)
                got.append(ws.recv(timeout=WAIT))
            return got

        got = yield self.client.session(self.url("/echo"), run)
        self.assertEqual([(type(m), m) for m in got], [(type(m), m) for m in sent])

    @defer.inlineCallbacks
    def test_sixteen_mib_message_byte_exact(self):  # type: ignore[no-untyped-def]
        """One 16 MiB binary message of pseudo-random bytes comes back as one message, the
        same length and SHA-256 as sent."""
        payload = random.Random(16).randbytes(16 * MiB)

        def run(ws: ClientConnection) -> tuple[int, str, float]:
            start = time.monotonic()
            ws.send(payload)
            echoed = ws.recv(timeout=WAIT)
            assert isinstance(echoed, bytes), type(echoed)
            return len(echoed), hashlib.sha256(echoed).hexdigest(), time.monotonic() - start

        size, digest, took = yield self.client.session(self.url("/echo"), run)
        report("16 MiB message round trip", seconds=f"{took:.2f}")
        self.assertEqual((size, digest), (len(payload), hashlib.sha256(payload).hexdigest()))

    @defer.inlineCallbacks
    def test_ten_thousand_small_messages_in_order(self):  # type: ignore[no-untyped-def]
        """10,000 binary messages of 100 bytes, sent by one thread while another receives,
        all come back, each intact and in the order sent."""

        def run(ws: ClientConnection) -> tuple[list[Any], float]:
            failed: list[BaseException] = []

            def send_all() -> None:
                try:
                    for i in range(SMALL_COUNT):
                        ws.send(small_message(i))
                except BaseException as err:  # reported by the receiving side
                    failed.append(err)

            start = time.monotonic()
            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            got = []
            for _ in range(SMALL_COUNT):
                got.append(ws.recv(timeout=WAIT))
            sender.join(WAIT)
            if failed:
                raise failed[0]
            return got, time.monotonic() - start

        got, took = yield self.client.session(self.url("/echo"), run)
        report(f"{SMALL_COUNT} messages of {SMALL_SIZE} B", seconds=f"{took:.2f}")
        self.assertEqual(len(got), SMALL_COUNT)
        out_of_place = [i for i, message in enumerate(got) if message != small_message(i)]
        self.assertEqual(out_of_place[:10], [], f"{len(out_of_place)} messages not as sent at their place")

    @defer.inlineCallbacks
    def test_server_push_byte_exact(self):  # type: ignore[no-untyped-def]
        """``/push?mib=32``: the client receives the 32 one-MiB messages the server sends as
        fast as the connection takes them, each equal to what was sent, then the server's
        close with code 1000."""
        count = 32

        def run(ws: ClientConnection) -> tuple[list[int], int | None, float]:
            start = time.monotonic()
            wrong = []
            for i in range(count):
                if ws.recv(timeout=WAIT) != push_block(i):
                    wrong.append(i)
            try:
                extra = ws.recv(timeout=WAIT)
                raise AssertionError(f"a message after the last one: {len(extra)} bytes")
            except ConnectionClosedOK:
                pass
            return wrong, ws.close_code, time.monotonic() - start

        wrong, code, took = yield self.client.session(self.url(f"/push?mib={count}"), run)
        report("server push", mib=count, seconds=f"{took:.2f}", mib_per_s=f"{count / took:.1f}")
        self.assertEqual(wrong, [])
        self.assertEqual(code, 1000)

    @defer.inlineCallbacks
    def test_ping_gets_its_pong(self):  # type: ignore[no-untyped-def]
        """A ping the client sends is answered by the server's pong with the same payload
        (websockets sets the ping's event only on the matching pong), and echo still works
        after it."""

        def run(ws: ClientConnection) -> tuple[bool, float, Any]:
            start = time.monotonic()
            ponged = ws.ping(b"ppbridge ping").wait(WAIT)
            took = time.monotonic() - start
            ws.send("after the ping")
            return ponged, took, ws.recv(timeout=WAIT)

        ponged, took, echoed = yield self.client.session(self.url("/echo"), run)
        report("ping round trip", ms=f"{took * 1000:.1f}")
        self.assertTrue(ponged, "no pong within the wait")
        self.assertEqual(echoed, "after the ping")

    # --- closing -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_client_close_code_and_reason_reach_server(self):  # type: ignore[no-untyped-def]
        """The client closes with 4001 "bye": the server's connection ends with code 4001 and
        reason "bye" received, and the client's closing handshake completes (the server
        echoes the code)."""

        def run(ws: ClientConnection) -> tuple[int | None, str | None]:
            ws.send("ready?")
            ws.recv(timeout=WAIT)
            ws.close(4001, "bye")
            return ws.close_code, ws.close_reason

        client_view = yield self.client.session(self.url("/echo"), run)
        closed = yield self.upstream.next_close()
        self.assertEqual((closed.path, closed.code, closed.reason), ("/echo", 4001, "bye"))
        self.assertEqual(client_view[0], 4001, f"the client received {client_view} back")

    @defer.inlineCallbacks
    def test_server_close_code_and_reason_reach_client(self):  # type: ignore[no-untyped-def]
        """Asked to close with 4002 "done", the server does; the client's receive ends with
        the closing handshake done (a close frame received and sent back) carrying code 4002
        and reason "done"."""

        def run(ws: ClientConnection) -> tuple[str, int | None, str | None]:
            ws.send("close:4002:done")
            try:
                extra = ws.recv(timeout=WAIT)
                return f"a message instead of the close: {extra!r}", None, None
            except ConnectionClosed as closed:
                handshake = closed.rcvd is not None and closed.sent is not None
                return "closing handshake" if handshake else "no handshake", ws.close_code, ws.close_reason

        outcome = yield self.client.session(self.url("/echo"), run)
        self.assertEqual(outcome, ("closing handshake", 4002, "done"))

    @defer.inlineCallbacks
    def test_server_tcp_close_ends_client_promptly(self):  # type: ignore[no-untyped-def]
        """The server closes its TCP connection without a closing handshake (``drop``): the
        client's blocked receive ends with ``ConnectionClosed`` (code 1006, nothing received)
        less than 10 s after the server closed (issue 10 asks for 1 s; the figure is printed)."""

        def run(ws: ClientConnection) -> tuple[str, float, int | None]:
            ws.send("drop")
            try:
                extra = ws.recv(timeout=WAIT)
                return f"a message: {extra!r}", time.monotonic(), None
            except ConnectionClosed:
                return "closed", time.monotonic(), ws.close_code

        outcome, ended, code = yield self.client.session(self.url("/echo"), run)
        dropped = yield self.upstream.next_drop()
        took = ended - dropped
        report("server TCP close to client's end", seconds=f"{took:.3f}")
        self.assertEqual((outcome, code), ("closed", 1006))
        self.assertLess(took, PROMPT_LIMIT)

    @defer.inlineCallbacks
    def test_client_tcp_close_ends_server_promptly(self):  # type: ignore[no-untyped-def]
        """The client closes its TCP connection without a closing handshake, after one echo
        proved the connection works end to end: the server's handler sees its connection end
        (code 1006, no close frame) less than 10 s later (issue 10 asks for 1 s; printed)."""

        def run(ws: ClientConnection) -> float:
            ws.send("up?")
            ws.recv(timeout=WAIT)
            closed_at = time.monotonic()
            ws.close_socket()
            return closed_at

        closed_at = yield self.client.session(self.url("/echo"), run)
        closed = yield self.upstream.next_close()
        took = closed.at - closed_at
        report("client TCP close to server's end", seconds=f"{took:.3f}")
        self.assertEqual((closed.path, closed.code), ("/echo", 1006))
        self.assertLess(took, PROMPT_LIMIT)

    # --- handshake -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_subprotocol_selected(self):  # type: ignore[no-untyped-def]
        """Offered ``chat.v1, chat.v2``, the server's choice ``chat.v2`` reaches the client;
        the server saw the offer exactly as the client made it; messages flow after."""

        def run(ws: ClientConnection) -> tuple[str | None, Any]:
            ws.send("with a subprotocol")
            return ws.subprotocol, ws.recv(timeout=WAIT)

        chosen, echoed = yield self.client.session(self.url("/echo"), run, subprotocols=["chat.v1", SUBPROTOCOL])
        self.assertEqual((chosen, echoed), (SUBPROTOCOL, "with a subprotocol"))
        offered = self.upstream.requests[-1].headers.get_all("Sec-WebSocket-Protocol")
        self.assertEqual(offered, [f"chat.v1, {SUBPROTOCOL}"])

    @defer.inlineCallbacks
    def test_no_subprotocol_offered_none_selected(self):  # type: ignore[no-untyped-def]
        """Without an offer, the handshake succeeds with no subprotocol (the server does not
        require one) and the 101 carries no ``Sec-WebSocket-Protocol``."""

        def run(ws: ClientConnection) -> tuple[str | None, list[str]]:
            assert ws.response is not None
            return ws.subprotocol, ws.response.headers.get_all("Sec-WebSocket-Protocol")

        outcome = yield self.client.session(self.url("/echo"), run)
        self.assertEqual(outcome, (None, []))

    @defer.inlineCallbacks
    def test_handshake_headers_pass_untouched(self):  # type: ignore[no-untyped-def]
        """``Origin``, ``Sec-WebSocket-Key``/``-Version``/``-Extensions`` and an application
        header reach the server as the client sent them; permessage-deflate is negotiated end
        to end (the client's 101 names it) and compressed messages echo intact."""
        origin = "http://app.example.test"

        def run(ws: ClientConnection) -> tuple[Any, Any, Any]:
            assert ws.request is not None and ws.response is not None
            ws.send("compressible " * 1000)
            return ws.request.headers, ws.response.headers, ws.recv(timeout=WAIT)

        sent, answer, echoed = yield self.client.session(self.url("/echo?room=7"), run, origin=origin,
                                                         additional_headers={"X-App-Token": "t0ken"})
        seen = self.upstream.requests[-1]
        self.assertEqual(seen.path, "/echo?room=7")
        for name in ("Origin", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                     "X-App-Token"):
            self.assertEqual(seen.headers.get_all(name), sent.get_all(name), name)
        self.assertEqual(seen.headers["Origin"], origin)
        self.assertIn("permessage-deflate", answer.get("Sec-WebSocket-Extensions", ""))
        self.assertEqual(echoed, "compressible " * 1000)

    @defer.inlineCallbacks
    def test_refused_upgrade_comes_back_as_403(self):  # type: ignore[no-untyped-def]
        """The upstream refuses the handshake on ``/forbidden`` with 403 and a body: the
        client's connect fails with ``InvalidStatus`` whose response is that 403 and body."""
        d = self.client.session(self.url("/forbidden"), lambda ws: "connected")
        err = yield self.assertFailure(d, InvalidStatus)
        self.assertEqual((err.response.status_code, err.response.body), (403, FORBIDDEN_BODY.encode()))

    @defer.inlineCallbacks
    def test_unknown_path_comes_back_as_404(self):  # type: ignore[no-untyped-def]
        """An upgrade to a path the upstream does not serve fails with its 404."""
        d = self.client.session(self.url("/nowhere"), lambda ws: "connected")
        err = yield self.assertFailure(d, InvalidStatus)
        self.assertEqual(err.response.status_code, 404)

    @defer.inlineCallbacks
    def test_plain_get_on_the_same_route(self):  # type: ignore[no-untyped-def]
        """A plain HTTP ``GET /plain`` (no upgrade) on the same upstream is answered 200 with
        its body."""
        response, body = yield Client(self).fetch(b"GET", self.base + "/plain")
        self.assertEqual((response.code, body), (200, PLAIN_BODY.encode()))

    @defer.inlineCallbacks
    def test_concurrent_connections_are_independent(self):  # type: ignore[no-untyped-def]
        """Eight connections open at once each get back exactly their own 200 messages."""

        def run_as(n: int) -> Any:
            def run(ws: ClientConnection) -> list[Any]:
                got = []
                for i in range(200):
                    ws.send(f"conn {n} msg {i}")
                    got.append(ws.recv(timeout=WAIT))
                return got
            return run

        results = yield defer.gatherResults([self.client.session(self.url("/echo"), run_as(n)) for n in range(8)],
                                            consumeErrors=True)
        for n, got in enumerate(results):
            self.assertEqual(got, [f"conn {n} msg {i}" for i in range(200)])

    # --- latency and a real browser ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_small_message_round_trip_latency(self):  # type: ignore[no-untyped-def]
        """1000 sequential round trips of a 100-byte message (send, wait for the echo): every
        echo is right and the median round trip is under 25 ms (no coalescing delay nor a
        Nagle/delayed-ACK stall of 40 ms per message); p50/p99 are printed."""

        def run(ws: ClientConnection) -> tuple[list[float], int]:
            times, wrong = [], 0
            for i in range(ROUND_TRIPS):
                message = small_message(i)
                start = time.perf_counter()
                ws.send(message)
                wrong += ws.recv(timeout=WAIT) != message
                times.append(time.perf_counter() - start)
            return times, wrong

        times, wrong = yield self.client.session(self.url("/echo"), run)
        times.sort()
        p50, p99 = statistics.median(times), times[int(len(times) * 0.99)]
        report("100 B round trip", p50_ms=f"{p50 * 1000:.2f}", p99_ms=f"{p99 * 1000:.2f}",
               max_ms=f"{times[-1] * 1000:.2f}")
        self.assertEqual(wrong, 0)
        self.assertLess(p50, LATENCY_P50_LIMIT)

    @defer.inlineCallbacks
    def test_browser_page_exchanges_messages_over_same_origin(self):  # type: ignore[no-untyped-def]
        """Headless Chromium loads ``/page``, whose script opens a WebSocket to ``/echo`` on
        the page's own origin offering ``chat.v2``, sends two messages and closes with 4003
        once both came back; the page's ``#result`` then reads ``protocol=chat.v2 got=from
        the browser|second close=4003``."""
        result = yield browser_dom_result(self, self.client, self.base + "/page")
        self.assertEqual(result, "protocol=chat.v2 got=from the browser|second close=4003")


class DirectToUpstream(_WebSocketBehaviour, TestCase):
    """The control: the client talks to the WebSocket upstream itself, no bridge."""

    def reach(self) -> defer.Deferred[str]:
        return defer.succeed(self.upstream.url)


class ThroughBridge(_WebSocketBehaviour, TestCase):
    """The client talks to the forwarder; its route's proxy calls the WebSocket upstream."""

    @defer.inlineCallbacks
    def reach(self):  # type: ignore[no-untyped-def]
        self.stack = yield websocket_stack(self, self.upstream)
        return self.stack.url


# --- beyond the core: key rotation, failures, memory ---------------------------------------------
#
# These follow the rest of issue 10's test list: a session open across many rotations, a Redis
# or proxy that dies under an open connection, and a slow reader of a big push through the
# twistd children (whose memory can be read from /proc).
