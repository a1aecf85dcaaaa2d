"""Streaming bodies with flow control: large, slow and live responses and uploads, with the
memory of the forwarder, the proxy and Redis staying bounded.

Everything runs end to end over real HTTP: the big and slow transfers through ``twistd -n
ppforwarder`` / ``twistd -n ppproxy`` child processes (so their resident memory can be read
from /proc), the rest through in-process services on a private Redis. The one exception is
the lost-frame test, which by design runs on an in-memory bus that loses one frame.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Iterator

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall, TaskStopped, cooperate
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import RequestTransmissionFailed, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from ppbridge.memorybus import MemoryBroker
from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.errors import BusMessageError
from ppbridge.forwarder import ForwarderService
from ppbridge.proxy import ProxyService
from ppbridge.redis_server import free_port
from ppbridge.pattern import pattern_bytes, pattern_sha256
from ppbridge.sampleapp import SampleApp, make_site
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from ppbridge.webface import BridgeSite
from ppbridge.wire import MsgType, unpack_header
from tests.processes import TWISTD, Child, spawn
from tests.redisclient import RawRedisClient, client_for
from tests.support import Client, Stack, error_of, key_pair, listen, start_redis, temp_folder

log = Logger()

KiB, MiB = 1 << 10, 1 << 20
RSS_LIMIT = 150 * 1000 * 1000  # "150 MB": far above a fixed buffer, far below a buffered body
SAMPLE_EVERY = 0.2
WAIT = 30.0  # bound on any single wait for an event that should come at once


# --- measuring ---------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class Peak:
    """The largest value of ``read()``, sampled every ``interval`` seconds from ``start`` to
    ``stop`` (and once at each end). A failed read is kept in ``error`` and ends sampling."""

    def __init__(self, case: TestCase, name: str, read: Callable[[], int], interval: float = SAMPLE_EVERY):
        self.name = name
        self.read = read
        self.interval = interval
        self.first: int | None = None
        self.peak = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        case.addCleanup(self.stop)

    def start(self) -> Peak:
        self._loop.start(self.interval, now=True)
        return self

    def sample(self) -> None:
        try:
            value = self.read()
        except (OSError, ValueError, AssertionError) as err:
            self.error = err
            if self._loop.running:
                self._loop.stop()
            return
        if self.first is None:
            self.first = value
        self.peak = max(self.peak, value)
        self.samples += 1

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
            self.sample()

    def __str__(self) -> str:
        return (f"{self.name}: peak {self.peak / MiB:.1f} MiB, first {(self.first or 0) / MiB:.1f} MiB, "
                f"{self.samples} samples" + (f", error {self.error!r}" if self.error else ""))


def redis_used_memory(conn: RawRedisClient) -> Callable[[], int]:
    """A reader of Redis's ``used_memory`` (INFO memory), in bytes."""
    return lambda: int(conn.info("memory")["used_memory"])


# --- bodies and clients ------------------------------------------------------------------------


@implementer(IBodyProducer)
class PatternBody:
    """A request body of ``pattern_bytes(seed, n)``, generated only as the connection takes it
    (a cooperative task the transport pauses and resumes), never held whole in memory.

    ``chunked`` leaves the length unknown (the client sends chunked encoding). With ``gate``
    = (offset, deferred), the body stops at ``offset`` bytes until the deferred fires.
    """

    def __init__(self, seed: int, n: int, chunked: bool = False, gate: tuple[int, Deferred[None]] | None = None):
        self.length = UNKNOWN_LENGTH if chunked else n
        self._seed, self._n, self._gate = seed, n, gate
        self.sent = 0
        self._task: Any = None

    def _pieces(self, consumer: IConsumer) -> Iterator[Deferred[None] | None]:
        gated = self._gate is None
        for piece in pattern_bytes(self._seed, self._n, 64 * KiB):
            if not gated and self._gate is not None and self.sent >= self._gate[0]:
                gated = True
                yield self._gate[1]
            consumer.write(piece)
            self.sent += len(piece)
            yield None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._task = cooperate(self._pieces(consumer))
        done = self._task.whenDone()

        def stopped(reason: Failure) -> Deferred[None]:
            reason.trap(TaskStopped)
            return Deferred()  # like FileBodyProducer: a stopped body never "finishes"

        return done.addCallbacks(lambda _: None, stopped)

    def pauseProducing(self) -> None:
        self._task.pause()

    def resumeProducing(self) -> None:
        self._task.resume()

    def stopProducing(self) -> None:
        try:
            self._task.stop()
        except Exception:
            pass  # already done or stopped


