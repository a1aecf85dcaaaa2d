"""Upgraded connections in operation (issue 10): rotations, failures, memory, visibility,
limits, drain, non-WebSocket upgrades, h2c, and a hostile Redis against the frames.

Same fixtures as tests/test_websocket.py (``tests/wsupport.py``): a real ``websockets``
server upstream, its synchronous client in a reactor thread, a private redis-server; the
memory and kill tests run the forwarder and proxy as twistd children. No sleeps as
synchronisation; timings are printed (``pytest -rP``) and logged.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from ppbridge.scaffold import TomlValue
from ppbridge.wire import HEADER_SIZE, MsgType
from tests.redisclient import RawRedisClient, client_for
from tests.support import Client, Stack, listen, poll
from tests.test_security import DropWatcher, drain, of_type, spy, with_counter
from tests.test_streaming import RSS_LIMIT, Peak, redis_used_memory, vm_rss
from tests.test_websocket import PROMPT_LIMIT, report, small_message
from tests.wsupport import (EOF_SEEN, HALF_CLOSE, PLAIN_BODY, RAW_TOKEN, WAIT, ChildBridge, MiB, RawUpgradeUpstream,
                            WebSocketClient, from_thread, push_block, raw_client, start_upstream, websocket_stack,
                            ws_url)

log = Logger()
FAST_REKEY: dict[str, TomlValue] = {"mode": "fixed", "period": 1.0, "grace": 10.0}
SESSION = 20.0  # seconds of traffic across rotations (issue 10)
KiB = 1 << 10


def rotations(stack: Any, proxy: str = "alpha") -> int:
    """Rotations of ``proxy``'s key as the stack's forwarder's /status reports them."""
    return stack.forwarder.status()["proxies"][proxy].get("rotations") or 0


class RotationDuringSession(TestCase):
    """One WebSocket connection open while the proxy's key rotates every second."""

    timeout = 180

    @defer.inlineCallbacks
    def test_session_survives_rotations_without_losing_a_message(self):
        """For 20 s with ``period = 1``, the client sends and awaits the echo of message after
        message (100 bytes, every 50th 256 KiB so it travels in several frames): every echo is
        the message sent, at least 10 rotations happen meanwhile, and the connection is still
        open at the end: a close with 1000 completes and the server receives it."""
        upstream = start_upstream(self)
        client = WebSocketClient(self)
        stack = yield websocket_stack(self, upstream, rekey=FAST_REKEY)
        before = rotations(stack)

        def run(ws: ClientConnection) -> tuple[int, list[int], int | None]:
            deadline = time.monotonic() + SESSION
            n, wrong = 0, []
            while time.monotonic() < deadline:
                message = random.Random(n).randbytes(256 * KiB) if n % 50 == 0 else small_message(n)
                ws.send(message)
                if ws.recv(timeout=WAIT) != message:
                    wrong.append(n)
                n += 1
            ws.close(1000, "end of session")
            return n, wrong, ws.close_code

        sent, wrong, code = yield client.session(ws_url(stack.url, "/echo"), run)
        rotated = rotations(stack) - before
        report("session across rotations", seconds=SESSION, messages=sent, rotations=rotated)
        self.assertEqual(wrong[:10], [], f"{len(wrong)} of {sent} echoes differ")
        self.assertGreater(sent, 100)
        self.assertGreaterEqual(rotated, 10)
        self.assertEqual(code, 1000)
        closed = yield upstream.next_close()
        self.assertEqual((closed.code, closed.reason), (1000, "end of session"))