class PacedReader(Protocol):
    """Reads a response body at about ``rate`` bytes/s: once a tick's allowance is used up it
    pauses the transport, and a timer resumes it on the next tick. Hashes what it reads;
    ``done`` fires with (sha256 hex, length) or fails with the reason the body ended."""

    def __init__(self, rate: float, tick: float = 0.1) -> None:
        self.per_tick = rate * tick
        self.tick = tick
        self.budget = self.per_tick
        self.paused = False
        self.size = 0
        self.pauses = 0
        self.digest = hashlib.sha256()
        self.done: Deferred[tuple[str, int]] = Deferred()
        self._loop = LoopingCall(self._refill)
        self._loop.clock = reactor

    def connectionMade(self) -> None:
        self._loop.start(self.tick, now=False)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.budget -= len(data)
        if self.budget <= 0 and not self.paused:
            self.paused = True
            self.pauses += 1
            self.transport.pauseProducing()

    def _refill(self) -> None:
        self.budget = min(self.budget + self.per_tick, self.per_tick)
        if self.paused and self.budget > 0:
            self.paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self._loop.running:
            self._loop.stop()
        if reason.check(ResponseDone):
            self.done.callback((self.digest.hexdigest(), self.size))
        else:
            self.done.errback(reason)


class EventReader(Protocol):
    """Reads a text/event-stream body, stamping each complete event with ``time.time()`` on
    arrival. ``done`` fires with [(arrival time, event text)] or fails with the end reason;
    :meth:`when` awaits the n-th event."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self._buffer = b""
        self._waits: list[tuple[int, Deferred[None]]] = []
        self.done: Deferred[list[tuple[float, str]]] = Deferred()

    def when(self, count: int) -> Deferred[None]:
        """Fires once ``count`` events have arrived (at once if they have)."""
        d: Deferred[None] = Deferred()
        self._waits.append((count, d))
        self._fire()
        return d

    def _fire(self) -> None:
        for entry in list(self._waits):
            if len(self.events) >= entry[0]:
                self._waits.remove(entry)
                entry[1].callback(None)

    def dataReceived(self, data: bytes) -> None:
        now = time.time()
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n\n")
        self.events += [(now, event.decode("ascii")) for event in complete]
        self._fire()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.events)
        else:
            self.done.errback(reason)


class AbortAfter(Protocol):
    """Reads a body until ``limit`` bytes arrived, then drops the connection (a client that
    leaves mid-download). ``aborted`` fires with the reactor time it did so."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.aborted: Deferred[float] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size >= self.limit and not self.aborted.called:
            self.aborted.callback(reactor.seconds())
            self.transport.stopProducing()  # closes the client's TCP connection

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.reason = reason
        self.lost.callback(None)


class Collect(Protocol):
    """Reads a whole body; ``done`` fires with (bytes received, end reason) either way."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred[tuple[bytes, Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.done.callback((b"".join(self.parts), reason))


def read_body(response: Any, protocol: Protocol) -> Deferred[Any]:
    response.deliverBody(protocol)
    return protocol.done  # type: ignore[attr-defined, no-any-return]


class RawHTTP(Protocol):
    """One raw HTTP/1.1 exchange: writes ``request`` bytes as given (headers only, if the
    test wants the body withheld), records every read with its arrival time. ``closed``
    fires with the whole reply once the server closes the connection."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.reads: list[tuple[float, bytes]] = []
        self.closed: Deferred[bytes] = Deferred()
        self.on_data: Callable[[RawHTTP], None] = lambda proto: None

    @property
    def data(self) -> bytes:
        return b"".join(part for _, part in self.reads)

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append((time.time(), data))
        self.on_data(self)

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(self.data)