class FailuresEndTheConnection(TestCase):
    """A proxy or Redis failure under an open connection ends the client's connection promptly."""

    timeout = 180

    def setUp(self) -> None:
        self.upstream = start_upstream(self)
        self.client = WebSocketClient(self)

    def open_then(self, url: str) -> tuple[defer.Deferred[Any], defer.Deferred[tuple[str, float, int | None]]]:
        """A session on ``url`` that proves the connection with one echo, tells the test (the
        first Deferred), then blocks in a receive; the second Deferred fires with ("closed",
        when, close code) once the receive ends with the connection closed."""
        reached, fire = from_thread()

        def run(ws: ClientConnection) -> tuple[str, float, int | None]:
            ws.send("up?")
            ws.recv(timeout=WAIT)
            fire(None)
            try:
                extra = ws.recv(timeout=WAIT)
                return f"a message: {extra!r}", time.monotonic(), None
            except ConnectionClosed:
                return "closed", time.monotonic(), ws.close_code

        return reached, self.client.session(url, run)

    @defer.inlineCallbacks
    def test_killed_proxy_ends_client_connection(self):
        """``twistd ppproxy`` is killed (SIGKILL) under an open connection: the client's
        blocked receive ends with the connection closed less than 10 s later ("within a few
        seconds"; printed), and the upstream sees its connection end too."""
        bridge = yield ChildBridge(self, self.upstream).start()
        reached, outcome = self.open_then(ws_url(bridge.url, "/echo"))
        yield reached
        killed = time.monotonic()
        bridge.proxy.signal("KILL")
        how, ended, code = yield outcome
        closed = yield self.upstream.next_close()
        report("proxy killed to client's end", seconds=f"{ended - killed:.3f}", close_code=code)
        self.assertEqual(how, "closed", bridge.describe())
        self.assertLess(ended - killed, PROMPT_LIMIT, bridge.describe())
        self.assertEqual(closed.code, 1006)

    @defer.inlineCallbacks
    def test_killed_redis_ends_client_connection(self):
        """The bridge's redis-server is killed under an open connection: the client's blocked
        receive ends with the connection closed less than 10 s later (printed)."""
        stack = yield websocket_stack(self, self.upstream)
        reached, outcome = self.open_then(ws_url(stack.url, "/echo"))
        yield reached
        killed = time.monotonic()
        stack.redis.kill()
        how, ended, code = yield outcome
        report("Redis killed to client's end", seconds=f"{ended - killed:.3f}", close_code=code)
        self.assertEqual(how, "closed")
        self.assertLess(ended - killed, PROMPT_LIMIT)


PUSH_MIB = 256
READ_RATE = 16 * MiB  # bytes/s the slow client reads: below what the bridge carries


class MemoryWatch:
    """The forwarder's and the proxy's RSS and Redis's used_memory, sampled every 0.2 s from
    now (tests/test_streaming.py's Peak) while a big transfer runs through ``bridge``."""

    def __init__(self, case: TestCase, bridge: ChildBridge) -> None:
        def rss_of(pid: int) -> Callable[[], int]:
            return lambda: vm_rss(pid)

        self.rss = [Peak(case, f"{child.name} RSS", rss_of(child.transport.pid)).start()
                    for child in (bridge.forwarder, bridge.proxy)]
        conn = client_for(bridge.redis)
        case.addCleanup(conn.close)
        self.redis = Peak(case, "Redis used_memory", redis_used_memory(conn)).start()

    def stop(self) -> list[Peak]:
        """Stop sampling; every peak, to report."""
        peaks = [*self.rss, self.redis]
        for peak in peaks:
            peak.stop()
        return peaks

    def check(self, case: TestCase) -> None:
        """Each process's RSS stayed under RSS_LIMIT (150 MB), sampled more than twice, and
        Redis's used_memory grew less than 32 MiB."""
        for peak in self.rss:
            case.assertIsNone(peak.error, str(peak))
            case.assertGreater(peak.samples, 2, str(peak))
            case.assertLess(peak.peak, RSS_LIMIT, str(peak))
        case.assertIsNone(self.redis.error, str(self.redis))
        case.assertLess(self.redis.peak - (self.redis.first or 0), 32 * MiB, str(self.redis))