@defer.inlineCallbacks
def raw_exchange(case: TestCase, url: str, request: bytes, on_data: Callable[[RawHTTP], None] | None = None):  # type: ignore[no-untyped-def]
    """Connect to ``url``'s port, send ``request``; the RawHTTP protocol (connected)."""
    port = int(url.rsplit(":", 1)[1])
    proto = RawHTTP(request)
    if on_data is not None:
        proto.on_data = on_data
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    case.addCleanup(lambda: proto.transport.abortConnection() if not proto.closed.called else None)
    return proto


def split_response(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    """(status line, {lowercase name: [values]}, rest) of a raw HTTP response."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw[:200]!r}")
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, rest


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode as much of a chunked body as ``data`` holds: (body so far, last chunk seen)."""
    body, pos = [], 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return b"".join(body), False
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(body), True
        start = eol + 2
        if len(data) < start + size + 2:
            return b"".join(body), False
        body.append(data[start : start + size])
        pos = start + size + 2


def bounded(d: Deferred[Any], seconds: float = WAIT) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


# --- the bridge as users run it: twistd children -----------------------------------------------


class ChildBridge:
    """A private Redis, an upstream (the sample app in this process, or the URL given to
    :meth:`start`), and ``twistd -n ppforwarder`` and ``twistd -n ppproxy`` child processes
    (route ``alpha`` at ``/``) configured from TOML files; all stopped in cleanup."""

    forwarder: Child
    proxy: Child
    app: SampleApp
    url: str

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.folder = temp_folder(case)
        self.redis = start_redis(case)

    @defer.inlineCallbacks
    def start(self, forwarder: dict[str, Any] | None = None, proxy: dict[str, Any] | None = None,
              upstream: str | None = None):  # type: ignore[no-untyped-def]
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        if upstream is None:
            site, self.app = make_site()
            upstream = yield listen(self.case, site)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        fconf = write_forwarder_config(self.folder, self.redis.url, f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                                       {"alpha": {"path_prefix": "/"}}, forwarder=forwarder)
        pconf = write_proxy_config(self.folder, "alpha", self.redis.url, upstream, settings=proxy)
        run_dir = temp_folder(self.case)
        self.forwarder = spawn(self.case, run_dir, [TWISTD, "-n", "--pidfile=", "ppforwarder", "--config", str(fconf)],
                               "forwarder")
        self.proxy = spawn(self.case, run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(pconf)], "proxy")
        yield defer.gatherResults([
            self.proxy.wait_for(r"key \S+ from forwarder"),
            self.forwarder.wait_for(r"proxy alpha \(instance \S+\) confirmed key"),
        ], consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        return self

    def rss(self, child: Child) -> Peak:
        pid = child.transport.pid
        return Peak(self.case, f"{child.name} RSS", lambda: vm_rss(pid))

    def describe(self) -> str:
        return f"{self.forwarder.describe()}\n{self.proxy.describe()}"


class BigTransfers(TestCase):
    """256 MiB each way through the twistd forwarder and proxy, byte-exact, in bounded memory."""

    timeout = 900

    @defer.inlineCallbacks
    def test_256_mib_down_and_up_byte_exact_in_bounded_memory(self):
        """A 256 MiB download and a 256 MiB streamed upload pass byte-exact (sha256 compared)
        through ``twistd ppforwarder`` and ``twistd ppproxy``, and the resident memory of each
        (VmRSS sampled every 0.2 s during both transfers) stays under 150 MB."""
        bridge = yield ChildBridge(self).start()
        size = 256 * MiB
        expected_down, expected_up = pattern_sha256(21, size), pattern_sha256(22, size)
        forwarder_rss, proxy_rss = bridge.rss(bridge.forwarder).start(), bridge.rss(bridge.proxy).start()
        client = Client(self)

        response, digest, n = yield client.digest(f"{bridge.url}/bytes?n={size}&seed=21")
        self.assertEqual((response.code, n), (200, size), bridge.describe())
        self.assertEqual(digest, expected_down, "the 256 MiB download was altered")

        response = yield client.request(b"PUT", bridge.url + "/upload", body=PatternBody(22, size))
        data = yield read_body(response, Collect())
        self.assertEqual(response.code, 200, data)
        self.assertTrue(data[1].check(ResponseDone), data[1])
        self.assertIn(expected_up.encode("ascii"), data[0], "the 256 MiB upload was altered")
        self.assertIn(b'"body_length": %d' % size, data[0])

        for peak in (forwarder_rss, proxy_rss):
            peak.stop()
            log.info("256 MiB each way: {peak}", peak=str(peak))
            self.assertIsNone(peak.error, str(peak))
            self.assertGreater(peak.samples, 2, str(peak))
            self.assertLess(peak.peak, RSS_LIMIT, str(peak))


class SlowClient(TestCase):
    """A client reading 1 MiB/s: nothing piles up in the forwarder or in Redis."""

    timeout = 300

    @defer.inlineCallbacks
    def test_slow_reader_keeps_forwarder_and_redis_memory_bounded(self):
        """A client reading a 64 MiB body at about 1 MiB/s (pausing its transport) gets it
        byte-exact, while the forwarder's RSS stays under 150 MB and grows less than 48 MiB,
        the proxy's stays under 150 MB, and Redis's used_memory grows less than 32 MiB:
        the body waits upstream, not in the bridge."""
        bridge = yield ChildBridge(self).start()
        size = 64 * MiB
        expected = pattern_sha256(31, size)
        conn = client_for(bridge.redis)
        self.addCleanup(conn.close)
        forwarder_rss, proxy_rss = bridge.rss(bridge.forwarder).start(), bridge.rss(bridge.proxy).start()
        redis_memory = Peak(self, "Redis used_memory", redis_used_memory(conn)).start()
        baseline_forwarder, baseline_redis = forwarder_rss.first, redis_memory.first

        client = Client(self)
        started = time.monotonic()
        response = yield client.request(b"GET", f"{bridge.url}/bytes?n={size}&seed=31")
        self.assertEqual(response.code, 200, bridge.describe())
        reader = PacedReader(rate=1 * MiB)
        digest, n = yield read_body(response, reader)
        elapsed = time.monotonic() - started
        for peak in (forwarder_rss, proxy_rss, redis_memory):
            peak.stop()
            log.info("64 MiB at 1 MiB/s in {s:.1f} s: {peak}", s=elapsed, peak=str(peak))
        self.assertEqual((n, digest), (size, expected), "the slowly read body was altered")
        self.assertGreater(reader.pauses, 32, "the client did not actually read slowly")

        for peak in (forwarder_rss, proxy_rss, redis_memory):
            self.assertIsNone(peak.error, str(peak))
        self.assertLess(forwarder_rss.peak, RSS_LIMIT, str(forwarder_rss))
        self.assertLess(forwarder_rss.peak - baseline_forwarder, 48 * MiB, str(forwarder_rss))
        self.assertLess(proxy_rss.peak, RSS_LIMIT, str(proxy_rss))
        self.assertLess(redis_memory.peak - baseline_redis, 32 * MiB, str(redis_memory))


# --- live responses ----------------------------------------------------------------------------


class LiveResponses(TestCase):
    """Responses that trickle reach the client as they are produced."""

    timeout = 60

    @defer.inlineCallbacks
    def test_each_sse_event_reaches_the_client_before_the_next_is_written(self):
        """An upstream sending server-sent events (the sample app's /sse on a clock the test
        advances) writes each event only once the client has received the one before: all
        20 events arrive, in order, and the stream then ends cleanly. So each event reached
        the client while the upstream had written nothing after it: the bridge passes an
        event on as it comes, rather than holding it until more data or the end of the body
        pushes it out (a bridge that held one would never get the next: the wait for it is
        bounded at 30 s, where delivery takes milliseconds). How fast events travel is a
        benchmark figure, not asserted here."""
        clock = Clock()
        site, app = make_site(clock)
        upstream = yield listen(self, site)
        stack = yield Stack(self).start(upstreams={"alpha": upstream})
        response = yield bounded(Client(self).request(b"GET", stack.url + "/sse?n=20&interval=1"))
        self.assertEqual(response.code, 200)
        reader = EventReader()
        response.deliverBody(reader)
        for i in range(20):  # event 0 is written with the head; each advance writes the next
            if i:
                clock.advance(1)
            try:
                yield bounded(reader.when(i + 1))
            except defer.TimeoutError:
                self.fail(f"event {i} (written {i + 1} events in) never reached the client; got {reader.events}")
            self.assertEqual(len(reader.events), i + 1, reader.events)
        events = yield bounded(reader.done)
        self.assertEqual([text.split()[1] for _, text in events], [str(i) for i in range(20)], events)

    @defer.inlineCallbacks
    def test_chunked_upstream_response_reaches_client_chunked_and_live(self):
        """An upstream response without Content-Length (SSE, 5 events, on a clock the test
        advances) reaches a raw HTTP/1.1 client with Transfer-Encoding: chunked and no
        Content-Length; the first event arrives before the upstream has written any other
        (so before the last chunk: the stream is still open), and the whole body then
        arrives intact with its last chunk."""
        clock = Clock()
        site, app = make_site(clock)
        upstream = yield listen(self, site)
        stack = yield Stack(self).start(upstreams={"alpha": upstream})
        first: Deferred[tuple[int, bool]] = Deferred()

        def on_data(proto: RawHTTP) -> None:
            if first.called or b"\r\n\r\n" not in proto.data:
                return
            body, ended = dechunk(proto.data.partition(b"\r\n\r\n")[2])
            if b"\n\n" in body:
                first.callback((body.count(b"\n\n"), ended))

        request = b"GET /sse?n=5&interval=1 HTTP/1.1\r\nHost: bridge.test\r\nConnection: close\r\n\r\n"
        proto = yield raw_exchange(self, stack.url, request, on_data)
        events_then, ended_then = yield bounded(first)  # only event 0 has been written
        self.assertEqual((events_then, ended_then), (1, False))
        for _ in range(4):  # events 1 to 4, and the end (one interval at a time: a LoopingCall skips)
            clock.advance(1)
        raw = yield bounded(proto.closed)
        status, headers, rest = split_response(raw)
        self.assertTrue(status.startswith(b"HTTP/1.1 200"), raw[:300])
        self.assertEqual(headers.get(b"transfer-encoding"), [b"chunked"], raw[:300])
        self.assertNotIn(b"content-length", headers)
        body, ended = dechunk(rest)
        self.assertTrue(ended, "the chunked body has no last chunk")
        self.assertEqual([e.split()[1] for e in body.decode().strip().split("\n\n")], list("01234"), body)

    @defer.inlineCallbacks
    def test_content_length_is_kept(self):
        """A response the upstream sent with Content-Length reaches the client with that same
        Content-Length on the wire (and no chunked encoding), both a small one (carried
        inline in the response head) and a 5 MiB streamed one, byte-exact."""
        stack = yield Stack(self).start()
        for size in (1000, 5 * MiB):
            request = b"GET /bytes?n=%d&seed=5 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n" % size
            proto = yield raw_exchange(self, stack.url, request)
            status, headers, rest = split_response((yield bounded(proto.closed)))
            self.assertTrue(status.startswith(b"HTTP/1.1 200"), status)
            self.assertEqual(headers.get(b"content-length"), [b"%d" % size], (size, headers))
            self.assertNotIn(b"transfer-encoding", headers)
            self.assertEqual((len(rest), hashlib.sha256(rest).hexdigest()), (size, pattern_sha256(5, size)))
        # And through an HTTP client: the length is known before the body is read.
        response, digest, n = yield Client(self).digest(f"{stack.url}/bytes?n={5 * MiB}&seed=5")
        self.assertEqual((response.code, response.length, n), (200, 5 * MiB, 5 * MiB))


# --- a client that leaves --------------------------------------------------------------------


class ClientLeaves(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_client_disconnect_mid_download_cancels_the_upstream_call(self):
        """A client that drops its connection 2 MiB into a 1 GiB download: the upstream sees
        its own connection closed before its response finished (app.on_disconnect, for
        /bytes), and the client's body ends as a failure, short of 1 GiB. The wait for the
        upstream's disconnect is bounded at 30 s: it takes milliseconds, and a bridge that
        did not cancel would leave the call running until the 300 s stream idle timeout.
        (How soon the upstream is closed is logged, a benchmark figure, not asserted.)"""
        stack = yield Stack(self).start()
        upstream_gone: Deferred[tuple[str, float]] = Deferred()
        stack.app.on_disconnect.append(
            lambda path: upstream_gone.callback((path, reactor.seconds())) if not upstream_gone.called else None)
        response = yield Client(self).request(b"GET", f"{stack.url}/bytes?n={1 << 30}&seed=4")
        self.assertEqual(response.code, 200)
        reader = AbortAfter(2 * MiB)
        response.deliverBody(reader)
        left_at = yield bounded(reader.aborted)
        path, closed_at = yield bounded(upstream_gone)
        yield bounded(reader.lost)
        log.info("upstream closed {ms:.1f} ms after the client left", ms=(closed_at - left_at) * 1000)
        self.assertEqual(path, "/bytes")
        self.assertLess(reader.size, 1 << 30)
        self.assertFalse(reader.reason.check(ResponseDone), "the aborted download claims to be complete")


# --- a lost frame ------------------------------------------------------------------------------


class LostFrame(TestCase):
    """Forwarder and proxy on an in-memory bus that loses exactly one RESP_DATA frame, with
    real HTTP on both ends: the loss is detected, never passed off as a whole body."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        folder = temp_folder(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        site, self.app = make_site()
        upstream = yield listen(self, site)
        redis_url = "redis://127.0.0.1:9/0"  # never contacted: the bus is in memory
        fsettings = load_forwarder_config(write_forwarder_config(folder, redis_url, "tcp:0",
                                                                 {"alpha": {"path_prefix": "/"}}))
        psettings = load_proxy_config(write_proxy_config(folder, "alpha", redis_url, upstream))
        self.broker = MemoryBroker()
        self.forwarder = ForwarderService(fsettings, self.broker.client(), reactor)
        self.proxy = ProxyService(psettings, self.broker.client(), reactor, reactor)
        for service in (self.forwarder, self.proxy):
            service.startService()
            self.addCleanup(lambda s=service: s.stopService() if s.running else None)
        self.url = yield listen(self, BridgeSite(self.forwarder))
        yield bounded(self.forwarder.wait_for_proxy("alpha"), 15)
        self.lost: list[Any] = []

        def drop(channel: bytes, message: bytes) -> bool:
            try:
                header = unpack_header(message)
            except BusMessageError:
                return False  # negotiation messages are not session messages
            if not self.lost and header.type is MsgType.RESP_DATA and header.seq == 3:
                self.lost.append(header)
                return True
            return False

        self.broker.drop = drop

    def metric(self, name: str, reason: str) -> float:
        value = self.forwarder.metrics.registry.get_sample_value(name, {"reason": reason})
        return value or 0.0

    @defer.inlineCallbacks
    def check_download(self, query: str):  # type: ignore[no-untyped-def]
        yield self.start()
        size = 64 * MiB  # 256 frames of 256 KiB: frame 3 is early, the upstream far from done
        upstream_gone: Deferred[str] = Deferred()
        self.app.on_disconnect.append(lambda path: upstream_gone.callback(path) if not upstream_gone.called else None)
        client = Client(self)
        try:
            response = yield bounded(client.request(b"GET", f"{self.url}/bytes?n={size}&seed=8{query}"))
        except ResponseFailed:
            response = None  # refused before the head: also not a silent half-delivery
        if response is not None:
            body, reason = yield bounded(read_body(response, Collect()))
            complete = response.code == 200 and reason.check(ResponseDone) and len(body) == size
            self.assertFalse(complete, "a body missing a frame was delivered as a complete 200")
            self.assertTrue(reason.check(ResponseFailed, PotentialDataLoss), reason)
            self.assertLess(len(body), size)
            self.assertNotEqual(hashlib.sha256(body).hexdigest(), pattern_sha256(8, size))
        self.assertEqual(len(self.lost), 1, "the bus did not lose the frame")
        self.assertEqual(self.metric("ppbridge_bus_dropped_total", "stream-gap"), 1.0)
        self.assertEqual(self.metric("ppbridge_streams_aborted_total", "stream-gap"), 1.0)
        self.assertEqual((yield bounded(upstream_gone, 10)), "/bytes")  # the proxy cancelled the upstream call

    def test_lost_frame_aborts_a_response_with_content_length(self):
        """A 64 MiB download with Content-Length whose third RESP_DATA frame is lost on the bus:
        the client's body read fails (ResponseFailed) short of 64 MiB, the forwarder counts a
        "stream-gap" drop and abort, and the upstream call is cancelled."""
        return self.check_download("")

    def test_lost_frame_aborts_a_chunked_response(self):
        """The same with a chunked upstream response: the client's body read fails instead of
        ending cleanly with the body short by a frame."""
        return self.check_download("&chunked=1")


# --- bodies over the limit ---------------------------------------------------------------------


class UpstreamWatch(ProtocolWrapper):
    def dataReceived(self, data: bytes) -> None:
        self.factory.received(len(data))
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.lost()


class WatchedUpstream(WrappingFactory):
    """The sample app's site, with events for request bytes it received and connections it lost."""

    protocol = UpstreamWatch

    def __init__(self, site: Any) -> None:
        super().__init__(site)
        self.bytes_in = 0
        self.connections_lost = 0
        self._byte_waits: list[tuple[int, Deferred[None]]] = []
        self._lost_waits: list[Deferred[None]] = []

    def received(self, n: int) -> None:
        self.bytes_in += n
        for entry in list(self._byte_waits):
            if self.bytes_in >= entry[0]:
                self._byte_waits.remove(entry)
                entry[1].callback(None)

    def lost(self) -> None:
        self.connections_lost += 1
        waits, self._lost_waits = self._lost_waits, []
        for d in waits:
            d.callback(None)

    def when_received(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._byte_waits.append((n, d))
        self.received(0)
        return d

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.connections_lost:
            d.callback(None)
        else:
            self._lost_waits.append(d)
        return d


class BodyLimit(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_declared_length_over_limit_is_413_before_the_body_is_sent(self):
        """A client that sends only the headers of a POST declaring 10 MiB (over a 1 MiB
        max_body_size) and withholds the body gets 413 body-too-large anyway: the answer
        does not wait for the body. Nothing reaches the upstream."""
        stack = yield Stack(self).start(forwarder={"max_body_size": MiB})
        request = (b"POST /upload HTTP/1.1\r\nHost: bridge.test\r\nContent-Type: application/octet-stream\r\n"
                   b"Content-Length: %d\r\n\r\n" % (10 * MiB))
        proto = yield raw_exchange(self, stack.url, request)
        raw = yield bounded(proto.closed, 10)
        status, headers, body = split_response(raw)
        self.assertTrue(status.startswith(b"HTTP/1.1 413"), raw[:300])
        self.assertEqual(headers.get(b"x-ppbridge-error"), [b"body-too-large"], raw[:300])
        self.assertEqual(stack.app.hits["/upload"], 0)

    @defer.inlineCallbacks
    def test_chunked_upload_passing_limit_midway_is_413_and_never_completes_upstream(self):
        """A chunked upload of 8 MiB with max_body_size 2 MiB: once the upstream has started
        receiving it, the client goes past the limit; it gets 413 body-too-large, the
        upstream connection carrying the upload is closed, and the upstream never got a
        complete body (/upload never ran)."""
        site, app = make_site()
        watched = WatchedUpstream(site)
        upstream = yield listen(self, watched)
        stack = yield Stack(self).start(forwarder={"max_body_size": 2 * MiB}, upstreams={"alpha": upstream})
        gate: Deferred[None] = Deferred()
        body = PatternBody(9, 8 * MiB, chunked=True, gate=(MiB, gate))
        answer = Client(self).request(b"POST", stack.url + "/upload", body=body)
        yield bounded(watched.when_received(512 * KiB))  # the upload is streaming upstream
        upstream_lost = watched.when_lost()
        gate.callback(None)
        try:
            response = yield bounded(answer)
        except RequestTransmissionFailed as err:
            self.fail(f"no 413: the connection was lost while the client was still sending "
                      f"({err.reasons[0].getErrorMessage()}), after {body.sent} bytes")
        data, reason = yield bounded(read_body(response, Collect()))
        self.assertEqual((response.code, error_of(response)), (413, b"body-too-large"), data)
        yield bounded(upstream_lost, 10)
        self.assertEqual(app.hits["/upload"], 0, "the upstream got a complete body")
        self.assertLess(watched.bytes_in, 8 * MiB)