class SlowReaderMemory(TestCase):
    """The upstream pushes 256 MiB to a slow client through the twistd children."""

    timeout = 600

    @defer.inlineCallbacks
    def test_push_to_slow_reader_keeps_forwarder_and_proxy_memory_bounded(self):
        """``/push?mib=256`` (no compression) to a client that reads at 16 MiB/s (it waits
        before each receive until its schedule allows: pacing, not synchronisation): every
        1 MiB message arrives intact and in order, then the close with 1000; the reader set
        the pace (for over half the messages it waited on its schedule, not on the stream),
        so the stream was held back; the forwarder's and the proxy's RSS (sampled every
        0.2 s) stay under 150 MB and Redis's used_memory grows less than 32 MiB."""
        upstream = start_upstream(self)
        client = WebSocketClient(self)
        bridge = yield ChildBridge(self, upstream).start()
        memory = MemoryWatch(self, bridge)

        def run(ws: ClientConnection) -> tuple[list[int], int, float, int | None]:
            start = time.monotonic()
            wrong, waited = [], 0
            for i in range(PUSH_MIB):
                due = start + i * MiB / READ_RATE
                if time.monotonic() < due:
                    waited += 1
                    time.sleep(due - time.monotonic())
                if ws.recv(timeout=WAIT) != push_block(i):
                    wrong.append(i)
            try:
                ws.recv(timeout=WAIT)
            except ConnectionClosed:
                pass
            return wrong, waited, time.monotonic() - start, ws.close_code

        wrong, waited, took, code = yield client.session(ws_url(bridge.url, f"/push?mib={PUSH_MIB}"), run,
                                                         compression=None, max_queue=2)
        for peak in memory.stop():
            report("256 MiB push to a slow reader", peak=str(peak), seconds=f"{took:.1f}", waited=waited)
        self.assertEqual(wrong, [], bridge.describe())
        self.assertEqual(code, 1000)
        self.assertGreater(waited, PUSH_MIB // 2, "the client was not slower than the stream")
        memory.check(self)


SINK_RATE = 16 * MiB  # bytes/s the slow upstream sink reads: below what the bridge carries


class SlowSinkMemory(TestCase):
    """The reverse of SlowReaderMemory: the client pushes 256 MiB to a slow upstream through
    the twistd children."""

    timeout = 600

    @defer.inlineCallbacks
    def test_push_to_slow_upstream_keeps_forwarder_and_proxy_memory_bounded(self):
        """The client sends 256 binary messages of 1 MiB (``push_block(i)``, no compression)
        to ``/sink?rate=16777216`` as fast as the connection takes them, then the text
        ``done``; the sink reads at 16 MiB/s (pacing, not synchronisation). Asserted: the
        sink's report counts 256 messages and 268,435,456 bytes whose SHA-256 is that of the
        bytes the client sent, in order (byte-exact, nothing lost); the connection then closes
        with 1000; the sink set the pace (for over half its reads it waited on its schedule,
        not on the stream), so the stream was held back; the forwarder's and the proxy's RSS
        (sampled every 0.2 s) stay under 150 MB and Redis's used_memory grows less than 32 MiB."""
        upstream = start_upstream(self)
        client = WebSocketClient(self)
        bridge = yield ChildBridge(self, upstream).start()
        memory = MemoryWatch(self, bridge)

        def run(ws: ClientConnection) -> tuple[str, float, float, Any, str, int | None]:
            start = time.monotonic()
            sent = hashlib.sha256()
            for i in range(PUSH_MIB):
                block = push_block(i)
                sent.update(block)
                ws.send(block)  # blocks while the connection takes no more: the client's pace
            ws.send("done")
            sending = time.monotonic() - start
            answer = json.loads(ws.recv(timeout=WAIT))
            try:
                after = f"a message: {ws.recv(timeout=WAIT)!r}"
            except ConnectionClosed:
                after = "closed"
            return sent.hexdigest(), sending, time.monotonic() - start, answer, after, ws.close_code

        digest, sending, took, answer, after, code = yield client.session(
            ws_url(bridge.url, f"/sink?rate={SINK_RATE}"), run, compression=None)
        for peak in memory.stop():
            report("256 MiB push to a slow upstream", peak=str(peak), seconds=f"{took:.1f}",
                   client_sending=f"{sending:.1f}", sink_seconds=answer.get("seconds"), waited=answer.get("waited"))
        self.assertEqual((answer.get("messages"), answer.get("bytes")), (PUSH_MIB, PUSH_MIB * MiB), bridge.describe())
        self.assertEqual(answer.get("sha256"), digest, bridge.describe())
        self.assertEqual((after, code), ("closed", 1000))
        self.assertGreater(answer.get("waited"), PUSH_MIB // 2, "the sink was not slower than the stream")
        memory.check(self)


# --- visibility and limits: /metrics, /status, the access log, max_upgraded, idle, drain --------


class Held:
    """A client session that proves its connection with one echo of ``payload``, tells the test
    (``reached``), waits until the test calls :meth:`release` (bounded by WAIT), then either
    closes with 1000 or, with ``wait_for_end``, blocks in a receive until the connection ends.
    ``outcome`` fires with (close code, monotonic time the session ended)."""

    def __init__(self, client: WebSocketClient, url: str, payload: bytes = b"held", wait_for_end: bool = False,
                 **options: Any) -> None:
        self.reached, fire = from_thread()
        self._go = threading.Event()

        def run(ws: ClientConnection) -> tuple[int | None, float]:
            ws.send(payload)
            if ws.recv(timeout=WAIT) != payload:
                raise AssertionError("the first echo differs")
            fire(None)
            if not self._go.wait(WAIT):
                raise AssertionError("the test never released the session")
            if wait_for_end:
                try:
                    ws.send(payload)
                    ws.recv(timeout=WAIT)  # the echo, still carried after the release
                    extra = ws.recv(timeout=WAIT)
                    raise AssertionError(f"a message instead of the end: {extra!r}")
                except ConnectionClosed:
                    return ws.close_code, time.monotonic()
            ws.close(1000)
            return ws.close_code, time.monotonic()

        self.outcome = client.session(url, run, **options)

    def release(self) -> None:
        self._go.set()


def upgraded_gauge(stack: Any, proxy: str = "alpha") -> float | None:
    """``ppbridge_upgraded_connections{proxy=...}`` as the forwarder's /metrics serves it."""
    return stack.forwarder.metrics.registry.get_sample_value("ppbridge_upgraded_connections", {"proxy": proxy})


def upgraded_status(stack: Any, proxy: str = "alpha") -> int:
    """``proxies.<proxy>.upgraded`` of the forwarder's /status document."""
    return stack.forwarder.status()["proxies"][proxy]["upgraded"]


def access_events(case: TestCase) -> list[dict[str, Any]]:
    """Every access-log event (namespace ppbridge.access) from now to the test's end."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "ppbridge.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)  # type: ignore[arg-type]
    case.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[arg-type]
    return events


class Visibility(TestCase):
    """What an operator sees of upgraded connections: the gauge, /status, the access log."""

    timeout = 120

    @defer.inlineCallbacks
    def test_open_connections_counted_and_each_logged_when_it_closes(self):
        """Two connections held open: ``ppbridge_upgraded_connections{proxy="alpha"}`` is 2
        and /status shows ``upgraded: 2`` for alpha; after both close (1000) both are 0, and
        the access log has one line per connection: GET /echo, code 101, cause "-", proxy
        alpha, bytes in and out each at least the 100,000-byte message and its echo (and
        less than 1,000 bytes more: frame headers and the closing handshake), a duration."""
        events = access_events(self)
        upstream = start_upstream(self)
        client = WebSocketClient(self)
        stack = yield websocket_stack(self, upstream)
        size = 100_000
        held = [Held(client, ws_url(stack.url, "/echo"), bytes([n]) * size, compression=None) for n in range(2)]
        yield defer.gatherResults([h.reached for h in held], consumeErrors=True)
        during = (upgraded_gauge(stack), upgraded_status(stack))
        for h in held:
            h.release()
        codes = yield defer.gatherResults([h.outcome for h in held], consumeErrors=True)
        yield poll(lambda: upgraded_status(stack) == 0 and len(events) >= 2, WAIT, "both connections closed")
        self.assertEqual(during, (2, 2))
        self.assertEqual([c for c, _ in codes], [1000, 1000])
        self.assertEqual(upgraded_gauge(stack), 0)
        shown = sorted((e["method"], e["path"], e["code"], e["cause"], e["proxy"]) for e in events)
        self.assertEqual(shown, [("GET", "/echo", 101, "-", "alpha")] * 2)
        for e in events:
            self.assertTrue(size <= e["bytes_in"] < size + 1000, e["bytes_in"])
            self.assertTrue(size <= e["bytes_out"] < size + 1000, e["bytes_out"])
            self.assertTrue(0 <= e["duration"] < WAIT, e["duration"])


class Limits(TestCase):
    """``max_upgraded``, ``upgrade_idle_timeout`` and drain, on upgraded connections."""

    timeout = 120

    def setUp(self) -> None:
        self.upstream = start_upstream(self)
        self.client = WebSocketClient(self)

    @defer.inlineCallbacks
    def test_max_upgraded_refuses_with_503_upgrade_limit(self):
        """With ``max_upgraded = 2`` and two connections open, a third handshake is answered
        503 with ``X-PPBridge-Error: upgrade-limit``; once one of the two has closed, a new
        connection opens and echoes."""
        stack = yield websocket_stack(self, self.upstream, forwarder={"max_upgraded": 2})
        url = ws_url(stack.url, "/echo")
        held = [Held(self.client, url) for _ in range(2)]
        yield defer.gatherResults([h.reached for h in held], consumeErrors=True)
        err = yield self.assertFailure(self.client.session(url, lambda ws: "connected"), InvalidStatus)
        self.assertEqual((err.response.status_code, err.response.headers.get("X-PPBridge-Error")),
                         (503, "upgrade-limit"))
        held[0].release()
        yield held[0].outcome
        yield poll(lambda: upgraded_status(stack) == 1, WAIT, "one connection closed")

        def echo(ws: ClientConnection) -> Any:
            ws.send("room again")
            return ws.recv(timeout=WAIT)

        again = yield self.client.session(url, echo)
        self.assertEqual(again, "room again")
        held[1].release()
        yield held[1].outcome

    @defer.inlineCallbacks
    def test_idle_connection_closed_after_upgrade_idle_timeout(self):
        """With ``upgrade_idle_timeout = 1``: 3 s of back-to-back echoes keep a connection
        open (traffic re-arms the timer); then, idle, the connection ends 1 s after its last
        byte (between 0.9 and 10 s; printed), the access line's cause is idle-timeout, and
        the upstream sees its connection end."""
        events = access_events(self)
        stack = yield websocket_stack(self, self.upstream, forwarder={"upgrade_idle_timeout": 1.0})

        def run(ws: ClientConnection) -> tuple[int, float, str]:
            busy_until, n = time.monotonic() + 3.0, 0
            while time.monotonic() < busy_until:
                ws.send(small_message(n))
                if ws.recv(timeout=WAIT) != small_message(n):
                    raise AssertionError(f"echo {n} differs")
                n += 1
            last = time.monotonic()
            try:
                extra = ws.recv(timeout=WAIT)
                return n, 0.0, f"a message: {extra!r}"
            except ConnectionClosed:
                return n, time.monotonic() - last, "closed"

        rounds, idle, how = yield self.client.session(ws_url(stack.url, "/echo"), run)
        closed = yield self.upstream.next_close()
        yield poll(lambda: len(events) >= 1, WAIT, "the access line")
        report("idle connection closed after", seconds=f"{idle:.3f}", busy_rounds=rounds)
        self.assertEqual(how, "closed")
        self.assertGreater(rounds, 10)
        self.assertTrue(0.9 <= idle < PROMPT_LIMIT, idle)
        self.assertEqual([(e["code"], e["cause"]) for e in events], [(101, "idle-timeout")])
        self.assertEqual(closed.path, "/echo")

    @defer.inlineCallbacks
    def test_drain_keeps_connection_until_its_grace_then_closes_it(self):
        """The forwarder is stopped with ``drain_timeout = 2`` while a connection is open: the
        connection still echoes during the drain, and ends about 2 s after the stop (between
        1.5 and 12 s; printed); the stop completes."""
        stack = yield websocket_stack(self, self.upstream, forwarder={"drain_timeout": 2.0})
        held = Held(self.client, ws_url(stack.url, "/echo"), wait_for_end=True)
        yield held.reached
        stopped_at = time.monotonic()
        stopping = stack.forwarder.stopService()
        held.release()
        _, ended = yield held.outcome
        yield stopping.addTimeout(WAIT, reactor)
        report("drain closed the connection after", seconds=f"{ended - stopped_at:.3f}")
        self.assertTrue(1.5 <= ended - stopped_at < 2.0 + PROMPT_LIMIT, ended - stopped_at)


# --- other upgrade tokens: raw bytes, half-close, h2c ----------------------------------------------

RAW_REQUEST = (b"GET /raw HTTP/1.1\r\nHost: app.example.test\r\nConnection: Upgrade\r\nUpgrade: " + RAW_TOKEN
               + b"\r\n\r\n")


class OtherUpgrades(TestCase):
    """An upgrade that is not WebSocket (``x-raw-echo``: raw bytes, echoed), and h2c."""

    timeout = 60

    @defer.inlineCallbacks
    def raw_exchange(self, base: str):  # type: ignore[no-untyped-def]
        """Upgrade to x-raw-echo at ``base``, send bytes, half-close; (101 head, the rest)."""
        client = yield raw_client(self, base)
        client.transport.write(RAW_REQUEST)
        data = yield client.when(lambda d: b"\r\n\r\n" in d)
        head = data.split(b"\r\n\r\n", 1)[0]
        client.transport.write(b"hello raw")
        yield client.when(lambda d: d.endswith(b"hello raw"))
        client.transport.loseWriteConnection()
        everything = yield client.closed.addTimeout(WAIT, reactor)
        return head, everything.split(b"\r\n\r\n", 1)[1]

    @defer.inlineCallbacks
    def test_raw_upgrade_direct_control(self):
        """The control, without the bridge: the raw upstream answers 101, echoes, and answers
        the client's half-close with ``[eof seen]`` before closing."""
        url = yield listen(self, RawUpgradeUpstream())
        head, rest = yield self.raw_exchange(url)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertEqual(rest, b"hello raw" + EOF_SEEN)

    @defer.inlineCallbacks
    def test_raw_upgrade_carries_bytes_and_half_close(self):
        """Through the bridge, ``Upgrade: x-raw-echo`` is answered 101 naming that token, raw
        bytes echo, and the client's half-close (its EOF, its side still reading) reaches the
        upstream, whose answer to it (``[eof seen]``) still reaches the client before the end."""
        upstream = RawUpgradeUpstream()
        url = yield listen(self, upstream)
        stack = yield Stack(self).start(upstreams={"alpha": url})
        head, rest = yield self.raw_exchange(stack.url)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"upgrade: " + RAW_TOKEN, head.lower())
        self.assertIn(b"upgrade: " + RAW_TOKEN, upstream.heads[-1].lower())
        self.assertEqual(rest, b"hello raw" + EOF_SEEN)

    @defer.inlineCallbacks
    def test_upstream_half_close_reaches_client_and_its_close_ends_upstream(self):
        """Through the bridge, the upstream half-closes its side first: the client reads EOF
        (carried as a half-close, after the bytes before it) and then resets its connection
        (no EOF of its own is carried); the proxy then closes the upstream's connection,
        although the upstream's side had already ended (its end is seen within WAIT)."""
        upstream = RawUpgradeUpstream()
        url = yield listen(self, upstream)
        stack = yield Stack(self).start(upstreams={"alpha": url})
        client = yield raw_client(self, stack.url)
        client.abort_on_eof = True
        client.transport.write(RAW_REQUEST)
        yield client.when(lambda d: b"\r\n\r\n" in d)
        client.transport.write(b"before")
        yield client.when(lambda d: d.endswith(b"before"))
        client.transport.write(HALF_CLOSE)
        yield client.closed.addTimeout(WAIT, reactor)
        self.assertTrue(client.eof)
        yield upstream.lost.get().addTimeout(WAIT, reactor)

    @defer.inlineCallbacks
    def test_upgrade_with_a_body_is_an_ordinary_request(self):
        """A POST with ``Connection: Upgrade``, ``Upgrade: websocket`` and a 5-byte body is not
        switched (no raw bytes may follow a body on a connection twisted.web parses): the
        upstream's /echo answers 200, saw the body and no Upgrade or Connection header."""
        stack = yield Stack(self).start()
        response, body = yield Client(self).fetch(
            b"POST", stack.url + "/echo", {b"Connection": [b"Upgrade"], b"Upgrade": [b"websocket"]}, b"hello")
        echoed = json.loads(body)
        names = {name.lower() for name, _ in echoed["headers"]}
        self.assertEqual((response.code, echoed["body_length"]), (200, 5))
        self.assertFalse(names & {"upgrade", "connection"}, names)

    @defer.inlineCallbacks
    def test_h2c_upgrade_is_served_as_an_ordinary_request(self):
        """``Connection: Upgrade`` + ``Upgrade: h2c`` on GET /plain is not switched (RFC 9110
        §7.8 lets a server ignore it): 200 with the plain body, and the upstream received no
        ``Upgrade`` header."""
        upstream = start_upstream(self)
        stack = yield websocket_stack(self, upstream)
        response, body = yield Client(self).fetch(b"GET", stack.url + "/plain",
                                                  {b"Connection": [b"Upgrade"], b"Upgrade": [b"h2c"]})
        self.assertEqual((response.code, body), (200, PLAIN_BODY.encode()))
        self.assertEqual(upstream.requests[-1].headers.get_all("Upgrade"), [])


class TunnelAttacks(TestCase):
    """A hostile Redis against an upgraded connection: it sees, replays and alters frames."""

    timeout = 60

    @defer.inlineCallbacks
    def test_replayed_or_altered_tunnel_frames_are_dropped(self):
        """On an upgraded (x-raw-echo) connection, the client's ``hello`` frame captured on
        Redis and republished as is is dropped by the proxy as a replay, and again with a
        newer counter or a flipped byte as bad-tag; the upstream got ``hello`` once, the
        client read its echo once, and the connection still carries ``next`` afterwards."""
        upstream = RawUpgradeUpstream()
        url = yield listen(self, upstream)
        stack = Stack(self)
        watcher = spy(stack, self, b"ppbridge:*")
        yield stack.start(upstreams={"alpha": url})
        drops = DropWatcher(stack.proxies["alpha"])
        attacker = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(attacker.close)
        client = yield raw_client(self, stack.url)
        client.transport.write(RAW_REQUEST)
        yield client.when(lambda d: b"\r\n\r\n" in d)
        drain(watcher)
        client.transport.write(b"hello")
        yield client.when(lambda d: d.endswith(b"hello"))
        (channel, frame), = of_type(drain(watcher), MsgType.REQ_DATA)
        attacker.publish(channel, frame)
        yield drops.wait("replay")
        attacker.publish(channel, with_counter(frame, 1 << 40))
        altered = bytearray(with_counter(frame, 1 << 41))
        altered[HEADER_SIZE] ^= 0x01
        attacker.publish(channel, bytes(altered))
        yield drops.wait("bad-tag", 2)
        client.transport.write(b"next")
        data = yield client.when(lambda d: d.endswith(b"next"))
        self.assertEqual(data.split(b"\r\n\r\n", 1)[1], b"hellonext")
